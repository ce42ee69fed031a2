"""The durable engine: runs units as persisted state machines, resumes by reconciliation.

Protocol for every step of a unit (DESIGN §3.3): fire the intent trigger on the shared
state table, make the move durable through the group-commit journal, perform the side
effect through the site, then fire and journal the outcome. So after any crash the
journal says, for every unit, which side effect may be half done, and `_reconcile`
settles it against the site before anything else happens.

Outcome and next intent are journaled together (`frozen`+`establish`,
`established`+`release`), so the freeze window pays two group commits, not four.

Compensation runs only for failures the engine observed (`Exception`), never for
`trio.Cancelled` or a simulated crash: a dying engine does nothing more, exactly like a
SIGKILLed one, and the next start reconciles.
"""

from __future__ import annotations

import math
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

from flowcopy import machine, stages
from flowcopy.holds import LssHolds
from flowcopy.journal import Journal, Move, RunRow, UnitRow
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
    freezing: int = 32  # units inside their freeze window at once: bounds each window under load


@attrs.define(eq=False)
class Unit:
    """A unit in memory: the state-table model plus its durable context (journaled `data`)."""

    model: machine.UnitModel
    run_id: str
    spec: UnitSpec
    data: dict[str, Any]
    holding: tuple[str, ...] = ()  # LSSs this unit counts as a CG holder of (not durable)
    copy_left: tuple[int, int] | None = None  # (tracks out of sync, total) while copying

    @property
    def state(self) -> str:
        return self.model.state

    @property
    def unit_id(self) -> str:
        return self.model.unit_id

    @property
    def pairs(self) -> list[Pair]:
        return pairs_from_data(self.data.get("pairs", []))

    @property
    def tag(self) -> str:
        return str(self.data["tag"])


class EngineStopped(Exception):
    """A clean stop (SIGTERM/SIGINT) left these runs unfinished, with no guest frozen."""

    def __init__(self, runs: Sequence[str], units: int) -> None:
        super().__init__(
            f"stopped cleanly: {units} unit(s) of {len(runs)} run(s) left in flight with no guest frozen "
            "and no consistency group held; `flowcopy resume` continues them"
        )
        self.runs = tuple(runs)
        self.units = units


class UnitFailed(Exception):
    def __init__(self, message: str, kind: str = "failed") -> None:
        super().__init__(message)
        self.kind = kind


FAILURES = (SiteError, StageError, UnitFailed, trio.TooSlowError)
"""What the engine compensates for. Not trio.Cancelled, not a crash: a dying engine stops."""


