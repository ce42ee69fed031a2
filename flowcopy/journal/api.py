"""The journal interface: row types, errors and the group-commit writer every backend shares.

Write-ahead: the engine records a unit's *intent* (`freezing`, `establishing`, ...) and
waits until it is durable before starting the side effect, then records the outcome.
After any crash the journal therefore says, for every unit, which side effect may be
half done (`machine.INTENT_STATES`), and resume reconciles exactly those.

Group commit: every `record()` enqueues its move and waits; one writer task takes
everything queued, commits it as ONE transaction in a worker thread and wakes all its
waiters. Thousands of units share one commit instead of queueing behind the disk's
fsync rate. The backend's write connection is touched only by that one task, serially.

A backend (`flowcopy.journal.sqlite`, `flowcopy.journal.postgres`) supplies the
connection, `_write_batch` (one transaction, in a worker thread) and `_query`; the SQL
of moves and reads is written once here, with `?` placeholders.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from flowcopy.journal import catalog
from flowcopy.machine import STATES, TERMINAL

if TYPE_CHECKING:
    import trio

# trio is imported where it is used, not here: `flowcopy status` and `history` read the
# journal without an event loop and must start in a fraction of a second.

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


class LeaseLost(BaseException):
    """This engine no longer holds the unit (its lease expired or another engine took it
    over): the write was refused or the side effect not started. A BaseException like
    SimulatedCrash: no `except Exception` may turn it into a compensation, because the
    unit is no longer ours to act on. The engine stops driving the unit, nothing more."""

    def __init__(self, unit_id: str, why: str) -> None:
        self.unit_id = unit_id
        self.why = why
        super().__init__(f"unit {unit_id}: lease lost ({why})")


def is_crash(exc: BaseException) -> bool:
    """True for a SimulatedCrash as it leaves trio: bare, or in groups beside cancellations."""
    if isinstance(exc, SimulatedCrash):
        return True
    if isinstance(exc, BaseExceptionGroup):
        import trio

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
    site: str | None = None
    """The site the run acted on, in words ("served site URL", "embedded site model ...")."""
    error: str | None = None
    """Why the run ended without units to drive (e.g. its plan failed), else None."""


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
class EngineRow:
    """An engine process that opened the journal for writing (PostgreSQL stores)."""

    engine_id: str
    host: str
    pid: int
    started: float
    heartbeat: float
    lease_until: float
    lease_period: float
    stopped: float | None
    live: bool
    """Its lease runs (now < lease_until) and it did not stop."""


@attrs.frozen
class LeaseRow:
    """Which engine holds a unfinished unit, and until when (for `flowcopy status`)."""

    unit_id: str
    run_id: str
    state: str
    epoch: int
    engine_id: str | None
    host: str | None
    pid: int | None
    started: float | None
    lease_until: float | None
    """Wall time the holder's lease expires (None: held by the store lock, or by nobody)."""


@attrs.frozen
class EventRow:
    unit_id: str
    seq: int
    from_state: str
    to_state: str
    event: str
    payload: dict[str, Any]
    time: float
    engine: str | None = None
    """The engine that wrote it (shared journals; None on SQLite: the one store lock holder)."""


@attrs.frozen
class RunOverview:
    """The runs as a status page shows them (`Journal.run_overview`)."""

    counts: dict[str, int]
    """Runs per state, over the whole journal."""
    recent: tuple[RunRow, ...]
    """The newest finished runs, newest first."""
    latest: dict[str, RunRow]
    """The newest run of each workflow asked about that has one."""
    by_id: dict[str, RunRow]
    """The runs asked about by id that exist."""


@attrs.frozen
class Move:
    unit_id: str
    from_state: str
    to_state: str
    event: str
    payload: dict[str, Any] = attrs.field(factory=dict)
    data: dict[str, Any] | None = None
    """Replaces the unit's data when not None."""


@attrs.frozen
class VerificationRow:
    backup_id: str
    time: float
    checker: str
    ok: bool
    detail: dict[str, Any]


@attrs.frozen
class ForgottenRow:
    backup_id: str
    time: float
    reason: str
    actions: tuple[str, ...]


# --------------------------------------------------------------------------- helpers


# one encoder for every write: json.dumps with options builds a new JSONEncoder per call,
# a third of the encoding cost of a move (flowcopy bench); the output is byte for byte the same
_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), allow_nan=False)


_STR = json.encoder.encode_basestring_ascii  # how _ENCODER writes a str (ensure_ascii)


def _json(value: Any, what: str) -> str:
    if not value and type(value) is dict:  # most move payloads
        return "{}"
    try:
        return _ENCODER.encode(value)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{what} is not plain JSON data: {exc}") from None


