"""`flowcopy bench --peer dbos`: DBOS Transact and flowcopy, same workflow, same disk, one run.

DBOS is installed into a venv of its own (pip, from PyPI), never into flowcopy's: it is a
yardstick, not a dependency, and its pins must not move flowcopy's. The venv is kept
between runs in the scratch folder's parent cache (`~/.cache/flowcopy/peers/dbos` unless
FLOWCOPY_PEER_VENV says where), so only the first run pays for the install.

The figure compared is durable steps per second for the six-stage workflow (prepare,
freeze, establish, release, copy, withdraw): DBOS records one durable step per stage,
flowcopy two moves per stage (intent before, outcome after: the write-ahead rule), so
flowcopy's steps/s counts stages, not moves — the comparison favours DBOS.
This is a script for a benchmark, not a test: it needs the network once and minutes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import trio

DBOS_REQUIREMENT = "dbos>=3.4"
STAGES = 6
WORKER = Path(__file__).with_name("dbos_worker.py")


class PeerError(Exception):
    """The peer could not be installed or run; the message says which step and why."""


def venv_dir() -> Path:
    env = os.environ.get("FLOWCOPY_PEER_VENV")
    return Path(env) if env else Path.home() / ".cache" / "flowcopy" / "peers" / "dbos"


def ensure_venv(folder: Path | None = None) -> Path:
    """The peer venv's python, created and given DBOS Transact when missing."""
    folder = folder or venv_dir()
    python = folder / "bin" / "python"
    probe = [str(python), "-c", "import dbos"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    steps = [
        [sys.executable, "-m", "venv", str(folder)],
        [str(python), "-m", "pip", "install", "-q", DBOS_REQUIREMENT],
    ]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise PeerError(f"installing the DBOS peer in {folder}: `{' '.join(step)}` failed: {tail[0]}")
    return python


def run_dbos(python: Path, workflows: int, folder: Path) -> dict[str, Any]:
    db = folder / "dbos" / "system.sqlite"
    done = subprocess.run(
        [str(python), str(WORKER), "--workflows", str(workflows), "--db", str(db)],
        capture_output=True, text=True, cwd=folder,
    )
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise PeerError(f"the DBOS run failed (exit {done.returncode}): {' | '.join(tail)}")
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def run_flowcopy(workflows: int, folder: Path) -> dict[str, Any]:
    from flowcopy import bench

    run = trio.run(bench._engine_run, folder / "flowcopy", workflows)
    return {
        "workflows": workflows,
        "steps": workflows * STAGES,
        "moves": run["journal_moves"],
        "seconds": run["seconds"],
        "steps_per_s": round(workflows * STAGES / run["seconds"], 1),
        "succeeded": run["succeeded"],
        "verified": run["verified"],
    }


def compare(folder: Path, workflows: int = 1000) -> dict[str, Any]:
    """Both engines on the same disk, the same workflow count, one right after the other."""
    from flowcopy import logs

    logs.configure(level="error")
    folder.mkdir(parents=True, exist_ok=True)
    python = ensure_venv()
    version = subprocess.run([str(python), "-c", "import importlib.metadata as m; print(m.version('dbos'))"],
                             capture_output=True, text=True).stdout.strip()
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    ours = run_flowcopy(workflows, folder)
    peer = run_dbos(python, workflows, folder)
    return {
        "started": started,
        "workflow": "prepare, freeze, establish, release, copy, withdraw",
        "flowcopy": ours,
        "dbos": {**peer, "version": version},
        "ratio": round(ours["steps_per_s"] / peer["steps_per_s"], 1),
        "note": (
            "durable steps/s of the six-stage workflow; flowcopy journals two moves per step "
            "(intent and outcome) to DBOS's one, both on SQLite with synchronous=FULL on the same disk"
        ),
    }
