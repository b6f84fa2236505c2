"""The robustness audit (service.audit, /v1/audits) against real servers on loopback, at small size:

    a KServe ModelServer (tests/upstreams.py kserve, the shipped classifier A)  ←  `user-model`
    a KServe ModelServer answering labels only for the same model (this file)   ←  `labels-only`
    the audited-from `python -m service` (audits enabled with a key, reports in a temporary folder)

    python tests/test_audit.py labels --port P --onnx classifier_A.onnx      # the labels-only upstream alone

- the audit of classifier A, bare and guarded, agrees with `training.blackbox`'s figures for the same images and
  attacks (the reference evaluation of the same suite) within sampling error;
- against the labels-only upstream it runs HopSkipJump and says it skipped Square, and why;
- refusals: no key, a wrong key, an unknown target (or a URL), a budget over the cap, malformed samples;
- a cancelled audit stops within seconds and frees its slot; a restart keeps the finished reports;
- the sample loaders (npz, zip and folder of class folders) and the budget split, without servers.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

pytest.importorskip("kserve", reason="needs the [test] extra: kserve")
pytest.importorskip("torchattacks", reason="needs torchattacks (scripts/setup.sh --dev)")
pytest.importorskip("art", reason="needs the [dev] extra: adversarial-robustness-toolbox")

from conftest import MODELS, ROOT  # noqa: E402
from procs import Proc, free_port  # noqa: E402
from servers import Server  # noqa: E402

from service.attacks.query import AddressBook, Client  # noqa: E402
from service.audit.data import from_folder, from_npz, from_zip  # noqa: E402
from service.audit.runner import fit_budget  # noqa: E402
from service.audit.spec import AuditError, AuditSpec  # noqa: E402
from service.config import Settings  # noqa: E402
from training.blackbox import Attack, Budget, Pipeline, run_attack, summarize  # noqa: E402

KEY = "audit-test-key"
DGAN = {"defense": "defense-gan", "steps": 4, "restarts": 1}
SMALL = {"n": 12, "threats": [{"norm": "linf", "eps": [0.3]}], "queries": 60, "seeds": 30, "rounds": 2,
         "pipelines": [DGAN], "repeats": 3, "timing_images": 2}  # fmt: skip


class Audited:
    """The audited-from server, restartable over the same reports folder."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.server = self._start()

    def _start(self) -> Server:
        srv = Server(MODELS, True, **self.env)
        srv.wait_ready()
        return srv

    @property
    def url(self) -> str:
        return self.server.url

    def restart(self) -> None:
        self.server.stop()
        self.server = self._start()


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Audited]:
    """The KServe upstream, the labels-only upstream and the audited-from service."""
    logs = tmp_path_factory.mktemp("audit-logs")
    ports = (free_port(), free_port())
    kserve, labels_url = (f"http://127.0.0.1:{p}" for p in ports)
    onnx = str(MODELS / "mnist" / "classifier_A.onnx")
    up = Proc([sys.executable, "tests/upstreams.py", "kserve", "--port", str(ports[0]), "--onnx", onnx],
              logs / "kserve.log", {"OMP_NUM_THREADS": "1"})  # fmt: skip
    labels = Proc([sys.executable, __file__, "labels", "--port", str(ports[1]), "--onnx", onnx], logs / "labels.log",
                  {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})  # fmt: skip
    audited = None
    try:
        up.wait_http(kserve + "/v2/health/ready")
        labels.wait_http(labels_url + "/v2/health/ready")
        upstreams = {"user-model": {"url": kserve, "model": "mnist-nchw", "timeout_s": 60},
                     "labels-only": {"url": labels_url, "model": "mnist-labels", "timeout_s": 60}}  # fmt: skip
        audited = Audited({"MG_WARM_UP": "false", "MG_DRAIN_S": "1", "MG_PROXY__UPSTREAMS": json.dumps(upstreams),
                           "MG_MAX_WAIT_MS": "5", "MG_FAST_WAIT_MS": "1", "MG_MAX_UPLOAD_BYTES": str(4 << 20),
                           "MG_AUDIT__API_KEYS": json.dumps([KEY]), "MG_AUDIT__MAX_IMAGES": "200",
                           "MG_AUDIT__MAX_QUERIES": "200000", "MG_AUDIT__MAX_QUERIES_PER_IMAGE": "2000",
                           "MG_AUDIT__REPORTS_DIR": str(tmp_path_factory.mktemp("reports"))})  # fmt: skip
        yield audited
    finally:
        for p in (audited.server if audited else None, labels, up):
            if p is not None:
                p.stop()


