"""Restores end to end against the in-process site on trio's MockClock: the seed's
scenario 2 back onto its original LUNs, and from an exported image onto the second
guest's LUNs; the guest reboots and the independent checker judges the database."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from flowcopy import definitions, planning
from flowcopy.backups import catalog
from flowcopy.backups.commands import start_restore
from flowcopy.backups.restore import RestoreRefused, make_plan
from flowcopy.site.inventory import load_lab

from .test_engine import WORKFLOWS, assert_invariants, engine_on

SQL_LOG, SQL_DATA = "20513698", "20714698"
SECOND_LOG, SECOND_DATA = "20613698", "20814698"

SQL_EXPORT = """
name: sql-export
units:
  - vm: rich-w2k-os-1
    quiesce: application
    freeze_timeout: 20s
    consistency_group: w2k-sql
    disks:
      - {disk: Disk2, target: {pool: spare-128m}}
      - {disk: Disk3, target: {pool: spare-256m}}
    copy: {action: export, to: exports/sql, host: backup-proxy}
"""


async def image(site: Any, serial: str) -> bytes:
    """A volume's written bytes, extent by extent (what a restore must bring back)."""
    out = bytearray()
    for extent in await site.extents(serial):
        out += extent.offset.to_bytes(8, "big") + await site.read(serial, extent.offset, extent.length)
    return bytes(out)


async def run(engine: Any, site: Any, text_or_path: str | Path) -> Any:
    wf = definitions.load_definition(text_or_path) if isinstance(text_or_path, Path) else definitions.load_text(text_or_path, "t.yaml")
    specs = await planning.plan_units(wf, site)
    run_id = await engine.begin_run(wf.name, planning.definition_data(wf), specs)
    return await engine.drive_run(run_id)


async def test_scenario_2_restore_onto_the_original_luns_then_from_an_export_onto_the_second_guest(
    tmp_path: Path, autojump_clock: Any
) -> None:
    site = load_lab(None)
    async with site.running():
        async with engine_on(tmp_path, site) as engine:
            backup_run = await run(engine, site, WORKFLOWS / "20-sql-consistency-group.yaml")
            assert backup_run.state == "succeeded" and backup_run.verified
            (backup,) = await catalog.load(engine.journal, site)
            assert backup.restorable and backup.where == "target" and "database" in str(backup.check_kind)
            images = {d.source: await image(site, d.target) for d in backup.disks}
            assert {SQL_LOG, SQL_DATA} <= set(images)

            await trio.sleep(60)  # the databases go on changing after the backup
            for name in ("sql-db", "bank-sqlite"):  # the admin stops the applications before a restore
                await site.stop_workload(name)
            assert await image(site, SQL_DATA) != images[SQL_DATA]

            plan = await make_plan(site, backup, [backup])
            assert [s.method for s in plan.steps] == ["flash"] * len(backup.disks)
            assert plan.stop_vms == ("rich-w2k-os-1",) and plan.in_use
            summary, unit = await start_restore(engine, plan)
            assert (summary.state, summary.verified) == ("succeeded", True), summary.failures
            assert "database" in unit.data["check"]["kind"]
            await site.reboot("rich-w2k-os-1")
            for serial, expected in images.items():
                assert await image(site, serial) == expected  # byte-equal to the image
            report = await site.check(list(images))
            assert report.consistent and "database" in report.kind, report.problems
            assert (await site.get_vm("rich-w2k-os-1")).power.value == "on"
            events = [e.event for e in engine.journal.events(unit_id=unit.unit_id)]
            assert events == ["prepare", "prepared", "stop", "stopped", "restore", "restored", "check", "checked",
                              "start", "started", "copy", "copied", "withdraw", "succeed"]
            assert [r for r in await site.query() if (r.tag or "").startswith("fc:")] == []

            # the same from an exported image, onto the LUNs mapped to the second guest
            await site.start_workload("sql-db")
            export_run = await run(engine, site, SQL_EXPORT)
            assert export_run.state == "succeeded" and export_run.verified, export_run.failures
            backups = await catalog.load(engine.journal, site)
            exported = next(b for b in backups if b.workflow == "sql-export")
            assert exported.restorable and exported.where == "export"
            files = {d.source: d.export for d in exported.disks}
            plan = await make_plan(site, exported, backups, to=["RICH-W2K-OS-2:Disk2", "RICH-W2K-OS-2:Disk3"])
            assert [s.dest for s in plan.steps] == [SECOND_LOG, SECOND_DATA]
            assert [s.method for s in plan.steps] == ["write", "write"]
            assert plan.stop_vms == ("RICH-W2K-OS-2",)
            assert any(backup.id in o for o in plan.overwrites)  # the first backup's image lives there
            summary, unit = await start_restore(engine, plan)
            assert (summary.state, summary.verified) == ("succeeded", True), summary.failures
            await site.reboot("RICH-W2K-OS-2")
            report = await site.mount_check("RICH-W2K-OS-2", ["Disk2", "Disk3"])
            assert report.consistent and "database" in report.kind, report.problems
            for serial, dest in ((SQL_LOG, SECOND_LOG), (SQL_DATA, SECOND_DATA)):
                capacity = (await site.get_volume(dest)).capacity
                # byte-equal to the image file: every byte of the LUN read back against the file
                assert await site.read(dest, 0, capacity) == Path(str(files[serial])).read_bytes()
            after = await catalog.load(engine.journal, site)
            first = catalog.find(after, backup.id)
            assert first.status == catalog.GONE and "overwritten by restore" in first.why
            with pytest.raises(RestoreRefused, match="cannot be restored: gone"):
                await make_plan(site, first, after)
    await assert_invariants(tmp_path, site)


