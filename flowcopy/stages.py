"""What each stage of a unit does, written against the `Site` interface only.

Every function here is a side effect on the site, shaped so the engine can journal its
intent before calling it and its outcome after, and so that calling it again after a
crash is safe: prepare reads only, freeze/establish are undone by `compensate` when their
outcome is unknown, release/withdraw are idempotent (thaw of a thawed guest and withdraw
of an absent relationship are successes). The engine decides *when*; this module decides
*what* — it knows nothing about states or the journal.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import trio

from flowcopy.site import api
from flowcopy.site.api import (
    CheckReport,
    CopyMode,
    FlashOptions,
    QuiesceLevel,
    RelationshipInfo,
    Site,
    SiteError,
)


class StageError(Exception):
    """A stage cannot go on, for a reason an admin can act on (message says where and why)."""

    def __init__(self, message: str, *, retryable: bool = False, kind: str = "stage_error") -> None:
        super().__init__(message)
        self.retryable = retryable
        self.kind = kind


class FreezeLost(StageError):
    """A guest's freeze ended (its own timeout) before every pair was established."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=True, kind="freeze_lost")


class WindowOverrun(StageError):
    """The consistency group's establishes ran past the engine's freeze-window bound; the
    engine unfreezes and redoes the freeze rather than keep the sources held (`holds`)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=False, kind="freeze_window_overrun")


async def concurrently(*thunks: Callable[[], Awaitable[object]]) -> None:
    """Run thunks at once; the first failure comes out as itself, not in an exception group,
    so the engine's retry and compensation see a SiteError as a SiteError."""
    if len(thunks) == 1:  # one VM (the common unit): no nursery and no task to spawn
        await thunks[0]()
        return
    try:
        async with trio.open_nursery() as nursery:
            for thunk in thunks:
                nursery.start_soon(thunk)
    except BaseExceptionGroup as group:
        failures = [e for e in _leaves(group) if not isinstance(e, trio.Cancelled)]
        if failures and all(isinstance(e, Exception) for e in failures):
            raise failures[0] from group
        raise


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for e in exc.exceptions for leaf in _leaves(e)]
    return [exc]


# --------------------------------------------------------------------------- plans


@attrs.frozen
class TargetRef:
    """Where one disk's copy goes, as the definition said it (resolved in prepare)."""

    serial: str | None = None
    vm: str | None = None
    disk: str | None = None
    rotate: tuple[str, ...] = ()
    pool: tuple[str, ...] = ()


@attrs.frozen
class DiskSpec:
    vm: str
    disk: str  # host-visible name, guest path or serial
    target: TargetRef


@attrs.frozen
class UnitSpec:
    """One consistency unit of a run, fully defaulted: what the engine journals at begin-run.

    Built from a definition by `flowcopy.planning`; journaled as plain data so a resume
    needs neither the workflow file nor the site's selectors to mean what they meant.
    """

    unit_id: str
    kind: str  # "backup" | "restore"
    vms: tuple[str, ...]
    disks: tuple[DiskSpec, ...]
    mode: str = "copy"  # copy | nocopy | incremental
    quiesce: str = "filesystem"
    vm_quiesce: Mapping[str, str] = attrs.field(factory=dict)  # per VM, in a group that mixes levels
    freeze_timeout: float = 30.0
    copy_action: str = "wait"  # wait | export | mount_check | none
    copy_to: str | None = None  # export folder (relative to the store)
    copy_host: str | None = None  # backup host that reads the target (export)
    mount_vm: str | None = None  # second guest (mount_check)
    withdraw: str = "always"  # always | keep | after_copy
    retention: int | None = None
    task: str | None = None  # saved array task instead of listed disks
    restore_before: str = "poweroff"
    max_freeze_attempts: int = 3
    retry_max_attempts: int = 5
    retry_initial: float = 1.0
    retry_backoff: float = 2.0
    retry_max_interval: float = 30.0
    non_retryable: tuple[str, ...] = ()
    timeouts: Mapping[str, float] = attrs.field(factory=dict)
    group: str | None = None
    restore: Mapping[str, Any] | None = None
    """A restore run's plan (`flowcopy.backups.restore.Plan` as data): the unit walks the
    state table's restore path instead of the backup path."""


