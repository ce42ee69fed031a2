"""A real SQLite database on two LUNs: the main file on one, the journal or WAL on the other.

SQLite (apsw's bundled copy) runs unmodified inside the guest; a small apsw VFS maps each
file SQLite opens onto one LUN. The VFS is the guest's page cache: reads are served from
the guest's view of its files, every write SQLite makes (and every file-size or
delete change, at the next `xSync` or at once for a delete) is queued, and the workload
sends the queue through the guest's I/O path (`GuestIO.write`, one call per SQLite
write, in SQLite's order) before it counts the transaction as committed. So a
consistency-group freeze, a guest quiesce and the array's copy-on-write meet every single
write SQLite makes, and with a modelled per-write latency a copy can land between any two
of them.

Per-LUN file header (the only format of ours; `sqlite_check` re-reads it on its own):

  LUN bytes 0..4095   "<8s64sQB": magic b"FCLUNF01", file name (UTF-8, NUL padded, the
                      name SQLite opened, e.g. "bank.db", "bank.db-journal",
                      "bank.db-wal"), file size in bytes (u64), exists flag (u8, 0/1);
                      the rest of the block is zero
  LUN bytes 4096..    the file's bytes: file offset o is LUN offset 4096 + o

The header is one write inside one track, so it changes atomically. A file that never
existed on its LUN has a header with exists = 0 (written at format).

The workload: accounts with a constant total (kept in `meta`), a secondary index over
(balance), and a numbered history (seq 1, 2, ...); transaction k moves an amount between
two accounts and appends history row k. It is deterministic from the seed: transaction k
is a pure function of (seed, k, the balances), and SQLite's randomness (WAL salts) comes
from a seeded generator.

WAL needs shared memory for its index and the VFS has no xShm methods, so a WAL database
runs with `PRAGMA locking_mode=EXCLUSIVE` (the index lives in heap memory; one guest
process owns the database, as a database server does).
"""

from __future__ import annotations

import itertools
import random
import struct
from typing import Any

import apsw
import attrs

from flowcopy.site.apps.progress import WriteProgress

HEADER_MAGIC = b"FCLUNF01"
HEADER_FMT = "<8s64sQB"
DATA_OFFSET = 4096
DB_NAME = "bank.db"
ACCOUNTS = 1000  # ~40 table pages and a multi-page index: a transfer touches pages all over the file
INITIAL_BALANCE = 10_000
JOURNALS = ("rollback", "wal")
WAL_AUTOCHECKPOINT = 64  # pages: a checkpoint every few dozen transactions

_vfs_ids = itertools.count(1)


def pack_header(name: str, size: int, exists: bool) -> bytes:
    body = struct.pack(HEADER_FMT, HEADER_MAGIC, name.encode()[:64], size, 1 if exists else 0)
    return body + bytes(DATA_OFFSET - len(body))


@attrs.define
class _File:
    """One file of the guest's view: its LUN, bytes, size and whether it exists."""

    serial: str
    name: str
    data: bytearray = attrs.Factory(bytearray)
    exists: bool = False
    header_dirty: bool = False


MAX_IO = 64 * 1024


class _Queue:
    """Writes SQLite made that the guest has not sent to its LUNs yet, in order.

    Like a page cache, a write that continues the previous one on the same LUN joins it
    (up to 64 KiB), never across an `xSync`: SQLite's ordering points stay write
    boundaries, so every cut of the sent stream is a state SQLite could have crashed in.
    """

    def __init__(self) -> None:
        self.writes: list[tuple[str, int, bytes]] = []
        self.barrier = True

    def add(self, serial: str, offset: int, data: bytes) -> None:
        if not self.barrier and self.writes:
            last_serial, last_offset, last = self.writes[-1]
            if last_serial == serial and last_offset + len(last) == offset and len(last) + len(data) <= MAX_IO:
                self.writes[-1] = (serial, last_offset, last + data)
                return
        self.writes.append((serial, offset, data))
        self.barrier = False

    def sync(self) -> None:
        self.barrier = True

    def header(self, f: _File) -> None:
        self.writes.append((f.serial, 0, pack_header(f.name, len(f.data), f.exists)))
        self.barrier = True
        f.header_dirty = False


