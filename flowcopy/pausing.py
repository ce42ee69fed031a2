"""Which workflows are paused: `STORE/scheduler.json`, read by the service at each fire.

Written atomically (temp file + rename) under a lock by `flowcopy pause/unpause`; read
by `flowcopy serve`, `status` and the service's pages. Light on imports on purpose:
`flowcopy status` reads it and must start fast.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
from pathlib import Path

STATE_FILE = "scheduler.json"


class PauseStateError(Exception):
    """The scheduler's state file cannot be read or written."""


def _state_path(store: Path) -> Path:
    return Path(store) / STATE_FILE


def read_paused(store: Path) -> frozenset[str]:
    """Names of paused workflows (none if the file does not exist)."""
    path = _state_path(store)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return frozenset()
    except (OSError, ValueError) as exc:
        raise PauseStateError(f"{path}: unreadable scheduler state: {exc}") from None
    paused = data.get("paused", []) if isinstance(data, dict) else None
    if not isinstance(paused, list) or not all(isinstance(n, str) for n in paused):
        raise PauseStateError(f"{path}: 'paused' must be a list of workflow names")
    return frozenset(paused)


def set_paused(store: Path, name: str, paused: bool) -> bool:
    """Pause or unpause `name`; True if that changed anything. Written atomically (temp +
    rename) under a lock, so a running service never reads half a file and two admins
    pausing at once do not lose each other's change."""
    store = Path(store)
    store.mkdir(parents=True, exist_ok=True)
    path = _state_path(store)
    with open(store / (STATE_FILE + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        current = set(read_paused(store))
        changed = (name in current) != paused
        if not changed:
            return False
        if paused:
            current.add(name)
        else:
            current.discard(name)
        fd, tmp = tempfile.mkstemp(prefix=".scheduler-", suffix=".json", dir=store)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"paused": sorted(current)}, f, indent=2)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return True
