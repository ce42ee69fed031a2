"""Several engines on one PostgreSQL journal: claims, leases, fencing, take-over, slots.

Against a real PostgreSQL server (the session's `pg_server`), each test its own database.
Leases are real time (the database's clock), so these tests use short leases and a real
clock, and wait well past expiry rather than measure anything.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from flowcopy import definitions, planning
from flowcopy.bench import BENCH_WORKFLOW, _bench_site
from flowcopy.chaos import check_invariants
from flowcopy.cluster import FencedSite, SharedLssHolds, driving
from flowcopy.engine import Engine, Limits
from flowcopy.journal import Journal, LeaseLost, Move, RunRow, UnitRow
from flowcopy.journal.postgres import PgJournal
from flowcopy.site import api
from flowcopy.site.inventory import generate_lab
from flowcopy.site.local import Latency


def units_for(run_id: str, n: int) -> list[UnitRow]:
    return [UnitRow(unit_id=f"{run_id}/u{i}", run_id=run_id) for i in range(n)]


async def _writer(journal: Journal, nursery: trio.Nursery) -> Journal:
    await nursery.start(journal.run_writer)
    return journal


@contextlib.asynccontextmanager
async def engine_journals(pg_url: str, *leases: float) -> AsyncIterator[list[PgJournal]]:
    """One engine journal per lease period, each writing; all closed (their units given
    back) on the way out, whatever the test did."""
    journals: list[PgJournal] = []
    try:
        for lease in leases:
            journals.append(PgJournal.open(pg_url, lease_period=lease))
        async with trio.open_nursery() as nursery:
            for journal in journals:
                await nursery.start(journal.run_writer)
            yield journals
            nursery.cancel_scope.cancel()
    finally:
        for journal in journals:
            journal.close()


async def test_claims_are_exclusive_and_every_write_is_fenced(pg_url: str) -> None:
    async with engine_journals(pg_url, 1.0, 30.0) as (a, b):
        await a.begin_run(RunRow("r1", "wf", {}), units_for("r1", 4), hold=False)
        a_first = a.engine_id
        assert [u.unit_id for u in await a.claim(limit=2)] == ["r1/u0", "r1/u1"]
        # a fair share of what is free: 2 free units over 2 live engines -> 1 per claim
        assert [u.unit_id for u in await b.claim(limit=5)] == ["r1/u2"]
        assert [u.unit_id for u in await b.claim(limit=5)] == ["r1/u3"]
        assert await a.claim() == [] and await b.claim() == []  # nothing left unheld
        assert await a.record(Move("r1/u0", "pending", "preparing", "prepare")) == 1
        with pytest.raises(LeaseLost, match=r"unit r1/u0: lease lost \(this engine does not hold it"):
            await b.record(Move("r1/u0", "preparing", "prepared", "prepared"))  # a's unit
        holders = {lease.unit_id: lease.engine_id for lease in b.leases()}
        assert holders == {"r1/u0": a.engine_id, "r1/u1": a.engine_id, "r1/u2": b.engine_id, "r1/u3": b.engine_id}

        # a stops renewing (a paused engine): past its lease, b takes its units over
        await trio.sleep(1.5)
        taken = await b.claim()
        assert [u.unit_id for u in taken] == ["r1/u0", "r1/u1"] and taken[0].state == "preparing"
        # the woken engine's stale write is refused in the transaction that would write it
        with pytest.raises(LeaseLost, match="now held by .* at epoch 2, ours was 1; write refused"):
            await a.record(Move("r1/u0", "preparing", "prepared", "prepared"))
        assert a.stale_refused == 1
        assert a.unit("r1/u0").state == "preparing" and a.unit("r1/u0").seq == 1
        assert await b.record(Move("r1/u0", "preparing", "prepared", "prepared")) == 2
        # its renewal learns the lease was lost; a fresh lease holds nothing of the old
        old_id = a.engine_id
        assert await a.renew() is False
        assert not a.holds("r1/u1")
        assert a.engine_id != old_id  # goes on as a new engine, holding nothing
        assert await a.renew() is True
        events = b.events(unit_id="r1/u0")
        assert [e.engine for e in events] == [a_first, b.engine_id]
    with Journal.open(pg_url, lock=False) as reader:
        engines = reader.engines()
        assert len(engines) == 3 and not any(e.live for e in engines)  # a, a anew after its expiry, b: none live
        assert all(lease.engine_id is None for lease in reader.leases())  # close gave units back


async def test_expired_engine_writes_nothing_even_before_take_over(pg_url: str) -> None:
    a = PgJournal.open(pg_url, lease_period=0.5)
    try:
        async with trio.open_nursery() as nursery:
            await _writer(a, nursery)
            await a.begin_run(RunRow("r1", "wf", {}), units_for("r1", 1))
            await trio.sleep(1.0)  # nobody claimed it, but the lease ran out
            with pytest.raises(LeaseLost, match="this engine's lease expired; write refused"):
                await a.record(Move("r1/u0", "pending", "preparing", "prepare"))
            assert a.unit("r1/u0").seq == 0
            nursery.cancel_scope.cancel()
    finally:
        a.close()


async def test_site_calls_of_a_unit_run_only_inside_its_lease(pg_url: str) -> None:
    site = _bench_site(2)
    journal = PgJournal.open(pg_url, lease_period=0.8)
    try:
        async with site.running(), trio.open_nursery() as nursery:
            await _writer(journal, nursery)
            fenced = FencedSite(site, journal)
            await journal.begin_run(RunRow("r1", "wf", {}), units_for("r1", 1))
            assert math.isfinite(journal.lease_deadline())
            with driving("r1/u0"):
                await fenced.now()  # inside the lease: the call is made
                await trio.sleep(0.8)  # past expiry minus the margin
                with pytest.raises(LeaseLost, match="site call list_vms not made"):
                    await fenced.list_vms()
            assert fenced.refused == 1
            assert await fenced.list_vms()  # not for a unit: not fenced
            nursery.cancel_scope.cancel()
    finally:
        journal.close()


async def test_a_stale_engine_is_refused_by_the_site_itself(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The residual window of the engine's own check (paused after it): modelled by an
    engine that does not check its lease clock at all; the site's fence alone refuses it."""
    monkeypatch.setenv("FLOWCOPY_LEASE_CHECK", "site")
    site = _bench_site(2)
    vm = (await site.list_vms())[0]
    source = vm.disks[0].serial
    target = (await site.list_pools())[f"targets:{vm.name}"][0]
    # a: a lease long enough for a loaded machine to claim within it
    async with site.running(), engine_journals(pg_url, 3.0, 30.0) as (a, b):
        await a.begin_run(RunRow("r1", "wf", {}), units_for("r1", 1), hold=False)
        assert [u.unit_id for u in await a.claim()] == ["r1/u0"] and a.fence_epoch("r1/u0") == 1
        stale, fresh = FencedSite(site, a), FencedSite(site, b)
        assert not stale.check_lease
        with driving("r1/u0", a.fence_epoch("r1/u0")):
            await stale.query(volume=source)  # epoch 1 reaches the site
        await trio.sleep(3.5)  # a is paused past its lease; b takes the unit over
        assert [u.unit_id for u in await b.claim()] == ["r1/u0"] and b.fence_epoch("r1/u0") == 2
        with driving("r1/u0", 2):
            assert await fresh.query(volume=source) == []  # the new holder's reconciling look
        with driving("r1/u0", 1):  # a wakes, believing its claim still holds
            with pytest.raises(LeaseLost, match="the site refused establish: site call establish for r1/u0 refused"):
                await stale.establish(source, target, api.FlashOptions())
            with pytest.raises(LeaseLost, match="epoch 1, but epoch 2"):
                await stale.quiesce(vm.name, api.QuiesceLevel.FILESYSTEM, 30)
        assert stale.refused_by_site == 2 and stale.refused == 0  # the site refused, not the engine
        assert await site.query(volume=source) == [] and not (await site.freeze_status(vm.name)).frozen
        assert site.fences.refused == 2


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_a_slot_is_dealt_with_once_across_services(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    spec: Path | str = tmp_path / "store" if backend == "sqlite" else request.getfixturevalue("pg_url")
    first = Journal.open(spec)
    second = Journal.open(spec) if backend == "postgresql" else None  # SQLite: one engine per store
    try:
        async with trio.open_nursery() as nursery:
            await _writer(first, nursery)
            other = first
            if second is not None:
                other = await _writer(second, nursery)
            slot = "2026-12-01T23:00:00+00:00"
            assert await first.claim_slot("wf", slot, "fire", "on schedule") is True
            assert await other.claim_slot("wf", slot, "fire", "on schedule") is False
            assert await other.claim_slot("wf", "2026-12-01T23:01:00+00:00", "skip", "paused") is True
            assert await other.claim_slot("other", slot, "fire", "on schedule") is True
            assert first.last_slot("wf") == "2026-12-01T23:01:00+00:00" and first.last_slot("nope") is None
            assert [(s["slot"][11:16], s["outcome"]) for s in first.slots("wf")] == [("23:00", "fire"), ("23:01", "skip")]
            nursery.cancel_scope.cancel()
    finally:
        first.close()
        if second is not None:
            second.close()


async def test_two_engines_share_a_run_and_every_invariant_holds(pg_url: str, tmp_path: Path) -> None:
    vms = 24
    site = _bench_site(vms)
    wf = definitions.load_text(BENCH_WORKFLOW, "bench.yaml")
    journals = [PgJournal.open(pg_url, lease_period=10.0) for _ in range(2)]
    try:
        async with site.running(), trio.open_nursery() as nursery:
            engines = []
            for i, journal in enumerate(journals):
                await _writer(journal, nursery)
                engine = Engine(journal, site, store=tmp_path / f"e{i}", limits=Limits(units=vms), poll=0.05)
                engine.claim_batch = 4
                await nursery.start(engine.keep_leases)
                engines.append(engine)
            specs = await planning.plan_units(wf, site)
            run_id = await engines[0].begin_run(wf.name, planning.definition_data(wf), specs)
            summaries = {}

            async def drive(i: int) -> None:
                summaries[i] = await engines[i].drive_run(run_id)

            async with trio.open_nursery() as inner:
                for i in range(2):
                    inner.start_soon(drive, i)
            assert {s.state for s in summaries.values()} == {"succeeded"}
            assert sum(e.units_done for e in engines) == vms
            assert all(e.units_done > 0 for e in engines), [e.units_done for e in engines]
            verdict = await check_invariants(journals[0], site)
            assert verdict.ok, verdict.problems
            assert journals[0].run(run_id).state == "succeeded"
            nursery.cancel_scope.cancel()
    finally:
        for journal in journals:
            journal.close()


async def test_a_unit_holding_nothing_never_unfreezes_an_lss_another_live_engine_freezes(pg_url: str) -> None:
    """A taken-over or compensating unit releases the LSSs of its consistency group; one
    another live engine owns (its group is frozen there) is left to that engine's unfreeze."""
    async with engine_journals(pg_url, 30.0, 30.0) as (a, b):
        a_holds, b_holds = SharedLssHolds(a), SharedLssHolds(b)
        await a_holds.acquire(["10"])  # a's group is frozen on LSS 10
        assert await b_holds.claim_unheld(["10", "11"]) == ["11"]  # b may unfreeze 11 only
        b_holds.unfrozen(["11"])
        assert a_holds.release(["10"]) == ["10"]
        a_holds.unfrozen(["10"])
        await trio.sleep(0.5)  # a gives LSS 10 back in the background
        assert await b_holds.claim_unheld(["10"]) == ["10"]  # nobody's group now: b may
        b_holds.unfrozen(["10"])


async def test_an_old_owners_unfreeze_never_releases_a_newer_owners_freeze(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """An unfreeze releases every frozen source of an LSS. Engine a owns LSS L and froze a
    source there, then is paused past its lease; engine b owns L now (a newer epoch) and
    freezes its own group there. When a wakes, its unit's lease may still look valid to it,
    and its unfreeze of L would cut b's consistency group short: the site refuses it, because
    the call carries a's ownership epoch of L and b's freeze carried a higher one."""
    monkeypatch.setenv("FLOWCOPY_LEASE_CHECK", "site")  # a does not check its own clock (paused after it)
    site = generate_lab(4, 2, capacity=4 << 20, latency=Latency.zero())  # two VMs per LSS
    vms = await site.list_vms()
    pools = await site.list_pools()
    lss_of = {vm.name: (await site.get_volume(vm.disks[0].serial)).lss for vm in vms}
    lss = next(x for x in lss_of.values() if list(lss_of.values()).count(x) >= 2)
    same = [vm for vm in vms if lss_of[vm.name] == lss][:2]
    (a_src, a_tgt), (b_src, b_tgt) = ((vm.disks[0].serial, pools[f"targets:{vm.name}"][0]) for vm in same)
    async with site.running(), engine_journals(pg_url, 3.0, 30.0) as (a, b):
        await a.begin_run(RunRow("r1", "wf", {}), units_for("r1", 2), hold=False)
        assert [u.unit_id for u in await a.claim(limit=1)] == ["r1/u0"]
        a_holds, b_holds = SharedLssHolds(a), SharedLssHolds(b)
        a_site, b_site = FencedSite(site, a), FencedSite(site, b)
        frozen = api.FlashOptions(mode=api.CopyMode.NOCOPY, freeze=True)
        await a_holds.acquire([lss])
        assert a_holds.fences([lss]) == (api.Fence(f"lss {lss}", 1),)
        with driving("r1/u0", a.fence_epoch("r1/u0")), api.fence_scope(*a_holds.fences([lss])):
            await a_site.establish(a_src, a_tgt, frozen)  # a's group: frozen on L
        await trio.sleep(3.5)  # a is paused past its lease
        assert [u.unit_id for u in await b.claim()] == ["r1/u0", "r1/u1"]
        await b_holds.acquire([lss])  # a's lease ran out: b may own L, under epoch 2
        assert b_holds.fences([lss]) == (api.Fence(f"lss {lss}", 2),)
        with driving("r1/u1", b.fence_epoch("r1/u1")), api.fence_scope(*b_holds.fences([lss])):
            await b_site.establish(b_src, b_tgt, frozen)  # b's group: frozen on L too
        # a wakes and, for a unit whose new holder has not reached the site yet (its
        # fence alone would pass), releases what it believes is its own LSS
        with driving("r1/u0", 1), api.fence_scope(*a_holds.fences([lss])):
            with pytest.raises(LeaseLost, match=f"the site refused unfreeze: site call unfreeze for lss {lss} refused: "
                                                "it carries lease epoch 1, but epoch 2"):
                await a_site.unfreeze([lss])
        held = {f.lss: f.sources for f in await site.frozen_lsses()}
        assert b_src in held[lss], held  # b's consistency group still holds its source
        with driving("r1/u1", b.fence_epoch("r1/u1")), api.fence_scope(*b_holds.fences([lss])):
            await b_site.unfreeze([lss])  # b's own unfreeze, when its group is done
        assert lss not in {f.lss for f in await site.frozen_lsses()}
