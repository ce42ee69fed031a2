"""The engine end to end against the in-process site, on trio's MockClock.

Every test drives real units through the real state table and journal, then looks at
the site's own state (relationships, freezes, LSS holds, image checks) to judge.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from flowcopy import chaos, definitions, machine, planning, restore_steps
from flowcopy.engine import Engine, Limits
from flowcopy.journal import Journal
from flowcopy.runner import open_engine
from flowcopy.site import api
from flowcopy.site.inventory import generate_lab, load_lab
from flowcopy.site.local import Latency

WORKFLOWS = Path(__file__).resolve().parent.parent / "workflows"


def engine_on(store: Path, site: Any, limits: Limits | None = None) -> Any:
    """The journal of `store` with its writer running and an engine over `site` (as `run` does)."""
    return open_engine(store, site, limits=limits)


async def run_workflow(engine: Engine, site: Any, text_or_path: str | Path) -> Any:
    if isinstance(text_or_path, Path):
        wf = definitions.load_definition(text_or_path)
    else:
        wf = definitions.load_text(text_or_path, "test.yaml")
    specs = await planning.plan_units(wf, site)
    run_id = await engine.begin_run(wf.name, planning.definition_data(wf), specs)
    return await engine.drive_run(run_id)


async def assert_invariants(store: Path, site: Any) -> chaos.Verdict:
    journal = Journal.open(store, lock=False)
    try:
        verdict = await chaos.check_invariants(journal, site)
    finally:
        journal.close()
    assert verdict.problems == ()
    return verdict


async def test_every_example_runs_in_name_order(tmp_path: Path, autojump_clock: Any) -> None:
    site = load_lab(None)
    async with site.running():
        async with engine_on(tmp_path, site) as engine:
            for path in sorted(WORKFLOWS.glob("*.yaml")):
                summary = await run_workflow(engine, site, path)
                assert (path.name, summary.state, summary.verified) == (path.name, "succeeded", True), summary.failures
                assert set(summary.units) == {"succeeded"}
    verdict = await assert_invariants(tmp_path, site)
    assert verdict.runs == len(list(WORKFLOWS.glob("*.yaml")))


async def test_scenario_1_copy_opens_on_second_guest_with_identical_files(tmp_path: Path, autojump_clock: Any) -> None:
    site = load_lab(None)
    async with site.running():
        async with engine_on(tmp_path, site) as engine:
            summary = await run_workflow(engine, site, WORKFLOWS / "10-w2k-e-drive.yaml")
            assert summary.state == "succeeded" and summary.verified
            unit = engine.journal.units(summary.run_id)[0]
            # the copy landed on the second guest's E: and mounts there, unformatted, as a
            # consistent filesystem (byte equality with the source's point in time is
            # shown against the site directly in tests/test_local_site.py)
            target = (await site.lun_of("RICH-W2K-OS-2", "Disk1")).serial
            assert [p["target"] for p in unit.data["pairs"]] == [target]
            report = await site.mount_check("RICH-W2K-OS-2", ["Disk1"])
            assert report.consistent and report.kind == "filesystem"
            assert unit.data["check"]["kind"] == "filesystem"
    # nothing left behind: copy mode withdrawn, no freeze, no hold
    assert await site.query(volume=target) == []


async def test_scenario_2_database_group_is_dependent_write_consistent(tmp_path: Path, autojump_clock: Any) -> None:
    site = load_lab(None)
    async with site.running():
        async with engine_on(tmp_path, site) as engine:
            summary = await run_workflow(engine, site, WORKFLOWS / "20-sql-consistency-group.yaml")
            assert summary.state == "succeeded" and summary.verified
            unit = engine.journal.units(summary.run_id)[0]
            # ours judged the FCDB pair, SQLite judged the bank on the same guest
            assert unit.data["check"]["kind"] == "database+sqlite"
            await site.reboot("RICH-W2K-OS-2")
            report = await site.mount_check("RICH-W2K-OS-2", ["Disk2", "Disk3", "Disk4", "Disk5"])
            assert report.consistent, report.problems
            bank = "25113698+25314698:"
            committed = int(report.summary[bank + "committed_at_establish"])
            assert committed > 0 and int(report.summary[bank + "history"]) >= committed
            events = [e.event for e in engine.journal.events(unit_id=unit.unit_id)]
            assert events == [
                "prepare", "prepared", "freeze", "frozen", "establish", "established",
                "release", "released", "copy", "copied", "withdraw", "succeed",
            ]
    await assert_invariants(tmp_path, site)


async def test_thousand_vms_in_one_run_all_verify(tmp_path: Path, autojump_clock: Any) -> None:
    site = generate_lab(1000, 16, workloads=10, latency=Latency.zero())
    text = """