class DataEncoder:
    """One unit's data encoded exactly as `_json` encodes it, re-encoding only the
    top-level values that changed since the last call.

    A unit's data is rewritten whole with most moves, yet its biggest values (its spec,
    its pairs) are set once and replaced, never changed in place: the engine keeps one
    encoder per unit and so encodes each of them once. Values are recognised by identity
    (the encoder holds them, so an id is never reused); a list or dict value must
    therefore be replaced, not mutated, which is how the engine treats unit data.
    """

    __slots__ = ("_cache",)

    def __init__(self) -> None:
        self._cache: dict[str, tuple[Any, str]] = {}

    def encode(self, data: dict[str, Any], what: str) -> str:
        if type(data) is not dict or any(type(k) is not str for k in data):
            return _json(data, what)
        cache = self._cache
        parts = []
        for key in sorted(data):
            value = data[key]
            hit = cache.get(key)
            if hit is not None and hit[0] is value:
                parts.append(hit[1])
                continue
            kind = type(value)
            if kind is str:
                text = _STR(value)
            elif kind is int:
                text = int.__repr__(value)
            elif value is None:
                text = "null"
            elif kind is bool:
                text = "true" if value else "false"
            elif kind is float and math.isfinite(value):
                text = float.__repr__(value)  # what json writes for a float
            else:
                text = _json(value, what)
            text = _STR(key) + ":" + text
            if kind is dict or kind is list:
                cache[key] = (value, text)
            parts.append(text)
        return "{" + ",".join(parts) + "}"


def _copy_exception(exc: BaseException) -> BaseException:
    """A fresh instance for each waiter: one exception object raised in many tasks would
    have its traceback rewritten by each of them."""
    try:
        new = copy.copy(exc)
    except Exception:  # pragma: no cover - exotic exception types
        return exc
    new.__cause__ = exc
    return new


class _BadRow(Exception):
    """A row the journal cannot mean: becomes one JournalCorrupt line naming the file."""


def _load(text: Any, what: str) -> Any:
    try:
        return json.loads(text)
    except (TypeError, ValueError) as exc:  # JSONDecodeError, bad UTF-8 in bytes, NULL
        raise _BadRow(f"{what} is not valid JSON ({exc})") from None


def _state(value: Any, known: Any, what: str) -> str:
    if value not in known:
        raise _BadRow(f"{what} {value!r} is not a state flowcopy knows")
    return str(value)


def _run(r: dict[str, Any]) -> RunRow:
    rid = r.get("run_id")
    return RunRow(
        run_id=rid, workflow=r["workflow"], definition=_load(r["definition"], f"run {rid}: definition"),
        state=_state(r["state"], RUN_STATES, f"run {rid}: state"), created=r["created"], finished=r["finished"],
        number=r["number"], cancel_requested=bool(r["cancel_requested"]),
        site=r.get("site"), error=r.get("error"),
    )


def _unit(r: dict[str, Any]) -> UnitRow:
    uid = r.get("unit_id")
    return UnitRow(
        unit_id=uid, run_id=r["run_id"], state=_state(r["state"], STATES, f"unit {uid}: state"),
        data=_load(r["data"], f"unit {uid}: data"), updated=r["updated"], seq=r["seq"],
    )


def _event(r: dict[str, Any]) -> EventRow:
    where = f"event {r.get('seq')} of unit {r.get('unit_id')}"
    return EventRow(
        unit_id=r["unit_id"], seq=r["seq"], from_state=_state(r["from_state"], STATES, f"{where}: from_state"),
        to_state=_state(r["to_state"], STATES, f"{where}: to_state"),
        event=r["event"], payload=_load(r["payload"], f"{where}: payload"), time=r["time"], engine=r.get("engine"),
    )


def is_url(store: object) -> bool:
    """True when `store` names a PostgreSQL journal rather than a store folder."""
    return isinstance(store, str) and store.startswith(("postgresql://", "postgres://"))


def local_dir(store: Path | str) -> Path:
    """Where an engine keeps its local files (embedded site, exports, pause state): the
    store folder itself, or for a PostgreSQL store $FLOWCOPY_LOCAL (default ./store)."""
    if is_url(store):
        return Path(os.environ.get("FLOWCOPY_LOCAL", "store"))
    return Path(store)


# --------------------------------------------------------------------------- writes


@attrs.define(eq=False)
class _Request:
    """One caller's write: applied atomically (a savepoint) within a batch."""

    kind: str  # "moves" | "begin_run" | "finish_run" | "request_cancel"
    args: Any
    moves: Sequence[Move] = ()
    done: trio.Event = attrs.field(factory=lambda: _new_trio_event())
    result: Any = None
    error: BaseException | None = None


