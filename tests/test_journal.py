"""The journal: round trips, group commit, durability, the store lock, bad files,
migrations, crash semantics (in-process hook and real SIGKILLs)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import sqlite_utils
import trio

from flowcopy import journal as jmod
from flowcopy.journal import (
    Journal,
    JournalClosed,
    JournalConflict,
    JournalCorrupt,
    JournalError,
    JournalNotFound,
    Move,
    RunRow,
    SimulatedCrash,
    StoreLocked,
    UnitRow,
    UnknownRun,
)
from flowcopy.machine import validate_history

PY = sys.executable


def run_row(run_id: str = "r1", workflow: str = "wf", number: int = 1, **kw: object) -> RunRow:
    return RunRow(run_id=run_id, workflow=workflow, definition={"name": workflow, "vms": ["a", "b"]},
                  number=number, **kw)  # type: ignore[arg-type]


def units_for(run_id: str, n: int) -> list[UnitRow]:
    return [UnitRow(unit_id=f"{run_id}/u{i}", run_id=run_id, data={"i": i}) for i in range(n)]


async def open_running(store: Path, nursery: trio.Nursery) -> Journal:
    journal = Journal.open(store)
    await nursery.start(journal.run_writer)
    return journal


@pytest.fixture(params=["sqlite", "postgresql"])
def spec(request: pytest.FixtureRequest, tmp_path: Path) -> Path | str:
    """The store of a contract test: a folder (SQLite) or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return tmp_path / "store"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
async def jw(spec: Path | str) -> AsyncIterator[Journal]:
    journal = Journal.open(spec)
    async with trio.open_nursery() as nursery:
        await nursery.start(journal.run_writer)
        yield journal
        nursery.cancel_scope.cancel()
    journal.close()


FORWARD = [("pending", "prepare", "preparing"), ("preparing", "prepared", "prepared"),
           ("prepared", "freeze", "freezing"), ("freezing", "frozen", "frozen")]


# --------------------------------------------------------------------------- round trips


async def test_round_trip(jw: Journal) -> None:
    run = run_row(created=100.0)
    await jw.begin_run(run, units_for("r1", 3))
    assert jw.run("r1") == run
    assert [u.unit_id for u in jw.units("r1")] == ["r1/u0", "r1/u1", "r1/u2"]
    assert jw.units("r1")[2].data == {"i": 2}
    assert [u.state for u in jw.unfinished_units()] == ["pending"] * 3

    seqs = []
    for src, trig, dst in FORWARD:
        data = {"i": 0, "freeze_id": "F1"} if trig == "freeze" else None
        seqs.append(await jw.record(Move("r1/u0", src, dst, trig, {"at": trig}, data)))
    assert seqs == [1, 2, 3, 4]
    unit = jw.unit("r1/u0")
    assert (unit.state, unit.seq, unit.data) == ("frozen", 4, {"i": 0, "freeze_id": "F1"})
    events = jw.events(unit_id="r1/u0")
    assert [(e.from_state, e.event, e.to_state) for e in events] == FORWARD
    assert [e.payload for e in events] == [{"at": t} for _, t, _ in FORWARD]
    assert [e.seq for e in events] == [1, 2, 3, 4]
    assert validate_history([(e.from_state, e.event, e.to_state) for e in events]) == []
    assert jw.events(run_id="r1") == events
    assert jw.events(run_id="other") == []

    # terminal units drop out of the unfinished list; the run stays running until finished
    await jw.record_many([
        Move("r1/u1", "pending", "compensating", "cancel"),
        Move("r1/u1", "compensating", "cancelled", "compensated_cancel", {"why": "asked"}),
    ])
    assert [u.unit_id for u in jw.unfinished_units()] == ["r1/u0", "r1/u2"]
    assert [r.run_id for r in jw.unfinished_runs()] == ["r1"]
    await jw.request_cancel("r1")
    assert jw.run("r1").cancel_requested
    await jw.finish_run("r1", "partial")
    finished = jw.run("r1")
    assert finished.state == "partial" and finished.finished is not None
    assert jw.unfinished_runs() == []


