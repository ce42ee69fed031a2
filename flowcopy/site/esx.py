"""The VMware farm model: ESX hosts, VMs, raw-mapped and VMFS disks, guest quiesce agents.

A synchronous, deterministic core in the same style as `ess.Array`: every time-dependent
method takes `now` (site seconds) and time effects are computed lazily — a guest freeze
whose deadline has passed is ended "by the guest" the next time anyone looks, with
`thawed_at = deadline` and `lost = True`, exactly as if a timer had fired then. So the
farm needs no tasks of its own, replays deterministically from a log of mutating calls
(`getattr(farm, name)(**kwargs)`, kwargs plain data), and snapshots to plain data with
`to_state()` / `Farm.from_state()`.

The trio shell (`flowcopy.site.local.LocalSite`) adds the modelled latencies, the
guest-side waiting of workloads, and the mutation hook.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from flowcopy.site.api import (
    BadRequest,
    DiskInfo,
    DiskKind,
    FreezeStatus,
    FreezeTicket,
    GuestStateError,
    HostInfo,
    NotRawMapped,
    PowerState,
    QuiesceLevel,
    ThawResult,
    UnknownDisk,
    UnknownHost,
    UnknownVM,
    VMInfo,
)

ALL_LEVELS: tuple[QuiesceLevel, ...] = tuple(QuiesceLevel)
DEFAULT_FREEZE_LIMIT = 3600.0
"""Ceiling of a guest agent's freeze timeout when the lab does not set one."""

HOST_KINDS = ("esx", "backup")

# Levels at which the guest holds its own application writes while frozen.
BLOCKING_LEVELS = frozenset({QuiesceLevel.FILESYSTEM, QuiesceLevel.APPLICATION})

# The mutating methods a persistence layer may log and replay, in one place.
MUTATIONS: frozenset[str] = frozenset(
    {
        "add_host",
        "add_vm",
        "add_disk",
        "remove_disk",
        "vmotion",
        "quiesce",
        "thaw",
        "power_on",
        "power_off",
        "reboot",
        "rescan",
        "set_labels",
    }
)


@attrs.define
class Host:
    name: str
    kind: str = "esx"
    version: str = "ESX Server 2.5.0"
    model: str = ""


@attrs.define
class Disk:
    name: str
    kind: DiskKind
    serial: str
    guest_path: str | None = None
    label: str | None = None
    capacity: int = 0


@attrs.define
class Freeze:
    """One guest freeze: the current one, or the last one after it ended."""

    freeze_id: int
    level: QuiesceLevel
    frozen_at: float
    deadline: float
    was_on: bool = True  # power state before a poweroff-level quiesce
    thawed_at: float | None = None
    lost: bool = False  # ended by the guest's own timeout, not by a thaw


@attrs.define
class VM:
    name: str
    host: str
    os: str
    quiesce_levels: tuple[QuiesceLevel, ...]
    labels: dict[str, str]
    freeze_limit: float = DEFAULT_FREEZE_LIMIT
    power: PowerState = PowerState.ON
    disks: list[Disk] = attrs.Factory(list)
    freeze: Freeze | None = None  # current (thawed_at None) or last freeze
    boots: int = 0  # power-ons since the lab was built (a workload re-reads its disks)
    rescans: int = 0
    seen_at: float = 0.0  # site time of the last rescan/boot: what the guest's disk view reflects

    @property
    def frozen(self) -> bool:
        return self.freeze is not None and self.freeze.thawed_at is None


