"""Figures for the real applications on the LUNs (run by hand; not a test).

    .venv/bin/python tests/measure_apps.py [--trials N] [--writes W] [--apps sqlite,ext4]

- SQLite transactions/s through the model: back-to-back transactions (interval 1 µs) over W
  guest writes, in site time with the modelled 1 ms per write, and in wall time with no
  modelled latency (the model's own cost: SQLite + VFS + the array's writes);
- seconds per check (site.check on a target pair / an ext4 target, wall time);
- detection rates: seeded trials per copy method (see flowcopy.site.apps.trials).
"""

from __future__ import annotations

import argparse
import statistics
import time

import trio
from trio.testing import MockClock

from flowcopy.site.apps.trials import run_trials, trial_lab


async def sqlite_rate(journal: str, latency: float, writes: int) -> tuple[float, float, int]:
    """(transactions per site second, per wall second, transactions) over `writes` guest writes."""
    site = trial_lab("sqlite", seed=1, journal=journal, latency=latency, interval=1e-6)
    bank = site.workloads["bank"]
    async with site.running(["bank"]):
        await bank.progress.wait(20)  # booted, database open
        n0, t0, w0 = bank.committed, site.clock(), time.perf_counter()
        await bank.progress.wait(bank.progress.written + writes)
        n1, t1, w1 = bank.committed, site.clock(), time.perf_counter()
    return (n1 - n0) / max(t1 - t0, 1e-9), (n1 - n0) / (w1 - w0), n1 - n0


async def ext4_rate(journal: str, ops: int) -> tuple[float, float, float, int]:
    """(operations per site second, per wall second, guest writes per operation, operations):
    back-to-back journaled operations (interval 1 µs, 1 ms per write), debugfs included in wall time."""
    site = trial_lab("ext4", seed=1, journal=journal, interval=1e-6)
    srv = site.workloads["srv"]
    async with site.running(["srv"]):
        await srv.progress.wait(1)  # formatted, first operation under way
        n0, t0, w0, k0 = srv.ops, site.clock(), time.perf_counter(), srv.progress.written
        while srv.ops < n0 + ops:  # no timer of ours: the site clock moves only with the guest's writes
            await srv.progress.wait(srv.progress.written + 1)
        n1, t1, w1, k1 = srv.ops, site.clock(), time.perf_counter(), srv.progress.written
    return (n1 - n0) / max(t1 - t0, 1e-9), (n1 - n0) / (w1 - w0), (k1 - k0) / (n1 - n0), n1 - n0


async def main(trials: int, writes: int, apps: list[str]) -> None:
    for journal in ("external", "internal") if "ext4" in apps else ():
        site_rate, wall_rate, per_op, n = await ext4_rate(journal, 200)
        print(f"ext4 {journal:8s} journal: {site_rate:6.1f} operations per site second at 1 ms/write "
              f"({per_op:.1f} writes each), {wall_rate:.1f} per wall second (mke2fs/debugfs/diff), {n} operations")
    for journal in ("rollback", "wal") if "sqlite" in apps else ():
        site_rate, with_latency_wall, n = await sqlite_rate(journal, 0.001, writes)
        _, wall_rate, m = await sqlite_rate(journal, 0.0, writes)
        print(f"sqlite {journal:8s}: {site_rate:6.1f} transactions per site second at 1 ms/write "
              f"({with_latency_wall:.0f}/s of wall time on the MockClock, {n} transactions); "
              f"{wall_rate:.0f} transactions per wall second with no write latency ({m})")
    for app, journal, methods in (("sqlite", None, ("freeze", "quiesce", "none")),
                                  ("ext4", "external", ("quiesce", "freeze", "none")), ("ext4", "internal", ("freeze", "none"))):
        if app not in apps or trials <= 0:
            continue
        for method in methods:
            t = time.perf_counter()
            results = await run_trials(app, method, range(trials), journal=journal, concurrency=4 if app == "ext4" else 1)
            bad = [r for r in results if not r.report.consistent]
            checks = [r.check_seconds for r in results]
            by_journal = ""
            if app == "sqlite":
                by_journal = " (" + ", ".join(
                    f"{j} {sum(1 for r in bad if r.journal == j)}/{sum(1 for r in results if r.journal == j)}"
                    for j in ("rollback", "wal")) + ")"
            print(f"{app:6s} {journal or '':8s} {method:8s}: damaged {len(bad):3d}/{len(results)}{by_journal}; check "
                  f"median {statistics.median(checks):.3f} s, max {max(checks):.3f} s; {time.perf_counter() - t:.0f} s wall")
            if bad:
                print(f"    e.g. seed {bad[0].seed}: {bad[0].report.problems[0][:160]}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--writes", type=int, default=5000, help="guest writes per throughput measurement")
    parser.add_argument("--apps", default="sqlite,ext4")
    args = parser.parse_args()
    trio.run(main, args.trials, args.writes, args.apps.split(","), clock=MockClock(autojump_threshold=0))
