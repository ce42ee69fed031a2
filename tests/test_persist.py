"""Durable site state: acknowledged means on disk, reopen is exactly where the site was.

A "crash" in-process is a copy of the state folder's files taken right after a call
returned (nothing is committed behind a caller's back, so the copy is what a kill -9
would leave); the real SIGKILL is in test_served_site.
"""

from __future__ import annotations

import shutil
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from flowcopy.site import api, codec
from flowcopy.site.api import CopyMode, FlashOptions, QuiesceLevel
from flowcopy.site.faults import FaultPlan, LssOutage
from flowcopy.site.persist import STATE_FILE, SiteClock, StateError, open_site

E1, E2 = "20313698", "20413698"
SPARES = [f"3{n:02d}16698" for n in range(0, 24)]
VMS = ["rich-w2k-os-1", "rhel3-db1", "sles9-db1"]


def crash_copy(state: Path, dest: Path) -> Path:
    """The files a SIGKILL would leave now (main db + WAL), copied aside."""
    dest.mkdir(parents=True)
    for name in (STATE_FILE, STATE_FILE + "-wal"):
        if (state / name).exists():
            shutil.copy2(state / name, dest / name)
    return dest


async def observe(site: Any) -> dict[str, Any]:
    """What any caller can see of the site (the internal representation may differ)."""
    volumes = sorted({SPARES[0], SPARES[1], SPARES[2], E1, E2})
    return {
        "now": await site.now(),
        "relationships": await site.query(),
        "frozen": await site.frozen_lsses(),
        "freezes": [await site.freeze_status(vm) for vm in VMS],
        "vms": await site.list_vms(),
        "tasks": await site.list_tasks(),
        "disks": await site.list_disks("esx-x440"),
        "data": {v: [(e, await site.read(v, e.offset, e.length)) for e in await site.extents(v)] for v in volumes},
    }


async def mutate(site: Any) -> None:
    await site.write(SPARES[0], 100, b"persisted bytes" * 50)
    await site.establish(SPARES[0], SPARES[1], FlashOptions(tag="p1"))
    await site.write(SPARES[0], 100, b"overwritten after the point in time")
    await site.establish(E1, E2, FlashOptions(mode=CopyMode.NOCOPY, freeze=True, tag="cg"))
    await site.quiesce("rhel3-db1", QuiesceLevel.FILESYSTEM, 600)
    await site.quiesce("sles9-db1", QuiesceLevel.APPLICATION, 5)
    await site.power_off("rich-w2k-os-1")
    await site.prime("esx-x440")
    await trio.sleep(2)
    await site.save_task(api.SavedTask("t", ((SPARES[2], SPARES[3]),), FlashOptions(mode=CopyMode.NOCOPY)))
    await site.execute_task("t", tag="task")  # last, and the caller copies the files at once


async def test_reopen_after_a_crash_sees_every_acknowledged_call(tmp_path: Path, autojump_clock: object) -> None:
    async with open_site(tmp_path / "a", workloads=False) as site:
        await mutate(site)
        crash_copy(tmp_path / "a", tmp_path / "crashed")  # no checkpoint since the last reply
        seen = await observe(site)
    async with open_site(tmp_path / "crashed", workloads=False) as restored:
        assert await observe(restored) == seen
        rows = sqlite3.connect(tmp_path / "crashed" / STATE_FILE).execute("SELECT count(*) FROM log").fetchone()[0]
        assert rows > 0, "the crash copy was restored by replaying the log"


async def test_clean_close_snapshots_and_truncates_the_log(tmp_path: Path, autojump_clock: object) -> None:
    async with open_site(tmp_path / "a", workloads=False) as site:
        await mutate(site)
        seen = await observe(site)
    db = sqlite3.connect(tmp_path / "a" / STATE_FILE)
    assert db.execute("SELECT count(*) FROM log").fetchone()[0] == 0
    assert db.execute("SELECT upto FROM snapshot").fetchone()[0] >= 10
    assert db.execute("PRAGMA freelist_count").fetchone()[0] == 0, "the truncated log's pages went back"
    db.close()
    async with open_site(tmp_path / "a", workloads=False) as restored:
        assert await observe(restored) == seen


async def test_compaction_every_n_mutations(tmp_path: Path, autojump_clock: object) -> None:
    async with open_site(tmp_path / "a", workloads=False, compact_every=7) as site:
        for i in range(30):
            await site.write(SPARES[2], i * 4096, f"block {i}".encode())
        crash_copy(tmp_path / "a", tmp_path / "crashed")
        db = sqlite3.connect(tmp_path / "a" / STATE_FILE)
        upto = db.execute("SELECT upto FROM snapshot").fetchone()[0]
        left = db.execute("SELECT count(*) FROM log").fetchone()[0]
        db.close()
        assert upto >= 28 and left < 7, (upto, left)
        seen = await observe(site)
    async with open_site(tmp_path / "crashed", workloads=False) as restored:
        assert await observe(restored) == seen
        assert await restored.read(SPARES[2], 29 * 4096, 8) == b"block 29"


