"""Fault injection: any `Site` wrapped so that it fails, lags and stalls the way a real one does.

Chaos tests need a site that misbehaves on purpose and reproducibly: a plan (frozen,
seeded) says what goes wrong; `FaultySite` applies it at the interface, so the same
plan works on the in-process site and, server-side, on a served one (where it is
steered over `/api/v1/faults`). The wrapped site's state is never touched by a fault:
an injected error either happens before the operation (nothing done) or, for
`after_fraction` of them, after it (done, but the caller never hears — the case that
makes an engine reconcile).

Windows (`start`, `end`) are in site seconds; latencies are in real (trio) seconds,
because they model the network and the array's command processing, not the model.
"""

from __future__ import annotations

import inspect
import math
import random
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
import trio

from flowcopy.site import api, codec

LATENCY_DISTRIBUTIONS = ("none", "fixed", "uniform", "exponential", "lognormal")

# Operations that take a guest agent's answer; a silent agent fails (or hangs on) these.
GUEST_OPERATIONS = frozenset({"quiesce", "thaw", "freeze_status"})

# Operations the default `error_rate` does not hit: reading the clock is not a site call.
RATE_EXEMPT = frozenset({"now"})


@attrs.frozen
class Latency:
    """Added latency per call, in real seconds: none, fixed, uniform, exponential, lognormal."""

    distribution: str = "none"
    mean: float = 0.0  # fixed: the value; exponential/lognormal: the mean
    low: float = 0.0  # uniform bounds
    high: float = 0.0
    sigma: float = 0.5  # lognormal shape
    max: float | None = None  # cap on any one sample
    operations: tuple[str, ...] = ()  # only these Site methods (all when empty)

    def sample(self, rng: random.Random) -> float:
        d = self.distribution
        if d == "none":
            return 0.0
        if d == "fixed":
            value = self.mean
        elif d == "uniform":
            value = rng.uniform(self.low, self.high)
        elif d == "exponential":
            value = rng.expovariate(1.0 / self.mean) if self.mean > 0 else 0.0
        else:  # lognormal with the given mean
            if self.mean <= 0:
                return 0.0
            mu = math.log(self.mean) - self.sigma**2 / 2
            value = rng.lognormvariate(mu, self.sigma)
        if self.max is not None:
            value = min(value, self.max)
        return max(0.0, value)


@attrs.frozen
class LssOutage:
    """An LSS offline: every volume on it refuses I/O and copy-services commands."""

    lss: str
    start: float = 0.0
    end: float | None = None  # site time; None: until the plan changes


@attrs.frozen
class GuestOutage:
    """A guest agent that does not answer: its quiesce/thaw/status calls fail."""

    vm: str
    start: float = 0.0
    end: float | None = None
    hang: float = 0.0  # site seconds the call hangs before GuestNotResponding (0: at once)


@attrs.frozen
class StuckCopy:
    """Background copy of relationships touching `volume` makes no progress in the window."""

    volume: str
    start: float = 0.0
    end: float | None = None


