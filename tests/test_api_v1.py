"""The /v1 API in-process (TestClient, lifespan included) on the tiny random-weight registry."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import wait_ready, write_tiny_models
from fastapi.testclient import TestClient
from PIL import Image

from service import imaging
from service.api.app import create_app
from service.attacks import ATTACKS
from service.config import AttackSettings, Settings
from service.engine import Engine
from service.purify import ProjectionConfig
from service.registry import ManifestError, Registry

ROOT = Path(__file__).resolve().parent.parent
RNG = np.random.default_rng(1)
DIGITS = RNG.integers(0, 256, size=(3, 28, 28), dtype=np.uint8)


def settings(models: Path, **kw: object) -> Settings:
    base = dict(models_dir=models, device="cpu", default_steps=2, default_restarts=2, encoder_steps=2, max_steps=20,
                max_restarts=4, max_upload_bytes=300_000, max_batch_images=8, max_wait_ms=1.0)  # fmt: skip
    return Settings(**{**base, **kw})  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def client(tiny_models: Path) -> Iterator[TestClient]:
    with TestClient(create_app(settings(tiny_models))) as c:
        wait_ready(c)
        yield c


def png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a / 255.0).float().reshape(-1, 1, 28, 28)


def test_classify_every_input_form_gives_the_same_answer(client: TestClient) -> None:
    data = png(DIGITS[0])
    q = {"seed": 3, "steps": 2, "restarts": 2}
    answers = [
        client.post("/v1/classify", params=q, files={"file": ("d.png", data, "image/png")}),
        client.post("/v1/classify", params=q, content=data, headers={"content-type": "image/png"}),
        client.post("/v1/classify", json={"image": b64(data), **q}),
        client.post("/v1/classify", json={"array": (DIGITS[0] / 255.0).tolist(), **q}),
        client.post("/v1/classify", json={"array": DIGITS[0].tolist(), "value_range": 255, **q}),
    ]
    bodies = [r.json() for r in answers]
    assert all(r.status_code == 200 for r in answers), bodies
    first = bodies[0]["predictions"][0]
    for b in bodies:
        p = b["predictions"][0]
        assert p["label"] == first["label"] and np.allclose(p["probabilities"], first["probabilities"], atol=1e-6)
        assert b["defense"] == "defense-gan" and b["steps"] == 2 and b["restarts"] == 2


def test_classify_matches_the_engine(client: TestClient, tiny_registry: Registry) -> None:
    engine = Engine(tiny_registry, "cpu")
    r = client.post("/v1/classify", json={"images": [b64(png(d)) for d in DIGITS], "seed": 11, "steps": 3,
                                          "restarts": 2, "return_purified": True})  # fmt: skip
    assert r.status_code == 200, r.text
    body = r.json()
    direct = engine.defend(tensor(DIGITS), "mnist", "classifier_A", "defense-gan",
                           ProjectionConfig(steps=3, restarts=2), seed=11)  # fmt: skip
    assert [p["label"] for p in body["predictions"]] == direct.labels.tolist()
    assert np.allclose([p["probabilities"] for p in body["predictions"]], direct.probs, atol=1e-5)
    assert np.allclose([p["mse"] for p in body["predictions"]], direct.mse, atol=1e-6)
    assert [p["flagged"] for p in body["predictions"]] == (direct.mse > 0.05).tolist()
    assert body["threshold"] == 0.05 and body["model"] == "mnist/classifier_A"
    purified = imaging.decode_files([base64.b64decode(body["predictions"][1]["purified_png"])], 10**6, 8)
    assert torch.allclose(purified, direct.purified[1:2], atol=1 / 255)
    assert {"decode_ms", "queue_ms", "purify_ms", "classify_ms", "total_ms"} <= set(body["timings_ms"])


def test_return_input_is_the_model_input(client: TestClient) -> None:
    """The 28×28 input as the model saw it: a 28×28 image comes back unchanged; a larger one after the decoder's
    resizing (imaging.decode_files), with or without a defense."""
    big = np.kron(DIGITS[0], np.ones((3, 3), dtype=np.uint8))[5:, :]  # 79×84: resized and centred
    resized = np.round(imaging.decode_files([png(big)], 10**6, 1)[0, 0].numpy() * 255)
    for data, defense, want in ((png(DIGITS[1]), "defense-gan", DIGITS[1]), (png(big), "none", resized)):
        files = {"file": ("x.png", data, "image/png")}
        r = client.post("/v1/classify", data={"return_input": "true", "defense": defense}, files=files)
        assert r.status_code == 200, r.text
        pred = r.json()["predictions"][0]
        assert pred["purified_png"] is None, "return_input does not ask for the purified image"
        back = np.asarray(Image.open(io.BytesIO(base64.b64decode(pred["input_png"]))))
        assert back.shape == (28, 28) and np.array_equal(back, want)
    r = client.post("/v1/classify", json={"image": b64(png(DIGITS[0])), "return_input": "yes please"})
    assert r.status_code == 422 and "return_input" in r.json()["error"]
    plain = client.post("/v1/classify", json={"image": b64(png(DIGITS[0]))}).json()
    assert plain["predictions"][0]["input_png"] is None


def test_undefended_and_invert_classify(client: TestClient, tiny_registry: Registry) -> None:
    r = client.post("/v1/classify", params={"defense": "none"}, json={"array": (DIGITS / 255.0).tolist()})
    body = r.json()
    assert r.status_code == 200 and body["defense"] == "none" and body["steps"] == 0
    labels, _ = Engine(tiny_registry, "cpu").classify(tensor(DIGITS), "mnist", "classifier_A")
    assert [p["label"] for p in body["predictions"]] == labels.tolist()
    assert all(p["mse"] is None and p["flagged"] is None for p in body["predictions"])
    r = client.post("/v1/classify", json={"image": b64(png(DIGITS[0])), "defense": "invert-classify"})
    assert r.status_code == 200 and r.json()["steps"] == 2 and r.json()["restarts"] == 1


def test_purify_png_json_npy(client: TestClient, tiny_registry: Registry) -> None:
    data = png(DIGITS[0])
    direct = Engine(tiny_registry, "cpu").purify(tensor(DIGITS[:1]), "mnist", ProjectionConfig(steps=2, restarts=2),
                                                 seed=5)  # fmt: skip
    r = client.post("/v1/purify", params={"seed": 5}, content=data, headers={"content-type": "image/png"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert float(r.headers["x-mg-mse"]) == pytest.approx(float(direct.mse[0]), rel=1e-4)
    assert torch.allclose(imaging.decode_files([r.content], 10**6, 8), direct.images, atol=1 / 255)
    r = client.post("/v1/purify", params={"seed": 5, "format": "npy"}, content=data,
                    headers={"content-type": "image/png"})  # fmt: skip
    arr = np.load(io.BytesIO(r.content), allow_pickle=False)
    assert arr.dtype == np.float32 and np.allclose(arr, direct.images.numpy(), atol=1e-5)
    r = client.post("/v1/purify", json={"images": [b64(data)] * 2, "format": "json", "seed": 5})
    body = r.json()
    assert r.status_code == 200 and len(body["images"]) == 2 and body["threshold"] == 0.05
    assert body["images"][0]["mse"] == pytest.approx(float(direct.mse[0]), rel=1e-4)
    r = client.post("/v1/purify", json={"images": [b64(data)] * 2})
    assert r.status_code == 422 and "format=json" in r.json()["error"]


def test_detect_score_is_the_reconstruction_error(client: TestClient) -> None:
    r = client.post("/v1/detect", json={"images": [b64(png(d)) for d in DIGITS], "seed": 1})
    body = r.json()
    assert r.status_code == 200 and body["threshold"] == 0.05 and body["fpr"] == 0.05
    for d in body["detections"]:
        assert d["flagged"] == (d["score"] > 0.05)
    r = client.post("/v1/detect", json={"image": b64(png(DIGITS[0])), "defense": "invert-classify"})
    assert r.status_code == 200 and r.json()["threshold"] is None and r.json()["detections"][0]["flagged"] is None


def test_models_lists_the_manifest(client: TestClient, tiny_models: Path) -> None:
    body = client.get("/v1/models").json()
    manifest = json.loads((tiny_models / "manifest.json").read_text())["artifacts"]
    assert body["datasets"]["mnist"]["classifiers"] == ["classifier_A"]
    assert body["datasets"]["mnist"]["generator"] and body["datasets"]["mnist"]["encoder"]
    assert {a["key"]: a["files"] for a in body["artifacts"]} == {k: v["files"] for k, v in manifest.items()}
    assert body["caps"]["max_steps"] == 20


BAD = [
    (b"not an image at all", "image/png", 415),
    (png(DIGITS[0])[:60], "image/png", 400),
    (b'{"image": ', "application/json", 400),
    (b"[1, 2, 3]", "application/json", 422),
    (b"[" * 100_000, "application/json", 400),
    (b"\xff\xfe{}", "application/json", 400),
    (b'{"nothing": 1}', "application/json", 422),
    (json.dumps({"image": 5}).encode(), "application/json", 422),
    (json.dumps({"image": "%%%"}).encode(), "application/json", 400),
    (json.dumps({"array": [[0.5] * 28] * 27 + [[0.5] * 27]}).encode(), "application/json", 400),
    (b'{"array": [[NaN, 0.5], [0.5, 0.5]]}', "application/json", 400),
    (json.dumps({"array": [[1.5] * 28] * 28}).encode(), "application/json", 400),
    (json.dumps({"array": [[0.5] * 28] * 28, "steps": 21}).encode(), "application/json", 422),
    (json.dumps({"array": [[0.5] * 28] * 28, "restarts": 5}).encode(), "application/json", 422),
    (json.dumps({"array": [[0.5] * 28] * 28, "restarts": 0}).encode(), "application/json", 422),
    (json.dumps({"array": [[0.5] * 28] * 28, "steps": "many"}).encode(), "application/json", 422),
    (json.dumps({"array": [[0.5] * 28] * 28, "defense": "magic"}).encode(), "application/json", 422),
    (json.dumps({"array": [[0.5] * 28] * 28, "model": "mnist/classifier_Z"}).encode(), "application/json", 404),
    (json.dumps({"array": [[0.5] * 28] * 28, "colour": "blue"}).encode(), "application/json", 422),
    (json.dumps({"array": [[[0.5] * 28] * 28] * 9}).encode(), "application/json", 413),
    (b"\x00" * 300_001, "image/png", 413),
    (b"abc", "text/plain", 415),
    (b"--xyz\r\nbroken", "multipart/form-data; boundary=xyz", 422),
]


@pytest.mark.parametrize(("body", "ctype", "status"), BAD)
def test_bad_inputs_get_json_4xx(client: TestClient, body: bytes, ctype: str, status: int) -> None:
    r = client.post("/v1/classify", content=body, headers={"content-type": ctype})
    assert r.status_code == status, r.text
    assert isinstance(r.json()["error"], str) and r.json()["error"]


def test_no_content_type_and_empty_multipart(client: TestClient) -> None:
    r = client.post("/v1/classify", content=b"")
    assert r.status_code == 415 and "Content-Type" in r.json()["error"]
    r = client.post("/v1/classify", data={"steps": "2"}, files={})
    assert r.status_code in (415, 422)
    r = client.post("/v1/classify", data={"defense": "none"}, files={"file": ("x.bin", b"\x00\x01", "x/y")})
    assert r.status_code == 415


def test_busy_and_timeout_are_503_and_504(client: TestClient) -> None:
    batcher = client.app.state.batcher  # type: ignore[attr-defined]
    data = {"image": b64(png(DIGITS[0])), "defense": "none"}
    old = batcher.max_queue, batcher.timeout_s
    try:
        batcher.max_queue = 0
        r = client.post("/v1/classify", json=data)
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1 and "busy" in r.json()["error"]
        batcher.max_queue, batcher.timeout_s = old[0], 1e-9
        r = client.post("/v1/classify", json=data)
        assert r.status_code == 504 and "longer than" in r.json()["error"]
    finally:
        batcher.max_queue, batcher.timeout_s = old
    assert client.post("/v1/classify", json=data).status_code == 200


def test_health_metrics_openapi(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json()["status"] == "ready"
    client.post("/v1/classify", json={"image": b64(png(DIGITS[0]))})
    text = client.get("/metrics").text
    for name in ("mg_http_requests_total{", "mg_http_request_duration_seconds_bucket", "mg_batch_size_bucket",
                 "mg_queue_depth", "mg_purification_steps_total", "mg_detector_flags_total"):  # fmt: skip
        assert name in text, name
    assert 'route="/v1/classify"' in text
    spec = client.get("/openapi.json").json()
    for path in ("/v1/classify", "/v1/purify", "/v1/detect", "/v1/models", "/healthz", "/readyz", "/metrics"):
        assert path in spec["paths"], path
    content = spec["paths"]["/v1/classify"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json", "image/png"} <= set(content)
    assert "example" in content["application/json"]


def corrupt_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    weights = dst / "mnist" / "classifier_A.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    return dst


def test_start_up_refuses_a_hash_mismatch(tiny_models: Path, tmp_path: Path) -> None:
    bad = corrupt_copy(tiny_models, tmp_path / "models")
    with pytest.raises(ManifestError, match="sha256"), TestClient(create_app(settings(bad))):
        pass
    env = {**os.environ, "MG_MODELS_DIR": str(bad), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "service", "--port", "1"], env=env, capture_output=True, text=True,
                          timeout=120, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 2
    assert "refusing to start" in proc.stderr and "classifier_A" in proc.stderr and "sha256" in proc.stderr


def test_a_file_swapped_after_start_up_is_refused_when_loaded(tiny_models: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    shutil.copytree(tiny_models, models)
    reg = Registry(models)  # verified now
    corrupt_copy(tiny_models, tmp_path / "other")
    for name in ("classifier_A.safetensors", "classifier_A.onnx"):
        shutil.copy(tmp_path / "other" / "mnist" / name, models / "mnist" / name)
    onnx = models / "mnist" / "classifier_A.onnx"
    onnx.write_bytes(b"swapped" + onnx.read_bytes())
    with pytest.raises(ManifestError, match="changed since"):
        reg.classifier("mnist", "classifier_A")
    with pytest.raises(ManifestError, match="changed since"):
        Engine(reg, "cpu").onnx("mnist", "classifier_A")
    assert reg.generator("mnist") is not None  # the untouched files still load


def test_enhanced_invert_classify_uses_the_enhanced_twin(tmp_path: Path, client: TestClient) -> None:
    """enhanced-invert-classify = the warm-start projection, then classifier_X_enhanced; 404 where none is shipped."""
    r = client.post("/v1/classify", json={"image": b64(png(DIGITS[0])), "defense": "enhanced-invert-classify"})
    assert r.status_code == 404 and "enhanced" in r.json()["error"]
    assert "enhanced-invert-classify" not in client.get("/v1/models").json()["datasets"]["mnist"]["defenses"]
    models = write_tiny_models(tmp_path / "models", enhanced=True)
    reg = Registry(models)
    with TestClient(create_app(settings(models))) as c:
        wait_ready(c)
        info = c.get("/v1/models").json()["datasets"]["mnist"]
        assert info["defenses"] == ["none", "defense-gan", "invert-classify", "enhanced-invert-classify"]
        assert set(info["measured"]) == {"classifier_A", "classifier_A_enhanced"}
        r = c.post("/v1/classify", params={"seed": 3},
                   json={"images": [b64(png(d)) for d in DIGITS], "defense": "enhanced-invert-classify"})  # fmt: skip
        body = r.json()
        assert r.status_code == 200 and body["model"] == "mnist/classifier_A_enhanced"
        assert body["steps"] == 2 and body["restarts"] == 1
        engine = Engine(reg, "cpu")
        warm = ProjectionConfig(init="encoder", steps=2, restarts=1)
        direct = engine.defend(tensor(DIGITS), "mnist", "classifier_A", "enhanced-invert-classify", warm, seed=3)
        twin = engine.defend(tensor(DIGITS), "mnist", "classifier_A_enhanced", "invert-classify", warm, seed=3)
        plain = engine.defend(tensor(DIGITS), "mnist", "classifier_A", "invert-classify", warm, seed=3)
        assert np.allclose([p["probabilities"] for p in body["predictions"]], direct.probs, atol=1e-5)
        assert np.array_equal(direct.probs, twin.probs) and not np.allclose(direct.probs, plain.probs)
        # over the Open Inference Protocol too
        req = {"inputs": [{"name": "images", "shape": [3, 1, 28, 28], "datatype": "FP32",
                           "data": (DIGITS / 255.0).ravel().tolist()}],
               "parameters": {"defense": "enhanced-invert-classify", "seed": 3}}  # fmt: skip
        r = c.post("/v2/models/mnist-classifier_A/infer", json=req)
        assert r.status_code == 200, r.text
        probs = next(o for o in r.json()["outputs"] if o["name"] == "probabilities")["data"]
        assert np.allclose(np.reshape(probs, (3, 10)), direct.probs, atol=1e-5)
    r = client.post("/v2/models/mnist-classifier_A/infer", json=req)
    assert r.status_code == 404 and "enhanced" in r.json()["error"]


def test_metrics_label_every_route_by_its_template(client: TestClient) -> None:
    client.get("/openapi.json")
    client.get("/no/such/route")
    text = client.get("/metrics").text
    assert 'route="/openapi.json",status="200"' in text
    assert 'route="unmatched",status="404"' in text


def _stage_counts(client: TestClient, model: str) -> dict[str, float]:
    """mg_stage_seconds' observation count per stage for `model`, from /metrics."""
    found = re.findall(r'mg_stage_seconds_count\{model="([^"]+)",stage="(\w+)"\} (\S+)', client.get("/metrics").text)
    return {stage: float(n) for m, stage, n in found if m == model}


