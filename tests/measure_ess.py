"""Figures of the array model (DESIGN.md §5 "Site model"); printed, not asserted.

    .venv/bin/python tests/measure_ess.py

Not collected by pytest (no test_ prefix): wall-clock figures depend on the machine.
"""

from __future__ import annotations

import random
import time
import tracemalloc

from flowcopy.site.api import TRACK_SIZE, CopyMode, FlashOptions
from flowcopy.site.ess import Array

GIB, TIB = 1 << 30, 1 << 40
NOCOPY = FlashOptions(mode=CopyMode.NOCOPY)


def establish_time(capacity: int, rounds: int = 5000) -> float:
    """Seconds per establish (+ immediate withdraw) of a pair of `capacity` with a few written tracks."""
    array = Array()
    array.add_volume("20313698", lss="13", capacity=capacity)
    array.add_volume("20413698", lss="13", capacity=capacity)
    for k in range(8):
        array.write("20313698", (capacity // 8) * k, b"x" * 4096, now=0)
    start = time.perf_counter()
    for n in range(rounds):
        array.establish("20313698", "20413698", FlashOptions(), now=n)
        array.withdraw("20313698", "20413698", now=n)
    return (time.perf_counter() - start) / rounds


def write_time(targets: int, mode: CopyMode, writes: int = 20000) -> float:
    """Seconds per 4 KiB host write to random tracks of a 1 TiB source with `targets` targets."""
    array = Array()
    array.add_volume("20313698", lss="13", capacity=TIB)
    for n in range(targets):
        serial = f"{400 + n:03d}13698"
        array.add_volume(serial, lss="13", capacity=TIB)
        array.establish("20313698", serial, FlashOptions(mode=mode), now=0)
    rng = random.Random(1)
    offsets = [rng.randrange(TIB // TRACK_SIZE) * TRACK_SIZE + rng.randrange(16) * 4096 for _ in range(writes)]
    data = bytes(range(256)) * 16
    start = time.perf_counter()
    for n, offset in enumerate(offsets):
        array.write("20313698", offset, data, now=1 + n * 1e-3)
    return (time.perf_counter() - start) / writes


def idle_volume_bytes(count: int = 10000) -> float:
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    array = Array()
    for n in range(count):
        array.add_volume(f"{n % 1000:03d}{n // 1000 + 10:02d}698", lss=f"{n // 1000 + 10:02d}", capacity=TIB)
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    assert len(array.volumes()) == count
    return used / count


def idle_relationship_bytes(count: int = 2000) -> float:
    array = Array()
    for n in range(2 * count):
        array.add_volume(f"{n % 1000:03d}{n // 1000 + 10:02d}698", lss=f"{n // 1000 + 10:02d}", capacity=TIB)
    serials = [v.serial for v in array.volumes()]
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    for n in range(count):
        array.establish(serials[2 * n], serials[2 * n + 1], NOCOPY, now=0)
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    return used / count


def query_time(count: int) -> float:
    """CPU seconds of one query of `count` running copies, each established at its own
    moment (every establish changes the running set: what made an exact copy clock slow)."""
    array = Array(bandwidth=50 * (1 << 20))
    pairs = [(f"{n % 1000:03d}{10 + n // 1000:02d}698", f"{n % 1000:03d}{50 + n // 1000:02d}698") for n in range(count)]
    for source, target in pairs:
        array.add_volume(source, lss=source[3:5], capacity=16 << 30)
        array.add_volume(target, lss=target[3:5], capacity=16 << 30)
    for n, (source, target) in enumerate(pairs):
        array.establish(source, target, FlashOptions(persistent=True), now=n * 0.0007)
    start = time.process_time()
    assert len(array.query(now=count * 0.0007 + 0.1)) == count
    return time.process_time() - start


def best(measure, *args, runs: int = 3) -> float:  # noqa: ANN001 - a measuring function
    """Best of a few runs: other processes on the machine only ever add time."""
    return min(measure(*args) for _ in range(runs))


def main() -> None:
    gib, tib = best(establish_time, GIB), best(establish_time, TIB)
    print(f"establish + withdraw, 1 GiB pair: {gib * 1e6:8.1f} us")
    print(f"establish + withdraw, 1 TiB pair: {tib * 1e6:8.1f} us   (ratio {tib / gib:.2f})")
    plain = best(write_time, 0, CopyMode.NOCOPY)
    print(f"4 KiB write, no relationship:            {plain * 1e6:8.1f} us")
    for targets, mode in ((1, CopyMode.NOCOPY), (1, CopyMode.COPY), (12, CopyMode.NOCOPY)):
        t = best(write_time, targets, mode)
        print(
            f"4 KiB write, {targets:2d} {mode.value:6s} target(s), first touch: {t * 1e6:8.1f} us"
            f"   (copy-on-write overhead {(t - plain) * 1e6:6.1f} us)"
        )
    for count in (4000, 10000):
        print(f"query of {count:5d} running copies:        {best(query_time, count):8.3f} s CPU")
    print(f"memory per idle 1 TiB volume:            {idle_volume_bytes():8.0f} bytes")
    print(f"memory per idle 1 TiB nocopy relationship: {idle_relationship_bytes():6.0f} bytes")


if __name__ == "__main__":
    main()