async def test_time_effects_continue_after_reopen(tmp_path: Path, autojump_clock: object) -> None:
    async with open_site(tmp_path / "a", workloads=False) as site:
        rel = await site.establish(SPARES[0], SPARES[1], FlashOptions())
        await site.establish(E1, E2, FlashOptions(mode=CopyMode.NOCOPY, freeze=True))
        (frozen,) = await site.frozen_lsses()
        ticket = await site.quiesce("rhel3-db1", QuiesceLevel.FILESYSTEM, 60)
        await trio.sleep(2)
        (before,) = await site.query(volume=SPARES[0])
    await trio.sleep(1)  # "down" for a second of site time
    async with open_site(tmp_path / "a", workloads=False) as site:
        (after,) = await site.query(volume=SPARES[0])
        assert after.out_of_sync_tracks < before.out_of_sync_tracks
        assert after.created == rel.created
        assert await site.frozen_lsses() == [frozen]
        await trio.sleep(frozen.deadline - await site.now() + 0.001)
        assert await site.frozen_lsses() == []
        status = await site.freeze_status("rhel3-db1")
        assert not status.frozen and status.lost and status.thawed_at == ticket.deadline
        assert await site.query(volume=SPARES[0]) == [], "the copy finished and dissolved"


async def test_workloads_resume_from_their_disks(tmp_path: Path, autojump_clock: object) -> None:
    async with open_site(tmp_path / "a", workloads=["orders-fs", "sql-db"]) as site:
        await trio.sleep(10)
        fs_ops = site.local.workloads["orders-fs"].ops
        db_seq = site.local.workloads["sql-db"].seq
        assert fs_ops > 5 and db_seq > 50
        crash_copy(tmp_path / "a", tmp_path / "crashed")
        seen_at_crash = {w: site.local.workloads[w].describe() for w in ("orders-fs", "sql-db")}
    async with open_site(tmp_path / "crashed", workloads=["orders-fs", "sql-db"]) as site:
        await trio.sleep(0.01)
        fs, db = site.local.workloads["orders-fs"], site.local.workloads["sql-db"]
        # the guests re-read their disks: they continue from the last operation the array holds
        assert fs.ops >= seen_at_crash["orders-fs"]["operations"] - 1
        assert db.seq >= seen_at_crash["sql-db"]["transactions"] - 1
        await trio.sleep(10)
        assert fs.ops > seen_at_crash["orders-fs"]["operations"]
        report = await site.check(["20313698"])
        assert report.consistent and report.kind == "filesystem", report.problems


async def test_group_commit_batches_concurrent_callers(tmp_path: Path, autojump_clock: object) -> None:
    async with open_site(tmp_path / "a", workloads=False) as site:
        commits_before = site.log.commits
        async with trio.open_nursery() as nursery:
            for i in range(200):
                nursery.start_soon(site.write, SPARES[3], i * 4096, b"x" * 100)
        assert site.log.committed == site.log.appended
        assert site.log.commits - commits_before <= 5, "200 concurrent writes share a few transactions"


async def test_threaded_group_commit_on_the_real_clock(tmp_path: Path) -> None:
    async with open_site(tmp_path / "a", workloads=False, clock="wall") as site:
        assert site.log._threaded
        async with trio.open_nursery() as nursery:
            for i in range(12):
                nursery.start_soon(site.establish, SPARES[i], SPARES[12 + i], FlashOptions(mode=CopyMode.NOCOPY))
            for i in range(100):
                nursery.start_soon(site.write, E1, i * 4096, b"y" * 10)
        assert len(await site.query()) == 12
        assert site.log.committed == site.log.appended and site.log.commits < 112
        crash_copy(tmp_path / "a", tmp_path / "crashed")
    async with open_site(tmp_path / "crashed", workloads=False, clock="wall") as site:
        assert len(await site.query()) == 12


async def test_wall_clock_keeps_running_across_restarts(tmp_path: Path) -> None:
    async with open_site(tmp_path / "a", workloads=False, clock="wall", speed=50) as site:
        before = await site.now()
        wall = time.time()
    await trio.sleep(0.2)
    async with open_site(tmp_path / "a", workloads=False, clock="wall", speed=1) as site:
        after = await site.now()
        assert after >= before + (time.time() - wall - 0.05) * 50 - 50 * 0.05
        assert after >= before + 5, "0.2 s of downtime at speed 50 is 10 site seconds"
        assert site.clock.speed == 1


def test_site_clock_never_goes_back() -> None:
    clock = SiteClock(kind="wall", anchor_reading=time.time() + 1000, anchor_site=500.0, speed=1.0, floor=600.0)
    assert clock.now() == 600.0  # the wall clock is "behind" the anchor: hold still at the floor
    resumed = SiteClock.resume(clock.to_meta(), kind="wall", speed=2.0, floor=700.0)
    assert resumed.now() >= 700.0 and resumed.speed == 2.0


