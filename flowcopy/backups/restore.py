"""Restores: from a catalog backup to a plan (pure), and the site side of each restore step.

A restore is a run like a backup: one unit per restore, walking the restore path of the
one state table (prepare -> stop -> restore -> check -> start -> copy back -> done). This
module decides *what* (which LUN gets which image, by which method, what must be
stopped, what would be lost); the engine decides *when* and journals every step.

Methods, cheapest first:
- `reverse`: the backup is the target of a kept incremental pair and goes back onto its
  own source: reverseflash copies only the tracks that differ.
- `fast-reverse`: the same pair before its forward background copy finished:
  reverseflash -fast gives the source its image at once, but the target never gets the
  uncopied tracks, so it holds no usable image afterwards (the plan says so, and the
  catalog shows the backup gone) until the next incremental backup establishes it.
- `flash`: the backup is a complete target LUN no relationship holds any more: a new
  target -> destination FlashCopy; the destination reads as the image at once.
- `write`: anything else (an exported file, a nocopy or incremental target going to
  another LUN, a destination that is itself a FlashCopy source): the image's data is
  written through the array, the destination's other data zeroed. Writing a source
  keeps every one of its targets' images intact (copy-on-write), so no other backup is
  corrupted by it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from flowcopy.backups import images
from flowcopy.backups.catalog import OK, Backup, Disk
from flowcopy.site import api
from flowcopy.site.api import TRACK_SIZE, DiskKind, PowerState, RelationshipInfo, Site


FAST_REVERSE = "fast-reverse"
"""The method of a reverse before the forward copy finished (reverseflash -fast)."""


class RestoreRefused(Exception):
    """The restore would harm something or cannot work; the message says why and what to do."""


@attrs.frozen
class Step:
    """One disk of the backup going onto one destination LUN."""

    vm: str  # the backed-up VM and disk
    disk: str
    source: str  # the backed-up LUN
    image: str | None  # the LUN holding the image (None: an exported file)
    file: str | None  # the exported image file
    digest: str | None  # the image's content digest, as recorded
    dest: str  # the LUN overwritten
    dest_lss: str
    capacity: int
    method: str  # reverse | fast-reverse | flash | write
    dest_users: tuple[str, ...] = ()  # VMs that map the destination

    def to_data(self) -> dict[str, Any]:
        return attrs.asdict(self)

    @classmethod
    def from_data(cls, data: Mapping[str, Any]) -> Step:
        return cls(**{**data, "dest_users": tuple(data.get("dest_users", ()))})


@attrs.frozen
class Plan:
    backup: str
    workflow: str
    steps: tuple[Step, ...]
    stop_vms: tuple[str, ...]  # powered on now, using a destination: off before, on after
    breaks: tuple[str, ...]  # relationships turned round or withdrawn, in words
    overwrites: tuple[str, ...]  # other backups whose images live on a destination
    in_use: tuple[str, ...]  # why confirmation is needed (empty: nothing in use)

    def to_data(self) -> dict[str, Any]:
        return {
            "backup": self.backup, "workflow": self.workflow, "steps": [s.to_data() for s in self.steps],
            "stop_vms": list(self.stop_vms), "breaks": list(self.breaks), "overwrites": list(self.overwrites),
            "in_use": list(self.in_use),
        }

    @classmethod
    def from_data(cls, data: Mapping[str, Any]) -> Plan:
        return cls(
            backup=data["backup"], workflow=data["workflow"],
            steps=tuple(Step.from_data(s) for s in data["steps"]),
            stop_vms=tuple(data["stop_vms"]), breaks=tuple(data["breaks"]),
            overwrites=tuple(data["overwrites"]), in_use=tuple(data["in_use"]),
        )

    def describe(self) -> list[str]:
        """What a --dry-run prints: exactly what would be overwritten and broken."""
        lines = [f"restore backup {self.backup} ({self.workflow}):"]
        for s in self.steps:
            origin = f"file {s.file}" if s.file else f"target LUN {s.image}"
            users = f" (mapped to {', '.join(s.dest_users)})" if s.dest_users else ""
            lines.append(
                f"  {s.vm} {s.disk}: overwrite LUN {s.dest}{users}, {s.capacity} bytes, "
                f"from {origin} by {s.method}"
            )
        lines.append("  power off, then on again: " + (", ".join(self.stop_vms) or "nothing (no VM using them runs)"))
        for b in self.breaks:
            lines.append(f"  relationship: {b}")
        for o in self.overwrites:
            lines.append(f"  backup lost: {o}")
        return lines


# --------------------------------------------------------------------------- planning (pure)


@attrs.frozen
class Dest:
    """What the site says about one candidate destination LUN."""

    serial: str
    lss: str
    capacity: int
    users: tuple[tuple[str, bool], ...]  # (VM, powered on) mapping it as an RDM
    vmfs: tuple[str, ...]  # VMs that have it as a VMFS datastore
    relationships: tuple[RelationshipInfo, ...]


def choose_disks(backup: Backup, selected: Sequence[str]) -> list[Disk]:
    """The backup's disks named by --disk (disk name, source serial or VM:DISK); all if none."""
    if not selected:
        return list(backup.disks)
    out = []
    for ref in selected:
        match = [d for d in backup.disks if ref in (d.disk, d.source, f"{d.vm}:{d.disk}")]
        if not match:
            names = ", ".join(f"{d.vm}:{d.disk} ({d.source})" for d in backup.disks)
            raise RestoreRefused(f"backup {backup.id} has no disk {ref!r} (its disks: {names})")
        out.extend(m for m in match if m not in out)
    return out


