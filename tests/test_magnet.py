"""MagNet (issue 18): the autoencoders as the authors build them, training and calibration, the attacks through it,
and `defense=magnet` served end to end through a real uvicorn (v1 and v2)."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from servers import Server, e2e_models

from service import nets
from service.attacks import Reformed, detector_aware
from service.config import Settings
from service.engine import Engine, NotShipped, classifier_for, projection_config
from service.registry import Registry
from training import data, train_magnet
from training.robustness import Budget, Pipeline, attacks_for, detect_attacks_for, worst_case


def test_autoencoders_mirror_the_authors_structure() -> None:
    """AE I: conv3-avgpool-conv3 | conv3-upsample-conv3 | conv1, all sigmoid; AE II: conv3 | conv3 | conv1."""
    m = nets.MagNet()
    kinds = [type(layer).__name__ for layer in m.ae1]
    assert kinds == ["Conv2d", "Sigmoid", "AvgPool2d", "Conv2d", "Sigmoid", "Conv2d", "Sigmoid", "Upsample",
                     "Conv2d", "Sigmoid", "Conv2d", "Sigmoid"]  # fmt: skip
    assert [layer.out_channels for layer in m.ae2 if isinstance(layer, torch.nn.Conv2d)] == [3, 3, 1]
    x = torch.rand(4, 1, 28, 28)
    out = m(x).detach()
    assert out.shape == x.shape and float(out.min()) >= 0 and float(out.max()) <= 1
    s1, s2 = m.scores(x)
    assert torch.allclose(s1, (x - out).pow(2).mean((1, 2, 3)))
    assert torch.allclose(s2, (x - m.ae2(x)).abs().mean((1, 2, 3)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A models folder (tiny + shipped MNIST classifier A) with a MagNet trained for a few hundred steps on the
    slice and shipped into it by the job itself."""
    models, _ = e2e_models(tmp_path_factory.mktemp("magnet_models"))
    xs, ys = data.load_slice("mnist")
    arrays = {"x_train": xs[:800], "y_train": ys[:800], "x_test": xs[800:], "y_test": ys[800:]}
    run = tmp_path_factory.mktemp("magnet_run")
    args = train_magnet.parse(["--dataset", "mnist", "--epochs", "3", "--batch", "32", "--lr", "0.01",
                               "--threads", "1", "--run-dir", str(run), "--models-dir", str(models)])  # fmt: skip
    torch.manual_seed(args.seed)  # the job's own initial weights (it seeds the same way before building the net)
    untrained = train_magnet.scores(nets.MagNet(), torch.from_numpy(data.to_float(xs[640:800])))
    net, history = train_magnet.train(args, arrays)
    detector = train_magnet.ship(args, net, history, arrays)
    return models, {"history": history, "detector": detector, "arrays": arrays, "untrained": untrained}


def test_training_lowers_reconstruction_error_and_thresholds_keep_the_drop_rate(trained: tuple[Path, dict]) -> None:
    models, t = trained
    h, (mse0, mae0) = t["history"], t["untrained"]
    assert h[-1]["val_mse_I"] < 0.7 * float(mse0.mean()), (h, float(mse0.mean()))
    assert h[-1]["val_mae_II"] < 0.7 * float(mae0.mean()), (h, float(mae0.mean()))
    det = t["detector"]
    # thresholds are the (1 − 0.001) quantile of clean validation scores: at most one of 160 images is over
    net = Registry(models).magnet("mnist")
    x_val = torch.from_numpy(data.to_float(t["arrays"]["x_train"][-160:]))
    s1, s2 = net.scores(x_val)
    assert int((s1 > det["I"]["threshold"]).sum()) <= 1 and int((s2 > det["II"]["threshold"]).sum()) <= 1
    entry = json.loads((models / "manifest.json").read_text())["artifacts"]["mnist/magnet"]
    assert entry["kind"] == "magnet" and entry["command"].startswith("python -m ")
    Registry(models).verify()  # the shipped file matches its recorded sha256


def test_engine_reforms_classifies_and_flags(trained: tuple[Path, dict]) -> None:
    models, t = trained
    eng = Engine(Registry(models), "cpu")
    x = torch.from_numpy(data.to_float(data.load_slice("mnist")[0][:8]))
    noise = torch.rand(2, 1, 28, 28)  # far from any digit: both detectors fire
    r = eng.defend(torch.cat([x, noise]), "mnist", "classifier_A", "magnet")
    net = Registry(models).magnet("mnist")
    with torch.no_grad():
        want = torch.from_numpy(eng.classify(net(torch.cat([x, noise])), "mnist", "classifier_A")[1])
    assert np.allclose(r.probs, want.numpy(), atol=1e-5)
    assert r.steps == 0 and r.purified is not None and r.flagged is not None
    assert r.flagged[8:].all() and r.flagged[:8].sum() <= 1
    assert projection_config("magnet", 5, 2, Settings()) is None  # steps and restarts do not apply


