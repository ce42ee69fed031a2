"""The long-running service (DESIGN §3.6): cron, overlap, catch-up, pause, reload, stop.

Two layers, as everywhere in flowcopy:

* a pure core (`decide`, `latest_fire`, `next_fire`) over frozen values: given a
  schedule, the last fire time dealt with, "now", whether a run is going or queued and
  whether the workflow is paused, it says fire / queue / skip (why) / sleep until T.
  No clocks, no I/O, so every policy is a table-driven test.
* a trio shell (`Scheduler`): one nursery, one site, one engine for the store; one task
  per scheduled workflow that sleeps until its next fire and acts on `decide`.

Cron is wall time, sleeping is trio time. The two meet in a small clock object
(`SystemClock` in production, `TrioClock` in tests and `--speed` demos) so a test on
MockClock sees hours of cron in milliseconds.

"Last fire" survives restarts through the journal (the latest run's `created`), so a
service restarted right after a fire does not fire again; fires that were due while the
service was down are dealt with in one decision: the latest runs once if it is within
the catch-up window, the older ones are skipped and logged, however many there were.
"""

from __future__ import annotations

import signal
import zoneinfo
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, Protocol

import attrs
import structlog
import trio
from croniter import croniter

from flowcopy import definitions, planning
from flowcopy.definitions import DefinitionError, Overlap, Schedule, Workflow
from flowcopy.engine import Engine, EngineStopped, RunSummary
from flowcopy.logs import get_logger
from flowcopy.site.api import Site, SiteError

log = get_logger("flowcopy.scheduler")

GRACE = 10.0
"""Seconds a wake-up may be late (a busy loop, a slow journal) and still count as on
time. Beyond it a fire counts as missed, and only the schedule's `catch_up` runs it."""

MAX_COUNTED = 1000
"""Missed fire times are counted up to this many (an every-minute cron down for a month
is 43,200 of them; the log says "1000+" rather than walking them all)."""

from flowcopy.pausing import STATE_FILE  # noqa: E402  (the pause state file)


# --------------------------------------------------------------------------- pure core


def _zone(schedule: Schedule) -> zoneinfo.ZoneInfo:
    return zoneinfo.ZoneInfo(schedule.timezone or "UTC")


def _repeated_wall_time(schedule: Schedule, fire: datetime) -> bool:
    """True for the second pass of a wall time the clocks go back over (autumn DST) when
    the cron names fixed hours: "30 2 * * *" means once at 02:30, as cron runs it, not
    twice; a cron over every hour ("0 * * * *") keeps firing every real hour."""
    hours = schedule.cron.split()[1] if len(schedule.cron.split()) >= 5 else "*"
    if "*" in hours:
        return False
    local = fire.astimezone(_zone(schedule))
    return local.fold == 1 and local.replace(fold=0).utcoffset() != local.utcoffset()


def next_fire(schedule: Schedule, after: datetime) -> datetime:
    """The first fire time strictly after `after` (aware), in UTC."""
    fire = schedule.next_after(after).astimezone(UTC)
    while _repeated_wall_time(schedule, fire):
        fire = schedule.next_after(fire).astimezone(UTC)
    return fire


def latest_fire(schedule: Schedule, now: datetime) -> datetime:
    """The last fire time at or before `now` (aware), in UTC."""
    local = now.astimezone(_zone(schedule)) + timedelta(microseconds=1)
    it = croniter(schedule.cron, local)
    result: datetime = it.get_prev(datetime).astimezone(UTC)
    while _repeated_wall_time(schedule, result):
        result = it.get_prev(datetime).astimezone(UTC)
    return result


@attrs.frozen
class Situation:
    """What the scheduler knows about one workflow at one instant."""

    schedule: Schedule
    last: datetime
    """Fire times up to here are dealt with (fired, queued or skipped): the journal's
    latest run of the workflow after a restart, the service start for a new workflow."""
    now: datetime
    running: bool = False
    queued: bool = False
    paused: bool = False
    grace: float = GRACE


