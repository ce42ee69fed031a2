"""Benchmarks behind `flowcopy bench` (DESIGN §5). Figures, not tests: each function
returns plain data the CLI prints as a table or JSON."""

from __future__ import annotations

import functools
import math
import os
import time
import uuid
from pathlib import Path
from typing import Any

import trio

from flowcopy.journal import Journal, Move, RunRow, SimulatedCrash, UnitRow, is_crash
from flowcopy.machine import FORWARD_PATH, TRANSITIONS

# --------------------------------------------------------------------------- journal

_FORWARD_TRIGGERS = {
    src: next(t.trigger for t in TRANSITIONS if src in t.source and t.dest == dst)
    for src, dst in zip(FORWARD_PATH, FORWARD_PATH[1:])
}


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


async def _keep_lease(journal: Journal) -> None:
    while True:
        await trio.sleep(journal.lease_period / 3)
        await journal.renew()


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
    from flowcopy.journal import is_url

    store = store if is_url(store) else Path(store)  # a folder or a postgresql:// URL
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
                if journal.leased:  # a shared journal: keep the lease its writes are fenced by
                    nursery.start_soon(_keep_lease, journal)

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
        fsync = math.nan if is_url(store) else await trio.to_thread.run_sync(_fsync_rate, store)
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


# --------------------------------------------------------------------------- engine

BENCH_WORKFLOW = """
name: bench
quiesce: filesystem
units:
  - selector: {backup: nightly}
    mode: copy
    disks:
      - {disk: Disk1, target: {pool: targets}}
      - {disk: Disk2, target: {pool: targets}}
    copy: {action: wait}
"""


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _window(run: dict[str, Any]) -> dict[str, Any]:
    """The freeze-window figures of an engine run, as their own group."""
    return {k: run[k] for k in ("vms", "freeze_window_p50_ms", "freeze_window_p99_ms", "seconds", "vms_per_s")}


def _bench_site(vms: int, capacity: int = 4 << 20) -> Any:
    """Small LUNs keep the background copy (site time) short; establish is O(1) anyway."""
    from flowcopy.site.inventory import generate_lab
    from flowcopy.site.local import Latency

    return generate_lab(vms, 16, capacity=capacity, latency=Latency.zero(), workloads=min(vms, 10))


async def _engine_run(store: Path, vms: int, *, trace_memory: bool = False) -> dict[str, Any]:
    """One run of `vms` VMs against the in-process site with zero latency."""
    import tracemalloc

    from flowcopy import definitions, planning
    from flowcopy.engine import Engine, Limits

    site = _bench_site(vms)
    wf = definitions.load_text(BENCH_WORKFLOW, "bench.yaml")
    out: dict[str, Any] = {"vms": vms}
    async with site.running():
        journal = Journal.open(store)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(journal.run_writer)
                engine = Engine(journal, site, store=store, limits=Limits(units=vms), poll=0.05)
                specs = await planning.plan_units(wf, site)
                run_id = await engine.begin_run(wf.name, planning.definition_data(wf), specs)
                tracemalloc.start() if trace_memory else None
                start, cpu0 = time.perf_counter(), time.process_time()
                summary = await engine.drive_run(run_id)
                elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu0
                _, peak = tracemalloc.get_traced_memory() if trace_memory else (0, 0)
                tracemalloc.stop() if trace_memory else None
                out.update(
                    seconds=round(elapsed, 3),
                    vms_per_s=round(vms / elapsed, 1),
                    # CPU seconds of the whole process (writer thread included): on a shared
                    # machine this compares two builds better than the wall clock does
                    cpu_s=round(cpu, 3),
                    peak_rss_mib=_peak_rss_mib(),
                    succeeded=summary.units.get("succeeded", 0),
                    verified=summary.verified,
                    freeze_window_p50_ms=round(_percentile(list(engine.freeze_windows), 0.5) * 1000, 2),
                    freeze_window_p99_ms=round(_percentile(list(engine.freeze_windows), 0.99) * 1000, 2),
                    peak_kib_per_unit=round(peak / 1024 / vms, 1),
                    journal_transactions=journal.transactions,
                    journal_moves=journal.moves_committed,
                )
                nursery.cancel_scope.cancel()
        finally:
            journal.close()
    return out


