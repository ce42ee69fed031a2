"""The journal's schema as versioned migrations, one text for both backends.

MIGRATIONS[i] takes the schema from version i to i+1. SQLite records the version in
`PRAGMA user_version`, PostgreSQL in the `flowcopy_schema` table; the statements are
the same (types both accept: TEXT, INTEGER, BIGINT, DOUBLE PRECISION).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flowcopy.journal import catalog

Step = str | Callable[[Callable[..., Any]], None]
"""A statement, or a data step called with the backend's `execute(sql, params)` (`?`
placeholders) inside the migration's transaction."""

MIGRATIONS: tuple[tuple[Step, ...], ...] = (
    # 1: base schema: runs, units (current state), events (append-only)
    (
        """CREATE TABLE runs (
            run_id TEXT PRIMARY KEY,
            workflow TEXT NOT NULL,
            definition TEXT NOT NULL,
            state TEXT NOT NULL,
            created DOUBLE PRECISION NOT NULL,
            finished DOUBLE PRECISION,
            number INTEGER NOT NULL,
            cancel_requested INTEGER NOT NULL DEFAULT 0,
            UNIQUE (workflow, number)
        )""",
        """CREATE TABLE units (
            unit_id TEXT PRIMARY KEY,
            run_id TEXT NOT NULL REFERENCES runs (run_id),
            position INTEGER NOT NULL,
            state TEXT NOT NULL,
            data TEXT NOT NULL,
            updated DOUBLE PRECISION NOT NULL,
            seq INTEGER NOT NULL
        )""",
        """CREATE TABLE events (
            unit_id TEXT NOT NULL REFERENCES units (unit_id),
            seq INTEGER NOT NULL,
            run_id TEXT NOT NULL,
            from_state TEXT NOT NULL,
            to_state TEXT NOT NULL,
            event TEXT NOT NULL,
            payload TEXT NOT NULL,
            time DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (unit_id, seq)
        )""",
    ),
    # 2: indexes for the recovery and status reads (unfinished units, a run's units and
    # events), which otherwise scan whole tables once the journal holds months of runs
    (
        "CREATE INDEX units_by_run ON units (run_id, position)",
        "CREATE INDEX units_by_state ON units (state)",
        "CREATE INDEX events_by_run ON events (run_id, time)",
    ),
    # 3: several engines on one journal. A unit is held by at most one engine (`owner`);
    # `epoch` counts its claims and fences every write. An engine's lease is its row in
    # `engines` (renewed with one statement). `fires` makes a scheduled slot's identity
    # (workflow + cron-clock time) unique, so each slot fires once across services.
    # `lss_owners`: which engine may freeze an LSS (an unfreeze releases the whole LSS).
    (
        "ALTER TABLE units ADD COLUMN owner TEXT",
        "ALTER TABLE units ADD COLUMN epoch INTEGER NOT NULL DEFAULT 0",
        "CREATE INDEX units_by_owner ON units (owner)",
        "ALTER TABLE events ADD COLUMN engine TEXT",
        """CREATE TABLE engines (
            engine_id TEXT PRIMARY KEY,
            host TEXT NOT NULL,
            pid INTEGER NOT NULL,
            started DOUBLE PRECISION NOT NULL,
            heartbeat DOUBLE PRECISION NOT NULL,
            lease_until DOUBLE PRECISION NOT NULL,
            lease_period DOUBLE PRECISION NOT NULL,
            stopped DOUBLE PRECISION
        )""",
        """CREATE TABLE fires (
            workflow TEXT NOT NULL,
            slot TEXT NOT NULL,
            outcome TEXT NOT NULL,
            reason TEXT NOT NULL,
            decided DOUBLE PRECISION NOT NULL,
            engine TEXT,
            PRIMARY KEY (workflow, slot)
        )""",
        """CREATE TABLE lss_owners (
            lss TEXT PRIMARY KEY,
            engine_id TEXT NOT NULL
        )""",
    ),
    # 4: the backup catalog's own records: re-verifications of images (append-only) and
    # the backups retention removed (with what it removed, so nothing is removed twice)
    (
        """CREATE TABLE verifications (
            backup_id TEXT NOT NULL,
            time DOUBLE PRECISION NOT NULL,
            checker TEXT NOT NULL,
            ok INTEGER NOT NULL,
            detail TEXT NOT NULL
        )""",
        "CREATE INDEX verifications_by_backup ON verifications (backup_id, time)",
        """CREATE TABLE forgotten (
            backup_id TEXT PRIMARY KEY,
            time DOUBLE PRECISION NOT NULL,
            reason TEXT NOT NULL,
            actions TEXT NOT NULL
        )""",
    ),
    # 5: which site a run acted on (a simulation must say so in status), and why a run
    # ended without driving units (a plan that could not be made: status and the service see it)
    (
        "ALTER TABLE runs ADD COLUMN site TEXT",
        "ALTER TABLE runs ADD COLUMN error TEXT",
    ),
    # 6: the flat backup catalog (one row per backup disk) and the LUN writes that make a
    # backup gone, kept up to date by the moves themselves, so `flowcopy backups` reads one
    # indexed table instead of decoding every unit; backfilled from the journal's units
    (*catalog.MIGRATION, catalog.backfill),
    # 7: the fencing epoch of each LSS's ownership (`lss_owners`), kept after the owner gives
    # it back so it only grows: the LSS-wide calls (freeze, unfreeze) carry it, and the
    # site refuses an old owner's unfreeze once a newer owner's call has reached it
    (
        """CREATE TABLE lss_epochs (
            lss TEXT PRIMARY KEY,
            epoch INTEGER NOT NULL
        )""",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)
