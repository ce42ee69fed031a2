"""`/metrics`: the engine and the scheduler in Prometheus' text format (prometheus-client).

Two kinds of metric, as prometheus-client intends them:

* events (runs ended, fires skipped, retries, lost freezes, freeze windows, journal
  commits) are counters and histograms fed by the engine's and the scheduler's observer
  hooks as they happen; they start at zero with the process, which `rate()` expects;
* states (units per state, longest LSS hold, copy progress, next fire, paused, backup age
  per VM) are read when scraped, by a custom collector, from the engine's memory and the
  journal interface, so a scrape always shows now, never a stale copy.

The backup age (RPO) per VM comes from the journal: the newest succeeded, verified backup
unit of a finished run per VM, and the runs per state, each one aggregate query, so a
scrape costs the same on a store of years of runs.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from flowcopy import machine
from flowcopy.journal.api import RUN_STATES

if TYPE_CHECKING:
    from flowcopy.engine import Engine, RunSummary
    from flowcopy.scheduler import Decision, Scheduler

FREEZE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
COMMIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


def paused_now(scheduler: Scheduler) -> frozenset[str]:
    """The pause state file as it is now (the last readable one if it is broken)."""
    from flowcopy.scheduler import PauseStateError, read_paused

    try:
        return read_paused(scheduler.store)
    except PauseStateError:
        return frozenset()


def skip_kind(reason: str) -> str:
    """A bounded label for a skip's free-text reason."""
    if reason.startswith("paused"):
        return "paused"
    if reason.startswith("missed by"):
        return "missed"
    if "still running" in reason:
        return "overlap"
    return "other"


class ServiceMetrics:
    """One registry per service process: the observer of its engine and scheduler."""

    def __init__(self) -> None:
        disable_created_metrics()  # the *_created series only double what a scraper sees
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.runs = Counter("flowcopy_runs", "Runs ended, by workflow and result", ["workflow", "result"], registry=r)
        self.runs_started = Counter("flowcopy_runs_started", "Runs begun by this service", ["workflow"], registry=r)
        self.start_errors = Counter("flowcopy_run_start_errors", "Fires whose run could not start (planning, site)",
                                    ["workflow"], registry=r)
        self.fires = Counter("flowcopy_fires", "Fire decisions acted on: fired, queued, catch_up, triggered",
                             ["workflow", "action"], registry=r)
        self.skipped = Counter("flowcopy_fires_skipped", "Fire times skipped, by why (paused, overlap, missed)",
                               ["workflow", "why"], registry=r)
        self.missed = Counter("flowcopy_fires_missed", "Older fire times passed over after downtime", ["workflow"], registry=r)
        self.retries = Counter("flowcopy_retries", "Site calls retried, by stage and error kind", ["stage", "kind"], registry=r)
        self.lost_freezes = Counter("flowcopy_freezes_lost", "Guest freezes lost before the establish completed", registry=r)
        self.freeze_window = Histogram("flowcopy_freeze_window_seconds", "Freeze to release, per unit",
                                       buckets=FREEZE_BUCKETS, registry=r)
        self.commit = Histogram("flowcopy_journal_commit_seconds",
                                "A unit's move made durable: queue + group commit, as the unit waits for it",
                                buckets=COMMIT_BUCKETS, registry=r)
        self.up = Gauge("flowcopy_up", "1 while the service's engine runs", registry=r)
        self.ready = Gauge("flowcopy_ready", "1 once the store is resumed and the folder loaded", registry=r)
        self.started = Gauge("flowcopy_start_time_seconds", "Unix time the service started", registry=r)
        self.started.set(time.time())
        self._state: _StateCollector | None = None

    def watch(self, scheduler: Scheduler) -> None:
        """Hook into the scheduler and its engine; register the scrape-time collector."""
        scheduler.observers.append(self)
        scheduler.engine.observers.append(self)
        self._state = _StateCollector(scheduler)
        self.registry.register(self._state)
        self.up.set(1)

    # ---- engine hooks

    def on_commit(self, seconds: float) -> None:
        self.commit.observe(seconds)

    def on_freeze_window(self, seconds: float) -> None:
        self.freeze_window.observe(seconds)

    def on_retry(self, stage: str, kind: str) -> None:
        self.retries.labels(stage, kind).inc()

    def on_lost_freeze(self, unit_id: str) -> None:
        self.lost_freezes.inc()

    def on_run_finished(self, summary: RunSummary) -> None:
        self.runs.labels(summary.workflow, summary.state).inc()

    # ---- scheduler hooks

    def on_decision(self, name: str, decision: Decision) -> None:
        if decision.missed:
            self.missed.labels(name).inc(decision.missed)
        if decision.action == "skip":
            self.skipped.labels(name, skip_kind(decision.reason)).inc()
            return
        if decision.action == "queue":
            action = "queued"
        elif decision.reason.startswith("triggered"):
            action = "triggered"
        else:
            action = "catch_up" if decision.catch_up else "fired"
        self.fires.labels(name, action).inc()

    def on_run_started(self, name: str, run_id: str) -> None:
        self.runs_started.labels(name).inc()

    def on_start_error(self, name: str, error: str) -> None:
        self.start_errors.labels(name).inc()

    def on_stop(self) -> None:
        self.up.set(0)


