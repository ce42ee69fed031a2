"""The service: the pure decision core table by table, then the trio shell on MockClock
against the in-process lab, with cron time moving with trio's clock (TrioClock)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trio

from flowcopy import logs
from flowcopy.definitions import Overlap, Schedule
from flowcopy.journal import Journal
from flowcopy.runner import open_engine
from flowcopy.scheduler import (
    Decision,
    PauseStateError,
    Scheduler,
    Situation,
    TrioClock,
    decide,
    last_fire_from_runs,
    latest_fire,
    next_fire,
    pause,
    read_paused,
    set_paused,
)
from flowcopy.site.inventory import load_lab

WORKFLOWS = Path(__file__).resolve().parent.parent / "workflows"


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


HOURLY = Schedule(cron="0 * * * *")
NIGHTLY_BERLIN = Schedule(cron="30 2 * * *", timezone="Europe/Berlin")


# --------------------------------------------------------------------------- pure core: cron


@pytest.mark.parametrize(
    "schedule,after,expected",
    [
        (HOURLY, utc(2025, 1, 1, 10, 0), utc(2025, 1, 1, 11, 0)),  # strictly after
        (HOURLY, utc(2025, 1, 1, 10, 59, 59), utc(2025, 1, 1, 11, 0)),
        (HOURLY, utc(2025, 12, 31, 23, 30), utc(2026, 1, 1, 0, 0)),
        (Schedule(cron="30 2 * * *"), utc(2025, 1, 1, 3, 0), utc(2025, 1, 2, 2, 30)),  # UTC default
        # 02:30 in Berlin: 01:30 UTC in winter (CET), 00:30 UTC in summer (CEST)
        (NIGHTLY_BERLIN, utc(2025, 1, 15, 12, 0), utc(2025, 1, 16, 1, 30)),
        (NIGHTLY_BERLIN, utc(2025, 7, 15, 12, 0), utc(2025, 7, 16, 0, 30)),
        (Schedule(cron="0 9 * * 1-5", timezone="America/New_York"), utc(2025, 1, 3, 15, 0), utc(2025, 1, 6, 14, 0)),  # Fri -> Mon
    ],
)
def test_next_fire(schedule: Schedule, after: datetime, expected: datetime) -> None:
    assert next_fire(schedule, after) == expected


@pytest.mark.parametrize(
    "schedule,now,expected",
    [
        (HOURLY, utc(2025, 1, 1, 10, 0), utc(2025, 1, 1, 10, 0)),  # at a fire time: that one
        (HOURLY, utc(2025, 1, 1, 10, 0, 0, 500000), utc(2025, 1, 1, 10, 0)),
        (HOURLY, utc(2025, 1, 1, 10, 59), utc(2025, 1, 1, 10, 0)),
        (NIGHTLY_BERLIN, utc(2025, 1, 16, 12, 0), utc(2025, 1, 16, 1, 30)),
    ],
)
def test_latest_fire(schedule: Schedule, now: datetime, expected: datetime) -> None:
    assert latest_fire(schedule, now) == expected


# --------------------------------------------------------------------------- pure core: overlap


def at(schedule: Schedule, last: datetime, now: datetime, **kw: Any) -> Decision:
    return decide(Situation(schedule=schedule, last=last, now=now, **kw))


T10 = utc(2025, 1, 1, 10, 0)
T11 = utc(2025, 1, 1, 11, 0)


@pytest.mark.parametrize(
    "overlap,running,queued,action",
    [
        (Overlap.SKIP, False, False, "fire"),
        (Overlap.SKIP, True, False, "skip"),
        (Overlap.BUFFER_ONE, False, False, "fire"),
        (Overlap.BUFFER_ONE, True, False, "queue"),
        (Overlap.BUFFER_ONE, True, True, "skip"),  # at most one waiting
        (Overlap.ALLOW, True, False, "fire"),
        (Overlap.ALLOW, False, False, "fire"),
    ],
)
def test_overlap_policies(overlap: Overlap, running: bool, queued: bool, action: str) -> None:
    schedule = Schedule(cron="0 * * * *", overlap=overlap)
    d = at(schedule, T10, T11 + timedelta(seconds=1), running=running, queued=queued)
    assert (d.action, d.at, d.missed, d.catch_up) == (action, T11, 0, False)
    if action == "skip":
        assert "still running" in d.reason and overlap.value in d.reason


def test_not_due_sleeps_until_next_fire() -> None:
    assert at(HOURLY, T10, T10 + timedelta(minutes=59, seconds=59)) == Decision("sleep", T11)


def test_paused_skips_with_reason() -> None:
    d = at(HOURLY, T10, T11, paused=True)
    assert (d.action, d.at, d.reason) == ("skip", T11, "paused")


# --------------------------------------------------------------------------- pure core: catch-up


def test_restart_right_after_a_fire_does_not_fire_again() -> None:
    # the journal's latest run was created a moment after its 11:00 fire
    last = last_fire_from_runs([T10.timestamp() + 0.2, T11.timestamp() + 0.05])
    assert last == T11 + timedelta(seconds=0.05)
    for seconds in (0.1, 3, 30, 3599):
        assert at(HOURLY, last, T11 + timedelta(seconds=seconds)).action == "sleep"
    assert last_fire_from_runs([]) is None


@pytest.mark.parametrize(
    "catch_up,down_until,action,catch,missed",
    [
        (1800.0, utc(2025, 1, 1, 13, 20), "fire", True, 2),  # 13:00 missed by 20 min, window 30 min: run it once
        (1800.0, utc(2025, 1, 1, 13, 45), "skip", False, 2),  # missed by 45 min: outside the window
        (0.0, utc(2025, 1, 1, 13, 20), "skip", False, 2),  # no catch-up configured
        (0.0, utc(2025, 1, 1, 13, 0, 5), "fire", False, 2),  # within the grace: on time
        (7 * 86400.0, utc(2025, 1, 8, 10, 30), "fire", True, 167),  # a week down: one run, 167 older skipped
    ],
)
def test_catch_up_after_downtime(catch_up: float, down_until: datetime, action: str, catch: bool, missed: int) -> None:
    schedule = Schedule(cron="0 * * * *", catch_up=catch_up)
    d = at(schedule, T10 + timedelta(seconds=0.1), down_until)
    assert (d.action, d.at, d.catch_up, d.missed) == (action, latest_fire(schedule, down_until), catch, missed)
    # having dealt with the latest, the next decision is to sleep: exactly one run however many were missed
    assert at(schedule, d.at, down_until).action == "sleep"


def test_many_missed_fires_are_counted_up_to_a_cap() -> None:
    schedule = Schedule(cron="* * * * *", catch_up=60.0)
    d = at(schedule, T10, T10 + timedelta(days=30, seconds=10))
    assert d.action == "fire" and d.catch_up is False and d.missed == 1000 and "1000+" in d.reason


# --------------------------------------------------------------------------- pause state


def test_pause_state_is_atomic_json_in_the_store(tmp_path: Path) -> None:
    assert read_paused(tmp_path) == frozenset()
    assert set_paused(tmp_path, "a", True) is True
    assert set_paused(tmp_path, "a", True) is False
    assert set_paused(tmp_path, "b", True) is True
    assert read_paused(tmp_path) == {"a", "b"}
    assert set_paused(tmp_path, "a", False) is True
    assert json.loads((tmp_path / "scheduler.json").read_text()) == {"paused": ["b"]}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".scheduler-")] == []  # no temp files left
    with pytest.raises(PauseStateError, match="not a workflow name"):
        pause(tmp_path, "Bad Name", True)
    (tmp_path / "scheduler.json").write_text("{not json")
    with pytest.raises(PauseStateError, match="unreadable scheduler state"):
        read_paused(tmp_path)


# --------------------------------------------------------------------------- the shell on MockClock

EVERY_MINUTE = (WORKFLOWS / "10-w2k-e-drive.yaml").read_text().replace(
    "name: w2k-e-drive", 'name: w2k-e-drive\nschedule:\n  cron: "* * * * *"\n  overlap: {overlap}\n'
)
START = utc(2025, 3, 1, 12, 0, 30)


def workflow_text(overlap: str = "skip") -> str:
    return EVERY_MINUTE.replace("{overlap}", overlap)


@pytest.fixture
def log_lines() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    logs.configure(json=True, level="info", stream=stream)
    try:
        yield stream
    finally:
        logs.configure(level="warning")


def events(stream: io.StringIO, event: str | None = None) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in stream.getvalue().splitlines() if line.startswith("{")]
    return [line for line in lines if event is None or line["event"] == event]


async def serve_for(folder: Path, store: Path, site: Any, minutes: float, *, during: Any = None) -> tuple[Scheduler, Any]:
    """Run a Scheduler on `folder` for `minutes` of trio (= cron) time, then stop it cleanly."""
    async with open_engine(store, site) as engine:
        scheduler = Scheduler(folder, engine, clock=TrioClock.starting_at(START))
        async with trio.open_nursery() as nursery:
            async def drive() -> None:
                if during is not None:
                    await during(scheduler)
                await trio.sleep_until(scheduler_start + minutes * 60)
                scheduler.stop()

            scheduler_start = trio.current_time()
            report: dict[str, Any] = {}

            async def serve() -> None:
                report["r"] = await scheduler.run()

            nursery.start_soon(serve)
            nursery.start_soon(drive)
        return scheduler, report["r"]


def runs_of(store: Path, workflow: str) -> list[Any]:
    journal = Journal.open(store, lock=False)
    try:
        return [(r, journal.units(r.run_id)) for r in journal.runs(workflow)]
    finally:
        journal.close()


def assert_all_verified(runs: list[Any]) -> None:
    for run, units in runs:
        assert run.state == "succeeded", run
        assert units and all(u.state == "succeeded" and u.data.get("verified") is True for u in units)


async def test_every_minute_cron_runs_n_times_in_n_minutes(tmp_path: Path, autojump_clock: Any, log_lines: io.StringIO) -> None:
    folder, store = tmp_path / "wf", tmp_path / "store"
    folder.mkdir()
    (folder / "w.yaml").write_text(workflow_text())
    (folder / "ondemand.yaml").write_text((WORKFLOWS / "20-sql-consistency-group.yaml").read_text())  # no schedule
    site = load_lab(None)
    async with site.running():
        scheduler, report = await serve_for(folder, store, site, 3.25)  # 12:00:30 .. 12:03:45
    runs = runs_of(store, "w2k-e-drive")
    assert len(runs) == 3
    assert_all_verified(runs)
    assert runs_of(store, "w2k-sql-consistency-group") == []  # loaded, never fired
    assert set(scheduler.entries) == {"w2k-e-drive", "w2k-sql-consistency-group"}
    assert report.left == ()
    fires = events(log_lines, "fire")
    assert [f["at"] for f in fires] == [f"2025-03-01T12:0{m}:00+00:00" for m in (1, 2, 3)]
    assert all(f["workflow"] == "w2k-e-drive" and f["reason"] == "on schedule" for f in fires)
    # every line of a run carries its workflow and run
    run_ids = {r.run_id for r, _ in runs}
    transitions = events(log_lines, "transition")
    assert transitions and {t["run"] for t in transitions} == run_ids
    assert all(t["workflow"] == "w2k-e-drive" for t in transitions)
    ended = events(log_lines, "run ended")
    assert {e["run"] for e in ended} == run_ids and all(e["state"] == "succeeded" and e["verified"] for e in ended)


def slow_copy(site: Any, seconds: float) -> None:
    """The copy stage (mount_check on the second guest) takes longer than the cron period."""
    original = site.mount_check

    async def mount_check(*args: Any, **kwargs: Any) -> Any:
        await trio.sleep(seconds)
        return await original(*args, **kwargs)

    site.mount_check = mount_check


def most_at_once(stream: io.StringIO) -> int:
    """The most runs in flight at once, from the order of the service's log lines."""
    level = peak = 0
    for line in events(stream):
        if line["event"] == "run started":
            level += 1
            peak = max(peak, level)
        elif line["event"] in ("run ended", "run left for resume"):
            level -= 1
    return peak


