"""The purification proxy end to end: real processes on loopback, no mocks.

    tritonclient[http]  →  Manifold Guard (uvicorn, tiny models)  →  KServe ModelServer (ONNX classifier A)
                                                                 →  small faulty servers (slow, garbage, stopped)
                                                                 →  a TorchServe-style raw server

The check of "purified, then forwarded": Manifold Guard's own model endpoint returns the purified images for the
same seed and parameters; sending those straight to the upstream must give exactly the logits that came back
through the proxy (and the raw input must not).
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

tritonclient_http = pytest.importorskip("tritonclient.http", reason="needs the [test] extra: tritonclient[http]")
pytest.importorskip("kserve", reason="needs the [test] extra: kserve")
from procs import Proc  # noqa: E402
from procs import free_port as _port  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PARAMS = {"steps": 4, "restarts": 2, "seed": 3}


@pytest.fixture(scope="module")
def upstream_onnx(tiny_models: Path) -> Path:
    """Our shipped classifier A when training has produced it, else the tiny one."""
    shipped = ROOT / "models" / "mnist" / "classifier_A.onnx"
    try:
        listed = "mnist/classifier_A" in json.loads((ROOT / "models" / "manifest.json").read_text())["artifacts"]
    except (OSError, ValueError, KeyError):
        listed = False
    return shipped if listed and shipped.exists() else tiny_models / "mnist" / "classifier_A.onnx"


@pytest.fixture(scope="module")
def servers(tiny_models: Path, upstream_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    logs = tmp_path_factory.mktemp("logs")
    ports = {k: _port() for k in ("kserve", "faulty", "raw", "doomed", "mg")}
    procs: list[Proc] = []
    try:
        py = sys.executable
        onnx = ["--onnx", str(upstream_onnx)]
        procs.append(Proc([py, "tests/upstreams.py", "kserve", "--port", str(ports["kserve"]), *onnx],
                          logs / "kserve.log"))  # fmt: skip
        procs.append(Proc([py, "tests/upstreams.py", "faulty", "--port", str(ports["faulty"]), "--sleep", "5"],
                          logs / "faulty.log"))  # fmt: skip
        procs.append(Proc([py, "tests/upstreams.py", "raw", "--port", str(ports["raw"]), *onnx], logs / "raw.log"))
        doomed = Proc([py, "tests/upstreams.py", "kserve", "--port", str(ports["doomed"]), *onnx], logs / "doomed.log")
        procs.append(doomed)
        k, f, d = (f"http://127.0.0.1:{ports[n]}" for n in ("kserve", "faulty", "doomed"))
        upstreams = {
            "mnist-nchw": {"url": k},
            "mnist-nhwc-u8": {"url": k, "layout": "NHWC", "datatype": "UINT8", "value_range": 255},
            "mnist-json": {"url": k, "model": "mnist-nchw", "binary_data": False},
            "slow": {"url": f, "timeout_s": 1.0},
            "garbage": {"url": f},
            "badshape": {"url": f},
            "error": {"url": f},
            "missing": {"url": f},
            "doomed": {"url": d, "model": "mnist-nchw"},
            "mnist-raw": {"url": f"http://127.0.0.1:{ports['raw']}", "protocol": "raw"},
        }
        env = {"MG_MODELS_DIR": str(tiny_models), "MG_PROXY__UPSTREAMS": json.dumps(upstreams),
               "MG_TORCH_THREADS": "1", "MG_DEFAULT_STEPS": "4", "MG_DEFAULT_RESTARTS": "2",
               "MG_PROXY__CONNECT_TIMEOUT_S": "2"}  # fmt: skip
        procs.append(Proc([py, "-m", "uvicorn", "service.api.app:create_app", "--factory", "--host", "127.0.0.1",
                           "--port", str(ports["mg"])], logs / "mg.log", env))  # fmt: skip
        procs[0].wait_http(f"{k}/v2/health/ready")
        procs[1].wait_http(f"http://127.0.0.1:{ports['faulty']}/v2/health/ready")
        procs[2].wait_http(f"http://127.0.0.1:{ports['raw']}/ping")
        doomed.wait_http(f"{d}/v2/health/ready")
        procs[4].wait_http(f"http://127.0.0.1:{ports['mg']}/v2/health/ready")
        yield {"mg": f"127.0.0.1:{ports['mg']}", "kserve": f"127.0.0.1:{ports['kserve']}", "doomed": doomed}
    finally:
        for p in reversed(procs):
            p.stop()


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """Three 28×28 images on the UINT8 grid (so FP32 and UINT8 upstreams see the same pixels)."""
    rng = np.random.default_rng(7)
    return (rng.integers(0, 256, (3, 1, 28, 28)) / 255).astype(np.float32)


def _input(x: np.ndarray, binary: bool, datatype: str = "FP32") -> object:
    t = tritonclient_http.InferInput("input", list(x.shape), datatype)
    t.set_data_from_numpy(x, binary_data=binary)
    return t


def _outputs(binary: bool) -> list:
    return [tritonclient_http.InferRequestedOutput(n, binary_data=binary) for n in ("logits", "label")]


def _purified(mg: object, x: np.ndarray) -> np.ndarray:
    """The purified images, from Manifold Guard's own endpoint, for the same seed and parameters."""
    r = mg.infer("mnist-classifier_A", [_input(x, True)], outputs=[tritonclient_http.InferRequestedOutput("purified")],
                 parameters=PARAMS)  # fmt: skip
    return r.as_numpy("purified")