def call(srv: Audited, method: str, path: str, key: str | None = KEY, **kw: object) -> httpx.Response:
    headers = {"X-API-Key": key} if key else {}
    return httpx.request(method, srv.url + path, headers=headers, timeout=120, **kw)  # type: ignore[arg-type]


def start(srv: Audited, body: dict) -> str:
    r = call(srv, "POST", "/v1/audits", json=body)
    assert r.status_code == 202, r.text
    assert r.headers["location"] == f"/v1/audits/{r.json()['id']}"
    return r.json()["id"]


def wait(srv: Audited, job: str, until: tuple[str, ...] = ("done", "failed", "cancelled"), limit_s: float = 600
         ) -> dict:  # fmt: skip
    """Poll the job until its status is one of `until`."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        view = call(srv, "GET", f"/v1/audits/{job}").json()
        if view["status"] in until:
            return view
        time.sleep(0.2)
    raise AssertionError(f"audit {job} not {until} after {limit_s} s: {view}")


def run_of(report: dict, variant: str, attack: str) -> dict:
    return next(r for r in report["runs"] if r["variant"] == variant and r["attack"] == attack)


def overlap(a: dict, b: dict) -> bool:
    return a["ci"][0] <= b["ci"][1] and b["ci"][0] <= a["ci"][1]


# -- refusals ------------------------------------------------------------------------------------------------------
def npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


@pytest.mark.parametrize(("key", "body", "status", "words"), [
    (None, {"target": "user-model"}, 401, "X-API-Key"),
    ("wrong", {"target": "user-model"}, 403, "may not run audits"),
    (KEY, {"target": "nope"}, 404, "unknown target"),
    (KEY, {"target": "http://127.0.0.1:1/v2/models/x"}, 404, "unknown target"),
    (KEY, {"target": "user-model", "url": "http://127.0.0.1:1"}, 422, "url"),
    (KEY, {"target": "user-model", "max_queries": 10**9}, 422, "MG_AUDIT__MAX_QUERIES"),
    (KEY, {"target": "user-model", "queries": 5000}, 422, "MG_AUDIT__MAX_QUERIES_PER_IMAGE"),
    (KEY, {"target": "user-model", "n": 201}, 422, "MG_AUDIT__MAX_IMAGES"),
    (KEY, {"target": "user-model", "sample": "upload"}, 422, "sample_file"),
    (KEY, {"target": "user-model", "sample": "upload", "sample_file": "%%%"}, 422, "base64"),
    (KEY, {"target": "user-model", "sample": "upload", "n": 2, "seeds": 0,
           "sample_file": base64.b64encode(b"\x80\x04pickled").decode()}, 422, "never loaded"),
    (KEY, {"target": "user-model", "sample": "upload", "n": 2, "seeds": 0, "sample_file": base64.b64encode(
        npz_bytes(x=np.zeros((3, 32, 32), np.uint8), y=np.zeros(3, np.int64))).decode()}, 422, "N×28×28"),
    (KEY, {"target": "user-model", "sample": "upload", "n": 2, "sample_file": base64.b64encode(
        npz_bytes(x=np.array([object()] * 3), y=np.zeros(3, np.int64))).decode()}, 422, "npz"),
    (KEY, {"target": "user-model", "sample": "upload", "n": 5, "seeds": 0, "sample_file": base64.b64encode(
        npz_bytes(x=np.zeros((3, 28, 28), np.uint8), y=np.zeros(3, np.int64))).decode()}, 422, "holds 3 images"),
])  # fmt: skip
def test_refusals_are_clear_4xx(servers: Audited, key: str | None, body: dict, status: int, words: str) -> None:
    r = call(servers, "POST", "/v1/audits", key=key, json=body)
    assert r.status_code == status, r.text
    assert words.lower() in r.json()["error"].lower(), r.json()


def test_reads_need_the_key_and_list_the_allow_list(servers: Audited) -> None:
    assert call(servers, "GET", "/v1/audits/targets", key=None).status_code == 401
    assert call(servers, "GET", "/v1/audits/0123", key="wrong").status_code == 403
    got = call(servers, "GET", "/v1/audits/targets").json()
    assert got["targets"] == ["user-model", "labels-only"] and "mnist" in got["samples"]
    assert call(servers, "GET", "/v1/audits/" + "0" * 32).status_code == 404


# -- the audit against the reference evaluation --------------------------------------------------------------------
def reference(url: str, params: dict, randomized: bool, attack: Attack) -> dict:
    """`training.blackbox.run_attack` on the same images, through the same server's proxy (the pipeline's
    parameters on each request), at the audit's budget."""
    from training import data

    xs, ys = data.load_slice("mnist")
    sets = {"x": data.to_float(xs[:12]), "y": ys[:12].astype(np.int64), "seeds": data.to_float(xs[-30:])}
    p = Pipeline("t", "A", "user-model", {}, True, randomized, "fast")
    b = Budget(n=12, full_n=12, square=60, seeds=30, rounds=2)
    client = Client(url, "user-model", params=params)
    r = run_attack(attack, p, b, False, client, client, sets, AddressBook(), seed=0, quick=True)
    return summarize(r)