@pytest.mark.parametrize("overlap", ["skip", "buffer_one", "allow"])
async def test_overlap_with_a_slow_run(tmp_path: Path, autojump_clock: Any, log_lines: io.StringIO, overlap: str) -> None:
    folder, store = tmp_path / "wf", tmp_path / "store"
    folder.mkdir()
    (folder / "w.yaml").write_text(workflow_text(overlap))
    site = load_lab(None)
    slow_copy(site, 90.0)  # a run takes 90 s and more: longer than the cron period
    async with site.running():
        # fires at 12:01, 12:02, 12:03, 12:04; stop at 12:04:30: runs in flight are left for resume
        _, report = await serve_for(folder, store, site, 4.0)
    runs = runs_of(store, "w2k-e-drive")
    skips = events(log_lines, "skip")
    queued = events(log_lines, "queued")
    on_time = [f for f in events(log_lines, "fire") if f["reason"].startswith("on schedule")]
    queued_starts = [f for f in events(log_lines, "fire") if "queued run starts" in f["reason"]]
    # every fire time is dealt with exactly once, and logged once with its reason
    assert sorted(e["at"][11:16] for e in on_time + queued + skips) == ["12:01", "12:02", "12:03", "12:04"]
    assert all(e["workflow"] == "w2k-e-drive" for e in on_time + queued + skips)
    if overlap == "skip":
        assert skips and all("still running (overlap: skip)" in s["reason"] for s in skips)
        assert queued == [] and most_at_once(log_lines) == 1
        assert len(runs) == len(on_time)
    elif overlap == "buffer_one":
        assert queued and all("already queued" in s["reason"] for s in skips)
        assert [f["at"] for f in queued_starts] == [q["at"] for q in queued][:len(queued_starts)]
        assert len(queued_starts) + len(report.dropped_queued) == len(queued)
        assert most_at_once(log_lines) == 1
        assert len(runs) == len(on_time) + len(queued_starts)
    else:
        assert skips == [] and queued == [] and len(runs) == 4
        assert most_at_once(log_lines) >= 2  # started anyway; the engine's per-VM lock keeps freezes apart
    # the stop lets each run in flight leave as the engine's clean stop leaves it: resumable
    assert_all_verified([(r, u) for r, u in runs if r.state != "running"])
    assert {r.run_id for r, _ in runs if r.state == "running"} == set(report.left)


