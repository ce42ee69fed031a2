"""The bodies of the engine's CLI commands: trio runs, progress views, exit codes.

Kept out of `cli.py` so the CLI stays a parser; kept out of `runner.py` so the library
has no terminal in it. Every error an admin can act on becomes one line and exit 2, and
the line names the remedy (which token file was used, how to start a site...).

Imports of the engine, trio and rich happen inside the functions: `status` and
`history` read the journal and print, and must start in well under half a second.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console

    from flowcopy.engine import Engine, RunSummary
    from flowcopy.journal import Journal

OK, FAILED, USAGE, STOPPED = 0, 1, 2, 3
"""Exit codes: 0 done (every backup succeeded and verified), 1 a run ended but not every
unit succeeded and verified, 2 nothing done (bad input, unreachable site, locked store...:
one line says why and what to do), 3 a clean stop by SIGTERM/SIGINT (`flowcopy resume`
continues)."""


def _err(message: str) -> int:
    print(f"flowcopy: {message}", file=sys.stderr)
    return USAGE


def _console(*, stderr: bool = False) -> Console:
    """A console that never cuts a line on a pipe (`history | grep` sees whole reasons)."""
    from rich.console import Console

    probe = Console(stderr=stderr)
    if probe.is_terminal:
        return probe
    return Console(stderr=stderr, width=max(probe.width, 250), soft_wrap=False)


def _expected_errors() -> tuple[type[BaseException], ...]:
    from flowcopy.catalog import UnknownWorkflow
    from flowcopy.definitions import DefinitionError
    from flowcopy.journal import JournalError
    from flowcopy.planning import PlanError
    from flowcopy.site.api import SiteError
    from flowcopy.site.inventory import LabError
    from flowcopy.site.persist import StateError

    return (JournalError, SiteError, OSError, PlanError, DefinitionError, LabError, StateError, UnknownWorkflow)


def _format(exc: BaseException, site: Sequence[str | None] = (None, None)) -> str:
    """One line per error, with the remedy where flowcopy knows it."""
    from flowcopy.definitions import DefinitionError
    from flowcopy.site.api import SiteError

    if isinstance(exc, DefinitionError):
        return "\n".join(p.format() if hasattr(p, "format") else str(p) for p in exc.problems)
    if isinstance(exc, SiteError):
        url, token_file = site
        text = f"site: {exc.kind}: {exc.message}"
        if exc.kind == "unauthorized":
            used = token_file or os.environ.get("FLOWCOPY_SITE_TOKEN_FILE")
            text += (f"; the token came from {used}" if used else "; no token file was given") + (
                "; a served site keeps its token in STATE/token (the --state folder of `flowcopy site serve`, "
                "which prints the path when it creates it): pass that file with --token-file or $FLOWCOPY_SITE_TOKEN_FILE")
        elif exc.kind == "site_unavailable":
            text += ("; is the site running? start one with `flowcopy site serve --state DIR --port PORT` "
                     "(it prints its URL and token file), or leave out --site/$FLOWCOPY_SITE to use the embedded model")
        return text
    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.strerror or exc}: {exc.filename}"
    return str(exc)


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for e in exc.exceptions for leaf in _leaves(e)]
    return [exc]


def _run_trio(fn: Callable[[], Any], site: Sequence[str | None] = (None, None)) -> tuple[Any, int | None]:
    """Run `fn` under trio; an expected error (even inside nurseries' groups) is one line."""
    import trio

    try:
        return trio.run(fn), None
    except KeyboardInterrupt:
        return None, _err("interrupted; `flowcopy resume` finishes what was in flight")
    except BaseException as exc:
        from flowcopy.engine import EngineStopped  # here: read-only commands start without the engine

        leaves = [e for e in _leaves(exc) if not isinstance(e, trio.Cancelled)]
        if any(isinstance(e, KeyboardInterrupt) for e in leaves):
            return None, _err("stopped at once; `flowcopy resume` reconciles what was in flight")
        if leaves and all(isinstance(e, EngineStopped) for e in leaves):
            print(f"flowcopy: {leaves[0]}", file=sys.stderr)
            return None, STOPPED
        expected = [e for e in leaves if isinstance(e, _expected_errors())]
        if not expected or len(expected) != len(leaves):
            raise
        return None, _err("\n".join(dict.fromkeys(_format(e, site) for e in expected)))


# ---- run, resume -----------------------------------------------------------------------


def run(file: Path, store: Path, *, site_url: str | None, token_file: str | None, as_json: bool, speed: float,
        lab: str | None) -> int:
    import trio

    from flowcopy import logs, runner, views

    console = _console(stderr=True)
    live_view = console.is_terminal and not as_json
    # --json: every transition as a JSON log line on stderr (for machines); otherwise
    # only warnings, and progress as bars (terminal) or plain lines (a pipe)
    logs.configure(json=not console.is_terminal, level="info" if as_json else "warning")
    state: dict[str, Any] = {"site": runner.site_label(store, site_url)}

    def on_engine(engine: Engine, run_id: str | None) -> None:
        state["engine"], state["run_id"] = engine, run_id

    def on_site(label: str) -> None:
        state["site"] = label

    async def main() -> tuple[list[RunSummary], RunSummary]:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stop_on_signals, state)
            if live_view:
                nursery.start_soon(_live_progress, console, state, file.stem)
            elif not as_json:
                nursery.start_soon(_line_progress, state, file.name)
            result = await runner.run_file(file, store=store, site_url=site_url, token_file=token_file, lab=lab,
                                           speed=speed, on_engine=on_engine, on_site=on_site)
            await trio.sleep(0.13 if live_view else 0)  # one last frame of the bars
            nursery.cancel_scope.cancel()
            return result

    try:
        result, code = _run_trio(main, (site_url, token_file))
    finally:
        if live_view:
            logs.configure(json=False, level="warning")  # the live console is gone
    if code is not None:
        return code
    resumed, summary = result
    if as_json:
        print(json.dumps(views.summary_json(summary, state["site"])))
    else:
        out = _console()
        for s in resumed:
            out.print(f"resumed run {s.run_id}: {s.state} (site: {state['site']})")
        out.print(views.summary_table(summary, state["site"]))
    return OK if summary.state == "succeeded" and summary.verified else FAILED


