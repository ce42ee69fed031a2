"""One contract for every `Site`: in-process, durable, and served over HTTP.

Each test runs three times, on `LocalSite` (the model), on the durable site of
`persist.open_site` (what `flowcopy run` embeds) and on a `SiteClient` talking to the
HTTP server in this test's nursery (what `--site URL` gets): same values, same error
types and messages. A differential test also drives a local and a served site in
lockstep through one script and compares every answer.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from flowcopy.site import api
from flowcopy.site.api import CopyMode, CopyState, FlashOptions, QuiesceLevel
from flowcopy.site.client import SiteClient
from flowcopy.site.inventory import load_lab
from flowcopy.site.persist import open_site
from flowcopy.site.server import build_app, serve_app

TOKEN = "contract-token"
W2K_1, W2K_2 = "rich-w2k-os-1", "RICH-W2K-OS-2"
E1, E2 = "20313698", "20413698"  # 256 MiB, LSS 13
LOG1 = "20513698"  # 128 MiB, LSS 13
VMFS = "20013698"
RHEL3_DATA = "22014698"  # 256 MiB, LSS 14
SPARES = [f"3{n:02d}16698" for n in range(0, 24)]  # 256 MiB, LSS 16
SPARE_128 = "35016698"
INCR = "36016698"
MiB = 1 << 20
TRACKS_256M = 256 * MiB // api.TRACK_SIZE
COPY_SECONDS_256M = 256 / 50  # copy_rate 50 MiB/s in the default lab


@pytest.fixture(params=["local", "durable", "served"])
async def site(request: pytest.FixtureRequest, tmp_path: Path, autojump_clock: object) -> AsyncIterator[api.Site]:
    if request.param == "local":
        yield load_lab()
        return
    async with open_site(tmp_path / "state", workloads=False) as durable:
        if request.param == "durable":
            yield durable
            return
        async with served(durable) as client:
            yield client


def served(inner: api.Site) -> Any:
    """A SiteClient for `inner` served on a free loopback port, inside the caller's task."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def run() -> AsyncIterator[SiteClient]:
        app = build_app(inner, token=TOKEN, faults=getattr(inner, "faults", None))
        async with trio.open_nursery() as nursery:
            url = await nursery.start(lambda task_status: serve_app(app, port=0, task_status=task_status))
            async with SiteClient(url, TOKEN) as client:
                yield client
            nursery.cancel_scope.cancel()

    return run()


# --------------------------------------------------------------------------- inventory


async def test_implements_the_protocol(site: api.Site, autojump_clock: object) -> None:
    assert isinstance(site, api.Site)


async def test_clock_runs(site: api.Site, autojump_clock: object) -> None:
    t0 = await site.now()
    await trio.sleep(10)
    assert await site.now() == pytest.approx(t0 + 10)


async def test_hosts_and_vms(site: api.Site, autojump_clock: object) -> None:
    hosts = {h.name: h for h in await site.list_hosts()}
    assert set(hosts) == {"esx-x440", "esx-x445", "backup-proxy"}
    assert hosts["backup-proxy"].kind == "backup" and hosts["backup-proxy"].vms == ()
    assert W2K_1 in hosts["esx-x440"].vms

    vms = await site.list_vms()
    assert [v.name for v in vms] == sorted(v.name for v in vms)
    linux = await site.list_vms({"os": "linux"})
    assert {v.name for v in linux} == {"rhas21-db1", "rhel3-db1", "sles8-db1", "sles9-db1"}
    assert await site.list_vms({"os": "linux", "tier": "nope"}) == []
    vm = await site.get_vm(W2K_1)
    assert vm.host == "esx-x440" and vm.power is api.PowerState.ON
    assert vm.labels["app"] == "sql"
    assert [d.name for d in vm.disks] == ["Disk0", "Disk1", "Disk2", "Disk3", "Disk4", "Disk5"]
    assert vm.disks[1].serial == E1 and vm.disks[1].kind is api.DiskKind.RDM
    assert QuiesceLevel.APPLICATION in vm.quiesce_levels
    with pytest.raises(api.UnknownVM, match="no VM 'ghost'"):
        await site.get_vm("ghost")


