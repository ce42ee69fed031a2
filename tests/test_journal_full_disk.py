"""The journal's disk fills up in the middle of a freeze window (a real, small tmpfs under
the store, filled by the test): the engine still thaws every guest and unfreezes every
LSS it holds — no journal write needed — then stops with one line and exit 2; once
space is back, `flowcopy resume` finishes the run."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from flowcopy.journal import Journal
from tests.test_site_hardening import Site

WORKFLOWS = Path(__file__).resolve().parent.parent / "workflows"
SQL = WORKFLOWS / "20-sql-consistency-group.yaml"  # two LUNs on LSS 13 and 14: one consistency group
VM = "rich-w2k-os-1"
FREEZE_TIMEOUT = 20.0  # the workflow's; the guest would thaw itself after this


@pytest.fixture
def small_store(tmp_path: Path) -> Iterator[Path]:
    """A store on its own 8 MiB tmpfs (real ENOSPC), unmounted afterwards."""
    store = tmp_path / "store"
    store.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0700", "tmpfs", str(store)], check=True,
                   capture_output=True)  # root in CI: a failure here is loud, not a skip
    try:
        yield store
    finally:
        if subprocess.run(["umount", str(store)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(store)], check=True, capture_output=True)


def fill(folder: Path) -> Path:
    """Write until the file system refuses even one more byte."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as f:
        for size in (1 << 20, 4096, 1):
            while True:
                try:
                    f.write(b"\0" * size)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    break
    return filler


@pytest.mark.process
def test_a_full_disk_mid_freeze_window_releases_every_freeze_then_resume_finishes(tmp_path: Path,
                                                                                   small_store: Path) -> None:
    state = tmp_path / "site"
    state.mkdir()
    site = Site(state)
    try:
        api = httpx.Client(base_url=site.url + "/api/v1", headers={"Authorization": f"Bearer {site.token}"}, timeout=60)
        # the check of the guests' freezes right after establish takes 3 s: the window stays open
        plan = {"latency": {"distribution": "fixed", "mean": 3.0, "operations": ["freeze_status"]}}
        assert api.post("/faults", params={"absolute": "true"}, json=plan).status_code == 200
        common = ["--site", site.url, "--token-file", str(state / "token"), "--store", str(small_store), "--json"]
        engine = subprocess.Popen([sys.executable, "-m", "flowcopy", "run", str(SQL), *common],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 60
            while not api.get("/consistency-groups").json():  # the array holds the group's LSSs
                assert engine.poll() is None, engine.communicate()
                assert time.monotonic() < deadline, "the consistency group was never frozen"
                time.sleep(0.05)
            assert api.get(f"/vms/{VM}/freeze").json()["frozen"] is True
            filled = time.monotonic()
            filler = fill(small_store)
            out, err = engine.communicate(timeout=120)
        finally:
            if engine.poll() is None:
                engine.kill()
                engine.wait()
        released_within = time.monotonic() - filled
        assert engine.returncode == 2, err[-3000:]
        # nothing held: not by the guest's own timeout or the ELB timeout (both far off), by the engine
        assert released_within < FREEZE_TIMEOUT, f"{released_within:.1f} s: too late to tell who thawed"
        assert api.get("/consistency-groups").json() == []
        status = api.get(f"/vms/{VM}/freeze").json()
        assert status["frozen"] is False, status
        assert "Traceback" not in err
        (line,) = [x for x in err.splitlines() if not x.startswith("{")]
        assert line.startswith("flowcopy: journal ") and "database or disk is full" in line, line
        assert "thawing every guest and unfreezing every consistency group" in line and "flowcopy resume" in line
        logged = [json.loads(x) for x in err.splitlines() if x.startswith("{")]
        assert any(x["event"] == "released without a journal write" for x in logged)
        # space back: resume reconciles from the last durable state and finishes
        filler.unlink()
        assert api.delete("/faults").status_code == 200
        resumed = subprocess.run([sys.executable, "-m", "flowcopy", "resume", *common], capture_output=True,
                                 text=True, timeout=300)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        journal = Journal.open(small_store, lock=False)
        try:
            (run,) = journal.runs()
            units = journal.units(run.run_id)
            assert run.state == "succeeded" and all(u.state == "succeeded" and u.data.get("verified") for u in units)
        finally:
            journal.close()
        assert api.get("/consistency-groups").json() == [] and not api.get(f"/vms/{VM}/freeze").json()["frozen"]
    finally:
        site.stop()
