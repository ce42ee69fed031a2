"""A real `flowcopy serve --http` child process for the service tests, and the workflows
they serve (on the seed's embedded lab)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

MIXED = """\
name: mixed
description: the E drive checked on the second guest, and rhel3-db1 copied in the background
schedule:
  cron: "0 3 * * *"
  timezone: Europe/Berlin
  overlap: skip
units:
  - vm: rich-w2k-os-1
    quiesce: filesystem
    disks:
      - disk: Disk1
        target: {vm: RICH-W2K-OS-2, disk: Disk1}
    copy: {action: mount_check, vm: RICH-W2K-OS-2}
  - vm: rhel3-db1
    mode: copy
    quiesce: filesystem
    disks:
      - disk: Disk1
        target: {pool: spare-256m}
    copy: {action: wait}
  - vm: sles8-db1
    mode: nocopy
    quiesce: filesystem
    disks:
      - disk: Disk1
        target: {pool: spare-256m}
    copy: {action: export, to: exports, host: backup-proxy}
"""
"""Three units ending at different times: a mount check (about a second), an export of a
nocopy snapshot to image files, and a 256 MiB background copy waited for (~5 s), so a
watcher sees the units per state change while the run is in flight."""

QUICK = """\
name: quick
description: the E drive checked on the second guest (about a second)
units:
  - vm: rich-w2k-os-1
    quiesce: filesystem
    disks:
      - disk: Disk1
        target: {vm: RICH-W2K-OS-2, disk: Disk1}
    copy: {action: mount_check, vm: RICH-W2K-OS-2}
"""

VMFS = """\
name: vmfs-system-disk
description: points at a system disk on the shared VMFS LUN, which FlashCopy cannot copy
units:
  - vm: sles9-db1
    quiesce: filesystem
    disks:
      - disk: Disk0
        target: {pool: spare-256m}
    copy: {action: wait}
"""


def write_folder(folder: Path, *texts: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(texts):
        (folder / f"{i:02d}.yaml").write_text(text)
    return folder


class Serve:
    """`python -m flowcopy serve FOLDER --store STORE --http HOST:0`; the URL from the
    service file it writes once its HTTP face listens."""

    def __init__(self, folder: Path, store: Path, log: Path, *, http: str = "127.0.0.1:0",
                 env: dict[str, str] | None = None, extra: tuple[str, ...] = ()) -> None:
        self.store = store
        self.log = log
        base = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "flowcopy", "serve", str(folder), "--store", str(store), "--http", http, *extra],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=open(log, "w"),
            env={**base, "FLOWCOPY_SITE": "", **(env or {})},
        )
        self.url = ""
        self.verify: Any = True  # an ssl context trusting the face's own certificate, for HTTPS

    def wait_url(self, timeout: float = 60.0) -> str:
        path = self.store / "service.json"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"flowcopy serve exited early: {self.log.read_text()[-2000:]}"
            try:
                info = json.loads(path.read_text())
                if info.get("pid") == self.proc.pid:
                    self.url = info["url"]
                    return self.url
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        raise AssertionError(f"no service.json from the service within {timeout} s: {self.log.read_text()[-2000:]}")

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return httpx.get(self.url + path, timeout=30.0, trust_env=False, verify=self.verify, **kw)

    def trigger(self, name: str, **kw: Any) -> httpx.Response:
        """What `flowcopy trigger` sends, without starting a Python for it."""
        return httpx.post(f"{self.url}/api/trigger/{name}", timeout=30.0, trust_env=False, verify=self.verify, **kw)

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll `predicate` until it returns something truthy (robust to a loaded machine)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def flowcopy(*args: str, store: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "flowcopy", *args, "--store", str(store)], capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL,
                          env={**os.environ, "FLOWCOPY_SITE": ""})
