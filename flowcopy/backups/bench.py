"""Backup figures (a benchmark, not a test): `python -m flowcopy.backups.bench`.

- catalog: `flowcopy backups` over a journal of N backups (the flat catalog's one read +
  derivation + the 80-column listing), in process and as the real command in a
  subprocess (best of 3: the machine is shared); a journal built by an older flowcopy is
  upgraded (schema v6 backfill) on first use, and that time is reported too;
- restore of a 1 TiB LUN from a live target (FlashCopy back) and from an exported sparse
  image (write-back), each as a full restore run through the engine on trio's MockClock:
  the site time is the modelled array's (power off/on, background copy at the lab's
  rate), the wall time is what this process spent.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from flowcopy.machine import FORWARD_PATH, TRANSITIONS

_FORWARD = {(s, t.dest): t.trigger for t in TRANSITIONS for s in t.source}


async def build_journal(store: Path, backups: int, per_run: int = 100) -> None:
    """A journal of `backups` succeeded backup units (one disk each, copy mode, a 12-slot
    rotation per VM: most are gone by slot reuse, as in a year of hourly runs)."""
    from flowcopy.journal import Journal, Move, RunRow, UnitRow

    journal = Journal.open(store)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(journal.run_writer)
            runs = -(-backups // per_run)
            made = 0
            for r in range(runs):
                run_id = f"hourly-{r + 1:06d}-bench"
                rows = []
                for i in range(min(per_run, backups - made)):
                    vm = f"vm{i:05d}"
                    pair = {"vm": vm, "disk": "Disk1", "source": f"{i:03X}10698", "target": f"{(r % 12) * per_run + i:03X}11698",
                            "source_lss": "10", "target_lss": "11", "capacity": 1 << 30}
                    spec = {"unit_id": f"{run_id}/{i:05d}", "kind": "backup", "vms": [vm], "mode": "copy",
                            "copy_action": "wait", "withdraw": "always", "quiesce": "filesystem", "disks": [],
                            "timeouts": {"prepare": 300.0, "freeze": 120.0, "copy": 86400.0}}
                    data = {"spec": spec, "tag": f"fc:{run_id}:{i}", "run_number": r + 1, "freeze_attempts": 1,
                            "pairs": [pair], "verified": True, "check": {"kind": "filesystem", "problems": []},
                            "established_at": float(r * 3600), "established_wall": 1.7e9 + r * 3600 + 1, "digests": {pair["target"]: "c1:" + "0" * 64}}
                    rows.append(UnitRow(unit_id=f"{run_id}/{i:05d}", run_id=run_id, state="pending", data=data))
                await journal.begin_run(RunRow(run_id=run_id, workflow="hourly", definition={"name": "hourly"},
                                               number=r + 1, created=1.7e9 + r * 3600), rows)
                moves = []
                for row in rows:
                    for a, b in zip(FORWARD_PATH, FORWARD_PATH[1:]):
                        moves.append(Move(row.unit_id, a, b, _FORWARD[(a, b)]))
                await journal.record_many(moves)
                made += len(rows)
            nursery.cancel_scope.cancel()
    finally:
        journal.close()


def catalog_figures(folder: Path, backups: int) -> dict[str, Any]:
    from flowcopy.backups import catalog
    from flowcopy.backups.commands import table_lines
    from flowcopy.journal import Journal

    store = folder / f"catalog-{backups}"
    t0 = time.perf_counter()
    if not (store / "journal.sqlite").exists():
        trio.run(build_journal, store, backups)
    else:
        Journal.open(store).close()  # reuse a journal built before (migrated to this schema)
    built = time.perf_counter() - t0
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        journal = Journal.open(store, lock=False)
        try:
            listed, _ = trio.run(catalog.listing, journal, None)  # what `flowcopy backups` reads
            lines = table_lines(listed)
        finally:
            journal.close()
        best = min(best, time.perf_counter() - t0)
    ok = sum(1 for b in listed if b.status == "ok")
    command = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "flowcopy", "backups", "--store", str(store)],
                              capture_output=True, text=True, check=False)
        command = min(command, time.perf_counter() - t0)
    return {"backups": len(listed), "restorable": ok, "lines": len(lines), "journal_build_or_upgrade_s": round(built, 1),
            "catalog_in_process_s": round(best, 3), "flowcopy_backups_command_s": round(command, 3),
            "command_exit": proc.returncode}


TIB = 1 << 40


async def _restore_1tib(folder: Path, data_mib: int, fill_mib: int = 0) -> dict[str, Any]:
    from flowcopy import definitions, planning
    from flowcopy.backups import catalog, images
    from flowcopy.backups.commands import start_restore
    from flowcopy.backups.restore import make_plan
    from flowcopy.runner import open_engine
    from flowcopy.site.inventory import build_site, generate_lab_spec

    spec = generate_lab_spec(1, 2, disks_per_vm=1, targets_per_disk=2, capacity=TIB)
    spec["workloads"] = [{"name": "fs", "kind": "filesystem", "vm": "vm00000", "disk": "Disk1", "seed": 1,
                          "interval": 0.5, "autostart": True}]
    site = build_site(spec)  # the default latencies: power off / on take a second each
    vm = "vm00000"
    source = next(d["rdm"] for d in spec["vms"][0]["disks"] if d["name"] == "Disk1")
    t0_serial, t1_serial = spec["pools"][f"targets:{vm}"]
    out: dict[str, Any] = {"capacity": TIB}
    store = Path(tempfile.mkdtemp(prefix="restore-1tib-", dir=folder))  # a fresh journal: the site is new too
    text = f"""
