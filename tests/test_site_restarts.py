"""`flowcopy chaos --site-restarts`: the served site process is SIGKILLed and restarted
while a run is in flight (its state is durable); the engine's retries ride the outages
out and every invariant holds, checked from the restarted site's own state."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.process
def test_chaos_with_two_site_restarts_keeps_every_invariant(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "flowcopy", "chaos", "--vms", "16", "--kills", "0", "--site-restarts",
                             "2", "--seed", "3", "--speed", "2", "--max-delay", "1.5", "--dir", str(tmp_path), "--json"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["site_restarts"] == 2 and report["site_restarts_survived"] == 2, report
    assert report["ok"] is True and report["problems"] == [] and report["run_state"] == "succeeded"
    assert report["units"] == 16 * report["runs"] and report["final_exit"] == 0


@pytest.mark.process
def test_default_retries_ride_out_a_site_outage_longer_than_a_restart(tmp_path: Path) -> None:
    """A plain `flowcopy run` with the default retry policy: the site is SIGKILLed while
    the run is in flight, stays down 4 s (plus its start-up), and comes back on the same port; the run
    still succeeds and verifies."""
    import time
    from urllib.parse import urlsplit

    from flowcopy.journal import Journal
    from tests.test_site_hardening import Site

    state, store = tmp_path / "site", tmp_path / "store"
    state.mkdir()
    site = Site(state)
    workflow = Path(__file__).resolve().parent.parent / "workflows" / "10-w2k-e-drive.yaml"
    assert "retry" not in workflow.read_text()  # the defaults are what is tested
    engine = subprocess.Popen([sys.executable, "-m", "flowcopy", "run", str(workflow), "--site", site.url, "--token-file",
                               str(state / "token"), "--store", str(store), "--json"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:  # until the run's units are under way
            assert engine.poll() is None and time.monotonic() < deadline, engine.communicate()
            if (store / "journal.sqlite").exists():
                try:
                    journal = Journal.open(store, lock=False)
                    try:
                        states = [u.state for r in journal.runs() for u in journal.units(r.run_id)]
                    finally:
                        journal.close()
                except Exception:  # noqa: BLE001 - the journal is being created
                    states = []
                if any(s != "pending" for s in states):
                    break
            time.sleep(0.05)
        site.proc.kill()
        site.proc.wait()
        time.sleep(4)  # down 4 s, then ~2 s to start: longer than the old 3 s of retries
        site = Site(state, "--port", str(urlsplit(site.url).port))
        out, err = engine.communicate(timeout=300)
    finally:
        if engine.poll() is None:
            engine.kill()
            engine.wait()
        site.stop()
    assert engine.returncode == 0, err[-3000:]
    summary = json.loads(out.splitlines()[-1])
    assert summary["state"] == "succeeded" and summary["verified"] is True
    assert '"retrying"' in err  # the outage was really met, and ridden out
