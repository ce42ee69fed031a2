"""From a loaded definition to the units of one run, fixed before the run is journaled.

Everything that could differ between now and a resume is decided here, once, and
journaled with the run: which VMs a selector matched, which consistency group each VM
belongs to, and which free pool volume each disk copies to. Pool targets are handed out
here, one at a time, because units preparing concurrently would otherwise race for the
same free volume.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import attrs

from flowcopy import definitions as d
from flowcopy import retry
from flowcopy.engine import Engine, Limits
from flowcopy.logs import get_logger
from flowcopy.site.api import Site, SiteError
from flowcopy.stages import DiskSpec, TargetRef, UnitSpec, describe

T = TypeVar("T")
log = get_logger("flowcopy.planning")


class PlanError(Exception):
    """The definition is valid but does not fit the site (unknown pool, empty selector...)."""


class PlanFailed(PlanError):
    """Planning failed and the run is journaled as failed with this reason."""

    def __init__(self, run_id: str, reason: str) -> None:
        super().__init__(f"run {run_id} failed before it started: {reason}")
        self.run_id, self.reason = run_id, reason


def _policy(unit: d.UnitDef) -> retry.Policy:
    """The unit's own retry policy: planning retries like the stages do (jittered)."""
    r = unit.retry
    return retry.Policy(attempts=r.max_attempts, initial=r.initial_interval, backoff=r.backoff,
                        max_interval=r.max_interval, non_retryable=tuple(r.non_retryable))


async def _call(what: str, policy: retry.Policy, fn: Callable[[], Awaitable[T]]) -> T:
    """One planning call to the site, retried on transient errors under `policy`."""

    def on_retry(attempt: int, exc: BaseException, wait: float) -> None:
        log.warning("retrying", stage="plan", call=what, attempt=attempt, error=describe(exc), wait_s=round(wait, 3))

    return await retry.call(fn, policy, on_retry=on_retry)


async def plan_or_journal(workflow: d.Workflow, site: Site, engine: Engine) -> list[UnitSpec]:
    """`plan_units`, and if the site still refuses after the retries (or the definition
    does not fit it) the run is journaled as failed with the reason before `PlanFailed`
    is raised: the service's catch-up logic and `flowcopy status` see that the slot fired."""
    from flowcopy.backups.restore import RestoreRefused, workflow_units

    try:
        specs = await plan_units(workflow, site)
        if workflow.kind is d.Kind.RESTORE:  # the same restore path as `flowcopy restore`
            specs = await workflow_units(specs, site, engine.journal)
        return specs
    except (PlanError, SiteError, RestoreRefused) as exc:
        reason = f"planning failed: {describe(exc) if isinstance(exc, SiteError) else exc}"
        run_id = await engine.begin_failed_run(workflow.name, definition_data(workflow), reason)
        raise PlanFailed(run_id, reason) from exc


def site_url(workflow: d.Workflow) -> str | None:
    return workflow.site.url


def definition_data(workflow: d.Workflow) -> dict[str, Any]:
    return d.unstructure(workflow)


def limits(workflow: d.Workflow) -> Limits:
    c = workflow.concurrency
    return Limits(units=c.vms, per_lss=c.per_lss, guest_agents=c.guest_agents)


def _target(target: d.Target) -> TargetRef:
    if isinstance(target, d.SerialTarget):
        return TargetRef(serial=target.serial)
    if isinstance(target, d.VmDiskTarget):
        return TargetRef(vm=target.vm, disk=target.disk)
    if isinstance(target, d.RotateTarget):
        return TargetRef(rotate=tuple(target.rotate))
    return TargetRef(pool=(target.pool,))


def _spec(workflow: d.Workflow, unit: d.UnitDef, vms: Sequence[str]) -> UnitSpec:
    copy = unit.copy
    t = unit.timeouts
    return UnitSpec(
        unit_id="",
        kind=workflow.kind.value,
        vms=tuple(vms),
        disks=tuple(DiskSpec(vm=vm, disk=disk.disk, target=_target(disk.target)) for vm in vms for disk in unit.disks),
        mode=unit.mode.value,
        quiesce=unit.quiesce.value,
        freeze_timeout=float(unit.freeze_timeout),
        copy_action=copy.action.value,
        copy_to=copy.to,
        copy_host=copy.host,
        mount_vm=copy.vm,
        withdraw=unit.withdraw.value,
        retention=workflow.retention.keep if workflow.retention else None,
        task=unit.task,
        restore_before=(workflow.before.value if workflow.before else "poweroff"),
        retry_max_attempts=unit.retry.max_attempts,
        retry_initial=unit.retry.initial_interval,
        retry_backoff=unit.retry.backoff,
        retry_max_interval=unit.retry.max_interval,
        non_retryable=tuple(unit.retry.non_retryable),
        timeouts={
            "prepare": t.prepare,
            "freeze": t.freeze,
            "establish": t.establish,
            "release": t.release,
            "copy": t.copy,
            "withdraw": t.withdraw,
        },
        group=unit.consistency_group,
    )


