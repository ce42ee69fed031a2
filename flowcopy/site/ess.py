"""The IBM ESS array model: sparse volumes, FlashCopy relationships, consistency-group freezes.

Two layers, as in trio's own style of a functional core inside an async shell:

* `Array` is synchronous, pure and deterministic. It never reads a clock: every method
  whose outcome depends on time takes `now` (site seconds), and everything time drives
  (background-copy progress, a relationship dissolving at 100 %, the ELB timeout
  releasing a frozen LSS) is computed lazily from `now` when a call needs it. The same
  calls with the same `now` values therefore always give the same array, which is what
  lets the persistence layer rebuild it by replaying a log of mutating calls.
* `ArrayService` wraps an `Array` for trio: it supplies `now` from the site clock, makes
  host writes *wait* while their LSS is held (extended long busy is not an error to a
  host), sleeps exactly until a background copy completes, and reports every successful
  mutation to an optional hook (the persistence log).

How a 1 TiB volume stays cheap (DESIGN.md §2.1): a volume stores only the tracks that hold
non-zero bytes (track number -> bytes with trailing zeros trimmed). A relationship keeps
its "copied" bitmap not as a bitmap but as a background-copy cursor (tracks below it are
copied) plus two small sets of exceptions: tracks above the cursor copied early
(copy-on-write, target writes) and tracks below it that an incremental resync made
uncopied again. Establish is O(1) in capacity; copying a never-written track moves no
data, so a background copy is cursor arithmetic plus the few written tracks.

Time semantics worth knowing:

* Background copy walks the *out-of-sync* tracks in ascending track order at
  `bandwidth` bytes/s per relationship (one track per TRACK_SIZE/bandwidth seconds);
  tracks copied early by copy-on-write cost no time. A fresh 1 TiB copy with no writes
  therefore takes exactly tracks*TRACK_SIZE/bandwidth; a resync or reverse only the
  changed tracks' share.
* Time never goes backwards for an Array: a `now` below the last one seen by a state-
  changing call is treated as that last one. Pure reads (`read`, `extents`,
  `held_until`, `volume(s)`, host views) change nothing at all, not even that mark.
* Re-freezing an LSS that is already frozen keeps the first freeze's `since` and
  deadline: the ELB timer runs per LSS from the first freeze of a consistency group, so a
  host is never held longer than `elb_timeout` however many pairs the group has.

Choices where FLASHCOPY.md leaves room (each one tested):

* `record` implies `persistent` (DS8000 `mkflash -record` selects `-persist`).
* Establish discards the target's previous content: a withdrawn, incomplete (nocopy)
  target reads zeros wherever nothing was copied — visibly not a usable image.
* `withdraw(after_copy=True)` on a nocopy relationship starts its background copy
  (`rmflash -cp`); the relationship then reports mode `copy` until it ends.
* `reverse` needs every track copied (a nocopy relationship rarely qualifies), refuses
  with CascadeRefused when the source has other targets (the swapped roles would
  cascade), and the reversed relationship carries no target-write inhibit: its target is
  production being restored.
* Background copy keeps running while a volume is offline; host I/O to it is refused.
* `extents` of a track span its first to last non-zero byte.

Replay contract (for the persistence layer): every mutating core method takes only plain
data (str/int/float/bool/None/bytes/lists/dicts), `FlashOptions` and `SavedTask` may be
given as the dicts `plain_options` / `plain_task` (or `attrs.asdict`) produce, and
`getattr(array, name)(**kwargs)` with the kwargs `ArrayService` reports reproduces the
call exactly, including refusals (which the service never reports).
"""

from __future__ import annotations

import heapq
import math
import re
from bisect import insort
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import attrs
import trio

from flowcopy.site.api import (
    DEFAULT_ELB_TIMEOUT,
    MAX_TARGETS_PER_SOURCE,
    TRACK_SIZE,
    BadRequest,
    BackgroundCopyRunning,
    CascadeRefused,
    CopyMode,
    CopyState,
    Extent,
    FlashOptions,
    HostDisk,
    LssFreeze,
    LssRelease,
    NotIncremental,
    OutOfRange,
    RelationshipExists,
    RelationshipInfo,
    RelationshipNotFound,
    SavedTask,
    SecondIncremental,
    SizeMismatch,
    TargetInRelationship,
    TooManyTargets,
    UnknownDisk,
    UnknownHost,
    UnknownTask,
    UnknownVolume,
    VolumeInfo,
    VolumeOffline,
    WriteInhibited,
)

__all__ = [
    "Array",
    "ArrayService",
    "LssHeld",
    "MUTATING_METHODS",
    "STATE_VERSION",
    "as_options",
    "as_task",
    "plain_options",
    "plain_task",
]

STATE_VERSION = 1

MUTATING_METHODS: frozenset[str] = frozenset(
    {
        "add_volume",
        "set_online",
        "write",
        "establish",
        "withdraw",
        "resync",
        "reverse",
        "unfreeze",
        "map_lun",
        "prime",
        "save_task",
        "execute_task",
    }
)
"""Core methods `ArrayService` reports to `on_mutation`; replaying them rebuilds an Array.

The time-driven methods `query`, `frozen_lsses`, `lss_releases` and `copy_done_at` also
bring the internal representation up to `now`, but that is invisible: advancing to t1
and then to t2 is the same as advancing to t2, so they need no log entry.
"""

_SERIAL = re.compile(r"^[0-9A-F]{8}$")
_WALK_STEP_FACTOR = 4
"""Background copy steps track by track while the due count is within this factor of the
early-copied exceptions (+16), else uses cursor arithmetic; 0 forces the arithmetic (tests)."""
_OPTION_FIELDS = frozenset(f.name for f in attrs.fields(FlashOptions))


class LssHeld(Exception):
    """A host write hit an LSS in extended long busy. Not a SiteError: hosts wait, then retry.

    The core raises it so the async shell can wait (until `unfreeze` or `deadline`) and
    retry; it never reaches the engine through the `Site` interface.
    """

    def __init__(self, serial: str, lss: str, deadline: float) -> None:
        super().__init__(
            f"write to {serial} held: LSS {lss} is in extended long busy until site time {deadline:.3f}"
        )
        self.serial = serial
        self.lss = lss
        self.deadline = deadline


