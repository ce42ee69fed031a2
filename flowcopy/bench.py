"""Benchmarks behind `flowcopy bench` (DESIGN §5). Figures, not tests: each function
returns plain data the CLI prints as a table or JSON."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any

import trio

from flowcopy.journal import Journal, Move, RunRow, UnitRow
from flowcopy.machine import FORWARD_PATH, TRANSITIONS

# --------------------------------------------------------------------------- journal

_FORWARD_TRIGGERS = {t.source[0]: t.trigger for t in TRANSITIONS if len(t.source) == 1}


def _walk(moves: int) -> list[tuple[str, str, str]]:
    """`moves` steps along the forward path (wrapping round with fresh unit numbers is
    the caller's job): (from, trigger, to)."""
    path = []
    for i in range(min(moves, len(FORWARD_PATH) - 1)):
        source = FORWARD_PATH[i]
        path.append((source, _FORWARD_TRIGGERS[source], FORWARD_PATH[i + 1]))
    return path


async def _record_concurrently(
    journal: Journal, units: int, moves_per_unit: int
) -> tuple[int, float, int]:
    """Begin a run of `units` units, then let every unit record its moves one after the
    other (each waits for durability before its next move, as the engine does), all
    units at once. Returns (moves, seconds, transactions) for the recording part."""
    run_id = f"bench-{uuid.uuid4().hex[:8]}"
    await journal.begin_run(
        RunRow(run_id=run_id, workflow="bench", definition={"bench": "journal"},
               number=journal.next_run_number("bench")),
        [UnitRow(unit_id=f"{run_id}/u{i}", run_id=run_id) for i in range(units)],
    )
    walk = _walk(moves_per_unit)

    async def unit(i: int) -> None:
        for source, trigger, dest in walk:
            await journal.record(Move(f"{run_id}/u{i}", source, dest, trigger, {"bench": True}))

    tx0 = journal.transactions
    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for i in range(units):
            nursery.start_soon(unit, i)
    return units * len(walk), time.perf_counter() - start, journal.transactions - tx0


def _fsync_rate(directory: Path, count: int = 200) -> float:
    """Raw write+fsync of one small record per call in `directory`: the ceiling of any
    one-commit-per-transition design on this disk."""
    path = directory / f"fsync-probe-{os.getpid()}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        start = time.perf_counter()
        for _ in range(count):
            os.write(fd, b"x" * 128)
            os.fsync(fd)
        return count / (time.perf_counter() - start)
    finally:
        os.close(fd)
        path.unlink()


def journal_rate(
    store: Path, *, units: int = 1000, moves_per_unit: int = 10, single_moves: int | None = None
) -> dict[str, Any]:
    """Durable moves/s with group commit vs. one commit per move, same journal, same
    disk, same run.

    Both modes record the same way (every unit waits for each move to be durable
    before its next); only `Journal.batch_limit` differs. One-commit-per-move is
    fsync-bound, so it runs `single_moves` moves (default: a tenth of the group-commit
    moves, at least 200) to keep the benchmark short; rates are per second either way.
    """
    store = Path(store)
    moves_per_unit = min(moves_per_unit, len(FORWARD_PATH) - 1)
    total = units * moves_per_unit
    if single_moves is None:
        single_moves = max(200, total // 10)
    single_units = max(1, min(units, single_moves // moves_per_unit))

    async def main() -> dict[str, Any]:
        journal = Journal.open(store)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(journal.run_writer)

                group_moves, group_s, group_tx = await _record_concurrently(
                    journal, units, moves_per_unit
                )
                journal.batch_limit = 1
                single, single_s, single_tx = await _record_concurrently(
                    journal, single_units, moves_per_unit
                )
                journal.batch_limit = None
                nursery.cancel_scope.cancel()
        finally:
            journal.close()
        fsync = await trio.to_thread.run_sync(_fsync_rate, store)
        group_rate = group_moves / group_s
        single_rate = single / single_s
        return {
            "store": str(store),
            "group_commit": {
                "units": units, "moves": group_moves, "seconds": round(group_s, 3),
                "moves_per_s": round(group_rate, 1), "transactions": group_tx,
                "moves_per_transaction": round(group_moves / max(1, group_tx), 1),
            },
            "one_commit_per_move": {
                "units": single_units, "moves": single, "seconds": round(single_s, 3),
                "moves_per_s": round(single_rate, 1), "transactions": single_tx,
            },
            "ratio": round(group_rate / single_rate, 1),
            "raw_fsync_per_s": round(fsync, 1),
            "note": (
                "one-commit-per-move is bound by the disk's fsync rate "
                f"(raw write+fsync here: {fsync:.0f}/s); group commit shares one fsync "
                "among every unit waiting at that moment"
            ),
        }

    return trio.run(main)


if __name__ == "__main__":  # pragma: no cover - `python -m flowcopy.bench STORE`
    import json
    import sys
    import tempfile

    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="flowcopy-bench-"))
    print(json.dumps(journal_rate(target), indent=2))
