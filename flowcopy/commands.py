"""The bodies of the engine's CLI commands: trio runs, progress views, exit codes.

Kept out of `cli.py` so the CLI stays a parser; kept out of `runner.py` so the library
has no terminal in it. Every error an admin can act on becomes one line and exit 2.
"""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio
from rich.console import Console
from rich.live import Live

from flowcopy import logs, runner, views
from flowcopy.engine import Engine, EngineStopped, RunSummary
from flowcopy.journal import Journal, JournalCorrupt, JournalError
from flowcopy.planning import PlanError
from flowcopy.site.api import SiteError

EXPECTED = (JournalError, SiteError, OSError, PlanError)
STOPPED = 3
"""Exit code of a clean stop by SIGTERM/SIGINT: nothing frozen, `flowcopy resume` continues."""


def _err(message: str) -> int:
    print(f"flowcopy: {message}", file=sys.stderr)
    return 2


def _expected_errors() -> tuple[type[BaseException], ...]:
    from flowcopy.definitions import DefinitionError
    from flowcopy.site.inventory import LabError
    from flowcopy.site.persist import StateError

    return (*EXPECTED, DefinitionError, LabError, StateError)


def _format(exc: BaseException) -> str:
    from flowcopy.definitions import DefinitionError

    if isinstance(exc, DefinitionError):
        return "\n".join(p.format() if hasattr(p, "format") else str(p) for p in exc.problems)
    if isinstance(exc, SiteError):
        return f"site: {exc.kind}: {exc.message}"
    return str(exc)


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for e in exc.exceptions for leaf in _leaves(e)]
    return [exc]


def _run_trio(fn: Callable[[], Any]) -> tuple[Any, int | None]:
    """Run `fn` under trio; an expected error (even inside nurseries' groups) is one line."""
    try:
        return trio.run(fn), None
    except KeyboardInterrupt:
        return None, _err("interrupted; `flowcopy resume` finishes what was in flight")
    except BaseException as exc:
        leaves = [e for e in _leaves(exc) if not isinstance(e, trio.Cancelled)]
        if any(isinstance(e, KeyboardInterrupt) for e in leaves):
            return None, _err("stopped at once; `flowcopy resume` reconciles what was in flight")
        if leaves and all(isinstance(e, EngineStopped) for e in leaves):
            print(f"flowcopy: {leaves[0]}", file=sys.stderr)
            return None, STOPPED
        expected = [e for e in leaves if isinstance(e, _expected_errors())]
        if not expected or len(expected) != len(leaves):
            raise
        return None, _err("\n".join(dict.fromkeys(_format(e) for e in expected)))


def run(file: Path, store: Path, *, site_url: str | None, token_file: str | None, as_json: bool, speed: float, lab: str | None) -> int:
    console = Console(stderr=True)
    live_view = console.is_terminal and not as_json
    # --json: every transition as a JSON log line on stderr (for machines); otherwise
    # only warnings, and progress as a live table (terminal) or plain lines (a pipe)
    logs.configure(json=not console.is_terminal, level="info" if as_json else "warning")
    state: dict[str, Any] = {}

    def on_engine(engine: Engine, run_id: str | None) -> None:
        state["engine"], state["run_id"] = engine, run_id

    async def main() -> tuple[list[RunSummary], RunSummary]:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stop_on_signals, state)
            if live_view:
                nursery.start_soon(_live_progress, console, state, file.name)
            elif not as_json:
                nursery.start_soon(_line_progress, state, file.name)
            result = await runner.run_file(
                file, store=store, site_url=site_url, token_file=token_file, lab=lab, speed=speed, on_engine=on_engine
            )
            nursery.cancel_scope.cancel()
            return result

    result, code = _run_trio(main)
    if code is not None:
        return code
    resumed, summary = result
    out = Console()
    if as_json:
        print(json.dumps(summary.to_json()))
    else:
        for s in resumed:
            out.print(f"resumed run {s.run_id}: {s.state}")
        out.print(views.summary_table(summary))
    return 0 if summary.state == "succeeded" and summary.verified else 1