async def test_runs_numbers_and_unknowns(jw: Journal) -> None:
    assert jw.next_run_number("wf") == 1
    await jw.begin_run(run_row("a", "wf", 1, created=1.0), [])
    await jw.begin_run(run_row("b", "other", 1, created=2.0), [])
    await jw.begin_run(run_row("c", "wf", 2, created=3.0), [])
    assert jw.next_run_number("wf") == 3 and jw.next_run_number("other") == 2
    assert [r.run_id for r in jw.runs()] == ["a", "b", "c"]
    assert [r.run_id for r in jw.runs("wf")] == ["a", "c"]
    with pytest.raises(UnknownRun, match="no run 'zz'"):
        jw.run("zz")
    with pytest.raises(UnknownRun, match="no run 'zz'"):
        await jw.finish_run("zz", "failed")
    with pytest.raises(UnknownRun):
        await jw.request_cancel("zz")
    with pytest.raises(JournalConflict, match="begin_run refused"):
        await jw.begin_run(run_row("a", "wf", 9), [])  # duplicate run id
    with pytest.raises(JournalConflict, match="begin_run refused"):
        await jw.begin_run(run_row("d", "wf", 2), [])  # duplicate (workflow, number)
    with pytest.raises(ValueError, match="cannot finish as 'running'"):
        await jw.finish_run("a", "running")


async def test_continuity_is_enforced(jw: Journal) -> None:
    await jw.begin_run(run_row(), units_for("r1", 2))
    await jw.record(Move("r1/u0", "pending", "preparing", "prepare"))
    with pytest.raises(JournalConflict) as info:
        await jw.record(Move("r1/u0", "pending", "preparing", "prepare"))
    assert str(info.value) == (
        "unit r1/u0: move 'pending' -[prepare]-> 'preparing' does not continue the journal,"
        " where the unit is 'preparing' (seq 1)"
    )
    with pytest.raises(JournalConflict, match="unit ghost: not in the journal"):
        await jw.record(Move("ghost", "pending", "preparing", "prepare"))
    assert jw.unit("r1/u0").seq == 1
    assert len(jw.events(unit_id="r1/u0")) == 1


async def test_record_many_is_all_or_nothing_and_fails_alone(jw: Journal) -> None:
    await jw.begin_run(run_row(), units_for("r1", 3))
    results: dict[str, object] = {}

    async def good() -> None:
        results["good"] = await jw.record(Move("r1/u2", "pending", "preparing", "prepare"))

    async def bad() -> None:
        try:
            await jw.record_many([
                Move("r1/u0", "pending", "preparing", "prepare", data={"x": 1}),
                Move("r1/u1", "frozen", "establishing", "establish"),  # u1 is pending
            ])
        except JournalConflict as exc:
            results["bad"] = exc

    tx = jw.transactions
    async with trio.open_nursery() as nursery:
        nursery.start_soon(bad)
        nursery.start_soon(good)
    assert jw.transactions == tx + 1  # same batch ...
    assert results["good"] == 1  # ... the good request committed
    assert "unit r1/u1" in str(results["bad"])
    assert jw.unit("r1/u0").state == "pending" and jw.unit("r1/u0").data == {"i": 0}
    assert jw.events(unit_id="r1/u0") == []


async def test_payload_must_be_json(jw: Journal) -> None:
    await jw.begin_run(run_row(), units_for("r1", 1))
    with pytest.raises(TypeError, match="unit r1/u0: move payload is not plain JSON data"):
        await jw.record(Move("r1/u0", "pending", "preparing", "prepare", {"when": object()}))
    with pytest.raises(TypeError, match="run r2: definition is not plain JSON data"):
        await jw.begin_run(RunRow("r2", "wf", {"x": {1, 2}}, number=2), [])


async def test_record_without_writer_says_so(spec: Path | str) -> None:
    with Journal.open(spec) as journal:
        with pytest.raises(JournalClosed, match=r"the writer is not running \(start it with"):
            await journal.record(Move("u", "pending", "preparing", "prepare"))


async def test_record_soon_rides_in_the_next_commit_in_order(jw: Journal) -> None:
    """A move queued without a wait is durable once a later waited write of the same
    caller returns (batches commit in order), and both land in the journal in order."""
    await jw.begin_run(run_row(), units_for("r1", 1))
    tx = jw.transactions
    queued = jw.record_soon([Move("r1/u0", "pending", "preparing", "prepare")])
    assert not queued.done.is_set()  # returned before any commit
    assert await jw.record(Move("r1/u0", "preparing", "prepared", "prepared", data={"pairs": [1]})) == 2
    assert queued.done.is_set() and queued.error is None
    assert await Journal.settled(queued) == 1
    assert jw.transactions == tx + 1  # both in one transaction
    assert [(e.seq, e.to_state) for e in jw.events(unit_id="r1/u0")] == [(1, "preparing"), (2, "prepared")]
    assert jw.unit("r1/u0").data == {"pairs": [1]}


