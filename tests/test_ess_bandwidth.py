"""The array's background-copy bandwidth is shared by the copies running at each moment.

Processor sharing, computed lazily: twelve copies started together take twelve times as
long as one, a copy that finishes hands its share to the others, and an array rebuilt from
its persisted state (or by replaying its calls) answers the same for every later instant.
"""

from __future__ import annotations

import copy
import math

import pytest

from flowcopy.site.api import TRACK_SIZE, CopyMode, CopyState, FlashOptions
from flowcopy.site.ess import Array

TS = TRACK_SIZE
MiB = 1 << 20
BANDWIDTH = 50 * MiB  # bytes/s, the default lab's copy_rate
TRACKS = 4096  # 256 MiB volumes
SOURCES = [f"{100 + i:03d}10698" for i in range(12)]
TARGETS = [f"{200 + i:03d}10698" for i in range(12)]


def fleet(tracks: int = TRACKS) -> Array:
    array = Array(bandwidth=BANDWIDTH)
    for serial in SOURCES + TARGETS:
        array.add_volume(serial, lss="10", capacity=tracks * TS)
    return array


def done_times(array: Array, pairs: list[tuple[str, str]], now: float) -> list[float | None]:
    return [array.copy_done_at(s, t, now=now) for s, t in pairs]


def test_one_copy_takes_its_size_over_the_bandwidth() -> None:
    array = fleet()
    array.establish(SOURCES[0], TARGETS[0], FlashOptions(persistent=True), now=0)
    one = array.copy_done_at(SOURCES[0], TARGETS[0], now=0)
    assert one == pytest.approx(TRACKS * TS / BANDWIDTH, abs=1e-9)  # 256 MiB at 50 MiB/s = 5.12 s


