"""The independent image checker: is a set of LUN images consistent, and if not, what is wrong.

It reads through a `read(serial, offset, length) -> bytes` function only (a site's
images at one instant, see `LocalSite.read_at`, or images pulled over any Site with
`pull_images`) and implements the on-disk formats on its own: it must not import the
workload writers, so a bug in a writer cannot hide itself by being shared with its judge.

Formats (documented in full in `flowcopy.site.workloads`' docstring, re-read here):
FCFS — a file system with a superblock, a metadata journal, inodes with per-block
checksums and shadow-copied data blocks; FCDB — a log LUN and a data-page LUN where every
page carries the sequence number of the log record it reflects.

Images of real software (SQLite files on LUNs, ext4) are handed to
`flowcopy.site.apps.sqlite_check` / `ext4_check`, which judge them with SQLite and e2fsck.

Every problem names the object and the place: "file orders.csv block 3 checksum
mismatch", "page 812 on 20714698 reflects log record 4411 which the log image on
20513698 lacks (the log ends at record 4409)", "superblock unreadable".
"""

from __future__ import annotations

import hashlib
import re
import struct
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from flowcopy.site.api import CheckReport
from flowcopy.site.apps import ext4_check, sqlite_check

Read = Callable[[str, int, int], bytes]

BLOCK = 4096

FS_MAGIC = b"FCFS\x00v01"
SB_FMT = "<8sIIQIIIIIIQ32s"
JR_MAGIC = b"FCJR"
JR_FMT = "<4sQII"
IN_MAGIC = b"FCIN"
IN_FMT = "<4sIIQQI64s"
IN_BLOCK_FMT = "<BI"

LOG_MAGIC = b"FCDBLOG1"
DATA_MAGIC = b"FCDBDAT1"
LOG_HDR_FMT = "<8sIIQ32s"
DATA_HDR_FMT = "<8sIII32s"
REC_MAGIC = b"FCLR"
REC_FMT = "<4sQIQ"
PAGE_MAGIC = b"FCPG"
PAGE_FMT = "<4sIQQ"

LOG_SCAN_LIMIT = 1 << 16  # log records verified back from the head (older ones: only those pages cite)


def _crc(data: bytes) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def _crc_ok(block: bytes, length: int) -> bool:
    """A header/record of `length` bytes followed by its crc32."""
    if len(block) < length + 4:
        return False
    (crc,) = struct.unpack_from("<I", block, length)
    return crc == _crc(block[:length])


# --------------------------------------------------------------------------- FCFS


