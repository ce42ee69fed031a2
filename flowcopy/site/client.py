"""The `Site` interface over HTTP: what the engine uses for `--site URL`.

Every method maps to one request of `server`'s API and returns the same values, or
raises the same `api` error type the in-process site raises (rebuilt from the JSON
error's `kind`). What only a network can do gets its own type: a refused or lost
connection, or no answer within the timeout, is `SiteUnavailable` (transient) — for a
mutating call that means "unknown whether it happened", which is exactly what the
engine's reconciliation is for.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

import httpx

from flowcopy.site import api, codec
from flowcopy.site.faults import FaultPlan
from flowcopy.site.fencing import HEADER as FENCE_HEADER, header_value

DEFAULT_TIMEOUT = 30.0
DEFAULT_WRITE_TIMEOUT = 300.0
"""A host write waits out a frozen LSS (up to the ELB timeout, 120 s at speed 1)."""

ENV_SITE = "FLOWCOPY_SITE"
ENV_TOKEN_FILE = "FLOWCOPY_SITE_TOKEN_FILE"


def _q(part: str) -> str:
    return quote(part, safe="")


class SiteClient:
    """A served site, as an `api.Site`. Use `async with SiteClient(...)`, or `aclose()`."""

    def __init__(
        self,
        url: str,
        token: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        write_timeout: float = DEFAULT_WRITE_TIMEOUT,
        max_connections: int = 32,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if not token or token != token.strip():
            raise api.BadRequest("a site token must be non-empty text without surrounding blanks")
        self.url = url.rstrip("/")
        self._timeout = timeout
        self._write_timeout = write_timeout
        self._http = httpx.AsyncClient(
            base_url=self.url + "/api/v1",
            headers={"Authorization": f"Bearer {token}"},
            # waiting for a pooled connection is not the site being slow: no pool timeout
            timeout=httpx.Timeout(timeout, pool=None),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            transport=transport,
        )

    async def __aenter__(self) -> SiteClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # ---- plumbing

    async def _request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | list[tuple[str, Any]] | None = None,
        body: object = None,
        content: bytes | None = None,
        timeout: float | None = None,
    ) -> httpx.Response:
        kwargs: dict[str, Any] = {}
        headers: dict[str, str] = {}
        if body is not None:
            kwargs["content"] = codec.dumps(body)
            headers["Content-Type"] = "application/json"
        elif content is not None:
            kwargs["content"] = content
            headers["Content-Type"] = "application/octet-stream"
        fences = api.current_fences()
        if fences:  # the site admits the call by them (`api.fenced`)
            headers[FENCE_HEADER] = header_value(fences)
        if headers:
            kwargs["headers"] = headers
        if timeout is not None:
            kwargs["timeout"] = httpx.Timeout(timeout, pool=None)
        try:
            response = await self._http.request(method, path, params=params, **kwargs)
        except httpx.TimeoutException:
            raise api.SiteUnavailable(
                f"the site at {self.url} did not answer {method} {path} within "
                f"{timeout or self._timeout:g} s",
                url=self.url,
            ) from None
        except httpx.TransportError as exc:
            raise api.SiteUnavailable(
                f"cannot reach the site at {self.url} ({method} {path}): {_reason(exc)}",
                url=self.url,
            ) from None
        if response.status_code >= 400:
            raise self._error(response)
        return response

    def _error(self, response: httpx.Response) -> api.SiteError:
        try:
            data = response.json()
        except ValueError:
            data = None
        if isinstance(data, dict) and "kind" in data:
            return api.error_from_dict(data)
        what = f"the site at {self.url} answered HTTP {response.status_code} to {response.request.method} {response.url.path}"
        if response.status_code == 401:
            return api.Unauthorized(what)
        if response.status_code >= 500:
            return api.SiteUnavailable(what, url=self.url)
        return api.SiteError(what)

    async def _get(self, path: str, cls: Any, **kwargs: Any) -> Any:
        return self._decode(await self._request("GET", path, **kwargs), cls)

    async def _post(self, path: str, cls: Any, body: object = None, **kwargs: Any) -> Any:
        return self._decode(await self._request("POST", path, body=body if body is not None else {}, **kwargs), cls)

    def _decode(self, response: httpx.Response, cls: Any) -> Any:
        if cls is None:
            return None
        try:
            return codec.converter.structure(response.json(), cls)
        except Exception as exc:  # noqa: BLE001 - a server of another version: say so
            raise api.SiteError(
                f"unexpected answer from the site at {self.url} to {response.request.method} "
                f"{response.url.path}: {codec.describe_error(exc)}"
            ) from None

    # ---- clock

    async def now(self) -> float:
        return float((await self._request("GET", "/time")).json()["now"])

    async def fence_report(self) -> dict[str, int]:
        """The site's fence book: keys it holds a mark for, fenced calls admitted and refused."""
        return dict((await self._request("GET", "/fences")).json())

    # ---- inventory

    async def list_hosts(self) -> list[api.HostInfo]:
        return await self._get("/hosts", list[api.HostInfo])

    async def list_vms(self, labels: Mapping[str, str] | None = None) -> list[api.VMInfo]:
        params = [("label", f"{k}={v}") for k, v in (labels or {}).items()]
        return await self._get("/vms", list[api.VMInfo], params=params)

    async def get_vm(self, name: str) -> api.VMInfo:
        return await self._get(f"/vms/{_q(name)}", api.VMInfo)

    async def lun_of(self, vm: str, disk: str) -> api.DiskInfo:
        return await self._get(f"/vms/{_q(vm)}/lun", api.DiskInfo, params={"disk": disk})

    async def list_disks(self, host: str) -> list[api.HostDisk]:
        return await self._get(f"/hosts/{_q(host)}/disks", list[api.HostDisk])

    async def prime(self, host: str) -> list[api.HostDisk]:
        return await self._post(f"/hosts/{_q(host)}/prime", list[api.HostDisk])

    async def list_volumes(self) -> list[api.VolumeInfo]:
        return await self._get("/volumes", list[api.VolumeInfo])

    async def list_pools(self) -> dict[str, tuple[str, ...]]:
        return await self._get("/pools", dict[str, tuple[str, ...]])

    async def get_volume(self, serial: str) -> api.VolumeInfo:
        return await self._get(f"/volumes/{_q(serial)}", api.VolumeInfo)

    # ---- guests

    async def quiesce(self, vm: str, level: api.QuiesceLevel, timeout: float) -> api.FreezeTicket:
        body = codec.QuiesceRequest(level=api.QuiesceLevel(level), timeout=timeout)
        return await self._post(f"/vms/{_q(vm)}/quiesce", api.FreezeTicket, body)

    async def thaw(self, vm: str) -> api.ThawResult:
        return await self._post(f"/vms/{_q(vm)}/thaw", api.ThawResult)

    async def freeze_status(self, vm: str) -> api.FreezeStatus:
        return await self._get(f"/vms/{_q(vm)}/freeze", api.FreezeStatus)

    async def power_on(self, vm: str) -> None:
        await self._request("POST", f"/vms/{_q(vm)}/power-on", body={})

    async def power_off(self, vm: str) -> None:
        await self._request("POST", f"/vms/{_q(vm)}/power-off", body={})

    async def reboot(self, vm: str) -> None:
        await self._request("POST", f"/vms/{_q(vm)}/reboot", body={})

    # ---- FlashCopy

    async def establish(self, source: str, target: str, options: api.FlashOptions) -> api.RelationshipInfo:
        body = codec.EstablishRequest(source=source, target=target, options=options)
        return await self._post("/flashcopies", api.RelationshipInfo, body)

    async def withdraw(self, source: str, target: str, *, after_copy: bool = False,
                       release_space: bool = False) -> None:
        params = {"after_copy": "true"} if after_copy else {}
        if release_space:
            params["release_space"] = "true"
        await self._request("DELETE", f"/flashcopies/{_q(source)}:{_q(target)}", params=params)

    async def resync(
        self, source: str, target: str, *, freeze: bool = False, tag: str | None = None,
        options: api.FlashOptions | None = None,
    ) -> api.RelationshipInfo:
        body = codec.ResyncRequest(freeze=freeze, tag=tag, options=options)
        return await self._post(f"/flashcopies/{_q(source)}:{_q(target)}/resync", api.RelationshipInfo, body)

    async def reverse(self, source: str, target: str, *, tag: str | None = None, fast: bool = False) -> api.RelationshipInfo:
        body = codec.ReverseRequest(tag=tag, fast=fast)
        return await self._post(f"/flashcopies/{_q(source)}:{_q(target)}/reverse", api.RelationshipInfo, body)

    async def query(self, *, volume: str | None = None, tag: str | None = None) -> list[api.RelationshipInfo]:
        params = {k: v for k, v in (("volume", volume), ("tag", tag)) if v is not None}
        return await self._get("/flashcopies", list[api.RelationshipInfo], params=params)

    async def unfreeze(self, lsses: Sequence[str]) -> list[api.LssRelease]:
        body = codec.UnfreezeRequest(lsses=tuple(lsses))
        return await self._post("/consistency-groups/unfreeze", list[api.LssRelease], body)

    async def frozen_lsses(self) -> list[api.LssFreeze]:
        return await self._get("/consistency-groups", list[api.LssFreeze])

    async def hold_history(self) -> list[api.SourceHold]:
        return await self._get("/consistency-groups/holds", list[api.SourceHold])

    async def list_lsses(self) -> list[api.LssInfo]:
        return await self._get("/lsses", list[api.LssInfo])

    async def list_space_pools(self) -> list[api.SpacePool]:
        return await self._get("/space-pools", list[api.SpacePool])

    async def set_elb_timeout(self, lss: str, seconds: float) -> api.LssInfo:
        return await self._post(f"/lsses/{_q(lss)}", api.LssInfo, codec.ElbTimeoutRequest(seconds=seconds))

    async def save_task(self, task: api.SavedTask) -> None:
        await self._request("POST", "/tasks", body=task)

    async def list_tasks(self) -> list[api.SavedTask]:
        return await self._get("/tasks", list[api.SavedTask])

    async def execute_task(self, name: str, *, tag: str | None = None) -> list[api.RelationshipInfo]:
        body = codec.ExecuteTaskRequest(tag=tag)
        return await self._post(f"/tasks/{_q(name)}/execute", list[api.RelationshipInfo], body)

    # ---- data

    async def read(self, serial: str, offset: int, length: int) -> bytes:
        response = await self._request(
            "GET", f"/volumes/{_q(serial)}/data", params={"offset": offset, "length": length}
        )
        return response.content

    async def write(self, serial: str, offset: int, data: bytes) -> None:
        await self._request(
            "PUT",
            f"/volumes/{_q(serial)}/data",
            params={"offset": offset},
            content=bytes(data),
            timeout=self._write_timeout,
        )

    async def extents(self, serial: str) -> list[api.Extent]:
        return await self._get(f"/volumes/{_q(serial)}/extents", list[api.Extent])

    async def check(self, serials: Sequence[str]) -> api.CheckReport:
        return await self._post("/check", api.CheckReport, codec.CheckRequest(serials=tuple(serials)))

    async def mount_check(self, vm: str, disks: Sequence[str]) -> api.CheckReport:
        body = codec.MountCheckRequest(disks=tuple(disks))
        return await self._post(f"/vms/{_q(vm)}/mount-check", api.CheckReport, body)

    # ---- beyond the Site interface: admin and chaos

    async def get_relationship(self, source: str, target: str) -> api.RelationshipInfo:
        return await self._get(f"/flashcopies/{_q(source)}:{_q(target)}", api.RelationshipInfo)

    async def fault_report(self) -> dict[str, Any]:
        """The plan in force and how many faults it injected per operation so far."""
        return dict((await self._request("GET", "/faults")).json())

    async def get_faults(self) -> FaultPlan:
        return codec.converter.structure((await self._request("GET", "/faults")).json()["plan"], FaultPlan)

    async def set_faults(self, plan: FaultPlan, *, absolute: bool = False) -> FaultPlan:
        """Install a fault plan; its windows count from the site's now unless `absolute`."""
        response = await self._request(
            "POST", "/faults", body=plan, params={"absolute": "true"} if absolute else None
        )
        return codec.converter.structure(response.json()["plan"], FaultPlan)

    async def clear_faults(self) -> None:
        await self._request("DELETE", "/faults")