async def test_lun_of(site: api.Site, autojump_clock: object) -> None:
    assert (await site.lun_of(W2K_1, "E:")).serial == E1
    assert (await site.lun_of(W2K_1, "Disk1")).serial == E1
    assert (await site.lun_of(W2K_1, E1)).name == "Disk1"
    assert (await site.lun_of("rhel3-db1", "/data")).serial == RHEL3_DATA
    with pytest.raises(api.NotRawMapped) as caught:
        await site.lun_of(W2K_1, "C:")
    assert "FlashCopy works per LUN" in caught.value.message
    with pytest.raises(api.UnknownDisk):
        await site.lun_of(W2K_1, "Z:")
    with pytest.raises(api.UnknownVM):
        await site.lun_of("ghost", "E:")


async def test_host_disks_and_prime(site: api.Site, autojump_clock: object) -> None:
    disks = await site.list_disks("esx-x440")
    by_name = {d.name: d for d in disks}
    assert by_name["Disk1"].serial == E1 and by_name["Disk1"].primed_name is None
    primed = {d.name: d for d in await site.prime("esx-x440")}
    assert primed["Disk1"].primed_name == f"{W2K_1}:E:"
    assert {d.name: d for d in await site.list_disks("esx-x440")}["Disk1"].primed_name == f"{W2K_1}:E:"
    with pytest.raises(api.UnknownHost):
        await site.list_disks("nohost")
    with pytest.raises(api.UnknownHost):
        await site.prime("nohost")


async def test_volumes(site: api.Site, autojump_clock: object) -> None:
    vols = {v.serial: v for v in await site.list_volumes()}
    assert len(vols) == 62  # with the two space-efficient targets of the pool se-repo
    assert vols[E1] == api.VolumeInfo(serial=E1, lss="13", capacity=256 * MiB, online=True, label="E_drive_W2K_1")
    assert await site.get_volume(E1) == vols[E1]
    with pytest.raises(api.UnknownVolume) as caught:
        await site.get_volume("99999999")
    assert caught.value.kind == "unknown_volume"


async def test_pools(site: api.Site, autojump_clock: object) -> None:
    pools = await site.list_pools()
    assert pools["spare-256m"] == tuple(SPARES)
    assert pools["incremental"] == (INCR, "36116698")
    assert set(pools) == {"spare-256m", "spare-128m", "spare-64m", "rotation-12", "incremental"}


# --------------------------------------------------------------------------- data


async def test_write_read_extents(site: api.Site, autojump_clock: object) -> None:
    blob = bytes(range(256)) * 300  # 76,800 bytes: crosses a track boundary
    await site.write(SPARES[0], 65_000, blob)
    assert await site.read(SPARES[0], 65_000, len(blob)) == blob
    assert await site.read(SPARES[0], 0, 100) == bytes(100)
    extents = await site.extents(SPARES[0])
    assert all(isinstance(e, api.Extent) for e in extents)
    # every non-zero byte written lies in an extent; everything outside them reads as zeros
    covered = {o for e in extents for o in range(e.offset, e.offset + e.length)}
    assert all(65_000 + i in covered for i, b in enumerate(blob) if b)
    assert all(65_000 <= o < 65_000 + len(blob) for o in covered)
    assert await site.extents(SPARES[1]) == []
    with pytest.raises(api.OutOfRange):
        await site.read(SPARES[0], 256 * MiB - 10, 20)
    with pytest.raises(api.OutOfRange):
        await site.write(SPARES[0], 256 * MiB, b"x")
    with pytest.raises(api.UnknownVolume):
        await site.read("99999999", 0, 1)
    with pytest.raises(api.UnknownVolume):
        await site.write("99999999", 0, b"x")


# --------------------------------------------------------------------------- FlashCopy


