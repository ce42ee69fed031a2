"""How runs look to a person: the live progress view, summaries, status, describe, history.

States and their order come from `machine.STAGES`; nothing here lists states by hand.
Status is data-driven: `STATUS_COLUMNS` says which keys of a status row are shown and
how, and the same rows are the `--json` output, so a new column (lease, engine...) is a
key in `status_row` plus one `Column` here.

Times are wall-clock times shown in the local time zone; a piped table never truncates
(`Console(soft_wrap=True)` by the callers): what `history | grep` sees is the whole reason.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

import attrs

from flowcopy import machine

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress, TaskID
    from rich.table import Table

    from flowcopy.engine import Engine, RunSummary
    from flowcopy.journal import EventRow, RunRow, UnitRow


# --------------------------------------------------------------------------- small formats


def when(ts: float | None) -> str:
    """A wall time as the admin reads it: local date and time to the second."""
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def state_counts(states: Iterable[str]) -> str:
    counts = Counter(states)
    return ", ".join(f"{n} {s}" for s, n in sorted(counts.items(), key=lambda kv: _order(kv[0])))


def _order(state: str) -> int:
    stage = machine.STAGES.get(state)
    return stage.index if stage else 999


# --------------------------------------------------------------------------- live view


class LiveView:
    """rich Progress: one bar per run (units done of total, ETA) and, under it, a copy bar
    (tracks copied of tracks to copy) while its units wait for the background copy.

    Log lines are printed through `progress.console` (see `logs.configure(console=...)`),
    so a warning scrolls above the bars once instead of being drawn over by them. It
    refreshes from the trio loop (`update`): no refresh thread.
    """

    def __init__(self, console: Console, title: str) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.title = title
        self.progress: Progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(bar_width=30),
            MofNCompleteColumn(),
            TextColumn("{task.fields[unit]}"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[detail]}", style="dim"),
            console=console,
            auto_refresh=False,
            transient=False,
            redirect_stdout=False,
            redirect_stderr=False,
        )
        self._runs: dict[str, TaskID] = {}
        self._copies: dict[str, TaskID] = {}

    def __enter__(self) -> LiveView:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.refresh()
        self.progress.stop()

    def update(self, engine: Engine | None) -> None:
        if engine is not None:
            by_run: dict[str, list[str]] = {}
            for unit in list(engine.units.values()):
                by_run.setdefault(unit.run_id, []).append(unit.state)
            for run_id, states in sorted(by_run.items()):
                self._update_run(engine, run_id, states)
            for run_id, task in self._runs.items():
                if run_id not in by_run:  # finished: its units left the engine
                    total = self.progress.tasks[task].total or 0
                    self.progress.update(task, completed=total, detail="finished")
                    if run_id in self._copies:
                        copy = self._copies[run_id]
                        self.progress.update(copy, completed=self.progress.tasks[copy].total or 0, detail="done")
        self.progress.refresh()

    def _update_run(self, engine: Engine, run_id: str, states: list[str]) -> None:
        done = sum(1 for s in states if s in machine.TERMINAL)
        detail = state_counts(states)
        task = self._runs.get(run_id)
        if task is None:
            task = self._runs[run_id] = self.progress.add_task(f"{self.title} run {run_id}", total=len(states),
                                                               unit="units", detail="")
        self.progress.update(task, total=len(states), completed=done, detail=detail)
        copied, to_copy = engine.copy_progress(run_id)
        if to_copy:
            copy = self._copies.get(run_id)
            if copy is None:
                copy = self._copies[run_id] = self.progress.add_task("  background copy", total=to_copy,
                                                                     unit="tracks", detail="")
            self.progress.update(copy, total=to_copy, completed=copied, detail=f"{100 * copied / to_copy:.0f}%")


def progress_line(title: str, counts: Mapping[str, int], copy: tuple[int, int]) -> str:
    """Progress for a pipe or a log file: one line whenever the counts change."""
    parts = ", ".join(f"{counts[s]} {s}" for s in machine.STATES if counts.get(s))
    copied, to_copy = copy
    if to_copy:
        parts += f" (background copy {copied:,} of {to_copy:,} tracks, {100 * copied / to_copy:.0f}%)"
    return f"{title}: {parts}"


# --------------------------------------------------------------------------- summaries


def summary_table(summary: RunSummary, site: str) -> Table:
    """The end of a run: result, where it ran, and every failed unit's VMs and real cause."""
    from rich.table import Table
    from rich.text import Text

    ok = summary.state == "succeeded" and summary.verified
    table = Table(title=f"run {summary.run_id}", show_header=False, title_style="bold green" if ok else "bold red")
    table.add_column("what", style="bold", no_wrap=True)
    table.add_column("value", overflow="fold")
    table.add_row("workflow", summary.workflow)
    table.add_row("site", site)
    table.add_row("result", Text(summary.state, style="green" if ok else "red"))
    table.add_row("units", ", ".join(f"{n} {s}" for s, n in sorted(summary.units.items())))
    table.add_row("verified", Text("yes: every target image checked consistent" if summary.verified else "no",
                                   style="green" if summary.verified else "red"))
    table.add_row("elapsed", duration(summary.elapsed))
    for unit, reason in list(summary.failures.items())[:10]:
        vms = ", ".join(summary.vms.get(unit, ())) or "(saved task)"
        table.add_row(Text(f"{vms}", style="red"), f"{reason or 'no reason recorded'} [dim](unit {unit})[/dim]")
    if len(summary.failures) > 10:
        table.add_row("", f"... and {len(summary.failures) - 10} more (flowcopy describe {summary.run_id})")
    return table


