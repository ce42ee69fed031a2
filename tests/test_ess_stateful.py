"""The array model against a deliberately naive reference, driven by hypothesis.

The reference keeps every volume as a full bytearray and copies the whole source into the
target at establish (the point-in-time image, taken eagerly), plus one plain list of
booleans per relationship saying which target tracks the array has physically copied
(needed only for what a withdraw leaves behind, for out-of-sync counts and for when a
relationship completes). Background copy in the reference: the array's one track per
second is shared equally by the copies running at each moment, simulated eagerly event by
event; each copy keeps its own credit, an integer count of ticks (2**-32 track), and
walks its lowest uncopied tracks, floor(credit / 2**32) minus those already walked. The
rounding is the array's documented one (flowcopy/site/copyclock.py), written again here
without its code: whenever the set of running copies changes (a copy starts, restarts,
stops or completes) every running copy's credit is fixed at that moment; in between it
is that value plus floor(seconds since * 2**32 / k) for k copies running; a copy completes
at the first float site time at which its credit reaches its tracks * 2**32.

The rules of issue 16 are in the reference too, written from the documents: a second
full bytearray per volume holds what it *physically* stores, so a withdrawn incomplete
target (or a fast-reversed former target) reads its old data where nothing was copied;
a freeze holds writes only to the frozen source volumes (per LSS: one ELB timer and the
set of sources), and every source hold is recorded; resync options replace the old ones;
`withdraw(after_copy)` of a persistent relationship keeps it; `reverse(fast=True)` runs
before the forward copy has finished and marks the former target unusable. Two volumes are
space-efficient in one small pool: each track written or copied into them takes pool space
once, they take no background copy and are never a source at establish, a copy-on-write
that finds the pool full fails every relationship whose target is in it (the source write
goes on, the failed target then reads the source where it had nothing copied), a host
write needing more space than is left is refused, `withdraw(release_space)` frees it.

After every step each byte of every volume is compared, plus the relationship list,
frozen sources, the release history and the hold records; every refused operation must
leave `to_state()` exactly as it was (after bringing the array up to `now` first).
"""

from __future__ import annotations

import copy
import itertools
import math
import random
from fractions import Fraction

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
    PoolFull,
    RelationshipFailed,
    SpaceEfficientRefused,
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
TICKS = 2**32  # a tick of copy time: 2**-32 of a track
RUNS = itertools.count()  # each start of a background copy in the reference has its own number
ELB = 10.0
VOLUMES = {  # serial -> (lss, tracks)
    "10010698": ("10", 8),
    "10110698": ("10", 8),
    "10210698": ("10", 8),
    "10311698": ("11", 8),
    "10411698": ("11", 8),
    "10511698": ("11", 6),
    "10610698": ("10", 8),  # space-efficient
    "10711698": ("11", 6),  # space-efficient
}
SE = {"10610698", "10711698"}
POOL_TRACKS = 3
UNKNOWN = "19999698"
SERIALS = sorted(VOLUMES)
ZEROS = bytes(max(n for _, n in VOLUMES.values()) * TS)
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
        self.failed = False
        self.copied = [False] * n
        self.base, self.bg_done = 0, 0  # ticks of copy time received since (re)start, at the last change
        self.run = next(RUNS)  # which (re)start of a background copy this is
        self.src_changed: set[int] = set()
        self.tgt_changed: set[int] = set()

    def oos(self) -> int:
        return self.copied.count(False)

    def dissolves(self) -> bool:
        return self.after_copy or (self.mode is CopyMode.COPY and not self.persistent)


