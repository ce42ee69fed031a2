"""Judge SQLite LUN images with the standard library's `sqlite3`: SQLite's own recovery and checks.

It shares no code with the writer (`sqlite_app`); it re-reads only the per-LUN file
header documented there ("<8s64sQB": magic b"FCLUNF01", file name, size, exists flag in
the LUN's first 4096 bytes, the file's bytes from offset 4096). It exports the files into
a private folder under their own names, opens the database there so SQLite rolls back a
hot journal or replays the WAL exactly as after a crash, and then asks:

- `PRAGMA integrity_check` (b-trees, free list, every index against its table);
- the invariant: the balances add up to the total kept in `meta`, and every account's
  balance equals its initial balance plus what its history rows moved in and out;
- the history is numbered 1..N without a gap;
- not older than its point in time: N is at least the number of transactions the
  application had acknowledged at establish (a torn WAL copy can be valid SQLite and
  still silently lose commits).
"""

from __future__ import annotations

import sqlite3
import struct
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

from flowcopy.site.api import CheckReport

Read = Callable[[str, int, int], bytes]

MAGIC = b"FCLUNF01"
HEADER = "<8s64sQB"
DATA_OFFSET = 4096


def lun_file(read: Read, serial: str) -> tuple[str, int, bool] | None:
    """(file name, size, exists) from a LUN's header; None if the LUN holds no such header."""
    head = read(serial, 0, struct.calcsize(HEADER))
    magic, raw, size, exists = struct.unpack(HEADER, head)
    if magic != MAGIC:
        return None
    return raw.rstrip(b"\0").decode(errors="replace"), size, bool(exists)


def export_files(read: Read, serials: list[str], folder: Path) -> dict[str, str]:
    """Write each LUN's file (when it exists) into `folder`; returns file name -> serial."""
    names: dict[str, str] = {}
    for serial in serials:
        info = lun_file(read, serial)
        if info is None:
            continue
        name, size, exists = info
        if "/" in name or name in ("", ".", ".."):
            raise ValueError(f"LUN {serial}: file name {name!r} is not a plain name")
        names[name] = serial
        if exists:
            (folder / name).write_bytes(read(serial, DATA_OFFSET, size))
    return names


def check_sqlite(read: Read, serials: list[str], expect: Mapping[str, object] | None = None) -> CheckReport:
    """Recover and judge the SQLite database held by `serials` (main file + journal/WAL)."""
    problems: list[str] = []
    summary: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="flowcopy-sqlite-check-") as tmp:
        folder = Path(tmp)
        names = export_files(read, serials, folder)
        mains = sorted(n for n in names if not n.endswith(("-journal", "-wal")))
        if len(mains) != 1:
            return CheckReport(False, "sqlite", (f"LUNs {', '.join(serials)} hold {len(mains)} main database files ({', '.join(mains)}), not one",), summary)
        main = mains[0]
        where = f"database {main} on {names[main]}"
        companions = [n for n in names if n != main]
        summary.update({"database": main, "files": ",".join(f"{n}@{s}" for n, s in sorted(names.items()))})
        for name in companions:
            summary[f"{name}:present"] = str((folder / name).exists())
        if not (folder / main).exists():
            return CheckReport(False, "sqlite", (f"{where}: the main file does not exist on its LUN",), summary)
        try:
            con = sqlite3.connect(folder / main, isolation_level=None)
            try:
                rows = [r[0] for r in con.execute("PRAGMA integrity_check")]
                if rows != ["ok"]:
                    problems.extend(f"{where}: integrity_check: {r}" for r in rows[:20])
                else:
                    _judge(con, where, problems, summary, expect)
            finally:
                con.close()
        except sqlite3.DatabaseError as exc:
            problems.append(f"{where}: SQLite cannot open or recover it: {exc}")
    return CheckReport(consistent=not problems, kind="sqlite", problems=tuple(problems), summary=summary)


def _judge(con: sqlite3.Connection, where: str, problems: list[str], summary: dict[str, str], expect: Mapping[str, object] | None) -> None:
    meta = dict(con.execute("SELECT key, value FROM meta"))
    total, initial = meta.get("total"), meta.get("initial_balance")
    accounts = dict(con.execute("SELECT id, balance FROM accounts"))
    count, first, last = con.execute("SELECT count(*), min(seq), max(seq) FROM history").fetchone()
    summary.update({"accounts": str(len(accounts)), "history": str(count), "last_seq": str(last or 0)})
    if total is None or sum(accounts.values()) != total:
        problems.append(f"{where}: balances add up to {sum(accounts.values())}, the total is {total}")
    if count and (first != 1 or last != count):
        problems.append(f"{where}: history has {count} rows numbered {first}..{last}: a gap")
    moved = {a: 0 for a in accounts}
    for src, dst, amount in con.execute("SELECT src, dst, amount FROM history"):
        moved[src] = moved.get(src, 0) - amount
        moved[dst] = moved.get(dst, 0) + amount
    wrong = [a for a in accounts if initial is None or accounts[a] != initial + moved.get(a, 0)]
    if wrong:
        a = wrong[0]
        problems.append(f"{where}: {len(wrong)} account(s) disagree with the history, e.g. account {a} holds "
                        f"{accounts[a]} but its history says {None if initial is None else initial + moved[a]}")
    if expect is not None:
        committed = int(expect.get("committed", 0))  # type: ignore[call-overload]
        summary["committed_at_establish"] = str(committed)
        if (last or 0) < committed:
            problems.append(f"{where}: older than its point in time: the history ends at transaction {last or 0} "
                            f"but {committed} had committed at establish (commits lost)")