name: thousand
mode: copy
quiesce: filesystem
units:
  - selector: {backup: nightly}
    disks:
      - {disk: Disk1, target: {pool: targets}}
      - {disk: Disk2, target: {pool: targets}}
    copy: {action: wait}
"""
    async with site.running():
        async with engine_on(tmp_path, site) as engine:
            summary = await run_workflow(engine, site, text)
            assert summary.units == {"succeeded": 1000}
            assert summary.verified
            # group commit: far fewer transactions than moves
            assert engine.journal.transactions < engine.journal.moves_committed / 5
            kinds = {u.data["check"]["kind"] for u in engine.journal.units(summary.run_id)}
            assert "database" in kinds
    assert await site.query() == []
    await assert_invariants(tmp_path, site)


# --------------------------------------------------------------------------- failures


class FailingSite:
    """Delegates to a real site; makes chosen calls fail as the array would refuse them."""

    def __init__(self, inner: Any, fail: dict[str, Any]) -> None:
        self._inner = inner
        self._fail = fail
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._inner, name)
        rule = self._fail.get(name)
        if rule is None:
            return method

        async def wrapped(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            exc = rule(*args, **kwargs)
            if exc is not None:
                raise exc
            return await method(*args, **kwargs)

        return wrapped


THREE_PAIRS = """
name: three-pairs
quiesce: application
units:
  - vm: rhel3-db1
    quiesce: filesystem
    disks:
      - {disk: Disk1, target: "30016698"}
      - {disk: Disk2, target: "35016698"}
      - {disk: Disk3, target: "30116698"}
    copy: {action: wait}
