"""Open Inference Protocol codec: JSON and binary round trips, and malformed bodies rejected with clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from service import oip
from service.config import Upstream
from service.proxy import from_unit, to_unit

ARRAYS = {
    "FP32": np.array([[0.0, 0.25, -1.5], [3.0e-8, 1e30, 7.0]], dtype=np.float32),
    "FP64": np.array([1 / 3, -2.0, 1e-300]),
    "FP16": np.array([0.5, -2.0], dtype=np.float16),
    "UINT8": np.arange(0, 256, 51, dtype=np.uint8).reshape(2, 3),
    "INT8": np.array([-128, 0, 127], dtype=np.int8),
    "INT32": np.array([-(2**31), 2**31 - 1], dtype=np.int32),
    "INT64": np.array([[-(2**62)], [2**62]], dtype=np.int64),
    "UINT64": np.array([2**64 - 1], dtype=np.uint64),
    "BOOL": np.array([True, False, True]),
}


def _bytes_tensor() -> np.ndarray:
    a = np.empty((2, 2), dtype=object)
    a[:] = [[b"cat", b""], ["dog €".encode(), b"x" * 300]]
    return a


@pytest.mark.parametrize("binary", [False, True])
def test_request_round_trip_every_datatype(binary: bool) -> None:
    inputs = [oip.Tensor.from_numpy(f"t_{k}", v) for k, v in ARRAYS.items()]
    inputs.append(oip.Tensor.from_numpy("t_BYTES", _bytes_tensor()))
    req = oip.InferRequest(inputs, [oip.RequestedOutput("y", {"binary_data": True})], "req-1", {"steps": 3})
    body, headers = oip.encode_request(req, binary_inputs=binary)
    assert (oip.HEADER_LENGTH in headers) is binary
    back = oip.decode_request(body, headers.get(oip.HEADER_LENGTH))
    assert back.id == "req-1" and back.parameters == {"steps": 3}
    assert back.binary_outputs() == {"y"}
    for a, b in zip(inputs, back.inputs, strict=True):
        assert (a.name, a.datatype, a.shape) == (b.name, b.datatype, b.shape)
        assert b.data.dtype == oip.DTYPES[a.datatype]
        np.testing.assert_array_equal(a.data, b.data)
        assert "binary_data_size" not in b.parameters


def test_binary_layout_is_raw_little_endian_after_the_header() -> None:
    x = np.array([[1.0, -2.0]], dtype=np.float32)
    y = np.array([7], dtype=np.int64)
    body, headers = oip.encode_request(oip.InferRequest([oip.Tensor.from_numpy("x", x), oip.Tensor.from_numpy("y", y)]),
                                       binary_inputs={"x"})  # fmt: skip
    n = int(headers[oip.HEADER_LENGTH])
    head = json.loads(body[:n])
    want = {"name": "x", "datatype": "FP32", "shape": [1, 2], "parameters": {"binary_data_size": 8}}
    assert head["inputs"][0] == want
    assert head["inputs"][1]["data"] == [7]
    assert body[n:] == x.astype("<f4").tobytes() and len(body) == n + 8


def test_response_round_trip_mixed_binary_and_json() -> None:
    outputs = [oip.Tensor.from_numpy("logits", ARRAYS["FP32"]), oip.Tensor.from_numpy("ok", ARRAYS["BOOL"])]
    resp = oip.InferResponse("m", outputs, "2", "id-9", {"purified": True, "steps": 5})
    body, headers = oip.encode_response(resp, binary_outputs={"logits"})
    back = oip.decode_response(body, headers[oip.HEADER_LENGTH])
    assert (back.model_name, back.model_version, back.id, back.parameters) == ("m", "2", "id-9", resp.parameters)
    np.testing.assert_array_equal(back.outputs[0].data, ARRAYS["FP32"])
    np.testing.assert_array_equal(back.outputs[1].data, ARRAYS["BOOL"])
    json_body, json_headers = oip.encode_response(resp)
    assert json_headers == {"Content-Type": oip.JSON_TYPE}
    assert json.loads(json_body)["outputs"][1]["data"] == [True, False, True]


def test_json_accepts_nested_lists_and_checks_values() -> None:
    req = oip.decode_request(json.dumps({"inputs": [{"name": "x", "datatype": "INT64", "shape": [2, 2],
                                                      "data": [[1, 2], [3, 4]]}]}).encode())  # fmt: skip
    np.testing.assert_array_equal(req.inputs[0].data, [[1, 2], [3, 4]])
    fp = oip.decode_request(b'{"inputs":[{"name":"x","datatype":"FP32","shape":[3],"data":[1,2.5,0]}]}')
    assert fp.inputs[0].data.dtype == np.float32 and fp.inputs[0].data.tolist() == [1.0, 2.5, 0.0]


def _req(**tensor: object) -> bytes:
    t = {"name": "x", "datatype": "FP32", "shape": [2], "data": [0.0, 1.0], **tensor}
    return json.dumps({"inputs": [{k: v for k, v in t.items() if v is not None}]}).encode()


@pytest.mark.parametrize(
    ("body", "header", "message"),
    [
        (b"not json", None, "not valid JSON"),
        (b"[1, 2]", None, "JSON object"),
        (b"{}", None, "needs 'inputs'"),
        (b'{"inputs": []}', None, "must not be empty"),
        (b'{"inputs": {"name": "x"}}', None, "must be a list"),
        (_req(name=""), None, "non-empty string"),
        (_req(datatype="FP128"), None, "unknown datatype"),
        (_req(datatype={}), None, "unknown datatype"),  # found by schemathesis: was a 500 (unhashable)
        (_req(shape=[2, -1]), None, "negative"),
        (_req(shape="2"), None, "list of integers"),
        (_req(shape=[3]), None, "needs 3 elements"),
        (_req(data=[0.0, "a"]), None, "must be numbers"),
        (_req(data=[[0.0, 1.0], [2.0]], shape=[2, 2]), None, "ragged"),
        (_req(data=[True, False]), None, "not booleans"),
        (_req(datatype="INT64", data=[1.5, 2.0]), None, "must be integers"),
        (_req(datatype="UINT8", data=[1, 256]), None, "out of range"),
        (_req(datatype="BOOL", data=[1, 0]), None, "true/false"),
        (_req(data=None), None, "needs 'data'"),
        (json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}] * 2}).encode(), None,
         "appears twice"),
        (_req(), "abc", "must be an integer"),
        (_req(), "100000", "body has"),
        (_req(data=None, parameters={"binary_data_size": 8}), "placeholder", "runs past the end"),
        (_req(data=None, parameters={"binary_data_size": 4}), "placeholder", "needs 8 bytes"),
        (_req(data=[0.0, 1.0], parameters={"binary_data_size": 8}), "placeholder", "both"),
        (_req(data=None, parameters={"binary_data_size": -1}), "placeholder", "non-negative"),
        (json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}],
                     "parameters": {"binary_data_output": "yes"}}).encode(), None, "true or false"),
    ],
)  # fmt: skip
def test_malformed_requests_are_rejected_with_a_reason(body: bytes, header: str | None, message: str) -> None:
    if header == "placeholder":  # a JSON header followed by 6 bytes of tensor data
        header, body = str(len(body)), body + b"\x00" * 6
    with pytest.raises(oip.OIPError, match=message) as e:
        oip.decode_request(body, header)
    assert e.value.status == 400


def test_trailing_bytes_and_bad_bool_and_bad_bytes_elements() -> None:
    head = _req(data=None, parameters={"binary_data_size": 8})
    with pytest.raises(oip.OIPError, match="after the last binary tensor"):
        oip.decode_request(head + b"\x00" * 12, len(head))
    head = json.dumps({"inputs": [{"name": "b", "datatype": "BOOL", "shape": [2],
                                   "parameters": {"binary_data_size": 2}}]}).encode()  # fmt: skip
    with pytest.raises(oip.OIPError, match="0 or 1"):
        oip.decode_request(head + b"\x01\x07", len(head))
    head = json.dumps({"inputs": [{"name": "s", "datatype": "BYTES", "shape": [1],
                                   "parameters": {"binary_data_size": 6}}]}).encode()  # fmt: skip
    with pytest.raises(oip.OIPError, match="runs past"):
        oip.decode_request(head + (9).to_bytes(4, "little") + b"ab", len(head))


@pytest.mark.parametrize(
    "body",
    [b"<html>oops</html>", b'{"outputs": []}', b'{"model_name": "m"}',
     b'{"model_name": "m", "outputs": [{"name": "o", "datatype": "FP32", "shape": [2, 3], "data": [1.0]}]}'],
)  # fmt: skip
def test_malformed_responses_are_502(body: bytes) -> None:
    with pytest.raises(oip.OIPError, match="malformed upstream response") as e:
        oip.decode_response(body)
    assert e.value.status == 502


def test_nan_cannot_travel_as_json_but_can_as_binary() -> None:
    resp = oip.InferResponse("m", [oip.Tensor.from_numpy("y", np.array([np.nan], dtype=np.float32))])
    with pytest.raises(oip.OIPError, match="NaN"):
        oip.encode_response(resp)
    body, h = oip.encode_response(resp, True)
    assert np.isnan(oip.decode_response(body, h[oip.HEADER_LENGTH]).outputs[0].data[0])


# -- the proxy's tensor conversions ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("layout", "datatype", "value_range", "channels"),
    [("NCHW", "FP32", 1.0, 1), ("NHWC", "UINT8", 255.0, 1), ("NHWC", "FP32", 255.0, 3), ("NCHW", "UINT8", 255.0, 3)],
)
def test_upstream_format_round_trip(layout: str, datatype: str, value_range: float, channels: int) -> None:
    up = Upstream(url="http://upstream", layout=layout, datatype=datatype, value_range=value_range)
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (3, 1, 28, 28)).astype(np.float32) / 255  # exactly representable in UINT8
    a = np.repeat(gray, channels, axis=1) * value_range
    if layout == "NHWC":
        a = a.transpose(0, 2, 3, 1)
    a = np.rint(a).astype(np.uint8) if datatype == "UINT8" else a.astype(np.float32)
    x, c = to_unit(a, up)
    assert x.shape == (3, 1, 28, 28) and x.dtype == torch.float32 and c == channels
    np.testing.assert_allclose(x.numpy(), gray, atol=1e-6)
    back = from_unit(x, up, c)
    assert back.dtype == a.dtype and back.shape == a.shape
    np.testing.assert_allclose(back.astype(np.float64), a.astype(np.float64), atol=1e-4 * value_range)


@pytest.mark.parametrize(
    ("shape", "scale", "message"),
    [((2, 28, 28, 1), 1.0, "must have shape"), ((2, 2, 28, 28), 1.0, "must have shape"),
     ((2, 1, 28, 28), 2.0, r"\[0, 1\]"), ((1, 784), 1.0, "must have shape")],
)  # fmt: skip
def test_upstream_format_rejects_wrong_tensors(shape: tuple[int, ...], scale: float, message: str) -> None:
    with pytest.raises(oip.OIPError, match=message):
        to_unit(np.full(shape, scale, dtype=np.float32), Upstream(url="http://upstream"))


@pytest.mark.parametrize(
    ("accept", "chosen"),
    [(None, None), ("", None), ("identity", None), ("gzip", "gzip"), ("deflate", "deflate"),
     ("gzip, deflate, br", "gzip"), ("deflate, gzip", "gzip"), ("gzip;q=0.5, deflate", "deflate"),
     ("gzip;q=0", None), ("*", "gzip"), ("br, zstd", None), ("deflate;q=0.2, gzip;q=bad", "deflate")],
)  # fmt: skip
def test_response_encoding_follows_accept_encoding(accept: str | None, chosen: str | None) -> None:
    assert oip.response_encoding(accept) == chosen


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_content_decoding_round_trip_and_cap(encoding: str) -> None:
    body = b'{"inputs": []}' * 100
    assert oip.decode_content(oip.compress(body, encoding), encoding.upper(), len(body)) == body
    with pytest.raises(oip.OIPError, match="decoded body exceeds") as e:
        oip.decode_content(oip.compress(body, encoding), encoding, len(body) - 1)
    assert e.value.status == 413
    assert oip.decode_content(body, None, 10) == body  # identity: the size cap is the transport's