async def _stop_on_signals(state: dict[str, Any]) -> None:
    """First SIGINT/SIGTERM: a clean stop (freeze windows finish their release, nothing new
    starts). A second one: stop at once, like a crash; `flowcopy resume` reconciles."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            engine: Engine | None = state.get("engine")
            if engine is None or state.get("stopping"):
                raise KeyboardInterrupt
            state["stopping"] = True
            print("flowcopy: stopping cleanly (freeze windows finish their release); "
                  "signal again to stop at once", file=sys.stderr, flush=True)
            engine.stop()


async def _live_progress(console: Console, state: dict[str, Any], title: str) -> None:
    with Live(console=console, refresh_per_second=8, transient=False) as live:
        while True:
            engine: Engine | None = state.get("engine")
            run_id = state.get("run_id")
            if engine is not None:
                counts = engine.progress(run_id)
                total = sum(counts.values())
                label = f"{title} — run {run_id}" if run_id else f"{title} — resuming"
                if total:
                    live.update(views.progress_table(label, counts, total, engine.copy_progress(run_id)))
            await trio.sleep(0.125)


async def _line_progress(state: dict[str, Any], title: str) -> None:
    """Progress for a pipe or a log file: one line whenever the counts change."""
    from flowcopy import machine

    last: dict[str, int] = {}
    while True:
        engine: Engine | None = state.get("engine")
        run_id = state.get("run_id")
        if engine is not None and run_id:
            counts = engine.progress(run_id)
            if counts and counts != last:
                parts = ", ".join(f"{counts[s]} {s}" for s in machine.STATES if counts.get(s))
                copied, to_copy = engine.copy_progress(run_id)
                if to_copy:
                    parts += f" (background copy {100 * copied / to_copy:.0f}%)"
                print(f"{title}: {parts}", file=sys.stderr, flush=True)
                last = counts
        await trio.sleep(0.25)


def resume(store: Path, *, site_url: str | None, token_file: str | None, as_json: bool) -> int:
    logs.configure(level="info")
    state: dict[str, Any] = {}

    def on_engine(engine: Engine, run_id: str | None) -> None:
        state["engine"] = engine

    async def main() -> list[RunSummary]:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stop_on_signals, state)
            result = await runner.resume_store(store=store, site_url=site_url, token_file=token_file, on_engine=on_engine)
            nursery.cancel_scope.cancel()
            return result

    result, code = _run_trio(main)
    if code is not None:
        return code
    if as_json:
        print(json.dumps([s.to_json() for s in result]))
    else:
        if not result:
            print("nothing to resume")
        for s in result:
            Console().print(views.summary_table(s))
    return 0 if all(s.state == "succeeded" for s in result) else 1


def _read_journal(store: Path) -> Journal | int:
    if not (store / "journal.sqlite").exists():
        return _err(f"{store}: no journal here (nothing has run with this store)")
    try:
        return Journal.open(store, lock=False)
    except (JournalCorrupt, OSError) as exc:
        return _err(str(exc))


def status(store: Path, *, as_json: bool) -> int:
    journal = _read_journal(store)
    if isinstance(journal, int):
        return journal
    try:
        runs = journal.runs()
        units = {r.run_id: journal.units(r.run_id) for r in runs}
    finally:
        journal.close()
    if as_json:
        print(json.dumps(views.status_json(runs, units)))
    else:
        Console().print(views.runs_table(runs, units))
        from flowcopy.scheduler import PauseStateError, read_paused

        try:
            paused = read_paused(store)
        except PauseStateError as exc:
            print(f"pause state unreadable: {exc}")
        else:
            if paused:
                print(f"paused workflows (flowcopy unpause NAME): {', '.join(sorted(paused))}")
    return 0


def history(store: Path, run_id: str, *, as_json: bool) -> int:
    journal = _read_journal(store)
    if isinstance(journal, int):
        return journal
    try:
        known = {r.run_id for r in journal.runs()}
        if run_id not in known:
            return _err(f"no run {run_id!r} in {store} (runs: {', '.join(sorted(known)[-5:]) or 'none'})")
        events = journal.events(run_id=run_id)
    finally:
        journal.close()
    if as_json:
        print(json.dumps([{"unit": e.unit_id, "seq": e.seq, "from": e.from_state, "event": e.event, "to": e.to_state, "payload": e.payload, "time": e.time} for e in events]))
    else:
        views.print_history(Console(), events)
    return 0


def cancel(store: Path, run_id: str) -> int:
    journal = _read_journal(store)
    if isinstance(journal, int):
        return journal
    try:
        known = {r.run_id: r for r in journal.runs()}
        if run_id not in known:
            return _err(f"no run {run_id!r} in {store}")
        if known[run_id].state != "running":
            return _err(f"run {run_id} already ended: {known[run_id].state}")
        journal.request_cancel_sync(run_id)
    finally:
        journal.close()
    print(f"cancel requested for {run_id}; the engine compensates its units (thaw, unfreeze, withdraw)")
    return 0


DEMO_WORKFLOWS = ("10-w2k-e-drive.yaml", "20-sql-consistency-group.yaml", "30-nightly-nocopy-export.yaml")


def demo_workflows() -> list[Path]:
    """The seed's scenarios from the checkout's workflows/ folder."""
    folder = Path(__file__).resolve().parent.parent / "workflows"
    return [folder / name for name in DEMO_WORKFLOWS]


def demo(store: Path, *, speed: float) -> int:
    """Run the demo workflows one after the other in `store`; 0 only if all verified."""
    console = Console()
    worst = 0
    for path in demo_workflows():
        if not path.exists():
            return _err(f"{path}: demo workflow missing (run the demo from a checkout)")
        console.rule(f"flowcopy run {path.name}")
        code = run(path, store, site_url=None, token_file=None, as_json=False, speed=speed, lab=None)
        worst = max(worst, code)
    console.rule("result")
    console.print(
        "[green]every backup succeeded and every target image verified[/green]" if worst == 0
        else "[red]some backups did not succeed or verify: see above[/red]"
    )
    console.print(f"journal and site state are in {store}/ — try `flowcopy status --store {store}`")
    return worst


# ---- serve, pause, unpause ----------------------------------------------------------


def serve(folder: Path, store: Path, *, site_url: str | None, token_file: str | None, speed: float) -> int:
    """`flowcopy serve`: JSON log lines on stderr; 0 after a clean stop (what was left in
    flight is said in one line), 2 with one line if it cannot start."""
    from flowcopy import scheduler

    if speed <= 0:
        return _err(f"--speed must be a positive number, not {speed}")
    logs.configure(json=True, level="info")
    try:
        report, code = _run_trio(lambda: scheduler.serve(folder, store=store, site_url=site_url, token_file=token_file, speed=speed))
    except BaseException as exc:
        leaves = [e for e in _leaves(exc) if isinstance(e, scheduler.ServeError | scheduler.PauseStateError)]
        if not leaves or len(leaves) != len(_leaves(exc)):
            raise
        return _err(str(leaves[0]))
    if code is not None:
        return code
    print(f"flowcopy: {report.message()}", file=sys.stderr)
    return 0


def pause(store: Path, name: str, paused: bool) -> int:
    from flowcopy import scheduler

    try:
        changed = scheduler.pause(store, name, paused)
    except (scheduler.PauseStateError, OSError) as exc:
        return _err(str(exc))
    word = "paused" if paused else "unpaused"
    print(f"{name} {word}" + ("" if changed else " already") + "; a running `flowcopy serve` sees it at the next fire")
    return 0
