"""The Open Inference Protocol as its clients speak it: tritonclient[http] and kserve's InferenceRESTClient,
unmodified, against a real uvicorn on loopback (tiny models).

Every combination a client offers is tried on our own model: with and without a model version, JSON and binary
tensors, the request body plain, gzip- or deflate-compressed (Triton's HTTP compression), the response compressed
when the client asks. Every combination must give the same answer.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from servers import Server

tritonclient_http = pytest.importorskip("tritonclient.http", reason="needs the [test] extra: tritonclient[http]")
kserve = pytest.importorskip("kserve", reason="needs the [test] extra: kserve")
from tritonclient.utils import InferenceServerException  # noqa: E402

MODEL = "mnist-classifier_A"
PARAMS = {"defense": "defense-gan", "steps": 2, "restarts": 1, "seed": 5}
OUTPUTS = ("probabilities", "labels", "mse", "flagged", "purified")


@pytest.fixture(scope="module")
def server(tiny_models: Path) -> Iterator[Server]:
    with Server.running(tiny_models, False) as srv:
        yield srv


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    rng = np.random.default_rng(11)
    return rng.random((3, 1, 28, 28), dtype=np.float32)


def _triton(server: Server) -> object:
    return tritonclient_http.InferenceServerClient(server.url.removeprefix("http://"))


def _triton_infer(server: Server, x: np.ndarray, binary: bool, version: str = "", compression: str | None = None
                  ) -> dict[str, np.ndarray]:  # fmt: skip
    t = tritonclient_http.InferInput("input", list(x.shape), "FP32")
    t.set_data_from_numpy(x, binary_data=binary)
    outputs = [tritonclient_http.InferRequestedOutput(n, binary_data=binary) for n in OUTPUTS]
    r = _triton(server).infer(MODEL, [t], model_version=version, outputs=outputs, parameters=PARAMS,
                              request_compression_algorithm=compression,
                              response_compression_algorithm=compression)  # fmt: skip
    resp = r.get_response()
    assert resp["model_name"] == MODEL and resp["model_version"] == "1"
    for o in resp["outputs"]:  # binary when asked, JSON otherwise
        assert ("binary_data_size" in (o.get("parameters") or {})) is binary
    return {n: r.as_numpy(n) for n in OUTPUTS}


@pytest.fixture(scope="module")
def reference(server: Server, images: np.ndarray) -> dict[str, np.ndarray]:
    out = _triton_infer(server, images, binary=True)
    assert out["probabilities"].shape == (3, 10) and out["purified"].shape == images.shape
    assert out["flagged"].dtype == bool and out["labels"].dtype == np.int64
    return out


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("compression", [None, "gzip", "deflate"])
@pytest.mark.parametrize("binary", [False, True])
@pytest.mark.parametrize("version", ["", "1"])
def test_tritonclient_infer_every_combination(server: Server, images: np.ndarray, reference: dict, version: str,
                                              binary: bool, compression: str | None) -> None:  # fmt: skip
    _same(_triton_infer(server, images, binary, version, compression), reference)


def test_tritonclient_health_and_metadata_with_and_without_version(server: Server) -> None:
    c = _triton(server)
    assert c.is_server_live() and c.is_server_ready()
    meta = c.get_server_metadata()
    assert meta["name"] == "manifold-guard" and "binary_tensor_data" in meta["extensions"]
    for version in ("", "1"):
        assert c.is_model_ready(MODEL, version)
        m = c.get_model_metadata(MODEL, version)
        assert m["name"] == MODEL and m["versions"] == ["1"]
        assert [o["name"] for o in m["outputs"]] == list(OUTPUTS)
    assert not c.is_model_ready(MODEL, "2") and not c.is_model_ready("nobody")
    with pytest.raises(InferenceServerException, match="version '1' only"):
        c.get_model_metadata(MODEL, "2")


def test_tritonclient_gzip_body_over_the_cap_is_refused(server: Server, images: np.ndarray) -> None:
    """The upload cap applies to the decoded body: a small gzip bomb is 413, never inflated past the cap."""
    bomb = gzip.compress(b'{"inputs": [' + b" " * 1_000_000 + b"]}")
    assert len(bomb) < 10_000
    r = httpx.post(f"{server.url}/v2/models/{MODEL}/infer", content=bomb, headers={"Content-Encoding": "gzip"})
    assert r.status_code == 413 and "decoded body exceeds" in r.json()["error"]
    r = httpx.post(f"{server.url}/v2/models/{MODEL}/infer", content=b"not gzip", headers={"Content-Encoding": "gzip"})
    assert r.status_code == 400 and "could not be decoded" in r.json()["error"]
    r = httpx.post(f"{server.url}/v2/models/{MODEL}/infer", content=b"{}", headers={"Content-Encoding": "br"})
    assert r.status_code == 415


@pytest.mark.parametrize("accept", ["gzip", "deflate", "identity"])
def test_response_compressed_as_the_client_accepts(server: Server, images: np.ndarray, reference: dict,
                                                   accept: str) -> None:  # fmt: skip
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(images.shape),
                        "data": images.ravel().tolist()}], "parameters": PARAMS}  # fmt: skip
    url, headers = f"{server.url}/v2/models/{MODEL}/infer", {"Accept-Encoding": accept}
    with httpx.Client() as c, c.stream("POST", url, content=json.dumps(body).encode(), headers=headers) as r:
        raw = b"".join(r.iter_raw())  # the bytes on the wire, to see their encoding
    assert r.status_code == 200
    assert r.headers.get("content-encoding", "identity") == accept
    plain = {"gzip": gzip.decompress, "deflate": zlib.decompress}.get(accept, bytes)(raw)
    got = json.loads(plain)
    probs = np.array(got["outputs"][0]["data"], dtype=np.float32).reshape(3, 10)
    np.testing.assert_allclose(probs, reference["probabilities"], rtol=0, atol=1e-6)


def _kserve_request(x: np.ndarray, binary: bool) -> object:
    from kserve import InferInput, InferRequest
    from kserve.protocol.infer_type import RequestedOutput

    t = InferInput("input", list(x.shape), "FP32")
    t.set_data_from_numpy(x, binary_data=binary)
    outputs = [RequestedOutput(n, {"binary_data": binary}) for n in OUTPUTS]
    return InferRequest(MODEL, [t], parameters=PARAMS, request_outputs=outputs)


def test_kserve_rest_client(server: Server, images: np.ndarray, reference: dict) -> None:
    """kserve's client has no version argument (a versioned call names the versioned path as the model) and does not
    compress requests; its httpx accepts gzip answers, so they come compressed."""
    from kserve import InferenceRESTClient, RESTConfig

    async def calls() -> tuple[list[bool], list[dict[str, np.ndarray]], list[bool]]:
        c = InferenceRESTClient(RESTConfig(protocol="v2", retries=0))
        try:
            health = [await c.is_server_live(server.url), await c.is_server_ready(server.url),
                      await c.is_model_ready(server.url, MODEL)]  # fmt: skip
            answers = []
            for binary in (False, True):
                for name in (MODEL, f"{MODEL}/versions/1"):
                    headers: dict[str, str] = {}
                    r = await c.infer(server.url, _kserve_request(images, binary), model_name=name,
                                      response_headers=headers)  # fmt: skip
                    assert r.model_name == MODEL
                    assert headers["content-encoding"] == "gzip", "httpx accepts gzip: the answer came compressed"
                    answers.append({o.name: o.as_numpy() for o in r.outputs})
            unknown = [await c.is_model_ready(server.url, n) for n in ("nobody", f"{MODEL}/versions/2")]
            return health, answers, unknown
        finally:
            await c.close()

    health, answers, unknown = asyncio.run(calls())
    assert health == [True, True, True] and unknown == [False, False]
    for a in answers:
        _same(a, reference)
