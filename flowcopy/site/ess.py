"""The IBM ESS array model: sparse volumes, FlashCopy relationships, consistency-group freezes.

Two layers, as in trio's own style of a functional core inside an async shell:

* `Array` is synchronous, pure and deterministic. It never reads a clock: every method
  whose outcome depends on time takes `now` (site seconds), and everything time drives
  (background-copy progress, a relationship dissolving at 100 %, the ELB timeout
  releasing a frozen LSS) is computed lazily from `now` when a call needs it. The same
  calls with the same `now` values therefore always give the same array, which is what
  lets the persistence layer rebuild it by replaying a log of mutating calls.
* `ArrayService` wraps an `Array` for trio: it supplies `now` from the site clock, makes
  host writes *wait* while their volume is a frozen source (long busy is not an error to
  a host), sleeps exactly until a background copy completes, and reports every
  successful mutation to an optional hook (the persistence log).

How a 1 TiB volume stays cheap (DESIGN.md §2.1): a volume stores only the tracks that hold
non-zero bytes (track number -> bytes with trailing zeros trimmed). A relationship keeps
its "copied" bitmap not as a bitmap but as a background-copy cursor (tracks below it are
copied) plus two small sets of exceptions: tracks above the cursor copied early
(copy-on-write, target writes) and tracks below it that an incremental resync made
uncopied again. Establish is O(1) in capacity; copying a never-written track moves no
data, so a background copy is cursor arithmetic plus the few written tracks (and the
target's own old tracks in the range, which the copy overwrites).

The semantics, with the documentation each rule comes from (looked up for issue 16):

* Consistency-group freeze holds the frozen *source volumes* only. `mkflash -freeze`
  "Triggers the queue full condition for the source volume. All writes to the source
  volume are queued by the host ... During the queue full condition, the source volume
  reports long busy status. The queue full condition is reset by an extended long busy
  timeout. The timeout condition affects all FlashCopy source volumes that are contained
  within a respective logical subsystem and that are established or modified with the
  -freeze parameter" (DS CLI mkflash reference, DS6000/DS8000 Storage Manager help,
  f2c_climkflash). "Consistency Group FlashCopy ... hold[s] off host I/O to the source
  volumes" until the Consistency Group Created command or the timeout (IBM Redbook
  DS6000 Copy Services, ch. 6 "Consistency Group FlashCopy"). So writes to a target, or
  to any other volume of the LSS, flow on; `LssFreeze.sources` lists what is held.
* `unfreezeflash LSS` (Consistency Group Created) releases every frozen source of that
  LSS, whoever froze it; on an LSS with nothing frozen it is accepted and does nothing:
  "The CGCREATED operation is processed at LSS level. It thaws all the volumes currently
  in 'frozen for consistency grouping' state in the LSS that received the command. When
  a 'thaw' command is received by an LSS that does not have any frozen volumes ... the
  command is accepted, but no actual processing takes place" (z/OS DFSMSdss, FlashCopy
  consistency group example, ibm.com/docs/en/zos/3.1.0?topic=group-example).
* One ELB (consistency group) timer per LSS, default 120 s, set per LSS: "There is one
  Consistency Group timer per logical subsystem (LSS) for FlashCopy. The Consistency
  Group timer has a default of 120 seconds" (same page); "Write I/O automatically
  resumes after 120 seconds even if the FlashCopy Withdraw THAW request is [not
  issued]" (z/OS System Data Mover, "FlashCopy consistency groups"). The timer starts
  with the group's first freeze; a source frozen later joins that timer (a host is never
  held longer than the LSS's timeout however many pairs the group has). `set_elb_timeout`
  (`chlss -extlongbusy`) applies to groups formed afterwards. Every source hold is
  recorded (`hold_history`: since, released_at, by_timeout), durable with the state.
* resyncflash options replace the old ones: "The specified parameters in this command
  replace the parameters in the existing relationship. To keep the initial -record and
  -persist parameter values, the -record and -persist parameters must be specified"
  (DS CLI resyncremoteflash, ibm.com/docs/en/ds8000-10th-generation/10.0?topic=
  commands-resyncremoteflash, same wording for resyncflash). Without `record` the
  relationship stops recording; without `persistent` a copy-mode one dissolves once the
  changed tracks are copied; `-tgtinhibit` and `-nocp` likewise apply only if given.
* Fast reverse restore (`reverseflash -fast`): allowed before the forward background
  copy has finished; the source gets the target's image at once, the former target holds
  no usable image until established again (`VolumeInfo.unusable`; the checker says so).
  Without `-fast` the reverse is refused while the forward copy runs (FLASHCOPY.md).
* A withdrawn incomplete target keeps its old physical tracks mixed with the copied
  ones — not zeros: "When a FlashCopy NOCOPY relationship is ended, the track data on the
  target device is unpredictable and should not be used" (z/OS, "Withdrawing FlashCopy
  relationships", SSLTBW_2.1.0 flds03). So establish keeps the target's physical tracks;
  an uncopied track reads from the source until it is copied.
* `rmflash -cp` switches a nocopy relationship to background copy and ends it when the
  copy completes — unless it is persistent, which stays (see `Array.withdraw` for the
  references: FCWITHDR DDSW=YES / FCNOCOPYTOCOPY).
* Space-efficient (track space-efficient, TSE) targets. A volume may live in a
  space-efficient pool (`add_space_pool`, `add_volume(space_pool=...)`; the lab's
  `space_pools:`): "Physical space is allocated on a track basis. When data is written to
  a TSE volume, a track of physical space is taken from the segments that are assigned to
  a repository volume" (z/OS DFSMSdss, "Choosing space efficient FlashCopy",
  ibm.com/docs SSLTBW_2.4.0 xr9sefc). So a copy-on-write into the target, or a host write
  to it, takes one track of pool space, once per track; establish takes none ("Even if
  the pool is in a 100% used state ... you can create a relationship in which the T-VOL
  is a TSE-VOL", HP XP7 Compatible FlashCopy guide, "Managing failed states").
  A TSE volume is a target only ("track space efficient volumes as the target of a
  FlashCopy relationship", same IBM page), and takes no background copy: "You must
  specify NOCOPY for space efficient relationships" (z/OS ANTG000 "use" topic); an
  establish with background copy onto one, or a withdraw that would start a background
  copy (`rmflash -cp`, DDSW(YES)), is refused (z/OS MVS system messages, ieam100 idg83591: "background
  copy requested ... and the specified target device is a space efficient volume";
  "Using DDSW(YES)": "It is not allowed if there is a space efficient target volume"):
  `SpaceEfficientRefused`.
  A full pool fails its relationships: "Once the repository volume capacity becomes
  completely exhausted ... Any FlashCopy relation in which the target volume is a space
  efficient volume that resides in the extent pool ... is put in failed state" (z/OS
  message IEA499E). Writes to the source go on, uncopied: "Read/Write operations to the
  S-VOL remain available, but the data is not copied to T-VOL ... To restore the FC
  relationship from a Failed state, the relationship must be released" (HP XP7 guide).
  So the copy-on-write that finds no space fails every relationship whose target is in
  that pool (state FAILED, `RelationshipInfo.failed` says why, the target's
  `VolumeInfo.unusable` too, so the checker reports it), the source write completes;
  afterwards host writes to such a target, resync and reverse are refused
  (`RelationshipFailed`); only withdraw remains. `withdraw(release_space=True)`
  (`rmflash -tgtreleasespace`) gives the target's tracks back to the pool (released
  tracks read as zeros): "releasing space allocated to the target data ... in response
  to determining that the target storage comprises the space efficient storage" (IBM
  patent US 10042581, withdraw of a space-efficient target). The DS CLI reference page of
  `-tgtreleasespace` itself was not in the searched corpus.
  Choice: a host write to a space-efficient volume that needs more tracks than its pool
  has left is refused whole (`PoolFull`) and changes nothing (the array's calls are
  atomic; the relationships fail at the next copy-on-write that finds no space).

Time semantics worth knowing:

* Background copy walks the *out-of-sync* tracks in ascending track order; tracks copied
  early by copy-on-write cost no time. The array's `bandwidth` (bytes/s) is shared
  equally by the background copies running at each moment (processor sharing): twelve
  copies started together take twelve times as long as one, and one that completes (or
  is withdrawn) hands its share to the rest. Computed lazily on one fixed-point copy
  clock (integer ticks of 2**-32 track, copyclock.py) that is re-based only when the set
  of running copies changes, never by iterating time; see "shared copy bandwidth" below. A fresh copy running alone takes
  exactly tracks*TRACK_SIZE/bandwidth; a resync or reverse only the changed tracks'
  share. Nocopy relationships take no share.
* Time never goes backwards for an Array: a `now` below the last one seen by a state-
  changing call is treated as that last one. Pure reads (`read`, `extents`,
  `held_until`, `volume(s)`, host views) change nothing at all, not even that mark.

Choices where the documents leave room (each one tested):

* `record` implies `persistent` (DS8000 `mkflash -record` selects `-persist`).
* A fast reverse counts the former target's never-copied tracks that differ from the
  restored source as changed on it, so reversing back (the next incremental backup) or
  resyncing copies them: O(written tracks), never O(capacity).
* `reverse` refuses with CascadeRefused when the source has other targets (the swapped
  roles would cascade), and the reversed relationship carries no target-write inhibit:
  its target is production being restored.
* Background copy keeps running while a volume is offline; host I/O to it is refused.
* `extents` of a track span its first to last non-zero byte.
* Copy-services command latency and the per-LSS limit of concurrent commands (LssBusy)
  live in the async shell (`LocalSite`, or the lab's `lss_command_limit`), not in this
  core: the core's calls are atomic.

Replay contract (for the persistence layer): every mutating core method takes only plain
data (str/int/float/bool/None/bytes/lists/dicts), `FlashOptions` and `SavedTask` may be
given as the dicts `plain_options` / `plain_task` (or `attrs.asdict`) produce, and
`getattr(array, name)(**kwargs)` with the kwargs `ArrayService` reports reproduces the
call exactly, including refusals (which the service never reports).
"""

