"""The invariants of DESIGN §4, checked from the journal and the site's own state.

Used by the crash tests after every simulated crash, by the real-process kill tests, and
(later) by `flowcopy chaos`. It reads the site through the `Site` interface only, so it
checks a served site exactly as the in-process one.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import attrs

from flowcopy import machine
from flowcopy.journal import Journal
from flowcopy.site.api import Site


@attrs.frozen
class Verdict:
    problems: tuple[str, ...]
    runs: int
    units: int
    relationships_kept: int
    checked_images: int
    # from the site's own hold records (6): longest source-volume hold in site seconds,
    # how many holds, how many ended by the ELB timer, volumes held that no group froze
    longest_hold: float = 0.0
    longest_hold_serial: str | None = None
    holds: int = 0
    holds_by_timeout: int = 0
    held_outside_sources: tuple[str, ...] = ()
    lost_freezes: int = 0  # guest freezes the engine saw lost (journal)

    @property
    def ok(self) -> bool:
        return not self.problems


def _keeps_relationships(spec: dict) -> bool:
    return spec.get("mode") == "incremental" or spec.get("withdraw") == "keep" or spec.get("kind") == "restore"


async def check_invariants(
    journal: Journal,
    site: Site,
    *,
    recheck_images: bool = True,
    hold_bound: float | None = None,
    clean: bool = False,
) -> Verdict:
    """`hold_bound`: the longest a source volume may be held, in site seconds (the
    engine's freeze-window bound times the site's speed); `clean`: no kill and no fault
    happened, so a lost guest freeze, a hold past the bound or one ended by the ELB timer
    has nothing to explain it (a killed engine leaves its holds to the resumed one, or to
    the array's ELB timer: that is the backstop, not a failure)."""
    problems: list[str] = []
    runs = journal.runs()
    units = [u for r in runs for u in journal.units(r.run_id)]

    # 1. every run terminal, no unit stuck
    for run in runs:
        if run.state == "running":
            problems.append(f"run {run.run_id} is still running")
    for unit in units:
        if unit.state not in machine.TERMINAL:
            problems.append(f"unit {unit.unit_id} is stuck in {unit.state}")

    # 2. no VM frozen, no LSS held
    for vm in await site.list_vms():
        status = await site.freeze_status(vm.name)
        if status.frozen:
            problems.append(f"VM {vm.name} is still frozen (freeze {status.freeze_id} since {status.frozen_at})")
    for held in await site.frozen_lsses():
        problems.append(f"LSS {held.lss} is still in extended long busy (since {held.since})")

    # 3. relationships: at most one per (run, pair); none left unless the definition keeps it
    tags = {u.data.get("tag"): u for u in units}
    kept = 0
    all_rels = await site.query()
    per_pair = Counter((r.tag, frozenset((r.source, r.target))) for r in all_rels if r.tag)
    for (tag, pair), n in per_pair.items():
        if n > 1:
            problems.append(f"{n} relationships for pair {sorted(pair)} with tag {tag}")
    for rel in all_rels:
        if not (rel.tag or "").startswith("fc:"):
            continue
        unit = tags.get(rel.tag)
        if unit is None:
            problems.append(f"relationship {rel.id} carries tag {rel.tag} that no journaled unit knows (leaked)")
            continue
        if unit.state in machine.TERMINAL and not _keeps_relationships(unit.data.get("spec", {})):
            problems.append(f"relationship {rel.id} of {unit.state} unit {unit.unit_id} was left behind")
        else:
            kept += 1

    # 4. succeeded units verified; where the image still stands alone, check it again now
    checked = 0
    latest_target_user: dict[str, str] = {}
    for unit in units:
        for pair in unit.data.get("pairs", []):
            latest_target_user[pair["target"]] = unit.unit_id
    for unit in units:
        if unit.state != "succeeded":
            continue
        if unit.data.get("verified") is not True:
            problems.append(f"unit {unit.unit_id} succeeded without a verified image")
        spec = unit.data.get("spec", {})
        pairs = unit.data.get("pairs", [])
        standalone = (
            recheck_images
            and spec.get("kind") == "backup"
            and spec.get("mode") == "copy"
            and pairs
            and all(latest_target_user.get(p["target"]) == unit.unit_id for p in pairs)
        )
        if standalone:
            report = await site.check([p["target"] for p in pairs])
            checked += 1
            if not report.consistent:
                problems.append(f"unit {unit.unit_id}: target image inconsistent: {'; '.join(report.problems[:3])}")

    # 5. each unit's history is a valid path through the state table
    for unit in units:
        moves = [(e.from_state, e.event, e.to_state) for e in journal.events(unit_id=unit.unit_id)]
        for problem in machine.validate_history(moves):
            problems.append(f"unit {unit.unit_id}: {problem}")
        if moves and moves[-1][2] != unit.state:
            problems.append(f"unit {unit.unit_id}: current state {unit.state} is not its last event's {moves[-1][2]}")

    # 6. holds, from the site's own records: bounded, never an ELB expiry, only group sources
    sources = {p["source"] for u in units for p in u.data.get("pairs", [])}
    sources |= {p["target"] for u in units for p in u.data.get("pairs", []) if u.data.get("spec", {}).get("kind") == "restore"}
    holds = await site.hold_history()
    now = await site.now()
    longest, longest_serial = 0.0, None
    for hold in holds:
        length = (hold.released_at if hold.released_at is not None else now) - hold.since
        if length > longest:
            longest, longest_serial = length, hold.serial
    by_timeout = [h for h in holds if h.by_timeout]
    for hold in by_timeout[:5] if clean else ():
        problems.append(f"source {hold.serial} (LSS {hold.lss}) was held from {hold.since:.3f} until its ELB timer "
                        f"released it at {hold.released_at:.3f}")
    if clean and hold_bound is not None and longest > hold_bound:
        problems.append(f"source {longest_serial} was held {longest:.3f} s, over the freeze-window bound {hold_bound:g} s")
    stray = tuple(sorted({h.serial for h in holds} - sources))
    if stray:
        problems.append(f"volumes outside every group's sources were held: {', '.join(stray[:10])}")
    lost = sum(int(u.data.get("freezes_lost", 0)) for u in units)
    if clean and lost:
        problems.append(f"{lost} guest freeze(s) lost in a run with no kill and no fault to explain them")

    return Verdict(tuple(problems), len(runs), len(units), kept, checked, longest, longest_serial,
                   len(holds), len(by_timeout), stray, lost)


def store_state(store: Path) -> tuple[int, bool]:
    """(runs in the store's journal, whether any of them is unfinished)."""
    from flowcopy.journal import is_url

    if not is_url(store) and not (store / "journal.sqlite").exists():
        return 0, False
    try:
        journal = Journal.open(store, lock=False)
    except Exception:  # noqa: BLE001 - a store killed before its first migration
        return 0, False
    try:
        runs = journal.runs()
        return len(runs), any(r.state == "running" for r in runs)
    finally:
        journal.close()


def _has_run(store: Path) -> bool:
    return store_state(store)[0] > 0



# --------------------------------------------------------------------------- the kill loop


async def kill_loop(
    argv_first: list[str],
    argv_resume: list[str],
    *,
    store: Path,
    kills: int,
    min_delay: float,
    max_delay: float,
    seed: int = 0,
    env: dict[str, str] | None = None,
) -> tuple[int, int, int, str]:
    """Start the engine, SIGKILL it after a random delay, `kills` times; then let it finish.

    While the store holds an unfinished run each process runs `argv_resume` (`flowcopy
    resume`); otherwise `argv_first` (`flowcopy run FILE`) starts a new run — so a run that
    finishes before all kills are spent is followed by another, and `--kills 500` means
    500 SIGKILLs. Delays come from a seeded RNG so a failing run can be replayed.
    Returns (kills done, processes started, last exit code, last output).
    """
    import os
    import random
    import signal
    import subprocess

    import trio

    rng = random.Random(seed)
    done = 0
    started = 0
    environment = {**os.environ, **(env or {})}
    while done < kills and started < 5 * kills + 5:
        argv = argv_resume if store_state(store)[1] else argv_first
        started += 1
        proc = await trio.lowlevel.open_process(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=environment)
        with trio.move_on_after(rng.uniform(min_delay, max_delay)):
            await proc.wait()
        if proc.returncode is None:
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
            done += 1
    runs, _ = store_state(store)
    argv = argv_resume if runs else argv_first
    result = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False, env=environment)
    return done, started + 1, result.returncode, result.stdout.decode() + result.stderr.decode()[-3000:]


