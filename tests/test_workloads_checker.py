"""The guest workloads' formats and the independent checker, on in-memory LUN images.

Every crash point of a filesystem workload must mount (after journal replay) to the
files before or after the interrupted operation; torn and half-written images must be
reported, with the object and place named; a database image pair is consistent at every
crash point but not when the data image is newer than the log image.
"""

from __future__ import annotations

import ast
import hashlib
import struct
from pathlib import Path

import pytest

from flowcopy.site import checker, workloads
from flowcopy.site.workloads import BLOCK, DatabaseWorkload, FilesystemWorkload

FS, LOG, DATA = "20313698", "20513698", "20714698"


class Memory:
    """LUN images as bytearrays; a synchronous `read` for the checker."""

    def __init__(self, sizes: dict[str, int]) -> None:
        self.vols = {serial: bytearray(size) for serial, size in sizes.items()}

    def read(self, serial: str, offset: int, length: int) -> bytes:
        return bytes(self.vols[serial][offset : offset + length])

    async def aread(self, serial: str, offset: int, length: int) -> bytes:
        return self.read(serial, offset, length)

    def apply(self, serial: str, offset: int, data: bytes) -> None:
        self.vols[serial][offset : offset + len(data)] = data


class Recorder:
    """A GuestIO that records the writes in issue order (and applies them to `memory`)."""

    def __init__(self, memory: Memory) -> None:
        self.memory = memory
        self.writes: list[tuple[str, int, bytes]] = []
        self.boundaries: list[int] = []  # number of writes when each operation finished

    async def read(self, serial: str, offset: int, length: int) -> bytes:
        return self.memory.read(serial, offset, length)

    async def write(self, serial: str, offset: int, data: bytes) -> None:
        self.writes.append((serial, offset, bytes(data)))
        self.memory.apply(serial, offset, data)

    async def mid_transaction(self) -> None:
        pass


def formatted(load: FilesystemWorkload | DatabaseWorkload, sizes: dict[str, int]) -> Memory:
    memory = Memory(sizes)
    for serial, offset, data in load.format_image():
        memory.apply(serial, offset, data)
    return memory


async def run_ops(load, memory: Memory, ops: int) -> Recorder:  # type: ignore[no-untyped-def]
    rec = Recorder(memory)
    for _ in range(ops):
        await load.step(rec)
        rec.boundaries.append(len(rec.writes))
    return rec


# --------------------------------------------------------------------------- filesystem


async def test_every_crash_point_of_the_filesystem_mounts_before_or_after_the_operation() -> None:
    seed, ops = 3, 80
    fs = FilesystemWorkload(name="fs", vm="vm", serial=FS, seed=seed)
    size = workloads.FS_MIN_BYTES
    rec = await run_ops(fs, formatted(fs, {FS: size}), ops)
    # replay the write stream onto a fresh image, mounting after every single write
    fresh = FilesystemWorkload(name="fs", vm="vm", serial=FS, seed=seed)
    image = formatted(fresh, {FS: size})
    expected = [workloads.expected_files(seed, k) for k in range(ops + 1)]
    done = 0
    replays = 0
    for n, (serial, offset, data) in enumerate(rec.writes, start=1):
        image.apply(serial, offset, data)
        while done < ops and rec.boundaries[done] <= n:
            done += 1
        report = checker.check_filesystem(image.read, FS)
        assert report.consistent, (n, report.problems)
        files = checker.read_files(image.read, FS)
        assert files in (expected[done], expected[min(done + 1, ops)]), f"crash after write {n}"
        replays += report.summary["journal_replayed"] != "0"
    assert done == ops
    assert replays > 0, "some crash points needed the journal"
    assert checker.read_files(image.read, FS) == expected[ops]
    assert fs.files == [expected[ops][name] for name in workloads.FILE_NAMES]


async def test_filesystem_summary_and_recovery() -> None:
    fs = FilesystemWorkload(name="orders", vm="vm", serial=FS, seed=11)
    memory = formatted(fs, {FS: workloads.FS_MIN_BYTES})
    await run_ops(fs, memory, 37)
    report = checker.check_filesystem(memory.read, FS)
    assert report.consistent and report.kind == "filesystem"
    expected = workloads.expected_files(11, 37)
    for name, content in expected.items():
        assert report.summary[f"file:{name}"] == f"{len(content)}:{hashlib.sha256(content).hexdigest()}"
    assert report.summary["last_operation"] == "37"
    # a restarted guest re-reads its state from the image and carries on identically
    again = FilesystemWorkload(name="orders", vm="vm", serial=FS, seed=11)
    await again.recover(memory.aread)
    assert again.ops == 37 and again.files == fs.files
    await run_ops(again, memory, 5)
    assert checker.read_files(memory.read, FS) == workloads.expected_files(11, 42)