async def _stop_on_signals(state: dict[str, Any]) -> None:
    """First SIGINT/SIGTERM: a clean stop (freeze windows finish their release, nothing new
    starts). A second one: stop at once, like a crash; `flowcopy resume` reconciles."""
    import signal

    import trio

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
    import trio

    from flowcopy import logs, views

    with views.LiveView(console, title) as view:
        logs.configure(json=False, level="warning", console=view.progress.console)
        try:
            while True:
                view.update(state.get("engine"))
                await trio.sleep(0.125)
        finally:
            view.update(state.get("engine"))


async def _line_progress(state: dict[str, Any], title: str) -> None:
    """Progress for a pipe or a log file: one line whenever the counts change."""
    import trio

    from flowcopy import views

    last: dict[str, int] = {}
    while True:
        engine: Engine | None = state.get("engine")
        run_id = state.get("run_id")
        if engine is not None and run_id:
            counts = engine.progress(run_id)
            if counts and counts != last:
                print(views.progress_line(title, counts, engine.copy_progress(run_id)), file=sys.stderr, flush=True)
                last = counts
        await trio.sleep(0.25)


def resume(store: Path, *, site_url: str | None, token_file: str | None, as_json: bool) -> int:
    import trio

    from flowcopy import logs, runner, views

    if not _has_journal(store):
        return _err(f"{store}: no flowcopy store here, nothing to resume (not creating one); "
                    "name the store with --store DIR or $FLOWCOPY_STORE")
    logs.configure(level="info")
    state: dict[str, Any] = {"site": runner.site_label(store, site_url)}

    def on_engine(engine: Engine, run_id: str | None) -> None:
        state["engine"] = engine

    async def main() -> list[RunSummary]:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stop_on_signals, state)
            result = await runner.resume_store(store=store, site_url=site_url, token_file=token_file, on_engine=on_engine,
                                               on_site=lambda label: state.__setitem__("site", label))
            nursery.cancel_scope.cancel()
            return result

    result, code = _run_trio(main, (site_url, token_file))
    if code is not None:
        return code
    if as_json:
        print(json.dumps([views.summary_json(s, state["site"]) for s in result]))
    else:
        if not result:
            print(f"nothing to resume in {store} (site: {state['site']})")
        for s in result:
            _console().print(views.summary_table(s, state["site"]))
    return OK if all(s.state == "succeeded" for s in result) else FAILED