# --------------------------------------------------------------------------- flowcopy chaos

def _chaos_workflow() -> str:
    from flowcopy.bench import BENCH_WORKFLOW

    return BENCH_WORKFLOW.replace("name: bench\n", "name: chaos\n").replace(
        "quiesce: filesystem\n", "quiesce: filesystem\nretry: {max_attempts: 10, initial_interval: 1s, max_interval: 5s}\n"
    )


CHAOS_WORKFLOW = _chaos_workflow()
"""The benchmark's fleet workflow (every VM of a generated lab, both disks, copy mode,
pool targets) with a retry policy patient enough for a site failing a few % of calls."""


@attrs.frozen
class ChaosReport:
    vms: int
    kills: int
    processes: int
    final_exit: int
    faults_injected: int
    seconds: float
    verdict: Verdict
    run_states: tuple[str, ...]
    output: str
    hold_bound: float = 0.0  # site seconds: the engine's freeze-window bound times the speed
    site_restarts: int = 0
    """SIGKILLs + restarts of the served site process done while a run was in flight."""

    @property
    def run_state(self) -> str:
        """'succeeded' when every run did, else the states seen."""
        states = sorted(set(self.run_states))
        return "none" if not states else states[0] if len(states) == 1 else "+".join(states)

    @property
    def ok(self) -> bool:
        return self.verdict.ok and self.final_exit == 0 and self.run_state == "succeeded"

    def to_json(self) -> dict[str, object]:
        return {
            "ok": self.ok, "vms": self.vms, "kills": self.kills, "processes": self.processes,
            "final_exit": self.final_exit, "faults_injected": self.faults_injected,
            "seconds": round(self.seconds, 2), "run_state": self.run_state, "runs": len(self.run_states),
            "problems": list(self.verdict.problems), "units": self.verdict.units,
            "longest_source_hold_s": round(self.verdict.longest_hold, 3),
            "longest_hold_source": self.verdict.longest_hold_serial,
            "hold_bound_s": self.hold_bound, "source_holds": self.verdict.holds,
            "holds_ended_by_elb": self.verdict.holds_by_timeout,
            "held_outside_sources": list(self.verdict.held_outside_sources),
            "lost_freezes": self.verdict.lost_freezes,
            "unexplained_lost_freezes": self.unexplained_lost_freezes,
            "site_restarts": self.site_restarts,
            "site_restarts_survived": self.site_restarts if self.ok else 0,
        }

    @property
    def unexplained_lost_freezes(self) -> int:
        """Lost guest freezes with no kill and no injected fault to explain them."""
        clean = self.kills == 0 and self.faults_injected == 0 and self.site_restarts == 0
        return self.verdict.lost_freezes if clean else 0

    def hold_line(self) -> str:
        """The human report's line on holds (site seconds)."""
        v = self.verdict
        return (f"longest source hold {v.longest_hold:.3f} s (bound {self.hold_bound:g} s, ELB timeout 120 s) over "
                f"{v.holds} holds, {v.holds_by_timeout} ended by ELB, {len(v.held_outside_sources)} outside group "
                f"sources; {v.lost_freezes} lost freezes, {self.unexplained_lost_freezes} unexplained")