@attrs.frozen
class Pair:
    """A resolved source -> target pair; what establish, copy and withdraw act on."""

    vm: str
    disk: str
    source: str
    target: str
    source_lss: str
    target_lss: str
    capacity: int


# --------------------------------------------------------------------------- prepare


async def resolve_target(site: Site, spec: DiskSpec, run_number: int) -> str:
    """The target serial of this run (pools were resolved when the run was planned)."""
    ref = spec.target
    if ref.serial:
        return ref.serial
    if ref.vm and ref.disk:
        return (await site.lun_of(ref.vm, ref.disk)).serial
    if ref.rotate:
        return ref.rotate[(run_number - 1) % len(ref.rotate)]
    raise StageError(f"{spec.vm} {spec.disk}: no target (a pool target must be assigned when the run is planned)")


async def prepare(site: Site, unit: UnitSpec, run_number: int, tag: str) -> list[Pair]:
    """Resolve every disk to a LUN pair and check the array would accept it.

    Read-only, so redoing it after a crash is always safe. Errors name the VM and disk,
    and come before any guest is frozen.
    """
    pairs: list[Pair] = []
    taken: set[str] = set()
    if unit.task:
        for task in await site.list_tasks():
            if task.name == unit.task:
                for source, target in task.pairs:
                    sv, tv = await site.get_volume(source), await site.get_volume(target)
                    pairs.append(Pair(unit.vms[0] if unit.vms else "", source, source, target, sv.lss, tv.lss, sv.capacity))
                return pairs
        raise StageError(f"saved task {unit.task!r} is not defined on the array", kind="unknown_task")
    for vm in unit.vms:
        try:
            await site.get_vm(vm)
        except api.UnknownVM as exc:  # the site's message, and the name that was probably meant
            from flowcopy.catalog import did_you_mean

            hint = did_you_mean(vm, [v.name for v in await site.list_vms(None)])
            raise api.UnknownVM(exc.message + hint + " (`flowcopy site lsvm` lists the VMs)", **exc.details) from None
    for disk in unit.disks:
        info = await site.lun_of(disk.vm, disk.disk)  # UnknownDisk / NotRawMapped
        target = await resolve_target(site, disk, run_number)
        if target == info.serial:
            raise StageError(f"{disk.vm} {disk.disk}: target {target} is the source itself", kind="bad_target")
        if target in taken:
            raise StageError(f"{disk.vm} {disk.disk}: target {target} is used twice in this unit", kind="bad_target")
        taken.add(target)
        source_vol = await site.get_volume(info.serial)
        target_vol = await site.get_volume(target)
        if source_vol.capacity != target_vol.capacity:
            raise StageError(
                f"{disk.vm} {disk.disk}: target {target} has {target_vol.capacity} bytes, "
                f"source {info.serial} has {source_vol.capacity}: FlashCopy needs equal sizes",
                kind="size_mismatch",
            )
        pairs.append(
            Pair(disk.vm, disk.disk, info.serial, target, source_vol.lss, target_vol.lss, source_vol.capacity)
        )
    sources = {p.source for p in pairs}
    for p in pairs:
        if p.target in sources:
            raise StageError(f"{p.vm} {p.disk}: {p.target} is both a source and a target in this unit", kind="bad_target")
        if unit.kind == "backup":
            await check_target_free(site, unit, p, tag)
    return pairs