async def test_restore_from_an_incremental_pair_reverses_it(tmp_path: Path, autojump_clock: Any) -> None:
    site = load_lab(None)
    source, target = "24014698", "36116698"
    async with site.running():
        async with engine_on(tmp_path, site) as engine:
            first = await run(engine, site, WORKFLOWS / "50-incremental.yaml")
            assert first.state == "succeeded"
            await trio.sleep(30)
            await site.stop_workload("sles9-fs")
            expected = await image(site, target)
            await trio.sleep(30)
            (backup,) = await catalog.load(engine.journal, site)
            assert backup.where == "incremental pair" and backup.restorable
            plan = await make_plan(site, backup, [backup])
            assert [s.method for s in plan.steps] == ["reverse"] and "reversed" in plan.breaks[0]
            summary, _ = await start_restore(engine, plan)
            assert (summary.state, summary.verified) == ("succeeded", True), summary.failures
            assert await image(site, source) == expected
            again = await run(engine, site, WORKFLOWS / "50-incremental.yaml")  # turned back, changed tracks only
            assert again.state == "succeeded"
            (rel,) = await site.query(volume=target)
            assert (rel.source, rel.target) == (source, target)
    await assert_invariants(tmp_path, site)


async def test_restore_refuses_a_destination_that_is_another_relationships_target(tmp_path: Path, autojump_clock: Any) -> None:
    site = load_lab(None)
    async with site.running():
        async with engine_on(tmp_path, site) as engine:
            await run(engine, site, WORKFLOWS / "20-sql-consistency-group.yaml")
            (backup,) = await catalog.load(engine.journal, site)
            from flowcopy.site.api import FlashOptions, CopyMode

            await site.establish("35016698", "35116698", FlashOptions(mode=CopyMode.NOCOPY, tag="admin"))
            with pytest.raises(RestoreRefused, match="LUN 35116698 is the target of relationship 35016698 -> 35116698 "
                                                     r"\(tag admin\); overwriting it would corrupt that image"):
                await make_plan(site, backup, [backup], disks=["Disk2"], to=["35116698"])
            with pytest.raises(RestoreRefused, match="sizes must match"):
                await make_plan(site, backup, [backup], disks=["Disk2"], to=["30016698"])
            with pytest.raises(RestoreRefused, match="1 disk\\(s\\) to restore but 2 --to given"):
                await make_plan(site, backup, [backup], disks=["Disk2"], to=["35216698", "35316698"])
            with pytest.raises(RestoreRefused, match="has no disk 'Disk9'"):
                await make_plan(site, backup, [backup], disks=["Disk9"])


async def test_an_image_changed_after_planning_is_refused_before_anything_stops(tmp_path: Path, autojump_clock: Any) -> None:
    site = load_lab(None)
    async with site.running(["sql-db"]):
        async with engine_on(tmp_path, site) as engine:
            assert (await run(engine, site, SQL_EXPORT)).state == "succeeded"
            (backup,) = await catalog.load(engine.journal, site)
            plan = await make_plan(site, backup, [backup], to=["RICH-W2K-OS-2:Disk2", "RICH-W2K-OS-2:Disk3"])
            before = {s.dest: await image(site, s.dest) for s in plan.steps}
            path = Path(str(plan.steps[1].file))
            data = bytearray(path.read_bytes()[:8192])
            data[100] ^= 0xFF
            with open(path, "r+b") as f:
                f.write(bytes(data))
            summary, unit = await start_restore(engine, plan)
            assert summary.state == "failed"
            assert "changed since it was exported (content digest differs)" in summary.failures[unit.unit_id]
            assert [e.event for e in engine.journal.events(unit_id=unit.unit_id)] == ["prepare", "fail", "compensated"]
            assert (await site.get_vm("RICH-W2K-OS-2")).power.value == "on"  # never stopped
            assert {s.dest: await image(site, s.dest) for s in plan.steps} == before  # never touched
    await assert_invariants(tmp_path, site)