async def plan_units(workflow: d.Workflow, site: Site) -> list[UnitSpec]:
    """The run's units: one per VM, or one per named consistency group (several VMs)."""
    specs: list[UnitSpec] = []
    groups: dict[str, UnitSpec] = {}
    for index, unit in enumerate(workflow.units):
        policy = _policy(unit)
        if unit.vm is not None:  # an unknown VM fails its own unit in prepare (with a did-you-mean)
            vm_sets: list[list[str]] = [[unit.vm]]
        elif unit.selector is not None:
            selector = dict(unit.selector)
            matched = [vm.name for vm in await _call("list_vms", policy, lambda: site.list_vms(selector))]
            if not matched:
                labels = ", ".join(f"{k}={v}" for k, v in sorted(unit.selector.items()))
                raise PlanError(f"{workflow.name}: units[{index}]: selector {labels} matches no VM at the site")
            vm_sets = [[vm] for vm in matched]
        else:
            vm_sets = [[]]  # a saved task: the array knows the pairs
        for vms in vm_sets:
            spec = _spec(workflow, unit, vms)
            group = unit.consistency_group
            if group is None:
                specs.append(spec)
            elif group in groups:
                merged = groups[group]
                groups[group] = UnitSpec(
                    **{
                        **_fields(merged),
                        "vms": merged.vms + tuple(v for v in spec.vms if v not in merged.vms),
                        "disks": merged.disks + spec.disks,
                        "freeze_timeout": min(merged.freeze_timeout, spec.freeze_timeout),
                        # a group that mixes levels (mixed_quiesce) keeps each VM's own
                        "vm_quiesce": {**merged.vm_quiesce, **{vm: spec.quiesce for vm in spec.vms}},
                    }
                )
            else:
                spec = attrs.evolve(spec, vm_quiesce={vm: spec.quiesce for vm in spec.vms})
                groups[group] = spec
                specs.append(spec)
    # replace group placeholders by their merged form, keeping definition order
    specs = [groups[s.group] if s.group in groups else s for s in specs]
    return await _assign_pools(workflow, site, specs)


def _fields(spec: UnitSpec) -> dict[str, Any]:
    return {f.name: getattr(spec, f.name) for f in attrs.fields(UnitSpec)}


async def _assign_pools(workflow: d.Workflow, site: Site, specs: list[UnitSpec]) -> list[UnitSpec]:
    """Give every pool target its own free volume of the right size, now, in order."""
    if not any(disk.target.pool for spec in specs for disk in spec.disks):
        return specs

    policy = _policy(workflow.units[0])
    pools = await _call("list_pools", policy, site.list_pools)
    taken: set[str] = {disk.target.serial for spec in specs for disk in spec.disks if disk.target.serial}
    # per pool, the first place not yet taken: `taken` only grows, so every volume before
    # it stays taken and the scan starts there (scanning from the start made planning
    # quadratic: 20,000 pool disks took longer than running their 10,000 VMs)
    first_free: dict[str, int] = {}
    out: list[UnitSpec] = []
    for spec in specs:
        disks = []
        for disk in spec.disks:
            if not disk.target.pool:
                disks.append(disk)
                continue
            name = disk.target.pool[0]
            if name not in pools:
                raise PlanError(
                    f"{workflow.name}: {disk.vm} {disk.disk}: the site defines no pool {name!r} "
                    f"(pools: {', '.join(sorted(pools)) or 'none'})"
                )
            source = await _call("lun_of", policy, lambda: site.lun_of(disk.vm, disk.disk))  # noqa: B023
            chosen = None
            pool = pools[name]
            start = first_free.get(name, 0)
            while start < len(pool) and pool[start] in taken:
                start += 1
            first_free[name] = start
            for i in range(start, len(pool)):
                serial = pool[i]
                if serial in taken:
                    continue
                volume = await _call("get_volume", policy, lambda: site.get_volume(serial))  # noqa: B023
                if volume.capacity != source.capacity or not volume.online:
                    continue
                if await _call("query", policy, lambda: site.query(volume=serial)):  # noqa: B023
                    continue
                chosen = serial
                break
            if chosen is None:
                raise PlanError(
                    f"{workflow.name}: {disk.vm} {disk.disk}: pool {name!r} has no free volume of "
                    f"{source.capacity} bytes left for this run"
                )
            taken.add(chosen)
            disks.append(attrs.evolve(disk, target=TargetRef(serial=chosen)))
        out.append(attrs.evolve(spec, disks=tuple(disks)))
    return out