Action = Literal["fire", "queue", "skip", "sleep"]


@attrs.frozen
class Decision:
    action: Action
    at: datetime
    """fire/queue/skip: the fire time dealt with (the new `last`); sleep: when to wake."""
    reason: str = ""
    missed: int = 0
    """Older fire times passed over in the same decision (downtime); capped at MAX_COUNTED."""
    catch_up: bool = False
    """The fire time was missed (later than the grace) and runs by the catch-up window."""


def _count_between(schedule: Schedule, first: datetime, end: datetime) -> int:
    """Fire times in [first, end), at most MAX_COUNTED."""
    count, t = 0, first
    while t < end and count < MAX_COUNTED:
        count += 1
        t = next_fire(schedule, t)
    return count


def _missed_text(n: int) -> str:
    return f"{n}+" if n >= MAX_COUNTED else str(n)


def decide(s: Situation) -> Decision:
    """What to do now about one workflow: the whole policy of the service, pure."""
    first = next_fire(s.schedule, s.last)
    if first > s.now:
        return Decision("sleep", first)
    due = latest_fire(s.schedule, s.now)
    older = _count_between(s.schedule, first, due)
    late = (s.now - due).total_seconds()
    window = max(s.grace, s.schedule.catch_up)
    if late > window:
        return Decision(
            "skip", due,
            f"missed by {late:.0f}s, outside the catch-up window of {s.schedule.catch_up:.0f}s"
            + (f" ({_missed_text(older)} older fire time(s) missed too)" if older else ""),
            missed=older,
        )
    catch_up = late > s.grace
    if catch_up:
        reason = f"catch-up: missed by {late:.0f}s, within the catch-up window of {s.schedule.catch_up:.0f}s"
    else:
        reason = "on schedule"
    if older:
        reason += f"; {_missed_text(older)} older missed fire time(s) skipped (a missed run is made up once at most)"
    if s.paused:
        return Decision("skip", due, "paused", missed=older, catch_up=catch_up)
    if s.running:
        overlap = s.schedule.overlap
        if overlap is Overlap.SKIP:
            return Decision("skip", due, "the previous run is still running (overlap: skip)", missed=older, catch_up=catch_up)
        if overlap is Overlap.BUFFER_ONE:
            if s.queued:
                return Decision("skip", due, "the previous run is still running and one run is already queued (overlap: buffer_one)",
                                missed=older, catch_up=catch_up)
            return Decision("queue", due, reason + "; queued behind the running run (overlap: buffer_one)", missed=older, catch_up=catch_up)
        reason += "; the previous run is still running (overlap: allow)"
    return Decision("fire", due, reason, missed=older, catch_up=catch_up)


def slot_id(at: datetime) -> str:
    """A fire's identity in the journal: its scheduled time in cron-clock terms, UTC."""
    return at.astimezone(UTC).isoformat(timespec="seconds")


def last_fire_from_runs(created: Iterable[float]) -> datetime | None:
    """The wall time of a workflow's latest run (RunRow.created), or None if it never ran."""
    latest = max(created, default=None)
    return None if latest is None else datetime.fromtimestamp(latest, UTC)


# --------------------------------------------------------------------------- clocks


class WallClock(Protocol):
    def now(self) -> datetime:
        """Aware wall time, what cron fields mean."""
        ...

    def trio_seconds(self, until: datetime) -> float:
        """How long to sleep on trio's clock until wall time `until` (<= 0: due)."""
        ...


@attrs.frozen
class SystemClock:
    """The machine's wall clock: production."""

    def now(self) -> datetime:
        return datetime.now(UTC)

    def trio_seconds(self, until: datetime) -> float:
        return (until - self.now()).total_seconds()