# --------------------------------------------------------------------------- plain data


def plain_options(options: FlashOptions) -> dict[str, Any]:
    """FlashOptions as JSON-ready plain data; `as_options` reverses it."""
    return {
        "mode": options.mode.value,
        "record": options.record,
        "persistent": options.persistent,
        "freeze": options.freeze,
        "tag": options.tag,
        "inhibit_target_writes": options.inhibit_target_writes,
    }


def as_options(value: FlashOptions | Mapping[str, Any]) -> FlashOptions:
    """Accept FlashOptions or its plain/attrs.asdict form (what a replayed log holds)."""
    if isinstance(value, FlashOptions):
        return value
    if not isinstance(value, Mapping):
        raise BadRequest(f"flash options must be FlashOptions or a mapping, not {type(value).__name__}")
    unknown = set(value) - _OPTION_FIELDS
    if unknown:
        raise BadRequest(f"unknown flash option(s): {', '.join(sorted(unknown))}")
    data = dict(value)
    if "mode" in data:
        try:
            data["mode"] = CopyMode(data["mode"])
        except ValueError:
            raise BadRequest(f"flash option mode must be 'copy' or 'nocopy', not {data['mode']!r}") from None
    return FlashOptions(**data)


def plain_task(task: SavedTask) -> dict[str, Any]:
    return {
        "name": task.name,
        "pairs": [[s, t] for s, t in task.pairs],
        "options": plain_options(task.options),
    }


def as_task(value: SavedTask | Mapping[str, Any]) -> SavedTask:
    if isinstance(value, SavedTask):
        return value
    if not isinstance(value, Mapping) or "name" not in value or "pairs" not in value:
        raise BadRequest("a saved task needs a name and pairs")
    pairs = []
    for pair in value["pairs"]:
        if len(pair) != 2:
            raise BadRequest(f"saved task {value['name']}: a pair needs a source and a target, got {pair!r}")
        pairs.append((str(pair[0]), str(pair[1])))
    return SavedTask(
        name=str(value["name"]),
        pairs=tuple(pairs),
        options=as_options(value.get("options", {})),
    )


# --------------------------------------------------------------------------- tracks


def _patch(old: bytes | None, start: int, chunk: bytes) -> bytes:
    """Write `chunk` into a stored (zero-trimmed) track at `start`; result zero-trimmed."""
    old = old or b""
    if len(old) < start:
        old = old + bytes(start - len(old))
    return (old[:start] + chunk + old[start + len(chunk) :]).rstrip(b"\0")


def _slice(stored: bytes | None, start: int, stop: int) -> bytes:
    """Bytes [start, stop) of a stored track, zero-padded (stored tracks are trimmed)."""
    if not stored:
        return bytes(stop - start)
    part = stored[start:stop]
    return part + bytes(stop - start - len(part)) if len(part) < stop - start else part


class _Volume:
    __slots__ = ("serial", "lss", "capacity", "label", "online", "tracks")

    def __init__(self, serial: str, lss: str, capacity: int, label: str | None, online: bool) -> None:
        self.serial = serial
        self.lss = lss
        self.capacity = capacity
        self.label = label
        self.online = online
        # track number -> its bytes with trailing zeros trimmed; absent = all zeros
        self.tracks: dict[int, bytes] = {}

    @property
    def n(self) -> int:
        return self.capacity // TRACK_SIZE

    def info(self) -> VolumeInfo:
        return VolumeInfo(serial=self.serial, lss=self.lss, capacity=self.capacity, online=self.online, label=self.label)


