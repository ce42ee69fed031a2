"""Guest workloads that write real, checkable bytes through the guest to its LUNs.

Two writers, each deterministic from a seed (operation k is a pure function of the seed,
k and the current content), so a test can compute the content a point-in-time image must
hold:

- `FilesystemWorkload`: a small real on-disk format ("FCFS") on one LUN — superblock,
  metadata journal, an inode table (the directory) and file data blocks with per-block
  checksums. Every update is ordered like an ordered-mode journaling file system so that
  any crash-consistent point in time mounts after journal replay: new data goes to the
  *other* copy of each block (shadow block), then the journal record (the new inode),
  then the inode in place, then — every `CHECKPOINT` operations — the superblock.
- `DatabaseWorkload`: a log LUN and a data-page LUN ("FCDB"). Each transaction appends a
  log record (seq, page, new value, checksum) and only after that write completed writes
  the page (which carries the seq of the record it reflects). These are the dependent
  writes a consistency group must keep in order across LUNs.

The formats are documented here and re-implemented independently by
`flowcopy.site.checker`, which must not import this module: the checker is the witness,
not the writer's friend.

On-disk formats (little-endian, block = 4096 bytes, crc = zlib.crc32):

FCFS (one LUN)
  block 0            superblock  "<8sIIQIIIIIIQ32s" magic b"FCFS\\0v01", version, block_size,
                     generation (last journal seq checkpointed), journal_start,
                     journal_blocks, inode_start, inode_count, data_start, file_blocks
                     (max blocks per file), total_blocks, label; then crc32 (u32)
  journal            record for seq s at block journal_start + (s-1) % journal_blocks:
                     "<4sQII" b"FCJR", seq, inode slot, inode length; the inode bytes; crc32
  inode slot i       block inode_start + i: "<4sIIQQI64s" b"FCIN", slot, in_use, seq, size,
                     nblocks, name; then file_blocks x "<BI" (copy 0/1, crc32 of the
                     block); then crc32. A zero block is a free slot.
  data               file slot i, logical block b, copy c at block
                     data_start + (i * file_blocks + b) * 2 + c
  Mount: read the superblock; read the inodes; replay journal records generation+1,
  generation+2, ... while present (a record newer than the inode replaces it); verify
  each in-use inode's checksum and each file block against its recorded crc.

FCDB (two LUNs)
  log block 0        "<8sIIQ32s" b"FCDBLOG1", version, record_size (128), capacity
                     (records), db name; crc32
  log record seq s   at 4096 + ((s-1) % capacity) * 128: "<4sQIQ" b"FCLR", seq, page,
                     value; 100 bytes payload; crc32 of the first 124 bytes
  data block 0       "<8sIII32s" b"FCDBDAT1", version, page_size (4096), pages, db name; crc32
  page p             at 4096 * (1 + p): "<4sIQQ" b"FCPG", page, seq (of the log record it
                     reflects), value; payload; crc32 of the rest. A zero page: never written.
  Consistent: every page's seq is a record in the log image, for that page and value.
"""

from __future__ import annotations

import hashlib
import random
import struct
import zlib
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import attrs

BLOCK = 4096

# ---------------------------------------------------------------------------- FCFS

FS_MAGIC = b"FCFS\x00v01"
FS_VERSION = 1
SB_FMT = "<8sIIQIIIIIIQ32s"
SB_LEN = struct.calcsize(SB_FMT)
JR_MAGIC = b"FCJR"
JR_FMT = "<4sQII"
JR_LEN = struct.calcsize(JR_FMT)
IN_MAGIC = b"FCIN"
IN_FMT = "<4sIIQQI64s"
IN_HEAD = struct.calcsize(IN_FMT)
IN_BLOCK_FMT = "<BI"
IN_BLOCK_LEN = struct.calcsize(IN_BLOCK_FMT)

