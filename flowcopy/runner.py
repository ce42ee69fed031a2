"""One-shot runs and resumes: what `flowcopy run` and `flowcopy resume` do, as a library.

Opens the store (journal + lock), opens the site (the embedded, durable site in
`STORE/site` by default, or a served one by URL), resumes whatever the store left
unfinished, then starts the new run and drives it to the end.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from flowcopy import definitions, planning
from flowcopy.engine import Engine, Limits, RunSummary
from flowcopy.journal import Journal
from flowcopy.site.api import Site

DEFAULT_STORE = Path("store")


def default_store() -> Path:
    return Path(os.environ.get("FLOWCOPY_STORE", DEFAULT_STORE))


@asynccontextmanager
async def open_site(
    store: Path,
    url: str | None = None,
    token_file: str | None = None,
    *,
    lab: str | None = None,
    speed: float = 1.0,
) -> AsyncIterator[Site]:
    """The site a run acts on: served (URL) or embedded and durable in `store/site`."""
    url = url or os.environ.get("FLOWCOPY_SITE") or None
    if url and url != "embedded":
        from flowcopy.site.client import connect_site

        async with connect_site(url, token_file or os.environ.get("FLOWCOPY_SITE_TOKEN_FILE")) as site:
            yield site
        return
    from flowcopy.site.persist import open_site as open_durable

    async with open_durable(store / "site", lab=lab, speed=speed) as site:
        yield site


@asynccontextmanager
async def open_engine(store: Path, site: Site, *, limits: Limits | None = None) -> AsyncIterator[Engine]:
    """A journal on `store` with its group-commit writer running, and an engine over it."""
    journal = Journal.open(store)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(journal.run_writer)
            yield Engine(journal, site, store=store, limits=limits)
            nursery.cancel_scope.cancel()
    finally:
        journal.close()


async def run_file(
    path: Path,
    *,
    store: Path,
    site_url: str | None = None,
    token_file: str | None = None,
    lab: str | None = None,
    speed: float = 1.0,
    limits: Limits | None = None,
    on_engine: Callable[[Engine, str | None], Any] | None = None,
) -> tuple[list[RunSummary], RunSummary]:
    """Load, validate, resume what was unfinished, then run `path` once; returns summaries."""
    workflow = definitions.load_definition(path)
    lab = lab or workflow.site.lab
    async with open_site(store, site_url or planning.site_url(workflow), token_file, lab=lab, speed=speed) as site:
        async with open_engine(store, site, limits=limits or planning.limits(workflow)) as engine:
            if on_engine:
                on_engine(engine, None)
            await site.now()  # an unreachable site fails here, before any run is touched
            resumed = await engine.resume()
            specs = await planning.plan_units(workflow, site)
            run_id = await engine.begin_run(workflow.name, planning.definition_data(workflow), specs)
            if on_engine:
                on_engine(engine, run_id)
            summary = await engine.drive_run(run_id)
            return resumed, summary


async def resume_store(
    *,
    store: Path,
    site_url: str | None = None,
    token_file: str | None = None,
    lab: str | None = None,
    speed: float = 1.0,
    on_engine: Callable[[Engine, str | None], Any] | None = None,
) -> list[RunSummary]:
    async with open_site(store, site_url, token_file, lab=lab, speed=speed) as site:
        async with open_engine(store, site) as engine:
            if on_engine:
                on_engine(engine, None)
            await site.now()
            return await engine.resume()
