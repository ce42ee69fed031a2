"""The ESS array model: refusals, multiple targets, tasks, extents, freezes, time and memory.

The byte-for-byte comparison against a naive reference lives in test_ess_stateful.py;
these are the named cases and the scale/time acceptance tests of the array.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import tracemalloc
from typing import Any

import attrs
import pytest
import trio

from flowcopy.site.api import (
    MAX_TARGETS_PER_SOURCE,
    TRACK_SIZE,
    BackgroundCopyRunning,
    BadRequest,
    CascadeRefused,
    CopyMode,
    CopyState,
    Extent,
    FlashOptions,
    HostDisk,
    NotIncremental,
    OutOfRange,
    RelationshipExists,
    RelationshipNotFound,
    SavedTask,
    SecondIncremental,
    SizeMismatch,
    TargetInRelationship,
    TooManyTargets,
    UnknownDisk,
    UnknownHost,
    UnknownTask,
    UnknownVolume,
    VolumeOffline,
    WriteInhibited,
)
from flowcopy.site import ess
from flowcopy.site.ess import Array, ArrayService, LssHeld, plain_options

TS = TRACK_SIZE
TIB = 1 << 40
S, T, U, V = "20313698", "20413698", "20513698", "20613698"  # LSS 13 of box 698
OTHER_LSS = "20714698"  # LSS 14
NOCOPY = FlashOptions(mode=CopyMode.NOCOPY)
INCREMENTAL = FlashOptions(record=True, persistent=True)


def make(tracks: int = 4, *, bandwidth: float = float(TS), serials: tuple[str, ...] = (S, T, U, V)) -> Array:
    """Small volumes; one track per second of background copy unless told otherwise."""
    array = Array(bandwidth=bandwidth)
    for serial in serials:
        array.add_volume(serial, lss=serial[3:5], capacity=tracks * TS)
    return array


_CYCLE = bytes(range(1, 252))  # 251 non-zero bytes; a prime period shows misplaced offsets


def pattern(n: int, seed: int) -> bytes:
    """Recognisable non-zero bytes: any shift or overlap of two patterns differs somewhere."""
    start = (seed * 37) % 251
    return (_CYCLE[start:] + _CYCLE * (n // 251 + 1))[:n]


def refused(array: Array, error: type[Exception], message: str, call: Any, now: float = 0.0) -> None:
    """The call raises `error` with exactly `message`, and leaves the array exactly as it was."""
    array.query(now=now)
    array.frozen_lsses(now=now)
    before = array.to_state()
    with pytest.raises(error) as info:
        call()
    assert str(info.value) == message
    assert array.to_state() == before


# ---------------------------------------------------------------------------- volumes


def test_sparse_reads_and_writes_across_track_boundaries() -> None:
    array = make(3)
    data = pattern(TS + 100, 1)
    array.write(S, TS - 50, data, now=0)
    assert array.read(S, 0, TS - 50, now=0) == bytes(TS - 50)
    assert array.read(S, TS - 50, len(data), now=0) == data
    assert array.read(S, 2 * TS + 50, TS - 50, now=0) == bytes(TS - 50)
    assert array.extents(S, now=0) == [Extent(offset=TS - 50, length=len(data))]
    array.write(S, TS - 50, bytes(50), now=0)  # zeros make track 0 empty again
    assert array.extents(S, now=0) == [Extent(offset=TS, length=len(data) - 50)]
    array.write(S, 2 * TS + 1000, b"x", now=0)
    array.write(S, 10, b"y", now=0)
    assert array.extents(S, now=0) == [Extent(10, 1), Extent(TS, TS + 1001)]  # one span per track


def test_volume_definition_is_checked() -> None:
    array = Array()
    with pytest.raises(BadRequest, match="LSS '14' does not match the serial's LSS 13"):
        array.add_volume(S, lss="14", capacity=TS)
    with pytest.raises(BadRequest, match="box 699 is not this box 698"):
        array.add_volume("20313699", lss="13", capacity=TS)
    with pytest.raises(BadRequest, match="positive multiple of 65536"):
        array.add_volume(S, lss="13", capacity=TS + 1)
    with pytest.raises(BadRequest, match="8 digits"):
        array.add_volume("2031369", lss="13", capacity=TS)
    info = array.add_volume(S, lss="13", capacity=TS, label="db")
    assert array.volume(S) == info and info.label == "db"
    with pytest.raises(BadRequest, match="already exists"):
        array.add_volume(S, lss="13", capacity=TS)


def test_io_refusals() -> None:
    array = make(2)
    refused(array, OutOfRange, f"cannot write 2 bytes at offset {2 * TS - 1} of {S}: the volume has {2 * TS} bytes",
            lambda: array.write(S, 2 * TS - 1, b"ab", now=0))
    refused(array, UnknownVolume, "unknown volume 29913698", lambda: array.read("29913698", 0, 1, now=0))
    array.set_online(S, False, now=0)
    refused(array, VolumeOffline, f"cannot write {S}: volume {S} is offline", lambda: array.write(S, 0, b"x", now=0))
    with pytest.raises(VolumeOffline):
        array.read(S, 0, 1, now=0)


# ---------------------------------------------------------------------------- point in time


def test_point_in_time_nocopy_and_incomplete_withdraw() -> None:
    array = make(4)
    old = pattern(4 * TS, 3)
    array.write(S, 0, old, now=0)
    rel = array.establish(S, T, NOCOPY, now=1)
    assert (rel.state, rel.out_of_sync_tracks, rel.total_tracks) == (CopyState.COPYING, 4, 4)
    new = pattern(TS // 2, 9)
    array.write(S, TS + 10, new, now=2)  # copy-before-write of track 1 only
    assert array.read(T, 0, 4 * TS, now=2) == old
    assert array.read(S, TS + 10, len(new), now=2) == new
    array.write(T, 3 * TS, b"T", now=3)  # a target write makes track 3 the target's own
    assert array.read(S, 3 * TS, 1, now=3) == old[3 * TS : 3 * TS + 1]
    assert array.query(now=100)[0].out_of_sync_tracks == 2  # nocopy: no background walk
    array.withdraw(S, T, now=100)
    image = array.read(T, 0, 4 * TS, now=100)
    assert image[:TS] == bytes(TS) and image[2 * TS : 3 * TS] == bytes(TS)  # never copied: not there
    assert image[TS : 2 * TS] == old[TS : 2 * TS]
    assert image[3 * TS :] == b"T" + old[3 * TS + 1 :]
    assert array.query(now=100) == []


def test_withdrawn_incomplete_target_keeps_its_old_physical_data() -> None:
    """IBM: after a NOCOPY relationship ends "the track data on the target device is
    unpredictable": its old physical tracks, mixed with what was copied (not zeros)."""
    array = make(4)
    stale = pattern(4 * TS, 7)
    array.write(T, 0, stale, now=0)  # the target volume's previous life
    image = pattern(4 * TS, 3)
    array.write(S, 0, image, now=0)
    array.establish(S, T, NOCOPY, now=1)
    assert array.read(T, 0, 4 * TS, now=1) == image  # logically the point-in-time image
    assert array.extents(T, now=1) == array.extents(S, now=1)
    array.write(S, TS, b"new", now=2)  # copy-before-write moves track 1's old data
    array.withdraw(S, T, now=3)
    after = array.read(T, 0, 4 * TS, now=3)
    assert after[TS : 2 * TS] == image[TS : 2 * TS]
    for t in (0, 2, 3):
        assert after[t * TS : (t + 1) * TS] == stale[t * TS : (t + 1) * TS]


