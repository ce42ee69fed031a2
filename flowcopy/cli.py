"""The `flowcopy` command line. Thin: it parses, calls the library, and prints.

Errors the user can act on exit 2 with one line on stderr, never a traceback.

Each area adds its commands as one small block below whose body imports its module
inside the function, so `flowcopy --help`, `validate` and `status` start fast. Every
command (and every command of a subgroup) gets `--log-level` and `--log-format` from
`Group`, so logging is controlled the same way everywhere; a subgroup that lives in its
own module is registered with `main.add_lazy` and imported only when it is used.
"""

from __future__ import annotations

import importlib
import json as _json
import sys
from pathlib import Path
from typing import Any

import click

from flowcopy import __version__

_LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def _choose_log(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value is not None:
        from flowcopy import logs

        logs.choose(**{param.name or "": value})


def _log_params() -> list[click.Option]:
    return [
        click.Option(["--log-level", "level"], type=click.Choice(_LOG_LEVELS, case_sensitive=False), default=None,
                     envvar="FLOWCOPY_LOG_LEVEL", show_envvar=True, expose_value=False, callback=_choose_log,
                     help="Lowest level of log lines on stderr (default: the command's own)."),
        click.Option(["--log-format", "format"], type=click.Choice(("console", "json"), case_sensitive=False), default=None,
                     envvar="FLOWCOPY_LOG_FORMAT", show_envvar=True, expose_value=False, callback=_choose_log,
                     help="Log lines as JSON objects or for people (default: console on a terminal, JSON otherwise)."),
    ]


def _with_log_options(cmd: click.Command) -> click.Command:
    """Add the log options to `cmd` and, for a group, to every command under it (once)."""
    if not getattr(cmd, "_flowcopy_log_options", False):
        cmd.params.extend(_log_params())
        cmd._flowcopy_log_options = True  # type: ignore[attr-defined]
    if isinstance(cmd, click.Group):
        for sub in cmd.commands.values():
            _with_log_options(sub)
    return cmd


class Group(click.Group):
    """A click group whose commands all take the log options, with lazily imported subgroups."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy: dict[str, tuple[str, str]] = {}  # name -> ("module:attr", short help)

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        super().add_command(_with_log_options(cmd), name)

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None,
                     **extra: Any) -> click.Context:
        if parent is None:  # a new command line: forget the last one's log choice (tests run many)
            from flowcopy import logs

            logs.reset_choice()
        return super().make_context(info_name, args, parent, **extra)

    def add_lazy(self, name: str, target: str, short_help: str) -> None:
        """Register `name` as the command at `target` ("module:attr"), imported on first use."""
        self.lazy[name] = (target, short_help)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy and name not in self.commands:
            module, _, attr = self.lazy[name][0].partition(":")
            self.add_command(getattr(importlib.import_module(module), attr), name)
        return super().get_command(ctx, name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """As click's, but a lazy command's line comes from its registration (no import)."""
        rows = []
        limit = formatter.width - 6 - max((len(n) for n in self.list_commands(ctx)), default=0)
        for name in self.list_commands(ctx):
            if name in self.lazy and name not in self.commands:
                rows.append((name, self.lazy[name][1]))
                continue
            cmd = self.get_command(ctx, name)
            if cmd is not None and not cmd.hidden:
                rows.append((name, cmd.get_short_help_str(limit)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="flowcopy")
def main() -> None:
    """Application-consistent FlashCopy backups of VMware VMs on IBM ESS."""


main.params.extend(_log_params())


# ---- commands are registered below, one section per area -------------------------


# ---- engine: run, plan, resume, status, describe, history, cancel -------------------

_store_option = click.option(
    "--store",
    type=str,
    default=None,
    help="State directory (journal, embedded site), or a postgresql://… URL for a journal "
    "shared by several engines. Default: ./store or $FLOWCOPY_STORE.",
)
_site_option = click.option("--site", "site_url", default=None,
                            help="URL of a served site (default: $FLOWCOPY_SITE, else the embedded model in the store: a simulation).")
_token_option = click.option("--token-file", default=None, help="Bearer token file of a served site (default: $FLOWCOPY_SITE_TOKEN_FILE).")
_workflows_option = click.option(
    "--workflows", "folder", type=click.Path(file_okay=False, path_type=Path), default=None,
    help="The service's folder of definitions, where a workflow NAME is looked up. Default: $FLOWCOPY_WORKFLOWS or ./workflows.",
)


def _json_option(what: str) -> Any:
    return click.option("--json", "as_json", is_flag=True, help=f"Print {what} as JSON on stdout (for scripts).")


def _fail(message: str) -> None:
    click.echo(f"flowcopy: {message}", err=True)
    sys.exit(2)


def _store(store: str | None) -> Path:
    """A folder (SQLite journal) or a postgresql:// URL, kept whole (without importing the journal:
    start-up stays fast)."""
    import os

    value = store if store is not None else (os.environ.get("FLOWCOPY_STORE") or "store")
    if not value.strip():
        _fail("--store: empty value (give a folder or a postgresql:// URL)")
    if value.startswith(("postgresql://", "postgres://")):
        return value  # type: ignore[return-value]
    return Path(value)


def _folder(folder: Path | None) -> Path:
    from flowcopy.catalog import default_folder

    return folder or default_folder()


def _complete_workflow(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[Any]:
    """Shell completion: workflow names of the service's folder (and definition files)."""
    from click.shell_completion import CompletionItem

    from flowcopy.catalog import names

    folder = _folder(ctx.params.get("folder"))
    items = [CompletionItem(name, help=str(path)) for name, path in names(folder).items() if name.startswith(incomplete)]
    return items or [CompletionItem(incomplete, type="file")]


