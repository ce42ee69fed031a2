"""The farm core: hosts, VMs, RDM/VMFS disks, guest freezes with lazy timeouts, plain-data state."""

from __future__ import annotations

from typing import Any

import pytest

from flowcopy.site import api
from flowcopy.site.api import DiskKind, PowerState, QuiesceLevel
from flowcopy.site.esx import MUTATIONS, Farm


class Logged:
    """Calls mutating farm methods and logs them the way a persistence layer would."""

    def __init__(self, farm: Farm) -> None:
        self.farm = farm
        self.log: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, method: str, **kwargs: Any) -> Any:
        result = getattr(self.farm, method)(**kwargs)
        assert method in MUTATIONS
        self.log.append((method, kwargs))
        return result


def small_farm() -> Farm:
    farm = Farm()
    farm.add_host("esx-a", "esx")
    farm.add_host("esx-b", "esx")
    farm.add_host("proxy", "backup", version="Windows 2000")
    farm.add_vm("win", "esx-a", os="Windows 2000", labels={"app": "sql", "backup": "nightly"}, freeze_limit=60)
    farm.add_vm("lin", "esx-a", os="RHEL 3", quiesce_levels=["filesystem", "poweroff"], labels={"backup": "nightly"})
    farm.add_vm("util", "esx-b", os="SLES 9")
    farm.add_disk("win", "Disk0", "vmfs", "20013698", guest_path="C:", capacity=1 << 26)
    farm.add_disk("lin", "Disk0", "vmfs", "20013698", guest_path="/", capacity=1 << 26)
    farm.add_disk("util", "Disk0", "vmfs", "20013698", guest_path="/", capacity=1 << 26)
    farm.add_disk("win", "Disk1", "rdm", "20313698", guest_path="E:", label="E_drive_W2K_1", capacity=1 << 28)
    farm.add_disk("lin", "Disk1", "rdm", "21014698", guest_path="/data", capacity=1 << 28)
    return farm


def test_vmfs_disk_is_refused_for_copies_and_names_the_sharing_vms() -> None:
    farm = small_farm()
    with pytest.raises(api.NotRawMapped) as caught:
        farm.lun_of("lin", "/")
    assert caught.value.message == (
        "disk Disk0 of VM lin is a virtual disk on VMFS LUN 20013698: FlashCopy works per LUN, and the "
        "VMFS LUN 20013698 is shared by 3 VMs (lin, util, win); only raw device maps (RDM) can be copied"
    )
    info = farm.disk_of("lin", "Disk0")
    assert info.kind is DiskKind.VMFS and info.shared_with == ("util", "win")
    rdm = farm.lun_of("win", "e:")
    assert (rdm.serial, rdm.name, rdm.label, rdm.kind) == ("20313698", "Disk1", "E_drive_W2K_1", DiskKind.RDM)
    assert farm.lun_of("win", "20313698").guest_path == "E:"
    with pytest.raises(api.UnknownDisk, match="VM win has no disk 'F:'.*Disk1 \\(E:\\) = 20313698"):
        farm.lun_of("win", "F:")
    with pytest.raises(api.UnknownVM):
        farm.lun_of("nobody", "E:")


def test_building_refuses_what_a_farm_cannot_be() -> None:
    farm = small_farm()
    with pytest.raises(api.BadRequest, match="already raw-mapped to VM win as Disk1"):
        farm.add_disk("lin", "Disk2", "rdm", "20313698")
    with pytest.raises(api.BadRequest, match="holds a VMFS volume"):
        farm.add_disk("lin", "Disk2", "rdm", "20013698")
    with pytest.raises(api.BadRequest, match="raw-mapped to VM lin; it cannot hold VMFS disks"):
        farm.add_disk("util", "Disk2", "vmfs", "21014698")
    with pytest.raises(api.BadRequest, match="already has a disk Disk1"):
        farm.add_disk("win", "Disk1", "rdm", "29913698")
    with pytest.raises(api.BadRequest, match="already has a disk at E:"):
        farm.add_disk("win", "Disk5", "rdm", "29913698", guest_path="E:")
    with pytest.raises(api.UnknownHost):
        farm.add_vm("x", "esx-z")
    with pytest.raises(api.BadRequest, match="unknown quiesce level|not a valid QuiesceLevel"):
        farm.add_vm("x", "esx-a", quiesce_levels=["fsfreeze"])
    farm.remove_disk("win", "Disk1")
    farm.add_disk("lin", "Disk2", "rdm", "20313698")  # free again
    assert farm.rdm_owner("20313698") == ("lin", "Disk2")


def test_vmotion_keeps_disks_and_refuses_backup_hosts_and_frozen_guests() -> None:
    farm = small_farm()
    before = farm.vm_info("win").disks
    farm.vmotion("win", "esx-b", now=1.0)
    info = farm.vm_info("win")
    assert info.host == "esx-b" and info.disks == before
    assert farm.host_info("esx-b").vms == ("util", "win")
    with pytest.raises(api.BadRequest, match="backup host, not an ESX server"):
        farm.vmotion("win", "proxy", now=2.0)
    farm.quiesce("win", "filesystem", 30, now=3.0)
    with pytest.raises(api.GuestStateError, match="thaw it before VMotion"):
        farm.vmotion("win", "esx-a", now=4.0)


