"""Shared consistency-group freezes per LSS, counted, so units do not queue behind each other.

An `unfreezeflash` releases a whole LSS, whoever froze it. Serialising consistency
groups per LSS (a lock) is safe but makes every unit on an LSS wait for every other's
freeze window; with 1,000 VMs on 16 LSSs that is seconds of guests quiesced. Instead the
engine counts its holders per LSS: a unit's release unfreezes only the LSSs nobody else
still holds. Two guards keep this honest:

* while an unfreeze of an LSS is in flight nobody may take it again (or the unfreeze
  would release the newcomer's freeze);
* an LSS held continuously for longer than `max_hold` lets nobody new in until it
  drains, so overlapping freezes cannot keep host writes held until the ELB timeout.
"""

from __future__ import annotations

from collections.abc import Sequence

import trio


class LssHolds:
    def __init__(self, max_hold: float = 5.0) -> None:
        self.max_hold = max_hold
        self._count: dict[str, int] = {}
        self._since: dict[str, float] = {}
        self._releasing: set[str] = set()
        self._changed = trio.Event()

    def held(self, lss: str) -> bool:
        return self._count.get(lss, 0) > 0 or lss in self._releasing

    def _blocked(self, lss: str, now: float) -> bool:
        if lss in self._releasing:
            return True
        return self._count.get(lss, 0) > 0 and now - self._since[lss] > self.max_hold

    async def acquire(self, lsses: Sequence[str]) -> None:
        """Count this unit as a holder of `lsses`, waiting while any of them drains."""
        while True:
            now = trio.current_time()
            if not any(self._blocked(lss, now) for lss in lsses):
                break
            changed = self._changed
            with trio.move_on_after(self.max_hold):
                await changed.wait()
        now = trio.current_time()
        for lss in lsses:
            count = self._count.get(lss, 0)
            if count == 0:
                self._since[lss] = now
            self._count[lss] = count + 1

    def release(self, lsses: Sequence[str]) -> list[str]:
        """Stop holding; returns the LSSs nobody holds any more (to unfreeze), marked releasing."""
        free = []
        for lss in lsses:
            count = self._count.get(lss, 0) - 1
            if count <= 0:
                self._count.pop(lss, None)
                self._since.pop(lss, None)
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

    def unfrozen(self, lsses: Sequence[str]) -> None:
        """The unfreeze of `lsses` finished (or failed): they may be taken again."""
        for lss in lsses:
            self._releasing.discard(lss)
        self._changed.set()
        self._changed = trio.Event()
