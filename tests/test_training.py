"""The offline module and the shipped models (issue 2): data loaders, manifest hashes, ONNX ≡ torch, smoke runs."""

from __future__ import annotations

import gzip
import json
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import write_tiny_models

from service.classify import OnnxClassifier
from service.nets import build_classifier
from service.registry import ManifestError, Registry
from training import data, eval_generator, onnx_export, train_classifier, train_gan
from training.common import record_metrics, save_weights, sha256_file, update_manifest

MODELS = Path(__file__).resolve().parent.parent / "models"


@pytest.mark.parametrize("dataset", ["mnist", "fmnist"])
def test_slices_load_with_expected_shapes_and_labels(dataset: str) -> None:
    x, y = data.load_slice(dataset)
    assert x.shape == (1000, 28, 28) and x.dtype == np.uint8
    assert y.shape == (1000,) and set(np.unique(y)) == set(range(10))
    f = data.to_float(x[:3])
    assert f.shape == (3, 1, 28, 28) and f.dtype == np.float32 and f.min() >= 0 and f.max() <= 1
    # MNIST test set starts with 7, 2, 1, 0; Fashion-MNIST's with ankle boot, pullover, trouser
    assert list(y[:3]) == ([7, 2, 1] if dataset == "mnist" else [9, 2, 1])


def test_shapes_slice_is_colour_and_generated_by_the_committed_script() -> None:
    from training import shapes

    x, y = data.load_slice("shapes")
    assert x.shape == (1000, 32, 32, 3) and x.dtype == np.uint8 and set(np.unique(y)) == set(range(10))
    assert data.to_float(x[:2]).shape == (2, 3, 32, 32)
    xs, ys = shapes.generate(10_000, seed=1)  # the test split: the slice is its first 1,000
    assert np.array_equal(xs[:1000], x) and np.array_equal(ys[:1000], y)


def test_idx_parser_roundtrip(tmp_path: Path) -> None:
    imgs = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    raw = struct.pack(">BBBB3I", 0, 0, 8, 3, 5, 28, 28) + imgs.tobytes()
    assert np.array_equal(data.parse_idx(gzip.compress(raw)), imgs)
    with pytest.raises(data.DataError):
        data.parse_idx(raw[:-1])
    with pytest.raises(data.DataError):
        data.parse_idx(b"\x00\x00\x0d\x01" + raw[4:])