def plan(
    backup: Backup,
    disks: Sequence[Disk],
    dests: Sequence[Dest],
    image_rels: Mapping[str, tuple[RelationshipInfo, ...]],
    catalog: Sequence[Backup],
) -> Plan:
    """Decide method, what stops and what is lost, or refuse with the reason. Pure."""
    if not backup.restorable:
        raise RestoreRefused(f"backup {backup.id} cannot be restored: {backup.status}: {backup.why}")
    if len({d.serial for d in dests}) != len(dests):
        raise RestoreRefused("two disks would be restored onto the same LUN; give each its own --to")
    steps: list[Step] = []
    breaks: list[str] = []
    overwrites: list[str] = []
    in_use: list[str] = []
    stop: list[str] = []
    for disk, dest in zip(disks, dests):
        where = f"{disk.vm} {disk.disk} -> {dest.serial}"
        if dest.capacity != disk.capacity:
            raise RestoreRefused(f"{where}: LUN {dest.serial} has {dest.capacity} bytes, the image {disk.capacity}: sizes must match")
        if dest.vmfs:
            raise RestoreRefused(f"{where}: LUN {dest.serial} is a VMFS datastore of {', '.join(dest.vmfs)}; restore onto a raw-mapped LUN")
        if disk.export is None and dest.serial == disk.target:
            raise RestoreRefused(f"{where}: LUN {dest.serial} holds the image itself")
        method = "write"
        pair_rel = [r for r in dest.relationships if {r.source, r.target} == {disk.source, disk.target}]
        for r in dest.relationships:
            if r in pair_rel and backup.mode == "incremental" and dest.serial == disk.source:
                continue
            if r.target == dest.serial:
                raise RestoreRefused(
                    f"{where}: LUN {dest.serial} is the target of relationship {r.source} -> {r.target} "
                    f"(tag {r.tag or 'none'}); overwriting it would corrupt that image: withdraw it "
                    f"(or `flowcopy forget` its backup) or restore to another LUN"
                )
        if disk.export is None:
            rels = image_rels.get(disk.target, ())
            if backup.mode == "incremental" and dest.serial == disk.source and pair_rel:
                rel = pair_rel[0]
                others = [r for r in dest.relationships if r.source == dest.serial and r.target != disk.target]
                if others:
                    method = "write"  # reversing would cascade into the source's other targets
                elif rel.out_of_sync_tracks and (rel.source, rel.target) == (disk.source, disk.target):
                    # the forward copy has not finished: only a fast reverse restore can turn
                    # it round, and the target then never gets its uncopied tracks
                    method = FAST_REVERSE
                    breaks.append(
                        f"{rel.source} -> {rel.target} fast-reversed ({disk.target} -> {disk.source}) before its "
                        f"background copy finished ({rel.out_of_sync_tracks} tracks never copied): {disk.target} "
                        "is not a usable image afterwards, until the next incremental backup establishes it again"
                    )
                    overwrites.append(f"{backup.id} ({backup.workflow}, {backup.run_id}): this backup itself, "
                                      f"on {disk.target} (fast reverse restore)")
                    in_use.append(f"backup {backup.id} is gone after this restore (fast reverse restore from {disk.target})")
                elif rel.out_of_sync_tracks:
                    raise RestoreRefused(
                        f"{where}: the copy {rel.source} -> {rel.target} still has "
                        f"{rel.out_of_sync_tracks} tracks to copy; wait for it to finish, then restore"
                    )
                else:
                    method = "reverse"
                    breaks.append(
                        f"{rel.source} -> {rel.target} reversed ({disk.target} -> {disk.source}); "
                        "the next incremental backup turns it back"
                    )
            elif backup.mode not in ("incremental", "nocopy") and not any(r.target == disk.target for r in rels):
                if any(r.source == dest.serial for r in dest.relationships):
                    method = "write"  # a FlashCopy onto a source would cascade; a host write keeps its targets
                else:
                    method = "flash"
        for vm, on in dest.users:
            if on and vm not in stop:
                stop.append(vm)
                in_use.append(f"LUN {dest.serial} is in use by {vm} (powered on)")
        for other in catalog:
            if other.id != backup.id and other.status == OK and any(
                d.export is None and d.target == dest.serial for d in other.disks
            ):
                overwrites.append(f"{other.id} ({other.workflow}, {other.run_id}): its image on {dest.serial}")
                in_use.append(f"LUN {dest.serial} holds the image of backup {other.id}")
        steps.append(Step(
            vm=disk.vm, disk=disk.disk, source=disk.source, image=None if disk.export else disk.target,
            file=disk.export, digest=disk.digest, dest=dest.serial, dest_lss=dest.lss, capacity=disk.capacity,
            method=method, dest_users=tuple(vm for vm, _ in dest.users),
        ))
    return Plan(
        backup=backup.id, workflow=backup.workflow, steps=tuple(steps), stop_vms=tuple(stop),
        breaks=tuple(breaks), overwrites=tuple(overwrites), in_use=tuple(dict.fromkeys(in_use)),
    )