async def test_filesystem_damage_is_reported_exactly() -> None:
    fs = FilesystemWorkload(name="fs", vm="vm", serial=FS, seed=1)
    memory = formatted(fs, {FS: workloads.FS_MIN_BYTES})
    await run_ops(fs, memory, 152)  # a checkpoint: no journal replay pending
    slot = workloads.FILE_NAMES.index("orders.csv")
    assert len(fs.files[slot]) > 3 * BLOCK, "the test needs a file of 4+ blocks"
    phys = workloads.data_block(slot, 3, fs.copies[slot][3])
    saved = memory.read(FS, phys * BLOCK, BLOCK)
    memory.apply(FS, phys * BLOCK + 100, b"\xff")
    report = checker.check_filesystem(memory.read, FS)
    assert not report.consistent
    assert report.problems == (f"file orders.csv block 3 checksum mismatch (block {phys} on {FS})",)
    memory.apply(FS, phys * BLOCK, saved)
    assert checker.check_filesystem(memory.read, FS).consistent

    # a torn inode (in place, not in the journal window any more)
    inode_at = (workloads.INODE_START + slot) * BLOCK
    memory.apply(FS, inode_at + 40, b"\x99")
    report = checker.check_filesystem(memory.read, FS)
    assert any(f"inode {slot} (block {workloads.INODE_START + slot}) checksum mismatch" in p for p in report.problems)

    # superblock gone
    memory.apply(FS, 0, bytes(BLOCK))
    report = checker.check_filesystem(memory.read, FS)
    assert report.problems == (f"superblock unreadable on {FS}: block 0 is all zeros (never formatted)",)
    memory.apply(FS, 0, b"garbage!")
    assert checker.check_filesystem(memory.read, FS).problems[0].startswith(f"superblock unreadable on {FS}: bad magic")


async def test_half_written_update_is_not_silently_accepted() -> None:
    """The metadata of an update reached the LUN but one of its data blocks did not."""
    fs = FilesystemWorkload(name="fs", vm="vm", serial=FS, seed=9)
    memory = formatted(fs, {FS: workloads.FS_MIN_BYTES})
    rec = await run_ops(fs, memory, 30)
    last_op = rec.writes[rec.boundaries[-2] : rec.boundaries[-1]]
    data_writes = [w for w in last_op if w[1] >= workloads.DATA_START * BLOCK]
    assert data_writes
    # rebuild the image with every write except the last operation's first data block
    fresh = FilesystemWorkload(name="fs", vm="vm", serial=FS, seed=9)
    image = formatted(fresh, {FS: workloads.FS_MIN_BYTES})
    skipped = data_writes[0]
    for write in rec.writes:
        if write is not skipped:
            image.apply(*write)
    report = checker.check_filesystem(image.read, FS)
    assert not report.consistent
    assert any("checksum mismatch" in p and f"block {skipped[1] // BLOCK} on {FS}" in p for p in report.problems)


# --------------------------------------------------------------------------- database


def db_pair(seed: int, *, pages: int = 64, capacity: int = 10_000) -> tuple[DatabaseWorkload, Memory]:
    db = DatabaseWorkload(name="sql", vm="vm", log_serial=LOG, data_serial=DATA, seed=seed, pages=pages, capacity=capacity)
    memory = formatted(db, {LOG: BLOCK + capacity * 128, DATA: (pages + 1) * BLOCK})
    return db, memory


async def test_database_is_consistent_at_every_crash_point_and_matches_the_expected_image() -> None:
    db, memory = db_pair(seed=4)
    rec = await run_ops(db, memory, 150)
    fresh, image = db_pair(seed=4)
    for n, write in enumerate(rec.writes, start=1):
        image.apply(*write)
        if n % 7 == 0 or n == len(rec.writes):
            report = checker.check_database(image.read, LOG, DATA)
            assert report.consistent, (n, report.problems)
    report = checker.check_database(image.read, LOG, DATA)
    assert report.summary["log_head"] == "150" and report.summary["log_records"] == "150"
    expected = workloads.expected_pages(4, 150, pages=64)
    digest = hashlib.sha256()
    for page in sorted(expected):
        digest.update(struct.pack("<IQQ", page, *expected[page]))
    assert report.summary["pages_digest"] == digest.hexdigest()
    assert report.summary["pages_written"] == str(len(expected))


