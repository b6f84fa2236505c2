"""/v1/audits: robustness audits of allow-listed model servers, bare and behind the guard, as asynchronous jobs
behind an API key (docs/audit.md). Every route needs an `X-API-Key` on `settings.audit.api_keys` (401 without one,
403 for another key or when none is configured).

    GET  /v1/audits/targets            the names an audit may target (the allow-list), and the shipped samples
    POST /v1/audits                    start one (202 + its id); 404 unknown target, 422 over a cap or a bad
                                       sample, 429 queue full, 501 without the attack suite's libraries
    GET  /v1/audits                    every job, newest first
    GET  /v1/audits/{id}               status, progress, partial results; the report once finished
    POST /v1/audits/{id}/cancel        a queued job leaves the queue, a running one stops within a query
    GET  /v1/audits/{id}/files/{name}  report.md, report.json, the SVG plots

The target is a name, never a URL; the sample a shipped slice or an upload (`sample_file`: base64 of an `.npz` of
images and labels, or of a `.zip` of an image folder with one subfolder per class; never unpickled).
"""

from __future__ import annotations

import asyncio
import hmac
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, JSONResponse
from pydantic import Field
from starlette.concurrency import run_in_threadpool

from service.api.deps import get_models, get_settings
from service.audit.spec import AuditSpec
from service.config import Settings
from service.errors import ServiceError

router = APIRouter(prefix="/v1/audits", tags=["audits"])
SUITE = (
    "audits need the attack suite's libraries: torchattacks and adversarial-robustness-toolbox (pip install '.[audit]')"
)


class AuditRequest(AuditSpec):
    """An audit (see `AuditSpec`) and, for `sample: upload`, the sample's bytes."""

    sample_file: str | None = Field(None, description="base64 of an .npz (x, y) or a .zip of class folders")
    sample_format: Literal["npz", "zip"] = "npz"


async def require_key(request: Request) -> Settings:
    """401 without an X-API-Key header, 403 for a key not on `audit.api_keys` (constant-time compare)."""
    s: Settings = await get_settings(request)
    key = request.headers.get("x-api-key")
    if not key:
        raise ServiceError("audits need an X-API-Key header", 401, {"WWW-Authenticate": "ApiKey"})
    if not any(hmac.compare_digest(key.encode(), k.encode()) for k in s.audit.api_keys):
        raise ServiceError("this API key may not run audits" + ("" if s.audit.api_keys else
                           " (no key is configured: MG_AUDIT__API_KEYS)"), 403)  # fmt: skip
    return s


async def get_jobs(request: Request) -> Any:
    """The app's audit queue, built on first use (501 when the attack suite cannot be imported)."""
    state = request.app.state
    jobs = getattr(state, "audits", None)
    if jobs is None:
        try:
            from service.audit.jobs import AuditJobs
            from service.audit.target import Host
        except ImportError as exc:
            raise ServiceError(f"{SUITE}: {exc}", 501) from None
        host = Host(state.settings, await get_models(request), state.proxy, asyncio.get_running_loop())
        jobs = state.audits = AuditJobs(state.settings, host)
    return jobs


@router.get("/targets")
async def targets(s: Settings = Depends(require_key), _: Any = Depends(get_jobs)) -> dict:
    from service.audit.data import SHIPPED
    from service.audit.target import allowed_targets

    return {"targets": allowed_targets(s), "samples": [*SHIPPED, "upload"],
            "caps": s.audit.model_dump(include={"max_images", "max_queries", "max_queries_per_image",
                                                "max_pipelines", "max_concurrent"})}  # fmt: skip


@router.post("", status_code=202)
async def start(body: AuditRequest, s: Settings = Depends(require_key), jobs: Any = Depends(get_jobs)
                ) -> JSONResponse:  # fmt: skip
    """Check the target, caps and sample now (4xx), then queue the audit (202)."""
    fields = body.model_dump(exclude={"sample_file", "sample_format"})
    spec, sample = await run_in_threadpool(jobs.prepare, fields, body.sample_file, body.sample_format)
    job = jobs.submit(spec, sample)
    url = f"/v1/audits/{job.id}"
    return JSONResponse({"id": job.id, "status": job.status, "url": url}, 202, {"Location": url})


@router.get("")
async def list_audits(_: Settings = Depends(require_key), jobs: Any = Depends(get_jobs)) -> dict:
    return {"audits": jobs.list()}


@router.get("/{audit_id}")
async def view(audit_id: str, _: Settings = Depends(require_key), jobs: Any = Depends(get_jobs)) -> dict:
    return await run_in_threadpool(jobs.view, audit_id)


@router.post("/{audit_id}/cancel")
async def cancel(audit_id: str, _: Settings = Depends(require_key), jobs: Any = Depends(get_jobs)) -> dict:
    return await run_in_threadpool(jobs.cancel, audit_id)


@router.get("/{audit_id}/files/{name}")
async def report_file(audit_id: str, name: str, _: Settings = Depends(require_key),
                      jobs: Any = Depends(get_jobs)) -> FileResponse:  # fmt: skip
    path = jobs.file(audit_id, name)
    kind = {".md": "text/markdown", ".json": "application/json", ".svg": "image/svg+xml"}[path.suffix]
    return FileResponse(path, media_type=kind, headers={"X-Content-Type-Options": "nosniff"})
