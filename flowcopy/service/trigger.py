"""`flowcopy trigger NAME`: ask the running service to fire a workflow now, over its HTTP
face (found through STORE/service.json, or --url), so the run is the service's own: one
engine per store, its overlap policy, its metrics and status page."""

from __future__ import annotations

import os
import ssl
from pathlib import Path
from typing import Any

import httpx

from flowcopy.service.face import FaceError, read_service_file


def trigger(store: Path, name: str, *, url: str | None = None, token_file: str | None = None) -> tuple[int, str]:
    """(exit code, one line): 0 fired or queued, 1 refused by the service, 2 cannot ask."""
    from flowcopy.site.api import SiteError
    from flowcopy.site.client import read_token

    verify: Any = True
    try:
        if url is None:
            info = read_service_file(store)
            url = info["url"]
            token_file = token_file or info.get("token_file")
            if info.get("certfile"):  # the service's own certificate (self-signed is common)
                verify = ssl.create_default_context(cafile=info["certfile"])
        token = read_token(token_file) if token_file else None
    except FaceError as exc:
        return 2, str(exc)
    except SiteError as exc:
        return 2, exc.message
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    target = f"{url.rstrip('/')}/api/trigger/{name}"
    try:
        reply = httpx.post(target, headers=headers, timeout=30.0, trust_env=False, verify=verify)
    except httpx.HTTPError as exc:
        return 2, f"no answer from the service at {url}: {exc}; is `flowcopy serve --http` running (pid file {os.fspath(store)}/service.json)?"
    try:
        body = reply.json()
    except ValueError:
        body = {}
    if reply.status_code == 202:
        verb = "queued" if body.get("action") == "queue" else "fired"
        return 0, f"{name} {verb} at {body.get('at')}: {body.get('reason')}; follow it with `flowcopy status`"
    if reply.status_code == 401:
        return 2, f"the service at {url} refused the token: {body.get('message', 'unauthorized')} (--token-file)"
    if reply.status_code in (404, 409):
        return 1, f"{name} not fired: {body.get('reason', reply.text)}"
    return 2, f"the service at {url} answered {reply.status_code}: {reply.text[:200]}"
