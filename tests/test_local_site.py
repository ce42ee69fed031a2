"""Issue 3 acceptance, against the in-process site directly (no engine).

The seed's two scenarios on the default lab, the checker failing on a non-consistent
copy and passing with a consistency group or an application quiesce, the VMFS refusal,
a guest freeze lost to its timeout, and writes held by an ELB freeze that resume.
"""

from __future__ import annotations

import hashlib
import struct

import pytest
import trio

from flowcopy.site import api, checker, workloads
from flowcopy.site.api import CopyMode, FlashOptions, QuiesceLevel
from flowcopy.site.inventory import load_lab
from flowcopy.site.local import Latency, LocalSite

W2K_1, W2K_2 = "rich-w2k-os-1", "RICH-W2K-OS-2"
E1, E2 = "20313698", "20413698"
LOG1, LOG2 = "20513698", "20613698"
DATA1, DATA2 = "20714698", "20814698"


def image(site: LocalSite, serial: str) -> dict[int, bytes]:
    """A volume's written bytes as the array serves them now: extent offset -> bytes."""
    now = site.clock()
    return {
        e.offset: site.array.read(serial, e.offset, e.length, now=now) for e in site.array.extents(serial, now=now)
    }


def pages_digest(expected: dict[int, tuple[int, int]]) -> str:
    digest = hashlib.sha256()
    for page in sorted(expected):
        seq, value = expected[page]
        digest.update(struct.pack("<IQQ", page, seq, value))
    return digest.hexdigest()


# --------------------------------------------------------------------------- seed scenario 1


async def test_seed_scenario_1_filesystem_copy_opens_on_second_guest(autojump_clock: object) -> None:
    site = load_lab()
    fs = site.workloads["orders-fs"]
    async with site.running(["orders-fs"]):
        await trio.sleep(30)
        assert fs.ops > 20
        ticket = await site.quiesce(W2K_1, QuiesceLevel.FILESYSTEM, 60)
        ops_at_copy = fs.ops
        source_at_copy = image(site, E1)
        rel = await site.establish(E1, E2, FlashOptions())
        assert rel.source == E1 and rel.target == E2 and rel.created >= ticket.frozen_at
        thawed = await site.thaw(W2K_1)
        assert thawed.was_frozen and thawed.freeze_id == ticket.freeze_id and not thawed.lost
        await trio.sleep(30)  # the source moves on; the target keeps the point in time
        assert fs.ops > ops_at_copy

    # the second guest opens E: without formatting and sees the files of the point in time
    report = await site.mount_check(W2K_2, ["E:"])
    assert report.consistent, report.problems
    assert report.kind == "filesystem"
    files = checker.read_files(site.read_at(), E2)
    assert files == workloads.expected_files(seed=fs.seed, ops=ops_at_copy)
    assert "orders.csv" in files and files["orders.csv"].startswith(b"")
    assert report.summary[f"{E2}:last_operation"] == str(ops_at_copy)
    # byte for byte the source's image at the point in time, and no longer the source's now
    assert image(site, E2) == source_at_copy
    assert image(site, E1) != source_at_copy
    assert checker.read_files(site.read_at(), E1) == workloads.expected_files(seed=fs.seed, ops=fs.ops)


# --------------------------------------------------------------------------- seed scenario 2


async def test_seed_scenario_2_database_copy_after_application_freeze(autojump_clock: object) -> None:
    site = load_lab()
    db = site.workloads["sql-db"]
    async with site.running(["sql-db", "orders-fs"]):
        await trio.sleep(20)
        ticket = await site.quiesce(W2K_1, QuiesceLevel.APPLICATION, 30)
        seq_at_copy = db.seq
        assert seq_at_copy > 100
        source_report = await site.check([LOG1, DATA1])
        for source, target in [(LOG1, LOG2), (DATA1, DATA2)]:
            await site.establish(source, target, FlashOptions(freeze=True, tag="scenario-2"))
        assert {f.lss for f in await site.frozen_lsses()} == {"13", "14"}
        await site.unfreeze(["13", "14"])
        await site.thaw(W2K_1)
        status = await site.freeze_status(W2K_1)
        assert status.freeze_id == ticket.freeze_id and not status.frozen and not status.lost
        await trio.sleep(20)
        assert db.seq > seq_at_copy

    # the seed's second guest had to reboot to see the copied database
    await site.reboot(W2K_2)
    assert (await site.get_vm(W2K_2)).power is api.PowerState.ON
    report = await site.mount_check(W2K_2, ["L:", "M:"])
    assert report.consistent, report.problems
    assert report.kind == "database"
    key = f"{LOG2}+{DATA2}:"
    assert report.summary[key + "log_head"] == str(seq_at_copy)
    assert report.summary[key + "pages_digest"] == pages_digest(workloads.expected_pages(db.seed, seq_at_copy))
    assert checker.summaries_equal(report.summary, source_report.summary)
    # the source kept going and is itself consistent
    live = await site.check([LOG1, DATA1])
    assert live.consistent and int(live.summary[f"{LOG1}+{DATA1}:log_head"]) == db.seq