class ServedSite:
    """`flowcopy site serve` in its own process, on a loopback port it picks itself."""

    def __init__(self, directory: Path, lab: dict, speed: float) -> None:
        import json

        self.lab_file = directory / "lab.json"
        self.lab_file.write_text(json.dumps(lab))  # JSON is YAML
        self.state = directory / "site"
        self.token = self.state / "token"
        self.speed = speed
        self.url = self._start(0)

    def _start(self, port: int) -> str:
        import re
        import subprocess
        import sys

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "flowcopy", "site", "serve", "--lab", str(self.lab_file), "--state", str(self.state),
             "--port", str(port), "--speed", str(self.speed)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
        assert self.proc.stdout is not None
        for _ in range(5):
            match = re.search(r"listening on (http://\S+)", self.proc.stdout.readline())
            if match:
                return match.group(1)
        self.proc.kill()
        self.proc.wait()
        raise RuntimeError("the served site did not say where it listens")

    def restart(self) -> None:
        """SIGKILL the site process and start it again on the same state and port (its
        state is durable: the array, the guests' freezes and the fault plan survive)."""
        import signal
        import time
        from urllib.parse import urlsplit

        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        port = urlsplit(self.url).port or 0
        for attempt in range(20):  # the port may take a moment to be free again
            try:
                self.url = self._start(port)
                return
            except RuntimeError:
                if attempt == 19:
                    raise
                time.sleep(0.25)

    def close(self) -> None:
        import signal
        import subprocess

        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


