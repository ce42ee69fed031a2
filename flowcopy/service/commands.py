"""`flowcopy schedules`: read the folder, the journal and the pause state; print."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from pathlib import Path


def schedules(folder: Path, store: Path, *, as_json: bool, now: datetime | None = None) -> int:
    from flowcopy.journal import JournalError
    from flowcopy.scheduler import PauseStateError
    from flowcopy.service.schedules import read_rows, table

    if not folder.is_dir():
        print(f"flowcopy: {folder}: no such folder of workflow definitions", file=sys.stderr)
        return 2
    now = now or datetime.now(UTC)
    try:
        rows, broken = read_rows(folder, store, now)
    except (JournalError, PauseStateError) as exc:
        print(f"flowcopy: {exc}", file=sys.stderr)
        return 2
    for path, exc in broken.items():
        print(f"flowcopy: {path}: not shown, the definition is broken ({len(exc.problems)} problem(s); "
              f"`flowcopy validate {path}` lists them)", file=sys.stderr)
    if as_json:
        print(json.dumps([r.to_json() for r in rows], indent=2))
    else:
        for line in table(rows, now):
            print(line)
        print(f"\n{len(rows)} workflow(s) listed, {sum(1 for r in rows if r.cron)} on a schedule.")
    return 0