# ---- status, history, describe, cancel --------------------------------------------------


def _has_journal(store: Path) -> bool:
    return (store / "journal.sqlite").exists()


def _read_journal(store: Path) -> Journal | int:
    from flowcopy.journal import Journal, JournalError, is_url

    if is_url(store):
        try:
            return Journal.open(store, lock=False)
        except JournalError as exc:
            return _err(str(exc))
    if not _has_journal(store):
        return _err(f"{store}: no journal here (nothing has run with this store; another store: --store DIR or $FLOWCOPY_STORE)")
    try:
        return Journal.open(store, lock=False)
    except (JournalError, OSError) as exc:
        return _err(str(exc))


def _check_run(journal: Journal, store: Path, run_id: str) -> int | None:
    """None when `run_id` is in the journal, else the exit code of the one-line refusal."""
    known = [r.run_id for r in sorted(journal.runs(), key=lambda r: r.created)]
    return None if run_id in known else _unknown_run(store, run_id, known)


def _unknown_run(store: Path, run_id: str, known: Sequence[str]) -> int:
    from flowcopy.catalog import did_you_mean

    recent = ", ".join(list(known)[-5:]) or "none"
    return _err(f"no run {run_id!r} in {store}{did_you_mean(run_id, known)} (latest runs: {recent}; see `flowcopy status`)")


def parse_since(text: str, now: float | None = None) -> float:
    """`--since`: a duration back from now (90m, 2h, 3d, 1w) or a date/time (ISO 8601)."""
    import re
    import time
    from datetime import datetime

    now = time.time() if now is None else now
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text)
    if match:
        scale = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[match.group(2)]
        return now - float(match.group(1)) * scale
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"--since {text!r}: give a duration (30m, 12h, 2d, 1w) or a date/time "
                         "(2026-12-01 or 2026-12-01T22:00)") from None
    if moment.tzinfo is None:
        moment = moment.astimezone()  # local time, as the admin typed it
    return moment.timestamp()


def status(store: Path, *, as_json: bool, workflow: str | None = None, state: str | None = None,
           since: str | None = None, limit: int = 20) -> int:
    from flowcopy import views

    try:
        after = parse_since(since) if since else None
    except ValueError as exc:
        return _err(str(exc))
    journal = _read_journal(store)
    if isinstance(journal, int):
        return journal
    from flowcopy import cluster_commands
    from flowcopy.journal import JournalError, local_dir

    try:
        runs = journal.runs(workflow)
        known_workflows = sorted({r.workflow for r in journal.runs()}) if workflow and not runs else []
        runs = [r for r in runs if (state is None or r.state == state) and (after is None or r.created >= after)]
        runs.sort(key=lambda r: r.created)
        shown = runs[-limit:] if limit > 0 else runs
        rows = [views.status_row(r, journal.state_counts(r.run_id)) for r in shown]
        leases = cluster_commands.lease_rows(journal)
        rpos = []
        if any(r.definition.get("rpo") for r in journal.runs()):  # the catalog (and trio) only when asked for
            from flowcopy.backups.commands import rpo_summary

            rpos = rpo_summary(journal)  # each VM's newest verified backup against its RPO
    except JournalError as exc:  # a damaged row: one line
        return _err(str(exc))
    finally:
        journal.close()
    paused, paused_error = _paused(local_dir(store))
    if as_json:
        for entry in rows if leases else []:  # shared journals: who holds each unfinished unit
            entry["leases"] = cluster_commands.leases_json([r for r in leases if r.run_id == entry["run_id"]])
        print(json.dumps(rows))
        return OK
    if workflow and known_workflows:
        from flowcopy.catalog import did_you_mean

        print(f"no run of workflow {workflow!r}{did_you_mean(workflow, known_workflows)}", file=sys.stderr)
    console = _console()
    hidden = len(runs) - len(shown)
    title = f"runs in {store}" + (f" (latest {len(shown)} of {len(runs)}; --limit 0 shows all)" if hidden else "")
    console.print(views.runs_table(rows, title=title))
    cluster_commands.print_leases(leases)
    for r in rpos:
        print(("RPO " if r.past else "rpo ") + r.line())
    unfinished = [r["run_id"] for r in rows if r["state"] == "running"]
    if unfinished:
        from flowcopy.journal import is_url, read_lock_holder

        holder = None if is_url(store) else read_lock_holder(store)
        if is_url(store):
            console.print(f"{len(unfinished)} run(s) not finished: {', '.join(unfinished)} (the engines above hold "
                          "their units; with none live, run `flowcopy resume`)", soft_wrap=True)
        elif holder is not None:
            pid, started = holder
            console.print(f"{len(unfinished)} run(s) in progress: {', '.join(unfinished)} (engine pid {pid}"
                          f"{f', started {started}' if started else ''} holds the store)", soft_wrap=True)
        else:
            console.print(f"{len(unfinished)} run(s) not finished: {', '.join(unfinished)}. No engine holds the store: "
                          "run `flowcopy resume` to finish them.", soft_wrap=True)
    if paused_error:
        print(f"pause state unreadable: {paused_error}")
    elif paused:
        print(f"paused workflows (flowcopy unpause NAME): {', '.join(sorted(paused))}")
    return OK