class _StateCollector(Collector):
    """What is true now, read at scrape time."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.engine: Engine = scheduler.engine
        self._newest: dict[str, float] = {}  # vm -> unix time of its newest verified backup
        self._run_counts: dict[str, int] = {}

    def describe(self) -> list[Any]:
        return []  # collected at scrape time only; names are stable, no need to pre-describe

    def collect(self) -> Iterator[Any]:
        from flowcopy.scheduler import next_fire

        units = GaugeMetricFamily("flowcopy_units", "Units of the runs in flight, by state", labels=["state"])
        counts = self.engine.progress()
        for state in machine.NON_TERMINAL:
            units.add_metric([state], counts.get(state, 0))
        yield units
        yield GaugeMetricFamily("flowcopy_runs_in_flight", "Runs this engine is driving",
                                value=len({u.run_id for u in self.engine.units.values()}))
        yield GaugeMetricFamily("flowcopy_lss_longest_hold_seconds",
                                "Longest time an LSS has been held frozen right now (0: none is)",
                                value=self.engine.longest_lss_hold())
        done, total = self.engine.copy_progress()
        yield GaugeMetricFamily("flowcopy_copy_tracks_done", "Tracks copied, over units in their copy wait", value=done)
        yield GaugeMetricFamily("flowcopy_copy_tracks_total", "Tracks to copy, over units in their copy wait", value=total)

        nxt = GaugeMetricFamily("flowcopy_next_fire_timestamp_seconds", "Unix time of a workflow's next fire",
                                labels=["workflow"])
        paused = GaugeMetricFamily("flowcopy_workflow_paused", "1 if the workflow is paused", labels=["workflow"])
        now = self.scheduler.clock.now()
        paused_names = paused_now(self.scheduler)
        for name, entry in sorted(self.scheduler.entries.items()):
            schedule = entry.workflow.schedule
            paused.add_metric([name], 1 if name in paused_names else 0)
            if schedule is not None:
                nxt.add_metric([name], next_fire(schedule, max(entry.last, now)).timestamp())
        yield nxt
        yield paused

        self._read_journal()
        runs = GaugeMetricFamily("flowcopy_journal_runs", "Runs in the journal, by state", labels=["state"])
        for state in sorted(RUN_STATES):
            runs.add_metric([state], self._run_counts.get(state, 0))
        yield runs
        age = GaugeMetricFamily("flowcopy_backup_age_seconds",
                                "Age of the newest verified backup per VM (the recovery point)", labels=["vm"])
        newest = GaugeMetricFamily("flowcopy_backup_newest_timestamp_seconds",
                                   "Unix time of the newest verified backup per VM", labels=["vm"])
        wall = time.time()
        for vm, t in sorted(self._newest.items()):
            age.add_metric([vm], max(0.0, wall - t))
            newest.add_metric([vm], t)
        yield age
        yield newest

    def _read_journal(self) -> None:
        from flowcopy.journal import JournalError

        journal = self.engine.journal
        try:
            newest = journal.newest_backups()
            counts = journal.run_overview(recent=0).counts
        except JournalError:
            return  # closing (a scrape racing the stop): the figures known so far stand
        self._newest, self._run_counts = newest, counts
