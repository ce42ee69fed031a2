"""Lab files -> populated sites: the seed's default lab, errors that say where, large generated labs."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from flowcopy.site import api
from flowcopy.site.api import DiskKind
from flowcopy.site.inventory import LabError, generate_lab, generate_lab_spec, load_lab, parse_size


async def test_default_lab_is_the_seeds() -> None:
    site = load_lab()
    hosts = {h.name: h for h in await site.list_hosts()}
    assert set(hosts) == {"esx-x440", "esx-x445", "backup-proxy"}
    assert hosts["esx-x440"].version.startswith("ESX Server 2.5") and hosts["backup-proxy"].kind == "backup"
    vm1 = await site.get_vm("rich-w2k-os-1")
    vm2 = await site.get_vm("RICH-W2K-OS-2")
    assert vm1.host == "esx-x440" and "Windows 2000" in vm1.os and "Windows 2000" in vm2.os
    e1, e2 = await site.lun_of("rich-w2k-os-1", "E:"), await site.lun_of("RICH-W2K-OS-2", "E:")
    assert (e1.name, e1.serial, e1.label) == ("Disk1", "20313698", "E_drive_W2K_1")
    assert (e2.name, e2.serial, e2.label) == ("Disk1", "20413698", "E_Drive_W2K_2")
    # rsList2105s on the ESX host: Disk1..Disk4 are the seed's four serials
    disks = {d.name: d.serial for d in await site.list_disks("esx-x440")}
    assert [disks[f"Disk{i}"] for i in range(1, 5)] == ["20313698", "20413698", "20513698", "20613698"]
    # SQL log and data on two LSSs, targets of the same sizes on the second guest
    log, data = await site.lun_of("rich-w2k-os-1", "L:"), await site.lun_of("rich-w2k-os-1", "M:")
    log2, data2 = await site.lun_of("RICH-W2K-OS-2", "L:"), await site.lun_of("RICH-W2K-OS-2", "M:")
    assert (log.serial, log2.serial) == ("20513698", "20613698")
    vol = {v.serial: v for v in await site.list_volumes()}
    assert vol[log.serial].lss != vol[data.serial].lss
    assert vol[log.serial].capacity == vol[log2.serial].capacity and vol[data.serial].capacity == vol[data2.serial].capacity
    # Linux guests: each with at least two RDM LUNs, and the OS releases of the seed
    linux = await site.list_vms({"os": "linux"})
    assert {vm.os for vm in linux} >= {
        "Red Hat Enterprise Linux AS 2.1", "Red Hat Enterprise Linux 3",
        "SUSE Linux Enterprise Server 8", "SUSE Linux Enterprise Server 9",
    }
    for vm in linux:
        assert sum(d.kind is DiskKind.RDM for d in vm.disks) >= 2
    # a VMFS LUN shared by several VMs' system disks
    system = vm1.disks[0]
    assert system.kind is DiskKind.VMFS and len(system.shared_with) >= 2
    # spare targets: a 12-target rotation, a nocopy nightly of every Linux guest, an incremental
    pools = site.pools
    assert len(pools["rotation-12"]) == 12
    rotated = await site.lun_of("rhel3-db1", "/data")
    assert all(vol[s].capacity == rotated.capacity for s in pools["rotation-12"])
    need: dict[int, int] = {}
    for vm in linux:
        for d in vm.disks:
            if d.kind is DiskKind.RDM:
                need[d.capacity] = need.get(d.capacity, 0) + 1
    spares = [s for name in ("spare-256m", "spare-128m", "spare-64m") for s in pools[name]]
    for size, count in need.items():
        assert sum(vol[s].capacity == size for s in spares) >= count
    assert len(pools["incremental"]) >= 1
    # every workload's LUNs are formatted at load (a mountable file system, a database)
    fs = await site.check(["20313698"])
    assert fs.consistent and fs.kind == "filesystem"
    db = await site.check(["20513698", "20714698"])
    assert db.consistent and db.kind == "database"
    assert (await site.check(["30016698"])).kind == "empty"


async def test_default_lab_by_name_and_labels() -> None:
    site = load_lab("default")
    nightly = [vm.name for vm in await site.list_vms({"backup": "nightly"})]
    assert nightly == sorted(nightly) and "rich-w2k-os-1" in nightly and "RICH-W2K-OS-2" not in nightly
    primed = await site.prime("rich-w2k-os-1")
    assert {d.name: d.primed_name for d in primed} == {"Disk1": "E:", "Disk2": "L:", "Disk3": "M:", "Disk4": "S:", "Disk5": "T:"}
    with pytest.raises(api.UnknownHost):
        await site.list_disks("nowhere")


LAB = """\
lab: tiny
arrays:
  - box: "698"
    lsses: ["13"]
    volumes:
      - {serial: "20313698", capacity: 64MiB}
      - {serial: "20413698", capacity: 64MiB}
hosts:
  - {name: esx1}
vms:
  - name: vm1
    host: esx1
    disks:
      - {name: Disk1, rdm: "20313698", guest_path: /data}
workloads:
  - {name: fs1, kind: filesystem, vm: vm1, disk: /data, seed: 3}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "lab.yaml"
    path.write_text(text)
    return path


