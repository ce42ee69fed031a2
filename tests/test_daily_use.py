"""The admin's daily use of the command line, as a person (a terminal) or a script (a pipe) sees it.

Real `flowcopy` processes where the terminal, the pipe or the exit code is the point;
click's CliRunner where the output is; trio's MockClock where retry timing is.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import trio
from click.testing import CliRunner

from flowcopy.cli import main
from flowcopy.journal import Journal, Move, RunRow, UnitRow

REPO = Path(__file__).resolve().parent.parent
WORKFLOWS = REPO / "workflows"
FLOWCOPY = [sys.executable, "-m", "flowcopy"]
DEFAULT_LAB = (REPO / "flowcopy" / "labs" / "default.yaml").read_text()


def flowcopy(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
             timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FLOWCOPY, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=cwd or REPO)


def cli(*args: str, env: dict[str, str] | None = None) -> Any:
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


def faulty_lab(tmp_path: Path, faults: str) -> Path:
    lab = tmp_path / "lab.yaml"
    lab.write_text(DEFAULT_LAB.replace("lab: default", "lab: faulty", 1) + "\nfaults:\n" + faults)
    return lab


def one_unit_workflow(tmp_path: Path, name: str, extra: str = "", copy: str = "wait") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        f"name: {name}\nunits:\n  - vm: rich-w2k-os-1\n    quiesce: filesystem\n    freeze_timeout: 30s\n"
        f"{extra}    disks:\n      - disk: Disk1\n        target: {{vm: RICH-W2K-OS-2, disk: Disk1}}\n"
        f"    copy:\n      action: {copy}\n"
    )
    return path


# --------------------------------------------------------------------------- the live view


def _tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], capture_output=True, text=True, check=True, timeout=30).stdout


@pytest.mark.process
def test_live_view_keeps_each_warning_once_in_full_above_the_bars(tmp_path: Path) -> None:
    """In a real terminal (tmux): retry warnings scroll above the progress bars, each once
    and whole; one bar per run (units) and a copy bar (tracks); no stale header is left."""
    assert shutil.which("tmux"), "tmux is needed to look at the live view as a person does (.ci/system-deps installs it)"
    lab = faulty_lab(tmp_path, "  seed: 3\n  error_rates: {quiesce: 0.5}\n")
    wf = one_unit_workflow(tmp_path, "live-view", "    retry: {max_attempts: 8, initial_interval: 0.2s, backoff: 1.5}\n")
    session = f"fc-live-{os.getpid()}"
    done = tmp_path / "done"
    command = (f"cd {REPO} && {sys.executable} -m flowcopy run {wf} --store {tmp_path / 'store'} --lab {lab}; "
               f"echo EXIT=$? > {done}; sleep 600")
    _tmux("new-session", "-d", "-s", session, "-x", "220", "-y", "50", command)
    try:
        deadline = time.monotonic() + 240
        while not done.exists() and time.monotonic() < deadline:
            time.sleep(0.3)
        assert done.exists(), _tmux("capture-pane", "-p", "-J", "-t", session)
        screen = _tmux("capture-pane", "-p", "-J", "-S", "-2000", "-t", session)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True, timeout=30)
    assert done.read_text().strip() == "EXIT=0", screen
    lines = [line.rstrip() for line in screen.splitlines() if line.strip()]
    warnings = [i for i, line in enumerate(lines) if "retrying" in line]
    assert warnings, f"the fault plan made no retry: {screen}"
    bars = [i for i, line in enumerate(lines) if "━" in line and "units" in line]
    copy_bars = [i for i, line in enumerate(lines) if "background copy" in line and "tracks" in line]
    assert len(bars) == 1, f"one run bar, not a pile of stale headers:\n{screen}"
    assert len(copy_bars) == 1 and copy_bars[0] == bars[0] + 1, screen
    assert re.search(r"1/1\s+units", lines[bars[0]]) and "finished" in lines[bars[0]], lines[bars[0]]
    assert re.search(r"(\d+)/\1 tracks", lines[copy_bars[0]]), lines[copy_bars[0]]
    for i in warnings:
        line = lines[i]
        assert i < bars[0], f"a warning below the bars:\n{screen}"
        assert "[flowcopy.engine]" in line and "error='injected_fault: injected fault in quiesce" in line, line
        assert "wait_s=" in line and "vm=rich-w2k-os-1" in line, line
        assert sum(1 for other in lines if other == line) == 1, f"a warning drawn twice: {line}"
    attempts = [re.search(r"attempt=(\d+)", lines[i]).group(1) for i in warnings]  # type: ignore[union-attr]
    assert attempts == [str(n) for n in range(1, len(attempts) + 1)], attempts
    # the run's id: in the warnings' context, once on the bar, once in the summary's title
    assert sum("live-view-0001" in line and "retrying" not in line for line in lines) == 2, screen


def test_the_summary_names_the_failed_vm_and_the_real_cause(tmp_path: Path) -> None:
    """A stage timeout says what the site kept answering, not only that time ran out."""
    lab = faulty_lab(tmp_path, "  error_rates: {quiesce: 1.0}\n")
    wf = one_unit_workflow(tmp_path, "always-refused",
                           "    retry: {max_attempts: 50, initial_interval: 0.2s, backoff: 1.0}\n"
                           "    timeouts: {freeze: 1s}\n")
    store = tmp_path / "store"
    result = flowcopy("run", str(wf), "--store", str(store), "--lab", str(lab), "--json")
    assert result.returncode == 1, result.stderr[-2000:]
    summary = json.loads(result.stdout)
    (unit, reason), = summary["failures"].items()
    assert summary["failed_vms"] == {unit: ["rich-w2k-os-1"]}
    assert reason.startswith("stage freeze exceeded its 1 s timeout after ")
    assert "last error: injected_fault: injected fault in quiesce" in reason
    assert "embedded site model" in summary["site"] and "simulation" in summary["site"]
    text = flowcopy("run", str(wf), "--store", str(store), "--lab", str(lab))
    assert text.returncode == 1
    flat = " ".join(text.stdout.split())
    assert "rich-w2k-os-1" in flat and "last error: injected_fault" in flat and "simulation" in flat


# --------------------------------------------------------------------------- planning


async def test_planning_retries_with_jitter_and_a_plan_that_fails_is_journaled(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    from flowcopy import definitions, planning
    from flowcopy.runner import open_engine
    from flowcopy.site.faults import FaultPlan, FaultySite
    from flowcopy.site.inventory import load_lab

    workflow = definitions.load_definition(WORKFLOWS / "30-nightly-nocopy-export.yaml")  # selector + pool
    flaky = FaultySite(load_lab(None), FaultPlan(seed=1, error_rates={"list_vms": 0.5, "get_volume": 0.3}))
    store = tmp_path / "store"
    async with open_engine(store, flaky, site_label="test site") as engine:
        specs = await planning.plan_or_journal(workflow, flaky, engine)
        assert len(specs) == 4 and all(d.target.serial for s in specs for d in s.disks)
        assert flaky.injected.get("list_vms", 0) + flaky.injected.get("get_volume", 0) > 0, "no fault was met"
        dead = FaultySite(load_lab(None), FaultPlan(error_rates={"list_vms": 1.0}))
        with pytest.raises(planning.PlanFailed) as failed:
            await planning.plan_or_journal(workflow, dead, engine)
        assert "planning failed: injected_fault" in failed.value.reason
    journal = Journal.open(store, lock=False)
    try:
        (run,) = journal.runs()
        assert (run.state, run.site, run.finished is not None) == ("failed", "test site", True)
        assert run.error is not None and "list_vms" in run.error
    finally:
        journal.close()
    result = cli("status", "--store", str(store), "--json")
    (row,) = json.loads(result.output)
    assert row["state"] == "failed" and "planning failed" in row["error"] and row["units"] == {}
    assert "planning failed: injected_fault" in " ".join(cli("status", "--store", str(store)).output.split())


async def test_retries_of_many_units_are_not_in_lockstep(autojump_clock: trio.testing.MockClock) -> None:
    from flowcopy import retry
    from flowcopy.site.api import InjectedFault

    policy = retry.Policy(attempts=3, initial=1.0, backoff=2.0, max_interval=30.0)
    second_try: list[float] = []

    async def unit() -> None:
        calls = 0

        async def call() -> str:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise InjectedFault("busy")
            second_try.append(trio.current_time())
            return "ok"

        assert await retry.call(call, policy) == "ok"

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        for _ in range(200):
            nursery.start_soon(unit)
    waits = [t - start for t in second_try]
    assert len(waits) == 200 and all(1.0 <= w <= 2.0 for w in waits)
    assert len({round(w, 6) for w in waits}) > 150, "retries bunch up at the same instant"


# --------------------------------------------------------------------------- pause / unpause


def test_pause_and_unpause_refuse_unknown_names_with_did_you_mean(tmp_path: Path) -> None:
    store = tmp_path / "store"
    result = cli("pause", "nightly-nocopy-exprot", "--store", str(store), "--workflows", str(WORKFLOWS))
    assert result.exit_code == 2
    assert "no workflow named 'nightly-nocopy-exprot' (did you mean 'nightly-nocopy-export'?)" in result.output
    assert not (store / "scheduler.json").exists()
    result = cli("pause", "nightly-nocopy-export", "--store", str(store), "--workflows", str(WORKFLOWS))
    assert result.exit_code == 0 and "nightly-nocopy-export paused" in result.output
    result = cli("unpause", "nightly-nocopy-exprt", "--store", str(store), "--workflows", str(WORKFLOWS))
    assert result.exit_code == 2 and "did you mean 'nightly-nocopy-export'" in result.output
    # a name only the journal knows (a workflow file since removed) is known too
    result = cli("pause", "w2k-e-drive", "--store", str(store), "--workflows", str(tmp_path / "empty"))
    assert result.exit_code == 2
    assert cli("unpause", "nightly-nocopy-export", "--store", str(store), "--workflows", str(tmp_path)).exit_code == 0


# --------------------------------------------------------------------------- status


async def _journal_runs(store: Path, runs: list[tuple[str, str, float, int]]) -> list[str]:
    """Runs (workflow, final state, age in seconds, units) written through the journal."""
    journal = Journal.open(store)
    ids = []
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(journal.run_writer)
            for i, (workflow, state, age, units) in enumerate(runs):
                run_id = f"{workflow}-{i + 1:04d}-abcd"
                created = time.time() - age
                rows = [UnitRow(unit_id=f"{run_id}/{u:05d}", run_id=run_id, state="pending",
                                data={"spec": {"vms": [f"vm{u}"]}}, updated=created) for u in range(units)]
                await journal.begin_run(RunRow(run_id=run_id, workflow=workflow, definition={}, created=created,
                                               number=i + 1, site="served site http://127.0.0.1:1"), rows)
                for row in rows:
                    await journal.record(Move(row.unit_id, "pending", "preparing", "prepare",
                                              payload={"reason": "x" * 300 + " END"}))
                if state != "running":
                    await journal.finish_run(run_id, state)
                ids.append(run_id)
            nursery.cancel_scope.cancel()
    finally:
        journal.close()
    return ids


async def test_status_says_when_with_filters_limit_and_a_resume_hint(tmp_path: Path) -> None:
    store = tmp_path / "store"
    plan = [("nightly", "succeeded", 3 * 86400, 1), ("nightly", "failed", 7200, 2), ("hourly", "succeeded", 60, 1)]
    plan += [("hourly", "succeeded", 50 - i, 1) for i in range(25)] + [("nightly", "running", 5, 2)]
    ids = await _journal_runs(store, plan)
    rows = json.loads(cli("status", "--store", str(store), "--json").output)
    assert len(rows) == 20 and rows[-1]["run_id"] == ids[-1]  # the latest 20, oldest first
    assert all({"started", "ended", "duration_s", "site"} <= set(r) for r in rows)
    assert rows[-1]["ended"] is None and rows[-2]["ended"] is not None and rows[-2]["duration_s"] >= 0
    assert len(json.loads(cli("status", "--store", str(store), "--json", "--limit", "0").output)) == len(plan)
    nightly = json.loads(cli("status", "--store", str(store), "--json", "--workflow", "nightly").output)
    assert [r["state"] for r in nightly] == ["succeeded", "failed", "running"]
    failed = json.loads(cli("status", "--store", str(store), "--json", "--state", "failed").output)
    assert [r["run_id"] for r in failed] == [ids[1]]
    recent = json.loads(cli("status", "--store", str(store), "--json", "--since", "3h", "--workflow", "nightly").output)
    assert [r["run_id"] for r in recent] == [ids[1], ids[-1]]
    text = cli("status", "--store", str(store), "--workflow", "nightly", "--since", "1d").output
    flat = " ".join(text.split())
    assert "started" in flat and "duration" in flat and "served site http://127.0.0.1:1" in flat
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", text)
    assert f"1 run(s) not finished: {ids[-1]}" in flat and "run `flowcopy resume`" in flat
    held = Journal.open(store)  # an engine holds the store: its runs are in progress, not for resume
    try:
        flat = " ".join(cli("status", "--store", str(store), "--workflow", "nightly").output.split())
    finally:
        held.close()
    assert f"1 run(s) in progress: {ids[-1]} (engine pid {os.getpid()}" in flat and "resume" not in flat
    result = cli("status", "--store", str(store), "--since", "yesterday")
    assert result.exit_code == 2 and "--since 'yesterday': give a duration (30m, 12h, 2d, 1w) or a date/time" in result.output
    # describe and history read the same journal; history never cuts a reason on a pipe
    described = json.loads(cli("describe", ids[1], "--store", str(store), "--json").output)
    assert [u["vms"] for u in described["units"]] == [["vm0"], ["vm1"]] and described["state"] == "failed"
    piped = flowcopy("history", ids[1], "--store", str(store))
    assert piped.returncode == 0 and piped.stdout.count("x" * 300 + " END") == 2
    assert re.search(r"00001\s+vm1\s", piped.stdout), piped.stdout
    result = cli("describe", ids[1][:-1], "--store", str(store))
    assert result.exit_code == 2 and f"did you mean '{ids[1]}'" in result.output


def test_describe_a_real_run_and_site_named_everywhere(tmp_path: Path) -> None:
    store = tmp_path / "store"
    run = flowcopy("run", "w2k-e-drive", "--workflows", str(WORKFLOWS), "--store", str(store), "--speed", "20", "--json")
    assert run.returncode == 0, run.stderr[-2000:]
    run_id = json.loads(run.stdout)["run_id"]
    data = json.loads(cli("describe", run_id, "--store", str(store), "--json").output)
    (unit,) = data["units"]
    assert unit["vms"] == ["rich-w2k-os-1"] and unit["state"] == "succeeded" and unit["verified"] is True
    assert unit["pairs"] == [{"source": "20313698", "target": "20413698"}]
    assert unit["freeze_attempts"] == 1 and unit["freeze_window_s"] is not None and unit["freeze_window_s"] >= 0
    assert "simulation" in data["site"]
    text = " ".join(cli("describe", run_id, "--store", str(store)).output.split())
    assert "20313698 -> 20413698" in text and "verified consistent" in text and "freeze window" in text
    status = " ".join(cli("status", "--store", str(store)).output.split())
    assert "embedded site model" in status and "simulation" in status
    history = flowcopy("history", run_id, "--store", str(store)).stdout
    assert re.search(r"00000\s+rich-w2k-os-1\s+1\s", history), history


def test_resume_in_a_folder_without_a_store_says_so_and_creates_nothing(tmp_path: Path) -> None:
    result = flowcopy("resume", cwd=tmp_path)
    assert result.returncode == 2
    assert "store: no flowcopy store here, nothing to resume (not creating one)" in result.stderr
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- run NAME, plan, completion


def test_run_by_name_and_unknown_names_with_did_you_mean(tmp_path: Path) -> None:
    result = cli("run", "w2k-e-drvie", "--workflows", str(WORKFLOWS), "--store", str(tmp_path / "store"))
    assert result.exit_code == 2 and "no workflow named 'w2k-e-drvie' in" in result.output
    assert "(did you mean 'w2k-e-drive'?)" in result.output and not (tmp_path / "store").exists()
    # the service's folder from the environment (a run by name is in test_describe_a_real_run...)
    result = cli("plan", "nightly-nocopy-export", "--store", str(tmp_path / "store"), "--json",
                 env={"FLOWCOPY_WORKFLOWS": str(WORKFLOWS)})
    assert result.exit_code == 0 and json.loads(result.output)["workflow"] == "nightly-nocopy-export"


def test_plan_resolves_against_the_site_and_changes_nothing(tmp_path: Path) -> None:
    store = tmp_path / "store"
    result = cli("plan", "nightly-nocopy-export", "--workflows", str(WORKFLOWS), "--store", str(store), "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert [u["vms"] for u in plan["units"]] == [["rhas21-db1"], ["rhel3-db1"], ["sles8-db1"], ["sles9-db1"]]
    first = plan["units"][0]
    assert [(p["disk"], p["source"]) for p in first["pairs"]] == [("Disk1", "21014698"), ("Disk2", "21114698"),
                                                                   ("Disk3", "21215698")]
    assert all(re.fullmatch(r"\d{8}", p["target"]) for u in plan["units"] for p in u["pairs"])
    targets = [p["target"] for u in plan["units"] for p in u["pairs"]]
    assert len(set(targets)) == len(targets) == 12  # pool targets chosen, one each
    assert first["frozen_together"] == {"guests": ["rhas21-db1"], "lsses": ["14", "15"]}
    assert not store.exists(), "plan wrote into the store"
    # against a store's own site: a target held by a relationship is found before the run
    assert flowcopy("run", str(WORKFLOWS / "10-w2k-e-drive.yaml"), "--store", str(store), "--speed", "20").returncode == 0
    before = sorted(p.name for p in store.rglob("*"))
    _hold_target(store)
    result = cli("plan", str(WORKFLOWS / "10-w2k-e-drive.yaml"), "--store", str(store))
    assert result.exit_code == 2
    assert ("unit 0 (rich-w2k-os-1) would fail: rich-w2k-os-1 Disk1: target 20413698 is already the target of "
            "relationship 20313698 -> 20413698") in " ".join(result.output.split())
    journal = Journal.open(store, lock=False)
    try:
        assert len(journal.runs()) == 1  # nothing journaled by the plan
    finally:
        journal.close()
    assert sorted(p.name for p in store.rglob("*") if not p.name.startswith("site")) == [
        n for n in before if not n.startswith("site")]
    bad = tmp_path / "typo.yaml"
    bad.write_text((WORKFLOWS / "10-w2k-e-drive.yaml").read_text().replace("vm: rich-w2k-os-1", "vm: rich-w2k-os1"))
    result = cli("plan", str(bad), "--store", str(tmp_path / "other"))
    assert result.exit_code == 2
    flat = " ".join(result.output.split())
    assert "would fail: unknown_vm:" in flat and "rich-w2k-os1" in flat and "(did you mean 'rich-w2k-os-1'?)" in flat


def _hold_target(store: Path) -> None:
    from flowcopy.site import api
    from flowcopy.site.persist import open_site

    async def hold() -> None:
        async with open_site(store / "site", workloads=False) as site:
            await site.establish("20313698", "20413698", api.FlashOptions(mode=api.CopyMode.NOCOPY, tag="by-hand"))

    trio.run(hold)


def test_shell_completion_of_workflow_names_and_run_ids(tmp_path: Path) -> None:
    store = tmp_path / "store"
    ids = trio.run(_journal_runs, store, [("nightly", "succeeded", 10, 1), ("hourly", "succeeded", 5, 1)])

    def complete(words: str) -> list[str]:
        cword = len(words.split()) - (0 if words.endswith(" ") else 1)
        env = {"_FLOWCOPY_COMPLETE": "bash_complete", "COMP_WORDS": words, "COMP_CWORD": str(cword),
               "FLOWCOPY_STORE": str(store), "FLOWCOPY_WORKFLOWS": str(WORKFLOWS)}
        result = CliRunner().invoke(main, [], prog_name="flowcopy", env=env)
        return [line.split(",", 1)[1] for line in result.output.splitlines() if line.startswith("plain,")]

    assert complete("flowcopy run w2k") == ["w2k-e-drive", "w2k-sql-consistency-group"]
    assert complete("flowcopy pause night") == ["nightly-nocopy-export"]
    assert complete("flowcopy history ") == [ids[1], ids[0]]  # newest first
    assert complete("flowcopy describe night") == [ids[0]]


# --------------------------------------------------------------------------- logs


def test_log_level_and_format_the_same_on_every_command(tmp_path: Path) -> None:
    store = tmp_path / "store"
    result = flowcopy("--log-level", "info", "--log-format", "json", "run", str(WORKFLOWS / "10-w2k-e-drive.yaml"),
                      "--store", str(store), "--speed", "20")
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    assert any(e["event"] == "transition" and e["logger"] == "flowcopy.engine" for e in lines)
    assert any(e["logger"] == "flowcopy.site.persist" for e in lines)
    env = {"FLOWCOPY_LOG_LEVEL": "info", "FLOWCOPY_LOG_FORMAT": "console"}
    result = flowcopy("resume", "--store", str(store), env=env)
    assert result.returncode == 0
    assert re.search(r"\[info\s*\] site state restored\s+\[flowcopy.site.persist\]", result.stderr), result.stderr
    result = flowcopy("resume", "--store", str(store), "--log-level", "error", env=env)
    assert result.returncode == 0 and "site state restored" not in result.stderr  # the command line beats the environment
    result = flowcopy("status", "--store", str(store), env={"FLOWCOPY_LOG_FORMAT": "xml"})
    assert result.returncode == 2 and "FLOWCOPY_LOG_FORMAT" in result.stderr and "Traceback" not in result.stderr
    for command in (["status"], ["site", "lsvol"], ["site", "serve"], ["serve"], ["plan", "x"], ["describe", "x"]):
        assert "--log-format [console|json]" in cli(*command, "--help").output, command


def test_status_and_help_start_without_the_engine_trio_or_structlog(tmp_path: Path) -> None:
    """Start-up time is `python -X importtime`'s business (see README); this keeps the
    heavy imports out of the paths an admin types all day."""
    store = tmp_path / "store"
    trio.run(_journal_runs, store, [("nightly", "succeeded", 10, 1)])
    probe = (
        "import sys\nfrom flowcopy.cli import main\n"
        "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
        "heavy = ['trio', 'structlog', 'sqlite_utils', 'httpx', 'flowcopy.engine', 'flowcopy.site.admin', 'croniter']\n"
        "print('LOADED', [m for m in heavy if m in sys.modules], file=sys.stderr)\n"
    )
    for args in (["--help"], ["status", "--store", str(store)], ["history", "nightly-0001-abcd", "--store", str(store)],
                 ["validate", str(WORKFLOWS / "10-w2k-e-drive.yaml")]):
        result = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=60)
        loaded = result.stderr.strip().splitlines()[-1]
        expected = ["croniter"] if args[0] == "validate" else []
        assert loaded == f"LOADED {expected}", (args, result.stderr[-1500:])


# --------------------------------------------------------------------------- the smaller points


def test_every_command_that_prints_data_has_json_with_help() -> None:
    import click

    data_commands = {"run", "plan", "resume", "status", "describe", "history", "validate", "bench", "chaos", "schedules"}
    ctx = click.Context(main)
    seen = set()
    for name in main.list_commands(ctx):
        cmd = main.get_command(ctx, name)
        assert cmd is not None
        options = {o.name: o for o in cmd.params if isinstance(o, click.Option)}
        if "as_json" in options:
            seen.add(name)
            assert options["as_json"].help, f"{name} --json has no help text"
    assert data_commands <= seen, data_commands - seen
    site = main.get_command(ctx, "site")
    assert isinstance(site, click.Group)
    for name, cmd in site.commands.items():
        options = {o.name: o for o in cmd.params if isinstance(o, click.Option)}
        if name.startswith("ls") or name in ("list-disks", "prime", "bench"):
            assert "as_json" in options, name
        if "as_json" in options:
            assert options["as_json"].help, f"site {name} --json has no help text"


def test_readme_documents_the_exit_codes() -> None:
    from flowcopy import commands

    readme = (REPO / "README.md").read_text()
    section = readme.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    for code, word in ((commands.OK, "0"), (commands.FAILED, "1"), (commands.USAGE, "2"), (commands.STOPPED, "3")):
        assert re.search(rf"^\|\s*{code}\s*\|", section, re.MULTILINE), word


def test_unreachable_site_says_how_to_start_one(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("abc\n")
    result = flowcopy("run", str(WORKFLOWS / "10-w2k-e-drive.yaml"), "--store", str(tmp_path / "store"),
                      "--site", "http://127.0.0.1:9", "--token-file", str(token))
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "site_unavailable" in result.stderr and "flowcopy site serve --state DIR --port PORT" in result.stderr


def test_bad_cron_names_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "cron.yaml"
    bad.write_text("name: x\nschedule: {cron: '0 25 * * mon'}\nunits:\n  - vm: a\n"
                   "    disks: [{disk: Disk1, target: '20413698'}]\n")
    result = cli("validate", str(bad))
    assert result.exit_code == 2 and "field 2 (hour) '25' is not valid (0-23)" in result.output


def test_mktask_pairs_with_host_disk_names() -> None:
    import click

    from flowcopy.site.admin import _pair

    assert _pair("esx1:Disk1:20413698") == ("esx1:Disk1", "20413698")
    assert _pair("20313698:20413698") == ("20313698", "20413698")
    assert _pair("20313698:esx2:Disk1") == ("20313698", "esx2:Disk1")
    assert _pair("esx1:Disk1:esx2:Disk1") == ("esx1:Disk1", "esx2:Disk1")
    assert _pair("esx1:E::20413698") == ("esx1:E:", "20413698")
    for bad in ("20313698", "esx1:Disk1", "x:20413698"):
        with pytest.raises(click.BadParameter):
            _pair(bad)


@pytest.mark.process
def test_mktask_lsflash_and_a_wrong_token_against_a_served_site(tmp_path: Path) -> None:
    from tests.test_served_site import serving

    lab = tmp_path / "lab.yaml"
    lab.write_text(DEFAULT_LAB)
    state = tmp_path / "state"
    with serving(state, lab, tmp_path / "serve.log") as served:
        env = {"FLOWCOPY_SITE": served.url, "FLOWCOPY_SITE_TOKEN_FILE": str(state / "token")}
        disks = json.loads(cli("site", "list-disks", "--host", "esx-x440", "--json", env=env).output)
        host_disk = next(d for d in disks if d["serial"] == "20313698")
        pair = f"esx-x440:{host_disk['name']}:20413698"
        result = cli("site", "mktask", "e-drive", "--pair", pair, "--nocp", env=env)
        assert result.exit_code == 0, result.output
        result = cli("site", "mktask", "bad", "--pair", "esx-x440:Disk99:20413698", env=env)
        assert result.exit_code == 2 and "esx-x440 has no disk or primed device 'Disk99'" in result.output
        result = cli("site", "mktask", "bad", "--pair", "20313698:20613698", env=env)
        assert result.exit_code == 2 and "FlashCopy needs equal sizes" in result.output
        assert [t["name"] for t in json.loads(cli("site", "lstask", "--json", env=env).output)] == ["e-drive"]
        assert cli("site", "exec-task", "e-drive", "--seqnum", "by-task", env=env).exit_code == 0
        listing = cli("site", "lsflash", env=env).output
        assert "active (nocopy)" in " ".join(listing.split())
        assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", listing), listing
        wrong = tmp_path / "wrong-token"
        wrong.write_text("not-the-token\n")
        result = flowcopy("run", str(WORKFLOWS / "10-w2k-e-drive.yaml"), "--store", str(tmp_path / "store"),
                          "--site", served.url, "--token-file", str(wrong))
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert f"the token came from {wrong}" in result.stderr and "STATE/token" in result.stderr
        assert served.stop() == 0


def test_bench_and_chaos_remove_their_temporary_folders(tmp_path: Path) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {"TMPDIR": str(scratch)}
    result = flowcopy("bench", "--quick", "--vms", "5", "--json", env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    result = flowcopy("chaos", "--vms", "1", "--kills", "0", "--speed", "20", env=env)
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    assert "work folder removed" in result.stdout
    assert [p.name for p in scratch.iterdir() if p.name.startswith("flowcopy-")] == []
