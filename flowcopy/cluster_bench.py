"""`flowcopy bench --pg`: figures for several engines on one PostgreSQL journal.

Starts its own throwaway PostgreSQL server (`flowcopy.pgserver`), a fresh database per
measurement:

* durable moves/s of the PostgreSQL journal, group commit vs one commit per move, same
  server, same run (`bench.journal_rate`);
* VMs/s of one run with 1, 2, 3 `flowcopy serve` engine processes against one served
  site, and where the CPU went (site process, engines, PostgreSQL) from /proc;
* take-over time after a SIGKILL, as a multiple of the lease period.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

TICK = os.sysconf("SC_CLK_TCK")


def _cpu(pid: int) -> float:
    """User+system CPU seconds of `pid` and its reaped children (/proc/PID/stat)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(f) for f in fields[11:15]) / TICK


def _children(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    kids.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return kids


def _pg_cpu(data: Path) -> float:
    try:
        postmaster = int((data / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0
    return _cpu(postmaster) + sum(_cpu(kid) for kid in _children(postmaster))


async def _scaling_run(server: Any, directory: Path, vms: int, engines: int, lease: float) -> dict[str, Any]:
    from flowcopy.cluster_chaos import run_cluster_chaos

    url = server.create_database(f"scale_{engines}_{os.getpid()}_{int(time.time() * 1000) % 100000}")
    pg0 = _pg_cpu(server.data)
    report = await run_cluster_chaos(directory, url, vms=vms, engines=engines, lease=lease, kill=False, stop=False)
    pg = _pg_cpu(server.data) - pg0
    out = {
        "engines": engines, "vms": vms, "ok": report.ok, "run_s": round(report.run_seconds, 2),
        "vms_per_s": round(vms / report.run_seconds, 2) if report.run_seconds else None,
        "cpu_s": {"site": round(report.cpu.get("site", 0.0), 1), "engines": round(report.cpu.get("engines", 0.0), 1),
                  "postgresql": round(pg, 1)},
        "shares": report.shares,
    }
    return out


def run_pg_bench(directory: Path | None = None, *, vms: int = 120, moves_units: int = 1000, lease: float = 5.0,
                 engines: tuple[int, ...] = (1, 2, 3)) -> dict[str, Any]:
    from flowcopy import bench
    from flowcopy.cluster_chaos import run_cluster_chaos
    from flowcopy.pgserver import PgServer

    directory = directory or Path(tempfile.mkdtemp(prefix="flowcopy-pgbench-"))
    results: dict[str, Any] = {"cores": os.cpu_count(), "load_avg_at_start": os.getloadavg()[0]}
    with PgServer() as server:
        results["postgresql"] = server.bin.parent.name
        rate = bench.journal_rate(server.create_database("journal_rate"), units=moves_units, moves_per_unit=10)  # type: ignore[arg-type]
        rate.pop("raw_fsync_per_s", None)
        rate["store"] = "postgresql (fresh database)"
        results["journal"] = rate
        results["scaling"] = [trio.run(_scaling_run, server, directory / f"scale-{n}", vms, n, lease) for n in engines]
        killed = trio.run(lambda: run_cluster_chaos(directory / "takeover", server.create_database("takeover"),
                                                    vms=max(30, vms // 4), engines=2, lease=lease, stop=False))
        results["takeover"] = {
            "lease_s": lease, "after_sigkill_s": None if killed.takeover_s is None else round(killed.takeover_s, 2),
            "lease_periods": None if killed.takeover_s is None else round(killed.takeover_s / lease, 2),
            "ok": killed.ok,
        }
    results["load_avg_at_end"] = os.getloadavg()[0]
    return results