@attrs.frozen
class FaultPlan:
    seed: int = 0
    error_rate: float = 0.0  # per call, every operation but `now`
    error_rates: Mapping[str, float] = attrs.field(factory=dict)  # per Site method; overrides
    permanent_fraction: float = 0.0  # of injected errors: PermanentInjectedFault
    after_fraction: float = 0.0  # of injected errors: raised after the operation took effect
    latency: Latency = Latency()
    offline_lsses: tuple[LssOutage, ...] = ()
    silent_guests: tuple[GuestOutage, ...] = ()
    stuck_copies: tuple[StuckCopy, ...] = ()

    def validate(self) -> FaultPlan:
        """Raise BadRequest naming the first thing wrong; return self."""
        problems: list[str] = []
        for name, rate in [("error_rate", self.error_rate), ("permanent_fraction", self.permanent_fraction),
                           ("after_fraction", self.after_fraction)]:
            if not 0.0 <= rate <= 1.0:
                problems.append(f"{name} must be between 0 and 1, not {rate}")
        for op, rate in self.error_rates.items():
            if op not in codec.SITE_METHODS:
                problems.append(f"error_rates: {op!r} is not a site operation (one of {', '.join(codec.SITE_METHODS)})")
            elif not 0.0 <= rate <= 1.0:
                problems.append(f"error_rates.{op} must be between 0 and 1, not {rate}")
        lat = self.latency
        if lat.distribution not in LATENCY_DISTRIBUTIONS:
            problems.append(f"latency.distribution must be one of {', '.join(LATENCY_DISTRIBUTIONS)}, not {lat.distribution!r}")
        if min(lat.mean, lat.low, lat.high, lat.sigma) < 0 or lat.high < lat.low:
            problems.append("latency: mean, low, high and sigma must be >= 0 and low <= high")
        for op in lat.operations:
            if op not in codec.SITE_METHODS:
                problems.append(f"latency.operations: {op!r} is not a site operation")
        for kind, windows in [("offline_lsses", self.offline_lsses), ("silent_guests", self.silent_guests),
                              ("stuck_copies", self.stuck_copies)]:
            for i, w in enumerate(windows):
                if w.end is not None and w.end < w.start:
                    problems.append(f"{kind}[{i}]: end {w.end} is before start {w.start}")
        for i, g in enumerate(self.silent_guests):
            if g.hang < 0:
                problems.append(f"silent_guests[{i}]: hang must be >= 0")
        if problems:
            raise api.BadRequest("fault plan: " + "; ".join(problems))
        return self

    def shifted(self, offset: float) -> FaultPlan:
        """The plan with every window moved by `offset` site seconds (relative -> absolute)."""

        def move(w: Any) -> Any:
            return attrs.evolve(w, start=w.start + offset, end=None if w.end is None else w.end + offset)

        return attrs.evolve(
            self,
            offline_lsses=tuple(map(move, self.offline_lsses)),
            silent_guests=tuple(map(move, self.silent_guests)),
            stuck_copies=tuple(map(move, self.stuck_copies)),
        )

    def rate_for(self, operation: str) -> float:
        if operation in self.error_rates:
            return self.error_rates[operation]
        return 0.0 if operation in RATE_EXEMPT else self.error_rate

    @property
    def empty(self) -> bool:
        return self == FaultPlan(seed=self.seed)


NO_FAULTS = FaultPlan()


def _active(window: LssOutage | GuestOutage | StuckCopy, now: float) -> bool:
    return window.start <= now and (window.end is None or now < window.end)


def plan_from_data(data: object, *, where: str = "faults") -> FaultPlan:
    """A plan from plain data (a lab's `faults:` section, an API body); BadRequest if bad."""
    if data is None:
        return NO_FAULTS
    try:
        plan = codec.structure(data, FaultPlan)
    except api.BadRequest as exc:
        raise api.BadRequest(exc.message.replace("bad request body", where).replace("@ body", f"@ {where}")) from None
    return plan.validate()


def plan_from_lab(path: str | Path | None) -> FaultPlan:
    """The `faults:` section of a lab file (the packaged default lab has none)."""
    if path is None:
        return NO_FAULTS
    from ruamel.yaml import YAML

    try:
        doc = YAML(typ="safe").load(Path(path).read_text())
    except Exception as exc:  # noqa: BLE001 - the inventory loader reports YAML errors with lines
        raise api.BadRequest(f"{path}: cannot read the lab's faults section: {exc}") from None
    if not isinstance(doc, dict):
        return NO_FAULTS
    return plan_from_data(doc.get("faults"), where=f"{path}: faults")


# --------------------------------------------------------------------------- the wrapper

_SIGNATURES = {name: inspect.signature(getattr(api.Site, name)) for name in codec.SITE_METHODS}


