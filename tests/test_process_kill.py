"""Real processes, real SIGKILLs: `flowcopy run` against a served site, killed mid-run,
then `flowcopy resume` (killed again, several times), and the invariants of DESIGN §4
checked from the served site's own state and the journal.

The short run here is what CI always does; `flowcopy chaos` runs the long one by hand.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
import json

from flowcopy import chaos
from flowcopy.bench import BENCH_WORKFLOW
from flowcopy.journal import Journal
from flowcopy.site.client import connect_site
from flowcopy.site.inventory import generate_lab_spec

pytestmark = pytest.mark.process

FLOWCOPY = [sys.executable, "-m", "flowcopy"]

# the benchmark's fleet workflow (every VM's two disks, copy mode, pool targets), with a
# retry policy patient enough for a site that fails 5% of its calls
WORKFLOW = BENCH_WORKFLOW.replace("quiesce: filesystem\n", "quiesce: filesystem\nretry: {max_attempts: 10, initial_interval: 1s, max_interval: 5s}\n")
assert "max_attempts: 10" in WORKFLOW


def start_site(tmp: Path, vms: int, speed: float) -> tuple[subprocess.Popen[str], str, Path]:
    lab = tmp / "lab.yaml"
    lab.write_text(json.dumps(generate_lab_spec(vms, 4, workloads=6)))  # JSON is YAML
    state = tmp / "site"
    proc = subprocess.Popen(
        [*FLOWCOPY, "site", "serve", "--lab", str(lab), "--state", str(state), "--port", "0", "--speed", str(speed)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    for _ in range(5):
        line = proc.stdout.readline()
        match = re.search(r"listening on (http://\S+)", line)
        if match:
            return proc, match.group(1), state / "token"
    proc.kill()
    raise AssertionError("the served site did not say where it listens")


async def invariants(store: Path, url: str, token: Path) -> chaos.Verdict:
    journal = Journal.open(store, lock=False)
    try:
        async with connect_site(url, token) as site:
            return await chaos.check_invariants(journal, site)
    finally:
        journal.close()


FAULTS = {
    "seed": 3,
    "error_rate": 0.05,  # transient, half of them after the site acted (reply lost)
    "after_fraction": 0.5,
    "error_rates": {"now": 0.0, "query": 0.0, "list_vms": 0.0, "list_pools": 0.0, "get_volume": 0.0, "lun_of": 0.0},
}


@pytest.mark.parametrize("seed,faults", [(1, False), (2, True)], ids=["clean-site", "faulty-site"])
def test_sigkill_engine_mid_run_then_resume(tmp_path: Path, seed: int, faults: bool) -> None:
    site_proc, url, token = start_site(tmp_path, vms=40, speed=4.0)
    try:
        wf = tmp_path / "fleet.yaml"
        wf.write_text(WORKFLOW)
        store = tmp_path / "store"
        common = ["--site", url, "--token-file", str(token), "--store", str(store)]
        site_args = ["--site", url, "--token-file", str(token)]
        if faults:
            plan = tmp_path / "faults.json"
            plan.write_text(json.dumps(FAULTS))
            subprocess.run([*FLOWCOPY, "site", "faults", "--set", str(plan), *site_args], check=True, capture_output=True)
        kills, started, code, out = trio.run(
            lambda: chaos.kill_loop(
                [*FLOWCOPY, "run", str(wf), *common, "--json"],
                [*FLOWCOPY, "resume", *common, "--json"],
                store=store,
                kills=3,
                min_delay=0.6,
                max_delay=1.6,
                seed=seed,
            )
        )
        assert kills >= 1, "the engine finished before it could be killed: make the run longer"
        assert code == 0, out
        if faults:
            shown = subprocess.run([*FLOWCOPY, "site", "faults", *site_args], check=True, capture_output=True, text=True)
            assert sum(json.loads(shown.stdout)["injected"].values()) > 5  # faults really happened
            subprocess.run([*FLOWCOPY, "site", "faults", "--clear", *site_args], check=True, capture_output=True)
        verdict = trio.run(invariants, store, url, token)
        assert verdict.problems == ()
        assert verdict.units == 40
        journal = Journal.open(store, lock=False)
        try:
            (run,) = journal.runs()
            assert run.state == "succeeded"
            assert all(u.data.get("verified") is True for u in journal.units(run.run_id))
        finally:
            journal.close()
    finally:
        site_proc.send_signal(signal.SIGTERM)
        try:
            site_proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            site_proc.kill()


def test_sigterm_is_a_clean_stop_nothing_frozen_then_resume(tmp_path: Path) -> None:
    """SIGTERM to `flowcopy run` on the embedded site: exit 3, no guest frozen and no LSS
    held in the site's durable state, and `flowcopy resume` finishes the run."""
    import time

    from flowcopy.site.persist import open_site

    lab = tmp_path / "lab.json"
    lab.write_text(json.dumps(generate_lab_spec(150, 4, workloads=4)))
    wf = tmp_path / "fleet.yaml"
    wf.write_text(WORKFLOW)
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
    site_proc, url, token = start_site(tmp_path, vms=300, speed=4.0)
    try:
        wf = tmp_path / "fleet.yaml"
        wf.write_text(WORKFLOW)
        store = tmp_path / "store"
        common = ["--site", url, "--token-file", str(token), "--store", str(store)]
        plan = tmp_path / "faults.json"
        plan.write_text(json.dumps({**FAULTS, "seed": seed}))
        site_args = ["--site", url, "--token-file", str(token)]
        subprocess.run([*FLOWCOPY, "site", "faults", "--set", str(plan), *site_args], check=True, capture_output=True)
        kills, _, code, out = trio.run(
            lambda: chaos.kill_loop(
                [*FLOWCOPY, "run", str(wf), *common, "--json"],
                [*FLOWCOPY, "resume", *common, "--json"],
                store=store, kills=15, min_delay=0.5, max_delay=3.0, seed=seed,
            )
        )
        subprocess.run([*FLOWCOPY, "site", "faults", "--clear", *site_args], check=True, capture_output=True)
        assert code == 0, out
        verdict = trio.run(invariants, store, url, token)
        assert verdict.problems == () and verdict.units == 300
    finally:
        site_proc.send_signal(signal.SIGTERM)
        try:
            site_proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            site_proc.kill()