def test_resync_options_replace_the_old_ones() -> None:
    array = make(4)
    array.write(S, 0, b"v1", now=0)
    array.establish(S, T, FlashOptions(record=True, persistent=True, inhibit_target_writes=True, tag="a"), now=0)
    array.query(now=10)
    array.write(S, 0, b"v2", now=11)
    kept = array.resync(S, T, now=12, options=FlashOptions(record=True, persistent=True, tag="b"))
    assert (kept.recording, kept.persistent, kept.inhibit_target_writes, kept.tag) == (True, True, False, "b")
    array.write(T, 2 * TS, b"target may write now", now=12)
    array.query(now=20)
    array.write(S, 0, b"v3", now=21)
    plain = array.resync(S, T, now=22)  # no -record -persist: recording stops, dissolves after the copy
    assert (plain.recording, plain.persistent, plain.tag, plain.out_of_sync_tracks) == (False, False, "b", 2)
    assert array.query(now=24) == []
    assert array.read(T, 0, 2, now=24) == b"v3"
    array.establish(S, U, FlashOptions(record=True, persistent=True), now=30)
    array.query(now=40)
    nocp = array.resync(S, U, now=41, freeze=True, options=FlashOptions(mode=CopyMode.NOCOPY, record=True, persistent=True))
    assert nocp.mode is CopyMode.NOCOPY and not nocp.source_write_enabled


def test_fast_reverse_restore_before_the_copy_finishes() -> None:
    array = make(4)
    image = pattern(4 * TS, 2)
    array.write(S, 0, image, now=0)
    array.establish(S, T, FlashOptions(mode=CopyMode.NOCOPY, record=True, persistent=True), now=0)
    array.write(S, 0, b"damage", now=1)  # copy-before-write: track 0's image moves to T
    refused(array, BackgroundCopyRunning,
            f"cannot reverse {S} -> {T}: the forward copy is unfinished: 3 of 4 tracks out of sync "
            "(nocopy relationship (no background copy))", lambda: array.reverse(S, T, now=2), now=2)
    rel = array.reverse(S, T, now=2, fast=True)
    assert (rel.source, rel.target) == (T, S)
    assert array.read(S, 0, 4 * TS, now=2) == image  # the source is its point-in-time image again
    assert array.volume(S).unusable is None
    assert "fast reverse restore" in (array.volume(T).unusable or "")  # T never got tracks 1-3
    array.withdraw(T, S, now=3)
    array.establish(S, T, FlashOptions(), now=4)  # established again: usable once more
    assert array.volume(T).unusable is None
    clone = Array.from_state(array.to_state())
    assert clone.to_state() == array.to_state()


