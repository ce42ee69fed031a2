"""The bodies of `flowcopy backups / verify / restore / forget`: trio runs, output, exit codes.

Exit codes: 0 done (and every image fine), 1 something checked bad (an image failed
verify, a restore did not verify, a VM past its RPO with --check-rpo), 2 an error the
admin acts on (one line: where, why, what to do).
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import trio

from flowcopy.backups import catalog, rpo
from flowcopy.backups.catalog import OK, Backup
from flowcopy.journal import Journal, StoreLocked, is_url, local_dir, read_lock_holder
from flowcopy.site.api import Site


class CommandError(Exception):
    """One line for the admin; exit 2."""


def _err(message: str) -> int:
    print(f"flowcopy: {message}", file=sys.stderr)
    return 2


def _run(fn: Any) -> tuple[Any, int | None]:
    from flowcopy.commands import _run_trio

    try:
        return _run_trio(fn)
    except BaseException as exc:
        from flowcopy.backups.forget import ForgetError
        from flowcopy.backups.restore import RestoreRefused
        from flowcopy.commands import _leaves

        leaves = [e for e in _leaves(exc) if not isinstance(e, trio.Cancelled)]
        mine = (CommandError, RestoreRefused, ForgetError, catalog.UnknownBackup)
        if leaves and all(isinstance(e, mine) for e in leaves):
            return None, _err(str(leaves[0]))
        raise


def _check_store(store: Path) -> None:
    if is_url(store):
        return  # a PostgreSQL journal: Journal.open says in one line when it is not there
    if not (store / "journal.sqlite").exists():
        raise CommandError(f"{store}: no journal here (nothing has run with this store)")


@asynccontextmanager
async def _site(store: Path, site_url: str | None, token_file: str | None, *, embedded: bool) -> AsyncIterator[Site | None]:
    """The served site, or the store's embedded site when `embedded` (only while we hold
    the store: two processes must not both drive the embedded array); None otherwise."""
    url = site_url or os.environ.get("FLOWCOPY_SITE") or None
    if url and url != "embedded":
        from flowcopy.site.client import connect_site

        async with connect_site(url, token_file or os.environ.get("FLOWCOPY_SITE_TOKEN_FILE")) as site:
            yield site
        return
    folder = local_dir(store) / "site"
    if not embedded or not folder.exists():
        yield None
        return
    from flowcopy.site.persist import open_site

    async with open_site(folder, workloads=False) as site:
        yield site


@asynccontextmanager
async def _journal(store: Path, *, write: bool) -> AsyncIterator[tuple[Journal, bool]]:
    """(journal, holds the store). Reads fall back to a lock-free view while an engine runs."""
    _check_store(store)
    if is_url(store):
        # a shared PostgreSQL journal: reads register no engine; the embedded site in the
        # local folder is ours to open only while no engine of the journal is live
        journal = Journal.open(store, lock=write)
        try:
            ours = write or not any(e.live for e in journal.engines())
        except BaseException:
            journal.close()
            raise
    else:
        try:
            journal, ours = Journal.open(store), True
        except StoreLocked as exc:
            if write:
                raise CommandError(f"{exc}: wait for it to finish (or stop it), then try again") from None
            journal, ours = Journal.open(store, lock=False), False
    try:
        if write:
            async with trio.open_nursery() as nursery:
                await nursery.start(journal.run_writer)
                yield journal, ours
                nursery.cancel_scope.cancel()
        else:
            yield journal, ours
    finally:
        journal.close()


def _when(t: float | None) -> str:
    if t is None:
        return "?"
    return _minute(int(t // 60))


@functools.lru_cache(maxsize=4096)
def _minute(minute: int) -> str:
    """The listing's time column (a run's backups share their minute: formatted once)."""
    return datetime.fromtimestamp(minute * 60, timezone.utc).strftime("%Y-%m-%d %H:%M")


@functools.lru_cache(maxsize=4096)
def _size(n: int) -> str:
    x = float(n)
    for unit in ("B", "K", "M", "G", "T"):
        if x < 1024 or unit == "T":
            return f"{x:.0f}{unit}" if unit == "B" or x >= 10 else f"{x:.1f}{unit}"
        x /= 1024
    return str(n)


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


_WHERE = {"export": "export", "target": "target", "incremental pair": "incr", "nocopy target": "nocopy"}


@functools.lru_cache(maxsize=1024)
def _columns(workflow: str, vms: tuple[str, ...], size: int, where: str) -> str:
    """The middle columns of a line, shared by every backup of a rotation slot."""
    kinds = "+".join(sorted({_WHERE.get(w, w) for w in where.split("+")}))
    return f"{_cut(workflow, 18):<18} {_cut(','.join(vms), 13):<13} {_size(size):>5} {_cut(kinds, 7):<7}"


def table_lines(backups: Sequence[Backup]) -> list[str]:
    """restic-snapshots-like lines, newest first, within 80 columns."""
    lines = [f"{'ID':<8} {'Time (UTC)':<16} {'Workflow':<18} {'VMs':<13} {'Size':>5} {'Where':<7} Status"]
    lines.append("-" * 79)
    ok = 0
    add = lines.append
    times: dict[float | None, str] = {}  # a run's backups share their time and columns:
    middles: dict[tuple[Any, ...], str] = {}  # each is formatted once (100,000 lines list in a blink)
    for b in backups:
        status, wall = b.status, b.wall_time
        when = times.get(wall)
        if when is None:
            when = times[wall] = f"{_when(wall):<16}"
        key = (b.workflow, b.vms, b.size, b.where)
        middle = middles.get(key)
        if middle is None:
            middle = middles[key] = _columns(*key)
        add(f"{b.id:<8} {when} {middle} {status}")
        if status == OK:
            ok += 1
        else:
            why = b.why
            add("         " + (why if len(why) <= 70 else why[:69] + "…"))
    lines.append("-" * 79)
    lines.append(f"{len(backups)} backups, {ok} restorable")
    return lines


def rpo_of(journal: Journal, backups: Sequence[Backup]) -> list[rpo.VmRpo]:
    workflows: dict[str, tuple[float, list[str]]] = {}
    latest: dict[str, Any] = {}
    for run in journal.runs():
        latest[run.workflow] = run
    for name, run in latest.items():
        from flowcopy.durations import DurationError, parse_duration

        try:
            seconds = parse_duration(run.definition.get("rpo")) if run.definition.get("rpo") else None
        except DurationError:
            seconds = None  # a definition this flowcopy cannot read: no RPO to judge by
        if not seconds:
            continue
        vms = [vm for u in journal.units(run.run_id) for vm in u.data.get("spec", {}).get("vms", [])]
        workflows[name] = (float(seconds), vms)
    return rpo.status(backups, workflows, time.time())


def rpo_summary(journal: Journal) -> list[rpo.VmRpo]:
    """For `flowcopy status`: RPO lines from the journal and files alone (no site call)."""
    if not any(r.definition.get("rpo") for r in journal.runs()):
        return []
    return rpo_of(journal, trio.run(catalog.live, journal, None))


# --------------------------------------------------------------------------- backups


def list_backups(store: Path, *, vm: str | None, workflow: str | None, as_json: bool, check_rpo: bool,
                 show_all: bool, site_url: str | None, token_file: str | None) -> int:
    async def main() -> tuple[list[Any], list[rpo.VmRpo], str]:
        async with _journal(store, write=False) as (journal, held):
            async with _site(store, site_url, token_file, embedded=held) as site:
                note = ""
                if site is None and not held and is_url(store):
                    note = "array not consulted: engines of this journal are live; statuses use the journal and files only"
                elif site is None and not held:
                    holder = read_lock_holder(store)
                    note = ("array not consulted: the store is held by pid "
                            f"{holder[0] if holder else '?'}; statuses use the journal and files only")
                if as_json:
                    backups = await catalog.load(journal, site)
                    return backups, rpo_of(journal, backups), note
                # the table: one line per backup, full objects only for those still in question
                lines, live = await catalog.listing(journal, site)
                return lines, rpo_of(journal, live), note

    result, code = _run(main)
    if code is not None:
        return code
    backups, rpos, note = result
    shown = [b for b in backups if (show_all or b.status != catalog.FORGOTTEN)
             and (vm is None or vm in b.vms) and (workflow is None or b.workflow == workflow)]
    rpos = [r for r in rpos if (vm is None or r.vm == vm) and (workflow is None or r.workflow == workflow)]
    if as_json:
        print(json.dumps({"backups": [b.to_json() for b in shown], "rpo": [r.to_json() for r in rpos]}))
    else:
        print("\n".join(table_lines(shown)))
        if rpos:
            print("RPO:")
            for r in rpos:
                print("  " + r.line())
        if note:
            print(note)
    return 1 if check_rpo and any(r.past for r in rpos) else 0


def show(store: Path, ref: str, *, as_json: bool, site_url: str | None, token_file: str | None) -> int:
    async def main() -> Backup:
        async with _journal(store, write=False) as (journal, held):
            async with _site(store, site_url, token_file, embedded=held) as site:
                return catalog.find(await catalog.load(journal, site), ref)

    b, code = _run(main)
    if code is not None:
        return code
    if as_json:
        print(json.dumps(b.to_json()))
        return 0
    print(f"backup {b.id}: {b.status}{' — ' + b.why if b.why else ''}")
    print(f"  workflow {b.workflow}, run {b.run_id}, unit {b.unit_id}")
    print(f"  VMs {', '.join(b.vms)}; mode {b.mode}; {b.size} bytes")
    site_time = "?" if b.site_time is None else f"{b.site_time:.3f} s"
    print(f"  point in time: {_when(b.wall_time)} UTC (site time {site_time}); checked at backup: {b.check_kind}")
    v = b.last_verification
    if v is None:
        print("  last verification: none since the backup")
    else:
        verdict = "ok" if v.ok else "FAILED: " + str(v.detail.get("problem", ""))
        print(f"  last verification: {_when(v.time)} UTC by {v.checker} checker: {verdict}")
    for d in b.disks:
        where = f"file {d.export} (sha256 {d.sha256})" if d.export else f"{d.where} LUN {d.target}"
        print(f"  {d.vm} {d.disk}: source {d.source}, {d.capacity} bytes -> {where}")
    return 0


# --------------------------------------------------------------------------- verify


def verify(store: Path, refs: Sequence[str], *, every: bool, as_json: bool, site_url: str | None, token_file: str | None) -> int:
    from flowcopy.backups import verify as verifier

    if not refs and not every:
        return _err("verify: name backup IDs or give --all")

    async def main() -> list[verifier.Result]:
        async with _journal(store, write=True) as (journal, _):
            async with _site(store, site_url, token_file, embedded=True) as site:
                if site is None:
                    raise CommandError(f"{store}: no site state here to read images from")
                backups = await catalog.load(journal, site)
                chosen = [b for b in backups if b.status == OK] if every else [catalog.find(backups, r) for r in refs]
                return await verifier.verify(journal, site, chosen)

    results, code = _run(main)
    if code is not None:
        return code
    if as_json:
        print(json.dumps([{"id": r.backup.id, "ok": r.ok, "checker": r.checker, "problems": list(r.problems)} for r in results]))
    else:
        for r in results:
            print(f"{r.backup.id} ok ({r.checker} consistent, image as recorded)" if r.ok else f"{r.backup.id} FAILED: {r.problem}")
        if not results:
            print("no restorable backups to verify")
    failed = [r for r in results if not r.ok]
    if failed:
        print(f"flowcopy: verify: {len(failed)} of {len(results)} failed; first: {failed[0].backup.id}: {failed[0].problem}", file=sys.stderr)
        return 1
    return 0


# --------------------------------------------------------------------------- restore


def _confirm(plan: Any) -> bool:
    import click

    if not sys.stdin.isatty():
        return False
    return click.confirm("\n".join(plan.in_use) + "\noverwrite?", default=False)


async def start_restore(engine: Any, plan: Any) -> tuple[Any, Any]:
    """Journal a restore run for `plan` and drive it; (summary, its unit row)."""
    from flowcopy.stages import UnitSpec

    vms = tuple(dict.fromkeys([*plan.stop_vms, *(u for s in plan.steps for u in s.dest_users)]))
    spec = UnitSpec(unit_id="", kind="restore", vms=vms, disks=(), quiesce="poweroff", restore=plan.to_data())
    definition = {"name": "restore", "kind": "restore", "restore": plan.to_data()}
    run_id = await engine.begin_run("restore", definition, [spec])
    summary = await engine.drive_run(run_id)
    return summary, engine.journal.units(run_id)[0]


def restore(store: Path, ref: str, *, disks: Sequence[str], to: Sequence[str], dry_run: bool, yes: bool, as_json: bool,
            site_url: str | None, token_file: str | None, speed: float = 1.0) -> int:
    from flowcopy import logs, runner
    from flowcopy.backups import restore as restorer

    logs.configure(level="warning")
    _check_store(store)
    state: dict[str, Any] = {}

    async def main() -> Any:
        async with runner.open_site(store, site_url, token_file, speed=speed) as site:
            async with runner.open_engine(store, site) as engine:  # the store's lock: one engine
                await site.now()
                if not dry_run:
                    state["resumed"] = await engine.resume()
                backups = await catalog.load(engine.journal, site)
                backup = catalog.find(backups, ref)
                plan = await restorer.make_plan(site, backup, backups, disks=disks, to=to)
                state["plan"] = plan
                if dry_run:
                    return None
                if plan.in_use and not yes and not await trio.to_thread.run_sync(_confirm, plan):
                    raise CommandError(
                        "; ".join(plan.in_use) + ": not restoring without confirmation "
                        "(run on a terminal to be asked, or pass --yes)"
                    )
                return await start_restore(engine, plan)

    result, code = _run(main)
    if code is not None:
        return code
    plan = state["plan"]
    if dry_run:
        if as_json:
            print(json.dumps({"dry_run": True, "plan": plan.to_data()}))
        else:
            print("\n".join(plan.describe()))
            print("dry run: nothing changed")
        return 0
    summary, unit = result
    data = unit.data
    if as_json:
        print(json.dumps({**summary.to_json(), "plan": plan.to_data(), "check": data.get("check"),
                          "restored_at": data.get("established_at"), "started_at": data.get("started_at"),
                          "copied_at": data.get("copied_at")}))
    else:
        print("\n".join(plan.describe()))
        if summary.state == "succeeded" and summary.verified:
            check = data.get("check", {})
            print(f"restored: run {summary.run_id}; the checker finds the restored LUNs consistent ({check.get('kind')}); "
                  f"VMs running: {', '.join(plan.stop_vms) or 'none were stopped'}")
        else:
            print(f"restore {summary.run_id} {summary.state}: " + "; ".join(summary.failures.values()))
    return 0 if summary.state == "succeeded" and summary.verified else 1


# --------------------------------------------------------------------------- forget


def forget(store: Path, *, workflow: str | None, dry_run: bool, as_json: bool, site_url: str | None, token_file: str | None) -> int:
    from flowcopy.backups import forget as retention

    async def main() -> list[retention.Decision]:
        async with _journal(store, write=not dry_run) as (journal, held):
            if dry_run and not held:
                raise CommandError(f"store {store} is held by a running engine; try again when it is free")
            async with _site(store, site_url, token_file, embedded=True) as site:
                if site is None:
                    raise CommandError(f"{store}: no site state here")
                return await retention.apply(journal, site, store, workflow=workflow, dry_run=dry_run)

    decisions, code = _run(main)
    if code is not None:
        return code
    if as_json:
        print(json.dumps([{"id": d.backup.id, "workflow": d.backup.workflow, "keep": d.keep, "reason": d.reason} for d in decisions]))
        return 0
    for d in decisions:
        word = "keep  " if d.keep else ("would remove" if dry_run else "removed")
        print(f"{word} {d.backup.id} {d.backup.workflow} {_when(d.backup.wall_time)}: {d.reason}")
    if not decisions:
        print("no workflow with a retention policy has backups")
    if dry_run:
        print("dry run: nothing changed")
    return 0
