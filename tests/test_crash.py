"""Deterministic crash tests: the engine dies right after each kind of journal write.

The journal's crash hook raises `SimulatedCrash` (a BaseException, like SIGKILL: no
compensation, no cleanup) after the batch holding the chosen move committed and before
its waiter goes on to the next side effect. A new engine then opens the same store
against the same site — which lived on, as a served site would — and resumes. The
invariants of DESIGN §4 are checked from the journal and the site's own state, with and
without site time passing between the crash and the restart (freezes time out, ELB
holds expire).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from flowcopy import chaos, definitions, machine, planning
from flowcopy.journal import Journal, Move, SimulatedCrash, is_crash
from flowcopy.site import api
from flowcopy.site.inventory import load_lab

from .test_engine import THREE_PAIRS, WORKFLOWS, FailingSite, assert_invariants, engine_on

SCENARIO_2 = (WORKFLOWS / "20-sql-consistency-group.yaml").read_text()
ROTATION = (WORKFLOWS / "40-hourly-rotation.yaml").read_text()

# which workflow (and which misbehaviour of the site) makes the engine write each kind
HAPPY = ["prepare", "prepared", "freeze", "frozen", "establish", "established", "release",
         "released", "copy", "copied", "withdraw", "succeed"]
SCENARIOS: dict[str, tuple[str, str]] = {
    **{t: (SCENARIO_2, "normal") for t in HAPPY},
    "redo": (SCENARIO_2, "slow_establish"),
    "fail": (THREE_PAIRS, "refuse_third"),
    "compensated": (THREE_PAIRS, "refuse_third"),
    "cancel": (ROTATION, "cancel_mid_copy"),
    "compensated_cancel": (ROTATION, "cancel_mid_copy"),
    "begin_run": (SCENARIO_2, "normal"),
    "finish_run": (SCENARIO_2, "normal"),
}


def test_every_kind_of_journal_write_is_crash_tested() -> None:
    from .test_restore_crash import RESTORE_TRIGGERS  # a restore's own writes: tested there

    assert set(SCENARIOS) | set(RESTORE_TRIGGERS) == {t.trigger for t in machine.TRANSITIONS} | {"begin_run", "finish_run"}


def misbehaving(inner: Any, how: str) -> Any:
    if how == "refuse_third":
        def refuse(source: str, target: str, options: api.FlashOptions) -> Exception | None:
            return api.SizeMismatch(f"cannot establish {source} -> {target}: refused") if target == "30116698" else None

        return FailingSite(inner, {"establish": refuse})
    site = FailingSite(inner, {})
    if how == "slow_establish":
        calls = {"n": 0}

        async def slow(*args: Any, **kwargs: Any) -> Any:
            calls["n"] += 1
            if calls["n"] == 1:
                await trio.sleep(40)  # beyond the 20 s freeze timeout of scenario 2
            return await inner.establish(*args, **kwargs)

        site.establish = slow  # type: ignore[attr-defined]
    return site


async def first_run(store: Path, site: Any, text: str, how: str, crash_at: str) -> bool:
    """Run until the crash point; True if the crash happened."""
    wf = definitions.load_text(text, "crash.yaml")
    crashed = False

    def hook(move: Move) -> None:
        if move.event == crash_at:
            raise SimulatedCrash(f"after {crash_at}")

    def run_hook(kind: str, run_id: str) -> None:
        if kind == crash_at:
            raise SimulatedCrash(f"after {kind}")

    try:
        async with engine_on(store, site) as engine:
            engine.journal.crash_hook = hook
            engine.journal.run_crash_hook = run_hook
            specs = await planning.plan_units(wf, site)
            run_id = await engine.begin_run(wf.name, planning.definition_data(wf), specs)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(engine.drive_run, run_id)
                if how == "cancel_mid_copy":
                    while engine.progress(run_id).get("copying", 0) == 0:
                        await trio.sleep(0.01)
                    await engine.cancel(run_id)
    except BaseException as exc:  # noqa: BLE001 - a crash arrives wrapped in exception groups
        if not is_crash(exc):
            raise
        crashed = True
    return crashed


@pytest.mark.parametrize("pause", [0.0, 300.0], ids=["restart-at-once", "restart-after-300s"])
@pytest.mark.parametrize("crash_at", sorted(SCENARIOS))
async def test_crash_after_journal_write_then_resume(
    tmp_path: Path, autojump_clock: Any, crash_at: str, pause: float
) -> None:
    text, how = SCENARIOS[crash_at]
    inner = load_lab(None)
    async with inner.running():
        site = misbehaving(inner, how)
        assert await first_run(tmp_path, site, text, how, crash_at), f"no {crash_at} was ever written"
        await trio.sleep(pause)
        async with engine_on(tmp_path, site) as engine:
            summaries = await engine.resume()
        journal = Journal.open(tmp_path, lock=False)
        try:
            verdict = await chaos.check_invariants(journal, inner)
            runs = journal.runs()
        finally:
            journal.close()
    assert verdict.problems == ()
    assert len(runs) == 1 and runs[0].state != "running"
    if crash_at != "finish_run":
        assert [s.run_id for s in summaries] == [runs[0].run_id]
    expected = {"normal": "succeeded", "slow_establish": "succeeded", "refuse_third": "failed",
                "cancel_mid_copy": "cancelled"}[how]
    assert runs[0].state == expected


class CrashingSite:
    """The engine dies inside a side effect: the site call completed, its reply never arrived."""

    def __init__(self, inner: Any, method: str, nth: int) -> None:
        self._inner, self._method, self._nth, self.calls = inner, method, nth, 0

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if name != self._method:
            return attr

        async def call(*args: Any, **kwargs: Any) -> Any:
            result = await attr(*args, **kwargs)
            self.calls += 1
            if self.calls == self._nth:
                raise SimulatedCrash(f"inside {name} #{self._nth}")
            return result

        return call


@pytest.mark.parametrize(
    "method,nth",
    [("quiesce", 1), ("establish", 1), ("establish", 2), ("unfreeze", 1), ("thaw", 1),
     ("mount_check", 1), ("withdraw", 1), ("withdraw", 2)],
)
async def test_crash_inside_a_side_effect_then_resume(tmp_path: Path, autojump_clock: Any, method: str, nth: int) -> None:
    """Scenario 2 (two pairs, one consistency group) dies after the site acted but before
    the engine heard back; the restarted engine reconciles from the site's state."""
    inner = load_lab(None)
    async with inner.running():
        site = CrashingSite(inner, method, nth)
        # a mount-checked copy is now waited for and dissolves by itself: a nocopy group is
        # what still withdraws its relationships at the end
        text = SCENARIO_2.replace("    consistency_group: w2k-sql", "    mode: nocopy\n    consistency_group: w2k-sql") if method == "withdraw" else SCENARIO_2
        assert "mode: nocopy" in text or method != "withdraw"
        assert await first_run(tmp_path, site, text, "normal", crash_at="never")
        assert site.calls >= nth
        async with engine_on(tmp_path, inner) as engine:
            (summary,) = await engine.resume()
        await assert_invariants(tmp_path, inner)
    assert summary.state == "succeeded" and summary.verified