def test_background_copy_completes_and_dissolves_or_persists() -> None:
    array = make(4)
    array.write(S, 0, pattern(4 * TS, 1), now=0)
    array.establish(S, T, FlashOptions(), now=10)
    array.establish(S, U, FlashOptions(persistent=True), now=10)
    # the two copies share the array's one track per second: 4 tracks each take 8 s
    assert array.copy_done_at(S, T, now=10) == 18.0
    assert [r.out_of_sync_tracks for r in array.query(now=14.5)] == [2, 2]
    infos = array.query(now=18)
    assert [(r.target, r.state, r.out_of_sync_tracks) for r in infos] == [(U, CopyState.COPIED, 0)]
    assert array.read(T, 0, 4 * TS, now=18) == pattern(4 * TS, 1)
    assert array.copy_done_at(S, U, now=20) == 18.0


def test_copy_on_write_early_tracks_cost_no_copy_time() -> None:
    array = make(4)
    array.establish(S, T, FlashOptions(), now=0)
    array.write(S, 2 * TS, b"x", now=0.5)  # track 2 is copied by the write
    assert array.copy_done_at(S, T, now=0.5) == 3.0
    array.write(T, 3 * TS, b"y", now=0.5)
    assert array.copy_done_at(S, T, now=0.5) == 2.0


@pytest.mark.parametrize("walk_factor", [0, 4], ids=["arithmetic", "stepping"])
@pytest.mark.parametrize("jumps", [[9.5, 20], [2, 5, 6, 9.5, 10, 11, 12.5, 13, 20]])
def test_background_walk_skips_early_copied_tracks(
    monkeypatch: pytest.MonkeyPatch, walk_factor: int, jumps: list[float]
) -> None:
    monkeypatch.setattr(ess, "_WALK_STEP_FACTOR", walk_factor)
    array = make(16)
    old = pattern(16 * TS, 1)
    array.write(S, 0, old, now=0)
    array.establish(S, T, FlashOptions(persistent=True), now=0)
    array.write(T, 5 * TS, b"own", now=0)  # early-copied tracks: 5 (target write), 9 and 10 (copy-on-write)
    array.write(S, 9 * TS, b"new", now=0)
    array.write(S, 10 * TS, b"new", now=0)
    assert array.copy_done_at(S, T, now=0) == 13.0  # 13 tracks left, one per second
    for now in jumps:
        (rel,) = array.query(now=now)
        assert rel.out_of_sync_tracks == 13 - min(math.floor(now), 13)
        withdrawn = Array.from_state(array.to_state())
        withdrawn.withdraw(S, T, now=now)  # what the target physically holds so far
        walked = [0, 1, 2, 3, 4, 6, 7, 8, 11, 12, 13, 14, 15][: min(math.floor(now), 13)]
        for t in range(16):
            expected = b"own" + old[t * TS + 3 : (t + 1) * TS] if t == 5 else old[t * TS : (t + 1) * TS]
            has = t in walked or t in (5, 9, 10)
            assert withdrawn.read(T, t * TS, TS, now=now) == (expected if has else bytes(TS)), (now, t)


def test_withdraw_after_copy() -> None:
    array = make(4)
    array.write(S, 0, pattern(4 * TS, 5), now=0)
    array.establish(S, T, FlashOptions(mode=CopyMode.NOCOPY), now=0)
    array.withdraw(S, T, now=1, after_copy=True)  # -cp starts the copy of a nocopy relationship
    (rel,) = array.query(now=1)
    assert rel.mode is CopyMode.COPY and rel.out_of_sync_tracks == 4
    assert array.copy_done_at(S, T, now=1) == 5.0
    array.write(S, 0, b"new", now=2)
    assert array.query(now=5) == []
    assert array.read(T, 0, 4 * TS, now=5) == pattern(4 * TS, 5)


def test_withdraw_after_copy_of_a_persistent_relationship_keeps_it() -> None:
    """rmflash -cp on a persistent relationship copies everything, and the relationship
    stays (it is persistent): only a non-persistent one ends after its copy."""
    array = make(4)
    array.write(S, 0, pattern(4 * TS, 5), now=0)
    array.establish(S, T, FlashOptions(mode=CopyMode.NOCOPY, persistent=True), now=0)
    array.withdraw(S, T, now=1, after_copy=True)
    (rel,) = array.query(now=1)
    assert rel.mode is CopyMode.COPY and rel.out_of_sync_tracks == 4
    (rel,) = array.query(now=5)
    assert (rel.state, rel.persistent, rel.out_of_sync_tracks) == (CopyState.COPIED, True, 0)
    array.withdraw(S, T, now=6, after_copy=True)  # copied and persistent: still nothing ends
    assert len(array.query(now=6)) == 1
    array.withdraw(S, T, now=7)
    assert array.query(now=7) == [] and array.read(T, 0, 4 * TS, now=7) == pattern(4 * TS, 5)