async def test_paused_workflow_does_not_fire_until_unpaused(tmp_path: Path, autojump_clock: Any, log_lines: io.StringIO) -> None:
    folder, store = tmp_path / "wf", tmp_path / "store"
    folder.mkdir()
    (folder / "w.yaml").write_text(workflow_text())
    set_paused(store, "w2k-e-drive", True)
    site = load_lab(None)

    async def unpause_later(scheduler: Scheduler) -> None:
        await trio.sleep(165)  # 12:03:15: fires at 12:01, 12:02, 12:03 were paused
        set_paused(store, "w2k-e-drive", False)  # as `flowcopy unpause` from another process

    async with site.running():
        await serve_for(folder, store, site, 4.75, during=unpause_later)  # until 12:05:15
    skips = events(log_lines, "skip")
    assert [(s["at"][11:16], s["reason"]) for s in skips] == [("12:01", "paused"), ("12:02", "paused"), ("12:03", "paused")]
    runs = runs_of(store, "w2k-e-drive")
    assert [f["at"][11:16] for f in events(log_lines, "fire")] == ["12:04", "12:05"]
    assert len(runs) == 2
    assert_all_verified(runs)


async def test_reload_keeps_the_old_version_of_a_broken_file(tmp_path: Path, autojump_clock: Any, log_lines: io.StringIO) -> None:
    folder, store = tmp_path / "wf", tmp_path / "store"
    folder.mkdir()
    path = folder / "w.yaml"
    path.write_text(workflow_text())
    site = load_lab(None)
    result: dict[str, Any] = {}

    async def edit(scheduler: Scheduler) -> None:
        await trio.sleep(60)  # 12:01:30
        path.write_text(workflow_text().replace("quiesce: filesystem", "quiesce: frozen-solid"))
        result["broken"] = scheduler.reload()
        await trio.sleep(60)  # 12:02:30: removed (its runs in flight would not be touched)
        path.unlink()
        result["removed"] = scheduler.reload()
        await trio.sleep(60)  # 12:03:30: a new every-minute workflow (same VM and target) is added
        (folder / "x.yaml").write_text(workflow_text().replace("name: w2k-e-drive", "name: second"))
        result["added"] = scheduler.reload()

    async with site.running():
        await serve_for(folder, store, site, 4.75, during=edit)  # until 12:05:15
    assert result["broken"] == {"added": [], "changed": [], "removed": [], "broken": [str(path)]}
    refused = events(log_lines, "definition refused")
    assert len(refused) == 1 and refused[0]["kept"] == ["w2k-e-drive"]
    (problem,) = refused[0]["problems"]
    assert problem.startswith(f"{path}:") and "units[0].quiesce" in problem and "frozen-solid" in problem
    line, col = problem[len(str(path)) + 1:].split(":")[:2]
    assert int(line) > 1 and int(col) >= 1
    assert result["added"]["added"] == ["second"]
    assert result["removed"]["removed"] == ["w2k-e-drive"]
    # the old version kept firing after the broken edit (12:02), then stopped when removed
    fires = [(f["workflow"], f["at"][11:16]) for f in events(log_lines, "fire")]
    assert fires == [("w2k-e-drive", "12:01"), ("w2k-e-drive", "12:02"), ("second", "12:04"), ("second", "12:05")]
    assert_all_verified(runs_of(store, "w2k-e-drive") + runs_of(store, "second"))