async def check_target_free(site: Site, unit: UnitSpec, pair: Pair, tag: str) -> None:
    """Refuse, before any freeze, a target another relationship holds (the array would).

    Allowed: this unit's own relationship (a resumed prepare), and for an incremental unit
    its recording relationship with the same pair (the resync basis, either direction).
    """
    for rel in await site.query(volume=pair.target):
        if rel.tag == tag:
            continue
        if unit.mode == "incremental" and {rel.source, rel.target} == {pair.source, pair.target} and rel.recording:
            continue  # the resync basis, or the same pair turned round by a restore
        role = "target" if rel.target == pair.target else "source"
        raise StageError(
            f"{pair.vm} {pair.disk}: target {pair.target} is already the {role} of relationship "
            f"{rel.source} -> {rel.target} ({rel.mode.value}, tag {rel.tag or 'none'}, "
            f"{rel.out_of_sync_tracks} tracks out of sync): withdraw it or choose another target",
            kind="target_in_relationship",
        )


# --------------------------------------------------------------------------- freeze / release


def level_of(unit: UnitSpec, vm: str) -> QuiesceLevel:
    """A VM's quiesce level: its own in a group that mixes levels, else the unit's."""
    return QuiesceLevel(unit.vm_quiesce.get(vm, unit.quiesce))


async def freeze(site: Site, unit: UnitSpec, limiter: trio.CapacityLimiter) -> dict[str, int]:
    """Quiesce every VM of the unit at once; returns each VM's freeze id (journaled).

    If one guest refuses, every guest of the unit is thawed again before the error goes
    up, so a retry starts from thawed guests and a failure leaves nothing frozen.
    """
    tickets: dict[str, int] = {}

    async def one(vm: str) -> None:
        level = level_of(unit, vm)
        if level is QuiesceLevel.NONE:
            return
        async with limiter:
            try:
                ticket = await site.quiesce(vm, level, unit.freeze_timeout)
            except api.GuestStateError:
                # still frozen by an earlier attempt of ours whose reply was lost (or whose
                # thaw failed): thaw and freeze afresh, so the freeze id is one we know
                if not (await site.freeze_status(vm)).frozen:
                    raise
                await site.thaw(vm)
                ticket = await site.quiesce(vm, level, unit.freeze_timeout)
        tickets[vm] = ticket.freeze_id

    try:
        await concurrently(*(functools.partial(one, vm) for vm in unit.vms))
    except Exception:
        with trio.CancelScope(shield=True):
            for vm in unit.vms:
                try:
                    await site.thaw(vm)
                except SiteError:
                    pass  # the engine's compensation thaws again
        raise
    return tickets


def needs_array_freeze(unit: UnitSpec, pairs: Sequence[Pair]) -> bool:
    """An array consistency group is needed when the image spans several LUNs."""
    return len(pairs) > 1


def frozen_lsses(pairs: Sequence[Pair]) -> list[str]:
    return sorted({p.source_lss for p in pairs})


async def thaw_all(site: Site, unit: UnitSpec) -> None:
    """Thaw every quiesced guest of the unit at once (powering on a powered-off one)."""

    async def one(vm: str) -> None:
        level = level_of(unit, vm)
        if level is QuiesceLevel.NONE and unit.kind != "restore":
            return
        await site.thaw(vm)
        if level is QuiesceLevel.POWEROFF or unit.kind == "restore":
            if (await site.get_vm(vm)).power is api.PowerState.OFF:
                await site.power_on(vm)

    await concurrently(*(functools.partial(one, vm) for vm in unit.vms))


async def freeze_problems(
    site: Site, unit: UnitSpec, freezes: Mapping[str, int], established_at: float
) -> list[str]:
    """Why the guests' freezes did not cover the establish (empty: they did).

    A freeze covers it when it is the freeze we took (same id) and it was still held at
    the moment the last pair was established.
    """
    problems: list[str] = []
    for vm, freeze_id in freezes.items():
        status = await site.freeze_status(vm)
        if status.freeze_id != freeze_id:
            problems.append(f"{vm}: freeze {freeze_id} was replaced by freeze {status.freeze_id}")
            continue
        if status.frozen or (status.thawed_at is not None and status.thawed_at >= established_at):
            continue
        how = "the guest's own timeout" if status.lost else "a thaw"
        problems.append(
            f"{vm}: freeze {freeze_id} ended by {how} at {status.thawed_at}s, before the establish "
            f"completed at {established_at:.3f}s (freeze_timeout {unit.freeze_timeout:g}s)"
        )
    return problems