def test_multiple_targets_each_keep_their_own_point_in_time() -> None:
    serials = tuple(f"{n:03d}13698" for n in range(300, 300 + MAX_TARGETS_PER_SOURCE + 2))
    array = make(2, serials=serials)
    source, targets, spare = serials[0], serials[1:-1], serials[-1]
    for n, target in enumerate(targets):
        array.write(source, 0, f"generation {n}".encode(), now=n)
        array.establish(source, target, NOCOPY if n % 2 else FlashOptions(persistent=True), now=n)
    refused(array, TooManyTargets, f"cannot establish {source} -> {spare}: source {source} already has 12 targets",
            lambda: array.establish(source, spare, NOCOPY, now=12), now=12)
    array.write(source, 0, b"after all", now=12)
    for n, target in enumerate(targets):
        assert array.read(target, 0, 20, now=12) == f"generation {n}".encode().ljust(20, b"\0")
    assert len(array.query(volume=source, now=12)) == 12


# ---------------------------------------------------------------------------- refusals


def test_establish_refusals_name_the_serials_and_the_reason() -> None:
    array = make(4, serials=(S, T, U, V, OTHER_LSS))
    array.add_volume("20813698", lss="13", capacity=8 * TS)
    array.establish(U, T, NOCOPY, now=0)
    array.establish(S, V, INCREMENTAL, now=0)
    cases = [
        (UnknownVolume, "cannot establish 29913698 -> 20813698: unknown volume 29913698", "29913698", "20813698"),
        (CascadeRefused, f"cannot establish {S} -> {S}: source and target are the same volume", S, S),
        (SizeMismatch, f"cannot establish {S} -> 20813698: source {S} has {4 * TS} bytes, target 20813698 has {8 * TS}",
         S, "20813698"),
        (RelationshipExists, f"cannot establish {S} -> {V}: relationship {S} -> {V} already exists", S, V),
        (TargetInRelationship, f"cannot establish {S} -> {T}: target {T} is already the target of {U}", S, T),
        (CascadeRefused, f"cannot establish {OTHER_LSS} -> {U}: target {U} is already the source of {T} (no cascading)",
         OTHER_LSS, U),
        (CascadeRefused, f"cannot establish {T} -> {OTHER_LSS}: source {T} is already the target of {U} (no cascading)",
         T, OTHER_LSS),
    ]
    for error, message, source, target in cases:
        refused(array, error, message, lambda: array.establish(source, target, NOCOPY, now=1), now=1)
    refused(array, SecondIncremental,
            f"cannot establish {S} -> {OTHER_LSS}: source {S} already has an incremental relationship (to {V})",
            lambda: array.establish(S, OTHER_LSS, INCREMENTAL, now=1), now=1)
    array.set_online(OTHER_LSS, False, now=1)
    refused(array, VolumeOffline, f"cannot establish {S} -> {OTHER_LSS}: volume {OTHER_LSS} is offline",
            lambda: array.establish(S, OTHER_LSS, NOCOPY, now=1), now=1)


def test_resync_reverse_withdraw_refusals() -> None:
    array = make(4)
    array.establish(S, T, FlashOptions(), now=0)
    array.establish(U, V, FlashOptions(record=True), now=0)
    refused(array, NotIncremental, f"cannot resync {S} -> {T}: the relationship does not record changes",
            lambda: array.resync(S, T, now=1), now=1)
    refused(array, NotIncremental, f"cannot reverse {S} -> {T}: the relationship does not record changes",
            lambda: array.reverse(S, T, now=1), now=1)
    refused(array, BackgroundCopyRunning,
            f"cannot reverse {U} -> {V}: the forward copy is unfinished: 4 of 4 tracks out of sync (background copy)",  # two copies share 1 track/s
            lambda: array.reverse(U, V, now=1), now=1)
    refused(array, RelationshipNotFound, f"cannot withdraw {T} -> {S}: no such relationship (there is {S} -> {T})",
            lambda: array.withdraw(T, S, now=1), now=1)
    inhibited = make(2)
    inhibited.establish(S, T, FlashOptions(mode=CopyMode.NOCOPY, inhibit_target_writes=True), now=0)
    refused(inhibited, WriteInhibited, f"cannot write {T}: it is the write-inhibited target of {S}",
            lambda: inhibited.write(T, 0, b"x", now=0))
    inhibited.write(S, 0, b"source writes flow", now=0)


