"""Hostile and overloaded traffic through a real `python -m service` on loopback: bounded memory per request, the
compute budget, deadlines that cancel work, a fast lane, 4xx for every malformed input, slow sockets, strict
parameters, settings errors, and a graceful drain on SIGTERM."""

from __future__ import annotations

import base64
import gzip
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import ROOT
from PIL import Image
from servers import Server, e2e_models

TIMEOUT_S = 3  # the server's request timeout
ENV = {"MG_REQUEST_TIMEOUT_S": str(TIMEOUT_S), "MG_MAX_STEPS": "1000000", "MG_MAX_REQUEST_COST": "2000000",
       "MG_HEADER_TIMEOUT_S": "1", "MG_BODY_TIMEOUT_S": "1", "MG_MAX_WAIT_MS": "5",
       "MG_MAX_UPLOAD_BYTES": "4194304", "MG_WARM_UP": "false"}  # fmt: skip
# (no warm-up: its calibration batch would teach the slow lane its rate before the first test, and the fast-lane
# test needs an endless projection admitted)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    models, real = e2e_models(tmp_path_factory.mktemp("hostile_models"))
    with Server.running(models, real, **ENV) as srv:
        yield srv


def png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def digit() -> np.ndarray:
    with np.load(ROOT / "models" / "mnist" / "test_slice.npz", allow_pickle=False) as f:
        return f["x"][0]


@pytest.mark.parametrize("body", [png(np.full((1, 16000), 200, np.uint8)), png(np.full((20000, 1), 200, np.uint8)),
                                  "npy", "8388608x2"], ids=["png-16000x1", "png-1x20000", "npy-1x16000",
                                                            "png-8388608x2"])  # fmt: skip
def test_thin_images_cost_little_memory(hostile: Server, body: bytes | str) -> None:
    if body == "npy":
        buf = io.BytesIO()
        np.save(buf, np.full((1, 16000), 0.5, np.float32), allow_pickle=False)
        body = buf.getvalue()
    elif body == "8388608x2":  # 16.7 M pixels, at the pixel cap: decoded (16 MB), then box-reduced in 8 bits
        body = png(np.zeros((2, 8388608), np.uint8))
    assert isinstance(body, bytes)
    before = peak_rss_mb(hostile.proc.pid)
    r = httpx.post(hostile.url + "/v1/classify", content=body, params={"defense": "none"},
                   headers={"content-type": "application/octet-stream"}, timeout=30)  # fmt: skip
    assert r.status_code == 200, r.text
    assert peak_rss_mb(hostile.proc.pid) - before < 50, "a thin image must not be padded to a square in memory"


def test_a_request_over_the_compute_budget_is_422_with_its_cost(hostile: Server) -> None:
    imgs = [base64.b64encode(png(digit())).decode()] * 8
    r = httpx.post(hostile.url + "/v1/classify", json={"images": imgs, "steps": 100000, "restarts": 4}, timeout=30)
    assert r.status_code == 422 and r.json()["cost"] == 8 * 100000 * 4 and r.json()["budget"] == 2000000
    assert "per-request budget" in r.json()["error"]
    body = {"inputs": [{"name": "input", "shape": [8, 1, 28, 28], "datatype": "FP32", "data": [0.0] * 8 * 784}],
            "parameters": {"steps": 100000, "restarts": 4, "defense": "defense-gan"}}  # fmt: skip
    r = httpx.post(hostile.url + "/v2/models/mnist-classifier_A/infer", json=body, timeout=30)
    assert r.status_code == 400 and "per-request budget" in r.json()["error"]


def test_undefended_requests_pass_a_running_projection(hostile: Server) -> None:
    """(Runs before any projection has taught the slow lane its rate, so the endless one is admitted.)"""
    one = {"image": base64.b64encode(png(digit())).decode()}
    slow: list[httpx.Response] = []
    th = threading.Thread(target=lambda: slow.append(httpx.post(
        hostile.url + "/v1/classify", json={**one, "defense": "defense-gan", "steps": 1000000, "restarts": 1},
        timeout=60)))  # fmt: skip
    th.start()
    time.sleep(0.5)
    r = httpx.post(hostile.url + "/v1/classify", json={**one, "defense": "none"}, timeout=60)
    assert r.status_code == 200 and th.is_alive(), "answered while the projection still runs"
    th.join()
    assert slow[0].status_code in (503, 504)


