"""The durable journal of runs and units: one interface, two backends.

`Journal.open(store)` opens a store folder's SQLite journal (the embedded default) or,
for a `postgresql://` URL, a PostgreSQL one. Callers import everything from here; the
backends' drivers never leak past this package.
"""

from flowcopy.journal.api import (
    RUN_STATES,
    DataEncoder,
    EngineRow,
    ForgottenRow,
    VerificationRow,
    EventRow,
    Journal,
    JournalClosed,
    JournalConflict,
    JournalCorrupt,
    JournalError,
    JournalNotFound,
    LeaseLost,
    LeaseRow,
    Move,
    RunRow,
    SimulatedCrash,
    StoreLocked,
    StoreUnusable,
    UnitRow,
    UnknownRun,
    is_crash,
    is_url,
    local_dir,
)
from flowcopy.journal.schema import MIGRATIONS, SCHEMA_VERSION
from flowcopy.journal.sqlite import (
    APPLICATION_ID,
    BUSY_TIMEOUT_MS,
    JOURNAL_FILE,
    LOCK_FILE,
    SqliteJournal,
    _migrate,
    read_lock_holder,
    request_cancel_sync,
)

__all__ = [
    "APPLICATION_ID", "BUSY_TIMEOUT_MS", "DataEncoder", "EngineRow", "EventRow", "JOURNAL_FILE", "Journal", "JournalClosed",
    "JournalConflict", "JournalCorrupt", "JournalError", "JournalNotFound", "LOCK_FILE", "LeaseLost", "LeaseRow",
    "MIGRATIONS", "Move", "RUN_STATES", "RunRow", "SCHEMA_VERSION", "SimulatedCrash",
    "SqliteJournal", "StoreLocked", "StoreUnusable", "UnitRow", "UnknownRun", "_migrate",
    "is_crash", "is_url", "local_dir", "read_lock_holder", "request_cancel_sync",
    "ForgottenRow", "VerificationRow",
]
