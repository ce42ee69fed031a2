"""The durable engine: runs units as persisted state machines, resumes by reconciliation.

Protocol for every step of a unit (DESIGN §3.3): fire the intent trigger on the shared
state table, make the move durable through the group-commit journal, perform the side
effect through the site, then fire and journal the outcome. So after any crash the
journal says, for every unit, which side effect may be half done, and `_reconcile`
settles it against the site before anything else happens.

The freeze window — from the guests' freeze to the start of the release — pays no
journal commit. Each commit there is an fsync (4 ms and more on a plain disk), and under
load a place in a group-commit batch behind thousands of other units' moves: time the
guests and the frozen sources hold their I/O for nothing but bookkeeping. So one intent,
`freezing` (`machine.WINDOW_INTENT`), journaled before the guests are touched, declares
the whole window: quiesce, establish every pair under the group's freeze, unfreeze and
thaw. Once the release is done, one transaction journals the window's outcome
(`machine.WINDOW_OUTCOME`, `freezing` -> `released`, with the freeze tickets and the
point in time). Why that keeps DESIGN §3.4/§4:

* Write-ahead holds: every side effect of the window is covered by a durable intent,
  and the tag and pairs (journaled at `prepared`) find what it made on the array.
* A unit found in `freezing` after a crash may stand anywhere in the window, and its
  freeze tickets are not durable, so no set of relationships it left can be proven
  consistent; resume undoes the attempt as a redo does (withdraw by tag — incremental
  relationships are resynced instead — unfreeze what no other unit holds, thaw) and
  freezes again. A redo is always safe: a crash between the release and the commit loses
  that attempt, never consistency. (`frozen`/`establishing`/`established`/`releasing`
  are only ever found in journals of earlier versions; their resumes stay.)
* No guest is left frozen, no LSS held: the engine that lives thaws and unfreezes on every
  path as before (compensation, redo, a lost journal — `_release_without_journal` sees
  the unit in `freezing`, a freeze step); the one that died leaves it to the resume.
* Histories stay paths of the table: the outcome's moves are the table's own steps.

Compensation runs only for failures the engine observed (`Exception`), never for
`trio.Cancelled` or a simulated crash: a dying engine does nothing more, exactly like a
SIGKILLed one, and the next start reconciles.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import math
import random
import secrets
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, TypeVar

import attrs
import cattrs
import structlog
import trio

from flowcopy import machine, retry, stages
from flowcopy.copywatch import RelationshipWatch
from flowcopy.holds import DEFAULT_BOUND, LssHolds
from flowcopy.journal import DataEncoder, Journal, JournalError, LeaseLost, Move, RunRow, UnitRow
from flowcopy.logs import get_logger
from flowcopy.site import api
from flowcopy.site.api import Site, SiteError
from flowcopy.stages import Pair, StageError, UnitSpec

T = TypeVar("T")

_converter = cattrs.Converter()

log = get_logger("flowcopy.engine")


def spec_to_data(spec: UnitSpec) -> dict[str, Any]:
    return _converter.unstructure(spec)


def spec_from_data(data: Mapping[str, Any]) -> UnitSpec:
    return _converter.structure(dict(data), UnitSpec)


def pairs_to_data(pairs: Sequence[Pair]) -> list[dict[str, Any]]:
    return _converter.unstructure(list(pairs))


def pairs_from_data(data: Sequence[Mapping[str, Any]]) -> list[Pair]:
    return _converter.structure(list(data), list[Pair])


@attrs.frozen
class Limits:
    """Concurrency limits (DESIGN §3.5); the freeze path never waits behind copy work."""

    units: int = 1000  # units in flight at once
    per_lss: int = 8  # concurrent copy-services commands per LSS
    array: int = 64  # concurrent copy-services commands per array
    guest_agents: int = 256  # concurrent quiesce calls
    copy: int = 64  # concurrent copy-stage workers (export/mount_check/verify)
    # units inside their freeze window at once: bounds each window under load. 8, not 32: on a quiet
    # machine 1,000 VMs take ~6.1 s instead of ~4.7 s, but the window's p99 is 45 ms instead of 160-220
    freezing: int = 8
    # of those, units with guests frozen at once (quiesce to release). Against an in-process
    # site a window is CPU and each one beside it lengthens it: at 1,000 VMs the engine CPU
    # spent inside a window is ~7 ms p50 with 8 beside each other, ~2 ms with 2 (bench). A
    # slot of `freezing` waiting for one of these has its intent journaled, its guests not
    # yet frozen. Raise it for a site whose calls wait on a network rather than the CPU.
    frozen: int = 2
    hold_bound: float = DEFAULT_BOUND  # s an LSS's frozen sources may stay held (ELB: 120 s); see holds


@attrs.define(eq=False)
class Unit:
    """A unit in memory: the state-table model plus its durable context (journaled `data`)."""

    model: machine.UnitModel
    run_id: str
    spec: UnitSpec
    data: dict[str, Any]
    holding: tuple[str, ...] = ()  # LSSs this unit counts as a CG holder of (not durable)
    hold_deadline: float = math.inf  # engine time by which its establishes must be done (holds)
    copy_left: tuple[int, int] | None = None  # (tracks out of sync, total) while copying
    loaded_at: float = -math.inf  # trio time the engine took it from the journal (resume: site truth after this)
    encoder: DataEncoder | None = attrs.field(factory=DataEncoder, repr=False)  # its data, encoded incrementally
    unsynced: Any = attrs.field(default=None, repr=False)  # its last move queued without a wait (`_RIDES`)
    policies: dict[bool, retry.Policy] = attrs.field(factory=dict, repr=False)  # retry policy, by in_window

    @property
    def state(self) -> str:
        return self.model.state

    @property
    def unit_id(self) -> str:
        return self.model.unit_id

    _pairs: tuple[object, list[Pair]] = attrs.field(default=(None, []), init=False, repr=False)  # (its journaled list, pairs)

    @property
    def pairs(self) -> list[Pair]:
        # built once per journaled list: structuring them anew on every use cost ~2% of a run
        raw = self.data.get("pairs", [])
        if self._pairs[0] is not raw:
            self._pairs = (raw, pairs_from_data(raw))
        return list(self._pairs[1])

    @property
    def tag(self) -> str:
        return str(self.data["tag"])


_RIDES = frozenset({"prepare", "prepared", "released", "copied"})
"""Moves queued for the next group commit without waiting for it (`Journal.record_soon`).
Each is followed by no side effect until the unit's next move that is waited for, which
the journal commits after it; lost in a crash, each leaves the unit where resume redoes
a step that is read-only or idempotent: prepare (read-only) from pending or preparing,
release (idempotent) from releasing, the copy wait and check (read-only) from copying.
The write-ahead rule is untouched: every intent with a side effect (freeze, establish,
release, copy, withdraw, ...) is still durable before the side effect starts. What it
buys: a unit no longer waits a commit out for these four, and "released" no longer costs
a commit inside the freeze-window limiter."""

_QUEUED = frozenset({"pending", "prepared"})
"""States with no side effect begun: nothing at the site to reconcile after a restart."""
_SETTLE_WAIT = 10.0
"""At most this long (s) do queued units wait for the reconciliation of the others."""


class EngineStopped(Exception):
    """A clean stop (SIGTERM/SIGINT) left these runs unfinished, with no guest frozen."""

    def __init__(self, runs: Sequence[str], units: int) -> None:
        super().__init__(
            f"stopped cleanly: {units} unit(s) of {len(runs)} run(s) left in flight with no guest frozen "
            "and no consistency group held; `flowcopy resume` continues them"
        )
        self.runs = tuple(runs)
        self.units = units


class JournalLost(JournalError):
    """The journal could not be written: the engine released every freeze it held (thaw
    and unfreeze need no journal write; a resume redoes them idempotently) and stopped."""


RETRY_JITTER = 0.25
"""Each retry wait is shortened by up to this fraction, at random: units that failed
together (a site restart) do not all come back in the same instant."""


class UnitFailed(Exception):
    def __init__(self, message: str, kind: str = "failed") -> None:
        super().__init__(message)
        self.kind = kind


FAILURES = (SiteError, StageError, UnitFailed, trio.TooSlowError)
"""What the engine compensates for. Not trio.Cancelled, not a crash: a dying engine stops."""


async def _take(limiter: trio.CapacityLimiter, borrower: object) -> None:
    """A token of `limiter` for `borrower`, at once if one is free (and nobody waits): a
    freeze window's steps do not each go round the scheduler behind every runnable task
    (at 1,000 VMs, a few ms a trip) only to find the limiter open."""
    try:
        limiter.acquire_on_behalf_of_nowait(borrower)
    except trio.WouldBlock:
        await limiter.acquire_on_behalf_of(borrower)


def _jittered(delay: float) -> float:
    return delay * (1.0 - RETRY_JITTER * random.random())


class StageTimeout(trio.TooSlowError):
    """A stage ran past its timeout; carries what the site last said, the real cause."""

    def __init__(self, stage: str, timeout: float, attempts: int, last_error: BaseException | None, *,
                 in_flight: bool = False) -> None:
        cause = ""
        if in_flight:
            cause = "; the site had not answered the call in flight"
        if last_error is not None:
            cause += f"; last error: {stages.describe(last_error)}"
        super().__init__(f"stage {stage} exceeded its {timeout:g} s timeout after {attempts} attempt(s){cause}")
        self.stage, self.last_error = stage, last_error


def retry_policy(spec: UnitSpec) -> retry.Policy:
    return retry.Policy(attempts=spec.retry_max_attempts, initial=spec.retry_initial, backoff=spec.retry_backoff,
                        max_interval=spec.retry_max_interval, non_retryable=tuple(spec.non_retryable))


WINDOW_RETRY_INITIAL = 0.05
"""s: the first wait of a retry while guests and array sources are held."""


def window_policy(spec: UnitSpec, budget: float) -> retry.Policy:
    """Inside a freeze window every second of backoff is a second of held I/O, and a wait
    of the idle stages' length (up to 15 s by default) alone outlasts the time a unit has
    for its establishes (`budget`, a third of the window's bound): there a transient error
    is retried at once and often, each wait at most a tenth of the budget, so the retries
    fit inside the window instead of overrunning it."""
    base = retry_policy(spec)
    return attrs.evolve(base, initial=min(base.initial, WINDOW_RETRY_INITIAL), max_interval=min(base.max_interval, budget / 10))


def reason_of(exc: BaseException, unit: Unit) -> str:
    if isinstance(exc, StageTimeout):
        return str(exc)
    if isinstance(exc, trio.TooSlowError):
        return f"stage {unit.state} exceeded its timeout"
    return stages.describe(exc)


@attrs.frozen
class RunSummary:
    run_id: str
    workflow: str
    state: str
    units: Mapping[str, int]  # count per terminal state
    verified: bool
    failures: Mapping[str, str]  # unit -> reason
    elapsed: float
    longest_hold: float = 0.0  # longest LSS hold of this engine so far, freeze to unfreeze (s)
    vms: Mapping[str, tuple[str, ...]] = attrs.field(factory=dict)  # failed unit -> its VMs

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "workflow": self.workflow,
            "state": self.state,
            "units": dict(self.units),
            "verified": self.verified,
            "failures": dict(self.failures),
            "failed_vms": {unit: list(vms) for unit, vms in self.vms.items()},
            "elapsed_s": round(self.elapsed, 3),
            "longest_lss_hold_s": round(self.longest_hold, 3),
        }


class Engine:
    """Drives the units of one store's runs against one site."""

    def __init__(
        self,
        journal: Journal,
        site: Site,
        *,
        store: Path,
        limits: Limits | None = None,
        poll: float = 1.0,
        site_label: str | None = None,
    ) -> None:
        self.journal = journal
        self.site = site
        if journal.leased:  # several engines share the journal: side effects inside the lease
            from flowcopy.cluster import FencedSite

            self.site = FencedSite(site, journal)  # type: ignore[assignment]
        self.site_label = site_label  # journaled with each run: which site it acted on
        self.store = store
        self.limits = limits or Limits()
        self.poll = poll
        # one relationship query per poll for every unit waiting on its copy, and one for
        # every unit a resume reconciles (copywatch): not one query per unit
        self._rels = RelationshipWatch(self.site, poll)
        self.units: dict[str, Unit] = {}
        self._unit_limiter = trio.CapacityLimiter(self.limits.units)
        self._guest_limiter = trio.CapacityLimiter(self.limits.guest_agents)
        self._array_limiter = trio.CapacityLimiter(self.limits.array)
        self._copy_limiter = trio.CapacityLimiter(self.limits.copy)
        self._window_limiter = trio.CapacityLimiter(self.limits.freezing)
        self._frozen_limiter = trio.CapacityLimiter(min(self.limits.frozen, self.limits.freezing))
        self._lss_limiters: dict[str, trio.CapacityLimiter] = {}
        self._holds = LssHolds(self.limits.hold_bound)
        if journal.leased:
            from flowcopy.cluster import SharedLssHolds

            self._holds = SharedLssHolds(journal, self.limits.hold_bound)
        self._vm_lock: dict[str, trio.Lock] = {}
        self._scopes: dict[str, trio.CancelScope] = {}
        self._cancelled_runs: set[str] = set()
        self._stopping = False
        self._in_window: set[str] = set()  # units between freeze and release: a stop waits for them
        # freeze-to-release seconds of trio time, per unit; bounded for a long-running service
        self.freeze_windows: deque[float] = deque(maxlen=100_000)
        # leased journals (several engines): the units this engine drives, their lease scopes
        self._claimed: dict[str, trio.CancelScope] = {}
        self._driven_runs: set[str] = set()
        self.claim_batch = 16
        """Units taken per claim: small, so engines with capacity share a big run."""
        self.units_done = 0
        """Units this engine drove to a terminal state (its share of the work)."""
        self.units_lost = 0
        """Units this engine stopped driving because its lease on them was lost."""
        self._journal_lost: JournalError | None = None  # set once: every unit releases and stops
        # resumed units with a side effect in flight, until their first move: queued units wait
        self._settling: set[str] = set()
        self._settled = trio.Event()
        self._release_failures: list[str] = []
        self._begun: dict[str, list[tuple[UnitRow, UnitSpec]]] = {}  # runs begun here, until driven
        self.observers: list[Any] = []
        """Watchers of what only the engine sees (the service's metrics): objects with any
        of on_commit(seconds), on_freeze_window(seconds), on_retry(stage, kind),
        on_lost_freeze(unit_id), on_reconciled(unit_id), on_run_finished(summary). Called inline; must not block."""

    def _observe(self, event: str, *args: Any) -> None:
        for observer in self.observers:
            hook = getattr(observer, event, None)
            if hook is not None:
                hook(*args)

    # ------------------------------------------------------------------ journal helpers

    async def _move(self, unit: Unit, *triggers: str, data: Mapping[str, Any] | None = None, payload: Mapping[str, Any] | None = None) -> None:
        """Fire triggers in order and make all the moves durable in one group commit (the
        moves of `_RIDES` only queued for it: see there)."""
        if data:
            unit.data.update(data)
        moves = []
        last = len(triggers) - 1
        for i, trigger in enumerate(triggers):
            before, after = machine.fire(unit.model, trigger)
            moves.append(
                Move(
                    unit_id=unit.unit_id,
                    from_state=before,
                    to_state=after,
                    event=trigger,
                    payload=dict(payload) if payload and i == last else {},
                    data=dict(unit.data) if i == last and data else None,  # only when it changed
                )
            )
        journal = self.journal
        if last == 0 and triggers[0] in _RIDES:
            unit.unsynced = journal.record_soon(moves, encoder=unit.encoder)
        else:
            started = time.perf_counter()
            try:
                if last == 0:
                    await journal.record(moves[0], encoder=unit.encoder)
                else:
                    await journal.record_many(moves, encoder=unit.encoder)
            except JournalError:
                self._raise_unsynced(unit)  # the root cause, when a move queued before was refused
                raise
            self._raise_unsynced(unit)
            if self.observers:
                self._observe("on_commit", time.perf_counter() - started)
        if self._settling:
            self._settle(unit.unit_id)
        for move in moves:  # logged once each, as it is made durable (or queued for it)
            log.info("transition", trigger=move.event, from_state=move.from_state, to_state=move.to_state, **move.payload)

    @staticmethod
    def _raise_unsynced(unit: Unit) -> None:
        """After a waited write: the moves queued before it are settled (the journal commits
        in order); raise what refused them, if anything did."""
        req, unit.unsynced = unit.unsynced, None
        if req is not None and req.done.is_set() and req.error is not None:
            raise req.error

    async def _synced(self, unit: Unit) -> None:
        """Wait for the unit's queued moves, so a unit's task never ends before its journal
        state is durable (a clean stop, the run's summary read right after)."""
        req, unit.unsynced = unit.unsynced, None
        if req is not None:
            await self.journal.settled(req)

    # ------------------------------------------------------------------ runs

    async def begin_run(self, workflow: str, definition: Mapping[str, Any], specs: Sequence[UnitSpec], *, number: int | None = None) -> str:
        """Journal a new run and its units (one transaction) before anything touches the site."""
        number = number if number is not None else self.journal.next_run_number(workflow)
        run_id = f"{workflow}-{number:04d}-{secrets.token_hex(2)}"
        now = time.time()
        rows = []
        unit_specs = []
        for i, spec in enumerate(specs):
            unit_id = f"{run_id}/{i:05d}"
            spec = attrs.evolve(spec, unit_id=unit_id)
            unit_specs.append(spec)
            data = {"spec": spec_to_data(spec), "tag": f"fc:{run_id}:{i}", "run_number": number, "freeze_attempts": 0}
            rows.append(UnitRow(unit_id=unit_id, run_id=run_id, state="pending", data=data, updated=now, seq=0))
        run = RunRow(
            run_id=run_id,
            workflow=workflow,
            definition=dict(definition),
            state="running",
            created=now,
            finished=None,
            number=number,
            cancel_requested=False,
            site=self.site_label,
        )
        # on a shared journal the units are claimed like any others, so engines share them
        if self.journal.leased:
            self._driven_runs.add(run_id)  # driven by whoever begun it (follow_runs must not start it twice)
        await self.journal.begin_run(run, rows, hold=not self.journal.leased)
        if not self.journal.leased:  # what drive_run would read back and decode (one engine moves them)
            self._begun[run_id] = list(zip(rows, unit_specs))
        log.info("run begun", run=run_id, workflow=workflow, units=len(rows))
        return run_id

    async def begin_failed_run(self, workflow: str, definition: Mapping[str, Any], reason: str) -> str:
        """Journal a run that could not be planned as failed, with the reason, and no units:
        `status`, `describe` and the service see that the slot fired and why it did nothing."""
        number = self.journal.next_run_number(workflow)
        run_id = f"{workflow}-{number:04d}-{secrets.token_hex(2)}"
        now = time.time()
        run = RunRow(run_id=run_id, workflow=workflow, definition=dict(definition), state="failed", created=now,
                     finished=now, number=number, cancel_requested=False, site=self.site_label, error=reason)
        await self.journal.begin_run(run, [])
        log.error("run could not be planned", run=run_id, workflow=workflow, reason=reason)
        return run_id

    def _load(self, row: UnitRow, spec: UnitSpec | None = None) -> Unit:
        """The unit of a journal row (`spec`: its spec when the caller has it structured)."""
        unit = self.units.get(row.unit_id)
        if unit is None:
            model = machine.UnitModel(unit_id=row.unit_id, state=row.state)
            machine.attach(model)
            unit = Unit(model=model, run_id=row.run_id, spec=spec if spec is not None else spec_from_data(row.data["spec"]),
                        data=dict(row.data), loaded_at=trio.current_time())
            self.units[row.unit_id] = unit
        return unit

    async def drive_run(self, run_id: str, *, rows: Sequence[UnitRow] | None = None) -> RunSummary:
        """Drive every unfinished unit of a run to a terminal state, then close the run.
        `rows`: its unfinished units when the caller has just read them (resume)."""
        if self.journal.leased:
            return await self._drive_run_leased(run_id)
        started = trio.current_time()
        begun = self._begun.pop(run_id, None)
        specs: dict[str, UnitSpec] = {}
        if rows is None and begun is not None:
            # a run this engine has just begun: its rows as journaled, their specs structured
            rows = [row for row, _ in begun]
            specs = {row.unit_id: spec for row, spec in begun}
        elif rows is None:
            rows = self.journal.units(run_id, unfinished=True)
        # after a restart, units whose side effect may be half done are settled first
        # (module docstring); units that had not started theirs wait for that, so they do
        # not take freezes, the journal and the loop from the reconciliation
        acting = [r for r in rows if r.state not in _QUEUED]
        queued = [r for r in rows if r.state in _QUEUED]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_cancel, run_id)
            async with trio.open_nursery() as units:
                self._settling.update(r.unit_id for r in acting)
                for row in acting:
                    units.start_soon(self._drive_unit, self._load(row))
                units.start_soon(self._start_queued, units, queued, specs)
            nursery.cancel_scope.cancel()
        if self._journal_lost is not None:
            raise self._journal_lost_error()
        if self._stopping:
            left = [u for u in self.journal.units(run_id) if u.state not in machine.TERMINAL]
            if left:
                raise EngineStopped([run_id], len(left))
        summary = await self._finish_run(run_id, trio.current_time() - started)
        await self._after_run(run_id)
        return summary

    def _settle(self, unit_id: str) -> None:
        """A resumed unit's intent is settled against the site: it made its first move, or
        (copying) its relationships were seen in a query made after the restart."""
        if unit_id not in self._settling:
            return
        self._settling.discard(unit_id)
        self._observe("on_reconciled", unit_id)
        if not self._settling:
            self._settled.set()
            self._settled = trio.Event()

    async def _start_queued(self, units: trio.Nursery, rows: Sequence[UnitRow], specs: Mapping[str, UnitSpec] | None = None) -> None:
        """Start units that had no side effect in flight once every resumed unit that had
        one made its first move (bounded: a unit retrying against an unreachable site
        does not hold the rest back for long)."""
        if rows and self._settling:
            with trio.move_on_after(_SETTLE_WAIT):
                await self._settled.wait()
        specs = specs or {}
        for row in rows:
            units.start_soon(self._drive_unit, self._load(row, specs.get(row.unit_id)))

    async def _after_run(self, run_id: str) -> None:
        """Retention after each backup run (`flowcopy run` and the service alike). A
        retention problem is logged, never the run's failure: the backup itself is fine."""
        from flowcopy.backups import forget

        try:
            await forget.after_run(self, run_id)
        except Exception as exc:  # noqa: BLE001 - the run's outcome stands; the reason is logged
            log.warning("retention not applied", run=run_id, error=f"{type(exc).__name__}: {exc}")

    def stop(self) -> None:
        """Clean stop: no new freezes; units inside a freeze window finish their release;
        every other unit stops where it is (its journal state is resumable as it stands)."""
        if self._stopping:
            return
        self._stopping = True
        log.warning("stopping: no new freezes, freeze windows finish their release")
        for unit_id, scope in list(self._scopes.items()):
            if unit_id not in self._in_window:
                scope.cancel()

    async def _finish_run(self, run_id: str, elapsed: float) -> RunSummary:
        rows = self.journal.units(run_id)
        counts = Counter(r.state for r in rows)
        failures = {r.unit_id: str(r.data.get("error", "")) for r in rows if r.state != "succeeded"}
        vms = {r.unit_id: tuple(r.data.get("spec", {}).get("vms", ())) for r in rows if r.state != "succeeded"}
        verified = bool(rows) and all(r.state == "succeeded" and r.data.get("verified") is True for r in rows)
        if counts.get("succeeded", 0) == len(rows):
            state = "succeeded"
        elif run_id in self._cancelled_runs or self.journal.run(run_id).cancel_requested:
            state = "cancelled"
        elif counts.get("succeeded", 0) == 0:
            state = "failed"
        else:
            state = "partial"
        await self.journal.finish_run(run_id, state)
        self._cancelled_runs.discard(run_id)
        for row in rows:
            unit = self.units.pop(row.unit_id, None)
            if unit is not None:
                machine.detach(unit.model)
        run = self.journal.run(run_id)
        longest = self._holds.longest_seen
        log.info("run finished", run=run_id, state=state, units=dict(counts), verified=verified,
                 longest_lss_hold_s=round(longest, 3), longest_hold_lss=self._holds.longest_lss,
                 hold_bound_s=self._holds.bound)
        summary = RunSummary(run_id, run.workflow, state, dict(counts), verified, failures, elapsed, longest, vms)
        self._observe("on_run_finished", summary)
        return summary

    async def resume(self) -> list[RunSummary]:
        """Reconcile and finish every run the journal holds unfinished (what run/serve do first)."""
        # Loading thousands of units at once sets off full garbage collections that walk
        # everything already alive (an in-process site model is millions of objects): a
        # third of a 2,000-unit reconciliation. What lives now outlives the resume, so the
        # collector is told to skip it until the resume is over; frozen before the journal
        # is read, whose 10,000 decoded rows alone set off several of those collections.
        gc.freeze()
        frozen = True
        try:
            unfinished = self.journal.unfinished_units()
            if len(unfinished) < 1000:
                gc.unfreeze()
                frozen = False
            run_ids = sorted({row.run_id for row in unfinished} | {r.run_id for r in self.journal.runs() if r.state == "running"})
            if not run_ids:
                return []
            log.info("resuming", runs=len(run_ids), units=len(unfinished))
            results: dict[str, RunSummary] = {}

            by_run: dict[str, list[UnitRow]] = {}
            for row in unfinished:
                by_run.setdefault(row.run_id, []).append(row)

            async def one(run_id: str) -> None:
                # the rows just read: decoding 10,000 units' data twice cost seconds of a restart
                results[run_id] = await self.drive_run(run_id, rows=by_run.get(run_id, []) if not self.journal.leased else None)

            # Even with the old objects frozen, the collector walks the units being loaded
            # again and again as they grow by a quarter (a third of the CPU of reconciling
            # 10,000): they all live on, so it waits until every unit with a side effect in
            # flight has settled (bounded), then they are frozen too.
            pause = frozen and not self.journal.leased and gc.isenabled() and any(r.state not in _QUEUED for r in unfinished)
            if pause:
                gc.disable()
            try:
                async with trio.open_nursery() as outer:
                    if pause:
                        outer.start_soon(self._collect_once_settled)
                    async with trio.open_nursery() as nursery:
                        for run_id in run_ids:
                            nursery.start_soon(one, run_id)
                    outer.cancel_scope.cancel()
            finally:
                if pause and not gc.isenabled():
                    gc.enable()
        finally:
            if frozen:
                gc.unfreeze()
        return [results[r] for r in run_ids]

    async def _collect_once_settled(self) -> None:
        """The garbage collector back on once the resumed units have settled (resume)."""
        with trio.move_on_after(_SETTLE_WAIT):
            while True:
                await self._settled.wait()  # set each time the last unsettled unit settles
                if not self._settling:
                    break
        gc.freeze()  # the units just loaded live for the run, as what was frozen before
        gc.enable()

    # ------------------------------------------------------------------ several engines

    async def keep_leases(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Renew this engine's lease (one statement for all its units) every third of the
        lease period; move every claimed unit's deadline with it. A renewal that finds
        the lease expired (a pause longer than the lease) drops every unit at once."""
        from flowcopy.cluster import engine_checks_lease, renew_every, side_effect_deadline

        task_status.started()
        while True:
            await trio.sleep(renew_every(self.journal))
            try:
                held = await self.journal.renew()
            except Exception as exc:  # noqa: BLE001 - the deadlines stop the units in time
                log.warning("lease renewal failed", error=str(exc))
                continue
            if not held:
                log.warning("lease expired before renewal: every unit of this engine is lost", units=len(self._claimed))
                for scope in self._claimed.values():
                    if engine_checks_lease():  # else (chaos) the units go on: the fences must stop them
                        scope.cancel()
            deadline = side_effect_deadline(self.journal)
            for scope in self._claimed.values():
                scope.deadline = deadline
            extend = getattr(self.site, "extend", None)
            if extend is not None:
                extend(deadline)

    async def _drive_run_leased(self, run_id: str) -> RunSummary:
        """Claim this run's units in small batches while this engine has capacity, drive
        each inside its lease, until no unit of the run is unfinished (other engines may
        hold some: their lease running out makes them claimable here)."""
        started = trio.current_time()
        from flowcopy.cluster import side_effect_deadline

        poll = min(0.2, self.journal.lease_period / 20)
        self._driven_runs.add(run_id)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_cancel, run_id)
                async with trio.open_nursery() as units:
                    while True:
                        mine = sum(1 for u in self._claimed if u.startswith(run_id + "/"))
                        free = self.limits.units - len(self._claimed)
                        if not self._stopping and free > 0:
                            rows = await self.journal.claim(run_id=run_id, limit=min(free, self.claim_batch))
                            for row in rows:
                                self._claimed[row.unit_id] = trio.CancelScope(deadline=side_effect_deadline(self.journal))
                                units.start_soon(self._drive_claimed, row)
                            # one batch per poll: engines that see the run share its units
                        if self._stopping and not mine:
                            break
                        if not mine and not self._unfinished(run_id):
                            break
                        await trio.sleep(poll)
                nursery.cancel_scope.cancel()
        finally:
            self._driven_runs.discard(run_id)
        if self._stopping:
            left = self._unfinished(run_id)
            if left:
                raise EngineStopped([run_id], left)
        if self.journal.run(run_id).state == "running":
            return await self._finish_run(run_id, trio.current_time() - started)
        rows = self.journal.units(run_id)  # another engine closed the run first
        run = self.journal.run(run_id)
        verified = bool(rows) and all(r.state == "succeeded" and r.data.get("verified") is True for r in rows)
        return RunSummary(run_id, run.workflow, run.state, dict(Counter(r.state for r in rows)), verified,
                          {r.unit_id: str(r.data.get("error", "")) for r in rows if r.state != "succeeded"},
                          trio.current_time() - started)

    def _unfinished(self, run_id: str) -> int:
        return self.journal.unfinished_count(run_id)

    async def _drive_claimed(self, row: UnitRow) -> None:
        """Drive a claimed unit from its journal row (reconciling an intent state exactly
        as resume does), inside its lease scope; a lost lease stops it where it is."""
        from flowcopy.cluster import driving

        old = self.units.pop(row.unit_id, None)  # a unit claimed again: its journal row is the truth
        if old is not None:
            machine.detach(old.model)
        unit = self._load(row)
        scope = self._claimed[row.unit_id]
        lost: LeaseLost | None = None
        try:
            with scope, driving(row.unit_id, self.journal.fence_epoch(row.unit_id)):
                try:
                    await self._drive_unit(unit)
                except BaseExceptionGroup as group:
                    leases, rest = group.split(LeaseLost)
                    if rest is not None:
                        raise rest from None
                    lost = leases.exceptions[0] if leases else None  # type: ignore[assignment]
                except LeaseLost as exc:
                    lost = exc
        finally:
            self._claimed.pop(row.unit_id, None)
            if unit.holding:  # counted as an LSS holder here: no site call, just the count
                self._holds.unfrozen(self._holds.release(unit.holding))
                unit.holding = ()
            self.units.pop(row.unit_id, None)
            machine.detach(unit.model)
        if lost is not None or scope.cancelled_caught and unit.state not in machine.TERMINAL:
            self.units_lost += 1
            self.journal.forget(row.unit_id)
            with trio.move_on_after(5), contextlib.suppress(Exception):
                # claimable again at once if our lease still runs (a deadline cut a long call)
                await self.journal.release([row.unit_id])
            log.warning("lease lost: this engine stops driving the unit", unit=row.unit_id, state=unit.state,
                        why=lost.why if lost is not None else "lease deadline passed")
        elif unit.state in machine.TERMINAL:
            self.units_done += 1
        elif self._stopping:
            await self.journal.release([row.unit_id])

    async def follow_runs(self, on_summary: Callable[[RunSummary], None] | None = None) -> None:
        """For a service on a shared journal: keep taking part in every running run, so
        runs begun by an engine that died (or by any other) are finished here too."""
        async def one(run_id: str) -> None:
            try:
                summary = await self.drive_run(run_id)
            except EngineStopped:
                return
            if on_summary is not None:
                on_summary(summary)

        async with trio.open_nursery() as nursery:
            while not self._stopping:
                for run in self.journal.unfinished_runs():
                    if run.run_id not in self._driven_runs:
                        self._driven_runs.add(run.run_id)
                        nursery.start_soon(one, run.run_id)
                await trio.sleep(min(1.0, self.journal.lease_period / 10))

    async def cancel(self, run_id: str) -> None:
        await self.journal.request_cancel(run_id)
        self._cancel_units(run_id)

    def _cancel_units(self, run_id: str) -> None:
        self._cancelled_runs.add(run_id)
        for unit_id, scope in list(self._scopes.items()):
            if unit_id.startswith(run_id + "/"):
                scope.cancel()

    async def _watch_cancel(self, run_id: str) -> None:
        """Pick up `flowcopy cancel RUN` written by another process into the journal."""
        while True:
            if run_id not in self._cancelled_runs and self.journal.run(run_id).cancel_requested:
                log.info("cancel requested", run=run_id)
                self._cancel_units(run_id)
            await trio.sleep(self.poll)

    # ------------------------------------------------------------------ one unit

    async def _drive_unit(self, unit: Unit) -> None:
        # every log line of this unit's task (and the tasks it starts) carries these. Bound
        # in the task's own context (trio runs each task in a copy of its spawner's), so
        # nothing needs unbinding: bound_contextvars' restore cost ~50 us a unit.
        structlog.contextvars.bind_contextvars(run=unit.run_id, unit=unit.unit_id, vm=",".join(unit.spec.vms))
        await self._drive_unit_bound(unit)

    async def _drive_unit_bound(self, unit: Unit) -> None:
        async with self._unit_limiter:
            try:
                await self._drive_unit_journaled(unit)
            except JournalError as exc:
                self._lose_journal(exc)
            finally:
                if unit.unit_id in self._settling:  # stopped or failed before its first move
                    self._settle(unit.unit_id)
            if self._journal_lost is not None:
                await self._release_without_journal(unit)

    async def _drive_unit_journaled(self, unit: Unit) -> None:
        outcome: str | None = None
        reason = ""
        with trio.CancelScope() as scope:
            self._scopes[unit.unit_id] = scope
            if unit.run_id in self._cancelled_runs or self._stopping or self._journal_lost is not None:
                scope.cancel()
            try:
                await self._forward(unit)
            except FAILURES as exc:
                outcome, reason = "failed", reason_of(exc, unit)
        self._scopes.pop(unit.unit_id, None)
        if self._journal_lost is not None:
            return  # nothing more is journaled: the caller releases what this unit holds
        if scope.cancelled_caught and unit.run_id in self._cancelled_runs:
            outcome, reason = "cancelled", "cancelled by request"
        if outcome is not None and unit.state not in machine.TERMINAL:
            await self._compensate(unit, outcome, reason)
        await self._synced(unit)
        unit.encoder = None  # its last data is written: drop the encodings it kept

    # ---- the journal cannot be written (disk full, I/O error)

    def _lose_journal(self, exc: JournalError) -> None:
        """First journal write that failed: stop every unit where it is, so each one
        releases its freezes (no guest left frozen, no LSS left in long busy) and nothing
        else happens that the journal would not know about."""
        if self._journal_lost is not None:
            return
        self._journal_lost = exc
        log.error("journal cannot be written: releasing every freeze and stopping", error=str(exc))
        for scope in list(self._scopes.values()):
            scope.cancel()

    async def _release_without_journal(self, unit: Unit) -> None:
        """Thaw the unit's guests and unfreeze its LSSs if it may hold any; no journal write.

        Safe because both are idempotent and the journal still says where the unit was
        (its last durable state): a resume thaws, unfreezes and redoes from there.
        """
        step = machine.STAGES[unit.state].step if unit.state in machine.STAGES else None
        if not unit.holding and step not in ("freeze", "establish", "release") and unit.state != "compensating":
            return
        with trio.CancelScope(shield=True), trio.move_on_after(self._release_bound(unit)) as bounded:
            for attempt in range(1, 100):
                try:
                    await self._unhold(unit)
                    await stages.thaw_all(self.site, unit.spec)
                    log.warning("released without a journal write", unit=unit.unit_id, state=unit.state)
                    return
                except SiteError as exc:
                    if not exc.transient:
                        self._release_failures.append(f"{unit.unit_id}: {stages.describe(exc)}")
                        return
                    await trio.sleep(_jittered(min(unit.spec.retry_initial * 2 ** (attempt - 1), unit.spec.retry_max_interval)))
        if bounded.cancelled_caught:
            self._release_failures.append(f"{unit.unit_id}: the site did not answer the thaw/unfreeze in time")

    @staticmethod
    def _release_bound(unit: Unit) -> float:
        return float(max(30.0, unit.spec.timeouts.get("release", 60.0)))

    def _journal_lost_error(self) -> JournalLost:
        assert self._journal_lost is not None
        if self._release_failures:
            released = ("the engine stopped; it could not release every freeze (" + "; ".join(self._release_failures[:3])
                        + "): those guests thaw themselves after their freeze timeout, the array after its ELB timeout")
        else:
            released = "the engine stopped after thawing every guest and unfreezing every consistency group it held"
        return JournalLost(f"{self._journal_lost}: {released}; free space (or fix the disk) under {self.store}, "
                           "then `flowcopy resume` finishes the run")

    async def _forward(self, unit: Unit) -> None:
        """Walk the state table from wherever the journal left this unit."""
        while unit.state not in machine.TERMINAL:
            state = unit.state
            steps = self._steps if unit.spec.restore is None else _restore_steps()
            step = steps.get(state)
            if step is None:  # compensating after a crash
                await self._compensate(unit, unit.data.get("outcome", "failed"), unit.data.get("error", "resumed compensation"))
                return
            await step(self, unit)

    async def _stage(self, unit: Unit, name: str, fn: Callable[[], Awaitable[T]], *, in_window: bool = False) -> T:
        """Run one side effect with the unit's stage timeout and retry policy (the freeze
        window's quick one while guests and sources are held)."""
        spec = unit.spec
        timeout = spec.timeouts.get(name, math.inf)
        errors: list[BaseException] = []

        def on_retry(attempt: int, exc: BaseException, wait: float) -> None:
            log.warning("retrying", stage=name, attempt=attempt, error=stages.describe(exc), wait_s=round(wait, 3))
            self._observe("on_retry", name, getattr(exc, "kind", type(exc).__name__))

        started = 0

        async def attempt() -> T:
            nonlocal started
            started += 1
            return await fn()

        # a bare deadline scope (what trio.fail_after wraps in a generator context manager),
        # and the stage named on the one line logged here rather than bound per call: both
        # cost more than the side effect itself against the in-process site (flowcopy bench)
        with trio.CancelScope(deadline=trio.current_time() + timeout):
            policy = unit.policies.get(in_window)
            if policy is None:
                policy = unit.policies[in_window] = window_policy(spec, self._holds.admission) if in_window else retry_policy(spec)
            return await retry.call(attempt, policy, on_retry=on_retry, on_error=errors.append)
        last = errors[-1] if errors else None  # only reached when the deadline cancelled the stage
        raise StageTimeout(name, timeout, started, last, in_flight=started > len(errors)) from last

    def _lss_limiter(self, lss: str) -> trio.CapacityLimiter:
        limiter = self._lss_limiters.get(lss)
        if limiter is None:
            limiter = self._lss_limiters[lss] = trio.CapacityLimiter(self.limits.per_lss)
        return limiter

    # ---- steps: one per non-terminal, non-intent state; intent states resume via reconcile

    async def _step_pending(self, unit: Unit) -> None:
        await self._move(unit, "prepare")
        await self._do_prepare(unit)

    async def _do_prepare(self, unit: Unit) -> None:
        pairs = await self._stage(unit, "prepare", lambda: stages.prepare(self.site, unit.spec, int(unit.data["run_number"]), unit.tag))
        await self._move(unit, "prepared", data={"pairs": pairs_to_data(pairs)})

    async def _step_prepared(self, unit: Unit) -> None:
        attempts = int(unit.data.get("freeze_attempts", 0))
        lost = int(unit.data.get("freezes_lost", 0))
        if lost >= unit.spec.max_freeze_attempts:
            # only freezes seen lost count: a redo because the engine died is not the guest's fault
            raise UnitFailed(
                f"gave up after {lost} lost freezes: {unit.data.get('last_freeze_problem', 'freeze lost')}",
                kind="freeze_lost",
            )
        outcome = None
        async with self._window_limiter:
            # the intent's commit inside the slot: a slot waiting for it is no window in
            # flight, and the limiter paces the units the journal wakes (many at once, each
            # of them steps a freeze window would wait behind)
            if self._stopping:
                return await self._stop_here(unit)
            with self._window(unit):
                async with self._vm_locks(unit):
                    await self._move(unit, "freeze", data={"freeze_attempts": attempts + 1, "freezes": {}})
                    async with self._frozen_limiter:
                        if self._stopping:  # no new freeze: the intent steps back, nothing began
                            await self._move(unit, "redo", payload={"problem": "stopped before the guests were frozen"})
                            return await self._stop_here(unit)
                        outcome = await self._freeze_establish_release(unit)
        if outcome is not None:
            # the guests run again: the window's one commit holds no slot and no VM lock
            with self._window(unit):  # a clean stop lets it finish
                await self._move(unit, *machine.WINDOW_OUTCOME, data=outcome)
        if self._stopping:
            await self._stop_here(unit)

    @asynccontextmanager
    async def _vm_locks(self, unit: Unit) -> AsyncIterator[None]:
        """One freeze window per VM at a time: two runs that share a VM (overlapping
        schedules, a resumed run beside a new one) would otherwise thaw each other's freeze."""
        locks = [self._vm_lock.setdefault(vm, trio.Lock()) for vm in sorted(set(unit.spec.vms))]
        for lock in locks:
            await lock.acquire()
        try:
            yield
        finally:
            for lock in reversed(locks):
                lock.release()

    @contextmanager
    def _window(self, unit: Unit) -> Iterator[None]:
        """Mark a stretch in which a guest may be frozen: a clean stop lets it finish."""
        self._in_window.add(unit.unit_id)
        try:
            yield
        finally:
            self._in_window.discard(unit.unit_id)

    async def _stop_here(self, unit: Unit) -> None:
        """Leave the unit where the journal has it: cancel its own scope and yield."""
        scope = self._scopes.get(unit.unit_id)
        if scope is not None:
            scope.cancel()
        await trio.lowlevel.checkpoint()

    async def _freeze_establish_release(self, unit: Unit) -> dict[str, Any] | None:
        """The hot path: freeze, establish, release — never queued behind copy work, and
        no journal write between the guests' freeze and the release (module docstring).

        Returns what the window's outcome journals, or None when the attempt was redone
        or the unit compensated. A failure here is compensated at once (thaw, unfreeze,
        withdraw), before anything else of this unit happens, so no guest waits on it.
        """
        try:
            unit.pairs  # decoded (and cached) now: the first decode of a process costs ms, not inside the window
            if unit.spec.kind == "restore":
                freezes = await self._stage(unit, "freeze", lambda: self._restore_quiesce(unit))
            else:
                freezes = await self._stage(unit, "freeze", lambda: stages.freeze(self.site, unit.spec, self._guest_limiter))
            t0 = trio.current_time()  # the guests are frozen from here to the thaw in release
            # every guest of the group is quiesced: only now may the array freeze begin
            await self._hold(unit)
            return await self._establish_and_release(unit, t0, freezes)
        except FAILURES as exc:
            await self._compensate(unit, "failed", reason_of(exc, unit))
            return None

    async def _hold(self, unit: Unit) -> None:
        """Count the unit as a holder of its consistency group's LSSs (see `holds`): from
        right before its first establish with freeze, never while its guests quiesce."""
        if not unit.holding and stages.needs_array_freeze(unit.spec, unit.pairs):
            lsses = stages.frozen_lsses(unit.pairs)
            unit.hold_deadline = await self._holds.acquire(lsses)
            unit.holding = tuple(lsses)

    async def _unhold(self, unit: Unit) -> None:
        """Unfreeze the unit's LSSs that no other unit of this engine still holds."""
        if unit.holding:
            free = self._holds.release(unit.holding)
            unit.holding = ()
            unit.hold_deadline = math.inf
        elif stages.needs_array_freeze(unit.spec, unit.pairs):
            # resumed or compensating without a hold: release only what nobody holds
            free = await self._holds.claim_unheld(stages.frozen_lsses(unit.pairs))
        else:
            return
        try:
            if free:
                with api.fence_scope(*self._holds.fences(free)):  # several engines: the site fences the LSS too
                    await self.site.unfreeze(free)
        finally:
            self._holds.unfrozen(free)

    async def _restore_quiesce(self, unit: Unit) -> dict[str, int]:
        ids: dict[str, int] = {}
        for vm in unit.spec.vms:
            if unit.spec.restore_before == "poweroff":
                info = await self.site.get_vm(vm)
                if info.power is api.PowerState.ON:
                    await self.site.power_off(vm)
            else:
                ticket = await self.site.quiesce(vm, api.QuiesceLevel(unit.spec.quiesce), unit.spec.freeze_timeout)
                ids[vm] = ticket.freeze_id
        return ids

    async def _establish_and_release(self, unit: Unit, t0: float, freezes: Mapping[str, int]) -> dict[str, Any] | None:
        pairs = unit.pairs
        spec = unit.spec
        fresh: set[tuple[str, str]] = set()  # what this attempt established, across its retries

        async def do_establish() -> float:
            limiters = [self._array_limiter, *(self._lss_limiter(lss) for lss in sorted({p.source_lss for p in pairs}))]
            taken = []
            try:
                for limiter in limiters:
                    await _take(limiter, unit)
                    taken.append(limiter)
                with api.fence_scope(*self._holds.fences(unit.holding)):  # a newer owner's freeze fences this one's unfreeze
                    if spec.kind == "restore":
                        return await stages.restore_reverse(self.site, pairs, unit.tag)
                    return await stages.establish(self.site, spec, pairs, unit.tag, deadline=unit.hold_deadline, fresh=fresh)
            finally:
                for limiter in taken:
                    limiter.release_on_behalf_of(unit)

        try:
            established_at = await self._stage(unit, "establish", do_establish, in_window=True)
        except stages.WindowOverrun as exc:
            # the array freeze would outlast the engine's bound: let the LSS go, redo later
            overruns = int(unit.data.get("window_overruns", 0)) + 1
            if overruns > unit.spec.max_freeze_attempts:
                raise UnitFailed(f"gave up after {overruns - 1} freeze windows over the bound: {exc}",
                                 kind="freeze_window_overrun") from exc
            unit.data["window_overruns"] = overruns
            await self._redo_freeze(unit, str(exc), lost=False)
            return None
        problems = await self._stage(unit, "establish", lambda: stages.freeze_problems(self.site, spec, freezes, established_at))
        if problems:
            await self._redo_freeze(unit, "; ".join(problems))
            return None
        # the engine's part ends as the release starts (DESIGN §5)
        self.freeze_windows.append(trio.current_time() - t0)
        self._observe("on_freeze_window", self.freeze_windows[-1])
        await self._release(unit)
        return {"freezes": dict(freezes), "established_at": established_at, "established_wall": time.time()}

    async def _redo_freeze(self, unit: Unit, problem: str, *, lost: bool = True,
                           present: Sequence[api.RelationshipInfo] | None = None) -> None:
        """The copy is not consistent: withdraw what this attempt made, thaw, and go again.
        `present`: the unit's relationships as a query after the restart saw them (else
        they are queried by its tag)."""
        log.warning("redoing the freeze", problem=problem, lost=lost)

        async def undo_attempt() -> None:
            if stages.redo_withdraws(unit.spec):
                if present is None:
                    await stages.withdraw_tagged(self.site, unit.tag)
                else:
                    await stages.withdraw_relationships(self.site, present)
            await self._unhold(unit)
            await stages.thaw_all(self.site, unit.spec)

        await self._stage(unit, "release", undo_attempt, in_window=True)
        data: dict[str, Any] = {"last_freeze_problem": problem}
        if lost:
            data["freezes_lost"] = int(unit.data.get("freezes_lost", 0)) + 1
            self._observe("on_lost_freeze", unit.unit_id)
        await self._move(unit, "redo", data=data, payload={"problem": problem})

    async def _release(self, unit: Unit) -> None:
        """Unfreeze the LSSs nobody else holds and thaw the guests (both idempotent)."""
        async def release() -> None:
            await self._unhold(unit)
            await stages.thaw_all(self.site, unit.spec)

        await self._stage(unit, "release", release, in_window=True)

    async def _do_release(self, unit: Unit) -> None:
        """The release of a unit journaled `releasing` (a journal of an earlier version)."""
        await self._release(unit)
        await self._move(unit, "released")

    async def _step_released(self, unit: Unit) -> None:
        await self._move(unit, "copy")
        await self._do_copy(unit)

    async def _do_copy(self, unit: Unit) -> None:
        result = await self._stage(unit, "copy", lambda: self._copy_action(unit))
        await self._move(unit, "copied", data=result)

    async def _copy_action(self, unit: Unit) -> dict[str, Any]:
        """Wait (cheap, unlimited), then the image work under the copy limiter."""
        spec, pairs, site = unit.spec, unit.pairs, self.site
        # a copy the second guest mounts must be whole before the run withdraws it: a
        # relationship withdrawn mid-copy leaves the target incomplete (FLASHCOPY.md)
        if spec.kind == "restore" or (spec.copy_action in ("wait", "mount_check") and spec.mode != "nocopy"):

            def progress(left: int, total: int) -> None:
                unit.copy_left = (left, total)

            if spec.kind == "restore":
                await stages.wait_copied(site, pairs, unit.tag, self.poll, on_progress=progress)
            else:
                settled = functools.partial(self._settle, unit.unit_id) if unit.unit_id in self._settling else None
                await self._rels.wait_copied(unit.tag, pairs, progress, on_first=settled)
        async with self._copy_limiter:
            if spec.kind == "restore":
                return self._verdict(await stages.verify(site, pairs, image_of_source=True))
            if spec.copy_action == "export":
                if spec.copy_host:  # the backup host mounts the targets first: it must see them whole
                    mounted = await site.mount_check(spec.copy_host, [p.target for p in pairs])
                    if not mounted.consistent:
                        return self._verdict(mounted)
                folder = self.store / (spec.copy_to or "exports") / unit.run_id
                exported = await stages.export(site, pairs, folder)
                report = await trio.to_thread.run_sync(stages.check_exported, [e["path"] for e in exported])
                return {**self._verdict(report), "exports": exported}
            if spec.copy_action == "mount_check" and spec.mount_vm:
                verdict = self._verdict(await site.mount_check(spec.mount_vm, [p.target for p in pairs]))
            else:
                verdict = self._verdict(await stages.verify(site, pairs))
            return {**verdict, "digests": await self._image_digests(unit)}

    async def _image_digests(self, unit: Unit) -> dict[str, str]:
        """Content digests of images that outlive the run (the catalog's and verify's
        reference: a target written by someone else no longer matches)."""
        spec = unit.spec
        if spec.mode == "nocopy" and spec.withdraw != "keep":
            return {}
        from flowcopy.backups.images import lun_digest

        digests: dict[str, str] = {}
        for p in unit.pairs:
            for _ in range(3):
                try:
                    digests[p.target] = await lun_digest(self.site, p.target, p.capacity)
                    break
                except SiteError as exc:  # the image is verified; only its reference digest is missing
                    if not exc.transient:
                        break
        return digests

    @staticmethod
    def _verdict(report: api.CheckReport) -> dict[str, Any]:
        return {"verified": report.consistent, "check": {"kind": report.kind, "problems": list(report.problems)[:20]}}

    async def _step_copied(self, unit: Unit) -> None:
        if not unit.data.get("verified", False):
            problems = unit.data.get("check", {}).get("problems", [])
            raise UnitFailed(f"the copy did not verify: {'; '.join(problems) or 'checker found it inconsistent'}", kind="not_verified")
        await self._move(unit, "withdraw")
        await self._do_withdraw(unit)

    async def _do_withdraw(self, unit: Unit) -> None:
        spec = unit.spec
        keep = spec.withdraw == "keep" or spec.mode == "incremental" or spec.kind == "restore"
        withdrawn = 0
        if not keep:
            after_copy = spec.withdraw == "after_copy"
            withdrawn = await self._stage(unit, "withdraw", lambda: stages.withdraw_tagged(self.site, unit.tag, after_copy=after_copy))
        # a copy relationship still there to withdraw had not finished: the catalog must know
        await self._move(unit, "succeed", data={"withdrawn": withdrawn} if withdrawn and spec.withdraw != "after_copy" else None)

    # ---- compensation

    async def _compensate(self, unit: Unit, outcome: str, reason: str) -> None:
        """Thaw, unfreeze and withdraw what this unit may have made; then failed/cancelled.

        Shielded from cancellation so a cancel or a stop cannot leave it half done, but it
        only starts after its intent is durable, so a crash mid-way is redone on resume.
        """
        with trio.CancelScope(shield=True):
            if unit.state != "compensating":
                trigger = "cancel" if outcome == "cancelled" else "fail"
                await self._move(unit, trigger, data={"outcome": outcome, "error": reason}, payload={"reason": reason})
                log.warning("compensating", outcome=outcome, reason=reason)
            await self._undo(unit)
            await self._move(unit, "compensated_cancel" if unit.data.get("outcome") == "cancelled" else "compensated")

    async def _undo(self, unit: Unit) -> None:
        """Thaw, unfreeze, withdraw — only if the unit ever got as far as a freeze.

        A transient site error is retried for a while; if the site stays unreachable the
        error propagates and the unit stays `compensating` in the journal, so the next
        `flowcopy resume` finishes the compensation.
        """
        if unit.spec.restore is not None:
            from flowcopy import restore_steps

            return await restore_steps.undo(self, unit)
        if int(unit.data.get("freeze_attempts", 0)) == 0 and not unit.holding:
            return  # never past prepare: nothing at the site is this unit's
        spec = unit.spec
        for attempt in range(1, 11):
            try:
                await self._unhold(unit)
                await stages.thaw_all(self.site, spec)
                if spec.mode != "incremental":
                    await stages.withdraw_tagged(self.site, unit.tag)
                return
            except SiteError as exc:
                if not exc.transient or attempt == 10:
                    raise
                log.warning("compensation retry", attempt=attempt, error=stages.describe(exc))
                await trio.sleep(min(spec.retry_initial * 2**attempt, spec.retry_max_interval))

    # ---- resume: settle intent states against the site before acting

    async def _resume_preparing(self, unit: Unit) -> None:
        await self._do_prepare(unit)

    async def _resume_freezing(self, unit: Unit) -> None:
        """The journal says only that a freeze window was begun (`machine.WINDOW_INTENT`):
        the engine that died may have quiesced the guests, established some or every pair
        under the group's freeze, released, or done nothing at all. Without the freeze
        tickets (journaled only with the window's outcome) not even a complete set of
        relationships can be shown consistent, so whatever the attempt made is undone as a
        redo undoes it — withdrawn (an incremental unit's are resynced again instead, see
        `stages.establish`), the LSSs no other unit of this engine holds unfrozen, the
        guests thawed — and the freeze is done again. A redo is always safe; a crash inside
        a window costs one more freeze of its guests, never consistency."""
        with self._window(unit):
            async with self._vm_locks(unit):  # the thaw must not end another unit's freeze of these VMs
                # every unit resumed together shares one query of the site's relationships
                present = await self._stage(unit, "release", lambda: self._rels.ours(unit.tag, unit.loaded_at), in_window=True)
                made = f"{len(present)} relationship(s) of the attempt present" if present else "no relationship present"
                await self._redo_freeze(unit, f"engine restarted inside the freeze window: {made}", lost=False,
                                        present=list(present.values()))

    async def _resume_frozen(self, unit: Unit) -> None:
        """A journal of an earlier version (the guests' freeze journaled, no establish begun)."""
        await self._resume_freezing(unit)

    async def _resume_establishing(self, unit: Unit) -> None:
        with self._window(unit):
            await self._hold(unit)
            try:
                await self._reconcile_establishing(unit)
            except FAILURES as exc:
                await self._compensate(unit, "failed", reason_of(exc, unit))

    async def _reconcile_establishing(self, unit: Unit) -> None:
        spec, pairs = unit.spec, unit.pairs
        # every unit resumed together shares one query of the site's relationships
        present = await self._stage(unit, "establish", lambda: self._rels.ours(unit.tag, unit.loaded_at))
        wanted = {(p.target, p.source) if spec.kind == "restore" else (p.source, p.target) for p in pairs}
        if present and set(present) >= wanted:
            established_at = max(r.synced for r in present.values())
            problems = await self._stage(
                unit, "establish", lambda: stages.freeze_problems(self.site, spec, unit.data.get("freezes", {}), established_at)
            )
            if not problems:
                log.info("reconciled: establish complete, continuing")
                await self._move(unit, "established", "release", data={"established_at": established_at, "established_wall": time.time()},
                                 payload={"reconciled": "relationships present, freeze held"})
                await self._do_release(unit)
                return
            await self._redo_freeze(unit, "; ".join(problems))
            return
        await self._redo_freeze(unit, "establish outcome unknown after restart: " + (
            f"{len(present)} of {len(wanted)} relationships present" if present else "no relationship present"), lost=False)

    async def _resume_established(self, unit: Unit) -> None:
        with self._window(unit):
            await self._move(unit, "release")
            await self._do_release(unit)

    async def _resume_releasing(self, unit: Unit) -> None:
        with self._window(unit):
            await self._do_release(unit)

    async def _resume_copying(self, unit: Unit) -> None:
        await self._do_copy(unit)

    async def _resume_withdrawing(self, unit: Unit) -> None:
        await self._do_withdraw(unit)

    _steps: dict[str, Callable[[Engine, Unit], Awaitable[None]]] = {
        "pending": _step_pending,
        "preparing": _resume_preparing,
        "prepared": _step_prepared,
        "freezing": _resume_freezing,
        "frozen": _resume_frozen,
        "establishing": _resume_establishing,
        "established": _resume_established,
        "releasing": _resume_releasing,
        "released": _step_released,
        "copying": _resume_copying,
        "copied": _step_copied,
        "withdrawing": _resume_withdrawing,
    }

    # ------------------------------------------------------------------ status

    def copy_progress(self, run_id: str | None = None) -> tuple[int, int]:
        """(tracks copied, tracks to copy) over the units of `run_id` now in their copy wait."""
        done = total = 0
        for unit in self.units.values():
            if unit.copy_left is not None and unit.state == "copying" and (run_id is None or unit.run_id == run_id):
                left, size = unit.copy_left
                done, total = done + size - left, total + size
        return done, total

    def longest_lss_hold(self) -> float:
        """Seconds the longest-held LSS of this engine has been frozen (0 when none is)."""
        return self._holds.longest(trio.current_time())

    def progress(self, run_id: str | None = None) -> dict[str, int]:
        counts: Counter[str] = Counter()
        for unit in self.units.values():
            if run_id is None or unit.run_id == run_id:
                counts[unit.state] += 1
        return dict(counts)


def _restore_steps() -> Mapping[str, Callable[[Engine, Unit], Awaitable[None]]]:
    from flowcopy import restore_steps  # it builds on this module

    return restore_steps.STEPS