def test_inhibit_ends_with_the_relationship() -> None:
    array = make(2)
    array.establish(S, T, FlashOptions(inhibit_target_writes=True), now=0)
    with pytest.raises(WriteInhibited):
        array.write(T, 0, b"x", now=1.5)
    array.write(T, 0, b"x", now=2)  # copied at t=2, dissolved: the target is an ordinary volume again
    assert array.read(T, 0, 1, now=2) == b"x"


# ---------------------------------------------------------------------------- incremental


def test_resync_copies_only_changed_tracks() -> None:
    array = make(64)
    array.write(S, 0, pattern(64 * TS, 2), now=0)
    array.establish(S, T, INCREMENTAL, now=0)
    assert array.query(now=64)[0].state is CopyState.COPIED
    array.write(S, 5 * TS, b"changed on the source", now=70)
    array.write(T, 40 * TS + 3, b"changed on the target", now=70)
    rel = array.resync(S, T, now=80, tag="run-2")
    assert (rel.out_of_sync_tracks, rel.synced, rel.created, rel.tag) == (2, 80, 0, "run-2")
    assert array.copy_done_at(S, T, now=80) == 82.0
    assert array.read(T, 0, 64 * TS, now=80) == array.read(S, 0, 64 * TS, now=80)
    array.write(S, 5 * TS, b"later", now=81)
    assert array.read(T, 5 * TS, 21, now=81) == b"changed on the source"


def test_reverse_restores_changed_tracks_and_swaps_roles() -> None:
    array = make(8)
    golden = pattern(8 * TS, 4)
    array.write(S, 0, golden, now=0)
    array.establish(S, T, INCREMENTAL, now=0)
    array.query(now=8)
    array.write(S, 3 * TS, b"corruption", now=9)  # production goes wrong
    rel = array.reverse(S, T, now=10, tag="restore")
    assert (rel.source, rel.target, rel.state, rel.out_of_sync_tracks) == (T, S, CopyState.REVERSING, 1)
    assert array.read(S, 0, 8 * TS, now=10) == golden
    refused(array, RelationshipNotFound,
            f"cannot resync {S} -> {T}: no such relationship (there is {T} -> {S})",
            lambda: array.resync(S, T, now=10), now=10)
    assert array.query(now=11)[0].state is CopyState.COPIED
    array.write(S, 0, b"production again", now=12)  # the restored source is writable (no inhibit)
    assert array.read(T, 0, 8 * TS, now=12) == golden


def test_reverse_with_a_second_target_would_cascade() -> None:
    array = make(2)
    array.establish(S, T, INCREMENTAL, now=0)
    array.establish(S, U, NOCOPY, now=0)
    refused(array, CascadeRefused, f"cannot reverse {S} -> {T}: source {S} is also the source of {U}; reversing would cascade",
            lambda: array.reverse(S, T, now=5), now=5)


# ---------------------------------------------------------------------------- freezes


def test_freeze_holds_only_the_frozen_source_volumes_until_unfreeze() -> None:
    """-freeze holds writes to the frozen FlashCopy *source*; the target and every other
    volume of the LSS flow on; unfreezeflash LSS releases all of that LSS's frozen sources."""
    W = "20813698"
    array = make(2, serials=(S, T, U, V, W, OTHER_LSS))
    array.establish(S, T, FlashOptions(mode=CopyMode.NOCOPY, freeze=True), now=10)
    with pytest.raises(LssHeld) as held:
        array.write(S, 0, b"x", now=11)
    assert (held.value.serial, held.value.lss, held.value.deadline) == (S, "13", 130.0)
    assert array.held_until(S, now=11) == 130.0
    for other in (T, U, V, W, OTHER_LSS):  # the target, unrelated LUNs of LSS 13, another LSS
        assert array.held_until(other, now=11) is None
        array.write(other, 0, b"flows", now=11)
    (rel,) = array.query(volume=S, now=11)
    assert (rel.source_write_enabled, rel.elb_deadline) == (False, 130.0)
    array.establish(U, V, FlashOptions(mode=CopyMode.NOCOPY, freeze=True), now=50)  # same group: the first deadline stays
    (freeze,) = array.frozen_lsses(now=50)
    assert (freeze.lss, freeze.since, freeze.deadline, freeze.sources) == ("13", 10.0, 130.0, (S, U))
    array.write(W, 0, b"still flows", now=51)
    (release,) = array.unfreeze(["13", "13", "99"], now=60)
    assert (release.lss, release.since, release.released_at, release.by_timeout, release.sources) == (
        "13", 10.0, 60.0, False, (S, U))
    assert array.unfreeze(["13"], now=61) == []
    array.write(S, 0, b"x", now=61)
    array.write(U, 0, b"x", now=61)
    assert [(h.serial, h.since, h.released_at, h.by_timeout) for h in array.hold_history(now=61)] == [
        (S, 10.0, 60.0, False), (U, 50.0, 60.0, False)]
    assert array.query(volume=S, now=61)[0].source_write_enabled


