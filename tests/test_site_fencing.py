"""Fencing tokens enforced by the site itself, on every `Site` flavour (local, durable, served).

A call made through `api.fenced(site, key, epoch)` carries (key, epoch); the site keeps
the highest epoch seen per key and refuses a lower one with `StaleFence` (HTTP 409 over
the wire), before the call touches anything. A higher epoch is admitted only after the
lower epoch's calls already admitted have finished.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import trio

from flowcopy.site import api
from flowcopy.site.api import FlashOptions, QuiesceLevel
from flowcopy.site.inventory import load_lab
from flowcopy.site.persist import open_site
from tests.test_site_contract import E1, SPARES, TOKEN, W2K_1, served, site  # noqa: F401 - the fixture

UNIT = "run-1/rich-w2k-os-1"


async def test_a_lower_epoch_is_refused_and_a_higher_one_accepted(site: api.Site, autojump_clock: object) -> None:
    old, new = api.fenced(site, UNIT, 1), api.fenced(site, UNIT, 2)
    rel = await old.establish(E1, SPARES[0], FlashOptions())
    assert rel.id == f"{E1}:{SPARES[0]}"
    assert (await old.quiesce(W2K_1, QuiesceLevel.FILESYSTEM, 60)).vm == W2K_1  # same epoch: admitted again

    # the new holder reaches the site (a read is enough): from now on epoch 1 is stale
    assert [r.id for r in await new.query(volume=E1)] == [rel.id]
    for call, args in [("withdraw", (E1, SPARES[0])), ("establish", (E1, SPARES[1], FlashOptions())),
                       ("thaw", (W2K_1,)), ("unfreeze", (["13"],)), ("power_off", (W2K_1,)),
                       ("query", ())]:
        with pytest.raises(api.StaleFence) as caught:
            await getattr(old, call)(*args)
        assert caught.value.kind == "stale_fence" and not caught.value.transient
        assert caught.value.message == (
            f"site call {call} for {UNIT} refused: it carries lease epoch 1, but epoch 2 of it has reached "
            "the site (another holder took it over); stop acting on it")
        assert caught.value.details["seen"] == 2
    # nothing of the refused calls happened
    assert [r.id for r in await site.query(volume=E1)] == [rel.id]
    assert await site.query(volume=SPARES[1]) == []
    status = await site.freeze_status(W2K_1)
    assert status.frozen and status.power is api.PowerState.ON

    # the new holder acts; a third one fences it out in turn; other keys are untouched
    assert (await new.thaw(W2K_1)).was_frozen
    await new.withdraw(E1, SPARES[0])
    await api.fenced(site, UNIT, 7).query()
    with pytest.raises(api.StaleFence, match="epoch 2, but epoch 7"):
        await new.establish(E1, SPARES[0], FlashOptions())
    assert await site.query(volume=E1) == []
    other = api.fenced(site, "run-1/another-vm", 1)
    assert (await other.establish(E1, SPARES[2], FlashOptions())).target == SPARES[2]
    await site.withdraw(E1, SPARES[2])  # calls without a fence are not fenced at all


async def test_a_new_epoch_waits_for_the_old_epochs_call_in_flight(autojump_clock: object) -> None:
    site = load_lab()
    seen: list[bool] = []

    async def new_holder_looks() -> None:
        await trio.sleep(0.01)  # while the old holder's quiesce (0.05 s of latency) is in the site
        seen.append((await api.fenced(site, UNIT, 2).freeze_status(W2K_1)).frozen)

    async with site.running(workloads=False), trio.open_nursery() as nursery:
        nursery.start_soon(new_holder_looks)
        await api.fenced(site, UNIT, 1).quiesce(W2K_1, QuiesceLevel.FILESYSTEM, 60)
    # the new holder's first look came after the old call ended: it saw the freeze
    assert seen == [True]
    with pytest.raises(api.StaleFence):
        await api.fenced(site, UNIT, 1).thaw(W2K_1)
    assert site.fences.refused == 1 and site.fences.high(UNIT) == 2


async def test_the_durable_site_keeps_its_marks_across_a_restart(tmp_path: Path, autojump_clock: object) -> None:
    async with open_site(tmp_path / "state", workloads=False) as durable:
        await api.fenced(durable, UNIT, 3).establish(E1, SPARES[0], FlashOptions())
    async with open_site(tmp_path / "state", workloads=False) as durable:  # replayed from the log
        with pytest.raises(api.StaleFence, match="epoch 2, but epoch 3"):
            await api.fenced(durable, UNIT, 2).withdraw(E1, SPARES[0])
        await durable.compact()
    async with open_site(tmp_path / "state", workloads=False) as durable:  # from the snapshot
        with pytest.raises(api.StaleFence, match="epoch 2, but epoch 3"):
            await api.fenced(durable, UNIT, 2).withdraw(E1, SPARES[0])
        await api.fenced(durable, UNIT, 3).withdraw(E1, SPARES[0])
        assert await durable.query(volume=E1) == []


async def test_the_served_site_reads_the_fence_header(tmp_path: Path, autojump_clock: object) -> None:
    async with open_site(tmp_path / "state", workloads=False) as durable, served(durable) as client:
        await api.fenced(client, UNIT, 5).establish(E1, SPARES[0], FlashOptions())
        async with httpx.AsyncClient(base_url=client.url + "/api/v1",
                                     headers={"Authorization": f"Bearer {TOKEN}"}) as raw:
            pair = f"{E1}:{SPARES[0]}"
            answer = await raw.delete(f"/flashcopies/{pair}", headers={"Flowcopy-Fence": f"4 {UNIT.replace('/', '%2F')}"})
            assert answer.status_code == 409 and answer.json()["kind"] == "stale_fence"
            answer = await raw.delete(f"/flashcopies/{pair}", headers={"Flowcopy-Fence": "four"})
            assert answer.status_code == 400 and "Flowcopy-Fence must be '<epoch> <key>'" in answer.json()["message"]
        assert await client.fence_report() == {"keys": 1, "admitted": 1, "refused": 1}
        assert [r.id for r in await client.query(volume=E1)] == [pair]


async def test_a_call_may_carry_several_fences_and_each_is_enforced(site: api.Site, autojump_clock: object) -> None:
    """A view of a view carries both fences (a unit's and its LSS's): refused if either is stale."""
    both = api.fenced(api.fenced(site, UNIT, 2), "lss:13", 4)
    await both.establish(E1, SPARES[0], FlashOptions())
    with pytest.raises(api.StaleFence, match="site call withdraw for lss:13 refused: it carries lease epoch 3, but epoch 4"):
        await api.fenced(api.fenced(site, UNIT, 2), "lss:13", 3).withdraw(E1, SPARES[0])
    with pytest.raises(api.StaleFence, match=f"for {UNIT} refused: it carries lease epoch 1, but epoch 2"):
        await api.fenced(site, UNIT, 1).withdraw(E1, SPARES[0])
    assert [r.id for r in await site.query(volume=E1)] == [f"{E1}:{SPARES[0]}"]
    await api.fenced(site, "lss:13", 4).withdraw(E1, SPARES[0])  # the LSS fence alone: admitted
    assert await site.query(volume=E1) == []


async def test_a_holder_waiting_behind_an_old_call_is_refused_if_a_newer_one_came(autojump_clock: object) -> None:
    site = load_lab()
    outcomes: dict[int, str] = {}

    async def look(epoch: int, delay: float) -> None:
        await trio.sleep(delay)  # both arrive while epoch 1's quiesce is still in the site
        try:
            await api.fenced(site, UNIT, epoch).freeze_status(W2K_1)
            outcomes[epoch] = "admitted"
        except api.StaleFence as exc:
            outcomes[epoch] = exc.message

    async with site.running(workloads=False), trio.open_nursery() as nursery:
        nursery.start_soon(look, 2, 0.01)
        nursery.start_soon(look, 3, 0.02)
        await api.fenced(site, UNIT, 1).quiesce(W2K_1, QuiesceLevel.FILESYSTEM, 60)
    assert outcomes == {3: "admitted", 2: f"site call freeze_status for {UNIT} refused: it carries lease epoch 2, "
                        "but epoch 3 of it has reached the site (another holder took it over); stop acting on it"}
    assert site.fences.refused == 1 and not site.fences._inflight


async def test_a_new_holder_does_not_wait_for_an_old_holders_read(autojump_clock: object) -> None:
    """Only calls that change something hold a newer epoch back; an old holder still
    waiting for a copy to finish does not (a copy can take hours)."""
    site = load_lab()
    async with site.running(workloads=False), trio.open_nursery() as nursery:
        await site.establish(E1, SPARES[0], FlashOptions())
        nursery.start_soon(api.fenced(site, UNIT, 1).wait_copied, E1, SPARES[0])
        await trio.sleep(0.1)
        t0 = trio.current_time()
        await api.fenced(site, UNIT, 2).withdraw(E1, SPARES[0])  # at once, the copy unfinished
        assert trio.current_time() == t0
    assert await site.query(volume=E1) == []
