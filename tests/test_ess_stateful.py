"""The array model against a deliberately naive reference, driven by hypothesis.

The reference keeps every volume as a full bytearray and copies the whole source into the
target at establish (the point-in-time image, taken eagerly), plus one plain list of
booleans per relationship saying which target tracks the array has physically copied
(needed only for what a withdraw leaves behind, for out-of-sync counts and for when a
relationship completes). Background copy in the reference: the k lowest uncopied tracks,
k = floor(seconds since (re)start * tracks per second) minus those already walked.

After every step each byte of every volume is compared, plus the relationship list,
frozen LSSs and the release history; every refused operation must leave `to_state()`
exactly as it was (after bringing the array up to `now` first, which is not a change).
"""

from __future__ import annotations

import copy
import math
import random

import hypothesis.strategies as st
from hypothesis import HealthCheck, event, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from flowcopy.site.api import (
    TRACK_SIZE,
    BackgroundCopyRunning,
    CascadeRefused,
    CopyMode,
    CopyState,
    FlashOptions,
    NotIncremental,
    RelationshipExists,
    RelationshipNotFound,
    SecondIncremental,
    SizeMismatch,
    TargetInRelationship,
    UnknownVolume,
    VolumeOffline,
    WriteInhibited,
)
from flowcopy.site import ess
from flowcopy.site.ess import Array, LssHeld

TS = TRACK_SIZE
ELB = 10.0
VOLUMES = {  # serial -> (lss, tracks)
    "10010698": ("10", 8),
    "10110698": ("10", 8),
    "10210698": ("10", 8),
    "10311698": ("11", 8),
    "10411698": ("11", 8),
    "10511698": ("11", 6),
}
UNKNOWN = "19999698"
SERIALS = sorted(VOLUMES)
ANY_SERIAL = st.sampled_from(SERIALS * 4 + [UNKNOWN])  # an unknown serial now and then


class RefRel:
    def __init__(self, source: str, target: str, n: int, options: FlashOptions, now: float) -> None:
        self.source, self.target = source, target
        self.mode = options.mode
        self.recording = options.record
        self.persistent = options.persistent or options.record
        self.tag = options.tag
        self.inhibit = options.inhibit_target_writes
        self.reversing = False
        self.after_copy = False
        self.copied = [False] * n
        self.bg_start, self.bg_done = now, 0
        self.src_changed: set[int] = set()
        self.tgt_changed: set[int] = set()

    def oos(self) -> int:
        return self.copied.count(False)

    def dissolves(self) -> bool:
        return self.after_copy or (self.mode is CopyMode.COPY and not self.persistent)


