"""The flat backup catalog inside the journal (schema v6): one row per backup disk.

Listing 100,000 backups must not decode 100,000 units' JSON data, nor replay every run
to learn which target a later run overwrote. So the journal keeps two flat tables,
written in the same transaction as the moves that make them true:

* `catalog`: when a backup unit succeeds verified, one row per disk with what the
  listing shows (backup id, workflow, run, VMs, mode, point in time, where the image
  lives, size, digest) and, once a later unit writes that LUN, who overwrote it;
* `lun_writes`: every unit that wrote a LUN (a backup's targets from its first freeze
  on, a restore's destinations from its `restore` intent on, the former target of a
  fast reverse restore), so a backup that succeeds after such a write knows at once.

The SQL uses `?` placeholders and types both backends accept; `execute` is any
DB-API-like `execute(sql, params)` (the backend's write connection, or the migration's).
Nothing here knows which backend runs it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

Execute = Callable[[str, Sequence[Any]], Any]

SEP = "\x1f"
"""Joins a backup's VM names in one column (no VM name holds a control character)."""

MIGRATION: tuple[str, ...] = (
    """CREATE TABLE catalog (
        unit_id TEXT NOT NULL,
        disk_no INTEGER NOT NULL,
        backup_id TEXT NOT NULL,
        run_id TEXT NOT NULL,
        workflow TEXT NOT NULL,
        run_created DOUBLE PRECISION NOT NULL,
        number INTEGER NOT NULL,
        vms TEXT NOT NULL,
        vm TEXT NOT NULL,
        disk TEXT NOT NULL,
        source TEXT NOT NULL,
        target TEXT NOT NULL,
        capacity BIGINT NOT NULL,
        mode TEXT NOT NULL,
        tag TEXT,
        site_time DOUBLE PRECISION,
        wall_time DOUBLE PRECISION,
        sort_time DOUBLE PRECISION NOT NULL,
        location TEXT NOT NULL,
        export TEXT,
        sha256 TEXT,
        digest TEXT,
        mtime_ns BIGINT,
        check_kind TEXT,
        withdrawn INTEGER,
        over_run TEXT,
        over_why TEXT,
        over_created DOUBLE PRECISION,
        PRIMARY KEY (unit_id, disk_no)
    )""",
    "CREATE INDEX catalog_by_time ON catalog (sort_time, unit_id, disk_no)",
    "CREATE INDEX catalog_by_target ON catalog (target)",
    # the few disks no later unit overwrote: the live read finds them without a scan
    "CREATE INDEX catalog_live ON catalog (sort_time, unit_id, disk_no) WHERE over_run IS NULL",
    "CREATE INDEX catalog_by_backup ON catalog (backup_id)",
    """CREATE TABLE lun_writes (
        serial TEXT NOT NULL,
        unit_id TEXT NOT NULL,
        run_id TEXT NOT NULL,
        workflow TEXT NOT NULL,
        run_created DOUBLE PRECISION NOT NULL,
        kind TEXT NOT NULL,
        PRIMARY KEY (serial, unit_id)
    )""",
    "CREATE INDEX lun_writes_by_serial ON lun_writes (serial, run_created, run_id)",
)
"""Schema v6's statements (the backfill runs after them: `backfill`)."""

COLUMNS = (
    "unit_id", "disk_no", "backup_id", "run_id", "workflow", "run_created", "number", "vms", "vm", "disk", "source",
    "target", "capacity", "mode", "tag", "site_time", "wall_time", "sort_time", "location", "export", "sha256", "digest",
    "mtime_ns", "check_kind", "withdrawn", "over_run", "over_why", "over_created",
)
READ_SQL = f"SELECT {', '.join(COLUMNS[:-3])}, over_why FROM catalog ORDER BY sort_time DESC, unit_id DESC, disk_no DESC"
"""The listing's one read: newest first (disks of a backup come last-first; the reader
reverses them)."""

LIVE_SQL = READ_SQL.replace(
    " ORDER BY", " WHERE over_run IS NULL AND NOT EXISTS (SELECT 1 FROM catalog o WHERE o.unit_id = catalog.unit_id"
    " AND o.over_run IS NOT NULL) ORDER BY")
"""The same rows, only of backups no later unit overwrote (the ones the site may judge)."""
SUMMARY_SQL = ("SELECT backup_id, unit_id, disk_no, workflow, vms, capacity, location, wall_time, over_why"
               " FROM catalog ORDER BY sort_time DESC, unit_id DESC, disk_no DESC")