@attrs.frozen
class TrioClock:
    """Wall time that moves with trio's clock, `speed` times as fast. On MockClock a test
    sees hours of cron in milliseconds; with `--speed` a demo sees a minute in a second."""

    start: datetime
    trio_start: float
    speed: float = 1.0

    @classmethod
    def starting_at(cls, start: datetime, speed: float = 1.0) -> TrioClock:
        """Call inside trio.run: anchors `start` to trio's current time."""
        return cls(start=start, trio_start=trio.current_time(), speed=speed)

    def now(self) -> datetime:
        return self.start + timedelta(seconds=(trio.current_time() - self.trio_start) * self.speed)

    def trio_seconds(self, until: datetime) -> float:
        return (until - self.now()).total_seconds() / self.speed


# --------------------------------------------------------------------------- pause state


# kept in a small module of their own so `flowcopy status` reads them without importing
# the scheduler (croniter, the engine, trio)
from flowcopy.pausing import PauseStateError, _state_path, read_paused, set_paused  # noqa: E402,F401


# --------------------------------------------------------------------------- the shell


RUN_ERRORS = (planning.PlanError, SiteError)
"""A run that cannot start (site unreachable, selector matches nothing) is logged; the
service goes on with the next fire."""


@attrs.define(eq=False)
class _Entry:
    name: str
    path: Path
    workflow: Workflow
    last: datetime
    wake: trio.Event = attrs.field(factory=trio.Event)
    scope: trio.CancelScope | None = None
    running: int = 0
    queued: datetime | None = None


@attrs.frozen
class StopReport:
    """What a clean stop left behind: runs `flowcopy resume` (or the next serve) continues."""

    left: tuple[str, ...]
    dropped_queued: tuple[str, ...] = ()

    def message(self) -> str:
        if not self.left:
            text = "stopped cleanly: no run left in flight"
        else:
            text = (f"stopped cleanly: {len(self.left)} run(s) left for `flowcopy resume` (or the next serve), "
                    f"no guest frozen: {', '.join(self.left)}")
        if self.dropped_queued:
            text += f"; queued run(s) not started: {', '.join(self.dropped_queued)}"
        return text


def load_folder(folder: Path) -> tuple[dict[Path, Workflow], dict[Path, DefinitionError]]:
    """Every definition in `folder`: the good ones, and the problems of the broken ones."""
    good: dict[Path, Workflow] = {}
    broken: dict[Path, DefinitionError] = {}
    for path in definitions.definition_files([folder]):
        try:
            good[path] = definitions.load_definition(path)
        except DefinitionError as exc:
            broken[path] = exc
    return good, broken