def summary_json(summary: RunSummary, site: str) -> dict[str, Any]:
    return {**summary.to_json(), "site": site}


# --------------------------------------------------------------------------- status


@attrs.frozen
class Column:
    key: str
    header: str
    justify: str = "left"
    no_wrap: bool = True


STATUS_COLUMNS: tuple[Column, ...] = (
    Column("run_id", "run (workflow-number-id)"),  # copied into history / describe / cancel
    Column("state", "state"),
    Column("started_at", "started"),
    Column("ended_at", "ended"),
    Column("duration", "duration", justify="right"),
    Column("done", "done", justify="right"),
    Column("units_text", "units", no_wrap=False),
    Column("site", "site", no_wrap=False),
)
"""What `flowcopy status` shows of each row, in order; extend here (and in `status_row`)."""


def status_row(run: RunRow, units: Sequence[UnitRow] | Mapping[str, int], *, now: float | None = None) -> dict[str, Any]:
    """One run as data: the `--json` object and the source of every table cell. `units`:
    the run's units, or just their count per state (`Journal.state_counts`)."""
    now = time.time() if now is None else now
    counts = Counter(units) if isinstance(units, Mapping) else Counter(u.state for u in units)
    done = sum(counts.get(s, 0) for s in machine.TERMINAL)
    end = run.finished
    return {
        "run_id": run.run_id,
        "workflow": run.workflow,
        "state": run.state,
        "cancel_requested": run.cancel_requested,
        "started": run.created,
        "ended": end,
        "started_at": when(run.created),
        "ended_at": when(end) if end is not None else ("running" if run.state == "running" else "-"),
        "duration_s": round((end if end is not None else now) - run.created, 3),
        "duration": duration((end if end is not None else now) - run.created),
        "units": dict(counts),
        "units_text": state_counts(counts.elements()) or ("no units" if run.state != "running" else "planning"),
        "done": f"{done}/{sum(counts.values())}",
        "site": getattr(run, "site", None) or "not recorded",
        "error": getattr(run, "error", None),
    }


def runs_table(rows: Sequence[Mapping[str, Any]], *, title: str = "runs", columns: Sequence[Column] = STATUS_COLUMNS) -> Table:
    from rich.table import Table
    from rich.text import Text

    table = Table(title=title, header_style="bold")
    for col in columns:
        table.add_column(col.header, justify=col.justify, no_wrap=col.no_wrap)  # type: ignore[arg-type]
    for row in rows:
        cells = []
        for col in columns:
            value = str(row.get(col.key, ""))
            if col.key == "state":
                style = "green" if value == "succeeded" else "red" if value in ("failed", "partial", "cancelled") else "yellow"
                cells.append(Text(value, style=style))
            elif col.key == "units_text" and row.get("error"):
                cells.append(Text(f"{value}: {row['error']}"))
            else:
                cells.append(Text(value))
        table.add_row(*cells)
    return table


# --------------------------------------------------------------------------- describe, history


def unit_vms(unit: UnitRow) -> tuple[str, ...]:
    return tuple(unit.data.get("spec", {}).get("vms", ()))