class FaultySite:
    """A `Site` that applies a `FaultPlan` to every call into the site it wraps.

    `speed` converts site seconds to trio seconds for hanging guest agents;
    `on_change(plan)` is told about every new plan (the served site persists it).
    """

    def __init__(
        self,
        inner: api.Site,
        plan: FaultPlan = NO_FAULTS,
        *,
        speed: float = 1.0,
        on_change: Callable[[FaultPlan], None] | None = None,
    ) -> None:
        self.inner = inner
        self._speed = speed
        self._on_change = on_change
        self._lss_of: dict[str, str] = {}
        self._stuck: dict[tuple[str, str, int], api.RelationshipInfo] = {}
        self.injected: dict[str, int] = {}  # operation -> count, for tests and the API
        self._plan = NO_FAULTS
        self._rng = random.Random(0)
        self.set_plan(plan, notify=False)

    # ---- the plan

    @property
    def plan(self) -> FaultPlan:
        return self._plan

    def set_plan(self, plan: FaultPlan, *, notify: bool = True) -> None:
        self._plan = plan.validate()
        self._empty = self._plan.empty  # checked on every call: computed once here
        self._rng = random.Random(plan.seed)
        self._stuck.clear()
        if notify and self._on_change is not None:
            self._on_change(self._plan)

    async def set_plan_relative(self, plan: FaultPlan) -> FaultPlan:
        """Install a plan whose windows count from the site's now (what an API caller means)."""
        now = await self.inner.now()
        self.set_plan(plan.validate().shifted(now))
        return self._plan

    def clear(self) -> None:
        self.set_plan(FaultPlan(seed=self._plan.seed))

    # ---- the machinery shared by every operation

    async def _call(self, operation: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        plan = self._plan
        if self._empty:
            return await getattr(self.inner, operation)(*args, **kwargs)
        bound = _SIGNATURES[operation].bind(None, *args, **kwargs).arguments
        lat = plan.latency
        if lat.distribution != "none" and (not lat.operations or operation in lat.operations):
            await trio.sleep(lat.sample(self._rng))
        now = await self.inner.now()
        await self._guest_outage(plan, operation, bound, now)
        await self._lss_outage(plan, operation, bound, now)
        after = False
        rate = plan.rate_for(operation)
        if rate > 0 and self._rng.random() < rate:
            after = self._rng.random() < plan.after_fraction
            if not after:
                self._raise_injected(plan, operation, done=False)
        result = await getattr(self.inner, operation)(*args, **kwargs)
        if after:
            self._raise_injected(plan, operation, done=True)
        if plan.offline_lsses and operation in ("get_volume", "list_volumes"):
            result = await self._mark_offline(plan, result, now)
        if plan.stuck_copies and operation in ("query", "establish", "resync", "reverse", "execute_task"):
            result = self._hold_progress(plan, operation, bound, result, now)
        return result

    def _raise_injected(self, plan: FaultPlan, operation: str, *, done: bool) -> None:
        self.injected[operation] = self.injected.get(operation, 0) + 1
        permanent = self._rng.random() < plan.permanent_fraction
        what = "after it took effect (its reply was lost)" if done else "before it ran (nothing done)"
        cls = api.PermanentInjectedFault if permanent else api.InjectedFault
        raise cls(f"injected fault in {operation}, {what}", operation=operation, took_effect=done)

    async def _guest_outage(self, plan: FaultPlan, operation: str, bound: Mapping[str, Any], now: float) -> None:
        if operation not in GUEST_OPERATIONS:
            return
        vm = bound.get("vm")
        for outage in plan.silent_guests:
            if outage.vm == vm and _active(outage, now):
                if outage.hang > 0:
                    await trio.sleep(outage.hang / self._speed)
                raise api.GuestNotResponding(
                    f"guest agent of VM {vm} did not answer {operation}"
                    + (f" within {outage.hang:g} s" if outage.hang > 0 else ""),
                    vm=vm,
                    operation=operation,
                )

    async def _lss(self, serial: str) -> str | None:
        if not self._lss_of:
            self._lss_of = {v.serial: v.lss for v in await self.inner.list_volumes()}
        return self._lss_of.get(serial)

    async def _volumes_of(self, operation: str, bound: Mapping[str, Any]) -> list[str]:
        if operation in ("establish", "withdraw", "resync", "reverse"):
            return [bound["source"], bound["target"]]
        if operation in ("read", "write", "extents"):
            return [bound["serial"]]
        if operation == "check":
            return list(bound["serials"])
        if operation == "execute_task":
            for task in await self.inner.list_tasks():
                if task.name == bound["name"]:
                    return [serial for pair in task.pairs for serial in pair]
            return []
        if operation == "mount_check":
            serials = []
            for disk in bound["disks"]:
                try:
                    serials.append((await self.inner.lun_of(bound["vm"], disk)).serial)
                except api.SiteError:
                    pass  # the real call reports it
            return serials
        return []

    async def _lss_outage(self, plan: FaultPlan, operation: str, bound: Mapping[str, Any], now: float) -> None:
        down = {o.lss for o in plan.offline_lsses if _active(o, now)}
        if not down:
            return
        for serial in await self._volumes_of(operation, bound):
            lss = await self._lss(serial)
            if lss in down:
                raise api.VolumeOffline(
                    f"volume {serial} is offline (LSS {lss} is offline); {operation} refused",
                    serial=serial,
                    lss=lss,
                )

    async def _mark_offline(self, plan: FaultPlan, result: Any, now: float) -> Any:
        down = {o.lss for o in plan.offline_lsses if _active(o, now)}
        if isinstance(result, api.VolumeInfo):
            return attrs.evolve(result, online=False) if result.lss in down else result
        return [attrs.evolve(v, online=False) if v.lss in down else v for v in result]

    def _hold_progress(
        self, plan: FaultPlan, operation: str, bound: Mapping[str, Any], result: Any, now: float
    ) -> Any:
        """Report the progress a stuck relationship had when its window opened."""
        active = [(i, s) for i, s in enumerate(plan.stuck_copies) if _active(s, now)]
        # forget windows that closed: progress then jumps to what the array really did
        open_ids = {i for i, _ in active}
        for key in [k for k in self._stuck if k[2] not in open_ids]:
            del self._stuck[key]
        if not active:
            return result

        def hold(rel: api.RelationshipInfo) -> api.RelationshipInfo:
            for i, stuck in active:
                if stuck.volume in (rel.source, rel.target):
                    key = (rel.source, rel.target, i)
                    held = self._stuck.setdefault(key, rel)
                    if held.created != rel.created:  # a new relationship on the pair
                        self._stuck[key] = held = rel
                    return attrs.evolve(rel, out_of_sync_tracks=held.out_of_sync_tracks, state=held.state)
            return rel

        if isinstance(result, api.RelationshipInfo):
            return hold(result)
        held_list = [hold(rel) for rel in result]
        if operation == "query":
            # a copy that finished inside the window is still "copying" as far as anyone can see
            shown = {r.id for r in held_list}
            volume, tag = bound.get("volume"), bound.get("tag")
            for rel in list(self._stuck.values()):
                if rel.id in shown or rel.out_of_sync_tracks == 0:
                    continue
                if (volume is None or volume in (rel.source, rel.target)) and (tag is None or rel.tag == tag):
                    held_list.append(rel)
                    shown.add(rel.id)
        return held_list


def _forwarder(name: str) -> Callable[..., Any]:
    async def method(self: FaultySite, *args: Any, **kwargs: Any) -> Any:
        return await self._call(name, args, kwargs)

    method.__name__ = name
    method.__qualname__ = f"FaultySite.{name}"
    method.__doc__ = getattr(api.Site, name).__doc__
    return method


for _name in codec.SITE_METHODS:
    setattr(FaultySite, _name, _forwarder(_name))
