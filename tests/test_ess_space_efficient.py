"""Space-efficient targets: pool space per track, no background copy, a full pool fails its
relationships (the image is unusable, the source flows on), -tgtreleasespace gives it back."""

from __future__ import annotations

import copy

import pytest

from flowcopy.site.api import (
    TRACK_SIZE,
    CopyMode,
    CopyState,
    FlashOptions,
    PoolFull,
    RelationshipFailed,
    SpaceEfficientRefused,
)
from flowcopy.site.ess import Array

TS = TRACK_SIZE
S, S2, T, T2, STD = "20313698", "20513698", "20413698", "20613698", "20713698"
NOCOPY = FlashOptions(mode=CopyMode.NOCOPY)


def make(pool_tracks: int = 3, tracks: int = 8) -> Array:
    array = Array(bandwidth=float(TS))
    array.add_space_pool("se1", pool_tracks * TS)
    for serial in (S, S2, STD):
        array.add_volume(serial, lss="13", capacity=tracks * TS)
    for serial in (T, T2):
        array.add_volume(serial, lss="13", capacity=tracks * TS, space_pool="se1")
    return array


def used(array: Array) -> int:
    return array.list_space_pools()[0].used // TS


def test_pool_and_volumes_are_listed() -> None:
    array = make()
    (pool,) = array.list_space_pools()
    assert (pool.name, pool.capacity, pool.used, pool.volumes) == ("se1", 3 * TS, 0, (T, T2))
    assert array.volume(T).space_pool == "se1" and array.volume(S).space_pool is None


def test_background_copy_onto_a_space_efficient_target_is_refused() -> None:
    array = make()
    with pytest.raises(SpaceEfficientRefused, match=f"target {T} is space-efficient .pool se1.: no background copy"):
        array.establish(S, T, FlashOptions(), now=0)
    with pytest.raises(SpaceEfficientRefused, match="can only be a FlashCopy target"):
        array.establish(T, STD, NOCOPY, now=0)
    array.establish(S, T, FlashOptions(mode=CopyMode.NOCOPY, record=True), now=0)
    with pytest.raises(SpaceEfficientRefused, match="no background copy onto it; resync with mode nocopy"):
        array.resync(S, T, now=1, options=FlashOptions(record=True))
    array.write(S, 0, b"a", now=1)
    with pytest.raises(SpaceEfficientRefused, match="after a background copy .-cp."):
        array.withdraw(S, T, now=2, after_copy=True)
    assert [r.space_efficient for r in array.query(now=2)] == [True]


def test_copy_on_write_and_target_writes_take_space_once_per_track() -> None:
    array = make(pool_tracks=4)
    array.establish(S, T, NOCOPY, now=0)
    assert used(array) == 0  # establish takes nothing
    array.write(S, 0, b"x" * 10, now=1)  # track 0 copied before the write
    array.write(S, 5, b"y", now=2)  # same track: no more space
    array.write(T, TS, b"t" * (TS + 1), now=3)  # tracks 1 and 2 become the target's own
    assert used(array) == 3
    assert array.read(T, 0, 1, now=3) == b"\0"  # the point-in-time image (zeros before the write)