def describe_data(run: RunRow, units: Sequence[UnitRow], events: Sequence[EventRow]) -> dict[str, Any]:
    """Everything about one run, per unit: VMs, disks and pairs, state, attempts, errors,
    freeze window, copy progress, image verdict (like `temporal workflow describe`)."""
    by_unit: dict[str, list[EventRow]] = {}
    for e in events:
        by_unit.setdefault(e.unit_id, []).append(e)
    out_units = []
    for u in units:
        spec = u.data.get("spec", {})
        evs = by_unit.get(u.unit_id, [])
        freeze_at = next((e.time for e in reversed(evs) if e.event == "freeze"), None)
        released_at = next((e.time for e in reversed(evs) if e.event == "released"), None)
        check = u.data.get("check") or {}
        out_units.append({
            "unit": u.unit_id,
            "vms": list(spec.get("vms", ())),
            "state": u.state,
            "disks": [{"vm": d.get("vm"), "disk": d.get("disk"), "target": _target_text(d.get("target") or {})}
                      for d in spec.get("disks", ())],
            "pairs": [{"source": p.get("source"), "target": p.get("target")} for p in u.data.get("pairs", ())],
            "mode": spec.get("mode"),
            "quiesce": spec.get("quiesce"),
            "freeze_attempts": int(u.data.get("freeze_attempts", 0)),
            "freezes_lost": int(u.data.get("freezes_lost", 0)),
            "retries": sum(1 for e in evs if e.event == "redo"),
            "error": u.data.get("error"),
            "last_freeze_problem": u.data.get("last_freeze_problem"),
            "freeze_window_s": round(released_at - freeze_at, 3) if freeze_at and released_at and released_at >= freeze_at else None,
            "frozen_at": freeze_at,
            "copy": _copy_phase(u.state, spec),
            "verified": u.data.get("verified"),
            "check": check or None,
            "exports": [e.get("path") for e in u.data.get("exports", ()) if isinstance(e, dict)],
            "updated": u.updated,
            "events": len(evs),
        })
    return {
        "run_id": run.run_id,
        "workflow": run.workflow,
        "state": run.state,
        "number": run.number,
        "started": run.created,
        "ended": run.finished,
        "site": getattr(run, "site", None),
        "error": getattr(run, "error", None),
        "cancel_requested": run.cancel_requested,
        "units": out_units,
    }


def _copy_phase(state: str, spec: Mapping[str, Any]) -> str:
    """Where the unit's copy stage stands, from its journaled state (the live track count
    is the running engine's: `flowcopy run` shows it as a bar)."""
    action = spec.get("copy_action") or "wait"
    order = machine.FORWARD_PATH
    if state == "copying":
        return f"{action}: in progress"
    if state in order and order.index(state) > order.index("copying"):
        return f"{action}: done"
    if state in ("failed", "cancelled", "compensating"):
        return f"{action}: not completed"
    return f"{action}: not started"


def _target_text(target: Mapping[str, Any]) -> str:
    if target.get("serial"):
        return str(target["serial"])
    if target.get("vm"):
        return f"{target['vm']}:{target.get('disk')}"
    if target.get("rotate"):
        return "rotate " + ",".join(target["rotate"])
    if target.get("pool"):
        return "pool " + ",".join(target["pool"])
    return "-"


def print_describe(console: Console, data: Mapping[str, Any]) -> None:
    from rich.table import Table
    from rich.text import Text

    head = Table(show_header=False, title=f"run {data['run_id']}", title_style="bold")
    head.add_column("what", style="bold", no_wrap=True)
    head.add_column("value", overflow="fold")
    head.add_row("workflow", str(data["workflow"]))
    head.add_row("state", str(data["state"]) + (" (cancel requested)" if data["cancel_requested"] else ""))
    head.add_row("site", str(data.get("site") or "not recorded"))
    head.add_row("started", when(data["started"]))
    head.add_row("ended", when(data["ended"]) if data["ended"] else "still running or left unfinished")
    if data["ended"]:
        head.add_row("duration", duration(data["ended"] - data["started"]))
    if data.get("error"):
        head.add_row(Text("error", style="red"), str(data["error"]))
    head.add_row("units", state_counts(u["state"] for u in data["units"]) or "none")
    console.print(head)
    for u in data["units"]:
        t = Table(show_header=False, title=f"unit {u['unit']}: {', '.join(u['vms']) or 'saved task'}", title_justify="left")
        t.add_column("what", style="bold", no_wrap=True)
        t.add_column("value", overflow="fold")
        style = "green" if u["state"] == "succeeded" else "red" if u["state"] in ("failed", "cancelled", "compensating") else "yellow"
        t.add_row("state", Text(u["state"], style=style))
        t.add_row("mode", f"{u['mode']}, quiesce {u['quiesce']}")
        t.add_row("disks", "; ".join(f"{d['vm']} {d['disk']} -> {d['target']}" for d in u["disks"]) or "-")
        t.add_row("pairs", "; ".join(f"{p['source']} -> {p['target']}" for p in u["pairs"]) or "not prepared yet")
        t.add_row("attempts", f"{u['freeze_attempts']} freeze(s), {u['freezes_lost']} lost, {u['retries']} redo(s)")
        t.add_row("freeze window", duration(u["freeze_window_s"]) if u["freeze_window_s"] is not None else "-")
        t.add_row("copy", str(u["copy"]))
        verdict = u["verified"]
        t.add_row("image", "verified consistent" if verdict is True else "NOT consistent" if verdict is False else "not checked yet")
        if u["check"] and u["check"].get("problems"):
            t.add_row("check", "; ".join(u["check"]["problems"]))
        if u["exports"]:
            t.add_row("exports", ", ".join(u["exports"]))
        if u["error"]:
            t.add_row(Text("error", style="red"), str(u["error"]))
        if u["last_freeze_problem"]:
            t.add_row("last freeze problem", str(u["last_freeze_problem"]))
        t.add_row("events", f"{u['events']} (flowcopy history {data['run_id']})")
        console.print(t)