def test_a_small_lab_file_loads(tmp_path: Path) -> None:
    site = load_lab(write(tmp_path, LAB))
    assert site.lab["name"] == "tiny"
    assert list(site.workloads) == ["fs1"] and not site.workloads["fs1"].autostart
    assert [(d.name, d.serial) for d in site.array.list_disks("esx1")] == [("Disk1", "20313698")]
    assert [(d.name, d.serial) for d in site.array.list_disks("vm1")] == [("Disk1", "20313698")]


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ('      - {serial: "20413698", capacity: 64MiB}', '      - {serial: "20413698", capacity: 64MiB, size: 1}',
         "lab.yaml:7: arrays[0].volumes[1].size: unknown key 'size'"),
        ('      - {serial: "20413698", capacity: 64MiB}', '      - {serial: "20414698", capacity: 64MiB}',
         "lab.yaml:7: arrays[0].volumes[1]: volume 20414698 is on LSS 14, which the array does not list (13)"),
        ('      - {serial: "20413698", capacity: 64MiB}', '      - {serial: "20413698", capacity: 1000}',
         "lab.yaml:7: arrays[0].volumes[1].capacity: capacity must be a positive multiple of 64 KiB, not 1000"),
        ('      - {serial: "20413698", capacity: 64MiB}', '      - {serial: "20413698", capacity: lots}',
         "lab.yaml:7: arrays[0].volumes[1].capacity: a size must be bytes or like '256MiB', not 'lots'"),
        ('rdm: "20313698"', 'rdm: "29913698"', "lab.yaml:14: vms[0].disks[0].rdm: no volume 29913698 on the array"),
        ("    host: esx1", "    host: esx9", "lab.yaml:11: vms[0]: no host 'esx9' in the farm"),
        ("disk: /data", "disk: /nope", "lab.yaml:16: workloads[0].disk: VM vm1 has no disk '/nope'"),
        ("kind: filesystem", "kind: nosql", "lab.yaml:16: workloads[0].kind: kind must be 'filesystem', 'database', 'sqlite' or 'ext4', not 'nosql'"),
        ("  - {name: esx1}", "  - {name: esx1, kind: mainframe}", "lab.yaml:9: hosts[0]: host esx1: kind must be one of esx, backup, not 'mainframe'"),
        ("lab: tiny", "lab: tiny\nvm: oops", "lab.yaml:2: lab.vm: unknown key 'vm'"),
        ('    disks:\n      - {name: Disk1, rdm: "20313698", guest_path: /data}', "    disks: {a: 1}",
         "lab.yaml:13: vms[0].disks: expected a list, got a mapping"),
        ("vms:", "vms: [", "lab.yaml:"),
    ],
)
def test_lab_errors_say_where_and_why(tmp_path: Path, old: str, new: str, expected: str) -> None:
    assert old in LAB
    path = write(tmp_path, LAB.replace(old, new, 1))
    with pytest.raises(LabError) as caught:
        load_lab(path)
    message = str(caught.value)
    assert message.startswith(str(path.parent)), message
    assert expected in message, message


def test_vmfs_disk_cannot_carry_a_workload(tmp_path: Path) -> None:
    text = LAB.replace('      - {name: Disk1, rdm: "20313698", guest_path: /data}',
                       '      - {name: Disk1, vmfs: "20313698", guest_path: /data}')
    with pytest.raises(LabError, match="FlashCopy works per LUN"):
        load_lab(write(tmp_path, text))


def test_missing_lab_file(tmp_path: Path) -> None:
    with pytest.raises(LabError, match="cannot read the lab file"):
        load_lab(tmp_path / "absent.yaml")


def test_parse_size() -> None:
    assert parse_size("256MiB") == 256 << 20
    assert parse_size(65536) == 65536
    assert parse_size("1 GiB") == 1 << 30
    with pytest.raises(ValueError):
        parse_size("12 furlongs")


async def test_generated_lab_shape(autojump_clock: object) -> None:
    site = generate_lab(300, 4, disks_per_vm=2, targets_per_disk=2, workloads=3, vmfs_every=50)
    vms = await site.list_vms()
    assert len(vms) == 300 and vms[0].name == "vm00000"
    vol = {v.serial: v for v in await site.list_volumes()}
    assert len(vol) == 1 + 300 * 2 * 3
    assert len({v.lss for v in vol.values()}) == 4
    targets = site.pools["targets:vm00007"]
    assert len(targets) == 4 and all(vol[t].label.startswith("vm00007-Disk") for t in targets)
    disk = await site.lun_of("vm00007", "/data2")
    assert vol[disk.serial].capacity == vol[targets[-1]].capacity
    with pytest.raises(api.NotRawMapped, match="shared by 6 VMs"):
        await site.lun_of("vm00050", "Disk0")
    assert sorted(site.workloads) == ["vm00000-db", "vm00001-db", "vm00002-db"]
    async with site.running():
        await trio.sleep(10)
        await site.quiesce("vm00001", api.QuiesceLevel.APPLICATION, 30)
        t = site.pools["targets:vm00001"]
        await site.establish((await site.lun_of("vm00001", "Disk1")).serial, t[0], api.FlashOptions(freeze=True))
        await site.establish((await site.lun_of("vm00001", "Disk2")).serial, t[2], api.FlashOptions(freeze=True))
        await site.unfreeze([f.lss for f in await site.frozen_lsses()])
        await site.thaw("vm00001")
    report = await site.check([t[0], t[2]])
    assert report.consistent and report.kind == "database", report.problems


def test_generated_lab_of_ten_thousand_vms() -> None:
    site = generate_lab(10_000, 16)
    assert len(site.farm.vms) == 10_000
    assert len(site.array.volumes()) == 40_000
    assert site.farm.lun_of("vm09999", "Disk2").serial in {v.serial for v in site.array.volumes()}


def test_generator_refuses_impossible_layouts() -> None:
    with pytest.raises(ValueError, match="use more LSSs"):
        generate_lab_spec(10_000, 2, disks_per_vm=2, targets_per_disk=1)
    with pytest.raises(ValueError):
        generate_lab_spec(0, 1)
