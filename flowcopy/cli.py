"""The `flowcopy` command line. Thin: it parses, calls the library, and prints.

Errors the user can act on exit 2 with one line on stderr, never a traceback.
"""

from __future__ import annotations

import click

from flowcopy import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="flowcopy")
def main() -> None:
    """Application-consistent FlashCopy backups of VMware VMs on IBM ESS."""


# ---- commands are registered below, one section per area -------------------------


# ---- engine: run, resume, status, history, cancel ---------------------------------

import json as _json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

_store_option = click.option(
    "--store",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="State directory (journal, embedded site). Default: ./store or $FLOWCOPY_STORE.",
)
_site_option = click.option("--site", "site_url", default=None, help="URL of a served site (default: the embedded site in the store).")
_token_option = click.option("--token-file", default=None, help="Bearer token file of a served site.")


def _fail(message: str) -> None:
    click.echo(f"flowcopy: {message}", err=True)
    sys.exit(2)


def _store(store: Path | None) -> Path:
    from flowcopy.runner import default_store

    return store or default_store()


@main.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@_store_option
@_site_option
@_token_option
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
@click.option("--speed", type=float, default=1.0, show_default=True, help="Site clock speed of the embedded site.")
@click.option("--lab", default=None, help="Lab file for a fresh embedded site (default: the seed's lab).")
def run(file: Path, store: Path | None, site_url: str | None, token_file: str | None, as_json: bool, speed: float, lab: str | None) -> None:
    """Run the workflow FILE once now (after resuming whatever the store left unfinished)."""
    from flowcopy import commands

    code = commands.run(file, _store(store), site_url=site_url, token_file=token_file, as_json=as_json, speed=speed, lab=lab)
    sys.exit(code)


@main.command()
@_store_option
@_site_option
@_token_option
@click.option("--json", "as_json", is_flag=True)
def resume(store: Path | None, site_url: str | None, token_file: str | None, as_json: bool) -> None:
    """Reconcile and finish every run the store left unfinished (after a crash)."""
    from flowcopy import commands

    sys.exit(commands.resume(_store(store), site_url=site_url, token_file=token_file, as_json=as_json))


@main.command()
@_store_option
@click.option("--json", "as_json", is_flag=True)
def status(store: Path | None, as_json: bool) -> None:
    """Runs in the store and their units per state (works while an engine runs)."""
    from flowcopy import commands

    sys.exit(commands.status(_store(store), as_json=as_json))


@main.command()
@click.argument("run_id")
@_store_option
@click.option("--json", "as_json", is_flag=True)
def history(run_id: str, store: Path | None, as_json: bool) -> None:
    """Every journaled transition of RUN_ID's units, in order."""
    from flowcopy import commands

    sys.exit(commands.history(_store(store), run_id, as_json=as_json))


@main.command()
@click.argument("run_id")
@_store_option
def cancel(run_id: str, store: Path | None) -> None:
    """Ask the engine running RUN_ID to cancel it (units compensate: thaw, unfreeze, withdraw)."""
    from flowcopy import commands

    sys.exit(commands.cancel(_store(store), run_id))


# ---- definitions: validate, schema ------------------------------------------------


@main.command()
@click.argument("files", nargs=-1, required=True)
def validate(files: tuple[str, ...]) -> None:
    """Check definition FILEs (folders: their *.yaml); exit 2 listing every problem."""
    from flowcopy.definitions import DefinitionError, definition_files, load_definition

    failed = False
    paths = definition_files(files)
    if not paths:
        _fail("no definition files found in " + ", ".join(files))
    for path in paths:
        try:
            workflow = load_definition(path)
        except DefinitionError as exc:
            failed = True
            for problem in exc.problems:
                click.echo(str(problem), err=True)
        else:
            count = len(workflow.units)
            click.echo(f"ok: {path} ({count} unit{'s' if count != 1 else ''})")
    sys.exit(2 if failed else 0)


@main.command()
def schema() -> None:
    """Print the JSON Schema (draft 2020-12) of definition files, for editors."""
    from flowcopy.definition_schema import json_schema

    click.echo(_json.dumps(json_schema(), indent=2))


