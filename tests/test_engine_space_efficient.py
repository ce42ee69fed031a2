"""The engine meets a failed relationship: a nocopy backup onto space-efficient targets in a
pool too small, while the source keeps being written, fails the unit with the array's
reason, compensates (withdraw with -tgtreleasespace) and leaves nothing behind."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio

from flowcopy.site import api
from flowcopy.site.inventory import build_site, generate_lab_spec
from tests.test_engine import assert_invariants, engine_on, run_workflow

TS = api.TRACK_SIZE


async def test_backup_onto_a_full_space_efficient_pool_fails_with_the_reason(tmp_path: Path, autojump_clock: Any) -> None:
    spec = generate_lab_spec(2, 1)
    array = spec["arrays"][0]
    array["space_pools"] = {"se-small": 2 * TS}
    capacity = array["volumes"][0]["capacity"]
    se_targets = ["90010698", "90110698"]
    filler = "90210698"
    for serial in (*se_targets, filler):
        array["volumes"].append({"serial": serial, "capacity": capacity, "label": f"SE_{serial}", "space_pool": "se-small"})
    site = build_site(spec)
    source = (await site.get_vm("vm00000")).disks[0].serial
    await site.write(filler, 0, b"f")  # another space-efficient volume holds one of the two tracks
    text = f"""
name: se-backup
mode: nocopy
quiesce: filesystem
units:
  - vm: vm00000
    withdraw: keep
    disks: [{{disk: Disk1, target: "{se_targets[0]}"}}]
"""
    stop = trio.Event()

    async def keep_writing() -> None:  # the application goes on writing new tracks
        track = 0
        while not stop.is_set():
            await site.write(source, track * TS, b"w" * 100)
            track = (track + 1) % 64
            await trio.sleep(0.005)

    async with site.running(), trio.open_nursery() as nursery:
        nursery.start_soon(keep_writing)
        async with engine_on(tmp_path, site) as engine:
            summary = await run_workflow(engine, site, text)
        stop.set()
    assert summary.units == {"failed": 1}, summary.failures
    (reason,) = summary.failures.values()
    assert "vm00000 Disk1: space-efficient pool se-small full" in reason, reason
    assert f"relationship {source} -> {se_targets[0]} failed" in reason
    assert "the image is unusable; enlarge the pool or use a standard target" in reason
    assert await site.query() == []  # compensated: withdrawn
    (pool,) = await site.list_space_pools()
    assert pool.used == TS  # -tgtreleasespace gave the target's track back; the filler keeps its own
    assert await site.read(source, 0, 1) == b"w"  # the source was never blocked
    await assert_invariants(tmp_path, site)
