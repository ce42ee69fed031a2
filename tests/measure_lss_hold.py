"""By hand: the issue 9.1 repro. `python tests/measure_lss_hold.py VMS LSSES`: a served site at
speed 1 with a database workload on every VM, the fleet workflow (two disks per VM = one
consistency group each) run by a real `flowcopy run`; polls the site's frozen LSSs during the
run and prints one JSON line (exit code, wall time, longest LSS freeze seen, the site's hold
records, units, lost freezes). Works against older code too (hold records then n/a)."""
import json, subprocess, sys, time, tempfile
from pathlib import Path
import trio
from flowcopy import chaos
from flowcopy.journal import Journal
from flowcopy.site.inventory import generate_lab_spec
from flowcopy.site.client import connect_site

vms, lsses = int(sys.argv[1]), int(sys.argv[2])
d = Path(tempfile.mkdtemp(prefix="repro-"))
site = chaos.ServedSite(d, generate_lab_spec(vms, lsses, workloads=vms, capacity=4 << 20), 1.0)
wf = d / "wf.yaml"; wf.write_text(chaos.CHAOS_WORKFLOW)
store = d / "store"
argv = [sys.executable, "-m", "flowcopy", "run", str(wf), "--site", site.url, "--token-file", str(site.token), "--store", str(store), "--json"]
async def main():
    longest = 0.0
    async with connect_site(site.url, site.token) as c:
        t0 = time.monotonic()
        proc = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        out = bytearray()
        async def drain():
            async for chunk in proc.stdout: out.extend(chunk)
        async with trio.open_nursery() as n:
            n.start_soon(drain)
            while proc.poll() is None:
                now = await c.now()
                for f in await c.frozen_lsses():
                    longest = max(longest, now - f.since)
                await trio.sleep(0.25)
            await proc.wait()
        wall = time.monotonic() - t0
        holds = None
        try:
            h = await c.hold_history()
            holds = (len(h), max(x.released_at - x.since for x in h if x.released_at is not None), sum(x.by_timeout for x in h))
        except Exception as e:
            holds = f"n/a ({type(e).__name__})"
    return longest, wall, proc.returncode, out.decode(), holds
try:
    longest, wall, code, out, holds = trio.run(main)
finally:
    site.close()
summary = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
j = Journal.open(store, lock=False)
lost = sum(int(u.data.get("freezes_lost", 0)) for r in j.runs() for u in j.units(r.run_id))
print(json.dumps({"vms": vms, "lsses": lsses, "exit": code, "wall_s": round(wall, 1), "longest_lss_frozen_polled_s": round(longest, 1),
                  "site_holds(count,longest_s,by_elb)": holds, "units": summary.get("units"), "freezes_lost": lost,
                  "failures": sorted(set(summary.get("failures", {}).values())), "engine_longest_lss_hold_s": summary.get("longest_lss_hold_s")}))
