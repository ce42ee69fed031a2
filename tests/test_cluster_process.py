"""Acceptance for several engines on one PostgreSQL journal, with real processes.

* 3 `flowcopy serve` engine processes, one served site, one run of a fleet of VMs: one
  engine SIGKILLed, another SIGSTOPped for 2.5 lease periods then SIGCONTed. Short form
  here (CI); the long form (600 VMs) with `-m slow`.
* 2 `flowcopy serve` on one journal with an every-minute schedule at --speed: every slot
  dealt with exactly once across both; one SIGKILLed, the other goes on firing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trio

from flowcopy.chaos import CHAOS_WORKFLOW, ServedSite
from flowcopy.cluster_chaos import ClusterReport, report_text, run_cluster_chaos
from flowcopy.journal import Journal, JournalError, JournalNotFound
from flowcopy.site.inventory import generate_lab_spec
from tests.service_process import wait_for


def _assert_cluster(report: ClusterReport) -> None:
    text = report_text(report)
    print(text, "\n", report.to_json())  # the long form's figures (pytest -s)
    assert report.verdict.ok, text  # DESIGN §4: nothing stuck, lost, leaked, frozen, inconsistent, invalid
    assert report.run_state == "succeeded", text
    assert not report.problems, text  # includes: every engine did a share
    assert len(report.shares) == 3 and all(n > 0 for n in report.shares.values()), text
    assert report.killed is not None and report.takeover_s is not None, text  # its units were taken over
    assert report.stopped is not None and report.taken_over >= 1, text
    assert report.writes_after_takeover == 0, text  # fencing: nothing of a taken-over unit written by it
    assert report.fences_admitted_by_site > 0, text  # the engines' unit calls carried their fence


@pytest.mark.process
def test_three_engines_one_killed_one_paused_short(pg_url: str, tmp_path: Path) -> None:
    report = trio.run(lambda: run_cluster_chaos(tmp_path, pg_url, vms=60, engines=3, lease=4.0, stop_for=1.6))
    _assert_cluster(report)


@pytest.mark.process
def test_a_paused_engine_is_refused_by_the_site_itself(pg_url: str, tmp_path: Path) -> None:
    """The engines do not check their own lease clock (as if each call were made just
    before a pause): the SIGSTOPped engine wakes past its lease and its site calls of
    taken-over units are refused by the site's fence; nothing it does lands."""
    report = trio.run(lambda: run_cluster_chaos(tmp_path, pg_url, vms=30, engines=2, lease=4.0, stop_for=1.6,
                                                kill=False, site_fence_only=True))
    text = report_text(report)
    assert report.verdict.ok and report.run_state == "succeeded" and not report.problems, text
    assert report.stopped is not None and report.taken_over >= 1, text
    assert report.side_effects_refused == 0, text  # the engine checked nothing itself...
    assert report.stopped_refused_by_site >= 1, text  # ...the site refused its stale calls
    assert report.fences_refused_by_site >= report.stopped_refused_by_site, text
    assert report.writes_after_takeover == 0, text


@pytest.mark.slow
@pytest.mark.process
def test_three_engines_one_killed_one_paused_600_vms(pg_url: str, tmp_path: Path) -> None:
    # a 15 s lease: with 200 units each, an engine starved of CPU on a shared 2-core machine
    # (load 15-20) renews a 5 s lease too late and its units churn between engines
    report = trio.run(lambda: run_cluster_chaos(tmp_path, pg_url, vms=600, engines=3, lease=15.0, timeout=3600))
    _assert_cluster(report)


SCHEDULED = CHAOS_WORKFLOW.replace("name: chaos\n", 'name: every-minute\nschedule: {cron: "* * * * *", overlap: skip}\n')