from __future__ import annotations

import heapq
import math
import operator
import re
from bisect import insort
from fractions import Fraction
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import attrs
import trio

from flowcopy.site.copyclock import TICK_BITS, TICKS_PER_TRACK, CopyClock
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
    LssInfo,
    LssRelease,
    NotIncremental,
    OutOfRange,
    PoolFull,
    RelationshipExists,
    RelationshipFailed,
    RelationshipInfo,
    RelationshipNotFound,
    SavedTask,
    SecondIncremental,
    SizeMismatch,
    SourceHold,
    SpaceEfficientRefused,
    SpacePool,
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

STATE_VERSION = 4  # 4: the copy clock in integer ticks (3: exact Fractions of a track)
HOLD_HISTORY = 100_000
"""Ended source-volume holds the array keeps (oldest dropped first), for the checkers."""

MUTATING_METHODS: frozenset[str] = frozenset(
    {
        "add_volume",
        "add_space_pool",
        "set_online",
        "write",
        "establish",
        "withdraw",
        "resync",
        "reverse",
        "unfreeze",
        "set_elb_timeout",
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
    """A host write hit a frozen source volume (long busy). Not a SiteError: hosts wait, then retry.

    The core raises it so the async shell can wait (until `unfreeze` or `deadline`) and
    retry; it never reaches the engine through the `Site` interface.
    """

    def __init__(self, serial: str, lss: str, deadline: float) -> None:
        super().__init__(
            f"write to {serial} held: it is a frozen FlashCopy source of LSS {lss}'s consistency group "
            f"(long busy until unfreeze or site time {deadline:.3f})"
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
    __slots__ = ("serial", "lss", "capacity", "label", "online", "tracks", "unusable", "pool", "alloc")

    def __init__(self, serial: str, lss: str, capacity: int, label: str | None, online: bool,
                 pool: str | None = None) -> None:
        self.pool = pool  # space-efficient pool, or None (fully provisioned)
        self.alloc: set[int] = set()  # a space-efficient volume's tracks that hold pool space
        self.serial = serial
        self.lss = lss
        self.capacity = capacity
        self.label = label
        self.online = online
        # track number -> its *physical* bytes with trailing zeros trimmed; absent = all zeros.
        # A target's uncopied tracks read from its source whatever they physically hold.
        self.tracks: dict[int, bytes] = {}
        self.unusable: str | None = None  # set by a fast reverse restore, cleared by an establish

    @property
    def n(self) -> int:
        return self.capacity // TRACK_SIZE

    def info(self) -> VolumeInfo:
        return VolumeInfo(serial=self.serial, lss=self.lss, capacity=self.capacity, online=self.online,
                          label=self.label, unusable=self.unusable, space_pool=self.pool)


class _Pool:
    """A space-efficient pool (repository): `capacity` tracks, `used` of them allocated."""

    __slots__ = ("name", "capacity", "used")

    def __init__(self, name: str, capacity: int) -> None:
        self.name = name
        self.capacity = capacity  # tracks
        self.used = 0


class _Group:
    """An LSS's consistency group: one ELB timer, and the frozen sources with their freeze times."""

    __slots__ = ("since", "deadline", "timeout", "sources")

    def __init__(self, since: float, deadline: float, timeout: float, sources: dict[str, float]) -> None:
        self.since = since
        self.deadline = deadline
        self.timeout = timeout
        self.sources = sources

    def info(self, lss: str) -> LssFreeze:
        return LssFreeze(lss=lss, since=self.since, deadline=self.deadline,
                         sources=tuple(sorted(self.sources)), elb_timeout=self.timeout)


class _Rel:
    """One relationship source -> target and its copied-track bookkeeping.

    copied(t) is `t not in below` for t < cursor and `t in above` for t >= cursor.
    An uncopied track of the target reads from the source (which still holds the
    point-in-time data there, because a source write copies the old track first), whatever
    the target physically holds there: its old data until the track is copied. So a
    withdrawn incomplete target reads its old physical tracks mixed with the copied ones.
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
        "v_start",
        "bg_done",
        "src_changed",
        "tgt_changed",
        "copied_at",
        "failed",
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
            elif name == "v_start":
                value = str(value)  # ticks outgrow 64 bits on a long-lived array
            elif isinstance(value, CopyMode):
                value = value.value
            out[name] = value
        return out

    @classmethod
    def from_state(cls, data: Mapping[str, Any]) -> _Rel:
        fields = dict(data)
        fields["mode"] = CopyMode(fields["mode"])
        fields["v_start"] = str(fields.get("v_start", 0))  # Array.from_state reads it (ticks, or a version-3 Fraction)
        fields.pop("bg_start", None)  # version 2: per-relationship rates (Array.from_state re-bases)
        fields.setdefault("failed", None)
        for name in ("above", "below", "src_changed", "tgt_changed"):
            fields[name] = set(fields[name])
        return cls(**fields)


# --------------------------------------------------------------------------- the core



_BY_PAIR = operator.attrgetter("source", "target")  # relationships in id order


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
        self._now = 0.0
        # the copy clock V (see "shared copy bandwidth"); bandwidth in bytes/s, shared by the running copies
        self._clock = CopyClock(float(bandwidth))
        self._running: dict[tuple[str, str], _Rel] = {}  # relationships whose background copy runs
        self._heap: list[tuple[int, int, str, str, int, int]] = []  # finish marks (stale ones skipped)
        self._seq = 0
        self._next_done = -math.inf  # no running copy completes before this site time
        self._epoch = 0  # changes whenever V's line (origin or slope) changes
        self._clock_cache: tuple[tuple[float, int], int] = ((math.nan, -1), 0)
        self._vols: dict[str, _Volume] = {}
        self._by_source: dict[str, dict[str, _Rel]] = {}
        self._by_target: dict[str, _Rel] = {}
        self._frozen: dict[str, _Group] = {}
        self._releases: list[LssRelease] = []
        self._elb: dict[str, float] = {}  # per-LSS ELB timeout (chlss); absent: elb_timeout
        self._holds: list[SourceHold] = []  # ended source holds, in release order
        self._hosts: dict[str, dict[str, str]] = {}  # host -> disk name -> serial
        self._primed: dict[str, dict[str, str]] = {}  # host -> disk name -> guest device name
        self._tasks: dict[str, SavedTask] = {}
        self._pools: dict[str, _Pool] = {}
        self._by_tag: dict[str | None, dict[tuple[str, str], _Rel]] = {}  # lsflash -seqnum without a scan

    # ------------------------------------------------------------------ time

    def _tick(self, now: float) -> float:
        """The effective time of a state-changing call; never earlier than the last one."""
        if now > self._now:
            self._now = float(now)
        self._run_to(self._now)
        return self._now

    def _peek(self, now: float) -> float:
        return max(float(now), self._now)

    # ------------------------------------------------------------------ shared copy bandwidth
    #
    # Processor sharing: the k running background copies each get bandwidth/k. One "copy
    # clock" V (what each running copy has been given since the array began, in integer
    # ticks of 2**-32 track: copyclock.py states its two rounding rules) is a piecewise-
    # linear function of site time whose slope changes only when the set of running copies
    # changes (establish, resync, withdraw, completion); a copy started at V=v0 has walked
    # (V(t) - v0) // TICKS_PER_TRACK tracks at t, and finishes when V reaches v0 + (walked +
    # out-of-sync) * TICKS_PER_TRACK (its "finish mark", kept in a heap). Nothing iterates time.

    @property
    def bandwidth(self) -> float:
        """Bytes/s of background copy the array shares among its running copies."""
        return self._clock.bandwidth

    @bandwidth.setter
    def bandwidth(self, value: float) -> None:
        if value <= 0:
            raise BadRequest("bandwidth must be positive")
        self._run_to(self._now)
        self._clock.set_bandwidth(self._now, value)
        self._changed()

    def _changed(self) -> None:
        """V's line (origin, slope or marks) changed: cached readings and the next finish are stale."""
        self._next_done = -math.inf
        self._epoch += 1

    def _clock_now(self, now: float) -> int:
        """V at a float site time, cached until the clock changes (queries ask it per relationship)."""
        key = (now, self._epoch)
        if self._clock_cache[0] != key:
            self._clock_cache = (key, self._clock.value(now))
        return self._clock_cache[1]

    def _run_change(self, now: float, k: int) -> None:
        """The set of running copies changes at `now` and will hold k copies."""
        self._clock.change(now, k)
        self._changed()

    def _finish(self, rel: _Rel) -> int:
        return rel.v_start + (rel.bg_done + rel.out_of_sync()) * TICKS_PER_TRACK

    def _push(self, rel: _Rel) -> None:
        need = rel.bg_done + rel.out_of_sync()
        heapq.heappush(self._heap, (rel.v_start + need * TICKS_PER_TRACK, self._seq, rel.source, rel.target, need, rel.v_start))
        self._seq += 1
        self._next_done = -math.inf
        if len(self._heap) > 4 * len(self._running) + 64:  # drop stale marks now and then
            self._heap = [e for e in self._heap if self._valid(e)]
            heapq.heapify(self._heap)

    def _valid(self, entry: tuple[int, int, str, str, int, int]) -> bool:
        rel = self._running.get((entry[2], entry[3]))
        return rel is not None and rel.bg_done + rel.out_of_sync() == entry[4] and rel.v_start == entry[5]

    def _top(self) -> tuple[int, _Rel] | None:
        while self._heap:
            entry = self._heap[0]
            if self._valid(entry):
                return entry[0], self._running[(entry[2], entry[3])]
            heapq.heappop(self._heap)
        return None

    def _run_to(self, now: float) -> None:
        """Complete, in order, every running copy whose finish mark V reaches by `now`."""
        if not self._running or now < self._next_done:
            return
        while self._running:
            top = self._top()
            if top is None:
                break
            mark, rel = top
            done = self._clock.reaches(mark)
            if done > now:
                self._next_done = done
                return
            heapq.heappop(self._heap)
            del self._running[(rel.source, rel.target)]
            self._run_change(done, len(self._running))
            rel.copied_at = done
        self._next_done = -math.inf

    def _activate(self, rel: _Rel, now: float) -> None:
        """Start (or restart) rel's background copy at `now` if it has one to run."""
        self._deactivate(rel, now)
        rel.bg_done = 0
        if rel.mode is not CopyMode.COPY or rel.out_of_sync() == 0 or rel.failed:
            return
        self._run_change(now, len(self._running) + 1)
        rel.v_start = self._clock.ticks
        rel.copied_at = None
        self._running[(rel.source, rel.target)] = rel
        self._push(rel)

    def _deactivate(self, rel: _Rel, now: float) -> None:
        key = (rel.source, rel.target)
        if self._running.get(key) is rel:
            del self._running[key]
            self._run_change(now, len(self._running))

    def _processed(self, rel: _Rel, now: float) -> int:
        """Out-of-sync tracks the background copy has walked since it (re)started."""
        if self._running.get((rel.source, rel.target)) is rel:
            return (self._clock_now(now) - rel.v_start) >> TICK_BITS
        return rel.bg_done + rel.out_of_sync()  # its copy completed (in _run_to): all of it is due

    def _advance(self, rel: _Rel, now: float) -> None:
        """Bring one relationship up to `now`: background copy, then completion/dissolution."""
        if rel.mode is CopyMode.COPY and rel.out_of_sync() > 0 and not rel.failed:
            due = self._processed(rel, now) - rel.bg_done
            if due > 0:
                rel.bg_done += self._walk(rel, due)
        self._settle(rel, now)

    def _settle(self, rel: _Rel, now: float) -> None:
        if rel.out_of_sync() == 0:
            if rel.copied_at is None:
                rel.copied_at = now  # completed by writes, not by the walk
            self._deactivate(rel, now)  # frees its share of the bandwidth for the others
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
            # copying a zero track moves no data but clears what the target stored there
            # before (its old physical data), so both volumes' written tracks count
            stored = len(src.tracks) + len(tgt.tracks)
            if end - start <= stored:
                written: Iterable[int] = [t for t in range(start, end) if t in src.tracks or t in tgt.tracks]
            else:
                written = sorted({t for t in src.tracks if start <= t < end} | {t for t in tgt.tracks if start <= t < end})
            for t in written:
                if t not in skip:
                    self._copy_track(src, tgt, t)
            # the target keeps its old physical tracks until each is copied: a walked track
            # the source never wrote is copied as zeros, so the target's old data goes too
            if end - start <= len(tgt.tracks):
                stale: Iterable[int] = [t for t in range(start, end) if t in tgt.tracks]
            else:
                stale = [t for t in tgt.tracks if start <= t < end]
            for t in list(stale):
                if t not in skip and t not in src.tracks:
                    tgt.tracks.pop(t, None)
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
        group = self._frozen.get(lss)
        if group is not None and now >= group.deadline:
            del self._frozen[lss]
            self._release(lss, group, group.deadline, by_timeout=True)

    def _release(self, lss: str, group: _Group, at: float, *, by_timeout: bool) -> LssRelease:
        """End a consistency group: every frozen source of the LSS flows again (CGCREATED / ELB)."""
        release = LssRelease(lss=lss, since=group.since, released_at=at, by_timeout=by_timeout,
                             sources=tuple(sorted(group.sources)))
        # kept in (time, lss) order, so the history does not depend on when a timeout was noticed
        insort(self._releases, release, key=lambda r: (r.released_at, r.lss, r.since))
        for serial in sorted(group.sources):
            hold = SourceHold(serial=serial, lss=lss, since=group.sources[serial], deadline=group.deadline,
                              released_at=at, by_timeout=by_timeout)
            insort(self._holds, hold, key=lambda h: (h.released_at, h.serial))
        if len(self._holds) > HOLD_HISTORY:
            del self._holds[: len(self._holds) - HOLD_HISTORY]
        return release

    def elb_timeout_of(self, lss: str) -> float:
        return self._elb.get(lss, self.elb_timeout)

    def _freeze(self, serial: str, now: float) -> None:
        """mkflash -freeze: the *source volume* reports long busy until its LSS's group ends.

        One ELB timer per LSS, started by the group's first freeze (IBM z/OS DFSMSdss
        "FlashCopy consistency group" example: "one Consistency Group timer per LSS").
        """
        lss = self._vols[serial].lss
        self._expire(lss, now)
        group = self._frozen.get(lss)
        if group is None:
            timeout = self.elb_timeout_of(lss)
            group = self._frozen[lss] = _Group(now, now + timeout, timeout, {})
        group.sources.setdefault(serial, now)

    def _held(self, serial: str, now: float) -> _Group | None:
        """The group holding writes to `serial` at `now`, if it is a frozen source."""
        group = self._frozen.get(self._vols[serial].lss)
        if group is None or now >= group.deadline or serial not in group.sources:
            return None
        return group

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
        held = self._held(rel.source, self._now)
        state = (CopyState.FAILED if rel.failed else CopyState.COPIED if oos == 0
                 else CopyState.REVERSING if rel.reversing else CopyState.COPYING)
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
            source_write_enabled=held is None,
            elb_deadline=held.deadline if held is not None else None,
            space_efficient=self._vols[rel.target].pool is not None,
            failed=rel.failed,
        )

    def _retag(self, rel: _Rel, tag: str | None) -> None:
        key = (rel.source, rel.target)
        old = self._by_tag.get(rel.tag)
        if old is not None and old.get(key) is rel:
            del old[key]
            if not old:
                del self._by_tag[rel.tag]
        rel.tag = tag
        self._by_tag.setdefault(tag, {})[key] = rel

    def _drop(self, rel: _Rel) -> None:
        self._deactivate(rel, self._now)
        tagged = self._by_tag.get(rel.tag)
        if tagged is not None and tagged.get((rel.source, rel.target)) is rel:
            del tagged[(rel.source, rel.target)]
            if not tagged:
                del self._by_tag[rel.tag]
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

    def add_space_pool(self, name: str, capacity: int) -> SpacePool:
        """Define a space-efficient pool (repository) of `capacity` bytes (whole tracks)."""
        if not isinstance(name, str) or not name or name in self._pools:
            raise BadRequest(f"space-efficient pool name must be new and non-empty, not {name!r}")
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity <= 0 or capacity % TRACK_SIZE:
            raise BadRequest(f"space-efficient pool {name}: capacity must be a positive multiple of "
                             f"{TRACK_SIZE} bytes, not {capacity!r}", pool=name)
        self._pools[name] = _Pool(name, capacity // TRACK_SIZE)
        return self._pool_info(self._pools[name])

    def _pool_info(self, pool: _Pool) -> SpacePool:
        members = tuple(sorted(v.serial for v in self._vols.values() if v.pool == pool.name))
        return SpacePool(name=pool.name, capacity=pool.capacity * TRACK_SIZE, used=pool.used * TRACK_SIZE,
                         volumes=members)

    def list_space_pools(self) -> list[SpacePool]:
        """lssestg: each space-efficient pool with its capacity, space used and volumes."""
        return [self._pool_info(self._pools[k]) for k in sorted(self._pools)]

    def _allocate(self, vol: _Volume, t: int) -> bool:
        """Give track t of a space-efficient volume its pool space (once); False if the pool is full."""
        if vol.pool is None or t in vol.alloc:
            return True
        pool = self._pools[vol.pool]
        if pool.used >= pool.capacity:
            return False
        vol.alloc.add(t)
        pool.used += 1
        return True

    def _release_space(self, vol: _Volume) -> None:
        if vol.pool is not None:
            self._pools[vol.pool].used -= len(vol.alloc)
            vol.alloc.clear()
            vol.tracks.clear()  # released tracks hold nothing: they read as zeros

    def _exhaust(self, name: str, now: float) -> None:
        """The pool ran out: every relationship whose target is in it fails (IEA499E)."""
        pool = self._pools[name]
        for rel in sorted(self._by_target.values(), key=lambda r: (r.source, r.target)):
            tgt = self._vols[rel.target]
            if tgt.pool == name and not rel.failed:
                rel.failed = (
                    f"space-efficient pool {name} full ({pool.capacity} tracks of {TRACK_SIZE} bytes used): "
                    f"relationship {rel.source} -> {rel.target} failed at site time {now:.3f}; the image is "
                    f"unusable; enlarge the pool or use a standard target"
                )
                self._deactivate(rel, now)
                tgt.unusable = rel.failed

    def add_volume(
        self, serial: str, *, lss: str, capacity: int, label: str | None = None, online: bool = True,
        space_pool: str | None = None,
    ) -> VolumeInfo:
        """Define a LUN. The serial spells volume(3), LSS(2), box(3) and must agree with both.

        `space_pool`: the volume is track space-efficient, its tracks taking space in that pool."""
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
        if space_pool is not None and space_pool not in self._pools:
            raise BadRequest(f"volume {serial}: no space-efficient pool {space_pool!r}", serial=serial)
        vol = _Volume(serial, lss, capacity, label, bool(online), space_pool)
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
        out = bytearray(length)  # zeros: only the stored (zero-trimmed) bytes are copied in
        pos, end = offset, offset + length
        while pos < end:
            t, start = divmod(pos, TRACK_SIZE)
            stop = min(TRACK_SIZE, start + end - pos)
            stored = self._view(vol, t)
            if stored and start < len(stored):
                part = memoryview(stored)[start:stop]
                out[pos - offset : pos - offset + len(part)] = part
            pos += stop - start
        return bytes(out)

    def held_until(self, serial: str, *, now: float) -> float | None:
        """When the ELB timer releases `serial`, while it is a frozen source; else None."""
        self._vol(serial)
        group = self._held(serial, self._peek(now))
        return group.deadline if group is not None else None

    def write(self, serial: str, offset: int, data: bytes, *, now: float) -> None:
        """Host write with the per-track FlashCopy rules (FLASHCOPY.md).

        Raises LssHeld (the host waits) while the volume is a frozen source at `now`; the
        other volumes of its LSS (targets, other hosts' LUNs) are not held.
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
        group = self._held(serial, now)
        if group is not None:
            raise LssHeld(serial, vol.lss, group.deadline)
        if as_target is not None and as_target.failed:
            raise RelationshipFailed(f"cannot write {serial}: it is the target of a failed relationship "
                                     f"({as_target.failed}); withdraw it first", serial=serial, source=as_target.source)
        if not data:
            return
        if vol.pool is not None:
            first, last = offset // TRACK_SIZE, (offset + len(data) - 1) // TRACK_SIZE
            pool = self._pools[vol.pool]
            new = sum(1 for t in range(first, last + 1) if t not in vol.alloc)
            if pool.used + new > pool.capacity:
                raise PoolFull(
                    f"cannot write {serial}: its space-efficient pool {pool.name} is full ({pool.used} of "
                    f"{pool.capacity} tracks used, {new} more needed); release space (rmflash -tgtreleasespace) "
                    f"or enlarge the pool", serial=serial, pool=pool.name)
        as_source = list(self._by_source.get(serial, {}).values())
        marks = {id(r): r.bg_done + r.out_of_sync() for r in self._rels_of(serial)
                 if self._running.get((r.source, r.target)) is r}
        pos, end = offset, offset + len(data)
        while pos < end:
            t, start = divmod(pos, TRACK_SIZE)
            stop = min(TRACK_SIZE, start + end - pos)
            for rel in as_source:  # copy-before-write to every target still needing the old track
                if rel.failed:
                    continue  # source writes flow on; nothing reaches a failed relationship's target
                if not rel.copied(t):
                    tgt = self._vols[rel.target]
                    if not self._allocate(tgt, t):
                        self._exhaust(tgt.pool, now)  # type: ignore[arg-type]
                        continue
                    self._copy_track(vol, tgt, t)
                    rel.mark(t)
                if rel.recording:
                    rel.src_changed.add(t)
            self._allocate(vol, t)  # room checked above
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
            if id(rel) in marks and rel.bg_done + rel.out_of_sync() != marks[id(rel)]:
                self._push(rel)  # tracks copied early cost no time: it finishes sooner
            self._settle(rel, now)

    def extents(self, serial: str, *, now: float) -> list[Extent]:
        """Byte ranges holding data as a host reads them now; everything else reads as zeros.

        Each written track contributes the span from its first to its last non-zero byte,
        so zero runs inside a track may be covered; ranges are merged and sorted.
        """
        vol = self._vol(serial)
        self._check_online(vol, f"cannot read {serial}: ")
        rel = self._by_target.get(serial)
        tracks: dict[int, bytes] = dict(vol.tracks) if rel is None else {
            t: b for t, b in vol.tracks.items() if rel.copied(t)  # uncopied tracks read from the source
        }
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
            if src.pool is not None:
                raise SpaceEfficientRefused(
                    f"{ctx}source {s} is space-efficient (pool {src.pool}); a track space-efficient "
                    f"volume can only be a FlashCopy target", source=s, target=t)
            if tgt.pool is not None and options.mode is CopyMode.COPY:
                raise SpaceEfficientRefused(
                    f"{ctx}target {t} is space-efficient (pool {tgt.pool}): no background copy onto it; "
                    f"use mode nocopy (mkflash -nocp) or a standard target", source=s, target=t)
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
            v_start=0,
            bg_done=0,
            src_changed=set(),
            tgt_changed=set(),
            copied_at=None,
            failed=None,
        )
        # logically the target is now the source's image; physically it keeps its old tracks
        # until each is copied (a withdrawn incomplete target is old data mixed with copies)
        tgt.unusable = None
        self._by_source.setdefault(s, {})[t] = rel
        self._by_target[t] = rel
        self._retag(rel, rel.tag)
        self._activate(rel, now)
        if options.freeze:
            self._freeze(s, now)
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

    def withdraw(self, source: str, target: str, *, now: float, after_copy: bool = False,
                 release_space: bool = False) -> None:
        """rmflash. `after_copy` (-cp): the relationship ends when its background copy
        completes (a nocopy relationship starts one); the call returns at once.

        On a persistent relationship `-cp` only turns the background copy on: the
        relationship stays once copied (it is persistent). IBM documents the same for the
        withdraw-with-background-copy request FlashCopy V2 takes from the DS CLI
        (FCWITHDR DDSW=YES: NOCOPY relationships are switched to COPY and withdrawn after
        the copy completes, "If ... the relationship is established with INCREMENTAL = YES,
        the relationship will be maintained after the background copy operation is
        completed" — HP XP P9500 Compatible FlashCopy guide, "Case 5"; z/OS
        FCNOCOPYTOCOPY: "the FlashCopy relationship will end unless the relationship is
        persistent", ibm.com/docs SSLTBW_2.1.0 fcnocopytocopy).
        """
        now = self._tick(now)
        self._advance_volume(source, now)
        rel = self._find(source, target, "withdraw")
        tgt = self._vols[target]
        if after_copy and tgt.pool is not None and rel.out_of_sync() > 0:
            raise SpaceEfficientRefused(
                f"cannot withdraw {source} -> {target} after a background copy (-cp): the target is "
                f"space-efficient (pool {tgt.pool}) and takes no background copy", source=source, target=target)
        if not after_copy or (rel.out_of_sync() == 0 and not rel.persistent):
            self._drop(rel)
            if release_space:
                self._release_space(tgt)
            return
        rel.after_copy = not rel.persistent
        if rel.mode is CopyMode.NOCOPY:
            rel.mode = CopyMode.COPY
            self._activate(rel, now)

    def resync(
        self,
        source: str,
        target: str,
        *,
        now: float,
        freeze: bool = False,
        tag: str | None = None,
        options: FlashOptions | Mapping[str, Any] | None = None,
    ) -> RelationshipInfo:
        """resyncflash: a new point in time; only tracks changed on either side are copied again.

        The options given replace the relationship's: "The specified parameters in this
        command replace the parameters in the existing relationship. To keep the initial
        -record and -persist parameter values, the -record and -persist parameters must be
        specified" (DS CLI resyncremoteflash/resyncflash reference, ibm.com/docs ds8000
        commands-resyncremoteflash). Without `record` the relationship stops recording;
        without `persistent` (copy mode) it dissolves when the changed tracks are copied.
        """
        opts = as_options(options) if options is not None else FlashOptions(freeze=freeze, tag=tag)
        freeze = freeze or opts.freeze
        tag = opts.tag if opts.tag is not None else tag
        now = self._tick(now)
        self._advance_volume(source, now)
        rel = self._find(source, target, "resync")
        ctx = f"cannot resync {source} -> {target}: "
        if rel.failed:
            raise RelationshipFailed(f"{ctx}{rel.failed}", source=source, target=target)
        if not rel.recording:
            raise NotIncremental(f"{ctx}the relationship does not record changes", source=source, target=target)
        src, tgt = self._vols[source], self._vols[target]
        if tgt.pool is not None and opts.mode is CopyMode.COPY:
            raise SpaceEfficientRefused(f"{ctx}target {target} is space-efficient (pool {tgt.pool}): no "
                                        f"background copy onto it; resync with mode nocopy", source=source, target=target)
        self._check_online(src, ctx)
        self._check_online(tgt, ctx)
        for t in rel.src_changed | rel.tgt_changed:
            if rel.copied(t):
                rel.unmark(t)  # reads come from the source again; the old bytes stay until copied
        rel.src_changed = set()
        rel.tgt_changed = set()
        rel.mode = opts.mode
        rel.recording = opts.record
        rel.persistent = opts.persistent or opts.record
        rel.inhibit = opts.inhibit_target_writes
        rel.after_copy = False
        rel.synced = now
        rel.reversing = False
        rel.copied_at = None
        self._activate(rel, now)
        if tag is not None:
            self._retag(rel, tag)
        if freeze:
            self._freeze(source, now)
        info = self._info(rel)
        self._settle(rel, now)
        return info

    def reverse(
        self, source: str, target: str, *, now: float, tag: str | None = None, fast: bool = False
    ) -> RelationshipInfo:
        """reverseflash: restore target -> source (changed tracks only); the roles swap.

        Refused while the forward background copy is unfinished, unless `fast` (-fast, fast
        reverse restore): then the source gets the target's image at once, and the former
        target, which never received the uncopied tracks, holds no usable image (its
        `unusable` says so) until it is established as a target again.
        """
        now = self._tick(now)
        self._advance_volume(source, now)
        rel = self._find(source, target, "reverse")
        ctx = f"cannot reverse {source} -> {target}: "
        if rel.failed:
            raise RelationshipFailed(f"{ctx}{rel.failed}", source=source, target=target)
        if not rel.recording:
            raise NotIncremental(f"{ctx}the relationship does not record changes", source=source, target=target)
        oos = rel.out_of_sync()
        if oos and not fast:
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
        changed = rel.src_changed | rel.tgt_changed  # all copied: a source write copies first, a target write fills first
        # the former target never received its uncopied tracks: where it physically differs
        # from the restored source they count as changed on it (a later resync or reverse
        # copies them); O(written tracks), not O(capacity)
        missing = {
            t for t in set(src.tracks) | set(tgt.tracks)
            if not rel.copied(t) and src.tracks.get(t) != tgt.tracks.get(t)
        } if oos else set()
        self._drop(rel)
        if oos:
            tgt.unusable = (
                f"fast reverse restore to {source} at site time {now:.3f} before the background copy "
                f"finished ({oos} of {rel.n} tracks never copied): not a usable image until established again"
            )
        new = _Rel(
            source=target,
            target=source,
            n=rel.n,
            mode=CopyMode.NOCOPY if src.pool is not None else rel.mode,  # no background copy onto a space-efficient volume
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
            v_start=0,
            bg_done=0,
            src_changed=missing,
            tgt_changed=set(),
            copied_at=None,
            failed=None,
        )
        self._by_source.setdefault(target, {})[source] = new
        self._by_target[source] = new
        self._retag(new, new.tag)
        self._activate(new, now)
        src.unusable = None
        info = self._info(new)
        self._settle(new, now)
        return info

    def query(self, *, now: float, volume: str | None = None, tag: str | None = None) -> list[RelationshipInfo]:
        """lsflash: relationships touching `volume` and/or carrying `tag`, sorted by id."""
        now = self._tick(now)
        if volume is not None:
            self._vol(volume, "cannot query: ")
            rels = self._rels_of(volume)
        elif tag is not None:
            rels = list(self._by_tag.get(tag, {}).values())
        else:
            rels = list(self._by_target.values())
        if tag is not None:
            rels = [r for r in rels if r.tag == tag]
        for rel in rels:  # only what is asked for is brought up to `now` (thousands may exist)
            self._advance(rel, now)
        rels = [r for r in rels if self._by_target.get(r.target) is r]  # some may have dissolved
        return [self._info(r) for r in sorted(rels, key=_BY_PAIR)]

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
        if self._running.get((source, target)) is not rel:
            return None  # nocopy (or failed): no background copy
        # the running copies finish in the order of their marks, each one widening the others' share
        clock = self._clock.copy()
        for mark, other in sorted((self._finish(r), key) for key, r in self._running.items()):
            done = clock.reaches(mark)
            if other == (source, target):
                return done
            clock.change(done, clock.k - 1)
        raise AssertionError("a running copy is missing from its own schedule")

    def unfreeze(self, lsses: Sequence[str], *, now: float) -> list[LssRelease]:
        """unfreezeflash: every frozen source of these LSSs flows again now ("consistency
        created"). Idempotent: an LSS with nothing frozen accepts it and does nothing
        ("When a thaw command is received by an LSS that does not have any frozen volumes
        ... the command is accepted, but no actual processing takes place", z/OS DFSMSdss
        FlashCopy consistency group example)."""
        now = self._tick(now)
        out = []
        for lss in dict.fromkeys(lsses):
            self._expire(lss, now)
            group = self._frozen.pop(lss, None)
            if group is not None:
                out.append(self._release(lss, group, now, by_timeout=False))
        return out

    def frozen_lsses(self, *, now: float) -> list[LssFreeze]:
        now = self._tick(now)
        for lss in list(self._frozen):
            self._expire(lss, now)
        return [self._frozen[k].info(k) for k in sorted(self._frozen)]

    def hold_history(self, *, now: float) -> list[SourceHold]:
        """Every source hold recorded (the last HOLD_HISTORY ended ones and the current ones),
        sorted by start time: what a checker needs to bound holds and find stray ones."""
        current = self.frozen_lsses(now=now)
        out = list(self._holds)
        for freeze in current:
            group = self._frozen[freeze.lss]
            out += [SourceHold(serial=s, lss=freeze.lss, since=group.sources[s], deadline=group.deadline,
                               released_at=None, by_timeout=False) for s in sorted(group.sources)]
        return sorted(out, key=lambda h: (h.since, h.serial))

    def list_lsses(self, *, now: float) -> list[LssInfo]:
        """lslss: every LSS that has volumes, with its ELB timeout and frozen sources."""
        frozen = {f.lss: f.sources for f in self.frozen_lsses(now=now)}
        counts: dict[str, int] = {}
        for vol in self._vols.values():
            counts[vol.lss] = counts.get(vol.lss, 0) + 1
        return [LssInfo(lss=lss, volumes=counts[lss], elb_timeout=self.elb_timeout_of(lss),
                        frozen_sources=frozen.get(lss, ())) for lss in sorted(counts)]

    def set_elb_timeout(self, lss: str, seconds: float, *, now: float) -> LssInfo:
        """chlss -extlongbusy: the LSS's consistency-group timeout for groups formed from now
        on (a running group keeps its timer). Per LSS, default 120 s ("There is one
        Consistency Group timer per logical subsystem (LSS) for FlashCopy. The Consistency
        Group timer has a default of 120 seconds", z/OS DFSMSdss FlashCopy consistency group)."""
        now = self._tick(now)
        if not any(v.lss == lss for v in self._vols.values()):
            raise BadRequest(f"cannot set the ELB timeout of LSS {lss}: box {self.box} has no volume in it", lss=lss)
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 < seconds <= 86400:
            raise BadRequest(f"ELB timeout of LSS {lss} must be a number of seconds in (0, 86400], not {seconds!r}", lss=lss)
        self._elb[lss] = float(seconds)
        return next(i for i in self.list_lsses(now=now) if i.lss == lss)

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
            "copy_clock": {"ticks": str(self._clock.ticks), "at": self._clock.at},
            "running": [list(k) for k in sorted(self._running)],
            "volumes": [
                {
                    "serial": v.serial,
                    "lss": v.lss,
                    "capacity": v.capacity,
                    "label": v.label,
                    "online": v.online,
                    "unusable": v.unusable,
                    "space_pool": v.pool,
                    "alloc": sorted(v.alloc),
                    "tracks": [[t, v.tracks[t]] for t in sorted(v.tracks)],
                }
                for v in (self._vols[s] for s in sorted(self._vols))
            ],
            "relationships": [
                r.to_state() for r in sorted(self._by_target.values(), key=lambda r: (r.source, r.target))
            ],
            "frozen": [
                {"lss": k, "since": g.since, "deadline": g.deadline, "timeout": g.timeout,
                 "sources": [[serial, g.sources[serial]] for serial in sorted(g.sources)]}
                for k, g in sorted(self._frozen.items())
            ],
            "releases": [{**attrs.asdict(r), "sources": list(r.sources)} for r in self._releases],
            "elb": dict(sorted(self._elb.items())),
            "holds": [attrs.asdict(h) for h in self._holds],
            "hosts": {h: dict(sorted(d.items())) for h, d in sorted(self._hosts.items())},
            "primed": {h: dict(sorted(d.items())) for h, d in sorted(self._primed.items())},
            "tasks": [plain_task(self._tasks[k]) for k in sorted(self._tasks)],
            "space_pools": [{"name": k, "capacity": self._pools[k].capacity * TRACK_SIZE} for k in sorted(self._pools)],
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> Array:
        """Older versions load too: 1 (whole-LSS freezes, no hold records: its groups hold no
        source), 2 (a rate per copy), 3 (the copy clock as exact Fractions: converted at `now`)."""
        if state.get("version") not in (1, 2, 3, STATE_VERSION):
            raise BadRequest(f"array state version {state.get('version')!r} is not {STATE_VERSION}")
        array = cls(box=state["box"], elb_timeout=state["elb_timeout"], bandwidth=state["bandwidth"])
        array._now = float(state["now"])
        for p in state.get("space_pools", []):
            array._pools[p["name"]] = _Pool(p["name"], int(p["capacity"]) // TRACK_SIZE)
        for v in state["volumes"]:
            vol = _Volume(v["serial"], v["lss"], v["capacity"], v["label"], v["online"], v.get("space_pool"))
            vol.tracks = {int(t): bytes(b) for t, b in v["tracks"]}
            vol.unusable = v.get("unusable")
            vol.alloc = {int(t) for t in v.get("alloc", [])}
            if vol.pool is not None:
                array._pools[vol.pool].used += len(vol.alloc)
            array._vols[vol.serial] = vol
        for r in state["relationships"]:
            rel = _Rel.from_state(r)
            array._by_source.setdefault(rel.source, {})[rel.target] = rel
            array._by_target[rel.target] = rel
            array._by_tag.setdefault(rel.tag, {})[(rel.source, rel.target)] = rel
            if "bg_start" in r and rel.mode is CopyMode.COPY and rel.out_of_sync() > 0:
                # version 2 ran each copy at its own rate: carry on from what it had walked by now
                walked = math.floor((array._now - float(r["bg_start"])) * array.bandwidth / TRACK_SIZE)
                rel.v_start = -min(walked, rel.bg_done + rel.out_of_sync()) * TICKS_PER_TRACK
                array._running[(rel.source, rel.target)] = rel
        clock = state.get("copy_clock")
        for source, target in state.get("running", []) if clock is not None else []:
            array._running[(source, target)] = array._by_source[source][target]
        if isinstance(clock, Mapping):
            array._clock = CopyClock(array.bandwidth, ticks=int(clock["ticks"]), at=float(clock["at"]),
                                     k=len(array._running))
            for rel in array._by_target.values():
                rel.v_start = int(rel.v_start)
        elif clock is not None:
            array._clock = _from_exact_clock(array, Fraction(str(clock[0])), Fraction(str(clock[1])))
        else:
            array._clock = CopyClock(array.bandwidth, at=array._now, k=len(array._running))
            for rel in array._by_target.values():
                rel.v_start = rel.v_start if isinstance(rel.v_start, int) else 0
        for rel in array._running.values():
            array._push(rel)
        array._frozen = {
            f["lss"]: _Group(float(f["since"]), float(f["deadline"]),
                             float(f.get("timeout", float(f["deadline"]) - float(f["since"]))),
                             {str(serial): float(at) for serial, at in f.get("sources", [])})
            for f in state["frozen"]
        }
        array._releases = [LssRelease(**{**r, "sources": tuple(r.get("sources", ()))}) for r in state["releases"]]
        array._elb = {str(k): float(v) for k, v in state.get("elb", {}).items()}
        array._holds = [SourceHold(**h) for h in state.get("holds", [])]
        array._hosts = {h: dict(d) for h, d in state["hosts"].items()}
        array._primed = {h: dict(d) for h, d in state["primed"].items()}
        array._tasks = {t["name"]: as_task(t) for t in state["tasks"]}
        return array


def _from_exact_clock(array: Array, v: Fraction, at: Fraction) -> CopyClock:
    """A version-3 state's exact copy clock (V in tracks at `at`, v_start Fractions) as ticks.

    Re-based at the state's `now`: V there is rounded down to a tick, and each running
    copy's start is set so that it has walked exactly the tracks it had by the old clock.
    """
    now = Fraction(array._now)
    k = len(array._running)
    if k and now > at:
        v += (now - at) * Fraction(array.bandwidth) / (k * TRACK_SIZE)
    ticks = math.floor(v * TICKS_PER_TRACK)
    for rel in array._by_target.values():
        if array._running.get((rel.source, rel.target)) is rel:
            rel.v_start = ticks - math.floor((v - Fraction(rel.v_start)) * TICKS_PER_TRACK)
        else:
            rel.v_start = 0  # not running: read again when it (re)starts
    return CopyClock(array.bandwidth, ticks=ticks, at=array._now, k=k)


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
        self, serial: str, *, lss: str, capacity: int, label: str | None = None, online: bool = True,
        space_pool: str | None = None,
    ) -> VolumeInfo:
        await trio.lowlevel.checkpoint()
        extra = {"space_pool": space_pool} if space_pool is not None else {}
        return self._call("add_volume", False, serial=serial, lss=lss, capacity=capacity, label=label, online=online,
                          **extra)

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

    async def withdraw(self, source: str, target: str, *, after_copy: bool = False,
                       release_space: bool = False) -> None:
        await trio.lowlevel.checkpoint()
        kwargs: dict[str, Any] = {"after_copy": after_copy}
        if release_space:  # logged only when given, so older logs and new ones replay alike
            kwargs["release_space"] = True
        self._call("withdraw", True, source=source, target=target, **kwargs)

    async def list_space_pools(self) -> list[SpacePool]:
        await trio.lowlevel.checkpoint()
        return self.array.list_space_pools()

    async def resync(
        self,
        source: str,
        target: str,
        *,
        freeze: bool = False,
        tag: str | None = None,
        options: FlashOptions | None = None,
    ) -> RelationshipInfo:
        await trio.lowlevel.checkpoint()
        return self._call("resync", True, source=source, target=target, freeze=freeze, tag=tag, options=options)

    async def reverse(self, source: str, target: str, *, tag: str | None = None, fast: bool = False) -> RelationshipInfo:
        await trio.lowlevel.checkpoint()
        return self._call("reverse", True, source=source, target=target, tag=tag, fast=fast)

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

    async def hold_history(self) -> list[SourceHold]:
        await trio.lowlevel.checkpoint()
        return self._call("hold_history", True)

    async def list_lsses(self) -> list[LssInfo]:
        await trio.lowlevel.checkpoint()
        return self._call("list_lsses", True)

    async def set_elb_timeout(self, lss: str, seconds: float) -> LssInfo:
        await trio.lowlevel.checkpoint()
        return self._call("set_elb_timeout", True, lss=lss, seconds=seconds)

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
