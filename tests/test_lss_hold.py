"""A fleet backup against a served site at speed 1 (real process, real clock) must never
hold an LSS's writes anywhere near its ELB timeout, and must lose no guest freeze.

The failure it guards against (issue 9.1) showed only with real processes: a unit
counted as a holder of its LSSs before its guests had quiesced, a guest's quiesce waited
for a write the array held because another group had frozen the whole LSS, and the LSS
stayed in extended long busy until its 120 s ELB timer let it go — every VM on it, backed
up or not, had its writes held for two minutes. The fix is at two depths: the array holds
only the frozen *source volumes* (so a guest never waits behind another group's freeze),
and the engine starts an array freeze only after its guests are quiesced and never lets
an LSS stay held past its freeze-window bound (`Limits.hold_bound`, 10 s).

Bounds used below are generous for a loaded 2-core machine; the run itself takes a few
tens of seconds, the old behaviour breaks the first assertion after ~25 s.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from flowcopy import chaos
from flowcopy.holds import DEFAULT_BOUND
from flowcopy.journal import Journal
from flowcopy.site.client import connect_site
from flowcopy.site.inventory import generate_lab_spec

pytestmark = pytest.mark.process

FLOWCOPY = [sys.executable, "-m", "flowcopy"]
VMS = 60
LSSES = 2  # every VM's two disks on LSS 10, every target on LSS 11: maximal sharing
HELD_TOO_LONG = 2.5 * DEFAULT_BOUND  # site seconds; the ELB timeout is 120


def test_fleet_backup_on_a_served_site_holds_no_lss_near_its_elb_timeout(tmp_path: Path) -> None:
    lab = generate_lab_spec(VMS, LSSES, workloads=VMS // 2, capacity=4 << 20)  # half the guests write
    site = chaos.ServedSite(tmp_path, lab, speed=1.0)
    try:
        workflow = tmp_path / "fleet.yaml"
        workflow.write_text(chaos.CHAOS_WORKFLOW)
        store = tmp_path / "store"
        argv = [*FLOWCOPY, "run", str(workflow), "--site", site.url, "--token-file", str(site.token),
                "--store", str(store), "--json"]
        longest_seen, (code, out, err) = trio.run(_run_watching_the_lsses, argv, site)
        assert longest_seen < HELD_TOO_LONG, (
            f"an LSS stayed frozen {longest_seen:.1f} s while the run went on (bound {DEFAULT_BOUND:g} s, ELB 120 s)")
        assert code == 0, err[-3000:]
        holds = trio.run(_ended_holds, site)
    finally:
        site.close()

    journal = Journal.open(store, lock=False)
    try:
        (run,) = journal.runs()
        units = journal.units(run.run_id)
        lost = {u.unit_id: u.data.get("last_freeze_problem") for u in units if int(u.data.get("freezes_lost", 0))}
        states = {u.state for u in units}
        sources = {p["source"] for u in units for p in u.data.get("pairs", [])}
    finally:
        journal.close()
    assert states == {"succeeded"} and len(units) == VMS
    assert lost == {}, f"guest freezes lost with no kill or fault to explain them: {lost}"
    assert holds, "the site recorded no source hold: the consistency groups never froze"
    assert {h.serial for h in holds} <= sources, "a volume outside every group's sources was held"
    assert not [h for h in holds if h.by_timeout], "a hold ended by the ELB timeout"
    longest = max(h.released_at - h.since for h in holds)
    assert longest < HELD_TOO_LONG, f"a source volume was held {longest:.1f} s"


async def _ended_holds(site: chaos.ServedSite) -> list:
    async with connect_site(site.url, site.token) as client:
        return [h for h in await client.hold_history() if h.released_at is not None]


async def _run_watching_the_lsses(argv: list[str], site: chaos.ServedSite) -> tuple[float, tuple[int, str, str]]:
    """Run the engine; meanwhile poll the site: how long has any LSS been frozen? Stop the
    engine as soon as one has been frozen too long (the old behaviour), so the test fails
    in seconds instead of waiting out the ELB timeout."""
    longest = 0.0
    async with connect_site(site.url, site.token) as client:
        proc = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = bytearray(), bytearray()

        async def drain(stream: trio.abc.ReceiveStream, into: bytearray) -> None:
            async for chunk in stream:
                into += chunk

        async with trio.open_nursery() as nursery:
            assert proc.stdout is not None and proc.stderr is not None
            nursery.start_soon(drain, proc.stdout, out)
            nursery.start_soon(drain, proc.stderr, err)
            started = time.monotonic()
            while proc.poll() is None:
                now = await client.now()
                for frozen in await client.frozen_lsses():
                    longest = max(longest, now - frozen.since)
                if longest >= HELD_TOO_LONG or time.monotonic() - started > 240:
                    proc.kill()
                    break
                await trio.sleep(0.25)
            await proc.wait()
    return longest, (proc.returncode, out.decode(), err.decode())