"""


async def test_establish_failing_on_one_pair_of_three_leaves_nothing(tmp_path: Path, autojump_clock: Any) -> None:
    inner = load_lab(None)

    def refuse_third(source: str, target: str, options: api.FlashOptions) -> Exception | None:
        if target == "30116698":
            return api.SizeMismatch(f"cannot establish {source} -> {target}: refused for the test")
        return None

    site = FailingSite(inner, {"establish": refuse_third})
    async with inner.running():
        async with engine_on(tmp_path, site) as engine:
            summary = await run_workflow(engine, site, THREE_PAIRS)
    assert summary.state == "failed"
    (reason,) = summary.failures.values()
    assert "size_mismatch" in reason and "30116698" in reason
    assert site.calls.count("establish") == 3  # two succeeded before the third refused
    for serial in ("30016698", "35016698", "30116698"):
        assert await inner.query(volume=serial) == []
    status = await inner.freeze_status("rhel3-db1")
    assert not status.frozen and not status.lost
    assert await inner.frozen_lsses() == []
    await assert_invariants(tmp_path, inner)


async def test_freeze_lost_in_guest_is_redone(tmp_path: Path, autojump_clock: Any) -> None:
    """The guest thaws itself (freeze timeout) before the establish: detect, withdraw, redo."""
    inner = load_lab(None)
    slow = {"n": 0}

    async def slow_establish(*args: Any, **kwargs: Any) -> Any:
        slow["n"] += 1
        if slow["n"] == 1:
            await trio.sleep(40)  # longer than the 30 s freeze timeout
        return await inner.establish(*args, **kwargs)

    site = FailingSite(inner, {})
    site.establish = slow_establish  # type: ignore[attr-defined]
    async with inner.running():
        async with engine_on(tmp_path, site) as engine:
            summary = await run_workflow(engine, site, WORKFLOWS / "10-w2k-e-drive.yaml")
            unit = engine.journal.units(summary.run_id)[0]
            events = [(e.event, e.payload) for e in engine.journal.events(unit_id=unit.unit_id)]
    assert summary.state == "succeeded" and summary.verified
    redo = [p for e, p in events if e == "redo"]
    assert len(redo) == 1 and "guest's own timeout" in redo[0]["problem"]
    assert unit.data["freeze_attempts"] == 2 and unit.data["freezes_lost"] == 1
    await assert_invariants(tmp_path, inner)


async def test_freeze_lost_every_time_fails_with_reason(tmp_path: Path, autojump_clock: Any) -> None:
    inner = load_lab(None)

    async def slow_establish(*args: Any, **kwargs: Any) -> Any:
        await trio.sleep(40)
        return await inner.establish(*args, **kwargs)

    site = FailingSite(inner, {})
    site.establish = slow_establish  # type: ignore[attr-defined]
    async with inner.running():
        async with engine_on(tmp_path, site) as engine:
            summary = await run_workflow(engine, site, WORKFLOWS / "10-w2k-e-drive.yaml")
    assert summary.state == "failed"
    (reason,) = summary.failures.values()
    assert "gave up after 3 lost freezes" in reason and "guest's own timeout" in reason
    assert await inner.query(volume="20413698") == []
    await assert_invariants(tmp_path, inner)


async def test_cancel_mid_copy_withdraws(tmp_path: Path, autojump_clock: Any) -> None:
    site = load_lab(None)
    text = (WORKFLOWS / "40-hourly-rotation.yaml").read_text()
    async with site.running():
        async with engine_on(tmp_path, site) as engine:
            wf = definitions.load_text(text, "rotation.yaml")
            specs = await planning.plan_units(wf, site)
            run_id = await engine.begin_run(wf.name, planning.definition_data(wf), specs)
            async with trio.open_nursery() as nursery:
                result: dict[str, Any] = {}

                async def drive() -> None:
                    result["summary"] = await engine.drive_run(run_id)

                nursery.start_soon(drive)
                while engine.progress(run_id).get("copying", 0) == 0:
                    await trio.sleep(0.01)
                rels = await site.query(volume="30016698")
                assert len(rels) == 1 and rels[0].out_of_sync_tracks > 0
                await trio.sleep(1.5)
                first = engine.copy_progress(run_id)
                await trio.sleep(1.0)
                second = engine.copy_progress(run_id)
                assert first[1] == second[1] == 4096  # a 256 MiB LUN is 4,096 tracks
                assert 0 < first[0] < second[0] < 4096  # the progress view's figures move
                await engine.cancel(run_id)
    summary = result["summary"]
    assert summary.state == "cancelled" and summary.units == {"cancelled": 1}
    assert await site.query(volume="30016698") == []
    await assert_invariants(tmp_path, site)


async def test_unknown_vm_and_vmfs_disk_fail_in_prepare_with_clear_message(tmp_path: Path, autojump_clock: Any) -> None:
    site = load_lab(None)
    text = """
name: bad-disks
units:
  - vm: no-such-vm
    disks: [{disk: Disk1, target: "30016698"}]
  - vm: rich-w2k-os-1
    disks: [{disk: Disk0, target: "30116698"}]