def print_history(console: Console, events: Sequence[EventRow], vms: Mapping[str, Sequence[str]]) -> None:
    """Every event with the unit's VMs beside its id. On a terminal a table whose detail
    column folds; on a pipe one plain tab-separated line per event, whole, for grep/awk."""
    from rich.table import Table

    start = min((e.time for e in events), default=0.0)
    if not console.is_terminal:
        out = console.file
        out.write("unit\tvm\tseq\tat_s\tfrom\tevent\tto\tdetail\n")
        for e in events:
            detail = ", ".join(f"{k}={v}" for k, v in e.payload.items()) if e.payload else ""
            out.write("\t".join([e.unit_id.rsplit("/", 1)[-1], ",".join(vms.get(e.unit_id, ())), str(e.seq),
                                  f"{e.time - start:.3f}", e.from_state, e.event, e.to_state, detail]) + "\n")
        return

    table = Table(title="events", header_style="bold")
    table.add_column("unit", no_wrap=True)
    table.add_column("vm", no_wrap=True)
    for col in ("seq", "at (s)", "from", "event", "to"):
        table.add_column(col, justify="right" if col in ("at (s)", "seq") else "left", no_wrap=True)
    table.add_column("detail", overflow="fold")
    for e in events:
        detail = ", ".join(f"{k}={v}" for k, v in e.payload.items()) if e.payload else ""
        table.add_row(e.unit_id.rsplit("/", 1)[-1], ",".join(vms.get(e.unit_id, ())), str(e.seq),
                      f"{e.time - start:.3f}", e.from_state, e.event, e.to_state, detail)
    console.print(table)


def print_bench(results: Mapping[str, Any], console: Console | None = None) -> None:
    """The benchmark figures as one table per area."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    j, e, one, r, s, m = (results.get(k, {}) for k in ("journal", "engine", "freeze_window_1vm", "recovery", "site", "memory"))
    table = Table(title="flowcopy bench", header_style="bold", show_lines=False)
    table.add_column("figure")
    table.add_column("value", justify="right")
    rows = [
        ("journal: durable moves/s, group commit", j.get("group_commit", {}).get("moves_per_s")),
        ("journal: moves per transaction", j.get("group_commit", {}).get("moves_per_transaction")),
        ("journal: durable moves/s, one commit per move", j.get("one_commit_per_move", {}).get("moves_per_s")),
        ("journal: group commit / one per move", f"{j.get('ratio')}x"),
        ("disk: raw write+fsync/s", j.get("raw_fsync_per_s")),
        (f"engine: {e.get('vms')} VMs end to end, seconds", e.get("seconds")),
        ("engine: VMs/s", e.get("vms_per_s")),
        ("engine: all succeeded and verified", f"{e.get('succeeded')} / {e.get('verified')}"),
        (f"engine: peak traced KiB per in-flight unit ({m.get('vms')} VMs)", m.get("peak_kib_per_unit")),
        (f"freeze window p50 / p99, {e.get('vms')} VMs (ms)", f"{e.get('freeze_window_p50_ms')} / {e.get('freeze_window_p99_ms')}"),
        ("freeze window, 1 VM (ms)", one.get("freeze_window_p50_ms")),
        (f"recovery: {r.get('in_flight_units')} unfinished units, each moving again (s)", r.get("reconciled_s")),
        (f"recovery: {r.get('acting_units')} with a side effect in flight reconciled (s)", r.get("acting_reconciled_s")),
        ("recovery: resume to all done (s)", r.get("resume_to_done_s")),
        ("site: establish 1 GiB / 1 TiB (us)", f"{s.get('establish_1GiB_us')} / {s.get('establish_1TiB_us')}"),
        ("site: copy-on-write overhead per source write (us)", s.get("cow_overhead_us")),
        ("engine: CPU seconds / peak RSS MiB", f"{e.get('cpu_s')} / {e.get('peak_rss_mib')}"),
    ]
    for key in ("freeze_window_1000", "freeze_window_10000"):
        if key in results:
            w = results[key]
            rows.append((f"freeze window p50 / p99, {w['vms']} VMs (ms)", f"{w['freeze_window_p50_ms']} / {w['freeze_window_p99_ms']}"))
    if "recovery_10000" in results:
        w = results["recovery_10000"]
        rows.append((f"recovery: all {w['in_flight_units']} units in flight reconciled, p50 / max (s)",
                     f"{w['acting_reconciled_p50_s']} / {w['acting_reconciled_s']}"))
    for name, value in rows:
        table.add_row(name, str(value))
    console.print(table)