def test_metrics_time_every_stage_per_model(client: TestClient) -> None:
    """One /v1/classify and one /v2 infer each add one observation of decode, queue, purify and classify under the
    model's label; /v1/purify, which classifies nothing, adds all but classify under the dataset's."""
    stages = ("decode", "queue", "purify", "classify")
    before, ds_before = _stage_counts(client, "mnist/classifier_A"), _stage_counts(client, "mnist")
    r = client.post("/v1/classify", json={"image": b64(png(DIGITS[0])), "defense": "defense-gan"})
    assert r.status_code == 200, r.text
    image = {
        "name": "images",
        "shape": [1, 1, 28, 28],
        "datatype": "FP32",
        "data": (DIGITS[0] / 255.0).ravel().tolist(),
    }
    req = {"inputs": [image], "parameters": {"defense": "invert-classify"}}
    r = client.post("/v2/models/mnist-classifier_A/infer", json=req)
    assert r.status_code == 200, r.text
    assert client.post("/v1/purify", json={"image": b64(png(DIGITS[0])), "format": "json"}).status_code == 200
    after, ds_after = _stage_counts(client, "mnist/classifier_A"), _stage_counts(client, "mnist")
    assert {s: after.get(s, 0) - before.get(s, 0) for s in stages} == dict.fromkeys(stages, 2.0)
    assert {s: ds_after.get(s, 0) - ds_before.get(s, 0) for s in stages} == {**dict.fromkeys(stages, 1.0),
                                                                            "classify": 0}  # fmt: skip