def test_audit_agrees_with_the_blackbox_evaluation(servers: Audited) -> None:
    job = start(servers, {"target": "user-model", **SMALL})
    view = wait(servers, job)
    assert view["status"] == "done", view
    rep = view["report"]
    guarded = "guarded: defense-gan L=4 R=1"
    assert rep["variants"] == ["bare", guarded] and rep["target"]["kind"] == "proxied"
    assert {(r["variant"], r["attack"]) for r in rep["runs"]} == {(v, a) for v in rep["variants"]
                                                                  for a in ("square", "transfer")}  # fmt: skip
    for variant, params, randomized in (("bare", {"defense": "none"}, False), (guarded, DGAN, True)):
        for name, attack in (("square", Attack("square", "linf", 0.3)), ("transfer", Attack("transfer", "linf", 0.3))):
            ours, ref = run_of(rep, variant, name)["summary"], reference(servers.url, params, randomized, attack)
            assert ours["n"] == ref["n"] == 12
            assert overlap(ours, ref), (variant, name, ours, ref)
            if variant == "bare":  # deterministic: the same answers and seed (softmax rounding aside), one figure
                assert abs(ours["defended"] - ref["defended"]) <= 1, (name, ours, ref)
    assert rep["clean"]["bare"]["accuracy"] >= 0.9 and rep["cost"][0]["latency_x"] > 0
    assert rep["queries"]["attacks_and_substitutes"] <= SMALL.get("max_queries", 500_000)
    assert any("HopSkipJump" in x["what"] and "scores" in x["why"] for x in rep["not_run"])
    for name in ("report.md", "robust-linf.svg"):
        r = call(servers, "GET", f"/v1/audits/{job}/files/{name}")
        assert r.status_code == 200 and len(r.content) > 200, name
    assert "## The guard's gain" in call(servers, "GET", f"/v1/audits/{job}/files/report.md").text
    assert call(servers, "GET", f"/v1/audits/{job}/files/..%2Fstatus.json").status_code == 404


