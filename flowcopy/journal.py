"""The durable journal of runs and units: SQLite (WAL, synchronous=FULL), group commit.

Write-ahead: the engine records a unit's *intent* (`freezing`, `establishing`, ...) and
waits until it is durable before starting the side effect, then records the outcome.
After any crash the journal therefore says, for every unit, which side effect may be
half done (`machine.INTENT_STATES`), and resume reconciles exactly those.

Group commit: every `record()` enqueues its move and waits; one writer task takes
everything queued, commits it as ONE transaction in a worker thread and wakes all its
waiters. Thousands of units share one fsync instead of queueing behind the disk's fsync
rate. The writer's connection is touched only by that one task, serially, so no two
threads ever write at once (hence `check_same_thread=False` is safe).

The interface is deliberately small (begin run, record moves, finish run, read
unfinished work) and the SQL portable, so the same schema can move to PostgreSQL with
leases (DESIGN §3.7); the store lock below becomes the lease then.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import attrs
import sqlite_utils
import trio
import trio.testing

from flowcopy.machine import TERMINAL

JOURNAL_FILE = "journal.sqlite"
LOCK_FILE = "journal.lock"
APPLICATION_ID = 0x466C4370
"""'FlCp' in the SQLite header: tells a flowcopy journal from any other SQLite file."""

BUSY_TIMEOUT_MS = 10_000
RUN_STATES = frozenset({"running", "succeeded", "failed", "cancelled", "partial"})


# --------------------------------------------------------------------------- errors


class JournalError(Exception):
    """Base of the journal's own errors; the message names the store or the unit."""


class StoreLocked(JournalError):
    """Another live process holds the store (one engine per store)."""

    def __init__(self, store: Path, pid: int | None, started: str | None) -> None:
        self.store = store
        self.pid = pid
        self.started = started
        who = f"pid {pid}" if pid is not None else "another process"
        when = f" (started {started})" if started else ""
        super().__init__(f"store {store} is held by {who}{when}")


class JournalCorrupt(JournalError):
    """The store file is not a flowcopy journal, is unreadable, or is from a newer flowcopy."""


class StoreUnusable(JournalError, OSError):
    """The store folder cannot be created or used (a file in the way, no permission,
    a file system without WAL support). An OSError too, for callers that report those."""


class JournalNotFound(JournalError):
    """A read-only open (lock=False) of a store that has no journal yet."""


class JournalConflict(JournalError):
    """A write that does not continue the journal: a move whose `from_state` is not the
    unit's journalled state, an unknown unit, a duplicate run. Only that write fails;
    the rest of its batch commits."""


class UnknownRun(JournalError, LookupError):
    pass


class JournalClosed(JournalError):
    """The writer is not running, or stopped before this write was committed."""


class SimulatedCrash(BaseException):
    """Raised by crash tests from `Journal.crash_hook` to model SIGKILL right after a
    journal write is durable and before the next side effect. A BaseException so that no
    `except Exception` in the engine can swallow it."""


def is_crash(exc: BaseException) -> bool:
    """True for a SimulatedCrash as it leaves trio: bare, or in groups beside cancellations."""
    if isinstance(exc, SimulatedCrash):
        return True
    if isinstance(exc, BaseExceptionGroup):
        leaves = exc.exceptions
        return any(is_crash(e) for e in leaves) and all(is_crash(e) or isinstance(e, trio.Cancelled) for e in leaves)
    return False


# --------------------------------------------------------------------------- rows


@attrs.frozen
class RunRow:
    run_id: str
    workflow: str
    definition: dict[str, Any]
    """The resolved definition as plain JSON data, so a resume does not need the file."""
    state: str = "running"
    created: float = attrs.field(factory=time.time)
    finished: float | None = None
    number: int = 1
    """Per-workflow run counter (target rotation)."""
    cancel_requested: bool = False


@attrs.frozen
class UnitRow:
    unit_id: str
    run_id: str
    state: str = "pending"
    data: dict[str, Any] = attrs.field(factory=dict)
    """The unit's durable context: pairs, freeze ids, tag, attempts, error..."""
    updated: float = attrs.field(factory=time.time)
    seq: int = 0
    """Seq of the unit's last event; 0 before its first move."""


@attrs.frozen
class EventRow:
    unit_id: str
    seq: int
    from_state: str
    to_state: str
    event: str
    payload: dict[str, Any]
    time: float