def test_a_full_pool_fails_its_relationships_and_the_source_flows_on() -> None:
    array = make(pool_tracks=2)
    array.write(S, 0, b"old" * 100, now=0)
    array.establish(S, T, NOCOPY, now=1)
    array.establish(S2, T2, NOCOPY, now=1)
    array.write(S, 0, b"A", now=2)
    array.write(S, TS, b"B", now=3)  # the pool is now full
    array.write(S, 2 * TS, b"C", now=4)  # needs a third track: the pool cannot give it
    assert array.read(S, 2 * TS, 1, now=4) == b"C"  # the source write was not blocked
    rels = {r.target: r for r in array.query(now=5)}
    for target, source in ((T, S), (T2, S2)):  # every relationship of the pool fails (IEA499E)
        rel = rels[target]
        assert rel.state is CopyState.FAILED
        assert rel.failed == (
            f"space-efficient pool se1 full (2 tracks of {TS} bytes used): relationship {source} -> {target} "
            f"failed at site time 4.000; the image is unusable; enlarge the pool or use a standard target"
        )
        assert array.volume(target).unusable == rel.failed
    with pytest.raises(RelationshipFailed, match=f"cannot write {T}: it is the target of a failed relationship"):
        array.write(T, 0, b"z", now=5)
    with pytest.raises(RelationshipFailed, match="failed at site time 4.000"):
        array.reverse(S, T, now=5, fast=True)
    array.write(S, 3 * TS, b"D", now=6)  # still flows
    # -tgtreleasespace gives the target's tracks back; the released target reads zeros
    array.withdraw(S, T, now=7, release_space=True)
    assert used(array) == 0
    assert array.read(T, 0, 4 * TS, now=7) == bytes(4 * TS)
    array.withdraw(S2, T2, now=7)  # without the option the (empty) target keeps what it has
    array.establish(S, T, NOCOPY, now=8)  # the pool has room again; a new image is usable
    assert array.volume(T).unusable is None
    array.write(S, 0, b"E", now=9)
    assert array.read(T, 0, 1, now=9) == b"A" and used(array) == 1


def test_a_host_write_to_a_full_pool_is_refused_and_changes_nothing() -> None:
    array = make(pool_tracks=1)
    array.write(T, 0, b"one", now=0)  # a space-efficient volume outside any relationship
    array.query(now=1)  # catching up with time is not a change
    before = array.to_state()
    with pytest.raises(PoolFull, match=f"cannot write {T}: its space-efficient pool se1 is full .1 of 1 tracks used, 1 more needed."):
        array.write(T, TS, b"two", now=1)
    assert array.to_state() == before
    array.write(T, 5, b"same track", now=1)  # an allocated track takes no more space


def test_state_round_trip_keeps_pools_space_and_failures() -> None:
    array = make(pool_tracks=1)
    array.establish(S, T, NOCOPY, now=0)
    array.write(S, 0, b"a", now=1)
    array.write(S, TS, b"b", now=2)  # fails
    state = copy.deepcopy(array.to_state())
    loaded = Array.from_state(state)
    assert loaded.to_state() == state
    assert loaded.list_space_pools() == array.list_space_pools()
    assert loaded.query(now=3) == array.query(now=3)
    assert loaded.query(now=3)[0].state is CopyState.FAILED


def _lab(**array: object) -> dict:
    base = {"name": "ess", "box": "698", "volumes": [{"serial": "10013698", "capacity": "1MiB"}]}
    base.update(array)
    return {"lab": "t", "arrays": [base], "hosts": [{"name": "esx1", "kind": "esx"}]}


def test_lab_space_pools_and_command_limit() -> None:
    from flowcopy.site.inventory import LabError, build_site

    site = build_site(_lab(space_pools={"r": "256KiB"}, lss_command_limit=3,
                           volumes=[{"serial": "10013698", "capacity": "1MiB", "space_pool": "r"}]))
    assert site.array.list_space_pools()[0].capacity == 256 * 1024
    assert site.lss_command_limit == 3
    with pytest.raises(LabError, match=r"arrays\[0\].space_pools.r: .*capacity must be a positive multiple of 65536"):
        build_site(_lab(space_pools={"r": 1000}))
    with pytest.raises(LabError, match=r"arrays\[0\].volumes\[0\]: volume 10013698: no space-efficient pool 'nope'"):
        build_site(_lab(volumes=[{"serial": "10013698", "capacity": "1MiB", "space_pool": "nope"}]))
    with pytest.raises(LabError, match="lss_command_limit: expected a positive whole number"):
        build_site(_lab(lss_command_limit=0))