# --------------------------------------------------------------------------- site facts (shell)


async def resolve_dest(site: Site, disk: Disk, to: str) -> str:
    """`original`, a serial, or VM:DISK -> the destination serial."""
    if to == "original":
        return disk.source
    if ":" in to:
        vm, name = to.split(":", 1)
        return (await site.lun_of(vm, name)).serial
    return (await site.get_volume(to)).serial


async def dest_facts(site: Site, serial: str) -> Dest:
    volume = await site.get_volume(serial)
    users: list[tuple[str, bool]] = []
    vmfs: list[str] = []
    for vm in await site.list_vms():
        for d in vm.disks:
            if d.serial != serial:
                continue
            if d.kind is DiskKind.VMFS:
                vmfs.append(vm.name)
            else:
                users.append((vm.name, vm.power is PowerState.ON))
    return Dest(serial, volume.lss, volume.capacity, tuple(users), tuple(vmfs), tuple(await site.query(volume=serial)))


async def make_plan(site: Site, backup: Backup, catalog: Sequence[Backup], *, disks: Sequence[str] = (), to: Sequence[str] = ()) -> Plan:
    chosen = choose_disks(backup, disks)
    targets = list(to) or ["original"]
    if len(targets) == 1:
        targets = targets * len(chosen) if targets[0] == "original" or len(chosen) == 1 else targets
    if len(targets) != len(chosen):
        raise RestoreRefused(
            f"{len(chosen)} disk(s) to restore but {len(targets)} --to given: give one --to per --disk, in order, or --to original"
        )
    dests = [await dest_facts(site, await resolve_dest(site, d, t)) for d, t in zip(chosen, targets)]
    image_rels = {d.target: tuple(await site.query(volume=d.target)) for d in chosen if d.export is None}
    return plan(backup, chosen, dests, image_rels, catalog)


# --------------------------------------------------------------------------- the stages (site side)


async def check_image(site: Site, step: Step) -> None:
    """Before anything is stopped: the image must still be the one recorded."""
    if step.file is not None:
        try:
            size = os.stat(step.file).st_size
        except OSError as exc:
            raise RestoreRefused(f"{step.vm} {step.disk}: image file {step.file}: {exc.strerror}") from None
        if size != step.capacity:
            raise RestoreRefused(f"{step.vm} {step.disk}: image file {step.file} has {size} bytes, expected {step.capacity}")
        if step.digest is not None:
            import trio

            got = await trio.to_thread.run_sync(images.file_digest, step.file, step.capacity)
            if got != step.digest:
                raise RestoreRefused(f"{step.vm} {step.disk}: image file {step.file} changed since it was exported (content digest differs)")
        return
    assert step.image is not None
    if step.digest is not None:
        got = await images.lun_digest(site, step.image, step.capacity)
        if got != step.digest:
            raise RestoreRefused(f"{step.vm} {step.disk}: target {step.image} was written since the backup (content digest differs)")