class _VFSFile:
    """An open SQLite file backed by a `_File` (locks are no-ops: one process per database)."""

    def __init__(self, f: _File, queue: _Queue) -> None:
        self.f = f
        self.queue = queue

    def xRead(self, amount: int, offset: int) -> bytes:
        return bytes(self.f.data[offset : offset + amount])  # short read: SQLite zero-fills

    def xWrite(self, data: Any, offset: int) -> None:
        buf = bytes(data)
        f = self.f
        end = offset + len(buf)
        if end > len(f.data):
            f.data.extend(bytes(end - len(f.data)))
            f.header_dirty = True
        f.data[offset:end] = buf
        self.queue.add(f.serial, DATA_OFFSET + offset, buf)

    def xTruncate(self, newsize: int) -> None:
        if newsize < len(self.f.data):
            del self.f.data[newsize:]
            self.f.header_dirty = True

    def xSync(self, flags: int) -> None:
        if self.f.header_dirty:
            self.queue.header(self.f)
        self.queue.sync()

    def xFileSize(self) -> int:
        return len(self.f.data)

    def xLock(self, level: int) -> None:
        pass

    def xUnlock(self, level: int) -> None:
        pass

    def xCheckReservedLock(self) -> bool:
        return False

    def xFileControl(self, op: int, ptr: int) -> bool:
        return False

    def xSectorSize(self) -> int:
        return 4096

    def xDeviceCharacteristics(self) -> int:
        return apsw.mapping_device_characteristics["SQLITE_IOCAP_POWERSAFE_OVERWRITE"]

    def xClose(self) -> None:
        pass


class _LunVFS(apsw.VFS):
    """Files by name onto LUNs: the main database on one, its journal/WAL on the other."""

    def __init__(self, files: dict[str, _File], queue: _Queue, seed: int) -> None:
        self.vfs_name = f"flowcopy-lun-{next(_vfs_ids)}"
        self.files = files
        self.queue = queue
        self.rng = random.Random(f"sqlite-vfs:{seed}")
        super().__init__(self.vfs_name, "")

    def _file(self, name: str | None) -> _File:
        base = str(name).rsplit("/", 1)[-1]
        f = self.files.get(base)
        if f is None:
            raise apsw.CantOpenError(f"no LUN holds {base!r} (only {', '.join(sorted(self.files))})")
        return f

    def xOpen(self, name: Any, flags: list[int]) -> _VFSFile:
        f = self._file(name.filename() if isinstance(name, apsw.URIFilename) else name)
        if not f.exists:
            f.exists = True
            f.data = bytearray()
            self.queue.header(f)
        return _VFSFile(f, self.queue)

    def xAccess(self, pathname: str, flags: int) -> bool:
        base = str(pathname).rsplit("/", 1)[-1]
        f = self.files.get(base)
        return f is not None and f.exists

    def xDelete(self, filename: str, syncdir: bool) -> None:
        f = self._file(filename)
        f.exists = False
        f.data = bytearray()
        self.queue.header(f)

    def xFullPathname(self, name: str) -> str:
        return "/" + str(name).rsplit("/", 1)[-1]

    def xRandomness(self, numbytes: int) -> bytes:
        return self.rng.randbytes(numbytes)