# --------------------------------------------------------------------------- a real process


def _succeeded(store: Path) -> int:
    if not (store / "journal.sqlite").exists():
        return 0
    try:
        return sum(1 for r, _ in runs_of(store, "w2k-e-drive") if r.state == "succeeded")
    except Exception:  # the journal is being created by the service
        return 0


def _wait_for(predicate: Any, seconds: float, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert proc.poll() is None, "flowcopy serve exited early"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


@pytest.mark.process
def test_serve_process_fires_reloads_and_stops_cleanly(tmp_path: Path) -> None:
    """`flowcopy serve --speed 60`: a cron minute is a second. Fires, survives a SIGHUP with
    a broken file (the old version keeps firing), SIGTERM: exit 0 with what was left."""
    folder, store = tmp_path / "wf", tmp_path / "store"
    folder.mkdir()
    path = folder / "w.yaml"
    path.write_text(workflow_text())
    err = open(tmp_path / "stderr", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "flowcopy", "serve", str(folder), "--store", str(store), "--speed", "60"],
                            stdout=subprocess.PIPE, stderr=err, text=True, env={**os.environ, "FLOWCOPY_SITE": ""})
    try:
        _wait_for(lambda: _succeeded(store) >= 2, 15, proc)
        path.write_text("name: w2k-e-drive\nunits: 12\n")
        proc.send_signal(signal.SIGHUP)
        _wait_for(lambda: "definition refused" in (tmp_path / "stderr").read_text(), 5, proc)
        before = _succeeded(store)
        _wait_for(lambda: _succeeded(store) >= before + 2, 10, proc)  # the old version still fires
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = (tmp_path / "stderr").read_text()
    assert proc.returncode == 0, text[-2000:]
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    refused = [line for line in lines if line["event"] == "definition refused"]
    assert len(refused) == 1 and refused[0]["problems"][0].startswith(f"{path}:2:")
    assert "flowcopy: stopped cleanly" in text
    runs = runs_of(store, "w2k-e-drive")
    assert_all_verified([(r, u) for r, u in runs if r.state != "running"])
    assert len([r for r, _ in runs if r.state == "succeeded"]) >= 4
    # a run the stop left in flight is named in the last line, and nothing else is running
    left = {r.run_id for r, _ in runs if r.state == "running"}
    assert all(run_id in text.splitlines()[-1] for run_id in left)