async def test_copy_point_in_time_then_dissolves(site: api.Site, autojump_clock: object) -> None:
    src, tgt = SPARES[0], SPARES[1]
    await site.write(src, 0, b"before" * 1000)
    rel = await site.establish(src, tgt, FlashOptions(tag="run-1"))
    assert (rel.source, rel.target, rel.mode, rel.state) == (src, tgt, CopyMode.COPY, CopyState.COPYING)
    assert rel.total_tracks == TRACKS_256M and rel.tag == "run-1"
    await site.write(src, 0, b"after!" * 1000)
    assert await site.read(tgt, 0, 6000) == b"before" * 1000, "target keeps the point in time"
    assert await site.read(src, 0, 6000) == b"after!" * 1000
    await trio.sleep(COPY_SECONDS_256M / 2)
    (mid,) = await site.query(tag="run-1")
    assert 0 < mid.out_of_sync_tracks < TRACKS_256M
    await trio.sleep(COPY_SECONDS_256M)
    assert await site.query(tag="run-1") == [], "a copy relationship dissolves at 100%"
    assert await site.read(tgt, 0, 6000) == b"before" * 1000


async def test_nocopy_lasts_until_withdraw(site: api.Site, autojump_clock: object) -> None:
    src, tgt = SPARES[2], SPARES[3]
    await site.establish(src, tgt, FlashOptions(mode=CopyMode.NOCOPY))
    await trio.sleep(3600)
    (rel,) = await site.query(volume=tgt)
    assert rel.mode is CopyMode.NOCOPY and rel.out_of_sync_tracks == TRACKS_256M
    await site.withdraw(src, tgt)
    assert await site.query(volume=src) == []
    with pytest.raises(api.RelationshipNotFound):
        await site.withdraw(src, tgt)


async def test_withdraw_after_copy(site: api.Site, autojump_clock: object) -> None:
    """rmflash -cp ends a relationship after its copy, unless it is persistent (it stays)."""
    src, tgt = SPARES[4], SPARES[5]
    await site.write(src, 0, b"data")
    await site.establish(src, tgt, FlashOptions(mode=CopyMode.NOCOPY))
    await site.withdraw(src, tgt, after_copy=True)
    await trio.sleep(COPY_SECONDS_256M + 1)
    assert await site.query(volume=src) == []
    assert await site.read(tgt, 0, 4) == b"data"
    await site.establish(src, tgt, FlashOptions(mode=CopyMode.NOCOPY, persistent=True))
    await site.withdraw(src, tgt, after_copy=True)
    await trio.sleep(COPY_SECONDS_256M + 1)
    (kept,) = await site.query(volume=src)
    assert kept.persistent and kept.state is CopyState.COPIED


async def test_establish_refusals(site: api.Site, autojump_clock: object) -> None:
    s, t = SPARES[6], SPARES[7]
    await site.establish(s, t, FlashOptions(mode=CopyMode.NOCOPY))
    refusals: list[tuple[type[api.SiteError], Callable[[], Awaitable[Any]]]] = [
        (api.SizeMismatch, lambda: site.establish(SPARES[8], SPARE_128, FlashOptions())),
        (api.UnknownVolume, lambda: site.establish(SPARES[8], "99999999", FlashOptions())),
        (api.UnknownVolume, lambda: site.establish("99999999", SPARES[8], FlashOptions())),
        (api.RelationshipExists, lambda: site.establish(s, t, FlashOptions())),
        (api.TargetInRelationship, lambda: site.establish(SPARES[8], t, FlashOptions())),
        (api.CascadeRefused, lambda: site.establish(t, SPARES[8], FlashOptions())),
        (api.CascadeRefused, lambda: site.establish(SPARES[8], s, FlashOptions())),
        (api.NotIncremental, lambda: site.resync(s, t)),
        (api.NotIncremental, lambda: site.reverse(s, t)),
        (api.RelationshipNotFound, lambda: site.resync(SPARES[8], SPARES[9])),
        (api.RelationshipNotFound, lambda: site.withdraw(SPARES[8], SPARES[9])),
    ]
    before = await site.query()
    for error, call in refusals:
        with pytest.raises(error) as caught:
            await call()
        assert caught.value.kind == error.kind and caught.value.message
    assert await site.query() == before, "every refusal leaves the array as it was"


async def test_too_many_targets_and_second_incremental(site: api.Site, autojump_clock: object) -> None:
    source = RHEL3_DATA
    for target in SPARES[:12]:
        await site.establish(source, target, FlashOptions(mode=CopyMode.NOCOPY))
    with pytest.raises(api.TooManyTargets):
        await site.establish(source, SPARES[12], FlashOptions(mode=CopyMode.NOCOPY))
    assert len(await site.query(volume=source)) == 12
    await site.withdraw(source, SPARES[0])
    await site.withdraw(source, SPARES[1])
    await site.establish(source, SPARES[0], FlashOptions(record=True, persistent=True))
    with pytest.raises(api.SecondIncremental):
        await site.establish(source, SPARES[1], FlashOptions(record=True, persistent=True))


