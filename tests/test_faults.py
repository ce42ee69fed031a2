"""Fault injection on any Site: errors (transient, permanent, after the fact), latency,
an LSS offline, a silent guest agent, a stuck background copy — seeded and reproducible.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import trio

from flowcopy.site import api
from flowcopy.site.api import CopyMode, FlashOptions, QuiesceLevel
from flowcopy.site.faults import (
    NO_FAULTS,
    FaultPlan,
    FaultySite,
    GuestOutage,
    Latency,
    LssOutage,
    StuckCopy,
    plan_from_data,
    plan_from_lab,
)
from flowcopy.site.inventory import load_lab

E1, E2 = "20313698", "20413698"  # LSS 13
SPARES = [f"3{n:02d}16698" for n in range(0, 24)]  # LSS 16
COPY_SECONDS_256M = 256 / 50


def faulty(plan: FaultPlan) -> FaultySite:
    return FaultySite(load_lab(), plan)


async def test_no_plan_is_transparent(autojump_clock: object) -> None:
    site = faulty(NO_FAULTS)
    assert isinstance(site, api.Site)
    rel = await site.establish(SPARES[0], SPARES[1], FlashOptions(tag="x"))
    assert await site.query(tag="x") == [rel]
    assert site.injected == {}


async def test_transient_error_before_the_operation_does_nothing(autojump_clock: object) -> None:
    site = faulty(FaultPlan(error_rates={"establish": 1.0}))
    with pytest.raises(api.InjectedFault) as caught:
        await site.establish(SPARES[0], SPARES[1], FlashOptions())
    assert caught.value.transient and caught.value.details == {"operation": "establish", "took_effect": False}
    assert "nothing done" in caught.value.message
    assert await site.query() == []
    assert site.injected == {"establish": 1}
    await site.write(SPARES[0], 0, b"other operations are untouched")


async def test_permanent_errors(autojump_clock: object) -> None:
    site = faulty(FaultPlan(error_rate=1.0, permanent_fraction=1.0))
    with pytest.raises(api.PermanentInjectedFault) as caught:
        await site.get_volume(E1)
    assert not caught.value.transient and caught.value.kind == "injected_fault_permanent"
    assert isinstance(await site.now(), float), "reading the clock is exempt from the blanket rate"


async def test_error_after_the_operation_took_effect(autojump_clock: object) -> None:
    site = faulty(FaultPlan(error_rates={"establish": 1.0}, after_fraction=1.0))
    with pytest.raises(api.InjectedFault, match="its reply was lost") as caught:
        await site.establish(SPARES[0], SPARES[1], FlashOptions(tag="lost-reply"))
    assert caught.value.details["took_effect"] is True
    (rel,) = await site.inner.query(tag="lost-reply")
    assert (rel.source, rel.target) == (SPARES[0], SPARES[1])


async def test_the_seed_makes_failures_reproducible(autojump_clock: object) -> None:
    async def pattern(seed: int) -> list[bool]:
        site = faulty(FaultPlan(seed=seed, error_rate=0.3))
        outcome = []
        for _ in range(60):
            try:
                await site.get_volume(E1)
                outcome.append(True)
            except api.InjectedFault:
                outcome.append(False)
        return outcome

    first = await pattern(11)
    assert first == await pattern(11)
    assert first != await pattern(12)
    assert 5 < first.count(False) < 35


async def test_per_operation_rates(autojump_clock: object) -> None:
    site = faulty(FaultPlan(error_rates={"thaw": 1.0, "now": 1.0}))
    await site.quiesce("rhel3-db1", QuiesceLevel.FILESYSTEM, 30)
    with pytest.raises(api.InjectedFault):
        await site.thaw("rhel3-db1")
    with pytest.raises(api.InjectedFault):
        await site.now()
    assert (await site.inner.freeze_status("rhel3-db1")).frozen


async def test_latency(autojump_clock: object) -> None:
    site = faulty(FaultPlan(latency=Latency(distribution="fixed", mean=2.5, operations=("get_volume",))))
    start = trio.current_time()
    await site.get_volume(E1)
    assert trio.current_time() - start == pytest.approx(2.5)
    start = trio.current_time()
    await site.list_volumes()
    assert trio.current_time() - start == pytest.approx(0)


def test_latency_distributions() -> None:
    rng = random.Random(1)
    uniform = [Latency(distribution="uniform", low=0.1, high=0.3).sample(rng) for _ in range(500)]
    assert all(0.1 <= x <= 0.3 for x in uniform)
    expo = [Latency(distribution="exponential", mean=0.2).sample(rng) for _ in range(4000)]
    assert sum(expo) / len(expo) == pytest.approx(0.2, rel=0.1)
    logn = [Latency(distribution="lognormal", mean=0.2, sigma=0.5, max=0.5).sample(rng) for _ in range(4000)]
    assert max(logn) <= 0.5 and sum(logn) / len(logn) == pytest.approx(0.2, rel=0.15)
    assert Latency().sample(rng) == 0.0


async def test_lss_offline_for_a_window(autojump_clock: object) -> None:
    now = trio.current_time()
    site = faulty(FaultPlan(offline_lsses=(LssOutage(lss="16", start=now + 10, end=now + 20),)))
    await site.establish(SPARES[0], SPARES[1], FlashOptions(mode=CopyMode.NOCOPY))
    await trio.sleep(10)
    assert not (await site.get_volume(SPARES[2])).online
    assert all(v.online == (v.lss != "16") for v in await site.list_volumes())
    for call in (
        lambda: site.establish(SPARES[2], SPARES[3], FlashOptions()),
        lambda: site.withdraw(SPARES[0], SPARES[1]),
        lambda: site.read(SPARES[0], 0, 10),
        lambda: site.write(SPARES[0], 0, b"x"),
        lambda: site.extents(SPARES[0]),
        lambda: site.check([SPARES[0]]),
        lambda: site.establish(E1, SPARES[3], FlashOptions()),
    ):
        with pytest.raises(api.VolumeOffline, match="LSS 16 is offline") as caught:
            await call()
        assert caught.value.transient
    await site.save_task(api.SavedTask("t", ((SPARES[4], SPARES[5]),), FlashOptions()))
    with pytest.raises(api.VolumeOffline):
        await site.execute_task("t")
    await site.write(E1, 0, b"other LSSs work")
    await trio.sleep(10)
    assert (await site.get_volume(SPARES[2])).online
    await site.withdraw(SPARES[0], SPARES[1])


async def test_silent_guest_agent(autojump_clock: object) -> None:
    now = trio.current_time()
    site = faulty(FaultPlan(silent_guests=(
        GuestOutage(vm="rhel3-db1", start=now, end=now + 100),
        GuestOutage(vm="sles9-db1", start=now, end=now + 100, hang=30),
    )))
    with pytest.raises(api.GuestNotResponding) as caught:
        await site.quiesce("rhel3-db1", QuiesceLevel.FILESYSTEM, 10)
    assert caught.value.transient and trio.current_time() == pytest.approx(now)
    start = trio.current_time()
    with pytest.raises(api.GuestNotResponding, match="within 30 s"):
        await site.thaw("sles9-db1")
    assert trio.current_time() - start == pytest.approx(30)
    assert (await site.get_vm("rhel3-db1")).name == "rhel3-db1", "the VM itself is there"
    await site.quiesce("sles8-db1", QuiesceLevel.FILESYSTEM, 10)
    await trio.sleep(100)
    ticket = await site.quiesce("rhel3-db1", QuiesceLevel.FILESYSTEM, 10)
    assert ticket.freeze_id == 1


async def test_stuck_background_copy(autojump_clock: object) -> None:
    site = faulty(NO_FAULTS)
    await site.establish(SPARES[0], SPARES[1], FlashOptions(tag="stuck"))
    await trio.sleep(1)
    now = await site.now()
    site.set_plan(FaultPlan(stuck_copies=(StuckCopy(volume=SPARES[1], start=now, end=now + 20),)))
    (held,) = await site.query(tag="stuck")
    assert 0 < held.out_of_sync_tracks < held.total_tracks
    await trio.sleep(COPY_SECONDS_256M)  # the real copy finished and dissolved meanwhile
    assert await site.inner.query(tag="stuck") == []
    assert await site.query(tag="stuck") == [held], "progress frozen, the relationship still copying"
    assert await site.query(volume=SPARES[0]) == [held]
    assert await site.query(volume=E1) == []
    await trio.sleep(20)
    assert await site.query(tag="stuck") == [], "the window closed: what the array really did shows"


def test_plan_validation() -> None:
    for plan, message in [
        (FaultPlan(error_rate=1.5), "error_rate must be between 0 and 1"),
        (FaultPlan(error_rates={"explode": 0.1}), "'explode' is not a site operation"),
        (FaultPlan(latency=Latency(distribution="gamma")), "latency.distribution must be one of"),
        (FaultPlan(offline_lsses=(LssOutage(lss="13", start=10, end=5),)), "offline_lsses[0]: end 5 is before start 10"),
        (FaultPlan(silent_guests=(GuestOutage(vm="x", hang=-1),)), "hang must be >= 0"),
    ]:
        with pytest.raises(api.BadRequest) as caught:
            plan.validate()
        assert message in caught.value.message


def test_plan_from_data_and_from_a_lab(tmp_path: Path) -> None:
    assert plan_from_data(None) == NO_FAULTS
    plan = plan_from_data({"seed": 3, "error_rates": {"establish": 0.5}, "offline_lsses": [{"lss": "13", "start": 5}]})
    assert plan.error_rates == {"establish": 0.5} and plan.offline_lsses == (LssOutage(lss="13", start=5.0),)
    with pytest.raises(api.BadRequest, match="faults: extra fields found"):
        plan_from_data({"eror_rate": 0.1})
    lab = tmp_path / "lab.yaml"
    lab.write_text("lab: x\nfaults:\n  error_rate: 0.25\n  latency: {distribution: fixed, mean: 0.01}\n")
    assert plan_from_lab(lab) == FaultPlan(error_rate=0.25, latency=Latency(distribution="fixed", mean=0.01))
    assert plan_from_lab(None) == NO_FAULTS
    shifted = FaultPlan(offline_lsses=(LssOutage(lss="13", start=1, end=2),)).shifted(100)
    assert shifted.offline_lsses == (LssOutage(lss="13", start=101, end=102),)