async def test_a_restore_cancelled_during_its_copy_back_leaves_the_copy_to_finish(tmp_path: Path, autojump_clock: Any) -> None:
    from flowcopy.backups.images import lun_digest

    site = load_lab(None)
    async with site.running(["sql-db"]):
        async with engine_on(tmp_path, site) as engine:
            await run(engine, site, WORKFLOWS / "20-sql-consistency-group.yaml")
            (backup,) = await catalog.load(engine.journal, site)
            await site.stop_workload("sql-db")
            plan = await make_plan(site, backup, [backup])
            # 64 KiB/s: the copy back lasts site-hours, far longer than the stop, check and
            # start before it (which take site time whenever a read waits on a thread)
            site.array.bandwidth = 64 * 1024
            result: dict[str, Any] = {}

            async def go() -> None:
                result["out"] = await start_restore(engine, plan)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(go)
                with trio.fail_after(3600):  # site time: a restore that never reaches its copy back fails here
                    while not any(u.state == "copying" for u in engine.units.values()):
                        assert "out" not in result, f"the restore ended before its copy back: {result['out'][0]}"
                        await trio.sleep(0.01)
                run_id = next(u.run_id for u in engine.units.values() if u.state == "copying")
                await engine.cancel(run_id)
            summary, unit = result["out"]
            assert summary.state == "cancelled"
            assert (await site.get_vm("rich-w2k-os-1")).power.value == "on"  # it already ran on the image
            site.array.bandwidth = 50 * 2**20
            await trio.sleep(600)  # the copy back is left to finish (withdrawing it would leave less)
            for step in plan.steps:
                assert await lun_digest(site, step.dest, step.capacity) == step.digest
            assert [r for r in await site.query() if (r.tag or "").startswith("fc:restore")] == []
    await assert_invariants(tmp_path, site)


async def test_an_incremental_backup_whose_copy_has_not_finished_is_restored_by_fast_reverse(
    tmp_path: Path, autojump_clock: Any
) -> None:
    """reverseflash -fast: the source gets the image at once; the plan says the former
    target is no usable image afterwards, and the catalog then shows the backup gone.

    The backup is a kept nocopy + record relationship (no background copy: it never
    finishes). Workflow definitions offer no such mode (an incremental unit waits for its
    copy), so the backup unit is journaled here as the engine would have, over a real
    relationship on the array; everything from the catalog on is the product's path."""
    from flowcopy.backups.images import lun_digest
    from flowcopy.journal import Move, RunRow, UnitRow
    from flowcopy.machine import FORWARD_PATH, TRANSITIONS
    from flowcopy.site.api import CopyMode, FlashOptions

    forward = {(a, t.dest): t.trigger for t in TRANSITIONS for a in t.source}
    site = load_lab(None)
    vm, source, target = "rich-w2k-os-1", "20313698", "20413698"  # its E:, and the second guest's
    async with site.running(["orders-fs"]):
        async with engine_on(tmp_path, site) as engine:
            await trio.sleep(5)  # the guest writes files
            src, tgt = await site.get_volume(source), await site.get_volume(target)
            run_id, tag = "incr-nocopy-0001-abcd", "fc:incr-nocopy-0001-abcd:0"
            info = await site.establish(source, target, FlashOptions(mode=CopyMode.NOCOPY, record=True, persistent=True, tag=tag))
            digest = await lun_digest(site, target, tgt.capacity)
            pair = {"vm": vm, "disk": "Disk1", "source": source, "target": target, "source_lss": src.lss,
                    "target_lss": tgt.lss, "capacity": tgt.capacity}
            data = {"spec": {"kind": "backup", "mode": "incremental", "vms": [vm], "restore": None}, "tag": tag,
                    "pairs": [pair], "verified": True, "check": {"kind": "filesystem"}, "freeze_attempts": 1,
                    "established_at": info.created, "established_wall": 1.8e9, "digests": {target: digest}}
            await engine.journal.begin_run(RunRow(run_id=run_id, workflow="incr-nocopy", definition={}, number=1),
                                           [UnitRow(unit_id=f"{run_id}/00000", run_id=run_id, data=data)])
            await engine.journal.record_many([Move(f"{run_id}/00000", a, b, forward[(a, b)])
                                              for a, b in zip(FORWARD_PATH, FORWARD_PATH[1:])])
            await trio.sleep(5)
            await site.stop_workload("orders-fs")
            assert await lun_digest(site, source, src.capacity) != digest  # the guest wrote on since the backup
            (backup,) = await catalog.load(engine.journal, site)
            (rel,) = await site.query(volume=target)
            assert backup.where == "incremental pair" and backup.restorable and rel.out_of_sync_tracks > 0
            plan = await make_plan(site, backup, [backup])
            assert [s.method for s in plan.steps] == ["fast-reverse"]
            described = "\n".join(plan.describe())
            assert f"{source} -> {target} fast-reversed ({target} -> {source}) before its background copy finished" in described
            assert f"{target} is not a usable image afterwards" in described
            assert f"backup lost: {backup.id} (incr-nocopy, {run_id}): this backup itself" in described
            assert "by fast-reverse" in described
            assert any("fast reverse" in why for why in plan.in_use)  # asks for confirmation
            summary, unit = await start_restore(engine, plan)
            assert (summary.state, summary.verified) == ("succeeded", True), summary.failures
            assert await lun_digest(site, source, src.capacity) == digest
            assert "fast reverse restore" in ((await site.get_volume(target)).unusable or "")
            (after,) = await catalog.load(engine.journal, site)
            assert after.status == "gone" and not after.restorable
            assert after.why == (f"fast reverse restore {unit.run_id} made {target} the restore's source: "
                                 "it is no longer a usable image")
            listed, _ = await catalog.listing(engine.journal, site)
            assert [(x.id, x.status, x.why) for x in listed] == [(after.id, after.status, after.why)]
            with pytest.raises(RestoreRefused, match=f"backup {after.id} cannot be restored: gone: fast reverse"):
                await make_plan(site, after, [after])
            for r in await site.query(volume=target):  # the reversed pair is the restore's: let it go
                await site.withdraw(r.source, r.target)