def test_twelve_concurrent_copies_take_twelve_times_one() -> None:
    array = fleet()
    pairs = list(zip(SOURCES, TARGETS))
    for s, t in pairs:
        array.establish(s, t, FlashOptions(persistent=True), now=0)
    alone = TRACKS * TS / BANDWIDTH
    expected = 12 * alone  # 61.44 s of site time
    done = done_times(array, pairs, 0)
    assert done == [pytest.approx(expected, abs=1e-9)] * 12
    half = array.query(now=expected / 2 + 1e-9)  # 30.72 is not exact in binary
    assert {r.out_of_sync_tracks for r in half} == {TRACKS // 2}  # all progress at the same 1/12 share
    assert all(r.state is CopyState.COPYING for r in array.query(now=expected - 0.01))
    assert all(r.state is CopyState.COPIED and r.out_of_sync_tracks == 0 for r in array.query(now=done[0]))


def test_a_finished_copy_frees_its_share_for_the_others() -> None:
    n = 256
    array = fleet(tracks=n)
    array.establish(SOURCES[0], TARGETS[0], FlashOptions(persistent=True), now=0)
    array.establish(SOURCES[1], TARGETS[1], FlashOptions(persistent=True), now=0)
    # a third copy has half of its tracks copied early by copy-on-write: it needs half the time
    array.establish(SOURCES[2], TARGETS[2], FlashOptions(persistent=True), now=0)
    array.write(SOURCES[2], 0, bytes([7]) * (n // 2 * TS), now=0)
    alone = n * TS / BANDWIDTH
    # three share: the short one finishes when each copy walked n/2, at 3 * alone/2
    first = 3 * alone / 2
    assert array.copy_done_at(SOURCES[2], TARGETS[2], now=0) == pytest.approx(first, abs=1e-9)
    # then two share the rest (n/2 each): 2 * alone/2 more
    assert array.copy_done_at(SOURCES[0], TARGETS[0], now=0) == pytest.approx(first + alone, abs=1e-9)
    # withdrawing one of the two at `first` leaves the last one the whole bandwidth
    array.withdraw(SOURCES[1], TARGETS[1], now=first)
    last = array.copy_done_at(SOURCES[0], TARGETS[0], now=first)
    assert last == pytest.approx(first + alone / 2, abs=1e-9)  # the clock rounds down by ticks of 2**-32 track
    assert array.query(volume=SOURCES[0], now=math.nextafter(last, 0))[0].state is CopyState.COPYING
    rel = array.query(volume=SOURCES[0], now=last)[0]
    assert rel.state is CopyState.COPIED
    assert array.read(TARGETS[0], 0, 2 * TS, now=last) == bytes(2 * TS)


def test_nocopy_relationships_take_no_share() -> None:
    array = fleet()
    array.establish(SOURCES[0], TARGETS[0], FlashOptions(mode=CopyMode.NOCOPY), now=0)
    array.establish(SOURCES[1], TARGETS[1], FlashOptions(persistent=True), now=0)
    assert array.copy_done_at(SOURCES[1], TARGETS[1], now=0) == pytest.approx(TRACKS * TS / BANDWIDTH, abs=1e-9)
    # rmflash -cp turns the nocopy one into a copy: from then on they share
    array.withdraw(SOURCES[0], TARGETS[0], now=1.0, after_copy=True)
    walked = 1.0 * BANDWIDTH / TS
    left = TRACKS - walked
    assert array.copy_done_at(SOURCES[1], TARGETS[1], now=1.0) == pytest.approx(1.0 + 2 * left * TS / BANDWIDTH, abs=1e-9)


def test_resumed_from_persisted_state_gives_the_same_answers() -> None:
    live = fleet(tracks=256)
    pairs = list(zip(SOURCES, TARGETS))
    calls = []
    for i, (s, t) in enumerate(pairs[:8]):
        calls.append(("establish", {"source": s, "target": t, "options": {"persistent": True}, "now": 0.01 * i}))
    calls.append(("write", {"serial": SOURCES[3], "offset": 0, "data": b"z" * (40 * TS), "now": 0.2}))
    calls.append(("withdraw", {"source": SOURCES[5], "target": TARGETS[5], "now": 0.25}))
    calls.append(("establish", {"source": SOURCES[8], "target": TARGETS[8], "options": {}, "now": 0.3}))
    for name, kwargs in calls:
        getattr(live, name)(**kwargs)
    live.query(now=0.35)  # catching up with time is not a change
    saved = copy.deepcopy(live.to_state())
    resumed = Array.from_state(saved)
    assert resumed.to_state() == saved
    replayed = fleet(tracks=256)
    for name, kwargs in calls:
        getattr(replayed, name)(**kwargs)
    live_pairs = pairs[:5] + pairs[6:9]
    for t in (0.36, 0.5, 0.75, 1.0, 1.5, 3.0):
        answers = [(a.query(now=t), done_times(a, live_pairs, t)) for a in (live, resumed, replayed)]
        assert answers[0] == answers[1] == answers[2], t
    assert {r.state for r in live.query(now=3.0)} == {CopyState.COPIED}


def test_version_2_state_loads_with_the_copy_carried_on() -> None:
    array = fleet(tracks=64)
    array.establish(SOURCES[0], TARGETS[0], FlashOptions(persistent=True), now=0)
    state = array.to_state()
    old = copy.deepcopy(state)
    old["version"] = 2
    del old["copy_clock"], old["running"]
    for r in old["relationships"]:
        r["bg_start"] = 0.0
        del r["v_start"], r["failed"]
    loaded = Array.from_state(old)
    assert loaded.copy_done_at(SOURCES[0], TARGETS[0], now=0) == array.copy_done_at(SOURCES[0], TARGETS[0], now=0)


def test_version_3_state_with_an_exact_fraction_clock_loads_and_carries_on() -> None:
    """A state saved when the copy clock was exact Fractions (here re-based at a completion
    time of denominator 3 * 10**k): each running copy carries on from the tracks it had
    walked, and completes when the old clock said (to a tick of 2**-32 track)."""
    array = Array(bandwidth=BANDWIDTH)
    for i in range(3):
        array.add_volume(f"10{i}10698", lss="10", capacity=64 * TS)
        array.add_volume(f"20{i}10698", lss="10", capacity=64 * TS)
    for i in range(3):
        array.establish(f"10{i}10698", f"20{i}10698", FlashOptions(persistent=True), now=0.01 * i)
    array.write("10210698", 0, b"x" * (5 * TS), now=0.025)
    state = copy.deepcopy(array.to_state())
    state["version"] = 3
    # as the previous version saved it at now=0.22 (DS8000 model, flowcopy 0.x): copy 0 done at 0.215
    state["now"] = 0.22
    state["copy_clock"] = ["64", "6196953087261802481/28823037615171174400"]
    state["running"] = [["10110698", "20110698"], ["10210698", "20210698"]]
    walked = {"10010698": (64, 64, "0", 0.21500000000000002),
              "10110698": (58, 58, "144115188075855875/18014398509481984", None),
              "10210698": (54, 58, "432345564227567625/36028797018963968", None)}
    for r in state["relationships"]:
        r["bg_done"], r["cursor"], r["v_start"], r["copied_at"] = walked[r["source"]]
        r["above"] = []
    loaded = Array.from_state(state)
    # the old model's answers from this state: 6 tracks left each at 0.22, 2 at 0.23, done at 0.235
    assert [r.out_of_sync_tracks for r in loaded.query(now=0.22)] == [0, 6, 6]
    done = [loaded.copy_done_at(f"10{i}10698", f"20{i}10698", now=0.22) for i in range(3)]
    assert done[0] == 0.21500000000000002
    assert done[1:] == [pytest.approx(0.235, abs=1e-9)] * 2
    saved = loaded.to_state()
    assert saved["version"] == 4 and Array.from_state(copy.deepcopy(saved)).to_state() == saved
    assert [r.out_of_sync_tracks for r in loaded.query(now=0.23)] == [0, 2, 2]
    assert {r.state for r in loaded.query(now=done[1])} == {CopyState.COPIED}


def test_copy_clock_rounding_rules() -> None:
    """V rounds down at each change only; a completion is the first float at which V reaches the mark."""
    from flowcopy.site.copyclock import TICKS_PER_TRACK, CopyClock

    clock = CopyClock(float(TS), k=3)  # one track per second, shared by three
    assert clock.value(1.0) == TICKS_PER_TRACK // 3  # floor(2**32 / 3)
    assert [clock.value(t) for t in (0.5, 1.0, 2.0)] == [TICKS_PER_TRACK // 6, TICKS_PER_TRACK // 3, 2 * TICKS_PER_TRACK // 3]
    split = clock.copy()
    split.change(1.0, 3)  # re-based with k unchanged: each re-base keeps its rounding
    split.change(2.0, 3)
    assert split.value(3.0) == 3 * (TICKS_PER_TRACK // 3) == clock.value(3.0) - 1 == TICKS_PER_TRACK - 1
    mark = TICKS_PER_TRACK  # one track: exactly 3 s of site time
    at = clock.reaches(mark)
    assert at == 3.0 and clock.value(at) == mark and clock.value(math.nextafter(at, 0)) < mark
    odd = CopyClock(50.0 * MiB, k=7)
    for mark in (1, 12345, 10**6 * TICKS_PER_TRACK + 17):
        at = odd.reaches(mark)
        assert odd.value(at) >= mark > odd.value(math.nextafter(at, 0))
    assert CopyClock(float(TS)).reaches(mark) == math.inf  # nothing runs: never