def _complete_run(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[Any]:
    """Shell completion: run ids of the store, newest first."""
    from click.shell_completion import CompletionItem

    from flowcopy.commands import run_ids

    return [CompletionItem(r) for r in run_ids(_store(ctx.params.get("store"))) if r.startswith(incomplete)]


def _definition(name_or_file: str, folder: Path | None) -> Path:
    from flowcopy.catalog import UnknownWorkflow, resolve

    try:
        return resolve(name_or_file, _folder(folder))
    except UnknownWorkflow as exc:
        _fail(str(exc))
        raise  # unreachable: _fail exits


@main.command()
@click.argument("workflow", metavar="FILE|NAME", shell_complete=_complete_workflow)
@_store_option
@_site_option
@_token_option
@_workflows_option
@_json_option("the summary (one object)")
@click.option("--speed", type=float, default=1.0, show_default=True, help="Site clock speed of the embedded site.")
@click.option("--lab", default=None, help="Lab file for a fresh embedded site (default: the seed's lab).")
def run(workflow: str, store: Path | None, site_url: str | None, token_file: str | None, folder: Path | None,
        as_json: bool, speed: float, lab: str | None) -> None:
    """Run a workflow once now: a definition FILE, or the NAME of a workflow of the service's
    folder (after resuming whatever the store left unfinished).

    Exit 0: every unit succeeded and verified; 1: the run ended otherwise; 2: nothing ran
    (one line says why); 3: stopped cleanly by a signal (`flowcopy resume` continues)."""
    from flowcopy import commands

    code = commands.run(_definition(workflow, folder), _store(store), site_url=site_url, token_file=token_file,
                        as_json=as_json, speed=speed, lab=lab)
    sys.exit(code)


@main.command()
@click.argument("workflow", metavar="FILE|NAME", shell_complete=_complete_workflow)
@_store_option
@_site_option
@_token_option
@_workflows_option
@_json_option("the plan (one object)")
@click.option("--lab", default=None, help="Lab file for a fresh embedded site (default: the seed's lab).")
def plan(workflow: str, store: Path | None, site_url: str | None, token_file: str | None, folder: Path | None,
         as_json: bool, lab: str | None) -> None:
    """Resolve a workflow against the live site and change nothing: VMs, disks, serials,
    chosen targets, what is frozen together. Exit 2 naming what would make the run fail."""
    from flowcopy import planview

    sys.exit(planview.plan(_definition(workflow, folder), _store(store), site_url=site_url, token_file=token_file,
                           as_json=as_json, lab=lab))


@main.command()
@_store_option
@_site_option
@_token_option
@_json_option("the summaries (a list)")
def resume(store: Path | None, site_url: str | None, token_file: str | None, as_json: bool) -> None:
    """Reconcile and finish every run the store left unfinished (after a crash)."""
    from flowcopy import commands

    sys.exit(commands.resume(_store(store), site_url=site_url, token_file=token_file, as_json=as_json))


@main.command()
@_store_option
@_json_option("the runs (a list of objects)")
@click.option("--workflow", default=None, shell_complete=_complete_workflow, help="Only runs of this workflow.")
@click.option("--state", type=click.Choice(("running", "succeeded", "partial", "failed", "cancelled")), default=None,
              help="Only runs in this state.")
@click.option("--since", default=None, help="Only runs started since: a duration back (30m, 12h, 2d, 1w) or a date/time.")
@click.option("--limit", type=click.IntRange(min=0), default=20, show_default=True, help="Show the latest N runs (0: all).")
def status(store: Path | None, as_json: bool, workflow: str | None, state: str | None, since: str | None, limit: int) -> None:
    """Runs in the store: state, start and end, duration, units per state, site (works while an engine runs)."""
    from flowcopy import commands

    sys.exit(commands.status(_store(store), as_json=as_json, workflow=workflow, state=state, since=since, limit=limit))


@main.command()
@click.argument("run_id", shell_complete=_complete_run)
@_store_option
@_json_option("the run and its units (one object)")
def describe(run_id: str, store: Path | None, as_json: bool) -> None:
    """One run in full: per unit its VMs, disks and pairs, state, attempts, errors, freeze
    window, image verdict."""
    from flowcopy import commands

    sys.exit(commands.describe(_store(store), run_id, as_json=as_json))


@main.command()
@click.argument("run_id", shell_complete=_complete_run)
@_store_option
@_json_option("the events (a list of objects)")
def history(run_id: str, store: Path | None, as_json: bool) -> None:
    """Every journaled transition of RUN_ID's units, in order, with each unit's VMs."""
    from flowcopy import commands

    sys.exit(commands.history(_store(store), run_id, as_json=as_json))


@main.command()
@click.argument("run_id", shell_complete=_complete_run)
@_store_option
def cancel(run_id: str, store: Path | None) -> None:
    """Ask the engine running RUN_ID to cancel it (units compensate: thaw, unfreeze, withdraw)."""
    from flowcopy import commands

    sys.exit(commands.cancel(_store(store), run_id))


# ---- definitions: validate, schema ------------------------------------------------


@main.command()
@click.argument("files", nargs=-1, required=True)
@_json_option("one object per file (file, workflow, units, problems)")
def validate(files: tuple[str, ...], as_json: bool) -> None:
    """Check definition FILEs (folders: their *.yaml); exit 2 listing every problem."""
    from flowcopy.definitions import DefinitionError, definition_files, load_definition

    failed = False
    paths = definition_files(files)
    if not paths:
        _fail("no definition files found in " + ", ".join(files))
    report = []
    for path in paths:
        try:
            workflow = load_definition(path)
        except DefinitionError as exc:
            failed = True
            report.append({"file": str(path), "ok": False, "problems": [str(p) for p in exc.problems]})
            if not as_json:
                for problem in exc.problems:
                    click.echo(str(problem), err=True)
        else:
            count = len(workflow.units)
            report.append({"file": str(path), "ok": True, "workflow": workflow.name, "units": count, "problems": []})
            if not as_json:
                click.echo(f"ok: {path} ({count} unit{'s' if count != 1 else ''})")
    if as_json:
        click.echo(_json.dumps(report))
    sys.exit(2 if failed else 0)


@main.command()
def schema() -> None:
    """Print the JSON Schema (draft 2020-12) of definition files, for editors."""
    from flowcopy.definition_schema import json_schema

    click.echo(_json.dumps(json_schema(), indent=2))


# ---- site: serve the site model over HTTP, and the array admin's commands ----------

main.add_lazy("site", "flowcopy.site.admin:site_group",
              "Serve the site model, and the array admin's commands.")


# ---- bench ------------------------------------------------------------------------


@main.command()
@click.option("--vms", type=int, default=1000, show_default=True, help="VMs in the engine and recovery runs.")
@click.option("--quick", is_flag=True, help="A smoke run: small journal sample (use with a small --vms).")
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Scratch folder on the disk to measure (default: a temporary folder).")
@_json_option("the figures (one object)")
@click.option("--peer", type=click.Choice(["dbos"]), default=None,
              help="Instead: the six-stage workflow on flowcopy and on DBOS Transact (own venv), side by side.")
@click.option("--pg", is_flag=True, help="Several engines on one PostgreSQL journal (starts its own server): "
              "journal moves/s, VMs/s with 1-3 engine processes, take-over after SIGKILL.")
@click.option("--lease", type=float, default=5.0, show_default=True,
              help="With --pg: the engines' lease period (s); longer on a loaded machine.")
def bench(vms: int, quick: bool, directory: Path | None, as_json: bool, peer: str | None, pg: bool,
          lease: float) -> None:
    """Measure journal rate, VMs/s, freeze window, recovery time and site figures (DESIGN §5)."""
    import tempfile

    from flowcopy import bench as benchmarks
    from flowcopy import views

    if vms < 1:
        _fail("--vms must be at least 1")
    if peer is not None:
        from flowcopy.peers import dbos_bench

        try:
            if directory is not None:
                figures = dbos_bench.compare(directory, workflows=vms)
            else:
                with tempfile.TemporaryDirectory(prefix="flowcopy-peer-") as scratch:
                    figures = dbos_bench.compare(Path(scratch), workflows=vms)
        except dbos_bench.PeerError as exc:
            _fail(f"bench --peer {peer}: {exc}")
        click.echo(_json.dumps(figures) if as_json else (
            f"{vms} six-stage workflows: flowcopy {figures['flowcopy']['steps_per_s']} durable steps/s, "
            f"DBOS {figures['dbos']['version']} {figures['dbos']['steps_per_s']} steps/s: x{figures['ratio']}"))
        return
    if pg:
        from flowcopy import cluster_bench

        if lease <= 0:
            _fail("bench --pg: --lease must be positive")
        figures = cluster_bench.run_pg_bench(directory, vms=vms, moves_units=100 if quick else 1000,
                                             engines=(1, 2) if quick else (1, 2, 3), lease=lease)
        click.echo(_json.dumps(figures, indent=None if as_json else 2))
        return
    if directory is not None:
        results = benchmarks.run_all(directory, vms=vms, quick=quick)
    else:  # a scratch folder of our own: removed afterwards, whatever happens
        with tempfile.TemporaryDirectory(prefix="flowcopy-bench-") as scratch:
            results = benchmarks.run_all(Path(scratch), vms=vms, quick=quick)
    if as_json:
        click.echo(_json.dumps(results))
    else:
        views.print_bench(results)


# ---- demo -------------------------------------------------------------------------


@main.command()
@_store_option
@click.option("--speed", type=float, default=1.0, show_default=True, help="Site clock speed of the embedded site.")
def demo(store: Path | None, speed: float) -> None:
    """A point-in-time copy on the seed's LUNs, then backups of the seed's scenarios.

    First the array alone: 20313698 -> 20413698, source changed after establish, target
    still the old image. Then the engine runs the workflows of the seed's lab (the
    Windows E: drive to the second guest, the SQL log+data consistency group, a nightly
    nocopy export of the Linux guests) against the embedded site in the store.
    """
    from rich.console import Console

    from flowcopy import commands
    from flowcopy.site.demo import array_demo

    if not array_demo(Console()):
        _fail("demo: the target does not hold the point-in-time image of the source")
    sys.exit(commands.demo(_store(store), speed=speed))


# ---- chaos ------------------------------------------------------------------------


@main.command()
@click.option("--vms", type=int, default=100, show_default=True, help="VMs in the generated lab.")
@click.option("--kills", type=int, default=10, show_default=True, help="SIGKILLs of the engine process.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the kill delays and the faults (replayable).")
@click.option("--error-rate", type=float, default=0.0, show_default=True, help="Fraction of site calls that fail (half after acting).")
@click.option("--speed", type=float, default=4.0, show_default=True, help="Served site clock speed.")
@click.option("--min-delay", type=float, default=0.5, show_default=True, help="Shortest life of an engine before its SIGKILL (s).")
@click.option("--max-delay", type=float, default=2.0, show_default=True, help="Longest life of an engine before its SIGKILL (s).")
@click.option("--site-restarts", type=int, default=0, show_default=True,
              help="SIGKILLs + restarts of the served site process, each while a run is in flight (runs follow one another until all are done).")
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Work folder (site state, store); default: a temporary folder.")
@_json_option("the report (one object)")
@click.option("--engines", type=int, default=1, show_default=True,
              help="Engine processes on one PostgreSQL journal (--store postgresql://…): one is SIGKILLed, one SIGSTOPped past its lease.")
@click.option("--store", "cluster_store", default=None, help="With --engines: the postgresql:// journal they share (an empty database).")
@click.option("--lease", type=float, default=5.0, show_default=True, help="With --engines: the engines' lease period (s).")
@click.option("--site-fence-only", is_flag=True,
              help="With --engines: engines do not check their own lease clock; only the site's fence and the journal's stop a paused one.")
def chaos(vms: int, kills: int, seed: int, error_rate: float, speed: float, min_delay: float, max_delay: float,
          site_restarts: int, directory: Path | None, as_json: bool, engines: int, cluster_store: str | None,
          lease: float, site_fence_only: bool) -> None:
    """SIGKILL a real engine process again and again against a served site, then check
    every invariant (nothing stuck, nothing frozen, no relationship leaked, every image
    consistent, every history a valid path) from the site's own state. Exit 0 iff all hold."""
    import tempfile

    import trio

    from flowcopy import chaos as harness

    if vms < 1 or kills < 0 or site_restarts < 0 or not 0.0 <= error_rate < 1.0 or not 0 < min_delay <= max_delay:
        _fail("chaos: need --vms >= 1, --kills >= 0, --site-restarts >= 0, 0 <= --error-rate < 1 and "
              "0 < --min-delay <= --max-delay")
    import shutil

    folder = directory or Path(tempfile.mkdtemp(prefix="flowcopy-chaos-"))
    if engines > 1 or cluster_store:
        from flowcopy import cluster_chaos
        from flowcopy.journal import is_url

        if engines < 2 or not cluster_store or not is_url(cluster_store) or lease <= 0:
            _fail("chaos: --engines N (N >= 2) needs --store postgresql://… (an empty database) and --lease > 0")
        cluster = trio.run(lambda: cluster_chaos.run_cluster_chaos(folder, cluster_store, vms=vms, engines=engines,
                                                                   lease=lease, speed=speed,
                                                                   site_fence_only=site_fence_only))
        click.echo(_json.dumps(cluster.to_json()) if as_json else cluster_chaos.report_text(cluster) + f"\nwork folder: {folder}")
        sys.exit(0 if cluster.ok else 1)
    try:
        report = trio.run(lambda: harness.run_chaos(folder, vms=vms, kills=kills, seed=seed, error_rate=error_rate,
                                                    speed=speed, min_delay=min_delay, max_delay=max_delay,
                                                    site_restarts=site_restarts))
    except BaseException:
        if directory is None:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    kept = directory is not None or not report.ok  # a broken invariant keeps its evidence
    if not kept:
        shutil.rmtree(folder, ignore_errors=True)
    if as_json:
        click.echo(_json.dumps(report.to_json()))
    else:
        verdict = "all invariants hold" if report.ok else "INVARIANTS BROKEN"
        click.echo(f"chaos: {report.vms} VMs, {report.kills} SIGKILLs over {report.processes} engine processes, "
                   f"{report.faults_injected} injected site faults, {report.seconds:.1f} s")
        if site_restarts:
            click.echo(f"{report.site_restarts} site restarts (SIGKILL + restart of the served site) "
                       + ("survived" if report.ok else "done"))
        click.echo(f"{len(report.run_states)} run(s), {report.run_state}; {report.verdict.units} units checked, "
                   f"{report.verdict.checked_images} images re-checked: {verdict}")
        click.echo(report.hold_line())
        for problem in report.verdict.problems:
            click.echo(f"  - {problem}")
        click.echo(f"work folder: {folder}" if kept else "work folder removed (keep one with --dir DIR)")
    sys.exit(0 if report.ok else 1)


# ---- serve ------------------------------------------------------------------------


@main.command()
@click.argument("folder", type=click.Path(path_type=Path), default=Path("workflows"))
@_store_option
@_site_option
@_token_option
@click.option("--speed", type=float, default=1.0, show_default=True,
              help="Clock speed of the embedded site and of the cron clock (demos, tests).")
@click.option("--http", "http", default=None, metavar="HOST:PORT",
              help="Serve /metrics, /healthz, /readyz and the status page (e.g. 127.0.0.1:9464).")
@click.option("--http-token-file", default=None,
              help="Bearer token for the HTTP face (required off loopback; default STORE/http-token).")
@click.option("--http-certfile", default=None, help="TLS certificate of the HTTP face (required off loopback).")
@click.option("--http-keyfile", default=None, help="TLS key of the HTTP face (required off loopback).")
def serve(folder: Path, store: Path | None, site_url: str | None, token_file: str | None, speed: float,
          http: str | None, http_token_file: str | None, http_certfile: str | None, http_keyfile: str | None) -> None:
    """Run the scheduled workflows of FOLDER on cron until SIGTERM/SIGINT (SIGHUP: reload)."""
    from flowcopy import commands

    sys.exit(commands.serve(folder, _store(store), site_url=site_url, token_file=token_file, speed=speed,
                            http=http, http_token_file=http_token_file, http_certfile=http_certfile,
                            http_keyfile=http_keyfile))


@main.command()
@click.argument("name", shell_complete=_complete_workflow)
@_store_option
@_workflows_option
def pause(name: str, store: Path | None, folder: Path | None) -> None:
    """Stop firing workflow NAME (runs in flight go on) until `flowcopy unpause NAME`.
    A name that is no workflow of the folder or the journal is refused."""
    from flowcopy import commands

    sys.exit(commands.pause(_store(store), name, True, folder=_folder(folder)))


@main.command()
@click.argument("name", shell_complete=_complete_workflow)
@_store_option
@_workflows_option
def unpause(name: str, store: Path | None, folder: Path | None) -> None:
    """Fire workflow NAME on its schedule again."""
    from flowcopy import commands

    sys.exit(commands.pause(_store(store), name, False, folder=_folder(folder)))


# ---- service: schedules, trigger ----------------------------------------------------


@main.command()
@click.argument("folder", type=click.Path(path_type=Path), default=Path("workflows"))
@_store_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object per workflow, in a list.")
def schedules(folder: Path, store: Path | None, as_json: bool) -> None:
    """Every workflow of FOLDER: cron, time zone, next and last fire, result, overlap, paused."""
    from flowcopy.service import commands as service_commands

    sys.exit(service_commands.schedules(folder, _store(store), as_json=as_json))


@main.command()
@click.argument("name")
@_store_option
@click.option("--url", default=None, help="The service's HTTP face (default: from STORE/service.json).")
@click.option("--token-file", default=None, help="Bearer token file of the HTTP face.")
def trigger(name: str, store: Path | None, url: str | None, token_file: str | None) -> None:
    """Fire workflow NAME now, through the running `flowcopy serve --http`."""
    from flowcopy.service.trigger import trigger as fire

    code, line = fire(_store(store), name, url=url, token_file=token_file)
    click.echo(line if code == 0 else f"flowcopy: {line}", err=code != 0)
    sys.exit(code)


# ---- several engines: engines, journal check / backup -------------------------------


@main.command()
@_store_option
@_json_option("the engines (one object per engine)")
def engines(store: Path | None, as_json: bool) -> None:
    """Engines on the store's journal: live and dead, host, pid, started, lease, units held."""
    from flowcopy import cluster_commands

    sys.exit(cluster_commands.engines(_store(store), as_json=as_json))


@main.group()
def journal() -> None:
    """Check or copy the store's journal."""


@journal.command("check")
@_store_option
def journal_check(store: Path | None) -> None:
    """Read every row of the journal; exit 0 if sound, else name each problem and how to recover."""
    from flowcopy import cluster_commands

    sys.exit(cluster_commands.journal_check(_store(store)))


@journal.command("backup")
@click.argument("dest", type=click.Path(dir_okay=False, path_type=Path))
@_store_option
def journal_backup(dest: Path, store: Path | None) -> None:
    """Copy the SQLite journal consistently to DEST (a new file), even while an engine runs."""
    from flowcopy import cluster_commands

    sys.exit(cluster_commands.journal_backup(_store(store), dest))


# ---- backups: catalog, verify, restore, forget ---------------------------------------


@main.group(cls=Group, invoke_without_command=True)
@_store_option
@_site_option
@_token_option
@click.option("--vm", default=None, help="Only backups of this VM.")
@click.option("--workflow", default=None, help="Only backups of this workflow.")
@click.option("--all", "show_all", is_flag=True, help="Also backups retention has forgotten.")
@_json_option("the backups (newest first)")
@click.option("--check-rpo", is_flag=True, help="Exit 1 when a VM's newest verified backup is older than its RPO.")
@click.pass_context
def backups(ctx: click.Context, store: Path | None, site_url: str | None, token_file: str | None, vm: str | None,
            workflow: str | None, show_all: bool, as_json: bool, check_rpo: bool) -> None:
    """The backups in the store, newest first: where each image lives, and whether it still does."""
    ctx.obj = {"store": store, "site_url": site_url, "token_file": token_file}
    if ctx.invoked_subcommand is None:
        from flowcopy.backups import commands as backup_commands

        sys.exit(backup_commands.list_backups(_store(store), vm=vm, workflow=workflow, as_json=as_json, check_rpo=check_rpo,
                                              show_all=show_all, site_url=site_url, token_file=token_file))


@backups.command("show")
@click.argument("backup_id")
@_store_option
@_site_option
@_token_option
@_json_option("the backup with every disk")
@click.pass_context
def backups_show(ctx: click.Context, backup_id: str, store: Path | None, site_url: str | None, token_file: str | None,
                 as_json: bool) -> None:
    """One backup with every disk: source, image location, checksums, last verification."""
    from flowcopy.backups import commands as backup_commands

    o = ctx.obj
    sys.exit(backup_commands.show(_store(store or o["store"]), backup_id, as_json=as_json,
                                  site_url=site_url or o["site_url"], token_file=token_file or o["token_file"]))


@main.command()
@click.argument("backup_ids", nargs=-1)
@click.option("--all", "every", is_flag=True, help="Every restorable backup.")
@_store_option
@_site_option
@_token_option
@_json_option("each verification result")
def verify(backup_ids: tuple[str, ...], every: bool, store: Path | None, site_url: str | None, token_file: str | None, as_json: bool) -> None:
    """Re-read backups' images and run the independent checker; exit 1 naming the first problem."""
    from flowcopy.backups import commands as backup_commands

    sys.exit(backup_commands.verify(_store(store), backup_ids, every=every, as_json=as_json, site_url=site_url, token_file=token_file))


@main.command()
@click.argument("backup_id")
@click.option("--disk", "disks", multiple=True, help="Only this disk of the backup (name, serial or VM:DISK); repeatable.")
@click.option("--to", "to", multiple=True, help="original (default), a SERIAL or VM:DISK; one per --disk, in order.")
@click.option("--dry-run", is_flag=True, help="Print what would be overwritten and broken; change nothing.")
@click.option("--yes", is_flag=True, help="Overwrite LUNs in use without asking.")
@_store_option
@_site_option
@_token_option
@click.option("--speed", type=float, default=1.0, show_default=True, help="Site clock speed of the embedded site.")
@_json_option("the restore plan or outcome")
def restore(backup_id: str, disks: tuple[str, ...], to: tuple[str, ...], dry_run: bool, yes: bool, store: Path | None,
            site_url: str | None, token_file: str | None, speed: float, as_json: bool) -> None:
    """Restore BACKUP_ID onto its original LUNs or others, as a durable run (status, history, cancel)."""
    from flowcopy.backups import commands as backup_commands

    sys.exit(backup_commands.restore(_store(store), backup_id, disks=disks, to=to, dry_run=dry_run, yes=yes,
                                     as_json=as_json, site_url=site_url, token_file=token_file, speed=speed))


@main.command()
@click.option("--workflow", default=None, help="Only this workflow's retention.")
@click.option("--dry-run", is_flag=True, help="Print what would be kept and removed; change nothing.")
@_store_option
@_site_option
@_token_option
@_json_option("what retention removed or would remove")
def forget(workflow: str | None, dry_run: bool, store: Path | None, site_url: str | None, token_file: str | None, as_json: bool) -> None:
    """Apply each workflow's retention: remove recorded export files, withdraw kept relationships."""
    from flowcopy.backups import commands as backup_commands

    sys.exit(backup_commands.forget(_store(store), workflow=workflow, dry_run=dry_run, as_json=as_json,
                                    site_url=site_url, token_file=token_file))