class Scheduler:
    """Fires the scheduled workflows of a folder on one engine, until stopped."""

    def __init__(self, folder: Path, engine: Engine, *, clock: WallClock | None = None, store: Path | None = None) -> None:
        self.folder = Path(folder)
        self.engine = engine
        self.site: Site = engine.site
        self.store = Path(store) if store is not None else engine.store
        self.clock: WallClock = clock or SystemClock()
        self.entries: dict[str, _Entry] = {}
        self.finished: list[RunSummary] = []
        self._stopping = False
        self._stop_event = trio.Event()
        self._loops: trio.Nursery | None = None
        self._runs: trio.Nursery | None = None
        self._paused: frozenset[str] = frozenset()
        self.observers: list[Any] = []
        """Watchers of the service (its metrics and status page): objects with any of
        on_decision(name, decision), on_run_started(name, run_id), on_start_error(name,
        error), on_stop(). Called inline; must not block."""
        self.resumed = trio.Event()
        """Set once the runs the store left unfinished have been resumed to their end."""

    def _observe(self, event: str, *args: Any) -> None:
        for observer in self.observers:
            hook = getattr(observer, event, None)
            if hook is not None:
                hook(*args)

    @property
    def stopping(self) -> bool:
        return self._stopping

    def trigger(self, name: str) -> Decision:
        """Fire `name` now, outside its schedule (`flowcopy trigger`): its cron goes on as
        before; a paused workflow fires too (pause stops the schedule, not a person). The
        overlap policy holds: skip refuses while a run is going, buffer_one queues one."""
        entry = self.entries.get(name)
        now = self.clock.now()
        if entry is None:
            known = ", ".join(sorted(self.entries)) or "none"
            return Decision("skip", now, f"no workflow {name!r} in {self.folder} (known: {known})")
        if self._stopping or self._runs is None:
            return Decision("skip", now, "the service is stopping" if self._stopping else "the service is starting")
        overlap = entry.workflow.schedule.overlap if entry.workflow.schedule is not None else Overlap.SKIP
        decision = Decision("fire", now, "triggered by hand")
        if entry.running:
            if overlap is Overlap.SKIP:
                decision = Decision("skip", now, "the previous run is still running (overlap: skip)")
            elif overlap is Overlap.BUFFER_ONE:
                if entry.queued is not None:
                    decision = Decision("skip", now, "the previous run is still running and one run is already queued (overlap: buffer_one)")
                else:
                    decision = Decision("queue", now, "triggered by hand; queued behind the running run (overlap: buffer_one)")
        with structlog.contextvars.bound_contextvars(workflow=name):
            log.info({"fire": "trigger", "queue": "queued", "skip": "trigger refused"}[decision.action],
                     at=now.isoformat(), reason=decision.reason)
        self._observe("on_decision", name, decision)
        if decision.action == "queue":
            entry.queued = now
        elif decision.action == "fire":
            self._start(entry, now)
        return decision

    # ---- definitions

    def _last_for(self, name: str) -> datetime:
        slot = self.engine.journal.last_slot(name)
        if slot is not None:  # the latest slot dealt with, in cron-clock terms, at any --speed
            return datetime.fromisoformat(slot)
        last = last_fire_from_runs(r.created for r in self.engine.journal.runs(name))  # journals from before slots
        return last if last is not None else self.clock.now()

    def reload(self) -> dict[str, list[str]]:
        """(Re)read the folder: add, change and remove workflows; a broken file keeps the
        previous good version of its workflow. Runs in flight are not touched."""
        good, broken = load_folder(self.folder)
        for path, exc in broken.items():
            log.error("definition refused", file=str(path), problems=[str(p) for p in exc.problems],
                      kept=[e.name for e in self.entries.values() if e.path == path])
        wanted: dict[str, tuple[Path, Workflow]] = {}
        for path, wf in good.items():
            if wf.name in wanted:
                log.error("definition refused", file=str(path),
                          problems=[f"{path}: workflow name {wf.name!r} is already defined in {wanted[wf.name][0]}"])
                continue
            wanted[wf.name] = (path, wf)
        kept_paths = set(broken)
        for entry in self.entries.values():  # a broken file keeps its last good workflow
            if entry.path in kept_paths and entry.name not in wanted:
                wanted[entry.name] = (entry.path, entry.workflow)
        added, changed, removed = [], [], []
        for name in list(self.entries):
            if name not in wanted:
                entry = self.entries.pop(name)
                removed.append(name)
                if entry.scope is not None:
                    entry.scope.cancel()
                if entry.queued is not None:
                    log.info("skip", workflow=name, at=entry.queued.isoformat(), reason="workflow removed; its queued run is dropped")
        for name, (path, wf) in wanted.items():
            entry = self.entries.get(name)
            if entry is None:
                self.entries[name] = entry = _Entry(name=name, path=path, workflow=wf, last=self._last_for(name))
                added.append(name)
            elif entry.workflow != wf or entry.path != path:
                entry.workflow, entry.path = wf, path
                changed.append(name)
                entry.wake.set()  # re-decide with the new schedule now
            self._ensure_loop(entry)
        return {"added": sorted(added), "changed": sorted(changed), "removed": sorted(removed),
                "broken": sorted(str(p) for p in broken)}

    def _ensure_loop(self, entry: _Entry) -> None:
        if entry.workflow.schedule is None:
            if entry.scope is not None:
                entry.scope.cancel()
                entry.scope = None
            return
        if entry.scope is None and self._loops is not None and not self._stopping:
            entry.scope = trio.CancelScope()
            self._loops.start_soon(self._loop, entry, entry.scope)

    # ---- the service

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> StopReport:
        """Resume unfinished runs in the background, fire on schedule; return after `stop`."""
        dropped: list[str] = []
        async with trio.open_nursery() as runs:
            self._runs = runs
            runs.start_soon(self._resume)
            async with trio.open_nursery() as loops:
                self._loops = loops
                result = self.reload()
                log.info("serving", folder=str(self.folder), **result,
                         scheduled=sorted(n for n, e in self.entries.items() if e.workflow.schedule is not None))
                task_status.started()
                await self._stop_event.wait()
                loops.cancel_scope.cancel()
            self._loops = None
            for entry in self.entries.values():
                if entry.queued is not None:
                    dropped.append(f"{entry.name}@{entry.queued.isoformat()}")
                    entry.queued = None
        left = tuple(r.run_id for r in self.engine.journal.runs() if r.state == "running")
        report = StopReport(left=left, dropped_queued=tuple(dropped))
        log.info("stopped", left=list(left), dropped_queued=dropped)
        return report

    def stop(self) -> None:
        """Clean stop: no new runs; freeze windows finish their release; `run` returns."""
        if self._stopping:
            return
        self._stopping = True
        log.warning("stopping: no new runs; freeze windows finish their release")
        self._observe("on_stop")
        self.engine.stop()
        self._stop_event.set()

    async def _resume(self) -> None:
        if self.engine.journal.leased:  # a shared journal: take part in every run, begun here or not
            def ended(summary: RunSummary) -> None:
                self.finished.append(summary)
                log.info("run ended", run=summary.run_id, workflow=summary.workflow, state=summary.state,
                         verified=summary.verified)

            await self.engine.follow_runs(ended)
            return
        try:
            for summary in await self.engine.resume():
                self.finished.append(summary)
                log.info("resumed run ended", run=summary.run_id, workflow=summary.workflow, state=summary.state,
                         verified=summary.verified)
        except* EngineStopped:
            pass  # the stop report lists what is still running
        finally:
            self.resumed.set()

    def _read_paused(self) -> frozenset[str]:
        try:
            self._paused = read_paused(self.store)
        except PauseStateError as exc:
            log.error("pause state unreadable; keeping the last known", error=str(exc), paused=sorted(self._paused))
        return self._paused

    async def _loop(self, entry: _Entry, scope: trio.CancelScope) -> None:
        try:
            with scope, structlog.contextvars.bound_contextvars(workflow=entry.name):
                await self._decide_loop(entry)
        finally:
            if entry.scope is scope:
                entry.scope = None

    async def _decide_loop(self, entry: _Entry) -> None:
        while entry.workflow.schedule is not None and not self._stopping:
            now = self.clock.now()
            running = entry.running > 0
            if not running and self.engine.journal.leased:  # a run of it by another service counts
                running = any(r.workflow == entry.name for r in self.engine.journal.unfinished_runs())
            try:
                decision = decide(Situation(
                    schedule=entry.workflow.schedule, last=entry.last, now=now, running=running,
                    queued=entry.queued is not None, paused=entry.name in self._read_paused(),
                    grace=GRACE * float(getattr(self.clock, "speed", 1.0)),  # cron-clock seconds
                ))
            except Exception as exc:  # croniter on a schedule validate let through: never stop the service
                log.error("schedule cannot fire; waiting for a reload (SIGHUP) with a fixed definition",
                          file=str(entry.path), cron=entry.workflow.schedule.cron, error=f"{type(exc).__name__}: {exc}")
                await entry.wake.wait()
                entry.wake = trio.Event()
                continue
            if decision.action == "sleep":
                await self._sleep_until(entry, decision.at)
                continue
            entry.last = decision.at
            # the slot's identity (workflow + cron-clock time) is unique in the journal: of
            # several services on one journal, or one restarted, only one deals with it
            if not await self.engine.journal.claim_slot(entry.name, slot_id(decision.at), decision.action, decision.reason):
                log.info("skip", at=decision.at.isoformat(), reason="slot already dealt with (another service, or before a restart)")
                continue
            self._observe("on_decision", entry.name, decision)
            fields: dict[str, Any] = {"at": decision.at.isoformat(), "reason": decision.reason}
            if decision.missed:
                fields["missed"] = decision.missed
            if decision.action == "skip":
                log.info("skip", **fields)
            elif decision.action == "queue":
                entry.queued = decision.at
                log.info("queued", **fields)
            else:
                log.info("catch-up" if decision.catch_up else "fire", **fields)
                self._start(entry, decision.at)

    async def _sleep_until(self, entry: _Entry, when: datetime) -> None:
        """Sleep on trio's clock until wall time `when`, or until a reload wakes us. Long
        sleeps are cut in pieces so a wall clock that jumps (NTP, suspend) is followed."""
        while True:
            seconds = self.clock.trio_seconds(when)
            if seconds <= 0:
                return
            with trio.move_on_after(min(seconds, 300.0)):
                await entry.wake.wait()
                entry.wake = trio.Event()
                return
            if seconds <= 300.0:
                # slept the whole way: due now, even if float rounding says a hair early
                if self.clock.now() < when:
                    await trio.sleep(max(self.clock.trio_seconds(when), 0.0) + 1e-6)
                return

    def _start(self, entry: _Entry, due: datetime) -> None:
        assert self._runs is not None
        entry.running += 1
        self._runs.start_soon(self._run_one, entry, entry.workflow, due)

    async def _run_one(self, entry: _Entry, workflow: Workflow, due: datetime) -> None:
        try:
            with structlog.contextvars.bound_contextvars(workflow=workflow.name):
                await self._plan_and_drive(workflow, due)
        finally:
            entry.running -= 1
            if entry.running == 0 and entry.queued is not None and not self._stopping and entry.name in self.entries:
                queued, entry.queued = entry.queued, None
                with structlog.contextvars.bound_contextvars(workflow=entry.name):
                    if entry.name in self._read_paused():
                        log.info("skip", at=queued.isoformat(), reason="paused while queued")
                    else:
                        log.info("fire", at=queued.isoformat(), reason="queued run starts: the previous run ended (overlap: buffer_one)")
                        self._start(entry, queued)

    async def _plan_and_drive(self, workflow: Workflow, due: datetime) -> None:
        try:
            specs = await planning.plan_or_journal(workflow, self.site, self.engine)
            if self._stopping:
                log.info("run not started: the service is stopping", at=due.isoformat())
                return
            run_id = await self.engine.begin_run(workflow.name, planning.definition_data(workflow), specs)
        except RUN_ERRORS as exc:
            log.error("run could not start", at=due.isoformat(), error=_describe(exc))
            self._observe("on_start_error", workflow.name, _describe(exc))
            return
        self._observe("on_run_started", workflow.name, run_id)
        with structlog.contextvars.bound_contextvars(run=run_id):
            log.info("run started", at=due.isoformat(), units=len(specs))
            try:
                summary = await self.engine.drive_run(run_id)
            except EngineStopped as exc:
                log.info("run left for resume", units=exc.units)
                return
            self.finished.append(summary)
            log.info("run ended", state=summary.state, verified=summary.verified, units=dict(summary.units),
                     failures=dict(summary.failures))

    # ---- signals

    async def watch_signals(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """SIGHUP: reload. SIGTERM/SIGINT: a clean stop; a second one: stop at once."""
        with trio.open_signal_receiver(signal.SIGHUP, signal.SIGTERM, signal.SIGINT) as signals:
            task_status.started()
            async for signum in signals:
                if signum == signal.SIGHUP:
                    if not self._stopping:
                        result = self.reload()
                        log.info("reload", **result)
                    continue
                if self._stopping:
                    raise KeyboardInterrupt
                self.stop()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, SiteError):
        return f"site: {exc.kind}: {exc.message}"
    return str(exc)


