"""The backup catalog's truth, verify, retention (forget) and safe export paths.

Every case acts on the real site model and journal, then judges from the catalog (what
an admin sees), the site and the file system.
"""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path
from typing import Any

import attrs
import pytest

from flowcopy import definitions
from flowcopy.backups import catalog, forget, rpo, verify
from flowcopy.backups.catalog import Backup, Disk
from flowcopy.backups.restore import RestoreRefused, make_plan
from flowcopy.site import api
from flowcopy.site.inventory import load_lab

from .test_engine import FailingSite, assert_invariants, engine_on
from .test_restore import run

ROTATION_2 = """
name: rot2
units:
  - vm: rhel3-db1
    quiesce: filesystem
    disks:
      - {disk: Disk1, target: {rotate: ["30016698", "30116698"]}}
    copy: {action: wait}
"""

NOCOPY_KEEP = """
name: snap
units:
  - vm: rhel3-db1
    mode: nocopy
    withdraw: keep
    disks:
      - {disk: Disk1, target: "30216698"}
    copy: {action: wait}
"""


def export_workflow(to: str = "exports/t", retention: str = "") -> str:
    return f"""
name: exp
{retention}
units:
  - vm: rhel3-db1
    disks:
      - {{disk: Disk1, target: {{pool: spare-256m}}}}
    copy: {{action: export, to: "{to}", host: backup-proxy}}
"""


async def test_rotation_slot_reused_shows_gone_and_is_never_restored(tmp_path: Path, autojump_clock: Any) -> None:
    site = load_lab(None)
    async with site.running(["rhel3-fs"]):
        async with engine_on(tmp_path, site) as engine:
            for _ in range(3):
                assert (await run(engine, site, ROTATION_2)).state == "succeeded"
            newest, middle, oldest = await catalog.load(engine.journal, site)
            assert (newest.status, middle.status) == ("ok", "ok")
            assert oldest.status == "gone" and "reused by run rot2-0003" in oldest.why and "rotation slot" in oldest.why
            with pytest.raises(RestoreRefused, match="cannot be restored: gone: target 30016698 reused"):
                await make_plan(site, oldest, [newest, middle, oldest])
            # a target written by someone else: verify finds it, and then it is failed
            await site.write(newest.disks[0].target, 1 << 20, b"not flowcopy's")
            (result,) = await verify.verify(engine.journal, site, [newest])
            assert not result.ok and "was written since the backup" in result.problem
            (good,) = await verify.verify(engine.journal, site, [middle])
            assert good.ok and "filesystem" in good.checker
            after = {b.id: b for b in await catalog.load(engine.journal, site)}
            assert after[newest.id].status == "failed" and "verify failed" in after[newest.id].why
            assert after[middle.id].status == "ok" and after[middle.id].last_verification.ok  # type: ignore[union-attr]
            with pytest.raises(RestoreRefused, match="cannot be restored: failed"):
                await make_plan(site, after[newest.id], list(after.values()))
    await assert_invariants(tmp_path, site)


async def test_nocopy_target_withdrawn_shows_gone(tmp_path: Path, autojump_clock: Any) -> None:
    site = load_lab(None)
    async with site.running(["rhel3-fs"]):
        async with engine_on(tmp_path, site) as engine:
            assert (await run(engine, site, NOCOPY_KEEP)).state == "succeeded"
            (backup,) = await catalog.load(engine.journal, site)
            assert backup.status == "ok" and backup.where == "nocopy target"
            plan = await make_plan(site, backup, [backup])
            assert [s.method for s in plan.steps] == ["write"]  # a kept nocopy target is read back, not flashed
            await site.withdraw("22014698", "30216698")
            (backup,) = await catalog.load(engine.journal, site)
            assert backup.status == "gone" and "nocopy relationship 22014698 -> 30216698 withdrawn" in backup.why
            with pytest.raises(RestoreRefused, match="gone: nocopy relationship"):
                await make_plan(site, backup, [backup])