class Ref:
    """Eager and slow on purpose: nothing here shares code or ideas of laziness with ess.py."""

    def __init__(self) -> None:
        self.data = {s: bytearray(n * TS) for s, (_, n) in VOLUMES.items()}
        self.online = {s: True for s in VOLUMES}
        self.rels: dict[tuple[str, str], RefRel] = {}
        self.frozen: dict[str, tuple[float, float]] = {}
        self.releases: list[tuple[str, float, float, bool]] = []

    def lss(self, serial: str) -> str:
        return VOLUMES[serial][0]

    def advance(self, now: float) -> None:
        for key, rel in list(self.rels.items()):
            if rel.mode is CopyMode.COPY:
                due = math.floor((now - rel.bg_start) * 1.0) - rel.bg_done  # 1 track per second
                for t in range(len(rel.copied)):
                    if due <= 0:
                        break
                    if not rel.copied[t]:
                        rel.copied[t] = True
                        rel.bg_done += 1
                        due -= 1
            self.settle(key)
        for lss, (since, deadline) in list(self.frozen.items()):
            if now >= deadline:
                del self.frozen[lss]
                self.release(lss, since, deadline, True)

    def settle(self, key: tuple[str, str]) -> None:
        rel = self.rels.get(key)
        if rel is not None and rel.oos() == 0 and rel.dissolves():
            del self.rels[key]

    def release(self, lss: str, since: float, at: float, by_timeout: bool) -> None:
        self.releases.append((lss, since, at, by_timeout))
        self.releases.sort(key=lambda r: (r[2], r[0], r[1]))

    def freeze(self, lss: str, now: float) -> None:
        if lss not in self.frozen:
            self.frozen[lss] = (now, now + ELB)

    def as_target(self, serial: str) -> RefRel | None:
        return next((r for r in self.rels.values() if r.target == serial), None)

    def sources_of(self, serial: str) -> list[RefRel]:
        return [r for r in self.rels.values() if r.source == serial]

    # the refusal each operation must give, in the model's documented order
    def establish_error(self, s: str, t: str, options: FlashOptions) -> type[Exception] | None:
        if s not in VOLUMES or t not in VOLUMES:
            return UnknownVolume
        if s == t:
            return CascadeRefused
        if not self.online[s] or not self.online[t]:
            return VolumeOffline
        if VOLUMES[s][1] != VOLUMES[t][1]:
            return SizeMismatch
        if (s, t) in self.rels:
            return RelationshipExists
        if self.as_target(t):
            return TargetInRelationship
        if self.sources_of(t) or self.as_target(s):
            return CascadeRefused
        if options.record and any(r.recording for r in self.sources_of(s)):
            return SecondIncremental
        return None

    def write_error(self, serial: str) -> type[Exception] | None:
        if not self.online[serial]:
            return VolumeOffline
        rel = self.as_target(serial)
        if rel is not None and rel.inhibit:
            return WriteInhibited
        if self.lss(serial) in self.frozen:
            return LssHeld
        return None

    def write(self, serial: str, offset: int, data: bytes) -> None:
        tracks = range(offset // TS, (offset + len(data) - 1) // TS + 1)
        for rel in self.sources_of(serial):
            for t in tracks:
                rel.copied[t] = True
                if rel.recording:
                    rel.src_changed.add(t)
        rel = self.as_target(serial)
        if rel is not None:
            for t in tracks:
                rel.copied[t] = True
                if rel.recording:
                    rel.tgt_changed.add(t)
        self.data[serial][offset : offset + len(data)] = data
        for key in list(self.rels):
            self.settle(key)

    def withdraw_now(self, rel: RefRel) -> None:
        target = self.data[rel.target]
        for t, done in enumerate(rel.copied):
            if not done:  # never copied: the withdrawn target holds nothing there
                target[t * TS : (t + 1) * TS] = bytes(TS)
        del self.rels[(rel.source, rel.target)]


def options_strategy() -> st.SearchStrategy[FlashOptions]:
    return st.builds(
        FlashOptions,
        mode=st.sampled_from(list(CopyMode)),
        record=st.sampled_from([True, True, False]),  # incremental paths (resync, reverse) need it
        persistent=st.booleans(),
        freeze=st.booleans(),
        tag=st.sampled_from([None, "run-1", "run-2"]),
        inhibit_target_writes=st.booleans(),
    )


class ArrayMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.array = Array(elb_timeout=ELB, bandwidth=float(TS))  # one track per second
        for serial, (lss, n) in VOLUMES.items():
            self.array.add_volume(serial, lss=lss, capacity=n * TS)
        self.ref = Ref()
        self.now = 0.0

    @initialize(arithmetic=st.booleans())
    def choose_walk(self, arithmetic: bool) -> None:
        """The background copy has two equivalent walks (step by step, cursor arithmetic): use both."""
        ess._WALK_STEP_FACTOR = 0 if arithmetic else 4

    def teardown(self) -> None:
        ess._WALK_STEP_FACTOR = 4

    # ------------------------------------------------------------------ helpers

    def settled_state(self) -> dict:
        """to_state after bringing everything to `now` (catching up with time is not a change)."""
        self.array.query(now=self.now)
        self.array.frozen_lsses(now=self.now)
        return self.array.to_state()

    def refused(self, expected: type[Exception] | None, name: str, call) -> bool:
        """Run `call`; if the reference expects a refusal, check its type and that nothing changed."""
        before = self.settled_state()
        try:
            result = call()
        except Exception as exc:  # noqa: BLE001 - we compare the type right below
            event(f"{name} refused {type(exc).__name__}")
            assert expected is not None, f"unexpected refusal {exc!r}"
            assert type(exc) is expected, f"expected {expected.__name__}, got {exc!r}"
            assert str(exc), "a refusal must say why"
            assert self.array.to_state() == before, f"refused {type(exc).__name__} changed the array"
            return True
        assert expected is None, f"expected {expected.__name__}, but the call succeeded: {result!r}"
        event(f"{name} succeeded")
        return False

    def pick_pair(self, data: st.DataObject) -> tuple[str, str]:
        if self.ref.rels and data.draw(st.integers(0, 3)):  # mostly an existing relationship
            return data.draw(st.sampled_from(sorted(self.ref.rels)))
        return data.draw(st.sampled_from(SERIALS)), data.draw(st.sampled_from(SERIALS))

    # ------------------------------------------------------------------ rules

    @rule(dt=st.sampled_from([0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 6.0, 11.0, 40.0]))
    def advance(self, dt: float) -> None:
        self.now += dt
        self.ref.advance(self.now)

    @rule(
        serial=st.sampled_from(SERIALS),
        track=st.integers(0, 7),
        delta=st.one_of(st.sampled_from([0, 1, TS // 2, TS - 1, TS - 7]), st.integers(0, TS - 1)),
        length=st.one_of(st.sampled_from([1, 7, TS, TS + 1, 2 * TS]), st.integers(1, 3 * TS)),
        seed=st.integers(0, 2**16),
        zeros=st.booleans(),
    )
    def write(self, serial: str, track: int, delta: int, length: int, seed: int, zeros: bool) -> None:
        capacity = VOLUMES[serial][1] * TS
        offset = min(track * TS + delta, capacity - 1)
        length = min(length, capacity - offset)
        data = bytes(length) if zeros and seed % 4 == 0 else random.Random(seed).randbytes(length)
        self.ref.advance(self.now)
        expected = self.ref.write_error(serial)
        if not self.refused(expected, "write", lambda: self.array.write(serial, offset, data, now=self.now)):
            self.ref.write(serial, offset, data)

    @rule(source=ANY_SERIAL, dest=ANY_SERIAL, options=options_strategy())
    def establish(self, source: str, dest: str, options: FlashOptions) -> None:
        self.do_establish(source, dest, options)  # hypothesis reserves the keyword `target`

    @rule(data=st.data(), options=options_strategy())
    def establish_free_pair(self, data: st.DataObject, options: FlashOptions) -> None:
        """Most random pairs are refused; this one picks two 8-track volumes in no relationship."""
        busy = {v for key in self.ref.rels for v in key}
        free = [s for s in SERIALS if VOLUMES[s][1] == 8 and s not in busy]
        if len(free) < 2:
            free = SERIALS
        source = data.draw(st.sampled_from(free))
        self.do_establish(source, data.draw(st.sampled_from([s for s in free if s != source])), options)

    def do_establish(self, source: str, target: str, options: FlashOptions) -> None:
        self.ref.advance(self.now)
        expected = self.ref.establish_error(source, target, options)
        if self.refused(expected, "establish", lambda: self.array.establish(source, target, options, now=self.now)):
            return
        ref = self.ref
        ref.rels[(source, target)] = RefRel(source, target, VOLUMES[source][1], options, self.now)
        ref.data[target] = bytearray(ref.data[source])  # the naive point-in-time copy
        if options.freeze:
            ref.freeze(ref.lss(source), self.now)

    @rule(data=st.data(), freeze=st.booleans(), tag=st.sampled_from([None, "run-3"]))
    def resync(self, data: st.DataObject, freeze: bool, tag: str | None) -> None:
        source, target = self.pick_pair(data)
        ref = self.ref
        ref.advance(self.now)
        rel = ref.rels.get((source, target))
        expected = (
            RelationshipNotFound
            if rel is None
            else NotIncremental
            if not rel.recording
            else VolumeOffline
            if not (ref.online[source] and ref.online[target])
            else None
        )
        if self.refused(expected, "resync", lambda: self.array.resync(source, target, now=self.now, freeze=freeze, tag=tag)):
            return
        assert rel is not None
        ref.data[target] = bytearray(ref.data[source])
        for t in rel.src_changed | rel.tgt_changed:
            rel.copied[t] = False
        rel.src_changed, rel.tgt_changed = set(), set()
        rel.bg_start, rel.bg_done = self.now, 0
        rel.reversing = False
        if tag is not None:
            rel.tag = tag
        if freeze:
            ref.freeze(ref.lss(source), self.now)
        ref.settle((source, target))

    @rule(data=st.data(), tag=st.sampled_from([None, "run-4"]))
    def reverse(self, data: st.DataObject, tag: str | None) -> None:
        self.do_reverse(*self.pick_pair(data), tag)

    @rule(data=st.data(), tag=st.sampled_from([None, "run-4"]))
    def reverse_recording(self, data: st.DataObject, tag: str | None) -> None:
        recording = sorted(key for key, r in self.ref.rels.items() if r.recording)
        pair = data.draw(st.sampled_from(recording)) if recording else self.pick_pair(data)
        self.do_reverse(*pair, tag)

    def do_reverse(self, source: str, target: str, tag: str | None) -> None:
        ref = self.ref
        ref.advance(self.now)
        rel = ref.rels.get((source, target))
        expected = (
            RelationshipNotFound
            if rel is None
            else NotIncremental
            if not rel.recording
            else BackgroundCopyRunning
            if rel.oos()
            else CascadeRefused
            if len(ref.sources_of(source)) > 1
            else VolumeOffline
            if not (ref.online[source] and ref.online[target])
            else None
        )
        if self.refused(expected, "reverse", lambda: self.array.reverse(source, target, now=self.now, tag=tag)):
            return
        assert rel is not None
        changed = rel.src_changed | rel.tgt_changed
        del ref.rels[(source, target)]
        ref.data[source] = bytearray(ref.data[target])  # restore: the source becomes the target's image
        new = RefRel(target, source, len(rel.copied), FlashOptions(mode=rel.mode, record=True), self.now)
        new.tag = tag if tag is not None else rel.tag
        new.reversing = True
        new.copied = [t not in changed for t in range(len(rel.copied))]
        ref.rels[(target, source)] = new

    @rule(data=st.data(), after_copy=st.booleans())
    def withdraw(self, data: st.DataObject, after_copy: bool) -> None:
        source, target = self.pick_pair(data)
        ref = self.ref
        ref.advance(self.now)
        rel = ref.rels.get((source, target))
        expected = RelationshipNotFound if rel is None else None
        if self.refused(expected, "withdraw", lambda: self.array.withdraw(source, target, now=self.now, after_copy=after_copy)):
            return
        assert rel is not None
        if not after_copy or rel.oos() == 0:
            ref.withdraw_now(rel)
        else:
            rel.after_copy = True
            if rel.mode is CopyMode.NOCOPY:
                rel.mode = CopyMode.COPY
                rel.bg_start, rel.bg_done = self.now, 0

    @rule(lsses=st.lists(st.sampled_from(["10", "11", "12"]), max_size=3))
    def unfreeze(self, lsses: list[str]) -> None:
        ref = self.ref
        ref.advance(self.now)
        expected = []
        for lss in dict.fromkeys(lsses):
            if lss in ref.frozen:
                since, _ = ref.frozen.pop(lss)
                ref.release(lss, since, self.now, False)
                expected.append((lss, since, self.now, False))
        got = self.array.unfreeze(lsses, now=self.now)
        assert [(r.lss, r.since, r.released_at, r.by_timeout) for r in got] == expected

    @rule(serial=st.sampled_from(SERIALS), online=st.sampled_from([True, True, False]))
    def set_online(self, serial: str, online: bool) -> None:
        self.ref.advance(self.now)
        self.array.set_online(serial, online, now=self.now)
        self.ref.online[serial] = online

    @rule()
    def save_and_load(self) -> None:
        state = copy.deepcopy(self.array.to_state())
        self.array = Array.from_state(state)
        assert self.array.to_state() == state

    # ------------------------------------------------------------------ invariants

    @invariant()
    def every_byte_matches(self) -> None:
        self.ref.advance(self.now)
        for serial in SERIALS:
            expected = bytes(self.ref.data[serial])
            if not self.ref.online[serial]:
                try:
                    self.array.read(serial, 0, len(expected), now=self.now)
                except VolumeOffline:
                    continue
                raise AssertionError(f"read of offline {serial} did not fail")
            got = self.array.read(serial, 0, len(expected), now=self.now)
            if got != expected:
                bad = next(i for i in range(len(got)) if got[i] != expected[i])
                raise AssertionError(f"{serial}: first difference at byte {bad} (track {bad // TS})")
            outside = bytearray(expected)  # what is left after blanking the extents must be zeros
            for ext in self.array.extents(serial, now=self.now):
                outside[ext.offset : ext.offset + ext.length] = bytes(ext.length)
            assert outside == bytes(len(outside)), f"{serial}: non-zero data outside the extents"

    @invariant()
    def relationships_match(self) -> None:
        got = {
            (r.source, r.target): (r.mode, r.recording, r.persistent, r.tag, r.inhibit_target_writes,
                                   r.out_of_sync_tracks, r.state)
            for r in self.array.query(now=self.now)
        }
        expected = {
            key: (r.mode, r.recording, r.persistent, r.tag, r.inhibit, r.oos(),
                  CopyState.COPIED if r.oos() == 0 else CopyState.REVERSING if r.reversing else CopyState.COPYING)
            for key, r in self.ref.rels.items()
        }
        assert got == expected

    @invariant()
    def freezes_match(self) -> None:
        got = {f.lss: (f.since, f.deadline) for f in self.array.frozen_lsses(now=self.now)}
        assert got == self.ref.frozen
        releases = [(r.lss, r.since, r.released_at, r.by_timeout) for r in self.array.lss_releases(now=self.now)]
        assert releases == self.ref.releases


ArrayMachine.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestArrayAgainstReference = ArrayMachine.TestCase
