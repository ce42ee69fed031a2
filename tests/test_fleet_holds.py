"""100 VMs over 2 LSSs backed up with consistency groups while 40 unrelated VMs on the
same LSSs keep writing: no unrelated write is ever held, and the longest hold of any
source volume (from the array's own records) is reported and far below the ELB timeout.
On MockClock: a held write would take site time; an unheld one takes none."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio

from flowcopy import chaos
from flowcopy.engine import Limits
from flowcopy.journal import Journal
from flowcopy.site import api
from flowcopy.site.inventory import generate_lab
from flowcopy.site.local import Latency
from tests.test_engine import engine_on, run_workflow

BACKED_UP, UNRELATED = 100, 40
WORKFLOW = """
name: fleet
mode: copy
quiesce: filesystem
units:
  - selector: {backup: nightly}
    disks:
      - {disk: Disk1, target: {pool: targets}}
      - {disk: Disk2, target: {pool: targets}}
    copy: {action: wait}
"""


async def test_fleet_backup_never_holds_an_unrelated_write(tmp_path: Path, autojump_clock: Any) -> None:
    # every copy-services command takes 20 ms and an LSS takes at most 8 at once (LssBusy
    # beyond): the engine's per-LSS limiter (8) meets the limit, and holds take real time
    site = generate_lab(BACKED_UP + UNRELATED, 2, workloads=20, latency=Latency(copy_services=0.02),
                        lss_command_limit=Limits().per_lss,
                        labels=lambda i: {"backup": "nightly" if i < BACKED_UP else "never"})
    unrelated = [f"vm{i:05d}" for i in range(BACKED_UP, BACKED_UP + UNRELATED)]
    serials = [(await site.lun_of(vm, disk)).serial for vm in unrelated for disk in ("Disk1", "Disk2")]
    assert {(await site.get_volume(s)).lss for s in serials} == {"10"}  # the backed-up sources' LSS too
    waits: list[float] = []
    writes = 0
    done = trio.Event()

    async def keep_writing(serial: str, n: int) -> None:
        nonlocal writes
        while not done.is_set():
            started = trio.current_time()
            await site.write(serial, (n % 64) * api.TRACK_SIZE, b"unrelated application write")
            waits.append(trio.current_time() - started)
            writes += 1
            n += 1
            await trio.sleep(0.01)

    async with site.running():
        async with trio.open_nursery() as writers:
            for i, serial in enumerate(serials):
                writers.start_soon(keep_writing, serial, i)
            async with engine_on(tmp_path, site) as engine:
                summary = await run_workflow(engine, site, WORKFLOW)
            done.set()
    assert summary.units == {"succeeded": BACKED_UP} and summary.verified
    assert writes > 10 * len(serials)
    assert max(waits) == 0.0, f"an unrelated write waited {max(waits):.3f} s behind a consistency group"

    holds = await site.hold_history()
    journal = Journal.open(tmp_path, lock=False)
    try:
        sources = {p["source"] for r in journal.runs() for u in journal.units(r.run_id) for p in u.data["pairs"]}
        verdict = await chaos.check_invariants(journal, site, hold_bound=Limits().hold_bound, clean=True)
    finally:
        journal.close()
    assert len(holds) == 2 * BACKED_UP and {h.serial for h in holds} == sources
    assert not set(serials) & {h.serial for h in holds}
    longest = max(h.released_at - h.since for h in holds)
    assert verdict.problems == () and verdict.longest_hold == longest and verdict.lost_freezes == 0
    assert longest < Limits().hold_bound < api.DEFAULT_ELB_TIMEOUT / 10
    assert 0.04 <= longest  # two establishes of 20 ms at least, then the unfreeze
    assert 0 < summary.longest_hold < Limits().hold_bound  # the engine reports it too
    print(f"fleet: {BACKED_UP} VMs backed up, {writes} unrelated writes never held; longest source hold "
          f"{longest:.3f} s (site), engine's longest LSS hold {summary.longest_hold:.3f} s, bound "
          f"{Limits().hold_bound:g} s, ELB {api.DEFAULT_ELB_TIMEOUT:g} s")


SLOW_GROUP = """
name: slow
mode: copy
quiesce: filesystem
units:
  - vm: vm00000
    disks:
      - {disk: Disk1, target: {pool: targets}}
      - {disk: Disk2, target: {pool: targets}}
      - {disk: Disk3, target: {pool: targets}}
      - {disk: Disk4, target: {pool: targets}}
    copy: {action: wait}
"""


async def test_a_group_slower_than_the_bound_lets_its_lss_go_and_fails_with_the_reason(
    tmp_path: Path, autojump_clock: Any
) -> None:
    """Four establishes of 0.5 s each cannot fit the third of a 3 s bound: every attempt
    lets the LSS go before the bound, and the unit fails saying why (no ELB expiry)."""
    site = generate_lab(1, 1, disks_per_vm=4, latency=Latency(copy_services=0.5))
    async with site.running():
        async with engine_on(tmp_path, site, Limits(hold_bound=3.0)) as engine:
            summary = await run_workflow(engine, site, SLOW_GROUP)
    assert summary.units == {"failed": 1}
    (reason,) = summary.failures.values()
    assert "freeze windows over the bound" in reason and "consistency group over its freeze-window bound" in reason
    holds = await site.hold_history()
    assert holds and not any(h.by_timeout for h in holds)
    assert max(h.released_at - h.since for h in holds) <= 3.0
    assert await site.frozen_lsses() == [] and await site.query() == []
    assert not (await site.freeze_status("vm00000")).frozen


async def test_a_group_within_the_bound_succeeds(tmp_path: Path, autojump_clock: Any) -> None:
    site = generate_lab(1, 1, disks_per_vm=4, latency=Latency(copy_services=0.1))
    async with site.running():
        async with engine_on(tmp_path, site, Limits(hold_bound=3.0)) as engine:
            summary = await run_workflow(engine, site, SLOW_GROUP)
    assert summary.units == {"succeeded": 1}
    assert 0.3 <= max(h.released_at - h.since for h in await site.hold_history()) <= 1.0
