"""A colour dataset end to end: its spec in the registry, imaging that keeps colour, /v1 and /v2 answers of its shape,
caps scaled by image size, and the proxy purifying an RGB NHWC UINT8 KServe upstream in colour."""

from __future__ import annotations

import base64
import io
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_RGB, write_tiny_models
from fastapi.testclient import TestClient
from PIL import Image

from service import imaging
from service.api.app import create_app
from service.config import Settings
from service.datasets import DatasetSpec, SpecError
from service.registry import ManifestError, Registry

RNG = np.random.default_rng(3)


@pytest.fixture(scope="module")
def rgb_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_models(tmp_path_factory.mktemp("rgb"), ("mnist",), specs=(TINY_RGB,))


@pytest.fixture(scope="module")
def client(rgb_models: Path) -> Iterator[TestClient]:
    s = Settings(models_dir=rgb_models, default_steps=2, default_restarts=1, torch_threads=1, warm_up=False)
    with TestClient(create_app(s)) as c:
        yield c


def png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def colour_image(h: int = 48, w: int = 64) -> np.ndarray:
    """A red left half, a blue right half (so a crop or a gray conversion shows)."""
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 2, 0] = 220
    a[:, w // 2 :, 2] = 200
    return a


# -- the spec ---------------------------------------------------------------------------------------------------
def test_spec_is_recorded_and_nets_follow_it(rgb_models: Path) -> None:
    reg = Registry(rgb_models)
    assert reg.spec("tinyrgb") == TINY_RGB and reg.spec("mnist").shape == (1, 28, 28)
    assert reg.class_names("tinyrgb") == ["red", "green", "blue"]
    x = torch.rand(2, 3, 32, 32)
    assert reg.classifier("tinyrgb")(x).shape == (2, 3)
    assert reg.generator("tinyrgb")(torch.randn(2, 128)).shape == (2, 3, 32, 32)
    assert reg.encoder("tinyrgb")(x).shape == (2, 128)  # type: ignore[union-attr]


def test_a_classifier_of_another_shape_is_refused_at_start_up(tmp_path: Path) -> None:
    root = write_tiny_models(tmp_path, ("mnist",), specs=(TINY_RGB,))
    doc = json.loads((root / "manifest.json").read_text())
    doc["artifacts"]["tinyrgb/classifier_A"]["input_shape"] = [1, 28, 28]
    (root / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(ManifestError, match=r"tinyrgb/classifier_A takes \[1, 28, 28\]"):
        Registry(root)


@pytest.mark.parametrize(("doc", "message"), [
    ({"channels": 2, "height": 32, "width": 32, "classes": ["a", "b"]}, "channels"),
    ({"channels": 3, "height": 30, "width": 30, "classes": ["a", "b"]}, "side"),
    ({"channels": 3, "height": 32, "width": 32, "classes": ["a"]}, "two or more"),
    ({"channels": 3, "height": 32, "width": 32, "classes": ["a", "b"], "resize": "stretch"}, "resize"),
    ({"channels": 3, "classes": ["a", "b"]}, "malformed"),
])  # fmt: skip
def test_bad_specs_are_refused(doc: dict, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        DatasetSpec.from_json("x", doc)


# -- imaging ----------------------------------------------------------------------------------------------------
def test_colour_is_kept_and_fitted_by_the_dataset_policy() -> None:
    x = imaging.decode_files([png(colour_image())], 10**6, 4, spec=TINY_RGB)
    assert x.shape == (1, 3, 32, 32)
    assert x[0, 0, :, :8].mean() > 0.8 and x[0, 2, :, :8].mean() < 0.05, "left: red"
    assert x[0, 2, :, -8:].mean() > 0.7 and x[0, 0, :, -8:].mean() < 0.05, "right: blue"
    assert x[0, :, 0].sum() > 0, "fill covers the frame: no black band at the top"
    fit = DatasetSpec("fit", 3, 32, 32, ("a", "b"), "fit")
    y = imaging.decode_files([png(colour_image())], 10**6, 4, spec=fit)
    assert float(y[0, :, 0].abs().sum()) == 0.0, "fit pads a 48×64 image with black rows"
    gray = imaging.decode_files([png(np.full((32, 32), 128, np.uint8))], 10**6, 4, spec=TINY_RGB)
    assert torch.equal(gray[0, 0], gray[0, 1]) and torch.equal(gray[0, 1], gray[0, 2]), "gray replicated to RGB"
    luma = imaging.decode_files([png(colour_image(28, 28))], 10**6, 4)  # MNIST's spec: luma, as before
    assert luma.shape == (1, 1, 28, 28) and abs(float(luma[0, 0, 0, 0]) - 0.299 * 220 / 255) < 1 / 255


def test_colour_png_round_trip() -> None:
    x = torch.rand(3, 32, 32)
    back = imaging.decode_files([imaging.encode_png(x)], 10**6, 1, spec=TINY_RGB)[0]
    assert torch.allclose(back, x, atol=1 / 255)


# -- /v1 and /v2 ------------------------------------------------------------------------------------------------
def test_v1_classifies_and_purifies_in_colour(client: TestClient) -> None:
    files = {"file": ("x.png", png(colour_image()), "image/png")}
    r = client.post("/v1/classify", data={"model": "tinyrgb/classifier_A", "defense": "defense-gan", "seed": "1",
                                          "return_purified": "true", "return_input": "true"}, files=files)  # fmt: skip
    assert r.status_code == 200, r.text
    pred = r.json()["predictions"][0]
    assert len(pred["probabilities"]) == 3 and pred["class_name"] in ("red", "green", "blue")
    for key in ("purified_png", "input_png"):
        im = np.asarray(Image.open(io.BytesIO(base64.b64decode(pred[key]))))
        assert im.shape == (32, 32, 3), key
        assert (im[..., 0] != im[..., 2]).any(), f"{key}: the channels differ (colour, not gray replicated)"
    r = client.post("/v1/purify", params={"dataset": "tinyrgb", "format": "npy", "seed": 1},
                    content=png(colour_image()), headers={"content-type": "image/png"})  # fmt: skip
    assert r.status_code == 200
    assert np.load(io.BytesIO(r.content), allow_pickle=False).shape == (1, 3, 32, 32)


def test_v1_models_shows_each_spec_and_caps_scale(client: TestClient) -> None:
    info = client.get("/v1/models").json()["datasets"]
    assert info["tinyrgb"]["spec"] == {"channels": 3, "height": 32, "width": 32, "resize": "fill",
                                       "images_per_request": int(64 / (3 * 32 * 32 / 784))}  # fmt: skip
    assert info["mnist"]["spec"]["images_per_request"] == 64
    many = {"array": np.zeros((17, 32, 32, 3)).tolist(), "model": "tinyrgb/classifier_A", "defense": "none"}
    r = client.post("/v1/classify", json=many)
    assert r.status_code == 413 and "the limit is 16" in r.json()["error"]


def test_v2_own_colour_model_takes_nchw_and_nhwc(client: TestClient) -> None:
    meta = client.get("/v2/models/tinyrgb-classifier_A").json()
    assert meta["inputs"][0]["shape"] == [-1, 3, 32, 32]
    x = RNG.random((2, 3, 32, 32)).astype(np.float32)
    outs = []
    for data in (x, x.transpose(0, 2, 3, 1)):
        body = {"inputs": [{"name": "input", "shape": list(data.shape), "datatype": "FP32",
                            "data": data.ravel().tolist()}], "parameters": {"defense": "none"}}  # fmt: skip
        r = client.post("/v2/models/tinyrgb-classifier_A/infer", json=body)
        assert r.status_code == 200, r.text
        outs.append(next(o for o in r.json()["outputs"] if o["name"] == "probabilities")["data"])
    assert np.allclose(outs[0], outs[1]) and len(outs[0]) == 6
    bad = {"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.0] * 784}]}
    r = client.post("/v2/models/tinyrgb-classifier_A/infer", json=bad)
    assert r.status_code == 400 and "N×3×32×32" in r.json()["error"]


# -- the proxy in front of an RGB KServe upstream ---------------------------------------------------------------
def test_proxy_purifies_an_rgb_nhwc_uint8_kserve_upstream_in_colour(rgb_models: Path, tmp_path: Path) -> None:
    pytest.importorskip("kserve", reason="needs the [test] extra: kserve")
    tritonclient_http = pytest.importorskip("tritonclient.http")
    from procs import Proc, free_port

    ports = {k: free_port() for k in ("kserve", "mg")}
    k = f"http://127.0.0.1:{ports['kserve']}"
    upstreams = {"rgb-nhwc-u8": {"url": k, "layout": "NHWC", "datatype": "UINT8", "value_range": 255,
                                 "dataset": "tinyrgb"}}  # fmt: skip
    env = {"MG_MODELS_DIR": str(rgb_models), "MG_PROXY__UPSTREAMS": json.dumps(upstreams), "MG_TORCH_THREADS": "1",
           "MG_DEFAULT_STEPS": "3", "MG_DEFAULT_RESTARTS": "1"}  # fmt: skip
    onnx = [str(rgb_models / "mnist" / "classifier_A.onnx"), str(rgb_models / "tinyrgb" / "classifier_A.onnx")]
    procs = [Proc([sys.executable, "tests/upstreams.py", "kserve", "--port", str(ports["kserve"]), "--onnx", onnx[0],
                   "--rgb-onnx", onnx[1]], tmp_path / "kserve.log"),
             Proc([sys.executable, "-m", "uvicorn", "service.api.app:create_app", "--factory", "--host", "127.0.0.1",
                   "--port", str(ports["mg"])], tmp_path / "mg.log", env)]  # fmt: skip
    try:
        procs[0].wait_http(f"{k}/v2/health/ready")
        procs[1].wait_http(f"http://127.0.0.1:{ports['mg']}/v2/health/ready")
        mg = tritonclient_http.InferenceServerClient(f"127.0.0.1:{ports['mg']}")
        x = RNG.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
        t = tritonclient_http.InferInput("input", list(x.shape), "UINT8")
        t.set_data_from_numpy(x)
        out = [tritonclient_http.InferRequestedOutput(n) for n in ("logits", "received")]
        r = mg.infer("rgb-nhwc-u8", [t], outputs=out, parameters={"defense": "defense-gan", "seed": 4})
        received = r.as_numpy("received")
        assert received.shape == (2, 32, 32, 3) and received.dtype == np.uint8
        assert not np.array_equal(received, x), "the upstream got the purified images, not the input"
        assert (received[..., 0] != received[..., 2]).any(), "colour, not gray replicated"
        own = tritonclient_http.InferInput("input", [2, 3, 32, 32], "FP32")
        own.set_data_from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2), np.float32) / 255)
        ref = mg.infer("tinyrgb-classifier_A", [own], outputs=[tritonclient_http.InferRequestedOutput("purified")],
                       parameters={"defense": "defense-gan", "seed": 4})  # fmt: skip
        want = np.rint(ref.as_numpy("purified").transpose(0, 2, 3, 1) * 255).astype(np.uint8)
        assert np.abs(received.astype(int) - want).max() <= 1, "the same purification as our own endpoint's"
    finally:
        for p in reversed(procs):
            p.stop()