JOURNAL_BLOCKS = 64
INODE_COUNT = 32
FILE_BLOCKS = 16  # a file holds at most 64 KiB
CHECKPOINT = 8  # superblock written every CHECKPOINT operations
JOURNAL_START = 1
INODE_START = JOURNAL_START + JOURNAL_BLOCKS
DATA_START = INODE_START + INODE_COUNT
FS_BLOCKS = DATA_START + INODE_COUNT * FILE_BLOCKS * 2  # blocks the format needs
FS_MIN_BYTES = FS_BLOCKS * BLOCK

FILE_NAMES = ("orders.csv", "customers.csv", "invoices.log", "stock.dat", "notes.txt", "audit.log")

ReadFn = Callable[[str, int, int], Awaitable[bytes]]
SyncReadFn = Callable[[str, int, int], bytes]


def _crc(data: bytes) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def _pad(data: bytes, size: int = BLOCK) -> bytes:
    return data + bytes(size - len(data))


def pack_superblock(generation: int, total_blocks: int, label: str) -> bytes:
    body = struct.pack(
        SB_FMT,
        FS_MAGIC,
        FS_VERSION,
        BLOCK,
        generation,
        JOURNAL_START,
        JOURNAL_BLOCKS,
        INODE_START,
        INODE_COUNT,
        DATA_START,
        FILE_BLOCKS,
        total_blocks,
        label.encode()[:32],
    )
    return _pad(body + struct.pack("<I", _crc(body)))