async def test_record_soon_refused_is_raised_by_settled(jw: Journal) -> None:
    await jw.begin_run(run_row(), units_for("r1", 1))
    queued = jw.record_soon([Move("r1/u0", "frozen", "establishing", "establish")])  # u0 is pending
    with pytest.raises(JournalConflict, match="where the unit is 'pending'"):
        await Journal.settled(queued)
    assert jw.events(unit_id="r1/u0") == []


def test_data_encoder_writes_what_json_writes_and_re_encodes_only_changes() -> None:
    """The incremental encoding is the same text as one json encoding of the whole data;
    a value replaced by an equal-looking new object is encoded again, not taken from the
    cache; non-JSON data is refused with the same message."""
    from flowcopy.journal.api import DataEncoder, _json

    enc = DataEncoder()
    spec = {"vms": ["vm1"], "timeouts": {"copy": 1.5, "b": None}, "z": [{"é": "ü"}]}
    data = {"spec": spec, "tag": "fc:r:0", "freeze_attempts": 0, "freezes": {}, "b": 1.25, "a": True,
            "n": None, "z": -0.0, "big": 10**30, "s": "é\"\\n"}
    for _ in range(2):
        assert enc.encode(data, "d") == _json(data, "d")
    data = {**data, "pairs": [{"source": "s", "target": "t"}], "freeze_attempts": 1}
    assert enc.encode(data, "d") == _json(data, "d")
    data["spec"] = {"vms": ["vm2"]}  # replaced: the cached text of the old spec is not used
    assert enc.encode(data, "d") == _json(data, "d") and '"vm2"' in enc.encode(data, "d")
    assert enc.encode({}, "d") == "{}"
    with pytest.raises(TypeError, match="d is not plain JSON data"):
        enc.encode({"x": object()}, "d")
    with pytest.raises(TypeError, match="d is not plain JSON data"):
        enc.encode({"x": float("nan")}, "d")


# --------------------------------------------------------------------------- group commit


async def test_group_commit_batches_concurrent_records(jw: Journal) -> None:
    n = 500
    await jw.begin_run(run_row(), units_for("r1", n))
    tx = jw.transactions
    seqs: list[int] = []

    async def unit(i: int) -> None:
        for src, trig, dst in FORWARD[:2]:
            seqs.append(await jw.record(Move(f"r1/u{i}", src, dst, trig)))

    async with trio.open_nursery() as nursery:
        for i in range(n):
            nursery.start_soon(unit, i)
    assert sorted(seqs) == [1] * n + [2] * n
    assert jw.moves_committed == 2 * n
    batches = jw.transactions - tx
    assert batches <= 10, batches  # 1000 durable moves in a handful of transactions
    assert {u.state for u in jw.units("r1")} == {"prepared"}


async def test_one_commit_per_move_mode(jw: Journal) -> None:
    n = 50
    await jw.begin_run(run_row(), units_for("r1", n))
    jw.batch_limit = 1
    tx = jw.transactions
    async with trio.open_nursery() as nursery:
        for i in range(n):
            nursery.start_soon(jw.record, Move(f"r1/u{i}", "pending", "preparing", "prepare"))
    assert jw.transactions - tx == n


