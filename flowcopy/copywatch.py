"""One relationship query shared by every unit that waits on the site's relationships.

A unit waiting for its background copy used to ask the site for its own tag once per
poll. The array model answers a tag query by scanning every relationship, so with
10,000 units copying at once that is O(units x relationships) per poll period: the
trio loop fell behind, and after a restart the reconciliation of thousands of units
queued behind those polls. Here all waiters share the answer of one query of every
relationship (one call per poll period, however many units wait), and a resumed unit
settles its intent against the same answer instead of a query of its own.

Freshness is what keeps this correct: a waiter only accepts an answer whose query
started after the moment it asks about (after its own last side effect), never an
older one that might predate its establish.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import trio

from flowcopy.site import api
from flowcopy.stages import Pair, _raise_failed
from flowcopy.site.api import CopyMode, RelationshipInfo, Site

Snapshot = Mapping[str, Sequence[RelationshipInfo]]
"""Relationships by tag (untagged ones are left out: no unit owns them)."""


class RelationshipWatch:
    """Shared, rate-limited snapshots of every relationship at the site."""

    def __init__(self, site: Site, poll: float) -> None:
        self.site = site
        self.poll = poll
        self.queries = 0
        """Site queries made (one per snapshot)."""
        self._snapshot: Snapshot = {}
        self._taken = -math.inf  # trio time its query started
        self._querying = False
        self._took = 0.0  # how long the last query took
        self._arrivals = 0  # calls of after(), to see when a burst of waiters has arrived
        self._changed = trio.Event()

    async def after(self, moment: float) -> Snapshot:
        """A snapshot whose query started at or after trio time `moment`.

        One query at a time; a waiter that arrives while one runs waits for it (and, if
        it started too early for this waiter, for the next one). Queries start at most
        once per poll period, so a stream of arriving units cannot keep the site busy.
        A failed query fails only the waiter that made it; the others try again."""
        self._arrivals += 1
        while self._taken < moment:
            if self._querying:
                await self._changed.wait()
                continue
            self._querying = True
            try:
                # and never more than a fifth of the time in queries (20,000 relationships
                # take a while to list, and 10,000 waiting units must not starve the rest)
                earliest = self._taken + max(self.poll, 4 * self._took)
                if trio.current_time() < earliest and self._taken > -math.inf:
                    await trio.sleep_until(earliest)
                # let every task that is about to ask arrive first (a resume starts thousands
                # at once): one answer then serves them all instead of the next one
                for _ in range(16):
                    arrived = self._arrivals
                    await trio.lowlevel.checkpoint()
                    if self._arrivals == arrived:
                        break
                started = trio.current_time()
                by_tag: dict[str, list[RelationshipInfo]] = {}
                for rel in await self.site.query():
                    if rel.tag is not None:
                        by_tag.setdefault(rel.tag, []).append(rel)
                self._snapshot, self._taken = by_tag, started
                self._took = trio.current_time() - started
                self.queries += 1
            finally:
                self._querying = False
                self._changed.set()
                self._changed = trio.Event()
        return self._snapshot

    async def ours(self, tag: str, moment: float) -> dict[tuple[str, str], RelationshipInfo]:
        """What `stages.ours` answers, from a snapshot taken after `moment`."""
        return {(r.source, r.target): r for r in (await self.after(moment)).get(tag, ())}

    async def wait_copied(
        self,
        tag: str,
        pairs: Sequence[Pair],
        on_progress: Callable[[int, int], None] | None = None,
        *,
        on_first: Callable[[], None] | None = None,
    ) -> None:
        """`stages.wait_copied`, sharing the poll: until no relationship of ours still has
        out-of-sync tracks (a dissolved one counts as copied). `on_first` hears the first
        answer (a resumed unit then knows where its copy stands). A failed relationship
        fails the wait with the array's reason, as in `stages.wait_copied`."""
        total_tracks = sum(p.capacity for p in pairs) // api.TRACK_SIZE
        moment = trio.current_time()
        while True:
            snapshot = await self.after(moment)
            if on_first is not None:
                on_first()
                on_first = None
            moment = math.nextafter(self._taken, math.inf)  # the next answer must be newer
            rels = snapshot.get(tag, ())
            _raise_failed(pairs, rels)
            pending = [r for r in rels if r.out_of_sync_tracks > 0 and r.mode is CopyMode.COPY]
            if on_progress is not None:
                on_progress(sum(r.out_of_sync_tracks for r in pending), total_tracks)
            if not pending:
                return

