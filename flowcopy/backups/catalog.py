"""The backup catalog: what images exist, derived from the journal plus the site.

A *backup* is one succeeded backup unit's point-in-time image set. The journal says what
was made and what later overwrote it (a rotation slot reused, a restore onto the LUN);
the site says what the array still holds (is the nocopy relationship still there, is the
target now someone else's); the file system says whether an exported file is still the
file flowcopy wrote. A backup that lost any of its images is shown as gone (or failed),
with why, and is never offered for restore.

The journal keeps the catalog flat (`flowcopy.journal.catalog`, schema v6): one row per
backup disk, already marked when a later unit overwrote its LUN. `derive` is the pure
core (rows + facts -> backups); `load` is the trio shell that reads those rows, asks the
site once for every relationship and stats each export file of a still-ok backup.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import attrs

from flowcopy.journal import ForgottenRow, Journal, VerificationRow
from flowcopy.journal.catalog import SEP, backup_id
from flowcopy.site.api import RelationshipInfo, Site

OK, GONE, FAILED, FORGOTTEN = "ok", "gone", "failed", "forgotten"

__all__ = ["FAILED", "FORGOTTEN", "GONE", "OK", "Backup", "Disk", "Facts", "backup_id", "derive", "find", "listing", "live", "load"]


@attrs.frozen
class Disk:
    vm: str
    disk: str
    source: str
    target: str
    capacity: int
    export: str | None = None  # the exported image file, when there is one
    sha256: str | None = None  # whole-file sha256 of the export
    digest: str | None = None  # content digest of the image (images.py)
    mtime_ns: int | None = None  # of the export file as written
    where: str = "target"  # "target", "export", "incremental pair", "nocopy target"

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.frozen
class Verification:
    time: float
    checker: str
    ok: bool
    detail: Mapping[str, Any]


@attrs.frozen
class Backup:
    id: str
    unit_id: str
    run_id: str
    workflow: str
    number: int
    vms: tuple[str, ...]
    disks: tuple[Disk, ...]
    mode: str
    tag: str | None
    site_time: float | None  # site time of the establish: the point in time
    wall_time: float | None  # wall time the establish was journaled
    check_kind: str | None  # what the checker recognised at backup time
    last_verification: Verification | None
    status: str = OK
    why: str = ""
    withdrawn: int | None = None  # relationships withdrawn before the copy finished (copy mode)

    @property
    def size(self) -> int:
        return sum(d.capacity for d in self.disks)

    @property
    def restorable(self) -> bool:
        return self.status == OK

    @property
    def verified_ok(self) -> bool:
        """Verified when made and not failed since: what retention and RPO count."""
        return self.status == OK and (self.last_verification is None or self.last_verification.ok)

    @property
    def where(self) -> str:
        kinds = sorted({d.where for d in self.disks})
        return "+".join(kinds)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "unit": self.unit_id, "run": self.run_id, "workflow": self.workflow,
            "vms": list(self.vms), "mode": self.mode, "where": self.where, "size": self.size,
            "site_time": self.site_time, "wall_time": self.wall_time, "check_kind": self.check_kind,
            "status": self.status, "why": self.why, "restorable": self.restorable,
            "last_verification": None if self.last_verification is None else attrs.asdict(self.last_verification),
            "disks": [d.to_json() for d in self.disks],
        }


@attrs.frozen
class Facts:
    """What the site and the file system say now, for the images still in question."""

    relationships: Mapping[str, tuple[RelationshipInfo, ...] | None] = attrs.field(factory=dict)
    """serial -> relationships touching it (None: the array has no such volume)."""
    files: Mapping[str, tuple[int, int] | None] = attrs.field(factory=dict)
    """path -> (size, mtime_ns), None when the file is gone."""
    unusable: Mapping[str, str] = attrs.field(factory=dict)
    """serial -> why the array says the volume holds no usable image (a fast reverse)."""


# --------------------------------------------------------------------------- the core


def from_rows(rows: Iterable[Sequence[Any]]) -> list[Backup]:
    """Backups from the journal's flat catalog rows (newest first, as read), judged by
    the journal's own evidence: a later unit that wrote an image's LUN."""
    out: list[Backup] = []
    disks: list[Disk] = []
    why = ""
    for (unit_id, _n, bid, run_id, workflow, _created, number, vms, vm, disk, source, target, capacity, mode, tag,
         site_time, wall_time, _sort, where, export, sha256, digest, mtime_ns, check_kind, withdrawn,
         over_why) in rows:
        disks.append(Disk(vm, disk, source, target, capacity, export, sha256, digest, mtime_ns, where))
        if over_why is not None and not why:
            why = over_why
        if _n:
            continue  # rows come disk-last-first: disk 0 closes the backup
        disks.reverse()
        backup = Backup(
            id=bid, unit_id=unit_id, run_id=run_id, workflow=workflow, number=number,
            vms=_vms(vms), disks=tuple(disks), mode=mode, tag=tag, site_time=site_time,
            wall_time=wall_time, check_kind=check_kind, last_verification=None, status=GONE if why else OK, why=why,
            withdrawn=withdrawn,
        )
        out.append(backup)
        disks, why = [], ""
    return out


def _tag_run(tag: str) -> str:
    """The run of a unit's tag (`fc:<run>:<i>`)."""
    return tag[3:].rpartition(":")[0] if tag.startswith("fc:") else ""