def _paused(store: Path) -> tuple[frozenset[str], str | None]:
    from flowcopy.pausing import PauseStateError, read_paused

    try:
        return read_paused(store), None
    except PauseStateError as exc:
        return frozenset(), str(exc)


def _read_run(store: Path, run_id: str, read: Callable[[Journal], Any]) -> tuple[Any, int | None]:
    """`read(journal)` on the read-only view, once `run_id` is known to be there; the
    journal is closed before anything is printed. Returns (what it read, None) or
    (None, the exit code of the one-line refusal)."""
    from flowcopy.journal import JournalError

    journal = _read_journal(store)
    if isinstance(journal, int):
        return None, journal
    try:
        if (refused := _check_run(journal, store, run_id)) is not None:
            return None, refused
        return read(journal), None
    except JournalError as exc:
        return None, _err(str(exc))
    finally:
        journal.close()


def history(store: Path, run_id: str, *, as_json: bool) -> int:
    from flowcopy import views

    read, refused = _read_run(store, run_id, lambda journal: (
        journal.events(run_id=run_id), {u.unit_id: views.unit_vms(u) for u in journal.units(run_id)}))
    if refused is not None:
        return refused
    events, vms = read
    if as_json:
        print(json.dumps([{"unit": e.unit_id, "vms": list(vms.get(e.unit_id, ())), "seq": e.seq, "from": e.from_state,
                           "event": e.event, "to": e.to_state, "payload": e.payload, "time": e.time} for e in events]))
    else:
        views.print_history(_console(), events, vms)
    return OK


def describe(store: Path, run_id: str, *, as_json: bool) -> int:
    from flowcopy import views

    data, refused = _read_run(store, run_id, lambda journal: views.describe_data(
        journal.run(run_id), journal.units(run_id), journal.events(run_id=run_id)))
    if refused is not None:
        return refused
    if as_json:
        print(json.dumps(data))
    else:
        views.print_describe(_console(), data)
    return OK


def cancel(store: Path, run_id: str) -> int:
    from flowcopy.journal import JournalError

    journal = _read_journal(store)
    if isinstance(journal, int):
        return journal
    try:
        known = {r.run_id: r for r in journal.runs()}
        if run_id not in known:
            return _unknown_run(store, run_id, sorted(known, key=lambda k: known[k].created))
        if known[run_id].state != "running":
            return _err(f"run {run_id} already ended: {known[run_id].state}")
        journal.request_cancel_sync(run_id)
    except JournalError as exc:
        return _err(str(exc))
    finally:
        journal.close()
    print(f"cancel requested for {run_id}; the engine compensates its units (thaw, unfreeze, withdraw)")
    return OK


def run_ids(store: Path) -> list[str]:
    """Run ids of the store, newest first (shell completion); none if there is no journal."""
    if not _has_journal(store):
        return []
    from flowcopy.journal import Journal

    try:
        journal = Journal.open(store, lock=False)
    except Exception:  # noqa: BLE001 - completion must never print a traceback into a shell
        return []
    try:
        return [r.run_id for r in sorted(journal.runs(), key=lambda r: r.created, reverse=True)]
    finally:
        journal.close()


# ---- demo --------------------------------------------------------------------------------


DEMO_WORKFLOWS = ("10-w2k-e-drive.yaml", "20-sql-consistency-group.yaml", "30-nightly-nocopy-export.yaml")