@pytest.mark.process
def test_two_services_fire_every_slot_once_and_survive_one_kill(pg_url: str, tmp_path: Path) -> None:
    site = ServedSite(tmp_path, generate_lab_spec(2, 2, workloads=1), 4.0)
    folder = tmp_path / "workflows"
    folder.mkdir()
    (folder / "every-minute.yaml").write_text(SCHEDULED)
    procs = []
    try:
        for i in range(2):
            local = tmp_path / f"svc-{i}"
            local.mkdir()
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "flowcopy", "serve", str(folder), "--store", pg_url, "--site", site.url,
                 "--token-file", str(site.token), "--speed", "30"],
                stdout=subprocess.DEVNULL, stderr=open(tmp_path / f"svc-{i}.log", "wb"),
                env={**os.environ, "FLOWCOPY_LOCAL": str(local), "FLOWCOPY_LEASE": "4"},
            ))
            time.sleep(0.7)  # the second starts later: its cron clock must agree anyway

        alive = list(enumerate(procs))

        def journal_slots() -> tuple[list[dict[str, Any]], dict[int, str]]:
            for i, proc in alive:
                assert proc.poll() is None, (tmp_path / f"svc-{i}.log").read_text()[-2000:]
            try:
                with Journal.open(pg_url, lock=False) as journal:
                    return journal.slots("every-minute"), {e.pid: e.engine_id for e in journal.engines()}
            except JournalNotFound:  # the first service has not created it yet
                return [], {}

        def dealers() -> list[int]:  # a cron minute is 2 s at --speed 30
            slots, engines = journal_slots()
            dealt = [i for i, proc in enumerate(procs) if any(s["engine"] == engines.get(proc.pid) for s in slots)]
            return dealt if len(slots) >= 2 else []

        # the one killed is one that dealt with slots (whichever wins the races of the first
        # slots tends to win them all), so both services are seen dealing with slots
        victim = wait_for(dealers, 120, "two slots dealt with", interval=0.3)[0]
        survivor = procs[1 - victim]
        procs[victim].send_signal(signal.SIGKILL)
        procs[victim].wait()
        killed_at = time.time()
        alive = [(1 - victim, survivor)]  # still checked alive at every poll

        def survivor_went_on() -> bool:
            slots, engines = journal_slots()
            return any(s["decided"] > killed_at + 1 and s["engine"] == engines.get(survivor.pid) for s in slots)

        wait_for(survivor_went_on, 120, "a slot dealt with by the survivor after the kill", interval=0.3)
        survivor.send_signal(signal.SIGTERM)
        survivor.wait(timeout=60)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        site.close()
    with Journal.open(pg_url, lock=False) as journal:
        slots = journal.slots("every-minute")
        runs = journal.runs("every-minute")
    times = [datetime.fromisoformat(s["slot"]) for s in slots]
    assert len(times) >= 3, slots
    # every minute between the first and the last slot dealt with exactly once (the key is unique)
    assert times == [times[0] + timedelta(minutes=i) for i in range(len(times))], [t.isoformat() for t in times]
    fired = [s for s in slots if s["outcome"] == "fire"]
    # at most one run per fired slot (a slot fired by the killed service, or whose planning
    # met the previous run's targets, may have none), never two
    assert 1 <= len(runs) <= len(fired), (len(runs), slots)
    # the survivor went on after the kill: slots dealt with after it, by the survivor
    later = [s for s in slots if s["decided"] > killed_at + 1]
    assert later and {s["engine"] for s in later} != {None}, slots
    assert len({s["engine"] for s in slots}) == 2, "both services dealt with slots"


@pytest.mark.process
def test_restarted_service_at_speed_fires_no_slot_twice(tmp_path: Path) -> None:
    """Issue 9.7 on the embedded SQLite store: `serve --speed 60` SIGKILLed and started
    again goes on from the last slot it dealt with; no slot runs twice."""
    folder, store = tmp_path / "wf", tmp_path / "store"
    folder.mkdir()
    (folder / "w.yaml").write_text(
        (Path(__file__).resolve().parent.parent / "workflows" / "10-w2k-e-drive.yaml").read_text()
        + '\nschedule: {cron: "* * * * *", overlap: skip}\n')
    argv = [sys.executable, "-m", "flowcopy", "serve", str(folder), "--store", str(store), "--speed", "60"]
    env = {**os.environ, "FLOWCOPY_SITE": ""}

    def slots_dealt() -> int:
        if not (store / "journal.sqlite").exists():
            return 0
        try:
            with Journal.open(store, lock=False) as journal:
                return len(journal.slots("w2k-e-drive"))
        except JournalError:  # the journal is being created
            return 0

    seen = 0
    for life in ("first", "restarted"):
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        try:
            # a cron minute is 1 s at --speed 60: killed once it has dealt with two slots of its own
            wait_for(lambda: proc.poll() is None and slots_dealt() >= seen + 2, 120, f"the {life} service's slots",
                     interval=0.2)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        seen = slots_dealt()
    with Journal.open(store, lock=False) as journal:
        slots = journal.slots("w2k-e-drive")
        runs = journal.runs("w2k-e-drive")
    times = [datetime.fromisoformat(s["slot"]) for s in slots]
    assert len(times) >= 3, slots
    assert times == [times[0] + timedelta(minutes=i) for i in range(len(times))], [t.isoformat() for t in times]
    assert 1 <= len(runs) <= len([s for s in slots if s["outcome"] == "fire"]), (len(runs), slots)
