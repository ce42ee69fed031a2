"""The one async interface the engine uses to act on a site, and the errors it can see.

Implemented in-process (`flowcopy.site.local.LocalSite` over `ess` + `esx`) and over HTTP
(`flowcopy.site.client.SiteClient` -> `flowcopy.site.server`). Every value crossing the
interface is a frozen attrs class built from plain types, so cattrs can move it over
HTTP unchanged and both implementations return equal values for equal states.

Errors carry a stable `kind` (the HTTP API's error `kind`) and a `transient` flag the
engine's retry policy reads; the message always says which object and why.
"""

from __future__ import annotations

import contextvars
import inspect
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from enum import Enum
from typing import Any, ClassVar, Protocol, runtime_checkable

import attrs

TRACK_SIZE = 64 * 1024
"""ESS FlashCopy track size in bytes; the unit of copy-on-write and of bitmaps."""

MAX_TARGETS_PER_SOURCE = 12
DEFAULT_ELB_TIMEOUT = 120.0
"""Extended-long-busy timeout of a frozen LSS, seconds of site time."""


# --------------------------------------------------------------------------- errors


class SiteError(Exception):
    """Base of every error a site returns. `kind` is stable API; `transient` drives retries."""

    kind: ClassVar[str] = "site_error"
    transient: ClassVar[bool] = False

    def __init__(self, message: str, **details: object) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_dict(self) -> dict[str, object]:
        return {"kind": self.kind, "message": self.message, "details": dict(self.details)}


# array refusals (FLASHCOPY.md "Refusals"); every one leaves the array unchanged
class UnknownVolume(SiteError):
    kind = "unknown_volume"


class VolumeOffline(SiteError):
    kind = "volume_offline"
    transient = True


class SizeMismatch(SiteError):
    kind = "size_mismatch"


class TargetInRelationship(SiteError):
    kind = "target_in_relationship"


class TooManyTargets(SiteError):
    kind = "too_many_targets"


class CascadeRefused(SiteError):
    """The target is already a source, or the source is already a target (ESS V2: no cascade)."""

    kind = "cascade_refused"


class SecondIncremental(SiteError):
    kind = "second_incremental"


class NotIncremental(SiteError):
    """resync/reverse on a relationship that does not record changes."""

    kind = "not_incremental"


class BackgroundCopyRunning(SiteError):
    """reverse refused while the forward background copy is unfinished."""

    kind = "background_copy_running"
    transient = True


class RelationshipNotFound(SiteError):
    """withdraw/query of an absent relationship; the engine treats it as 'already withdrawn'."""

    kind = "relationship_not_found"


class RelationshipExists(SiteError):
    """establish of a pair that already has a relationship."""

    kind = "relationship_exists"


class WriteInhibited(SiteError):
    kind = "write_inhibited"


class LssBusy(SiteError):
    """The LSS refused a copy-services command for now: its limit of concurrent
    copy-services commands is in flight (`LocalSite(lss_command_limit=N)`); retry."""

    kind = "lss_busy"
    transient = True


class SpaceEfficientRefused(SiteError):
    """What a space-efficient target cannot do: background copy (`mkflash` without -nocp,
    `rmflash -cp`), or be a FlashCopy source (track space-efficient volumes are targets only)."""

    kind = "space_efficient_refused"


class RelationshipFailed(SiteError):
    """The relationship failed (its space-efficient pool ran out of space): only withdraw
    (rmflash, with -tgtreleasespace to return the space) is possible; host writes to its
    target are refused."""

    kind = "relationship_failed"


class PoolFull(SiteError):
    """A host write needs new tracks of a space-efficient volume whose pool is full."""

    kind = "pool_full"


class UnknownTask(SiteError):
    kind = "unknown_task"


class OutOfRange(SiteError):
    """A read or write beyond the end of a volume."""

    kind = "out_of_range"


# farm refusals
class UnknownHost(SiteError):
    kind = "unknown_host"


class UnknownVM(SiteError):
    kind = "unknown_vm"


class UnknownDisk(SiteError):
    kind = "unknown_disk"


class NotRawMapped(SiteError):
    """FlashCopy works per LUN: a VMFS virtual disk shares its LUN with other VMs."""

    kind = "not_raw_mapped"


class GuestNotResponding(SiteError):
    kind = "guest_not_responding"
    transient = True


class GuestStateError(SiteError):
    """A guest operation that its power or freeze state does not allow (quiesce while off...)."""

    kind = "guest_state"