# --------------------------------------------------------------------------- the checker can fail


async def copy_db_one_at_a_time(seed: int, *, freeze: bool, quiesce: bool) -> api.CheckReport:
    site = load_lab()
    site.workloads["sql-db"].seed = seed
    async with site.running(["sql-db"]):
        await trio.sleep(5)
        if quiesce:
            await site.quiesce(W2K_1, QuiesceLevel.APPLICATION, 30)
        await site.establish(LOG1, LOG2, FlashOptions(mode=CopyMode.NOCOPY, freeze=freeze))
        await trio.sleep(0.3)  # the second establish comes a moment later
        await site.establish(DATA1, DATA2, FlashOptions(mode=CopyMode.NOCOPY, freeze=freeze))
        if freeze:
            await site.unfreeze(["13", "14"])
        if quiesce:
            await site.thaw(W2K_1)
        await trio.sleep(2)
    return await site.check([LOG2, DATA2])


async def test_checker_reports_inconsistent_copy_without_freeze(autojump_clock: object) -> None:
    failing = None
    for seed in range(10):
        report = await copy_db_one_at_a_time(seed, freeze=False, quiesce=False)
        if not report.consistent:
            failing = (seed, report)
            break
    assert failing is not None, "no seed produced an inconsistent copy without a freeze"
    seed, report = failing
    assert report.kind == "database"
    assert any(f"on {DATA2} reflects log record" in p and f"log image on {LOG2} lacks" in p for p in report.problems)
    # the same seed, copied as a consistency group or under an application quiesce: consistent
    grouped = await copy_db_one_at_a_time(seed, freeze=True, quiesce=False)
    assert grouped.consistent, grouped.problems
    quiesced = await copy_db_one_at_a_time(seed, freeze=False, quiesce=True)
    assert quiesced.consistent, quiesced.problems


# --------------------------------------------------------------------------- refusals and timeouts


async def test_vmfs_disk_refused_with_reason(autojump_clock: object) -> None:
    site = load_lab()
    with pytest.raises(api.NotRawMapped) as caught:
        await site.lun_of(W2K_1, "C:")
    message = caught.value.message
    assert "FlashCopy works per LUN" in message
    assert "VMFS LUN 20013698 is shared by 6 VMs" in message
    assert W2K_2 in message and "sles9-db1" in message
    assert caught.value.kind == "not_raw_mapped"
    # the same disk by host-visible name and by serial
    with pytest.raises(api.NotRawMapped):
        await site.lun_of(W2K_1, "Disk0")
    with pytest.raises(api.NotRawMapped):
        await site.lun_of(W2K_1, "20013698")
    assert (await site.lun_of(W2K_1, "E:")).serial == E1
    assert (await site.lun_of(W2K_1, "e:")).serial == E1
    assert (await site.lun_of(W2K_1, E1)).name == "Disk1"
    with pytest.raises(api.UnknownDisk):
        await site.lun_of(W2K_1, "Z:")


async def test_freeze_timeout_self_thaw_is_recorded_and_workload_resumes(autojump_clock: object) -> None:
    site = load_lab()
    fs = site.workloads["orders-fs"]
    async with site.running(["orders-fs"]):
        await trio.sleep(5)
        ticket = await site.quiesce(W2K_1, QuiesceLevel.FILESYSTEM, 10)
        assert ticket.deadline == pytest.approx(ticket.frozen_at + 10)
        held_at = fs.ops
        await trio.sleep(9)
        assert fs.ops == held_at, "the guest held its writes while frozen"
        assert (await site.freeze_status(W2K_1)).frozen
        await trio.sleep(2)  # past the deadline: the guest thawed itself
        status = await site.freeze_status(W2K_1)
        assert not status.frozen and status.lost
        assert status.thawed_at == ticket.deadline
        assert status.freeze_id == ticket.freeze_id
        await trio.sleep(5)
        assert fs.ops > held_at, "writes resumed after the self-thaw"
        late = await site.thaw(W2K_1)
        assert not late.was_frozen and late.lost and "lost" in late.message
        again = await site.quiesce(W2K_1, QuiesceLevel.FILESYSTEM, 10)
        assert again.freeze_id == ticket.freeze_id + 1
        assert (await site.thaw(W2K_1)).was_frozen
        assert (await site.thaw(W2K_1)).message.startswith("not frozen")