def test_elb_timeout_is_a_per_lss_setting() -> None:
    array = make(2, serials=(S, T, U, V, OTHER_LSS, "20814698"))
    assert [(i.lss, i.volumes, i.elb_timeout) for i in array.list_lsses(now=0)] == [("13", 4, 120.0), ("14", 2, 120.0)]
    info = array.set_elb_timeout("14", 30, now=0)
    assert (info.lss, info.elb_timeout) == ("14", 30.0)
    array.establish(S, T, FlashOptions(freeze=True), now=1)
    array.establish(OTHER_LSS, "20814698", FlashOptions(freeze=True), now=1)
    assert {f.lss: (f.deadline, f.elb_timeout) for f in array.frozen_lsses(now=1)} == {"13": (121.0, 120.0), "14": (31.0, 30.0)}
    array.set_elb_timeout("13", 10, now=2)  # a running group keeps its timer
    assert array.held_until(S, now=2) == 121.0
    array.write(OTHER_LSS, 0, b"released by its own timer", now=31)
    assert [(h.serial, h.released_at, h.by_timeout) for h in array.hold_history(now=31)] == [
        (S, None, False), (OTHER_LSS, 31.0, True)]  # by start time, then serial
    with pytest.raises(BadRequest, match="LSS 15: box 698 has no volume"):
        array.set_elb_timeout("15", 10, now=31)
    with pytest.raises(BadRequest, match=r"must be a number of seconds in \(0, 86400\]"):
        array.set_elb_timeout("13", 0, now=31)
    clone = Array.from_state(array.to_state())
    assert clone.list_lsses(now=40) == array.list_lsses(now=40)
    assert clone.hold_history(now=40) == array.hold_history(now=40)


def test_elb_timeout_releases_by_itself_and_is_recorded() -> None:
    array = make(2, serials=(S, T, U, V, OTHER_LSS, "20814698"))
    array.establish(S, T, FlashOptions(freeze=True), now=5)
    assert array.establish(U, V, NOCOPY, now=0).created == 5.0  # time does not go back
    array.establish(OTHER_LSS, "20814698", FlashOptions(freeze=True), now=100)
    assert array.held_until(S, now=124.999) == 125.0
    array.write(S, 0, b"released", now=125.0)
    array.unfreeze(["14"], now=126)
    assert [(r.lss, r.released_at, r.by_timeout) for r in array.lss_releases(now=126)] == [
        ("13", 125.0, True),
        ("14", 126.0, False),
    ]


# ---------------------------------------------------------------------------- hosts, tasks


def lab() -> Array:
    array = make(2)
    array.map_lun("esx1", "Disk1", S)
    array.map_lun("esx1", "Disk2", U)
    array.map_lun("backup", "Disk1", T)
    array.map_lun("backup", "Disk2", V)
    return array


def test_host_maps_and_priming() -> None:
    array = lab()
    assert array.list_disks("esx1") == [HostDisk("esx1", "Disk1", S), HostDisk("esx1", "Disk2", U)]
    primed = array.prime("esx1", {"Disk1": "E:", "Disk2": "F:"})
    assert [(d.name, d.primed_name) for d in primed] == [("Disk1", "E:"), ("Disk2", "F:")]
    with pytest.raises(UnknownHost, match="host esx9 has no LUNs mapped on box 698"):
        array.list_disks("esx9")
    with pytest.raises(UnknownDisk, match="cannot prime esx1: it has no disk Disk7"):
        array.prime("esx1", {"Disk7": "G:"})
    with pytest.raises(BadRequest, match=f"esx1 already sees {S} as Disk1"):
        array.map_lun("esx1", "Disk1", T)


def test_execute_task_by_host_names_is_atomic() -> None:
    array = lab()
    array.prime("esx1", {"Disk2": "F:"})
    array.save_task(SavedTask("nightly", (("esx1:Disk1", "backup:Disk1"), ("esx1:F:", V)), FlashOptions(freeze=True)))
    array.add_volume("20713698", lss="13", capacity=2 * TS)
    array.establish("20713698", V, NOCOPY, now=0)  # the second pair's target is taken
    refused(array, TargetInRelationship,
            f"task nightly: cannot establish {U} -> {V}: target {V} is already the target of 20713698",
            lambda: array.execute_task("nightly", now=1), now=1)
    assert array.query(volume=S, now=1) == [] and array.frozen_lsses(now=1) == []
    array.withdraw("20713698", V, now=2)
    rels = array.execute_task("nightly", now=3, tag="run-7")
    assert [(r.source, r.target, r.tag, r.created) for r in rels] == [(S, T, "run-7", 3), (U, V, "run-7", 3)]
    assert [f.lss for f in array.frozen_lsses(now=3)] == ["13"]
    assert [r.id for r in array.query(tag="run-7", now=3)] == [f"{S}:{T}", f"{U}:{V}"]
    refused(array, UnknownTask, "no saved task weekly", lambda: array.execute_task("weekly", now=3), now=3)
    assert array.tasks()[0].name == "nightly"


