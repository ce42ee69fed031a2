"""Bodies of `flowcopy engines`, `flowcopy journal check|backup` and the lease part of
`flowcopy status`: one line and exit 2 for anything an admin can act on."""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from flowcopy.journal import EngineRow, Journal, JournalError, LeaseRow, is_url


def _err(message: str) -> int:
    print(f"flowcopy: {message}", file=sys.stderr)
    return 2


def _open(store: Path | str) -> Journal | int:
    if not is_url(store) and not (Path(store) / "journal.sqlite").exists():
        return _err(f"{store}: no journal here (nothing has run with this store)")
    try:
        return Journal.open(store, lock=False)
    except (JournalError, OSError) as exc:
        return _err(str(exc))


def _ago(t: float | None, now: float) -> str:
    if t is None:
        return "-"
    d = now - t
    return f"{d:.0f}s ago" if d >= 0 else f"in {-d:.0f}s"


def engine_json(e: EngineRow, held: int) -> dict[str, Any]:
    return {"engine": e.engine_id, "host": e.host, "pid": e.pid, "started": e.started, "heartbeat": e.heartbeat,
            "lease_until": e.lease_until, "lease_period_s": e.lease_period, "stopped": e.stopped, "live": e.live,
            "units_held": held}


def engines(store: Path | str, *, as_json: bool) -> int:
    """`flowcopy engines`: every engine that opened the journal, live ones first."""
    journal = _open(store)
    if isinstance(journal, int):
        return journal
    try:
        if not journal.leased:
            from flowcopy.journal import read_lock_holder

            holder = read_lock_holder(Path(store))
            rows = [] if holder is None else [{"engine": f"pid {holder[0]}", "pid": holder[0], "started": holder[1], "live": True}]
            print(json.dumps(rows) if as_json else (
                f"store lock held by pid {holder[0]} (started {holder[1]}): one engine over every unit" if holder
                else "no engine holds the store (SQLite: one engine at a time, by the store lock)"))
            return 0
        rows_e = journal.engines()
        held = Counter(lease.engine_id for lease in journal.leases() if lease.engine_id)
    except JournalError as exc:
        return _err(str(exc))
    finally:
        journal.close()
    rows_e.sort(key=lambda e: (not e.live, -e.started))
    if as_json:
        print(json.dumps([engine_json(e, held.get(e.engine_id, 0)) for e in rows_e]))
        return 0
    now = time.time()
    print(f"{'STATE':<6} {'HOST':<20} {'PID':>7}  {'STARTED':<20} {'HEARTBEAT':<12} {'LEASE':<12} UNITS")
    for e in rows_e:
        state = "live" if e.live else ("stopped" if e.stopped else "dead")
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.started))
        lease = _ago(e.lease_until, now) if e.live else "-"
        print(f"{state:<6} {e.host[:20]:<20} {e.pid:>7}  {started:<20} {_ago(e.heartbeat, now):<12} {lease:<12} {held.get(e.engine_id, 0)}")
    return 0


def lease_rows(journal: Journal) -> list[LeaseRow]:
    return journal.leases() if journal.leased else []


def leases_json(leases: list[LeaseRow]) -> list[dict[str, Any]]:
    return [{"unit": r.unit_id, "run": r.run_id, "state": r.state, "epoch": r.epoch, "engine": r.engine_id,
             "host": r.host, "pid": r.pid, "engine_started": r.started, "lease_until": r.lease_until} for r in leases]


def print_leases(leases: list[LeaseRow]) -> None:
    """Which engine holds which unfinished units and when each lease expires."""
    if not leases:
        return
    now = time.time()
    by: dict[tuple[Any, ...], list[LeaseRow]] = {}
    for r in leases:
        by.setdefault((r.host, r.pid, r.started, r.lease_until), []).append(r)
    print("unfinished units by holder:")
    for (host, pid, started, until), rows in sorted(by.items(), key=lambda kv: kv[0][1] or 0):
        if pid is None:
            who = "unclaimed (any engine may take them)"
        else:
            when = time.strftime("%H:%M:%S", time.localtime(started)) if started else "?"
            expiry = "expired " + _ago(until, now) if until is not None and until < now else "lease expires " + _ago(until, now)
            who = f"{host} pid {pid} (started {when}), {expiry}"
        units = ", ".join(r.unit_id.rsplit("/", 1)[-1] for r in rows[:8]) + (" …" if len(rows) > 8 else "")
        print(f"  {who}: {len(rows)} unit(s) {units}")


def journal_check(store: Path | str) -> int:
    """`flowcopy journal check`: 0 when every row reads; else each problem and how to recover."""
    journal = _open(store)
    if isinstance(journal, int):
        return journal
    try:
        problems = journal.check()
        runs = len(journal.runs()) if not problems else None
    except JournalError as exc:
        return _err(str(exc))
    finally:
        journal.close()
    where = journal.path
    if not problems:
        print(f"{where}: journal sound ({runs} run(s))")
        return 0
    for problem in problems[:50]:
        print(f"{where}: {problem}")
    if len(problems) > 50:
        print(f"{where}: … {len(problems) - 50} more")
    return _err(f"{where}: {len(problems)} problem(s); {journal.recover_hint}")


def journal_backup(store: Path | str, dest: Path) -> int:
    journal = _open(store)
    if isinstance(journal, int):
        return journal
    try:
        backup = getattr(journal, "backup", None)
        if backup is None:
            return _err(f"{journal.path}: back a PostgreSQL journal up with pg_dump (e.g. pg_dump -Fc -f FILE URL)")
        backup(dest)
    except (JournalError, OSError) as exc:
        return _err(str(exc))
    finally:
        journal.close()
    print(f"journal copied to {dest}; restore: stop every engine, copy it over {Path(store) / 'journal.sqlite'}")
    return 0