# --------------------------------------------------------------------------- inside the freeze window

# The window journals nothing between its intent (`freezing`) and its outcome, so a crash
# anywhere in it finds the unit in `freezing` with the site in any state the window passes
# through: each call below is the last one the engine saw complete before it died.
WINDOW_CRASHES = {
    "after-freeze": ("quiesce", 1),  # guest frozen, nothing established
    "mid-establish": ("establish", 1),  # one pair of the group made, its source frozen
    "after-establish": ("establish", 4),  # every pair made, the group's sources frozen
    "after-freeze-check": ("freeze_status", 1),  # the freeze shown to cover the establish
    "mid-release": ("unfreeze", 1),  # sources released, guest still frozen
    "after-release": ("thaw", 1),  # released, the window's outcome not yet journaled
}


def _group_text(mode: str) -> str:
    if mode == "copy":
        return SCENARIO_2
    text = SCENARIO_2.replace("    consistency_group: w2k-sql", f"    mode: {mode}\n    consistency_group: w2k-sql")
    assert text != SCENARIO_2
    return text


@pytest.mark.parametrize("pause", [0.0, 300.0], ids=["restart-at-once", "restart-after-300s"])
@pytest.mark.parametrize("mode", ["copy", "nocopy", "incremental"])
@pytest.mark.parametrize("where", sorted(WINDOW_CRASHES))
async def test_crash_inside_the_freeze_window_then_resume(
    tmp_path: Path, autojump_clock: Any, where: str, mode: str, pause: float
) -> None:
    """Scenario 2 (four LUNs, one consistency group, SQL and SQLite with dependent writes)
    dies at each point of its freeze window. The journal says `freezing` whatever the
    window had done; resume withdraws (incremental: keeps and resyncs again), unfreezes,
    thaws and redoes, and the image the run keeps is of one instant — across four LUNs,
    judged by the checker and by SQLite. After 300 s the guest has thawed itself and its
    applications have written on: a pair left from the first attempt would be an older
    point in time than the rest."""
    method, nth = WINDOW_CRASHES[where]
    inner = load_lab(None)
    async with inner.running():
        site = CrashingSite(inner, method, nth)
        assert await first_run(tmp_path, site, _group_text(mode), "normal", crash_at="never")
        journal = Journal.open(tmp_path, lock=False)
        try:
            (unit,) = [u for r in journal.runs() for u in journal.units(r.run_id)]
        finally:
            journal.close()
        assert unit.state == "freezing"  # nothing of the window was journaled
        crashed_at = await inner.now()
        await trio.sleep(pause)
        async with engine_on(tmp_path, inner) as engine:
            (summary,) = await engine.resume()
            events = engine.journal.events(unit_id=unit.unit_id)
            final = engine.journal.units(summary.run_id)[0]
        await assert_invariants(tmp_path, inner)
        pairs = [(p["source"], p["target"]) for p in final.data["pairs"]]
        kept = {(r.source, r.target): r for s, _ in pairs for r in await inner.query(volume=s)}
    assert summary.state == "succeeded" and summary.verified, summary.failures
    assert final.data["check"]["kind"] == "database+sqlite"
    redo = [e for e in events if e.event == "redo"]
    assert [(e.from_state, e.payload["problem"].split(":")[0]) for e in redo] == [
        ("freezing", "engine restarted inside the freeze window")]
    assert final.data["freeze_attempts"] == 2 and final.data.get("freezes_lost", 0) == 0
    # the second attempt's window went freezing -> released in one transaction
    tail = [e.event for e in events[events.index(redo[0]) + 1:]]
    assert tail[:7] == ["freeze", *machine.WINDOW_OUTCOME, "copy"]
    if mode == "incremental":  # kept, one per pair, every one resynced by the second attempt
        assert sorted(kept) == sorted(pairs)
        assert all(r.recording and r.tag == final.data["tag"] for r in kept.values())
        assert min(r.synced for r in kept.values()) > crashed_at
        assert max(r.synced for r in kept.values()) <= final.data["established_at"]
    else:
        assert kept == {}


