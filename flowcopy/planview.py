"""`flowcopy plan FILE|NAME`: what a run would do, resolved against the live site, changing nothing.

The same planning and the same read-only prepare the engine runs (selectors matched,
consistency groups merged, pool targets chosen, every disk resolved to its LUN, every
target checked free and of the right size), so a wrong VM or a busy target is found in
the afternoon, not at 01:30. Nothing is journaled and nothing is asked of the site but
reads; with no site state in the store yet, a fresh in-memory model of the lab is used
(nothing written).
"""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from flowcopy import commands


@asynccontextmanager
async def _read_only_site(store: Path, url: str | None, token_file: str | None, lab: str | None) -> AsyncIterator[Any]:
    from flowcopy import runner

    if url:
        async with runner.open_site(store, url, token_file) as site:
            yield site
        return
    if (store / "site").exists():
        from flowcopy.site.persist import open_site

        async with open_site(store / "site", lab=lab, workloads=False) as site:  # no guest writes while we look
            yield site
        return
    from flowcopy.site.inventory import load_lab

    yield load_lab(lab)


def _next_number(store: Path, workflow: str) -> int:
    if not (store / "journal.sqlite").exists():
        return 1
    from flowcopy.journal import Journal

    journal = Journal.open(store, lock=False)
    try:
        return journal.next_run_number(workflow)
    finally:
        journal.close()


async def resolve(path: Path, store: Path, *, site_url: str | None, token_file: str | None,
                  lab: str | None) -> dict[str, Any]:
    """The plan as data: per unit its VMs, pairs (serials and LSSs), what freezes together,
    and the problem that would fail it (None when it would start)."""
    from flowcopy import definitions, planning, runner, stages
    from flowcopy.site.api import SiteError

    workflow = definitions.load_definition(path)
    url = runner.resolve_site_url(site_url or planning.site_url(workflow))
    async with _read_only_site(store, url, token_file, lab or workflow.site.lab) as site:
        await site.now()
        specs = await planning.plan_units(workflow, site)
        number = _next_number(store, workflow.name)
        units = []
        for i, spec in enumerate(specs):
            problem = None
            pairs: list[Any] = []
            try:
                pairs = await stages.prepare(site, spec, number, tag=f"fc:plan:{i}")
            except (stages.StageError, SiteError) as exc:
                problem = stages.describe(exc)
            together = stages.needs_array_freeze(spec, pairs)
            units.append({
                "unit": i,
                "vms": list(spec.vms),
                "task": spec.task,
                "group": spec.group,
                "mode": spec.mode,
                "quiesce": spec.quiesce,
                "copy": spec.copy_action,
                "pairs": [{"vm": p.vm, "disk": p.disk, "source": p.source, "source_lss": p.source_lss,
                           "target": p.target, "target_lss": p.target_lss, "bytes": p.capacity} for p in pairs],
                "frozen_together": {
                    "guests": list(spec.vms) if spec.quiesce != "none" else [],
                    "lsses": stages.frozen_lsses(pairs) if together else [],
                },
                "problem": problem,
            })
    return {
        "workflow": workflow.name,
        "file": str(path),
        "site": runner.site_label(store, url) if url or (store / "site").exists()
        else "a fresh in-memory model of the lab (no site state in the store yet; simulation)",
        "run_number": number,
        "units": units,
        "ok": all(u["problem"] is None for u in units),
    }


def plan(path: Path, store: Path, *, site_url: str | None, token_file: str | None, as_json: bool, lab: str | None) -> int:
    data, code = commands._run_trio(lambda: resolve(path, store, site_url=site_url, token_file=token_file, lab=lab),
                                    (site_url, token_file))
    if code is not None:
        return code
    if as_json:
        print(json.dumps(data))
    else:
        _print(data)
    for u in data["units"]:
        if u["problem"]:
            print(f"flowcopy: plan: unit {u['unit']} ({', '.join(u['vms']) or u['task']}) would fail: {u['problem']}",
                  file=sys.stderr)
    return commands.OK if data["ok"] else commands.USAGE


def _print(data: dict[str, Any]) -> None:
    from rich.table import Table
    from rich.text import Text

    console = commands._console()
    console.print(f"plan of {data['workflow']} ({data['file']}), run number {data['run_number']}, "
                  f"against {data['site']}: nothing changed", soft_wrap=True)
    table = Table(header_style="bold", title="units as the next run would start them")
    for col in ("unit", "VMs", "disk", "source (LSS)", "target (LSS)", "size", "frozen together"):
        table.add_column(col, overflow="fold")
    for u in data["units"]:
        frozen = u["frozen_together"]
        together = ", ".join(filter(None, [
            ("guests " + ", ".join(frozen["guests"])) if frozen["guests"] else "",
            ("LSS " + ", ".join(frozen["lsses"]) + " (consistency group)") if frozen["lsses"] else "",
        ])) or "-"
        who = ", ".join(u["vms"]) or f"task {u['task']}"
        if u["problem"]:
            table.add_row(str(u["unit"]), who, "", "", "", "", Text(f"WOULD FAIL: {u['problem']}", style="red"))
            continue
        for j, p in enumerate(u["pairs"]):
            table.add_row(str(u["unit"]) if j == 0 else "", who if j == 0 else "", f"{p['vm']} {p['disk']}",
                          f"{p['source']} ({p['source_lss']})", f"{p['target']} ({p['target_lss']})",
                          _size(p["bytes"]), together if j == 0 else "")
    console.print(table)
    console.print("[green]every unit would start[/green]" if data["ok"] else "[red]some units would fail: see below[/red]")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)