def test_labels_only_upstream_runs_hopskipjump_and_says_square_was_skipped(servers: Audited) -> None:
    body = {"target": "labels-only", "n": 4, "hsj_n": 2, "hsj_queries": 60, "seeds": 20, "rounds": 1,
            "threats": [{"norm": "l2", "eps": [2.0]}], "pipelines": [DGAN], "timing_images": 2}  # fmt: skip
    view = wait(servers, start(servers, body))
    assert view["status"] == "done", view
    rep = view["report"]
    assert {r["attack"] for r in rep["runs"]} == {"hsj", "transfer"}
    assert {r["variant"] for r in rep["runs"] if r["attack"] == "hsj"} == {"bare", "guarded: defense-gan L=4 R=1"}
    skipped = [x for x in rep["not_run"] if x["what"].startswith("Square")]
    assert skipped and "labels only" in skipped[0]["why"], rep["not_run"]
    assert rep["clean"]["bare"]["scores"] is False
    assert rep["target"]["repository"] is None and any("repository/index" in n for n in rep["target"]["notes"])
    for r in rep["runs"]:
        if r["attack"] == "hsj":
            assert max(r["images"]["queries"]) <= 60 and r["n"] == 2


# -- the queue -----------------------------------------------------------------------------------------------------
def test_cancel_stops_within_seconds_and_frees_the_slot(servers: Audited) -> None:
    long = {"target": "user-model", "n": 30, "queries": 2000, "seeds": 30, "rounds": 2, "pipelines": [DGAN]}
    first, second = start(servers, long), start(servers, long)
    assert call(servers, "GET", f"/v1/audits/{second}").json()["status"] == "queued"
    deadline = time.monotonic() + 120
    while call(servers, "GET", f"/v1/audits/{first}").json()["progress"]["done"] < 2:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    t0 = time.monotonic()
    assert call(servers, "POST", f"/v1/audits/{first}/cancel").status_code == 200
    view = wait(servers, first, limit_s=10)
    assert view["status"] == "cancelled" and time.monotonic() - t0 < 5, view
    assert wait(servers, second, ("running", "done"), limit_s=10)["status"] == "running"  # the slot is free
    assert call(servers, "POST", f"/v1/audits/{second}/cancel").status_code == 200
    assert wait(servers, second, limit_s=10)["status"] == "cancelled"
    assert call(servers, "POST", f"/v1/audits/{second}/cancel").status_code == 409  # finished: nothing to cancel


def test_a_restart_keeps_the_finished_reports(servers: Audited) -> None:
    before = {a["id"]: a["status"] for a in call(servers, "GET", "/v1/audits").json()["audits"]}
    done = [k for k, s in before.items() if s == "done"]
    assert done, before
    running = start(servers, {"target": "user-model", "n": 30, "queries": 2000, "seeds": 30, "rounds": 2,
                              "pipelines": [DGAN]})  # fmt: skip
    wait(servers, running, ("running",), limit_s=30)
    servers.restart()  # SIGTERM: the running audit is cancelled and written with what it measured
    after = {a["id"]: a["status"] for a in call(servers, "GET", "/v1/audits").json()["audits"]}
    assert after == before | {running: "cancelled"}
    assert call(servers, "GET", f"/v1/audits/{running}").json()["error"] == "the server shut down"
    view = call(servers, "GET", f"/v1/audits/{done[0]}").json()
    assert view["report"]["runs"]
    assert call(servers, "GET", f"/v1/audits/{done[0]}/files/report.json").status_code == 200


