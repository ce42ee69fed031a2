"""The PostgreSQL journal backend: several engines, on any machines, share one journal.

psycopg 3's sync driver in trio worker threads (its async API is asyncio-only) with a
psycopg-pool for the short lease statements; the group-commit writer has a connection
of its own, so a batch of moves is still ONE transaction.

Leases and fencing (DESIGN §3.7):

* an engine's lease is its row in `engines`: `lease_until` in the database's clock,
  renewed with one UPDATE per engine per renewal, whatever the number of its units;
* a unit is held by the engine in `units.owner`; a claim takes unfinished units of
  running runs whose owner is nobody or an engine whose lease ran out
  (`SELECT ... FOR UPDATE SKIP LOCKED`, so concurrent claimers never wait on each other
  nor take the same unit) and bumps `units.epoch`;
* every move this engine writes carries the epoch of its claim: the unit's row is locked
  (`FOR UPDATE`) and the write refused unless the row still names this engine with that
  epoch AND this engine's lease is still running at that moment. A take-over commits
  before that lock (and the stale write sees the new owner) or is kept out by it (SKIP
  LOCKED) until the write committed inside the lease;
* side effects are fenced in the engine by a deadline: `lease_deadline()` is the
  lease's expiry as this process last learnt it (the renewal's *send* time plus the
  period, so never later than the database's) minus a margin.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any

import psycopg
import psycopg_pool
import trio
from psycopg.rows import dict_row, tuple_row

from flowcopy.journal.api import (
    EngineRow,
    Journal,
    JournalConflict,
    JournalCorrupt,
    JournalError,
    JournalNotFound,
    LeaseLost,
    LeaseRow,
    UnitRow,
    UnknownRun,
    _Request,
    _unit,
)
from flowcopy.journal import catalog
from flowcopy.journal.schema import MIGRATIONS, SCHEMA_VERSION
from flowcopy.machine import TERMINAL

DEFAULT_LEASE = 10.0
"""Seconds an engine's lease runs after each renewal; take-over time after a crash is
about this long. Renewed every third of it."""
MARGIN = 0.25
"""Fraction of the lease kept back: side effects must finish this long before expiry."""
MIGRATION_LOCK = 0x466C4370  # advisory lock key: engines starting at once migrate one by one
NOW = "CAST(EXTRACT(EPOCH FROM clock_timestamp()) AS DOUBLE PRECISION)"
_TERMINAL = tuple(sorted(TERMINAL))


def _pg(sql: str) -> str:
    """The shared SQL uses `?` placeholders; psycopg wants `%s` (and `%` doubled)."""
    return sql.replace("%", "%%").replace("?", "%s")


class _Conn:
    """A psycopg connection that takes the shared `?` SQL (what api.Journal writes)."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.raw = conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> psycopg.Cursor[Any]:
        return self.raw.execute(_pg(sql), params)  # type: ignore[arg-type]