# transport / generic
class SiteUnavailable(SiteError):
    """The site could not be reached (connection lost, timeout); retry."""

    kind = "site_unavailable"
    transient = True


class InjectedFault(SiteError):
    """A fault injected by the lab or over the API (chaos); transient or not as configured."""

    kind = "injected_fault"
    transient = True


class PermanentInjectedFault(SiteError):
    kind = "injected_fault_permanent"


class BadRequest(SiteError):
    kind = "bad_request"


class StaleFence(SiteError):
    """The call carried a fence (key, epoch) older than one the site has already seen for
    that key: another engine holds the unit now. Never retried: the caller has lost its
    lease and must stop acting on the unit (see `fenced`)."""

    kind = "stale_fence"


class Unauthorized(SiteError):
    kind = "unauthorized"


ERRORS_BY_KIND: Mapping[str, type[SiteError]] = {
    cls.kind: cls
    for cls in [
        SiteError,
        UnknownVolume,
        VolumeOffline,
        SizeMismatch,
        TargetInRelationship,
        TooManyTargets,
        CascadeRefused,
        SecondIncremental,
        NotIncremental,
        BackgroundCopyRunning,
        RelationshipNotFound,
        RelationshipExists,
        WriteInhibited,
        LssBusy,
        SpaceEfficientRefused,
        RelationshipFailed,
        PoolFull,
        UnknownTask,
        OutOfRange,
        UnknownHost,
        UnknownVM,
        UnknownDisk,
        NotRawMapped,
        GuestNotResponding,
        GuestStateError,
        SiteUnavailable,
        InjectedFault,
        PermanentInjectedFault,
        BadRequest,
        StaleFence,
        Unauthorized,
    ]
}


def error_from_dict(data: Mapping[str, object]) -> SiteError:
    """Rebuild the error a served site returned, as the same type the in-process site raises."""
    cls = ERRORS_BY_KIND.get(str(data.get("kind")), SiteError)
    details = data.get("details") or {}
    return cls(str(data.get("message", "")), **dict(details))  # type: ignore[arg-type]


# --------------------------------------------------------------------------- fencing


@attrs.frozen
class Fence:
    """A fencing token (Kleppmann): the caller acts for `key` (a unit) under lease epoch
    `epoch`, which grows with every take-over. The site keeps the highest epoch seen per
    key and refuses a call with a lower one (`StaleFence`), so a caller that was paused
    after checking its lease cannot act once the new holder has reached the site."""

    key: str
    epoch: int


_fences: contextvars.ContextVar[tuple[Fence, ...]] = contextvars.ContextVar("flowcopy_site_fences", default=())


def current_fences() -> tuple[Fence, ...]:
    """The fences the call being made (or served) carries, by key (none: not fenced)."""
    return _fences.get()


@contextmanager
def fence_scope(*fences: Fence) -> Iterator[None]:
    """Calls made inside carry `fences` too (a fence of a key already carried replaces
    it). A context variable, not an argument, because the tokens must cross the site's
    wrappers (faults, durability, HTTP) unchanged to the point where the site admits
    the call."""
    merged = {f.key: f for f in (*_fences.get(), *fences)}
    token = _fences.set(tuple(merged[k] for k in sorted(merged)))
    try:
        yield
    finally:
        _fences.reset(token)


class FencedView:
    """`site` as seen by the holder of `fence`: every call carries it."""

    def __init__(self, site: Any, fence: Fence) -> None:
        self._site = site
        self.fence = fence

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._site, name)
        if not inspect.iscoroutinefunction(attr):
            return attr

        async def call(*args: Any, **kwargs: Any) -> Any:
            with fence_scope(self.fence):
                return await attr(*args, **kwargs)

        call.__name__ = name
        return call


def fenced(site: Any, key: str, epoch: int) -> Any:
    """The scoped view of `site` whose every call carries the fence (`key`, `epoch`): the
    site admits it only if no higher epoch of `key` has reached it, and waits for calls
    of lower epochs already admitted to finish first. Works on every `Site` flavour; a
    view of a view carries both fences (a unit's and an LSS's, say)."""
    if epoch < 0:
        raise BadRequest(f"a fence epoch is a non-negative integer, not {epoch}")
    return FencedView(site, Fence(str(key), int(epoch)))


# --------------------------------------------------------------------------- values


