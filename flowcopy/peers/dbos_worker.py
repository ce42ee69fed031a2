"""The six-stage backup workflow on DBOS Transact, run by `flowcopy bench --peer dbos`.

Run by the peer's own interpreter (a venv that has `dbos`), never imported by flowcopy:
it imports nothing of flowcopy, so the two programs share only the disk they measure.

Each workflow is one VM walking prepare -> freeze -> establish -> release -> copy ->
withdraw; each stage is a `@DBOS.step`, so DBOS records its outcome durably before the
next starts, which is what flowcopy's journal does per stage (flowcopy writes the intent
as well, so it makes two durable moves per stage to DBOS's one). The steps do no work,
as flowcopy's benchmark site has zero latency: what is measured is the durable-workflow
machinery. DBOS gets its best: asynchronous workflows, all started at once on one event
loop (concurrent), its SQLite system database in WAL mode, synchronous=FULL as SQLite's
default and as flowcopy's journal, so both make every step equally durable.

Prints one JSON object: workflows, steps, seconds, steps_per_s, pragmas.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import time
from pathlib import Path

from dbos import DBOS, DBOSConfig

STAGES = ("prepare", "freeze", "establish", "release", "copy", "withdraw")


@DBOS.step()
async def prepare(vm: int) -> dict:
    return {"vm": vm, "pairs": [[f"s{vm}a", f"t{vm}a"], [f"s{vm}b", f"t{vm}b"]]}


@DBOS.step()
async def freeze(vm: int) -> int:
    return vm


@DBOS.step()
async def establish(vm: int) -> float:
    return time.time()


@DBOS.step()
async def release(vm: int) -> bool:
    return True


@DBOS.step()
async def copy(vm: int) -> dict:
    return {"verified": True}


@DBOS.step()
async def withdraw(vm: int) -> bool:
    return True


@DBOS.workflow()
async def backup(vm: int) -> bool:
    await prepare(vm)
    await freeze(vm)
    await establish(vm)
    await release(vm)
    await copy(vm)
    return await withdraw(vm)


async def drive(workflows: int) -> float:
    start = time.perf_counter()
    handles = [await DBOS.start_workflow_async(backup, i) for i in range(workflows)]
    results = await asyncio.gather(*(h.get_result() for h in handles))
    elapsed = time.perf_counter() - start
    if not all(results):
        raise SystemExit("dbos: a workflow did not finish")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workflows", type=int, default=1000)
    parser.add_argument("--db", type=Path, required=True)
    args = parser.parse_args()
    args.db.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(args.db) as conn:  # WAL is a property of the file: DBOS keeps it
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    config: DBOSConfig = {
        "name": "flowcopy-peer-bench",
        "system_database_url": f"sqlite:///{args.db}",
        "run_admin_server": False,
        "log_level": "WARNING",
    }
    DBOS(config=config)
    DBOS.launch()
    try:
        with sqlite3.connect(args.db) as conn:
            synchronous = conn.execute("PRAGMA synchronous").fetchone()[0]
        elapsed = asyncio.run(drive(args.workflows))
    finally:
        DBOS.destroy()
    steps = args.workflows * len(STAGES)
    print(json.dumps({
        "workflows": args.workflows,
        "steps": steps,
        "seconds": round(elapsed, 3),
        "steps_per_s": round(steps / elapsed, 1),
        "pragmas": {"journal_mode": mode, "synchronous": synchronous},
    }))


if __name__ == "__main__":
    main()
