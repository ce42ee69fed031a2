"""The service in production: `flowcopy schedules` (pure, with a fixed "now", across both
DST changes of Europe/Berlin), then a real `flowcopy serve --http` process: /metrics scraped
and parsed with prometheus-client's parser while runs happen, /healthz, /readyz, the
trigger, the token off loopback, and systemd's notify socket (READY=1 only after resume,
WATCHDOG=1 pings)."""

from __future__ import annotations

import json
import os
import socket
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import trio
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from flowcopy import logs
from flowcopy.cli import main
from flowcopy.definitions import Schedule, load_definition
from flowcopy.journal import Journal, RunRow
from flowcopy.scheduler import latest_fire, next_fire
from flowcopy.service.schedules import schedule_rows, table
from tests.service_process import (
    MIXED,
    QUICK,
    VMFS,
    Serve,
    flowcopy,
    wait_for,
    write_folder,
)


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


NIGHTLY_BERLIN = Schedule(cron="30 2 * * *", timezone="Europe/Berlin")
HOURLY_BERLIN = Schedule(cron="0 * * * *", timezone="Europe/Berlin")

# --------------------------------------------------------------------------- schedules across DST


@pytest.mark.parametrize(
    "now,expected,local",
    [
        (utc(2026, 1, 15, 12, 0), utc(2026, 1, 16, 1, 30), "Fri 2026-01-16 02:30:00 CET"),  # winter: CET = UTC+1
        # spring forward, Sun 29 March 2026: 02:00 CET -> 03:00 CEST, so 02:30 never happens;
        # the night's run fires right after the gap, as cron does, not a day late
        (utc(2026, 3, 28, 12, 0), utc(2026, 3, 29, 1, 0), "Sun 2026-03-29 03:00:00 CEST"),
        (utc(2026, 3, 29, 1, 0, 1), utc(2026, 3, 30, 0, 30), "Mon 2026-03-30 02:30:00 CEST"),  # summer: UTC+2
        # fall back, Sun 25 October 2026: 03:00 CEST -> 02:00 CET, so 02:30 happens twice;
        # a nightly cron fires once, at the first 02:30 (CEST), not again an hour later
        (utc(2026, 10, 24, 12, 0), utc(2026, 10, 25, 0, 30), "Sun 2026-10-25 02:30:00 CEST"),
        (utc(2026, 10, 25, 0, 30, 1), utc(2026, 10, 26, 1, 30), "Mon 2026-10-26 02:30:00 CET"),
    ],
)
def test_schedules_next_fire_across_dst_in_berlin(now: datetime, expected: datetime, local: str, tmp_path: Path) -> None:
    path = tmp_path / "nightly.yaml"
    path.write_text('name: nightly\nschedule:\n  cron: "30 2 * * *"\n  timezone: Europe/Berlin\n  overlap: buffer_one\n'
                    + MIXED.split("overlap: skip\n", 1)[1])
    wf = load_definition(path)
    [row] = schedule_rows({path: wf}, [], [], now)
    assert row.next_fire == expected
    assert row.to_json()["next_fire"] == expected.isoformat()
    head, line = table([row], now)[:2]
    assert line.startswith(local), line
    assert head.split()[:2] == ["NEXT", "LEFT"] and "buffer_one" in line and "Europe/Berlin" in line


def test_schedules_command_prints_the_berlin_night_after_the_spring_gap(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The command's own output with "now" fixed on the eve of the spring change."""
    from flowcopy.scheduler import set_paused
    from flowcopy.service.commands import schedules

    folder = write_folder(tmp_path / "wf", MIXED.replace('cron: "0 3 * * *"', 'cron: "30 2 * * *"'), QUICK)
    store = tmp_path / "store"
    set_paused(store, "quick", True)
    assert schedules(folder, store, as_json=False, now=utc(2026, 3, 28, 22, 0)) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].split()[:8] == ["Sun", "2026-03-29", "03:00:00", "CEST", "3h", "0min", "-", "-"]  # 01:00 UTC
    assert out[1].split()[8:] == ["-", "mixed", "30", "2", "*", "*", "*", "Europe/Berlin", "skip", "no"]
    assert out[2].split()[-1] == "yes" and out[-1] == "2 workflow(s) listed, 1 on a schedule."
    assert schedules(folder, store, as_json=True, now=utc(2026, 10, 25, 0, 30, 1)) == 0  # just after the first 02:30
    [mixed] = [r for r in json.loads(capsys.readouterr().out) if r["workflow"] == "mixed"]
    assert (mixed["next_fire"], mixed["next_fire_local"]) == ("2026-10-26T01:30:00+00:00", "2026-10-26T02:30:00+01:00")