def _judge_live(row: Backup, disk: Disk, rels: tuple[RelationshipInfo, ...] | None, restore_runs: frozenset[str] | set[str]) -> tuple[str, str]:
    t = disk.target
    if rels is None:
        return GONE, f"target {t} no longer exists on the array"
    on_target = [r for r in rels if r.target == t]
    pair = [r for r in rels if {r.source, r.target} == {disk.source, t}]
    if row.mode == "incremental":
        if not pair or not pair[0].recording:
            return GONE, f"incremental relationship {disk.source} -> {t} withdrawn"
        tag = pair[0].tag or ""
        if tag != row.tag and _tag_run(tag) not in restore_runs:
            return GONE, f"incremental pair resynced by a later run ({tag or 'untagged'}): {t} holds a newer image"
        return OK, ""
    if row.mode == "nocopy":
        ours = [r for r in pair if r.tag == row.tag and r.source == disk.source]
        if not ours:
            return GONE, f"nocopy relationship {disk.source} -> {t} withdrawn: {t} no longer holds the image"
        return OK, ""
    if row.withdrawn:
        return GONE, f"relationship withdrawn before its background copy finished: {t} is incomplete"
    for r in on_target:
        if r.tag != row.tag:
            return GONE, f"target {t} is now the target of {r.source} -> {t} (tag {r.tag or 'none'})"
    return OK, ""


def _judge_file(disk: Disk, fact: tuple[int, int] | None) -> tuple[str, str]:
    if fact is None:
        return GONE, f"export file {disk.export} removed"
    size, mtime_ns = fact
    if size != disk.capacity:
        return FAILED, f"export file {disk.export} changed: {size} bytes, was {disk.capacity}"
    if disk.mtime_ns is not None and mtime_ns != disk.mtime_ns:
        return FAILED, f"export file {disk.export} modified since it was written"
    return OK, ""


def derive(
    backups: Sequence[Backup],
    verifications: Mapping[str, VerificationRow],
    forgotten: Mapping[str, ForgottenRow],
    facts: Facts | None = None,
    restore_runs: frozenset[str] | set[str] = frozenset(),
) -> list[Backup]:
    """Every backup judged ok / gone / failed / forgotten: the journal's judgement
    (`from_rows`), then retention's records, then what the site and the files say
    (`facts`; without them images that need the site or the file system stay `ok`),
    then the last re-verification. Pure."""
    out: list[Backup] = []
    for b in backups:
        status, why = b.status, b.why
        if b.id in forgotten:
            status, why = FORGOTTEN, forgotten[b.id].reason
        if status == OK and facts is not None:
            for disk in b.disks:
                if disk.export is not None:
                    if disk.export in facts.files:
                        status, why = _judge_file(disk, facts.files[disk.export])
                elif disk.target in facts.unusable:
                    status, why = GONE, f"target {disk.target}: {facts.unusable[disk.target]}"
                elif disk.target in facts.relationships:
                    status, why = _judge_live(b, disk, facts.relationships[disk.target], restore_runs)
                if status != OK:
                    break
        check = verifications.get(b.id)
        last = None if check is None else Verification(check.time, check.checker, check.ok, check.detail)
        if status == OK and last is not None and not last.ok:
            status, why = FAILED, "verify failed: " + str(check.detail.get("problem", "image did not check"))  # type: ignore[union-attr]
        if (status, why, last) != (b.status, b.why, None):
            b = attrs.evolve(b, status=status, why=why, last_verification=last)
        out.append(b)
    return out


def needed(backups: Iterable[Backup]) -> tuple[set[str], set[str]]:
    """(target serials, export paths) whose current state decides a still-ok backup."""
    serials: set[str] = set()
    files: set[str] = set()
    for b in backups:
        if b.status != OK:
            continue
        for d in b.disks:
            if d.export is not None:
                files.add(d.export)
            else:
                serials.add(d.target)
    return serials, files


def stat_files(paths: Iterable[str]) -> dict[str, tuple[int, int] | None]:
    out: dict[str, tuple[int, int] | None] = {}
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            out[path] = None
        else:
            out[path] = (st.st_size, st.st_mtime_ns)
    return out


# --------------------------------------------------------------------------- the shell