async def test_incremental_resync_and_reverse(site: api.Site, autojump_clock: object) -> None:
    src, tgt = RHEL3_DATA, INCR
    await site.write(src, 0, b"v1" * 100)
    rel = await site.establish(src, tgt, FlashOptions(record=True, persistent=True, tag="incr"))
    assert rel.recording and rel.persistent
    with pytest.raises(api.BackgroundCopyRunning):
        await site.reverse(src, tgt)
    await trio.sleep(COPY_SECONDS_256M + 1)
    (done,) = await site.query(tag="incr")
    assert done.state is CopyState.COPIED and done.out_of_sync_tracks == 0
    await site.write(src, 0, b"v2" * 100)
    await site.write(src, 10 * api.TRACK_SIZE, b"more")
    # resyncflash's options replace the old ones: -record -persist are given again
    resynced = await site.resync(src, tgt, options=FlashOptions(record=True, persistent=True, tag="incr-2"))
    assert 0 < resynced.out_of_sync_tracks <= 2 and resynced.tag == "incr-2" and resynced.recording
    await trio.sleep(1)
    assert await site.read(tgt, 0, 200) == b"v2" * 100
    assert await site.read(tgt, 10 * api.TRACK_SIZE, 4) == b"more"
    # damage the source, restore it from the target
    await site.write(src, 0, b"XX" * 100)
    reversed_ = await site.reverse(src, tgt)
    assert (reversed_.source, reversed_.target) == (tgt, src)
    await trio.sleep(1)
    assert await site.read(src, 0, 200) == b"v2" * 100
    await site.write(tgt, 0, b"v3")  # the restored source is the reversed pair's target now
    plain = await site.resync(tgt, src)  # no -record -persist: it copies, then dissolves
    assert not plain.recording and not plain.persistent
    await trio.sleep(1)
    assert await site.query(volume=src) == [] and await site.read(src, 0, 2) == b"v3"


async def test_query_by_tag_and_volume(site: api.Site, autojump_clock: object) -> None:
    await site.establish(SPARES[0], SPARES[1], FlashOptions(mode=CopyMode.NOCOPY, tag="a"))
    await site.establish(SPARES[2], SPARES[3], FlashOptions(mode=CopyMode.NOCOPY, tag="b"))
    await site.establish(SPARES[0], SPARES[4], FlashOptions(mode=CopyMode.NOCOPY, tag="b"))
    assert {r.id for r in await site.query(tag="b")} == {f"{SPARES[2]}:{SPARES[3]}", f"{SPARES[0]}:{SPARES[4]}"}
    assert {r.id for r in await site.query(volume=SPARES[0])} == {f"{SPARES[0]}:{SPARES[1]}", f"{SPARES[0]}:{SPARES[4]}"}
    assert [r.id for r in await site.query(volume=SPARES[0], tag="a")] == [f"{SPARES[0]}:{SPARES[1]}"]
    assert len(await site.query()) == 3
    assert await site.query(tag="zzz") == []


# --------------------------------------------------------------------------- consistency groups


async def test_freeze_holds_writes_until_unfreeze(site: api.Site, autojump_clock: object) -> None:
    now = await site.now()
    await site.establish(RHEL3_DATA, SPARES[0], FlashOptions(mode=CopyMode.NOCOPY, freeze=True))
    (frozen,) = await site.frozen_lsses()
    assert frozen.lss == "14" and frozen.since == pytest.approx(now)
    assert frozen.deadline == pytest.approx(now + api.DEFAULT_ELB_TIMEOUT)
    done: list[float] = []

    async def host_write() -> None:
        await site.write(RHEL3_DATA, 0, b"held")
        done.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(host_write)
        await trio.sleep(30)
        assert done == [], "a write to a frozen LSS waits"
        (release,) = await site.unfreeze(["14"])
        assert release.lss == "14" and not release.by_timeout
    assert done and done[0] == pytest.approx(trio.current_time(), abs=1e-6)
    assert await site.read(RHEL3_DATA, 0, 4) == b"held"
    assert await site.frozen_lsses() == []
    assert await site.unfreeze(["14"]) == [], "unfreeze is idempotent"