def _subtract(runs: Sequence[tuple[int, int]], minus: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Track runs minus track runs."""
    covered = set()
    for first, count in minus:
        covered.update(range(first, first + count))
    out: list[tuple[int, int]] = []
    for first, count in runs:
        for t in range(first, first + count):
            if t in covered:
                continue
            if out and out[-1][0] + out[-1][1] == t:
                out[-1] = (out[-1][0], out[-1][1] + 1)
            else:
                out.append((t, 1))
    return out


async def write_back(site: Site, step: Step) -> int:
    """Make the destination read exactly as the image: write its data, zero the rest of
    what the destination held. Idempotent (a resume simply does it again). Returns bytes written."""
    cap = step.capacity
    fd = None
    if step.file is not None:
        fd = os.open(step.file, os.O_RDONLY)
        runs = images.track_runs(images.data_ranges(fd, os.fstat(fd).st_size), cap)
    else:
        assert step.image is not None
        runs = images.track_runs(((e.offset, e.length) for e in await site.extents(step.image)), cap)
    written = 0
    try:
        old = images.track_runs(((e.offset, e.length) for e in await site.extents(step.dest)), cap)
        for first, count in images.chunks(_subtract(old, runs)):
            offset = first * TRACK_SIZE
            length = min(count * TRACK_SIZE, cap - offset)
            await site.write(step.dest, offset, bytes(length))
            written += length
        for first, count in images.chunks(runs):
            offset = first * TRACK_SIZE
            length = min(count * TRACK_SIZE, cap - offset)
            if fd is not None:
                data = os.pread(fd, length, offset)
                data += bytes(length - len(data))
            else:
                data = await site.read(step.image, offset, length)  # type: ignore[arg-type]
            await site.write(step.dest, offset, data)
            written += length
    finally:
        if fd is not None:
            os.close(fd)
    return written


async def flash_back(site: Site, step: Step, tag: str) -> float:
    """A new image -> destination FlashCopy (background copy; dissolves when done)."""
    assert step.image is not None
    for rel in await site.query(tag=tag):
        if (rel.source, rel.target) == (step.image, step.dest):
            return rel.created
    info = await site.establish(step.image, step.dest, api.FlashOptions(mode=api.CopyMode.COPY, tag=tag))
    return info.created


async def reverse_back(site: Site, step: Step, tag: str, *, fast: bool = False) -> float:
    assert step.image is not None
    for rel in await site.query(tag=tag):
        if (rel.source, rel.target) == (step.image, step.dest):
            return rel.synced
    rels = [r for r in await site.query(volume=step.dest) if {r.source, r.target} == {step.dest, step.image}]
    if not rels:
        raise RestoreRefused(f"{step.vm} {step.disk}: no incremental relationship {step.dest} -> {step.image} to reverse")
    info = await site.reverse(rels[0].source, rels[0].target, tag=tag, fast=fast)
    return info.synced


# --------------------------------------------------------------------------- restore workflows


async def workflow_units(specs: Sequence[Any], site: Site, journal: Any) -> list[Any]:
    """A `kind: restore` workflow's units as restore units, the same as `flowcopy restore`
    makes: each names a VM's disks and the LUN their image is on; the newest restorable
    backup with exactly those images is planned (reverse, fast reverse, flash or write
    back) and the unit carries the plan, so it walks the state table's restore path
    (stop, restore, check, start, copy back) and the catalog learns what it overwrote.
    Running the workflow is the admin's confirmation: nothing is asked."""
    from flowcopy.backups import catalog

    backups: list[Backup] | None = None
    out = []
    for spec in specs:
        if spec.restore is not None or spec.kind != "restore":
            out.append(spec)
            continue
        if backups is None:
            backups = await catalog.live(journal, site)
        wanted: list[tuple[str, str]] = []
        for d in spec.disks:
            source = (await site.lun_of(d.vm, d.disk)).serial
            t = d.target
            if t.serial is not None:
                target = t.serial
            elif t.vm is not None and t.disk is not None:
                target = (await site.lun_of(t.vm, t.disk)).serial
            else:
                raise RestoreRefused(f"{spec.vms[0]} {d.disk}: a restore names the LUN its image is on (a serial or VM/disk)")
            wanted.append((source, target))
        found = [b for b in backups if b.status == OK and all(
            any((x.source, x.target) == w and x.export is None for x in b.disks) for w in wanted)]
        if not found:
            names = ", ".join(f"{s} from {t}" for s, t in wanted)
            raise RestoreRefused(f"no restorable backup holds the images to restore ({names}): "
                                 "`flowcopy backups` lists what there is")
        backup = found[0]  # newest first
        plan = await make_plan(site, backup, backups, disks=[s for s, _ in wanted])
        vms = tuple(dict.fromkeys([*plan.stop_vms, *(u for s in plan.steps for u in s.dest_users)]))
        out.append(attrs.evolve(spec, vms=vms, disks=(), quiesce="poweroff", restore=plan.to_data()))
    return out
