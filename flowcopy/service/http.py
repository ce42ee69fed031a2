"""The service's HTTP face: a starlette app on hypercorn's trio worker, in the service's
own trio loop (the same stack as the served site).

    GET  /healthz              alive (the loop answers)
    GET  /readyz               200 ready, or 503 with the reason (resuming, journal not
                               writable, site unreachable)
    GET  /metrics              Prometheus text format
    GET  /                     the status page (static assets from the package, no CDN)
    GET  /api/status           the page's JSON document
    POST /api/trigger/{name}   fire a workflow now (`flowcopy trigger`)

Bound to loopback by default. Bound elsewhere, every route but /healthz and the page's
static shell needs `Authorization: Bearer <token>`, as the served site does; the page
takes the token from its URL fragment (`/#token=...`, never sent to a server or a log).
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from flowcopy.site.api import SiteError
from flowcopy.site.server import is_loopback  # one rule for which binds need TLS

if TYPE_CHECKING:
    from flowcopy.scheduler import Scheduler
    from flowcopy.service.metrics import ServiceMetrics
    from flowcopy.service.status import StatusBook

STATIC = Path(__file__).resolve().parent / "static"
PUBLIC = ("/healthz", "/", "/static/")
SITE_PROBE_TIMEOUT = 3.0


def parse_bind(text: str) -> tuple[str, int]:
    """`127.0.0.1:8080`, `[::1]:8080`, `:8080` (loopback), `0.0.0.0:8080` -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--http {text!r}: expected HOST:PORT, e.g. 127.0.0.1:9464")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


def _probe_store(store: Path) -> None:
    """A real write + fsync in the store's folder: a full or read-only disk shows here."""
    probe = store / ".readyz-probe"
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, b"ok\n")
        os.fsync(fd)
    finally:
        os.close(fd)
        probe.unlink(missing_ok=True)


async def readiness(scheduler: Scheduler, book: StatusBook) -> str | None:
    """None when ready; else why not, in one line."""
    if scheduler.stopping:
        return "stopping: no new runs"
    if not book.ready:
        return "resuming the runs the store left unfinished"
    journal = scheduler.engine.journal
    if not os.access(journal.path, os.W_OK):
        return f"journal {journal.path} is not writable"
    try:
        await trio.to_thread.run_sync(_probe_store, scheduler.store)
    except OSError as exc:
        return f"store {scheduler.store} is not writable: {exc.strerror or exc}"
    try:
        with trio.fail_after(SITE_PROBE_TIMEOUT):
            await scheduler.site.now()
    except trio.TooSlowError:
        return f"site unreachable: no answer within {SITE_PROBE_TIMEOUT:.0f} s"
    except SiteError as exc:
        return f"site unreachable: {exc.kind}: {exc.message}"
    return None


class TokenGuard:
    """Pure ASGI guard: the bearer token on every route but the public ones."""

    def __init__(self, app: Callable[..., Awaitable[None]], token: str) -> None:
        if not token:
            raise ValueError("the service's bearer token must not be empty")
        self.app = app
        self._expected = f"Bearer {token}".encode()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            path = scope.get("path", "")
            public = path in PUBLIC[:2] or path.startswith(PUBLIC[2])
            header = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
            if not public and not hmac.compare_digest(header, self._expected):
                message = "missing bearer token" if not header else "wrong bearer token"
                response = JSONResponse({"kind": "unauthorized", "message": message}, status_code=401,
                                        headers={"WWW-Authenticate": 'Bearer realm="flowcopy-service"'})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_app(scheduler: Scheduler, metrics: ServiceMetrics, book: StatusBook, *, token: str | None) -> Any:
    async def healthz(request: Request) -> Response:
        return JSONResponse({"alive": True, "pid": os.getpid()})

    async def readyz(request: Request) -> Response:
        reason = await readiness(scheduler, book)
        if reason is None:
            return JSONResponse({"ready": True})
        return JSONResponse({"ready": False, "reason": reason}, status_code=503)

    async def metrics_(request: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    async def status(request: Request) -> Response:
        return JSONResponse(book.document(), headers={"Cache-Control": "no-store"})

    async def trigger(request: Request) -> Response:
        name = request.path_params["name"]
        decision = scheduler.trigger(name)
        body = {"workflow": name, "action": decision.action, "at": decision.at.isoformat(), "reason": decision.reason}
        if decision.action in ("fire", "queue"):
            return JSONResponse(body, status_code=202)
        return JSONResponse(body, status_code=404 if name not in scheduler.entries else 409)

    app = Starlette(routes=[
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics_),
        Route("/", index),
        Route("/api/status", status),
        Route("/api/trigger/{name}", trigger, methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC)),
    ])
    return TokenGuard(app, token) if token else app
