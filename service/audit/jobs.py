"""POST /v1/audits's queue: audits run as jobs, a few at a time, each in its own thread; queued, running,
cancellable; finished reports kept on disk (`settings.audit.reports_dir`) across restarts under a bounded size.

    jobs = AuditJobs(settings, host)         # loads the finished reports already on disk
    job = jobs.submit(spec, sample)          # queued (429 when the queue is full), started when a slot frees
    jobs.view(job_id)                        # status, progress, partial results; the report once finished
    jobs.cancel(job_id)                      # a queued job leaves the queue; a running one stops at its next query

Each report folder holds status.json (the job's view) and the report's files (`service.audit.report`); past
`max_reports_bytes` the oldest folders go first (never the newest). On shutdown (`close`) running and queued jobs are
cancelled and written, so a restart lists them.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import shutil
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from service.audit.data import Sample
from service.audit.spec import AuditError, AuditSpec, check_caps, check_threats
from service.audit.target import Cancelled, Host, Meter
from service.config import Settings
from service.errors import ServiceError

log = logging.getLogger("service.audit")
ID = re.compile(r"^[0-9a-f]{32}$")
FILE = re.compile(r"^(report\.(md|json)|[a-z0-9-]+\.svg)$")
FINAL = ("done", "failed", "cancelled")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass(eq=False)
class Job:
    """One audit: its request, state, progress and (growing) report."""

    spec: AuditSpec
    sample: Sample | None
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    status: str = "queued"  # queued | running | done | failed | cancelled
    created: str = field(default_factory=_now)
    started: str | None = None
    finished: str | None = None
    error: str | None = None
    meter: Meter | None = None
    progress: object | None = None  # runner.Progress (imported with the attack suite)
    doc: dict | None = None

    def view(self) -> dict:
        """What GET /v1/audits/{id} answers while the job lives."""
        p = self.progress
        prog = {"done": 0, "total": 1, "step": self.status, "fraction": 0.0}
        partial: list[dict] = []
        if p is not None:
            prog = {"done": p.done, "total": p.total, "step": p.step, "fraction": round(p.done / max(p.total, 1), 3)}
            partial = list(p.partial)
        if self.status == "done":
            prog["fraction"] = 1.0
        return {"id": self.id, "status": self.status, "target": self.spec.target, "created": self.created,
                "started": self.started, "finished": self.finished, "error": self.error, "progress": prog,
                "partial": partial, "queries": self.meter.spent if self.meter else 0,
                "spec": self.spec.model_dump()}  # fmt: skip


class AuditJobs:
    """The queue and its worker threads; the finished jobs' views from disk."""

    def __init__(self, settings: Settings, host: Host) -> None:
        self.settings, self.host, self.cfg = settings, host, settings.audit
        self.dir = Path(self.cfg.reports_dir)
        self.lock = threading.RLock()
        self.queue: deque[Job] = deque()
        self.live: dict[str, Job] = {}
        self.running: dict[str, threading.Thread] = {}
        self.finished: dict[str, dict] = self._load()

    def _load(self) -> dict[str, dict]:
        """The finished jobs' views from disk (a job killed outright, SIGKILL, left no status.json: not listed)."""
        out = {}
        for path in sorted(self.dir.glob("*/status.json")) if self.dir.exists() else []:
            try:
                view = json.loads(path.read_text())
                out[view["id"]] = view
            except (OSError, ValueError, KeyError):
                log.warning("skipping an unreadable audit status %s", path)
        return out

    def prepare(self, fields: dict, sample_file: str | None, fmt: str) -> tuple[AuditSpec, Sample]:
        """An audit request checked before it is queued: the allow-list first (404), the caps (422), each ε within
        the target's images, the sample (of the target's dataset; 422, 413), n within it, the target's metadata
        against its contract (422, 502)."""
        from service.audit.data import load_sample
        from service.audit.target import allowed_targets, resolve_target, target_spec

        allowed = allowed_targets(self.settings)
        if fields.get("target") not in allowed:
            raise AuditError(f"unknown target {fields.get('target')!r}; this server audits {allowed}", 404)
        spec = AuditSpec.model_validate(fields)
        check_caps(spec, self.settings)
        ds = target_spec(spec.target, self.host)
        check_threats(spec, ds)
        raw = None
        if spec.sample == "upload":
            if not sample_file:
                raise AuditError("sample 'upload' needs sample_file (base64 of an .npz or a .zip)")
            try:
                raw = base64.b64decode(sample_file, validate=True)
            except (binascii.Error, ValueError):
                raise AuditError("sample_file is not valid base64") from None
        sample = load_sample(spec.sample, self.settings, raw, fmt, ds)
        sample.split(spec.n, spec.seeds)
        resolve_target(spec.target, self.host, spec.input)
        return spec, sample

    def submit(self, spec: AuditSpec, sample: Sample) -> Job:
        """Queue an audit (429 when the queue is full) and start it when a slot is free."""
        with self.lock:
            if len(self.queue) >= self.cfg.max_queued:
                raise ServiceError(f"{len(self.queue)} audits are queued already; try again later "
                                   "(MG_AUDIT__MAX_QUEUED)", 429, {"Retry-After": "60"})  # fmt: skip
            job = Job(spec, sample, meter=Meter(spec.max_queries))
            self.live[job.id] = job
            self.queue.append(job)
        self._dispatch()
        return job

    def _dispatch(self) -> None:
        with self.lock:
            while self.queue and len(self.running) < self.cfg.max_concurrent:
                job = self.queue.popleft()
                t = threading.Thread(target=self._run, args=(job,), name=f"audit-{job.id[:8]}", daemon=True)
                self.running[job.id] = t
                job.status, job.started = "running", _now()
                t.start()

    def _run(self, job: Job) -> None:
        from service.audit.runner import Progress, new_doc, run_audit

        job.progress = Progress(step="starting")
        assert job.sample is not None and job.meter is not None
        job.doc = new_doc(job.spec, job.sample, job.started or _now())
        t0, end = time.time(), ("done", None)
        try:
            run_audit(job.spec, job.sample, self.host, job.meter, job.progress, job.doc)  # type: ignore[arg-type]
        except Cancelled:
            end = ("cancelled", job.meter.reason)
        except ServiceError as exc:
            end = ("failed", str(exc))
        except Exception as exc:  # noqa: BLE001 - reported in the job's status; the server goes on
            log.exception("audit %s failed", job.id)
            end = ("failed", f"{type(exc).__name__}: {exc}")
        finally:
            job.doc["info"]["minutes"] = round((time.time() - t0) / 60, 1)
            self._finish(job, *end)

    def _finish(self, job: Job, status: str, error: str | None) -> None:
        """The job's final status, written to disk and moved to the finished ones in one step (a reader sees it
        running or finished with its report, never in between); then the next queued job starts."""
        with self.lock:
            job.status, job.error, job.finished, job.sample = status, error, _now(), None
            try:
                self._persist(job)
            except OSError:
                log.exception("could not write the report of audit %s", job.id)
            self.running.pop(job.id, None)
            self.live.pop(job.id, None)
            self.finished[job.id] = job.view() | {"files": (job.doc or {}).get("files", [])}
        self._dispatch()

    def _persist(self, job: Job) -> None:
        from service.audit.report import write_report

        folder = self.dir / job.id
        files = write_report(job.doc, folder) if job.doc and job.doc.get("target") else []
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "status.json").write_text(json.dumps(job.view() | {"files": files}, indent=1) + "\n")
        self._prune(keep=job.id)

    def _prune(self, keep: str) -> None:
        """Oldest report folders removed until the folder is under `max_reports_bytes` (never `keep`)."""
        folders = sorted((p for p in self.dir.iterdir() if p.is_dir() and ID.match(p.name)),
                         key=lambda p: p.stat().st_mtime)  # fmt: skip
        sizes = {p: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) for p in folders}
        total = sum(sizes.values())
        for p in folders:
            if total <= self.cfg.max_reports_bytes or p.name == keep:
                continue
            shutil.rmtree(p, ignore_errors=True)
            total -= sizes[p]
            with self.lock:
                self.finished.pop(p.name, None)

    def view(self, job_id: str, report: bool = True) -> dict:
        """What GET /v1/audits/{id} answers while the job lives."""
        """A job's view; a finished one with its report (report.json) when `report`."""
        with self.lock:
            job = self.live.get(job_id)
            if job is not None:
                return job.view() | {"queue_position": self._position(job)}
            view = self.finished.get(job_id)
        if view is None:
            raise AuditError(f"no audit {job_id!r} (finished reports are kept up to MG_AUDIT__MAX_REPORTS_BYTES)", 404)
        path = self.dir / job_id / "report.json"
        return view | ({"report": json.loads(path.read_text())} if report and path.exists() else {})

    def _position(self, job: Job) -> int | None:
        return next((k for k, j in enumerate(self.queue) if j is job), None)

    def list(self) -> list[dict]:
        with self.lock:
            views = [j.view() for j in self.live.values()] + list(self.finished.values())
        keys = ("id", "status", "target", "created", "finished", "error", "progress")
        return sorted(({k: v.get(k) for k in keys} for v in views), key=lambda v: v["created"], reverse=True)

    def cancel(self, job_id: str) -> dict:
        """A queued job leaves the queue (cancelled); a running one stops at its next query. 409 once finished."""
        with self.lock:
            job = self.live.get(job_id)
            if job is None:
                if job_id in self.finished:
                    raise AuditError(f"audit {job_id} has finished ({self.finished[job_id]['status']})", 409)
                raise AuditError(f"no audit {job_id!r}", 404)
            queued = job in self.queue
            if queued:
                self.queue.remove(job)
        if queued:
            self._finish(job, "cancelled", "cancelled while queued")
        elif job.meter is not None:
            job.meter.cancel.set()
        return job.view()

    def file(self, job_id: str, name: str) -> Path:
        """A finished report's file (report.md, report.json, a plot)."""
        path = self.dir / job_id / name
        if not ID.match(job_id) or not FILE.match(name) or not path.is_file():
            raise AuditError(f"no file {name!r} in audit {job_id!r}", 404)
        return path

    def close(self, wait_s: float = 5.0) -> None:
        """On shutdown: every job cancelled and written (a running one with what it measured), so a restart lists
        it; waits a little for the running ones."""
        with self.lock:
            jobs, queued, self.queue = list(self.live.values()), list(self.queue), deque()
        for j in jobs:
            if j.meter is not None:
                j.meter.reason = "the server shut down"
                j.meter.cancel.set()
        for j in queued:
            self._finish(j, "cancelled", "the server shut down while it was queued")
        for t in list(self.running.values()):
            t.join(wait_s)