@attrs.frozen
class Move:
    unit_id: str
    from_state: str
    to_state: str
    event: str
    payload: dict[str, Any] = attrs.field(factory=dict)
    data: dict[str, Any] | None = None
    """Replaces the unit's data when not None."""


# --------------------------------------------------------------------------- schema


def _json(value: Any, what: str) -> str:
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{what} is not plain JSON data: {exc}") from None


def _migration_1(db: sqlite_utils.Database) -> None:
    """Base schema: runs, units (current state), events (append-only)."""
    db.execute(
        """CREATE TABLE runs (
            run_id TEXT PRIMARY KEY,
            workflow TEXT NOT NULL,
            definition TEXT NOT NULL,
            state TEXT NOT NULL,
            created REAL NOT NULL,
            finished REAL,
            number INTEGER NOT NULL,
            cancel_requested INTEGER NOT NULL DEFAULT 0,
            UNIQUE (workflow, number)
        )"""
    )
    db.execute(
        """CREATE TABLE units (
            unit_id TEXT PRIMARY KEY,
            run_id TEXT NOT NULL REFERENCES runs (run_id),
            position INTEGER NOT NULL,
            state TEXT NOT NULL,
            data TEXT NOT NULL,
            updated REAL NOT NULL,
            seq INTEGER NOT NULL
        )"""
    )
    db.execute(
        """CREATE TABLE events (
            unit_id TEXT NOT NULL REFERENCES units (unit_id),
            seq INTEGER NOT NULL,
            run_id TEXT NOT NULL,
            from_state TEXT NOT NULL,
            to_state TEXT NOT NULL,
            event TEXT NOT NULL,
            payload TEXT NOT NULL,
            time REAL NOT NULL,
            PRIMARY KEY (unit_id, seq)
        )"""
    )


def _migration_2(db: sqlite_utils.Database) -> None:
    """Indexes for the recovery and status reads (unfinished units, a run's units and
    events), which otherwise scan whole tables once the journal holds months of runs."""
    db.execute("CREATE INDEX units_by_run ON units (run_id, position)")
    db.execute("CREATE INDEX units_by_state ON units (state)")
    db.execute("CREATE INDEX events_by_run ON events (run_id, time)")


MIGRATIONS: tuple[Callable[[sqlite_utils.Database], None], ...] = (_migration_1, _migration_2)
"""MIGRATIONS[i] takes the schema from version i to i+1 (PRAGMA user_version)."""
SCHEMA_VERSION = len(MIGRATIONS)


def _migrate(db: sqlite_utils.Database, path: Path, upto: int = SCHEMA_VERSION) -> int:
    """Bring the schema to `upto`, one transaction per migration; return the old version."""
    version = _user_version(db, path)
    for i in range(version, upto):
        with db.atomic():
            MIGRATIONS[i](db)
            db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            db.execute(f"PRAGMA user_version = {i + 1}")
    return version


def _user_version(db: sqlite_utils.Database, path: Path) -> int:
    """Schema version of `path`, after checking it is a flowcopy journal we can read."""
    try:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        app_id = db.execute("PRAGMA application_id").fetchone()[0]
        tables = db.table_names()
    except sqlite3.DatabaseError as exc:
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


# --------------------------------------------------------------------------- writes


@attrs.define(eq=False)
class _Request:
    """One caller's write: applied atomically (a savepoint) within a batch."""

    kind: str  # "moves" | "begin_run" | "finish_run" | "request_cancel"
    args: Any
    moves: Sequence[Move] = ()
    done: trio.Event = attrs.field(factory=trio.Event)
    result: Any = None
    error: BaseException | None = None