def test_hourly_cron_keeps_firing_every_real_hour_through_the_repeated_hour() -> None:
    fires, t = [], utc(2026, 10, 24, 23, 30)
    for _ in range(4):
        t = next_fire(HOURLY_BERLIN, t)
        fires.append(t)
    # 02:00 CEST, 02:00 CET, 03:00 CET, 04:00 CET: every real hour, both 02:00s included
    assert fires == [utc(2026, 10, 25, 0), utc(2026, 10, 25, 1), utc(2026, 10, 25, 2), utc(2026, 10, 25, 3)]
    # the nightly cron's latest fire after the repeated 02:30 is the first one
    assert latest_fire(NIGHTLY_BERLIN, utc(2026, 10, 25, 1, 45)) == utc(2026, 10, 25, 0, 30)


def test_schedules_rows_show_last_fire_result_paused_and_unscheduled(tmp_path: Path) -> None:
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(MIXED)
    b.write_text(VMFS)
    workflows = {a: load_definition(a), b: load_definition(b)}
    runs = [
        RunRow(run_id="mixed-0001-aaaa", workflow="mixed", definition={}, state="failed", created=utc(2026, 5, 1, 1).timestamp()),
        RunRow(run_id="mixed-0002-bbbb", workflow="mixed", definition={}, state="succeeded", created=utc(2026, 5, 2, 1).timestamp()),
    ]
    now = utc(2026, 5, 2, 12)
    rows = schedule_rows(workflows, runs, ["mixed"], now)
    assert [r.workflow for r in rows] == ["mixed", "vmfs-system-disk"]  # scheduled first
    mixed, vmfs = rows
    assert (mixed.last_run, mixed.last_result, mixed.last_fire) == ("mixed-0002-bbbb", "succeeded", utc(2026, 5, 2, 1))
    assert mixed.paused and mixed.next_fire == utc(2026, 5, 3, 1)  # 03:00 CEST
    assert vmfs.cron is None and vmfs.next_fire is None and vmfs.last_run is None
    lines = table(rows, now)
    assert "paused" in lines[1] and "11h 0min ago" in lines[1]
    assert lines[2].split()[:5] == ["-", "-", "-", "-", "-"]


# --------------------------------------------------------------------------- a real serve process