"""
    async with site.running():
        async with engine_on(tmp_path, site) as engine:
            summary = await run_workflow(engine, site, text)
    assert summary.state == "failed"
    reasons = sorted(summary.failures.values())
    assert any("unknown_vm" in r and "no-such-vm" in r for r in reasons), reasons
    assert any("not_raw_mapped" in r and "VMFS" in r for r in reasons), reasons
    await assert_invariants(tmp_path, site)


def test_state_table_drives_every_step() -> None:
    """Every non-terminal, non-compensating state has exactly one handler in the engine."""
    handled = set(Engine._steps)
    assert handled == set(machine.NON_TERMINAL) - {"compensating"} - set(machine.RESTORE_PATH) | set(machine.FORWARD_PATH[:-1])
    # a restore unit walks the restore path, each of its states handled too
    assert set(restore_steps.STEPS) == set(machine.RESTORE_PATH) - machine.TERMINAL


# --------------------------------------------------------------------------- injected faults


@pytest.mark.parametrize("after_fraction", [0.0, 0.5], ids=["refused", "half-done-reply-lost"])
async def test_transient_array_and_guest_faults_are_retried(tmp_path: Path, autojump_clock: Any, after_fraction: float) -> None:
    """A fifth of all site calls fail transiently — half of them after the site acted
    (the reply was lost). Retries and idempotent stages still bring every unit home."""
    from flowcopy.site.faults import FaultPlan, FaultySite

    inner = generate_lab(60, 4, workloads=4, latency=Latency.zero())
    plan = FaultPlan(seed=7, error_rate=0.2, after_fraction=after_fraction,
                     error_rates={"now": 0.0, "check": 0.0, "list_vms": 0.0, "list_pools": 0.0, "lun_of": 0.0,
                                  "get_volume": 0.0, "query": 0.0})
    site = FaultySite(inner, plan)
    text = chaos.CHAOS_WORKFLOW
    async with inner.running():
        async with engine_on(tmp_path, site) as engine:
            summary = await run_workflow(engine, site, text)
    assert sum(site.injected.values()) > 20  # faults really happened
    assert summary.units == {"succeeded": 60}, summary.failures
    assert summary.verified
    await assert_invariants(tmp_path, inner)


async def test_a_transient_error_inside_a_freeze_window_is_retried_within_it(tmp_path: Path, autojump_clock: Any) -> None:
    """A patient retry policy (12 s first wait) would outlast the 10 s freeze-window bound
    on its first retry; inside the window the engine retries quickly, so no window is
    redone for a transient establish error and no source is held near the bound."""
    from flowcopy.site.faults import FaultPlan, FaultySite

    inner = generate_lab(20, 2, workloads=2, latency=Latency.zero())
    site = FaultySite(inner, FaultPlan(seed=11, error_rates={"establish": 0.3}))
    text = chaos.CHAOS_WORKFLOW.replace("initial_interval: 1s, max_interval: 5s", "initial_interval: 12s, max_interval: 60s")
    assert text != chaos.CHAOS_WORKFLOW
    async with inner.running():
        async with engine_on(tmp_path, site) as engine:
            summary = await run_workflow(engine, site, text)
            redone = [e for e in engine.journal.events(run_id=summary.run_id) if e.event == "redo"]
    assert site.injected.get("establish", 0) >= 5  # faults really happened inside windows
    assert summary.units == {"succeeded": 20}, summary.failures
    assert [e.payload for e in redone] == []
    assert summary.longest_hold < 5.0
    await assert_invariants(tmp_path, inner)


async def test_busy_target_is_refused_in_prepare_before_any_freeze(tmp_path: Path, autojump_clock: Any) -> None:
    site = load_lab(None)
    async with site.running():
        # an admin's hand-made relationship on the second guest's E: (the scenario's target)
        await site.establish("20714698", "20413698", api.FlashOptions(mode=api.CopyMode.NOCOPY, tag="admin"))
        async with engine_on(tmp_path, site) as engine:
            summary = await run_workflow(engine, site, WORKFLOWS / "10-w2k-e-drive.yaml")
            (unit,) = engine.journal.units(summary.run_id)
            events = [e.event for e in engine.journal.events(unit_id=unit.unit_id)]
    assert summary.state == "failed"
    (reason,) = summary.failures.values()
    assert "target 20413698 is already the target of relationship 20714698 -> 20413698" in reason
    assert "freeze" not in events  # refused in prepare: the guest was never quiesced
    assert (await site.freeze_status("rich-w2k-os-1")).freeze_id == 0
    assert [r.tag for r in await site.query(volume="20413698")] == ["admin"]  # not ours: untouched


async def test_consistency_group_spanning_two_vms_freezes_both_and_establishes_all(tmp_path: Path, autojump_clock: Any) -> None:
    site = load_lab(None)
    text = """