def _mount(read: Read, serial: str) -> tuple[dict[str, Any], list[str], dict[str, bytes]]:
    """Mount an FCFS image: (facts, problems, files). Raises nothing for bad images."""
    problems: list[str] = []
    files: dict[str, bytes] = {}
    sb = read(serial, 0, BLOCK)
    sb_len = struct.calcsize(SB_FMT)
    if not any(sb):
        return {}, [f"superblock unreadable on {serial}: block 0 is all zeros (never formatted)"], files
    if sb[:8] != FS_MAGIC:
        return {}, [f"superblock unreadable on {serial}: bad magic {sb[:8]!r}"], files
    if not _crc_ok(sb, sb_len):
        return {}, [f"superblock unreadable on {serial}: checksum mismatch (torn superblock)"], files
    (_m, version, block_size, generation, j_start, j_blocks, i_start, i_count, d_start, f_blocks, total, label) = (
        struct.unpack_from(SB_FMT, sb)
    )
    if block_size != BLOCK or version != 1 or f_blocks <= 0 or j_blocks <= 0:
        return {}, [f"superblock unreadable on {serial}: unsupported version {version} / block size {block_size}"], files
    facts: dict[str, Any] = {"generation": generation, "label": label.rstrip(b"\0").decode(errors="replace")}
    in_len = struct.calcsize(IN_FMT) + f_blocks * struct.calcsize(IN_BLOCK_FMT)

    table = read(serial, i_start * BLOCK, i_count * BLOCK)
    inodes: dict[int, bytes] = {}
    bad_inodes: dict[int, str] = {}
    for slot in range(i_count):
        raw = table[slot * BLOCK : slot * BLOCK + BLOCK]
        if not any(raw):
            continue
        if raw[:4] != IN_MAGIC or not _crc_ok(raw, in_len):
            bad_inodes[slot] = f"inode {slot} (block {i_start + slot}) checksum mismatch: torn metadata"
            continue
        inodes[slot] = raw[: in_len + 4]

    # journal replay: records generation+1, +2, ... while each is present and intact
    journal = read(serial, j_start * BLOCK, j_blocks * BLOCK)
    jr_len = struct.calcsize(JR_FMT)
    replayed = 0
    seq = generation
    for _ in range(j_blocks):
        nxt = seq + 1
        at = ((nxt - 1) % j_blocks) * BLOCK
        rec = journal[at : at + BLOCK]
        magic, rseq, slot, length = struct.unpack_from(JR_FMT, rec)
        if magic != JR_MAGIC or rseq != nxt or length != in_len + 4 or not _crc_ok(rec, jr_len + length):
            break
        inode = rec[jr_len : jr_len + length]
        if slot >= i_count:
            problems.append(f"journal record {nxt} names inode {slot} beyond the inode table ({i_count})")
            break
        current = inodes.get(slot)
        if current is None or struct.unpack_from(IN_FMT, current)[3] < nxt:
            inodes[slot] = inode
            bad_inodes.pop(slot, None)  # the replay rewrites a torn in-place inode
        seq = nxt
        replayed += 1
    facts["replayed"] = replayed
    problems.extend(bad_inodes.values())

    last = seq
    for slot in sorted(inodes):
        inode = inodes[slot]
        if not _crc_ok(inode, in_len):
            problems.append(f"inode {slot} from the journal fails its checksum")
            continue
        _m, _s, in_use, iseq, size, nblocks, name_raw = struct.unpack_from(IN_FMT, inode)
        if not in_use:
            continue
        name = name_raw.rstrip(b"\0").decode(errors="replace")
        last = max(last, iseq)
        if nblocks > f_blocks or size > nblocks * BLOCK or (size and size <= (nblocks - 1) * BLOCK):
            problems.append(f"file {name}: size {size} does not fit its {nblocks} blocks")
            continue
        content = bytearray()
        head = struct.calcsize(IN_FMT)
        for b in range(nblocks):
            copy, crc = struct.unpack_from(IN_BLOCK_FMT, inode, head + b * struct.calcsize(IN_BLOCK_FMT))
            if copy not in (0, 1):
                problems.append(f"file {name} block {b}: bad block copy {copy}")
                break
            phys = d_start + (slot * f_blocks + b) * 2 + copy
            if phys >= total:
                problems.append(f"file {name} block {b}: block {phys} beyond the file system ({total} blocks)")
                break
            data = read(serial, phys * BLOCK, BLOCK)
            if _crc(data) != crc:
                problems.append(f"file {name} block {b} checksum mismatch (block {phys} on {serial})")
            content += data
        if name in files:
            problems.append(f"file {name} appears twice in the directory")
        files[name] = bytes(content[:size])
    facts["last_operation"] = last
    return facts, problems, files


def check_filesystem(read: Read, serial: str) -> CheckReport:
    """Mount an FCFS image (journal replay included) and verify every file block."""
    facts, problems, files = _mount(read, serial)
    summary: dict[str, str] = {"serial": serial}
    if facts:
        summary.update(
            {
                "label": facts["label"],
                "generation": str(facts["generation"]),
                "last_operation": str(facts["last_operation"]),
                "journal_replayed": str(facts["replayed"]),
                "files": str(len(files)),
            }
        )
        for name in sorted(files):
            summary[f"file:{name}"] = f"{len(files[name])}:{hashlib.sha256(files[name]).hexdigest()}"
        summary["digest"] = hashlib.sha256(
            b"".join(n.encode() + b"\0" + hashlib.sha256(files[n]).digest() for n in sorted(files))
        ).hexdigest()
    return CheckReport(consistent=not problems, kind="filesystem", problems=tuple(problems), summary=summary)


def read_files(read: Read, serial: str) -> dict[str, bytes]:
    """The files of a mountable FCFS image (what a second guest sees after mounting it)."""
    _facts, problems, files = _mount(read, serial)
    if problems:
        raise ValueError(f"{serial} does not mount cleanly: {'; '.join(problems)}")
    return files


# --------------------------------------------------------------------------- FCDB


def _record(read: Read, serial: str, capacity: int, slot: int) -> tuple[int, int, int] | None:
    """(seq, page, value) of the record in a log slot, None if empty/torn."""
    rec = read(serial, BLOCK + slot * 128, 128)
    magic, seq, page, value = struct.unpack_from(REC_FMT, rec)
    if magic != REC_MAGIC or not _crc_ok(rec, 124):
        return None
    return seq, page, value


