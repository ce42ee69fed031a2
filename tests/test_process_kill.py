"""Real processes, real SIGKILLs: `flowcopy run` against a served site, killed mid-run,
then `flowcopy resume` (killed again, several times), and the invariants of DESIGN §4
checked from the served site's own state and the journal — `flowcopy chaos`'s library.

The short runs here are what CI always does; the long one is marked slow, for by hand.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from flowcopy import chaos
from flowcopy.journal import Journal
from flowcopy.site.inventory import generate_lab_spec

pytestmark = pytest.mark.process

FLOWCOPY = [sys.executable, "-m", "flowcopy"]


@pytest.mark.parametrize("seed,error_rate", [(1, 0.0), (2, 0.05)], ids=["clean-site", "faulty-site"])
def test_sigkill_engine_mid_run_then_resume(tmp_path: Path, seed: int, error_rate: float) -> None:
    """40 VMs, 3 SIGKILLs; the faulty site fails 5% of its calls, half after acting."""
    report = trio.run(lambda: chaos.run_chaos(tmp_path, vms=40, kills=3, seed=seed, error_rate=error_rate,
                                              min_delay=0.6, max_delay=1.6))
    assert report.kills == 3
    assert report.final_exit == 0, report.output
    runs = len(report.run_states)
    assert report.verdict.problems == () and report.verdict.units == 40 * runs
    assert report.run_state == "succeeded"
    if error_rate:
        assert report.faults_injected > 5  # faults really happened
    journal = Journal.open(tmp_path / "store", lock=False)
    try:
        assert all(u.data.get("verified") is True for r in journal.runs() for u in journal.units(r.run_id))
    finally:
        journal.close()


def test_flowcopy_chaos_command_reports_json(tmp_path: Path) -> None:
    result = subprocess.run([*FLOWCOPY, "chaos", "--vms", "20", "--kills", "2", "--seed", "4", "--dir", str(tmp_path), "--json"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["ok"] is True and report["problems"] == [] and report["units"] == 20 * report["runs"]
    assert report["kills"] == 2 and report["run_state"] == "succeeded"


def test_sigterm_is_a_clean_stop_nothing_frozen_then_resume(tmp_path: Path) -> None:
    """SIGTERM to `flowcopy run` on the embedded site: exit 3, no guest frozen and no LSS
    held in the site's durable state, and `flowcopy resume` finishes the run."""
    import time

    from flowcopy.site.persist import open_site

    lab = tmp_path / "lab.json"
    lab.write_text(json.dumps(generate_lab_spec(150, 4, workloads=4)))
    wf = tmp_path / "fleet.yaml"
    wf.write_text(chaos.CHAOS_WORKFLOW)
    store = tmp_path / "store"
    proc = subprocess.Popen([*FLOWCOPY, "run", str(wf), "--store", str(store), "--lab", str(lab), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            time.sleep(0.1)
            if chaos._has_run(store):
                journal = Journal.open(store, lock=False)
                try:
                    (run,) = journal.runs()
                    states = [u.state for u in journal.units(run.run_id)]
                finally:
                    journal.close()
                if any(s not in ("pending", "preparing", "prepared") for s in states):
                    break
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 3, err[-2000:]
    assert "stopped cleanly" in err and "no guest frozen" in err

    async def site_state() -> tuple[list[str], list[object]]:
        async with open_site(store / "site", workloads=False) as site:
            frozen = [vm.name for vm in await site.list_vms() if (await site.freeze_status(vm.name)).frozen]
            return frozen, await site.frozen_lsses()

    assert trio.run(site_state) == ([], [])
    result = subprocess.run([*FLOWCOPY, "resume", "--store", str(store), "--json"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    (summary,) = json.loads(result.stdout)
    assert summary["units"] == {"succeeded": 150} and summary["verified"] is True


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(5))
def test_long_chaos_many_kills(tmp_path: Path, seed: int) -> None:
    """By hand (`pytest -m slow`): 300 VMs, 15 SIGKILLs each, on a faulty served site."""
    report = trio.run(lambda: chaos.run_chaos(tmp_path, vms=300, kills=15, seed=seed, error_rate=0.05,
                                              min_delay=0.5, max_delay=3.0))
    assert report.ok, (report.verdict.problems, report.output[-3000:])
