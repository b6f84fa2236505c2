"""The one error type and its one handler (service.errors, service.api.errors): each refusal's status, headers and
body, as /v1 and the Open Inference Protocol's routes answer it."""

from __future__ import annotations

import json

import pytest
from starlette.exceptions import HTTPException

from service.api.errors import as_service_error, is_oip, response
from service.batcher import NotRunning, OverBudget, QueueFull, RequestTimeout
from service.engine import NotShipped, ParameterError
from service.errors import ServiceError
from service.guard import Throttled
from service.imaging import ImageError
from service.proxy import UpstreamError
from service.request import RequestError


def answer(exc: BaseException, oip: bool) -> tuple[int, dict, dict[str, str]]:
    err = as_service_error(exc, oip)
    assert err is not None
    r = response(err, oip)
    return r.status_code, json.loads(r.body), dict(r.headers)


@pytest.mark.parametrize(
    ("exc", "v1", "v2"),
    [
        (RequestError("bad", detail=[{"loc": ["steps"], "msg": "x"}]), 422, 400),
        (RequestError("no such model", 404), 404, 404),
        (RequestError("too many", 413), 413, 413),
        (ParameterError("steps=0 is outside [1, 5]"), 422, 400),
        (OverBudget(500, 100, "1 image(s) × 50 steps × 10 restarts"), 422, 400),
        (NotShipped("no magnet"), 404, 404),
        (ImageError("not an image", 415), 415, 415),
        (UpstreamError(422, "upstream answered 422"), 422, 422),  # the upstream's own 4xx passes through
        (UpstreamError(504, "upstream timed out"), 504, 504),
        (RequestTimeout("took too long"), 504, 504),
        (HTTPException(404, "Not Found"), 404, 404),
        (RecursionError(), 400, 400),
        (MemoryError(), 413, 413),
    ],
)  # fmt: skip
def test_status_on_v1_and_on_the_protocol(exc: BaseException, v1: int, v2: int) -> None:
    assert answer(exc, False)[0] == v1 and answer(exc, True)[0] == v2


def test_v1_bodies_carry_the_errors_keys_the_protocols_only_the_message() -> None:
    _, body, _ = answer(RequestError("invalid request: steps", detail=[{"loc": ["steps"], "msg": "x"}]), False)
    assert body == {"error": "invalid request: steps", "detail": [{"loc": ["steps"], "msg": "x"}]}
    _, body, _ = answer(OverBudget(500, 100, "what"), False)
    assert body["cost"] == 500 and body["budget"] == 100 and "500 generator passes" in body["error"]
    for exc in (RequestError("bad", detail=[{"loc": [], "msg": "x"}]), OverBudget(500, 100, "what")):
        assert set(answer(exc, True)[1]) == {"error"}
    assert answer(RequestError("bad"), False)[1] == {"error": "bad"}  # no detail: no key


def test_busy_and_throttled_answers_say_when_to_retry() -> None:
    status, _, headers = answer(QueueFull(3, retry_after=2.2), False)
    assert status == 503 and headers["retry-after"] == "3"
    status, _, headers = answer(NotRunning("shutting down"), True)
    assert status == 503 and headers["retry-after"] == "5"
    status, body, headers = answer(Throttled("rate", 0.4), False)
    assert status == 429 and headers["retry-after"] == "1" and body["reason"] == "rate"


def test_what_no_request_causes_is_not_a_service_error() -> None:
    assert as_service_error(ValueError("x"), oip=False) is None  # a bug on /v1: 500, logged
    assert as_service_error(ValueError("x"), oip=True).status == 400  # type: ignore[union-attr]
    assert as_service_error(RuntimeError("x"), oip=True) is None
    assert ServiceError("x").status == 500


def test_the_protocols_routes() -> None:
    assert is_oip("/v2") and is_oip("/v2/models/m/infer") and is_oip("/predictions/raw")
    assert not is_oip("/v1/classify") and not is_oip("/v2x") and not is_oip("/healthz")