async def test_freeze_holds_only_the_frozen_source(site: api.Site, autojump_clock: object) -> None:
    """Writes to the target and to unrelated LUNs of the same LSS flow during a freeze; the
    site records each source's hold; unfreeze of the LSS releases all its frozen sources."""
    await site.establish(SPARES[0], SPARES[1], FlashOptions(mode=CopyMode.NOCOPY, freeze=True))
    await site.establish(SPARES[2], SPARES[3], FlashOptions(mode=CopyMode.NOCOPY, freeze=True))
    t0 = await site.now()
    for serial in (SPARES[1], SPARES[3], SPARES[4]):  # targets and an unrelated LUN of LSS 16
        await site.write(serial, 0, b"flows")
    assert await site.now() == pytest.approx(t0)
    (frozen,) = await site.frozen_lsses()
    assert frozen.sources == (SPARES[0], SPARES[2]) and frozen.elb_timeout == api.DEFAULT_ELB_TIMEOUT
    (rel,) = await site.query(volume=SPARES[1])
    assert not rel.source_write_enabled and rel.elb_deadline == pytest.approx(frozen.deadline)
    await trio.sleep(2)
    (release,) = await site.unfreeze(["16"])
    assert release.sources == (SPARES[0], SPARES[2])
    holds = await site.hold_history()
    assert [h.serial for h in holds] == [SPARES[0], SPARES[2]]
    assert all(h.released_at is not None and h.released_at - h.since == pytest.approx(2.0) and not h.by_timeout
               for h in holds)


async def test_elb_timeout_per_lss(site: api.Site, autojump_clock: object) -> None:
    (info,) = [i for i in await site.list_lsses() if i.lss == "16"]
    assert info.elb_timeout == api.DEFAULT_ELB_TIMEOUT and info.volumes >= 24
    changed = await site.set_elb_timeout("16", 15)
    assert changed.elb_timeout == 15.0
    await site.establish(SPARES[0], SPARES[1], FlashOptions(mode=CopyMode.NOCOPY, freeze=True))
    await site.write(SPARES[0], 0, b"waited")  # returns when the LSS's own timer lets it go
    (hold,) = await site.hold_history()
    assert hold.by_timeout and hold.released_at - hold.since == pytest.approx(15.0)
    with pytest.raises(api.BadRequest, match="no volume in it"):
        await site.set_elb_timeout("99", 10)


async def test_fast_reverse_restore_leaves_the_former_target_unusable(site: api.Site, autojump_clock: object) -> None:
    src, tgt = RHEL3_DATA, INCR
    await site.write(src, 0, b"good" * 10)
    await site.establish(src, tgt, FlashOptions(mode=CopyMode.NOCOPY, record=True, persistent=True))
    await site.write(src, 0, b"BAD!" * 10)
    with pytest.raises(api.BackgroundCopyRunning):
        await site.reverse(src, tgt)
    rel = await site.reverse(src, tgt, fast=True)
    assert (rel.source, rel.target) == (tgt, src)
    assert await site.read(src, 0, 40) == b"good" * 10
    assert "fast reverse restore" in ((await site.get_volume(tgt)).unusable or "")
    report = await site.check([tgt])
    assert not report.consistent and "not a usable image" in report.problems[0]


async def test_elb_timeout_releases_by_itself(site: api.Site, autojump_clock: object) -> None:
    await site.establish(RHEL3_DATA, SPARES[0], FlashOptions(mode=CopyMode.NOCOPY, freeze=True))
    (frozen,) = await site.frozen_lsses()
    await site.write(RHEL3_DATA, 0, b"waited")  # returns at the ELB deadline
    assert await site.now() == pytest.approx(frozen.deadline)
    assert await site.frozen_lsses() == []
    assert await site.read(RHEL3_DATA, 0, 6) == b"waited"