name: big
units:
  - vm: {vm}
    quiesce: none
    disks: [{{disk: Disk1, target: "{t0_serial}"}}]
    copy: {{action: wait}}
"""
    async with site.running():
        await trio.sleep(data_mib)  # the guest's filesystem workload writes files
        chunk = bytes(range(256)) * 4096  # 1 MiB, spread over the LUN: data the restores carry
        for i in range(fill_mib):
            await site.write(source, (i * 4099 + 7) % (TIB // (1 << 20) - 2) * (1 << 20) + (1 << 30), chunk)
        out["data_bytes"] = sum(e.length for e in await site.extents(source))
        async with open_engine(store, site) as engine:
            engine.poll = 30.0  # copy progress every 30 s of site time (a 1 TiB copy takes hours)
            wf = definitions.load_text(text, "big.yaml")
            run_id = await engine.begin_run(wf.name, planning.definition_data(wf), await planning.plan_units(wf, site))
            summary = await engine.drive_run(run_id)
            assert summary.state == "succeeded", summary.failures
            (backup,) = await catalog.load(engine.journal, site)
            await trio.sleep(30)  # the source moves on
            await site.stop_workload("fs")
            plan = await make_plan(site, backup, [backup])
            s0, w0 = await site.now(), time.perf_counter()
            summary, unit = await start_restore(engine, plan)
            assert summary.state == "succeeded" and summary.verified, summary.failures
            out["live_target"] = {
                "method": plan.steps[0].method,
                "site_s_until_vm_runs": round(unit.data["started_at"] - s0, 3),
                "site_s_until_copied_back": round(unit.data["copied_at"] - s0, 1),
                "wall_s": round(time.perf_counter() - w0, 3),
            }
            # an exported sparse image of the backup, restored onto the second target LUN
            image = folder / "restore-1tib.img"
            with open(image, "wb") as f:
                f.truncate(TIB)
                for e in await site.extents(t0_serial):
                    f.seek(e.offset)
                    f.write(await site.read(t0_serial, e.offset, e.length))
            digest = images.file_digest(image, TIB)
            assert digest == backup.disks[0].digest
            from flowcopy.backups.restore import Plan, Step

            step = Step(vm=vm, disk="Disk1", source=source, image=None, file=str(image), digest=digest, dest=t1_serial,
                        dest_lss=(await site.get_volume(t1_serial)).lss, capacity=TIB, method="write")
            plan = Plan(backup=backup.id, workflow="big", steps=(step,), stop_vms=(), breaks=(), overwrites=(), in_use=())
            s0, w0 = await site.now(), time.perf_counter()
            summary, unit = await start_restore(engine, plan)
            assert summary.state == "succeeded" and summary.verified, summary.failures
            # (site time is not given here: on the MockClock it runs on while the digest
            # threads read the file, so only wall time means something)
            out["exported_image"] = {
                "method": "write", "file_bytes_on_disk": os.stat(image).st_blocks * 512,
                "wall_s": round(time.perf_counter() - w0, 3),
            }
            image.unlink()
    return out


def restore_figures(folder: Path, data_mib: int, fill_mib: int = 0) -> dict[str, Any]:
    import trio.testing  # imports pytest: only for this figure

    return trio.run(_restore_1tib, folder, data_mib, fill_mib, clock=trio.testing.MockClock(autojump_threshold=0))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backups", type=int, default=100_000)
    parser.add_argument("--data-mib", type=int, default=600, help="site seconds the filesystem workload writes before the backup")
    parser.add_argument("--fill-mib", type=int, default=0, help="MiB of extra data written across the source before the backup")
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--skip", choices=["catalog", "restore"], action="append", default=[])
    args = parser.parse_args(argv)
    folder = args.dir or Path(tempfile.mkdtemp(prefix="flowcopy-backups-bench-"))
    results: dict[str, Any] = {}
    if "catalog" not in args.skip:
        results["catalog"] = catalog_figures(folder, args.backups)
    if "restore" not in args.skip:
        results["restore_1tib"] = restore_figures(folder, args.data_mib, args.fill_mib)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