async def test_a_restore_workflow_goes_through_the_restore_path(tmp_path: Path, autojump_clock: Any) -> None:
    """workflows/60-restore-incremental.yaml, started as `flowcopy run` and the service
    start it (planning.plan_or_journal): its unit carries a restore plan of the newest
    backup on the named target and walks the restore path (stop, restore, check, start,
    copy back) as `flowcopy restore` does; the source is the backup again, byte for byte."""
    site = load_lab(None)
    source, target = "24014698", "36116698"
    async with site.running(["sles9-fs"]):
        async with engine_on(tmp_path, site) as engine:
            first = await run(engine, site, WORKFLOWS / "50-incremental.yaml")
            assert first.state == "succeeded"
            await trio.sleep(30)
            await site.stop_workload("sles9-fs")
            expected = await image(site, target)
            await trio.sleep(30)
            assert await image(site, source) != expected
            (backup,) = await catalog.load(engine.journal, site)
            wf = definitions.load_definition(WORKFLOWS / "60-restore-incremental.yaml")
            specs = await planning.plan_or_journal(wf, site, engine)
            (spec,) = specs
            assert spec.kind == "restore" and spec.restore is not None and spec.restore["backup"] == backup.id
            assert [s["method"] for s in spec.restore["steps"]] == ["reverse"]
            run_id = await engine.begin_run(wf.name, planning.definition_data(wf), specs)
            summary = await engine.drive_run(run_id)
            assert (summary.state, summary.verified) == ("succeeded", True), summary.failures
            assert await image(site, source) == expected
            assert (await site.get_vm("sles9-db1")).power.value == "on"
            events = [(e.from_state, e.to_state) for e in engine.journal.events(run_id=run_id)]
            assert ("stopped", "restoring") in events and ("checking", "checked") in events
            assert not any(to == "freezing" for _, to in events)  # not the backup path's freeze
            (unit,) = engine.journal.units(run_id)
            assert unit.data["overwrote"] is True and unit.data["check"]["problems"] == []
            assert engine.journal.restore_runs() == {run_id}
            again = await run(engine, site, WORKFLOWS / "50-incremental.yaml")  # turned back, changed tracks only
            assert again.state == "succeeded" and again.verified
            (rel,) = await site.query(volume=target)
            assert (rel.source, rel.target) == (source, target)
    await assert_invariants(tmp_path, site)


async def test_a_restore_workflow_with_no_backup_to_restore_fails_its_run_with_the_reason(
    tmp_path: Path, autojump_clock: Any
) -> None:
    from flowcopy.planning import PlanFailed

    site = load_lab(None)
    async with site.running([]):
        async with engine_on(tmp_path, site) as engine:
            wf = definitions.load_definition(WORKFLOWS / "60-restore-incremental.yaml")
            with pytest.raises(PlanFailed) as failed:
                await planning.plan_or_journal(wf, site, engine)
            reason = failed.value.reason
            assert reason == ("planning failed: no restorable backup holds the images to restore "
                              "(24014698 from 36116698): `flowcopy backups` lists what there is")
            assert engine.journal.run(failed.value.run_id).error == reason