class Farm:
    """Hosts, VMs and their disks, and the guests' freeze state. Pure and synchronous."""

    def __init__(self) -> None:
        self.hosts: dict[str, Host] = {}
        self.vms: dict[str, VM] = {}
        # serial -> [(vm, disk name)] for VMFS LUNs, kept in step with the disks
        self._vmfs_users: dict[str, list[tuple[str, str]]] = {}
        self._rdm_owner: dict[str, tuple[str, str]] = {}

    # ------------------------------------------------------------------ building

    def add_host(self, name: str, kind: str = "esx", version: str = "ESX Server 2.5.0", model: str = "") -> None:
        if not name:
            raise BadRequest("a host needs a name")
        if kind not in HOST_KINDS:
            raise BadRequest(f"host {name}: kind must be one of {', '.join(HOST_KINDS)}, not {kind!r}")
        if name in self.hosts:
            raise BadRequest(f"host {name} already exists")
        self.hosts[name] = Host(name=name, kind=kind, version=version, model=model)

    def add_vm(
        self,
        name: str,
        host: str,
        os: str = "",
        quiesce_levels: Iterable[str] = ("none", "filesystem", "application", "poweroff"),
        labels: Mapping[str, str] | None = None,
        freeze_limit: float = DEFAULT_FREEZE_LIMIT,
        power: str = "on",
    ) -> None:
        if not name:
            raise BadRequest("a VM needs a name")
        if name in self.vms:
            raise BadRequest(f"VM {name} already exists")
        self._host(host)
        try:
            levels = {QuiesceLevel(level) for level in quiesce_levels} | {QuiesceLevel.NONE}
        except ValueError as exc:
            raise BadRequest(f"VM {name}: {exc}; levels are {', '.join(q.value for q in QuiesceLevel)}") from None
        if freeze_limit <= 0:
            raise BadRequest(f"VM {name}: freeze_limit must be positive, not {freeze_limit}")
        self.vms[name] = VM(
            name=name,
            host=host,
            os=os,
            quiesce_levels=tuple(level for level in ALL_LEVELS if level in levels),
            labels={str(k): str(v) for k, v in (labels or {}).items()},
            freeze_limit=float(freeze_limit),
            power=PowerState(power),
        )

    def add_disk(
        self,
        vm: str,
        name: str,
        kind: str,
        serial: str,
        guest_path: str | None = None,
        label: str | None = None,
        capacity: int = 0,
    ) -> None:
        """Attach a disk. An RDM LUN belongs to exactly one VM; a VMFS LUN is shared."""
        machine = self._vm(vm)
        disk_kind = DiskKind(kind)
        for other in machine.disks:
            if other.name == name:
                raise BadRequest(f"VM {vm} already has a disk {name}")
            if guest_path is not None and other.guest_path == guest_path:
                raise BadRequest(f"VM {vm} already has a disk at {guest_path} ({other.name})")
            if disk_kind is DiskKind.RDM and other.kind is DiskKind.RDM and other.serial == serial:
                raise BadRequest(f"VM {vm} already maps LUN {serial} as {other.name}")
        if disk_kind is DiskKind.RDM:
            if serial in self._vmfs_users:
                raise BadRequest(f"LUN {serial} holds a VMFS volume; it cannot also be raw-mapped to {vm}")
            owner = self._rdm_owner.get(serial)
            if owner is not None:
                raise BadRequest(f"LUN {serial} is already raw-mapped to VM {owner[0]} as {owner[1]}")
            self._rdm_owner[serial] = (vm, name)
        else:
            if serial in self._rdm_owner:
                owner = self._rdm_owner[serial]
                raise BadRequest(f"LUN {serial} is raw-mapped to VM {owner[0]}; it cannot hold VMFS disks")
            self._vmfs_users.setdefault(serial, []).append((vm, name))
        machine.disks.append(
            Disk(name=name, kind=disk_kind, serial=serial, guest_path=guest_path, label=label, capacity=int(capacity))
        )

    def remove_disk(self, vm: str, name: str) -> None:
        machine = self._vm(vm)
        disk = self._disk(machine, name)
        machine.disks.remove(disk)
        if disk.kind is DiskKind.RDM:
            self._rdm_owner.pop(disk.serial, None)
        else:
            users = self._vmfs_users[disk.serial]
            users.remove((vm, disk.name))
            if not users:
                del self._vmfs_users[disk.serial]

    def set_labels(self, vm: str, labels: Mapping[str, str]) -> None:
        self._vm(vm).labels = {str(k): str(v) for k, v in labels.items()}

    def vmotion(self, vm: str, host: str, *, now: float) -> None:
        """Move a VM to another ESX host; its disks stay (the LUNs are shared by the farm)."""
        machine = self._vm(vm)
        target = self._host(host)
        if target.kind != "esx":
            raise BadRequest(f"VMotion target {host} is a {target.kind} host, not an ESX server")
        self._settle(machine, now)
        if machine.frozen:
            raise GuestStateError(
                f"VM {vm} is frozen (freeze {machine.freeze.freeze_id}); thaw it before VMotion",  # type: ignore[union-attr]
                vm=vm,
            )
        machine.host = host

    # ------------------------------------------------------------------ lookups

    def _host(self, name: str) -> Host:
        try:
            return self.hosts[name]
        except KeyError:
            raise UnknownHost(f"no host {name!r} in the farm", host=name) from None

    def _vm(self, name: str) -> VM:
        try:
            return self.vms[name]
        except KeyError:
            raise UnknownVM(f"no VM {name!r} in the farm", vm=name) from None

    def _disk(self, machine: VM, ref: str) -> Disk:
        """A VM's disk by host-visible name, guest path (case-insensitive for drive letters) or serial."""
        for disk in machine.disks:
            if disk.name == ref:
                return disk
        norm = ref.rstrip("\\").upper() if len(ref) <= 3 else ref
        for disk in machine.disks:
            if disk.guest_path is not None:
                path = disk.guest_path.rstrip("\\").upper() if len(disk.guest_path) <= 3 else disk.guest_path
                if path == norm:
                    return disk
        for disk in sorted(machine.disks, key=lambda d: d.kind is not DiskKind.RDM):
            if disk.serial == ref:  # an RDM first; a VMFS serial names the VM's disk on it
                return disk
        names = ", ".join(
            f"{d.name}" + (f" ({d.guest_path})" if d.guest_path else "") + f" = {d.serial}" for d in machine.disks
        )
        raise UnknownDisk(
            f"VM {machine.name} has no disk {ref!r} (by name, guest path or serial); its disks: {names or 'none'}",
            vm=machine.name,
            disk=ref,
        )

    def has_vm(self, name: str) -> bool:
        return name in self.vms

    def vm(self, name: str) -> VM:
        return self._vm(name)

    def rdm_owner(self, serial: str) -> tuple[str, str] | None:
        """(vm, disk name) of the VM that raw-maps this LUN, if any."""
        return self._rdm_owner.get(serial)

    def vmfs_luns(self) -> dict[str, tuple[str, ...]]:
        return {serial: tuple(sorted({vm for vm, _ in users})) for serial, users in self._vmfs_users.items()}

    def _disk_info(self, machine: VM, disk: Disk) -> DiskInfo:
        shared: tuple[str, ...] = ()
        if disk.kind is DiskKind.VMFS:
            shared = tuple(sorted({vm for vm, _ in self._vmfs_users.get(disk.serial, []) if vm != machine.name}))
        return DiskInfo(
            vm=machine.name,
            name=disk.name,
            kind=disk.kind,
            serial=disk.serial,
            guest_path=disk.guest_path,
            label=disk.label,
            capacity=disk.capacity,
            shared_with=shared,
        )

    def disk_of(self, vm: str, disk: str) -> DiskInfo:
        """A VM's disk (RDM or VMFS), without the FlashCopy refusal."""
        machine = self._vm(vm)
        return self._disk_info(machine, self._disk(machine, disk))

    def lun_of(self, vm: str, disk: str) -> DiskInfo:
        """The LUN behind a disk, for a copy: refused for VMFS disks, which share their LUN."""
        info = self.disk_of(vm, disk)
        if info.kind is DiskKind.VMFS:
            users = sorted({vm} | set(info.shared_with))
            raise NotRawMapped(
                f"disk {info.name} of VM {vm} is a virtual disk on VMFS LUN {info.serial}: FlashCopy works "
                f"per LUN, and the VMFS LUN {info.serial} is shared by {len(users)} VMs "
                f"({', '.join(users)}); only raw device maps (RDM) can be copied",
                vm=vm,
                disk=info.name,
                serial=info.serial,
                shared_by=users,
            )
        return info

    def host_info(self, name: str) -> HostInfo:
        host = self._host(name)
        vms = tuple(sorted(vm.name for vm in self.vms.values() if vm.host == name))
        return HostInfo(name=host.name, kind=host.kind, version=host.version, vms=vms)

    def list_hosts(self) -> list[HostInfo]:
        return [self.host_info(name) for name in sorted(self.hosts)]

    def vm_info(self, name: str, *, now: float | None = None) -> VMInfo:
        machine = self._effective(self._vm(name), now)
        return VMInfo(
            name=machine.name,
            host=machine.host,
            os=machine.os,
            power=machine.power,
            quiesce_levels=machine.quiesce_levels,
            labels=dict(machine.labels),
            disks=tuple(self._disk_info(machine, d) for d in machine.disks),
        )

    def select(self, labels: Mapping[str, str] | None = None) -> list[str]:
        """Names of the VMs whose labels include all of `labels`, sorted."""
        if not labels:
            return sorted(self.vms)
        wanted = {str(k): str(v) for k, v in labels.items()}
        return sorted(
            vm.name for vm in self.vms.values() if all(vm.labels.get(k) == v for k, v in wanted.items())
        )

    def list_vms(self, labels: Mapping[str, str] | None = None, *, now: float | None = None) -> list[VMInfo]:
        return [self.vm_info(name, now=now) for name in self.select(labels)]

    # ------------------------------------------------------------------ guests

    @staticmethod
    def _expired(machine: VM, now: float) -> bool:
        freeze = machine.freeze
        return freeze is not None and freeze.thawed_at is None and now >= freeze.deadline

    def _settle(self, machine: VM, now: float) -> None:
        """End a freeze whose deadline has passed, as the guest did at the deadline.

        Only mutating calls settle (and they are logged with their `now`), so a replayed
        farm and the original hold the same state; reads use `_effective` instead.
        """
        if self._expired(machine, now):
            freeze = machine.freeze
            assert freeze is not None
            freeze.thawed_at = freeze.deadline
            freeze.lost = True
            if freeze.level is QuiesceLevel.POWEROFF and freeze.was_on:
                # the host agent powers the guest back on by itself: a production VM is
                # never left down because the orchestrator died
                machine.power = PowerState.ON
                machine.boots += 1
                machine.seen_at = freeze.deadline

    def _effective(self, machine: VM, now: float | None) -> VM:
        """The VM as it is at `now` (a settled copy if a self-thaw is due), without mutating."""
        if now is None or not self._expired(machine, now):
            return machine
        view = attrs.evolve(machine, freeze=attrs.evolve(machine.freeze))  # type: ignore[arg-type]
        self._settle(view, now)
        return view

    def state(self, vm: str, *, now: float) -> VM:
        """A read-only view of a VM's state at `now` (freeze, power, boots). Do not mutate it."""
        return self._effective(self._vm(vm), now)

    def next_deadline(self, *, now: float) -> float | None:
        """The earliest pending guest self-thaw, so a shell can wake waiters then."""
        deadlines = [
            vm.freeze.deadline for vm in self.vms.values() if vm.frozen and vm.freeze.deadline > now  # type: ignore[union-attr]
        ]
        return min(deadlines, default=None)

    def quiesce(self, vm: str, level: str, timeout: float, *, now: float) -> FreezeTicket:
        machine = self._vm(vm)
        self._settle(machine, now)
        try:
            lvl = QuiesceLevel(level)
        except ValueError:
            raise BadRequest(
                f"unknown quiesce level {level!r}; levels are {', '.join(q.value for q in QuiesceLevel)}"
            ) from None
        if not timeout or timeout <= 0:
            raise BadRequest(f"quiesce of VM {vm}: the freeze timeout must be positive, not {timeout}")
        if lvl not in machine.quiesce_levels:
            raise GuestStateError(
                f"VM {vm} ({machine.os}): its guest agent does not support quiesce level {lvl.value!r}; "
                f"it supports {', '.join(q.value for q in machine.quiesce_levels)}",
                vm=vm,
                level=lvl.value,
            )
        if machine.frozen:
            current = machine.freeze
            assert current is not None
            raise GuestStateError(
                f"VM {vm} is already frozen (freeze {current.freeze_id}, level {current.level.value}, "
                f"since {current.frozen_at:.3f}, thaws itself at {current.deadline:.3f}); thaw it first",
                vm=vm,
                freeze_id=current.freeze_id,
            )
        if machine.power is PowerState.OFF and lvl is not QuiesceLevel.POWEROFF:
            raise GuestStateError(
                f"VM {vm} is powered off: its guest agent cannot quiesce at level {lvl.value!r} "
                "(use level 'poweroff', or power it on)",
                vm=vm,
                level=lvl.value,
            )
        freeze_id = (machine.freeze.freeze_id if machine.freeze else 0) + 1
        deadline = now + min(float(timeout), machine.freeze_limit)
        was_on = machine.power is PowerState.ON
        machine.freeze = Freeze(freeze_id=freeze_id, level=lvl, frozen_at=now, deadline=deadline, was_on=was_on)
        if lvl is QuiesceLevel.POWEROFF:
            machine.power = PowerState.OFF
        return FreezeTicket(vm=vm, freeze_id=freeze_id, level=lvl, frozen_at=now, deadline=deadline)

    def thaw(self, vm: str, *, now: float) -> ThawResult:
        machine = self._vm(vm)
        self._settle(machine, now)
        freeze = machine.freeze
        if freeze is None:
            return ThawResult(vm=vm, was_frozen=False, freeze_id=0, lost=False, message="not frozen")
        if freeze.thawed_at is not None:
            if freeze.lost:
                message = (
                    f"not frozen: freeze {freeze.freeze_id} was lost — the guest thawed itself at its "
                    f"timeout ({freeze.deadline:.3f}) after {freeze.deadline - freeze.frozen_at:.3f} s"
                )
            else:
                message = f"not frozen: freeze {freeze.freeze_id} was already thawed at {freeze.thawed_at:.3f}"
            return ThawResult(vm=vm, was_frozen=False, freeze_id=freeze.freeze_id, lost=freeze.lost, message=message)
        freeze.thawed_at = now
        freeze.lost = False
        if freeze.level is QuiesceLevel.POWEROFF and freeze.was_on:
            machine.power = PowerState.ON
            machine.boots += 1
            machine.seen_at = now
        return ThawResult(
            vm=vm,
            was_frozen=True,
            freeze_id=freeze.freeze_id,
            lost=False,
            message=f"thawed freeze {freeze.freeze_id} ({freeze.level.value}) after {now - freeze.frozen_at:.3f} s",
        )

    def freeze_status(self, vm: str, *, now: float) -> FreezeStatus:
        machine = self._effective(self._vm(vm), now)
        freeze = machine.freeze
        if freeze is None:
            return FreezeStatus(
                vm=vm, frozen=False, freeze_id=0, level=None, frozen_at=None, deadline=None,
                thawed_at=None, lost=False, power=machine.power,
            )
        return FreezeStatus(
            vm=vm,
            frozen=freeze.thawed_at is None,
            freeze_id=freeze.freeze_id,
            level=freeze.level,
            frozen_at=freeze.frozen_at,
            deadline=freeze.deadline,
            thawed_at=freeze.thawed_at,
            lost=freeze.lost,
            power=machine.power,
        )

    def io_blocked(self, vm: str, *, now: float) -> float | None:
        """Whether the guest holds its applications' writes now; the time it stops at the latest.

        Returns None when writes may go, else the deadline after which the guest stops
        holding them by itself (`inf` when only a power-on can release them).
        """
        machine = self._effective(self._vm(vm), now)
        if machine.power is PowerState.OFF:
            if machine.frozen:
                return machine.freeze.deadline  # type: ignore[union-attr]
            return float("inf")
        if machine.frozen and machine.freeze.level in BLOCKING_LEVELS:  # type: ignore[union-attr]
            return machine.freeze.deadline  # type: ignore[union-attr]
        return None

    def power_on(self, vm: str, *, now: float) -> None:
        machine = self._vm(vm)
        self._settle(machine, now)
        if machine.power is PowerState.ON:
            return
        if machine.frozen:
            raise GuestStateError(
                f"VM {vm} is held off by freeze {machine.freeze.freeze_id} (poweroff quiesce); thaw it instead",  # type: ignore[union-attr]
                vm=vm,
            )
        machine.power = PowerState.ON
        machine.boots += 1
        machine.seen_at = now

    def power_off(self, vm: str, *, now: float) -> None:
        machine = self._vm(vm)
        self._settle(machine, now)
        if machine.frozen:
            raise GuestStateError(
                f"VM {vm} is frozen (freeze {machine.freeze.freeze_id}); thaw it before powering it off",  # type: ignore[union-attr]
                vm=vm,
            )
        machine.power = PowerState.OFF

    def reboot(self, vm: str, *, now: float) -> None:
        machine = self._vm(vm)
        self._settle(machine, now)
        if machine.power is PowerState.OFF:
            raise GuestStateError(f"VM {vm} is powered off; power it on instead of rebooting", vm=vm)
        if machine.frozen:
            raise GuestStateError(
                f"VM {vm} is frozen (freeze {machine.freeze.freeze_id}); thaw it before rebooting",  # type: ignore[union-attr]
                vm=vm,
            )
        machine.boots += 1
        machine.seen_at = now

    def rescan(self, vm: str, *, now: float) -> None:
        """Rescan the guest's disks: its view of the LUNs is refreshed as of `now`."""
        machine = self._vm(vm)
        self._settle(machine, now)
        if machine.power is PowerState.OFF:
            raise GuestStateError(f"VM {vm} is powered off; it cannot rescan its disks", vm=vm)
        machine.rescans += 1
        machine.seen_at = now

    # ------------------------------------------------------------------ persistence

    def to_state(self) -> dict[str, Any]:
        return {
            "hosts": [attrs.asdict(h) for h in self.hosts.values()],
            "vms": [
                {
                    "name": vm.name,
                    "host": vm.host,
                    "os": vm.os,
                    "quiesce_levels": [q.value for q in vm.quiesce_levels],
                    "labels": dict(vm.labels),
                    "freeze_limit": vm.freeze_limit,
                    "power": vm.power.value,
                    "boots": vm.boots,
                    "rescans": vm.rescans,
                    "seen_at": vm.seen_at,
                    "disks": [
                        {
                            "name": d.name,
                            "kind": d.kind.value,
                            "serial": d.serial,
                            "guest_path": d.guest_path,
                            "label": d.label,
                            "capacity": d.capacity,
                        }
                        for d in vm.disks
                    ],
                    "freeze": None
                    if vm.freeze is None
                    else {**attrs.asdict(vm.freeze), "level": vm.freeze.level.value},
                }
                for vm in self.vms.values()
            ],
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> Farm:
        farm = cls()
        for host in state["hosts"]:
            farm.add_host(**host)
        for data in state["vms"]:
            farm.add_vm(
                name=data["name"],
                host=data["host"],
                os=data["os"],
                quiesce_levels=data["quiesce_levels"],
                labels=data["labels"],
                freeze_limit=data["freeze_limit"],
                power=data["power"],
            )
            for disk in data["disks"]:
                farm.add_disk(vm=data["name"], **disk)
            machine = farm.vms[data["name"]]
            machine.boots = data.get("boots", 0)
            machine.rescans = data.get("rescans", 0)
            machine.seen_at = data.get("seen_at", 0.0)
            if data.get("freeze"):
                fr = dict(data["freeze"])
                fr["level"] = QuiesceLevel(fr["level"])
                machine.freeze = Freeze(**fr)
        return farm
