"""Real software on the LUNs: SQLite (apsw VFS over two LUNs) and ext4 (mke2fs + debugfs).

The images are judged by the software's own tools (stdlib sqlite3 recovering the hot
journal / WAL, PRAGMA integrity_check; e2fsck -fn and debugfs), plus what the
application had acknowledged at establish. The sweeps copy the LUNs while the
application writes: with a consistency-group freeze or the right guest quiesce every
copy must pass, established one at a time without either a fair share must not.
"""

from __future__ import annotations

import os
import sqlite3
import struct
from pathlib import Path
from typing import Any

import pytest
import trio

from flowcopy.site import checker
from flowcopy.site.api import CopyMode, FlashOptions
from flowcopy.site.apps import ext4_app, ext4_check, jbd2, sqlite_check
from flowcopy.site.apps.trials import run_trials, trial_lab
from flowcopy.site.local import LocalSite

DB, DB2, JR, JR2 = "10013698", "10113698", "10214698", "10314698"


def header(site: LocalSite, serial: str) -> tuple[bytes, str, int, int]:
    magic, name, size, exists = struct.unpack_from("<8s64sQB", site.array.read(serial, 0, 81, now=site.clock()))
    return magic, name.rstrip(b"\0").decode(), size, exists


# --------------------------------------------------------------------------- SQLite


@pytest.mark.parametrize("journal", ["rollback", "wal"])
async def test_sqlite_files_live_on_their_luns_and_stdlib_sqlite_reads_them(journal: str, tmp_path: Path, autojump_clock: Any) -> None:
    site = trial_lab("sqlite", seed=3, journal=journal)
    bank = site.workloads["bank"]
    async with site.running(["bank"]):
        await trio.sleep(2.0)
        await site.stop_workload("bank")  # a clean stop: the last transaction finished
    companion = "bank.db-wal" if journal == "wal" else "bank.db-journal"
    magic, name, size, exists = header(site, DB)
    assert (magic, name, exists) == (b"FCLUNF01", "bank.db", 1) and size % 4096 == 0 and size > 0
    magic, name, _size, exists = header(site, JR)
    assert (magic, name) == (b"FCLUNF01", companion)
    # rollback journal: deleted after each commit; WAL: kept (exclusive locking mode, heap index)
    assert exists == (1 if journal == "wal" else 0)
    # the standard library's SQLite opens the files exported from the LUNs
    read = site.read_at()
    names = sqlite_check.export_files(read, [DB, JR], tmp_path)
    assert names == {"bank.db": DB, companion: JR}
    con = sqlite3.connect(tmp_path / "bank.db")
    try:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == ("wal" if journal == "wal" else "delete")
        assert con.execute("SELECT count(*), max(seq) FROM history").fetchone() == (bank.committed, bank.committed)
        assert con.execute("SELECT sum(balance) FROM accounts").fetchone()[0] == 1000 * 10_000
    finally:
        con.close()
    assert bank.committed > 20
    report = await site.check([DB, JR])
    assert report.consistent and report.kind == "sqlite", report.problems