async def test_export_file_removed_or_altered_shows_gone_or_failed(tmp_path: Path, autojump_clock: Any) -> None:
    site = load_lab(None)
    async with site.running(["rhel3-fs"]):
        async with engine_on(tmp_path, site) as engine:
            for _ in range(3):
                assert (await run(engine, site, export_workflow())).state == "succeeded"
            third, second, first = await catalog.load(engine.journal, site)
            assert all(b.status == "ok" and b.where == "export" for b in (first, second, third))
            Path(str(first.disks[0].export)).unlink()
            # one byte changed, mtime put back: only a re-read can tell
            path = Path(str(second.disks[0].export))
            st = path.stat()
            with open(path, "r+b") as f:
                f.seek(4096)
                byte = f.read(1)
                f.seek(4096)
                f.write(bytes([byte[0] ^ 0xFF]))
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
            # the third changed openly (its mtime moved)
            with open(str(third.disks[0].export), "r+b") as f:
                f.seek(8192)
                f.write(b"x")
            by_id = {b.id: b for b in await catalog.load(engine.journal, site)}
            assert by_id[first.id].status == "gone" and "removed" in by_id[first.id].why
            assert by_id[second.id].status == "ok"
            assert by_id[third.id].status == "failed" and "modified since it was written" in by_id[third.id].why
            (result,) = await verify.verify(engine.journal, site, [by_id[second.id]])
            assert not result.ok and "changed since it was exported" in result.problem
            by_id = {b.id: b for b in await catalog.load(engine.journal, site)}
            assert by_id[second.id].status == "failed"
            for b in by_id.values():
                with pytest.raises(RestoreRefused, match="cannot be restored"):
                    await make_plan(site, b, list(by_id.values()))


async def test_a_vm_whose_last_nights_failed_keeps_its_last_good_backup(tmp_path: Path, autojump_clock: Any) -> None:
    inner = load_lab(None)
    text = export_workflow(retention="retention: {keep_last: 1}")
    async with inner.running(["rhel3-fs"]):
        async with engine_on(tmp_path, inner) as engine:
            good = [await run(engine, inner, text) for _ in range(2)]
            assert all(s.state == "succeeded" for s in good)
            root = tmp_path / "exports" / "t"
            admin_file = root / "README.admin"
            admin_file.write_text("the admin's own notes")
            (root / "not-a-run").mkdir()
            (backup,) = [b for b in await catalog.load(engine.journal, inner) if b.status == "ok"]
            assert backup.run_id == good[1].run_id  # keep_last 1 after the second night: the first is gone
            assert not (root / good[0].run_id).exists()

        def refuse(source: str, target: str, options: api.FlashOptions) -> Exception | None:
            return api.SizeMismatch(f"cannot establish {source} -> {target}: refused")

        broken = FailingSite(inner, {"establish": refuse})
        async with engine_on(tmp_path, broken) as engine:
            for _ in range(7):
                assert (await run(engine, broken, text)).state == "failed"
            decisions = await forget.apply(engine.journal, inner, tmp_path, workflow="exp", dry_run=True)
            kept = [d for d in decisions if d.keep]
            assert [d.backup.id for d in kept] == [backup.id] and "last" in kept[0].reason
            decisions = await forget.apply(engine.journal, inner, tmp_path, workflow="exp")
            assert [d.backup.id for d in decisions if d.keep] == [backup.id]
    assert Path(str(backup.disks[0].export)).is_file()
    assert admin_file.read_text() == "the admin's own notes" and (root / "not-a-run").is_dir()


