"""Judge ext4 LUN images with e2fsprogs: replay the journal on a copy, `e2fsck -fn`, every file read back.

Shares nothing with the writer (`ext4_app`); it reads the ext4 on-disk format (the
superblock: magic, features, UUIDs) and the point-in-time record the site keeps.

- An ext4 image whose superblock has an external journal (`has_journal`, journal inode 0,
  `s_journal_uuid`) is paired with the image of the journal device (`journal_dev`
  feature) whose UUID that is; a file system whose journal device is not among the
  images is damage (the journal may hold committed transactions the data lacks). A
  journal device alone is only noted.
- The images are exported to private sparse files (the array's images are never
  changed); `e2fsck -E journal_only -y` replays the journal there, as a mount after a
  crash would (`-j` names the external journal); then `e2fsck -fn` (full check, change
  nothing) must exit 0.
- Every regular file in /data is listed (`debugfs -c -R 'ls -p /data'`) and read back
  (`dump`, all files in one `debugfs -c -f` session). When points in time are known (one
  per LUN of the set, recorded at its establish: `operations` committed then, the files
  and their sha256 at that point, and `states`: operation -> digest of the recent
  committed states), the operation counter the image holds (/data/.seq) must be at least
  the smallest `operations` (else commits are lost), and the files must be exactly those
  of that operation: compared file by file when a point lists them, else by the state
  digest (sha256 over "<path>=<sha256 hex>;" in path order).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import attrs

from flowcopy.site.api import CheckReport

Read = Callable[[str, int, int], bytes]
SUPER = 1024
EXT4_MAGIC_AT = SUPER + 56
COMPAT_HAS_JOURNAL = 0x4
INCOMPAT_JOURNAL_DEV = 0x8
CHUNK = 1 << 20
_ZERO = bytes(CHUNK)
DIR = "/data"
SEQ_FILE = ".seq"


def is_ext(read: Read, serial: str) -> bool:
    return read(serial, EXT4_MAGIC_AT, 2) == b"\x53\xef"


@attrs.frozen
class Super:
    """The superblock fields the checker needs (ext4 on-disk format, little-endian)."""

    size: int  # bytes: blocks count x block size
    journal_device: bool  # a `mke2fs -O journal_dev` journal, no file system
    uuid: str
    external_journal: str | None  # the UUID of the journal device this file system uses


def superblock(read: Read, serial: str) -> Super:
    sb = read(serial, SUPER, 1024)
    blocks = int.from_bytes(sb[4:8], "little") | (int.from_bytes(sb[0x150:0x154], "little") << 32)
    size = blocks * (1024 << int.from_bytes(sb[24:28], "little"))
    compat, incompat = int.from_bytes(sb[0x5C:0x60], "little"), int.from_bytes(sb[0x60:0x64], "little")
    inum, juuid = int.from_bytes(sb[0xE0:0xE4], "little"), sb[0xD0:0xE0]
    external = juuid.hex() if compat & COMPAT_HAS_JOURNAL and inum == 0 and any(juuid) else None
    return Super(size=size, journal_device=bool(incompat & INCOMPAT_JOURNAL_DEV), uuid=sb[0x68:0x78].hex(),
                 external_journal=external)


def fs_size(read: Read, serial: str) -> int:
    return superblock(read, serial).size


def pair(read: Read, serials: Sequence[str]) -> tuple[list[tuple[str, str | None, str | None]], list[str]]:
    """The file systems among these ext images as (serial, journal device serial, missing journal
    UUID), and the journal devices no file system among them uses."""
    supers = {s: superblock(read, s) for s in serials}
    devices = {sb.uuid: s for s, sb in supers.items() if sb.journal_device}
    used: set[str] = set()
    systems: list[tuple[str, str | None, str | None]] = []
    for serial, sb in supers.items():
        if sb.journal_device:
            continue
        if sb.external_journal is None:
            systems.append((serial, None, None))
        elif sb.external_journal in devices:
            used.add(devices[sb.external_journal])
            systems.append((serial, devices[sb.external_journal], None))
        else:
            systems.append((serial, None, sb.external_journal))
    return systems, sorted(set(devices.values()) - used)


def _program(name: str) -> str:
    path = shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/sbin/{name}") if os.access(p, os.X_OK)), None)
    if path is None:
        raise RuntimeError(f"{name} not found: checking an ext4 image needs e2fsprogs (on Debian: apt-get install e2fsprogs)")
    return path


def _run(args: list[str]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(args, capture_output=True, check=False, env={**os.environ, "LC_ALL": "C"}, timeout=300)


def export_image(read: Read, serial: str, capacity: int, path: Path) -> None:
    """A sparse copy of the LUN: only non-zero 1 MiB chunks are written."""
    with open(path, "wb") as f:
        f.truncate(capacity)
        for at in range(0, capacity, CHUNK):
            data = read(serial, at, min(CHUNK, capacity - at))
            if data != _ZERO[: len(data)]:  # memcmp; any() walks bytes one by one
                f.seek(at)
                f.write(data)


def _said(result: subprocess.CompletedProcess[bytes]) -> str:
    lines = [ln for ln in (result.stdout + result.stderr).decode(errors="replace").splitlines()[1:]
             if ln.strip() and not ln.startswith(("Pass ", "e2fsck "))]
    return "; ".join(lines[:6])


def check_ext4(read: Read, serial: str, points: Sequence[Mapping[str, object]] = (), *, journal: str | None = None,
               missing_journal: str | None = None) -> CheckReport:
    """Judge the file system on `serial` (its external journal on `journal`) against the points in time."""
    where = f"ext4 on {serial}" + (f"+{journal}" if journal else "")
    problems: list[str] = []
    summary: dict[str, str] = {"serial": serial, "journal": journal or ("missing" if missing_journal else "internal")}
    if missing_journal is not None:
        problems.append(f"{where}: its external journal (device UUID {missing_journal}) is not among the images checked: "
                        "copy the journal LUN with the data LUN")
        return CheckReport(consistent=False, kind="ext4", problems=tuple(problems), summary=summary)
    e2fsck, debugfs = _program("e2fsck"), _program("debugfs")
    with tempfile.TemporaryDirectory(prefix="flowcopy-ext4-check-") as tmp:
        image = Path(tmp) / f"{serial}.img"
        export_image(read, serial, fs_size(read, serial), image)
        external: list[str] = []
        if journal is not None:
            jimage = Path(tmp) / f"{journal}.journal"
            export_image(read, journal, fs_size(read, journal), jimage)
            external = ["-j", str(jimage)]
        replay = _run([e2fsck, "-E", "journal_only", "-y", *external, str(image)])
        summary["journal_replayed"] = "yes" if b"recovering journal" in replay.stdout + replay.stderr else "no"
        if replay.returncode not in (0, 1):
            problems.append(f"{where}: journal replay (e2fsck -E journal_only) exit {replay.returncode}: {_said(replay)}")
        fsck = _run([e2fsck, "-fn", *external, str(image)])
        summary["e2fsck_exit"] = str(fsck.returncode)
        if fsck.returncode != 0:
            problems.append(f"{where}: e2fsck -fn exit {fsck.returncode}: {_said(fsck)}")
        listing = _run([debugfs, "-c", "-R", f"ls -p {DIR}", str(image)])
        names = []
        for line in listing.stdout.decode(errors="replace").splitlines():
            parts = line.strip().strip("/").split("/")
            if len(parts) >= 5 and parts[1].startswith("10") and parts[4]:
                names.append(parts[4])
        # every file read back by debugfs in one session: `dump` writes each to a host file
        out = Path(tmp) / "files"
        out.mkdir()
        script = Path(tmp) / "commands"
        script.write_text("".join(f"dump {DIR}/{n} {out / str(i)}\n" for i, n in enumerate(names)))
        _run([debugfs, "-c", "-f", str(script), str(image)])
        found: dict[str, str] = {}
        seq = 0
        for i, n in enumerate(names):
            dumped = out / str(i)
            body = dumped.read_bytes() if dumped.exists() else None
            found[f"{DIR}/{n}"] = hashlib.sha256(body).hexdigest() if body is not None else "unreadable"
            if n == SEQ_FILE and body is not None and body.strip().isdigit():
                seq = int(body.strip())
    summary["files"] = str(len(found))
    summary["operations"] = str(seq)
    digest = hashlib.sha256("".join(f"{n}={d};" for n, d in sorted(found.items())).encode()).hexdigest()
    summary["digest"] = digest
    if points:
        problems.extend(_against(where, points, seq, found, digest, summary))
    return CheckReport(consistent=not problems, kind="ext4", problems=tuple(problems), summary=summary)


def _against(where: str, points: Sequence[Mapping[str, object]], seq: int, found: Mapping[str, str], digest: str,
             summary: dict[str, str]) -> list[str]:
    """The image's files against the points in time recorded at establish."""
    least = min(int(p.get("operations", 0)) for p in points)  # type: ignore[call-overload]
    summary["operations_at_establish"] = str(least)
    if seq < least:
        return [f"{where}: older than its point in time: it holds operation {seq} but {least} had committed at establish (commits lost)"]
    exact = [p for p in points if int(p.get("operations", 0)) == seq]  # type: ignore[call-overload]
    if exact:
        want = dict(exact[0].get("files", {}))  # type: ignore[call-overload]
        missing = sorted(set(want) - set(found))
        extra = sorted(set(found) - set(want))
        differ = sorted(n for n in set(want) & set(found) if want[n] != found[n])
        problems = []
        if missing:
            problems.append(f"{where}: {len(missing)} file(s) the guest had at operation {seq} are missing: {', '.join(missing[:5])}")
        if extra:
            problems.append(f"{where}: {len(extra)} file(s) the guest did not have at operation {seq}: {', '.join(extra[:5])}")
        if differ:
            problems.append(f"{where}: {len(differ)} file(s) differ from what the guest had at operation {seq}: {', '.join(differ[:5])}")
        return problems
    states: dict[str, str] = {}
    for p in points:
        states.update(dict(p.get("states", {})))  # type: ignore[call-overload]
    if str(seq) not in states:
        return [f"{where}: it holds operation {seq}, a state no point in time recorded at establish lists "
                f"({least} committed then)"]
    if states[str(seq)] != digest:
        return [f"{where}: the files are not those the guest had after operation {seq} (state digest differs)"]
    return []