async def test_sqlite_checker_names_what_is_wrong(tmp_path: Path, autojump_clock: Any) -> None:
    site = trial_lab("sqlite", seed=5)
    async with site.running(["bank"]):
        await trio.sleep(1.0)
        await site.stop_workload("bank")
    committed = site.workloads["bank"].committed
    images = {s: bytearray(site.array.read(s, 0, 1 << 20, now=site.clock())) for s in (DB, JR)}

    def read(serial: str, offset: int, length: int) -> bytes:
        return bytes(images[serial][offset : offset + length]).ljust(length, b"\0")

    assert sqlite_check.check_sqlite(read, [DB, JR], {"committed": committed}).consistent
    # an image that claims a later point in time than it holds: commits lost
    older = sqlite_check.check_sqlite(read, [DB, JR], {"committed": committed + 3})
    assert not older.consistent
    assert older.problems == (
        f"database bank.db on {DB}: older than its point in time: the history ends at transaction "
        f"{committed} but {committed + 3} had committed at establish (commits lost)",
    )
    # a torn page in the middle of the main file: SQLite itself finds it
    size = struct.unpack_from("<Q", images[DB], 72)[0]
    middle = 4096 + (size // 4096 // 2) * 4096
    images[DB][middle + 100 : middle + 400] = b"\xa5" * 300
    torn = sqlite_check.check_sqlite(read, [DB, JR], {"committed": committed})
    assert not torn.consistent and all(p.startswith(f"database bank.db on {DB}: ") for p in torn.problems)
    assert any("integrity_check" in p or "malformed" in p for p in torn.problems), torn.problems
    # no main file among the LUNs
    lone = checker.check_images(read, [JR])
    assert not lone.consistent and lone.problems == (f"SQLite file bank.db-journal on {JR} has no main database among {JR}",)


async def test_sqlite_point_in_time_is_recorded_at_establish_and_survives_a_restart(autojump_clock: Any) -> None:
    site = trial_lab("sqlite", seed=8)
    logged: list[tuple[str, str, dict[str, Any]]] = []
    site.on_mutation = lambda c, m, kw: logged.append((c, m, kw))
    async with site.running(["bank"]):
        await trio.sleep(1.0)
        await site.quiesce("app1", "application", 30)
        at = site.workloads["bank"].committed
        for source, target in ((DB, DB2), (JR, JR2)):
            await site.establish(source, target, FlashOptions(mode=CopyMode.NOCOPY))
        await site.thaw("app1")
        await trio.sleep(0.5)
    assert site.workloads["bank"].committed > at
    assert {t: p["committed"] for t, p in site.points.items()} == {DB2: at, JR2: at}
    assert [kw["target"] for c, m, kw in logged if c == "apps"] == [DB2, JR2]
    again = LocalSite.from_state(site.to_state())
    assert again.points == site.points
    replayed = trial_lab("sqlite", seed=8)
    for component, method, kwargs in logged:
        replayed.apply(component, method, kwargs)
    assert replayed.points == site.points
    report = await again.check([DB2, JR2])
    assert report.consistent, report.problems
    assert report.summary[f"{DB2}+{JR2}:committed_at_establish"] == str(at)
    assert report.summary[f"{DB2}+{JR2}:last_seq"] == str(at)


def _verdicts(results: list[Any]) -> list[str]:
    return [f"seed {r.seed} ({r.journal}): {'; '.join(r.report.problems)}" for r in results if not r.report.consistent]


async def test_sqlite_consistency_group_freeze_never_tears(autojump_clock: Any) -> None:
    results = await run_trials("sqlite", "freeze", range(50))
    assert _verdicts(results) == []
    assert {r.journal for r in results} == {"rollback", "wal"} and all(r.report.kind == "sqlite" for r in results)


async def test_sqlite_application_quiesce_never_tears(autojump_clock: Any) -> None:
    results = await run_trials("sqlite", "quiesce", range(50))
    assert _verdicts(results) == []


async def test_sqlite_one_lun_at_a_time_is_caught_by_sqlite(autojump_clock: Any) -> None:
    results = await run_trials("sqlite", "none", range(40))
    damaged = _verdicts(results)
    assert len(damaged) >= 10, f"only {len(damaged)} of 40 copies without a freeze were found damaged"
    assert all("database bank.db on " in d for d in damaged)
    for journal in ("rollback", "wal"):  # ~35% and ~60% measured (tests/measure_apps.py)
        assert sum(1 for r in results if r.journal == journal and not r.report.consistent) >= 2, journal


# --------------------------------------------------------------------------- ext4


def _jbd2(block: bytes) -> tuple[int, int] | None:
    """(block type, sequence) of a jbd2 log block, None for anything else (a copy, a hole)."""
    magic, kind, seq = struct.unpack_from(">III", block, 0)
    return (kind, seq) if magic == jbd2.MAGIC else None


async def test_ext4_guest_files_read_back_by_debugfs(autojump_clock: Any) -> None:
    site = trial_lab("ext4", seed=4)
    load = site.workloads["srv"]
    async with site.running(["srv"]):
        await load.progress.wait(60)
        await site.stop_workload("srv")
    assert load.ops >= 5 and load.files and load.committed == load.ops
    report = await site.check([DB, JR])
    assert report.consistent and report.kind == "ext4", report.problems
    assert report.summary[f"{DB}:e2fsck_exit"] == "0" and report.summary[f"{DB}:journal"] == JR
    assert report.summary[f"{DB}:files"] == str(len(load.files) + 1)  # + the operation counter
    # what mke2fs made: the data LUN's superblock names the journal device on the other LUN by UUID
    sb = site.array.read(DB, 1024, 1024, now=site.clock())
    assert sb[56:58] == b"\x53\xef" and sb[104:120].hex() == ext4_app.FS_UUID.replace("-", "")
    assert sb[0xD0:0xE0].hex() == ext4_app.journal_uuid(DB).replace("-", "") and sb[0xE0:0xE4] == bytes(4)
    jsb = site.array.read(JR, 1024, 1024, now=site.clock())
    assert jsb[56:58] == b"\x53\xef" and int.from_bytes(jsb[0x60:0x64], "little") & 0x8  # journal_dev
    assert jsb[104:120].hex() == ext4_app.journal_uuid(DB).replace("-", "")
    # a guest rebooted on the same LUNs finds its files again (debugfs reads them)
    again = LocalSite.from_state(site.to_state())
    srv = again.workloads["srv"]
    await srv.recover(again.service.read)
    assert (srv.ops, srv.files) == (load.ops, load.files)
    # what the guest had is compared file by file
    point = load.point_in_time()
    files = dict(point["files"])  # type: ignore[call-overload]
    name = sorted(files)[0]
    files[name] = "0" * 64
    read = site.read_at()
    wrong = ext4_check.check_ext4(read, DB, [{**point, "files": files}], journal=JR)
    assert wrong.problems == (f"ext4 on {DB}+{JR}: 1 file(s) differ from what the guest had at operation {load.ops}: {name}",)
    ahead = ext4_check.check_ext4(read, DB, [{**point, "operations": load.ops + 2}], journal=JR)
    assert ahead.problems == (f"ext4 on {DB}+{JR}: older than its point in time: it holds operation {load.ops} "
                              f"but {load.ops + 2} had committed at establish (commits lost)",)
    # the data LUN without its journal LUN is not a whole image
    alone = await site.check([DB])
    assert alone.problems == (f"ext4 on {DB}: its external journal (device UUID {ext4_app.journal_uuid(DB).replace('-', '')}) "
                              "is not among the images checked: copy the journal LUN with the data LUN",)


class _Recording:
    """The guest's I/O path, recording each write; it stops the guest (hangs) at write `stop_at`."""

    def __init__(self, site: LocalSite, stop_at: int | None = None) -> None:
        self.site, self.stop_at, self.writes = site, stop_at, []  # type: ignore[var-annotated]

    async def read(self, serial: str, offset: int, length: int) -> bytes:
        return await self.site.service.read(serial, offset, length)

    async def write(self, serial: str, offset: int, data: bytes) -> None:
        if self.stop_at is not None and len(self.writes) == self.stop_at:
            await trio.sleep_forever()  # the guest crashed here
        await self.site.service.write(serial, offset, data)
        self.writes.append((serial, offset, bytes(data)))


async def test_ext4_guest_journals_each_operation_before_writing_in_place(autojump_clock: Any) -> None:
    site = trial_lab("ext4", seed=6)
    load = site.workloads["srv"]
    io = _Recording(site)
    await load.step(io)  # mke2fs (both LUNs), mkdir /data: not journaled; the data superblock last
    assert io.writes[-1][:2] == (DB, 0) and {s for s, _, _ in io.writes} == {DB, JR}
    wraps = ops = 0
    start = None
    while wraps < 1:  # until the 4 MiB log has wrapped
        assert ops < 250, f"the log did not wrap in {ops} operations"
        ops += 1
        io.writes.clear()
        await load.step(io)
        kinds = [_jbd2(d) for s, o, d in io.writes]
        commit = next(i for i, k in enumerate(kinds) if k is not None and k[0] == jbd2.COMMIT)
        tid = kinds[commit][1]  # type: ignore[index]
        before, after, tail = io.writes[:commit], io.writes[commit + 1 : -1], io.writes[-1]
        assert all(s == JR for s, _, _ in before) and all(s == DB for s, _, _ in after) and after
        # checkpointed: the journal superblock's log tail moves past the transaction, last
        assert tail[:2] == (JR, 4096) and kinds[-1] == (jbd2.SUPERBLOCK_V2, 0)
        sequence, now = struct.unpack_from(">II", tail[2], 0x18)
        assert sequence == tid + 1
        if kinds[0] == (jbd2.SUPERBLOCK_V2, 0):  # after mount: the log starts here
            assert ops == 1 and struct.unpack_from(">II", io.writes[0][2], 0x18) == (tid, io.writes[1][1] // 4096)
            before = before[1:]
        assert start is None or before[0][1] // 4096 == start  # the transaction begins where the tail was
        wraps += start is not None and now < start
        start = now
        desc = before[0][2]
        assert kinds[commit - len(before)] == (jbd2.DESCRIPTOR, tid)
        # the tags name the in-place blocks, the copies equal what then lands in place
        logged = b"".join(d for _, _, d in before)[4096:]
        placed = {o // 4096 + k: d[k * 4096 : (k + 1) * 4096] for _, o, d in after for k in range(len(d) // 4096)}
        tags, at = [], 12  # 8-byte tags (the journal device has no 64bit feature), the first with the UUID
        while True:
            number, _csum, flags = struct.unpack_from(">IHH", desc, at)
            tags.append(number)
            at += 8 + (0 if flags & jbd2.FLAG_SAME_UUID else 16)
            if flags & jbd2.FLAG_LAST_TAG:
                break
        assert tags == sorted(placed)
        for i, number in enumerate(tags):
            copy = logged[i * 4096 : (i + 1) * 4096]
            assert copy == placed[number] or copy[4:] == placed[number][4:]  # escaped: the magic zeroed
    assert load.committed == load.ops == ops
    report = await site.check([DB, JR])
    assert report.consistent, report.problems


@pytest.mark.parametrize(("cut", "journal"), [("before_commit", "external"), ("after_commit", "external"),
                                              ("after_commit", "internal")])
async def test_ext4_crash_mid_operation_is_replayed(cut: str, journal: str, autojump_clock: Any) -> None:
    """The guest dies inside an operation: the LUNs alone, after journal replay, hold the last
    committed operation; a rebooted guest replays the journal in place and goes on."""
    site = trial_lab("ext4", seed=9, journal=journal)
    luns = [DB, JR] if journal == "external" else [DB]
    load = site.workloads["srv"]
    io = _Recording(site)
    for _ in range(9):  # mkfs, then 8 operations
        await load.step(io)
    probe = _Recording(site)
    await load.prepare()  # the next operation's writes: where its commit block is
    writes = load._pending[0]
    commit = next(i for i, w in enumerate(writes) if w.commits)
    stop = commit if cut == "before_commit" else commit + 1 + (len(writes) - commit - 1) // 2
    probe.stop_at = stop
    with trio.move_on_after(5):
        await load.step(probe)
    assert load.ops == 8
    assert load.committed == (9 if cut == "after_commit" else 8)
    point = load.point_in_time()
    report = await site.check(luns)
    assert report.consistent, report.problems
    assert report.summary[f"{DB}:operations"] == str(load.committed)
    if cut == "after_commit":
        assert report.summary[f"{DB}:journal_replayed"] == "yes"
    assert ext4_check.check_ext4(site.read_at(), DB, [point], journal=JR if journal == "external" else None).consistent
    # reboot on the LUNs: the replay lands in place first, then the guest goes on from there
    again = LocalSite.from_state(site.to_state())
    srv = again.workloads["srv"]
    io2 = _Recording(again)
    await srv.recover(again.service.read)
    assert srv.ops == load.committed and srv._pending is not None  # the replay, in place, before anything new
    await srv.step(io2)
    assert srv.ops == load.committed and io2.writes
    assert [d for _, _, d in io2.writes if (_jbd2(d) or (0,))[0] in (jbd2.DESCRIPTOR, jbd2.COMMIT)] == []
    jsb_at = 4096 if journal == "external" else srv._log.offset(0)
    assert io2.writes[-1][:2] == (luns[-1], jsb_at) and struct.unpack_from(">I", io2.writes[-1][2], 0x1C)[0] == 0  # clean
    for _ in range(3):
        await srv.step(io2)
    assert srv.ops == load.committed + 3
    after = await again.check(luns)
    assert after.consistent and after.summary[f"{DB}:operations"] == str(srv.ops), after.problems


def test_jbd2_transactions_are_replayed_by_e2fsck(tmp_path: Path) -> None:
    """The log format of `jbd2`, judged by e2fsck's own recovery: two transactions (the first
    needs two descriptor blocks; a block starting with the jbd2 magic is escaped) replayed into
    a file system made by mke2fs, the later copy of a block winning; the log stops at a
    transaction whose commit block is missing."""
    import subprocess

    tools = ext4_app.e2fsprogs()
    env = ext4_app.environment()
    data, log = tmp_path / "data.img", tmp_path / "log.img"
    for path, size in ((data, 64 << 20), (log, 8 << 20)):
        path.write_bytes(b"")
        os.truncate(path, size)
    subprocess.run(ext4_app.journal_dev_args(str(log), "t", ext4_app.journal_uuid("x")), check=True, env=env, capture_output=True)
    subprocess.run(ext4_app.mke2fs_args(str(data), "t", external=True), check=True, env=env, capture_output=True)
    subprocess.run([tools["debugfs"], "-w", "-R", f"ssv journal_uuid {ext4_app.journal_uuid('x')}", str(data)], check=True, env=env, capture_output=True)
    subprocess.run([tools["debugfs"], "-w", "-R", "feature has_journal", str(data)], check=True, env=env, capture_output=True)
    raw = bytearray(log.read_bytes())
    sb = jbd2.parse_super(bytes(raw[4096:8192]))
    assert (sb.first, sb.maxlen, sb.start) == (2, ext4_app.JOURNAL_BLOCKS, 0) and jbd2.tag_bytes(sb) == 8
    free = range(9000, 9000 + 600)  # unused blocks of the 16,384: more tags than one descriptor holds
    blocks = [(n, bytes([n % 251]) * 4096) for n in free]
    magic = jbd2.MAGIC.to_bytes(4, "big") + b"escaped!" * 511 + b"tail"
    blocks[7] = (blocks[7][0], magic)
    first, commit1 = jbd2.transaction(sb, sb.sequence, blocks)
    assert [_jbd2(b) for b in first].count((jbd2.DESCRIPTOR, sb.sequence)) == 2
    second, commit2 = jbd2.transaction(sb, sb.sequence + 1, [(9001, b"\x77" * 4096)])
    third, _never = jbd2.transaction(sb, sb.sequence + 2, [(9002, b"\x88" * 4096)])  # no commit block
    at = sb.first
    for block in [*first, commit1, *second, commit2, *third]:
        raw[at * 4096 : (at + 1) * 4096] = block
        at += 1
    raw[4096:8192] = jbd2.with_tail(bytes(raw[4096:8192]), sb.sequence, sb.first)
    log.write_bytes(raw)
    replay = subprocess.run([tools["e2fsck"], "-E", "journal_only", "-y", "-j", str(log), str(data)], env=env, capture_output=True)
    assert replay.returncode in (0, 1) and b"recovering journal" in replay.stdout + replay.stderr, replay
    image = data.read_bytes()
    got = {n: image[n * 4096 : (n + 1) * 4096] for n in free}
    assert got[blocks[7][0]] == magic  # the escape undone
    assert got[9001] == b"\x77" * 4096  # the second transaction's copy replaces the first's
    assert got[9002] == bytes([9002 % 251]) * 4096  # the uncommitted third is not replayed
    assert all(got[n] == d for n, d in blocks if n not in (9001, 9002))
    assert struct.unpack_from(">I", log.read_bytes(), 4096 + 0x1C)[0] == 0  # e2fsck left the journal clean


@pytest.mark.parametrize(("workload", "message"), [
    ("{name: srv, kind: ext4, vm: app1, disk: Disk1, journal: Disk1}",
     "lab.yaml:26: workloads[0].journal: an external journal needs its own LUN, not the file system's"),
    ("{name: srv, kind: ext4, vm: app1, disk: Disk1, journal: Disk9}",
     "lab.yaml:26: workloads[0].journal: VM app1 has no disk 'Disk9' (by name, guest path or serial); "
     "its disks: Disk1 (S:) = 10013698, Disk2 (T:) = 10214698"),
])
def test_ext4_journal_lun_in_the_lab_is_checked(workload: str, message: str) -> None:
    from flowcopy.site.apps.trials import _LAB
    from flowcopy.site.inventory import LabError, build_site, read_lab_text

    with pytest.raises(LabError) as raised:
        build_site(read_lab_text(_LAB.format(size="16MiB", workload=workload), "lab.yaml"), source="lab.yaml")
    assert str(raised.value) == message


async def test_two_ext4_guests_checked_together_pair_each_file_system_with_its_journal(autojump_clock: Any) -> None:
    from flowcopy.site.apps.trials import _LAB
    from flowcopy.site.inventory import build_site, read_lab_text

    two = ("{name: a, kind: ext4, vm: app1, disk: Disk1, journal: Disk2, seed: 1, interval: 0.05}\n"
           "  - {name: b, kind: ext4, vm: spare, disk: Disk2, journal: Disk1, seed: 2, interval: 0.05}")
    site = build_site(read_lab_text(_LAB.format(size="16MiB", workload=two), "lab.yaml"), source="lab.yaml")
    async with site.running(["a", "b"]):
        await site.workloads["a"].progress.wait(40)
        await site.workloads["b"].progress.wait(40)
        await site.stop_workload("a")
        await site.stop_workload("b")
    report = await site.check([JR2, DB, DB2, JR])  # b's data on JR2 uses its journal on DB2
    assert report.consistent, report.problems
    assert (report.summary[f"{DB}:journal"], report.summary[f"{JR2}:journal"]) == (JR, DB2)
    assert report.summary[f"{DB}:operations"] == str(site.workloads["a"].ops)
    assert report.summary[f"{JR2}:operations"] == str(site.workloads["b"].ops)
    # a's journal device alone is only noted; b's file system without its journal is damage
    lone = await site.check([JR, JR2])
    assert lone.summary[f"{JR}:kind"].startswith("ext4 journal device") and not lone.consistent
    assert lone.problems == (f"ext4 on {JR2}: its external journal (device UUID {ext4_app.journal_uuid(JR2).replace('-', '')}) "
                             "is not among the images checked: copy the journal LUN with the data LUN",)


def test_missing_e2fsprogs_is_a_loud_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ext4_app.shutil, "which", lambda name: None)
    monkeypatch.setattr(ext4_app.os, "access", lambda path, mode: False)
    with pytest.raises(RuntimeError, match=r"mke2fs not found: the ext4 guest needs e2fsprogs \(on Debian: apt-get install e2fsprogs\)"):
        ext4_app.e2fsprogs()


async def test_ext4_consistency_group_freeze_never_tears(autojump_clock: Any) -> None:
    """Crash-consistent copies (no quiesce): the journal replay makes every one clean."""
    results = await run_trials("ext4", "freeze", range(10))
    assert _verdicts(results) == []
    assert all(r.report.kind == "ext4" and r.report.summary[f"{DB2}:journal"] == JR2 for r in results)
    assert any(r.report.summary[f"{DB2}:journal_replayed"] == "yes" for r in results)


async def test_ext4_filesystem_quiesce_never_tears(autojump_clock: Any) -> None:
    results = await run_trials("ext4", "quiesce", range(10))
    assert _verdicts(results) == []
    assert all(r.report.kind == "ext4" for r in results)


async def test_ext4_internal_journal_freeze_never_tears(autojump_clock: Any) -> None:
    """One LUN with the journal inside (inode 8): a copy of it is crash-consistent by itself."""
    results = await run_trials("ext4", "freeze", range(5), journal="internal")
    assert _verdicts(results) == []
    assert all(r.report.summary[f"{DB2}:journal"] == "internal" for r in results)


async def test_ext4_journal_and_data_luns_one_at_a_time_are_caught(autojump_clock: Any) -> None:
    results = await run_trials("ext4", "none", range(10))
    damaged = _verdicts(results)
    assert len(damaged) >= 3, f"only {len(damaged)} of 10 copies without a freeze were found damaged"
    assert all(f"ext4 on {DB2}+{JR2}: " in d for d in damaged)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["freeze", "quiesce", "none"])
async def test_ext4_sweep_50(method: str, autojump_clock: Any) -> None:
    results = await run_trials("ext4", method, range(100, 150))
    damaged = _verdicts(results)
    if method == "none":
        assert len(damaged) >= 15, f"only {len(damaged)} of 50"
    else:
        assert damaged == []


@pytest.mark.slow
async def test_ext4_internal_journal_freeze_sweep_50(autojump_clock: Any) -> None:
    results = await run_trials("ext4", "freeze", range(200, 250), journal="internal")
    assert _verdicts(results) == []


@pytest.mark.slow
@pytest.mark.parametrize("method", ["freeze", "quiesce", "none"])
async def test_sqlite_sweep_200(method: str, autojump_clock: Any) -> None:
    results = await run_trials("sqlite", method, range(1000, 1200))
    damaged = _verdicts(results)
    if method == "none":
        assert len(damaged) >= 30, f"only {len(damaged)} of 200"
    else:
        assert damaged == []


# --------------------------------------------------------------------------- real processes


@pytest.mark.process
def test_chaos_with_sqlite_and_ext4_guests(tmp_path: Path) -> None:
    """A served site whose guests run SQLite and ext4; the engine SIGKILLed twice and resumed;
    every image (the served site's check: ours, SQLite, e2fsck) passes and every invariant holds."""
    from flowcopy import chaos
    from flowcopy.journal import Journal

    report = trio.run(lambda: chaos.run_chaos(tmp_path, vms=10, kills=2, seed=12, min_delay=0.8, max_delay=2.0, real_apps=4))
    assert report.final_exit == 0, report.output
    assert report.verdict.problems == () and report.run_state == "succeeded"
    journal = Journal.open(tmp_path / "store", lock=False)
    try:
        kinds = {u.data["check"]["kind"] for r in journal.runs() for u in journal.units(r.run_id)}
        assert all(u.data.get("verified") is True for r in journal.runs() for u in journal.units(r.run_id))
    finally:
        journal.close()
    assert {"sqlite", "ext4", "database"} <= kinds, kinds


def test_judges_share_nothing_with_the_writers() -> None:
    """The checkers re-read the documented header only; nothing under site/apps imports the engine."""
    from tests.test_layering import ENGINE_SIDE, PACKAGE, imported_modules

    writers = {"flowcopy.site.apps.sqlite_app", "flowcopy.site.apps.ext4_app", "flowcopy.site.apps.jbd2", "flowcopy.site.apps.progress",
               "flowcopy.site.apps.trials", "flowcopy.site.workloads"}
    for judge in ("apps/sqlite_check.py", "apps/ext4_check.py", "checker.py"):
        names = imported_modules(PACKAGE / "site" / judge)
        assert not {n for n in names if n in writers or n.rsplit(".", 1)[0] in writers}, judge
        assert "apsw" not in names, judge
    for path in sorted((PACKAGE / "site" / "apps").glob("*.py")):
        engine = [n for n in imported_modules(path) if n.split(".")[:1] == ["flowcopy"] and len(n.split(".")) > 1
                  and n.split(".")[1] in ENGINE_SIDE]
        assert engine == [], path.name