async def test_one_process_per_state_folder(tmp_path: Path, autojump_clock: object) -> None:
    async with open_site(tmp_path / "a", workloads=False):
        with pytest.raises(StateError, match="in use by pid"):
            async with open_site(tmp_path / "a", workloads=False):
                pass
    async with open_site(tmp_path / "a", workloads=False):  # released on close
        pass


async def test_lab_mismatch_and_unreadable_state(tmp_path: Path, autojump_clock: object) -> None:
    lab = tmp_path / "lab.yaml"
    from importlib import resources

    lab.write_text(resources.files("flowcopy").joinpath("labs", "default.yaml").read_text())
    other = tmp_path / "other.yaml"
    other.write_text(lab.read_text())
    async with open_site(tmp_path / "a", lab=lab, workloads=False):
        pass
    async with open_site(tmp_path / "a", lab=lab, workloads=False):  # the same lab: fine
        pass
    async with open_site(tmp_path / "a", workloads=False):  # no lab given: the state's own
        pass
    with pytest.raises(StateError, match="created from lab"):
        async with open_site(tmp_path / "a", lab=other, workloads=False):
            pass
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / STATE_FILE).write_bytes(b"this is not a database" * 100)
    with pytest.raises(StateError, match="site state"):
        async with open_site(bad, workloads=False):
            pass


async def test_a_log_that_does_not_replay_is_refused_by_name(tmp_path: Path, autojump_clock: object) -> None:
    async with open_site(tmp_path / "a", workloads=False) as site:
        await site.write(SPARES[0], 0, b"ok")
        crash_copy(tmp_path / "a", tmp_path / "crashed")
    db = sqlite3.connect(tmp_path / "crashed" / STATE_FILE)
    db.execute(
        "INSERT INTO log (seq, site_time, component, method, kwargs) VALUES (999999, 0, 'array', 'withdraw', ?)",
        (codec.dump_plain({"source": SPARES[0], "target": SPARES[1], "now": 0.0}),),
    )
    db.commit()
    db.close()
    with pytest.raises(StateError, match=r"mutation 999999 \(array.withdraw\) does not replay"):
        async with open_site(tmp_path / "crashed", workloads=False):
            pass


async def test_a_failed_commit_is_never_acknowledged(tmp_path: Path, autojump_clock: object, monkeypatch: pytest.MonkeyPatch) -> None:
    outcome: list[BaseException] = []
    try:
        async with open_site(tmp_path / "a", workloads=False) as site:
            def broken(*args: Any, **kwargs: Any) -> None:
                raise sqlite3.OperationalError("disk I/O error")

            monkeypatch.setattr(site.log._store, "commit", broken)
            try:
                await site.establish(SPARES[0], SPARES[1], FlashOptions())
            except api.SiteUnavailable as exc:
                outcome.append(exc)
            else:
                outcome.append(AssertionError("acknowledged without a commit"))
    except BaseException as exc:  # noqa: BLE001 - the site stops: it cannot keep its promise
        outcome.append(exc)
    assert outcome and not isinstance(outcome[0], AssertionError)
    assert any("disk I/O error" in repr(e) for e in outcome)


async def test_fault_plan_from_the_lab_and_its_persistence(tmp_path: Path, autojump_clock: object) -> None:
    from importlib import resources

    text = resources.files("flowcopy").joinpath("labs", "default.yaml").read_text()
    lab = tmp_path / "faulty.yaml"
    lab.write_text(text + "\nfaults:\n  seed: 4\n  offline_lsses:\n    - {lss: '16', start: 0, end: 1000000}\n")
    async with open_site(tmp_path / "a", lab=lab, workloads=False) as site:
        assert site.faults.plan.offline_lsses == (LssOutage(lss="16", start=0.0, end=1000000.0),)
        with pytest.raises(api.VolumeOffline):
            await site.establish(SPARES[0], SPARES[1], FlashOptions())
        site.faults.set_plan(FaultPlan(seed=9))
        await site.sync()
    async with open_site(tmp_path / "a", workloads=False) as site:
        assert site.faults.plan == FaultPlan(seed=9), "the plan set over the API survives a restart"
        await site.establish(SPARES[0], SPARES[1], FlashOptions())
    bad = tmp_path / "bad.yaml"
    bad.write_text(text + "\nfaults:\n  error_rate: 7\n")
    with pytest.raises(api.BadRequest, match="error_rate must be between 0 and 1"):
        async with open_site(tmp_path / "b", lab=bad, workloads=False):
            pass


async def test_bench_embedded_runs_the_same_units_on_both_sites() -> None:
    from flowcopy.site.persist import bench_embedded

    plain, durable, closing = await bench_embedded(20, concurrency=5)
    assert plain["name"] == "plain LocalSite" and durable["name"] == "durable site"
    assert durable["mutations"] == 20 * 7, "quiesce, 2 establishes, unfreeze, thaw, 2 withdraws per VM"
    assert 0 < durable["commits"] <= durable["mutations"]
    assert closing["reopen_seconds"] > 0