async def gather(site: Site | None, serials: Iterable[str], files: Iterable[str]) -> Facts:
    """Two site calls whatever the number of images (the volumes, every relationship),
    and one stat per export file."""
    rels: dict[str, tuple[RelationshipInfo, ...] | None] = {}
    unusable: dict[str, str] = {}
    wanted = set(serials)
    if site is not None and wanted:
        volumes = await site.list_volumes()
        known = {v.serial for v in volumes}
        unusable = {v.serial: v.unusable for v in volumes if v.unusable and v.serial in wanted}
        touching: dict[str, list[RelationshipInfo]] = {s: [] for s in wanted if s in known}
        for r in await site.query():
            for serial in {r.source, r.target}:
                if serial in touching:
                    touching[serial].append(r)
        rels = {s: (tuple(touching[s]) if s in touching else None) for s in wanted}
    return Facts(relationships=rels, files=stat_files(files), unusable=unusable)


async def load(journal: Journal, site: Site | None) -> list[Backup]:
    """The catalog as of now. `site=None`: journal and files only (no array reachable)."""
    backups = from_rows(journal.catalog_rows())
    forgotten = journal.forgotten()
    serials, files = needed(b for b in backups if b.id not in forgotten)
    facts = await gather(site, serials, files)
    restore_runs = journal.restore_runs() if any(b.mode == "incremental" for b in backups) else set()
    return derive(backups, journal.verifications(), forgotten, facts, restore_runs)


def _vms(text: str) -> tuple[str, ...]:
    return tuple(text.split(SEP)) if text else ()


def _where(kinds: set[str]) -> str:
    return next(iter(kinds)) if len(kinds) == 1 else "+".join(sorted(kinds))


class Listed(NamedTuple):
    """A backup as the listing shows it: what `table_lines` reads (a Backup has the same)."""

    id: str
    unit_id: str
    wall_time: float | None
    workflow: str
    vms: tuple[str, ...]
    size: int
    where: str
    status: str
    why: str


def listed(b: Backup) -> Listed:
    return Listed(b.id, b.unit_id, b.wall_time, b.workflow, b.vms, b.size, b.where, b.status, b.why)


async def listing(journal: Journal, site: Site | None) -> tuple[list[Listed], list[Backup]]:
    """(every backup as `flowcopy backups` shows it, newest first; the full Backups of
    those no later unit overwrote). A backup the journal already knows is gone costs one
    small row and no object beyond its line; only the others are built, judged by the
    site and files, and re-verified: 100,000 backups list in well under a second."""
    forgotten = journal.forgotten()
    rows = journal.catalog_summary()
    judged = {b.unit_id: b for b in await live(journal, site, forgotten)}
    out: list[Listed] = []
    vm_names: dict[str, tuple[str, ...]] = {}
    make = tuple.__new__  # a NamedTuple's own __new__ is a Python call: 100,000 of them show
    more: list[Sequence[Any]] = []  # the other disks of a multi-disk backup (they come first)
    for row in rows:
        bid, unit_id, n, workflow, vms, size, where, wall, why = row
        if n:
            more.append(row)
            continue
        if more:
            size += sum(r[5] for r in more)
            where = _where({where, *(r[6] for r in more)})
            why = why or next((r[8] for r in more if r[8] is not None), None)
            more = []
        b = judged.get(unit_id)
        if b is not None:
            out.append(listed(b))
            continue
        names = vm_names.get(vms)
        if names is None:
            names = vm_names[vms] = _vms(vms)
        if bid in forgotten:
            out.append(make(Listed, (bid, unit_id, wall, workflow, names, size, where, FORGOTTEN, forgotten[bid].reason)))
        else:
            out.append(make(Listed, (bid, unit_id, wall, workflow, names, size, where, GONE if why else OK, why or "")))
    return out, list(judged.values())  # type: ignore[return-value]


async def live(journal: Journal, site: Site | None, forgotten: Mapping[str, ForgottenRow] | None = None) -> list[Backup]:
    """The backups no later unit overwrote, judged (the only ones that can be ok)."""
    forgotten = journal.forgotten() if forgotten is None else forgotten
    backups = from_rows(journal.catalog_rows(live_only=True))
    serials, files = needed(b for b in backups if b.id not in forgotten)
    facts = await gather(site, serials, files)
    restore_runs = journal.restore_runs() if any(b.mode == "incremental" for b in backups) else set()
    return derive(backups, journal.verifications(), forgotten, facts, restore_runs)


class UnknownBackup(LookupError):
    pass


def find(backups: Sequence[Backup], ref: str) -> Backup:
    """A backup by id, id prefix (>= 4 characters) or unit id."""
    exact = [b for b in backups if b.id == ref or b.unit_id == ref]
    if exact:
        return exact[0]
    matches = [b for b in backups if len(ref) >= 4 and b.id.startswith(ref)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise UnknownBackup(f"backup id {ref!r} is ambiguous: {', '.join(b.id for b in matches[:5])}")
    raise UnknownBackup(f"no backup {ref!r} (flowcopy backups lists them)")
