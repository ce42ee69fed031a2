"""The site served over HTTP: an ASGI app (starlette) on hypercorn's trio worker.

One trio run holds the site model, its workloads and the HTTP server, so a request
handler calls the same `Site` the in-process engine would, and the array's own timers
(background copy, ELB timeouts, guests' self-thaw) run beside it. `build_app` is
independent of where the site comes from; `serve_state` is the `flowcopy site serve`
process: durable state folder, fault plan, bearer token, signals.

The API lives under `/api/v1/`; JSON in and out through `codec.converter` (the client
uses the same one), volume data as `application/octet-stream`. Errors are JSON
`{"kind", "message", "details"}` with the `api` error's stable kind, and an HTTP status
a generic client can act on (404 unknown object, 409 conflict with the object's state,
422 request that cannot apply, 400 malformed, 401 token, 503 retry later).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import os
import secrets
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, TextIO

import attrs
import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from flowcopy.logs import get_logger
from flowcopy.site import api, codec
from flowcopy.site.client import read_token
from flowcopy.site.faults import FaultPlan, FaultySite
from flowcopy.site.fencing import HEADER as FENCE_HEADER, parse_header

log = get_logger(__name__)

API = "/api/v1"
MAX_BODY = 256 * 1024 * 1024  # a write of up to 256 MiB in one request
DEFAULT_MAX_READ = 64 * 1024 * 1024
"""Longest volume read one request may ask for (`flowcopy site serve --max-read`)."""
READ_CHUNK = 4 * 1024 * 1024
"""Reads longer than this are streamed in pieces of this size: memory stays flat."""
MAX_CHECK_SERIALS = 16_384
"""LUNs one `POST /check` may name (an ESS has at most 65,280 volumes; a backup checks a few)."""
CHECK_THREADS = 2
"""Checks run in worker threads, at most this many at once, so the site keeps answering."""

STATUS_BY_KIND: Mapping[str, int] = {
    "unknown_volume": 404,
    "unknown_host": 404,
    "unknown_vm": 404,
    "unknown_disk": 404,
    "unknown_task": 404,
    "relationship_not_found": 404,
    "target_in_relationship": 409,
    "too_many_targets": 409,
    "cascade_refused": 409,
    "second_incremental": 409,
    "not_incremental": 409,
    "relationship_exists": 409,
    "write_inhibited": 409,
    "guest_state": 409,
    "background_copy_running": 409,
    "stale_fence": 409,
    "space_efficient_refused": 409,
    "relationship_failed": 409,
    "pool_full": 507,
    "size_mismatch": 422,
    "not_raw_mapped": 422,
    "out_of_range": 422,
    "bad_request": 400,
    "unauthorized": 401,
    "volume_offline": 503,
    "lss_busy": 503,
    "guest_not_responding": 503,
    "site_unavailable": 503,
    "injected_fault": 503,
    "injected_fault_permanent": 500,
    "site_error": 500,
}


def status_for(error: api.SiteError) -> int:
    return STATUS_BY_KIND.get(error.kind, 503 if error.transient else 500)


def error_response(error: api.SiteError) -> Response:
    return Response(
        json.dumps(_jsonable(error.to_dict()), separators=(",", ":")),
        status_code=status_for(error),
        media_type="application/json",
    )


def _jsonable(value: Any) -> Any:
    """Error details are free-form; make sure they survive json.dumps."""
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return json.loads(json.dumps(value, default=str))


# --------------------------------------------------------------------------- request parsing


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else {}
    except ValueError as exc:
        raise api.BadRequest(f"bad request body: not JSON ({exc})") from None
    except RecursionError:
        raise api.BadRequest("bad request body: JSON nested too deeply") from None


async def _body(request: Request, cls: type[Any]) -> Any:
    data = _json(await request.body())
    try:
        return codec.structure(data, cls)
    except RecursionError:
        raise api.BadRequest("bad request body: JSON nested too deeply") from None


def _int_param(request: Request, name: str, *, minimum: int = 0) -> int:
    value = request.query_params.get(name)
    if value is None:
        raise api.BadRequest(f"query parameter {name!r} is required")
    try:
        number = int(value)
    except ValueError:
        raise api.BadRequest(f"query parameter {name!r} must be an integer, not {value!r}") from None
    if number < minimum:
        raise api.BadRequest(f"query parameter {name!r} must be >= {minimum}, not {number}")
    return number


def _bool_param(request: Request, name: str) -> bool:
    value = request.query_params.get(name, "false").lower()
    if value in ("1", "true", "yes"):
        return True
    if value in ("0", "false", "no", ""):
        return False
    raise api.BadRequest(f"query parameter {name!r} must be true or false, not {value!r}")


def _pair(request: Request) -> tuple[str, str]:
    pair = request.path_params["pair"]
    source, sep, target = pair.partition(":")
    if not sep or not source or not target or ":" in target:
        raise api.BadRequest(f"a FlashCopy relationship is named SOURCE:TARGET, not {pair!r}")
    return source, target


def _labels(request: Request) -> dict[str, str] | None:
    values = request.query_params.getlist("label")
    if not values:
        return None
    labels: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise api.BadRequest(f"label selector must be KEY=VALUE, not {item!r}")
        labels[key] = value
    return labels


# --------------------------------------------------------------------------- the app

Handler = Callable[[Request], Awaitable[Any]]


def build_app(
    site: api.Site, *, token: str, faults: FaultySite | None = None, max_read: int = DEFAULT_MAX_READ
) -> Callable[..., Awaitable[None]]:
    """The ASGI app serving `site`, guarded by the bearer `token`.

    `faults` (usually `site` itself) makes `/api/v1/faults` steer its fault plan.
    `max_read`: the longest read one request may ask for (longer: 400, read in pieces).
    """

    def endpoint(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def run(request: Request) -> Response:
            try:
                raw = request.headers.get(FENCE_HEADER)
                try:
                    fences = parse_header(raw) if raw is not None else ()
                except ValueError as exc:
                    raise api.BadRequest(str(exc)) from None
                with api.fence_scope(*fences):  # the site admits (or refuses) the call by them
                    result = await handler(request)
            except api.SiteError as exc:
                return error_response(exc)
            except Exception as exc:  # noqa: BLE001 - a bug in the site must not look like a lost connection
                log.exception("site request failed", method=request.method, path=request.url.path)
                # the details (traceback) are in the site's log, not in the reply to a client
                return error_response(api.SiteError(f"internal error in the site ({type(exc).__name__}); see the site's log"))
            if isinstance(result, Response):
                return result
            return Response(codec.dumps(result), media_type="application/json")

        return run

    async def time_(request: Request) -> Any:
        return {"now": await site.now()}

    async def fences(request: Request) -> Any:
        book = getattr(getattr(site, "local", site), "fences", None)
        if book is None:
            raise api.BadRequest("this site keeps no fence marks")
        return {"keys": len(book.marks), "admitted": book.admitted, "refused": book.refused}

    async def volumes(request: Request) -> Any:
        return await site.list_volumes()

    async def pools(request: Request) -> Any:
        return await site.list_pools()

    async def volume(request: Request) -> Any:
        return await site.get_volume(request.path_params["serial"])

    async def read(request: Request) -> Any:
        serial, offset, length = request.path_params["serial"], _int_param(request, "offset"), _int_param(request, "length")
        if length > max_read:
            raise api.BadRequest(
                f"a read of {length} bytes is longer than this site's limit of {max_read} bytes per request; "
                "read in pieces", length=length, limit=max_read,
            )
        # the first piece is read before answering: an unknown volume or a bad range is a JSON error
        first = await site.read(serial, offset, min(length, READ_CHUNK))
        if length <= READ_CHUNK:
            return Response(first, media_type="application/octet-stream")

        async def pieces() -> Any:
            yield first
            position = offset + len(first)
            while position < offset + length:
                n = min(READ_CHUNK, offset + length - position)
                yield await site.read(serial, position, n)
                position += n

        # a piece that fails after the headers went out cuts the body short of Content-Length
        return StreamingResponse(pieces(), media_type="application/octet-stream",
                                 headers={"Content-Length": str(length)})

    async def write(request: Request) -> Any:
        offset = _int_param(request, "offset")
        data = await request.body()
        await site.write(request.path_params["serial"], offset, data)
        return {"written": len(data)}

    async def extents(request: Request) -> Any:
        return await site.extents(request.path_params["serial"])

    async def flashcopies(request: Request) -> Any:
        if request.method == "GET":
            return await site.query(
                volume=request.query_params.get("volume"), tag=request.query_params.get("tag")
            )
        body = await _body(request, codec.EstablishRequest)
        return await site.establish(body.source, body.target, body.options)

    async def flashcopy(request: Request) -> Any:
        source, target = _pair(request)
        if request.method == "GET":
            found = [r for r in await site.query(volume=source) if r.source == source and r.target == target]
            if not found:
                raise api.RelationshipNotFound(
                    f"no FlashCopy relationship {source} -> {target}", source=source, target=target
                )
            return found[0]
        release = {"release_space": True} if _bool_param(request, "release_space") else {}
        await site.withdraw(source, target, after_copy=_bool_param(request, "after_copy"), **release)
        return {"withdrawn": f"{source}:{target}"}

    async def resync(request: Request) -> Any:
        source, target = _pair(request)
        body = await _body(request, codec.ResyncRequest)
        return await site.resync(source, target, freeze=body.freeze, tag=body.tag, options=body.options)

    async def reverse(request: Request) -> Any:
        source, target = _pair(request)
        body = await _body(request, codec.ReverseRequest)
        return await site.reverse(source, target, tag=body.tag, fast=body.fast)

    async def consistency_groups(request: Request) -> Any:
        return await site.frozen_lsses()

    async def holds(request: Request) -> Any:
        return await site.hold_history()

    async def lsses(request: Request) -> Any:
        return await site.list_lsses()

    async def space_pools(request: Request) -> Any:
        return await site.list_space_pools()

    async def lss(request: Request) -> Any:
        body = await _body(request, codec.ElbTimeoutRequest)
        return await site.set_elb_timeout(request.path_params["lss"], body.seconds)

    async def unfreeze(request: Request) -> Any:
        body = await _body(request, codec.UnfreezeRequest)
        return await site.unfreeze(list(body.lsses))

    async def unfreeze_one(request: Request) -> Any:
        await _body(request, _Empty)
        return await site.unfreeze([request.path_params["lss"]])

    async def tasks(request: Request) -> Any:
        if request.method == "GET":
            return await site.list_tasks()
        task = await _body(request, api.SavedTask)
        await site.save_task(task)
        return task

    async def execute_task(request: Request) -> Any:
        body = await _body(request, codec.ExecuteTaskRequest)
        return await site.execute_task(request.path_params["name"], tag=body.tag)

    async def hosts(request: Request) -> Any:
        return await site.list_hosts()

    async def host_disks(request: Request) -> Any:
        return await site.list_disks(request.path_params["host"])

    async def prime(request: Request) -> Any:
        await _body(request, _Empty)
        return await site.prime(request.path_params["host"])

    async def vms(request: Request) -> Any:
        return await site.list_vms(_labels(request))

    async def vm(request: Request) -> Any:
        return await site.get_vm(request.path_params["vm"])

    async def lun(request: Request) -> Any:
        disk = request.query_params.get("disk")
        if not disk:
            raise api.BadRequest("query parameter 'disk' is required (a disk name, guest path or serial)")
        return await site.lun_of(request.path_params["vm"], disk)

    async def quiesce(request: Request) -> Any:
        body = await _body(request, codec.QuiesceRequest)
        return await site.quiesce(request.path_params["vm"], body.level, body.timeout)

    async def thaw(request: Request) -> Any:
        await _body(request, _Empty)
        return await site.thaw(request.path_params["vm"])

    async def freeze_status(request: Request) -> Any:
        return await site.freeze_status(request.path_params["vm"])

    def power(operation: str) -> Handler:
        async def handler(request: Request) -> Any:
            await _body(request, _Empty)
            await getattr(site, operation)(request.path_params["vm"])
            return await site.get_vm(request.path_params["vm"])

        return handler

    async def check(request: Request) -> Any:
        body = await _body(request, codec.CheckRequest)
        if len(body.serials) > MAX_CHECK_SERIALS:
            raise api.BadRequest(
                f"a check names at most {MAX_CHECK_SERIALS} LUNs, this one {len(body.serials)}; check in batches"
            )
        return await site.check(list(body.serials))

    async def mount_check(request: Request) -> Any:
        body = await _body(request, codec.MountCheckRequest)
        return await site.mount_check(request.path_params["vm"], list(body.disks))

    async def faults_(request: Request) -> Any:
        if faults is None:
            raise api.BadRequest("this site has no fault injection")
        if request.method == "POST":
            data = _json(await request.body())
            try:
                plan = codec.structure(data, FaultPlan).validate()
            except RecursionError:
                raise api.BadRequest("bad request body: JSON nested too deeply") from None
            if _bool_param(request, "absolute"):
                faults.set_plan(plan)
            else:
                await faults.set_plan_relative(plan)
        elif request.method == "DELETE":
            faults.clear()
        if request.method != "GET":
            sync = getattr(site, "sync", None)  # a durable site: the plan is committed before the reply
            if sync is not None:
                await sync()
        return {"plan": codec.unstructure(faults.plan), "injected": dict(faults.injected)}

    r = API
    routes = [
        Route(f"{r}/time", endpoint(time_), methods=["GET"]),
        Route(f"{r}/fences", endpoint(fences), methods=["GET"]),
        Route(f"{r}/volumes", endpoint(volumes), methods=["GET"]),
        Route(f"{r}/pools", endpoint(pools), methods=["GET"]),
        Route(f"{r}/volumes/{{serial}}", endpoint(volume), methods=["GET"]),
        Route(f"{r}/volumes/{{serial}}/data", endpoint(read), methods=["GET"]),
        Route(f"{r}/volumes/{{serial}}/data", endpoint(write), methods=["PUT", "POST"]),
        Route(f"{r}/volumes/{{serial}}/extents", endpoint(extents), methods=["GET"]),
        Route(f"{r}/flashcopies", endpoint(flashcopies), methods=["GET", "POST"]),
        Route(f"{r}/flashcopies/{{pair}}", endpoint(flashcopy), methods=["GET", "DELETE"]),
        Route(f"{r}/flashcopies/{{pair}}/resync", endpoint(resync), methods=["POST"]),
        Route(f"{r}/flashcopies/{{pair}}/reverse", endpoint(reverse), methods=["POST"]),
        Route(f"{r}/consistency-groups", endpoint(consistency_groups), methods=["GET"]),
        Route(f"{r}/consistency-groups/unfreeze", endpoint(unfreeze), methods=["POST"]),
        Route(f"{r}/consistency-groups/holds", endpoint(holds), methods=["GET"]),
        Route(f"{r}/lsses", endpoint(lsses), methods=["GET"]),
        Route(f"{r}/space-pools", endpoint(space_pools), methods=["GET"]),
        Route(f"{r}/lsses/{{lss}}", endpoint(lss), methods=["POST"]),
        Route(f"{r}/consistency-groups/{{lss}}/unfreeze", endpoint(unfreeze_one), methods=["POST"]),
        Route(f"{r}/tasks", endpoint(tasks), methods=["GET", "POST"]),
        Route(f"{r}/tasks/{{name}}/execute", endpoint(execute_task), methods=["POST"]),
        Route(f"{r}/hosts", endpoint(hosts), methods=["GET"]),
        Route(f"{r}/hosts/{{host}}/disks", endpoint(host_disks), methods=["GET"]),
        Route(f"{r}/hosts/{{host}}/prime", endpoint(prime), methods=["POST"]),
        Route(f"{r}/vms", endpoint(vms), methods=["GET"]),
        Route(f"{r}/vms/{{vm}}", endpoint(vm), methods=["GET"]),
        Route(f"{r}/vms/{{vm}}/lun", endpoint(lun), methods=["GET"]),
        Route(f"{r}/vms/{{vm}}/quiesce", endpoint(quiesce), methods=["POST"]),
        Route(f"{r}/vms/{{vm}}/thaw", endpoint(thaw), methods=["POST"]),
        Route(f"{r}/vms/{{vm}}/freeze", endpoint(freeze_status), methods=["GET"]),
        Route(f"{r}/vms/{{vm}}/power-on", endpoint(power("power_on")), methods=["POST"]),
        Route(f"{r}/vms/{{vm}}/power-off", endpoint(power("power_off")), methods=["POST"]),
        Route(f"{r}/vms/{{vm}}/reboot", endpoint(power("reboot")), methods=["POST"]),
        Route(f"{r}/vms/{{vm}}/mount-check", endpoint(mount_check), methods=["POST"]),
        Route(f"{r}/check", endpoint(check), methods=["POST"]),
        Route(f"{r}/faults", endpoint(faults_), methods=["GET", "POST", "DELETE"]),
    ]

    async def not_found(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 404)
        what = "method not allowed on" if status == 405 else "no such endpoint"
        return Response(
            json.dumps({"kind": "bad_request", "message": f"{what}: {request.method} {request.url.path}", "details": {}}),
            status_code=status,
            media_type="application/json",
        )

    app = Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found}, max_body_size=MAX_BODY)
    return BearerAuth(app, token)


@attrs.frozen
class _Empty:
    """A body that must be empty or `{}` (so a typo'd option is not silently ignored)."""


class BearerAuth:
    """Pure ASGI guard: every HTTP request carries `Authorization: Bearer <token>` or gets 401.

    The scheme is matched case-insensitively (RFC 6750 / RFC 9110: `bearer x` is the
    same credential as `Bearer x`); the token itself exactly, in constant time.
    """

    def __init__(self, app: Callable[..., Awaitable[None]], token: str) -> None:
        if not token:
            raise ValueError("the site's bearer token must not be empty")
        self.app = app
        self._expected = token.encode()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            header = b""
            for key, value in scope["headers"]:
                if key == b"authorization":
                    header = value
                    break
            scheme, _, credentials = header.strip().partition(b" ")
            if not (scheme.lower() == b"bearer" and hmac.compare_digest(credentials.strip(b" "), self._expected)):
                message = "missing bearer token" if not header else "wrong bearer token"
                response = JSONResponse(
                    {"kind": "unauthorized", "message": message, "details": {}},
                    status_code=401,
                    headers={"WWW-Authenticate": 'Bearer realm="flowcopy-site"'},
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


# --------------------------------------------------------------------------- serving


def is_loopback(host: str) -> bool:
    """Whether `host` only listens on this machine (names other than localhost are not trusted to)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class InsecureBind(Exception):
    """A non-loopback address without TLS: the bearer token would cross the network in clear."""


def check_bind(host: str, certfile: str | Path | None, keyfile: str | Path | None) -> None:
    if (certfile is None) != (keyfile is None):
        raise InsecureBind("TLS needs both --certfile and --keyfile")
    for name, path in (("--certfile", certfile), ("--keyfile", keyfile)):
        if path is not None and not Path(path).is_file():
            raise InsecureBind(f"{name} {path}: no such file")
    if certfile is None and not is_loopback(host):
        raise InsecureBind(
            f"refusing to serve on {host} over plain HTTP: the bearer token would cross the network in clear; "
            "give --certfile and --keyfile to serve HTTPS, or listen on 127.0.0.1"
        )


def hypercorn_config(
    host: str, port: int, *, certfile: str | Path | None = None, keyfile: str | Path | None = None
) -> Any:
    from hypercorn.config import Config

    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    if certfile is not None and keyfile is not None:
        config.certfile, config.keyfile = str(certfile), str(keyfile)
    config.accesslog = None
    config.loglevel = "WARNING"
    config.graceful_timeout = 2.0
    config.keep_alive_timeout = 75.0  # engine clients keep their connections between units
    return config


async def serve_app(
    app: Callable[..., Awaitable[None]],
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    shutdown: trio.Event | None = None,
    certfile: str | Path | None = None,
    keyfile: str | Path | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `app` until `shutdown` is set (or cancelled); `task_status.started(url)`.

    With `certfile`/`keyfile` it serves HTTPS (hypercorn's TLS); without, only on loopback.
    """
    from hypercorn.trio import serve

    check_bind(host, certfile, keyfile)
    config = hypercorn_config(host, port, certfile=certfile, keyfile=keyfile)
    trigger = shutdown.wait if shutdown is not None else None

    class _Status:
        def started(self, binds: list[str] | None = None) -> None:
            url = (binds or ["http://?"])[0]
            task_status.started(url)

    await serve(app, config, shutdown_trigger=trigger, task_status=_Status())  # type: ignore[arg-type]


def ensure_token(state_dir: Path, token_file: str | Path | None) -> tuple[str, Path, bool]:
    """The token to require: from `token_file`, else STATE/token (created 0600 if absent)."""
    if token_file is not None:
        return read_token(token_file), Path(token_file), False
    path = state_dir / "token"
    if path.exists():
        return read_token(path), path, False
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token, path, True


async def serve_state(
    state_dir: Path,
    *,
    lab: str | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    token_file: str | Path | None = None,
    speed: float = 1.0,
    out: TextIO | None = None,
    certfile: str | Path | None = None,
    keyfile: str | Path | None = None,
    max_read: int = DEFAULT_MAX_READ,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """`flowcopy site serve`: the durable site in `state_dir`, served until SIGTERM/SIGINT."""
    from flowcopy.site.persist import open_site

    check_bind(host, certfile, keyfile)  # before anything is created
    out = out if out is not None else sys.stdout
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    token, token_path, created = ensure_token(state_dir, token_file)
    async with open_site(state_dir, lab=lab, speed=speed, clock="wall") as site:
        site.local.check_limiter = trio.CapacityLimiter(CHECK_THREADS)  # checks off the event loop
        app = build_app(site, token=token, faults=site.faults, max_read=max_read)
        shutdown = trio.Event()
        async with trio.open_nursery() as nursery:

            async def server(task_status: trio.TaskStatus[str]) -> None:
                await serve_app(app, host=host, port=port, shutdown=shutdown, certfile=certfile, keyfile=keyfile,
                                task_status=task_status)
                nursery.cancel_scope.cancel()  # served out: stop the signal watcher too

            url = await nursery.start(server)
            if created:
                print(f"flowcopy site: generated a bearer token in {token_path} (mode 0600)", file=out)
            print(f"flowcopy site listening on {url} (state {state_dir})", file=out, flush=True)
            log.info("site listening", url=url, state=str(state_dir), speed=speed)
            task_status.started(url)
            nursery.start_soon(_stop_on_signal, shutdown)
            # on a signal hypercorn finishes in-flight requests (graceful_timeout) and returns;
            # leaving open_site then commits and snapshots the state
        log.info("site stopped", state=str(state_dir))


async def _stop_on_signal(shutdown: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            shutdown.set()
            return


# --------------------------------------------------------------------------- bench


async def run_bench(
    url: str | None, token_file: str | Path | None, *, calls: int = 2000, concurrency: int = 16
) -> list[dict[str, Any]]:
    """Per-call cost over loopback (and, for a site started here, without HTTP).

    With no `url` a site is started in-process on a fresh temporary state folder (wall
    clock, workloads off), so the figures are HTTP + JSON + durable commit, and the same
    calls straight on the durable site give the share HTTP adds.
    """
    import tempfile
    import time as _time

    from flowcopy.site.client import SiteClient, resolve_site
    from flowcopy.site.persist import open_site

    results: list[dict[str, Any]] = []

    async def measure(name: str, n: int, workers: int, call: Callable[[int], Awaitable[Any]]) -> None:
        counter = iter(range(n))
        durations: list[float] = []

        async def worker() -> None:
            for i in counter:
                t0 = _time.perf_counter()
                await call(i)
                durations.append(_time.perf_counter() - t0)

        start = _time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(workers):
                nursery.start_soon(worker)
        elapsed = _time.perf_counter() - start
        results.append({
            "name": name, "calls": n, "concurrency": workers, "seconds": elapsed,
            "per_second": n / elapsed if elapsed > 0 else float("inf"),
            "mean_ms": 1000 * sum(durations) / max(1, len(durations)),
        })

    async def suite(site: api.Site, label: str) -> None:
        vols = await site.list_volumes()
        busy = {v for r in await site.query() for v in (r.source, r.target)}
        by_size: dict[int, list[str]] = {}
        for v in vols:
            if v.serial not in busy:
                by_size.setdefault(v.capacity, []).append(v.serial)
        pairs = [(group[i], group[i + 1]) for group in by_size.values() for i in range(0, len(group) - 1, 2)]
        if not pairs:
            raise api.BadRequest("bench needs two free volumes of the same size")
        serial = vols[0].serial
        await measure(f"{label} now()", calls, 1, lambda i: site.now())
        await measure(f"{label} get_volume", calls, 1, lambda i: site.get_volume(serial))
        await measure(f"{label} get_volume", calls, concurrency, lambda i: site.get_volume(serial))
        nocopy = api.FlashOptions(mode=api.CopyMode.NOCOPY, tag="bench")

        async def cycle(pair: tuple[str, str], establish_times: list[float], withdraw_times: list[float]) -> None:
            t0 = _time.perf_counter()
            await site.establish(pair[0], pair[1], nocopy)
            t1 = _time.perf_counter()
            await site.withdraw(pair[0], pair[1])
            establish_times.append(t1 - t0)
            withdraw_times.append(_time.perf_counter() - t1)

        for workers in sorted({1, min(concurrency, len(pairs))}):
            est: list[float] = []
            wdr: list[float] = []
            cycles = max(1, calls // 2)
            start = _time.perf_counter()
            queue = iter(range(cycles))

            async def worker(pair: tuple[str, str]) -> None:
                for _ in queue:
                    await cycle(pair, est, wdr)

            async with trio.open_nursery() as nursery:
                for w in range(workers):
                    nursery.start_soon(worker, pairs[w])
            elapsed = _time.perf_counter() - start
            results.append({
                "name": f"{label} establish+withdraw (2 calls)", "calls": 2 * cycles, "concurrency": workers,
                "seconds": elapsed, "per_second": 2 * cycles / elapsed,
                "mean_ms": 1000 * (sum(est) + sum(wdr)) / max(1, len(est) + len(wdr)),
                "establish_mean_ms": 1000 * sum(est) / max(1, len(est)),
                "withdraw_mean_ms": 1000 * sum(wdr) / max(1, len(wdr)),
            })

    if url is not None or os.environ.get("FLOWCOPY_SITE"):
        url, token = resolve_site(url, token_file)
        async with SiteClient(url, token, max_connections=max(concurrency, 1)) as client:
            await suite(client, "http")
        return results

    with tempfile.TemporaryDirectory(prefix="flowcopy-bench-") as tmp:
        token = secrets.token_urlsafe(16)
        async with open_site(Path(tmp) / "site", clock="wall", workloads=False) as site:
            app = build_app(site, token=token, faults=site.faults)
            async with trio.open_nursery() as nursery:
                served = await nursery.start(lambda task_status: serve_app(app, port=0, task_status=task_status))
                async with SiteClient(served, token, max_connections=max(concurrency, 1)) as client:
                    await suite(client, "http")
                await suite(site, "direct")
                nursery.cancel_scope.cancel()
            results.append({"name": "durable commits (transactions)", "calls": site.log.commits,
                            "concurrency": 0, "seconds": 0.0, "per_second": 0.0,
                            "mean_ms": 0.0, "records": site.log.records})
    return results