# --------------------------------------------------------------------------- establish


def flash_options(unit: UnitSpec, pairs: Sequence[Pair], tag: str) -> FlashOptions:
    incremental = unit.mode == "incremental"
    return FlashOptions(
        mode=CopyMode.NOCOPY if unit.mode == "nocopy" else CopyMode.COPY,
        record=incremental,
        persistent=incremental,
        freeze=needs_array_freeze(unit, pairs),
        tag=tag,
    )


async def ours(site: Site, tag: str) -> dict[tuple[str, str], RelationshipInfo]:
    return {(r.source, r.target): r for r in await site.query(tag=tag)}


def redo_withdraws(unit: UnitSpec) -> bool:
    """Whether undoing a freeze attempt withdraws what it established. Not for an
    incremental unit (its relationship is the next resync's basis: the redo resyncs it
    again, see `establish`), nor for a reverse restore (the reverse is the restore; the
    target's image it copies back is fixed, so a redo keeps it and reverses the rest)."""
    return unit.mode != "incremental" and unit.kind != "restore"


async def establish(
    site: Site, unit: UnitSpec, pairs: Sequence[Pair], tag: str, *, deadline: float = math.inf,
    fresh: set[tuple[str, str]] | None = None,
) -> float:
    """Establish every pair (skipping those already ours); returns the site time of the last.

    Incremental pairs with a recording relationship from an earlier run are resynced
    (only changed tracks move) instead of established anew, with the options they need
    given again (resyncflash replaces the old ones: -record -persist, -freeze, -seqnum).
    Past `deadline` (engine clock) no further pair is frozen: WindowOverrun.

    `fresh`: the pairs this freeze attempt made so far (kept by the caller across the
    retries of one attempt; this adds to it). An incremental relationship of ours outside
    it was resynced under an earlier freeze — an attempt redone, or an engine that died in
    its window — and is resynced again, or the image would join two points in time; so an
    incremental pair counts once its resync answered (one whose answer was lost is
    resynced again, which is harmless). A redo withdraws the other modes' relationships,
    so any of theirs is this attempt's: a pair counts from its call on, since a call that
    acted but lost its answer must be found, not made twice. While `fresh` is empty
    nothing of ours may be skipped, so the array is not asked: inside a freeze window
    each call is a trip through the scheduler behind every other runnable task.
    """
    options = flash_options(unit, pairs, tag)
    present = await ours(site, tag) if fresh is None or fresh else {}
    last = -math.inf  # the site time of the last pair made; `now` only if none was
    for i, pair in enumerate(pairs):
        if i and options.freeze and trio.current_time() > deadline:
            raise WindowOverrun(
                f"{pair.vm} {pair.disk}: consistency group over its freeze-window bound after {i} of "
                f"{len(pairs)} establishes; unfreezing its LSSs and redoing the freeze"
            )
        key = (pair.source, pair.target)
        stale = unit.mode == "incremental" and fresh is not None and key not in fresh
        if key in present and not stale:
            last = max(last, present[key].synced)
            continue
        if fresh is not None and unit.mode != "incremental":
            fresh.add(key)
        if unit.mode == "incremental":
            existing = [r for r in await site.query(volume=pair.source) if {r.source, r.target} == {pair.source, pair.target}]
            if existing and existing[0].recording:
                rel = existing[0]
                if (rel.source, rel.target) == (pair.source, pair.target):
                    info = await site.resync(pair.source, pair.target, options=options)
                else:
                    # a reverse restore turned the pair round: reverse it back, which copies
                    # only the tracks changed since and makes the target the image of now
                    info = await site.reverse(rel.source, rel.target, tag=tag)
                last = max(last, info.synced)
                if fresh is not None:
                    fresh.add(key)
                continue
        info = await site.establish(pair.source, pair.target, options)
        last = max(last, info.created)
        if fresh is not None:
            fresh.add(key)
    if present.keys() >= {(p.source, p.target) for p in pairs}:  # all made before: as late as now
        last = max(last, await site.now())
    return last


