"""The service's observers in process, on trio's MockClock: the engine's and scheduler's
hooks move the metrics they feed (retries by stage, a lost freeze, freeze windows, runs by
result, fires triggered/queued/skipped), `/readyz` says why the service is not ready when
its site is gone, and the trigger follows the overlap policy."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import trio
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from flowcopy.runner import open_engine
from flowcopy.scheduler import Scheduler, TrioClock
from flowcopy.service.http import readiness
from flowcopy.service.metrics import ServiceMetrics
from flowcopy.service.status import StatusBook
from flowcopy.site import api
from flowcopy.site.inventory import load_lab
from tests.service_process import QUICK, write_folder
from tests.test_engine import FailingSite

START = datetime(2026, 3, 1, 12, 0, 30, tzinfo=UTC)


def samples(metrics: ServiceMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(metrics.registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def until(predicate: Any) -> None:
    while not predicate():
        await trio.sleep(0.5)


async def test_engine_hooks_count_retries_lost_freezes_windows_and_results(tmp_path: Path, autojump_clock: Any) -> None:
    inner = load_lab(None)
    quiesces = {"n": 0}

    def first_two_quiesces_time_out(*args: Any, **kwargs: Any) -> Exception | None:
        quiesces["n"] += 1
        return api.GuestNotResponding("guest agent of rich-w2k-os-1 did not answer") if quiesces["n"] <= 2 else None

    site = FailingSite(inner, {"quiesce": first_two_quiesces_time_out})
    establishes = {"n": 0}

    async def first_establish_outlives_the_freeze(*args: Any, **kwargs: Any) -> Any:
        establishes["n"] += 1
        if establishes["n"] == 1:
            await trio.sleep(40)  # longer than the 30 s freeze timeout: the guest thaws itself
        return await inner.establish(*args, **kwargs)

    site.establish = first_establish_outlives_the_freeze  # type: ignore[attr-defined]
    folder = write_folder(tmp_path / "wf", QUICK)
    async with inner.running(), open_engine(tmp_path / "store", site) as engine:
        scheduler = Scheduler(folder, engine, clock=TrioClock.starting_at(START), store=tmp_path / "store")
        metrics = ServiceMetrics()
        metrics.watch(scheduler)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(scheduler.run)
            await until(lambda: "quick" in scheduler.entries)
            assert scheduler.trigger("quick").action == "fire"
            await until(lambda: scheduler.finished)
            scheduler.stop()
        got = samples(metrics)
        assert got[("flowcopy_backup_age_seconds", (("vm", "rich-w2k-os-1"),))] >= 0
    [summary] = scheduler.finished
    assert summary.state == "succeeded"
    assert got[("flowcopy_retries_total", (("kind", "guest_not_responding"), ("stage", "freeze")))] == 2
    assert got[("flowcopy_freezes_lost_total", ())] == 1
    assert got[("flowcopy_freeze_window_seconds_count", ())] == 1  # the lost attempt never released
    assert got[("flowcopy_runs_total", (("result", "succeeded"), ("workflow", "quick")))] == 1
    assert got[("flowcopy_fires_total", (("action", "triggered"), ("workflow", "quick")))] == 1
    assert got[("flowcopy_up", ())] == 0  # stopped


async def test_trigger_follows_the_overlap_policy(tmp_path: Path, autojump_clock: Any) -> None:
    inner = load_lab(None)

    async def slow_check(*args: Any, **kwargs: Any) -> Any:
        await trio.sleep(60)
        return await inner.mount_check(*args, **kwargs)

    site = FailingSite(inner, {})
    site.mount_check = slow_check  # type: ignore[attr-defined]
    text = QUICK.replace("units:", 'schedule:\n  cron: "0 3 * * *"\n  overlap: buffer_one\nunits:', 1)
    folder = write_folder(tmp_path / "wf", text)
    async with inner.running(), open_engine(tmp_path / "store", site) as engine:
        scheduler = Scheduler(folder, engine, clock=TrioClock.starting_at(START), store=tmp_path / "store")
        metrics = ServiceMetrics()
        metrics.watch(scheduler)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(scheduler.run)
            await until(lambda: "quick" in scheduler.entries)
            assert scheduler.trigger("no-such").reason.startswith("no workflow 'no-such' in ")
            assert scheduler.trigger("quick").action == "fire"
            await trio.sleep(5)
            queued = scheduler.trigger("quick")
            assert (queued.action, queued.reason) == ("queue", "triggered by hand; queued behind the running run (overlap: buffer_one)")
            refused = scheduler.trigger("quick")
            assert refused.action == "skip" and "one run is already queued" in refused.reason
            await until(lambda: len(scheduler.finished) == 2)  # the queued one ran after the first
            scheduler.stop()
            assert scheduler.trigger("quick").reason == "the service is stopping"
        got = samples(metrics)
    assert [s.state for s in scheduler.finished] == ["succeeded", "succeeded"]
    assert got[("flowcopy_fires_total", (("action", "queued"), ("workflow", "quick")))] == 1
    assert got[("flowcopy_fires_skipped_total", (("why", "overlap"), ("workflow", "quick")))] == 1
    assert got[("flowcopy_runs_started_total", (("workflow", "quick"),))] == 2


async def test_readyz_reason_when_resuming_and_when_the_site_is_gone(tmp_path: Path, autojump_clock: Any) -> None:
    inner = load_lab(None)
    gone = {"now": False}

    def unreachable(*args: Any, **kwargs: Any) -> Exception | None:
        return api.SiteUnavailable("connection refused by http://127.0.0.1:9") if gone["now"] else None

    site = FailingSite(inner, {"now": unreachable})
    folder = write_folder(tmp_path / "wf", QUICK)
    async with inner.running(), open_engine(tmp_path / "store", site) as engine:
        scheduler = Scheduler(folder, engine, clock=TrioClock.starting_at(START), store=tmp_path / "store")
        book = StatusBook(scheduler)
        assert await readiness(scheduler, book) == "resuming the runs the store left unfinished"
        book.ready = True
        assert await readiness(scheduler, book) is None
        gone["now"] = True
        assert await readiness(scheduler, book) == "site unreachable: site_unavailable: connection refused by http://127.0.0.1:9"
        doc = book.document()
        assert [w["name"] for w in doc["workflows"]] == []  # not loaded until the scheduler runs
        assert doc["service"]["ready"] is True and doc["in_flight"] == []


async def test_status_document_shows_a_unit_failure_with_its_reason(tmp_path: Path, autojump_clock: Any) -> None:
    inner = load_lab(None)

    async def establish_outlives_every_freeze(*args: Any, **kwargs: Any) -> Any:
        await trio.sleep(40)  # the guest's 30 s freeze timeout ends every attempt first
        return await inner.establish(*args, **kwargs)

    site = FailingSite(inner, {})
    site.establish = establish_outlives_every_freeze  # type: ignore[attr-defined]
    folder = write_folder(tmp_path / "wf", QUICK)
    async with inner.running(), open_engine(tmp_path / "store", site) as engine:
        scheduler = Scheduler(folder, engine, clock=TrioClock.starting_at(START), store=tmp_path / "store")
        book = StatusBook(scheduler)
        metrics = ServiceMetrics()
        metrics.watch(scheduler)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(scheduler.run)
            await until(lambda: "quick" in scheduler.entries)
            scheduler.trigger("quick")
            await until(lambda: scheduler.finished)
            doc = book.document()
            got = samples(metrics)
            scheduler.stop()
    [run] = doc["recent"]
    assert (run["workflow"], run["state"], run["units"], run["verified"]) == ("quick", "failed", {"failed": 1}, False)
    [failure] = doc["failures"]
    assert failure["run"] == run["run_id"] and failure["vms"] == ["rich-w2k-os-1"]
    assert failure["reason"].startswith("gave up after 3 lost freezes: rich-w2k-os-1: freeze 3 ended by the guest's own timeout")
    [workflow] = doc["workflows"]
    assert (workflow["last_run"], workflow["last_result"], workflow["next_fire"]) == (run["run_id"], "failed", None)
    assert got[("flowcopy_runs_total", (("result", "failed"), ("workflow", "quick")))] == 1
    assert got[("flowcopy_freezes_lost_total", ())] == 3
    assert ("flowcopy_backup_age_seconds", (("vm", "rich-w2k-os-1"),)) not in got  # no verified backup: no recovery point