def check_database(read: Read, log_serial: str, data_serial: str) -> CheckReport:
    """Dependent-write consistency: no page reflects a log record the log image lacks."""
    problems: list[str] = []
    summary: dict[str, str] = {"log": log_serial, "data": data_serial}
    log_hdr = read(log_serial, 0, BLOCK)
    data_hdr = read(data_serial, 0, BLOCK)
    lh_len = struct.calcsize(LOG_HDR_FMT)
    dh_len = struct.calcsize(DATA_HDR_FMT)
    if log_hdr[:8] != LOG_MAGIC or not _crc_ok(log_hdr, lh_len):
        problems.append(f"log header unreadable on {log_serial}")
    if data_hdr[:8] != DATA_MAGIC or not _crc_ok(data_hdr, dh_len):
        problems.append(f"data header unreadable on {data_serial}")
    if problems:
        return CheckReport(consistent=False, kind="database", problems=tuple(problems), summary=summary)
    _m, _v, rec_size, capacity, log_name = struct.unpack_from(LOG_HDR_FMT, log_hdr)
    _m, _v, page_size, pages, data_name = struct.unpack_from(DATA_HDR_FMT, data_hdr)
    if log_name != data_name:
        problems.append(
            f"log {log_serial} belongs to database {log_name.rstrip(bytes(1)).decode(errors='replace')!r} but "
            f"data {data_serial} to {data_name.rstrip(bytes(1)).decode(errors='replace')!r}"
        )
    if rec_size != 128 or page_size != BLOCK or capacity <= 0:
        problems.append(f"unsupported database geometry (record {rec_size}, page {page_size})")
        return CheckReport(consistent=False, kind="database", problems=tuple(problems), summary=summary)
    summary["database"] = log_name.rstrip(b"\0").decode(errors="replace")

    # the log head: the last slot written in the same lap as slot 0 (records are appended in order)
    first = _record(read, log_serial, capacity, 0)
    head = 0
    if first is not None:
        lo, hi = 0, capacity - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            rec = _record(read, log_serial, capacity, mid)
            if rec is not None and rec[0] == first[0] + mid:
                lo = mid
            else:
                hi = mid - 1
        head = first[0] + lo
    oldest = max(1, head - capacity + 1)
    summary["log_head"] = str(head)

    # verify the log's tail back from the head: contiguous, intact records
    scan_from = max(oldest, head - LOG_SCAN_LIMIT + 1)
    log: dict[int, tuple[int, int]] = {}
    digest = hashlib.sha256()
    if head:
        start_slot = (scan_from - 1) % capacity
        count = head - scan_from + 1
        # one read for the contiguous part, a second one if the window wraps
        chunks = []
        first_part = min(count, capacity - start_slot)
        chunks.append(read(log_serial, BLOCK + start_slot * 128, first_part * 128))
        if count > first_part:
            chunks.append(read(log_serial, BLOCK, (count - first_part) * 128))
        raw = b"".join(chunks)
        for i in range(count):
            seq_expected = scan_from + i
            rec = raw[i * 128 : (i + 1) * 128]
            magic, seq, page, value = struct.unpack_from(REC_FMT, rec)
            if magic != REC_MAGIC or not _crc_ok(rec, 124):
                problems.append(f"log record {seq_expected} on {log_serial} is missing or torn (slot {(seq_expected - 1) % capacity})")
                continue
            if seq != seq_expected:
                problems.append(f"log slot {(seq_expected - 1) % capacity} on {log_serial} holds record {seq}, expected {seq_expected}")
                continue
            log[seq] = (page, value)
            digest.update(rec)
    summary["log_records"] = str(len(log))
    summary["log_digest"] = digest.hexdigest()

    # every page must reflect a record the log image holds, for that page and value
    raw_pages = read(data_serial, BLOCK, pages * BLOCK)
    p_len = struct.calcsize(PAGE_FMT)
    page_digest = hashlib.sha256()
    written = 0
    for p in range(pages):
        page = raw_pages[p * BLOCK : (p + 1) * BLOCK]
        if not any(page[:p_len]):
            if any(page):
                problems.append(f"page {p} on {data_serial} is torn (header missing, body present)")
            continue
        magic, pid, seq, value = struct.unpack_from(PAGE_FMT, page)
        if magic != PAGE_MAGIC or not _crc_ok(page, BLOCK - 4):
            problems.append(f"page {p} on {data_serial} checksum mismatch (torn page)")
            continue
        if pid != p:
            problems.append(f"page {p} on {data_serial} carries page id {pid}")
            continue
        written += 1
        page_digest.update(struct.pack("<IQQ", p, seq, value))
        if seq > head:
            problems.append(
                f"page {p} on {data_serial} reflects log record {seq} which the log image on {log_serial} "
                f"lacks (the log ends at record {head})"
            )
            continue
        if seq < oldest:
            continue  # the log wrapped past it: checkpointed long ago
        rec = log.get(seq)
        if rec is None:
            slot_rec = _record(read, log_serial, capacity, (seq - 1) % capacity)
            rec = (slot_rec[1], slot_rec[2]) if slot_rec is not None and slot_rec[0] == seq else None
        if rec is None:
            problems.append(
                f"page {p} on {data_serial} reflects log record {seq} which the log image on {log_serial} lacks"
            )
        elif rec != (p, value):
            problems.append(
                f"page {p} on {data_serial} (seq {seq}, value {value}) disagrees with log record {seq} "
                f"(page {rec[0]}, value {rec[1]})"
            )
    summary["pages_written"] = str(written)
    summary["pages_digest"] = page_digest.hexdigest()
    return CheckReport(consistent=not problems, kind="database", problems=tuple(problems), summary=summary)


