"""Retention: which backups to keep (pure, restic's meanings), and removing the rest safely.

Counting is per VM and disk set, over backups, never over run folders: a night whose run
failed made no backup and so takes no place in `keep_last`. Only verified backups whose
images still stand count; the newest verified backup of every VM is kept whatever the
policy says.

Removing is the dangerous half, so it removes only what flowcopy wrote and recorded in
the journal: an export file whose name, size and content digest are the recorded ones
(a file changed since is left where it is, and said so), its `.sha256` file if it still
says what flowcopy wrote, the run folder only when it is the backup's own
(`<export root>/<run id>`) and empty, nothing outside the export root; kept
relationships only when they still carry the backup's own tag.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from flowcopy.backups import catalog, images
from flowcopy.backups.catalog import OK, Backup
from flowcopy.journal import Journal
from flowcopy.logs import get_logger
from flowcopy.site import api
from flowcopy.site.api import Site

if TYPE_CHECKING:
    from flowcopy.engine import Engine

log = get_logger("flowcopy.forget")


class ForgetError(Exception):
    pass


@attrs.frozen
class Policy:
    keep_last: int | None = None
    keep_daily: int | None = None
    keep_weekly: int | None = None

    @classmethod
    def from_data(cls, data: Mapping[str, Any] | None) -> Policy | None:
        if not data:
            return None
        last = data.get("keep_last") or data.get("keep")
        policy = cls(keep_last=last, keep_daily=data.get("keep_daily"), keep_weekly=data.get("keep_weekly"))
        return policy if (policy.keep_last or policy.keep_daily or policy.keep_weekly) else None

    def describe(self) -> str:
        parts = [f"{k} {v}" for k, v in attrs.asdict(self).items() if v]
        return ", ".join(parts)


@attrs.frozen
class Decision:
    backup: Backup
    keep: bool
    reason: str


def group_key(b: Backup) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
    return (b.workflow, tuple(sorted(b.vms)), tuple(sorted(d.source for d in b.disks)))


def _bucket(b: Backup, how: str) -> str:
    when = datetime.fromtimestamp(b.wall_time or 0.0)
    if how == "daily":
        return when.strftime("%Y-%m-%d")
    year, week, _ = when.isocalendar()
    return f"{year}-W{week:02d}"


def decide(backups: Sequence[Backup], policy: Policy) -> list[Decision]:
    """Keep or remove each backup (of one workflow); pure.

    restic's rules per group: keep_last n keeps the n newest; keep_daily n keeps the
    newest of each of the n most recent days that have a backup; keep_weekly likewise
    per ISO week. A backup kept by any rule is kept.
    """
    groups: dict[tuple[Any, ...], list[Backup]] = {}
    for b in backups:
        if b.status != catalog.FORGOTTEN:
            groups.setdefault(group_key(b), []).append(b)
    newest_per_vm: dict[str, str] = {}
    for b in sorted((b for b in backups if b.verified_ok), key=lambda b: (b.wall_time or 0.0, b.unit_id)):
        for vm in b.vms:
            newest_per_vm[vm] = b.id
    protected = set(newest_per_vm.values())
    out: list[Decision] = []
    for members in groups.values():
        members = sorted(members, key=lambda b: (b.wall_time or 0.0, b.unit_id), reverse=True)
        good = [b for b in members if b.verified_ok]
        reasons: dict[str, list[str]] = {}
        if policy.keep_last:
            for b in good[: policy.keep_last]:
                reasons.setdefault(b.id, []).append("last")
        for how, n in (("daily", policy.keep_daily), ("weekly", policy.keep_weekly)):
            if not n:
                continue
            seen: list[str] = []
            for b in good:
                bucket = _bucket(b, how)
                if bucket in seen:
                    continue
                if len(seen) == n:
                    break
                seen.append(bucket)
                reasons.setdefault(b.id, []).append(f"{how} {bucket}")
        for b in members:
            if b.id in reasons:
                out.append(Decision(b, True, "kept: " + ", ".join(reasons[b.id])))
            elif b.id in protected:
                out.append(Decision(b, True, "kept: the newest verified backup of " + ", ".join(b.vms)))
            elif b.status != OK:
                out.append(Decision(b, False, f"{b.status}: {b.why}"))
            elif not b.verified_ok:
                out.append(Decision(b, False, "its last verification failed"))
            else:
                out.append(Decision(b, False, f"beyond the policy ({policy.describe()})"))
    return out


# --------------------------------------------------------------------------- removal


def export_roots(store: Path) -> list[Path]:
    """Where exports may live: the store, and the admin's configured roots."""
    from flowcopy.definitions import configured_export_roots

    return [store.resolve(), *configured_export_roots()]


