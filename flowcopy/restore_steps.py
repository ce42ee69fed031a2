"""The steps of a restore unit (`spec.restore` set): the restore kind's half of the state
table (prepare -> stop -> restore -> check -> start -> copy), walked by the same engine as
backups, with the same journal moves, stages, retries and compensation.

Apart from `Engine` because nothing here touches the freeze window, the leases or the
resume protocol: each step reads the unit's plan, acts through the engine's site, and
journals its outcome with `Engine._move`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from flowcopy import stages
from flowcopy.engine import Engine, Unit, UnitFailed, pairs_to_data
from flowcopy.site import api
from flowcopy.stages import Pair


def plan_of(unit: Unit) -> Any:
    from flowcopy.backups.restore import Plan

    return Plan.from_data(unit.spec.restore or {})


async def pending(engine: Engine, unit: Unit) -> None:
    await engine._move(unit, "prepare")
    await prepare(engine, unit)


async def prepare(engine: Engine, unit: Unit) -> None:
    """Read-only: the image must still be the one recorded before anything stops."""
    from flowcopy.backups import restore

    plan = plan_of(unit)

    async def unchanged() -> None:
        for step in plan.steps:
            await restore.check_image(engine.site, step)

    try:
        await engine._stage(unit, "prepare", unchanged)
    except restore.RestoreRefused as exc:
        raise UnitFailed(str(exc), kind="image_changed") from None
    pairs = [Pair(s.vm, s.disk, s.dest, s.image or "", s.dest_lss, "", s.capacity) for s in plan.steps]
    await engine._move(unit, "prepared", data={"pairs": pairs_to_data(pairs)})


async def prepared(engine: Engine, unit: Unit) -> None:
    await engine._move(unit, "stop")
    await stop(engine, unit)


async def stop(engine: Engine, unit: Unit) -> None:
    """Power off what uses the destinations (one freeze window per VM: never while a
    backup of this engine has the guest frozen)."""
    plan = plan_of(unit)

    async def power_off() -> None:
        for vm in plan.stop_vms:
            if (await engine.site.get_vm(vm)).power is api.PowerState.ON:
                await engine.site.power_off(vm)

    async with engine._vm_locks(unit):
        await engine._stage(unit, "stop", power_off)
    await engine._move(unit, "stopped")


async def stopped(engine: Engine, unit: Unit) -> None:
    await engine._move(unit, "restore", data={"overwrote": True})
    await write(engine, unit)


async def write(engine: Engine, unit: Unit) -> None:
    """Overwrite each destination with its image; idempotent, so a resume redoes it."""
    from flowcopy.backups import restore

    plan = plan_of(unit)

    async def overwrite() -> float:
        for step in plan.steps:
            if step.method in ("reverse", restore.FAST_REVERSE):
                await restore.reverse_back(engine.site, step, unit.tag, fast=step.method == restore.FAST_REVERSE)
            elif step.method == "flash":
                await restore.flash_back(engine.site, step, unit.tag)
            else:
                await restore.write_back(engine.site, step)
        return await engine.site.now()

    try:
        at = await engine._stage(unit, "restore", overwrite)
    except restore.RestoreRefused as exc:
        raise UnitFailed(str(exc), kind="restore_refused") from None
    await engine._move(unit, "restored", data={"established_at": at})


async def restored(engine: Engine, unit: Unit) -> None:
    await engine._move(unit, "check")
    await check(engine, unit)


async def check(engine: Engine, unit: Unit) -> None:
    """The independent checker on the restored LUNs, and every LUN read back against
    the image's content digest: the restore's outcome includes both."""
    from flowcopy.backups.images import lun_digest

    plan = plan_of(unit)

    async def judge() -> dict[str, Any]:
        report = await engine.site.check([s.dest for s in plan.steps])
        problems = list(report.problems)
        for s in plan.steps:
            if s.digest and await lun_digest(engine.site, s.dest, s.capacity) != s.digest:
                problems.insert(0, f"{s.dest} does not read back as the image of {s.source}")
        ok = report.consistent and len(problems) == len(report.problems)
        return {"verified": ok, "check": {"kind": report.kind, "problems": problems[:20]}}

    await engine._move(unit, "checked", data=await engine._stage(unit, "check", judge))


async def checked(engine: Engine, unit: Unit) -> None:
    if not unit.data.get("verified", False):
        problems = unit.data.get("check", {}).get("problems", [])
        stopped = ", ".join(plan_of(unit).stop_vms)
        raise UnitFailed(
            f"the restored LUNs did not check: {'; '.join(problems) or 'checker found them inconsistent'}"
            + (f"; {stopped} left powered off" if stopped else ""),
            kind="not_verified",
        )
    await engine._move(unit, "start")
    await start(engine, unit)


async def start(engine: Engine, unit: Unit) -> None:
    plan = plan_of(unit)

    async def power_on() -> float:
        for vm in plan.stop_vms:
            if (await engine.site.get_vm(vm)).power is api.PowerState.OFF:
                await engine.site.power_on(vm)
        return await engine.site.now()

    at = await engine._stage(unit, "start", power_on)
    await engine._move(unit, "started", data={"started_at": at})


async def started(engine: Engine, unit: Unit) -> None:
    await engine._move(unit, "copy")
    await copy(engine, unit)


async def copy(engine: Engine, unit: Unit) -> None:
    """The VMs already run on the image; the array finishes copying it back."""

    def progress(left: int, total: int) -> None:
        unit.copy_left = (left, total)

    await engine._stage(unit, "copy", lambda: stages.wait_copied(engine.site, unit.pairs, unit.tag, engine.poll, on_progress=progress))
    await engine._move(unit, "copied", data={"copied_at": await engine.site.now()})


async def copied(engine: Engine, unit: Unit) -> None:
    await engine._move(unit, "withdraw")
    await engine._move(unit, "succeed")


async def withdrawing(engine: Engine, unit: Unit) -> None:
    await engine._move(unit, "succeed")


async def undo(engine: Engine, unit: Unit) -> None:
    """Before the destinations were touched: start again what was stopped. After: the
    LUNs hold a partial image, so nothing is started on them (the error says so), and
    a copy back in flight is left to finish (withdrawing it would leave less)."""
    if unit.data.get("overwrote"):
        return
    for vm in plan_of(unit).stop_vms:
        if (await engine.site.get_vm(vm)).power is api.PowerState.OFF:
            await engine.site.power_on(vm)


STEPS: dict[str, Callable[[Engine, Unit], Awaitable[None]]] = {
    "pending": pending,
    "preparing": prepare,
    "prepared": prepared,
    "stopping": stop,
    "stopped": stopped,
    "restoring": write,
    "restored": restored,
    "checking": check,
    "checked": checked,
    "starting": start,
    "started": started,
    "copying": copy,
    "copied": copied,
    "withdrawing": withdrawing,
}
"""The restore kind's step per state (the backup kind's are `Engine._steps`)."""
