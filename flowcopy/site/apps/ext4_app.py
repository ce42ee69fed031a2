"""A real ext4 file system made by the system's `mke2fs`, changed by `debugfs -w`, journaled like jbd2.

The guest keeps its own view of each LUN (image files in a private folder, read from the
LUNs at boot: its page cache). One operation changes files in `/data` with `debugfs -w`
on the view; the 4 KiB blocks that changed then go to the LUNs the way the kernel's jbd2
writes them in `data=journal` mode (`jbd2` has the format):

1. after mount only: the journal superblock, the log starting at this transaction;
2. a descriptor block and a copy of every changed block, in log order (wrapping);
3. the commit block: from here the transaction is committed (the guest's `committed`
   counter, what an image of this instant must hold at least);
4. the changed blocks in place (checkpoint);
5. the journal superblock with the log's tail moved past the transaction (as
   `jbd2_cleanup_journal_tail` does after a checkpoint; the kernel batches it).

Each write takes the modelled latency, so a copy can land between any two. A
crash-consistent image (a consistency-group freeze) is therefore clean once the journal
is replayed, as after a power cut; `ext4_check` replays it with `e2fsck` on a copy.

The journal is external, on a second LUN (`mke2fs -O journal_dev`; the data LUN's
superblock names it by UUID), when the lab gives `journal:` - then the guest spans two
LUNs, and LUNs copied one at a time without a freeze can mix a journal of one instant
with data of another, which e2fsck or the file comparison catches. Without `journal:` it
is the internal journal (inode 8, created by mke2fs); one LUN is then crash-consistent
by itself. `mke2fs -J device=` wants a block device, so the data file system is made
without a journal and pointed at the journal device with debugfs (`feature has_journal`,
`ssv journal_uuid`), which is what that option records.

At boot the guest re-reads its LUNs; a journal that needs recovery is replayed as the
kernel does at mount (here by `e2fsck -E journal_only`), the replayed blocks written in
place and then the journal superblock reset, before any new transaction.

Deterministic: fixed UUID (the journal device's from the data LUN's serial) and hash seed, `E2FSPROGS_FAKE_TIME`, root owned by 0:0, and
operation k (create / rewrite / append / delete of one file) a pure function of
(seed, k, the file names present). The operation counter lives in the file system itself
(`/data/.seq`), so a rebooted guest continues where its image stands.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import attrs
import trio

from flowcopy.site.apps import jbd2
from flowcopy.site.apps.progress import WriteProgress

FS_UUID = "6b1e5b62-0c5e-4d43-9f42-3d2b6f2a7a10"
JOURNAL_NAMESPACE = uuid.UUID("0e7c2a52-81b4-4d0e-9a3d-5f1f6c1b2e44")
HASH_SEED = "2f0e7f4e-5a51-4c39-8f0a-1a9e1d3c0b77"
FAKE_TIME = "1700000000"
BLOCK = 4096
CHUNK = 64 * 1024
_ZERO = bytes(CHUNK)
DIR = "/data"
SEQ_FILE = ".seq"
NAMES = tuple(f"file{i:02d}.txt" for i in range(12))
PROGRAMS = ("mke2fs", "debugfs", "e2fsck")
JOURNAL_BLOCKS = 1024  # 4 MiB: the kernel's smallest journal; the log wraps every ~70 operations
HISTORY = 32  # committed states a point in time lists (what an image cut near it may hold)


def e2fsprogs() -> dict[str, str]:
    """Paths of the e2fsprogs programs; a clear error when the system lacks them."""
    found = {}
    for prog in PROGRAMS:
        path = shutil.which(prog) or next((p for p in (f"/usr/sbin/{prog}", f"/sbin/{prog}") if os.access(p, os.X_OK)), None)
        if path is None:
            raise RuntimeError(f"{prog} not found: the ext4 guest needs e2fsprogs (on Debian: apt-get install e2fsprogs)")
        found[prog] = path
    return found


def environment() -> dict[str, str]:
    return {**os.environ, "E2FSPROGS_FAKE_TIME": FAKE_TIME, "LC_ALL": "C"}


def mke2fs_args(image: str, label: str, external: bool) -> list[str]:
    journal = ["-O", "^has_journal"] if external else ["-J", f"size={JOURNAL_BLOCKS * BLOCK >> 20}"]
    return [
        e2fsprogs()["mke2fs"], "-q", "-F", "-t", "ext4", "-b", str(BLOCK), "-U", FS_UUID, "-L", label[:16], *journal,
        "-E", f"hash_seed={HASH_SEED},root_owner=0:0,lazy_itable_init=0,lazy_journal_init=0", image,
    ]


def journal_uuid(serial: str) -> str:
    """The journal device's UUID, by the data LUN it serves: deterministic, and two guests' journals
    differ (the data file system names its journal device by UUID)."""
    return str(uuid.uuid5(JOURNAL_NAMESPACE, serial))


def journal_dev_args(image: str, label: str, journal: str) -> list[str]:
    return [e2fsprogs()["mke2fs"], "-q", "-F", "-O", "journal_dev", "-b", str(BLOCK), "-U", journal,
            "-L", f"{label[:12]}-jnl", image, str(JOURNAL_BLOCKS)]


def state_digest(files: dict[str, bytes]) -> str:
    """The digest of a set of files, as the checker computes it from an image: sha256 over
    `"/data/<name>=<sha256 hex>;"` for every file in name order."""
    return hashlib.sha256("".join(f"{DIR}/{n}={hashlib.sha256(b).hexdigest()};" for n, b in sorted(files.items())).encode()).hexdigest()


def operation(seed: int, seq: int, present: list[str]) -> tuple[str, str, bytes]:
    """Operation `seq`: (verb, file name, new content); verb is write, append or delete."""
    rng = random.Random(f"ext4:{seed}:{seq}")
    name = rng.choice(NAMES)
    lines = "".join(f"{seq}:{rng.getrandbits(48):012x} {'x' * rng.randrange(0, 90)}\n" for _ in range(rng.randrange(1, 120)))
    roll = rng.random()
    if name in present and roll < 0.15:
        return "delete", name, b""
    if name in present and roll < 0.6:
        return "append", name, lines.encode()
    return "write", name, lines.encode()


async def _kill(process: trio.Process) -> None:
    process.kill()  # the guest crashed or stopped: its view is re-read from the LUN at boot


async def _run(args: list[str], what: str, ok: tuple[int, ...] = (0,)) -> bytes:
    result = await trio.run_process(
        args, capture_stdout=True, capture_stderr=True, check=False, env=environment(), deliver_cancel=_kill
    )
    if result.returncode not in ok:
        raise RuntimeError(f"{what} failed (exit {result.returncode}): {result.stderr.decode(errors='replace').strip()[:300]}")
    return result.stdout


@attrs.frozen
class Write:
    serial: str
    offset: int
    data: bytes
    commits: bool = False  # the commit block: the transaction is durable once it lands


@attrs.define
class _Log:
    """Where the journal lives and where its log stands (the guest's jbd2 state)."""

    serial: str
    blocks: list[int]  # physical block of each log block (identity for an external journal)
    super_at: int  # log block of the journal superblock
    sb: jbd2.JournalSuper
    raw: bytes  # the journal superblock block as last written
    head: int  # next free log block
    tail: int | None  # log block of the oldest transaction recovery replays; None: clean
    tid: int  # next transaction id

    def offset(self, log_block: int) -> int:
        return self.blocks[log_block] * BLOCK

    def position(self, k: int) -> int:
        """The k-th log block from the head, wrapping as jbd2 does."""
        span = self.sb.maxlen - self.sb.first
        return self.sb.first + (self.head - self.sb.first + k) % span


@attrs.define
class Ext4Workload:
    """ext4 on `serial` (journal on `journal_serial`, or internal): files under /data, one transaction per operation."""

    name: str
    vm: str
    serial: str
    seed: int
    journal_serial: str | None = None
    size: int = 64 * 2**20  # bytes of the LUN the file system spans
    journal_size: int = 64 * 2**20  # bytes of the journal LUN
    interval: float = 1.0
    write_latency: float = 0.001
    autostart: bool = False
    ops: int = 0  # operations finished (checkpointed)
    committed: int = 0  # operations committed to the journal
    files: dict[str, bytes] = attrs.Factory(dict)
    unformatted: bool = True
    history: dict[int, str] = attrs.Factory(dict)  # committed operation -> state digest (the last HISTORY)
    _committed_files: dict[str, bytes] = attrs.Factory(dict)
    _dir: Any = attrs.field(default=None, init=False, repr=False)
    _shadow: dict[str, bytearray] = attrs.field(factory=dict, init=False, repr=False)
    _log: _Log | None = attrs.field(default=None, init=False, repr=False)
    progress: WriteProgress = attrs.field(factory=WriteProgress, init=False, repr=False, eq=False)
    _pending: Any = attrs.field(default=None, init=False, repr=False)  # (writes, files after, seq, counts)

    def spec(self) -> dict[str, object]:
        return {"kind": "ext4", "name": self.name, "vm": self.vm, "serial": self.serial, "seed": self.seed,
                "journal_serial": self.journal_serial, "size": self.size, "journal_size": self.journal_size,
                "interval": self.interval, "write_latency": self.write_latency, "autostart": self.autostart}

    @property
    def serials(self) -> tuple[str, ...]:
        return (self.serial,) if self.journal_serial is None else (self.serial, self.journal_serial)

    def _file(self, serial: str) -> Path:
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix=f"flowcopy-ext4-{self.name}-")
        return Path(self._dir.name) / ("view.img" if serial == self.serial else "journal.img")

    @property
    def image(self) -> Path:
        return self._file(self.serial)

    def _size(self, serial: str) -> int:
        return self.size if serial == self.serial else self.journal_size

    def format_image(self) -> list[tuple[str, int, bytes]]:
        """Nothing at lab build: the guest runs mke2fs on its first operation (a real program, async)."""
        self.unformatted = True
        self.ops = self.committed = 0
        self.files, self._committed_files, self.history = {}, {}, {}
        return []

    # ------------------------------------------------------------------ boot

    async def recover(self, read: Any) -> None:
        """Boot: read the LUNs into the guest's view, replay the journal as a mount does, read the files."""
        self._pending = None
        self._log = None
        for serial in self.serials:
            data = await read(serial, 0, self._size(serial))
            self._shadow[serial] = bytearray(data)
            self._write_view(serial, data)
        if self._shadow[self.serial][1024 + 56 : 1024 + 58] != b"\x53\xef":
            self.format_image()
            return
        self.unformatted = False
        tools = e2fsprogs()
        external = ["-j", str(self._file(self.journal_serial))] if self.journal_serial else []
        # a mount replays a journal that needs recovery; e2fsck does exactly that and nothing more here
        await _run([tools["e2fsck"], "-E", "journal_only", "-y", *external, str(self.image)], "e2fsck journal replay", ok=(0, 1))
        await _run([tools["debugfs"], "-w", "-R", "feature needs_recovery", str(self.image)], "debugfs mount")
        listing = await _run([tools["debugfs"], "-c", "-R", f"ls -p {DIR}", str(self.image)], "debugfs ls")
        files: dict[str, bytes] = {}
        for line in listing.decode(errors="replace").splitlines():
            parts = line.strip().strip("/").split("/")
            if len(parts) >= 5 and parts[1].startswith("10") and parts[4]:
                files[parts[4]] = await _run([tools["debugfs"], "-c", "-R", f"cat {DIR}/{parts[4]}", str(self.image)], "debugfs cat")
        seq = files.pop(SEQ_FILE, b"0").strip()
        self.ops = self.committed = int(seq) if seq.isdigit() else 0
        self.files = files
        self._committed_files = dict(files)
        self.history = {self.ops: self._digest(self.ops, files)}
        await self._open_log()
        assert self._log is not None
        # the replay's blocks in place, then the reset journal superblock, last: before any new transaction
        reset = (self._log.serial, self._log.offset(self._log.super_at))
        boot: list[Write] = []
        last: list[Write] = []
        for serial in self.serials:
            changed = [(n * BLOCK, d) for n, d in self._changed_blocks(serial)]
            last += [Write(serial, at, d) for at, d in changed if (serial, at) == reset]
            boot += [Write(serial, at, d) for at, d in _runs([(at, d) for at, d in changed if (serial, at) != reset])]
        if boot or last:
            self._pending = (boot + last, self.files, self.ops, False)

    async def _open_log(self) -> None:
        """Find the journal (external device, or inode 8's blocks) and its superblock."""
        if self.journal_serial is not None:
            serial, super_at = self.journal_serial, (2 if BLOCK == 1024 else 1)
            raw = self._view_block(serial, super_at)
            sb = jbd2.parse_super(raw)
            blocks = list(range(sb.maxlen))
        else:
            serial = self.serial
            out = await _run([e2fsprogs()["debugfs"], "-c", "-R", "blocks <8>", str(self.image)], "debugfs blocks <8>")
            blocks, super_at = [int(b) for b in out.split()], 0
            raw = self._view_block(serial, blocks[0])
            sb = jbd2.parse_super(raw)
            if len(blocks) < sb.maxlen:
                raise RuntimeError(f"ext4 on {self.serial}: the journal inode maps {len(blocks)} blocks, its superblock says {sb.maxlen}")
        self._log = _Log(serial=serial, blocks=blocks, super_at=super_at, sb=sb, raw=raw,
                         head=sb.start or sb.first, tail=sb.start or None, tid=sb.sequence)

    # ------------------------------------------------------------------ the guest's view

    def _view_block(self, serial: str, block: int) -> bytes:
        with open(self._file(serial), "rb") as f:
            f.seek(block * BLOCK)
            return f.read(BLOCK).ljust(BLOCK, b"\0")

    def _data_ranges(self, serial: str) -> list[tuple[int, int]]:
        """The view file's data extents (SEEK_DATA/SEEK_HOLE): what mke2fs/debugfs ever wrote."""
        ranges = []
        size = self._size(serial)
        fd = os.open(self._file(serial), os.O_RDONLY)
        try:
            pos = 0
            while pos < size:
                try:
                    start = os.lseek(fd, pos, os.SEEK_DATA)
                except OSError:  # ENXIO: no data after pos
                    break
                end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
                ranges.append((start - start % BLOCK, end))
                pos = end
        finally:
            os.close(fd)
        return ranges

    def _write_view(self, serial: str, data: bytes) -> None:
        """The guest's view as a sparse file: zero chunks stay holes."""
        with open(self._file(serial), "wb") as f:
            f.truncate(self._size(serial))
            for at in range(0, len(data), CHUNK):
                chunk = data[at : at + CHUNK]
                if chunk != _ZERO[: len(chunk)]:
                    f.seek(at)
                    f.write(chunk)

    def _changed_blocks(self, serial: str) -> list[tuple[int, bytes]]:
        """The blocks the view has that the LUN lacks: (block number, content), in block order."""
        old = self._shadow[serial]  # bytes slices compare with memcmp (memoryview slices do not)
        changed: list[tuple[int, bytes]] = []
        with open(self._file(serial), "rb") as f:
            for lo, hi in self._data_ranges(serial):
                f.seek(lo)
                new = f.read(hi - lo)
                for at in range(0, len(new), CHUNK):
                    if new[at : at + CHUNK] == old[lo + at : lo + at + CHUNK]:
                        continue
                    for b in range(at, min(at + CHUNK, len(new)), BLOCK):
                        block = new[b : b + BLOCK].ljust(BLOCK, b"\0")
                        if block != old[lo + b : lo + b + BLOCK]:
                            changed.append(((lo + b) // BLOCK, block))
        return changed

    def _changed_runs(self, serial: str) -> list[tuple[int, bytes]]:
        """The changed blocks as runs of contiguous blocks (<= 64 KiB): (byte offset, data)."""
        return _runs([(n * BLOCK, data) for n, data in self._changed_blocks(serial)])

    def _digest(self, seq: int, files: dict[str, bytes]) -> str:
        return state_digest({**files, SEQ_FILE: str(seq).encode()} if seq else files)

    # ------------------------------------------------------------------ one operation

    async def prepare(self) -> None:
        """Decide the next operation: run mke2fs/debugfs on the guest's view (nothing on the LUNs yet).

        The shell calls this before the operation counts as in flight, so a quiesce never
        waits for a program the guest is still running; `step` then sends the blocks.
        """
        if self._pending is not None:
            return
        tools = e2fsprogs()
        if self.unformatted:
            await self._format(tools)
            return
        seq = self.ops + 1
        verb, fname, content = operation(self.seed, seq, sorted(self.files))
        new_files = dict(self.files)
        if verb == "delete":
            new_files.pop(fname)
        elif verb == "append":
            new_files[fname] = self.files[fname] + content
        else:
            new_files[fname] = content
        work = self.image.parent
        commands = []
        for name, body in ((fname, new_files.get(fname)), (SEQ_FILE, str(seq).encode())):
            if name in self.files or (name == SEQ_FILE and self.ops > 0):
                commands.append(f"rm {DIR}/{name}")
            if body is not None:
                src = work / f"src-{name}"
                src.write_bytes(body)
                commands.append(f"write {src} {DIR}/{name}")
        script = work / "commands"
        script.write_text("\n".join(commands) + "\n")
        await _run([tools["debugfs"], "-w", "-f", str(script), str(self.image)], "debugfs -w")
        self._pending = (self._transaction(self._changed_blocks(self.serial)), new_files, seq, True)

    async def _format(self, tools: dict[str, str]) -> None:
        """mkfs (and mkfs of the journal device), then mount: nothing journaled yet; the data
        LUN's superblock lands last, so a copy cut during mkfs holds no file system."""
        for serial in self.serials:
            self._write_view(serial, b"")
        if self.journal_serial is not None:
            await _run(journal_dev_args(str(self._file(self.journal_serial)), self.name, journal_uuid(self.serial)),
                       "mke2fs -O journal_dev")
        await _run(mke2fs_args(str(self.image), self.name, self.journal_serial is not None), "mke2fs")
        commands = [f"mkdir {DIR}", "feature needs_recovery"]
        if self.journal_serial is not None:
            commands[:0] = ["feature has_journal", f"ssv journal_uuid {journal_uuid(self.serial)}", "ssv journal_dev 0xfd01"]
        script = self.image.parent / "commands"
        script.write_text("\n".join(commands) + "\n")
        await _run([tools["debugfs"], "-w", "-f", str(script), str(self.image)], "debugfs mkdir")
        writes: list[Write] = []
        if self.journal_serial is not None:
            writes += [Write(self.journal_serial, at, data) for at, data in self._changed_runs(self.journal_serial)]
        changed = self._changed_blocks(self.serial)
        rest = [(n * BLOCK, d) for n, d in changed if n != 0]
        writes += [Write(self.serial, at, d) for at, d in _runs(rest) + [(0, d) for n, d in changed if n == 0]]
        self._pending = (writes, {}, 0, False)

    def _transaction(self, blocks: list[tuple[int, bytes]]) -> list[Write]:
        """The writes of one jbd2 transaction carrying `blocks`, in the order the kernel issues them."""
        log = self._log
        assert log is not None
        before, commit = jbd2.transaction(log.sb, log.tid, blocks)
        need = len(before) + 1
        if need >= log.sb.maxlen - log.sb.first:
            raise RuntimeError(f"ext4 on {self.serial}: one operation needs {need} journal blocks, "
                               f"the journal has {log.sb.maxlen - log.sb.first}")
        writes: list[Write] = []
        if log.tail is None:  # the first transaction since mount (or since a clean journal): the log starts here
            log.raw = jbd2.with_tail(log.raw, log.tid, log.head)
            writes.append(Write(log.serial, log.offset(log.super_at), log.raw))
        logged = [(log.offset(log.position(k)), block) for k, block in enumerate(before)]
        writes += [Write(log.serial, at, data) for at, data in _runs(logged)]
        writes.append(Write(log.serial, log.offset(log.position(len(before))), commit, commits=True))
        writes += [Write(self.serial, at, data) for at, data in _runs([(n * BLOCK, d) for n, d in blocks])]
        # checkpointed: the log tail moves past this transaction (jbd2_cleanup_journal_tail; the kernel
        # batches it, this guest moves it every time), so the log holds at most the transaction in flight
        log.head = log.position(need)
        log.tid += 1
        log.tail = log.head
        log.raw = jbd2.with_tail(log.raw, log.tid, log.head)
        writes.append(Write(log.serial, log.offset(log.super_at), log.raw))
        return writes

    async def step(self, io: Any) -> None:
        """Send the prepared operation's writes, in order, through the guest."""
        if self._dir is None or not self._shadow:
            await self.recover(io.read)
        await self.prepare()
        assert self._pending is not None
        writes, new_files, seq, counts = self._pending
        for w in writes:
            await io.write(w.serial, w.offset, w.data)
            self._land(w)
            if counts:
                self.progress.wrote()
            if w.commits:
                self.committed = seq
                self._committed_files = new_files
                self.history[seq] = self._digest(seq, new_files)
                for old in [k for k in self.history if k <= seq - HISTORY]:
                    del self.history[old]
        self._pending = None
        if self.unformatted:
            self.unformatted = False
            await self._open_log()
            self.history = {0: self._digest(0, {})}
        self.files = new_files
        self.ops = self.committed = seq

    def _land(self, w: Write) -> None:
        """A write reached the LUN: the guest's record of the LUN, and for journal blocks its view, follow."""
        self._shadow[w.serial][w.offset : w.offset + len(w.data)] = w.data
        if self._log is not None and w.serial == self._log.serial:
            with open(self._file(w.serial), "r+b") as f:  # the journal's blocks are not debugfs's business
                f.seek(w.offset)
                f.write(w.data)

    def pause(self) -> float:
        rng = random.Random(f"ext4-pace:{self.seed}:{self.ops}")
        return self.interval * rng.uniform(0.5, 1.5)

    def point_in_time(self) -> dict[str, object]:
        """What an image of now must hold: the files after the last committed operation, and
        the digests (`state_digest`) of the recent committed states an image cut near now may
        hold instead (a later LUN of a set established one at a time)."""
        files = dict(self._committed_files)
        if self.committed:
            files[SEQ_FILE] = str(self.committed).encode()
        return {"kind": "ext4", "workload": self.name, "operations": self.committed, "formatted": not self.unformatted,
                "journal": self.journal_serial or "internal",
                "files": {f"{DIR}/{n}": hashlib.sha256(b).hexdigest() for n, b in sorted(files.items())},
                "states": {str(k): v for k, v in sorted(self.history.items())}}

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "kind": "ext4", "vm": self.vm, "serials": list(self.serials), "seed": self.seed,
                "journal": self.journal_serial or "internal",
                "interval": self.interval, "write_latency": self.write_latency, "operations": self.ops,
                "files": len(self.files)}


def _runs(blocks: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
    """(byte offset, 4 KiB block) pairs, merged into writes of contiguous blocks of at most 64 KiB, order kept."""
    runs: list[tuple[int, bytes]] = []
    for at, data in blocks:
        if runs and runs[-1][0] + len(runs[-1][1]) == at and len(runs[-1][1]) + len(data) <= CHUNK:
            runs[-1] = (runs[-1][0], runs[-1][1] + data)
        else:
            runs.append((at, data))
    return runs