async def test_failed_commit_raises_in_every_waiter_of_the_batch(tmp_path: Path) -> None:
    store = tmp_path / "s"
    async with trio.open_nursery() as nursery:
        journal = await open_running(store, nursery)
        await journal.begin_run(run_row(), units_for("r1", 3))
        # another connection holds the write lock; the writer gives up quickly
        journal._wconn.execute("PRAGMA busy_timeout = 50")  # type: ignore[union-attr]
        other = sqlite3.connect(store / "journal.sqlite", isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        errors: list[BaseException] = []

        async def rec(i: int) -> None:
            try:
                await journal.record(Move(f"r1/u{i}", "pending", "preparing", "prepare"))
            except JournalError as exc:
                errors.append(exc)

        async with trio.open_nursery() as inner:
            for i in range(3):
                inner.start_soon(rec, i)
        assert len(errors) == 3
        assert all("commit failed: database is locked" in str(e) for e in errors)
        other.execute("ROLLBACK")
        other.close()
        # the writer survived and the journal is unchanged
        assert await journal.record(Move("r1/u0", "pending", "preparing", "prepare")) == 1
        assert [u.state for u in journal.units("r1")] == ["preparing", "pending", "pending"]
        nursery.cancel_scope.cancel()
    journal.close()


# --------------------------------------------------------------------------- durability


async def test_durable_across_close_and_reopen(spec: Path | str) -> None:
    store = spec
    async with trio.open_nursery() as nursery:
        journal = await open_running(store, nursery)
        await journal.begin_run(run_row(), units_for("r1", 2))
        await journal.record(Move("r1/u0", "pending", "preparing", "prepare", {"p": 1}, {"tag": "T"}))
        nursery.cancel_scope.cancel()
    journal.close()
    assert getattr(journal, "_lock_fd", None) is None

    async with trio.open_nursery() as nursery:
        again = await open_running(store, nursery)
        assert [u.unit_id for u in await again.claim()] == ["r1/u0", "r1/u1"]  # as resume does
        assert again.unit("r1/u0").data == {"tag": "T"}
        assert [u.state for u in again.unfinished_units()] == ["preparing", "pending"]
        assert again.events(unit_id="r1/u0")[0].payload == {"p": 1}
        assert await again.record(Move("r1/u0", "preparing", "prepared", "prepared")) == 2
        nursery.cancel_scope.cancel()
    again.close()
    if isinstance(store, str):
        return
    db = sqlite_utils.Database(store / "journal.sqlite")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA user_version").fetchone()[0] == jmod.SCHEMA_VERSION


# --------------------------------------------------------------------------- crash hook


async def test_crash_hook_propagates_to_writer_and_every_waiter(spec: Path | str) -> None:
    store = spec
    journal = Journal.open(store)
    returned: list[int] = []
    crashed: list[BaseException] = []

    def hook(move: Move) -> None:
        if move.to_state == "freezing":
            raise SimulatedCrash(f"killed after {move.unit_id} -> freezing")

    async def rec(move: Move) -> None:
        try:
            returned.append(await journal.record(move))
        except SimulatedCrash as exc:
            crashed.append(exc)
            raise

    with pytest.raises(BaseExceptionGroup) as info:
        async with trio.open_nursery() as nursery:
            await nursery.start(journal.run_writer)
            await journal.begin_run(run_row(), units_for("r1", 3))
            for i in range(3):
                await journal.record(Move(f"r1/u{i}", "pending", "preparing", "prepare"))
                await journal.record(Move(f"r1/u{i}", "preparing", "prepared", "prepared"))
            journal.crash_hook = hook
            nursery.start_soon(rec, Move("r1/u0", "prepared", "freezing", "freeze"))
            nursery.start_soon(rec, Move("r1/u1", "prepared", "freezing", "freeze"))
            nursery.start_soon(rec, Move("r1/u2", "prepared", "freezing", "freeze"))
    assert returned == []  # nobody returned normally
    assert len(crashed) == 3
    leaves = info.value.exceptions
    assert all(isinstance(e, SimulatedCrash) for e in leaves)
    assert len(leaves) == 4  # the writer and three waiters
    # a later write does not pretend to succeed either
    with pytest.raises(SimulatedCrash):
        await journal.record(Move("r1/u2", "prepared", "freezing", "freeze"))
    journal.close()

    # the batch that tripped the hook IS durable: the crash came after the commit
    with Journal.open(store) as after:
        assert [u.state for u in after.units("r1")] == ["freezing", "freezing", "freezing"]


async def test_run_crash_hook(spec: Path | str) -> None:
    journal = Journal.open(spec)
    seen: list[tuple[str, str]] = []

    def hook(kind: str, run_id: str) -> None:
        seen.append((kind, run_id))
        if kind == "finish_run":
            raise SimulatedCrash("killed after finish_run")

    journal.run_crash_hook = hook
    with pytest.raises(BaseExceptionGroup):
        async with trio.open_nursery() as nursery:
            await nursery.start(journal.run_writer)
            await journal.begin_run(run_row(), [])
            await journal.request_cancel("r1")
            await journal.finish_run("r1", "cancelled")
    journal.close()
    assert seen == [("begin_run", "r1"), ("request_cancel", "r1"), ("finish_run", "r1")]
    with Journal.open(spec) as after:
        assert after.run("r1").state == "cancelled"


# --------------------------------------------------------------------------- the lock


def test_second_open_in_process_is_refused(tmp_path: Path) -> None:
    with Journal.open(tmp_path):
        with pytest.raises(StoreLocked) as info:
            Journal.open(tmp_path)
        assert str(info.value).startswith(f"store {tmp_path} is held by pid {os.getpid()} (started ")
        assert info.value.pid == os.getpid()
        assert jmod.read_lock_holder(tmp_path)[0] == os.getpid()  # type: ignore[index]
    assert jmod.read_lock_holder(tmp_path) is None
    Journal.open(tmp_path).close()  # released on close


HOLDER = """
import sys, time
from pathlib import Path
from flowcopy.journal import Journal
j = Journal.open(Path(sys.argv[1]))
print("locked", flush=True)
time.sleep(600)
"""


def _start(code: str, *args: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([PY, "-c", textwrap.dedent(code), *args], stdout=subprocess.PIPE, text=True)
    return proc


def _expect(proc: subprocess.Popen[str], line: str) -> None:
    got = proc.stdout.readline().strip()  # type: ignore[union-attr]
    assert got == line, f"child said {got!r}, exit {proc.poll()}"


def _kill(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()  # type: ignore[union-attr]


@pytest.mark.process
def test_lock_names_the_live_holder_and_is_taken_over_after_sigkill(tmp_path: Path) -> None:
    proc = _start(HOLDER, str(tmp_path))
    try:
        _expect(proc, "locked")
        with pytest.raises(StoreLocked, match=rf"^store {tmp_path} is held by pid {proc.pid} \(started \d{{4}}-"):
            Journal.open(tmp_path)
        # a reader still works while the engine holds the store
        with Journal.open(tmp_path, lock=False) as reader:
            assert reader.runs() == []
    finally:
        _kill(proc)
    assert proc.returncode == -signal.SIGKILL
    # the lock file still names the dead pid, but the OS released its flock
    assert f"pid {proc.pid}" in (tmp_path / "journal.lock").read_text()
    with Journal.open(tmp_path):
        assert (tmp_path / "journal.lock").read_text().startswith(f"pid {os.getpid()}\n")


# --------------------------------------------------------------------------- readers, cancel


async def test_reader_and_cancel_from_another_connection(tmp_path: Path) -> None:
    store = tmp_path / "s"
    with pytest.raises(JournalNotFound, match=f"store {store} has no journal"):
        Journal.open(store, lock=False)
    async with trio.open_nursery() as nursery:
        journal = await open_running(store, nursery)
        await journal.begin_run(run_row(), units_for("r1", 1))
        with Journal.open(store, lock=False) as reader:
            assert reader.run("r1").cancel_requested is False
            reader.request_cancel_sync("r1")  # what `flowcopy cancel` does
            with pytest.raises(UnknownRun):
                reader.request_cancel_sync("nope")
            await journal.record(Move("r1/u0", "pending", "preparing", "prepare"))
            assert reader.unit("r1/u0").state == "preparing"  # sees the engine's commits
            with pytest.raises(sqlite3.OperationalError):
                reader._rconn.execute("DELETE FROM runs")  # type: ignore[union-attr]
        assert journal.run("r1").cancel_requested is True  # the engine sees the flag
        # and the engine's writer still commits after the other connection wrote
        assert await journal.record(Move("r1/u0", "preparing", "prepared", "prepared")) == 2
        nursery.cancel_scope.cancel()
    journal.close()


# --------------------------------------------------------------------------- bad files


def test_garbage_file_is_reported_with_its_path(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite"
    path.write_bytes(b"this is not a database, it is a shopping list\n" * 100)
    with pytest.raises(JournalCorrupt, match=rf"^{path} is not a flowcopy journal: file is not a database"):
        Journal.open(tmp_path)
    with pytest.raises(JournalCorrupt, match=rf"^{path} is not a flowcopy journal"):
        Journal.open(tmp_path, lock=False)
    assert path.read_bytes().startswith(b"this is not a database")  # untouched
    with pytest.raises(JournalCorrupt):
        Journal.open(tmp_path)  # refused again: the failed open released the lock


def test_foreign_sqlite_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite"
    db = sqlite_utils.Database(path)
    db["recipes"].insert({"name": "bread"})
    db.close()
    with pytest.raises(JournalCorrupt, match=rf"^{path} is an SQLite database but not a flowcopy journal .*tables: recipes"):
        Journal.open(tmp_path)
    assert sqlite_utils.Database(path)["recipes"].count == 1


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    Journal.open(tmp_path).close()
    conn = sqlite3.connect(tmp_path / "journal.sqlite")
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    message = rf"{tmp_path / 'journal.sqlite'} has journal schema v99, newer than this flowcopy understands \(v{jmod.SCHEMA_VERSION}\)"
    with pytest.raises(JournalCorrupt, match=message):
        Journal.open(tmp_path)
    with pytest.raises(JournalCorrupt, match=message):
        Journal.open(tmp_path, lock=False)


def test_unwritable_store_is_reported(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(jmod.StoreUnusable, match=f"^cannot create store {blocker / 'store'}: Not a directory$") as info:
        Journal.open(blocker / "store")
    assert isinstance(info.value, OSError) and isinstance(info.value, JournalError)


def test_migration_from_version_1(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite"
    db = sqlite_utils.Database(path)
    assert jmod._migrate(db, path, upto=1) == 0
    db.execute("INSERT INTO runs VALUES ('r1', 'wf', '{}', 'running', 1.0, NULL, 1, 0)")
    db.execute("INSERT INTO units VALUES ('r1/u0', 'r1', 0, 'frozen', '{\"tag\": \"T\"}', 1.0, 4)")
    db.close()
    assert sqlite_utils.Database(path).execute("PRAGMA user_version").fetchone()[0] == 1
    with pytest.raises(JournalCorrupt, match=f"schema v1; start an engine on the store to upgrade it to v{jmod.SCHEMA_VERSION}"):
        Journal.open(tmp_path, lock=False)

    with Journal.open(tmp_path) as journal:
        assert journal.unit("r1/u0") == UnitRow("r1/u0", "r1", "frozen", {"tag": "T"}, 1.0, 4)
        assert [u.unit_id for u in journal.unfinished_units()] == ["r1/u0"]
    after = sqlite_utils.Database(path)
    assert after.execute("PRAGMA user_version").fetchone()[0] == jmod.SCHEMA_VERSION == len(jmod.MIGRATIONS)
    indexes = {i.name for t in ("units", "events") for i in after[t].indexes}
    assert {"units_by_run", "units_by_state", "events_by_run"} <= indexes
    assert {"verifications", "forgotten"} <= set(after.table_names())


# --------------------------------------------------------------------------- SIGKILL mid-batch

BIG_BATCH = """
import sys, time, trio
from pathlib import Path
from flowcopy import journal as jm
store, mode, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
j = jm.Journal.open(store)
orig = jm.Journal._write_moves
calls = 0
def slow(conn, planned):
    global calls
    calls += 1
    if mode == "mid" and calls == 2:  # the batch's moves are written a chunk at a time
        print("mid", flush=True)
        time.sleep(600)  # killed here, part of the batch written and not committed
    return orig(conn, planned)
def after(move):
    if move.unit_id == f"r1/u{n - 1}":
        print("committed", flush=True)
        time.sleep(600)  # killed here, after the commit, before anyone is told
async def main():
    async with trio.open_nursery() as nursery:
        await nursery.start(j.run_writer)
        await j.begin_run(jm.RunRow("r1", "wf", {}), [jm.UnitRow(f"r1/u{i}", "r1") for i in range(n)])
        j._wconn.execute("PRAGMA cache_size = 5")  # spill uncommitted pages into the WAL
        jm.Journal._write_moves = staticmethod(slow)
        j.crash_hook = after
        print("ready", flush=True)
        for i in range(n):
            nursery.start_soon(j.record, jm.Move(f"r1/u{i}", "pending", "preparing", "prepare", {"pad": "x" * 200}))
trio.run(main)
"""


@pytest.mark.process
@pytest.mark.parametrize("mode", ["mid", "after"])
def test_sigkill_during_a_big_batch_leaves_all_or_nothing(tmp_path: Path, mode: str) -> None:
    n = 4000
    proc = _start(BIG_BATCH, str(tmp_path), mode, str(n))
    try:
        _expect(proc, "ready")
        wal = tmp_path / "journal.sqlite-wal"
        before = wal.stat().st_size
        _expect(proc, "mid" if mode == "mid" else "committed")
        if mode == "mid":
            assert wal.stat().st_size > before  # uncommitted frames really are on disk
    finally:
        _kill(proc)
    with Journal.open(tmp_path) as journal:
        units = journal.units("r1")
        events = journal.events(run_id="r1")
    states = {u.state for u in units}
    if mode == "mid":
        assert states == {"pending"} and events == []
    else:
        assert states == {"preparing"} and len(events) == n
        assert all(u.seq == 1 for u in units)
