"""The SQLite journal backend: one file in the store folder, WAL, synchronous=FULL.

The embedded default. The store lock (an flock on `journal.lock`) is the degenerate
lease: one engine holds every unit of the store for as long as it lives, so no unit
ever needs fencing beyond it. The group-commit writer lives in `journal.api`; this
module supplies the connection, the transaction of a batch and the reads.

The writer's connection is touched only by the writer task, serially (inline or in
its one worker thread), so no two threads ever write at once (hence
`check_same_thread=False` is safe).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import time
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flowcopy.journal.api import (
    Journal,
    JournalClosed,
    JournalConflict,
    JournalCorrupt,
    JournalNotFound,
    StoreLocked,
    StoreUnusable,
    UnknownRun,
    _Request,
)
from flowcopy.journal import catalog
from flowcopy.journal.schema import MIGRATIONS, SCHEMA_VERSION

if TYPE_CHECKING:
    import sqlite_utils

# sqlite_utils is imported by the writer only: the read-only view (`flowcopy status`)
# uses the stdlib driver and starts without it

JOURNAL_FILE = "journal.sqlite"
LOCK_FILE = "journal.lock"
APPLICATION_ID = 0x466C4370
"""'FlCp' in the SQLite header: tells a flowcopy journal from any other SQLite file."""

BUSY_TIMEOUT_MS = 10_000
_DB_ERRORS = (sqlite3.DatabaseError, UnicodeDecodeError)
"""What a damaged file raises: sqlite3 itself fails to decode some of its error messages."""


# --------------------------------------------------------------------------- schema


def _migrate(db: sqlite_utils.Database, path: Path, upto: int = SCHEMA_VERSION) -> int:
    """Bring the schema to `upto`, one transaction per migration; return the old version."""
    version = _user_version(db, path)
    for i in range(version, upto):
        with db.atomic():
            for statement in MIGRATIONS[i]:
                if callable(statement):
                    statement(db.execute)  # a data step (schema.Step)
                else:
                    db.execute(statement)
            db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            db.execute(f"PRAGMA user_version = {i + 1}")
    return version


def _user_version(db: sqlite_utils.Database | sqlite3.Connection, path: Path) -> int:
    """Schema version of `path`, after checking it is a flowcopy journal we can read."""
    try:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        app_id = db.execute("PRAGMA application_id").fetchone()[0]
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
    except _DB_ERRORS as exc:
        raise JournalCorrupt(f"{path} is not a flowcopy journal: {exc}") from None
    if app_id != APPLICATION_ID and (app_id != 0 or version != 0 or tables):
        raise JournalCorrupt(
            f"{path} is an SQLite database but not a flowcopy journal "
            f"(application_id {app_id:#x}, tables: {', '.join(tables) or 'none'})"
        )
    if version > SCHEMA_VERSION:
        raise JournalCorrupt(
            f"{path} has journal schema v{version}, newer than this flowcopy understands "
            f"(v{SCHEMA_VERSION}); use the newer flowcopy that wrote it"
        )
    return int(version)


RECOVER = (
    "stop every engine on the store, then restore journal.sqlite from your last copy "
    "(`flowcopy journal backup FILE` makes one while engines run) and run `flowcopy journal check`"
)


def _read_only_fs(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _check_file(path: Path) -> None:
    """Refuse an existing journal file that cannot be one, before SQLite touches it: a
    journal is only ever created whole (`_create`), so an empty or headless file is
    damage, never a journal to start afresh (that would forget every run)."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as exc:
        raise JournalCorrupt(f"{path} cannot be read: {exc.strerror}") from None
    if not head:
        raise JournalCorrupt(
            f"{path} is empty (0 bytes): the journal was truncated or damaged; flowcopy will not "
            f"start it afresh, which would forget every run: {RECOVER}"
        )
    if head != b"SQLite format 3\x00":
        raise JournalCorrupt(f"{path} is not a flowcopy journal: file is not a database (damaged header): {RECOVER}")


def _create(store: Path, path: Path) -> None:
    """Make a new journal whole under a temporary name, then rename it into place: a
    journal.sqlite that exists was complete once, whatever killed its creator."""
    import sqlite_utils

    tmp = store / (JOURNAL_FILE + ".creating")
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{tmp}{suffix}").unlink(missing_ok=True)
    try:
        conn = _connect(tmp)
        try:
            db = sqlite_utils.Database(conn)
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = FULL")
            _migrate(db, tmp)
        finally:
            conn.close()  # the last connection: the WAL is checkpointed into the file
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
        dfd = os.open(store, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except _DB_ERRORS as exc:
        raise StoreUnusable(f"cannot create the journal {path}: {exc}") from None


def _connect(path: Path, *, check_same_thread: bool = True) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), check_same_thread=check_same_thread, timeout=BUSY_TIMEOUT_MS / 1000)
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    return conn


# --------------------------------------------------------------------------- store lock


