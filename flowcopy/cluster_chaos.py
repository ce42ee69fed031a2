"""Chaos for several engines on one PostgreSQL journal (`flowcopy chaos --engines N`).

One served site, N `flowcopy serve` engine processes on one journal (a folder holding
only an unscheduled workflow: they fire nothing, they take part in every run), one run
of the fleet workflow submitted to the journal. While it runs, one engine is SIGKILLed
and another SIGSTOPped for longer than the lease period, then SIGCONTed. At the end:
every invariant of DESIGN §4 from the site's own state and the journal, plus the
fencing figures: which engine wrote which unit's events, the woken engine's refused
writes and side effects, and that it wrote nothing of a unit after another engine
took it over.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import attrs
import trio

from flowcopy.chaos import CHAOS_WORKFLOW, ServedSite, Verdict, check_invariants
from flowcopy.journal import Journal


@attrs.frozen
class ClusterReport:
    vms: int
    engines: int
    lease: float
    seconds: float
    run_state: str
    verdict: Verdict
    shares: dict[str, int]
    """Engine (pid) -> units it moved at least once."""
    finished: dict[str, int]
    """Engine (pid) -> units whose final event it wrote."""
    killed: int | None
    stopped: int | None
    stopped_for: float
    taken_over: int
    """Units the stopped engine held when stopped that another engine finished."""
    stopped_on_wake: int
    """Units the woken engine stopped driving on waking, its lease on them lost."""
    stale_writes_refused: int
    side_effects_refused: int
    writes_after_takeover: int
    """Events the stopped engine wrote for a unit after another engine's first event of
    it (must be 0: fencing)."""
    takeover_s: float | None
    """Seconds from the SIGKILL to the first event another engine wrote for a unit the
    killed engine held."""
    problems: tuple[str, ...]
    run_seconds: float = 0.0
    """From submitting the run to its end."""
    cpu: dict[str, float] = attrs.field(factory=dict)
    """CPU seconds by the end of the run: site process, engine processes (alive at the end)."""
    site_fence_only: bool = False
    """The engines did not check their own lease clock before site calls (FLOWCOPY_LEASE_CHECK=site):
    only the site's fence and the journal's stood between the woken engine and the site."""
    fences_refused_by_site: int = 0
    """Calls the site itself refused as stale (its own count, from GET /fences)."""
    fences_admitted_by_site: int = 0
    stopped_refused_by_site: int = 0
    """Of those, the ones the woken engine logged (it stopped driving the unit on each)."""

    @property
    def ok(self) -> bool:
        return not self.problems and self.verdict.ok and self.run_state == "succeeded"

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok, "vms": self.vms, "engines": self.engines, "lease_s": self.lease,
            "seconds": round(self.seconds, 2), "run_state": self.run_state,
            "invariant_problems": list(self.verdict.problems), "units": self.verdict.units,
            "shares": self.shares, "finished": self.finished, "killed_pid": self.killed, "stopped_pid": self.stopped,
            "stopped_for_s": round(self.stopped_for, 2), "taken_over_from_stopped": self.taken_over,
            "stopped_on_wake": self.stopped_on_wake, "stale_writes_refused": self.stale_writes_refused, "side_effects_refused": self.side_effects_refused,
            "writes_after_takeover": self.writes_after_takeover,
            "takeover_after_sigkill_s": None if self.takeover_s is None else round(self.takeover_s, 2),
            "takeover_in_lease_periods": None if self.takeover_s is None else round(self.takeover_s / self.lease, 2),
            "problems": list(self.problems), "run_s": round(self.run_seconds, 2),
            "cpu_s": {k: round(v, 1) for k, v in self.cpu.items()},
            "site_fence_only": self.site_fence_only, "fences_refused_by_site": self.fences_refused_by_site,
            "fences_admitted_by_site": self.fences_admitted_by_site,
            "stopped_refused_by_site": self.stopped_refused_by_site,
        }


async def submit_run(store: str, workflow_file: Path, site_url: str, token_file: Path) -> str:
    """Plan the workflow against the site and journal the run, its units unclaimed: the
    engines on the journal take them."""
    from flowcopy import definitions, planning
    from flowcopy.engine import Engine
    from flowcopy.site.client import connect_site

    workflow = definitions.load_definition(workflow_file)
    async with connect_site(site_url, str(token_file)) as site:
        journal = Journal.open(store)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(journal.run_writer)
                engine = Engine(journal, site, store=Path(os.devnull))
                specs = await planning.plan_units(workflow, site)
                run_id = await engine.begin_run(workflow.name, planning.definition_data(workflow), specs)
                nursery.cancel_scope.cancel()
        finally:
            journal.close()
    return run_id


def _progress(journal: Journal, run_id: str) -> tuple[str, int, int]:
    units = journal.units(run_id)
    return journal.run(run_id).state, sum(u.state in ("succeeded", "failed", "cancelled") for u in units), len(units)


def _holders(journal: Journal) -> dict[int, int]:
    return dict(Counter(lease.pid for lease in journal.leases() if lease.pid is not None))


async def _wait_moved_on(store: str, units: set[str], pid: int, since: float, until: float) -> None:
    """Until each of `units` has an event written after `since` (wall time) by an engine
    other than `pid`, or `until` (monotonic)."""
    while time.monotonic() < until:
        with Journal.open(store, lock=False) as journal:
            pids = {e.engine_id: e.pid for e in journal.engines()}
            moved = sum(1 for unit in units if any(ev.time > since and pids.get(ev.engine or "") != pid
                                                   for ev in journal.events(unit_id=unit)))
        if moved >= len(units):
            return
        await trio.sleep(0.3)


async def run_cluster_chaos(
    directory: Path,
    store: str,
    *,
    vms: int = 150,
    engines: int = 3,
    lease: float = 3.0,
    speed: float = 4.0,
    kill: bool = True,
    stop: bool = True,
    stop_for: float = 2.5,  # the SIGSTOP lasts this many lease periods
    timeout: float = 900.0,
    site_fence_only: bool = False,
) -> ClusterReport:
    from flowcopy.site.client import connect_site
    from flowcopy.site.inventory import generate_lab_spec

    directory.mkdir(parents=True, exist_ok=True)
    problems: list[str] = []
    site = ServedSite(directory, generate_lab_spec(vms, 4, workloads=min(vms, 6)), speed)
    started = time.monotonic()
    procs: list[subprocess.Popen[bytes]] = []
    logs: list[Path] = []
    killed = stopped = None
    stopped_for = run_seconds = stopped_at = 0.0
    cpu: dict[str, float] = {}
    kill_at: float | None = None
    held_by_stopped: set[str] = set()
    watch: Journal | None = None
    try:
        folder = directory / "workflows"
        folder.mkdir(exist_ok=True)
        workflow = folder / "chaos.yaml"
        workflow.write_text(CHAOS_WORKFLOW)
        env = {**os.environ, "FLOWCOPY_LEASE": str(lease)}
        if site_fence_only:
            from flowcopy.cluster import ENV_LEASE_CHECK

            env[ENV_LEASE_CHECK] = "site"
        for i in range(engines):
            local = directory / f"engine-{i}"
            local.mkdir(exist_ok=True)
            log = directory / f"engine-{i}.log"
            logs.append(log)
            with open(log, "wb") as out:
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "flowcopy", "serve", str(folder), "--store", store, "--site", site.url,
                     "--token-file", str(site.token)],
                    stdout=out, stderr=subprocess.STDOUT, env={**env, "FLOWCOPY_LOCAL": str(local)},
                ))
        await trio.sleep(1.0)
        submitted = time.monotonic()
        run_id = await submit_run(store, workflow, site.url, site.token)
        deadline = time.monotonic() + timeout
        # one read-only view for the whole watch: a poll is then two queries, not two
        # connections, so a 2-core CI machine that runs 30 units in 2 s is looked at often
        watch = Journal.open(store, lock=False)
        while True:
            state, done, total = _progress(watch, run_id)
            if state != "running":
                run_seconds = time.monotonic() - submitted
                from flowcopy.cluster_bench import _cpu

                cpu = {"site": _cpu(site.proc.pid), "engines": sum(_cpu(p.pid) for p in procs if p.poll() is None)}
                break
            if time.monotonic() > deadline:
                problems.append(f"run {run_id} not finished after {timeout:.0f}s ({done}/{total} units)")
                break
            if kill and killed is None and done >= total * 0.15:
                # the engine to kill holds units right now (the most), so a take-over follows
                held = _holders(watch)
                owners = [p for p in procs if held.get(p.pid, 0) > 0]
                if owners or done >= total * 0.8:
                    victim = max(owners, key=lambda p: held.get(p.pid, 0)) if owners else procs[0]
                    victim.send_signal(signal.SIGKILL)
                    victim.wait()
                    killed, kill_at = victim.pid, time.time()
            # without a kill first, pause the first engine seen holding units (they are claimed
            # ahead of their completions, and a CI machine may run 30 units from 0 % to 90 %
            # between two looks); after a kill, at once after it
            stop_at = (0 if killed is not None else total + 1) if kill else 0
            holders = _holders(watch) if stop and stopped is None and engines > 1 and done >= stop_at else {}
            live = [p for p in procs if p.poll() is None and p.pid != killed]
            # the engine to pause is a live one holding units right now (the most), so its
            # take-over and fencing are exercised; none holding any yet: look again shortly
            candidates = [p for p in live if holders.get(p.pid, 0) > 0]
            if stop and stopped is None and engines > 1 and done >= stop_at and candidates:
                victim = max(candidates, key=lambda p: holders.get(p.pid, 0))
                victim.send_signal(signal.SIGSTOP)
                held_by_stopped = {lease_row.unit_id for lease_row in watch.leases() if lease_row.pid == victim.pid}
                if not held_by_stopped:
                    # its units ended between the look and the signal: wake it, look again
                    victim.send_signal(signal.SIGCONT)
                    await trio.sleep(0.02)
                    continue
                stopped = victim.pid
                t0, stopped_at = time.monotonic(), time.time()
                await trio.sleep(stop_for * lease)
                # wake it once the others have moved each of its units on (bounded): the
                # new holders have reached the site, so what it does on waking is stale
                await _wait_moved_on(store, held_by_stopped, victim.pid, stopped_at, t0 + (stop_for + 5) * lease)
                victim.send_signal(signal.SIGCONT)
                stopped_for = time.monotonic() - t0
            # look often until the pause is done (it must catch units in flight), then calmly
            await trio.sleep(0.2 if stopped is not None or not stop else 0.03)
        if stop and engines > 1 and stopped is None:
            problems.append("no live engine was seen holding a unit to pause before the run ended")
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                problems.append(f"engine {proc.pid} did not stop on SIGTERM within 30 s")
        async with connect_site(site.url, site.token) as client:
            fences = await client.fence_report()
            with Journal.open(store, lock=False) as journal:
                verdict = await check_invariants(journal, client)
                run_state = journal.run(run_id).state
                events = journal.events(run_id=run_id)
                engines_by_id = {e.engine_id: e for e in journal.engines()}
    finally:
        if watch is not None:
            watch.close()
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        site.close()

    def pid_of(engine_id: str | None) -> int | None:
        row = engines_by_id.get(engine_id or "")
        return row.pid if row is not None else None

    last: dict[str, str | None] = {}
    touched: set[tuple[str, str | None]] = set()
    for event in events:
        last[event.unit_id] = event.engine
        touched.add((event.unit_id, event.engine))
    finished = dict(Counter(str(pid_of(e)) for e in last.values()))
    shares = dict(Counter(str(pid_of(e)) for _, e in touched))
    for proc in procs:
        # the paused engine may be caught holding its claims before it wrote of any: those are its share
        if str(proc.pid) not in shares and not (proc.pid == stopped and held_by_stopped):
            problems.append(f"engine {proc.pid} did no share of the work")
    # fencing: after another engine's first event of a unit, the stopped one wrote nothing of it
    after = 0
    taken = 0
    takeover_s: float | None = None
    by_unit: dict[str, list[Any]] = {}
    for event in events:
        by_unit.setdefault(event.unit_id, []).append(event)
    for unit_id, evs in by_unit.items():
        pids = [pid_of(e.engine) for e in evs]
        if stopped is not None and unit_id in held_by_stopped:
            # taken over: another engine wrote of it after the pause began (the stopped one
            # may have claimed it without writing any event of it yet)
            first_other = next((i for i, (p, e) in enumerate(zip(pids, evs))
                                if p != stopped and e.time > stopped_at), None)
            if first_other is not None:
                taken += 1
                after += sum(1 for p in pids[first_other:] if p == stopped)
        if killed is not None and kill_at is not None and killed in pids:
            last_killed = max(i for i, p in enumerate(pids) if p == killed)
            if last_killed + 1 < len(evs):
                delay = evs[last_killed + 1].time - kill_at
                if delay > 0 and (takeover_s is None or delay < takeover_s):
                    takeover_s = delay
    if after:
        problems.append(f"the stopped engine wrote {after} event(s) of units another engine had taken over")
    refused_writes = refused_calls = lost_on_wake = by_site = 0
    if stopped is not None:
        text = logs[[p.pid for p in procs].index(stopped)].read_text(errors="replace")
        by_site = text.count("site refused a stale fence")
        lost_on_wake = text.count("lease lost: this engine stops driving the unit")
        refused_writes = text.count("write refused")
        refused_calls = text.count("side effect refused") + text.count("side effect cut off")
    return ClusterReport(
        vms=vms, engines=engines, lease=lease, seconds=time.monotonic() - started, run_state=run_state,
        verdict=verdict, shares=shares, finished=finished, killed=killed, stopped=stopped, stopped_for=stopped_for,
        taken_over=taken, stopped_on_wake=lost_on_wake, stale_writes_refused=refused_writes, side_effects_refused=refused_calls,
        writes_after_takeover=after, takeover_s=takeover_s, problems=tuple(problems),
        run_seconds=run_seconds, cpu=cpu, site_fence_only=site_fence_only,
        fences_refused_by_site=int(fences.get("refused", 0)), fences_admitted_by_site=int(fences.get("admitted", 0)),
        stopped_refused_by_site=by_site,
    )


def report_text(report: ClusterReport) -> str:
    data = report.to_json()
    lines = [
        f"{report.vms} VMs, {report.engines} engines on one PostgreSQL journal, lease {report.lease:g}s, "
        f"{report.seconds:.1f}s: run {report.run_state}",
        f"shares (units moved / finished per engine pid): {json.dumps(report.shares)} / {json.dumps(report.finished)}",
        f"SIGKILLed engine {report.killed}: its units taken over after {data['takeover_after_sigkill_s']}s "
        f"({data['takeover_in_lease_periods']} lease periods)",
        f"SIGSTOPped engine {report.stopped} for {report.stopped_for:.1f}s: {report.taken_over} of its units taken over, "
        f"{report.stopped_on_wake} unit(s) dropped on waking, {report.stale_writes_refused} stale write(s) refused, {report.side_effects_refused} side effect(s) refused, "
        f"{report.writes_after_takeover} write(s) after take-over",
        f"site fence{' (alone: engines did not check their lease clock)' if report.site_fence_only else ''}: "
        f"{report.fences_refused_by_site} stale call(s) refused by the site, {report.stopped_refused_by_site} of them "
        f"logged by the woken engine; {report.fences_admitted_by_site} fenced call(s) admitted",
        "invariants: " + ("all hold" if report.verdict.ok else f"{len(report.verdict.problems)} problem(s)"),
    ]
    lines += [f"  problem: {p}" for p in [*report.verdict.problems[:20], *report.problems]]
    return "\n".join(lines)