@pytest.mark.parametrize(("binary_in", "binary_out"), [(False, False), (True, True), (True, False)])
def test_proxy_purifies_then_forwards_to_kserve(servers: dict, images: np.ndarray, binary_in: bool,
                                                binary_out: bool) -> None:  # fmt: skip
    mg = tritonclient_http.InferenceServerClient(servers["mg"])
    up = tritonclient_http.InferenceServerClient(servers["kserve"])
    r = mg.infer("mnist-nchw", [_input(images, binary_in)], outputs=_outputs(binary_out), parameters=PARAMS)
    resp = r.get_response()
    assert resp["model_name"] == "mnist-nchw"
    params = resp["parameters"]
    assert params["upstream"] == "kserve"  # the upstream's own parameters survive
    assert (params["purified"], params["defense"], params["steps"], params["restarts"], params["images"]) == (
        True, "defense-gan", 4, 2, 3)  # fmt: skip
    assert params["purify_ms"] > 0 and 0 <= params["flagged"] <= 3
    for o in resp["outputs"]:
        assert ("binary_data_size" in (o.get("parameters") or {})) is binary_out
    logits = r.as_numpy("logits")
    purified = _purified(mg, images)
    assert purified.shape == images.shape and np.abs(purified - images).max() > 0.1
    direct = up.infer("mnist-nchw", [_input(purified, True)], outputs=_outputs(True))
    np.testing.assert_allclose(logits, direct.as_numpy("logits"), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(r.as_numpy("label"), direct.as_numpy("label"))
    raw = up.infer("mnist-nchw", [_input(images, True)], outputs=_outputs(True)).as_numpy("logits")
    assert np.abs(raw - logits).max() > 1e-4  # the upstream did not see the raw input


def test_proxy_converts_layout_datatype_and_range(servers: dict, images: np.ndarray) -> None:
    mg = tritonclient_http.InferenceServerClient(servers["mg"])
    up = tritonclient_http.InferenceServerClient(servers["kserve"])
    u8 = np.rint(images * 255).astype(np.uint8).transpose(0, 2, 3, 1)  # N×28×28×1 in [0, 255]
    r = mg.infer("mnist-nhwc-u8", [_input(u8, True, "UINT8")], outputs=_outputs(False), parameters=PARAMS)
    purified_u8 = np.rint(_purified(mg, images) * 255).astype(np.uint8).transpose(0, 2, 3, 1)
    direct = up.infer("mnist-nhwc-u8", [_input(purified_u8, True, "UINT8")], outputs=_outputs(False))
    np.testing.assert_allclose(r.as_numpy("logits"), direct.as_numpy("logits"), rtol=0, atol=1e-6)
    # a JSON-only upstream entry (binary_data: false) reaches the same model with the same answer
    j = mg.infer("mnist-json", [_input(images, True)], outputs=_outputs(True), parameters=PARAMS)
    f = mg.infer("mnist-nchw", [_input(images, True)], outputs=_outputs(True), parameters=PARAMS)
    np.testing.assert_array_equal(j.as_numpy("logits"), f.as_numpy("logits"))
    assert j.get_response()["model_name"] == "mnist-json"


def test_protocol_endpoints_through_tritonclient(servers: dict) -> None:
    mg = tritonclient_http.InferenceServerClient(servers["mg"])
    assert mg.is_server_live() and mg.is_server_ready()
    assert mg.get_server_metadata()["name"] == "manifold-guard"
    assert mg.is_model_ready("mnist-classifier_A") and mg.is_model_ready("mnist-nchw")
    assert mg.get_model_metadata("mnist-classifier_A")["inputs"][0]["shape"] == [-1, 1, 28, 28]
    assert mg.get_model_metadata("mnist-nhwc-u8")["name"] == "mnist-nhwc-u8"  # the upstream's, renamed
    assert not mg.is_model_ready("slow")  # the faulty server has no ready endpoint for models
    with pytest.raises(InferenceServerException, match="unknown model"):
        mg.get_model_metadata("nobody")
    index = {m["name"]: m for m in mg.get_model_repository_index()}  # the repository extension, as Triton's
    assert index["mnist-classifier_A"] == {"name": "mnist-classifier_A", "version": "1", "state": "READY"}
    assert index["mnist-nchw"]["state"] == "READY" and index["slow"]["state"] == "UNAVAILABLE"
    ready = httpx.post(f"http://{servers['mg']}/v2/repository/index", json={"ready": True}).json()
    assert "slow" not in {m["name"] for m in ready} and "mnist-nchw" in {m["name"] for m in ready}


def test_versions_and_health_bodies_as_clients_read_them(servers: dict, images: np.ndarray) -> None:
    mg = tritonclient_http.InferenceServerClient(servers["mg"])
    assert mg.is_model_ready("mnist-classifier_A", "1") and not mg.is_model_ready("mnist-classifier_A", "2")
    assert mg.get_model_metadata("mnist-classifier_A", "1")["versions"] == ["1"]
    r = mg.infer("mnist-classifier_A", [_input(images, True)], model_version="1", parameters={"defense": "none"})
    assert r.get_response()["model_version"] == "1" and r.as_numpy("labels").shape == (len(images),)
    with pytest.raises(InferenceServerException, match="version '1' only"):
        mg.infer("mnist-classifier_A", [_input(images, True)], model_version="7")

    async def kserve_client() -> tuple[bool, bool, bool]:
        from kserve import InferenceRESTClient, RESTConfig

        c = InferenceRESTClient(RESTConfig(protocol="v2", retries=0))
        url = f"http://{servers['mg']}"
        try:
            return (await c.is_server_live(url), await c.is_server_ready(url),
                    await c.is_model_ready(url, "mnist-classifier_A"))  # fmt: skip
        finally:
            await c.close()

    assert asyncio.run(kserve_client()) == (True, True, True)


def test_own_model_over_the_protocol(servers: dict, images: np.ndarray) -> None:
    mg = tritonclient_http.InferenceServerClient(servers["mg"])
    r = mg.infer("mnist-classifier_A", [_input(images, False)], parameters=PARAMS)
    probs = r.as_numpy("probabilities")
    assert probs.shape == (3, 10) and np.allclose(probs.sum(1), 1, atol=1e-5)
    np.testing.assert_array_equal(r.as_numpy("labels"), probs.argmax(1))
    assert r.as_numpy("mse").shape == (3,) and r.as_numpy("flagged").dtype == bool
    none = mg.infer("mnist-classifier_A", [_input(images, True)], parameters={"defense": "none"})
    assert none.get_response()["parameters"]["purified"] is False and none.as_numpy("mse") is None


@pytest.mark.parametrize(
    ("params", "message"),
    [({"steps": 10**6}, "steps=1000000 is outside"), ({"defense": "magic"}, "'defense' must be one of"),
     ({"defense": "invert-classify", "steps": -1}, "steps=-1 is outside"), ({"restarts": 0}, "restarts=0 is outside"),
     ({"steps": True}, "steps must be an integer")],
)  # fmt: skip
def test_bad_purification_parameters_are_400(servers: dict, images: np.ndarray, params: dict, message: str) -> None:
    mg = tritonclient_http.InferenceServerClient(servers["mg"])
    with pytest.raises(InferenceServerException, match=message) as e:
        mg.infer("mnist-nchw", [_input(images, True)], parameters=params)
    assert e.value.status() == "400"


def test_defense_none_forwards_the_input_unchanged(servers: dict, images: np.ndarray) -> None:
    """A proxied name with defense none: the per-client defences and output policy alone (the public profile)."""
    mg = tritonclient_http.InferenceServerClient(servers["mg"])
    up = tritonclient_http.InferenceServerClient(servers["kserve"])
    r = mg.infer("mnist-nchw", [_input(images, True)], outputs=_outputs(True), parameters={"defense": "none"})
    direct = up.infer("mnist-nchw", [_input(images, True)], outputs=_outputs(True))
    np.testing.assert_array_equal(r.as_numpy("logits"), direct.as_numpy("logits"))
    assert r.get_response()["parameters"]["purified"] is False


def test_wrong_tensors_for_the_upstream_are_400(servers: dict, images: np.ndarray) -> None:
    mg = tritonclient_http.InferenceServerClient(servers["mg"])
    with pytest.raises(InferenceServerException, match="must be UINT8") as e:
        mg.infer("mnist-nhwc-u8", [_input(images, True)])
    assert e.value.status() == "400"
    with pytest.raises(InferenceServerException, match="must have shape"):
        mg.infer("mnist-nchw", [_input(images.reshape(3, 28, 28, 1), True)])
    with pytest.raises(InferenceServerException, match=r"values must lie in \[0, 1\]"):
        mg.infer("mnist-nchw", [_input(images * 3, True)])


def _post(servers: dict, name: str, **kw: object) -> httpx.Response:
    body = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 28, 28],
                                   "data": [0.5] * 784}], **kw}).encode()  # fmt: skip
    return httpx.post(f"http://{servers['mg']}/v2/models/{name}/infer", content=body, timeout=30)


