"""The one error handler of the app: any exception a route raises → a JSON answer, for /v1, /v2 and /v1/attack.

    install(app)                          # every handler below is `handle`
    as_service_error(exc, oip) -> ServiceError | None       # None: not a request's fault (500, logged)

A request's refusals are `service.errors.ServiceError`s: they carry their status, headers and body keys. What other
code raises is translated here once: FastAPI's validation errors (422, with pydantic's `detail`), Starlette's
HTTP errors (404 for an unknown route, 405, ...), a body nested too deeply (400) or
too large to hold (413); on the Open Inference Protocol's routes any other ValueError is a bad request (400).

The body is `{"error": "..."}` everywhere; /v1 adds the error's `extra` keys (`detail`, `cost`, `budget`,
`reason`), the Open Inference Protocol's error object has none. Its routes (`/v2...`, `/predictions/...`) answer
400 where /v1 answers 422. 503 answers carry Retry-After.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.errors import ServiceError

log = logging.getLogger("service.api")

OIP_PREFIXES = ("/v2/", "/predictions/")  # the Open Inference Protocol's routes (and the raw upstreams')


def is_oip(path: str) -> bool:
    return path == "/v2" or path.startswith(OIP_PREFIXES)


def _validation(exc: RequestValidationError) -> ServiceError:
    details = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", "")} for e in exc.errors()]
    first = details[0] if details else {"loc": [], "msg": "invalid request"}
    where = ".".join(str(p) for p in first["loc"])
    return ServiceError(f"invalid request: {where}: {first['msg']}" if where else first["msg"], 422, detail=details)


def as_service_error(exc: BaseException, oip: bool = False) -> ServiceError | None:
    """`exc` as the service's error type, or None for an exception no request causes."""
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, RequestValidationError):
        return _validation(exc)
    if isinstance(exc, StarletteHTTPException):
        return ServiceError(str(exc.detail), exc.status_code, dict(exc.headers or {}))
    if isinstance(exc, RecursionError):
        return ServiceError("the request is nested too deeply", 400)
    if isinstance(exc, MemoryError):
        return ServiceError("the request needs more memory than the server grants one request", 413)
    if oip and isinstance(exc, ValueError):
        return ServiceError(str(exc), 400)
    return None


def response(err: ServiceError, oip: bool) -> JSONResponse:
    body = {"error": err.message} if oip else {"error": err.message, **err.extra}
    return JSONResponse(body, status_code=err.status_for(oip), headers=err.headers or None)


async def handle(request: Request, exc: Exception) -> JSONResponse:
    """The answer to a request that raised `exc` (500, logged, for what no request causes)."""
    oip = is_oip(request.url.path)
    err = as_service_error(exc, oip)
    if err is None:
        log.exception("unhandled error", exc_info=exc)
        err = ServiceError("internal error" if oip else f"internal error: {type(exc).__name__}", 500)
    return response(err, oip)


# what `handle` is installed for; ValueError answers 400 on the protocol's routes and 500 elsewhere, Exception is
# Starlette's last resort (its server-error middleware answers with `handle`, then re-raises for the server's log)
HANDLED: tuple[type[BaseException], ...] = (ServiceError, RequestValidationError, StarletteHTTPException,
                                             RecursionError, MemoryError, ValueError, Exception)  # fmt: skip


def install(app: FastAPI) -> None:
    for kind in HANDLED:
        app.add_exception_handler(kind, handle)  # type: ignore[arg-type]