def _reason(exc: BaseException) -> str:
    """The first cause that says something (httpx's own errors are often empty), with what
    to do when it is the site's TLS certificate the client does not trust."""
    seen: BaseException | None = exc
    text = ""
    while seen is not None and not text:
        text = str(seen).strip()
        seen = seen.__cause__ or seen.__context__
    text = text or type(exc).__name__
    if "CERTIFICATE_VERIFY_FAILED" in text:
        text += " (trust the site's certificate: SSL_CERT_FILE=FILE with its certificate or CA, PEM)"
    return text


def read_token(path: str | Path) -> str:
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise api.BadRequest(f"cannot read the token file {path}: {exc.strerror}") from None
    if not token:
        raise api.BadRequest(f"the token file {path} is empty")
    if any(c.isspace() or not c.isprintable() for c in token) or not token.isascii():
        raise api.BadRequest(f"the token file {path} does not hold a bearer token (one word of printable ASCII)")
    return token


def resolve_site(url: str | None, token_file: str | Path | None) -> tuple[str, str]:
    """URL and token from the arguments or FLOWCOPY_SITE / FLOWCOPY_SITE_TOKEN_FILE."""
    url = url or os.environ.get(ENV_SITE)
    if not url:
        raise api.BadRequest(f"no site given: pass --site URL or set {ENV_SITE}")
    token_file = token_file or os.environ.get(ENV_TOKEN_FILE)
    if not token_file:
        raise api.BadRequest(
            f"the site at {url} needs its bearer token: pass --token-file FILE or set {ENV_TOKEN_FILE}"
        )
    return url, read_token(token_file)


@asynccontextmanager
async def connect_site(
    url: str | None, token_file: str | Path | None = None, *, timeout: float = DEFAULT_TIMEOUT
) -> AsyncIterator[SiteClient]:
    """A `SiteClient` for `url` (or $FLOWCOPY_SITE) with the token in `token_file`, closed on exit."""
    url, token = resolve_site(url, token_file)
    async with SiteClient(url, token, timeout=timeout) as client:
        yield client
