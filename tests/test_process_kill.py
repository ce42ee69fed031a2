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

# the benchmark's fleet workflow: every VM's two disks, copy mode, pool targets
WORKFLOW = BENCH_WORKFLOW


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