async def test_unfreeze_through_the_lss_route(site: api.Site, autojump_clock: object) -> None:
    await site.establish(E1, E2, FlashOptions(mode=CopyMode.NOCOPY, freeze=True))
    await site.establish(RHEL3_DATA, SPARES[0], FlashOptions(mode=CopyMode.NOCOPY, freeze=True))
    assert [f.lss for f in await site.frozen_lsses()] == ["13", "14"]
    releases = await site.unfreeze(["13", "14", "15"])
    assert sorted(r.lss for r in releases) == ["13", "14"]


# --------------------------------------------------------------------------- saved tasks


async def test_saved_tasks(site: api.Site, autojump_clock: object) -> None:
    good = api.SavedTask("nightly", ((SPARES[0], SPARES[1]), (SPARES[2], SPARES[3])), FlashOptions(mode=CopyMode.NOCOPY, tag="t"))
    bad = api.SavedTask("broken", ((SPARES[4], SPARES[5]), (SPARES[6], SPARE_128)), FlashOptions())
    await site.save_task(good)
    await site.save_task(bad)
    assert {t.name: t for t in await site.list_tasks()} == {"nightly": good, "broken": bad}
    rels = await site.execute_task("nightly", tag="run-7")
    assert [(r.source, r.target, r.tag) for r in rels] == [(SPARES[0], SPARES[1], "run-7"), (SPARES[2], SPARES[3], "run-7")]
    with pytest.raises(api.SizeMismatch):
        await site.execute_task("broken")
    assert await site.query(volume=SPARES[4]) == [], "a task establishes all of its pairs or none"
    with pytest.raises(api.UnknownTask):
        await site.execute_task("nope")


# --------------------------------------------------------------------------- guests


async def test_quiesce_thaw_and_status(site: api.Site, autojump_clock: object) -> None:
    ticket = await site.quiesce(W2K_1, QuiesceLevel.APPLICATION, 30)
    assert ticket.vm == W2K_1 and ticket.level is QuiesceLevel.APPLICATION and ticket.freeze_id == 1
    assert ticket.deadline == pytest.approx(ticket.frozen_at + 30)
    status = await site.freeze_status(W2K_1)
    assert status.frozen and status.freeze_id == 1 and status.level is QuiesceLevel.APPLICATION
    with pytest.raises(api.GuestStateError, match="already frozen"):
        await site.quiesce(W2K_1, QuiesceLevel.FILESYSTEM, 30)
    thawed = await site.thaw(W2K_1)
    assert thawed.was_frozen and thawed.freeze_id == 1 and not thawed.lost
    again = await site.thaw(W2K_1)
    assert not again.was_frozen and again.message.startswith("not frozen")
    status = await site.freeze_status(W2K_1)
    assert not status.frozen and not status.lost and status.thawed_at is not None


async def test_guest_thaws_itself_at_its_timeout(site: api.Site, autojump_clock: object) -> None:
    ticket = await site.quiesce("rhel3-db1", QuiesceLevel.FILESYSTEM, 10)
    await trio.sleep(11)
    status = await site.freeze_status("rhel3-db1")
    assert not status.frozen and status.lost and status.thawed_at == ticket.deadline
    late = await site.thaw("rhel3-db1")
    assert not late.was_frozen and late.lost


async def test_guest_refusals_and_power(site: api.Site, autojump_clock: object) -> None:
    with pytest.raises(api.GuestStateError, match="does not support"):
        await site.quiesce("rhas21-db1", QuiesceLevel.APPLICATION, 10)
    with pytest.raises(api.UnknownVM):
        await site.quiesce("ghost", QuiesceLevel.NONE, 10)
    with pytest.raises(api.BadRequest):
        await site.quiesce(W2K_1, QuiesceLevel.NONE, 0)
    await site.power_off("sles8-db1")
    assert (await site.get_vm("sles8-db1")).power is api.PowerState.OFF
    with pytest.raises(api.GuestStateError, match="powered off"):
        await site.quiesce("sles8-db1", QuiesceLevel.FILESYSTEM, 10)
    with pytest.raises(api.GuestStateError):
        await site.reboot("sles8-db1")
    await site.power_on("sles8-db1")
    assert (await site.get_vm("sles8-db1")).power is api.PowerState.ON
    await site.reboot("sles8-db1")
    assert (await site.get_vm("sles8-db1")).power is api.PowerState.ON
    ticket = await site.quiesce("sles8-db1", QuiesceLevel.POWEROFF, 60)
    assert (await site.freeze_status("sles8-db1")).power is api.PowerState.OFF
    assert (await site.thaw("sles8-db1")).freeze_id == ticket.freeze_id
    assert (await site.get_vm("sles8-db1")).power is api.PowerState.ON