def test_the_openapi_document_tells_the_truth(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    assert "#/$defs/" not in json.dumps(doc), "embedded schemas must not point at the document's root"
    assert "/v1/attack" not in doc["paths"], "disabled: it answers 404, so it is not in the schema"
    op = doc["paths"]["/v1/classify"]["post"]
    assert {"400", "413", "415", "422", "503", "504"} <= set(op["responses"])
    example = op["requestBody"]["content"]["application/json"]["example"]
    r = client.post("/v1/classify", json={**example, "steps": 2, "restarts": 1})
    assert r.status_code == 200, "the schema's own example is a valid request"
    assert "text/plain" in next(iter(doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]))
    s = client.app.state.settings  # type: ignore[attr-defined]
    query = {p["name"]: p["schema"] for p in op["parameters"]}  # the caps are the schema's bounds; no null in a query
    assert query["steps"] == {**query["steps"], "type": "integer", "minimum": 0, "maximum": s.max_steps}
    assert query["restarts"]["minimum"] == 1 and query["restarts"]["maximum"] == s.max_restarts
    body = op["requestBody"]["content"]["application/json"]["schema"]
    assert body["additionalProperties"] is False and body["properties"]["images"]["maxItems"] == s.max_batch_images
    infer = doc["paths"]["/v2/models/{name}/infer"]["post"]
    assert {"application/json", "application/octet-stream"} <= set(infer["requestBody"]["content"])
    assert {"400", "404", "413", "415", "503"} <= set(infer["responses"])


