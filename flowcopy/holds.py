"""Consistency-group holds per LSS, counted, and bounded in time.

What the array does (FLASHCOPY.md, `site/ess.py`): an establish with freeze holds writes
to that *source volume* only; `unfreezeflash LSS` releases every frozen source of the
LSS at once, whoever froze it. So a guest's own writes never wait behind another unit's
freeze (its volumes are not that unit's sources), and this module no longer has to keep
quiescing guests out of anybody's way. What is still needed, and why:

* Counting holders per LSS. Two units whose groups share an LSS are both mid-establish:
  the first to finish must not unfreeze the LSS, or the other's already-frozen sources
  take writes before its last pair is established and its image set is no longer
  consistent. A unit's release unfreezes only the LSSs nobody else still holds.
* No newcomer while an unfreeze is in flight: the unfreeze would release the
  newcomer's freshly frozen sources in the middle of its group.
* A time bound. A unit counts as a holder only from the moment its array freeze starts
  (after every guest of its group is quiesced, right before its first establish), and
  an LSS admits newcomers only during the first third of `bound` after its first holder
  joined; each holder must have finished establishing within a third after it joined
  (`deadline`, checked by the engine before every further establish: past it the unit
  lets go and redoes its freeze). The last third is for the establish in flight and the
  unfreeze. So a source is held about `bound` at most — on a badly overloaded site one
  slow call longer — far below the array's ELB timeout; the longest hold seen is kept
  for the logs and reports, and the chaos checker reads the array's own records.

Dropped from the earlier design: counting a unit as holder before its guests quiesced
(it made the LSS wait for quiesces, and with whole-LSS holds a quiesce waited for the LSS).
"""

from __future__ import annotations

from collections.abc import Sequence

import trio

from flowcopy.site.api import Fence

DEFAULT_BOUND = 10.0
"""Seconds an LSS's frozen sources may stay held by this engine (the ELB timeout is 120)."""


class LssHolds:
    def __init__(self, bound: float = DEFAULT_BOUND) -> None:
        if bound <= 0:
            raise ValueError("the freeze-window bound must be positive")
        self.bound = bound
        self._count: dict[str, int] = {}
        self._since: dict[str, float] = {}
        self._releasing: set[str] = set()
        self._released_since: dict[str, float] = {}  # LSSs being unfrozen: when their hold began
        self._changed = trio.Event()
        self.longest_seen = 0.0  # longest ended hold of any LSS so far, freeze to unfreeze (engine s)
        self.longest_lss: str | None = None

    @property
    def admission(self) -> float:
        """How long after its first holder an LSS still admits new holders (and how long a
        holder may take for its establishes)."""
        return self.bound / 3

    def longest(self, now: float) -> float:
        """How long the longest-held LSS has been held continuously (0 when none is)."""
        return max((now - since for since in self._since.values()), default=0.0)

    def held(self, lss: str) -> bool:
        return self._count.get(lss, 0) > 0 or lss in self._releasing

    def _blocked(self, lss: str, now: float) -> bool:
        if lss in self._releasing:
            return True
        return self._count.get(lss, 0) > 0 and now - self._since[lss] >= self.admission

    async def acquire(self, lsses: Sequence[str]) -> float:
        """Count this unit as a holder of `lsses`, waiting while any of them drains or is
        being unfrozen. Returns the engine-clock deadline by which the unit must have
        established its last pair (the engine gives up and redoes the freeze after it)."""
        while True:
            now = trio.current_time()
            if not any(self._blocked(lss, now) for lss in lsses):
                break
            changed = self._changed
            with trio.move_on_after(self.admission):
                await changed.wait()
        now = trio.current_time()
        for lss in lsses:
            count = self._count.get(lss, 0)
            if count == 0:
                self._since[lss] = now
            self._count[lss] = count + 1
        return now + self.admission

    def release(self, lsses: Sequence[str]) -> list[str]:
        """Stop holding; returns the LSSs nobody holds any more (to unfreeze), marked releasing."""
        free = []
        for lss in lsses:
            count = self._count.get(lss, 0) - 1
            if count <= 0:
                self._count.pop(lss, None)
                self._released_since[lss] = self._since.pop(lss, trio.current_time())
                self._releasing.add(lss)
                free.append(lss)
            else:
                self._count[lss] = count
        return free

    def release_unheld(self, lsses: Sequence[str]) -> list[str]:
        """For a unit that holds nothing (resumed, compensating): the LSSs nobody holds, marked releasing."""
        free = [lss for lss in lsses if not self.held(lss)]
        self._releasing.update(free)
        return free

    async def claim_unheld(self, lsses: Sequence[str]) -> list[str]:
        """`release_unheld`, for engines that share LSSs: the shared holds first make sure
        no other live engine has a consistency group on them."""
        return self.release_unheld(lsses)

    def fences(self, lsses: Sequence[str]) -> tuple[Fence, ...]:
        """The fencing tokens an LSS-wide call on `lsses` (an establish with freeze, an
        unfreeze) carries: none for one engine, which owns every LSS by its store lock."""
        return ()

    def unfrozen(self, lsses: Sequence[str]) -> None:
        """The unfreeze of `lsses` finished (or failed): they may be taken again.

        The hold of an LSS this engine held ends here (the unfreeze call included)."""
        now = trio.current_time()
        for lss in lsses:
            self._releasing.discard(lss)
            since = self._released_since.pop(lss, None)
            if since is not None and now - since > self.longest_seen:
                self.longest_seen, self.longest_lss = now - since, lss
        self._changed.set()
        self._changed = trio.Event()
