"""Several engines on one journal: the engine-side half of leases and fencing.

The journal fences writes (a stale epoch or an expired lease is refused in the same
transaction that would write). This module fences the other half, the side effects:

* `FencedSite` wraps the site an engine acts on. While a task drives a claimed unit
  (`driving(unit_id)`), every site call first checks that the engine still holds the
  unit and that its lease has time left, then runs under a deadline at the lease's
  expiry minus a margin (`Journal.lease_deadline`). A call that would outlive the lease
  is cut off and raises `LeaseLost`, so an engine that was paused (GC, SIGSTOP, a
  stalled VM) and wakes after a take-over cannot establish, thaw or withdraw anything
  of a unit that is no longer its own.
* The site fences them too (`api.fenced`): every such call carries the unit's id and the
  lease epoch of this engine's claim (monotonic across take-overs), and the site refuses
  an epoch lower than one it has seen for the unit (`StaleFence` -> `LeaseLost`, never
  retried). That closes the window between the engine's check and the array receiving
  the command, which no check in the engine can close.
* `SharedLssHolds` extends the engine's per-LSS freeze counting across engines: an
  unfreeze releases a whole LSS, so only one engine at a time may hold consistency-group
  freezes on an LSS (`lss_owners` in the journal, valid while that engine's lease runs).
"""

from __future__ import annotations

import contextvars
import inspect
import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import trio

from flowcopy.holds import DEFAULT_BOUND, LssHolds
from flowcopy.journal import Journal, LeaseLost
from flowcopy.logs import get_logger
from flowcopy.site import api

log = get_logger("flowcopy.cluster")

_driving: contextvars.ContextVar[tuple[str, int | None] | None] = contextvars.ContextVar(
    "flowcopy_driving_unit", default=None)

ENV_LEASE_CHECK = "FLOWCOPY_LEASE_CHECK"
"""`site`: the engine does not hold its side effects to its own lease clock (no check
before a call, no deadline), leaving a stale engine to the site's fence and the
journal's alone. Only for chaos runs that show those hold by themselves."""


def engine_checks_lease() -> bool:
    return os.environ.get(ENV_LEASE_CHECK, "") != "site"


def side_effect_deadline(journal: Journal) -> float:
    """The trio time by which a unit's side effects must be done: the lease's (margin
    included), or none when only the site's fence guards them (`ENV_LEASE_CHECK`)."""
    return journal.lease_deadline() if engine_checks_lease() else math.inf


@contextmanager
def driving(unit_id: str, epoch: int | None = None) -> Iterator[None]:
    """Site calls made by this task (and the tasks it starts) act for `unit_id`, under
    the lease epoch of this engine's claim of it (None: the journal fences nothing)."""
    token = _driving.set((unit_id, epoch))
    try:
        yield
    finally:
        _driving.reset(token)


def lss_fence_key(lss: str) -> str:
    """The fence key of an LSS's ownership (a unit's key is its id, which has a '/')."""
    return f"lss {lss}"


class FencedSite:
    """The engine's site, with every call of a claimed unit inside that unit's lease."""

    def __init__(self, site: Any, journal: Journal) -> None:
        self._site = site
        self._journal = journal
        self.refused = 0
        """Site calls not made (or cut off) because the lease was lost."""
        self.refused_by_site = 0
        """Site calls the site itself refused: their fence epoch was stale."""
        self.check_lease = engine_checks_lease()
        self._calls: set[trio.CancelScope] = set()

    def extend(self, deadline: float) -> None:
        """The lease was renewed: calls in flight may run until the new deadline."""
        if not self.check_lease:
            return
        for scope in self._calls:
            scope.deadline = deadline

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._site, name)
        if not inspect.iscoroutinefunction(attr):
            return attr

        async def fenced(*args: Any, **kwargs: Any) -> Any:
            driven = _driving.get()
            if driven is None:
                return await attr(*args, **kwargs)
            unit_id, epoch = driven
            call = attr if epoch is None else getattr(api.fenced(self._site, unit_id, epoch), name)
            deadline = self._journal.lease_deadline() if self.check_lease else math.inf
            if self.check_lease and (not self._journal.holds(unit_id) or trio.current_time() >= deadline):
                self.refused += 1
                log.warning("side effect refused: lease lost", unit=unit_id, call=name)
                raise LeaseLost(unit_id, f"site call {name} not made: the lease is lost or about to expire")
            scope = trio.CancelScope(deadline=deadline)
            self._calls.add(scope)
            try:
                with scope:
                    return await call(*args, **kwargs)
            except api.StaleFence as exc:
                self.refused_by_site += 1
                log.warning("site refused a stale fence: lease lost", unit=unit_id, call=name, epoch=epoch,
                            seen=exc.details.get("seen"))
                raise LeaseLost(unit_id, f"the site refused {name}: {exc.message}") from None
            finally:
                self._calls.discard(scope)
            # only reached when the deadline cut the call off
            self.refused += 1
            log.warning("side effect cut off: lease expiring", unit=unit_id, call=name)
            raise LeaseLost(unit_id, f"site call {name} cut off at the lease deadline")

        fenced.__name__ = name
        return fenced