# --------------------------------------------------------------------------- checker


async def test_check_and_mount_check(site: api.Site, autojump_clock: object) -> None:
    report = await site.check([E1])
    assert report.consistent and report.kind == "filesystem", report.problems
    assert (await site.check([SPARES[0]])).kind == "empty"
    await site.establish(E1, E2, FlashOptions())
    mounted = await site.mount_check(W2K_2, ["E:"])
    assert mounted.consistent and mounted.kind == "filesystem", mounted.problems
    via_backup = await site.mount_check("backup-proxy", [E2])
    assert via_backup.consistent
    await site.write(E2, 0, b"garbage" * 100)
    broken = await site.check([E2])
    assert not broken.consistent and broken.problems
    with pytest.raises(api.UnknownVolume):
        await site.check(["99999999"])
    with pytest.raises(api.BadRequest):
        await site.check([])


# --------------------------------------------------------------------------- differential


async def test_local_and_served_answer_the_same_in_lockstep(tmp_path: Path, autojump_clock: object) -> None:
    """One script, a local and a served site side by side: every answer equal."""
    local = load_lab()
    async with open_site(tmp_path / "state", workloads=False) as durable, served(durable) as remote:
        script: list[Callable[[api.Site], Awaitable[Any]]] = [
            lambda s: s.now(),
            lambda s: s.list_hosts(),
            lambda s: s.list_vms(),
            lambda s: s.list_vms({"backup": "nightly"}),
            lambda s: s.get_vm("sles9-db1"),
            lambda s: s.lun_of(W2K_1, "M:"),
            lambda s: s.lun_of(W2K_1, "C:"),
            lambda s: s.list_disks("esx-x445"),
            lambda s: s.prime("esx-x445"),
            lambda s: s.list_volumes(),
            lambda s: s.list_pools(),
            lambda s: s.get_volume("nope"),
            lambda s: s.write(E1, 12345, b"lockstep" * 99),
            lambda s: s.establish(E1, E2, FlashOptions(freeze=True, tag="ls")),
            lambda s: s.frozen_lsses(),
            lambda s: s.quiesce(W2K_1, QuiesceLevel.FILESYSTEM, 20),
            lambda s: s.freeze_status(W2K_1),
            lambda s: s.establish(E1, E2, FlashOptions()),
            lambda s: s.unfreeze(["13"]),
            lambda s: s.thaw(W2K_1),
            lambda s: s.query(tag="ls"),
            lambda s: s.read(E2, 12345, 800),
            lambda s: s.extents(E2),
            lambda s: s.save_task(api.SavedTask("t", ((SPARES[0], SPARES[1]),), FlashOptions(mode=CopyMode.NOCOPY))),
            lambda s: s.list_tasks(),
            lambda s: s.execute_task("t", tag="x"),
            lambda s: s.execute_task("t"),
            lambda s: s.resync(SPARES[0], SPARES[1]),
            lambda s: s.withdraw(SPARES[0], SPARES[1]),
            lambda s: s.withdraw(SPARES[0], SPARES[1]),
            lambda s: s.quiesce("sles9-db1", QuiesceLevel.APPLICATION, 5),
            lambda s: s.power_off("sles9-db1"),
            lambda s: s.check([LOG1]),
            lambda s: s.mount_check(W2K_2, ["E:", "L:"]),
        ]
        for step, call in enumerate(script):
            answers: dict[str, Any] = {}

            async def ask(name: str, target: api.Site) -> None:
                try:
                    answers[name] = ("ok", await call(target))
                except api.SiteError as exc:
                    answers[name] = ("error", type(exc), exc.message)

            async with trio.open_nursery() as nursery:  # same site time for both
                nursery.start_soon(ask, "local", local)
                nursery.start_soon(ask, "served", remote)
            assert answers["served"] == answers["local"], f"step {step}"
            await trio.sleep(1.5)