def redact(url: str) -> str:
    """The URL without its password, for messages."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "postgresql://…"
    host, port, db = info.get("host", "localhost"), info.get("port", "5432"), info.get("dbname", "")
    user = f"{info['user']}@" if info.get("user") else ""
    return f"postgresql://{user}{host}:{port}/{db}"


def _connect(url: str, **kw: Any) -> psycopg.Connection[Any]:
    try:
        return psycopg.connect(url, connect_timeout=10, **kw)
    except psycopg.Error as exc:
        raise JournalError(f"journal {redact(url)}: cannot connect: {str(exc).strip().splitlines()[0]}") from None


def _version(conn: psycopg.Connection[Any], where: str) -> int:
    with conn.cursor(row_factory=tuple_row) as cur:
        return _version_of(cur, where)


def _version_of(conn: Any, where: str) -> int:
    row = conn.execute("SELECT to_regclass('flowcopy_schema') IS NOT NULL").fetchone()
    if not row or not row[0]:
        tables = [r[0] for r in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() ORDER BY 1").fetchall()]
        if tables:
            raise JournalCorrupt(f"{where} is a PostgreSQL database but not a flowcopy journal (tables: {', '.join(tables[:10])})")
        return 0
    got = conn.execute("SELECT MAX(version) FROM flowcopy_schema").fetchone()
    version = int(got[0] or 0) if got else 0
    if version > SCHEMA_VERSION:
        raise JournalCorrupt(
            f"{where} has journal schema v{version}, newer than this flowcopy understands "
            f"(v{SCHEMA_VERSION}); use the newer flowcopy that wrote it"
        )
    return version


def migrate(conn: psycopg.Connection[Any], where: str, upto: int = SCHEMA_VERSION) -> int:
    """Bring the schema to `upto`, one transaction per migration, under an advisory lock
    so engines starting together migrate one after the other; returns the old version."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        old = version = _version(conn, where)
        if version == 0:
            conn.execute("CREATE TABLE flowcopy_schema (version INTEGER NOT NULL, applied DOUBLE PRECISION NOT NULL)")
        for i in range(version, upto):
            for statement in MIGRATIONS[i]:
                if callable(statement):
                    statement(_Conn(conn).execute)  # a data step (schema.Step)
                else:
                    conn.execute(statement)  # type: ignore[arg-type]
            conn.execute(f"INSERT INTO flowcopy_schema VALUES (%s, {NOW})", (i + 1,))
            version = i + 1
    return old