def _one_site(workflows: Iterable[Workflow]) -> tuple[str | None, str | None]:
    """The site the service acts on: the (first) url or lab the definitions name."""
    url = lab = None
    for wf in workflows:
        url = url or wf.site.url
        lab = lab or wf.site.lab
    return url, lab


class ServeError(Exception):
    """The service cannot start (no folder of definitions)."""


async def serve(
    folder: Path,
    *,
    store: Path,
    site_url: str | None = None,
    token_file: str | None = None,
    speed: float = 1.0,
    clock: WallClock | None = None,
    signals: bool = True,
    on_scheduler: Any = None,
    face: Any = None,
) -> StopReport:
    """`flowcopy serve`: one site, one engine, the scheduler, signals; returns after a stop."""
    from flowcopy import runner

    folder = Path(folder)
    if not folder.is_dir():
        raise ServeError(f"{folder}: no such folder of workflow definitions")
    good, _ = load_folder(folder)
    if not good:  # a definition problem never stops the service: it is logged, a reload may fix it
        log.error("no valid workflow definition yet; serving, waiting for a reload (SIGHUP)", folder=str(folder))
    url, lab = _one_site(good.values())
    local = runner.local_dir(store)
    local.mkdir(parents=True, exist_ok=True)
    async with runner.open_site(store, site_url or url, token_file, lab=lab, speed=speed) as site:
        async with runner.open_engine(store, site, site_label=runner.site_label(store, site_url or url)) as engine:
            await site.now()  # an unreachable site fails here, before anything starts
            if clock is None:
                # an accelerated cron clock goes on from the latest slot the journal holds,
                # so a restart neither fires a slot again nor jumps back in cron time
                start = max([datetime.now(UTC), *(datetime.fromisoformat(s["slot"]) for s in engine.journal.slots())])
                clock = SystemClock() if speed == 1.0 else TrioClock.starting_at(start, speed)
            scheduler = Scheduler(folder, engine, clock=clock, store=local)
            if on_scheduler is not None:
                on_scheduler(scheduler)
            async with trio.open_nursery() as nursery:
                if signals:
                    await nursery.start(scheduler.watch_signals)
                if face is not None:  # the service's HTTP face and systemd notifications, listening first
                    await nursery.start(face, scheduler)
                report = await scheduler.run()
                nursery.cancel_scope.cancel()
            return report


