"""The site's side of fencing tokens: the highest epoch seen per key, enforced per call.

An engine checks its lease before a side effect, but it can pause (GC, SIGSTOP, a
stalled VM) between that check and the array receiving the command. So the site itself
keeps, per fence key (a unit), the highest lease epoch any call carried, and:

* refuses a call whose epoch is lower (`api.StaleFence`, HTTP 409): that caller's lease
  was taken over and the new holder has already reached the site;
* admits a call with a higher epoch only once the calls of lower epochs it had already
  admitted for that key have finished, so the new holder's first call (a reconciling
  query, usually) sees every effect of the old holder: to the new holder, each stale
  effect the site let through is one the old holder made while its lease ran, which
  reconciliation already handles (DESIGN §3.4).

The marks are site state: the durable site logs every raise (component "fence") and
snapshots them, so a restarted site refuses what it refused before. Marks unused for
`RETENTION` seconds of site time are dropped at a snapshot (a lease lasts seconds).

Pure bookkeeping on trio primitives; knows nothing of engines or journals.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import trio

from flowcopy.site.api import Fence, StaleFence

HEADER = "Flowcopy-Fence"
"""HTTP request header carrying a call's fences: `<epoch> <key>[, <epoch> <key>...]`."""
RETENTION = 7 * 24 * 3600.0
"""Seconds of site time after its last raise that a key's mark is kept."""


def header_value(fences: Sequence[Fence]) -> str:
    from urllib.parse import quote

    return ", ".join(f"{f.epoch} {quote(f.key, safe='')}" for f in fences)


def parse_header(value: str) -> tuple[Fence, ...]:
    """The fences of a request header; text that is not one raises ValueError."""
    from urllib.parse import unquote

    fences = []
    for item in value.split(","):
        epoch, sep, key = item.strip().partition(" ")
        if not sep or not key or not epoch.isdigit():
            raise ValueError(f"{HEADER} must be '<epoch> <key>' (epoch a non-negative integer), "
                             f"comma-separated, not {value!r}")
        fences.append(Fence(unquote(key), int(epoch)))
    return tuple(fences)


class FenceBook:
    """Per key: the highest epoch seen (and when it was raised), the calls in flight by epoch."""

    def __init__(self, on_raise: Callable[[str, int, float], None] | None = None) -> None:
        self.marks: dict[str, tuple[int, float]] = {}
        self.on_raise = on_raise
        """Told of every raise (key, epoch, site time): the durable site logs it."""
        self.refused = 0
        """Calls refused as stale since this site started."""
        self.admitted = 0
        """Fenced calls admitted since this site started."""
        self._inflight: dict[str, dict[int, int]] = {}
        self._idle: dict[str, trio.Event] = {}

    def high(self, key: str) -> int:
        mark = self.marks.get(key)
        return mark[0] if mark is not None else 0

    def apply_raise(self, key: str, epoch: int, now: float) -> None:
        """Replay of a logged raise (and the raise itself)."""
        if epoch > self.high(key):
            self.marks[key] = (int(epoch), float(now))

    def _refuse(self, fence: Fence, call: str) -> StaleFence:
        self.refused += 1
        high = self.high(fence.key)
        return StaleFence(
            f"site call {call} for {fence.key} refused: it carries lease epoch {fence.epoch}, but epoch {high} "
            "of it has reached the site (another holder took it over); stop acting on it",
            key=fence.key, epoch=fence.epoch, seen=high, call=call,
        )

    async def enter(self, fences: Sequence[Fence], call: str, now: float, *, counted: bool = True) -> None:
        """Admit one call under every fence (in key order, so two calls never wait on each
        other), or raise StaleFence before it does anything. A `counted` call (one that
        changes something) is in flight until `leave`: a newer epoch's calls wait for it.
        A read is not: nothing waits for it (a copy can take hours to wait for)."""
        entered: list[Fence] = []
        try:
            for fence in sorted(fences, key=lambda f: f.key) if len(fences) > 1 else fences:
                await self._enter_one(fence, call, now, counted)
                if counted:
                    entered.append(fence)
        except BaseException:
            self.leave(entered)
            raise
        self.admitted += 1

    async def _enter_one(self, fence: Fence, call: str, now: float, counted: bool) -> None:
        key, epoch = fence.key, fence.epoch
        high = self.high(key)
        if epoch < high:
            raise self._refuse(fence, call)
        if epoch > high:
            self.apply_raise(key, epoch, now)
            if self.on_raise is not None:
                self.on_raise(key, epoch, now)
        flights = self._inflight.setdefault(key, {})
        while any(e < epoch for e in flights):  # the old holder's admitted calls end first
            idle = self._idle.get(key)
            if idle is None:
                idle = self._idle[key] = trio.Event()
            await idle.wait()
            if epoch < self.high(key):  # a newer holder came while we waited
                raise self._refuse(fence, call)
            flights = self._inflight.setdefault(key, {})
        if counted:
            flights[epoch] = flights.get(epoch, 0) + 1
        elif not flights:
            self._inflight.pop(key, None)

    def leave(self, fences: Sequence[Fence]) -> None:
        """The call admitted under `fences` ended (returned, failed or was cancelled)."""
        for fence in fences:
            flights = self._inflight.get(fence.key)
            if flights is None or fence.epoch not in flights:
                continue
            flights[fence.epoch] -= 1
            if not flights[fence.epoch]:
                del flights[fence.epoch]
                if not flights:
                    del self._inflight[fence.key]
                idle = self._idle.pop(fence.key, None)
                if idle is not None:
                    idle.set()

    def to_state(self, now: float) -> dict[str, list[float]]:
        return {k: [e, t] for k, (e, t) in self.marks.items() if now - t < RETENTION}

    def load(self, state: Mapping[str, Any]) -> None:
        self.marks = {str(k): (int(v[0]), float(v[1])) for k, v in state.items()}