class CopyMode(str, Enum):
    COPY = "copy"  # background copy; dissolves at 100% unless persistent
    NOCOPY = "nocopy"  # copy-on-write only; lasts until withdraw


class CopyState(str, Enum):
    """Life cycle of a relationship, after the SVC mapping states (FLASHCOPY.md)."""

    COPYING = "copying"  # point in time taken; background copy running (or nocopy)
    COPIED = "copied"  # all tracks copied; only persistent relationships stay here
    REVERSING = "reversing"  # reverse restore copying target -> source
    FAILED = "failed"  # its space-efficient target's pool ran out: the image is unusable


class QuiesceLevel(str, Enum):
    NONE = "none"
    FILESYSTEM = "filesystem"
    APPLICATION = "application"
    POWEROFF = "poweroff"


class DiskKind(str, Enum):
    RDM = "rdm"
    VMFS = "vmfs"


class PowerState(str, Enum):
    ON = "on"
    OFF = "off"


@attrs.frozen
class FlashOptions:
    """Options at establish, after `mkflash`'s flags."""

    mode: CopyMode = CopyMode.COPY
    record: bool = False  # -record: change recording (needs persistent)
    persistent: bool = False  # -persist
    freeze: bool = False  # -freeze: consistency group; holds the source LSS's writes
    tag: str | None = None  # -seqnum: lets a caller find its relationships again
    inhibit_target_writes: bool = False  # -tgtinhibit


@attrs.frozen
class VolumeInfo:
    serial: str  # 8 digits: volume (3), LSS (2), box (3), e.g. 20313698
    lss: str
    capacity: int  # bytes, a multiple of TRACK_SIZE
    online: bool = True
    label: str | None = None
    unusable: str | None = None  # why the volume holds no usable image (e.g. after a fast reverse)
    space_pool: str | None = None  # the space-efficient pool backing it (None: fully provisioned)


@attrs.frozen
class RelationshipInfo:
    source: str
    target: str
    mode: CopyMode
    recording: bool
    persistent: bool
    tag: str | None
    out_of_sync_tracks: int
    total_tracks: int
    state: CopyState
    inhibit_target_writes: bool
    created: float  # site time of establish (the point in time)
    synced: float  # site time of the last establish/resync/reverse
    source_write_enabled: bool = True  # False while the source is frozen by a consistency group
    elb_deadline: float | None = None  # while frozen: the LSS's ELB timer releases the source then
    space_efficient: bool = False  # the target is space-efficient (no background copy; pool space)
    failed: str | None = None  # why the relationship failed (state FAILED), e.g. its pool is full

    @property
    def id(self) -> str:
        return f"{self.source}:{self.target}"


@attrs.frozen
class LssFreeze:
    """An LSS's FlashCopy consistency group: its frozen source volumes and its one ELB timer.

    Only the `sources` hold their writes (long busy); other volumes of the LSS flow on.
    """

    lss: str
    since: float  # the first freeze of the group: the ELB timer runs from here
    deadline: float  # ELB timeout: the sources' writes flow again by themselves at this site time
    sources: tuple[str, ...] = ()  # the frozen FlashCopy source volumes
    elb_timeout: float = DEFAULT_ELB_TIMEOUT  # the LSS's setting when the group formed


@attrs.frozen
class LssRelease:
    """How an LSS's consistency group ended: unfreeze by a caller, or the ELB timeout."""

    lss: str
    since: float
    released_at: float
    by_timeout: bool
    sources: tuple[str, ...] = ()  # the source volumes it released


@attrs.frozen
class SourceHold:
    """One source volume's hold, from its freeze to its release (the site's own record)."""

    serial: str
    lss: str
    since: float  # the establish (or resync) with freeze of this source
    deadline: float  # when the ELB timer would release it
    released_at: float | None  # None: still held
    by_timeout: bool  # released by the ELB timer, not by unfreeze


@attrs.frozen
class SpacePool:
    """A space-efficient pool (repository): the physical space its volumes' tracks take.

    A track of a space-efficient volume takes pool space the first time it is written or
    copied into (once per track); `rmflash -tgtreleasespace` gives a target's tracks back.
    """

    name: str
    capacity: int  # bytes
    used: int  # bytes (whole tracks)
    volumes: tuple[str, ...] = ()


@attrs.frozen
class LssInfo:
    """An LSS of the array and its consistency-group setting (`lslss`, `chlss`)."""

    lss: str
    volumes: int
    elb_timeout: float  # extended-long-busy (consistency group) timeout, seconds
    frozen_sources: tuple[str, ...] = ()