@pytest.mark.parametrize(
    ("name", "status", "message"),
    [("slow", 504, "timed out"), ("garbage", 502, "malformed upstream response"),
     ("badshape", 502, "needs 6 elements"), ("error", 502, "model exploded"), ("missing", 404, "unknown model")],
)  # fmt: skip
def test_upstream_faults_map_to_protocol_errors(servers: dict, name: str, status: int, message: str) -> None:
    r = _post(servers, name)
    assert r.status_code == status
    assert message in r.json()["error"] and list(r.json()) == ["error"]


def test_upstream_stopped_is_502_and_not_ready(servers: dict) -> None:
    assert _post(servers, "doomed").status_code == 200
    servers["doomed"].stop()
    r = _post(servers, "doomed")
    assert r.status_code == 502 and "unreachable" in r.json()["error"]
    ready = httpx.get(f"http://{servers['mg']}/v2/models/doomed/ready", timeout=10)
    assert ready.status_code == 503 and "error" in ready.json()
    assert _post(servers, "mnist-nchw").status_code == 200  # the others are unaffected


def test_raw_predictions_forward_the_purified_png(servers: dict, images: np.ndarray) -> None:
    buf = io.BytesIO()
    Image.fromarray(np.rint(images[0, 0] * 255).astype(np.uint8)).save(buf, format="PNG")
    r = httpx.post(f"http://{servers['mg']}/predictions/mnist-raw", params=PARAMS, content=buf.getvalue(),
                   headers={"Content-Type": "image/png"}, timeout=60)  # fmt: skip
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "mnist-raw" and body["size"] == [28, 28] and body["mode"] == "L"
    mg = tritonclient_http.InferenceServerClient(servers["mg"])
    purified = np.rint(_purified(mg, images[:1])[0, 0] * 255).astype(np.uint8)
    np.testing.assert_array_equal(np.array(body["pixels"], dtype=np.uint8).reshape(28, 28), purified)
    assert r.headers["X-Purification-Defense"] == "defense-gan" and r.headers["X-Purification-Steps"] == "4"
    bad = httpx.post(f"http://{servers['mg']}/predictions/mnist-raw", content=b"not an image", timeout=30)
    assert bad.status_code == 415 and "error" in bad.json()
    assert httpx.post(f"http://{servers['mg']}/predictions/mnist-nchw", content=buf.getvalue()).status_code == 404