# ---- site: serve the site model over HTTP, and the array admin's commands ----------

from flowcopy.site.admin import site_group  # noqa: E402

main.add_command(site_group)


# ---- bench ------------------------------------------------------------------------


@main.command()
@click.option("--vms", type=int, default=1000, show_default=True, help="VMs in the engine and recovery runs.")
@click.option("--quick", is_flag=True, help="A smoke run: small journal sample (use with a small --vms).")
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Scratch folder on the disk to measure (default: a temporary folder).")
@click.option("--json", "as_json", is_flag=True)
def bench(vms: int, quick: bool, directory: Path | None, as_json: bool) -> None:
    """Measure journal rate, VMs/s, freeze window, recovery time and site figures (DESIGN §5)."""
    import tempfile

    from flowcopy import bench as benchmarks
    from flowcopy import views

    if vms < 1:
        _fail("--vms must be at least 1")
    folder = directory or Path(tempfile.mkdtemp(prefix="flowcopy-bench-"))
    results = benchmarks.run_all(folder, vms=vms, quick=quick)
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
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Work folder (site state, store); default: a temporary folder.")
@click.option("--json", "as_json", is_flag=True)
def chaos(vms: int, kills: int, seed: int, error_rate: float, speed: float, min_delay: float, max_delay: float,
          directory: Path | None, as_json: bool) -> None:
    """SIGKILL a real engine process again and again against a served site, then check
    every invariant (nothing stuck, nothing frozen, no relationship leaked, every image
    consistent, every history a valid path) from the site's own state. Exit 0 iff all hold."""
    import tempfile

    import trio

    from flowcopy import chaos as harness

    if vms < 1 or kills < 0 or not 0.0 <= error_rate < 1.0 or not 0 < min_delay <= max_delay:
        _fail("chaos: need --vms >= 1, --kills >= 0, 0 <= --error-rate < 1 and 0 < --min-delay <= --max-delay")
    folder = directory or Path(tempfile.mkdtemp(prefix="flowcopy-chaos-"))
    report = trio.run(lambda: harness.run_chaos(folder, vms=vms, kills=kills, seed=seed, error_rate=error_rate,
                                                speed=speed, min_delay=min_delay, max_delay=max_delay))
    if as_json:
        click.echo(_json.dumps(report.to_json()))
    else:
        verdict = "all invariants hold" if report.ok else "INVARIANTS BROKEN"
        click.echo(f"chaos: {report.vms} VMs, {report.kills} SIGKILLs over {report.processes} engine processes, "
                   f"{report.faults_injected} injected site faults, {report.seconds:.1f} s")
        click.echo(f"{len(report.run_states)} run(s), {report.run_state}; {report.verdict.units} units checked, "
                   f"{report.verdict.checked_images} images re-checked: {verdict}")
        for problem in report.verdict.problems:
            click.echo(f"  - {problem}")
        click.echo(f"work folder: {folder}")
    sys.exit(0 if report.ok else 1)


# ---- serve ------------------------------------------------------------------------


@main.command()
@click.argument("folder", type=click.Path(path_type=Path), default=Path("workflows"))
@_store_option
@_site_option
@_token_option
@click.option("--speed", type=float, default=1.0, show_default=True,
              help="Clock speed of the embedded site and of the cron clock (demos, tests).")
def serve(folder: Path, store: Path | None, site_url: str | None, token_file: str | None, speed: float) -> None:
    """Run the scheduled workflows of FOLDER on cron until SIGTERM/SIGINT (SIGHUP: reload)."""
    from flowcopy import commands

    sys.exit(commands.serve(folder, _store(store), site_url=site_url, token_file=token_file, speed=speed))


@main.command()
@click.argument("name")
@_store_option
def pause(name: str, store: Path | None) -> None:
    """Stop firing workflow NAME (runs in flight go on) until `flowcopy unpause NAME`."""
    from flowcopy import commands

    sys.exit(commands.pause(_store(store), name, True))


@main.command()
@click.argument("name")
@_store_option
def unpause(name: str, store: Path | None) -> None:
    """Fire workflow NAME on its schedule again."""
    from flowcopy import commands

    sys.exit(commands.pause(_store(store), name, False))
