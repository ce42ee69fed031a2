"""A resume of many units in flight settles them against shared site queries.

The engine crashes when the last unit of a run starts its background copy; a new engine
must reconcile each unit still in flight (the engine's `on_reconciled` observer hears every unit), asking
the site for its relationships once for all of them rather than once per unit, and then
finish the run with every copy verified. Units caught before their freeze wait until
the units with a side effect in flight have settled.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import trio

from flowcopy.bench import _bench_site, crash_when_copying
from flowcopy.engine import Engine, Limits
from flowcopy.journal import Journal

VMS = 24
POLL = 1.0
LUN = 8 << 30  # ~86 s of site time per background copy of a LUN its guest wrote to


class Heard:
    def __init__(self) -> None:
        self.reconciled: list[str] = []

    def on_reconciled(self, unit_id: str) -> None:
        self.reconciled.append(unit_id)


async def crash_when(store: Path, site: object, copying: int) -> str:
    """Drive a new run until `copying` units journaled their copy intent, then crash."""
    return await crash_when_copying(store, site, copying, units=VMS, poll=POLL)


async def resume(store: Path, site: object, heard: Heard) -> tuple[Engine, list[object]]:
    journal = Journal.open(store)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(journal.run_writer)
            engine = Engine(journal, site, store=store, limits=Limits(units=VMS), poll=POLL)  # type: ignore[arg-type]
            engine.observers.append(heard)
            summaries = await engine.resume()
            nursery.cancel_scope.cancel()
    finally:
        journal.close()
    return engine, summaries  # type: ignore[return-value]


async def test_every_copying_unit_reconciles_against_one_query(tmp_path: Path, autojump_clock: object) -> None:
    site = _bench_site(VMS, capacity=LUN)
    async with site.running():
        run_id = await crash_when(tmp_path, site, copying=VMS)
        at_crash = {r.unit_id: r.state for r in Journal.open(tmp_path, lock=False).unfinished_units()}
        # every unit got past its freeze; those whose guest wrote data are in a long copy
        # (the others' copies had nothing to move and may have finished already)
        assert set(at_crash.values()) <= {"copying", "copied", "withdrawing"}, at_crash
        # (4-8 of them: how many LUNs hold data not yet copied depends on the order the units
        # pass the freeze window); one query per unit and poll would be 4 x 86 queries or
        # more, several times the bound asserted below
        assert Counter(at_crash.values())["copying"] >= 4, at_crash
        heard = Heard()
        engine, summaries = await resume(tmp_path, site, heard)
    assert sorted(heard.reconciled) == sorted(at_crash)
    # one query served every unit's reconciliation; the rest are the shared copy polls
    # (~86 s of copy, one per poll): one per unit and poll would be 8+ times as many
    assert engine._rels.queries < 86 / POLL + 10, engine._rels.queries
    summary = summaries[0]
    assert summary.state == "succeeded" and summary.verified, summary  # type: ignore[attr-defined]


async def test_queued_units_wait_for_the_reconciliation(tmp_path: Path, autojump_clock: object) -> None:
    site = _bench_site(VMS, capacity=LUN)
    async with site.running():
        run_id = await crash_when(tmp_path, site, copying=VMS // 3)
        at_crash = {r.unit_id: r.state for r in Journal.open(tmp_path, lock=False).unfinished_units()}
        acting = {u for u, s in at_crash.items() if s not in ("pending", "prepared")}
        queued = set(at_crash) - acting
        assert acting and queued, at_crash
        heard = Heard()
        _, summaries = await resume(tmp_path, site, heard)
        journal = Journal.open(tmp_path, lock=False)
        events = journal.events(run_id=run_id)
    assert set(heard.reconciled) == acting  # queued units had nothing to reconcile
    # no queued unit moved before the last unit with a side effect in flight settled:
    # the first post-restart move of every queued unit comes after every acting unit's
    restart = {}
    for n, event in enumerate(events):
        if event.unit_id in at_crash and event.from_state == at_crash[event.unit_id] and event.unit_id not in restart:
            restart[event.unit_id] = n
    copying = {u for u in acting if at_crash[u] == "copying"}  # these settle without a move
    last_settle = max(restart[u] for u in acting - copying) if acting - copying else -1
    assert min(restart[u] for u in queued) > last_settle
    assert summaries[0].state == "succeeded" and summaries[0].verified  # type: ignore[attr-defined]


def test_status_counts_match_the_units(tmp_path: Path) -> None:
    async def main() -> str:
        site = _bench_site(6)
        async with site.running():
            return await crash_when(tmp_path, site, copying=3)

    run_id = trio.run(main)
    journal = Journal.open(tmp_path, lock=False)
    assert journal.state_counts(run_id) == dict(Counter(u.state for u in journal.units(run_id)))
    unfinished = journal.units(run_id, unfinished=True)
    assert unfinished and [u.unit_id for u in unfinished] == [u.unit_id for u in journal.unfinished_units()]