class SharedLssHolds(LssHolds):
    """LssHolds whose first holder of an LSS must own it in the journal first (waiting
    while another live engine does), and whose last unfreeze gives it back."""

    def __init__(self, journal: Journal, bound: float = DEFAULT_BOUND, poll: float = 0.05) -> None:
        super().__init__(bound)
        self._journal = journal
        self._poll = poll
        self._owned: set[str] = set()
        self._wanting: dict[str, int] = {}
        self._db = trio.Lock()  # own and disown reach the journal in the order decided here
        self._as: str | None = journal.engine_id  # ownership is that of this engine id only

    async def acquire(self, lsses: Sequence[str]) -> float:
        if self._as != self._journal.engine_id:  # the lease was lost: so was every LSS
            self._owned.clear()
            self._as = self._journal.engine_id
        for lss in lsses:
            self._wanting[lss] = self._wanting.get(lss, 0) + 1
        try:
            waited = 0.0
            while True:
                missing = sorted(set(lsses) - self._owned)
                if not missing:
                    break
                async with self._db:
                    if await self._journal.own_lsses(missing):
                        self._owned.update(missing)
                        break
                if waited == 0.0:
                    log.info("waiting for another engine's freezes on these LSSs to end", lss=missing)
                await trio.sleep(self._poll)
                waited += self._poll
            return await super().acquire(lsses)
        finally:
            for lss in lsses:
                self._wanting[lss] -= 1
                if not self._wanting[lss]:
                    del self._wanting[lss]

    async def claim_unheld(self, lsses: Sequence[str]) -> list[str]:
        """A unit that holds nothing (taken over, compensating) unfreezes only the LSSs this
        engine owns or can own now. An unfreeze releases every frozen source of the LSS, so
        one on an LSS another live engine owns would cut that engine's consistency group
        short; that engine's own unfreeze, when its group is done, releases this unit's
        stale sources with its own."""
        if self._as != self._journal.engine_id:
            self._owned.clear()
            self._as = self._journal.engine_id
        for lss in [lss for lss in lsses if not self.held(lss) and lss not in self._owned]:
            async with self._db:
                if await self._journal.own_lsses([lss]):
                    self._owned.add(lss)
        return self.release_unheld([lss for lss in lsses if lss in self._owned])

    def fences(self, lsses: Sequence[str]) -> tuple[api.Fence, ...]:
        """One per LSS this engine owns, under its ownership's epoch: once a newer owner's
        freeze has reached the site, an unfreeze of this (paused, taken-over) engine would
        release that owner's frozen sources, and the site refuses it."""
        return tuple(api.Fence(lss_fence_key(lss), epoch) for lss in lsses
                     if lss in self._owned and (epoch := self._journal.lss_fence_epoch(lss)) is not None)

    def unfrozen(self, lsses: Sequence[str]) -> None:
        super().unfrozen(lsses)
        idle = [lss for lss in lsses if lss in self._owned and not self.held(lss) and lss not in self._wanting]
        if idle:
            self._owned.difference_update(idle)
            trio.lowlevel.spawn_system_task(self._disown, idle)

    async def _disown(self, lsses: list[str]) -> None:
        try:
            async with self._db:
                idle = [lss for lss in lsses if lss not in self._owned]  # not taken again meanwhile
                if idle:
                    await self._journal.disown_lsses(idle)
        except Exception as exc:  # noqa: BLE001 - ownership lapses with the lease anyway
            log.warning("could not give LSSs back; they lapse with the lease", lss=lsses, error=str(exc))


def renew_every(journal: Journal) -> float:
    return journal.lease_period / 3 if math.isfinite(journal.lease_period) else math.inf