"""What the listing shows of every backup (few columns: 100,000 rows fetch in a blink)."""

FAST_REVERSE = "fast-reverse"
"""lun_writes kind of a former target that a fast reverse restore left unusable."""


def backup_id(unit_id: str) -> str:
    """Short, stable id of the backup a unit made (restic-style: 8 hex digits)."""
    return hashlib.sha256(unit_id.encode()).hexdigest()[:8]


def overwritten(target: str, kind: str, writer_workflow: str, run_id: str, same_workflow: bool) -> str:
    """Why a backup whose image lived on `target` is gone: a later unit wrote it."""
    if kind == FAST_REVERSE:
        return f"fast reverse restore {run_id} made {target} the restore's source: it is no longer a usable image"
    if kind == "restore":
        return f"target {target} overwritten by restore {run_id}"
    if same_workflow:
        return f"target {target} reused by run {run_id} (rotation slot reused)"
    return f"target {target} overwritten by run {run_id} of {writer_workflow}"


def _location(mode: str, exported: bool) -> str:
    if exported:
        return "export"
    return {"incremental": "incremental pair", "nocopy": "nocopy target"}.get(mode, "target")


def flatten(unit_id: str, run_id: str, workflow: str, run_created: float, number: int, data: Mapping[str, Any],
            wall_fallback: float | None = None) -> list[tuple[Any, ...]]:
    """The catalog rows of one succeeded unit (none unless it is a verified backup)."""
    spec = data.get("spec") or {}
    if (spec.get("kind") or "backup") != "backup" or data.get("verified") is not True:
        return []
    pairs = data.get("pairs") or []
    exports = {os.path.basename(str(e.get("path", ""))): e for e in data.get("exports") or () if isinstance(e, dict)}
    digests = data.get("digests") or {}
    mode = spec.get("mode") or "copy"
    vms = list(spec.get("vms") or ()) or sorted({p["vm"] for p in pairs})
    wall = data.get("established_wall", wall_fallback)
    check = data.get("check") or {}
    rows = []
    for n, p in enumerate(pairs):
        e = exports.get(f"{p['source']}-{p['target']}.img")
        rows.append((
            unit_id, n, backup_id(unit_id), run_id, workflow, run_created, number, SEP.join(vms), p["vm"], p["disk"],
            p["source"], p["target"], int(p["capacity"]), mode, data.get("tag"), data.get("established_at"), wall,
            wall or 0.0, _location(mode, e is not None),
            None if e is None else str(e["path"]), None if e is None else e.get("sha256"),
            e.get("content") if e is not None else digests.get(p["target"]),
            None if e is None else e.get("mtime_ns"), check.get("kind"), data.get("withdrawn"),
        ))
    return rows


def written(data: Mapping[str, Any], event: str) -> list[tuple[str, str]]:
    """(serial, kind) of the LUNs a unit starts writing with this move: a backup's targets
    at each freeze, a reverse-restore workflow's sources at each freeze, a restore run's
    destinations (and a fast reverse's former targets) at its `restore` intent."""
    spec = data.get("spec") or {}
    kind = spec.get("kind") or "backup"
    pairs = data.get("pairs") or []
    if event == "freeze" and not spec.get("restore"):
        if kind == "restore":
            return [(p["source"], "restore") for p in pairs]
        return [(p["target"], kind) for p in pairs]
    if event == "restore" and spec.get("restore") and data.get("overwrote"):
        out = [(p["source"], "restore") for p in pairs]
        for step in spec["restore"].get("steps", ()):
            if step.get("method") == "fast-reverse" and step.get("image"):
                out.append((step["image"], FAST_REVERSE))
        return out
    return []


_NEXT_WRITE = ("SELECT kind, workflow, run_id, run_created FROM lun_writes WHERE serial = ? AND (run_created > ?"
               " OR (run_created = ? AND run_id > ?)) ORDER BY run_created, run_id LIMIT 1")


