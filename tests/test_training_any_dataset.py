"""The training jobs on a data set of the user's own: a tiny colour one (3 classes, 32×32×3: squares, discs, stripes)
prepared as `training.data` writes one (data/<name>.npz and its spec data/<name>.json). Each job trains at the
smallest size its command allows and ships into a models folder of the test's; the registry then builds every network
for 3×32×32 images and 3 classes, and an unknown --dataset is refused with the known ones named."""

from __future__ import annotations

import inspect
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from service import nets
from service.datasets import DatasetSpec
from service.purify import ProjectionConfig, project
from service.registry import Registry
from training import (
    calibrate_detector,
    common,
    data,
    detectors,
    eval_generator,
    evaluate,
    onnx_export,
    robustness,
    train_advgan,
    train_classifier,
    train_encoder,
    train_magnet,
    train_robust,
)

NAME = "tinyrgb"
SPEC = DatasetSpec(NAME, 3, 32, 32, ("a", "b", "c"), "fill")


def shapes(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """n uint8 N×32×32×3 images: a coloured square (label 0), disc (1) or stripes (2) on a dark background."""
    x = np.zeros((n, 32, 32, 3), np.uint8)
    y = (np.arange(n) % 3).astype(np.uint8)
    yy, xx = np.mgrid[:32, :32]
    for i in range(n):
        x[i] = rng.integers(0, 60, 3, dtype=np.uint8)
        cy, cx, r = rng.integers(10, 22), rng.integers(10, 22), rng.integers(5, 9)
        mask = [(abs(yy - cy) <= r) & (abs(xx - cx) <= r), (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r,
                (xx // 3) % 2 == 0][y[i]]  # fmt: skip
        x[i][mask] = rng.integers(120, 256, 3, dtype=np.uint8)
    return x, y


def point_data_dir(mp: pytest.MonkeyPatch, folder: Path) -> None:
    """training.data at `folder`: MG_DATA_DIR (a job's own process), DATA_DIR, and the functions whose default
    `data_dir` was bound to DATA_DIR at import."""
    mp.setenv("MG_DATA_DIR", str(folder))
    old = data.DATA_DIR
    mp.setattr(data, "DATA_DIR", folder)
    for fn in [f for f in vars(data).values() if inspect.isfunction(f) and f.__defaults__]:
        if any(isinstance(d, Path) and d == old for d in fn.__defaults__):
            mp.setattr(fn, "__defaults__", tuple(folder if isinstance(d, Path) and d == old else d
                                                 for d in fn.__defaults__))  # fmt: skip


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A models folder (an empty manifest at first) into which every job ships for the tiny colour data set."""
    tmp = tmp_path_factory.mktemp("any_dataset")
    rng = np.random.default_rng(0)
    (x_tr, y_tr), (x_te, y_te) = shapes(60, rng), shapes(30, rng)
    (tmp / "data").mkdir()
    np.savez_compressed(tmp / "data" / f"{NAME}.npz", x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te)
    (tmp / "data" / f"{NAME}.json").write_text(json.dumps(SPEC.to_json()))
    models = tmp / "models"
    models.mkdir()
    (models / "manifest.json").write_text(json.dumps({"schema": 1, "artifacts": {}}))
    with pytest.MonkeyPatch.context() as mp:
        point_data_dir(mp, tmp / "data")
        torch.set_num_threads(1)
        run_jobs(models, tmp)
        yield models


def run_jobs(models: Path, tmp: Path) -> None:
    small = ["--dataset", NAME, "--threads", "1", "--models-dir", str(models)]
    for arch in ("A", "S"):
        args = train_classifier.parse([*small, "--model", arch, "--epochs", "1", "--batch", "32", "--device", "cpu"])
        train_classifier.ship(args, train_classifier.train(args))
    # a random generator stands in for train_gan's (its job is not this test's)
    torch.manual_seed(0)
    common.save_weights(nets.Generator(shape=SPEC.shape), models / NAME / "generator.safetensors")
    common.record_dataset(SPEC, models)
    common.update_manifest(f"{NAME}/generator", {"kind": "generator", "dataset": NAME, "command": "tests",
                                                 "files": {"weights": {"path": f"{NAME}/generator.safetensors"}},
                                                 "classes": list(SPEC.classes)}, models)  # fmt: skip
    args = train_encoder.parse([*small, "--iters", "2", "--batch", "8", "--log-every", "1"])
    train_encoder.ship(args, *train_encoder.train(args))
    args = train_encoder.parse([*small, "--joint", "--iters", "2", "--batch", "8", "--lr", "1e-4", "--latent-weight",
                                "0", "--log-every", "1"])  # fmt: skip
    train_encoder.ship(args, *train_encoder.train(args))
    mix = ["--on-reconstructions", "8", "--with-images", "--runs-dir", str(tmp / "runs")]
    args = train_classifier.parse([*small, "--model", "A", "--epochs", "1", "--batch", "32", "--device", "cpu", *mix])
    model = train_classifier.train(args)
    assert len(args.history) == 1 and args.rec_config.init == "encoder"
    train_classifier.ship(args, model)
    train_magnet.main([*small, "--epochs", "1", "--batch", "16", "--max-steps", "2", "--run-dir", str(tmp / "magnet")])
    args = train_advgan.parse([*small, "--epochs", "1", "--batch", "16", "--run-dir", str(tmp / "runs")])
    train_advgan.ship(args, *train_advgan.train(args))
    args = train_robust.parse([*small, "--eps", "0.03", "--steps", "1", "--epochs", "1", "--batch", "16",
                               "--max-steps", "1", "--monitor", "8", "--run-dir", str(tmp / "robust")])  # fmt: skip
    train_robust.ship(args, *train_robust.train(args))
    assert onnx_export.reexport(models) == [f"{NAME}/classifier_A", f"{NAME}/classifier_A_mix", f"{NAME}/classifier_S",
                                            f"{NAME}/classifier_S_trades0.03"]  # fmt: skip


def test_the_dataset_and_input_shapes_are_recorded(shipped: Path) -> None:
    man = json.loads((shipped / "manifest.json").read_text())
    assert man["datasets"] == {NAME: SPEC.to_json()}
    arts = man["artifacts"]
    names = ("classifier_A", "classifier_A_mix", "classifier_S", "classifier_S_trades0.03", "generator", "encoder",
             "magnet", "advgan_A")  # fmt: skip
    assert {k for k in arts if k.startswith(f"{NAME}/")} == {f"{NAME}/{k}" for k in names}
    for key in ("classifier_A", "classifier_A_mix", "classifier_S", "classifier_S_trades0.03"):
        assert arts[f"{NAME}/{key}"]["input_shape"] == [3, 32, 32]
    mix = arts[f"{NAME}/classifier_A_mix"]["training"]
    assert mix["method"] == "images+reconstructions" and mix["reconstructions"]["images"] == 8
    assert mix["reconstructions"]["shas"][0] == arts[f"{NAME}/generator"]["files"]["weights"]["sha256"][:12]


def test_the_joint_finetune_ships_both_and_records_its_segment(shipped: Path) -> None:
    arts = json.loads((shipped / "manifest.json").read_text())["artifacts"]
    gen, enc = arts[f"{NAME}/generator"], arts[f"{NAME}/encoder"]
    assert [s["objective"] for s in gen["segments"]] == ["reconstruction (generator and encoder)"]
    assert gen["command"] == "tests" and gen["segments"][0]["iterations"] == 2  # the GAN run stays the command
    assert enc["generator_sha256"] == gen["files"]["weights"]["sha256"] and enc["training"]["init"] == "shipped"
    torch.manual_seed(0)
    before = nets.Generator(shape=SPEC.shape).state_dict()
    after = Registry(shipped).generator(NAME).state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the generator learned


def test_the_registry_builds_every_network_for_the_images(shipped: Path) -> None:
    reg = Registry(shipped)
    assert reg.spec(NAME) == SPEC and reg.class_names(NAME) == ["a", "b", "c"]
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        for name in ("classifier_A", "classifier_S", "classifier_S_trades0.03"):
            assert reg.classifier(NAME, name)(x).shape == (1, 3)
            onnx = shipped / NAME / f"{name}.onnx"
            assert onnx_export.onnx_max_diff(reg.classifier(NAME, name), onnx, x.numpy()) < 1e-4
        G, E = reg.generator(NAME), reg.encoder(NAME)
        assert E is not None and G(E(x)).shape == x.shape
        assert reg.magnet(NAME)(x).shape == x.shape and reg.magnet_thresholds(NAME)[0] > 0
        adv = reg.module(f"{NAME}/advgan_A")(x)
        assert adv.shape == x.shape and float((adv - x).abs().max()) <= 0.3 + 1e-6


def test_the_detector_calibration_records_a_grid_point(shipped: Path) -> None:
    reg = Registry(shipped)
    try:  # the projection (service.purify) may not take these images yet
        project(torch.zeros(1, *SPEC.shape), reg.generator(NAME), ProjectionConfig(steps=0))
    except ValueError as exc:
        pytest.skip(f"service.purify.project refuses {SPEC.shape} images: {exc}")
    calibrate_detector.main(["--dataset", NAME, "--grid", "encoder:2:1", "--n", "10", "--n-test", "10", "--batch",
                             "10", "--models-dir", str(shipped), "--record"])  # fmt: skip
    cal = Registry(shipped).get(f"{NAME}/generator").raw["detector_grid"]["encoder:2:1"]
    assert (cal["n"], cal["test_n"], cal["init"]) == (10, 10, "encoder") and cal["images"].startswith("10 of test[15:]")


PARSERS = {
    "train_classifier": lambda a: train_classifier.parse([*a, "--model", "A"]),
    "train_encoder": train_encoder.parse,
    "train_magnet": train_magnet.parse,
    "train_advgan": train_advgan.parse,
    "train_robust": lambda a: train_robust.parse([*a, "--eps", "0.1"]),
    "calibrate_detector": lambda a: calibrate_detector.main([*a, "--grid", "encoder:1:1"]),
    "eval_generator": eval_generator.parse,
    "evaluate": evaluate.parse,
    "robustness": robustness.parse,
    "detectors": detectors.parse,
}


@pytest.mark.parametrize("job", PARSERS)
def test_an_unknown_dataset_is_refused_with_the_known_ones(job: str, shipped: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    if job != "calibrate_detector":  # its main() would calibrate
        assert PARSERS[job](["--dataset", NAME]).dataset == NAME
    with pytest.raises(SystemExit) as exc:
        PARSERS[job](["--dataset", "nosuch"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--dataset" in err and "nosuch" in err
    assert "known: mnist, fmnist" in err and NAME in err.rsplit("known:", 1)[1]