def scrape(served: Serve) -> tuple[dict[tuple[str, tuple[tuple[str, str], ...]], float], float]:
    """All samples of /metrics, parsed by prometheus-client, and the scrape's seconds."""
    t0 = time.perf_counter()
    reply = served.get("/metrics")
    seconds = time.perf_counter() - t0
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(reply.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples, seconds


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def in_flight(served: Serve) -> list[dict[str, Any]]:
    return served.get("/api/status").json()["in_flight"]


@pytest.mark.process
def test_metrics_of_a_real_serve_process_move_as_runs_happen(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "wf", MIXED, VMFS, QUICK)
    store = tmp_path / "store"
    served = Serve(folder, store, tmp_path / "serve.log")
    latencies: list[float] = []
    try:
        served.wait_url()
        assert served.get("/healthz").json()["alive"] is True
        wait_for(lambda: served.get("/readyz").status_code == 200, 30, "readyz")
        before, _ = scrape(served)
        assert value(before, "flowcopy_up") == 1 and value(before, "flowcopy_ready") == 1
        assert value(before, "flowcopy_runs_total", workflow="mixed", result="succeeded") == 0
        nxt = value(before, "flowcopy_next_fire_timestamp_seconds", workflow="mixed")
        assert nxt == next_fire(load_definition(folder / "00.yaml").schedule, datetime.now(UTC)).timestamp()

        first = served.trigger("mixed")  # what `flowcopy trigger` sends (the CLI itself fires `quick` below)
        assert first.status_code == 202 and first.json()["action"] == "fire"
        # during the run: the units gauge shows the run's units, copy progress moves
        seen_copying = None
        while not seen_copying:
            samples, seconds = scrape(served)
            latencies.append(seconds)
            if value(samples, "flowcopy_units", state="copying") >= 1 and value(samples, "flowcopy_copy_tracks_total") > 0:
                seen_copying = samples
            assert value(samples, "flowcopy_runs_total", workflow="mixed", result="succeeded") == 0 or seen_copying
            time.sleep(0.1)
        assert value(seen_copying, "flowcopy_runs_in_flight") == 1
        tracks = value(seen_copying, "flowcopy_copy_tracks_total")
        assert tracks % 4096 == 0 and 0 <= value(seen_copying, "flowcopy_copy_tracks_done") <= tracks  # 256 MiB units of 64 KiB tracks
        # overlap: skip refuses a second trigger while the run goes, and it is counted
        refused = served.trigger("mixed")
        assert refused.status_code == 409 and refused.json()["reason"] == "the previous run is still running (overlap: skip)"
        wait_for(lambda: not in_flight(served), 60, "the first run to end", interval=0.2)
        after_one, seconds = scrape(served)
        latencies.append(seconds)
        assert value(after_one, "flowcopy_runs_total", workflow="mixed", result="succeeded") == 1
        assert value(after_one, "flowcopy_runs_started_total", workflow="mixed") == 1
        assert value(after_one, "flowcopy_fires_total", workflow="mixed", action="triggered") == 1
        assert value(after_one, "flowcopy_fires_skipped_total", workflow="mixed", why="overlap") == 1
        assert value(after_one, "flowcopy_freeze_window_seconds_count") == 3  # one window per unit
        assert 0 < value(after_one, "flowcopy_freeze_window_seconds_sum") < 30
        # begin and finish of the run, and per unit five waited moves in sequence (freeze
        # intent, window outcome, copy, withdraw, succeed): units may share a commit, a unit's
        # own moves may not
        assert value(after_one, "flowcopy_journal_commit_seconds_count") >= 2 + 5
        assert value(after_one, "flowcopy_units", state="copying") == 0
        assert value(after_one, "flowcopy_freezes_lost_total") == 0
        assert value(after_one, "flowcopy_lss_longest_hold_seconds") == 0
        for vm in ("rich-w2k-os-1", "rhel3-db1", "sles8-db1"):  # RPO: every VM has a verified backup now
            assert 0 <= value(after_one, "flowcopy_backup_age_seconds", vm=vm) < 120
        assert ("flowcopy_backup_age_seconds", (("vm", "sles9-db1"),)) not in after_one

        # a second run and a run that cannot start: the counters move again
        by_cli = flowcopy("trigger", "quick", store=store)
        assert by_cli.returncode == 0 and by_cli.stdout.startswith("quick fired at "), by_cli.stderr
        assert served.trigger("vmfs-system-disk").status_code == 202
        wait_for(lambda: not in_flight(served) and value(scrape(served)[0], "flowcopy_runs_total", workflow="quick",
                                                         result="succeeded") == 1, 60, "the second run to end", interval=0.2)
        after_two, seconds = scrape(served)
        latencies.append(seconds)
        assert value(after_two, "flowcopy_run_start_errors_total", workflow="vmfs-system-disk") == 1
        assert value(after_two, "flowcopy_freeze_window_seconds_count") == 4
        assert value(after_two, "flowcopy_runs_total", workflow="mixed", result="succeeded") == 1
        assert value(after_two, "flowcopy_backup_newest_timestamp_seconds", vm="rich-w2k-os-1") > value(
            after_one, "flowcopy_backup_newest_timestamp_seconds", vm="rich-w2k-os-1")
        assert value(after_two, "flowcopy_backup_newest_timestamp_seconds", vm="rhel3-db1") == value(
            after_one, "flowcopy_backup_newest_timestamp_seconds", vm="rhel3-db1")
        # the same CLI in this process (a Python start less): an unknown name, then the schedules
        unknown = CliRunner().invoke(main, ["trigger", "no-such-workflow", "--store", str(store)])
        assert unknown.exit_code == 1 and unknown.output.startswith("flowcopy: no-such-workflow not fired: no workflow 'no-such-workflow'")

        # `flowcopy schedules` beside the running service: last fire and result from the journal
        t0 = datetime.now(UTC)
        listed = CliRunner().invoke(main, ["schedules", str(folder), "--json", "--store", str(store)])
        t1 = datetime.now(UTC)
        assert listed.exit_code == 0, listed.output
        rows = {r["workflow"]: r for r in json.loads(listed.stdout)}
        assert rows["mixed"]["last_result"] == "succeeded" and rows["mixed"]["cron"] == "0 3 * * *"
        schedule = load_definition(folder / "00.yaml").schedule
        assert rows["mixed"]["next_fire"] in {next_fire(schedule, t0).isoformat(), next_fire(schedule, t1).isoformat()}
        vmfs = rows["vmfs-system-disk"]
        # its triggered run could not be planned: journaled as failed, so the schedule shows it
        assert vmfs["next_fire"] is None and vmfs["last_result"] == "failed"
        assert vmfs["last_run"].startswith("vmfs-system-disk-0001-")
        assert rows["quick"]["last_result"] == "succeeded" and rows["quick"]["cron"] is None
        assert served.stop() == 0
    finally:
        served.kill()
    assert not (store / "service.json").exists()  # removed by the clean stop
    print(f"\n/metrics scrape latency over {len(latencies)} scrapes: median {statistics.median(latencies) * 1000:.1f} ms, "
          f"max {max(latencies) * 1000:.1f} ms")


@pytest.mark.process
def test_off_loopback_the_face_needs_tls_and_the_token_and_readyz_says_why(tmp_path: Path) -> None:
    import ssl

    from tests.test_site_hardening import _self_signed

    folder = write_folder(tmp_path / "wf", QUICK)
    store = tmp_path / "store"
    certfile, keyfile = _self_signed(tmp_path)
    served = Serve(folder, store, tmp_path / "serve.log", http="0.0.0.0:0",
                   extra=("--http-certfile", str(certfile), "--http-keyfile", str(keyfile)))
    try:
        url = served.wait_url()
        assert url.startswith("https://127.0.0.1:")  # the wildcard bind, as a local address for `flowcopy trigger`
        served.verify = ssl.create_default_context(cafile=str(certfile))
        token_file = store / "http-token"
        token = token_file.read_text().strip()
        assert oct(token_file.stat().st_mode & 0o777) == "0o600" and len(token) >= 32
        assert served.get("/healthz").status_code == 200  # liveness stays open
        for path in ("/metrics", "/readyz", "/api/status"):
            reply = served.get(path)
            assert reply.status_code == 401 and reply.json()["message"] == "missing bearer token", path
        assert served.get("/metrics", headers={"Authorization": "Bearer nope"}).json()["message"] == "wrong bearer token"
        auth = {"Authorization": f"Bearer {token}"}
        wait_for(lambda: served.get("/readyz", headers=auth).status_code == 200, 30, "readyz")
        assert "flowcopy_up 1.0" in served.get("/metrics", headers=auth).text
        assert served.trigger("quick").status_code == 401
        by_cli = flowcopy("trigger", "quick", store=store)  # token file and certificate from service.json
        assert by_cli.returncode == 0 and by_cli.stdout.startswith("quick fired at "), by_cli.stderr
        # the store turns read-only for the service's probe: not ready, and why
        store.chmod(0o500)
        try:
            if os.geteuid() == 0:  # root writes anyway: make the probe's path unusable instead
                (store / ".readyz-probe").mkdir()
            reply = served.get("/readyz", headers=auth)
        finally:
            store.chmod(0o700)
            if (store / ".readyz-probe").is_dir():
                (store / ".readyz-probe").rmdir()
        assert reply.status_code == 503 and reply.json()["reason"].startswith(f"store {store} is not writable")
        assert served.get("/readyz", headers=auth).status_code == 200
        assert served.stop() == 0
    finally:
        served.kill()


def test_bad_http_option_and_trigger_without_a_service_are_one_line(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "wf", MIXED)
    store = str(tmp_path / "store")
    bad = CliRunner().invoke(main, ["serve", str(folder), "--store", store, "--http", "localhost"])
    assert bad.exit_code == 2 and bad.output.strip().splitlines() == [
        "flowcopy: --http 'localhost': expected HOST:PORT, e.g. 127.0.0.1:9464"]
    lonely = CliRunner().invoke(main, ["trigger", "mixed", "--store", store])
    assert lonely.exit_code == 2 and len(lonely.output.strip().splitlines()) == 1
    assert "no service is serving store" in lonely.output and "Traceback" not in lonely.output
    (tmp_path / "token").write_text("two words\n")
    wrong = CliRunner().invoke(main, ["serve", str(folder), "--store", store, "--http", "127.0.0.1:0",
                                      "--http-token-file", str(tmp_path / "token")])
    clear = CliRunner().invoke(main, ["serve", str(folder), "--store", store, "--http", "0.0.0.0:9464"])
    assert clear.exit_code == 2 and clear.output.strip().splitlines() == [
        "flowcopy: --http 0.0.0.0:9464: refusing to serve on 0.0.0.0 over plain HTTP: the bearer token would cross "
        "the network in clear; give --http-certfile and --http-keyfile to serve HTTPS, or listen on 127.0.0.1"]
    assert not (Path(store) / "http-token").exists()  # refused before anything was written
    assert wrong.exit_code == 2 and wrong.output.strip().splitlines() == [
        f"flowcopy: --http-token-file: the token file {tmp_path / 'token'} does not hold a bearer token (one word of printable ASCII)"]
    # a port already taken: one line, before the service resumes or fires anything
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        try:
            busy = CliRunner().invoke(main, ["serve", str(folder), "--store", store, "--http", f"127.0.0.1:{port}"],
                                      env={"FLOWCOPY_SITE": ""})
        finally:
            logs.configure(level="warning")  # serve set JSON info logs for the process
    lines = [line for line in busy.output.strip().splitlines() if not line.startswith("{")]
    assert busy.exit_code == 2 and lines == [
        f"flowcopy: --http 127.0.0.1:{port}: cannot listen there: Address already in use (is another service on that port?)"]
    assert '"event": "serving"' not in busy.output and not (Path(store) / "service.json").exists()


# --------------------------------------------------------------------------- systemd notify


def leave_a_run_unfinished(folder: Path, store: Path) -> str:
    """Journal a run of `mixed` and stop before driving it, as a crash after begin_run would."""
    from flowcopy import planning
    from flowcopy.runner import open_engine, open_site

    async def main() -> str:
        wf = load_definition(folder / "00.yaml")
        async with open_site(store, None, None) as site, open_engine(store, site) as engine:
            specs = await planning.plan_units(wf, site)
            return await engine.begin_run(wf.name, planning.definition_data(wf), specs)

    return trio.run(main)


@pytest.mark.process
def test_notify_socket_gets_ready_only_after_resume_and_watchdog_pings(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "wf", QUICK)
    store = tmp_path / "store"
    run_id = leave_a_run_unfinished(folder, store)
    address = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(60)
    served = Serve(folder, store, tmp_path / "serve.log", env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "400000"})
    messages: list[tuple[float, str]] = []
    try:
        ready_state = None
        while ready_state is None:
            text = sock.recv(4096).decode()
            messages.append((time.monotonic(), text))
            if "READY=1" in text.split("\n"):
                journal = Journal.open(store, lock=False)
                try:
                    ready_state = journal.run(run_id).state
                finally:
                    journal.close()
        # READY=1 came after the run the store left unfinished was resumed to its end
        assert ready_state == "succeeded"
        ready = messages[-1][1].split("\n")
        assert f"MAINPID={served.proc.pid}" in ready and any(f.startswith("STATUS=serving 1 workflow(s)") for f in ready)
        before = [m for _, m in messages[:-1]]
        assert "STATUS=resuming the runs the store left unfinished" in before
        assert "WATCHDOG=1" in before  # pings while resuming: the loop is alive
        # WATCHDOG=1 keeps coming every WATCHDOG_USEC/2 while the loop is healthy
        pings = []
        while len(pings) < 5:
            text = sock.recv(4096).decode()
            if text == "WATCHDOG=1":
                pings.append(time.monotonic())
        assert served.proc.poll() is None
        served.proc.send_signal(15)
        stopping = wait_for(lambda: "STOPPING=1" in sock.recv(4096).decode().split("\n"), 30, "STOPPING=1")
        assert stopping and served.proc.wait(timeout=60) == 0
    finally:
        served.kill()
        sock.close()
    gaps = [b - a for a, b in zip(pings, pings[1:])]
    print(f"\nwatchdog ping gaps (WATCHDOG_USEC=0.4 s, expect ~0.2 s): {', '.join(f'{g:.3f}' for g in gaps)}")


