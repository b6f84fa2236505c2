"""The service under load, side by side in one run, on the shipped models:

    python -m bench.overload                      # about 2–4 minutes on a 2-core CPU
    python -m bench.overload --requests 400 --flood 400 --quick-steps 20

(a) `defense=none` throughput and p50/p99 of /v1/classify against a bare FastAPI + onnxruntime endpoint serving the
    same ONNX classifier to the same client (PNG upload, one image per request) — the ratio ours / bare;
(b) overload: `--flood` concurrent defense-gan requests with `none` requests mixed in: the status codes (admitted
    work should end 2xx, the rest 503 at once; 504 means admitted work timed out), and the `none` requests' p99;
(c) peak memory above idle per request for thin images (16000×1 and 1×20000 PNG, a (1, 16000) .npy).
Both servers are started here, one uvicorn worker each, on loopback. Prints a table; no asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from training.processes import free_port  # noqa: E402


def png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


BARE_APP = """
import io, sys
import numpy as np, onnxruntime as ort
from fastapi import FastAPI, Request
from PIL import Image
sess = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
app = FastAPI()

@app.post("/classify")
async def classify(request: Request) -> dict:
    im = Image.open(io.BytesIO(await request.body())).convert("L").resize((28, 28))
    x = (np.asarray(im, dtype=np.float32) / 255.0)[None, None]
    logits = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    return {"label": int(logits.argmax()), "logits": logits[0].tolist()}
