"""The site contract for the array rules of issue 16 on every `Site`: in-process, durable,
and served over HTTP — space-efficient targets and pools, shared copy bandwidth, and the
LSS's refusal of copy-services commands beyond its limit (LssBusy) over HTTP too."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from flowcopy.site import api
from flowcopy.site.api import CopyMode, CopyState, FlashOptions
from flowcopy.site.client import SiteClient
from flowcopy.site.inventory import generate_lab_spec
from flowcopy.site.local import Latency
from flowcopy.site.persist import open_site
from flowcopy.site.server import build_app, serve_app
from tests.test_site_contract import TOKEN, site, served  # noqa: F401 - the three-way fixture

TS = api.TRACK_SIZE
MiB = 1 << 20
E1 = "20313698"  # 256 MiB, LSS 13
SPARES = [f"3{n:02d}16698" for n in range(0, 24)]  # 256 MiB, LSS 16
SE = ["37016698", "37116698"]  # space-efficient, pool se-repo (4 MiB = 64 tracks)
NOCOPY = FlashOptions(mode=CopyMode.NOCOPY, tag="se")


async def test_space_pools_listed(site: api.Site, autojump_clock: object) -> None:
    pools = await site.list_space_pools()
    assert pools == [api.SpacePool(name="se-repo", capacity=4 * MiB, used=0, volumes=tuple(SE))]
    assert (await site.get_volume(SE[0])).space_pool == "se-repo"


async def test_space_efficient_target_fails_when_its_pool_is_full(site: api.Site, autojump_clock: object) -> None:
    with pytest.raises(api.SpaceEfficientRefused) as caught:
        await site.establish(E1, SE[0], FlashOptions())
    assert f"target {SE[0]} is space-efficient (pool se-repo): no background copy" in caught.value.message
    rel = await site.establish(E1, SE[0], NOCOPY)
    assert rel.space_efficient and rel.failed is None
    await site.write(E1, 0, b"\x01" * (64 * TS))  # 64 copy-on-writes fill the pool exactly
    assert (await site.list_space_pools())[0].used == 4 * MiB
    (rel,) = await site.query(tag="se")
    assert rel.state is CopyState.COPYING
    await site.write(E1, 64 * TS, b"\x02")  # one more: the pool is full, the relationship fails
    assert await site.read(E1, 64 * TS, 1) == b"\x02"  # the source write went through
    (rel,) = await site.query(tag="se")
    assert rel.state is CopyState.FAILED
    assert rel.failed is not None and "space-efficient pool se-repo full" in rel.failed
    assert (await site.get_volume(SE[0])).unusable == rel.failed
    report = await site.check([SE[0]])
    assert not report.consistent and any("the image is unusable" in p for p in report.problems)
    with pytest.raises(api.RelationshipFailed):
        await site.write(SE[0], 0, b"x")
    await site.withdraw(E1, SE[0], release_space=True)
    assert (await site.list_space_pools())[0].used == 0
    assert await site.query(tag="se") == []


async def test_background_copies_share_the_array_bandwidth(site: api.Site, autojump_clock: object) -> None:
    one = 256 / 50  # 256 MiB at the default lab's 50 MiB/s
    start = await site.now()
    for target in SPARES[:3]:
        await site.establish(E1, target, FlashOptions(persistent=True, tag="share"))
    await trio.sleep(one)  # three copies share: each is a third done
    rels = await site.query(tag="share")
    assert {r.out_of_sync_tracks for r in rels} == {256 * MiB // TS - 256 * MiB // TS // 3}
    await trio.sleep(2 * one + 0.01)
    assert {r.state for r in await site.query(tag="share")} == {CopyState.COPIED}
    assert await site.now() - start == pytest.approx(3 * one + 0.01, abs=1e-3)


@pytest.fixture(params=["local", "served"])
async def busy_site(request: pytest.FixtureRequest, tmp_path: Path, autojump_clock: object) -> AsyncIterator[Any]:
    """A lab whose LSS takes two concurrent copy-services commands, each taking 1 s."""
    spec = generate_lab_spec(4, 1)
    spec["arrays"][0]["lss_command_limit"] = 2
    async with open_site(tmp_path / "state", lab=spec, workloads=False, latency=Latency(copy_services=1.0)) as durable:
        if request.param == "local":
            yield durable
            return
        app = build_app(durable, token=TOKEN, faults=getattr(durable, "faults", None))
        async with trio.open_nursery() as nursery:
            url = await nursery.start(lambda task_status: serve_app(app, port=0, task_status=task_status))
            async with SiteClient(url, TOKEN) as client:
                yield client
            nursery.cancel_scope.cancel()


async def test_lss_busy_reaches_the_caller_as_lss_busy(busy_site: Any, autojump_clock: object) -> None:
    site = busy_site
    (lss,) = {v.lss for v in await site.list_volumes()}
    targets = (await site.list_pools())["targets"]
    sources = [(await site.get_vm(f"vm{i:05d}")).disks[0].serial for i in range(3)]
    outcomes: dict[int, object] = {}

    async def establish(i: int) -> None:
        try:
            outcomes[i] = await site.establish(sources[i], targets[2 * i], FlashOptions(mode=CopyMode.NOCOPY))
        except api.LssBusy as exc:
            outcomes[i] = exc

    async with trio.open_nursery() as nursery:
        for i in range(3):
            nursery.start_soon(establish, i)
            await trio.sleep(0.1)
    busy = outcomes[2]
    assert isinstance(busy, api.LssBusy) and busy.transient and busy.kind == "lss_busy"
    assert busy.message == f"LSS {lss} is busy: 2 copy-services commands in flight (its limit); retry"
    assert str(busy) == busy.message  # the caller sees the LSS and the count, local or served
    assert all(isinstance(outcomes[i], api.RelationshipInfo) for i in (0, 1))
    assert await site.query(volume=sources[2]) == []  # the refused one did nothing
    started = trio.current_time()
    await site.establish(sources[2], targets[4], FlashOptions(mode=CopyMode.NOCOPY))  # room again
    assert trio.current_time() - started == pytest.approx(1.0)  # each command takes its latency
