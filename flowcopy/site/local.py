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

import functools
import inspect
import math
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio

from flowcopy.site import api, checker
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
    LssBusy,
    HostInfo,
    LssFreeze,
    LssInfo,
    LssRelease,
    PowerState,
    QuiesceLevel,
    RelationshipInfo,
    SavedTask,
    SourceHold,
    SpacePool,
    ThawResult,
    UnknownDisk,
    UnknownHost,
    UnknownVM,
    VMInfo,
    VolumeInfo,
)
from flowcopy.site.esx import BLOCKING_LEVELS, Farm
from flowcopy.site.fencing import FenceBook
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
    copy_services: float = 0.0  # each copy-services command (establish, withdraw, unfreeze...)

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

    def __init__(self, site: LocalSite, vm: str, write_latency: float = 0.0) -> None:
        self.site = site
        self.vm = vm
        self.write_latency = write_latency

    async def read(self, serial: str, offset: int, length: int) -> bytes:
        return await self.site.service.read(serial, offset, length)

    async def write(self, serial: str, offset: int, data: bytes) -> None:
        """One guest write: it takes the modelled latency, then lands (unless the LSS holds it)."""
        if self.write_latency > 0:
            await self.site._sleep(self.write_latency)
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


def _with_unusable(report: CheckReport, unusable: Sequence[VolumeInfo]) -> CheckReport:
    """The array knows some images are not usable whatever their bytes say (fast reverse)."""
    if not unusable:
        return report
    problems = tuple(f"{v.serial}: {v.unusable}" for v in unusable) + tuple(report.problems)
    return attrs.evolve(report, consistent=False, problems=problems)


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
        lss_command_limit: int | None = None,
    ) -> None:
        self.array = array if array is not None else Array()
        if lss_command_limit is None and lab is not None:
            lss_command_limit = lab.get("lss_command_limit")  # the lab's arrays[0].lss_command_limit
        self.lss_command_limit = lss_command_limit  # None: an LSS takes any number at once
        self._commands: dict[str, int] = {}  # copy-services commands in flight, per LSS
        self.farm = farm if farm is not None else Farm()
        self.clock: Callable[[], float] = clock if clock is not None else trio.current_time
        self.speed = float(speed)
        self.latency = latency if latency is not None else Latency()
        self.on_mutation = on_mutation
        self.check_limiter: trio.CapacityLimiter | None = None
        """Set (by a site served on the wall clock): `check` runs in worker threads, at most
        this many at once, so a long check does not hold up every other call. Unset under a
        MockClock, where a thread would let the clock autojump under the caller's feet."""
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
        # target serial -> what the application on its source had acknowledged at establish
        self.points: dict[str, dict[str, Any]] = {}
        self.fences = FenceBook(on_raise=self._fence_raised)
        """Highest lease epoch seen per fence key: calls carrying an older one are refused."""

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

    def _fence_raised(self, key: str, epoch: int, now: float) -> None:
        if self.on_mutation is not None:
            self.on_mutation("fence", "raise", {"key": key, "epoch": epoch, "now": now})

    def apply(self, component: str, method: str, kwargs: Mapping[str, Any]) -> Any:
        """Replay one reported mutation on the cores (persistence)."""
        if component == "apps" and method in ("mark", "unmark"):
            return getattr(self, f"_{method}")(**dict(kwargs))
        if component == "fence" and method == "raise":
            return self.fences.apply_raise(**dict(kwargs))
        target = {"array": self.array, "farm": self.farm}.get(component)
        if target is None:
            raise BadRequest(f"unknown site component {component!r}")
        return getattr(target, method)(**dict(kwargs))

    # ------------------------------------------------------------------ points in time

    def _mark(self, target: str, point: Mapping[str, Any] | None) -> None:
        if point is None:
            self.points.pop(target, None)
        else:
            self.points[target] = dict(point)

    def _unmark(self, target: str) -> None:
        self.points.pop(target, None)

    def _record_points(self, rels: Iterable[RelationshipInfo]) -> None:
        """At establish/resync: what each source's real application had acknowledged.

        Called right after the array call returned (no checkpoint in between), so the
        counter is the one of the instant of establish; a checker then knows how old an
        image may at most be.
        """
        for rel in rels:
            point = None
            for load in self.workloads.values():
                if rel.source in load.serials and hasattr(load, "point_in_time"):
                    point = {"source": rel.source, "at": rel.synced, **load.point_in_time()}
            if point is None and rel.target not in self.points:
                continue
            self._mark(rel.target, point)
            if self.on_mutation is not None:
                self.on_mutation("apps", "mark", {"target": rel.target, "point": point})

    def _forget_point(self, serial: str) -> None:
        if serial in self.points:
            self._unmark(serial)
            if self.on_mutation is not None:
                self.on_mutation("apps", "unmark", {"target": serial})

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

    @asynccontextmanager
    async def _copy_services(self, serials: Iterable[str] = (), lsses: Iterable[str] = ()) -> AsyncIterator[None]:
        """One copy-services command on these volumes' LSSs: it takes `latency.copy_services`,
        and an LSS already running `lss_command_limit` commands refuses it (LssBusy,
        transient: the engine's per-LSS limiter and retries are what meet it)."""
        names = sorted(set(lsses) | {self.array.volume(s).lss for s in serials})  # UnknownVolume first
        limit = self.lss_command_limit
        if limit is not None:
            for lss in names:
                if self._commands.get(lss, 0) >= limit:
                    raise LssBusy(f"LSS {lss} is busy: {limit} copy-services commands in flight (its limit); retry",
                                  lss=lss, limit=limit)
        for lss in names:
            self._commands[lss] = self._commands.get(lss, 0) + 1
        try:
            await self._sleep(self.latency.copy_services)
            yield
        finally:
            for lss in names:
                self._commands[lss] -= 1

    # ------------------------------------------------------------------ persistence

    def to_state(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "lab": {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in self.lab.items()},
            "array": self.array.to_state(),
            "farm": self.farm.to_state(),
            "workloads": [load.spec() for load in self.workloads.values()],
            "points": {k: dict(v) for k, v in self.points.items()},
            "fences": self.fences.to_state(self.clock()),
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any], **kwargs: Any) -> LocalSite:
        lab = dict(state.get("lab", {}))
        lab["pools"] = {k: tuple(v) for k, v in dict(lab.get("pools", {})).items()}
        site = cls(
            array=Array.from_state(state["array"]),
            farm=Farm.from_state(state["farm"]),
            lab=lab,
            workloads=[wl.from_spec(dict(spec)) for spec in state.get("workloads", [])],
            **kwargs,
        )
        site.points = {k: dict(v) for k, v in dict(state.get("points", {})).items()}
        site.fences.load(dict(state.get("fences", {})))
        return site

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
        guest = _Guest(self, vm, float(getattr(load, "write_latency", 0.0)))
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
                    prepare = getattr(load, "prepare", None)
                    if prepare is not None:
                        # the application decides its next operation (runs its own programs)
                        # before it counts as in flight; then the guest must still let it write
                        await prepare()
                        if self.farm.io_blocked(vm, now=self.clock()) is not None:
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
        async with self._copy_services([source, target]):
            rel = await self.service.establish(source, target, options)
        self._record_points([rel])
        return rel

    async def withdraw(self, source: str, target: str, *, after_copy: bool = False,
                       release_space: bool = False) -> None:
        async with self._copy_services([source, target]):
            await self.service.withdraw(source, target, after_copy=after_copy, release_space=release_space)

    async def resync(
        self, source: str, target: str, *, freeze: bool = False, tag: str | None = None,
        options: FlashOptions | None = None,
    ) -> RelationshipInfo:
        async with self._copy_services([source, target]):
            rel = await self.service.resync(source, target, freeze=freeze, tag=tag, options=options)
        self._record_points([rel])
        return rel

    async def reverse(self, source: str, target: str, *, tag: str | None = None, fast: bool = False) -> RelationshipInfo:
        async with self._copy_services([source, target]):
            rel = await self.service.reverse(source, target, tag=tag, fast=fast)
        self._forget_point(source)  # the source now holds an older image than its application knew
        return rel

    async def query(self, *, volume: str | None = None, tag: str | None = None) -> list[RelationshipInfo]:
        return await self.service.query(volume=volume, tag=tag)

    async def unfreeze(self, lsses: Sequence[str]) -> list[LssRelease]:
        async with self._copy_services(lsses=lsses):
            return await self.service.unfreeze(lsses)

    async def frozen_lsses(self) -> list[LssFreeze]:
        return await self.service.frozen_lsses()

    async def hold_history(self) -> list[SourceHold]:
        return await self.service.hold_history()

    async def list_lsses(self) -> list[LssInfo]:
        return await self.service.list_lsses()

    async def set_elb_timeout(self, lss: str, seconds: float) -> LssInfo:
        return await self.service.set_elb_timeout(lss, seconds)

    async def list_space_pools(self) -> list[SpacePool]:
        return await self.service.list_space_pools()

    async def wait_copied(self, source: str, target: str) -> RelationshipInfo | None:
        return await self.service.wait_copied(source, target)

    async def save_task(self, task: SavedTask) -> None:
        await self.service.save_task(task)

    async def list_tasks(self) -> list[SavedTask]:
        return await self.service.tasks()

    async def execute_task(self, name: str, *, tag: str | None = None) -> list[RelationshipInfo]:
        rels = await self.service.execute_task(name, tag=tag)
        self._record_points(rels)
        return rels

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

    async def _check(self, serials: list[str]) -> CheckReport:
        """Our checkers on the images as they are now; real applications' images also by
        SQLite / e2fsck, on a copy taken now, in a worker thread (files and processes)."""
        unusable = [v for v in (self.array.volume(s) for s in serials) if v.unusable]  # UnknownVolume first
        read = self.read_at()
        expect = {s: self.points[s] for s in serials if s in self.points}
        if not any(checker.sniff(read, s) in checker.REAL_KINDS for s in serials):
            if self.check_limiter is not None:  # a served site: checks never block its other calls
                report = await trio.to_thread.run_sync(checker.check_images, read, serials, expect,
                                                       limiter=self.check_limiter)
            else:
                report = checker.check_images(read, serials, expect)
        else:
            now = self.clock()
            images = {s: [(e.offset, read(s, e.offset, e.length)) for e in self.array.extents(s, now=now)] for s in serials}
            report = await trio.to_thread.run_sync(checker.check_images, checker.reader(images), serials, expect,
                                                   limiter=self.check_limiter)
        return _with_unusable(report, unusable)

    async def check(self, serials: Sequence[str]) -> CheckReport:
        await trio.lowlevel.checkpoint()
        if not serials:
            raise BadRequest("check needs at least one LUN serial")
        for serial in serials:
            self.array.volume(serial)  # UnknownVolume before any reading
        return await self._check(list(serials))

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
        return await self._check(serials)


