"""`flowcopy backups / verify / restore / forget` as an admin runs them: real processes,
the embedded durable site in the store, exit codes and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from .test_engine import WORKFLOWS


def flowcopy(store: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "flowcopy", *args, "--store", str(store)], capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=300, check=False)


def test_backup_list_verify_dry_run_refusal_and_restore(tmp_path: Path) -> None:
    store = tmp_path / "store"
    ran = subprocess.run([sys.executable, "-m", "flowcopy", "run", str(WORKFLOWS / "20-sql-consistency-group.yaml"),
                          "--store", str(store), "--speed", "50", "--json"], capture_output=True, text=True, timeout=300, check=False)
    assert ran.returncode == 0, ran.stderr[-2000:]
    listed = flowcopy(store, "backups", "--json")
    assert listed.returncode == 0, listed.stderr
    (backup,) = json.loads(listed.stdout)["backups"]
    assert backup["restorable"] and backup["vms"] == ["rich-w2k-os-1"]
    text = flowcopy(store, "backups")
    assert backup["id"] in text.stdout and max(len(line) for line in text.stdout.splitlines()) <= 80

    checked = flowcopy(store, "verify", backup["id"])
    assert checked.returncode == 0 and f"{backup['id']} ok (database" in checked.stdout

    runs_before = json.loads(flowcopy(store, "status", "--json").stdout)
    dry = flowcopy(store, "restore", backup["id"], "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "overwrite LUN 20513698 (mapped to rich-w2k-os-1), 134217728 bytes" in dry.stdout
    assert "power off, then on again: rich-w2k-os-1" in dry.stdout and "dry run: nothing changed" in dry.stdout
    assert json.loads(flowcopy(store, "status", "--json").stdout) == runs_before

    refused = flowcopy(store, "restore", backup["id"])  # no terminal, no --yes: a LUN in use is not overwritten
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert "LUN 20513698 is in use by rich-w2k-os-1 (powered on)" in refused.stderr and "--yes" in refused.stderr
    assert json.loads(flowcopy(store, "status", "--json").stdout) == runs_before

    unknown = flowcopy(store, "restore", "feedbeef", "--yes")
    assert unknown.returncode == 2 and "no backup 'feedbeef'" in unknown.stderr and "Traceback" not in unknown.stderr

    done = flowcopy(store, "restore", backup["id"], "--yes", "--json", "--speed", "50")
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["state"] == "succeeded" and result["verified"] and "database" in result["check"]["kind"]
    history = flowcopy(store, "history", result["run_id"])
    assert history.returncode == 0 and "restoring" in history.stdout

    forget = flowcopy(store, "forget", "--dry-run")
    assert forget.returncode == 0 and "nothing changed" in forget.stdout


def test_restore_on_a_postgresql_store_end_to_end(pg_url: str, tmp_path: Path) -> None:
    """The same commands on a shared PostgreSQL journal (a real server): the backup is
    listed from the flat catalog, the restore is a durable run in that journal and ends
    verified with the VM running; the catalog then shows the restore's own effect."""
    import os

    local = tmp_path / "local"  # the embedded site and exports: $FLOWCOPY_LOCAL
    env = {**os.environ, "FLOWCOPY_LOCAL": str(local)}

    def pg(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "flowcopy", *args, "--store", pg_url], capture_output=True,
                              text=True, stdin=subprocess.DEVNULL, timeout=300, check=False, env=env)

    ran = pg("run", str(WORKFLOWS / "20-sql-consistency-group.yaml"), "--speed", "50", "--json")
    assert ran.returncode == 0, ran.stderr[-2000:]
    listed = pg("backups", "--json")
    assert listed.returncode == 0, listed.stderr
    (backup,) = json.loads(listed.stdout)["backups"]
    assert backup["restorable"] and backup["vms"] == ["rich-w2k-os-1"]
    table = pg("backups")
    assert table.returncode == 0 and backup["id"] in table.stdout and "1 backups, 1 restorable" in table.stdout

    dry = pg("restore", backup["id"], "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "overwrite LUN 20513698 (mapped to rich-w2k-os-1), 134217728 bytes" in dry.stdout

    done = pg("restore", backup["id"], "--yes", "--json", "--speed", "50")
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["state"] == "succeeded" and result["verified"] and "database" in result["check"]["kind"]
    history = pg("history", result["run_id"])
    assert history.returncode == 0 and "restoring" in history.stdout, history.stderr
    status = json.loads(pg("status", "--json").stdout)
    assert result["run_id"] in json.dumps(status)

    from flowcopy.journal import Journal

    with Journal.open(pg_url, lock=False) as journal:
        (unit,) = journal.units(result["run_id"])
        assert unit.state == "succeeded" and unit.data["spec"]["kind"] == "restore" and unit.data["overwrote"] is True
        assert journal.restore_runs() == {result["run_id"]}
