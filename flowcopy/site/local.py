"""`LocalSite`: the `Site` interface in-process, over the array core (`ess`) and the farm (`esx`).

The shell around two synchronous cores. It supplies site time, models the guests'
latencies, runs the guest workloads in a nursery it owns (`async with site.running():`),
makes a guest's application writes wait while the guest is quiesced or off (and the
array's writes wait while an LSS is frozen), and reports every successful mutating core
call as `(component, method, kwargs)` to one hook, so a persistence layer can log and
replay it: `site.apply(component, method, kwargs)` on a site rebuilt with
`LocalSite.from_state(site.to_state())` reproduces it exactly.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio

from flowcopy.site import checker
from flowcopy.site import workloads as wl
from flowcopy.site.api import (
    BadRequest,
    CheckReport,
    DiskInfo,
    Extent,
    FlashOptions,
    FreezeStatus,
    FreezeTicket,
    GuestStateError,
    HostDisk,
    HostInfo,
    LssFreeze,
    LssRelease,
    PowerState,
    QuiesceLevel,
    RelationshipInfo,
    SavedTask,
    ThawResult,
    UnknownDisk,
    UnknownHost,
    UnknownVM,
    VMInfo,
    VolumeInfo,
)
from flowcopy.site.esx import BLOCKING_LEVELS, Farm
from flowcopy.site.ess import Array, ArrayService

MutationHook = Callable[[str, str, dict[str, Any]], None]
STATE_VERSION = 1


@attrs.frozen
class Latency:
    """Modelled guest-side durations, in site seconds (zero them for benchmarks)."""

    quiesce: float = 0.05
    thaw: float = 0.05
    power_on: float = 1.0
    power_off: float = 1.0
    reboot: float = 2.0
    rescan: float = 0.05

    @classmethod
    def zero(cls) -> Latency:
        return cls(0.0, 0.0, 0.0, 0.0, 0.0, 0.0)


@attrs.define
class _Runner:
    workload: Any
    scope: trio.CancelScope | None = None
    stopping: bool = False
    in_op: bool = False
    op_scope: trio.CancelScope | None = None
    done: trio.Event = attrs.Factory(trio.Event)
    error: BaseException | None = None


class _Guest:
    """The `workloads.GuestIO` of one VM: writes through the array, waits inside the guest."""

    def __init__(self, site: LocalSite, vm: str) -> None:
        self.site = site
        self.vm = vm

    async def read(self, serial: str, offset: int, length: int) -> bytes:
        return await self.site.service.read(serial, offset, length)

    async def write(self, serial: str, offset: int, data: bytes) -> None:
        await self.site.service.write(serial, offset, data)

    async def mid_transaction(self) -> None:
        """A frozen file system holds the next write even inside a transaction."""
        site = self.site
        machine = site.farm.state(self.vm, now=site.clock())
        if machine.frozen and machine.freeze.level is QuiesceLevel.FILESYSTEM:  # type: ignore[union-attr]
            site._inflight[self.vm] -= 1
            site._changed(self.vm)
            try:
                await site._guest_ready(self.vm)
            finally:
                site._inflight[self.vm] += 1


class LocalSite:
    """The in-process site. Build it with `inventory.load_lab()` or from cores and a lab dict."""

    def __init__(
        self,
        array: Array | None = None,
        farm: Farm | None = None,
        *,
        clock: Callable[[], float] | None = None,
        speed: float = 1.0,
        latency: Latency | None = None,
        on_mutation: MutationHook | None = None,
        lab: Mapping[str, Any] | None = None,
        workloads: Iterable[Any] = (),
    ) -> None:
        self.array = array if array is not None else Array()
        self.farm = farm if farm is not None else Farm()
        self.clock: Callable[[], float] = clock if clock is not None else trio.current_time
        self.speed = float(speed)
        self.latency = latency if latency is not None else Latency()
        self.on_mutation = on_mutation
        self.lab: dict[str, Any] = {"name": "lab", "description": "", "pools": {}, "lsses": []}
        self.lab.update(dict(lab or {}))
        self.service = ArrayService(self.array, clock=self._now, speed=self.speed, on_mutation=self._array_mutation)
        self.workloads: dict[str, Any] = {}
        for load in workloads:
            self.add_workload(load)
        self._runners: dict[str, _Runner] = {}
        self._nursery: trio.Nursery | None = None
        self._inflight: dict[str, int] = {}
        self._events: dict[str, trio.Event] = {}  # per VM: its guest state or in-flight count changed

    # ------------------------------------------------------------------ plumbing

    def _now(self) -> float:
        return self.clock()

    @property
    def pools(self) -> dict[str, tuple[str, ...]]:
        return dict(self.lab.get("pools", {}))

    def _array_mutation(self, method: str, kwargs: dict[str, Any]) -> None:
        if self.on_mutation is not None:
            self.on_mutation("array", method, kwargs)

    def _farm(self, method: str, **kwargs: Any) -> Any:
        """Call a farm core method and report it (only when it succeeded)."""
        result = getattr(self.farm, method)(**kwargs)
        if self.on_mutation is not None:
            self.on_mutation("farm", method, dict(kwargs))
        self._changed(kwargs.get("vm"))
        return result

    def apply(self, component: str, method: str, kwargs: Mapping[str, Any]) -> Any:
        """Replay one reported mutation on the cores (persistence)."""
        target = {"array": self.array, "farm": self.farm}.get(component)
        if target is None:
            raise BadRequest(f"unknown site component {component!r}")
        return getattr(target, method)(**dict(kwargs))

    def _changed(self, vm: str | None) -> None:
        """Wake what waits on a VM's guest state (its workloads held, a quiesce draining)."""
        event = self._events.pop(vm, None) if vm is not None else None
        if event is not None:
            event.set()

    def _event(self, vm: str) -> trio.Event:
        event = self._events.get(vm)
        if event is None:
            event = self._events[vm] = trio.Event()
        return event

    def _trio_deadline(self, site_time: float) -> float:
        if math.isinf(site_time):
            return math.inf
        now = trio.current_time()
        return max(now, now + (site_time - self.clock()) / self.speed)

    async def _sleep(self, site_seconds: float) -> None:
        if site_seconds > 0:
            await trio.sleep(site_seconds / self.speed)
        else:
            await trio.lowlevel.checkpoint()

    async def _wait_change(self, vm: str, until: float) -> None:
        event = self._event(vm)
        with trio.move_on_at(self._trio_deadline(until)):
            await event.wait()

    async def _guest_ready(self, vm: str) -> None:
        """Wait until the guest lets its applications write (thawed, powered on)."""
        while True:
            blocked = self.farm.io_blocked(vm, now=self.clock())
            if blocked is None:
                return
            await self._wait_change(vm, blocked)

    async def _drain(self, vm: str, until: float) -> None:
        """Wait for the guest's in-flight workload operations to finish (bounded by `until`)."""
        while self._inflight.get(vm, 0) > 0 and self.clock() < until:
            await self._wait_change(vm, until)

    # ------------------------------------------------------------------ persistence

    def to_state(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "lab": {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in self.lab.items()},
            "array": self.array.to_state(),
            "farm": self.farm.to_state(),
            "workloads": [load.spec() for load in self.workloads.values()],
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any], **kwargs: Any) -> LocalSite:
        lab = dict(state.get("lab", {}))
        lab["pools"] = {k: tuple(v) for k, v in dict(lab.get("pools", {})).items()}
        return cls(
            array=Array.from_state(state["array"]),
            farm=Farm.from_state(state["farm"]),
            lab=lab,
            workloads=[wl.from_spec(dict(spec)) for spec in state.get("workloads", [])],
            **kwargs,
        )

    # ------------------------------------------------------------------ workloads

    def add_workload(self, load: Any) -> None:
        if load.name in self.workloads:
            raise BadRequest(f"a workload {load.name!r} already exists")
        self.farm.vm(load.vm)
        self.workloads[load.name] = load

    def format_workloads(self, names: Iterable[str] | None = None) -> None:
        """mkfs / create database: lay down the workloads' empty images (at lab build)."""
        now = self.clock() if names is not None else 0.0
        for name in names if names is not None else list(self.workloads):
            for serial, offset, data in self.workloads[name].format_image():
                self.array.write(serial, offset, data, now=now)
                if self.on_mutation is not None:
                    self.on_mutation("array", "write", {"serial": serial, "offset": offset, "data": data, "now": now})

    def list_workloads(self) -> list[dict[str, object]]:
        out = []
        for name in sorted(self.workloads):
            desc = self.workloads[name].describe()
            runner = self._runners.get(name)
            desc["running"] = runner is not None and not runner.done.is_set()
            desc["autostart"] = self.workloads[name].autostart
            out.append(desc)
        return out

    @asynccontextmanager
    async def running(self, workloads: bool | Iterable[str] = True) -> AsyncIterator[LocalSite]:
        """Run the site's guest workloads while the block runs.

        `workloads=True` starts those marked `autostart` in the lab, False none, or a list
        of names. On exit the workloads stop where they are (crash-consistent images).
        """
        if self._nursery is not None:
            raise RuntimeError("this site is already running")
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                if workloads is True:
                    names = [n for n, load in self.workloads.items() if load.autostart]
                elif workloads is False:
                    names = []
                else:
                    names = list(workloads)  # type: ignore[arg-type]
                for name in names:
                    await self.start_workload(name)
                yield self
            finally:
                for runner in self._runners.values():
                    for scope in (runner.op_scope, runner.scope):
                        if scope is not None:
                            scope.cancel()
                self._nursery = None
                nursery.cancel_scope.cancel()
        self._runners.clear()

    async def start_workload(self, name: str) -> None:
        if self._nursery is None:
            raise RuntimeError("start workloads inside `async with site.running():`")
        load = self.workloads.get(name)
        if load is None:
            raise BadRequest(f"no workload {name!r}; workloads: {', '.join(sorted(self.workloads)) or 'none'}")
        runner = self._runners.get(name)
        if runner is not None and not runner.done.is_set():
            return
        runner = _Runner(workload=load)
        self._runners[name] = runner
        await self._nursery.start(self._run_workload, runner)

    async def stop_workload(self, name: str) -> None:
        """Stop after the operation in flight (a clean stop, unlike leaving `running()`)."""
        runner = self._runners.get(name)
        if runner is None or runner.done.is_set():
            return
        runner.stopping = True
        if not runner.in_op and runner.scope is not None:
            runner.scope.cancel()  # idle or held by the guest: nothing to finish
        await runner.done.wait()

    async def _run_workload(self, runner: _Runner, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        load = runner.workload
        vm = load.vm
        guest = _Guest(self, vm)
        boots: int | None = None
        try:
            with trio.CancelScope() as scope:
                runner.scope = scope
                task_status.started()
                while not runner.stopping:
                    await self._guest_ready(vm)
                    if runner.stopping:
                        break
                    machine = self.farm.state(vm, now=self.clock())
                    if boots != machine.boots:
                        # first start, or the guest rebooted: the application re-reads its disks
                        boots = machine.boots
                        await load.recover(self.service.read)
                        continue
                    self._inflight[vm] = self._inflight.get(vm, 0) + 1
                    runner.in_op = True
                    try:
                        with trio.CancelScope(shield=True):
                            # a stop lets the operation finish; only leaving running() cuts it
                            runner.op_scope = trio.CancelScope()
                            with runner.op_scope:
                                await load.step(guest)
                    finally:
                        runner.in_op = False
                        self._inflight[vm] -= 1
                        self._changed(vm)
                    if runner.stopping:
                        break
                    await trio.sleep(load.pause() / self.speed)
        finally:
            runner.done.set()

    # ------------------------------------------------------------------ clock, inventory

    async def now(self) -> float:
        await trio.lowlevel.checkpoint()
        return self.clock()

    async def list_hosts(self) -> list[HostInfo]:
        await trio.lowlevel.checkpoint()
        return self.farm.list_hosts()

    async def list_vms(self, labels: Mapping[str, str] | None = None) -> list[VMInfo]:
        await trio.lowlevel.checkpoint()
        return self.farm.list_vms(labels, now=self.clock())

    async def get_vm(self, name: str) -> VMInfo:
        await trio.lowlevel.checkpoint()
        return self.farm.vm_info(name, now=self.clock())

    async def lun_of(self, vm: str, disk: str) -> DiskInfo:
        await trio.lowlevel.checkpoint()
        return self.farm.lun_of(vm, disk)

    async def list_disks(self, host: str) -> list[HostDisk]:
        await trio.lowlevel.checkpoint()
        self._check_host_or_vm(host)
        return self.array.list_disks(host)

    async def prime(self, host: str) -> list[HostDisk]:
        """rsPrimeServer: a guest sends its device names (E:, /data) for its disks.

        On an ESX host the names are `<vm>:<guest path>` of the VM owning each LUN.
        """
        self._check_host_or_vm(host)
        names: dict[str, str] = {}
        for entry in self.array.list_disks(host):
            owner = self.farm.rdm_owner(entry.serial)
            if owner is None:
                continue
            vm, disk_name = owner
            info = self.farm.disk_of(vm, disk_name)
            if info.guest_path is None:
                continue
            names[entry.name] = info.guest_path if host == vm else f"{vm}:{info.guest_path}"
        return await self.service.prime(host, names)

    def _check_host_or_vm(self, host: str) -> None:
        if host not in self.farm.hosts and host not in self.farm.vms:
            raise UnknownHost(f"no host or VM {host!r} in the farm", host=host)

    async def list_volumes(self) -> list[VolumeInfo]:
        return await self.service.volumes()

    async def list_pools(self) -> dict[str, tuple[str, ...]]:
        await trio.lowlevel.checkpoint()
        return self.pools

    async def get_volume(self, serial: str) -> VolumeInfo:
        return await self.service.volume(serial)

    async def vmotion(self, vm: str, host: str) -> None:
        await trio.lowlevel.checkpoint()
        self._farm("vmotion", vm=vm, host=host, now=self.clock())

    # ------------------------------------------------------------------ guests

    async def quiesce(self, vm: str, level: QuiesceLevel, timeout: float) -> FreezeTicket:
        """Freeze the guest. Returns once the guest is quiescent: in-flight operations done.

        The freeze starts (new application writes held) before the drain, so the ticket's
        `frozen_at` precedes the return; the drain is bounded by the freeze deadline.
        """
        self.farm.vm(vm)  # unknown VM: fail before the modelled latency
        await self._sleep(self.latency.quiesce)
        lvl = QuiesceLevel(level)
        ticket: FreezeTicket = self._farm("quiesce", vm=vm, level=lvl.value, timeout=float(timeout), now=self.clock())
        if lvl in BLOCKING_LEVELS or lvl is QuiesceLevel.POWEROFF:
            await self._drain(vm, ticket.deadline)
        return ticket

    async def thaw(self, vm: str) -> ThawResult:
        self.farm.vm(vm)
        await self._sleep(self.latency.thaw)
        return self._farm("thaw", vm=vm, now=self.clock())

    async def freeze_status(self, vm: str) -> FreezeStatus:
        await trio.lowlevel.checkpoint()
        return self.farm.freeze_status(vm, now=self.clock())

    async def power_on(self, vm: str) -> None:
        machine = self.farm.state(vm, now=self.clock())
        if machine.power is PowerState.ON:
            await trio.lowlevel.checkpoint()
            return
        await self._sleep(self.latency.power_on)
        self._farm("power_on", vm=vm, now=self.clock())

    async def power_off(self, vm: str) -> None:
        """Clean shutdown: no new application writes, in-flight ones finish, then off."""
        machine = self.farm.state(vm, now=self.clock())
        if machine.power is PowerState.OFF:
            await trio.lowlevel.checkpoint()
            return
        self._farm("power_off", vm=vm, now=self.clock())
        await self._drain(vm, math.inf)
        await self._sleep(self.latency.power_off)

    async def reboot(self, vm: str) -> None:
        """Shutdown and boot: the guest is down for `latency.reboot` and re-reads its disks."""
        machine = self.farm.state(vm, now=self.clock())
        if machine.power is PowerState.OFF:
            raise GuestStateError(f"VM {vm} is powered off; power it on instead of rebooting", vm=vm)
        if machine.frozen:
            raise GuestStateError(
                f"VM {vm} is frozen (freeze {machine.freeze.freeze_id}); thaw it before rebooting", vm=vm  # type: ignore[union-attr]
            )
        self._farm("power_off", vm=vm, now=self.clock())
        await self._drain(vm, math.inf)
        await self._sleep(self.latency.reboot)
        self._farm("power_on", vm=vm, now=self.clock())

    async def rescan(self, vm: str) -> None:
        self.farm.vm(vm)
        await self._sleep(self.latency.rescan)
        self._farm("rescan", vm=vm, now=self.clock())

    # ------------------------------------------------------------------ FlashCopy

    async def establish(self, source: str, target: str, options: FlashOptions) -> RelationshipInfo:
        return await self.service.establish(source, target, options)

    async def withdraw(self, source: str, target: str, *, after_copy: bool = False) -> None:
        await self.service.withdraw(source, target, after_copy=after_copy)

    async def resync(self, source: str, target: str, *, freeze: bool = False, tag: str | None = None) -> RelationshipInfo:
        return await self.service.resync(source, target, freeze=freeze, tag=tag)

    async def reverse(self, source: str, target: str, *, tag: str | None = None) -> RelationshipInfo:
        return await self.service.reverse(source, target, tag=tag)

    async def query(self, *, volume: str | None = None, tag: str | None = None) -> list[RelationshipInfo]:
        return await self.service.query(volume=volume, tag=tag)

    async def unfreeze(self, lsses: Sequence[str]) -> list[LssRelease]:
        return await self.service.unfreeze(lsses)

    async def frozen_lsses(self) -> list[LssFreeze]:
        return await self.service.frozen_lsses()

    async def wait_copied(self, source: str, target: str) -> RelationshipInfo | None:
        return await self.service.wait_copied(source, target)

    async def save_task(self, task: SavedTask) -> None:
        await self.service.save_task(task)

    async def list_tasks(self) -> list[SavedTask]:
        return await self.service.tasks()

    async def execute_task(self, name: str, *, tag: str | None = None) -> list[RelationshipInfo]:
        return await self.service.execute_task(name, tag=tag)

    # ------------------------------------------------------------------ data

    async def read(self, serial: str, offset: int, length: int) -> bytes:
        return await self.service.read(serial, offset, length)

    async def write(self, serial: str, offset: int, data: bytes) -> None:
        await self.service.write(serial, offset, data)

    async def extents(self, serial: str) -> list[Extent]:
        return await self.service.extents(serial)

    def read_at(self, now: float | None = None) -> Callable[[str, int, int], bytes]:
        """A synchronous reader of the images as they are at one instant (for the checker)."""
        at = self.clock() if now is None else now
        array = self.array
        return lambda serial, offset, length: array.read(serial, offset, length, now=at)

    async def check(self, serials: Sequence[str]) -> CheckReport:
        await trio.lowlevel.checkpoint()
        if not serials:
            raise BadRequest("check needs at least one LUN serial")
        for serial in serials:
            self.array.volume(serial)  # UnknownVolume before any reading
        return checker.check_images(self.read_at(), list(serials))

    async def mount_check(self, vm: str, disks: Sequence[str]) -> CheckReport:
        """Rescan on `vm` (or on a backup host: disks are serials), mount the images, check.

        A guest must be powered on; its disks may be named by disk name, guest path or
        serial. A backup host reads any LUN of the array (it maps what it mounts).
        """
        if not disks:
            raise BadRequest("mount_check needs at least one disk")
        if vm in self.farm.hosts and vm not in self.farm.vms:
            if self.farm.hosts[vm].kind != "backup":
                raise BadRequest(f"{vm} is an ESX server; mount on a guest VM or a backup host")
            await self._sleep(self.latency.rescan)
            serials = [str(d) for d in disks]
            for serial in serials:
                self.array.volume(serial)
        else:
            if vm not in self.farm.vms:
                raise UnknownVM(f"no VM or backup host {vm!r} in the farm", vm=vm)
            machine = self.farm.state(vm, now=self.clock())
            if machine.power is PowerState.OFF:
                raise GuestStateError(f"VM {vm} is powered off: it cannot mount {', '.join(disks)}", vm=vm)
            serials = []
            for ref in disks:
                info = self.farm.disk_of(vm, ref)
                if info.kind.value != "rdm":
                    raise UnknownDisk(
                        f"disk {info.name} of VM {vm} is a VMFS virtual disk, not a LUN image to mount", vm=vm, disk=ref
                    )
                serials.append(info.serial)
            await self.rescan(vm)
        return checker.check_images(self.read_at(), serials)
