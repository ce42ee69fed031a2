"""`flowcopy schedules`: every workflow of a folder with its cron, zone, next and last fire,
like `systemctl list-timers`. A pure function over (definitions, runs, paused, now), so the
next fire across a DST change is a table test with a fixed "now"; the command around it
only reads the folder, the journal and the pause state."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import attrs

from flowcopy.definitions import Workflow
from flowcopy.journal import RunRow
from flowcopy.scheduler import next_fire


@attrs.frozen
class ScheduleRow:
    workflow: str
    file: str
    cron: str | None
    timezone: str
    overlap: str | None
    catch_up: float
    paused: bool
    next_fire: datetime | None
    """UTC; None for a workflow without a schedule."""
    last_fire: datetime | None
    """UTC start of the latest run (scheduled or by hand)."""
    last_run: str | None
    last_result: str | None

    def to_json(self) -> dict[str, Any]:
        def iso(t: datetime | None) -> str | None:
            return None if t is None else t.isoformat()

        return {
            "workflow": self.workflow,
            "file": self.file,
            "cron": self.cron,
            "timezone": self.timezone,
            "overlap": self.overlap,
            "catch_up_s": self.catch_up,
            "paused": self.paused,
            "next_fire": iso(self.next_fire),
            "next_fire_local": iso(self.local(self.next_fire)),
            "last_fire": iso(self.last_fire),
            "last_run": self.last_run,
            "last_result": self.last_result,
        }

    def local(self, t: datetime | None) -> datetime | None:
        import zoneinfo

        return None if t is None else t.astimezone(zoneinfo.ZoneInfo(self.timezone))


def schedule_rows(
    workflows: Mapping[Path, Workflow],
    runs: Iterable[RunRow],
    paused: Iterable[str],
    now: datetime,
) -> list[ScheduleRow]:
    """One row per workflow, soonest next fire first, unscheduled ones last (by name)."""
    latest: dict[str, RunRow] = {}
    for run in runs:
        if run.workflow not in latest or run.created > latest[run.workflow].created:
            latest[run.workflow] = run
    paused = frozenset(paused)
    rows = []
    for path, wf in workflows.items():
        sched = wf.schedule
        last = latest.get(wf.name)
        rows.append(ScheduleRow(
            workflow=wf.name,
            file=str(path),
            cron=sched.cron if sched else None,
            timezone=(sched.timezone if sched and sched.timezone else "UTC"),
            overlap=sched.overlap.value if sched else None,
            catch_up=float(sched.catch_up) if sched else 0.0,
            paused=wf.name in paused,
            next_fire=next_fire(sched, now) if sched else None,
            last_fire=datetime.fromtimestamp(last.created, UTC) if last else None,
            last_run=last.run_id if last else None,
            last_result=last.state if last else None,
        ))
    far = datetime.max.replace(tzinfo=UTC)
    return sorted(rows, key=lambda r: (r.next_fire or far, r.workflow))


def span(seconds: float) -> str:
    """`systemctl list-timers` style: 1 day 2h, 4h 5min, 12min 3s, 9s."""
    s = int(abs(seconds))
    days, rest = divmod(s, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} day{'s' if days != 1 else ''} {hours}h"
    if hours:
        return f"{hours}h {minutes}min"
    if minutes:
        return f"{minutes}min {secs}s"
    return f"{secs}s"


def _when(row: ScheduleRow, t: datetime | None) -> str:
    local = row.local(t)
    return "-" if local is None else local.strftime("%a %Y-%m-%d %H:%M:%S %Z")


def table(rows: Iterable[ScheduleRow], now: datetime) -> list[str]:
    """The plain text table (fits a terminal, greps well)."""
    head = ("NEXT", "LEFT", "LAST", "PASSED", "RESULT", "WORKFLOW", "CRON", "TIMEZONE", "OVERLAP", "PAUSED")
    lines: list[tuple[str, ...]] = [head]
    for r in rows:
        left = "-" if r.next_fire is None else ("paused" if r.paused else span((r.next_fire - now).total_seconds()))
        passed = "-" if r.last_fire is None else span((now - r.last_fire).total_seconds()) + " ago"
        lines.append((
            _when(r, r.next_fire), left, _when(r, r.last_fire), passed, r.last_result or "-", r.workflow,
            r.cron or "-", r.timezone if r.cron else "-", r.overlap or "-", "yes" if r.paused else "no",
        ))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in lines]


def read_rows(folder: Path, store: Path, now: datetime) -> tuple[list[ScheduleRow], dict[Path, Any]]:
    """Rows for `folder`, with the runs of `store` (read-only: works beside a running
    service); also the broken files' problems."""
    from flowcopy.journal import Journal, JournalNotFound
    from flowcopy.scheduler import load_folder, read_paused

    good, broken = load_folder(folder)
    runs: list[RunRow] = []
    try:
        journal = Journal.open(store, lock=False)
    except JournalNotFound:
        journal = None
    if journal is not None:
        try:
            runs = journal.runs()
        finally:
            journal.close()
    return schedule_rows(good, runs, read_paused(store), now), dict(broken)