def demo_workflows() -> list[Path]:
    """The seed's scenarios from the checkout's workflows/ folder."""
    folder = Path(__file__).resolve().parent.parent / "workflows"
    return [folder / name for name in DEMO_WORKFLOWS]


def flowcopy_command() -> str:
    """How to call flowcopy again from this shell: `flowcopy` if that is on PATH and is this
    one, else the path of this interpreter's script (`.venv/bin/flowcopy` after the README)."""
    import shutil

    script = Path(sys.executable).parent / "flowcopy"
    on_path = shutil.which("flowcopy")
    if on_path and (not script.exists() or Path(on_path).resolve() == script.resolve()):
        return "flowcopy"
    if script.exists():
        try:
            return str(script.relative_to(Path.cwd()))
        except ValueError:
            return str(script)
    return f"{sys.executable} -m flowcopy"


def demo(store: Path, *, speed: float) -> int:
    """Run the demo workflows one after the other in `store`; 0 only if all verified."""
    console = _console()
    worst = 0
    for path in demo_workflows():
        if not path.exists():
            return _err(f"{path}: demo workflow missing (run the demo from a checkout)")
        console.rule(f"flowcopy run {path.name}")
        code = run(path, store, site_url=None, token_file=None, as_json=False, speed=speed, lab=None)
        worst = max(worst, code)
    from flowcopy.site.demo import bank_demo

    console.rule("real SQLite: the bank copied with scenario 2")
    if not bank_demo(console, store / "site"):
        worst = max(worst, 1)
    console.rule("result")
    console.print(
        "[green]every backup succeeded and every target image verified[/green]" if worst == 0
        else "[red]some backups did not succeed or verify: see above[/red]"
    )
    command = flowcopy_command()
    store_arg = "" if store == Path("store") and not os.environ.get("FLOWCOPY_STORE") else f" --store {store}"
    console.print(f"journal and site state are in {store}/ — try `{command} status{store_arg}`", soft_wrap=True)
    return worst


# ---- serve, pause, unpause ----------------------------------------------------------------


def serve(folder: Path, store: Path, *, site_url: str | None, token_file: str | None, speed: float,
          http: str | None = None, http_token_file: str | None = None,
          http_certfile: str | None = None, http_keyfile: str | None = None) -> int:
    """`flowcopy serve`: JSON log lines on stderr; 0 after a clean stop (what was left in
    flight is said in one line), 2 with one line if it cannot start."""
    from flowcopy import logs, scheduler
    from flowcopy.service import face

    if speed <= 0:
        return _err(f"--speed must be a positive number, not {speed}")
    try:
        the_face = face.make_face(face.configure(store, http, http_token_file, http_certfile, http_keyfile))
    except (face.FaceError, OSError) as exc:
        return _err(str(exc))
    logs.configure(json=True, level="info")
    try:
        report, code = _run_trio(lambda: scheduler.serve(folder, store=store, site_url=site_url, token_file=token_file,
                                                         speed=speed, face=the_face), (site_url, token_file))
    except BaseException as exc:
        leaves = [e for e in _leaves(exc) if isinstance(e, scheduler.ServeError | scheduler.PauseStateError)]
        if not leaves or len(leaves) != len(_leaves(exc)):
            raise
        return _err(str(leaves[0]))
    if code is not None:
        return code
    print(f"flowcopy: {report.message()}", file=sys.stderr)
    return OK


def known_workflows(store: Path, folder: Path) -> set[str]:
    """Workflow names an admin may mean: the service's folder and the store's journal."""
    from flowcopy import catalog

    names = set(catalog.names(folder))
    if _has_journal(store):
        from flowcopy.journal import Journal

        try:
            journal = Journal.open(store, lock=False)
        except Exception:  # noqa: BLE001 - an unreadable journal adds no names; the folder still counts
            return names
        try:
            names |= {r.workflow for r in journal.runs()}
        finally:
            journal.close()
    return names


def pause(store: Path, name: str, paused: bool, *, folder: Path) -> int:
    from flowcopy import scheduler
    from flowcopy.journal import local_dir

    try:
        changed = scheduler.pause(local_dir(store), name, paused, known_workflows(store, folder))
    except (scheduler.PauseStateError, OSError) as exc:
        return _err(str(exc))
    word = "paused" if paused else "unpaused"
    print(f"{name} {word}" + ("" if changed else " already") + "; a running `flowcopy serve` sees it at the next fire")
    return OK