def test_the_command_line_writes_the_report_with_a_progress_bar(servers: Audited, tmp_path: Path) -> None:
    import subprocess

    up = json.loads(servers.env["MG_PROXY__UPSTREAMS"])["user-model"]
    env = {"MG_PROXY__UPSTREAMS": json.dumps({"cli-model": up}), "MG_MODELS_DIR": str(MODELS), "MG_DEVICE": "cpu",
           "MG_TORCH_THREADS": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
           "PYTHONPATH": str(ROOT)}  # fmt: skip
    args = ["--target", "cli-model", "--n", "4", "--queries", "10", "--seeds", "10", "--rounds", "1", "--l2",
            "--pipeline", "defense-gan:2:1", "--timing-images", "1", "--out", str(tmp_path)]  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "service.audit", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "[##############################]" in done.stderr and "wrote" in done.stderr
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["info"]["command"].startswith("python -m service.audit --target cli-model")
    assert [w["variant"] for w in rep["worst"]] == ["bare", "guarded: defense-gan L=2 R=1"]
    assert (tmp_path / "report.md").read_text().startswith("# Robustness audit of `cli-model`")
    assert (tmp_path / "robust-linf.svg").read_text().startswith("<svg")
    bad = subprocess.run([sys.executable, "-m", "service.audit", "--target", "nope", "--out", str(tmp_path)],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert bad.returncode == 2 and "unknown target 'nope'" in bad.stderr


# -- without servers -----------------------------------------------------------------------------------------------
def png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((32, 32), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_samples_load_from_npz_zip_and_folders(tmp_path: Path) -> None:
    s = Settings()
    x, y = np.random.default_rng(0).integers(0, 256, (5, 28, 28)).astype(np.uint8), np.arange(5) % 2
    got = from_npz(npz_bytes(images=x[:, None], labels=y), s)
    assert got.x.shape == (5, 1, 28, 28) and np.allclose(got.x[:, 0] * 255, x) and (got.y == y).all()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for k in range(6):
            z.writestr(f"top/{'cat' if k % 2 else 'dog'}/{k}.png", png(40 * k))
    got = from_zip(buf.getvalue(), s)
    assert got.classes == ["cat", "dog"] and got.x.shape == (6, 1, 28, 28)
    assert sorted(got.y.tolist()) == [0] * 3 + [1] * 3
    for label in ("3", "7"):
        (tmp_path / label).mkdir()
        (tmp_path / label / "a.png").write_bytes(png(int(label) * 20))
    got = from_folder(tmp_path, s)
    assert sorted(got.y.tolist()) == [3, 7]
    (tmp_path / "3" / "deeper").mkdir()
    (tmp_path / "3" / "deeper" / "b.png").write_bytes(png(1))
    with pytest.raises(AuditError, match="one subfolder per class"):
        from_folder(tmp_path, s)
    with pytest.raises(AuditError, match="labels"):
        from_npz(npz_bytes(x=x, y=np.zeros(5, np.float32)), s)


def test_the_budget_shrinks_every_cap_alike() -> None:
    slow = {"defense": "defense-gan", "steps": 50, "restarts": 2, "n": 4, "queries": 40, "rounds": 2}
    spec = AuditSpec(target="t", n=10, queries=1000, hsj_n=2, hsj_queries=1000, seeds=100, rounds=4, pipelines=[slow],
                     max_queries=1_000_000)  # fmt: skip
    plan = fit_budget(spec, ["square", "transfer"], 100, 2)
    guarded = plan.budgets["guarded: defense-gan L=50 R=2"]
    assert plan.scale == 1.0 and plan.budgets["bare"]["square"] == 1000 and guarded["n"] == 4
    assert guarded["square"] == 40 and guarded["rounds"] == 2
    small = fit_budget(spec.model_copy(update={"max_queries": 10_000}), ["square", "transfer"], 100, 2)
    bare = small.budgets["bare"]
    assert small.scale < 1 and bare["square"] == int(1000 * small.scale) and 1 <= bare["rounds"] < 4
    tiny = fit_budget(spec.model_copy(update={"max_queries": 100}), ["square", "transfer"], 100, 2)
    assert {x["what"] for x in tiny.not_run} >= {"Square (bare)", "transfer (bare)"}


def test_without_the_attack_suite_the_routes_answer_501(tiny_models: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fastapi.testclient import TestClient

    from service.api.app import create_app

    monkeypatch.setitem(sys.modules, "torchattacks", None)  # `import torchattacks` raises ImportError
    for name in ("service.attacks.query", "service.audit.target", "service.audit.jobs", "service.audit.runner"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    s = Settings(models_dir=tiny_models, warm_up=False, audit={"api_keys": [KEY]})
    with TestClient(create_app(s)) as client:
        for method, path in (("GET", "/v1/audits/targets"), ("POST", "/v1/audits"), ("GET", "/v1/audits")):
            r = client.request(method, path, headers={"X-API-Key": KEY}, json={"target": "x"})
            assert r.status_code == 501 and "pip install '.[audit]'" in r.json()["error"], (path, r.text)
        assert client.get("/v1/models").status_code == 200  # the rest of the service is untouched


# -- the labels-only upstream --------------------------------------------------------------------------------------
def serve_labels(port: int, onnx: str) -> None:
    """A KServe ModelServer whose model `mnist-labels` (FP32 N×1×28×28 in [0, 1]) answers its label only (INT64
    `label`): no scores for a score-based attack to climb."""
    sys.argv = sys.argv[:1]  # kserve parses the command line at import time
    import kserve
    import onnxruntime as ort
    from kserve import InferOutput, InferRequest, InferResponse

    class Labels(kserve.Model):
        def __init__(self) -> None:
            super().__init__("mnist-labels")
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = opts.inter_op_num_threads = 1
            self.session = ort.InferenceSession(onnx, opts, providers=["CPUExecutionProvider"])
            self.ready = True

        def predict(self, payload: InferRequest, headers: dict | None = None) -> InferResponse:
            x = payload.inputs[0].as_numpy().astype(np.float32)
            labels = self.session.run(None, {"input": x})[0].argmax(1).astype(np.int64)
            out = InferOutput("label", list(labels.shape), "INT64")
            out.set_data_from_numpy(labels, binary_data=payload.use_binary_outputs)
            return InferResponse(payload.id or "audit", self.name, [out], use_binary_outputs=payload.use_binary_outputs)

    kserve.ModelServer(http_port=port, grpc_port=0, enable_grpc=False, workers=1).start([Labels()])


if __name__ == "__main__":
    cli = argparse.ArgumentParser(description="the labels-only upstream of these tests")
    cli.add_argument("server", choices=["labels"])
    cli.add_argument("--port", type=int, required=True)
    cli.add_argument("--onnx", required=True)
    a = cli.parse_args()
    serve_labels(a.port, a.onnx)


def test_the_full_size_agreement_page_is_built_from_both_figures() -> None:
    """`training.audit_agreement`: the audit's variants with their own budgets, overlap judged from both intervals,
    and the committed example's page agrees with its JSON."""
    from training import audit_agreement as agreement

    spec = {"n": 100, "queries": 1000, "rounds": 6, "pipelines": [
        {"defense": "invert-classify", "steps": None, "restarts": None, "n": 20, "queries": 100, "rounds": 3},
        {"defense": "defense-gan", "steps": 50, "restarts": 2, "n": 6, "queries": None, "rounds": 2}]}  # fmt: skip
    got = agreement.variants(spec)
    assert [v[0] for v in got] == ["bare", "guarded: invert-classify", "guarded: defense-gan L=50 R=2"]
    assert got[2][1] == {"defense": "defense-gan", "steps": 50, "restarts": 2}
    assert got[2][2] == {"n": 6, "queries": 1000, "rounds": 2} and got[1][2]["n"] == 20
    a, key = {"accuracy": 0.2, "ci": [0.1, 0.3], "n": 50}, ("bare", "square", "linf:0.3")
    assert agreement.row(key, a, {**a, "ci": [0.31, 0.5]}, 1)["overlap"] is False
    assert agreement.row(key, a, {**a, "ci": [0.3, 0.5]}, 1)["overlap"] is True
    committed = ROOT / "docs" / "audit-example" / "agreement.json"
    if committed.exists():
        doc = json.loads(committed.read_text())
        assert agreement.render(doc) == (committed.parent / "agreement.md").read_text()