name: two-vm-group
quiesce: filesystem
consistency_group: linux-pair
units:
  - vm: rhel3-db1
    disks: [{disk: Disk1, target: "30016698"}]
  - vm: sles8-db1
    disks: [{disk: Disk1, target: "30116698"}]
"""
    async with site.running():
        async with engine_on(tmp_path, site) as engine:
            summary = await run_workflow(engine, site, text)
            (unit,) = engine.journal.units(summary.run_id)  # one group, one unit
    assert summary.state == "succeeded" and summary.verified
    assert set(unit.data["freezes"]) == {"rhel3-db1", "sles8-db1"}
    assert sorted(p["target"] for p in unit.data["pairs"]) == ["30016698", "30116698"]
    for vm in ("rhel3-db1", "sles8-db1"):
        status = await site.freeze_status(vm)
        assert status.freeze_id == unit.data["freezes"][vm] and not status.frozen and not status.lost
    await assert_invariants(tmp_path, site)


async def test_clean_stop_lets_freeze_windows_release_and_resume_finishes(tmp_path: Path, autojump_clock: Any) -> None:
    """SIGTERM's path: no new freezes, units inside a freeze window finish their release,
    the rest stop where they are; nothing stays frozen; a later resume finishes the run."""
    from flowcopy.engine import EngineStopped

    inner = generate_lab(30, 4, latency=Latency.zero())
    site = FailingSite(inner, {})

    async def slow_establish(*args: Any, **kwargs: Any) -> Any:
        await trio.sleep(5)  # well inside the 30 s freeze timeout
        return await inner.establish(*args, **kwargs)

    site.establish = slow_establish  # type: ignore[attr-defined]
    text = """
name: stop
quiesce: filesystem
units:
  - selector: {backup: nightly}
    mode: copy
    disks: [{disk: Disk1, target: {pool: targets}}, {disk: Disk2, target: {pool: targets}}]
    copy: {action: wait}
"""
    async with inner.running():
        # 5 s per establish is past the default freeze-window bound (10 s for the group's
        # holds): give this slow array a bound that fits, so the windows reach their release
        async with engine_on(tmp_path, site, Limits(freezing=8, hold_bound=60.0)) as engine:
            wf = definitions.load_text(text, "stop.yaml")
            run_id = await engine.begin_run(wf.name, planning.definition_data(wf), await planning.plan_units(wf, site))
            with pytest.RaisesGroup(EngineStopped, flatten_subgroups=True) as stopped:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(engine.drive_run, run_id)
                    # 8 intents journaled (Limits.freezing), 2 of them inside their windows (Limits.frozen)
                    while engine.progress(run_id).get("freezing", 0) < 8:
                        await trio.sleep(0.1)
                    await trio.sleep(6)  # the two windows are between their first and second establish
                    engine.stop()
            states = {u.unit_id: u.state for u in engine.journal.units(run_id)}
        (error,) = stopped.value.exceptions
        assert error.units == 30 and "no guest frozen" in str(error)
        assert list(states.values()).count("released") >= 2  # the windows open at the stop finished
        assert list(states.values()).count("prepared") >= 6  # intents whose freeze had not begun stepped back
        assert "establishing" not in states.values() and "freezing" not in states.values()
        for vm in await inner.list_vms():
            status = await inner.freeze_status(vm.name)
            assert not status.frozen and not status.lost, vm.name
        assert await inner.frozen_lsses() == []
        async with engine_on(tmp_path, inner) as engine:
            (summary,) = await engine.resume()
    assert summary.state == "succeeded" and summary.units == {"succeeded": 30}
    await assert_invariants(tmp_path, inner)


async def test_group_mixing_quiesce_levels_freezes_each_vm_at_its_own(tmp_path: Path, autojump_clock: Any) -> None:
    site = load_lab(None)
    text = """