def _inside(path: Path, roots: Iterable[Path]) -> bool:
    return any(path == r or r in path.parents for r in roots)


def remove_export(disk: catalog.Disk, run_id: str, roots: Sequence[Path]) -> list[str]:
    """Remove one recorded export file (and its sidecar, and its run's own empty folder)."""
    assert disk.export is not None
    path = Path(disk.export)
    resolved = path.resolve()
    if not _inside(resolved, roots) or resolved.parent.name != run_id:
        return [f"left {path}: outside the export root or not in its run's folder"]
    if path.is_symlink() or not path.is_file():
        return [f"{path}: already gone"] if not path.exists() else [f"left {path}: not a regular file"]
    if path.stat().st_size != disk.capacity or (disk.digest and images.file_digest(path, disk.capacity) != disk.digest):
        return [f"left {path}: changed since flowcopy wrote it"]
    actions = []
    path.unlink()
    actions.append(f"removed {path}")
    sidecar = path.with_suffix(".img.sha256")
    if disk.sha256 and sidecar.is_file() and not sidecar.is_symlink():
        if sidecar.read_text(errors="replace") == f"{disk.sha256}  {path.name}\n":
            sidecar.unlink()
            actions.append(f"removed {sidecar}")
    folder = resolved.parent
    try:
        if _inside(folder.parent, roots) and folder.name == run_id and not any(folder.iterdir()):
            folder.rmdir()
            actions.append(f"removed empty folder {folder}")
    except OSError:
        pass
    return actions


async def remove(site: Site, store: Path, backup: Backup) -> list[str]:
    actions: list[str] = []
    roots = export_roots(store)
    for disk in backup.disks:
        if disk.export is not None:
            actions += remove_export(disk, backup.run_id, roots)
            continue
        if backup.mode in ("nocopy", "incremental") and backup.tag:
            for rel in await site.query(tag=backup.tag):
                if {rel.source, rel.target} == {disk.source, disk.target}:
                    try:
                        await site.withdraw(rel.source, rel.target)
                        actions.append(f"withdrew {rel.source} -> {rel.target}")
                    except api.RelationshipNotFound:
                        pass
        elif backup.status == OK:
            actions.append(f"freed target {disk.target}")
    return actions


async def apply(
    journal: Journal, site: Site, store: Path, *, workflow: str | None = None, dry_run: bool = False,
) -> list[Decision]:
    """Apply each workflow's journaled retention policy (or only `workflow`'s)."""
    backups = await catalog.load(journal, site)
    policies: dict[str, Policy | None] = {}
    for run in journal.runs():
        if workflow is None or run.workflow == workflow:
            policies[run.workflow] = Policy.from_data(run.definition.get("retention"))
    if workflow is not None and workflow not in policies:
        raise ForgetError(f"no runs of workflow {workflow!r} in the journal")
    decisions: list[Decision] = []
    for name, policy in sorted(policies.items()):
        if policy is None:
            continue
        decisions += decide([b for b in backups if b.workflow == name], policy)
    if dry_run:
        return decisions
    for d in decisions:
        if d.keep:
            continue
        actions = await remove(site, store, d.backup)
        await journal.record_forgotten(d.backup.id, d.reason, actions)
        log.info("forgot backup", backup=d.backup.id, reason=d.reason, actions=actions)
    return decisions


async def after_run(engine: Engine, run_id: str) -> None:
    run = engine.journal.run(run_id)
    if run.definition.get("kind", "backup") != "backup" or not Policy.from_data(run.definition.get("retention")):
        return
    await apply(engine.journal, engine.site, engine.store, workflow=run.workflow)