async def test_forget_dry_run_changes_nothing_then_removes_only_what_it_recorded(tmp_path: Path, autojump_clock: Any) -> None:
    site = load_lab(None)
    async with site.running(["rhel3-fs"]):
        async with engine_on(tmp_path, site) as engine:
            for _ in range(3):
                assert (await run(engine, site, export_workflow())).state == "succeeded"
            assert (await run(engine, site, NOCOPY_KEEP)).state == "succeeded"
            # the policy arrives later (as if the file had been edited): journal it with a run
            text = export_workflow(retention="retention: {keep_last: 1}")
            wf = definitions.load_text(text, "t.yaml")
            from flowcopy import planning

            specs = await planning.plan_units(wf, site)
            run_id = await engine.begin_run(wf.name, planning.definition_data(wf), specs)
            engine.journal.crash_hook = None
            before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if "site" not in p.parts)
            rels = await site.query()
            # a dry run before the policy's run is driven: the newest run has retention
            decisions = await forget.apply(engine.journal, site, tmp_path, dry_run=True)
            assert sorted(d.keep for d in decisions) == [False, False, True]
            after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if "site" not in p.parts)
            assert after == before and await site.query() == rels and engine.journal.forgotten() == {}
            summary = await engine.drive_run(run_id)  # then retention runs after it, for real
            assert summary.state == "succeeded"
            backups = await catalog.load(engine.journal, site)
            exports = [b for b in backups if b.workflow == "exp"]
            assert [b.status for b in exports] == ["ok", "forgotten", "forgotten", "forgotten"]
            forgotten = engine.journal.forgotten()
            assert len(forgotten) == 3 and all(any("removed" in a for a in f.actions) for f in forgotten.values())
            snap = next(b for b in backups if b.workflow == "snap")
            assert snap.status == "ok" and await site.query(volume="30216698")  # another workflow's: untouched
            remaining = sorted(p.name for p in (tmp_path / "exports" / "t").iterdir())
            assert remaining == [summary.run_id]


async def test_export_to_the_store_itself_never_deletes_the_site_state(tmp_path: Path, autojump_clock: Any) -> None:
    """Issue 9.2: `copy.to: "."` with keep 1 deleted store/site/. Now retention removes
    only the recorded image files (and their own run folders)."""
    site = load_lab(None)
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "site.sqlite").write_bytes(b"the embedded array")
    (tmp_path / "notes").mkdir()
    text = export_workflow(to=".", retention="retention: {keep: 1}")
    async with site.running(["rhel3-fs"]):
        async with engine_on(tmp_path, site) as engine:
            runs = [await run(engine, site, text) for _ in range(3)]
    assert all(r.state == "succeeded" for r in runs)
    assert (tmp_path / "site" / "site.sqlite").read_bytes() == b"the embedded array"
    assert (tmp_path / "notes").is_dir() and (tmp_path / "journal.sqlite").is_file()
    assert not (tmp_path / runs[0].run_id).exists() and not (tmp_path / runs[1].run_id).exists()
    assert (tmp_path / runs[2].run_id).is_dir()


@pytest.mark.parametrize(
    ("to", "message"),
    [
        ("/etc", "copy.to '/etc' is outside the store: use a folder inside the store, or list a parent folder in $FLOWCOPY_EXPORT_ROOTS"),
        ("../elsewhere", "copy.to '../elsewhere' contains '..' and so leaves the store: name a folder inside it"),
        ("exports/../../x", "contains '..'"),
        ("site/images", "copy.to 'site/images' is inside the store's own state (site)"),
        ("", "copy.to is empty"),
    ],
)
def test_validate_refuses_export_paths_that_escape_the_store(to: str, message: str, monkeypatch: Any) -> None:
    monkeypatch.delenv("FLOWCOPY_EXPORT_ROOTS", raising=False)
    with pytest.raises(definitions.DefinitionError) as info:
        definitions.load_text(export_workflow(to=to), "exp.yaml")
    problems = [str(p) for p in info.value.problems]
    assert any(message in p and "units[0].copy.to" in p for p in problems), problems


