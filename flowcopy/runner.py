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
    return as_store(os.environ.get("FLOWCOPY_STORE", str(DEFAULT_STORE)))  # type: ignore[return-value]


def as_store(value: str | Path) -> Path | str:
    """A `--store` value: a folder (SQLite journal) or a `postgresql://` URL, kept whole."""
    from flowcopy.journal import is_url

    return value if is_url(value) else Path(value)


def local_dir(store: Path | str) -> Path:
    from flowcopy.journal import local_dir as journal_local_dir

    return journal_local_dir(store)


def resolve_site_url(url: str | None) -> str | None:
    """The served site a run acts on, or None for the embedded model in the store."""
    url = url or os.environ.get("FLOWCOPY_SITE") or None
    return None if url == "embedded" else url


def site_label(store: Path, url: str | None) -> str:
    """Which site a run acts on, in words every summary and status line carries: a run
    against the embedded model is a simulation and must never look like a real backup."""
    url = resolve_site_url(url)
    if url:
        return f"served site {url}"
    return f"embedded site model in {local_dir(store) / 'site'} (simulation: no --site or $FLOWCOPY_SITE)"


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
    url = resolve_site_url(url)
    if url:
        from flowcopy.site.client import connect_site

        async with connect_site(url, token_file or os.environ.get("FLOWCOPY_SITE_TOKEN_FILE")) as site:
            yield site
        return
    from flowcopy.site.persist import open_site as open_durable

    async with open_durable(local_dir(store) / "site", lab=lab, speed=speed) as site:
        yield site


@asynccontextmanager
async def open_engine(store: Path, site: Site, *, limits: Limits | None = None,
                      site_label: str | None = None) -> AsyncIterator[Engine]:
    """A journal on `store` with its group-commit writer running, and an engine over it."""
    journal = Journal.open(store)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(journal.run_writer)
            engine = Engine(journal, site, store=local_dir(store), limits=limits, site_label=site_label)
            if journal.leased:  # several engines on one journal: keep this one's lease
                await nursery.start(engine.keep_leases)
            yield engine
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
    on_site: Callable[[str], Any] | None = None,
) -> tuple[list[RunSummary], RunSummary]:
    """Load, validate, resume what was unfinished, then run `path` once; returns summaries."""
    workflow = definitions.load_definition(path)
    lab = lab or workflow.site.lab
    url = site_url or planning.site_url(workflow)
    label = site_label(store, url)
    if on_site:
        on_site(label)
    async with open_site(store, url, token_file, lab=lab, speed=speed) as site:
        async with open_engine(store, site, limits=limits or planning.limits(workflow), site_label=label) as engine:
            if on_engine:
                on_engine(engine, None)
            await site.now()  # an unreachable site fails here, before any run is touched
            resumed = await engine.resume()
            specs = await planning.plan_or_journal(workflow, site, engine)
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
    on_site: Callable[[str], Any] | None = None,
) -> list[RunSummary]:
    label = site_label(store, site_url)
    if on_site:
        on_site(label)
    async with open_site(store, site_url, token_file, lab=lab, speed=speed) as site:
        async with open_engine(store, site, site_label=label) as engine:
            if on_engine:
                on_engine(engine, None)
            await site.now()
            return await engine.resume()
