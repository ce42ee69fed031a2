"""A restore dies right after each kind of journal write of its own, and resumes.

As `tests/test_crash.py` does for backups: the journal's crash hook raises
`SimulatedCrash` (like SIGKILL: no compensation) after the chosen move is durable; a new
engine on the same store and the same (living) site resumes. The restore must end
restored (byte-equal to the image), the VM running, no relationship left behind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from flowcopy import chaos, machine
from flowcopy.backups import catalog
from flowcopy.backups.commands import start_restore
from flowcopy.backups.images import lun_digest
from flowcopy.backups.restore import make_plan
from flowcopy.journal import Journal, Move, SimulatedCrash, is_crash
from flowcopy.site.inventory import load_lab

from .test_engine import WORKFLOWS, engine_on
from .test_restore import SECOND_DATA, SECOND_LOG, SQL_EXPORT, run

RESTORE_TRIGGERS = sorted(
    {t.trigger for t in machine.TRANSITIONS for s in t.source if s in machine.RESTORE_PATH and t.dest in machine.RESTORE_PATH}
    | {"begin_run", "finish_run"}
)
"""Every journal write a restore makes on its happy path."""


def test_the_restore_path_writes_are_all_listed() -> None:
    assert {"stop", "stopped", "restore", "restored", "check", "checked", "start", "started"} <= set(RESTORE_TRIGGERS)
    assert {"prepare", "prepared", "copy", "copied", "withdraw", "succeed"} <= set(RESTORE_TRIGGERS)


async def _crash_restore(store: Path, site: Any, plan: Any, crash_at: str) -> bool:
    def hook(move: Move) -> None:
        if move.event == crash_at and move.unit_id.startswith("restore-"):
            raise SimulatedCrash(f"after {crash_at}")

    def run_hook(kind: str, run_id: str) -> None:
        if kind == crash_at and run_id.startswith("restore-"):
            raise SimulatedCrash(f"after {kind}")

    try:
        async with engine_on(store, site) as engine:
            engine.journal.crash_hook = hook
            engine.journal.run_crash_hook = run_hook
            await start_restore(engine, plan)
    except BaseException as exc:  # noqa: BLE001 - a crash arrives wrapped in exception groups
        if not is_crash(exc):
            raise
        return True
    return False


DEFAULT = {"begin_run", "stop", "restore", "check", "start", "copy", "finish_run"}
"""Crash points run by default: the intents (a side effect may be half done) and the run
writes; the outcome writes run with `-m slow` (each case backs up scenario 2 first)."""


def _case(source: str, trigger: str, default: bool) -> Any:
    return pytest.param(source, trigger, marks=() if default else pytest.mark.slow, id=f"{source}-{trigger}")


CASES = [_case("live-target", t, t in DEFAULT) for t in RESTORE_TRIGGERS] + [
    # the write-back from a file differs from a FlashCopy back only around the restore step
    _case("export", t, t in ("restore", "restored")) for t in ("begin_run", "stopped", "restore", "restored", "check")
]


@pytest.mark.parametrize(("source", "crash_at"), CASES)
async def test_restore_crashed_after_each_journal_write_resumes_to_restored(
    tmp_path: Path, autojump_clock: Any, crash_at: str, source: str
) -> None:
    site = load_lab(None)
    async with site.running(["sql-db"]):
        async with engine_on(tmp_path, site) as engine:
            text: Any = WORKFLOWS / "20-sql-consistency-group.yaml" if source == "live-target" else SQL_EXPORT
            summary = await run(engine, site, text)
            assert summary.state == "succeeded", summary.failures
            backups = await catalog.load(engine.journal, site)
        backup = backups[0]
        await trio.sleep(5)
        await site.stop_workload("sql-db")
        to = [] if source == "live-target" else ["RICH-W2K-OS-2:Disk2", "RICH-W2K-OS-2:Disk3"]
        plan = await make_plan(site, backup, backups, to=to)
        assert await _crash_restore(tmp_path, site, plan, crash_at), f"no {crash_at} was ever written"
        await trio.sleep(5)
        async with engine_on(tmp_path, site) as engine:
            resumed = await engine.resume()
        journal = Journal.open(tmp_path, lock=False)
        try:
            verdict = await chaos.check_invariants(journal, site)
            runs = {r.run_id: r.state for r in journal.runs()}
        finally:
            journal.close()
        assert verdict.problems == ()
        assert all(state == "succeeded" for state in runs.values()), (runs, [s.failures for s in resumed])
        for step in plan.steps:
            assert await lun_digest(site, step.dest, step.capacity) == step.digest  # restored, byte for byte
        for vm in plan.stop_vms:
            assert (await site.get_vm(vm)).power.value == "on"
        assert [r for r in await site.query() if (r.tag or "").startswith("fc:restore")] == []
        if source == "export":
            assert {s.dest for s in plan.steps} == {SECOND_LOG, SECOND_DATA}