def test_an_absolute_export_path_inside_a_configured_root_is_accepted(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setenv("FLOWCOPY_EXPORT_ROOTS", str(tmp_path))
    wf = definitions.load_text(export_workflow(to=str(tmp_path / "images")), "exp.yaml")
    assert wf.units[0].copy.to == str(tmp_path / "images")
    with pytest.raises(definitions.DefinitionError, match="outside the store"):
        definitions.load_text(export_workflow(to="/srv/other"), "exp.yaml")


def test_retention_needs_a_count() -> None:
    with pytest.raises(definitions.DefinitionError, match="retention needs keep_last, keep_daily or keep_weekly"):
        definitions.load_text(export_workflow(retention="retention: {}"), "exp.yaml")


# --------------------------------------------------------------------------- the pure policy


def _backup(n: int, when: str, *, status: str = "ok", vm: str = "vm1", ok: bool = True) -> Backup:
    t = datetime.fromisoformat(when).timestamp()
    verification = None if ok else catalog.Verification(t, "database", False, {"problem": "torn page"})
    disk = Disk(vm=vm, disk="Disk1", source="11111111", target=f"3{n:07d}", capacity=1 << 20)
    return Backup(id=f"{n:08x}", unit_id=f"u{n}", run_id=f"r{n}", workflow="w", number=n, vms=(vm,), disks=(disk,),
                  mode="copy", tag=None, site_time=None, wall_time=t, check_kind="database",
                  last_verification=verification, status=status)


def test_keep_daily_and_weekly_have_restics_meanings() -> None:
    backups = [
        _backup(1, "2026-11-02 01:00"), _backup(2, "2026-11-09 01:00"), _backup(3, "2026-11-16 01:00"),
        _backup(4, "2026-11-29 01:00"), _backup(5, "2026-11-30 01:00"), _backup(6, "2026-11-30 13:00"),
        _backup(7, "2026-12-01 01:00"),
    ]
    keep = {d.backup.number for d in forget.decide(backups, forget.Policy(keep_daily=2)) if d.keep}
    assert keep == {7, 6}  # the newest of each of the last two days with backups
    keep = {d.backup.number for d in forget.decide(backups, forget.Policy(keep_weekly=3)) if d.keep}
    assert keep == {7, 4, 3}  # ISO weeks 49 (Mon 30 Nov - 6 Dec), 48, 47: the newest of each
    keep = {d.backup.number for d in forget.decide(backups, forget.Policy(keep_last=1, keep_weekly=2)) if d.keep}
    assert keep == {7, 4}


def test_only_verified_backups_count_and_the_newest_verified_is_never_removed() -> None:
    backups = [_backup(1, "2026-11-01 01:00"), _backup(2, "2026-11-02 01:00", ok=False),
               _backup(3, "2026-11-03 01:00", status="gone")]
    decisions = {d.backup.number: d for d in forget.decide(backups, forget.Policy(keep_last=1))}
    assert decisions[1].keep and not decisions[2].keep and not decisions[3].keep
    assert "verification failed" in decisions[2].reason
    other = [_backup(4, "2026-11-01 01:00", vm="vm2"), *backups]
    decisions = {d.backup.number: d for d in forget.decide(other, forget.Policy(keep_last=1))}
    assert decisions[4].keep  # its own group


def test_rpo_flags_vms_past_it_and_never_backed_up() -> None:
    b = attrs.evolve(_backup(1, "2026-12-01 00:00"))
    now = b.wall_time + 27 * 3600  # type: ignore[operator]
    lines = rpo.status([b], {"w": (26 * 3600.0, ["vm1", "vm2"])}, now)
    assert [(x.vm, x.past) for x in lines] == [("vm1", True), ("vm2", True)]
    assert "is 1d3h old" in lines[0].line() and "PAST RPO" in lines[0].line() and "no verified backup" in lines[1].line()
    assert not rpo.status([b], {"w": (28 * 3600.0, ["vm1"])}, now)[0].past


# --------------------------------------------------------------------------- both journal backends


@pytest.fixture(params=["sqlite", "postgresql"])
def journal_store(request: pytest.FixtureRequest, tmp_path: Path) -> Path | str:
    if request.param == "sqlite":
        return tmp_path / "store"
    return str(request.getfixturevalue("pg_url"))


async def test_catalog_records_read_and_write_the_same_on_both_backends(journal_store: Path | str) -> None:
    import trio

    from flowcopy.journal import Journal, Move, RunRow, UnitRow
    from flowcopy.machine import FORWARD_PATH, TRANSITIONS

    forward = {(s, t.dest): t.trigger for t in TRANSITIONS for s in t.source}
    pair = {"vm": "vm1", "disk": "Disk1", "source": "11111111", "target": "22222222", "source_lss": "11",
            "target_lss": "22", "capacity": 1 << 20}
    data = {"spec": {"kind": "backup", "mode": "copy", "vms": ["vm1"], "copy_action": "wait", "withdraw": "always",
                     "restore": None},
            "tag": "fc:r1:0", "pairs": [pair], "verified": True, "check": {"kind": "filesystem"},
            "established_at": 12.5, "digests": {"22222222": "c1:ab"}, "freeze_attempts": 1}
    bid = catalog.backup_id("r1/0")
    journal = Journal.open(journal_store)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(journal.run_writer)
            await journal.begin_run(RunRow(run_id="r1", workflow="w", definition={}, number=1, created=100.0),
                                    [UnitRow(unit_id="r1/0", run_id="r1", data=data)])
            await journal.record_many([Move("r1/0", a, b, forward[(a, b)]) for a, b in zip(FORWARD_PATH, FORWARD_PATH[1:])])
            await journal.record_verification(bid, "filesystem", False, {"problem": "torn"})
            await journal.record_forgotten("abcd1234", "beyond the policy", ["removed /x"])
            await journal.record_forgotten("abcd1234", "again", ["removed /y"])  # an upsert, not a duplicate
            (row,) = journal.catalog_rows()
            backups = await catalog.load(journal, None)
            assert backups[0].status == "failed" and "torn" in backups[0].why
            # a later run of the same workflow freezes onto the same target: the first image is gone
            later = {**data, "tag": "fc:r2:0", "freeze_attempts": 0}
            await journal.begin_run(RunRow(run_id="r2", workflow="w", definition={}, number=2, created=200.0),
                                    [UnitRow(unit_id="r2/0", run_id="r2", data=later)])
            await journal.record_many([Move("r2/0", "pending", "preparing", "prepare"),
                                       Move("r2/0", "preparing", "prepared", "prepared")])
            await journal.record(Move("r2/0", "prepared", "freezing", "freeze", data={**later, "freeze_attempts": 1}))
            (gone,) = await catalog.load(journal, None)
            listed, live = await catalog.listing(journal, None)
            nursery.cancel_scope.cancel()
        disk = dict(zip(("unit_id", "disk_no", "backup_id", "run_id", "workflow", "run_created", "number", "vms", "vm",
                         "disk", "source", "target", "capacity", "mode"), row))
        assert disk == {"unit_id": "r1/0", "disk_no": 0, "backup_id": bid, "run_id": "r1", "workflow": "w",
                        "run_created": 100.0, "number": 1, "vms": "vm1", "vm": "vm1", "disk": "Disk1",
                        "source": "11111111", "target": "22222222", "capacity": 1 << 20, "mode": "copy"}
        (b,) = catalog.from_rows([row])
        assert (b.site_time, b.check_kind, b.disks[0].digest, b.disks[0].where) == (12.5, "filesystem", "c1:ab", "target")
        (v,) = journal.verifications().values()
        assert (v.backup_id, v.ok, v.detail) == (bid, False, {"problem": "torn"})
        assert journal.forgotten()["abcd1234"].actions == ("removed /y",)
        assert (gone.id, gone.status, gone.why) == (bid, "gone", "target 22222222 reused by run r2 (rotation slot reused)")
        assert [(x.id, x.status, x.why) for x in listed] == [(bid, "gone", gone.why)] and live == []
    finally:
        journal.close()


async def test_a_v5_store_is_upgraded_and_its_backups_appear_in_the_listing(journal_store: Path | str) -> None:
    """Schema v6 backfills the flat catalog from the journal's units: an old store's
    backups are listed, with a reused rotation slot shown gone, exactly as before."""
    import trio

    from flowcopy.journal import SCHEMA_VERSION, Journal, JournalCorrupt, Move, RunRow, UnitRow
    from flowcopy.machine import FORWARD_PATH, TRANSITIONS

    forward = {(s, t.dest): t.trigger for t in TRANSITIONS for s in t.source}

    def unit(run: str, target: str, exported: bool = False) -> UnitRow:
        pair = {"vm": "vm1", "disk": "Disk1", "source": "11111111", "target": target, "source_lss": "11",
                "target_lss": "22", "capacity": 1 << 20}
        data = {"spec": {"kind": "backup", "mode": "copy", "vms": ["vm1"], "restore": None}, "tag": f"fc:{run}:0",
                "pairs": [pair], "verified": True, "check": {"kind": "filesystem"}, "established_at": 1.0,
                "freeze_attempts": 1}
        if exported:
            data["exports"] = [{"path": f"/nowhere/{run}/11111111-{target}.img", "sha256": "ab", "content": "c1:cd"}]
        return UnitRow(unit_id=f"{run}/0", run_id=run, data=data)

    journal = Journal.open(journal_store)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(journal.run_writer)
            for n, (run, target, exported) in enumerate([("r1", "22222222", False), ("r2", "22222222", False),
                                                         ("r3", "33333333", True)], start=1):
                await journal.begin_run(RunRow(run_id=run, workflow="w", definition={}, number=n, created=100.0 * n),
                                        [unit(run, target, exported)])
                await journal.record_many([Move(f"{run}/0", a, b, forward[(a, b)])
                                           for a, b in zip(FORWARD_PATH, FORWARD_PATH[1:])])
            nursery.cancel_scope.cancel()
        before = [(b.id, b.status, b.why) for b in await catalog.load(journal, None)]
        # make it the v5 store an older flowcopy left: no catalog tables, schema version 5
        if isinstance(journal_store, Path):
            conn = journal._wconn  # type: ignore[attr-defined]
            conn.execute("DROP TABLE catalog")
            conn.execute("DROP TABLE lun_writes")
            conn.execute("DROP TABLE lss_epochs")
            conn.execute("PRAGMA user_version = 5")
            conn.commit()
        else:
            raw = journal._wconn  # type: ignore[attr-defined]
            raw.execute("DROP TABLE catalog")
            raw.execute("DROP TABLE lun_writes")
            raw.execute("DROP TABLE lss_epochs")
            raw.execute("DELETE FROM flowcopy_schema WHERE version >= 6")
            raw.commit()
    finally:
        journal.close()
    with pytest.raises(JournalCorrupt, match="schema v5; start an engine"):
        Journal.open(journal_store, lock=False)
    journal = Journal.open(journal_store)  # an engine's open upgrades it
    try:
        after = [(b.id, b.status, b.why) for b in await catalog.load(journal, None)]
        listed, _ = await catalog.listing(journal, None)
    finally:
        journal.close()
    assert SCHEMA_VERSION == 7
    assert after == [(catalog.backup_id(f"r{i}/0"), s, w) for i, s, w in
                     [(3, "gone", "export file /nowhere/r3/11111111-33333333.img removed"), (2, "ok", ""),
                      (1, "gone", "target 22222222 reused by run r2 (rotation slot reused)")]]
    assert [(x.id, x.status, x.why) for x in listed] == after == before