async def test_elb_held_writes_wait_then_resume_on_unfreeze_or_timeout(autojump_clock: object) -> None:
    site = load_lab()
    done: dict[str, float] = {}

    async def host_write(name: str, serial: str) -> None:
        await site.write(serial, 0, b"held write " + name.encode())
        done[name] = trio.current_time()

    before = await site.read("21014698", 0, 16)
    await site.establish("21014698", "30016698", FlashOptions(mode=CopyMode.NOCOPY, freeze=True))
    frozen = await site.frozen_lsses()
    assert [f.lss for f in frozen] == ["14"]
    async with trio.open_nursery() as nursery:
        start = trio.current_time()
        nursery.start_soon(host_write, "unfreeze", "21014698")
        await trio.sleep(30)
        assert "unfreeze" not in done, "a write to a frozen LSS waits"
        await site.unfreeze(["14"])
    assert done["unfreeze"] == pytest.approx(start + 30)
    assert await site.read("21014698", 0, 16) == b"held write unfre"
    assert await site.read("30016698", 0, 16) == before, "the target keeps the point in time"

    # nobody unfreezes: the ELB timeout releases the host by itself
    await site.establish("22014698", "30116698", FlashOptions(mode=CopyMode.NOCOPY, freeze=True))
    since = (await site.frozen_lsses())[0].since
    async with trio.open_nursery() as nursery:
        nursery.start_soon(host_write, "timeout", "22014698")
    assert done["timeout"] == pytest.approx(since + api.DEFAULT_ELB_TIMEOUT)


async def test_database_workload_waits_out_an_elb_freeze(autojump_clock: object) -> None:
    site = load_lab()
    db = site.workloads["sql-db"]
    async with site.running(["sql-db"]):
        await trio.sleep(5)
        await site.establish(LOG1, LOG2, FlashOptions(mode=CopyMode.NOCOPY, freeze=True))
        await trio.sleep(1)
        held = db.seq
        await trio.sleep(20)
        assert db.seq <= held + 1, "log writes wait while LSS 13 is frozen"
        await site.unfreeze(["13"])
        await trio.sleep(5)
        assert db.seq > held + 10


async def test_quiesce_refusals(autojump_clock: object) -> None:
    site = load_lab()
    with pytest.raises(api.GuestStateError, match="does not support quiesce level 'application'"):
        await site.quiesce("rhas21-db1", QuiesceLevel.APPLICATION, 30)
    await site.power_off(W2K_2)
    with pytest.raises(api.GuestStateError, match="powered off"):
        await site.quiesce(W2K_2, QuiesceLevel.FILESYSTEM, 30)
    with pytest.raises(api.UnknownVM):
        await site.quiesce("no-such-vm", QuiesceLevel.NONE, 30)
    with pytest.raises(api.GuestStateError, match="powered off"):
        await site.mount_check(W2K_2, ["E:"])
    await site.power_on(W2K_2)
    await site.quiesce(W2K_1, QuiesceLevel.NONE, 30)
    with pytest.raises(api.GuestStateError, match="already frozen"):
        await site.quiesce(W2K_1, QuiesceLevel.FILESYSTEM, 30)


async def test_poweroff_quiesce_and_thaw_power_cycle(autojump_clock: object) -> None:
    site = load_lab()
    ticket = await site.quiesce("sles9-db1", QuiesceLevel.POWEROFF, 600)
    assert (await site.get_vm("sles9-db1")).power is api.PowerState.OFF
    assert ticket.level is QuiesceLevel.POWEROFF
    result = await site.thaw("sles9-db1")
    assert result.was_frozen
    assert (await site.get_vm("sles9-db1")).power is api.PowerState.ON


async def test_site_implements_every_protocol_method() -> None:
    site = load_lab()
    assert isinstance(site, api.Site)
    for name, value in vars(api.Site).items():
        if callable(value) and not name.startswith("_"):
            assert callable(getattr(site, name, None)), name


async def test_mutation_log_replays_to_the_same_state(autojump_clock: object) -> None:
    site = load_lab()
    start = site.to_state()
    log: list[tuple[str, str, dict[str, object]]] = []
    site.on_mutation = lambda component, method, kwargs: log.append((component, method, kwargs))
    async with site.running(["sql-db", "orders-fs"]):
        await trio.sleep(3)
        await site.quiesce(W2K_1, QuiesceLevel.APPLICATION, 20)
        await site.establish(LOG1, LOG2, FlashOptions(freeze=True, tag="t"))
        await site.establish(DATA1, DATA2, FlashOptions(freeze=True, tag="t"))
        await site.unfreeze(["13", "14"])
        await site.thaw(W2K_1)
        await site.quiesce("sles8-db1", QuiesceLevel.FILESYSTEM, 5)
        await trio.sleep(10)  # sles8-db1's freeze is lost to its timeout meanwhile
        await site.vmotion("rhel3-db1", "esx-x445")
    await site.reboot(W2K_2)
    assert {m for _, m, _ in log} >= {"write", "establish", "quiesce", "thaw", "unfreeze", "vmotion", "power_on"}
    replayed = LocalSite.from_state(start)
    for component, method, kwargs in log:
        replayed.apply(component, method, kwargs)
    assert replayed.to_state() == site.to_state()
    # and a snapshot round trip is exact
    assert LocalSite.from_state(site.to_state()).to_state() == site.to_state()