async def test_data_image_newer_than_log_image_is_inconsistent() -> None:
    db, memory = db_pair(seed=8)
    rec = await run_ops(db, memory, 60)
    # log image as of transaction 40, data image as of transaction 60 (copied later)
    cut = rec.boundaries[39]
    fresh, image = db_pair(seed=8)
    for serial, offset, data in rec.writes:
        if serial == DATA or rec.writes.index((serial, offset, data)) < cut:
            image.apply(serial, offset, data)
    report = checker.check_database(image.read, LOG, DATA)
    assert not report.consistent
    pages = workloads.expected_pages(8, 60, pages=64)
    newest = {p: s for p, (s, _v) in pages.items() if s > 40}
    assert newest
    for page, seq in newest.items():
        assert (
            f"page {page} on {DATA} reflects log record {seq} which the log image on {LOG} lacks "
            f"(the log ends at record 40)"
        ) in report.problems
    # the other way round (log newer than data) is just a redo: consistent
    fresh, image = db_pair(seed=8)
    for index, (serial, offset, data) in enumerate(rec.writes):
        if serial == LOG or index < cut:
            image.apply(serial, offset, data)
    assert checker.check_database(image.read, LOG, DATA).consistent


async def test_database_damage_and_wrapped_log() -> None:
    db, memory = db_pair(seed=2, pages=32, capacity=25)
    await run_ops(db, memory, 70)  # the log wraps twice
    report = checker.check_database(memory.read, LOG, DATA)
    assert report.consistent, report.problems
    assert report.summary["log_head"] == "70" and report.summary["log_records"] == "25"
    again = DatabaseWorkload(name="sql", vm="vm", log_serial=LOG, data_serial=DATA, seed=2, pages=32, capacity=25)
    await again.recover(memory.aread)
    assert again.seq == 70
    # a torn page
    page, (seq, _value) = next(iter(sorted(workloads.expected_pages(2, 70, pages=32).items())))
    memory.apply(DATA, BLOCK * (1 + page) + 500, b"\x01\x02")
    report = checker.check_database(memory.read, LOG, DATA)
    assert f"page {page} on {DATA} checksum mismatch (torn page)" in report.problems
    # a torn log record inside the window
    slot = (65 - 1) % 25
    memory.apply(LOG, BLOCK + slot * 128 + 30, b"\xee")
    report = checker.check_database(memory.read, LOG, DATA)
    assert f"log record 65 on {LOG} is missing or torn (slot {slot})" in report.problems


async def test_check_images_sniffs_formats_and_pairs_a_database() -> None:
    fs = FilesystemWorkload(name="fs", vm="vm", serial=FS, seed=1)
    db = DatabaseWorkload(name="sql", vm="vm", log_serial=LOG, data_serial=DATA, seed=1, pages=16, capacity=100)
    memory = Memory({FS: workloads.FS_MIN_BYTES, LOG: BLOCK + 100 * 128, DATA: 17 * BLOCK, "99999698": 1 << 20})
    for load in (fs, db):
        for write in load.format_image():
            memory.apply(*write)
    await run_ops(fs, memory, 5)
    await run_ops(db, memory, 5)
    report = checker.check_images(memory.read, [FS, DATA, LOG])
    assert report.consistent and report.kind == "database+filesystem"
    assert report.summary[f"{LOG}+{DATA}:log_head"] == "5"
    assert checker.check_images(memory.read, ["99999698"]).kind == "empty"
    lonely = checker.check_images(memory.read, [LOG])
    assert not lonely.consistent and lonely.problems == (f"database log {LOG} has no data LUN among {LOG}",)
    memory.apply("99999698", 0, b"NTFS    ")
    unknown = checker.check_images(memory.read, ["99999698"])
    assert unknown.problems == ("superblock unreadable on 99999698: no known format (not FCFS, not FCDB)",)


def test_checker_does_not_import_the_workloads() -> None:
    source = Path(checker.__file__).read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
            imported.update(f"{node.module}.{alias.name}" for alias in node.names)
    assert not any("workloads" in name for name in imported), imported


@pytest.mark.parametrize("seed", [0, 1, 99])
def test_workloads_are_deterministic(seed: int) -> None:
    assert workloads.expected_files(seed, 25) == workloads.expected_files(seed, 25)
    assert workloads.expected_pages(seed, 200) == workloads.expected_pages(seed, 200)
    assert workloads.expected_files(seed, 25) != workloads.expected_files(seed + 1, 25)