def test_the_page_and_its_assets_come_from_the_package(client: TestClient) -> None:
    """GET / serves service/static/index.html with a same-origin-only CSP; its assets exist and name no other
    origin (no CDN, no external font); nothing outside the static folder is reachable through it."""
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in r.headers["content-security-policy"]
    assert "/" not in client.get("/openapi.json").json()["paths"]
    for asset in ("/static/app.js", "/static/style.css"):
        assert asset in r.text
        a = client.get(asset)
        assert a.status_code == 200 and len(a.text) > 1000
        assert "https://" not in a.text and "http://" not in a.text.replace("http://www.w3.org/2000/svg", "")
    assert "http" not in r.text.replace('href="/docs"', "")
    for path in ("/static/../config.py", "/static/%2e%2e/config.py", "/static/../../models/manifest.json"):
        assert client.get(path).status_code == 404
    api = client.get("/static/app.js").text
    assert "localStorage" not in api and "sessionStorage" not in api and "document.cookie" not in api
    assert set(re.findall(r'"(/v1/[a-z]+)"', api)) == {"/v1/models", "/v1/classify", "/v1/attack"}


def test_models_says_whether_attacks_are_on(client: TestClient, tiny_models: Path) -> None:
    assert client.get("/v1/models").json()["attack"] == {"enabled": False}
    s = settings(tiny_models, warm_up=False).model_copy(update={"attack": AttackSettings(enabled=True)})
    with TestClient(create_app(s)) as c:
        info = c.get("/v1/models").json()["attack"]
    assert info["enabled"] is True and info["caps"]["max_generator_evals"] == s.attack.max_generator_evals
    assert set(info["methods"]) == set(ATTACKS)
    assert info["methods"]["fgsm"] == {"norm": "linf", "params": ["eps"], "defaults": {"eps": 0.3}, "target": "any"}
    assert info["methods"]["bpda"]["target"] == "defended" and info["methods"]["pgd-l2"]["norm"] == "l2"


def test_docs_render_offline_from_the_package(client: TestClient) -> None:
    page = client.get("/docs").text
    assert "cdn" not in page.lower() and "/docs-assets/swagger-ui-bundle.js" in page
    js = client.get("/docs-assets/swagger-ui-bundle.js")
    assert js.status_code == 200 and len(js.content) > 100_000
    assert client.get("/docs-assets/swagger-ui.css").status_code == 200