@attrs.frozen
class HostInfo:
    name: str
    kind: str  # "esx" (ESX server) or "backup" (a backup/proxy host)
    version: str
    vms: tuple[str, ...]


@attrs.frozen
class DiskInfo:
    vm: str
    name: str  # host-visible name, e.g. "Disk1"
    kind: DiskKind
    serial: str  # the LUN (for VMFS, the shared VMFS LUN)
    guest_path: str | None  # "E:" or "/data"
    label: str | None
    capacity: int
    shared_with: tuple[str, ...] = ()  # other VMs on the same VMFS LUN


@attrs.frozen
class VMInfo:
    name: str
    host: str
    os: str
    power: PowerState
    quiesce_levels: tuple[QuiesceLevel, ...]  # what its agent supports
    labels: Mapping[str, str]  # for selectors (app=sql, tier=gold)
    disks: tuple[DiskInfo, ...]


@attrs.frozen
class HostDisk:
    """One line of `rsList2105s`: a host-visible disk name and the ESS volume behind it."""

    host: str
    name: str
    serial: str
    primed_name: str | None = None  # the guest's own device name after rsPrimeServer


@attrs.frozen
class FreezeTicket:
    """What a quiesce returns: the engine journals `freeze_id` to recognise its freeze later."""

    vm: str
    freeze_id: int  # increases with every quiesce of this VM, survives restarts
    level: QuiesceLevel
    frozen_at: float
    deadline: float  # the guest thaws itself at this site time


@attrs.frozen
class FreezeStatus:
    """A guest's freeze state, and how its last freeze ended (to judge a copy's consistency)."""

    vm: str
    frozen: bool
    freeze_id: int  # id of the current freeze, or of the last one if not frozen (0: never)
    level: QuiesceLevel | None
    frozen_at: float | None
    deadline: float | None
    thawed_at: float | None  # when the last freeze ended (None while frozen / never)
    lost: bool  # the last freeze ended by the guest's own timeout, not by a thaw
    power: PowerState


@attrs.frozen
class ThawResult:
    vm: str
    was_frozen: bool  # False: not frozen, nothing done ("thaw is idempotent")
    freeze_id: int
    lost: bool  # the freeze had already ended by the guest's timeout
    message: str


@attrs.frozen
class Extent:
    """A written byte range of a volume; everything outside the extents reads as zeros."""

    offset: int
    length: int


@attrs.frozen
class CheckReport:
    """The independent checker's verdict on a set of LUN images."""

    consistent: bool
    kind: str  # "filesystem", "database", "empty", "unknown"
    problems: tuple[str, ...]  # each says exactly what and where
    summary: Mapping[str, str] = attrs.field(factory=dict)  # files/records counted, digests


@attrs.frozen
class SavedTask:
    """A named copy-services task (ESS Copy Services WUI), run by `rsExecuteTask`."""

    name: str
    pairs: tuple[tuple[str, str], ...]
    options: FlashOptions


# --------------------------------------------------------------------------- the interface