def test_a_task_cannot_use_one_target_twice() -> None:
    array = lab()
    array.save_task({"name": "bad", "pairs": [[S, T], [U, T]], "options": {"mode": "nocopy"}})
    refused(array, TargetInRelationship, f"task bad: cannot establish {U} -> {T}: target {T} is already the target of {S}",
            lambda: array.execute_task("bad", now=0))


# ---------------------------------------------------------------------------- state, replay


def _plain_only(value: Any) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain_only(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_plain_only(v) for v in value)
    return value is None or isinstance(value, (str, int, float, bool, bytes))


def test_state_is_plain_data_and_round_trips_mid_copy_and_mid_freeze() -> None:
    array = lab()
    array.prime("esx1", {"Disk1": "E:"})
    array.save_task(SavedTask("t", ((S, T),), FlashOptions()))
    array.write(S, 10, b"abc", now=0)
    array.establish(S, T, FlashOptions(record=True, freeze=True, tag="x"), now=0)
    array.unfreeze(["13"], now=0.4)
    array.write(T, TS, b"t", now=0.5)
    array.establish(U, V, FlashOptions(freeze=True), now=1)
    state = array.to_state()
    assert _plain_only(state)
    clone = Array.from_state(copy.deepcopy(state))
    assert clone.to_state() == state
    for a in (array, clone):
        a.write(U, 0, b"later", now=200)
    assert clone.to_state() == array.to_state()
    assert clone.lss_releases(now=200) == array.lss_releases(now=200)


async def test_mutation_hook_replays_to_the_same_array(autojump_clock: trio.testing.MockClock) -> None:
    log: list[tuple[str, dict[str, Any]]] = []
    service = ArrayService(Array(bandwidth=float(TS)), on_mutation=lambda name, kw: log.append((name, kw)))
    for serial in (S, T, U):
        await service.add_volume(serial, lss="13", capacity=4 * TS)
    await service.map_lun("esx1", "Disk1", S)
    await service.prime("esx1", {"Disk1": "E:"})
    await service.save_task(SavedTask("t", (("esx1:E:", T),), FlashOptions(record=True, tag="a")))
    await service.write(S, 5, b"hello")
    await trio.sleep(3)
    await service.execute_task("t", tag="b")
    await service.add_volume("20813698", lss="13", capacity=TS)
    n = len(log)
    with pytest.raises(SizeMismatch):
        await service.establish(S, "20813698", FlashOptions())
    with pytest.raises(TargetInRelationship):
        await service.establish(U, T, FlashOptions())
    with pytest.raises(RelationshipNotFound):
        await service.withdraw(U, T)
    assert len(log) == n, "a refused call must not reach the log"
    await trio.sleep(2)
    await service.write(T, TS, b"target")
    await service.resync("20313698", T, freeze=True)
    await service.unfreeze(["13"])
    await service.withdraw(S, T, after_copy=True)
    replayed = json.loads(json.dumps(log, default=lambda b: b.hex()))  # what a JSON log gives back
    rebuilt = Array(bandwidth=float(TS))
    for name, kwargs in replayed:
        if name == "write":
            kwargs["data"] = bytes.fromhex(kwargs["data"])
        getattr(rebuilt, name)(**kwargs)
    assert rebuilt.to_state() == service.array.to_state()


def test_options_accepted_as_attrs_asdict() -> None:
    array = make(2)
    options = FlashOptions(mode=CopyMode.NOCOPY, record=True, tag="z")
    rel = array.establish(S, T, attrs.asdict(options), now=0)
    assert (rel.mode, rel.recording, rel.persistent, rel.tag) == (CopyMode.NOCOPY, True, True, "z")
    array.establish(U, V, plain_options(options), now=0)
    with pytest.raises(BadRequest, match="unknown flash option"):
        array.establish(S, U, {"speed": 3}, now=0)


# ---------------------------------------------------------------------------- time, scale


async def test_one_tib_background_copy_takes_model_hours(autojump_clock: trio.testing.MockClock) -> None:
    array = Array(bandwidth=100e6)
    array.add_volume(S, lss="13", capacity=TIB)
    array.add_volume(T, lss="13", capacity=TIB)
    service = ArrayService(array)
    await service.write(S, 0, b"boot sector")
    await service.write(S, TIB - 3, b"end")
    start = trio.current_time()
    await service.establish(S, T, FlashOptions())
    await trio.sleep(3600)
    (rel,) = await service.query(volume=S)
    walked = rel.total_tracks - rel.out_of_sync_tracks
    assert walked == math.floor(3600 * 100e6 / TS)
    assert await service.wait_copied(S, T) is None  # dissolved at 100 %
    elapsed = trio.current_time() - start
    assert elapsed == pytest.approx(TIB / 100e6, abs=1e-3)  # ~3.05 hours of site time
    assert await service.query(volume=S) == []
    assert await service.read(T, 0, 11) == b"boot sector"
    assert await service.read(T, TIB - 3, 3) == b"end"


