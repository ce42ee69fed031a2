"""What the status page shows, as one JSON document: the workflows with their schedules,
the runs in flight with units per state and copy progress, recent results and failures
with their reasons. Read from the scheduler's entries, the engine's memory and the journal
interface; finished runs are read once (they never change) so a page polling every second
costs a few journal reads, not a scan of the store: the journal's bounded overview
(counts per state, the newest runs) whatever years of runs it holds."""

from __future__ import annotations

import os
import time
from collections import Counter, deque
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import attrs

from flowcopy import machine

if TYPE_CHECKING:
    from flowcopy.journal import RunRow
    from flowcopy.scheduler import Scheduler

RECENT_RUNS = 20
RECENT_FAILURES = 30


def _iso(t: float | datetime | None) -> str | None:
    if t is None:
        return None
    if isinstance(t, datetime):
        return t.astimezone(UTC).isoformat()
    return datetime.fromtimestamp(t, UTC).isoformat()


@attrs.define
class _Finished:
    run: dict[str, Any]
    failures: list[dict[str, Any]]


class StatusBook:
    """Builds the page's document; remembers what cannot be read back from the journal
    (a fire whose run could not start leaves no run behind)."""

    def __init__(self, scheduler: Scheduler, *, started: float | None = None) -> None:
        self.scheduler = scheduler
        self.started = started if started is not None else time.time()
        self.ready = False
        self.start_errors: deque[dict[str, Any]] = deque(maxlen=RECENT_FAILURES)
        self._finished: dict[str, _Finished] = {}
        scheduler.observers.append(self)

    def on_start_error(self, name: str, error: str) -> None:
        self.start_errors.append({"at": _iso(time.time()), "workflow": name, "run": None, "unit": None,
                                  "vms": [], "reason": f"run could not start: {error}"})

    # ---- the document

    def document(self) -> dict[str, Any]:
        from flowcopy.scheduler import next_fire
        from flowcopy.service.metrics import paused_now

        scheduler, engine = self.scheduler, self.scheduler.engine
        journal = engine.journal
        now = scheduler.clock.now()
        paused = paused_now(scheduler)
        overview = journal.run_overview(recent=RECENT_RUNS, workflows=sorted(scheduler.entries),
                                        run_ids={u.run_id for u in engine.units.values()})
        latest = overview.latest
        workflows = []
        for name, entry in sorted(scheduler.entries.items()):
            sched = entry.workflow.schedule
            last = latest.get(name)
            workflows.append({
                "name": name,
                "description": entry.workflow.description or "",
                "cron": sched.cron if sched else None,
                "timezone": (sched.timezone or "UTC") if sched else None,
                "overlap": sched.overlap.value if sched else None,
                "next_fire": _iso(next_fire(sched, max(entry.last, now))) if sched else None,
                "paused": name in paused,
                "running": entry.running,
                "queued": entry.queued is not None,
                "last_run": last.run_id if last else None,
                "last_fire": _iso(last.created) if last else None,
                "last_result": last.state if last else None,
            })
        in_flight: dict[str, dict[str, Any]] = {}
        live_failures: list[dict[str, Any]] = []
        for unit in engine.units.values():
            run = in_flight.setdefault(unit.run_id, {"run_id": unit.run_id, "units": Counter(), "total": 0})
            run["units"][unit.state] += 1
            run["total"] += 1
            if unit.data.get("error") and unit.state in ("compensating", "failed"):
                live_failures.append(self._failure(unit.run_id, unit.unit_id, unit.spec.vms, unit.data["error"], time.time()))
        by_id = overview.by_id
        flight = []
        for run_id, info in sorted(in_flight.items()):
            row = by_id.get(run_id)
            done, total = engine.copy_progress(run_id)
            flight.append({
                "run_id": run_id,
                "workflow": row.workflow if row else run_id.rsplit("-", 2)[0],
                "started": _iso(row.created) if row else None,
                "units": {s: info["units"][s] for s in machine.STATES if info["units"][s]},
                "total": info["total"],
                "copy": {"done": done, "total": total},
            })
        finished = [self._read_finished(r) for r in overview.recent]
        failures = live_failures + [f for fin in finished for f in fin.failures] + list(self.start_errors)
        failures.sort(key=lambda f: f["at"] or "", reverse=True)
        return {
            "now": _iso(now),
            "service": {"pid": os.getpid(), "folder": str(scheduler.folder), "store": str(scheduler.store),
                        "started": _iso(self.started), "ready": self.ready, "stopping": scheduler.stopping},
            "workflows": workflows,
            "runs": {"total": sum(overview.counts.values()), "states": dict(sorted(overview.counts.items()))},
            "in_flight": flight,
            "recent": [fin.run for fin in finished],
            "failures": failures[:RECENT_FAILURES],
        }

    @staticmethod
    def _failure(run_id: str, unit_id: str, vms: Any, reason: str, at: float) -> dict[str, Any]:
        return {"at": _iso(at), "workflow": run_id.rsplit("-", 2)[0], "run": run_id, "unit": unit_id,
                "vms": list(vms), "reason": reason}

    def _read_finished(self, run: RunRow) -> _Finished:
        cached = self._finished.get(run.run_id)
        if cached is not None:
            return cached
        units = self.scheduler.engine.journal.units(run.run_id)
        counts = Counter(u.state for u in units)
        failures = []
        for u in units:
            if u.state in ("failed", "cancelled"):
                vms = u.data.get("spec", {}).get("vms", [])
                f = self._failure(run.run_id, u.unit_id, vms, str(u.data.get("error") or u.state), u.updated)
                f["workflow"] = run.workflow
                failures.append(f)
        doc = {"run_id": run.run_id, "workflow": run.workflow, "state": run.state, "started": _iso(run.created),
               "finished": _iso(run.finished), "units": dict(counts),
               "verified": bool(units) and all(u.data.get("verified") is True for u in units)}
        fin = self._finished[run.run_id] = _Finished(doc, failures)
        if len(self._finished) > 10 * RECENT_RUNS:
            for old in list(self._finished)[: len(self._finished) - 5 * RECENT_RUNS]:
                del self._finished[old]
        return fin