def transfer(seed: int, seq: int, balances: list[int]) -> tuple[int, int, int, str]:
    """Transaction `seq`: (from account, to account, amount, note). Pure in its arguments."""
    rng = random.Random(f"sqlite-bank:{seed}:{seq}")
    src = rng.randrange(len(balances))
    dst = (src + rng.randrange(1, len(balances))) % len(balances)
    amount = rng.randrange(0, balances[src] // 4 + 1)
    note = f"transfer {seq}: " + rng.randbytes(rng.randrange(16, 160)).hex()
    return src + 1, dst + 1, amount, note


@attrs.define
class SqliteWorkload:
    """A bank on SQLite: main database on `db_serial`, journal or WAL on `journal_serial`."""

    name: str
    vm: str
    db_serial: str
    journal_serial: str
    seed: int
    interval: float = 0.05
    journal: str = "rollback"
    write_latency: float = 0.001
    autostart: bool = False
    committed: int = 0  # transactions acknowledged to the application (all writes on the LUNs)
    _files: dict[str, _File] = attrs.field(factory=dict, init=False, repr=False)
    _queue: _Queue = attrs.field(factory=_Queue, init=False, repr=False)
    _vfs: Any = attrs.field(default=None, init=False, repr=False)
    _db: Any = attrs.field(default=None, init=False, repr=False)
    _balances: list[int] = attrs.field(factory=list, init=False, repr=False)
    progress: WriteProgress = attrs.field(factory=WriteProgress, init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        if self.journal not in JOURNALS:
            raise ValueError(f"journal must be one of {', '.join(JOURNALS)}, not {self.journal!r}")

    def spec(self) -> dict[str, object]:
        return {"kind": "sqlite", "name": self.name, "vm": self.vm, "db_serial": self.db_serial,
                "journal_serial": self.journal_serial, "seed": self.seed, "interval": self.interval,
                "journal": self.journal, "write_latency": self.write_latency, "autostart": self.autostart}

    @property
    def serials(self) -> tuple[str, ...]:
        return (self.db_serial, self.journal_serial)

    @property
    def journal_name(self) -> str:
        return DB_NAME + ("-wal" if self.journal == "wal" else "-journal")

    # ------------------------------------------------------------------ the guest's view

    def _close(self) -> None:
        if self._db is not None:
            self._db.close(True)
            self._db = None
        if self._vfs is not None:
            self._vfs.unregister()
            self._vfs = None

    def _open(self, files: dict[str, _File]) -> None:
        """Mount the guest's view and open the database (SQLite recovers a hot journal/WAL here)."""
        self._close()
        self._files = files
        self._queue = _Queue()
        self._vfs = _LunVFS(files, self._queue, self.seed)
        db = apsw.Connection(DB_NAME, vfs=self._vfs.vfs_name)
        if self.journal == "wal":
            db.execute("PRAGMA locking_mode=EXCLUSIVE")  # before anything reads the database: no xShm
        db.execute("PRAGMA synchronous=FULL; PRAGMA temp_store=MEMORY; PRAGMA cache_size=-256")
        if self.journal == "wal":
            if not files[DB_NAME].data:  # a new database turns WAL without a rollback journal file
                db.execute("PRAGMA journal_mode=MEMORY")
            mode = db.execute("PRAGMA journal_mode=WAL").fetchall()[0][0]
            db.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT}")
        else:
            mode = db.execute("PRAGMA journal_mode=DELETE").fetchall()[0][0]
        if mode != ("wal" if self.journal == "wal" else "delete"):
            raise RuntimeError(f"SQLite refused journal mode {self.journal}: it runs in {mode}")
        self._db = db

    def _load_state(self) -> None:
        db = self._db
        exists = db.execute("SELECT count(*) FROM sqlite_master WHERE name='history'").fetchall()[0][0]
        if not exists:
            self._create()
        self._balances = [b for (b,) in db.execute("SELECT balance FROM accounts ORDER BY id")]
        self.committed = db.execute("SELECT coalesce(max(seq), 0) FROM history").fetchall()[0][0]

    def _create(self) -> None:
        with self._db:
            self._db.execute(
                "CREATE TABLE meta(key TEXT PRIMARY KEY, value INTEGER NOT NULL);"
                "CREATE TABLE accounts(id INTEGER PRIMARY KEY, owner TEXT NOT NULL, balance INTEGER NOT NULL);"
                "CREATE INDEX accounts_balance ON accounts(balance);"
                "CREATE TABLE history(seq INTEGER PRIMARY KEY, src INTEGER NOT NULL, dst INTEGER NOT NULL,"
                " amount INTEGER NOT NULL, note TEXT NOT NULL);"
                "CREATE INDEX history_src ON history(src, seq);"
            )
            self._db.execute("INSERT INTO meta VALUES ('accounts', ?), ('initial_balance', ?), ('total', ?)",
                             (ACCOUNTS, INITIAL_BALANCE, ACCOUNTS * INITIAL_BALANCE))
            self._db.executemany("INSERT INTO accounts VALUES (?, ?, ?)",
                                 [(i, f"owner-{i:04d} " + "." * 120, INITIAL_BALANCE) for i in range(1, ACCOUNTS + 1)])

    def _empty_files(self) -> dict[str, _File]:
        return {DB_NAME: _File(self.db_serial, DB_NAME), self.journal_name: _File(self.journal_serial, self.journal_name)}

    def format_image(self) -> list[tuple[str, int, bytes]]:
        """Create the database: the writes that lay it down on the two LUNs (at lab build)."""
        files = self._empty_files()
        self._open(files)
        # both LUNs first say "no file here"; then SQLite creates its files
        self._queue.writes[:0] = [(f.serial, 0, pack_header(f.name, 0, False)) for f in files.values()]
        self._load_state()
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)" if self.journal == "wal" else "SELECT 1").fetchall()
        for f in files.values():
            if f.header_dirty:
                self._queue.header(f)
        writes, self._queue.writes[:] = list(self._queue.writes), []
        return writes

    async def recover(self, read: Any) -> None:
        """Boot: read both LUNs' files into the guest's view, let SQLite recover, re-read state."""
        files = self._empty_files()
        for f in files.values():
            head = await read(f.serial, 0, DATA_OFFSET)
            magic, raw_name, size, exists = struct.unpack_from(HEADER_FMT, head)
            if magic != HEADER_MAGIC:
                continue  # never formatted: SQLite creates the files
            f.exists = bool(exists)
            if f.exists and size:
                f.data = bytearray(await read(f.serial, DATA_OFFSET, size))
        self._open(files)
        self._load_state()  # a hot journal rolls back / the WAL is replayed here; writes queued

    # ------------------------------------------------------------------ the workload

    async def _flush(self, io: Any) -> None:
        queue = self._queue.writes
        while queue:
            serial, offset, data = queue[0]
            await io.mid_transaction()
            await io.write(serial, offset, data)
            del queue[0]
            self.progress.wrote()

    async def step(self, io: Any) -> None:
        if self._db is None:
            await self.recover(io.read)
        await self._flush(io)  # what recovery wrote
        seq = self.committed + 1
        src, dst, amount, note = transfer(self.seed, seq, self._balances)
        with self._db:
            self._db.execute("UPDATE accounts SET balance = balance - ? WHERE id = ?", (amount, src))
            self._db.execute("UPDATE accounts SET balance = balance + ? WHERE id = ?", (amount, dst))
            self._db.execute("INSERT INTO history VALUES (?, ?, ?, ?, ?)", (seq, src, dst, amount, note))
        await self._flush(io)  # COMMIT returns once SQLite's writes are on the LUNs
        self._balances[src - 1] -= amount
        self._balances[dst - 1] += amount
        self.committed = seq

    def pause(self) -> float:
        rng = random.Random(f"sqlite-pace:{self.seed}:{self.committed}")
        return self.interval * rng.uniform(0.5, 1.5)

    def point_in_time(self) -> dict[str, object]:
        """What the application had acknowledged now: an image of now must hold at least this."""
        return {"kind": "sqlite", "workload": self.name, "committed": self.committed}

    def counts(self) -> dict[str, int]:
        """Row counts from the guest's live database (for people)."""
        if self._db is None:
            return {}
        return {t: self._db.execute(f"SELECT count(*) FROM {t}").fetchall()[0][0] for t in ("accounts", "history")}

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "kind": "sqlite", "vm": self.vm, "serials": [self.db_serial, self.journal_serial],
                "seed": self.seed, "interval": self.interval, "journal": self.journal,
                "write_latency": self.write_latency, "transactions": self.committed}