class Journal:
    """The durable record of runs and units. See the module docstring."""

    crash_hook: Callable[[Move], None] | None
    """Called right after a batch containing the move committed and before its waiters
    are woken. Crash tests make it raise `SimulatedCrash`: it then propagates out of
    `run_writer` and out of every waiting `record()`; nobody returns normally."""
    run_crash_hook: Callable[[str, str], None] | None
    """Same, for run-level writes: called with ("begin_run" | "finish_run" |
    "request_cancel", run_id)."""

    def __init__(self, store: Path, path: Path, *, readonly: bool, lock_fd: int | None) -> None:
        self.store = store
        self.path = path
        self.readonly = readonly
        self._lock_fd = lock_fd
        self.crash_hook = None
        self.run_crash_hook = None
        self.batch_limit: int | None = None
        """Most requests per transaction; None = everything queued (group commit).
        1 = one commit per write, the baseline the benchmark compares against."""
        self.transactions = 0
        """Committed write transactions (batches), for tests and benchmarks."""
        self.moves_committed = 0
        self._queue: list[_Request] = []
        self._wakeup = trio.Event()
        self._writer_running = False
        self._dead: BaseException | None = None
        self._limiter: trio.CapacityLimiter | None = None
        self._wconn: sqlite3.Connection | None = None
        self._wdb: sqlite_utils.Database | None = None
        self._rconn: sqlite3.Connection | None = None
        self._rdb: sqlite_utils.Database | None = None

    # ------------------------------------------------------------------ open / close

    @classmethod
    def open(cls, store: Path, *, lock: bool = True) -> Journal:
        """Open (creating and migrating when `lock`) the journal of `store`.

        `lock=False` is the read-only view for `flowcopy status` while an engine runs:
        no lock, no migration, no writes except `request_cancel_sync`.
        """
        store = Path(store)
        path = store / JOURNAL_FILE
        if not lock:
            if not path.exists():
                raise JournalNotFound(f"store {store} has no journal ({path} does not exist)")
            journal = cls(store, path, readonly=True, lock_fd=None)
            try:
                journal._open_reader()
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
        fd = _lock_store(store)
        journal = cls(store, path, readonly=False, lock_fd=fd)
        try:
            journal._open_writer()
            journal._open_reader()
        except BaseException:
            journal.close()
            raise
        return journal

    def _open_writer(self) -> None:
        try:
            conn = _connect(self.path, check_same_thread=False)
        except sqlite3.DatabaseError as exc:
            raise JournalCorrupt(f"{self.path} cannot be opened: {exc}") from None
        self._wconn = conn
        db = sqlite_utils.Database(conn)
        self._wdb = db
        _user_version(db, self.path)  # refuse foreign or newer files before touching them
        try:
            mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            db.execute("PRAGMA synchronous = FULL")
            db.execute("PRAGMA foreign_keys = ON")
        except sqlite3.DatabaseError as exc:
            raise JournalCorrupt(f"{self.path} is not a usable journal: {exc}") from None
        if str(mode).lower() != "wal":
            raise StoreUnusable(f"{self.path}: the file system does not support WAL mode ({mode})")
        try:
            _migrate(db, self.path)
        except sqlite3.DatabaseError as exc:
            raise JournalCorrupt(f"{self.path}: schema migration failed: {exc}") from None

    def _open_reader(self) -> None:
        try:
            conn = _connect(self.path)
            conn.execute("PRAGMA query_only = ON")
        except sqlite3.DatabaseError as exc:
            raise JournalCorrupt(f"{self.path} cannot be opened: {exc}") from None
        self._rconn = conn
        self._rdb = sqlite_utils.Database(conn)

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

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ the writer

    async def run_writer(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """The group-commit writer; runs until cancelled. Start it with
        `await nursery.start(journal.run_writer)`."""
        if self.readonly or self._wdb is None:
            raise JournalClosed(f"journal {self.path} is not open for writing")
        if self._writer_running:
            raise RuntimeError(f"journal {self.path}: a writer is already running")
        self._writer_running = True
        # a thread of its own: journal commits never queue behind other to_thread work
        self._limiter = trio.CapacityLimiter(1)
        # Under trio's MockClock a worker thread would let the clock autojump while the
        # disk works (site timeouts would fire "during" an fsync), so commit in the loop.
        self._inline = isinstance(trio.lowlevel.current_clock(), trio.testing.MockClock)
        task_status.started()
        try:
            while True:
                while not self._queue:
                    await self._wakeup.wait()
                    self._wakeup = trio.Event()
                # one pass through the run queue, so that every task made runnable in
                # the same tick as the first writer has enqueued before we cut the batch
                await trio.lowlevel.cancel_shielded_checkpoint()
                if self.batch_limit is None:
                    batch, self._queue = self._queue, []
                else:
                    batch = self._queue[: self.batch_limit]
                    del self._queue[: len(batch)]
                if batch:
                    await self._commit(batch)
        except BaseException as exc:
            if not isinstance(exc, trio.Cancelled):
                self._dead = exc  # e.g. SimulatedCrash: later writes must not return either
            self._fail_pending(exc)
            raise
        finally:
            self._writer_running = False

    async def _commit(self, batch: list[_Request]) -> None:
        now = time.time()
        try:
            if self._inline:
                self._write_batch(batch, now)
            else:
                await trio.to_thread.run_sync(self._write_batch, batch, now, limiter=self._limiter)
        except sqlite3.Error as exc:
            # the whole transaction rolled back: every waiter of this batch learns it
            err = JournalError(f"journal {self.path}: commit failed: {exc}")
            for req in batch:
                req.error = err
                req.done.set()
            return
        except BaseException as exc:
            for req in batch:
                req.error = _copy_exception(exc)
                req.done.set()
            raise
        self.transactions += 1
        try:
            for req in batch:
                if req.error is not None:
                    continue
                if req.kind == "moves":
                    self.moves_committed += len(req.moves)
                    if self.crash_hook is not None:
                        for move in req.moves:
                            self.crash_hook(move)
                elif self.run_crash_hook is not None:
                    self.run_crash_hook(req.kind, req.args[0] if req.kind != "begin_run" else req.args[0].run_id)
        except BaseException as exc:
            for req in batch:
                req.error = _copy_exception(exc)
                req.done.set()
            raise
        for req in batch:
            req.done.set()

    def _fail_pending(self, exc: BaseException) -> None:
        queue, self._queue = self._queue, []
        for req in queue:
            req.error = _copy_exception(exc) if not isinstance(exc, trio.Cancelled) else JournalClosed(
                f"journal {self.path}: writer stopped before this write was committed"
            )
            req.done.set()

    # runs in the worker thread; the only code that touches the write connection
    def _write_batch(self, batch: list[_Request], now: float) -> None:
        db, conn = self._wdb, self._wconn
        assert db is not None and conn is not None
        conn.execute("BEGIN IMMEDIATE")
        try:
            for req in batch:
                if req.kind == "moves":
                    # checked before anything is written, so a refused request needs
                    # no savepoint: the hot path is three statements per move
                    try:
                        planned = self._plan_moves(conn, req.args)
                    except JournalConflict as exc:
                        req.error = exc
                        continue
                    req.result = self._write_moves(conn, planned)
                    continue
                try:
                    with db.atomic():  # a savepoint: one bad request fails alone
                        req.result = self._apply_run(db, req, now)
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

    def _plan_moves(
        self, conn: sqlite3.Connection, moves: Sequence[tuple[Move, str, str | None, float]]
    ) -> list[tuple[Move, str, str | None, float, str, int]]:
        """Check that each move continues its unit's journal (state and seq), taking the
        request's own earlier moves into account; return them with run id and new seq."""
        current: dict[str, tuple[str, str, int]] = {}
        planned = []
        for move, payload, data, at in moves:
            row = current.get(move.unit_id)
            if row is None:
                row = conn.execute(
                    "SELECT run_id, state, seq FROM units WHERE unit_id = ?", (move.unit_id,)
                ).fetchone()
            if row is None:
                raise JournalConflict(f"unit {move.unit_id}: not in the journal (begin its run first)")
            run_id, state, seq = row
            if state != move.from_state:
                raise JournalConflict(
                    f"unit {move.unit_id}: move {move.from_state!r} -[{move.event}]-> {move.to_state!r} "
                    f"does not continue the journal, where the unit is {state!r} (seq {seq})"
                )
            current[move.unit_id] = (run_id, move.to_state, seq + 1)
            planned.append((move, payload, data, at, run_id, seq + 1))
        return planned

    @staticmethod
    def _write_moves(
        conn: sqlite3.Connection, planned: list[tuple[Move, str, str | None, float, str, int]]
    ) -> int:
        seq = 0
        for move, payload, data, at, run_id, seq in planned:
            conn.execute(
                "INSERT INTO events (unit_id, seq, run_id, from_state, to_state, event, payload, time)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (move.unit_id, seq, run_id, move.from_state, move.to_state, move.event, payload, at),
            )
            if data is None:
                conn.execute(
                    "UPDATE units SET state = ?, seq = ?, updated = ? WHERE unit_id = ?",
                    (move.to_state, seq, at, move.unit_id),
                )
            else:
                conn.execute(
                    "UPDATE units SET state = ?, seq = ?, updated = ?, data = ? WHERE unit_id = ?",
                    (move.to_state, seq, at, data, move.unit_id),
                )
        return seq

    def _apply_run(self, db: sqlite_utils.Database, req: _Request, now: float) -> None:
        if req.kind == "begin_run":
            run, definition, units = req.args
            db.execute(
                "INSERT INTO runs (run_id, workflow, definition, state, created, finished, number, cancel_requested)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (run.run_id, run.workflow, definition, run.state, run.created, run.finished,
                 run.number, int(run.cancel_requested)),
            )
            for position, (unit, data) in enumerate(units):
                db.execute(
                    "INSERT INTO units (unit_id, run_id, position, state, data, updated, seq)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (unit.unit_id, run.run_id, position, unit.state, data, unit.updated, unit.seq),
                )
            return
        run_id = req.args[0]
        if req.kind == "finish_run":
            cur = db.execute(
                "UPDATE runs SET state = ?, finished = ? WHERE run_id = ?", (req.args[1], now, run_id)
            )
        elif req.kind == "request_cancel":
            cur = db.execute("UPDATE runs SET cancel_requested = 1 WHERE run_id = ?", (run_id,))
        else:  # pragma: no cover
            raise AssertionError(req.kind)
        if cur.rowcount != 1:
            raise UnknownRun(f"journal {self.path}: no run {run_id!r}")

    async def _submit(self, req: _Request) -> Any:
        if self._dead is not None:
            raise _copy_exception(self._dead)
        if not self._writer_running:
            raise JournalClosed(
                f"journal {self.path}: the writer is not running "
                "(start it with `await nursery.start(journal.run_writer)`)"
            )
        self._queue.append(req)
        self._wakeup.set()
        await req.done.wait()
        if req.error is not None:
            raise req.error
        return req.result

    # ------------------------------------------------------------------ write API

    async def record(self, move: Move) -> int:
        """Make `move` durable; returns once the batch holding it committed, with the
        unit's new event seq. Fails with JournalConflict when `move.from_state` is not
        the unit's journalled state."""
        now = time.time()
        prepared = (move, _json(move.payload, f"unit {move.unit_id}: move payload"),
                    None if move.data is None else _json(move.data, f"unit {move.unit_id}: data"), now)
        return await self._submit(_Request("moves", [prepared], moves=(move,)))  # type: ignore[no-any-return]

    async def record_many(self, moves: Sequence[Move]) -> None:
        """Make several moves (of one consistency group) durable atomically: all or none."""
        now = time.time()
        prepared = [
            (m, _json(m.payload, f"unit {m.unit_id}: move payload"),
             None if m.data is None else _json(m.data, f"unit {m.unit_id}: data"), now)
            for m in moves
        ]
        if prepared:
            await self._submit(_Request("moves", prepared, moves=tuple(moves)))

    async def begin_run(self, run: RunRow, units: Sequence[UnitRow]) -> None:
        """Record a new run and its units in one transaction; durable on return."""
        if run.state not in RUN_STATES:
            raise ValueError(f"run {run.run_id}: unknown run state {run.state!r}")
        for unit in units:
            if unit.run_id != run.run_id:
                raise ValueError(f"unit {unit.unit_id} belongs to run {unit.run_id}, not {run.run_id}")
        definition = _json(run.definition, f"run {run.run_id}: definition")
        rows = [(u, _json(u.data, f"unit {u.unit_id}: data")) for u in units]
        await self._submit(_Request("begin_run", (run, definition, rows)))

    async def finish_run(self, run_id: str, state: str) -> None:
        if state not in RUN_STATES or state == "running":
            raise ValueError(f"run {run_id}: cannot finish as {state!r}")
        await self._submit(_Request("finish_run", (run_id, state)))

    async def request_cancel(self, run_id: str) -> None:
        await self._submit(_Request("request_cancel", (run_id,)))

    def request_cancel_sync(self, run_id: str) -> None:
        """Set a run's cancel flag from any process, even while an engine holds the
        store (WAL lets a second connection write; busy_timeout waits out the writer).
        The engine polls `run(run_id).cancel_requested`."""
        request_cancel_sync(self.store, run_id)

    # ------------------------------------------------------------------ reads

    @property
    def _reader(self) -> sqlite_utils.Database:
        if self._rdb is None:
            raise JournalClosed(f"journal {self.path} is closed")
        return self._rdb

    def _query(self, sql: str, params: Sequence[Any] = ()) -> Iterable[dict[str, Any]]:
        return self._reader.query(sql, params)

    def unfinished_units(self) -> list[UnitRow]:
        """Every unit not in a terminal state, oldest run first, in each run's unit order."""
        marks = ", ".join("?" for _ in TERMINAL)
        return [
            _unit(r)
            for r in self._query(
                f"SELECT u.* FROM units u JOIN runs r ON r.run_id = u.run_id"
                f" WHERE u.state NOT IN ({marks}) ORDER BY r.created, r.run_id, u.position",
                sorted(TERMINAL),
            )
        ]

    def unfinished_runs(self) -> list[RunRow]:
        """Runs still `running` (a crash may have come after their last unit finished)."""
        return [_run(r) for r in self._query(
            "SELECT * FROM runs WHERE state = 'running' ORDER BY created, run_id")]

    def runs(self, workflow: str | None = None) -> list[RunRow]:
        if workflow is None:
            rows = self._query("SELECT * FROM runs ORDER BY created, run_id")
        else:
            rows = self._query(
                "SELECT * FROM runs WHERE workflow = ? ORDER BY number", (workflow,)
            )
        return [_run(r) for r in rows]

    def run(self, run_id: str) -> RunRow:
        rows = list(self._query("SELECT * FROM runs WHERE run_id = ?", (run_id,)))
        if not rows:
            raise UnknownRun(f"journal {self.path}: no run {run_id!r}")
        return _run(rows[0])

    def units(self, run_id: str) -> list[UnitRow]:
        return [_unit(r) for r in self._query(
            "SELECT * FROM units WHERE run_id = ? ORDER BY position", (run_id,))]

    def unit(self, unit_id: str) -> UnitRow:
        rows = list(self._query("SELECT * FROM units WHERE unit_id = ?", (unit_id,)))
        if not rows:
            raise LookupError(f"journal {self.path}: no unit {unit_id!r}")
        return _unit(rows[0])

    def events(self, *, run_id: str | None = None, unit_id: str | None = None) -> list[EventRow]:
        """Events in the order they happened; a unit's events are in seq order."""
        where, params = [], []
        if run_id is not None:
            where.append("run_id = ?")
            params.append(run_id)
        if unit_id is not None:
            where.append("unit_id = ?")
            params.append(unit_id)
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        order = " ORDER BY seq" if unit_id is not None else " ORDER BY time, unit_id, seq"
        return [_event(r) for r in self._query(f"SELECT * FROM events{clause}{order}", params)]

    def next_run_number(self, workflow: str) -> int:
        row = next(iter(self._query(
            "SELECT COALESCE(MAX(number), 0) AS n FROM runs WHERE workflow = ?", (workflow,))))
        return int(row["n"]) + 1