def test_timed_out_work_is_cancelled_and_then_refused_at_once(hostile: Server) -> None:
    one = {"image": base64.b64encode(png(digit())).decode(), "defense": "defense-gan", "restarts": 1}
    with httpx.Client(base_url=hostile.url, timeout=60) as c:
        assert c.post("/v1/classify", json={**one, "steps": 20}).status_code == 200  # the lane learns its cost
        t = time.monotonic()
        r = c.post("/v1/classify", json={**one, "steps": 1000000})  # hours of work, if it were not cancelled
        assert r.status_code in (503, 504), r.text
        if r.status_code == 503:  # the measured cost says it cannot finish: refused before queueing
            assert "past its" in r.json()["error"] and int(r.headers["retry-after"]) >= 1
            assert time.monotonic() - t < TIMEOUT_S
        r = c.post("/v1/classify", json={**one, "steps": 20})
        assert r.status_code == 200, "the engine is free again: the timed-out projection stopped"
        assert r.json()["timings_ms"]["queue_ms"] < 10_000
        assert c.get("/readyz").json()["queue_depth"] == 0


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [("/v1/classify", '{"array": [[' + "1" * 400 + "]], \"defense\": \"none\"}", 400),
     ("/v2/models/mnist-classifier_A/infer", "[" * 10_000 + "]" * 10_000, 400),
     ("/v2/models/mnist-classifier_A/infer", '{"inputs": ' + "[" * 100_000 + "]" * 100_000 + "}", 400),
     ("/v1/classify", '{"array": [[' + ",".join(["0.5"] * 300_000) + ']], "defense": "none"}', 200)],
)  # fmt: skip
def test_malformed_bodies_are_4xx_and_the_connection_stays_usable(hostile: Server, path: str, body: str,
                                                                   status: int) -> None:  # fmt: skip
    with httpx.Client(base_url=hostile.url, timeout=60) as c:
        r = c.post(path, content=body, headers={"content-type": "application/json"})
        assert r.status_code == status, r.text
        assert c.get("/healthz").status_code == 200  # the same keep-alive connection


@pytest.mark.parametrize(
    ("params", "message"),
    [({"steps": 0}, "steps=0 is outside [1,"), ({"steps": True}, "not a boolean"), ({"model": ""}, "not be empty"),
     ({"restarts": 0}, "restarts=0 is outside")],
)  # fmt: skip
def test_strict_parameters(hostile: Server, params: dict, message: str) -> None:
    body = {"image": base64.b64encode(png(digit())).decode(), "defense": "defense-gan", **params}
    r = httpx.post(hostile.url + "/v1/classify", json=body, timeout=30)
    assert r.status_code == 422 and message in r.json()["error"] + json.dumps(r.json().get("detail", "")), r.text


def test_slow_headers_are_cut_and_slow_bodies_get_408(hostile: Server) -> None:
    with socket.create_connection(("127.0.0.1", hostile.port), timeout=10) as s:
        s.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\n")  # never finishes its headers
        assert s.recv(100) == b"", "closed after the header timeout"
    with socket.create_connection(("127.0.0.1", hostile.port), timeout=10) as s:
        s.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 1000\r\n\r\n")
        s.sendall(b"\x89PNG")  # and the rest never comes
        assert s.recv(1000).startswith(b"HTTP/1.1 408")


def test_a_bad_setting_is_one_line_and_exit_2() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MG_ATTACK__API_KEYS": "change-me"}
    p = subprocess.run([sys.executable, "-m", "service", "--port", "1"], env=env, capture_output=True, text=True,
                       timeout=60)  # fmt: skip
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "bad setting" in p.stderr


def test_sigterm_drains_in_flight_work_then_exits(tmp_path: Path) -> None:
    models, real = e2e_models(tmp_path / "models")
    srv = Server(models, real, MG_DRAIN_S="2", MG_REQUEST_TIMEOUT_S="60", MG_MAX_STEPS="1000000",
                 MG_MAX_REQUEST_COST="2000000")  # fmt: skip
    try:
        srv.wait_ready()
        one = {"image": base64.b64encode(png(digit())).decode(), "defense": "defense-gan", "restarts": 1}
        answers: list[int] = []

        def send(steps: int) -> None:
            try:
                answers.append(httpx.post(srv.url + "/v1/classify", json={**one, "steps": steps}, timeout=60)
                               .status_code)  # fmt: skip
            except httpx.TransportError:
                answers.append(-1)

        threads = [threading.Thread(target=send, args=(s,)) for s in (5, 1000000, 1000000, 5)]
        for th in threads:
            th.start()
        time.sleep(1.0)
        t = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        for th in threads:
            th.join(60)
        assert srv.proc.wait(30) in (0, -signal.SIGTERM) and time.monotonic() - t < 20  # uvicorn re-raises it
        assert sorted(answers) and all(a in (200, 503) for a in answers), answers
        assert answers.count(503) >= 2, "the endless ones were answered 503 at the drain limit"
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()


def test_gzip_request_bodies_are_decoded_within_the_cap(hostile: Server) -> None:
    body = json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32",
                                   "data": [0.0] * 784}], "parameters": {"defense": "none"}}).encode()  # fmt: skip
    url = hostile.url + "/v2/models/mnist-classifier_A/infer"
    with httpx.Client(timeout=30) as c:
        r = c.post(url, content=gzip.compress(body), headers={"content-encoding": "gzip"})
        assert r.status_code == 200 and r.json()["outputs"][0]["shape"][0] == 1, r.text
        bomb = gzip.compress(b" " * (5 * 1024 * 1024))  # 5 MiB of spaces in a few KiB: past the 4 MiB cap
        r = c.post(url, content=bomb, headers={"content-encoding": "gzip"})
        assert r.status_code == 413 and "decoded body exceeds" in r.json()["error"]
        r = c.post(url, content=b"not gzip", headers={"content-encoding": "gzip"})
        assert r.status_code == 400
        assert c.get(hostile.url + "/v2/health/live").json() == {"live": True}