# --------------------------------------------------------------------------- sniffing


REAL_KINDS = frozenset({"sqlite-file", "ext4"})
"""Images written by real software, judged by that software's own tools (slower: files, processes)."""


def sniff(read: Read, serial: str) -> str:
    """What an image holds, by its first blocks: filesystem, db-log, db-data, sqlite-file, ext4, empty, unknown."""
    head = read(serial, 0, 16)
    if head[:8] == FS_MAGIC:
        return "filesystem"
    if head[:8] == LOG_MAGIC:
        return "db-log"
    if head[:8] == DATA_MAGIC:
        return "db-data"
    if head[:8] == sqlite_check.MAGIC:
        return "sqlite-file"
    if ext4_check.is_ext(read, serial):
        return "ext4"
    first = read(serial, 0, BLOCK)
    if first.count(0) == len(first):  # all zero (C speed; any() walks the block byte by byte)
        return "empty"
    return "unknown"


def _listed(serials: Sequence[str], most: int = 8) -> str:
    """The checked serials for a message; a long check would make every message as long as itself."""
    shown = ", ".join(serials[:most])
    return shown if len(serials) <= most else f"{shown} and {len(serials) - most} more"


def _check_real(read: Read, serials: Sequence[str], kinds: Mapping[str, str], expect: Mapping[str, Mapping[str, Any]],
                problems: list[str], summary: dict[str, str], found: list[str]) -> None:
    """SQLite files (a main file with its journal/WAL, paired by name) and ext4 file systems."""
    files = {s: sqlite_check.lun_file(read, s) for s in serials if kinds[s] == "sqlite-file"}
    by_name = {info[0]: s for s, info in files.items() if info is not None}
    for name, serial in sorted(by_name.items()):
        if name.endswith(("-journal", "-wal")):
            if name.rsplit("-", 1)[0] not in by_name:
                problems.append(f"SQLite file {name} on {serial} has no main database among {', '.join(serials)}")
            continue
        group = [serial] + [by_name[n] for n in (f"{name}-journal", f"{name}-wal") if n in by_name]
        marks = [expect[s] for s in group if expect.get(s, {}).get("kind") == "sqlite"]
        point = {"committed": min(int(m["committed"]) for m in marks)} if marks else None
        report = sqlite_check.check_sqlite(read, group, point)
        found.append("sqlite")
        problems.extend(report.problems)
        summary.update({f"{'+'.join(group)}:{k}": v for k, v in report.summary.items()})
    systems, lone = ext4_check.pair(read, [s for s in serials if kinds[s] == "ext4"])
    for serial, journal, missing in systems:  # a file system with its external journal's LUN, if any
        marks = [expect[s] for s in (serial, journal) if s and expect.get(s, {}).get("kind") == "ext4"]
        report = ext4_check.check_ext4(read, serial, marks, journal=journal, missing_journal=missing)
        found.append("ext4")
        problems.extend(report.problems)
        summary.update({f"{serial}:{k}": v for k, v in report.summary.items()})
    for serial in lone:
        summary[f"{serial}:kind"] = "ext4 journal device (no file system among the images uses it)"