async def restore_reverse(site: Site, pairs: Sequence[Pair], tag: str) -> float:
    """Reverse restore: each (source, target) pair copies target -> source.

    A forward copy not yet finished (nocopy incremental) is reversed fast (fast reverse
    restore): the source gets its image at once; the backup target is then no usable
    image until the next backup establishes it again (the array says so)."""
    last = await site.now()
    present = await ours(site, tag)
    for pair in pairs:
        rels = [r for r in await site.query(volume=pair.source) if {r.source, r.target} == {pair.source, pair.target}]
        if (pair.target, pair.source) in present:
            continue
        if not rels:
            raise StageError(
                f"{pair.vm} {pair.disk}: no incremental relationship {pair.source} -> {pair.target} to restore from",
                kind="not_incremental",
            )
        rel = rels[0]
        fast = rel.out_of_sync_tracks > 0 and (rel.source, rel.target) == (pair.source, pair.target)
        info = await site.reverse(rel.source, rel.target, tag=tag, fast=fast)
        last = max(last, info.synced)
    return last


# --------------------------------------------------------------------------- copy


async def wait_copied(
    site: Site,
    pairs: Sequence[Pair],
    tag: str,
    poll: float = 1.0,
    on_progress: Callable[[int, int], None] | None = None,
) -> None:
    """Wait until no relationship of ours still has out-of-sync tracks (dissolved counts).

    `on_progress(out_of_sync, total)` hears the tracks still to copy after every poll.
    """
    while True:
        rels = await site.query(tag=tag)
        _raise_failed(pairs, rels)
        pending = [r for r in rels if r.out_of_sync_tracks > 0 and r.mode is CopyMode.COPY]
        if on_progress is not None:
            total = sum(p.capacity for p in pairs) // api.TRACK_SIZE
            on_progress(sum(r.out_of_sync_tracks for r in pending), total)
        if not pending:
            return
        await trio.sleep(poll)


def _raise_failed(pairs: Sequence[Pair], rels: Sequence[api.RelationshipInfo]) -> None:
    """A failed relationship (its space-efficient pool ran out) leaves no usable image:
    the unit fails with the array's reason, and compensation withdraws it."""
    for rel in rels:
        if rel.state is api.CopyState.FAILED:
            pair = next((p for p in pairs if {p.source, p.target} == {rel.source, rel.target}), None)
            where = f"{pair.vm} {pair.disk}: " if pair is not None else ""
            raise StageError(f"{where}{rel.failed or f'relationship {rel.source} -> {rel.target} failed'}",
                             kind="relationship_failed")


async def verify(site: Site, pairs: Sequence[Pair], image_of_source: bool = False) -> CheckReport:
    serials = [p.source if image_of_source else p.target for p in pairs]
    for serial in serials:
        _raise_failed(pairs, await site.query(volume=serial))
    return await site.check(serials)