def _lock_store(store: Path) -> int:
    """Take the store's exclusive lock; return the fd that holds it.

    flock is tied to the open file: the OS drops it when the holder dies however it
    dies (SIGKILL included), so a stale lock is simply free and taken over here; the
    pid written inside is only there to say who holds a live one.
    """
    path = store / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid, started = _lock_holder(fd)
        os.close(fd)
        raise StoreLocked(store, pid, started) from None
    except BaseException:
        os.close(fd)
        raise
    started = datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()}\nstarted {started}\n".encode(), 0)
    return fd


def _lock_holder(fd: int) -> tuple[int | None, str | None]:
    pid: int | None = None
    started: str | None = None
    for _ in range(3):  # the holder may be between truncate and write
        text = os.pread(fd, 4096, 0).decode(errors="replace")
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "pid" and value.strip().isdigit():
                pid = int(value)
            elif key == "started":
                started = value.strip()
        if pid is not None:
            break
        time.sleep(0.01)
    return pid, started


def read_lock_holder(store: Path) -> tuple[int | None, str | None] | None:
    """(pid, started) of the live process holding `store`, or None when it is free."""
    path = store / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return _lock_holder(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)



class SqliteJournal(Journal):
    """The journal in `<store>/journal.sqlite`. See the module docstring."""

    backend_errors = (sqlite3.Error, UnicodeDecodeError)
    recover_hint = RECOVER

    def __init__(self, store: Path, path: Path, *, readonly: bool, lock_fd: int | None) -> None:
        super().__init__(store, path, readonly=readonly)
        self._lock_fd = lock_fd
        self._wconn: sqlite3.Connection | None = None
        self._wdb: sqlite_utils.Database | None = None
        self._rconn: sqlite3.Connection | None = None
        self._rdb: sqlite3.Connection | None = None  # the reader: plain stdlib, dict-like rows

    # ------------------------------------------------------------------ open / close

    @classmethod
    def open(cls, store: Path | str, *, lock: bool = True) -> SqliteJournal:
        """Open (creating and migrating when `lock`) the journal of `store`.

        `lock=False` is the read-only view for `flowcopy status` while an engine runs:
        no lock, no migration, no writes except `request_cancel_sync`.
        """
        store = Path(store)
        path = store / JOURNAL_FILE
        if not lock:
            if not path.exists():
                raise JournalNotFound(f"store {store} has no journal ({path} does not exist)")
            _check_file(path)
            journal = cls(store, path, readonly=True, lock_fd=None)
            try:
                journal._open_reader(immutable=_read_only_fs(store))
                version = _user_version(journal._rdb, path)  # type: ignore[arg-type]
                if version < SCHEMA_VERSION:
                    raise JournalCorrupt(
                        f"{path} has journal schema v{version}; start an engine on the store "
                        f"to upgrade it to v{SCHEMA_VERSION} before reading it"
                    )
            except BaseException:
                journal.close()
                raise
            return journal

        try:
            store.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreUnusable(f"cannot create store {store}: {exc.strerror}") from None
        if _read_only_fs(store):
            raise StoreUnusable(
                f"store {store} is on a read-only file system: an engine writes its journal there "
                "(remount it read-write, or give a writable --store; `flowcopy status` still reads it)"
            )
        try:
            fd = _lock_store(store)
        except PermissionError as exc:
            raise StoreUnusable(f"store {store}: cannot take the store lock: {exc.strerror}") from None
        journal = cls(store, path, readonly=False, lock_fd=fd)
        try:
            if not path.exists():
                _create(store, path)
            else:
                _check_file(path)
            journal._open_writer()
            journal._open_reader()
        except BaseException:
            journal.close()
            raise
        return journal

    def _open_writer(self) -> None:
        import sqlite_utils

        try:
            conn = _connect(self.path, check_same_thread=False)
        except _DB_ERRORS as exc:
            raise JournalCorrupt(f"{self.path} cannot be opened: {exc}") from None
        self._wconn = conn
        db = sqlite_utils.Database(conn)
        self._wdb = db
        _user_version(db, self.path)  # refuse foreign or newer files before touching them
        try:
            mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            db.execute("PRAGMA synchronous = FULL")
            db.execute("PRAGMA foreign_keys = ON")
        except _DB_ERRORS as exc:
            raise JournalCorrupt(f"{self.path} is not a usable journal: {exc}") from None
        if str(mode).lower() != "wal":
            raise StoreUnusable(f"{self.path}: the file system does not support WAL mode ({mode})")
        try:
            _migrate(db, self.path)
        except _DB_ERRORS as exc:
            raise JournalCorrupt(f"{self.path}: schema migration failed: {exc}") from None

    def _open_reader(self, *, immutable: bool = False) -> None:
        try:
            if immutable:  # a read-only file system: no -shm can be made, and nothing changes
                conn = sqlite3.connect(f"file:{self.path}?mode=ro&immutable=1", uri=True)
            else:
                conn = _connect(self.path)
            conn.execute("PRAGMA query_only = ON")
        except _DB_ERRORS as exc:
            raise JournalCorrupt(f"{self.path} cannot be opened: {exc}") from None
        conn.row_factory = sqlite3.Row
        self._rconn = conn
        self._rdb = conn

    def close(self) -> None:
        """Close the connections and release the store lock. Pending writes fail."""
        self._fail_pending(JournalClosed(f"journal {self.path} closed before this write was committed"))
        for conn in (self._wconn, self._rconn):
            if conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
        self._wconn = self._rconn = None
        self._wdb = self._rdb = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def _writable(self) -> bool:
        return self._wdb is not None

    # ------------------------------------------------------------------ the writer

    # runs in the worker thread; the only code that touches the write connection
    def _write_batch(self, batch: list[_Request], now: float) -> None:
        db, conn = self._wdb, self._wconn
        assert db is not None and conn is not None
        conn.execute("BEGIN IMMEDIATE")
        try:
            group: list[_Request] = []
            for n, req in enumerate(batch):
                if req.kind == "moves":
                    group.append(req)
                    if n + 1 < len(batch) and batch[n + 1].kind == "moves":
                        continue
                    # checked before anything is written, so a refused request needs no
                    # savepoint: the hot path is a few statements for the whole group
                    catalog.on_moves(conn.execute, self._apply_moves(conn, group))
                    group = []
                    continue
                try:
                    with db.atomic():  # a savepoint: one bad request fails alone
                        req.result = self._apply_run(conn, req, now)
                except UnknownRun as exc:
                    req.error = exc
                except sqlite3.IntegrityError as exc:
                    req.error = JournalConflict(f"journal {self.path}: {req.kind} refused: {exc}")
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            for req in batch:
                req.result = None
            raise

    def request_cancel_sync(self, run_id: str) -> None:
        """Set a run's cancel flag from any process, even while an engine holds the
        store (WAL lets a second connection write; busy_timeout waits out the writer).
        The engine polls `run(run_id).cancel_requested`."""
        request_cancel_sync(self.store, run_id)

    # ------------------------------------------------------------------ check, backup

    def check(self) -> list[str]:
        problems = []
        try:
            rows = self._reader.execute("PRAGMA integrity_check").fetchall()
            problems += [f"integrity: {r[0]}" for r in rows if r[0] != "ok"]
        except _DB_ERRORS as exc:
            problems.append(f"integrity: {exc}")
        return problems + super().check()

    def backup(self, dest: Path) -> None:
        """A consistent copy of the journal while engines run (SQLite's online backup)."""
        dest = Path(dest)
        if dest.exists():
            raise StoreUnusable(f"{dest} exists: flowcopy does not overwrite it (give a new file name)")
        tmp = dest.with_name(dest.name + ".part")
        try:
            target = sqlite3.connect(tmp)
            try:
                assert self._rconn is not None
                self._rconn.backup(target)
            finally:
                target.close()
            os.rename(tmp, dest)
        except _DB_ERRORS as exc:
            tmp.unlink(missing_ok=True)
            raise JournalCorrupt(f"{self.path}: backup failed: {exc}: the journal is damaged; {RECOVER}") from None
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise StoreUnusable(f"cannot write the backup {dest}: {exc.strerror}") from None

    # ------------------------------------------------------------------ reads

    @property
    def _reader(self) -> sqlite3.Connection:
        if self._rdb is None:
            raise JournalClosed(f"journal {self.path} is closed")
        return self._rdb

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[Sequence[Any]]:
        try:
            cur = self._reader.cursor()
            cur.row_factory = None  # plain tuples: no Row object per row
            return cur.execute(sql, params).fetchall()
        except _DB_ERRORS as exc:
            raise JournalCorrupt(f"{self.path}: cannot read the journal: {exc}: {RECOVER}") from None

    def _query(self, sql: str, params: Sequence[Any] = ()) -> Iterable[dict[str, Any]]:
        try:
            return [dict(row) for row in self._reader.execute(sql, params)]
        except _DB_ERRORS as exc:  # bad UTF-8, a malformed page, ...
            raise JournalCorrupt(f"{self.path}: cannot read the journal: {exc}: {RECOVER}") from None



def request_cancel_sync(store: Path, run_id: str) -> None:
    """Set a run's cancel flag with a short-lived connection of its own (the CLI's
    `flowcopy cancel RUN`, while an engine holds the store)."""
    path = Path(store) / JOURNAL_FILE
    if not path.exists():
        raise JournalNotFound(f"store {store} has no journal ({path} does not exist)")
    import sqlite_utils

    conn = _connect(path)
    try:
        db = sqlite_utils.Database(conn)
        _user_version(db, path)
        with db.atomic():
            cur = db.execute("UPDATE runs SET cancel_requested = 1 WHERE run_id = ?", (run_id,))
            if cur.rowcount != 1:
                raise UnknownRun(f"journal {path}: no run {run_id!r}")
    except _DB_ERRORS as exc:
        raise JournalCorrupt(f"{path}: cannot record the cancel request: {exc}") from None
    finally:
        conn.close()