"""


def start(cmd: list[str], env: dict[str, str], url: str, ready: str) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, env={**os.environ, **env}, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + ready, timeout=2).status_code in (200, 405):
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"{cmd} did not become ready")


async def load(url: str, body: bytes, params: dict, concurrency: int, total: int) -> tuple[float, list[float], dict]:
    """(wall s, latencies, status counts) of `total` POSTs from `concurrency` workers."""
    lat: list[float] = []
    codes: dict[int, int] = {}
    todo = iter(range(total))
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=concurrency)) as c:

        async def worker() -> None:
            for _ in todo:
                t = time.perf_counter()
                r = await c.post(url, content=body, params=params, headers={"content-type": "image/png"})
                lat.append(time.perf_counter() - t)
                codes[r.status_code] = codes.get(r.status_code, 0) + 1

        t0 = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
    return time.perf_counter() - t0, lat, codes


def pct(v: list[float], q: float) -> float:
    return float(np.percentile(v, q)) * 1e3 if v else float("nan")


def peak_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def throughput(ours: str, bare: str, digit: bytes, requests: int, concurrency: int, rounds: int) -> None:
    asyncio.run(load(ours, digit, {"defense": "none"}, concurrency, 32))  # warm both
    asyncio.run(load(bare, digit, {}, concurrency, 32))
    runs: dict[str, list] = {"manifold-guard none": [], "bare FastAPI + ORT": []}
    for r in range(rounds):  # interleaved, alternating who goes first: drift in the machine's load hits both
        pair = [("manifold-guard none", ours, {"defense": "none"}), ("bare FastAPI + ORT", bare, {})]
        for name, url, params in pair if r % 2 == 0 else pair[::-1]:
            wall, lat, codes = asyncio.run(load(url, digit, params, concurrency, requests))
            runs[name].append((requests / wall, lat, codes))
    rows = []
    for name, rs in runs.items():
        rps = sorted(x[0] for x in rs)
        lat = [v for x in rs for v in x[1]]
        codes = {k: sum(x[2].get(k, 0) for x in rs) for k in {k for x in rs for k in x[2]}}
        rows.append((name, float(np.median(rps)), pct(lat, 50), pct(lat, 99), codes))
    print(
        f"\n(a) defense=none vs a bare endpoint: {rounds} interleaved rounds of {requests} requests at concurrency "
        f"{concurrency} (median req/s; latencies over all rounds)"
    )
    print("| server | req/s | p50 ms | p99 ms | statuses |\n|---|---|---|---|---|")
    for name, rps, p50, p99, codes in rows:
        print(f"| {name} | {rps:.0f} | {p50:.1f} | {p99:.1f} | {codes} |")
    print(f"ratio ours / bare throughput (medians): {rows[0][1] / rows[1][1]:.2f}")


def overload(ours: str, digit: bytes, flood: int, steps: int, mixed: int) -> None:
    """The flood from one thread's event loop, the `none` requests from another's (so the flood's client-side work
    does not sit in their latencies)."""
    out: dict = {}

    def flood_thread() -> None:
        out["heavy"] = asyncio.run(load(ours, digit, {"defense": "defense-gan", "steps": steps}, flood, flood))

    th = threading.Thread(target=flood_thread)
    th.start()
    time.sleep(1.0)
    _, lat, codes = asyncio.run(load(ours, digit, {"defense": "none"}, 4, mixed))
    th.join()
    wall, _, hcodes = out["heavy"]
    print(f"\n(b) {flood} concurrent defense-gan requests (L={steps}, R=10), {mixed} none requests mixed in")
    print(f"defense-gan statuses: {hcodes} in {wall:.1f} s (504 = admitted work that timed out)")
    print(f"none statuses: {codes}; p50 {pct(lat, 50):.1f} ms, p99 {pct(lat, 99):.1f} ms")


def memory(ours: str, pid: int) -> None:
    buf = io.BytesIO()
    np.save(buf, np.full((1, 16000), 0.5, np.float32), allow_pickle=False)
    cases = {"PNG 16000×1": png(np.full((1, 16000), 200, np.uint8)),
             "PNG 1×20000": png(np.full((20000, 1), 200, np.uint8)), ".npy (1, 16000)": buf.getvalue()}  # fmt: skip
    print("\n(c) peak memory above the server's previous peak, per thin-image request")
    print("| input | status | + MB |\n|---|---|---|")
    for name, body in cases.items():
        before = peak_mb(pid)
        r = httpx.post(ours, content=body, params={"defense": "none"},
                       headers={"content-type": "application/octet-stream"}, timeout=60)  # fmt: skip
        print(f"| {name} | {r.status_code} | {peak_mb(pid) - before:.1f} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds of (a)")
    p.add_argument("--flood", type=int, default=400)
    p.add_argument("--quick-steps", type=int, default=50, help="projection steps of the flood's requests")
    p.add_argument("--mixed", type=int, default=40, help="none requests sent during the flood")
    p.add_argument("--timeout", type=float, default=30.0, help="the server's request timeout (MG_REQUEST_TIMEOUT_S)")
    a = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from service.registry import Registry

    reg = Registry(ROOT / "models")
    default = reg.defaults["mnist"].classifier if "mnist" in reg.defaults else "classifier_A"
    onnx = str(reg.get(f"mnist/{default}").path(ROOT / "models", "onnx"))
    with np.load(ROOT / "models" / "mnist" / "test_slice.npz", allow_pickle=False) as f:
        digit = png(f["x"][0])
    pa, pb = free_port(), free_port()
    env = {"MG_TORCH_THREADS": "1", "MG_REQUEST_TIMEOUT_S": str(a.timeout), "PYTHONPATH": str(ROOT)}
    ours = start([sys.executable, "-m", "service", "--port", str(pa), "--log-level", "warning"], env,
                 f"http://127.0.0.1:{pa}", "/readyz")  # fmt: skip
    bare = start([sys.executable, "-c", f"import uvicorn, sys; sys.argv = ['', {onnx!r}]; exec({BARE_APP!r}); "
                  f"uvicorn.run(app, host='127.0.0.1', port={pb}, log_level='warning')"],
                 {"OMP_NUM_THREADS": "1"}, f"http://127.0.0.1:{pb}", "/docs")  # fmt: skip
    try:
        print(f"mnist/{default}, one server process each, this machine's {os.cpu_count()} CPUs shared with the client")
        throughput(f"http://127.0.0.1:{pa}/v1/classify", f"http://127.0.0.1:{pb}/classify", digit, a.requests,
                   a.concurrency, a.rounds)  # fmt: skip
        memory(f"http://127.0.0.1:{pa}/v1/classify", ours.pid)
        overload(f"http://127.0.0.1:{pa}/v1/classify", digit, a.flood, a.quick_steps, a.mixed)
    finally:
        for proc in (ours, bare):
            proc.terminate()
            proc.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