def _new_trio_event() -> trio.Event:
    import trio

    return trio.Event()


class Journal:
    """The durable record of runs and units. See the module docstring.

    `Journal.open(store)` picks the backend: a folder is an SQLite journal, a
    `postgresql://` URL a PostgreSQL one.
    """

    crash_hook: Callable[[Move], None] | None
    """Called right after a batch containing the move committed and before its waiters
    are woken. Crash tests make it raise `SimulatedCrash`: it then propagates out of
    `run_writer` and out of every waiting `record()`; nobody returns normally."""
    run_crash_hook: Callable[[str, str], None] | None
    """Same, for run-level writes: called with ("begin_run" | "finish_run" |
    "request_cancel", run_id)."""

    backend_errors: tuple[type[BaseException], ...] = ()
    """The driver's error types: a commit failing with one fails its batch, not the writer."""

    def __init__(self, store: Any, path: Any, *, readonly: bool) -> None:
        self.store = store
        self.path = path
        self.readonly = readonly
        self.crash_hook = None
        self.run_crash_hook = None
        self.batch_limit: int | None = None
        """Most requests per transaction; None = everything queued (group commit).
        1 = one commit per write, the baseline the benchmark compares against."""
        self.transactions = 0
        """Committed write transactions (batches), for tests and benchmarks."""
        self.moves_committed = 0
        self._queue: list[_Request] = []
        self._wakeup: Any = None  # a trio.Event once the writer runs
        self._writer_running = False
        self._dead: BaseException | None = None
        self._limiter: trio.CapacityLimiter | None = None
        self._inline = False

    # ------------------------------------------------------------------ open / close

    @classmethod
    def open(cls, store: Path | str, *, lock: bool = True) -> Journal:
        """Open the journal of `store` (a folder or a `postgresql://` URL).

        `lock=False` is the read-only view for `flowcopy status` while an engine runs:
        no lock, no migration, no writes except `request_cancel_sync`.
        """
        if is_url(store):
            from flowcopy.journal.postgres import PgJournal

            return PgJournal.open(store, lock=lock)
        from flowcopy.journal.sqlite import SqliteJournal

        return SqliteJournal.open(Path(store), lock=lock)

    def close(self) -> None:  # pragma: no cover - every backend overrides it
        raise NotImplementedError

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ the writer

    def _writable(self) -> bool:  # pragma: no cover - every backend overrides it
        raise NotImplementedError

    def _write_batch(self, batch: list[_Request], now: float) -> None:  # pragma: no cover
        """Apply the batch in ONE transaction (worker thread); set each refused request's
        `error`, raise a `backend_errors` error when the transaction failed."""
        raise NotImplementedError

    async def run_writer(self, *, task_status: Any = None) -> None:
        """The group-commit writer; runs until cancelled. Start it with
        `await nursery.start(journal.run_writer)`."""
        import trio

        from flowcopy.clock import on_mock_clock

        if task_status is None:
            task_status = trio.TASK_STATUS_IGNORED
        if self.readonly or not self._writable():
            raise JournalClosed(f"journal {self.path} is not open for writing")
        if self._writer_running:
            raise RuntimeError(f"journal {self.path}: a writer is already running")
        self._wakeup = trio.Event()
        self._writer_running = True
        # a thread of its own: journal commits never queue behind other to_thread work
        self._limiter = trio.CapacityLimiter(1)
        # Under trio's MockClock a worker thread would let the clock autojump while the
        # disk works (site timeouts would fire "during" an fsync), so commit in the loop.
        self._inline = on_mock_clock()
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
        import trio

        now = time.time()
        try:
            if self._inline:
                self._write_batch(batch, now)
            else:
                await trio.to_thread.run_sync(self._write_batch, batch, now, limiter=self._limiter)
        except self.backend_errors as exc:
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
                elif self.run_crash_hook is not None and req.kind != "slot":
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
        if not queue:
            return
        import trio

        for req in queue:
            req.error = _copy_exception(exc) if not isinstance(exc, trio.Cancelled) else JournalClosed(
                f"journal {self.path}: writer stopped before this write was committed"
            )
            req.done.set()

    # shared SQL of a batch: `conn` is any DB-API connection whose execute() takes `?`

    _CHUNK = 256
    """Rows per executemany (and unit ids per read) of a batch's moves."""

    def _apply_moves(self, conn: Any, reqs: Sequence[_Request]) -> list[tuple[Move, str]]:
        """Check and write the move requests of a batch (consecutive in it): one read of
        every unit they move, then the events and the unit rows written with executemany,
        a few statements for the whole group instead of three per move (each statement
        is a hand-over of the interpreter lock between the writer's thread and the event
        loop). A request that does not continue the journal gets its error and writes
        nothing; the others see the journal as the requests before them left it. Returns
        (move, run id) of every move written, for the catalog."""
        ids = list(dict.fromkeys(m.unit_id for req in reqs for m in req.moves))
        current: dict[str, tuple[str, str, int]] = {}
        for i in range(0, len(ids), self._CHUNK):
            chunk = ids[i: i + self._CHUNK]
            marks = ", ".join("?" for _ in chunk)
            for unit_id, run_id, state, seq in conn.execute(
                f"SELECT unit_id, run_id, state, seq FROM units WHERE unit_id IN ({marks})", chunk
            ).fetchall():
                current[unit_id] = (run_id, state, seq)
        planned: list[tuple[Move, str, str | None, float, str, int]] = []
        for req in reqs:
            try:
                mine = self._plan_moves(current, req.args)
            except JournalConflict as exc:
                req.error = exc
                continue
            for move, _payload, _data, _at, run_id, seq in mine:
                current[move.unit_id] = (run_id, move.to_state, seq)
            req.result = mine[-1][5] if mine else 0
            planned.extend(mine)
        for i in range(0, len(planned), self._CHUNK):
            self._write_moves(conn, planned[i: i + self._CHUNK])
        return [(p[0], p[4]) for p in planned]

    @staticmethod
    def _plan_moves(
        current: dict[str, tuple[str, str, int]], moves: Sequence[tuple[Move, str, str | None, float]]
    ) -> list[tuple[Move, str, str | None, float, str, int]]:
        """Check that each move continues its unit's journal (state and seq) as `current`
        has it, taking the request's own earlier moves into account; return them with run
        id and new seq. Leaves `current` as it was."""
        mine: dict[str, tuple[str, str, int]] = {}
        planned = []
        for move, payload, data, at in moves:
            row = mine.get(move.unit_id) or current.get(move.unit_id)
            if row is None:
                raise JournalConflict(f"unit {move.unit_id}: not in the journal (begin its run first)")
            run_id, state, seq = row
            if state != move.from_state:
                raise JournalConflict(
                    f"unit {move.unit_id}: move {move.from_state!r} -[{move.event}]-> {move.to_state!r} "
                    f"does not continue the journal, where the unit is {state!r} (seq {seq})"
                )
            mine[move.unit_id] = (run_id, move.to_state, seq + 1)
            planned.append((move, payload, data, at, run_id, seq + 1))
        return planned

    @staticmethod
    def _write_moves(conn: Any, planned: list[tuple[Move, str, str | None, float, str, int]]) -> None:
        conn.executemany(
            "INSERT INTO events (unit_id, seq, run_id, from_state, to_state, event, payload, time)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [(m.unit_id, seq, run_id, m.from_state, m.to_state, m.event, payload, at)
             for m, payload, _data, at, run_id, seq in planned],
        )
        # in move order, one statement: a unit moved twice in the batch ends as its last move left it
        conn.executemany(
            "UPDATE units SET state = ?, seq = ?, updated = ?, data = COALESCE(?, data) WHERE unit_id = ?",
            [(m.to_state, seq, at, data, m.unit_id) for m, _payload, data, at, _run_id, seq in planned],
        )

    def _apply_run(self, conn: Any, req: _Request, now: float) -> Any:
        if req.kind == "begin_run":
            run, definition, units, _hold = req.args
            conn.execute(
                "INSERT INTO runs (run_id, workflow, definition, state, created, finished, number, cancel_requested,"
                " site, error) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (run.run_id, run.workflow, definition, run.state, run.created, run.finished,
                 run.number, int(run.cancel_requested), run.site, run.error),
            )
            for position, (unit, data) in enumerate(units):
                conn.execute(
                    "INSERT INTO units (unit_id, run_id, position, state, data, updated, seq)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (unit.unit_id, run.run_id, position, unit.state, data, unit.updated, unit.seq),
                )
            return
        if req.kind == "verification":
            backup_id, checker, ok, detail = req.args
            conn.execute(
                "INSERT INTO verifications (backup_id, time, checker, ok, detail) VALUES (?, ?, ?, ?, ?)",
                (backup_id, now, checker, int(ok), detail),
            )
            return
        if req.kind == "forgotten":
            backup_id, reason, actions = req.args
            conn.execute(
                "INSERT INTO forgotten (backup_id, time, reason, actions) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (backup_id) DO UPDATE SET time = excluded.time, reason = excluded.reason,"
                " actions = excluded.actions",
                (backup_id, now, reason, actions),
            )
            return
        run_id = req.args[0]
        if req.kind == "finish_run":
            cur = conn.execute(
                "UPDATE runs SET state = ?, finished = ? WHERE run_id = ?", (req.args[1], now, run_id)
            )
        elif req.kind == "request_cancel":
            cur = conn.execute("UPDATE runs SET cancel_requested = 1 WHERE run_id = ?", (run_id,))
        elif req.kind == "slot":
            workflow, slot, outcome, reason = req.args
            cur = conn.execute(
                "INSERT INTO fires (workflow, slot, outcome, reason, decided, engine) VALUES (?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (workflow, slot) DO NOTHING",
                (workflow, slot, outcome, reason, now, self.engine_id),
            )
            return cur.rowcount == 1  # type: ignore[no-any-return]
        else:  # pragma: no cover
            raise AssertionError(req.kind)
        if cur.rowcount != 1:
            raise UnknownRun(f"journal {self.path}: no run {run_id!r}")

    def _enqueue(self, req: _Request) -> _Request:
        if self._dead is not None:
            raise _copy_exception(self._dead)
        if not self._writer_running:
            raise JournalClosed(
                f"journal {self.path}: the writer is not running "
                "(start it with `await nursery.start(journal.run_writer)`)"
            )
        self._queue.append(req)
        self._wakeup.set()
        return req

    async def _submit(self, req: _Request) -> Any:
        return await self.settled(self._enqueue(req))

    @staticmethod
    async def settled(req: _Request) -> Any:
        """Wait until a request of `record_soon` is durable; raise what refused it."""
        await req.done.wait()
        if req.error is not None:
            raise req.error
        return req.result

    # ------------------------------------------------------------------ write API

    @staticmethod
    def _prepared(moves: Sequence[Move], encoder: DataEncoder | None = None) -> list[tuple[Move, str, str | None, float]]:
        now = time.time()
        encode = encoder.encode if encoder is not None else _json
        return [
            (m, _json(m.payload, f"unit {m.unit_id}: move payload"),
             None if m.data is None else encode(m.data, f"unit {m.unit_id}: data"), now)
            for m in moves
        ]

    async def record(self, move: Move, *, encoder: DataEncoder | None = None) -> int:
        """Make `move` durable; returns once the batch holding it committed, with the
        unit's new event seq. Fails with JournalConflict when `move.from_state` is not
        the unit's journalled state. `encoder`: the unit's own (see DataEncoder)."""
        return await self._submit(_Request("moves", self._prepared((move,), encoder), moves=(move,)))  # type: ignore[no-any-return]

    async def record_many(self, moves: Sequence[Move], *, encoder: DataEncoder | None = None) -> None:
        """Make several moves (of one consistency group) durable atomically: all or none."""
        if moves:
            await self._submit(_Request("moves", self._prepared(moves, encoder), moves=tuple(moves)))

    def record_soon(self, moves: Sequence[Move], *, encoder: DataEncoder | None = None) -> _Request:
        """Queue moves (atomically, as record_many) for the next group commit and return at
        once, without waiting for it: for a move no side effect depends on, whose loss in a
        crash resume reconciles anyway (an outcome before a read-only or idempotent step).

        Batches commit in the order they were queued, so any later write of the same
        caller that is waited for makes this one durable too (or fails, if this one was
        refused: its from_state no longer continues the journal). `settled(request)`
        waits for it alone and raises what refused it.
        """
        return self._enqueue(_Request("moves", self._prepared(moves, encoder), moves=tuple(moves)))

    async def begin_run(self, run: RunRow, units: Sequence[UnitRow], *, hold: bool = True) -> None:
        """Record a new run and its units in one transaction; durable on return.

        On a shared journal `hold` makes this engine the holder of the new units (it
        drives them at once); `hold=False` leaves them for any engine to claim."""
        if run.state not in RUN_STATES:
            raise ValueError(f"run {run.run_id}: unknown run state {run.state!r}")
        for unit in units:
            if unit.run_id != run.run_id:
                raise ValueError(f"unit {unit.unit_id} belongs to run {unit.run_id}, not {run.run_id}")
        definition = _json(run.definition, f"run {run.run_id}: definition")
        rows = [(u, _json(u.data, f"unit {u.unit_id}: data")) for u in units]
        await self._submit(_Request("begin_run", (run, definition, rows, hold)))

    async def finish_run(self, run_id: str, state: str) -> None:
        if state not in RUN_STATES or state == "running":
            raise ValueError(f"run {run_id}: cannot finish as {state!r}")
        await self._submit(_Request("finish_run", (run_id, state)))

    async def request_cancel(self, run_id: str) -> None:
        await self._submit(_Request("request_cancel", (run_id,)))

    async def record_verification(self, backup_id: str, checker: str, ok: bool, detail: dict[str, Any]) -> None:
        """Append the result of re-checking one backup's images (durable on return)."""
        text = _json(detail, f"backup {backup_id}: verification detail")
        await self._submit(_Request("verification", (backup_id, checker, bool(ok), text)))

    async def record_forgotten(self, backup_id: str, reason: str, actions: Sequence[str]) -> None:
        """Record that retention removed a backup, and what it removed (durable on return)."""
        text = _json(list(actions), f"backup {backup_id}: forget actions")
        await self._submit(_Request("forgotten", (backup_id, reason, text)))

    def request_cancel_sync(self, run_id: str) -> None:  # pragma: no cover - backends override
        """Set a run's cancel flag from any process, even while an engine holds the store.
        The engine polls `run(run_id).cancel_requested`."""
        raise NotImplementedError

    # ------------------------------------------------------------------ leases
    # The degenerate case (SQLite): the store lock is one lease over every unit, held
    # for the life of the process, so claims return everything and nothing expires.

    leased = False
    """True when several engines share the journal: units are claimed, leased, fenced."""
    engine_id: str | None = None
    lease_period: float = math.inf
    stale_refused = 0
    """Writes refused because this engine's lease on the unit was lost (fencing)."""

    def lease_deadline(self) -> float:
        """Trio time by which every side effect of this engine must have finished: its
        lease's expiry as this process last learnt it, minus a safety margin."""
        return math.inf

    async def claim(self, *, run_id: str | None = None, limit: int = 1_000_000) -> list[UnitRow]:
        """Take up to `limit` unfinished units (of `run_id`, or of any running run) that no
        live engine holds; the caller then drives them, reconciling first as resume does."""
        rows = self.units(run_id) if run_id is not None else self.unfinished_units()
        return [r for r in rows if r.state not in TERMINAL][:limit]

    async def renew(self) -> bool:
        """Extend this engine's lease over all its units (one statement); False when it
        had already expired, so every unit it held is lost."""
        return True

    async def release(self, unit_ids: Sequence[str]) -> None:
        """Give units back (a clean stop), so another engine takes them without waiting
        for the lease to expire."""

    def holds(self, unit_id: str) -> bool:
        """Whether this engine still holds `unit_id` as far as it knows."""
        return True

    def fence_epoch(self, unit_id: str) -> int | None:
        """The lease epoch of this engine's claim of `unit_id` (monotonic across take-overs):
        the fencing token its site calls carry. None: not leased (one engine, no fence)."""
        return None

    def forget(self, unit_id: str) -> None:
        """This engine stops driving `unit_id` (lost): no write of it is attempted again."""

    async def stop_engine(self) -> None:
        """Mark this engine stopped and give back every unit it holds."""

    def engines(self) -> list[EngineRow]:
        return []

    def leases(self) -> list[LeaseRow]:
        """Who holds each unfinished unit."""
        return [LeaseRow(u.unit_id, u.run_id, u.state, 0, None, None, None, None, None) for u in self.unfinished_units()]

    async def own_lsses(self, lsses: Sequence[str]) -> bool:
        """Take the right to freeze `lsses` (True) unless another live engine has it."""
        return True

    async def disown_lsses(self, lsses: Sequence[str]) -> None:
        """Give up the right to freeze `lsses` (nothing of this engine holds them)."""

    def lss_fence_epoch(self, lss: str) -> int | None:
        """The epoch of this engine's ownership of `lss` (grows with every new owner): the
        fencing token its LSS-wide site calls carry, since an unfreeze releases every frozen
        source of the LSS, other units' included. None: not owned (one engine, no fence)."""
        return None

    # ------------------------------------------------------------------ scheduled slots

    async def claim_slot(self, workflow: str, slot: str, outcome: str, reason: str) -> bool:
        """Record that the scheduled slot `slot` (the fire time in cron-clock terms, ISO
        8601 UTC) of `workflow` was dealt with (`outcome`: fired / skipped / queued).
        True when this call recorded it; False when it already was (by this or another
        service): the slot's identity is unique in the journal, so it fires once."""
        return bool(await self._submit(_Request("slot", (workflow, slot, outcome, reason))))

    def last_slot(self, workflow: str) -> str | None:
        """The latest slot of `workflow` dealt with (ISO 8601 UTC), or None."""
        row = next(iter(self._query("SELECT MAX(slot) AS s FROM fires WHERE workflow = ?", (workflow,))))
        return None if row["s"] is None else str(row["s"])

    def slots(self, workflow: str | None = None) -> list[dict[str, Any]]:
        """Every slot dealt with, oldest first: workflow, slot, outcome, reason, decided, engine."""
        if workflow is None:
            return list(self._query("SELECT * FROM fires ORDER BY slot, workflow"))
        return list(self._query("SELECT * FROM fires WHERE workflow = ? ORDER BY slot", (workflow,)))

    # ------------------------------------------------------------------ reads

    def _query(self, sql: str, params: Sequence[Any] = ()) -> Iterable[dict[str, Any]]:  # pragma: no cover
        """Rows of a read (`?` placeholders) as dicts, on the backend's read connection."""
        raise NotImplementedError

    def _decode(self, fn: Callable[[dict[str, Any]], Any], rows: Iterable[dict[str, Any]]) -> list[Any]:
        try:
            return [fn(r) for r in rows]
        except _BadRow as exc:
            raise JournalCorrupt(f"{self.path}: damaged row: {exc}; {self.recover_hint}") from None
        except KeyError as exc:
            raise JournalCorrupt(f"{self.path}: damaged row: column {exc} missing; {self.recover_hint}") from None

    recover_hint = "restore the journal from a copy (see `flowcopy journal check`)"

    def unfinished_units(self) -> list[UnitRow]:
        """Every unit not in a terminal state, oldest run first, in each run's unit order."""
        marks = ", ".join("?" for _ in TERMINAL)
        return self._decode(
            _unit,
            self._query(
                f"SELECT u.* FROM units u JOIN runs r ON r.run_id = u.run_id"
                f" WHERE u.state NOT IN ({marks}) ORDER BY r.created, r.run_id, u.position",
                sorted(TERMINAL),
            ),
        )

    def unfinished_runs(self) -> list[RunRow]:
        """Runs still `running` (a crash may have come after their last unit finished)."""
        return self._decode(_run, self._query("SELECT * FROM runs WHERE state = 'running' ORDER BY created, run_id"))

    def runs(self, workflow: str | None = None) -> list[RunRow]:
        if workflow is None:
            rows = self._query("SELECT * FROM runs ORDER BY created, run_id")
        else:
            rows = self._query(
                "SELECT * FROM runs WHERE workflow = ? ORDER BY number", (workflow,)
            )
        return self._decode(_run, rows)

    def run_overview(self, *, recent: int, workflows: Iterable[str] = (), run_ids: Iterable[str] = ()) -> RunOverview:
        """What a page polled every second needs of the runs, read in a bounded way on a
        store of years of runs: the count per state (one aggregate query, no row decoded),
        the `recent` newest finished runs, the newest run of each of `workflows` (the
        (workflow, number) index) and the rows of `run_ids` (the runs in flight)."""
        counts = {str(r["state"]): int(r["n"]) for r in self._query("SELECT state, COUNT(*) AS n FROM runs GROUP BY state")}
        # the newest are picked on narrow columns, then read whole: no other run's definition is read
        newest = self._decode(_run, self._query(
            "SELECT * FROM runs WHERE run_id IN (SELECT run_id FROM runs WHERE state <> 'running'"
            " ORDER BY created DESC, run_id DESC LIMIT ?) ORDER BY created DESC, run_id DESC",
            (int(recent),))) if recent > 0 else []
        latest: dict[str, RunRow] = {}
        for name in dict.fromkeys(workflows):
            rows = self._decode(_run, self._query(
                "SELECT * FROM runs WHERE workflow = ? ORDER BY number DESC LIMIT 1", (name,)))
            if rows:
                latest[name] = rows[0]
        wanted = list(dict.fromkeys(run_ids))
        by_id: dict[str, RunRow] = {}
        for start in range(0, len(wanted), 500):
            chunk = wanted[start:start + 500]
            marks = ", ".join("?" for _ in chunk)
            for row in self._decode(_run, self._query(f"SELECT * FROM runs WHERE run_id IN ({marks})", chunk)):
                by_id[row.run_id] = row
        return RunOverview(counts=counts, recent=tuple(newest), latest=latest, by_id=by_id)

    def newest_backups(self) -> dict[str, float]:
        """Per VM, when its newest verified backup of a finished run succeeded (the unit's
        last move, unix time): one aggregate over the flat catalog, grouped by the backup's
        VM set, so a scrape costs the same on a store of years of runs."""
        newest: dict[str, float] = {}
        rows = self._query(
            "SELECT c.vms AS vms, MAX(u.updated) AS t FROM catalog c JOIN units u ON u.unit_id = c.unit_id"
            " JOIN runs r ON r.run_id = c.run_id WHERE r.state <> 'running' GROUP BY c.vms")
        for r in rows:
            for vm in str(r["vms"]).split(catalog.SEP):
                if vm and float(r["t"]) > newest.get(vm, 0.0):
                    newest[vm] = float(r["t"])
        return newest

    def run(self, run_id: str) -> RunRow:
        rows = list(self._query("SELECT * FROM runs WHERE run_id = ?", (run_id,)))
        if not rows:
            raise UnknownRun(f"journal {self.path}: no run {run_id!r}")
        return self._decode(_run, rows[:1])[0]  # type: ignore[no-any-return]

    def units(self, run_id: str, *, unfinished: bool = False) -> list[UnitRow]:
        """A run's units in order; `unfinished` leaves out terminal ones in the query, so a
        resume of a big run does not decode the data of every finished unit."""
        if not unfinished:
            return self._decode(_unit, self._query("SELECT * FROM units WHERE run_id = ? ORDER BY position", (run_id,)))
        marks = ", ".join("?" for _ in TERMINAL)
        return self._decode(_unit, self._query(
            f"SELECT * FROM units WHERE run_id = ? AND state NOT IN ({marks}) ORDER BY position", (run_id, *sorted(TERMINAL))))

    def state_counts(self, run_id: str) -> dict[str, int]:
        """Units of a run per state, counted by the database: `status` needs no unit's data
        (decoding every row of a 10,000-unit run took about a second)."""
        rows = self._query("SELECT state, COUNT(*) AS n FROM units WHERE run_id = ? GROUP BY state", (run_id,))
        return {str(r["state"]): int(r["n"]) for r in rows}

    def unit(self, unit_id: str) -> UnitRow:
        rows = list(self._query("SELECT * FROM units WHERE unit_id = ?", (unit_id,)))
        if not rows:
            raise LookupError(f"journal {self.path}: no unit {unit_id!r}")
        return self._decode(_unit, rows[:1])[0]  # type: ignore[no-any-return]

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
        return self._decode(_event, self._query(f"SELECT * FROM events{clause}{order}", params))

    def unfinished_count(self, run_id: str) -> int:
        """Units of `run_id` not in a terminal state (cheap: a count, no rows decoded)."""
        marks = ", ".join("?" for _ in TERMINAL)
        row = next(iter(self._query(
            f"SELECT COUNT(*) AS n FROM units WHERE run_id = ? AND state NOT IN ({marks})", (run_id, *sorted(TERMINAL)))))
        return int(row["n"])

    def check(self) -> list[str]:
        """Every problem found reading the whole journal (empty: it is sound): each row of
        runs, units and events decoded, states known; backends add their own checks."""
        problems: list[str] = []
        for table, fn in (("runs", _run), ("units", _unit), ("events", _event)):
            try:
                rows = list(self._query(f"SELECT * FROM {table}"))
            except JournalError as exc:
                problems.append(f"{table}: {exc}")
                continue
            for r in rows:
                try:
                    fn(r)
                except (_BadRow, KeyError) as exc:
                    problems.append(f"{table}: {exc}")
        return problems

    def catalog_rows(self, *, live_only: bool = False) -> list[Sequence[Any]]:
        """The flat backup catalog (schema v6), one row per backup disk, newest backup
        first: the columns of `journal.catalog.COLUMNS` but the last. One indexed read,
        no unit data decoded. `live_only`: only backups no later unit overwrote."""
        return self._rows(catalog.LIVE_SQL if live_only else catalog.READ_SQL)

    def catalog_summary(self) -> list[Sequence[Any]]:
        """What `flowcopy backups` shows of every backup disk (`journal.catalog.SUMMARY_SQL`)."""
        return self._rows(catalog.SUMMARY_SQL)

    def restore_runs(self) -> set[str]:
        """Runs that restored onto LUNs (their tags on a kept pair do not make it newer)."""
        return {r["run_id"] for r in self._query("SELECT DISTINCT run_id FROM lun_writes WHERE kind = 'restore'")}

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[Sequence[Any]]:  # pragma: no cover - backends override
        """Rows of a read as tuples (the catalog's bulk read: no dict per row)."""
        raise NotImplementedError

    def verifications(self) -> dict[str, VerificationRow]:
        """The latest re-verification of every backup that had one."""
        out: dict[str, VerificationRow] = {}
        for r in self._query("SELECT backup_id, time, checker, ok, detail FROM verifications ORDER BY time"):
            out[r["backup_id"]] = VerificationRow(r["backup_id"], r["time"], r["checker"], bool(r["ok"]), json.loads(r["detail"]))
        return out

    def forgotten(self) -> dict[str, ForgottenRow]:
        """Backups retention removed, and what it removed."""
        return {
            r["backup_id"]: ForgottenRow(r["backup_id"], r["time"], r["reason"], tuple(json.loads(r["actions"])))
            for r in self._query("SELECT backup_id, time, reason, actions FROM forgotten")
        }

    def next_run_number(self, workflow: str) -> int:
        row = next(iter(self._query(
            "SELECT COALESCE(MAX(number), 0) AS n FROM runs WHERE workflow = ?", (workflow,))))
        return int(row["n"]) + 1