def check_images(read: Read, serials: Sequence[str], expect: Mapping[str, Mapping[str, Any]] | None = None) -> CheckReport:
    """Sniff each image's format and check it; databases pair a log with its data LUN by name.

    Images of real applications (SQLite, ext4) are judged by SQLite and e2fsck beside
    ours; `expect` maps a serial to the point in time its application had at establish
    (what the image must hold at least), when the site knows it.
    """
    kinds = {serial: sniff(read, serial) for serial in serials}
    problems: list[str] = []
    summary: dict[str, str] = {}
    found: list[str] = []
    logs = [s for s in serials if kinds[s] == "db-log"]
    datas = [s for s in serials if kinds[s] == "db-data"]
    paired: set[str] = set()
    for log in logs:
        name = read(log, 0, BLOCK)[24:56]
        match = [d for d in datas if d not in paired and read(d, 0, BLOCK)[20:52] == name]
        if not match:
            problems.append(f"database log {log} has no data LUN among {_listed(serials)}")
            continue
        data = match[0]
        paired.update({log, data})
        found.append("database")
        report = check_database(read, log, data)
        problems.extend(report.problems)
        summary.update({f"{log}+{data}:{k}": v for k, v in report.summary.items()})
    for data in datas:
        if data not in paired:
            problems.append(f"database data {data} has no log LUN among {_listed(serials)}")
    if any(k in REAL_KINDS for k in kinds.values()):
        _check_real(read, serials, kinds, expect or {}, problems, summary, found)
    for serial in serials:
        kind = kinds[serial]
        if kind == "filesystem":
            found.append("filesystem")
            report = check_filesystem(read, serial)
            problems.extend(report.problems)
            summary.update({f"{serial}:{k}": v for k, v in report.summary.items()})
        elif kind == "empty":
            summary[f"{serial}:kind"] = "empty"
        elif kind == "unknown":
            problems.append(f"superblock unreadable on {serial}: no known format (not FCFS, not FCDB)")
    kinds_found = sorted(set(found))
    if len(kinds_found) == 1:
        kind = kinds_found[0]
    elif kinds_found:
        kind = "+".join(kinds_found)
    elif all(k == "empty" for k in kinds.values()):
        kind = "empty"
    else:
        kind = "unknown"
    return CheckReport(consistent=not problems, kind=kind, problems=tuple(problems), summary=summary)


def reader(images: Mapping[str, Sequence[tuple[int, bytes]]]) -> Read:
    """A `Read` over copied extents (serial -> [(offset, bytes)]); zeros elsewhere."""

    def read(serial: str, offset: int, length: int) -> bytes:
        out = bytearray(length)
        for start, data in images[serial]:
            lo, hi = max(start, offset), min(start + len(data), offset + length)
            if lo < hi:
                out[lo - offset : hi - offset] = data[lo - start : hi - start]
        return bytes(out)

    return read


async def pull_images(site: Any, serials: Sequence[str]) -> Read:
    """Copy the written extents of LUN images from any `Site` into memory, as a `Read`.

    Lets the checker judge images served by another process; the pull is not atomic
    across LUNs, so pull targets (frozen in time), not live sources.
    """
    images: dict[str, tuple[int, dict[int, bytes]]] = {}
    for serial in serials:
        volume = await site.get_volume(serial)
        chunks: dict[int, bytes] = {}
        for extent in await site.extents(serial):
            chunks[extent.offset] = await site.read(serial, extent.offset, extent.length)
        images[serial] = (volume.capacity, chunks)

    def read(serial: str, offset: int, length: int) -> bytes:
        _cap, chunks = images[serial]
        out = bytearray(length)
        for start, data in chunks.items():
            lo, hi = max(start, offset), min(start + len(data), offset + length)
            if lo < hi:
                out[lo - offset : hi - offset] = data[lo - start : hi - start]
        return bytes(out)

    return read


_PREFIX = re.compile(r"^[0-9A-Fa-f]{8}(\+[0-9A-Fa-f]{8})?:")


def summaries_equal(a: Mapping[str, str], b: Mapping[str, str], *, ignore: Sequence[str] = ("serial", "log", "data")) -> bool:
    """Compare two reports' content facts, ignoring which LUN they were read from."""

    def strip(summary: Mapping[str, str]) -> dict[str, str]:
        out = {}
        for key, value in summary.items():
            short = _PREFIX.sub("", key)
            if short in ignore:
                continue
            out[short] = value
        return out

    return strip(a) == strip(b)