async def run_chaos(
    directory: Path,
    *,
    vms: int = 100,
    kills: int = 10,
    seed: int = 0,
    error_rate: float = 0.0,
    speed: float = 4.0,
    min_delay: float = 0.5,
    max_delay: float = 2.0,
    site_restarts: int = 0,
    real_apps: int = 0,
) -> ChaosReport:
    """Serve a generated lab, run the chaos workflow against it and SIGKILL the engine
    `kills` times (`flowcopy resume` after the first), let the last one finish, and check
    every invariant from the served site's own state and the journal.

    `site_restarts`: meanwhile SIGKILL and restart the served site process that many
    times, each while a run is in flight (the engine's retries ride the outage out).
    `real_apps` more VMs run SQLite / ext4 (their images judged by SQLite / e2fsck as well)."""
    import random
    import sys
    import time

    import trio

    from flowcopy.site.client import connect_site
    from flowcopy.site.faults import FaultPlan
    from flowcopy.site.inventory import generate_lab_spec

    from flowcopy.engine import Limits

    hold_bound = Limits().hold_bound * speed  # the engine's bound is in its own (real) seconds
    directory.mkdir(parents=True, exist_ok=True)
    site = ServedSite(directory, generate_lab_spec(vms, 4, workloads=min(vms, 6), real_apps=real_apps), speed)
    started = time.monotonic()
    try:
        workflow = directory / "chaos.yaml"
        workflow.write_text(CHAOS_WORKFLOW)
        store = directory / "store"
        common = ["--site", site.url, "--token-file", str(site.token), "--store", str(store), "--json"]
        flowcopy = [sys.executable, "-m", "flowcopy"]
        async with connect_site(site.url, site.token) as client:
            if error_rate:
                reads = ("now", "query", "list_vms", "list_pools", "get_volume", "lun_of")
                await client.set_faults(FaultPlan(seed=seed, error_rate=error_rate, after_fraction=0.5,
                                                  error_rates={op: 0.0 for op in reads}))
        restarted = 0
        result: dict[str, tuple[int, int, int, str]] = {}

        async def engines(cancel: trio.CancelScope) -> None:
            argv = ([*flowcopy, "run", str(workflow), *common], [*flowcopy, "resume", *common])
            done, processes, code, output = await kill_loop(
                *argv, store=store, kills=kills, min_delay=min_delay, max_delay=max_delay, seed=seed,
            )
            # like kills, `--site-restarts N` means N restarts: a run that ends before they
            # are spent (a fast machine) is followed by another (bounded)
            for _ in range(3 * site_restarts):
                if restarted >= site_restarts or code != 0:
                    break
                again = await trio.run_process(argv[0], capture_stdout=True, capture_stderr=True, check=False)
                processes += 1
                code, output = again.returncode, again.stdout.decode() + again.stderr.decode()[-3000:]
            result["loop"] = (done, processes, code, output)
            cancel.cancel()

        async def restarts() -> None:
            nonlocal restarted
            rng = random.Random(seed + 1)
            while restarted < site_restarts:
                while not store_state(store)[1]:  # only while a run is in flight
                    await trio.sleep(0.1)
                await trio.sleep(rng.uniform(min_delay, max_delay))
                if not store_state(store)[1]:
                    continue
                await trio.to_thread.run_sync(site.restart)
                restarted += 1

        async with trio.open_nursery() as nursery:
            nursery.start_soon(engines, nursery.cancel_scope)
            nursery.start_soon(restarts)
        done, processes, code, output = result["loop"]
        async with connect_site(site.url, site.token) as client:  # a fresh client: the site may be new
            injected = sum(dict((await client.fault_report()).get("injected", {})).values())
            await client.clear_faults()
            journal = Journal.open(store, lock=False)
            try:
                verdict = await check_invariants(journal, client, hold_bound=hold_bound,
                                                 clean=done == 0 and injected == 0 and restarted == 0)
                runs = journal.runs()
            finally:
                journal.close()
    finally:
        site.close()
    return ChaosReport(
        vms=vms, kills=done, processes=processes, final_exit=code, faults_injected=injected,
        seconds=time.monotonic() - started, verdict=verdict,
        run_states=tuple(r.state for r in runs), output=output, hold_bound=hold_bound,
        site_restarts=restarted,
    )