class Ref:
    """Eager and slow on purpose: nothing here shares code or ideas of laziness with ess.py."""

    def __init__(self) -> None:
        self.data = {s: bytearray(n * TS) for s, (_, n) in VOLUMES.items()}  # what a host reads
        self.phys = {s: bytearray(n * TS) for s, (_, n) in VOLUMES.items()}  # what the volume stores
        self.online = {s: True for s in VOLUMES}
        self.unusable: set[str] = set()
        self.rels: dict[tuple[str, str], RefRel] = {}
        self.frozen: dict[str, tuple[float, float, dict[str, float]]] = {}
        self.releases: list[tuple[str, float, float, bool, tuple[str, ...]]] = []
        self.holds: list[tuple[str, float, float | None, bool]] = []
        self.t = 0.0  # how far the background copies have been simulated
        self.since, self.sharing = 0.0, frozenset()  # the last change of the running copies, and who ran then
        self.alloc: dict[str, set[int]] = {s: set() for s in SE}  # pool space each SE volume holds

    def pool_used(self) -> int:
        return sum(len(a) for a in self.alloc.values())

    def exhaust(self) -> None:
        for rel in self.rels.values():
            if rel.target in SE and not rel.failed:
                rel.failed = True
                self.unusable.add(rel.target)

    def copy_track(self, rel: RefRel, t: int) -> None:
        """The array physically copies track t to the target: it now stores its image there."""
        rel.copied[t] = True
        self.phys[rel.target][t * TS : (t + 1) * TS] = self.data[rel.target][t * TS : (t + 1) * TS]

    def lss(self, serial: str) -> str:
        return VOLUMES[serial][0]

    def running(self) -> list[RefRel]:
        return [r for r in self.rels.values() if r.mode is CopyMode.COPY and r.oos() > 0 and not r.failed]

    def credit(self, rel: RefRel, t: float) -> int:
        """rel's ticks at t (t not before the last change): the value then plus its share since."""
        return rel.base + math.floor((Fraction(t) - Fraction(self.since)) * TICKS / len(self.sharing))

    def done_at(self, rel: RefRel) -> float:
        """The first float site time at which rel's credit reaches all it has to walk."""
        exact = Fraction(self.since) + Fraction((rel.bg_done + rel.oos()) * TICKS - rel.base) * len(self.sharing) / TICKS
        f = float(exact)
        return f if Fraction(f) >= exact else math.nextafter(f, math.inf)

    def walk(self, rels: list[RefRel], t: float) -> None:
        for rel in rels:
            due = self.credit(rel, t) // TICKS - rel.bg_done
            for track in range(len(rel.copied)):
                if due <= 0:
                    break
                if not rel.copied[track]:
                    self.copy_track(rel, track)
                    rel.bg_done += 1
                    due -= 1

    def advance(self, now: float) -> None:
        end = float(now)
        while True:
            running = self.running()
            who = frozenset((r.source, r.target, r.run) for r in running)
            if who != self.sharing:  # a change: every running copy's credit is fixed now
                for rel in running:
                    rel.base = self.credit(rel, self.t) if (rel.source, rel.target, rel.run) in self.sharing else 0
                self.since, self.sharing = self.t, who
            if not running:
                break
            step = min(self.done_at(r) for r in running)
            if step > end:
                break
            self.walk(running, step)  # someone completes at `step`: a change
            self.t = step
            for key in list(self.rels):
                self.settle(key)
        self.t = max(self.t, end)
        self.walk(self.running(), self.t)
        for key in list(self.rels):
            self.settle(key)
        for lss, (since, deadline, sources) in list(self.frozen.items()):
            if now >= deadline:
                del self.frozen[lss]
                self.release(lss, since, deadline, True, sources)

    def settle(self, key: tuple[str, str]) -> None:
        rel = self.rels.get(key)
        if rel is not None and rel.oos() == 0 and rel.dissolves():
            del self.rels[key]

    def release(self, lss: str, since: float, at: float, by_timeout: bool, sources: dict[str, float]) -> None:
        self.releases.append((lss, since, at, by_timeout, tuple(sorted(sources))))
        self.releases.sort(key=lambda r: (r[2], r[0], r[1]))
        self.holds += [(serial, started, at, by_timeout) for serial, started in sources.items()]

    def freeze(self, serial: str, now: float) -> None:
        lss = self.lss(serial)
        if lss not in self.frozen:
            self.frozen[lss] = (now, now + ELB, {})
        self.frozen[lss][2].setdefault(serial, now)

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
        if s in SE or (t in SE and options.mode is CopyMode.COPY):
            return SpaceEfficientRefused
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

    def write_error(self, serial: str, tracks: range) -> type[Exception] | None:
        if not self.online[serial]:
            return VolumeOffline
        rel = self.as_target(serial)
        if rel is not None and rel.inhibit:
            return WriteInhibited
        if serial in self.frozen.get(self.lss(serial), (0, 0, {}))[2]:
            return LssHeld  # only a frozen source waits; its LSS's other volumes flow
        if rel is not None and rel.failed:
            return RelationshipFailed
        if serial in SE and len(set(tracks) - self.alloc[serial]) > POOL_TRACKS - self.pool_used():
            return PoolFull
        return None

    def write(self, serial: str, offset: int, data: bytes) -> None:
        tracks = range(offset // TS, (offset + len(data) - 1) // TS + 1)
        sources = self.sources_of(serial)
        target_of = self.as_target(serial)
        for t in tracks:  # track by track, each relationship in turn (who finds the pool full matters)
            for rel in sources:
                if rel.failed:
                    continue
                if not rel.copied[t]:
                    if rel.target in SE and t not in self.alloc[rel.target]:
                        if self.pool_used() >= POOL_TRACKS:
                            self.exhaust()
                            continue
                        self.alloc[rel.target].add(t)
                    self.copy_track(rel, t)  # copy-before-write
                if rel.recording:
                    rel.src_changed.add(t)
            if serial in SE:
                self.alloc[serial].add(t)
            rel = target_of
            if rel is not None:
                if not rel.copied[t]:
                    self.copy_track(rel, t)  # the track becomes the target's own: filled first
                if rel.recording:
                    rel.tgt_changed.add(t)
        self.data[serial][offset : offset + len(data)] = data
        self.phys[serial][offset : offset + len(data)] = data
        for rel in sources:  # a failed target reads the source wherever it had nothing copied
            if rel.failed:
                for t in tracks:
                    if not rel.copied[t]:
                        self.data[rel.target][t * TS : (t + 1) * TS] = self.data[serial][t * TS : (t + 1) * TS]
        for key in list(self.rels):
            self.settle(key)

    def withdraw_now(self, rel: RefRel) -> None:
        target = self.data[rel.target]
        for t, done in enumerate(rel.copied):
            if not done:  # never copied: the withdrawn target reads its old physical data there
                target[t * TS : (t + 1) * TS] = self.phys[rel.target][t * TS : (t + 1) * TS]
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
        self.array.add_space_pool("p", POOL_TRACKS * TS)
        for serial, (lss, n) in VOLUMES.items():
            self.array.add_volume(serial, lss=lss, capacity=n * TS, space_pool="p" if serial in SE else None)
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
        expected = self.ref.write_error(serial, range(offset // TS, (offset + length - 1) // TS + 1))
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
        ref.unusable.discard(target)
        if options.freeze:
            ref.freeze(source, self.now)

    @rule(data=st.data(), freeze=st.booleans(), tag=st.sampled_from([None, "run-3"]),
          options=st.one_of(st.none(), options_strategy()))
    def resync(self, data: st.DataObject, freeze: bool, tag: str | None, options: FlashOptions | None) -> None:
        source, target = self.pick_pair(data)
        ref = self.ref
        ref.advance(self.now)
        rel = ref.rels.get((source, target))
        given = options if options is not None else FlashOptions(freeze=freeze, tag=tag)  # they replace the old ones
        expected = (
            RelationshipNotFound
            if rel is None
            else RelationshipFailed
            if rel.failed
            else NotIncremental
            if not rel.recording
            else SpaceEfficientRefused
            if target in SE and given.mode is CopyMode.COPY
            else VolumeOffline
            if not (ref.online[source] and ref.online[target])
            else None
        )
        call = lambda: self.array.resync(source, target, now=self.now, freeze=freeze, tag=tag, options=options)  # noqa: E731
        if self.refused(expected, "resync", call):
            return
        assert rel is not None
        ref.data[target] = bytearray(ref.data[source])
        for t in rel.src_changed | rel.tgt_changed:
            rel.copied[t] = False
        rel.src_changed, rel.tgt_changed = set(), set()
        rel.bg_done, rel.run = 0, next(RUNS)  # a restart: its credit starts again at 0
        rel.reversing = False
        rel.mode, rel.recording = given.mode, given.record
        rel.persistent = given.persistent or given.record
        rel.inhibit, rel.after_copy = given.inhibit_target_writes, False
        new_tag = given.tag if given.tag is not None else tag
        if new_tag is not None:
            rel.tag = new_tag
        if freeze or given.freeze:
            ref.freeze(source, self.now)
        ref.settle((source, target))

    @rule(data=st.data(), tag=st.sampled_from([None, "run-4"]), fast=st.booleans())
    def reverse(self, data: st.DataObject, tag: str | None, fast: bool) -> None:
        self.do_reverse(*self.pick_pair(data), tag, fast)

    @rule(data=st.data(), tag=st.sampled_from([None, "run-4"]), fast=st.booleans())
    def reverse_recording(self, data: st.DataObject, tag: str | None, fast: bool) -> None:
        recording = sorted(key for key, r in self.ref.rels.items() if r.recording)
        pair = data.draw(st.sampled_from(recording)) if recording else self.pick_pair(data)
        self.do_reverse(*pair, tag, fast)

    def do_reverse(self, source: str, target: str, tag: str | None, fast: bool = False) -> None:
        ref = self.ref
        ref.advance(self.now)
        rel = ref.rels.get((source, target))
        expected = (
            RelationshipNotFound
            if rel is None
            else RelationshipFailed
            if rel.failed
            else NotIncremental
            if not rel.recording
            else BackgroundCopyRunning
            if rel.oos() and not fast
            else CascadeRefused
            if len(ref.sources_of(source)) > 1
            else VolumeOffline
            if not (ref.online[source] and ref.online[target])
            else None
        )
        if self.refused(expected, "reverse", lambda: self.array.reverse(source, target, now=self.now, tag=tag, fast=fast)):
            return
        assert rel is not None
        changed = rel.src_changed | rel.tgt_changed
        del ref.rels[(source, target)]
        ref.data[source] = bytearray(ref.data[target])  # restore: the source becomes the target's image
        ref.data[target] = bytearray(ref.phys[target])  # the former target now reads what it stores
        if rel.oos():
            ref.unusable.add(target)  # fast reverse restore before the copy finished
        ref.unusable.discard(source)
        mode = CopyMode.NOCOPY if source in SE else rel.mode  # no background copy onto a space-efficient volume
        new = RefRel(target, source, len(rel.copied), FlashOptions(mode=mode, record=True), self.now)
        new.tag = tag if tag is not None else rel.tag
        new.reversing = True
        new.copied = [t not in changed for t in range(len(rel.copied))]
        n = len(rel.copied)
        # a fast reverse: the former target never got its uncopied tracks; where it stores
        # something else than the restored source, that counts as a change on it
        new.src_changed = {t for t in range(n) if not rel.copied[t]
                           and ref.phys[target][t * TS : (t + 1) * TS] != ref.data[source][t * TS : (t + 1) * TS]}
        ref.rels[(target, source)] = new

    @rule(data=st.data(), after_copy=st.booleans(), release=st.booleans())
    def withdraw(self, data: st.DataObject, after_copy: bool, release: bool) -> None:
        source, target = self.pick_pair(data)
        ref = self.ref
        ref.advance(self.now)
        rel = ref.rels.get((source, target))
        expected = (
            RelationshipNotFound
            if rel is None
            else SpaceEfficientRefused
            if after_copy and target in SE and rel.oos() > 0
            else None
        )
        call = lambda: self.array.withdraw(source, target, now=self.now, after_copy=after_copy, release_space=release)  # noqa: E731
        if self.refused(expected, "withdraw", call):
            return
        assert rel is not None
        if not after_copy or (rel.oos() == 0 and not rel.persistent):
            ref.withdraw_now(rel)
            if release and target in SE:  # -tgtreleasespace: its tracks go back to the pool, it reads zeros
                ref.alloc[target].clear()
                ref.data[target][:] = bytes(len(ref.data[target]))
                ref.phys[target][:] = bytes(len(ref.phys[target]))
        else:
            rel.after_copy = not rel.persistent  # -cp keeps a persistent relationship
            if rel.mode is CopyMode.NOCOPY:
                rel.mode = CopyMode.COPY
                rel.bg_done, rel.run = 0, next(RUNS)

    @rule(lsses=st.lists(st.sampled_from(["10", "11", "12"]), max_size=3))
    def unfreeze(self, lsses: list[str]) -> None:
        ref = self.ref
        ref.advance(self.now)
        expected = []
        for lss in dict.fromkeys(lsses):
            if lss in ref.frozen:
                since, _, sources = ref.frozen.pop(lss)
                ref.release(lss, since, self.now, False, sources)
                expected.append((lss, since, self.now, False, tuple(sorted(sources))))
        got = self.array.unfreeze(lsses, now=self.now)
        assert [(r.lss, r.since, r.released_at, r.by_timeout, r.sources) for r in got] == expected

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
            expected = self.ref.data[serial]
            if not self.ref.online[serial]:
                try:
                    self.array.read(serial, 0, len(expected), now=self.now)
                except VolumeOffline:
                    continue
                raise AssertionError(f"read of offline {serial} did not fail")
            assert (self.array.volume(serial).unusable is not None) == (serial in self.ref.unusable), serial
            got = self.array.read(serial, 0, len(expected), now=self.now)
            if got != expected:
                bad = next(i for i in range(len(got)) if got[i] != expected[i])
                raise AssertionError(f"{serial}: first difference at byte {bad} (track {bad // TS})")
            pos = 0  # every byte outside the extents must be zero (bytes compare by memcmp; a memoryview does not)
            for ext in sorted(self.array.extents(serial, now=self.now), key=lambda e: e.offset):
                assert got[pos : ext.offset] == ZEROS[: max(0, ext.offset - pos)], f"{serial}: non-zero data before {ext}"
                pos = max(pos, ext.offset + ext.length)
            assert got[pos:] == ZEROS[: len(got) - pos], f"{serial}: non-zero data after the last extent"

    @invariant()
    def relationships_match(self) -> None:
        got = {
            (r.source, r.target): (r.mode, r.recording, r.persistent, r.tag, r.inhibit_target_writes,
                                   r.out_of_sync_tracks, r.state, r.space_efficient)
            for r in self.array.query(now=self.now)
        }
        expected = {
            key: (r.mode, r.recording, r.persistent, r.tag, r.inhibit, r.oos(),
                  CopyState.FAILED if r.failed else CopyState.COPIED if r.oos() == 0
                  else CopyState.REVERSING if r.reversing else CopyState.COPYING, r.target in SE)
            for key, r in self.ref.rels.items()
        }
        assert got == expected
        (pool,) = self.array.list_space_pools()
        assert pool.used == self.ref.pool_used() * TS

    @invariant()
    def freezes_match(self) -> None:
        got = {f.lss: (f.since, f.deadline, dict.fromkeys(f.sources)) for f in self.array.frozen_lsses(now=self.now)}
        assert got == {lss: (since, deadline, dict.fromkeys(sorted(src))) for lss, (since, deadline, src) in self.ref.frozen.items()}
        releases = [(r.lss, r.since, r.released_at, r.by_timeout, r.sources) for r in self.array.lss_releases(now=self.now)]
        assert releases == self.ref.releases
        def key(h: tuple) -> tuple:
            return (h[0], h[1], h[2] is None, h[2] or 0.0)

        holds = sorted(((h.serial, h.since, h.released_at, h.by_timeout) for h in self.array.hold_history(now=self.now)), key=key)
        current = [(serial, at, None, False) for _, _, src in self.ref.frozen.values() for serial, at in src.items()]
        assert holds == sorted(self.ref.holds + current, key=key)


ArrayMachine.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestArrayAgainstReference = ArrayMachine.TestCase