name: mixed-group
consistency_group: mixed
mixed_quiesce: true
units:
  - vm: rhel3-db1
    quiesce: filesystem
    disks: [{disk: Disk1, target: "30016698"}]
  - vm: sles8-db1
    quiesce: none
    disks: [{disk: Disk1, target: "30116698"}]
"""
    async with site.running():
        async with engine_on(tmp_path, site) as engine:
            summary = await run_workflow(engine, site, text)
            (unit,) = engine.journal.units(summary.run_id)
    assert summary.state == "succeeded" and summary.verified
    assert set(unit.data["freezes"]) == {"rhel3-db1"}  # sles8-db1 was never quiesced
    assert (await site.freeze_status("sles8-db1")).freeze_id == 0
    assert (await site.freeze_status("rhel3-db1")).freeze_id == unit.data["freezes"]["rhel3-db1"]
    await assert_invariants(tmp_path, site)


async def test_nightly_export_files_match_their_checksums_and_check_consistent(tmp_path: Path, autojump_clock: Any) -> None:
    import hashlib

    from flowcopy import stages

    site = load_lab(None)
    async with site.running():
        async with engine_on(tmp_path, site) as engine:
            summary = await run_workflow(engine, site, WORKFLOWS / "30-nightly-nocopy-export.yaml")
            units = engine.journal.units(summary.run_id)
    assert summary.state == "succeeded" and summary.verified and len(units) == 4
    for unit in units:
        paths = [e["path"] for e in unit.data["exports"]]
        assert len(paths) == 3  # /data, /db/log, /db/data
        for export in unit.data["exports"]:
            path = Path(export["path"])
            assert path.is_relative_to(tmp_path / "exports" / "nightly" / summary.run_id)
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            assert digest == export["sha256"]
            assert path.with_suffix(".img.sha256").read_text() == f"{digest}  {path.name}\n"
        report = stages.check_exported(paths)
        assert report.consistent and set(report.kind.split("+")) <= {"database", "filesystem"}, report
    # nocopy: nothing left on the array once exported
    assert [r for r in await site.query() if (r.tag or "").startswith("fc:")] == []


async def test_export_through_an_unknown_backup_host_fails_with_its_name(tmp_path: Path, autojump_clock: Any) -> None:
    site = load_lab(None)
    text = (WORKFLOWS / "30-nightly-nocopy-export.yaml").read_text().replace("host: backup-proxy", "host: no-such-proxy")
    async with site.running():
        async with engine_on(tmp_path, site) as engine:
            summary = await run_workflow(engine, site, text)
    assert summary.state == "failed"
    assert all("no-such-proxy" in reason for reason in summary.failures.values()), summary.failures
    assert [r for r in await site.query() if (r.tag or "").startswith("fc:")] == []
    await assert_invariants(tmp_path, site)


async def _image(site: Any, serial: str) -> bytes:
    """A volume's written bytes, extent by extent (what a restore must bring back)."""
    out = bytearray()
    for extent in await site.extents(serial):
        out += extent.offset.to_bytes(8, "big") + await site.read(serial, extent.offset, extent.length)
    return bytes(out)


