"""`flowcopy serve` never exits on a definition problem: a file that can never fire, a
tag validate does not support, at start or on SIGHUP, is logged with FILE:LINE:COL, the
last good version keeps firing, and the service goes on (real process, real clock)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.test_scheduler import _succeeded, _wait_for, runs_of, workflow_text

FEB_30 = 'cron: "0 0 30 2 *"'


def _start(folder: Path, store: Path, err: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "flowcopy", "serve", str(folder), "--store", str(store), "--speed", "60"],
                            stdout=subprocess.PIPE, stderr=open(err, "w"), text=True,
                            env={**os.environ, "FLOWCOPY_SITE": ""})


def _lines(err: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in err.read_text().splitlines() if line.startswith("{")]


def _refused(err: Path, path: Path) -> list[dict[str, Any]]:
    return [line for line in _lines(err) if line["event"] == "definition refused" and line["file"] == str(path)]


def _stop(proc: subprocess.Popen[str], err: Path) -> str:
    try:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = err.read_text()
    assert proc.returncode == 0, text[-3000:]
    assert "Traceback" not in text
    return text


@pytest.mark.process
def test_serve_keeps_going_past_never_firing_and_tagged_definitions(tmp_path: Path) -> None:
    folder, store, err = tmp_path / "wf", tmp_path / "store", tmp_path / "stderr"
    folder.mkdir()
    good = folder / "w.yaml"
    good.write_text(workflow_text())
    feb30 = folder / "feb30.yaml"
    feb30.write_text(workflow_text().replace("name: w2k-e-drive", "name: feb30").replace('cron: "* * * * *"', FEB_30))
    omap = folder / "omap.yaml"
    omap.write_text("name: !!omap\nunits: []\n")
    proc = _start(folder, store, err)
    try:
        _wait_for(lambda: _succeeded(store) >= 1, 30, proc)  # the good file fires beside the broken ones
        (at_start,) = _refused(err, feb30)
        (problem,) = at_start["problems"]
        assert problem.startswith(f"{feb30}:") and "schedule.cron" in problem and "can never fire" in problem
        (tagged,) = _refused(err, omap)
        assert tagged["problems"][0].startswith(f"{omap}:1:7: name: YAML tag !!omap is not supported")
        # SIGHUP with the good file broken the same way: the last good version keeps firing
        good.write_text(workflow_text().replace('cron: "* * * * *"', FEB_30))
        proc.send_signal(signal.SIGHUP)
        _wait_for(lambda: bool(_refused(err, good)), 10, proc)
        assert _refused(err, good)[0]["kept"] == ["w2k-e-drive"]
        before = _succeeded(store)
        _wait_for(lambda: _succeeded(store) >= before + 1, 30, proc)
        assert proc.poll() is None
    finally:
        text = _stop(proc, err)
    assert "flowcopy: stopped cleanly" in text
    assert {r.workflow for r, _ in runs_of(store, "feb30")} == set()


@pytest.mark.process
def test_serve_started_with_only_broken_definitions_waits_for_a_fixed_one(tmp_path: Path) -> None:
    folder, store, err = tmp_path / "wf", tmp_path / "store", tmp_path / "stderr"
    folder.mkdir()
    path = folder / "w.yaml"
    path.write_text(workflow_text().replace('cron: "* * * * *"', FEB_30))
    proc = _start(folder, store, err)
    try:
        _wait_for(lambda: any(line["event"] == "serving" for line in _lines(err)), 30, proc)
        assert _refused(err, path) and any(line["event"].startswith("no valid workflow definition") for line in _lines(err))
        time.sleep(2)  # two cron minutes at --speed 60: still up, nothing fired
        assert proc.poll() is None and _succeeded(store) == 0
        path.write_text(workflow_text())
        proc.send_signal(signal.SIGHUP)
        _wait_for(lambda: _succeeded(store) >= 1, 30, proc)
    finally:
        _stop(proc, err)