def pause(store: Path, name: str, paused: bool, known: Iterable[str] | None = None) -> bool:
    """`flowcopy pause|unpause NAME`: validated name, atomic write; True if it changed.

    With `known` (the workflows of the service's folder and of the journal), a name that
    is none of them is refused with a did-you-mean: a typo must not report "paused"
    while the real workflow goes on firing. Unpausing a name that is paused is allowed.
    """
    import re

    from flowcopy.catalog import did_you_mean

    if not re.match(definitions.WORKFLOW_NAME_PATTERN, name):
        raise PauseStateError(f"{name!r} is not a workflow name (lower-case letters, digits, - _ .)")
    if known is not None:
        names = set(known)
        if name not in names and (paused or name not in read_paused(store)):
            raise PauseStateError(
                f"no workflow named {name!r}{did_you_mean(name, names)}; known: {', '.join(sorted(names)) or 'none'}"
            )
    return set_paused(store, name, paused)


__all__ = [
    "Decision",
    "PauseStateError",
    "Scheduler",
    "ServeError",
    "Situation",
    "StopReport",
    "SystemClock",
    "TrioClock",
    "WallClock",
    "decide",
    "last_fire_from_runs",
    "latest_fire",
    "load_folder",
    "next_fire",
    "pause",
    "read_paused",
    "serve",
    "set_paused",
]