def test_quiesce_thaw_ids_levels_and_limits() -> None:
    farm = small_farm()
    t1 = farm.quiesce("win", "application", 600, now=10.0)
    assert (t1.freeze_id, t1.level, t1.frozen_at) == (1, QuiesceLevel.APPLICATION, 10.0)
    assert t1.deadline == 70.0, "the agent's freeze limit (60 s) caps the timeout"
    assert farm.io_blocked("win", now=11.0) == 70.0
    thaw = farm.thaw("win", now=12.5)
    assert thaw.was_frozen and thaw.freeze_id == 1 and not thaw.lost
    assert thaw.message == "thawed freeze 1 (application) after 2.500 s"
    again = farm.thaw("win", now=13.0)
    assert not again.was_frozen and again.message == "not frozen: freeze 1 was already thawed at 12.500"
    never = farm.thaw("util", now=13.0)
    assert (never.was_frozen, never.freeze_id, never.message) == (False, 0, "not frozen")
    assert farm.quiesce("win", "none", 5, now=14.0).freeze_id == 2
    assert farm.io_blocked("win", now=14.5) is None, "level none does not hold writes"
    with pytest.raises(api.GuestStateError, match=r"VM lin \(RHEL 3\): its guest agent does not support quiesce level 'application'; it supports none, filesystem, poweroff"):
        farm.quiesce("lin", "application", 30, now=15.0)
    with pytest.raises(api.BadRequest, match="timeout must be positive"):
        farm.quiesce("lin", "filesystem", 0, now=15.0)
    with pytest.raises(api.BadRequest, match="unknown quiesce level 'deep'"):
        farm.quiesce("lin", "deep", 10, now=15.0)


def test_freeze_timeout_is_lazy_and_reads_do_not_change_state() -> None:
    farm = small_farm()
    ticket = farm.quiesce("lin", "filesystem", 30, now=100.0)
    state = farm.to_state()
    status = farm.freeze_status("lin", now=129.0)
    assert status.frozen and status.deadline == 130.0
    late = farm.freeze_status("lin", now=500.0)
    assert (late.frozen, late.lost, late.thawed_at, late.freeze_id) == (False, True, 130.0, ticket.freeze_id)
    assert farm.io_blocked("lin", now=500.0) is None
    assert farm.to_state() == state, "a read computes the self-thaw without storing it"
    result = farm.thaw("lin", now=501.0)
    assert not result.was_frozen and result.lost
    assert "freeze 1 was lost" in result.message and "(130.000)" in result.message
    assert farm.to_state() != state
    assert farm.quiesce("lin", "filesystem", 30, now=502.0).freeze_id == 2


def test_poweroff_level_and_power_state() -> None:
    farm = small_farm()
    farm.quiesce("lin", "poweroff", 50, now=0.0)
    assert farm.vm_info("lin").power is PowerState.OFF
    assert farm.io_blocked("lin", now=1.0) == 50.0
    with pytest.raises(api.GuestStateError, match="thaw it instead"):
        farm.power_on("lin", now=2.0)
    # nobody thaws: the host agent powers the guest on at the deadline, and says the freeze was lost
    assert farm.vm_info("lin", now=60.0).power is PowerState.ON
    assert farm.state("lin", now=60.0).boots == 1
    assert farm.freeze_status("lin", now=60.0).lost
    farm.power_off("util", now=70.0)
    with pytest.raises(api.GuestStateError, match="powered off: its guest agent cannot quiesce at level 'filesystem'"):
        farm.quiesce("util", "filesystem", 10, now=71.0)
    with pytest.raises(api.GuestStateError, match="power it on instead of rebooting"):
        farm.reboot("util", now=71.0)
    with pytest.raises(api.GuestStateError, match="cannot rescan"):
        farm.rescan("util", now=71.0)
    off = farm.quiesce("util", "poweroff", 10, now=72.0)  # allowed while off
    farm.thaw("util", now=73.0)
    assert farm.vm_info("util").power is PowerState.OFF, "thaw restores the power state before the quiesce"
    assert off.freeze_id == 1
    farm.power_on("util", now=74.0)
    farm.reboot("util", now=75.0)
    farm.rescan("util", now=76.0)
    assert farm.vm("util").boots == 2 and farm.vm("util").seen_at == 76.0


def test_selectors() -> None:
    farm = small_farm()
    assert farm.select({"backup": "nightly"}) == ["lin", "win"]
    assert farm.select({"backup": "nightly", "app": "sql"}) == ["win"]
    assert farm.select({"app": "oracle"}) == []
    assert [vm.name for vm in farm.list_vms()] == ["lin", "util", "win"]
    assert [h.name for h in farm.list_hosts()] == ["esx-a", "esx-b", "proxy"]
    assert farm.host_info("proxy").kind == "backup"


def test_state_round_trip_and_replay() -> None:
    base = small_farm()
    start = base.to_state()
    call = Logged(base)
    call("quiesce", vm="win", level="filesystem", timeout=30.0, now=1.0)
    call("thaw", vm="win", now=2.0)
    call("quiesce", vm="win", level="application", timeout=10.0, now=3.0)
    call("quiesce", vm="lin", level="poweroff", timeout=5.0, now=3.0)
    call("vmotion", vm="util", host="esx-a", now=4.0)
    call("power_off", vm="util", now=5.0)
    call("rescan", vm="win", now=20.0)  # settles win's lost freeze at 13.0
    call("set_labels", vm="util", labels={"tier": "bronze"})
    state = base.to_state()
    restored = Farm.from_state(state)
    assert restored.to_state() == state
    assert restored.quiesce("win", "none", 5, now=30.0).freeze_id == 3, "freeze ids survive a restart"
    replayed = Farm.from_state(start)
    for method, kwargs in call.log:
        getattr(replayed, method)(**kwargs)
    assert replayed.to_state() == state
    assert replayed.freeze_status("win", now=20.0).lost
    assert replayed.freeze_status("lin", now=20.0).lost  # poweroff freeze lost: guest back on
    assert replayed.vm_info("lin", now=20.0).power is PowerState.ON
