"""How runs look to a person: the live progress view and the summaries (rich).

States and their order come from `machine.STAGES`; nothing here lists states by hand.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from rich.console import Console, Group
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from flowcopy import machine
from flowcopy.engine import RunSummary
from flowcopy.journal import RunRow, UnitRow


def progress_table(title: str, counts: Mapping[str, int], total: int, copy: tuple[int, int] = (0, 0)) -> Group:
    """Units per state in table order, with a bar of how far along the forward path they are."""
    done = sum(counts.get(s, 0) for s in machine.TERMINAL)
    weighted = sum(machine.STAGES[s].progress * n for s, n in counts.items() if s in machine.STAGES)
    table = Table(title=title, show_header=True, header_style="bold", expand=False)
    table.add_column("state")
    table.add_column("units", justify="right")
    table.add_column("meaning", style="dim")
    for state in machine.STATES:
        n = counts.get(state, 0)
        if n:
            style = "green" if state == "succeeded" else "red" if state in ("failed", "compensating") else None
            table.add_row(Text(state, style=style or ""), str(n), machine.STAGES[state].description)
    bar = ProgressBar(total=max(total, 1), completed=min(weighted, total), width=50)
    parts: list[Any] = [table, Text(f"{done}/{total} units finished"), bar]
    copied, to_copy = copy
    if to_copy:
        parts += [
            Text(f"background copy: {copied:,} of {to_copy:,} tracks ({100 * copied / to_copy:.0f}%)"),
            ProgressBar(total=to_copy, completed=copied, width=50),
        ]
    return Group(*parts)


def summary_table(summary: RunSummary) -> Table:
    ok = summary.state == "succeeded" and summary.verified
    table = Table(title=f"run {summary.run_id}", show_header=False, title_style="bold green" if ok else "bold red")
    table.add_column("what", style="bold")
    table.add_column("value")
    table.add_row("workflow", summary.workflow)
    table.add_row("result", Text(summary.state, style="green" if ok else "red"))
    table.add_row("units", ", ".join(f"{n} {s}" for s, n in sorted(summary.units.items())))
    table.add_row("verified", Text("yes: every target image checked consistent" if summary.verified else "no", style="green" if summary.verified else "red"))
    table.add_row("elapsed", f"{summary.elapsed:.2f} s")
    for unit, reason in list(summary.failures.items())[:10]:
        table.add_row(Text(unit, style="red"), reason)
    if len(summary.failures) > 10:
        table.add_row("", f"... and {len(summary.failures) - 10} more")
    return table


def runs_table(runs: Sequence[RunRow], units_by_run: Mapping[str, Sequence[UnitRow]]) -> Table:
    table = Table(title="runs", header_style="bold")
    table.add_column("run (workflow-number-id)", no_wrap=True)  # copied into `history` / `cancel`
    table.add_column("state", no_wrap=True)
    table.add_column("units")
    table.add_column("done", no_wrap=True, justify="right")
    for run in runs:
        units = units_by_run.get(run.run_id, [])
        counts = Counter(u.state for u in units)
        done = sum(counts.get(s, 0) for s in machine.TERMINAL)
        table.add_row(
            run.run_id,
            run.state,
            ", ".join(f"{n} {s}" for s, n in sorted(counts.items(), key=lambda kv: machine.STAGES[kv[0]].index)),
            f"{done}/{len(units)}",
        )
    return table


def status_json(runs: Sequence[RunRow], units_by_run: Mapping[str, Sequence[UnitRow]]) -> list[dict[str, Any]]:
    return [
        {
            "run_id": r.run_id,
            "workflow": r.workflow,
            "state": r.state,
            "cancel_requested": r.cancel_requested,
            "units": dict(Counter(u.state for u in units_by_run.get(r.run_id, []))),
        }
        for r in runs
    ]


def print_history(console: Console, events: Sequence[Any]) -> None:
    table = Table(title="events", header_style="bold")
    for col in ("unit", "seq", "at (s)", "from", "event", "to", "detail"):
        table.add_column(col, justify="right" if col == "at (s)" else "left")
    start = min((e.time for e in events), default=0.0)
    for e in events:
        detail = ", ".join(f"{k}={v}" for k, v in e.payload.items()) if e.payload else ""
        table.add_row(e.unit_id.rsplit("/", 1)[-1], str(e.seq), f"{e.time - start:.3f}", e.from_state, e.event,
                      e.to_state, detail[:120])
    console.print(table)


def print_bench(results: Mapping[str, Any], console: Console | None = None) -> None:
    """The benchmark figures as one table per area."""
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
        (f"recovery: {r.get('in_flight_units')} in-flight units reconciled (s)", r.get("reconciled_s")),
        ("recovery: resume to all done (s)", r.get("resume_to_done_s")),
        ("site: establish 1 GiB / 1 TiB (us)", f"{s.get('establish_1GiB_us')} / {s.get('establish_1TiB_us')}"),
        ("site: copy-on-write overhead per source write (us)", s.get("cow_overhead_us")),
    ]
    for name, value in rows:
        table.add_row(name, str(value))
    console.print(table)