async def export(site: Site, pairs: Sequence[Pair], folder: Path, chunk: int = 4 << 20) -> list[dict[str, Any]]:
    """Copy each target image through the backup host into `folder` as a sparse file + sha256.

    Written to a temporary name and renamed, so an export is either whole or absent.
    Each entry records what retention needs to remove exactly this file and nothing
    else: its name, whole-file sha256, content digest, mtime and whether this export
    created the run folder.
    """
    from flowcopy.backups import images

    for pair in pairs:  # a failed relationship's target is no image to export
        _raise_failed(pairs, await site.query(volume=pair.target))
    created = not folder.exists()
    _private_folder(folder)
    out: list[dict[str, Any]] = []
    for pair in pairs:
        path = folder / f"{pair.source}-{pair.target}.img"
        tmp = path.with_suffix(".img.part")
        digest = hashlib.sha256()
        extents = await site.extents(pair.target)
        position = 0
        # images hold guest data: owner only (0600), whatever the umask
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
            os.fchmod(f.fileno(), 0o600)  # a .part left by a killed export keeps its old mode otherwise
            f.truncate(pair.capacity)
            for extent in extents:
                end = extent.offset + extent.length
                offset = extent.offset
                if offset > position:
                    _hash_zeros(digest, offset - position)
                while offset < end:
                    n = min(chunk, end - offset)
                    data = await site.read(pair.target, offset, n)
                    f.seek(offset)
                    f.write(data)
                    digest.update(data)
                    offset += n
                position = end
            if pair.capacity > position:
                _hash_zeros(digest, pair.capacity - position)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        checksum = path.with_suffix(".img.sha256")
        with os.fdopen(os.open(checksum, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as c:
            c.write(f"{digest.hexdigest()}  {path.name}\n")
        content = await trio.to_thread.run_sync(images.file_digest, path, pair.capacity)
        out.append({"path": str(path), "sha256": digest.hexdigest(), "bytes": pair.capacity,
                    "content": content, "mtime_ns": path.stat().st_mtime_ns, "created_folder": created})
    return out


def _private_folder(folder: Path) -> None:
    """Create `folder` and any missing parent 0700 (owner only); folders that exist keep their mode."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    for p in reversed(missing):
        p.mkdir(mode=0o700, exist_ok=True)
        os.chmod(p, 0o700)  # mkdir's mode is masked by the umask


_ZEROS = bytes(1 << 20)


def _hash_zeros(digest: Any, n: int) -> None:
    while n > 0:
        k = min(n, len(_ZEROS))
        digest.update(_ZEROS[:k] if k < len(_ZEROS) else _ZEROS)
        n -= k


def check_exported(paths: Sequence[str]) -> CheckReport:
    """Run the independent checker on exported files, so an export is verified as stored."""
    from flowcopy.site import checker

    files = [open(p, "rb") for p in paths]  # noqa: SIM115 - closed below
    try:
        by_serial = {Path(p).name.split("-")[1].split(".")[0]: f for p, f in zip(paths, files)}

        def read(serial: str, offset: int, length: int) -> bytes:
            f = by_serial[serial]
            f.seek(offset)
            data = f.read(length)
            return data + bytes(length - len(data))

        return checker.check_images(read, list(by_serial))
    finally:
        for f in files:
            f.close()


# --------------------------------------------------------------------------- withdraw / compensate


async def withdraw_tagged(site: Site, tag: str, *, after_copy: bool = False) -> int:
    """Withdraw every relationship carrying this unit's tag — the journal knows the tag, so
    even a relationship whose establish outcome was never journaled is found again, and a
    retry after a partial withdraw only touches what is left. Returns how many it ended."""
    return await withdraw_relationships(site, await site.query(tag=tag), after_copy=after_copy)


async def withdraw_relationships(site: Site, rels: Sequence[RelationshipInfo], *, after_copy: bool = False) -> int:
    """Withdraw these relationships (one already gone counts as withdrawn, not as ended);
    returns how many it ended."""
    n = 0
    for rel in rels:
        try:
            if rel.space_efficient:  # rmflash -tgtreleasespace: the pool gets the target's tracks back
                await site.withdraw(rel.source, rel.target, after_copy=after_copy, release_space=True)
                n += 1
                continue
            await site.withdraw(rel.source, rel.target, after_copy=after_copy)
            n += 1
        except api.RelationshipNotFound:
            pass
    return n


def describe(exc: BaseException) -> str:
    if isinstance(exc, SiteError):
        return f"{exc.kind}: {exc.message}"
    return str(exc) or type(exc).__name__