def _admitted(name: str) -> Callable[..., Any]:
    """`LocalSite.<name>`, admitted by the site's fence book when the call carries a fence
    (`api.fenced`): checked as the call enters the site, before it touches anything."""
    inner = getattr(LocalSite, name)

    @functools.wraps(inner)
    async def method(self: LocalSite, *args: Any, **kwargs: Any) -> Any:
        fences = api.current_fences()
        if not fences:
            return await inner(self, *args, **kwargs)
        counted = name not in READS
        await self.fences.enter(fences, name, self.clock(), counted=counted)
        try:
            return await inner(self, *args, **kwargs)
        finally:
            if counted:
                self.fences.leave(fences)

    return method


READS = frozenset({"list_hosts", "list_vms", "get_vm", "lun_of", "list_disks", "list_volumes", "list_pools",
                   "get_volume", "freeze_status", "query", "frozen_lsses", "hold_history", "list_lsses",
                   "list_tasks", "read", "extents", "check", "wait_copied"})
"""Calls that change nothing: admitted (or refused) by their fence, but never waited for."""


FENCED_METHODS: tuple[str, ...] = tuple(n for n in (*vars(api.Site), "rescan", "wait_copied", "vmotion")
                                        if n != "now" and inspect.iscoroutinefunction(getattr(LocalSite, n, None)))
"""Every site call an engine makes for a unit, reads included: a new holder's first
reconciling read raises the mark, so nothing stale lands after what it saw."""

for _name in FENCED_METHODS:
    setattr(LocalSite, _name, _admitted(_name))