def test_attacks_through_the_shipped_magnet_use_its_exact_gradient(registry: Registry) -> None:
    reg = registry
    xs, ys = data.load_slice("mnist")
    x, y = torch.from_numpy(data.to_float(xs[:24])), torch.from_numpy(ys[:24].astype(np.int64))
    p = Pipeline(reg, "mnist", "classifier_A", "magnet")
    assert attacks_for("magnet") == ("apgd-ce", "apgd-t", "fab-t", "square")
    assert detect_attacks_for("magnet") == ("detector-aware", "detector-aware-w1", "detector-aware-w100")
    x.requires_grad_(True)
    p.forward(x).logsumexp(1).sum().backward()  # the gradient reaches the input through the autoencoder
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    x = x.detach()
    quick = Budget(iters=10, square_queries=50, batch=24, fab_targets=2)
    cell = worst_case(p, x, y, "linf", 0.3, ("apgd-ce",), 0, quick)
    assert cell["clean_correct"] >= 22  # the shipped reformer keeps clean digits readable
    assert cell["robust"] < cell["clean_correct"] // 2  # classifier A (no adversarial training) falls through it
    assert isinstance(p.forward, Reformed)
    adv = detector_aware(p.forward, x, y, eps=0.3, alpha=0.03, steps=20)
    assert float((adv - x).abs().max()) <= 0.3 + 1e-6
    fooled = (p.forward(adv).argmax(1) != y) & (p.forward.excess(adv) <= 0)
    assert bool(fooled.any())  # misread and under both thresholds: what "correct or flagged" must count


@pytest.fixture(scope="module")
def server(trained: tuple[Path, dict]) -> Iterator[Server]:
    srv = Server(trained[0], True)
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def test_served_magnet_equals_the_engine_on_v1_and_v2(server: Server) -> None:
    xs, _ = data.load_slice("mnist")
    eng = Engine(Registry(server.models), "cpu")
    want = eng.defend(torch.from_numpy(data.to_float(xs[:2])), "mnist", "classifier_A", "magnet")
    files = {"file": ("d.png", png(xs[0]), "image/png")}
    r = httpx.post(server.url + "/v1/classify?model=mnist/classifier_A&defense=magnet&return_purified=true",
                   files=files, timeout=60)  # fmt: skip
    assert r.status_code == 200, r.text
    body = r.json()
    p = body["predictions"][0]
    assert body["defense"] == "magnet" and body["steps"] == 0
    assert np.allclose(p["probabilities"], want.probs[0], atol=1e-4)
    assert p["mse"] == pytest.approx(float(want.mse[0]), rel=1e-4) and p["flagged"] == bool(want.flagged[0])
    assert base64.b64decode(p["purified_png"]).startswith(b"\x89PNG")
    models = httpx.get(server.url + "/v1/models", timeout=10).json()
    assert "magnet" in models["datasets"]["mnist"]["defenses"]
    assert set(models["datasets"]["mnist"]["detector"]["magnet"]) >= {"I", "II", "drop_rate"}
    # v2: the same images as a tensor, the same probabilities
    tensor = {"name": "images", "shape": [2, 1, 28, 28], "datatype": "FP32",
              "data": data.to_float(xs[:2]).ravel().tolist()}  # fmt: skip
    body = {"inputs": [tensor], "parameters": {"defense": "magnet"}}
    r = httpx.post(server.url + "/v2/models/mnist-classifier_A/infer", json=body, timeout=60)
    assert r.status_code == 200, r.text
    out = {o["name"]: o for o in r.json()["outputs"]}
    probs = np.array(out["probabilities"]["data"]).reshape(2, 10)
    assert np.allclose(probs, want.probs, atol=1e-4)
    assert r.json()["parameters"]["defense"] == "magnet"


def test_magnet_is_refused_where_it_is_not_shipped(tiny_registry: Registry) -> None:
    with pytest.raises(NotShipped, match="MagNet"):
        classifier_for(tiny_registry, "mnist", "classifier_A", "magnet")
    with pytest.raises(NotShipped, match="MagNet"):
        Engine(tiny_registry, "cpu").defend(torch.rand(1, 1, 28, 28), "mnist", "classifier_A", "magnet")


def test_served_magnet_refuses_what_does_not_apply(server: Server) -> None:
    xs, _ = data.load_slice("mnist")
    files = {"file": ("d.png", png(xs[0]), "image/png")}
    r = httpx.post(server.url + "/v1/classify?model=mnist/classifier_A&defense=mystery", files=files, timeout=30)
    assert r.status_code == 422
    body = {"inputs": [{"name": "images", "shape": [1, 1, 28, 28], "datatype": "FP32",
                        "data": data.to_float(xs[:1]).ravel().tolist()}], "parameters": {"defense": "magnet",
                                                                                          "seed": True}}  # fmt: skip
    r = httpx.post(server.url + "/v2/models/mnist-classifier_A/infer", json=body, timeout=30)
    assert r.status_code == 400 and "seed" in r.json()["error"], r.text
    assert httpx.get(server.url + "/readyz", timeout=10).status_code == 200  # still serving
