"""The service's per-request reads of the journal are bounded (`Journal.run_overview`,
`Journal.newest_backups`): on a store of many runs, `/api/status` and `/metrics` show the
same figures a full scan of every run and unit gives (counts per state, the newest runs,
each workflow's last run, each VM's newest verified backup), on SQLite and PostgreSQL."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import trio
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from flowcopy.journal import RUN_STATES, Journal, Move, RunRow, UnitRow
from flowcopy.runner import open_engine
from flowcopy.scheduler import Scheduler, TrioClock
from flowcopy.service.metrics import ServiceMetrics
from flowcopy.service.status import RECENT_RUNS, StatusBook
from flowcopy.site.inventory import load_lab
from tests.service_process import QUICK, write_folder

WORKFLOWS = ("quick", "nightly", "weekly")
ENDS = ("succeeded", "failed", "succeeded", "cancelled", "partial", "succeeded")
RUNS = 180


def _unit_data(i: int) -> dict[str, Any]:
    vm = f"vm{i % 7}"
    kind = "restore" if i % 11 == 0 else "backup"
    return {"spec": {"vms": [vm, f"vm{(i + 3) % 7}"] if i % 5 == 0 else [vm], "kind": kind},
            "pairs": [{"vm": vm, "disk": "Disk1", "source": f"S{i % 7}", "target": f"T{i}", "capacity": 1 << 20}],
            "verified": i % 4 != 1}


async def _fill(journal: Journal, *, running: bool) -> None:
    """RUNS runs over three workflows in every end state (and `running` ones when asked),
    one unit each: a backup or a restore, verified or not, of one VM or two."""

    async def one(i: int) -> None:
        workflow = WORKFLOWS[i % 3]
        state = "running" if running and i % 9 == 4 else ENDS[i % len(ENDS)]
        created = 1_000_000.0 + i * 60 + (i % 3) * 7
        run = RunRow(run_id=f"{workflow}-{i:04d}", workflow=workflow, definition={"name": workflow}, state=state,
                     created=created, finished=None if state == "running" else created + 30, number=i // 3 + 1)
        unit = UnitRow(unit_id=f"{run.run_id}/u0", run_id=run.run_id, state="withdrawing", data={})
        await journal.begin_run(run, [unit])
        if state in ("succeeded", "partial", "running"):
            await journal.record(Move(unit.unit_id, "withdrawing", "succeeded", "succeed", data=_unit_data(i)))
        else:
            await journal.record(Move(unit.unit_id, "withdrawing", "failed", "fail", data={"error": "x"}))

    async with trio.open_nursery() as nursery:
        for i in range(RUNS):
            nursery.start_soon(one, i)


def _full_scan_backups(journal: Journal) -> dict[str, float]:
    """The newest verified backup per VM as the service read it before: every unit of
    every finished run."""
    newest: dict[str, float] = {}
    for run in journal.runs():
        if run.state == "running":
            continue
        for unit in journal.units(run.run_id):
            spec = unit.data.get("spec", {})
            if unit.state != "succeeded" or unit.data.get("verified") is not True or spec.get("kind") == "restore":
                continue
            for vm in spec.get("vms", ()):
                newest[vm] = max(newest.get(vm, 0.0), unit.updated)
    return newest


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Path | str:
    if request.param == "sqlite":
        return tmp_path / "store"
    return str(request.getfixturevalue("pg_url"))


async def test_run_overview_equals_a_full_scan(store: Path | str) -> None:
    journal = Journal.open(store)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(journal.run_writer)
            await _fill(journal, running=True)
            nursery.cancel_scope.cancel()
        runs = journal.runs()
        assert len(runs) == RUNS
        ids = ["weekly-0005", "quick-0004", "no-such-run"]
        overview = journal.run_overview(recent=RECENT_RUNS, workflows=[*WORKFLOWS, "never-ran"], run_ids=ids)

        assert overview.counts == dict(Counter(r.state for r in runs))
        assert set(overview.counts) == RUN_STATES  # every state present: the counts are all checked
        newest_first = sorted(runs, key=lambda r: (r.created, r.run_id), reverse=True)
        assert list(overview.recent) == [r for r in newest_first if r.state != "running"][:RECENT_RUNS]
        assert overview.latest == {w: max((r for r in runs if r.workflow == w), key=lambda r: r.created)
                                   for w in WORKFLOWS}
        assert overview.by_id == {r.run_id: r for r in runs if r.run_id in ids}

        backups = journal.newest_backups()
        assert backups == _full_scan_backups(journal)
        assert len(backups) == 7  # every VM has one: the comparison covers them all
    finally:
        journal.close()


async def test_status_and_metrics_on_many_runs_show_the_full_scan_figures(tmp_path: Path, autojump_clock: Any) -> None:
    store = tmp_path / "store"
    journal = Journal.open(store)
    async with trio.open_nursery() as nursery:
        await nursery.start(journal.run_writer)
        await _fill(journal, running=False)  # a running run would be resumed by the engine
        nursery.cancel_scope.cancel()
    journal.close()

    inner = load_lab(None)
    folder = write_folder(tmp_path / "wf", QUICK)
    async with inner.running(), open_engine(store, inner) as engine:
        scheduler = Scheduler(folder, engine, clock=TrioClock.starting_at(datetime(2026, 3, 1, tzinfo=UTC)), store=store)
        scheduler.reload()
        book = StatusBook(scheduler)
        metrics = ServiceMetrics()
        metrics.watch(scheduler)
        doc = book.document()
        text = generate_latest(metrics.registry).decode()
        runs = engine.journal.runs()
        full_backups = _full_scan_backups(engine.journal)

    counts = Counter(r.state for r in runs)
    assert doc["runs"] == {"total": RUNS, "states": dict(sorted(counts.items()))}
    newest_first = sorted(runs, key=lambda r: (r.created, r.run_id), reverse=True)
    assert [r["run_id"] for r in doc["recent"]] == [r.run_id for r in newest_first[:RECENT_RUNS]]
    assert [(r["state"], r["units"]) for r in doc["recent"][:2]] == [
        (newest_first[0].state, {"succeeded" if newest_first[0].state in ("succeeded", "partial") else "failed": 1}),
        (newest_first[1].state, {"succeeded" if newest_first[1].state in ("succeeded", "partial") else "failed": 1})]
    [quick] = doc["workflows"]
    last = max((r for r in runs if r.workflow == "quick"), key=lambda r: r.created)
    assert (quick["last_run"], quick["last_result"]) == (last.run_id, last.state)

    got = {(s.name, tuple(sorted(s.labels.items()))): s.value
           for family in text_string_to_metric_families(text) for s in family.samples}
    assert {labels[0][1]: v for (name, labels), v in got.items() if name == "flowcopy_journal_runs"} == {
        state: counts.get(state, 0) for state in RUN_STATES}
    assert {labels[0][1]: v for (name, labels), v in got.items()
            if name == "flowcopy_backup_newest_timestamp_seconds"} == pytest.approx(full_backups)
    assert len(full_backups) == 7
