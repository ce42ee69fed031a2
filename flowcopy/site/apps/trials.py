"""Seeded trials: copy a real application's LUNs while it writes, let its own tools judge the copy.

One trial builds a small lab (one guest, its application's LUNs and same-size targets in
the same LSSs), runs the application, waits until it has sent a seeded number of writes,
then a seeded fraction of one write's latency, and copies its LUNs one of three ways:

- `freeze`: every pair established with a consistency-group freeze, one after another
  with seeded gaps (writes to a frozen LSS wait), then the LSSs released;
- `quiesce`: the guest quiesced (application level for SQLite, filesystem for ext4:
  in-flight work finishes, new work waits), pairs established one at a time, thaw;
- `none`: pairs established one at a time with seeded gaps, no freeze, no quiesce.

Then the application keeps running a little (the sources change, the targets must not),
and the site's check judges the targets (SQLite / e2fsck, and the point in time recorded
at establish). Used by the tests and by `tests/measure_apps.py`.
"""

from __future__ import annotations

import random
import time
from typing import Any

import attrs
import trio

from flowcopy.site.api import CheckReport, CopyMode, FlashOptions, QuiesceLevel

METHODS = ("freeze", "quiesce", "none")
GAP = 0.5  # site seconds between two establishes, at most

_LAB = """
lab: real-apps-trial
arrays:
  - name: ess
    box: "698"
    lsses: ["13", "14"]
    volumes:
      - {{serial: "10013698", capacity: {size}}}
      - {{serial: "10113698", capacity: {size}}}
      - {{serial: "10214698", capacity: {size}}}
      - {{serial: "10314698", capacity: {size}}}
hosts:
  - {{name: esx1}}
vms:
  - name: app1
    host: esx1
    disks:
      - {{name: Disk1, rdm: "10013698", guest_path: "S:"}}
      - {{name: Disk2, rdm: "10214698", guest_path: "T:"}}
  - name: spare
    host: esx1
    disks:
      - {{name: Disk1, rdm: "10113698"}}
      - {{name: Disk2, rdm: "10314698"}}
workloads:
  - {workload}
"""

PAIRS = {"sqlite": [("10013698", "10113698"), ("10214698", "10314698")],
         "ext4": [("10013698", "10113698"), ("10214698", "10314698")]}  # data LUN, journal LUN


@attrs.frozen
class TrialResult:
    app: str
    method: str
    seed: int
    journal: str
    report: CheckReport
    transactions: int  # operations the application acknowledged during the trial
    site_seconds: float  # site time the application ran
    check_seconds: float  # wall time of the check


_parsed: dict[tuple[str, str, float, float], Any] = {}


def trial_lab(app: str, seed: int, journal: str = "rollback", latency: float = 0.001, interval: float = 0.02) -> Any:
    from flowcopy.site.inventory import build_site, read_lab_text

    key = (app, journal, latency, interval)
    if key not in _parsed:  # parse once per shape (YAML costs more than a trial's SQLite work)
        if app == "sqlite":
            workload = (f"{{name: bank, kind: sqlite, vm: app1, db: Disk1, journal: Disk2, mode: {journal}, seed: 0, "
                        f"interval: {interval}, write_latency: {latency}}}")
            size = "16MiB"
        elif app == "ext4":  # journal: "external" (on Disk2) or "internal" (inode 8 on Disk1)
            external = "journal: Disk2, " if journal != "internal" else ""
            workload = (f"{{name: srv, kind: ext4, vm: app1, disk: Disk1, {external}seed: 0, interval: {interval}, "
                        f"write_latency: {latency}}}")
            size = "16MiB"
        else:
            raise ValueError(f"app must be sqlite or ext4, not {app!r}")
        _parsed[key] = read_lab_text(_LAB.format(size=size, workload=workload), "<trial lab>")
    doc = _parsed[key]
    doc["workloads"][0]["seed"] = seed
    return build_site(doc, source="<trial lab>")


async def run_trial(app: str, method: str, seed: int, journal: str = "rollback", latency: float = 0.001) -> TrialResult:
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, not {method!r}")
    rng = random.Random(f"trial:{app}:{method}:{journal}:{seed}")
    site = trial_lab(app, seed, journal, latency, interval=0.02 if app == "sqlite" else 0.05)
    (name,) = site.workloads
    load = site.workloads[name]
    pairs = list(PAIRS[app]) if (app, journal) != ("ext4", "internal") else PAIRS[app][:1]
    if rng.random() < 0.5:
        pairs.reverse()
    lsses = sorted({(await site.get_volume(s)).lss for s, _ in pairs})
    start = site.clock()
    async with site.running([name]):
        # SQLite writes ~6-10 times per transaction, an ext4 operation ~6 times
        await load.progress.wait(rng.randrange(30, 200) if app == "sqlite" else rng.randrange(10, 60))
        await trio.sleep(rng.uniform(0, latency))
        if method == "quiesce":
            level = QuiesceLevel.APPLICATION if app == "sqlite" else QuiesceLevel.FILESYSTEM
            await site.quiesce("app1", level, 30.0)
        for i, (source, target) in enumerate(pairs):
            if i and method == "none" and app == "ext4":
                # one LUN after the other, as by hand: the gap counted in the guest's writes, since
                # its programs (debugfs) take no site time under a mock clock
                await load.progress.wait(load.progress.written + rng.randrange(0, 40))
                await trio.sleep(rng.uniform(0, latency))
            elif i:
                await trio.sleep(rng.uniform(0, GAP))  # one LUN after the other, as by hand
            await site.establish(source, target, FlashOptions(mode=CopyMode.NOCOPY, freeze=method == "freeze", tag=f"trial-{seed}"))
        if method == "freeze":
            await site.unfreeze(lsses)
        if method == "quiesce":
            await site.thaw("app1")
        await trio.sleep(0.1)  # the application goes on: the sources change, the targets must not
        ran = site.clock() - start
        done = _acknowledged(load)
    t0 = time.perf_counter()
    report = await site.check([t for _, t in pairs])
    check_seconds = time.perf_counter() - t0
    return TrialResult(app=app, method=method, seed=seed, journal=journal, report=report,
                       transactions=done, site_seconds=ran, check_seconds=check_seconds)


def _acknowledged(load: Any) -> int:
    return int(getattr(load, "committed", getattr(load, "ops", 0)))


async def run_trials(app: str, method: str, seeds: range | list[int], *, journal: str | None = None,
                     concurrency: int = 4) -> list[TrialResult]:
    """Several trials at once (each its own lab); SQLite trials alternate rollback/WAL when `journal` is None,
    ext4 trials put the journal on the second LUN unless `journal` is "internal"."""
    results: dict[int, TrialResult] = {}
    limit = trio.CapacityLimiter(concurrency)

    async def one(seed: int) -> None:
        async with limit:
            mode = journal or ("rollback", "wal")[seed % 2]
            results[seed] = await run_trial(app, method, seed, mode if app == "sqlite" else (journal or "external"))

    async with trio.open_nursery() as nursery:
        for seed in seeds:
            nursery.start_soon(one, seed)
    return [results[s] for s in seeds]