def test_kserve_manifest_is_consistent(upstream_onnx: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """deploy/kserve: the transformer's env is valid settings, and Triton's config names the ONNX model's tensors."""
    import onnxruntime as ort
    import yaml

    from service.config import Settings

    isvc = yaml.safe_load((ROOT / "deploy" / "kserve" / "inferenceservice.yaml").read_text())
    (container,) = isvc["spec"]["transformer"]["containers"]
    for item in container["env"]:
        monkeypatch.setenv(item["name"], item["value"])
    up = Settings().proxy.upstreams["mnist"]
    assert up.url.startswith(f"http://{isvc['metadata']['name']}-predictor.")
    assert isvc["spec"]["predictor"]["model"]["protocolVersion"] == "v2"
    config = (ROOT / "deploy" / "kserve" / "model-repository" / "mnist" / "config.pbtxt").read_text()
    session = ort.InferenceSession(str(upstream_onnx), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].name == up.input_name and f'name: "{up.input_name}"' in config
    assert f'name: "{session.get_outputs()[0].name}"' in config and f'name: "{up.model}"' in config


def unknown_fields(value: object, type_name: str) -> list[str]:
    """Keys of a manifest that KServe's (or Kubernetes') generated model `type_name` does not have, recursively."""
    import kserve.models
    import kubernetes.client.models

    if m := re.fullmatch(r"[Ll]ist\[(.+)\]", type_name):
        return [u for v in value for u in unknown_fields(v, m.group(1))] if isinstance(value, list) else [type_name]
    cls = getattr(kserve.models, type_name, None) or getattr(kubernetes.client.models, type_name, None)
    if cls is None or not isinstance(value, dict):  # a scalar, a map, or an untyped object
        return []
    by_json = {v: k for k, v in cls.attribute_map.items()}
    out = [f"{type_name}.{key}" for key in value if key not in by_json]
    return out + [
        u for key, v in value.items() if key in by_json for u in unknown_fields(v, cls.openapi_types[by_json[key]])
    ]


def test_kserve_manifest_uses_current_fields_and_triton_options() -> None:
    """Every field of inferenceservice.yaml exists in the installed KServe SDK's v1beta1 models; Triton gets the
    current option (not the deprecated --strict-model-config), and its config.pbtxt parses as Triton's ModelConfig."""
    import yaml

    isvc = yaml.safe_load((ROOT / "deploy" / "kserve" / "inferenceservice.yaml").read_text())
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1" and isvc["kind"] == "InferenceService"
    assert unknown_fields(isvc, "V1beta1InferenceService") == []
    assert unknown_fields(
        {"spec": {"predictor": {"model": {"storageUrl": "x"}}}}, "V1beta1InferenceService"
    )  # can fail
    args = isvc["spec"]["predictor"]["model"]["args"]
    assert "--disable-auto-complete-config" in args and not any("strict-model-config" in a for a in args)
    (container,) = isvc["spec"]["transformer"]["containers"]
    assert container["securityContext"]["runAsNonRoot"] and container["securityContext"]["runAsUser"] == 10001
    assert "USER 10001:10001" in (ROOT / "Dockerfile").read_text()  # the image's user is the pod's
    import importlib.util

    from google.protobuf import text_format

    # Triton's ModelConfig schema, loaded alone: tritonclient.grpc's package would register protos KServe has too
    triton = importlib.util.find_spec("tritonclient")
    assert triton is not None and triton.submodule_search_locations
    path = Path(next(iter(triton.submodule_search_locations))) / "grpc" / "model_config_pb2.py"
    spec = importlib.util.spec_from_file_location("triton_model_config_pb2", path)
    assert spec is not None and spec.loader is not None
    model_config = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(model_config)

    text = (ROOT / "deploy" / "kserve" / "model-repository" / "mnist" / "config.pbtxt").read_text()
    config = text_format.Parse(text, model_config.ModelConfig())
    assert config.backend == "onnxruntime" and config.max_batch_size == 64 and len(config.input) == 1


def test_concurrent_proxied_requests_batch_without_changing_answers(servers: dict, images: np.ndarray) -> None:
    """Requests that arrive together are purified as one batch; with a seed each still gets its own answer."""
    from concurrent.futures import ThreadPoolExecutor

    def one(i: int) -> np.ndarray:
        c = tritonclient_http.InferenceServerClient(servers["mg"])
        return c.infer("mnist-nchw", [_input(images[i : i + 1], True)], outputs=_outputs(True),
                       parameters=PARAMS).as_numpy("logits")  # fmt: skip

    with ThreadPoolExecutor(3) as pool:
        together = list(pool.map(one, range(3)))
    mg = tritonclient_http.InferenceServerClient(servers["mg"])
    alone = mg.infer("mnist-nchw", [_input(images, True)], outputs=_outputs(True), parameters=PARAMS)
    np.testing.assert_allclose(np.concatenate(together), alone.as_numpy("logits"), rtol=0, atol=1e-5)


def test_invert_and_classify_through_the_proxy(servers: dict, images: np.ndarray) -> None:
    mg = tritonclient_http.InferenceServerClient(servers["mg"])
    r = mg.infer("mnist-nchw", [_input(images, True)], parameters={"defense": "invert-classify", "steps": 0})
    params = r.get_response()["parameters"]
    assert (params["defense"], params["steps"], params["purified"]) == ("invert-classify", 0, True)
    assert r.as_numpy("logits").shape == (3, 10)