class PgJournal(Journal):
    """The journal in a PostgreSQL database. See the module docstring."""

    backend_errors = (psycopg.Error,)
    leased = True

    def __init__(self, url: str, *, readonly: bool, lease_period: float = DEFAULT_LEASE) -> None:
        super().__init__(url, redact(url), readonly=readonly)
        self.url = url
        self.lease_period = lease_period
        self._wconn: psycopg.Connection[Any] | None = None
        self._rconn: psycopg.Connection[Any] | None = None
        self._rlock = threading.Lock()
        self._pool: psycopg_pool.ConnectionPool | None = None
        self._epochs: dict[str, int] = {}
        self._lss_epochs: dict[str, int] = {}
        """unit -> epoch of this engine's claim: what every write of the unit carries."""
        self._expiry_mono = -math.inf  # time.monotonic() at which the lease expires, as last learnt
        self.engine_id = None

    # ------------------------------------------------------------------ open / close

    @classmethod
    def open(cls, store: Any, *, lock: bool = True, lease_period: float | None = None) -> PgJournal:
        url = str(store)
        period = lease_period if lease_period is not None else float(os.environ.get("FLOWCOPY_LEASE", DEFAULT_LEASE))
        journal = cls(url, readonly=not lock, lease_period=period)
        try:
            journal._rconn = _connect(url, autocommit=True, row_factory=dict_row)
            if lock:
                journal._wconn = _connect(url)
                migrate(journal._wconn, journal.path)
                journal._wconn.commit()
                journal._pool = psycopg_pool.ConnectionPool(
                    url, min_size=1, max_size=4, open=True, timeout=30, kwargs={"autocommit": True},
                )
                journal._register()
            else:
                version = _version(journal._rconn, journal.path)
                if version == 0:
                    raise JournalNotFound(f"journal {journal.path} holds no flowcopy journal yet (start an engine on it)")
                if version < SCHEMA_VERSION:
                    raise JournalCorrupt(
                        f"{journal.path} has journal schema v{version}; start an engine on it "
                        f"to upgrade it to v{SCHEMA_VERSION} before reading it"
                    )
        except psycopg.Error as exc:
            journal.close()
            raise JournalError(f"journal {journal.path}: {str(exc).strip().splitlines()[0]}") from None
        except BaseException:
            journal.close()
            raise
        return journal

    def _register_pooled(self) -> None:
        self._in_pool(lambda conn: self._register(conn))

    def _register(self, conn: psycopg.Connection[Any] | None = None) -> None:
        """This process becomes an engine of the journal, with a running lease."""
        host = socket.gethostname()
        engine_id = f"{host}:{os.getpid()}:{os.urandom(3).hex()}"
        sent = time.monotonic()
        conn = conn or self._wconn
        assert conn is not None
        with conn.transaction():
            conn.execute(
                f"INSERT INTO engines (engine_id, host, pid, started, heartbeat, lease_until, lease_period)"
                f" VALUES (%s, %s, %s, {NOW}, {NOW}, {NOW} + %s, %s)",
                (engine_id, host, os.getpid(), self.lease_period, self.lease_period),
            )
        self.engine_id = engine_id
        self._set_expiry(sent)

    def _set_expiry(self, sent_monotonic: float) -> None:
        # the lease runs from the database's clock at the UPDATE, which is no earlier than
        # our send time: counting from the send keeps our idea of the expiry early
        self._expiry_mono = sent_monotonic + self.lease_period

    def _writable(self) -> bool:
        return self._wconn is not None

    def close(self) -> None:
        """Close the connections; a clean close gives this engine's units back at once
        (a killed engine's are taken over when its lease runs out)."""
        self._fail_pending(JournalError(f"journal {self.path} closed before this write was committed"))
        if self._wconn is not None and self.engine_id is not None and not self._wconn.closed:
            with contextlib.suppress(psycopg.Error):
                self._wconn.rollback()
                with self._wconn.transaction():
                    self._wconn.execute(f"UPDATE engines SET stopped = {NOW}, lease_until = {NOW} WHERE engine_id = %s",
                                        (self.engine_id,))
                    self._wconn.execute("UPDATE units SET owner = NULL WHERE owner = %s", (self.engine_id,))
                    self._wconn.execute("DELETE FROM lss_owners WHERE engine_id = %s", (self.engine_id,))
            self._epochs.clear()
            self._lss_epochs.clear()
        if self._pool is not None:
            with contextlib.suppress(Exception):
                self._pool.close()
            self._pool = None
        for conn in (self._wconn, self._rconn):
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()
        self._wconn = self._rconn = None

    # ------------------------------------------------------------------ the writer

    def _write_batch(self, batch: list[_Request], now: float) -> None:
        """One transaction, a handful of statements whatever the batch size: lock every
        unit row the batch moves (in unit order, so engines never deadlock), check each
        request against them, check the lease once, then one INSERT of all events and one
        UPDATE of all units (unnest arrays)."""
        raw = self._wconn
        assert raw is not None
        conn = _Conn(raw)
        try:
            with raw.transaction():
                moves = [req for req in batch if req.kind == "moves"]
                accepted: list[tuple[_Request, list[int]]] = []
                if moves:
                    ids = sorted({m.unit_id for req in moves for m in req.moves})
                    rows = {r[0]: r[1:] for r in raw.execute(
                        "SELECT unit_id, run_id, state, seq, owner, epoch FROM units"
                        " WHERE unit_id = ANY(%s) ORDER BY unit_id FOR UPDATE", (ids,)).fetchall()}
                    current: dict[str, tuple[str, str, int]] = {}
                    for req in moves:
                        try:
                            seqs, taken = self._plan(req.args, rows, current)
                        except (JournalConflict, LeaseLost) as exc:
                            req.error = exc
                            continue
                        current.update(taken)
                        req.result = seqs[-1]
                        accepted.append((req, seqs))
                    if accepted and not self._lease_running(raw):
                        for req, _ in accepted:
                            req.result = None
                            req.error = LeaseLost(req.moves[0].unit_id, "this engine's lease expired; write refused")
                        accepted = []
                    if accepted:
                        self._write_planned(raw, accepted, rows)
                        catalog.on_moves(conn.execute, [(m, rows[m.unit_id][0]) for req, _ in accepted for m in req.moves])
                for req in batch:
                    if req.kind == "moves":
                        continue
                    try:
                        with raw.transaction():  # a savepoint: one bad request fails alone
                            req.result = self._apply_run(conn, req, now)
                    except UnknownRun as exc:
                        req.error = exc
                    except psycopg.IntegrityError as exc:
                        req.error = JournalConflict(f"journal {self.path}: {req.kind} refused: {str(exc).splitlines()[0]}")
        except BaseException:
            for req in batch:
                req.result = None
            raise
        for req in batch:
            if isinstance(req.error, LeaseLost):
                self.stale_refused += 1
                for move in req.moves:
                    self._epochs.pop(move.unit_id, None)
            elif req.error is None and req.kind == "moves":
                for move in req.moves:
                    if move.to_state in TERMINAL:
                        self._epochs.pop(move.unit_id, None)

    def _plan(self, moves: Sequence[tuple[Any, str, str | None, float]], rows: dict[str, tuple[Any, ...]],
              current: dict[str, tuple[str, str, int]]) -> tuple[list[int], dict[str, tuple[str, str, int]]]:
        """Check one request: each move continues its unit's journal (state and seq, after
        the batch's earlier accepted requests) and the unit's locked row still names this
        engine with the epoch of its claim. Returns (each move's seq, the units' new positions)."""
        taken: dict[str, tuple[str, str, int]] = {}
        seqs: list[int] = []
        for move, payload, data, at in moves:
            row = taken.get(move.unit_id) or current.get(move.unit_id)
            if row is None:
                got = rows.get(move.unit_id)
                if got is None:
                    raise JournalConflict(f"unit {move.unit_id}: not in the journal (begin its run first)")
                run_id, state, seq0, owner, epoch = got
                mine = self._epochs.get(move.unit_id)
                if mine is None:
                    raise LeaseLost(move.unit_id, "this engine does not hold it (never claimed, or lost); write refused")
                if owner != self.engine_id or epoch != mine:
                    raise LeaseLost(move.unit_id, f"now held by {owner or 'nobody'} at epoch {epoch}, ours was {mine}; write refused")
                row = (run_id, state, seq0)
            run_id, state, seq0 = row
            if state != move.from_state:
                raise JournalConflict(
                    f"unit {move.unit_id}: move {move.from_state!r} -[{move.event}]-> {move.to_state!r} "
                    f"does not continue the journal, where the unit is {state!r} (seq {seq0})"
                )
            seqs.append(seq0 + 1)
            taken[move.unit_id] = (run_id, move.to_state, seq0 + 1)
        return seqs, taken

    def _write_planned(self, raw: psycopg.Connection[Any], accepted: list[tuple[_Request, list[int]]],
                       rows: dict[str, tuple[Any, ...]]) -> None:
        events: list[tuple[Any, ...]] = []
        final: dict[str, list[Any]] = {}  # unit -> [state, seq, updated, data, ended]
        runs = {unit_id: row[0] for unit_id, row in rows.items()}
        for req, seqs in accepted:
            for (move, payload, data, at), seq in zip(req.args, seqs, strict=True):
                events.append((move.unit_id, seq, runs[move.unit_id], move.from_state, move.to_state, move.event, payload, at,
                               self.engine_id))
                entry = final.setdefault(move.unit_id, [None, 0, 0.0, None, False])
                entry[0], entry[1], entry[2] = move.to_state, seq, at
                if data is not None:
                    entry[3] = data
                entry[4] = move.to_state in TERMINAL
        cols = list(zip(*events))
        raw.execute(
            "INSERT INTO events (unit_id, seq, run_id, from_state, to_state, event, payload, time, engine)"
            " SELECT * FROM unnest(%s::text[], %s::int[], %s::text[], %s::text[], %s::text[], %s::text[], %s::text[],"
            " %s::float8[], %s::text[])",
            [list(c) for c in cols],
        )
        ids = list(final)
        raw.execute(
            "UPDATE units u SET state = v.state, seq = v.seq, updated = v.updated, data = COALESCE(v.data, u.data),"
            " owner = CASE WHEN v.ended THEN NULL ELSE u.owner END"
            " FROM unnest(%s::text[], %s::text[], %s::int[], %s::float8[], %s::text[], %s::bool[])"
            " AS v(unit_id, state, seq, updated, data, ended) WHERE u.unit_id = v.unit_id",
            (ids, [final[i][0] for i in ids], [final[i][1] for i in ids], [final[i][2] for i in ids],
             [final[i][3] for i in ids], [final[i][4] for i in ids]),
        )

    def _lease_running(self, raw: psycopg.Connection[Any]) -> bool:
        row = raw.execute(f"SELECT lease_until > {NOW} AND stopped IS NULL FROM engines WHERE engine_id = %s",
                          (self.engine_id,)).fetchone()
        return bool(row and row[0])

    def _apply_run(self, conn: Any, req: _Request, now: float) -> Any:
        if req.kind == "begin_run":
            super()._apply_run(conn, req, now)
            run, _definition, units, hold = req.args
            if not hold:
                return None
            # the engine that begins a run holds its units (it drives them at once)
            conn.raw.execute("UPDATE units SET owner = %s, epoch = 1 WHERE run_id = %s", (self.engine_id, run.run_id))
            for unit, _data in units:
                self._epochs[unit.unit_id] = 1
            return None
        if req.kind == "finish_run":
            # several engines may see a run's last unit end: the first one finishes it
            cur = conn.raw.execute("UPDATE runs SET state = %s, finished = %s WHERE run_id = %s AND state = 'running'",
                                   (req.args[1], now, req.args[0]))
            if cur.rowcount == 0 and conn.raw.execute("SELECT 1 FROM runs WHERE run_id = %s", (req.args[0],)).fetchone() is None:
                raise UnknownRun(f"journal {self.path}: no run {req.args[0]!r}")
            return None
        return super()._apply_run(conn, req, now)

    # ------------------------------------------------------------------ leases

    def _in_pool(self, fn: Any) -> Any:
        assert self._pool is not None, "journal not open for writing"
        with self._pool.connection() as conn:
            return fn(conn)

    async def _pooled(self, fn: Any) -> Any:
        try:
            return await trio.to_thread.run_sync(self._in_pool, fn)
        except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
            raise JournalError(f"journal {self.path}: {str(exc).strip().splitlines()[0]}") from None

    def lease_deadline(self) -> float:
        # in trio time (real clock: trio's clock is monotonic time), computed afresh
        left = self._expiry_mono - MARGIN * self.lease_period - time.monotonic()
        return trio.current_time() + left

    def holds(self, unit_id: str) -> bool:
        return unit_id in self._epochs and trio.current_time() < self.lease_deadline()

    def fence_epoch(self, unit_id: str) -> int | None:
        return self._epochs.get(unit_id)

    async def claim(self, *, run_id: str | None = None, limit: int = 1_000_000) -> list[UnitRow]:
        """As the interface says; at most a fair share of the units free now (free units
        over live engines, rounded up), so the engines that see a run all get some."""
        if limit <= 0:
            return []
        share_sql = (
            f"SELECT (SELECT COUNT(*) FROM units u JOIN runs r ON r.run_id = u.run_id"
            f" LEFT JOIN engines e ON e.engine_id = u.owner"
            f" WHERE r.state = 'running' AND u.state NOT IN ({', '.join(['%s'] * len(_TERMINAL))})"
            f" AND (u.owner IS NULL OR e.engine_id IS NULL OR e.lease_until <= {NOW} OR e.stopped IS NOT NULL)),"
            f" (SELECT COUNT(*) FROM engines WHERE lease_until > {NOW} AND stopped IS NULL)"
        )
        free, live = await self._pooled(lambda c: c.execute(share_sql, _TERMINAL).fetchone())
        if not free:
            return []
        limit = min(limit, max(1, math.ceil(free / max(1, live))))
        marks = ", ".join(["%s"] * len(_TERMINAL))
        only = "AND u.run_id = %s" if run_id is not None else ""
        sql = f"""
            WITH me AS (SELECT 1 FROM engines WHERE engine_id = %s AND lease_until > {NOW}),
            c AS (
                SELECT u.unit_id FROM units u
                JOIN runs r ON r.run_id = u.run_id
                LEFT JOIN engines e ON e.engine_id = u.owner
                WHERE r.state = 'running' AND u.state NOT IN ({marks}) {only}
                  AND (u.owner IS NULL OR e.engine_id IS NULL OR e.lease_until <= {NOW} OR e.stopped IS NOT NULL)
                  AND EXISTS (SELECT 1 FROM me)
                ORDER BY r.created, u.run_id, u.position
                LIMIT %s
                FOR UPDATE OF u SKIP LOCKED
            )
            UPDATE units SET owner = %s, epoch = units.epoch + 1 FROM c
            WHERE units.unit_id = c.unit_id
            RETURNING units.*"""
        params: list[Any] = [self.engine_id, *_TERMINAL]
        if run_id is not None:
            params.append(run_id)
        params += [limit, self.engine_id]

        def go(conn: psycopg.Connection[Any]) -> list[dict[str, Any]]:
            with conn.cursor(row_factory=dict_row) as cur:
                cur.execute(sql, params)  # type: ignore[arg-type]
                return cur.fetchall()

        rows = await self._pooled(go)
        claimed = []
        for r in sorted(rows, key=lambda r: (r["run_id"], r["position"])):
            self._epochs[r["unit_id"]] = int(r["epoch"])
            claimed.append(_unit(r))
        return claimed

    async def renew(self) -> bool:
        sent = time.monotonic()
        sql = (f"UPDATE engines SET heartbeat = {NOW}, lease_until = {NOW} + %s"
               f" WHERE engine_id = %s AND lease_until > {NOW} AND stopped IS NULL RETURNING lease_until")
        row = await self._pooled(lambda c: c.execute(sql, (self.lease_period, self.engine_id)).fetchone())
        if row is None:
            # expired: everything it held is lost. Go on as a new engine (a new id): the
            # old id's units are claimable by anyone, this process included, as after a crash
            self._epochs.clear()
            # the LSS epochs stay: an unfreeze still in flight carries the old one, which the
            # site refuses once a newer owner reached it (a new ownership bumps them anyway)
            await trio.to_thread.run_sync(self._register_pooled)
            return False
        self._set_expiry(sent)
        return True

    async def release(self, unit_ids: Sequence[str]) -> None:
        ids = list(unit_ids)
        for unit_id in ids:
            self._epochs.pop(unit_id, None)
        if ids:  # a no-op for any unit another engine has taken meanwhile
            await self._pooled(lambda c: c.execute(
                "UPDATE units SET owner = NULL WHERE owner = %s AND unit_id = ANY(%s)", (self.engine_id, ids)))

    def forget(self, unit_id: str) -> None:
        """The unit ended or was lost: no further write of it carries our epoch."""
        self._epochs.pop(unit_id, None)

    async def stop_engine(self) -> None:
        self._epochs.clear()
        self._lss_epochs.clear()
        await self._pooled(lambda c: c.execute(
            f"UPDATE engines SET stopped = {NOW}, lease_until = {NOW} WHERE engine_id = %s", (self.engine_id,)))
        await self._pooled(lambda c: c.execute("UPDATE units SET owner = NULL WHERE owner = %s", (self.engine_id,)))
        await self._pooled(lambda c: c.execute("DELETE FROM lss_owners WHERE engine_id = %s", (self.engine_id,)))

    async def own_lsses(self, lsses: Sequence[str]) -> bool:
        take = f"""
            INSERT INTO lss_owners AS o (lss, engine_id) SELECT x, %s FROM unnest(%s::text[]) AS x
            ON CONFLICT (lss) DO UPDATE SET engine_id = excluded.engine_id
            WHERE o.engine_id = excluded.engine_id OR NOT EXISTS (
                SELECT 1 FROM engines e WHERE e.engine_id = o.engine_id AND e.lease_until > {NOW} AND e.stopped IS NULL)
            RETURNING lss"""
        # a new ownership (not a renewal of this engine's own) gets the next epoch of the LSS
        bump = """
            INSERT INTO lss_epochs AS l (lss, epoch) SELECT x, 1 FROM unnest(%s::text[]) AS x
            ON CONFLICT (lss) DO UPDATE SET epoch = l.epoch + 1
            RETURNING lss, epoch"""
        mine = [lss for lss in lsses if lss in self._lss_epochs]
        new = [lss for lss in lsses if lss not in self._lss_epochs]

        def go(conn: psycopg.Connection[Any]) -> dict[str, int]:
            with conn.transaction():
                before = dict(conn.execute("SELECT lss, engine_id FROM lss_owners WHERE lss = ANY(%s) FOR UPDATE",
                                           (list(lsses),)).fetchall())
                got = {r[0] for r in conn.execute(take, (self.engine_id, list(lsses))).fetchall()}
                if got != set(lsses):
                    raise _Rollback
                fresh = [lss for lss in lsses if before.get(lss) != self.engine_id or lss in new]
                epochs = dict(conn.execute(bump, (fresh,)).fetchall()) if fresh else {}
                kept = [lss for lss in mine if lss not in epochs]
                if kept:
                    epochs.update(conn.execute("SELECT lss, epoch FROM lss_epochs WHERE lss = ANY(%s)",
                                               (kept,)).fetchall())
                return {str(k): int(v) for k, v in epochs.items()}

        try:
            self._lss_epochs.update(await self._pooled(go))
        except _Rollback:
            return False
        return True

    async def disown_lsses(self, lsses: Sequence[str]) -> None:
        for lss in lsses:
            self._lss_epochs.pop(lss, None)
        await self._pooled(lambda c: c.execute(
            "DELETE FROM lss_owners WHERE engine_id = %s AND lss = ANY(%s)", (self.engine_id, list(lsses))))

    def lss_fence_epoch(self, lss: str) -> int | None:
        return self._lss_epochs.get(lss)

    def engines(self) -> list[EngineRow]:
        rows = self._query(f"SELECT *, (lease_until > {NOW} AND stopped IS NULL) AS live FROM engines ORDER BY started, engine_id")
        return [EngineRow(r["engine_id"], r["host"], r["pid"], r["started"], r["heartbeat"], r["lease_until"],
                          r["lease_period"], r["stopped"], bool(r["live"])) for r in rows]

    def leases(self) -> list[LeaseRow]:
        marks = ", ".join("?" for _ in _TERMINAL)
        rows = self._query(
            "SELECT u.unit_id, u.run_id, u.state, u.epoch, e.engine_id, e.host, e.pid, e.started, e.lease_until"
            " FROM units u JOIN runs r ON r.run_id = u.run_id LEFT JOIN engines e ON e.engine_id = u.owner"
            f" WHERE u.state NOT IN ({marks}) ORDER BY r.created, u.run_id, u.position", _TERMINAL)
        return [LeaseRow(r["unit_id"], r["run_id"], r["state"], r["epoch"], r["engine_id"], r["host"], r["pid"],
                         r["started"], r["lease_until"]) for r in rows]

    # ------------------------------------------------------------------ reads

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[Sequence[Any]]:
        if self._rconn is None:
            raise JournalError(f"journal {self.path} is closed")
        with self._rlock:
            try:
                with self._rconn.cursor(row_factory=tuple_row) as cur:
                    return cur.execute(_pg(sql), params).fetchall()  # type: ignore[arg-type]
            except psycopg.Error as exc:
                raise JournalError(f"journal {self.path}: read failed: {str(exc).strip().splitlines()[0]}") from None

    def _query(self, sql: str, params: Sequence[Any] = ()) -> Iterable[dict[str, Any]]:
        if self._rconn is None:
            raise JournalError(f"journal {self.path} is closed")
        with self._rlock:
            try:
                return self._rconn.execute(_pg(sql) if "?" in sql else sql, params).fetchall()  # type: ignore[arg-type]
            except psycopg.Error as exc:
                raise JournalError(f"journal {self.path}: read failed: {str(exc).strip().splitlines()[0]}") from None

    def request_cancel_sync(self, run_id: str) -> None:
        request_cancel_sync(self.url, run_id)


class _Rollback(Exception):
    pass


def request_cancel_sync(url: str, run_id: str) -> None:
    """`flowcopy cancel RUN` on a PostgreSQL journal: the engines poll the flag."""
    with _connect(url) as conn:
        if _version(conn, redact(url)) == 0:
            raise JournalNotFound(f"journal {redact(url)} holds no flowcopy journal yet")
        cur = conn.execute("UPDATE runs SET cancel_requested = 1 WHERE run_id = %s", (run_id,))
        if cur.rowcount != 1:
            raise UnknownRun(f"journal {redact(url)}: no run {run_id!r}")