def request_cancel_sync(store: Path, run_id: str) -> None:
    """Set a run's cancel flag with a short-lived connection of its own (the CLI's
    `flowcopy cancel RUN`, while an engine holds the store)."""
    path = Path(store) / JOURNAL_FILE
    if not path.exists():
        raise JournalNotFound(f"store {store} has no journal ({path} does not exist)")
    conn = _connect(path)
    try:
        db = sqlite_utils.Database(conn)
        _user_version(db, path)
        with db.atomic():
            cur = db.execute("UPDATE runs SET cancel_requested = 1 WHERE run_id = ?", (run_id,))
            if cur.rowcount != 1:
                raise UnknownRun(f"journal {path}: no run {run_id!r}")
    except sqlite3.DatabaseError as exc:
        raise JournalCorrupt(f"{path}: cannot record the cancel request: {exc}") from None
    finally:
        conn.close()


def _copy_exception(exc: BaseException) -> BaseException:
    """A fresh instance for each waiter: one exception object raised in many tasks would
    have its traceback rewritten by each of them."""
    try:
        new = copy.copy(exc)
    except Exception:  # pragma: no cover - exotic exception types
        return exc
    new.__cause__ = exc
    return new


def _run(r: dict[str, Any]) -> RunRow:
    return RunRow(
        run_id=r["run_id"], workflow=r["workflow"], definition=json.loads(r["definition"]),
        state=r["state"], created=r["created"], finished=r["finished"], number=r["number"],
        cancel_requested=bool(r["cancel_requested"]),
    )


def _unit(r: dict[str, Any]) -> UnitRow:
    return UnitRow(
        unit_id=r["unit_id"], run_id=r["run_id"], state=r["state"], data=json.loads(r["data"]),
        updated=r["updated"], seq=r["seq"],
    )


def _event(r: dict[str, Any]) -> EventRow:
    return EventRow(
        unit_id=r["unit_id"], seq=r["seq"], from_state=r["from_state"], to_state=r["to_state"],
        event=r["event"], payload=json.loads(r["payload"]), time=r["time"],
    )