def insert_backup(execute: Execute, rows: Sequence[tuple[Any, ...]]) -> None:
    """Add a backup's disks, each marked overwritten if a later unit already wrote its LUN."""
    for row in rows:
        over: Sequence[Any] = (None, None, None)
        if row[19] is None:  # no export: the image lives on the target LUN
            _u, _n, _b, run_id, workflow, created = row[:6]
            got = execute(_NEXT_WRITE, (row[11], created, created, run_id)).fetchone()
            if got is not None:
                kind, writer, run, at = got
                over = (run, overwritten(row[11], kind, writer, run, writer == workflow), at)
        execute(
            f"INSERT INTO catalog ({', '.join(COLUMNS)}) VALUES ({', '.join('?' for _ in COLUMNS)})"
            " ON CONFLICT (unit_id, disk_no) DO NOTHING",
            (*row, *over),
        )


def record_writes(execute: Execute, unit_id: str, run_id: str, workflow: str, created: float,
                  serials: Iterable[tuple[str, str]]) -> None:
    """A unit wrote these LUNs: remember it, and mark every earlier backup whose image
    lived there as overwritten (by the earliest later write, whatever order they come in)."""
    for serial, kind in serials:
        execute("INSERT INTO lun_writes (serial, unit_id, run_id, workflow, run_created, kind) VALUES (?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (serial, unit_id) DO NOTHING", (serial, unit_id, run_id, workflow, created, kind))
        execute(
            "UPDATE catalog SET over_run = ?, over_created = ?, over_why = CASE WHEN workflow = ? THEN ? ELSE ? END"
            " WHERE target = ? AND export IS NULL AND (run_created < ? OR (run_created = ? AND run_id < ?))"
            " AND (over_run IS NULL OR over_created > ? OR (over_created = ? AND over_run > ?))",
            (run_id, created, workflow, overwritten(serial, kind, workflow, run_id, True),
             overwritten(serial, kind, workflow, run_id, False), serial, created, created, run_id, created, created, run_id),
        )


def on_moves(execute: Execute, moves: Iterable[tuple[Any, str]]) -> None:
    """Called by a backend inside a batch's transaction, after its moves are written:
    (move, run_id) of each. Only moves that write a LUN or end a unit cost anything."""
    runs: dict[str, tuple[str, float, int]] = {}

    def run_of(run_id: str) -> tuple[str, float, int]:
        if run_id not in runs:
            got = execute("SELECT workflow, created, number FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            runs[run_id] = (got[0], float(got[1]), int(got[2]))
        return runs[run_id]

    for move, run_id in moves:
        writes = move.event in ("freeze", "restore")
        if not writes and move.to_state != "succeeded":
            continue
        try:
            data = move.data
            if data is None:
                got = execute("SELECT data FROM units WHERE unit_id = ?", (move.unit_id,)).fetchone()
                data = json.loads(got[0])
            if writes:
                serials = written(data, move.event)
                if serials:
                    workflow, created, _ = run_of(run_id)
                    record_writes(execute, move.unit_id, run_id, workflow, created, serials)
            else:
                workflow, created, number = run_of(run_id)
                insert_backup(execute, flatten(move.unit_id, run_id, workflow, created, number, data))
        except (KeyError, TypeError, ValueError, AttributeError):
            # data the catalog cannot read never fails the engine's write: such a unit is
            # simply not listed (`flowcopy journal check` reads every row)
            continue


def backfill(execute: Execute) -> None:
    """Schema v6 on a store that already has runs: every past backup into the catalog,
    every past LUN write into lun_writes (in run order, as if they had been recorded)."""
    rows = execute(
        "SELECT u.unit_id, u.run_id, r.workflow, r.created, r.number, u.state, u.data,"
        " (SELECT e.time FROM events e WHERE e.unit_id = u.unit_id AND e.to_state = 'established'"
        "  ORDER BY e.seq DESC LIMIT 1)"
        " FROM units u JOIN runs r ON r.run_id = u.run_id WHERE u.state NOT IN ('pending', 'preparing')"
        " ORDER BY r.created, r.run_id, u.position", (),
    ).fetchall()
    for unit_id, run_id, workflow, created, number, state, text, wall in rows:
        try:
            data = json.loads(text)
        except (TypeError, ValueError):
            continue  # a damaged row: `flowcopy journal check` names it; the catalog skips it
        if not isinstance(data, dict):
            continue
        serials: list[tuple[str, str]] = []
        if int(data.get("freeze_attempts") or 0) > 0:
            serials += written(data, "freeze")
        serials += written(data, "restore")
        if serials:
            record_writes(execute, unit_id, run_id, workflow, float(created), serials)
        if state == "succeeded":
            insert_backup(execute, flatten(unit_id, run_id, workflow, float(created), int(number), data, wall))