class _Reconciled:
    """Engine observer: the wall time each resumed unit's intent was settled."""

    def __init__(self) -> None:
        self.at: dict[str, float] = {}

    def on_reconciled(self, unit_id: str) -> None:
        self.at.setdefault(unit_id, time.time())


async def crash_when_copying(store: Path, site: Any, copying: int, *, units: int, poll: float) -> str:
    """Drive a new run of the bench workflow until `copying` units journaled their copy
    intent, then crash the engine there (the crash hook refuses that move); returns the
    run. Units then stand in every state from pending to copying."""
    from flowcopy import definitions, planning
    from flowcopy.engine import Engine, Limits

    wf = definitions.load_text(BENCH_WORKFLOW, "bench.yaml")
    journal = Journal.open(store)
    seen = 0

    def hook(move: Move) -> None:
        nonlocal seen
        if move.event == "copy":
            seen += 1
            if seen >= copying:
                raise SimulatedCrash(f"benchmark: {seen} units are copying")

    run_id = ""
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(journal.run_writer)
            journal.crash_hook = hook
            engine = Engine(journal, site, store=store, limits=Limits(units=units), poll=poll)
            specs = await planning.plan_units(wf, site)
            run_id = await engine.begin_run(wf.name, planning.definition_data(wf), specs)
            await engine.drive_run(run_id)
    except BaseException as exc:  # noqa: BLE001 - the crash arrives in exception groups
        if not is_crash(exc):
            raise
    finally:
        journal.close()
    return run_id


