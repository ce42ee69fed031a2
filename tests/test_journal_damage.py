"""A damaged journal is refused with one line and never re-created (issue 9, point 5).

A real journal is made by a real `flowcopy run`; then it is truncated, its rows are
damaged, its bytes are flipped one at a time (a deterministic sweep), and its file system
is made read-only. Every command answers 0 or 2 with one line, never a traceback, and the
file is never started afresh (which would forget every run and renumber them from 0001).
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from flowcopy.cli import main
from flowcopy.journal import Journal, JournalError

WORKFLOW = Path(__file__).resolve().parent.parent / "workflows" / "10-w2k-e-drive.yaml"
FLIPS = 240


def flowcopy(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "flowcopy", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "FLOWCOPY_SITE": ""}, timeout=300)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A store whose journal holds one finished run (made by the real CLI)."""
    store = tmp_path_factory.mktemp("pristine") / "store"
    done = flowcopy("run", str(WORKFLOW), "--store", str(store), "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    with Journal.open(store, lock=False) as journal:
        (run,) = journal.runs()
    return store / "journal.sqlite", run.run_id


def _store_with(tmp_path: Path, journal_bytes: bytes) -> Path:
    store = tmp_path / "store"
    if store.exists():
        shutil.rmtree(store)
    store.mkdir()
    (store / "journal.sqlite").write_bytes(journal_bytes)
    return store


def _one_line_or_ok(result: object, what: str) -> None:
    exc = getattr(result, "exception", None)
    assert exc is None or isinstance(exc, SystemExit), f"{what}: {exc!r}"
    code = getattr(result, "exit_code")
    assert code in (0, 2), f"{what}: exit {code}: {getattr(result, 'output', '')[-500:]}"
    assert "Traceback" not in getattr(result, "output", "")


def test_truncated_journal_is_refused_and_never_recreated(pristine: tuple[Path, str], tmp_path: Path) -> None:
    path, _ = pristine
    store = _store_with(tmp_path, path.read_bytes())
    subprocess.run(["truncate", "-s", "0", str(store / "journal.sqlite")], check=True)
    for argv in (["run", str(WORKFLOW)], ["resume"], ["status"], ["journal", "check"]):
        done = flowcopy(*argv, "--store", str(store))
        assert done.returncode == 2, (argv, done.stdout, done.stderr)
        lines = [line for line in done.stderr.splitlines() if not line.startswith("{")]  # JSON log lines aside
        assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
        assert lines[0].startswith(f"flowcopy: {store / 'journal.sqlite'} is empty (0 bytes)")
        assert "restore journal.sqlite from your last copy" in lines[0]
        assert (store / "journal.sqlite").stat().st_size == 0  # still the damaged file, untouched


def test_backup_then_restore_brings_the_runs_back(pristine: tuple[Path, str], tmp_path: Path) -> None:
    path, run_id = pristine
    store = _store_with(tmp_path, path.read_bytes())
    copy = tmp_path / "copy.sqlite"
    result = CliRunner().invoke(main, ["journal", "backup", str(copy), "--store", str(store)])
    assert result.exit_code == 0, result.output
    again = CliRunner().invoke(main, ["journal", "backup", str(copy), "--store", str(store)])
    assert again.exit_code == 2 and "exists: flowcopy does not overwrite it" in again.output
    (store / "journal.sqlite").write_bytes(b"")
    shutil.copyfile(copy, store / "journal.sqlite")  # the documented restore
    check = CliRunner().invoke(main, ["journal", "check", "--store", str(store)])
    assert check.exit_code == 0 and "journal sound (1 run(s))" in check.output
    with Journal.open(store, lock=False) as journal:
        assert [r.run_id for r in journal.runs()] == [run_id]


@pytest.mark.parametrize("damage, expected", [
    ("UPDATE units SET data = '{not json'", "damaged row: unit .*: data is not valid JSON"),
    ("UPDATE events SET payload = CAST(X'C328FF' AS TEXT)", "cannot read the journal: Could not decode to UTF-8"),
    ("UPDATE runs SET state = 'exploded'", "damaged row: run .*: state 'exploded' is not a state flowcopy knows"),
    ("UPDATE units SET state = 'levitating'", "damaged row: unit .*: state 'levitating' is not a state flowcopy knows"),
])
def test_damaged_rows_give_one_line(pristine: tuple[Path, str], tmp_path: Path, damage: str, expected: str) -> None:
    path, run_id = pristine
    store = _store_with(tmp_path, path.read_bytes())
    conn = sqlite3.connect(store / "journal.sqlite")
    conn.execute(damage)
    conn.commit()
    conn.close()
    import re

    for argv in (["status"], ["history", run_id], ["journal", "check"]):
        result = CliRunner().invoke(main, [*argv, "--store", str(store)])
        _one_line_or_ok(result, " ".join(argv))
        if argv[0] == "journal":
            assert result.exit_code == 2
            assert re.search(expected.replace("damaged row: ", "").replace("cannot read the journal: ", ""), result.output) or \
                re.search(expected, result.output), result.output
        elif result.exit_code == 2:
            last = result.output.strip().splitlines()[-1]
            assert re.search(expected, last), last
    codes = {argv: CliRunner().invoke(main, [argv, *([run_id] if argv == "history" else []), "--store", str(store)]).exit_code
             for argv in ("status", "history")}
    assert 2 in codes.values(), codes  # whichever reads the damaged row refuses it


def test_byte_flip_sweep_never_crashes_nor_reinitialises(pristine: tuple[Path, str], tmp_path: Path) -> None:
    """FLIPS single-byte flips spread evenly over a real journal file (deterministic)."""
    path, run_id = pristine
    original = path.read_bytes()
    size = len(original)
    runner = CliRunner()
    refused = readable = 0
    for i in range(FLIPS):
        offset = (i * size) // FLIPS + (i % 7)
        damaged = bytearray(original)
        damaged[offset] ^= 0xFF
        store = _store_with(tmp_path, bytes(damaged))
        journal_file = store / "journal.sqlite"
        for argv in (["status"], ["history", run_id], ["journal", "check"], ["engines"]):
            result = runner.invoke(main, [*argv, "--store", str(store)])
            _one_line_or_ok(result, f"flip {i} at {offset}: {' '.join(argv)}")
        assert journal_file.read_bytes() == bytes(damaged), f"flip {i}: a read-only command changed the file"
        inode = journal_file.stat().st_ino
        try:
            with Journal.open(store) as journal:  # what run/resume do first
                runs = journal.runs()
                journal.unfinished_units()
            readable += 1
            # whatever it reads, it is the old journal, not a fresh one numbering from 0001
            assert [r.run_id for r in runs] == [run_id] or len(runs) >= 1, f"flip {i}: runs {runs}"
        except JournalError:
            refused += 1
        assert journal_file.stat().st_ino == inode and journal_file.stat().st_size >= size, f"flip {i}: file replaced"
    assert refused + readable == FLIPS and refused > 0


def test_read_only_file_system_is_named(pristine: tuple[Path, str], tmp_path: Path) -> None:
    """A bind mount remounted read-only in a private mount namespace (needs root, as CI)."""
    path, run_id = pristine
    store = _store_with(tmp_path, path.read_bytes())
    assert shutil.which("unshare") and os.geteuid() == 0, "this test needs root and unshare(1) (CI runs as root)"
    script = (
        f"mount --bind {store} {store} && mount -o remount,ro,bind {store} && "
        f"{sys.executable} -m flowcopy status --store {store}; echo status=$?; "
        f"{sys.executable} -m flowcopy run {WORKFLOW} --store {store}; echo run=$?; "
        f"{sys.executable} -c 'import sys; from flowcopy.journal import Journal, JournalError\n"
        f"try: Journal.open(sys.argv[1])\nexcept JournalError as e: print(\"journal:\", e)' {store}"
    )
    done = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True,
                          env={**os.environ, "FLOWCOPY_SITE": ""}, timeout=300)
    assert "status=0" in done.stdout, done.stdout + done.stderr
    assert run_id in done.stdout  # read through the read-only mount
    assert "run=2" in done.stdout, done.stdout + done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip() and not line.startswith("{")]
    assert len(lines) == 1 and "Read-only file system" in lines[0], done.stderr  # the run: one line
    assert (f"journal: store {store} is on a read-only file system: an engine writes its journal there "
            "(remount it read-write, or give a writable --store; `flowcopy status` still reads it)") in done.stdout