class _Rel:
    """One relationship source -> target and its copied-track bookkeeping.

    copied(t) is `t not in below` for t < cursor and `t in above` for t >= cursor.
    Invariant: the target volume stores bytes only for copied tracks, so an uncopied
    track of the target reads from the source (which still holds the point-in-time data
    there, because a source write copies the old track first) and a withdrawn incomplete
    target reads zeros where nothing was copied.
    """

    __slots__ = (
        "source",
        "target",
        "n",
        "mode",
        "recording",
        "persistent",
        "tag",
        "inhibit",
        "created",
        "synced",
        "reversing",
        "after_copy",
        "cursor",
        "above",
        "below",
        "bg_start",
        "bg_done",
        "src_changed",
        "tgt_changed",
        "copied_at",
    )

    def __init__(self, **fields: Any) -> None:
        for name in self.__slots__:
            setattr(self, name, fields[name])

    def copied(self, t: int) -> bool:
        return t in self.above if t >= self.cursor else t not in self.below

    def out_of_sync(self) -> int:
        return len(self.below) + (self.n - self.cursor - len(self.above))

    def mark(self, t: int) -> None:
        if t >= self.cursor:
            self.above.add(t)
            self.fold()
        else:
            self.below.discard(t)

    def fold(self) -> None:
        """Keep `above` small: move the cursor over copied tracks just above it."""
        while self.cursor in self.above:
            self.above.discard(self.cursor)
            self.cursor += 1

    def unmark(self, t: int) -> None:
        if t >= self.cursor:
            self.above.discard(t)
        else:
            self.below.add(t)

    def dissolves_when_copied(self) -> bool:
        return self.after_copy or (self.mode is CopyMode.COPY and not self.persistent)

    def to_state(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in self.__slots__:
            value = getattr(self, name)
            if isinstance(value, set):
                value = sorted(value)
            elif isinstance(value, CopyMode):
                value = value.value
            out[name] = value
        return out

    @classmethod
    def from_state(cls, data: Mapping[str, Any]) -> _Rel:
        fields = dict(data)
        fields["mode"] = CopyMode(fields["mode"])
        for name in ("above", "below", "src_changed", "tgt_changed"):
            fields[name] = set(fields[name])
        return cls(**fields)


# --------------------------------------------------------------------------- the core



def _natural(name: str) -> tuple[object, ...]:
    """Disk2 before Disk10, as a host lists them."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))

class Array:
    """One ESS box: volumes, host mappings, saved tasks, FlashCopy relationships, LSS freezes."""

    def __init__(self, *, box: str = "698", elb_timeout: float = DEFAULT_ELB_TIMEOUT, bandwidth: float = 100e6) -> None:
        if not re.fullmatch(r"[0-9A-F]{3}", box):
            raise BadRequest(f"box must be 3 digits, not {box!r}")
        if elb_timeout <= 0 or bandwidth <= 0:
            raise BadRequest("elb_timeout and bandwidth must be positive")
        self.box = box
        self.elb_timeout = float(elb_timeout)
        self.bandwidth = float(bandwidth)  # bytes/s per relationship
        self._now = 0.0
        self._vols: dict[str, _Volume] = {}
        self._by_source: dict[str, dict[str, _Rel]] = {}
        self._by_target: dict[str, _Rel] = {}
        self._frozen: dict[str, LssFreeze] = {}
        self._releases: list[LssRelease] = []
        self._hosts: dict[str, dict[str, str]] = {}  # host -> disk name -> serial
        self._primed: dict[str, dict[str, str]] = {}  # host -> disk name -> guest device name
        self._tasks: dict[str, SavedTask] = {}

    # ------------------------------------------------------------------ time

    def _tick(self, now: float) -> float:
        """The effective time of a state-changing call; never earlier than the last one."""
        if now > self._now:
            self._now = float(now)
        return self._now

    def _peek(self, now: float) -> float:
        return max(float(now), self._now)

    def _processed(self, rel: _Rel, now: float) -> int:
        """Out-of-sync tracks the background copy has walked since it (re)started."""
        return math.floor((now - rel.bg_start) * self.bandwidth / TRACK_SIZE)

    def _time_for(self, rel: _Rel, count: int) -> float:
        """The first site time at which the background copy has walked `count` tracks."""
        t = rel.bg_start + count * TRACK_SIZE / self.bandwidth
        while self._processed(rel, t) < count:
            t = math.nextafter(t, math.inf)
        return t

    def _advance(self, rel: _Rel, now: float) -> None:
        """Bring one relationship up to `now`: background copy, then completion/dissolution."""
        if rel.mode is CopyMode.COPY and rel.out_of_sync() > 0:
            due = self._processed(rel, now) - rel.bg_done
            if due > 0:
                rel.bg_done += self._walk(rel, due)
                if rel.out_of_sync() == 0:
                    rel.copied_at = self._time_for(rel, rel.bg_done)
        self._settle(rel, now)

    def _settle(self, rel: _Rel, now: float) -> None:
        if rel.out_of_sync() == 0:
            if rel.copied_at is None:
                rel.copied_at = now  # completed by writes, not by the walk
            if rel.dissolves_when_copied():
                self._drop(rel)

    def _walk(self, rel: _Rel, count: int) -> int:
        """Copy the next `count` out-of-sync tracks in ascending order; returns how many.

        Cost is O(min(due, exceptions) + written tracks in the walked range), never
        O(capacity): a few due tracks are stepped one by one, a long stretch is cursor
        arithmetic over the sorted exceptions.
        """
        src = self._vols[rel.source]
        tgt = self._vols[rel.target]
        done = 0
        if rel.below:  # resync/reverse leftovers; all lie below the cursor, so they come first
            first = sorted(rel.below)[:count] if count * 8 >= len(rel.below) else heapq.nsmallest(count, rel.below)
            for t in first:
                self._copy_track(src, tgt, t)
                rel.below.discard(t)
            done = len(first)
        count -= done
        if count <= 0 or rel.cursor >= rel.n:
            return done
        start = rel.cursor
        if count <= _WALK_STEP_FACTOR * (len(rel.above) + 16):
            t = start
            while count > 0 and t < rel.n:
                if t in rel.above:  # copied early (copy-on-write, target write): costs no time
                    rel.above.discard(t)
                else:
                    self._copy_track(src, tgt, t)
                    count -= 1
                    done += 1
                t += 1
            rel.cursor = t
        else:
            end = start + count
            skipped = []
            for e in sorted(rel.above):
                if e < end:
                    end += 1
                    skipped.append(e)
                else:
                    break
            end = min(end, rel.n)
            skip = {e for e in skipped if e < end}
            done += (end - start) - len(skip)
            if end - start <= len(src.tracks):
                written: Iterable[int] = [t for t in range(start, end) if t in src.tracks]
            else:
                written = [t for t in src.tracks if start <= t < end]
            for t in written:
                if t not in skip:
                    self._copy_track(src, tgt, t)
            rel.above -= skip
            rel.cursor = end
        rel.fold()
        return done

    @staticmethod
    def _copy_track(src: _Volume, tgt: _Volume, t: int) -> None:
        data = src.tracks.get(t)
        if data:
            tgt.tracks[t] = data
        else:
            tgt.tracks.pop(t, None)

    def _rels_of(self, serial: str) -> list[_Rel]:
        rels = list(self._by_source.get(serial, {}).values())
        as_target = self._by_target.get(serial)
        if as_target is not None:
            rels.append(as_target)
        return rels

    def _advance_volume(self, serial: str, now: float) -> None:
        for rel in self._rels_of(serial):
            self._advance(rel, now)

    def _advance_all(self, now: float) -> None:
        for rel in list(self._by_target.values()):
            self._advance(rel, now)
        for lss in list(self._frozen):
            self._expire(lss, now)

    def _expire(self, lss: str, now: float) -> None:
        freeze = self._frozen.get(lss)
        if freeze is not None and now >= freeze.deadline:
            del self._frozen[lss]
            self._record_release(LssRelease(lss=lss, since=freeze.since, released_at=freeze.deadline, by_timeout=True))

    def _record_release(self, release: LssRelease) -> None:
        # kept in (time, lss) order, so the history does not depend on when a timeout was noticed
        insort(self._releases, release, key=lambda r: (r.released_at, r.lss, r.since))

    def _freeze(self, lss: str, now: float) -> None:
        self._expire(lss, now)
        if lss not in self._frozen:
            self._frozen[lss] = LssFreeze(lss=lss, since=now, deadline=now + self.elb_timeout)

    def _held(self, lss: str, now: float) -> LssFreeze | None:
        freeze = self._frozen.get(lss)
        return freeze if freeze is not None and now < freeze.deadline else None

    # ------------------------------------------------------------------ lookups

    def _vol(self, serial: str, context: str = "") -> _Volume:
        vol = self._vols.get(serial)
        if vol is None:
            raise UnknownVolume(f"{context}unknown volume {serial}", serial=serial)
        return vol

    def _find(self, source: str, target: str, verb: str) -> _Rel:
        rel = self._by_source.get(source, {}).get(target)
        if rel is not None:
            return rel
        hint = ""
        if self._by_source.get(target, {}).get(source) is not None:
            hint = f" (there is {target} -> {source})"
        raise RelationshipNotFound(
            f"cannot {verb} {source} -> {target}: no such relationship{hint}", source=source, target=target
        )

    def _info(self, rel: _Rel) -> RelationshipInfo:
        oos = rel.out_of_sync()
        state = CopyState.COPIED if oos == 0 else CopyState.REVERSING if rel.reversing else CopyState.COPYING
        return RelationshipInfo(
            source=rel.source,
            target=rel.target,
            mode=rel.mode,
            recording=rel.recording,
            persistent=rel.persistent,
            tag=rel.tag,
            out_of_sync_tracks=oos,
            total_tracks=rel.n,
            state=state,
            inhibit_target_writes=rel.inhibit,
            created=rel.created,
            synced=rel.synced,
        )

    def _drop(self, rel: _Rel) -> None:
        targets = self._by_source.get(rel.source)
        if targets is not None and targets.get(rel.target) is rel:
            del targets[rel.target]
            if not targets:
                del self._by_source[rel.source]
        if self._by_target.get(rel.target) is rel:
            del self._by_target[rel.target]

    def _check_online(self, vol: _Volume, context: str) -> None:
        if not vol.online:
            raise VolumeOffline(f"{context}volume {vol.serial} is offline", serial=vol.serial)

    def _check_range(self, vol: _Volume, offset: int, length: int, verb: str) -> None:
        if offset < 0 or length < 0 or offset + length > vol.capacity:
            raise OutOfRange(
                f"cannot {verb} {length} bytes at offset {offset} of {vol.serial}: "
                f"the volume has {vol.capacity} bytes",
                serial=vol.serial,
                offset=offset,
                length=length,
            )

    # ------------------------------------------------------------------ volumes

    def add_volume(
        self, serial: str, *, lss: str, capacity: int, label: str | None = None, online: bool = True
    ) -> VolumeInfo:
        """Define a LUN. The serial spells volume(3), LSS(2), box(3) and must agree with both."""
        if not isinstance(serial, str) or not _SERIAL.match(serial):
            raise BadRequest(f"volume serial must be 8 digits (volume, LSS, box), not {serial!r}")
        if serial in self._vols:
            raise BadRequest(f"volume {serial} already exists", serial=serial)
        if serial[3:5] != lss:
            raise BadRequest(f"volume {serial}: LSS {lss!r} does not match the serial's LSS {serial[3:5]}", serial=serial)
        if serial[5:] != self.box:
            raise BadRequest(f"volume {serial}: the serial's box {serial[5:]} is not this box {self.box}", serial=serial)
        if not isinstance(capacity, int) or capacity <= 0 or capacity % TRACK_SIZE:
            raise BadRequest(
                f"volume {serial}: capacity must be a positive multiple of {TRACK_SIZE} bytes, not {capacity!r}",
                serial=serial,
            )
        vol = _Volume(serial, lss, capacity, label, bool(online))
        self._vols[serial] = vol
        return vol.info()

    def set_online(self, serial: str, online: bool, *, now: float) -> None:
        self._tick(now)
        self._vol(serial).online = bool(online)

    def volume(self, serial: str) -> VolumeInfo:
        return self._vol(serial).info()

    def volumes(self) -> list[VolumeInfo]:
        return [self._vols[s].info() for s in sorted(self._vols)]

    # ------------------------------------------------------------------ data

    def _view(self, vol: _Volume, t: int) -> bytes | None:
        """The stored bytes a host reads at track t (a target's uncopied track: the source's)."""
        rel = self._by_target.get(vol.serial)
        if rel is not None and not rel.copied(t):
            return self._vols[rel.source].tracks.get(t)
        return vol.tracks.get(t)

    def read(self, serial: str, offset: int, length: int, *, now: float) -> bytes:
        """Host read. Pure: an unadvanced relationship reads the same bytes (see _Rel)."""
        vol = self._vol(serial)
        self._check_range(vol, offset, length, "read")
        self._check_online(vol, f"cannot read {serial}: ")
        out = bytearray()
        pos, end = offset, offset + length
        while pos < end:
            t, start = divmod(pos, TRACK_SIZE)
            stop = min(TRACK_SIZE, start + end - pos)
            out += _slice(self._view(vol, t), start, stop)
            pos += stop - start
        return bytes(out)

    def held_until(self, serial: str, *, now: float) -> float | None:
        freeze = self._held(self._vol(serial).lss, self._peek(now))
        return freeze.deadline if freeze is not None else None

    def write(self, serial: str, offset: int, data: bytes, *, now: float) -> None:
        """Host write with the per-track FlashCopy rules (FLASHCOPY.md).

        Raises LssHeld (the host waits) while the volume's LSS is frozen at `now`.
        """
        data = bytes(data)
        vol = self._vol(serial)
        self._check_range(vol, offset, len(data), "write")
        self._check_online(vol, f"cannot write {serial}: ")
        now = self._tick(now)
        self._expire(vol.lss, now)
        self._advance_volume(serial, now)  # an inhibiting relationship may have dissolved by now
        as_target = self._by_target.get(serial)
        if as_target is not None and as_target.inhibit:
            raise WriteInhibited(
                f"cannot write {serial}: it is the write-inhibited target of {as_target.source}",
                serial=serial,
                source=as_target.source,
            )
        freeze = self._held(vol.lss, now)
        if freeze is not None:
            raise LssHeld(serial, vol.lss, freeze.deadline)
        if not data:
            return
        as_source = list(self._by_source.get(serial, {}).values())
        pos, end = offset, offset + len(data)
        while pos < end:
            t, start = divmod(pos, TRACK_SIZE)
            stop = min(TRACK_SIZE, start + end - pos)
            for rel in as_source:  # copy-before-write to every target still needing the old track
                if not rel.copied(t):
                    self._copy_track(vol, self._vols[rel.target], t)
                    rel.mark(t)
                if rel.recording:
                    rel.src_changed.add(t)
            if as_target is not None:
                if not as_target.copied(t):  # the track becomes the target's own: fill it first
                    self._copy_track(self._vols[as_target.source], vol, t)
                    as_target.mark(t)
                if as_target.recording:
                    as_target.tgt_changed.add(t)
            stored = _patch(vol.tracks.get(t), start, data[pos - offset : pos - offset + stop - start])
            if stored:
                vol.tracks[t] = stored
            else:
                vol.tracks.pop(t, None)
            pos += stop - start
        for rel in self._rels_of(serial):
            self._settle(rel, now)

    def extents(self, serial: str, *, now: float) -> list[Extent]:
        """Byte ranges holding data as a host reads them now; everything else reads as zeros.

        Each written track contributes the span from its first to its last non-zero byte,
        so zero runs inside a track may be covered; ranges are merged and sorted.
        """
        vol = self._vol(serial)
        self._check_online(vol, f"cannot read {serial}: ")
        tracks: dict[int, bytes] = dict(vol.tracks)
        rel = self._by_target.get(serial)
        if rel is not None:
            for t, b in self._vols[rel.source].tracks.items():
                if not rel.copied(t):
                    tracks[t] = b
        out: list[Extent] = []
        for t in sorted(tracks):
            stored = tracks[t]
            lead = len(stored) - len(stored.lstrip(b"\0"))  # stored tracks are trimmed at the end only
            offset, end = t * TRACK_SIZE + lead, t * TRACK_SIZE + len(stored)
            if out and out[-1].offset + out[-1].length == offset:
                out[-1] = Extent(offset=out[-1].offset, length=end - out[-1].offset)
            else:
                out.append(Extent(offset=offset, length=end - offset))
        return out

    # ------------------------------------------------------------------ FlashCopy

    def _check_pairs(self, pairs: Sequence[tuple[str, str]], options: FlashOptions, context: str = "") -> None:
        """Every establish refusal, for a batch as if established in order; mutates nothing."""
        planned: list[tuple[str, str]] = []
        record = options.record
        for s, t in pairs:
            ctx = f"{context}cannot establish {s} -> {t}: "
            src = self._vol(s, ctx)
            tgt = self._vol(t, ctx)
            if s == t:
                raise CascadeRefused(f"{ctx}source and target are the same volume", source=s, target=t)
            self._check_online(src, ctx)
            self._check_online(tgt, ctx)
            if src.capacity != tgt.capacity:
                raise SizeMismatch(
                    f"{ctx}source {s} has {src.capacity} bytes, target {t} has {tgt.capacity}",
                    source=s,
                    target=t,
                )
            if t in self._by_source.get(s, {}) or (s, t) in planned:
                raise RelationshipExists(f"{ctx}relationship {s} -> {t} already exists", source=s, target=t)
            owner = self._by_target[t].source if t in self._by_target else next((a for a, b in planned if b == t), None)
            if owner is not None:
                raise TargetInRelationship(f"{ctx}target {t} is already the target of {owner}", source=s, target=t)
            fed = sorted(self._by_source.get(t, {})) + [b for a, b in planned if a == t]
            if fed:
                raise CascadeRefused(
                    f"{ctx}target {t} is already the source of {fed[0]} (no cascading)", source=s, target=t
                )
            owner = self._by_target[s].source if s in self._by_target else next((a for a, b in planned if b == s), None)
            if owner is not None:
                raise CascadeRefused(
                    f"{ctx}source {s} is already the target of {owner} (no cascading)", source=s, target=t
                )
            targets = sorted(self._by_source.get(s, {})) + [b for a, b in planned if a == s]
            if len(targets) >= MAX_TARGETS_PER_SOURCE:
                raise TooManyTargets(
                    f"{ctx}source {s} already has {MAX_TARGETS_PER_SOURCE} targets", source=s, target=t
                )
            if record:
                other = next((r.target for r in self._by_source.get(s, {}).values() if r.recording), None)
                if other is None:
                    other = next((b for a, b in planned if a == s), None)
                if other is not None:
                    raise SecondIncremental(
                        f"{ctx}source {s} already has an incremental relationship (to {other})",
                        source=s,
                        target=t,
                    )
            planned.append((s, t))

    def _establish(self, s: str, t: str, options: FlashOptions, now: float) -> _Rel:
        tgt = self._vols[t]
        rel = _Rel(
            source=s,
            target=t,
            n=tgt.n,
            mode=options.mode,
            recording=options.record,
            persistent=options.persistent or options.record,  # -record selects -persist (DS8000 mkflash)
            tag=options.tag,
            inhibit=options.inhibit_target_writes,
            created=now,
            synced=now,
            reversing=False,
            after_copy=False,
            cursor=0,
            above=set(),
            below=set(),
            bg_start=now,
            bg_done=0,
            src_changed=set(),
            tgt_changed=set(),
            copied_at=None,
        )
        tgt.tracks.clear()  # logically the target is now the source's image; nothing is copied yet
        self._by_source.setdefault(s, {})[t] = rel
        self._by_target[t] = rel
        if options.freeze:
            self._freeze(self._vols[s].lss, now)
        return rel

    def establish(
        self, source: str, target: str, options: FlashOptions | Mapping[str, Any], *, now: float
    ) -> RelationshipInfo:
        """mkflash: the target becomes the source's point-in-time image at `now`. Atomic."""
        opts = as_options(options)
        now = self._tick(now)
        for serial in (source, target):
            self._advance_volume(serial, now)
        self._check_pairs([(source, target)], opts)
        return self._info(self._establish(source, target, opts, now))

    def withdraw(self, source: str, target: str, *, now: float, after_copy: bool = False) -> None:
        """rmflash. `after_copy` (-cp): the relationship ends when its background copy
        completes (a nocopy relationship starts one); the call returns at once."""
        now = self._tick(now)
        self._advance_volume(source, now)
        rel = self._find(source, target, "withdraw")
        if not after_copy or rel.out_of_sync() == 0:
            self._drop(rel)
            return
        rel.after_copy = True
        if rel.mode is CopyMode.NOCOPY:
            rel.mode = CopyMode.COPY
            rel.bg_start = now
            rel.bg_done = 0

    def resync(
        self, source: str, target: str, *, now: float, freeze: bool = False, tag: str | None = None
    ) -> RelationshipInfo:
        """resyncflash: a new point in time; only tracks changed on either side are copied again."""
        now = self._tick(now)
        self._advance_volume(source, now)
        rel = self._find(source, target, "resync")
        ctx = f"cannot resync {source} -> {target}: "
        if not rel.recording:
            raise NotIncremental(f"{ctx}the relationship does not record changes", source=source, target=target)
        src, tgt = self._vols[source], self._vols[target]
        self._check_online(src, ctx)
        self._check_online(tgt, ctx)
        for t in rel.src_changed | rel.tgt_changed:
            if rel.copied(t):
                rel.unmark(t)
                tgt.tracks.pop(t, None)
        rel.src_changed = set()
        rel.tgt_changed = set()
        rel.synced = now
        rel.reversing = False
        rel.bg_start = now
        rel.bg_done = 0
        rel.copied_at = None
        if tag is not None:
            rel.tag = tag
        if freeze:
            self._freeze(src.lss, now)
        info = self._info(rel)
        self._settle(rel, now)
        return info

    def reverse(self, source: str, target: str, *, now: float, tag: str | None = None) -> RelationshipInfo:
        """reverseflash: restore target -> source (changed tracks only); the roles swap."""
        now = self._tick(now)
        self._advance_volume(source, now)
        rel = self._find(source, target, "reverse")
        ctx = f"cannot reverse {source} -> {target}: "
        if not rel.recording:
            raise NotIncremental(f"{ctx}the relationship does not record changes", source=source, target=target)
        oos = rel.out_of_sync()
        if oos:
            what = "background copy" if rel.mode is CopyMode.COPY else "nocopy relationship (no background copy)"
            raise BackgroundCopyRunning(
                f"{ctx}the forward copy is unfinished: {oos} of {rel.n} tracks out of sync ({what})",
                source=source,
                target=target,
                out_of_sync_tracks=oos,
            )
        others = sorted(set(self._by_source.get(source, {})) - {target})
        if others:
            raise CascadeRefused(
                f"{ctx}source {source} is also the source of {others[0]}; reversing would cascade",
                source=source,
                target=target,
            )
        src, tgt = self._vols[source], self._vols[target]
        self._check_online(src, ctx)
        self._check_online(tgt, ctx)
        changed = rel.src_changed | rel.tgt_changed
        for t in changed:
            src.tracks.pop(t, None)  # now uncopied on the new target: reads come from the old target
        self._drop(rel)
        new = _Rel(
            source=target,
            target=source,
            n=rel.n,
            mode=rel.mode,
            recording=True,
            persistent=True,
            tag=tag if tag is not None else rel.tag,
            inhibit=False,  # a restore's target is production: reverse carries no write inhibit
            created=rel.created,
            synced=now,
            reversing=True,
            after_copy=False,
            cursor=rel.n,
            above=set(),
            below=set(changed),
            bg_start=now,
            bg_done=0,
            src_changed=set(),
            tgt_changed=set(),
            copied_at=None,
        )
        self._by_source.setdefault(target, {})[source] = new
        self._by_target[source] = new
        info = self._info(new)
        self._settle(new, now)
        return info

    def query(self, *, now: float, volume: str | None = None, tag: str | None = None) -> list[RelationshipInfo]:
        """lsflash: relationships touching `volume` and/or carrying `tag`, sorted by id."""
        now = self._tick(now)
        if volume is not None:
            self._vol(volume, "cannot query: ")
            rels = self._rels_of(volume)
        else:
            rels = list(self._by_target.values())
        if tag is not None:
            rels = [r for r in rels if r.tag == tag]
        for rel in rels:  # only what is asked for is brought up to `now` (thousands may exist)
            self._advance(rel, now)
        rels = [r for r in rels if self._by_target.get(r.target) is r]  # some may have dissolved
        return [self._info(r) for r in sorted(rels, key=lambda r: (r.source, r.target))]

    def copy_done_at(self, source: str, target: str, *, now: float) -> float | None:
        """Site time the background copy completes (or completed), if nothing else happens.

        None for a nocopy relationship that is not complete, or no relationship at all.
        """
        now = self._tick(now)
        self._advance_volume(source, now)
        rel = self._by_source.get(source, {}).get(target)
        if rel is None:
            return None
        if rel.out_of_sync() == 0:
            return rel.copied_at
        if rel.mode is CopyMode.NOCOPY:
            return None
        return self._time_for(rel, rel.bg_done + rel.out_of_sync())

    def unfreeze(self, lsses: Sequence[str], *, now: float) -> list[LssRelease]:
        """unfreezeflash: release these LSSs now. Idempotent: an LSS not frozen is skipped."""
        now = self._tick(now)
        out = []
        for lss in dict.fromkeys(lsses):
            self._expire(lss, now)
            freeze = self._frozen.pop(lss, None)
            if freeze is not None:
                release = LssRelease(lss=lss, since=freeze.since, released_at=now, by_timeout=False)
                self._record_release(release)
                out.append(release)
        return out

    def frozen_lsses(self, *, now: float) -> list[LssFreeze]:
        now = self._tick(now)
        for lss in list(self._frozen):
            self._expire(lss, now)
        return [self._frozen[k] for k in sorted(self._frozen)]

    def lss_releases(self, *, now: float) -> list[LssRelease]:
        """Every freeze that ended, in time order; `by_timeout` tells an ELB expiry from unfreeze."""
        self.frozen_lsses(now=now)
        return list(self._releases)

    # ------------------------------------------------------------------ hosts, tasks

    def map_lun(self, host: str, name: str, serial: str) -> None:
        """Assign LUN `serial` to `host`'s ports, seen there as disk `name` (e.g. Disk1)."""
        self._vol(serial, f"cannot map {serial} to {host} as {name}: ")
        disks = self._hosts.get(host, {})
        if disks.get(name, serial) != serial:
            raise BadRequest(
                f"cannot map {serial} to {host} as {name}: {host} already sees {disks[name]} as {name}",
                host=host,
                name=name,
            )
        self._hosts.setdefault(host, {})[name] = serial

    def list_disks(self, host: str) -> list[HostDisk]:
        """rsList2105s: the host's disk names and the 2105 (ESS) serials behind them."""
        disks = self._hosts.get(host)
        if disks is None:
            raise UnknownHost(f"host {host} has no LUNs mapped on box {self.box}", host=host)
        primed = self._primed.get(host, {})
        return [
            HostDisk(host=host, name=name, serial=disks[name], primed_name=primed.get(name))
            for name in sorted(disks, key=_natural)
        ]

    def prime(self, host: str, names: Mapping[str, str]) -> list[HostDisk]:
        """rsPrimeServer: record the guest's device names (disk name -> "E:") for tasks."""
        disks = self._hosts.get(host)
        if disks is None:
            raise UnknownHost(f"cannot prime {host}: the host has no LUNs mapped on box {self.box}", host=host)
        for name in names:
            if name not in disks:
                raise UnknownDisk(f"cannot prime {host}: it has no disk {name}", host=host, disk=name)
        self._primed.setdefault(host, {}).update({str(k): str(v) for k, v in names.items()})
        return self.list_disks(host)

    def save_task(self, task: SavedTask | Mapping[str, Any]) -> None:
        task = as_task(task)
        if not task.pairs:
            raise BadRequest(f"saved task {task.name} has no pairs", task=task.name)
        self._tasks[task.name] = task

    def tasks(self) -> list[SavedTask]:
        return [self._tasks[k] for k in sorted(self._tasks)]

    def _resolve(self, ref: str, task: str) -> str:
        """A task's volume reference: a serial, or "host:Disk1" / "host:E:" (primed name)."""
        if ":" not in ref:
            return ref
        host, name = ref.split(":", 1)
        disks = self._hosts.get(host)
        if disks is None:
            raise UnknownHost(f"task {task}: {ref}: host {host} has no LUNs mapped", host=host, task=task)
        if name in disks:
            return disks[name]
        for disk, primed in self._primed.get(host, {}).items():
            if primed == name:
                return disks[disk]
        raise UnknownDisk(f"task {task}: {ref}: {host} has no disk or primed device {name}", host=host, task=task)

    def execute_task(self, name: str, *, now: float, tag: str | None = None) -> list[RelationshipInfo]:
        """rsExecuteTask: establish all the task's pairs at one point in time, or none."""
        task = self._tasks.get(name)
        if task is None:
            raise UnknownTask(f"no saved task {name}", task=name)
        now = self._tick(now)
        options = task.options if tag is None else attrs.evolve(task.options, tag=tag)
        pairs = [(self._resolve(s, name), self._resolve(t, name)) for s, t in task.pairs]
        for s, t in pairs:
            self._advance_volume(s, now)
            self._advance_volume(t, now)
        self._check_pairs(pairs, options, context=f"task {name}: ")
        return [self._info(self._establish(s, t, options, now)) for s, t in pairs]

    # ------------------------------------------------------------------ persistence

    def to_state(self) -> dict[str, Any]:
        """Plain data (bytes for track contents); canonical order, so equal arrays compare equal."""
        return {
            "version": STATE_VERSION,
            "box": self.box,
            "elb_timeout": self.elb_timeout,
            "bandwidth": self.bandwidth,
            "now": self._now,
            "volumes": [
                {
                    "serial": v.serial,
                    "lss": v.lss,
                    "capacity": v.capacity,
                    "label": v.label,
                    "online": v.online,
                    "tracks": [[t, v.tracks[t]] for t in sorted(v.tracks)],
                }
                for v in (self._vols[s] for s in sorted(self._vols))
            ],
            "relationships": [
                r.to_state() for r in sorted(self._by_target.values(), key=lambda r: (r.source, r.target))
            ],
            "frozen": [attrs.asdict(self._frozen[k]) for k in sorted(self._frozen)],
            "releases": [attrs.asdict(r) for r in self._releases],
            "hosts": {h: dict(sorted(d.items())) for h, d in sorted(self._hosts.items())},
            "primed": {h: dict(sorted(d.items())) for h, d in sorted(self._primed.items())},
            "tasks": [plain_task(self._tasks[k]) for k in sorted(self._tasks)],
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> Array:
        if state.get("version") != STATE_VERSION:
            raise BadRequest(f"array state version {state.get('version')!r} is not {STATE_VERSION}")
        array = cls(box=state["box"], elb_timeout=state["elb_timeout"], bandwidth=state["bandwidth"])
        array._now = float(state["now"])
        for v in state["volumes"]:
            vol = _Volume(v["serial"], v["lss"], v["capacity"], v["label"], v["online"])
            vol.tracks = {int(t): bytes(b) for t, b in v["tracks"]}
            array._vols[vol.serial] = vol
        for r in state["relationships"]:
            rel = _Rel.from_state(r)
            array._by_source.setdefault(rel.source, {})[rel.target] = rel
            array._by_target[rel.target] = rel
        array._frozen = {f["lss"]: LssFreeze(**f) for f in state["frozen"]}
        array._releases = [LssRelease(**r) for r in state["releases"]]
        array._hosts = {h: dict(d) for h, d in state["hosts"].items()}
        array._primed = {h: dict(d) for h, d in state["primed"].items()}
        array._tasks = {t["name"]: as_task(t) for t in state["tasks"]}
        return array


# --------------------------------------------------------------------------- the trio shell


def _plain(value: Any) -> Any:
    if isinstance(value, FlashOptions):
        return plain_options(value)
    if isinstance(value, SavedTask):
        return plain_task(value)
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class ArrayService:
    """The array on trio's clock: writes wait out a frozen LSS, copies can be waited for.

    `clock` returns site time (default `trio.current_time`); `speed` is site seconds per
    trio second, so a site delay d sleeps d/speed. `on_mutation(name, kwargs)` is called
    after every successful mutating core call (MUTATING_METHODS) with plain-data kwargs
    including `now`; `getattr(array, name)(**kwargs)` replays it. A held write wakes on an
    `unfreeze` made through this service, or at the ELB deadline otherwise.
    """

    def __init__(
        self,
        array: Array | None = None,
        *,
        clock: Callable[[], float] | None = None,
        speed: float = 1.0,
        on_mutation: Callable[[str, dict[str, Any]], None] | None = None,
    ) -> None:
        if speed <= 0:
            raise ValueError("speed must be positive")
        self.array = array if array is not None else Array()
        self.clock: Callable[[], float] = clock if clock is not None else trio.current_time
        self.speed = speed
        self.on_mutation = on_mutation
        self._released = trio.Event()  # set (and replaced) by every unfreeze through this service

    # ------------------------------------------------------------------ plumbing

    def _call(self, name: str, timed: bool, /, **kwargs: Any) -> Any:
        if timed:
            kwargs["now"] = self.clock()
        result = getattr(self.array, name)(**kwargs)
        if name in MUTATING_METHODS and self.on_mutation is not None:
            self.on_mutation(name, _plain(kwargs))
        return result

    def _trio_deadline(self, site_time: float) -> float:
        now = trio.current_time()
        deadline = now + (site_time - self.clock()) / self.speed
        return deadline if deadline > now else math.nextafter(now, math.inf)

    async def sleep_until(self, site_time: float) -> None:
        """Sleep until the site clock reads at least `site_time`."""
        while self.clock() < site_time:
            await trio.sleep_until(self._trio_deadline(site_time))
        await trio.lowlevel.checkpoint()

    # ------------------------------------------------------------------ volumes, data

    async def add_volume(
        self, serial: str, *, lss: str, capacity: int, label: str | None = None, online: bool = True
    ) -> VolumeInfo:
        await trio.lowlevel.checkpoint()
        return self._call("add_volume", False, serial=serial, lss=lss, capacity=capacity, label=label, online=online)

    async def set_online(self, serial: str, online: bool) -> None:
        await trio.lowlevel.checkpoint()
        self._call("set_online", True, serial=serial, online=online)

    async def volume(self, serial: str) -> VolumeInfo:
        await trio.lowlevel.checkpoint()
        return self.array.volume(serial)

    async def volumes(self) -> list[VolumeInfo]:
        await trio.lowlevel.checkpoint()
        return self.array.volumes()

    async def read(self, serial: str, offset: int, length: int) -> bytes:
        await trio.lowlevel.checkpoint()
        return self._call("read", True, serial=serial, offset=offset, length=length)

    async def write(self, serial: str, offset: int, data: bytes) -> None:
        """A host write: while the LSS is held it waits (unfreeze or ELB timeout), then retries."""
        while True:
            await trio.lowlevel.checkpoint()
            released = self._released
            try:
                self._call("write", True, serial=serial, offset=offset, data=bytes(data))
                return
            except LssHeld as held:
                with trio.move_on_at(self._trio_deadline(held.deadline)):
                    await released.wait()

    async def held_until(self, serial: str) -> float | None:
        await trio.lowlevel.checkpoint()
        return self._call("held_until", True, serial=serial)

    async def extents(self, serial: str) -> list[Extent]:
        await trio.lowlevel.checkpoint()
        return self._call("extents", True, serial=serial)

    # ------------------------------------------------------------------ FlashCopy

    async def establish(self, source: str, target: str, options: FlashOptions) -> RelationshipInfo:
        await trio.lowlevel.checkpoint()
        return self._call("establish", True, source=source, target=target, options=options)

    async def withdraw(self, source: str, target: str, *, after_copy: bool = False) -> None:
        await trio.lowlevel.checkpoint()
        self._call("withdraw", True, source=source, target=target, after_copy=after_copy)

    async def resync(
        self, source: str, target: str, *, freeze: bool = False, tag: str | None = None
    ) -> RelationshipInfo:
        await trio.lowlevel.checkpoint()
        return self._call("resync", True, source=source, target=target, freeze=freeze, tag=tag)

    async def reverse(self, source: str, target: str, *, tag: str | None = None) -> RelationshipInfo:
        await trio.lowlevel.checkpoint()
        return self._call("reverse", True, source=source, target=target, tag=tag)

    async def query(self, *, volume: str | None = None, tag: str | None = None) -> list[RelationshipInfo]:
        await trio.lowlevel.checkpoint()
        return self._call("query", True, volume=volume, tag=tag)

    async def copy_done_at(self, source: str, target: str) -> float | None:
        await trio.lowlevel.checkpoint()
        return self._call("copy_done_at", True, source=source, target=target)

    async def wait_copied(self, source: str, target: str) -> RelationshipInfo | None:
        """Sleep until the background copy source -> target is complete.

        Returns the relationship (COPIED) if it stays (persistent), None if it is gone
        (dissolved at 100 %, or withdrawn). Raises BadRequest for an incomplete nocopy
        relationship: there is no background copy to wait for.
        """
        while True:
            await trio.lowlevel.checkpoint()
            found = [r for r in self._call("query", True, volume=source) if r.target == target and r.source == source]
            if not found:
                return None
            if found[0].out_of_sync_tracks == 0:
                return found[0]
            done_at = self._call("copy_done_at", True, source=source, target=target)
            if done_at is None:
                raise BadRequest(
                    f"cannot wait for {source} -> {target}: a nocopy relationship has no background copy",
                    source=source,
                    target=target,
                )
            await self.sleep_until(done_at)

    async def unfreeze(self, lsses: Sequence[str]) -> list[LssRelease]:
        await trio.lowlevel.checkpoint()
        releases = self._call("unfreeze", True, lsses=list(lsses))
        self._released.set()
        self._released = trio.Event()
        return releases

    async def frozen_lsses(self) -> list[LssFreeze]:
        await trio.lowlevel.checkpoint()
        return self._call("frozen_lsses", True)

    async def lss_releases(self) -> list[LssRelease]:
        await trio.lowlevel.checkpoint()
        return self._call("lss_releases", True)

    # ------------------------------------------------------------------ hosts, tasks

    async def map_lun(self, host: str, name: str, serial: str) -> None:
        await trio.lowlevel.checkpoint()
        self._call("map_lun", False, host=host, name=name, serial=serial)

    async def list_disks(self, host: str) -> list[HostDisk]:
        await trio.lowlevel.checkpoint()
        return self.array.list_disks(host)

    async def prime(self, host: str, names: Mapping[str, str]) -> list[HostDisk]:
        await trio.lowlevel.checkpoint()
        return self._call("prime", False, host=host, names=dict(names))

    async def save_task(self, task: SavedTask) -> None:
        await trio.lowlevel.checkpoint()
        self._call("save_task", False, task=task)

    async def tasks(self) -> list[SavedTask]:
        await trio.lowlevel.checkpoint()
        return self.array.tasks()

    async def execute_task(self, name: str, *, tag: str | None = None) -> list[RelationshipInfo]:
        await trio.lowlevel.checkpoint()
        return self._call("execute_task", True, name=name, tag=tag)
