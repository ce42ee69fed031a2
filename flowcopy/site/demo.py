"""A point-in-time copy on the seed's LUNs, shown to a person: the site parts of `flowcopy demo`.

It drives the synchronous array core directly (no engine, no trio), so it runs in well
under a second and shows exactly the FlashCopy rules: after establish the source keeps
changing, the target keeps the image of the instant of establish.
"""

from __future__ import annotations

import sqlite3
import tempfile
from pathlib import Path

import trio
from rich.console import Console
from rich.table import Table

from flowcopy.site import checker
from flowcopy.site.api import TRACK_SIZE, CopyMode, FlashOptions
from flowcopy.site.apps import sqlite_check
from flowcopy.site.ess import Array

SOURCE, TARGET = "20313698", "20413698"  # LSS 13 of box 698: E: of W2K_1 and of the second guest
CAPACITY = 256 * 2**20

# What the guest has on E: before the backup: (byte offset, text)
BEFORE = [
    (0, "NTFS    E_drive_W2K_1 boot sector"),
    (TRACK_SIZE + 512, "payroll.csv: 2026-11 Alice 4100, Bob 3900"),
    (100 * TRACK_SIZE, "orders.db page 100: order 7741 shipped"),
    (4095 * TRACK_SIZE + 60_000, "last track: $LogFile restart area v1"),
]
# What changes on the source after establish
AFTER = [
    (TRACK_SIZE + 512, "payroll.csv: 2026-12 Alice 9999, Mallory 1"),
    (100 * TRACK_SIZE, "orders.db page 100: order 7741 CANCELLED"),
    (2000 * TRACK_SIZE, "new file written after the copy"),
]


def _preview(data: bytes) -> str:
    text = data.rstrip(b"\0").decode("ascii", errors="replace")
    return text if text else "[dim](zeros)[/dim]"


def array_demo(console: Console) -> bool:
    """Show source-now vs target-image for the tracks changed after establish.

    True iff every byte of the target equals the source as it was at establish.
    """
    array = Array()
    array.add_volume(SOURCE, lss="13", capacity=CAPACITY, label="E_drive_W2K_1")
    array.add_volume(TARGET, lss="13", capacity=CAPACITY, label="E_Drive_W2K_2")
    now = 0.0
    for offset, text in BEFORE:
        array.write(SOURCE, offset, text.encode(), now=now)

    before_extents = array.extents(SOURCE, now=now)
    before = [array.read(SOURCE, e.offset, e.length, now=now) for e in before_extents]

    now = 10.0
    rel = array.establish(SOURCE, TARGET, FlashOptions(mode=CopyMode.NOCOPY, tag="demo"), now=now)
    console.print(
        f"[bold]FlashCopy[/bold] {SOURCE} -> {TARGET} established at site time {rel.created:.0f} s "
        f"({rel.mode.value}, {rel.total_tracks:,} tracks of {TRACK_SIZE // 1024} KiB, "
        f"{rel.out_of_sync_tracks:,} out of sync: nothing copied yet)"
    )

    now = 20.0
    for offset, text in AFTER:
        array.write(SOURCE, offset, text.encode(), now=now)

    table = Table(title=f"After the source changed (site time {now:.0f} s)", show_lines=True)
    table.add_column("track", justify="right")
    table.add_column("offset", justify="right")
    table.add_column(f"source {SOURCE} now")
    table.add_column(f"target {TARGET} (point in time)")
    for offset, text in AFTER:
        length = max([len(text)] + [len(t) for o, t in BEFORE if o == offset])
        table.add_row(
            str(offset // TRACK_SIZE),
            f"{offset:,}",
            _preview(array.read(SOURCE, offset, length, now=now)),
            _preview(array.read(TARGET, offset, length, now=now)),
        )
    console.print(table)

    (info,) = array.query(volume=SOURCE, now=now)
    target_extents = array.extents(TARGET, now=now)
    target = [array.read(TARGET, e.offset, e.length, now=now) for e in target_extents]
    same = target_extents == before_extents and target == before
    copied = info.total_tracks - info.out_of_sync_tracks
    if same:
        console.print(
            f"[green]Target {TARGET} still holds the point-in-time image of {SOURCE} taken at "
            f"{rel.created:.0f} s[/green]: every byte equal to the source before the changes "
            f"({copied} tracks copied-before-write, the other {info.out_of_sync_tracks:,} read through "
            f"from the unchanged source)."
        )
    else:
        console.print(f"[red]Target {TARGET} differs from the image of {SOURCE} at establish.[/red]")
    return same


# ---------------------------------------------------------------------------- real SQLite

BANK_LUNS = {"source": ("25013698", "25214698"), "copy": ("25113698", "25314698")}  # S: + T: of each guest


def bank_demo(console: Console, state_dir: Path) -> bool:
    """After the demo's runs: the SQL guest's SQLite bank and its copy, counted by the stdlib's sqlite3.

    True iff the copy passes SQLite's judgement (recovery, integrity_check, invariant, the
    point in time recorded at establish).
    """
    return trio.run(_bank_demo, console, state_dir)


async def _bank_demo(console: Console, state_dir: Path) -> bool:
    from flowcopy.site.persist import open_site

    table = Table(title="The SQL guest's SQLite bank (main file S:, rollback journal T:), read by Python's sqlite3")
    for column in ("", "LUNs", "accounts", "history rows", "total balance", "SQLite's verdict"):
        table.add_column(column)
    ok = False
    async with open_site(state_dir, workloads=False) as site:
        for role, serials in BANK_LUNS.items():
            report = await site.check(list(serials))
            read = await checker.pull_images(site, list(serials))
            counts = await trio.to_thread.run_sync(_counts, read, list(serials))
            verdict = "[green]ok[/green]" if report.consistent else f"[red]{'; '.join(report.problems)[:120]}[/red]"
            point = report.summary.get(f"{'+'.join(serials)}:committed_at_establish")
            if point is not None:
                verdict += f" (≥ {point} commits at establish)"
            table.add_row(role, " + ".join(serials), *counts, verdict)
            ok = report.consistent if role == "copy" else ok
    console.print(table)
    return ok


def _counts(read: checker.Read, serials: list[str]) -> tuple[str, str, str]:
    """Row counts from the standard library's SQLite on files exported from the LUNs."""
    with tempfile.TemporaryDirectory(prefix="flowcopy-demo-") as tmp:
        names = sqlite_check.export_files(read, serials, Path(tmp))
        main = next((n for n in names if not n.endswith(("-journal", "-wal"))), None)
        if main is None or not (Path(tmp) / main).exists():
            return ("-", "-", "-")
        con = sqlite3.connect(Path(tmp) / main)
        try:
            accounts, total = con.execute("SELECT count(*), sum(balance) FROM accounts").fetchone()
            (history,) = con.execute("SELECT count(*) FROM history").fetchone()
        finally:
            con.close()
    return (f"{accounts:,}", f"{history:,}", f"{total:,}")
