"""Shared fixtures.

pytest-trio's own `autojump_clock` fixture runs a test on `MockClock(autojump_threshold=0)`,
so hours of site time (background copies, ELB and freeze timeouts) take milliseconds.
"""

from __future__ import annotations

from hypothesis import settings

# No per-example deadline: on a loaded 2-core CI machine a deadline is a timing assertion,
# and timing belongs in `flowcopy bench`, not in tests.
settings.register_profile("flowcopy", deadline=None)
settings.load_profile("flowcopy")


import os  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

_REPO_STORE = Path(__file__).resolve().parent.parent / "store"


def _files(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*")} if folder.is_dir() else set()


@pytest.fixture(autouse=True, scope="session")
def _never_write_the_users_store() -> Iterator[None]:
    """Every test has its own store: fail the session if ./store or $FLOWCOPY_STORE gains files."""
    watched = {_REPO_STORE, Path.cwd() / "store"}
    if os.environ.get("FLOWCOPY_STORE"):
        watched.add(Path(os.environ["FLOWCOPY_STORE"]).resolve())
    before = {folder: _files(folder) for folder in watched}
    yield
    grown = {folder: sorted(_files(folder) - files) for folder, files in before.items()}
    grown = {folder: new for folder, new in grown.items() if new}
    if grown:
        lines = [f"{folder}: {', '.join(str(p.relative_to(folder)) for p in new[:10])}" for folder, new in grown.items()]
        pytest.fail("a test wrote into a user's store (use tmp_path):\n" + "\n".join(lines), pytrace=False)


# A real PostgreSQL server for the journal's PostgreSQL backend: one per test session
# (initdb + pg_ctl in a temporary folder, on a free loopback port), one database per
# test. Missing server binaries fail loudly (flowcopy.pgserver.PgUnavailable).
import uuid  # noqa: E402

@pytest.fixture(scope="session")
def pg_server():  # type: ignore[no-untyped-def]
    from flowcopy.pgserver import PgServer

    with PgServer() as server:
        yield server


@pytest.fixture
def pg_url(pg_server) -> str:  # type: ignore[no-untyped-def]
    return pg_server.create_database(f"t_{uuid.uuid4().hex[:12]}")