def reason_of(exc: BaseException, unit: Unit) -> str:
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

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "workflow": self.workflow,
            "state": self.state,
            "units": dict(self.units),
            "verified": self.verified,
            "failures": dict(self.failures),
            "elapsed_s": round(self.elapsed, 3),
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
    ) -> None:
        self.journal = journal
        self.site = site
        self.store = store
        self.limits = limits or Limits()
        self.poll = poll
        self.units: dict[str, Unit] = {}
        self._unit_limiter = trio.CapacityLimiter(self.limits.units)
        self._guest_limiter = trio.CapacityLimiter(self.limits.guest_agents)
        self._array_limiter = trio.CapacityLimiter(self.limits.array)
        self._copy_limiter = trio.CapacityLimiter(self.limits.copy)
        self._window_limiter = trio.CapacityLimiter(self.limits.freezing)
        self._lss_limiters: dict[str, trio.CapacityLimiter] = {}
        self._holds = LssHolds()
        self._vm_lock: dict[str, trio.Lock] = {}
        self._scopes: dict[str, trio.CancelScope] = {}
        self._cancelled_runs: set[str] = set()
        self._stopping = False
        self._in_window: set[str] = set()  # units between freeze and release: a stop waits for them
        # freeze-to-release seconds of trio time, per unit; bounded for a long-running service
        self.freeze_windows: deque[float] = deque(maxlen=100_000)

    # ------------------------------------------------------------------ journal helpers

    async def _move(self, unit: Unit, *triggers: str, data: Mapping[str, Any] | None = None, payload: Mapping[str, Any] | None = None) -> None:
        """Fire triggers in order and make all the moves durable in one group commit."""
        if data:
            unit.data.update(data)
        moves = []
        for i, trigger in enumerate(triggers):
            before, after = machine.fire(unit.model, trigger)
            last = i == len(triggers) - 1
            moves.append(
                Move(
                    unit_id=unit.unit_id,
                    from_state=before,
                    to_state=after,
                    event=trigger,
                    payload=dict(payload or {}) if last else {},
                    data=dict(unit.data) if last and data else None,  # only when it changed
                )
            )
        if len(moves) == 1:
            await self.journal.record(moves[0])
        else:
            await self.journal.record_many(moves)
        for move in moves:  # logged once each, after it is durable
            log.info("transition", trigger=move.event, from_state=move.from_state, to_state=move.to_state, **move.payload)

    # ------------------------------------------------------------------ runs

    async def begin_run(self, workflow: str, definition: Mapping[str, Any], specs: Sequence[UnitSpec], *, number: int | None = None) -> str:
        """Journal a new run and its units (one transaction) before anything touches the site."""
        number = number if number is not None else self.journal.next_run_number(workflow)
        run_id = f"{workflow}-{number:04d}-{secrets.token_hex(2)}"
        now = time.time()
        rows = []
        for i, spec in enumerate(specs):
            unit_id = f"{run_id}/{i:05d}"
            spec = attrs.evolve(spec, unit_id=unit_id)
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
        )
        await self.journal.begin_run(run, rows)
        log.info("run begun", run=run_id, workflow=workflow, units=len(rows))
        return run_id

    def _load(self, row: UnitRow) -> Unit:
        unit = self.units.get(row.unit_id)
        if unit is None:
            model = machine.UnitModel(unit_id=row.unit_id, state=row.state)
            machine.attach(model)
            unit = Unit(model=model, run_id=row.run_id, spec=spec_from_data(row.data["spec"]), data=dict(row.data))
            self.units[row.unit_id] = unit
        return unit

    async def drive_run(self, run_id: str) -> RunSummary:
        """Drive every unfinished unit of a run to a terminal state, then close the run."""
        started = trio.current_time()
        rows = [r for r in self.journal.units(run_id) if r.state not in machine.TERMINAL]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_cancel, run_id)
            async with trio.open_nursery() as units:
                for row in rows:
                    units.start_soon(self._drive_unit, self._load(row))
            nursery.cancel_scope.cancel()
        if self._stopping:
            left = [u for u in self.journal.units(run_id) if u.state not in machine.TERMINAL]
            if left:
                raise EngineStopped([run_id], len(left))
        return await self._finish_run(run_id, trio.current_time() - started)

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
        log.info("run finished", run=run_id, state=state, units=dict(counts), verified=verified)
        return RunSummary(run_id, run.workflow, state, dict(counts), verified, failures, elapsed)

    async def resume(self) -> list[RunSummary]:
        """Reconcile and finish every run the journal holds unfinished (what run/serve do first)."""
        unfinished = self.journal.unfinished_units()
        run_ids = sorted({row.run_id for row in unfinished} | {r.run_id for r in self.journal.runs() if r.state == "running"})
        summaries: list[RunSummary] = []
        if not run_ids:
            return summaries
        log.info("resuming", runs=len(run_ids), units=len(unfinished))
        results: dict[str, RunSummary] = {}

        async def one(run_id: str) -> None:
            results[run_id] = await self.drive_run(run_id)

        async with trio.open_nursery() as nursery:
            for run_id in run_ids:
                nursery.start_soon(one, run_id)
        return [results[r] for r in run_ids]

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
        # every log line of this unit's task (and the tasks it starts) carries these
        with structlog.contextvars.bound_contextvars(run=unit.run_id, unit=unit.unit_id, vm=",".join(unit.spec.vms)):
            await self._drive_unit_bound(unit)

    async def _drive_unit_bound(self, unit: Unit) -> None:
        async with self._unit_limiter:
            outcome: str | None = None
            reason = ""
            with trio.CancelScope() as scope:
                self._scopes[unit.unit_id] = scope
                if unit.run_id in self._cancelled_runs or self._stopping:
                    scope.cancel()
                try:
                    await self._forward(unit)
                except FAILURES as exc:
                    outcome, reason = "failed", reason_of(exc, unit)
            self._scopes.pop(unit.unit_id, None)
            if scope.cancelled_caught and unit.run_id in self._cancelled_runs:
                outcome, reason = "cancelled", "cancelled by request"
            if outcome is not None and unit.state not in machine.TERMINAL:
                await self._compensate(unit, outcome, reason)

    async def _forward(self, unit: Unit) -> None:
        """Walk the state table from wherever the journal left this unit."""
        while unit.state not in machine.TERMINAL:
            state = unit.state
            step = self._steps.get(state)
            if step is None:  # compensating after a crash
                await self._compensate(unit, unit.data.get("outcome", "failed"), unit.data.get("error", "resumed compensation"))
                return
            await step(self, unit)

    async def _stage(self, unit: Unit, name: str, fn: Callable[[], Awaitable[T]]) -> T:
        """Run one side effect with the unit's stage timeout and retry policy."""
        spec = unit.spec
        timeout = spec.timeouts.get(name, math.inf)
        attempt = 0
        delay = spec.retry_initial
        with trio.fail_after(timeout), structlog.contextvars.bound_contextvars(stage=name):
            while True:
                attempt += 1
                try:
                    return await fn()
                except (SiteError, StageError) as exc:
                    kind = exc.kind
                    transient = exc.transient if isinstance(exc, SiteError) else exc.retryable
                    if not transient or kind in spec.non_retryable or attempt >= spec.retry_max_attempts:
                        raise
                    log.warning("retrying", attempt=attempt, error=stages.describe(exc))
                    await trio.sleep(delay)
                    delay = min(delay * spec.retry_backoff, spec.retry_max_interval)

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
        async with self._window_limiter:
            if self._stopping:
                return await self._stop_here(unit)
            with self._window(unit):
                async with self._vm_locks(unit):
                    await self._hold(unit)
                    await self._move(unit, "freeze", data={"freeze_attempts": attempts + 1, "freezes": {}})
                    await self._freeze_establish_release(unit)
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

    async def _freeze_establish_release(self, unit: Unit) -> None:
        """The hot path: freeze, establish, release — never queued behind copy work.

        A failure here is compensated at once (thaw, unfreeze, withdraw), before anything
        else of this unit happens, so no guest waits on a failed unit.
        """
        try:
            if unit.spec.kind == "restore":
                freezes = await self._stage(unit, "freeze", lambda: self._restore_quiesce(unit))
            else:
                freezes = await self._stage(unit, "freeze", lambda: stages.freeze(self.site, unit.spec, self._guest_limiter))
            t0 = trio.current_time()  # the guests are frozen from here to the thaw in release
            await self._move(unit, "frozen", "establish", data={"freezes": freezes})
            await self._establish_and_release(unit, t0)
        except FAILURES as exc:
            await self._compensate(unit, "failed", reason_of(exc, unit))

    async def _hold(self, unit: Unit) -> None:
        """Count the unit as a holder of its consistency group's LSSs (see `holds`)."""
        if not unit.holding and stages.needs_array_freeze(unit.spec, unit.pairs):
            lsses = stages.frozen_lsses(unit.pairs)
            await self._holds.acquire(lsses)
            unit.holding = tuple(lsses)

    async def _unhold(self, unit: Unit) -> None:
        """Unfreeze the unit's LSSs that no other unit of this engine still holds."""
        if unit.holding:
            free = self._holds.release(unit.holding)
            unit.holding = ()
        elif stages.needs_array_freeze(unit.spec, unit.pairs):
            # resumed or compensating without a hold: release only what nobody holds
            free = self._holds.release_unheld(stages.frozen_lsses(unit.pairs))
        else:
            return
        try:
            if free:
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

    async def _establish_and_release(self, unit: Unit, t0: float | None) -> None:
        pairs = unit.pairs
        spec = unit.spec

        async def do_establish() -> float:
            async with self._array_limiter:
                limiters = [self._lss_limiter(lss) for lss in sorted({p.source_lss for p in pairs})]
                for limiter in limiters:
                    await limiter.acquire_on_behalf_of(unit)
                try:
                    if spec.kind == "restore":
                        return await stages.restore_reverse(self.site, pairs, unit.tag)
                    return await stages.establish(self.site, spec, pairs, unit.tag)
                finally:
                    for limiter in limiters:
                        limiter.release_on_behalf_of(unit)

        established_at = await self._stage(unit, "establish", do_establish)
        problems = await self._stage(
            unit, "establish", lambda: stages.freeze_problems(self.site, spec, unit.data.get("freezes", {}), established_at)
        )
        if problems:
            await self._redo_freeze(unit, "; ".join(problems))
            return
        await self._move(unit, "established", "release", data={"established_at": established_at})
        await self._do_release(unit)
        if t0 is not None:
            self.freeze_windows.append(trio.current_time() - t0)

    async def _redo_freeze(self, unit: Unit, problem: str, *, lost: bool = True) -> None:
        """The copy is not consistent: withdraw what this attempt made, thaw, and go again."""
        log.warning("redoing the freeze", problem=problem, lost=lost)

        async def undo_attempt() -> None:
            if unit.spec.mode != "incremental":
                await stages.withdraw_tagged(self.site, unit.tag)
            await self._unhold(unit)
            await stages.thaw_all(self.site, unit.spec)

        await self._stage(unit, "release", undo_attempt)
        data: dict[str, Any] = {"last_freeze_problem": problem}
        if lost:
            data["freezes_lost"] = int(unit.data.get("freezes_lost", 0)) + 1
        await self._move(unit, "redo", data=data, payload={"problem": problem})

    async def _do_release(self, unit: Unit) -> None:
        async def release() -> None:
            await self._unhold(unit)
            await stages.thaw_all(self.site, unit.spec)

        await self._stage(unit, "release", release)
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
        if spec.kind == "restore" or (spec.copy_action == "wait" and spec.mode != "nocopy"):

            def progress(left: int, total: int) -> None:
                unit.copy_left = (left, total)

            await stages.wait_copied(site, pairs, unit.tag, self.poll, on_progress=progress)
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
                stages.apply_retention(folder, spec.retention)
                return {**self._verdict(report), "exports": exported}
            if spec.copy_action == "mount_check" and spec.mount_vm:
                return self._verdict(await site.mount_check(spec.mount_vm, [p.target for p in pairs]))
            return self._verdict(await stages.verify(site, pairs))

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
        if not keep:
            after_copy = spec.withdraw == "after_copy"
            await self._stage(unit, "withdraw", lambda: stages.withdraw_tagged(self.site, unit.tag, after_copy=after_copy))
        await self._move(unit, "succeed")

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
        with self._window(unit):
            await self._stage(unit, "release", lambda: stages.thaw_all(self.site, unit.spec))
            await self._move(unit, "redo", payload={"reconciled": "freeze outcome unknown: thawed, redo"})

    async def _resume_frozen(self, unit: Unit) -> None:
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
        present = await self._stage(unit, "establish", lambda: stages.ours(self.site, unit.tag))
        wanted = {(p.target, p.source) if spec.kind == "restore" else (p.source, p.target) for p in pairs}
        if present and set(present) >= wanted:
            established_at = max(r.synced for r in present.values())
            problems = await self._stage(
                unit, "establish", lambda: stages.freeze_problems(self.site, spec, unit.data.get("freezes", {}), established_at)
            )
            if not problems:
                log.info("reconciled: establish complete, continuing")
                await self._move(unit, "established", "release", data={"established_at": established_at},
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

    def progress(self, run_id: str | None = None) -> dict[str, int]:
        counts: Counter[str] = Counter()
        for unit in self.units.values():
            if run_id is None or unit.run_id == run_id:
                counts[unit.state] += 1
        return dict(counts)