async def _recovery(store: Path, vms: int, *, all_in_flight: bool = False) -> dict[str, Any]:
    """Crash the engine while units are in flight, then time a new engine's reconciliation.

    By default the crash comes when half the units have started their copy stage, so
    units stand in every state of the table; `reconciled_s` is the time until every
    unfinished unit has journaled its first move after the restart (for a unit caught in
    its background copy: the copy's end, at most 0.7 s of site time later; for a unit
    that had not begun its freeze: its turn at the freeze-window limiter, so that figure
    is bound by throughput). `acting_reconciled_s` counts only the units with a side
    effect in flight: until each settled its intent against the site (its first move; for
    a copying unit, its relationships seen in a query made after the restart).

    `all_in_flight`: the crash comes when the last unit starts its copy (16 GiB LUNs), so
    no unit is queued and every unfinished one has a side effect in flight (a unit whose
    LUNs hold no data finishes its copy at once, so some have succeeded by then); the
    resume is timed until each one has reconciled, then stopped.
    """
    from flowcopy.engine import Engine, Limits

    site = _bench_site(vms, capacity=(16 << 30) if all_in_flight else (64 << 20))
    crash_at = vms if all_in_flight else max(1, vms // 2)
    async with site.running():
        run_id = await crash_when_copying(store, site, crash_at, units=vms, poll=0.05)
        at_crash = {row.unit_id: row.state for row in Journal.open(store, lock=False).unfinished_units()}
        in_flight = len(at_crash)
        acting_ids = {u for u, state in at_crash.items() if state not in ("pending", "prepared")}
        reconciled = _Reconciled()
        total: float | None = None
        start = time.perf_counter()
        wall0 = time.time()
        journal = Journal.open(store)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(journal.run_writer)
                engine = Engine(journal, site, store=store, limits=Limits(units=vms), poll=0.05)
                engine.observers.append(reconciled)
                if all_in_flight:
                    nursery.start_soon(engine.resume)
                    while not acting_ids <= reconciled.at.keys():
                        await trio.sleep(0.01)
                    succeeded = 0
                else:
                    summaries = await engine.resume()
                    total = time.perf_counter() - start
                    succeeded = summaries[0].units.get("succeeded", 0)
                firsts: dict[str, float] = {}
                for event in journal.events(run_id=run_id):
                    if event.time >= wall0 and event.unit_id not in firsts:
                        firsts[event.unit_id] = event.time
                nursery.cancel_scope.cancel()
        finally:
            journal.close()
    by_state: dict[str, list[float]] = {}
    for unit_id, state in at_crash.items():
        if unit_id in firsts:
            by_state.setdefault(state, []).append(firsts[unit_id] - wall0)
    # pending/prepared units had nothing at the site: their first move waits for its turn
    # at the freeze-window limiter (throughput). Every other state had a side effect in
    # flight that the restart had to settle against the site: that is reconciliation.
    acting = [reconciled.at[u] - wall0 for u in acting_ids if u in reconciled.at]
    return {
        "in_flight_units": in_flight,
        "reconciled_s": round(max(firsts.values()) - wall0, 3) if firsts and not all_in_flight else None,
        "acting_units": len(acting_ids),
        "acting_reconciled_s": round(max(acting), 3) if acting else None,
        "acting_reconciled_p50_s": round(_percentile(acting, 0.5), 3) if acting else None,
        # the same units' first journaled move (for a copying unit: its copy's end)
        "acting_first_move_s": round(max(firsts[u] for u in acting_ids if u in firsts) - wall0, 3)
        if any(u in firsts for u in acting_ids) else None,
        # per state at the crash: units, and when the last of them made its first move
        "by_state": {s: {"units": len(t), "first_move_max_s": round(max(t), 3)} for s, t in sorted(by_state.items())},
        "resume_to_done_s": round(total, 3) if total is not None else None,
        "succeeded": succeeded,
    }


def site_figures() -> dict[str, Any]:
    """Establish time for 1 GiB vs 1 TiB and copy-on-write overhead per source write."""
    from flowcopy.site.api import TRACK_SIZE, CopyMode, FlashOptions
    from flowcopy.site.ess import Array

    out: dict[str, Any] = {}
    for name, size in (("1GiB", 1 << 30), ("1TiB", 1 << 40)):
        best = math.inf
        for _ in range(20):  # best of 20: the first call pays for imports and caches
            array = Array()
            array.add_volume("10010698", lss="10", capacity=size)
            array.add_volume("10110698", lss="10", capacity=size)
            start = time.perf_counter()
            array.establish("10010698", "10110698", FlashOptions(), now=0.0)
            best = min(best, time.perf_counter() - start)
        out[f"establish_{name}_us"] = round(best * 1e6, 1)
    array = Array()
    for serial in ("10010698", "10110698", "10210698"):
        array.add_volume(serial, lss="10", capacity=1 << 30)
    block = b"x" * 4096
    n = 2000
    start = time.perf_counter()
    for i in range(n):
        array.write("10210698", (i % 16384) * TRACK_SIZE, block, now=0.0)
    plain = (time.perf_counter() - start) / n
    array.establish("10010698", "10110698", FlashOptions(mode=CopyMode.NOCOPY), now=0.0)
    start = time.perf_counter()
    for i in range(n):
        array.write("10010698", (i % 16384) * TRACK_SIZE, block, now=0.0)
    cow = (time.perf_counter() - start) / n
    out["write_us"] = round(plain * 1e6, 2)
    out["write_with_cow_us"] = round(cow * 1e6, 2)
    out["cow_overhead_us"] = round((cow - plain) * 1e6, 2)
    return out


def run_all(store: Path, *, vms: int = 1000, quick: bool = False) -> dict[str, Any]:
    """Every figure of DESIGN §5 this build measures, in one process, on one disk."""
    from flowcopy import logs

    logs.configure(level="error")  # a benchmark prints figures, not 12,000 transitions
    store.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    if quick:
        results["journal"] = journal_rate(store / "journal", units=100, moves_per_unit=10)
    else:
        results["journal"] = journal_rate(store / "journal")
    results["engine"] = trio.run(_engine_run, store / "engine", vms)
    # tracemalloc slows Python several-fold: memory is measured in a run of its own
    results["memory"] = trio.run(functools.partial(_engine_run, store / "memory", min(vms, 300), trace_memory=True))
    results["freeze_window_1vm"] = trio.run(_engine_run, store / "engine1", 1)
    results["recovery"] = trio.run(_recovery, store / "recovery", vms)
    if vms >= 10_000:
        # the goals' three sizes in one command: 1, 1,000 and 10,000 concurrent VMs
        results["freeze_window_1000"] = _window(trio.run(_engine_run, store / "engine1000", 1000))
        results["freeze_window_10000"] = _window(results["engine"])
        # the crash when the last of the 10,000 units starts its copy: nothing queued
        results["recovery_10000"] = trio.run(functools.partial(_recovery, store / "recovery10000", vms, all_in_flight=True))
    results["site"] = site_figures()
    return results


if __name__ == "__main__":  # pragma: no cover - `python -m flowcopy.bench STORE`
    import json
    import sys
    import tempfile

    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="flowcopy-bench-"))
    print(json.dumps(journal_rate(target), indent=2))