async def test_incremental_redo_resyncs_every_pair_again_across_a_retry(tmp_path: Path, autojump_clock: Any) -> None:
    """An incremental group keeps its relationships through a redo (they are the resync
    basis): the engine died with all four resynced under its freeze, the guest thawed
    itself and wrote on. The redo resyncs the first pair, the array refuses the second
    once (busy): the retry must resync the three left, not take them for this attempt's,
    or the image would join two points in time."""
    inner = load_lab(None)
    async with inner.running():
        assert await first_run(tmp_path, CrashingSite(inner, "establish", 4), _group_text("incremental"), "normal",
                               crash_at="never")
        crashed_at = await inner.now()
        await trio.sleep(300.0)
        calls = {"n": 0}

        def busy_once(source: str, target: str, **_: Any) -> Exception | None:
            calls["n"] += 1
            return api.LssBusy("LSS busy: retry", lss="20", limit=1) if calls["n"] == 2 else None

        site = FailingSite(inner, {"resync": busy_once})
        async with engine_on(tmp_path, site) as engine:
            (summary,) = await engine.resume()
            final = engine.journal.units(summary.run_id)[0]
        await assert_invariants(tmp_path, inner)
        rels = [r for p in final.data["pairs"] for r in await inner.query(volume=p["source"])]
    assert summary.state == "succeeded" and summary.verified, summary.failures
    assert calls["n"] == 5  # four resyncs and the refused one
    assert len(rels) == 4 and min(r.synced for r in rels) > crashed_at
