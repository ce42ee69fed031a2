"""The jbd2 journal format, as the Linux kernel writes it: pure functions, no I/O.

The ext4 guest journals every change the way jbd2 does in `data=journal` mode: a
transaction is a descriptor block (the file-system block numbers it carries), a copy of
every changed block, then a commit block; only after the commit has landed are the
blocks written in place (checkpoint). Recovery (`e2fsck`, or the kernel at mount) scans
the log from the journal superblock's `s_start` / `s_sequence`, replays every transaction
whose commit block it finds and stops at the first block that is not the next one.

Only the parts of the on-disk format this writer needs (big-endian, see the kernel's
`include/linux/jbd2.h` and e2fsprogs' `lib/ext2fs/kernel-jbd.h`): a version-2 journal
superblock without checksum features (what `mke2fs -O journal_dev` makes), 8-byte block
tags (12 with the 64bit feature), the escape flag for a block that starts with the magic.
"""

from __future__ import annotations

import struct

import attrs

MAGIC = 0xC03B3998
DESCRIPTOR, COMMIT, SUPERBLOCK_V1, SUPERBLOCK_V2, REVOKE = 1, 2, 3, 4, 5
FLAG_ESCAPE, FLAG_SAME_UUID, FLAG_LAST_TAG = 1, 2, 8
INCOMPAT_REVOKE, INCOMPAT_64BIT, INCOMPAT_ASYNC_COMMIT = 0x1, 0x2, 0x4
INCOMPAT_CSUM_V2, INCOMPAT_CSUM_V3 = 0x8, 0x10
COMPAT_CHECKSUM = 0x1
_HEADER = struct.Struct(">III")


@attrs.frozen
class JournalSuper:
    """The fields of a journal superblock the writer reads and rewrites."""

    blocksize: int
    maxlen: int  # blocks in the log, the superblock included
    first: int  # first log block
    sequence: int  # first transaction the log holds (or the next one, when clean)
    start: int  # log block of that transaction; 0: the journal is clean (nothing to replay)
    uuid: bytes
    incompat: int
    compat: int


def parse_super(block: bytes) -> JournalSuper:
    magic, kind, _seq = _HEADER.unpack_from(block, 0)
    if magic != MAGIC or kind not in (SUPERBLOCK_V1, SUPERBLOCK_V2):
        raise ValueError("not a jbd2 journal superblock")
    blocksize, maxlen, first, sequence, start = struct.unpack_from(">IIIII", block, 0x0C)
    compat, incompat = struct.unpack_from(">II", block, 0x24)
    if kind == SUPERBLOCK_V1:
        compat = incompat = 0
    if incompat & (INCOMPAT_CSUM_V2 | INCOMPAT_CSUM_V3 | INCOMPAT_ASYNC_COMMIT) or compat & COMPAT_CHECKSUM:
        raise ValueError("journal checksums are not written by this guest (make the journal without them)")
    return JournalSuper(blocksize=blocksize, maxlen=maxlen, first=first, sequence=sequence, start=start,
                        uuid=bytes(block[0x30:0x40]), incompat=incompat, compat=compat)


def with_tail(block: bytes, sequence: int, start: int) -> bytes:
    """The superblock block with a new log tail (`s_sequence`, `s_start`); the rest unchanged."""
    out = bytearray(block)
    struct.pack_into(">II", out, 0x18, sequence, start)
    return bytes(out)


def tag_bytes(sb: JournalSuper) -> int:
    return 12 if sb.incompat & INCOMPAT_64BIT else 8


def _header(kind: int, sequence: int) -> bytes:
    return _HEADER.pack(MAGIC, kind, sequence)


def transaction(sb: JournalSuper, tid: int, blocks: list[tuple[int, bytes]]) -> tuple[list[bytes], bytes]:
    """Transaction `tid` carrying `blocks` (file-system block number, content): the log blocks
    before the commit (descriptors, each followed by the copies it describes) and the commit block."""
    size = sb.blocksize
    per_tag = tag_bytes(sb)
    log: list[bytes] = []
    i = 0
    while i < len(blocks) or not log:
        desc = bytearray(size)
        desc[:12] = _header(DESCRIPTOR, tid)
        at = 12
        copies: list[bytes] = []
        while i < len(blocks):
            first_tag = not copies
            need = per_tag + (16 if first_tag else 0)
            if at + need > size:
                break
            number, data = blocks[i]
            if len(data) != size:
                raise ValueError(f"block {number}: {len(data)} bytes, not {size}")
            flags = 0 if first_tag else FLAG_SAME_UUID
            if data[:4] == MAGIC.to_bytes(4, "big"):
                flags |= FLAG_ESCAPE  # replay puts the magic back
                data = bytes(4) + data[4:]
            if i == len(blocks) - 1:
                flags |= FLAG_LAST_TAG
            struct.pack_into(">IHH", desc, at, number & 0xFFFFFFFF, 0, flags)
            if per_tag == 12:
                struct.pack_into(">I", desc, at + 8, number >> 32)
            elif number >> 32:
                raise ValueError(f"block {number} needs the journal's 64bit feature")
            at += per_tag
            if first_tag:
                desc[at : at + 16] = sb.uuid
                at += 16
            copies.append(data)
            i += 1
        if not copies:
            raise ValueError("a transaction carries at least one block")
        log.append(bytes(desc))
        log.extend(copies)
    commit = bytearray(size)
    commit[:12] = _header(COMMIT, tid)
    struct.pack_into(">QI", commit, 0x30, tid, 0)  # h_commit_sec / nsec: increasing, deterministic
    return log, bytes(commit)