# --------------------------------------------------------------------------- shell details


async def test_quiesce_and_thaw_take_modelled_time(autojump_clock: object) -> None:
    site = load_lab()
    start = trio.current_time()
    ticket = await site.quiesce(W2K_1, QuiesceLevel.FILESYSTEM, 30)
    assert ticket.frozen_at == pytest.approx(start + site.latency.quiesce)
    await site.thaw(W2K_1)
    status = await site.freeze_status(W2K_1)
    assert status.thawed_at == pytest.approx(start + site.latency.quiesce + site.latency.thaw)
    fast = load_lab(latency=Latency.zero())
    ticket = await fast.quiesce(W2K_1, QuiesceLevel.FILESYSTEM, 30)
    assert ticket.frozen_at == trio.current_time()


async def test_workloads_start_stop_and_list(autojump_clock: object) -> None:
    site = load_lab()
    fs = site.workloads["orders-fs"]
    async with site.running(False):
        assert not any(w["running"] for w in site.list_workloads())
        await site.start_workload("orders-fs")
        await trio.sleep(10)
        listed = {w["name"]: w for w in site.list_workloads()}
        assert listed["orders-fs"]["running"] and listed["orders-fs"]["operations"] == fs.ops > 0
        # a stop while the guest holds the workload (frozen) returns at once
        await site.quiesce(W2K_1, QuiesceLevel.FILESYSTEM, 60)
        before = trio.current_time()
        await site.stop_workload("orders-fs")
        assert trio.current_time() == before
        await site.thaw(W2K_1)
        stopped_at = fs.ops
        await trio.sleep(10)
        assert fs.ops == stopped_at
        await site.start_workload("orders-fs")
        await trio.sleep(10)
        assert fs.ops > stopped_at
        with pytest.raises(api.BadRequest, match="no workload 'nope'"):
            await site.start_workload("nope")
    report = await site.check([E1])
    assert report.consistent
    assert checker.read_files(site.read_at(), E1) == workloads.expected_files(fs.seed, fs.ops)


async def test_mount_check_on_the_backup_host_reads_any_target(autojump_clock: object) -> None:
    site = load_lab()
    async with site.running(["rhel3-fs"]):
        await trio.sleep(10)
        await site.quiesce("rhel3-db1", QuiesceLevel.FILESYSTEM, 30)
        await site.establish("22014698", "30516698", FlashOptions(mode=CopyMode.NOCOPY))
        await site.thaw("rhel3-db1")
        await trio.sleep(10)
    report = await site.mount_check("backup-proxy", ["30516698"])
    assert report.consistent and report.kind == "filesystem"
    with pytest.raises(api.UnknownVolume):
        await site.mount_check("backup-proxy", ["99999698"])
    with pytest.raises(api.BadRequest, match="ESX server"):
        await site.mount_check("esx-x440", ["30516698"])
    with pytest.raises(api.UnknownDisk, match="VMFS virtual disk"):
        await site.mount_check(W2K_2, ["C:"])


async def test_reverse_restore_and_the_guest_carries_on_from_the_restored_image(autojump_clock: object) -> None:
    site = load_lab()
    fs = site.workloads["sles9-fs"]
    source, target = "24014698", "36116698"
    async with site.running(["sles9-fs"]):
        await trio.sleep(20)
        await site.quiesce("sles9-db1", QuiesceLevel.FILESYSTEM, 30)
        ops_at_backup = fs.ops
        await site.establish(source, target, FlashOptions(record=True, persistent=True, tag="incr"))
        await site.thaw("sles9-db1")
        await site.wait_copied(source, target)
        await trio.sleep(20)
        assert fs.ops > ops_at_backup
        # restore: stop the application (power off), reverse, power on
        await site.power_off("sles9-db1")
        await site.reverse(source, target, tag="restore")
        await site.wait_copied(target, source)
        assert checker.read_files(site.read_at(), source) == workloads.expected_files(fs.seed, ops_at_backup)
        await site.power_on("sles9-db1")
        await trio.sleep(20)
        assert fs.ops > ops_at_backup
    # the guest re-read its disks at boot and continued the restored file system
    report = await site.check([source])
    assert report.consistent, report.problems
    assert checker.read_files(site.read_at(), source) == workloads.expected_files(fs.seed, fs.ops)