def pack_inode(slot: int, seq: int, name: str, size: int, copies: list[int], crcs: list[int]) -> bytes:
    """The inode bytes (without padding); `copies`/`crcs` cover all FILE_BLOCKS blocks."""
    nblocks = -(-size // BLOCK)
    body = struct.pack(IN_FMT, IN_MAGIC, slot, 1, seq, size, nblocks, name.encode()[:64])
    body += b"".join(
        struct.pack(IN_BLOCK_FMT, copies[b], crcs[b] if b < nblocks else 0) for b in range(FILE_BLOCKS)
    )
    return body + struct.pack("<I", _crc(body))


INODE_LEN = IN_HEAD + FILE_BLOCKS * IN_BLOCK_LEN + 4


def pack_journal_record(seq: int, slot: int, inode: bytes) -> bytes:
    body = struct.pack(JR_FMT, JR_MAGIC, seq, slot, len(inode)) + inode
    return _pad(body + struct.pack("<I", _crc(body)))


def data_block(slot: int, block: int, copy: int) -> int:
    return DATA_START + (slot * FILE_BLOCKS + block) * 2 + copy


def _file_line(rng: random.Random, name: str, k: int) -> str:
    if name == "orders.csv":
        return f"{k},{rng.randrange(1, 5000):05d},{rng.randrange(1, 100000) / 100:.2f},{rng.choice('NSPX')}\n"
    if name == "customers.csv":
        return f"{rng.randrange(1, 5000):05d},{rng.choice(['ACME', 'Initech', 'Globex', 'Umbrella', 'Hooli'])},{k}\n"
    if name == "invoices.log":
        return f"op {k} invoice {rng.getrandbits(32):08x} total {rng.randrange(100, 10**6)}\n"
    if name == "stock.dat":
        return f"{rng.randrange(1000):04d}:{rng.randrange(10**4):05d}|"
    if name == "notes.txt":
        return f"note {k}: " + " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "omega"]) for _ in range(6)) + "\n"
    return f"[{k}] user{rng.randrange(100)} {rng.choice(['login', 'logout', 'update', 'delete'])}\n"


@attrs.frozen
class FsOp:
    """One file update: new content of one file, and which logical blocks changed."""

    seq: int
    slot: int
    name: str
    content: bytes
    changed: tuple[int, ...]


def fs_operation(seed: int, seq: int, files: list[bytes]) -> tuple[int, bytes]:
    """Operation `seq` of a filesystem workload: (file slot, the file's new content).

    Pure in (seed, seq, current contents): a test replays it to get the expected files.
    """
    rng = random.Random(f"fcfs:{seed}:{seq}")
    slot = rng.randrange(len(files))
    name = FILE_NAMES[slot]
    old = files[slot]
    limit = FILE_BLOCKS * BLOCK
    lines = "".join(_file_line(rng, name, seq) for _ in range(rng.randrange(5, 80))).encode()
    roll = rng.random()
    if roll < 0.75 and len(old) + len(lines) <= limit:
        new = old + lines  # append
    elif roll < 0.97 and old:
        at = rng.randrange(len(old))
        patch = lines[: max(1, min(len(lines), len(old) - at))]
        new = old[:at] + patch + old[at + len(patch) :]  # overwrite in place
    else:
        new = lines[:limit]  # rewrite from scratch (rotate)
    return slot, new


def expected_files(seed: int, ops: int) -> dict[str, bytes]:
    """The files a filesystem workload with `seed` holds after `ops` operations."""
    files = [b""] * len(FILE_NAMES)
    for seq in range(1, ops + 1):
        slot, content = fs_operation(seed, seq, files)
        files[slot] = content
    return dict(zip(FILE_NAMES, files, strict=True))


# ---------------------------------------------------------------------------- FCDB

LOG_MAGIC = b"FCDBLOG1"
DATA_MAGIC = b"FCDBDAT1"
DB_VERSION = 1
LOG_HDR_FMT = "<8sIIQ32s"
DATA_HDR_FMT = "<8sIII32s"
REC_MAGIC = b"FCLR"
REC_FMT = "<4sQIQ"
REC_SIZE = 128
REC_HEAD = struct.calcsize(REC_FMT)
REC_PAYLOAD = REC_SIZE - REC_HEAD - 4
PAGE_MAGIC = b"FCPG"
PAGE_FMT = "<4sIQQ"
PAGE_HEAD = struct.calcsize(PAGE_FMT)
PAGE_SIZE = BLOCK
DEFAULT_PAGES = 1024
HOT_PAGES = 16


def pack_log_header(capacity: int, name: str) -> bytes:
    body = struct.pack(LOG_HDR_FMT, LOG_MAGIC, DB_VERSION, REC_SIZE, capacity, name.encode()[:32])
    return _pad(body + struct.pack("<I", _crc(body)))


def pack_data_header(pages: int, name: str) -> bytes:
    body = struct.pack(DATA_HDR_FMT, DATA_MAGIC, DB_VERSION, PAGE_SIZE, pages, name.encode()[:32])
    return _pad(body + struct.pack("<I", _crc(body)))


def pack_record(seq: int, page: int, value: int) -> bytes:
    payload = hashlib.blake2b(struct.pack("<QIQ", seq, page, value), digest_size=50).digest() * 2
    body = struct.pack(REC_FMT, REC_MAGIC, seq, page, value) + payload[:REC_PAYLOAD]
    return body + struct.pack("<I", _crc(body))


def pack_page(page: int, seq: int, value: int) -> bytes:
    filler = struct.pack("<QQ", value, seq) * ((PAGE_SIZE - PAGE_HEAD - 4) // 16 + 1)
    body = struct.pack(PAGE_FMT, PAGE_MAGIC, page, seq, value) + filler[: PAGE_SIZE - PAGE_HEAD - 4]
    return body + struct.pack("<I", _crc(body))


def log_offset(seq: int, capacity: int) -> int:
    return BLOCK + ((seq - 1) % capacity) * REC_SIZE


def page_offset(page: int) -> int:
    return PAGE_SIZE * (1 + page)


def db_transaction(seed: int, seq: int, pages: int) -> tuple[int, int]:
    """Transaction `seq` of a database workload: (page, new value). Pure in (seed, seq)."""
    rng = random.Random(f"fcdb:{seed}:{seq}")
    page = rng.randrange(min(HOT_PAGES, pages)) if rng.random() < 0.5 else rng.randrange(pages)
    return page, rng.getrandbits(63)


def expected_pages(seed: int, transactions: int, pages: int = DEFAULT_PAGES) -> dict[int, tuple[int, int]]:
    """page -> (seq, value) after `transactions` transactions of a workload with `seed`."""
    state: dict[int, tuple[int, int]] = {}
    for seq in range(1, transactions + 1):
        page, value = db_transaction(seed, seq, pages)
        state[page] = (seq, value)
    return state


def log_capacity(log_bytes: int) -> int:
    return (log_bytes - BLOCK) // REC_SIZE


# ---------------------------------------------------------------------------- the guest side


class GuestIO(Protocol):
    """What a workload may do inside its guest (implemented by the site shell).

    `write` takes the workload's modelled per-write latency (`write_latency`, site
    seconds; the data lands when it ends) and waits while the array holds the LSS
    (extended long busy); `mid_transaction`
    waits while the guest's file system is frozen (a database's next write is held by
    the frozen file system, even mid-transaction). Operations are bracketed by the shell,
    which holds new ones while the guest is quiesced or off and lets a quiesce wait for
    the ones in flight (the database "finishes in-flight transactions").
    """

    async def read(self, serial: str, offset: int, length: int) -> bytes: ...

    async def write(self, serial: str, offset: int, data: bytes) -> None: ...

    async def mid_transaction(self) -> None: ...


class Workload(Protocol):
    name: str
    vm: str
    interval: float
    seed: int

    @property
    def serials(self) -> tuple[str, ...]: ...

    def format_image(self) -> list[tuple[str, int, bytes]]: ...

    async def recover(self, read: ReadFn) -> None: ...

    async def step(self, io: GuestIO) -> None: ...

    def pause(self) -> float: ...

    def describe(self) -> dict[str, object]: ...


@attrs.define
class FilesystemWorkload:
    """An FCFS file system on one LUN, updated one file at a time."""

    name: str
    vm: str
    serial: str
    seed: int
    interval: float = 1.0
    label: str = ""
    autostart: bool = False
    total_blocks: int = FS_BLOCKS
    ops: int = 0  # operations completed (= journal seq of the last one)
    files: list[bytes] = attrs.Factory(lambda: [b""] * len(FILE_NAMES))
    copies: list[list[int]] = attrs.Factory(lambda: [[0] * FILE_BLOCKS for _ in FILE_NAMES])
    crcs: list[list[int]] = attrs.Factory(lambda: [[0] * FILE_BLOCKS for _ in FILE_NAMES])
    unformatted: bool = False

    def spec(self) -> dict[str, object]:
        """Plain data that rebuilds this workload (its progress is re-read from the image)."""
        return {"kind": "filesystem", "name": self.name, "vm": self.vm, "serial": self.serial, "seed": self.seed,
                "interval": self.interval, "label": self.label, "autostart": self.autostart}

    @property
    def serials(self) -> tuple[str, ...]:
        return (self.serial,)

    def format_image(self) -> list[tuple[str, int, bytes]]:
        """mkfs: the writes that lay down an empty file system with the workload's files."""
        self.ops = 0
        self.files = [b""] * len(FILE_NAMES)
        self.copies = [[0] * FILE_BLOCKS for _ in FILE_NAMES]
        self.crcs = [[0] * FILE_BLOCKS for _ in FILE_NAMES]
        writes = [(self.serial, 0, pack_superblock(0, self.total_blocks, self.label or self.name))]
        for slot, fname in enumerate(FILE_NAMES):
            inode = pack_inode(slot, 0, fname, 0, self.copies[slot], self.crcs[slot])
            writes.append((self.serial, (INODE_START + slot) * BLOCK, _pad(inode)))
        return writes

    async def recover(self, read: ReadFn) -> None:
        """Re-read the state from the image (after a reboot, a restore, a site restart).

        Trusts the image the way a mount does: superblock, journal replay, inodes; the
        content is whatever the blocks hold (the checker, not the writer, judges them).
        """
        sb = await read(self.serial, 0, BLOCK)
        magic, _v, _bs, generation = struct.unpack_from("<8sIIQ", sb)
        if magic != FS_MAGIC:
            # not (or no longer) a file system: start from an empty one again
            self.unformatted = True
            self.format_image()
            return
        self.unformatted = False
        inodes: dict[int, bytes] = {}
        table = await read(self.serial, INODE_START * BLOCK, INODE_COUNT * BLOCK)
        for slot in range(len(FILE_NAMES)):
            inodes[slot] = table[slot * BLOCK : slot * BLOCK + INODE_LEN]
        seq = generation
        journal = await read(self.serial, JOURNAL_START * BLOCK, JOURNAL_BLOCKS * BLOCK)
        last = generation
        for _ in range(JOURNAL_BLOCKS):
            nxt = seq + 1
            at = ((nxt - 1) % JOURNAL_BLOCKS) * BLOCK
            rec = journal[at : at + BLOCK]
            magic, rseq, slot, length = struct.unpack_from(JR_FMT, rec)
            if magic != JR_MAGIC or rseq != nxt:
                break
            body = rec[: JR_LEN + length]
            (crc,) = struct.unpack_from("<I", rec, JR_LEN + length)
            if crc != _crc(body):
                break
            if slot < len(FILE_NAMES):
                inodes[slot] = rec[JR_LEN : JR_LEN + length]
            seq = last = nxt
        max_seq = last
        for slot, inode in inodes.items():
            _m, _s, _u, iseq, size, nblocks, _n = struct.unpack_from(IN_FMT, inode)
            max_seq = max(max_seq, iseq)
            copies, crcs = [], []
            for b in range(FILE_BLOCKS):
                c, k = struct.unpack_from(IN_BLOCK_FMT, inode, IN_HEAD + b * IN_BLOCK_LEN)
                copies.append(c)
                crcs.append(k)
            content = b""
            for b in range(nblocks):
                content += await read(self.serial, data_block(slot, b, copies[b]) * BLOCK, BLOCK)
            self.files[slot] = content[:size]
            self.copies[slot] = copies
            self.crcs[slot] = crcs
        self.ops = max_seq

    async def step(self, io: GuestIO) -> None:
        if self.unformatted:
            for serial, offset, data in self.format_image():
                await io.write(serial, offset, data)
            self.unformatted = False
            return
        seq = self.ops + 1
        slot, content = fs_operation(self.seed, seq, self.files)
        old = self.files[slot]
        copies = list(self.copies[slot])
        crcs = list(self.crcs[slot])
        nblocks = -(-len(content) // BLOCK)
        for b in range(nblocks):
            chunk = _pad(content[b * BLOCK : (b + 1) * BLOCK])
            if b * BLOCK < len(old) and _pad(old[b * BLOCK : (b + 1) * BLOCK]) == chunk and b < -(-len(old) // BLOCK):
                continue  # unchanged block: the inode keeps pointing at the current copy
            copies[b] ^= 1  # shadow: never overwrite the copy the on-disk inode points at
            crcs[b] = _crc(chunk)
            await io.write(self.serial, data_block(slot, b, copies[b]) * BLOCK, chunk)
        inode = pack_inode(slot, seq, FILE_NAMES[slot], len(content), copies, crcs)
        await io.write(self.serial, (JOURNAL_START + (seq - 1) % JOURNAL_BLOCKS) * BLOCK, pack_journal_record(seq, slot, inode))
        await io.write(self.serial, (INODE_START + slot) * BLOCK, _pad(inode))
        if seq % CHECKPOINT == 0:
            await io.write(self.serial, 0, pack_superblock(seq, self.total_blocks, self.label or self.name))
        self.files[slot] = content
        self.copies[slot] = copies
        self.crcs[slot] = crcs
        self.ops = seq

    def pause(self) -> float:
        rng = random.Random(f"fcfs-pace:{self.seed}:{self.ops}")
        return self.interval * rng.uniform(0.5, 1.5)

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "kind": "filesystem", "vm": self.vm, "serials": [self.serial],
                "seed": self.seed, "interval": self.interval, "operations": self.ops}


@attrs.define
class DatabaseWorkload:
    """A log-then-page database over two LUNs (possibly on two LSSs)."""

    name: str
    vm: str
    log_serial: str
    data_serial: str
    seed: int
    interval: float = 0.1
    pages: int = DEFAULT_PAGES
    capacity: int = 0  # log records before the log wraps
    autostart: bool = False
    seq: int = 0  # last committed transaction

    def spec(self) -> dict[str, object]:
        return {"kind": "database", "name": self.name, "vm": self.vm, "log_serial": self.log_serial,
                "data_serial": self.data_serial, "seed": self.seed, "interval": self.interval,
                "pages": self.pages, "capacity": self.capacity, "autostart": self.autostart}

    @property
    def serials(self) -> tuple[str, ...]:
        return (self.log_serial, self.data_serial)

    def format_image(self) -> list[tuple[str, int, bytes]]:
        self.seq = 0
        return [
            (self.log_serial, 0, pack_log_header(self.capacity, self.name)),
            (self.data_serial, 0, pack_data_header(self.pages, self.name)),
        ]

    async def recover(self, read: ReadFn) -> None:
        """Find the log head (the last record appended) by bisecting the circular log."""

        async def seq_at(slot: int) -> int:
            rec = await read(self.log_serial, BLOCK + slot * REC_SIZE, REC_SIZE)
            magic, seq, _p, _v = struct.unpack_from(REC_FMT, rec)
            if magic != REC_MAGIC or struct.unpack_from("<I", rec, REC_SIZE - 4)[0] != _crc(rec[:-4]):
                return 0
            return seq

        first = await seq_at(0)
        if first == 0:
            self.seq = 0
            return
        lo, hi = 0, self.capacity - 1  # last slot written in the same lap as slot 0
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if await seq_at(mid) == first + mid:
                lo = mid
            else:
                hi = mid - 1
        self.seq = first + lo

    async def step(self, io: GuestIO) -> None:
        seq = self.seq + 1
        page, value = db_transaction(self.seed, seq, self.pages)
        await io.write(self.log_serial, log_offset(seq, self.capacity), pack_record(seq, page, value))
        # dependent write: the page goes out only after the log record is on the LUN
        await io.mid_transaction()
        await io.write(self.data_serial, page_offset(page), pack_page(page, seq, value))
        self.seq = seq

    def pause(self) -> float:
        rng = random.Random(f"fcdb-pace:{self.seed}:{self.seq}")
        return self.interval * rng.uniform(0.2, 1.8)

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "kind": "database", "vm": self.vm,
                "serials": [self.log_serial, self.data_serial], "seed": self.seed,
                "interval": self.interval, "transactions": self.seq, "pages": self.pages}


def from_spec(spec: dict[str, object]) -> Any:
    """Rebuild a workload from `spec()` plain data (real applications imported on demand)."""
    data = dict(spec)
    kind = data.pop("kind")
    if kind == "filesystem":
        return FilesystemWorkload(**data)  # type: ignore[arg-type]
    if kind == "database":
        return DatabaseWorkload(**data)  # type: ignore[arg-type]
    if kind == "sqlite":
        from flowcopy.site.apps.sqlite_app import SqliteWorkload

        return SqliteWorkload(**data)  # type: ignore[arg-type]
    if kind == "ext4":
        from flowcopy.site.apps.ext4_app import Ext4Workload

        return Ext4Workload(**data)  # type: ignore[arg-type]
    raise ValueError(f"unknown workload kind {kind!r}")