def test_idx_dir_loader(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    for stem, shape in (("train-images-idx3-ubyte", (7, 28, 28)), ("train-labels-idx1-ubyte", (7,)),
                        ("t10k-images-idx3-ubyte", (3, 28, 28)), ("t10k-labels-idx1-ubyte", (3,))):  # fmt: skip
        arr = rng.integers(0, 10, shape, dtype=np.uint8)
        header = struct.pack(f">BBBB{len(shape)}I", 0, 0, 8, len(shape), *shape)
        (tmp_path / (stem + ".gz")).write_bytes(gzip.compress(header + arr.tobytes()))
    out = data.load_idx_dir(tmp_path)
    assert out["x_train"].shape == (7, 28, 28) and out["y_test"].shape == (3,)
    with pytest.raises(data.DataError, match="sha256"):
        data.load_idx_dir(tmp_path, pinned={p.name: "0" * 64 for p in tmp_path.iterdir()})


def test_restricted_unpickler_refuses_code() -> None:
    arrays = ((np.zeros((2, 784), np.float32), np.zeros(2, np.int64)),)
    assert data.restricted_unpickle(pickle.dumps(arrays, protocol=4))[0][0].shape == (2, 784)

    class Evil:
        def __reduce__(self) -> tuple:
            return (print, ("pwned",))

    with pytest.raises(pickle.UnpicklingError, match="not allowed"):
        data.restricted_unpickle(pickle.dumps(Evil()))


def test_missing_source_names_the_fixing_command(tmp_path: Path) -> None:
    with pytest.raises(data.DataError, match="python -m training.data --dataset mnist"):
        data.load("mnist", data_dir=tmp_path)


def test_manifest_hashes_match_and_tampering_is_refused(tmp_path: Path) -> None:
    reg = Registry(MODELS)  # verifies every file
    man = json.loads((MODELS / "manifest.json").read_text())
    for key, e in man["artifacts"].items():
        assert e["command"].startswith("python -m training."), key
        for f in e["files"].values():
            assert sha256_file(MODELS / f["path"]) == f["sha256"]
    assert {"mnist", "fmnist"} <= set(reg.datasets())
    for ds in ("mnist", "fmnist"):
        for arch in "ABCDE":
            assert reg.has(f"{ds}/classifier_{arch}"), (ds, arch)
    # a copy with one flipped byte must be refused with a clear message
    bad = tmp_path / "models"
    bad.mkdir()
    (bad / "manifest.json").write_text(json.dumps(man))
    first = next(iter(man["artifacts"].values()))
    for f in first["files"].values():
        dst = bad / f["path"]
        dst.parent.mkdir(parents=True, exist_ok=True)
        blob = bytearray((MODELS / f["path"]).read_bytes())
        blob[-1] ^= 1
        dst.write_bytes(bytes(blob))
    with pytest.raises(ManifestError, match="does not match its sha256|is missing"):
        Registry(bad)


# the issue's clean-accuracy bars (full test set), and the shipped models known to miss one: each such entry is a
# strict xfail, so the test fails the day a retrained model meets its bar and the entry must go
MIN_ACC = {("mnist", "A"): 0.99, ("mnist", "B"): 0.95, ("mnist", "C"): 0.99, ("mnist", "D"): 0.98,
           ("fmnist", "A"): 0.91, ("fmnist", "C"): 0.91, ("fmnist", "D"): 0.88}  # fmt: skip
KNOWN_SHORT: dict[tuple[str, str], str] = {}


@pytest.mark.parametrize(
    ("dataset", "arch"),
    [pytest.param(ds, arch, marks=pytest.mark.xfail(strict=True, reason=KNOWN_SHORT[(ds, arch)]))
     if (ds, arch) in KNOWN_SHORT else (ds, arch) for ds, arch in MIN_ACC],
)  # fmt: skip
def test_recorded_accuracy_meets_the_issue_bar(registry: Registry, dataset: str, arch: str) -> None:
    acc = registry.get(f"{dataset}/classifier_{arch}").metrics["clean_test_accuracy"]
    assert acc >= MIN_ACC[(dataset, arch)], (dataset, arch, acc)


@pytest.mark.parametrize("dataset", data.DATASETS)
def test_onnx_equals_torch_and_slice_agrees_with_record(registry: Registry, dataset: str) -> None:
    xs, ys = data.load_slice(dataset)
    x = data.to_float(xs)
    for name in registry.classifiers(dataset):
        art = registry.get(f"{dataset}/{name}")
        onnx = OnnxClassifier(art.path(registry.root, "onnx"), providers=["CPUExecutionProvider"])
        got = onnx.logits(x)
        with torch.no_grad():
            ref = registry.classifier(dataset, name)(torch.from_numpy(x)).numpy()
        assert np.abs(got - ref).max() < 1e-4, name
        # the slice's accuracy agrees with the recorded full-test-set figure (1,000 of the same 10,000 images)
        assert abs((got.argmax(1) == ys).mean() - art.metrics["clean_test_accuracy"]) < 0.04, name


def test_shipped_onnx_graphs_keep_their_weights_in_the_safetensors(registry: Registry) -> None:
    """One copy of each classifier's weights (issue 2's size budget): the .onnx is a graph whose initializers are
    external data at the safetensors tensors' byte ranges, and models/ stays under 200 MB (180 MB until the colour
    shapes set's classifier, generator, encoder and slice, 22 MB; 80 MB until the AdvGAN
    tables' 5 classifiers and 6 generators, 21 MB, were shipped; 110 MB until issue 18's MNIST C models and
    Fashion-MNIST Adv. tr. A-D, 22 MB; 140 MB until the Defense-GAN-Rec classifiers A-D of both datasets and Adv. tr.
    ε=0.15 B, C, 37 MB; a checkout still fits a 64 MiB device transfer with `scripts/gpu-check.sh slim`)."""
    for ds in registry.datasets():
        for name in registry.classifiers(ds):
            art = registry.get(f"{ds}/{name}")
            graph_path, weights_path = art.path(registry.root, "onnx"), art.path(registry.root, "weights")
            assert graph_path.stat().st_size < 10_000, name
            layout = onnx_export.safetensors_layout(weights_path)
            graph = onnx.load(str(graph_path), load_external_data=False)
            for init in graph.graph.initializer:
                ext = {e.key: e.value for e in init.external_data}
                assert ext["location"] == weights_path.name, (name, init.name)
                assert (int(ext["offset"]), int(ext["length"])) == layout[init.name], (name, init.name)
    total = sum(p.stat().st_size for p in registry.root.rglob("*") if p.is_file())
    assert total < 200e6, total


def test_onnx_weights_come_from_the_bytes_handed_over(tmp_path: Path) -> None:
    """The service passes the verified safetensors bytes: the session computes with those, not with a file."""
    torch.manual_seed(0)
    a, b = build_classifier("D").eval(), build_classifier("D").eval()
    w = tmp_path / "classifier_D.safetensors"
    save_weights(a, w)
    onnx_export.export_onnx(a, tmp_path / "classifier_D.onnx", w)
    graph, weights_a = (tmp_path / "classifier_D.onnx").read_bytes(), w.read_bytes()
    save_weights(b, w)  # the file on disk now holds other weights
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        ref_a, ref_b = a(x).numpy(), b(x).numpy()
    got = OnnxClassifier(graph, weights_a, providers=["CPUExecutionProvider"]).logits(x)
    assert np.abs(got - ref_a).max() < 1e-4
    from_path = OnnxClassifier(tmp_path / "classifier_D.onnx", providers=["CPUExecutionProvider"]).logits(x)
    assert np.abs(from_path - ref_b).max() < 1e-4  # from its path, the graph reads the file beside it
    with pytest.raises(Exception, match="(?i)external"):  # graph bytes alone: ONNX Runtime cannot find the weights
        OnnxClassifier(graph, providers=["CPUExecutionProvider"])
    with pytest.raises(ValueError, match="differs"):  # a graph is only ever linked to the weights it was made from
        onnx_export.export_onnx(a, tmp_path / "classifier_D.onnx", w)


def test_reexport_keeps_the_measured_figures(tmp_path: Path) -> None:
    root = write_tiny_models(tmp_path / "models")
    shutil.copy(MODELS / "mnist" / "test_slice.npz", root / "mnist" / "test_slice.npz")
    record_metrics("mnist/classifier_A", {"clean_test_accuracy": 0.5}, root)
    before = json.loads((root / "manifest.json").read_text())["artifacts"]["mnist/classifier_A"]
    (root / "mnist" / "classifier_A.onnx").write_bytes(b"stale")
    assert onnx_export.reexport(root) == ["mnist/classifier_A"]
    after = json.loads((root / "manifest.json").read_text())["artifacts"]["mnist/classifier_A"]
    measured = Registry(root).get("mnist/classifier_A").metrics  # the results tree's rows, on the same weights
    assert measured["clean_test_accuracy"] == 0.5 and measured["onnx_vs_torch_max_abs_diff"] < 1e-4
    assert after["files"]["weights"] == before["files"]["weights"]
    assert after["files"]["onnx"]["sha256"] == sha256_file(root / "mnist" / "classifier_A.onnx")
    Registry(root).verify()


def test_classifier_training_smoke_loss_decreases() -> None:
    xs, ys = data.load_slice("mnist")
    arrays = {"x_train": xs[:512], "y_train": ys[:512], "x_test": xs[512:640], "y_test": ys[512:640]}
    args = train_classifier.parse(["--dataset", "mnist", "--model", "D", "--epochs", "4", "--batch", "64"])
    model = train_classifier.train(args, arrays)
    assert args.history[-1] < 0.6 * args.history[0], args.history
    assert not model.training


def test_gan_training_smoke_critic_learns_and_resumes(tmp_path: Path) -> None:
    xs, _ = data.load_slice("mnist")
    argv = ["--dataset", "mnist", "--iters", "6", "--critic-iters", "2", "--batch", "16", "--runs-dir",
            str(tmp_path), "--tag", "smoke", "--ckpt-every", "3", "--log-every", "100"]  # fmt: skip
    args = train_gan.parse(argv)
    out = train_gan.train(args, xs[:256])
    assert out.exists() and (tmp_path / "mnist" / "smoke" / "ckpt.pt").exists()
    d_losses = [d for d, _ in args.history]
    assert d_losses[-1] < d_losses[0], d_losses  # the critic's Wasserstein estimate separates real from fake
    args2 = train_gan.parse([*argv[:3], "8", *argv[4:]])
    train_gan.train(args2, xs[:256])
    assert len(args2.history) == 2  # resumed at iteration 6 and ran 7, 8
    assert any((tmp_path / "mnist" / "smoke").glob("samples_000008.png"))
    ckpt = tmp_path / "mnist" / "smoke" / "ckpt.pt"
    assert torch.load(ckpt, weights_only=True)["args"]["batch"] == 16, "the checkpoint carries its arguments"
    with pytest.raises(SystemExit, match="--batch 16 \\(this run: 32\\)"):  # another batch would mix two runs
        train_gan.train(train_gan.parse([*argv[:3], "10", *argv[4:7], "32", *argv[8:]]), xs[:256])
    old = {k: v for k, v in torch.load(ckpt, weights_only=True).items() if k != "args"}
    torch.save(old, ckpt)  # a checkpoint from before they were saved still resumes
    args3 = train_gan.parse([*argv[:3], "9", *argv[4:]])
    train_gan.train(args3, xs[:256])
    assert len(args3.history) == 1


def test_fit_to_encoder_keeps_the_range_and_matches_its_statistics() -> None:
    """After the fit, eval-mode G'(E'(x)) is what train-mode G(E(x)) gave (batch statistics of the encoder's codes),
    E' = E / s, and G'(z / s) = G''(z) for G'' the fitted statistics in the trained coordinates: the same range."""
    from service.nets import Encoder, Generator

    torch.manual_seed(0)
    shape = (3, 32, 32)
    G, E = Generator(shape=shape), Encoder(shape=shape)
    x, z = torch.rand(64, *shape), torch.randn(5, 128)
    with torch.no_grad():
        G.train()
        expected, codes = G(E(x)), E(x)  # batch statistics of exactly these codes
    train_gan.fit_to_encoder(G, E, x, images=64, scale=0.5)
    assert not G.training
    with torch.no_grad():
        assert torch.allclose(E(x), codes / 0.5, atol=1e-5)
        assert torch.allclose(G(E(x)), expected, atol=1e-3)  # eval mode divides by the unbiased variance
        unscaled = Generator(shape=shape).eval()
        unscaled.load_state_dict(G.state_dict())
        unscaled.fc.weight.div_(0.5)
        assert torch.allclose(G(z / 0.5), unscaled(z), atol=1e-5)


def test_ship_keeps_dotted_names_apart(tmp_path: Path) -> None:
    """classifier_A_adv0.3 and classifier_A_adv0.15 are two artifacts with their own files (a suffix swap would
    make both write classifier_A_adv0.*)."""
    torch.manual_seed(0)
    for eps in ("0.3", "0.15"):
        model = build_classifier("A").eval()
        m = train_classifier.ship_classifier(model, "mnist", f"classifier_A_adv{eps}", {"arch": "A"}, {},
                                             models_dir=tmp_path)  # fmt: skip
        assert m["onnx_vs_torch_max_abs_diff"] < 1e-4
    reg = Registry(tmp_path)  # verifies every file against its recorded sha256
    assert reg.classifiers("mnist") == ["classifier_A_adv0.15", "classifier_A_adv0.3"]
    assert sorted(p.name for p in (tmp_path / "mnist").iterdir()) == [
        "classifier_A_adv0.15.onnx", "classifier_A_adv0.15.safetensors",
        "classifier_A_adv0.3.onnx", "classifier_A_adv0.3.safetensors"]  # fmt: skip


def test_retraining_drops_figures_measured_on_the_old_weights(tmp_path: Path) -> None:
    w = tmp_path / "mnist" / "m.safetensors"
    w.parent.mkdir(parents=True)
    w.write_bytes(b"one")
    entry = {"kind": "classifier", "dataset": "mnist", "files": {"weights": {"path": "mnist/m.safetensors"}}}
    update_manifest("mnist/m", {**entry, "metrics": {"clean_test_accuracy": 0.9}}, tmp_path)
    record_metrics("mnist/m", {"eval_robust_accuracy": {"none": 0.1}}, tmp_path, detector={"random": {}})
    update_manifest("mnist/m", {**entry, "metrics": {"onnx_vs_torch_max_abs_diff": 0.0}}, tmp_path)  # same bytes
    e = json.loads((tmp_path / "manifest.json").read_text())["artifacts"]["mnist/m"]
    measured = Registry(tmp_path, verify=False).get("mnist/m").metrics
    assert set(measured) == {"clean_test_accuracy", "eval_robust_accuracy", "onnx_vs_torch_max_abs_diff"}
    assert "detector" in e and "metrics" not in e, "the manifest holds calibrations, the results tree the figures"
    w.write_bytes(b"two")  # retrained
    update_manifest("mnist/m", {**entry, "metrics": {"clean_test_accuracy": 0.95}}, tmp_path)
    e = json.loads((tmp_path / "manifest.json").read_text())["artifacts"]["mnist/m"]
    assert Registry(tmp_path, verify=False).get("mnist/m").metrics == {"clean_test_accuracy": 0.95}
    assert "detector" not in e


def test_training_set_bound_projects_onto_the_nearest_image() -> None:
    """`eval_generator --range train-set[+x]`: the projection is the bank image nearest under MSE (or the query's own
    clean image when that is nearer), and its MSE is reported."""
    g = torch.Generator().manual_seed(0)
    bank = torch.rand(50, 1, 28, 28, generator=g)
    pick = torch.tensor([3, 17, 42])
    q = (bank[pick] + 0.05 * torch.randn(3, 1, 28, 28, generator=g)).clamp(0, 1)
    imgs, mse = eval_generator.nearest(q, bank, chunk=2)
    assert torch.equal(imgs, bank[pick])
    assert torch.allclose(mse, ((bank[pick] - q) ** 2).flatten(1).mean(1))
    own = q.clone()
    own[1] = torch.rand(1, 28, 28, generator=g)  # far from query 1: the bank image stays nearer
    imgs, mse = eval_generator.nearest(q, bank, own)
    assert torch.equal(imgs[0], q[0]) and torch.equal(imgs[2], q[2]) and torch.equal(imgs[1], bank[17])
    assert mse[0] == 0 and mse[1] > 0
    with pytest.raises(SystemExit):  # a bound is not the shipped generator's figure
        eval_generator.parse(["--dataset", "mnist", "--range", "train-set", "--record"])


def test_ensemble_training_rotates_sources_and_ships_its_statics(tiny_models: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Tramèr et al.'s ensemble adversarial training: batch i's adversarial half comes from source i mod
    (1 + statics), the model itself first; the shipped entry names the method and its static models."""
    root = tmp_path / "models"
    shutil.copytree(tiny_models, root)
    xs, ys = data.load_slice("mnist")
    arrays = {"x_train": xs[:256], "y_train": ys[:256], "x_test": xs[256:320], "y_test": ys[256:320]}
    args = train_classifier.parse(["--dataset", "mnist", "--model", "D", "--epochs", "1", "--batch", "64",
                                   "--adv-eps", "0.3", "--adv-static", "A", "--models-dir", str(root)])  # fmt: skip
    used = []
    real_fgsm = train_classifier.fgsm

    def spy(model: torch.nn.Module, *a: object, **k: object) -> torch.Tensor:
        used.append(model[0].__class__.__name__)  # D starts with Flatten, A with Conv2d
        return real_fgsm(model, *a, **k)

    monkeypatch.setattr(train_classifier, "fgsm", spy)
    model = train_classifier.train(args, arrays)
    assert used == ["Flatten", "Conv2d", "Flatten", "Conv2d"]
    train_classifier.ship(args, model)
    entry = json.loads((root / "manifest.json").read_text())["artifacts"]["mnist/classifier_D_ens0.3"]
    assert entry["training"]["method"] == "ensemble" and entry["training"]["static"] == ["mnist/classifier_A"]
    assert entry["training"]["threat"] == {"norm": "linf", "eps": 0.3}
    Registry(root).verify()
    with pytest.raises(SystemExit):
        train_classifier.parse(["--dataset", "mnist", "--model", "D", "--adv-static", "A"])  # no --adv-eps


def test_rec_classifier_trains_on_cached_reconstructions(tiny_models: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Defense-GAN-Rec's classifier: trained on G(z*) of the training images, projected once in cached chunks (a
    second run projects nothing), shipped as classifier_<X>_rec with how it was reconstructed."""
    root = tmp_path / "models"
    shutil.copytree(tiny_models, root)
    xs, ys = data.load_slice("mnist")
    arrays = {"x_train": xs[:96], "y_train": ys[:96], "x_test": xs[96:128], "y_test": ys[96:128]}
    argv = ["--dataset", "mnist", "--model", "D", "--epochs", "1", "--batch", "32", "--on-reconstructions", "64",
            "--models-dir", str(root), "--runs-dir", str(tmp_path / "runs")]  # fmt: skip
    seen: list[torch.Tensor] = []
    real_project = train_classifier.project

    def spy(x: torch.Tensor, *a: object, **k: object) -> object:
        seen.append(x)
        return real_project(x, *a, **k)

    monkeypatch.setattr(train_classifier, "project", spy)
    args = train_classifier.parse(argv)
    x, y = torch.from_numpy(data.to_float(xs[:96])), torch.from_numpy(ys[:96].astype("int64"))
    x_rec, y_rec = train_classifier.reconstructions(args, x, y, chunk=40, batch=20)
    assert x_rec.shape == (64, 1, 28, 28) and len(y_rec) == 64 and sum(len(b) for b in seen) == 64
    assert not torch.allclose(x_rec, x[: len(x_rec)])  # G(z*), not x
    assert len(list((tmp_path / "runs" / "mnist" / "train_recs").rglob("*.safetensors"))) == 2
    again, _ = train_classifier.reconstructions(args, x, y, chunk=40, batch=20)
    assert torch.equal(again, x_rec) and sum(len(b) for b in seen) == 64, "the cached chunks are reused"
    model = train_classifier.train(args, arrays)
    train_classifier.ship(args, model)
    entry = json.loads((root / "manifest.json").read_text())["artifacts"]["mnist/classifier_D_rec"]
    assert entry["training"]["method"] == "reconstructions"
    assert (
        entry["training"]["reconstructions"] | {"images": 64, "init": "encoder"} == entry["training"]["reconstructions"]
    )
    Registry(root).verify()
    with pytest.raises(SystemExit):
        train_classifier.parse([*argv, "--adv-eps", "0.3"])
