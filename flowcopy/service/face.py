"""The service's face, run beside the scheduler in `flowcopy serve`: metrics and status
observers, the HTTP server (when `--http`), and systemd notifications.

READY=1 is sent once the store is resumed (every run it left unfinished has been driven
to its end) and the folder is loaded; until then STATUS says so and EXTEND_TIMEOUT_USEC
keeps systemd's start timeout from killing a long resume. WATCHDOG=1 follows
$WATCHDOG_USEC while the loop runs. STOPPING=1 on a clean stop.

The address of the HTTP face is written to STORE/service.json so `flowcopy trigger` finds
the running service without being told.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

import attrs
import trio

from flowcopy.logs import get_logger
from flowcopy.service.notify import Notifier, keep_watchdog, watchdog_interval

log = get_logger("flowcopy.service")

SERVICE_FILE = "service.json"
TOKEN_FILE = "http-token"
EXTEND_EVERY = 20.0


class FaceError(Exception):
    """The HTTP face cannot be set up as asked (bad --http, unreadable token file)."""


@attrs.frozen
class FaceConfig:
    host: str | None = None
    port: int = 0
    token: str | None = None
    token_file: str | None = None
    certfile: str | None = None
    keyfile: str | None = None


def configure(store: Path, http: str | None, token_file: str | None,
              certfile: str | None = None, keyfile: str | None = None) -> FaceConfig:
    """Validate `--http` and pick the token: required off loopback (from `token_file`, else
    STORE/http-token, created 0600); on loopback only if a token file is given. Off
    loopback the face serves HTTPS only (`certfile`/`keyfile`), as the served site does:
    a bearer token never crosses the network in clear."""
    from flowcopy.service.http import is_loopback, parse_bind
    from flowcopy.site.api import SiteError
    from flowcopy.site.client import read_token

    if http is None:
        return FaceConfig()
    try:
        host, port = parse_bind(http)
    except ValueError as exc:
        raise FaceError(str(exc)) from None
    from flowcopy.site.server import InsecureBind, check_bind

    try:
        check_bind(host, certfile, keyfile)
    except InsecureBind as exc:
        raise FaceError(f"--http {http}: {exc}".replace("--certfile", "--http-certfile").replace("--keyfile", "--http-keyfile")) from None
    token: str | None = None
    if token_file is not None:
        try:
            token = read_token(token_file)
        except SiteError as exc:  # read_token says which file and why
            raise FaceError(f"--http-token-file: {exc.message}") from None
    elif not is_loopback(host):
        path = Path(store) / TOKEN_FILE
        if path.exists():
            token = read_token(path)
        else:
            Path(store).mkdir(parents=True, exist_ok=True)
            token = secrets.token_urlsafe(32)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(token + "\n")
            log.warning("generated a bearer token for the HTTP face", file=str(path))
        token_file = str(path)
    return FaceConfig(host=host, port=port, token=token, token_file=token_file, certfile=certfile, keyfile=keyfile)


class _StopNotice:
    def __init__(self, notifier: Notifier) -> None:
        self.notifier = notifier

    def on_stop(self) -> None:
        self.notifier.send("STOPPING=1", "STATUS=stopping: no new runs; freeze windows finish their release")


def make_face(config: FaceConfig, *, notifier: Notifier | None = None) -> Any:
    """The `face` argument of `scheduler.serve`: an async function of the scheduler."""

    async def face(scheduler: Any, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Started before the scheduler runs: a port that cannot be bound stops the service
        before it resumes or fires anything."""
        from flowcopy.service.metrics import ServiceMetrics
        from flowcopy.service.status import StatusBook

        note = notifier or Notifier()
        metrics = ServiceMetrics()
        metrics.watch(scheduler)
        book = StatusBook(scheduler)
        scheduler.observers.append(_StopNotice(note))
        service_file = Path(scheduler.store) / SERVICE_FILE
        wrote = False
        try:
            async with trio.open_nursery() as nursery:
                if config.host is not None:
                    from flowcopy.scheduler import ServeError
                    from flowcopy.service.http import build_app
                    from flowcopy.site.server import serve_app

                    app = build_app(scheduler, metrics, book, token=config.token)
                    try:
                        url = await nursery.start(lambda task_status: serve_app(
                            app, host=config.host, port=config.port, certfile=config.certfile, keyfile=config.keyfile,
                            task_status=task_status))
                    except* OSError as group:
                        exc = group.exceptions[0]
                        while isinstance(exc, BaseExceptionGroup):
                            exc = exc.exceptions[0]
                        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                        raise ServeError(f"--http {config.host}:{config.port}: cannot listen there: {why} "
                                         "(is another service on that port?)") from None
                    _write_service_file(service_file, _local_url(url), config.token_file, config.certfile)
                    wrote = True
                    log.info("http listening", url=url, token=bool(config.token))
                task_status.started()
                interval = watchdog_interval()
                if interval is not None and note.enabled:
                    nursery.start_soon(keep_watchdog, note, interval)
                note.send("STATUS=resuming the runs the store left unfinished")
                while not scheduler.resumed.is_set():
                    with trio.move_on_after(EXTEND_EVERY):
                        await scheduler.resumed.wait()
                    if not scheduler.resumed.is_set():
                        note.send(f"EXTEND_TIMEOUT_USEC={int(EXTEND_EVERY * 3 * 1e6)}")
                book.ready = True
                metrics.ready.set(1)
                scheduled = sum(1 for e in scheduler.entries.values() if e.workflow.schedule is not None)
                note.send("READY=1", f"STATUS=serving {len(scheduler.entries)} workflow(s), {scheduled} on a schedule",
                          f"MAINPID={os.getpid()}")
                log.info("ready", workflows=len(scheduler.entries), scheduled=scheduled)
                await trio.sleep_forever()
        finally:
            if wrote:
                _remove_service_file(service_file)
            note.close()

    return face


def _local_url(url: str) -> str:
    """A wildcard bind (0.0.0.0, ::) as an address `flowcopy trigger` on this machine can
    reach and a certificate for the loopback address matches."""
    return url.replace("://0.0.0.0:", "://127.0.0.1:").replace("://[::]:", "://[::1]:")


def _write_service_file(path: Path, url: str, token_file: str | None, certfile: str | None = None) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    info = {"url": url, "pid": os.getpid(), "token_file": token_file, "certfile": certfile}
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, path)


def _remove_service_file(path: Path) -> None:
    """Only our own: a second service on the same store would have refused to start anyway."""
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass


def read_service_file(store: Path) -> dict[str, Any]:
    path = Path(store) / SERVICE_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FaceError(f"no service is serving store {store} over HTTP ({path} does not exist): "
                        "start `flowcopy serve --http 127.0.0.1:PORT`, or give --url") from None
    except (OSError, ValueError) as exc:
        raise FaceError(f"{path}: unreadable: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("url"), str):
        raise FaceError(f"{path}: no 'url' in it")
    return data
