"""Content digests of LUN images and image files, cheap for sparse 1 TiB volumes.

A sha256 over every byte of a 1 TiB image hashes a terabyte of zeros; this digest hashes
only the tracks that hold data (index + bytes, in order), so it costs what the data costs
and is the same for a LUN read through the array and for the sparse file exported from it.
It is what the catalog records for every image, what `verify` compares, and what a restore
checks before it overwrites anything. (The export's `.sha256` stays the whole-file sum that
`sha256sum -c` understands.)
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator
from typing import Any

from flowcopy.site.api import TRACK_SIZE, Site

CHUNK_TRACKS = 64
"""Tracks read per call (4 MiB)."""

_ZERO_TRACK = bytes(TRACK_SIZE)


def track_runs(ranges: Iterable[tuple[int, int]], capacity: int) -> list[tuple[int, int]]:
    """Byte ranges (offset, length) -> sorted, merged runs of whole tracks (first, count)."""
    last = (capacity + TRACK_SIZE - 1) // TRACK_SIZE
    runs: list[tuple[int, int]] = []
    for offset, length in sorted(ranges):
        if length <= 0:
            continue
        first = offset // TRACK_SIZE
        end = min(last, (offset + length + TRACK_SIZE - 1) // TRACK_SIZE)
        if runs and first <= runs[-1][0] + runs[-1][1]:
            start, count = runs[-1]
            runs[-1] = (start, max(count, end - start))
        elif end > first:
            runs.append((first, end - first))
    return runs


def chunks(runs: Iterable[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    """Track runs cut into reads of at most CHUNK_TRACKS tracks: (first track, count)."""
    for first, count in runs:
        while count > 0:
            n = min(count, CHUNK_TRACKS)
            yield first, n
            first, count = first + n, count - n


def update(digest: Any, first: int, data: bytes) -> int:
    """Feed the non-zero tracks of `data` (starting at track `first`); returns tracks fed."""
    fed = 0
    for i in range(0, len(data), TRACK_SIZE):
        track = data[i : i + TRACK_SIZE]
        if len(track) < TRACK_SIZE:
            track = track + bytes(TRACK_SIZE - len(track))
        if track != _ZERO_TRACK:
            digest.update((first + i // TRACK_SIZE).to_bytes(8, "big"))
            digest.update(track)
            fed += 1
    return fed


def new_digest(capacity: int) -> Any:
    digest = hashlib.sha256(b"flowcopy-image-v1")
    digest.update(capacity.to_bytes(8, "big"))
    return digest


async def lun_digest(site: Site, serial: str, capacity: int) -> str:
    """The content digest of a LUN as a host reads it now (a target: its point-in-time image)."""
    digest = new_digest(capacity)
    runs = track_runs(((e.offset, e.length) for e in await site.extents(serial)), capacity)
    for first, count in chunks(runs):
        offset = first * TRACK_SIZE
        length = min(count * TRACK_SIZE, capacity - offset)
        update(digest, first, await site.read(serial, offset, length))
    return "c1:" + digest.hexdigest()


def data_ranges(fd: int, size: int) -> list[tuple[int, int]]:
    """The data regions of a sparse file (SEEK_DATA / SEEK_HOLE); the rest reads as zeros."""
    ranges: list[tuple[int, int]] = []
    position = 0
    while position < size:
        try:
            start = os.lseek(fd, position, os.SEEK_DATA)
        except OSError:  # ENXIO: no data after position
            break
        end = os.lseek(fd, start, os.SEEK_HOLE)
        ranges.append((start, min(end, size) - start))
        position = end
    return ranges


def file_digest(path: str | os.PathLike[str], capacity: int | None = None) -> str:
    """The content digest of an image file, reading only its data regions."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        capacity = size if capacity is None else capacity
        digest = new_digest(capacity)
        for first, count in chunks(track_runs(data_ranges(f.fileno(), size), capacity)):
            f.seek(first * TRACK_SIZE)
            update(digest, first, f.read(count * TRACK_SIZE))
    return "c1:" + digest.hexdigest()


def file_sha256(path: str | os.PathLike[str], chunk: int = 8 << 20) -> str:
    """The whole-file sha256 (what the `.sha256` file beside an export says)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