async def test_incremental_backups_restore_and_backup_again(tmp_path: Path, autojump_clock: Any) -> None:
    """50 twice (establish, then resync), 60 (reverse restore: the source is again the
    last backup, byte for byte), then 50 again (the pair turned back, changed tracks only)."""
    site = load_lab(None)
    source, target = "24014698", "36116698"
    async with site.running():
        async with engine_on(tmp_path, site) as engine:
            first = await run_workflow(engine, site, WORKFLOWS / "50-incremental.yaml")
            await trio.sleep(30)  # the guest's filesystem workload keeps writing
            second = await run_workflow(engine, site, WORKFLOWS / "50-incremental.yaml")
            await site.stop_workload("sles9-fs")  # the admin stops the application before a restore
            backup = await _image(site, target)
            await trio.sleep(30)
            assert await _image(site, source) != backup  # the source moved on since the backup
            restore = await run_workflow(engine, site, WORKFLOWS / "60-restore-incremental.yaml")
            assert await _image(site, source) == backup  # restored to the backup, byte for byte
            third = await run_workflow(engine, site, WORKFLOWS / "50-incremental.yaml")
            calls = {s.run_id: [e.event for e in engine.journal.events(run_id=s.run_id)] for s in (first, second, third)}
    for summary in (first, second, restore, third):
        assert summary.state == "succeeded" and summary.verified, summary.failures
    assert all(events[-1] == "succeed" for events in calls.values())
    (rel,) = await site.query(volume=target)
    assert (rel.source, rel.target, rel.recording) == (source, target, True)  # kept, forward again
    assert rel.tag is not None and rel.tag.startswith(f"fc:{third.run_id}:")
    await assert_invariants(tmp_path, site)


async def test_two_runs_sharing_a_vm_never_overlap_their_freezes(tmp_path: Path, autojump_clock: Any) -> None:
    """Two workflows on rich-w2k-os-1 at once (E: and the SQL group): each freeze window
    waits for the other, so neither thaws the other's freeze and no freeze is lost."""
    inner = load_lab(None)
    site = FailingSite(inner, {})

    async def slow_establish(*args: Any, **kwargs: Any) -> Any:
        await trio.sleep(1)  # a freeze window long enough for the other run to walk into
        return await inner.establish(*args, **kwargs)

    site.establish = slow_establish  # type: ignore[attr-defined]
    async with inner.running():
        async with engine_on(tmp_path, site) as engine:
            results: dict[str, Any] = {}

            async def one(name: str) -> None:
                results[name] = await run_workflow(engine, site, WORKFLOWS / name)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(one, "10-w2k-e-drive.yaml")
                nursery.start_soon(one, "20-sql-consistency-group.yaml")
            redo = [e for s in results.values() for e in engine.journal.events(run_id=s.run_id) if e.event == "redo"]
    assert all(s.state == "succeeded" and s.verified for s in results.values())
    assert redo == []
    await assert_invariants(tmp_path, inner)


EXT4_BACKUP = """
name: rhel3-srv-ext4
description: ext4 /srv of rhel3-db1 (made by mke2fs), filesystem quiesce, exported via backup-proxy
mode: nocopy
quiesce: filesystem
freeze_timeout: 30s
copy: {action: export, to: exports/ext4, host: backup-proxy}
withdraw: always
units:
  - vm: rhel3-db1
    disks:
      - {disk: Disk4, target: {pool: spare-64m}}
"""


async def test_real_ext4_guest_backup_passes_e2fsck(tmp_path: Path, autojump_clock: Any) -> None:
    from flowcopy.site.apps import ext4_check

    site = load_lab(None)
    async with site.running():
        await site.start_workload("rhel3-ext4")
        ext4 = site.workloads["rhel3-ext4"]
        await ext4.progress.wait(30)  # formatted by mke2fs and changed by debugfs a few times
        async with engine_on(tmp_path, site) as engine:
            summary = await run_workflow(engine, site, EXT4_BACKUP)
            assert summary.state == "succeeded" and summary.verified, summary.failures
            unit = engine.journal.units(summary.run_id)[0]
            assert unit.data["check"]["kind"] == "ext4"
            (exported,) = unit.data["exports"]
        assert ext4.ops >= 3
    # the stored image, judged again from the file: e2fsck -fn clean, files readable by debugfs
    with open(exported["path"], "rb") as f:
        def read(serial: str, offset: int, length: int) -> bytes:
            f.seek(offset)
            return f.read(length).ljust(length, b"\0")

        report = ext4_check.check_ext4(read, "image")
    assert report.consistent and report.summary["e2fsck_exit"] == "0", report.problems
    assert int(report.summary["files"]) >= 2
    await assert_invariants(tmp_path, site)