# --------------------------------------------------------------------------- the unit file


def test_systemd_unit_ships_with_the_package_and_bounds_the_stop_by_the_longest_freeze() -> None:
    import configparser
    from importlib.resources import files

    from flowcopy.definitions import MAX_FREEZE_TIMEOUT

    unit = files("flowcopy.service") / "flowcopy.service"
    parser = configparser.ConfigParser(strict=True, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(unit.read_text())
    service = parser["Service"]
    assert service["Type"] == "notify" and service["NotifyAccess"] == "main"
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID" and service["KillSignal"] == "SIGTERM"
    assert " serve " in service["ExecStart"] and "--http 127.0.0.1:" in service["ExecStart"]
    # a clean stop waits for open freeze windows: the longest one any definition may ask for, plus the release
    assert int(service["TimeoutStopSec"]) >= MAX_FREEZE_TIMEOUT + 30
    assert int(service["WatchdogSec"]) > 0 and service["RestartPreventExitStatus"] == "2"
    assert parser["Install"]["WantedBy"] == "multi-user.target"
    static = files("flowcopy.service") / "static"
    assert sorted(p.name for p in static.iterdir()) == ["app.css", "app.js", "index.html"]
    for asset in static.iterdir():  # no CDN: nothing the page loads lives elsewhere
        text = asset.read_text()
        assert "http://" not in text and "https://" not in text and "src=\"//" not in text, asset.name