async def test_elb_timeout_releases_a_held_write_at_120_s(autojump_clock: trio.testing.MockClock) -> None:
    service = ArrayService(make(2))
    await service.establish(S, T, FlashOptions(freeze=True))
    done: list[float] = []

    async def host_write() -> None:
        await service.write(S, 0, b"held")
        done.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(host_write)
        await service.write(U, 0, b"unrelated")  # another LUN of the LSS is not held
        assert trio.current_time() == 0.0
        await trio.sleep(119.9)
        assert done == [] and await service.read(S, 0, 4) == bytes(4)
    assert done == [pytest.approx(120.0, abs=1e-9)]
    assert await service.read(S, 0, 4) == b"held"
    (release,) = await service.lss_releases()
    assert release.by_timeout and release.released_at == 120.0


async def test_unfreeze_releases_a_held_write_early(autojump_clock: trio.testing.MockClock) -> None:
    service = ArrayService(make(2), speed=10.0)
    await service.establish(S, T, FlashOptions(freeze=True))
    done: list[float] = []

    async def host_write() -> None:
        await service.write(S, 0, b"held")
        done.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(host_write)
        await trio.sleep(3)
        assert done == []
        await service.unfreeze(["13"])
    assert done == [3.0]
    assert await service.read(T, 0, 4) == bytes(4)  # the image predates the held write
    assert await service.read(S, 0, 4) == b"held"


async def test_wait_copied_keeps_a_persistent_relationship_and_refuses_nocopy(
    autojump_clock: trio.testing.MockClock,
) -> None:
    service = ArrayService(make(4))
    await service.establish(S, T, FlashOptions(persistent=True))
    rel = await service.wait_copied(S, T)
    assert rel is not None and rel.state is CopyState.COPIED and trio.current_time() == 4.0
    await service.establish(U, V, NOCOPY)
    with pytest.raises(BadRequest, match="nocopy relationship has no background copy"):
        await service.wait_copied(U, V)


def _deep_size(obj: Any, seen: set[int]) -> int:
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    size = sys.getsizeof(obj)
    if isinstance(obj, dict):
        size += sum(_deep_size(k, seen) + _deep_size(v, seen) for k, v in obj.items())
    elif isinstance(obj, (list, tuple, set, frozenset)):
        size += sum(_deep_size(v, seen) for v in obj)
    elif hasattr(obj, "__slots__"):
        size += sum(_deep_size(getattr(obj, s), seen) for s in obj.__slots__ if hasattr(obj, s))
    elif hasattr(obj, "__dict__"):
        size += _deep_size(vars(obj), seen)
    return size


def test_thousand_one_tib_volumes_with_sparse_writes_fit_in_200_mib() -> None:
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        array = Array()
        for n in range(1000):
            serial = f"{n % 1000:03d}{10 + n % 8:02d}698"
            array.add_volume(serial, lss=serial[3:5], capacity=TIB)
            for k in range(3):  # a superblock, a file, a log record: 4 KiB each, anywhere
                offset = ((n * 7919 + k * 104729) % (TIB // 4096)) * 4096
                array.write(serial, offset, pattern(4096, n + k), now=0)
        serials = [v.serial for v in array.volumes()]
        for n in range(0, 1000, 2):  # half of them as nocopy pairs with a write each
            s, t = serials[n], serials[n + 1]
            array.establish(s, t, NOCOPY, now=1)
            array.write(s, 0, b"after", now=2)
        traced = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    deep = _deep_size(array, set())
    assert deep < 200 * 2**20, deep
    assert traced < 200 * 2**20, traced
    print(f"\n1,000 x 1 TiB volumes, 3 sparse writes each, 500 nocopy pairs: "
          f"deep size {deep / 2**20:.1f} MiB, traced {traced / 2**20:.1f} MiB")


def test_demo_shows_the_point_in_time_image() -> None:
    """The array part of `flowcopy demo`; the whole command (its exit code, this sentence
    in its output, the backups after it) is run as a real process in
    tests/test_cli_engine.py::test_demo_shows_the_point_in_time_copy_and_verified_backups."""
    import io

    from rich.console import Console

    from flowcopy.site.demo import array_demo

    out = io.StringIO()
    assert array_demo(Console(file=out, width=160)) is True
    text = out.getvalue()
    assert "payroll.csv: 2026-12 Alice 9999" in text and "payroll.csv: 2026-11 Alice 4100" in text
    assert "Target 20413698 still holds the point-in-time image of 20313698" in text


def test_list_disks_in_the_order_a_host_shows_them() -> None:
    array = Array()
    for i, name in enumerate(["Disk10", "Disk2", "Disk1", "vmfs1"]):
        array.add_volume(f"{300 + i}13698", lss="13", capacity=64 * 1024)
        array.map_lun("esx1", name, f"{300 + i}13698")
    assert [d.name for d in array.list_disks("esx1")] == ["Disk1", "Disk2", "Disk10", "vmfs1"]