@runtime_checkable
class Site(Protocol):
    """Everything the engine may do to a site. All methods are async and atomic per call.

    Volume and VM arguments are serials and VM names as the site knows them; errors are
    the `SiteError` subclasses above, identical in-process and over HTTP.
    """

    # ---- clock
    async def now(self) -> float:
        """Site time in seconds (trio's clock in-process; scaled real time when served)."""
        ...

    # ---- inventory
    async def list_hosts(self) -> list[HostInfo]: ...

    async def list_vms(self, labels: Mapping[str, str] | None = None) -> list[VMInfo]:
        """VMs whose labels include all of `labels` (all VMs when None), sorted by name."""
        ...

    async def get_vm(self, name: str) -> VMInfo: ...

    async def lun_of(self, vm: str, disk: str) -> DiskInfo:
        """The LUN behind a VM's disk, by host-visible name (`Disk1`), guest path or serial.

        Raises UnknownDisk, or NotRawMapped for a VMFS disk (FlashCopy works per LUN).
        """
        ...

    async def list_disks(self, host: str) -> list[HostDisk]:
        """rsList2105s: the host's disk names and the ESS serials behind them."""
        ...

    async def prime(self, host: str) -> list[HostDisk]:
        """rsPrimeServer: load the guests' device names so tasks can use them."""
        ...

    async def list_volumes(self) -> list[VolumeInfo]: ...

    async def list_pools(self) -> dict[str, tuple[str, ...]]:
        """Named sets of spare target volumes the lab defines (workflows pick targets from them)."""
        ...

    async def get_volume(self, serial: str) -> VolumeInfo: ...

    # ---- guests
    async def quiesce(self, vm: str, level: QuiesceLevel, timeout: float) -> FreezeTicket:
        """Freeze the guest at `level`; it thaws itself after `timeout` s (and records it)."""
        ...

    async def thaw(self, vm: str) -> ThawResult:
        """Idempotent: thawing a guest that is not frozen is a no-op that says so."""
        ...

    async def freeze_status(self, vm: str) -> FreezeStatus: ...

    async def power_on(self, vm: str) -> None: ...

    async def power_off(self, vm: str) -> None: ...

    async def reboot(self, vm: str) -> None: ...

    # ---- FlashCopy
    async def establish(self, source: str, target: str, options: FlashOptions) -> RelationshipInfo:
        ...

    async def withdraw(self, source: str, target: str, *, after_copy: bool = False,
                       release_space: bool = False) -> None:
        """rmflash; RelationshipNotFound if there is none (callers may treat it as done).

        `release_space` (-tgtreleasespace): a space-efficient target's tracks go back to
        its pool (the target then reads as zeros); no effect on a standard target.
        """
        ...

    async def resync(
        self,
        source: str,
        target: str,
        *,
        freeze: bool = False,
        tag: str | None = None,
        options: FlashOptions | None = None,
    ) -> RelationshipInfo:
        """resyncflash: copy only tracks changed on either side; target becomes source's image now.

        The options given *replace* the relationship's (DS CLI): without `record` and
        `persistent` it stops recording and dissolves after its copy. `options=None` is a
        resync with no flags but `freeze` and `tag`; a `tag` of None keeps the old one.
        """
        ...

    async def reverse(self, source: str, target: str, *, tag: str | None = None, fast: bool = False) -> RelationshipInfo:
        """reverseflash: restore target -> source (changed tracks only); roles swap.

        `fast` (fast reverse restore) is allowed before the forward copy has finished; the
        former target then holds no usable image until it is established again.
        """
        ...

    async def query(self, *, volume: str | None = None, tag: str | None = None) -> list[RelationshipInfo]:
        """lsflash: relationships touching `volume` and/or carrying `tag` (all when both None)."""
        ...

    async def unfreeze(self, lsses: Sequence[str]) -> list[LssRelease]:
        """unfreezeflash: release the ELB of these LSSs ("consistency created"). Idempotent."""
        ...

    async def frozen_lsses(self) -> list[LssFreeze]: ...

    async def hold_history(self) -> list[SourceHold]:
        """Every source-volume hold the array recorded (ended and current), by start time."""
        ...

    async def list_lsses(self) -> list[LssInfo]:
        """lslss: the LSSs and their consistency-group (ELB) timeout."""
        ...

    async def set_elb_timeout(self, lss: str, seconds: float) -> LssInfo:
        """chlss -extlongbusy: the LSS's ELB timeout for consistency groups formed from now on."""
        ...

    async def list_space_pools(self) -> list[SpacePool]:
        """lssestg: the space-efficient pools, their capacity, use and volumes."""
        ...

    async def save_task(self, task: SavedTask) -> None: ...

    async def list_tasks(self) -> list[SavedTask]: ...

    async def execute_task(self, name: str, *, tag: str | None = None) -> list[RelationshipInfo]:
        """rsExecuteTask: establish the task's pairs, atomically (all or none)."""
        ...

    # ---- data (backup hosts read images; tests write)
    async def read(self, serial: str, offset: int, length: int) -> bytes: ...

    async def write(self, serial: str, offset: int, data: bytes) -> None:
        """A host write; waits (does not fail) while the LSS is frozen, until unfreeze or ELB."""
        ...

    async def extents(self, serial: str) -> list[Extent]:
        """The written extents of a volume as read now (for a target: its point-in-time image)."""
        ...

    async def check(self, serials: Sequence[str]) -> CheckReport:
        """The independent checker on these LUN images, read through the array only."""
        ...

    async def mount_check(self, vm: str, disks: Sequence[str]) -> CheckReport:
        """Rescan on `vm` (the second guest), mount the given disks' images and check them."""
        ...
