"""`flowcopy verify`: re-check existing images later, like `restic check`.

Each image is read again — a live target through the array, an exported file from disk —
and compared with what was recorded when it was made (the content digest; for files also
the whole-file sha256 of the `.sha256` file), then the independent checker runs on the
images as they are now. The result is journaled; the catalog shows the last one, and a
failed image is no longer offered for restore.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
import trio

from flowcopy import stages
from flowcopy.backups import images
from flowcopy.backups.catalog import OK, Backup
from flowcopy.journal import Journal
from flowcopy.site.api import Site, SiteError


@attrs.frozen
class Result:
    backup: Backup
    ok: bool
    checker: str
    problems: tuple[str, ...]

    @property
    def problem(self) -> str:
        return self.problems[0] if self.problems else ""

    def detail(self) -> dict[str, Any]:
        return {"problem": self.problem, "problems": list(self.problems[:20]), "kind": self.checker}


def _file_problems(path: str, capacity: int, sha256: str | None, digest: str | None) -> list[str]:
    """Blocking: stat, content digest and whole-file sha256 of one export."""
    import os

    try:
        size = os.stat(path).st_size
    except OSError as exc:
        return [f"export file {path}: {exc.strerror}"]
    if size != capacity:
        return [f"export file {path} has {size} bytes, the image had {capacity}"]
    problems = []
    if digest is not None and images.file_digest(path, capacity) != digest:
        problems.append(f"export file {path} changed since it was exported (content digest differs)")
    if sha256 is not None and images.file_sha256(path) != sha256:
        problems.append(f"export file {path} does not match its recorded sha256 {sha256[:12]}…")
    return problems


async def verify_one(site: Site, backup: Backup) -> Result:
    if backup.status != OK:
        return Result(backup, False, "catalog", (f"{backup.status}: {backup.why}",))
    problems: list[str] = []
    files = [d for d in backup.disks if d.export is not None]
    luns = [d for d in backup.disks if d.export is None]
    for d in files:
        problems += await trio.to_thread.run_sync(_file_problems, d.export, d.capacity, d.sha256, d.digest)
    for d in luns:
        try:
            if d.digest is not None and await images.lun_digest(site, d.target, d.capacity) != d.digest:
                problems.append(f"target {d.target} was written since the backup (content digest differs)")
        except SiteError as exc:
            problems.append(f"target {d.target}: {exc.kind}: {exc.message}")
    kind = "none"
    if not problems:
        if files:
            report = await trio.to_thread.run_sync(stages.check_exported, [d.export for d in files])
        else:
            report = await site.check([d.target for d in luns])
        kind = report.kind
        if not report.consistent:
            problems += list(report.problems) or [f"the checker found the {report.kind} image inconsistent"]
    return Result(backup, not problems, kind, tuple(problems))


async def verify(journal: Journal, site: Site, backups: Sequence[Backup]) -> list[Result]:
    """Verify each backup and journal each result (durable before the next starts)."""
    results = []
    for backup in backups:
        result = await verify_one(site, backup)
        if backup.status == OK:
            await journal.record_verification(backup.id, result.checker, result.ok, result.detail())
        results.append(result)
    return results
