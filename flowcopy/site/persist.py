"""Durable site state: a snapshot plus an append-only log of mutations, in one SQLite file.

The site models (`ess.Array`, `esx.Farm`, the workloads) are synchronous, deterministic
cores whose time effects are computed from `now`, and `LocalSite` reports every
successful mutating core call as (component, method, kwargs incl. `now`). So the state
of a site is fully described by a snapshot of the cores plus the calls made since; a
restart replays them on the snapshot and is exactly where the site was.

Why this shape:

- **Acknowledged means durable.** Every Site call returns only after every mutation the
  site made up to the end of the call is committed (WAL, `synchronous=FULL`). That also
  covers reads: a caller never acts on state a crash could take back.
- **Group commit.** One writer task owns the connection; concurrent callers' mutations
  ride the same transaction (in a worker thread), so a thousand VMs share one fsync.
- **Clock continuity.** Site time is anchored to a persisted (reading, site time,
  speed) triple; after a kill and a restart the site's clock has kept running with wall
  time, so a consistency-group freeze whose ELB deadline was site time T still ends at T.
- **Compaction.** Every `compact_every` mutations, and on a clean close, the cores'
  `to_state()` becomes the new snapshot and the log is truncated in the same
  transaction, so a reopen replays at most that many calls.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import sqlite3
import time
import zlib
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import trio

from flowcopy.clock import on_mock_clock
from flowcopy.logs import get_logger
from flowcopy.site import api, codec

log = get_logger(__name__)

FORMAT_VERSION = 1
DEFAULT_COMPACT_EVERY = 20_000
STATE_FILE = "site.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS snapshot (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    upto INTEGER NOT NULL,      -- the last log seq the snapshot includes
    site_time REAL NOT NULL,
    taken_at REAL NOT NULL,     -- wall time, for humans
    state BLOB NOT NULL         -- zlib(codec.dump_plain(the site's to_state()))
);
CREATE TABLE IF NOT EXISTS log (
    seq INTEGER PRIMARY KEY,
    site_time REAL NOT NULL,
    component TEXT NOT NULL,
    method TEXT NOT NULL,
    kwargs BLOB NOT NULL        -- codec.dump_plain of the call's keyword arguments (TEXT),
                                -- or zlib of it (BLOB) when long: guest writes are padded blocks
);
"""


class StateError(Exception):
    """The state folder cannot be used (unreadable, from a newer flowcopy, corrupt)."""


# --------------------------------------------------------------------------- the clock


@attrs.define
class SiteClock:
    """Site time = anchor_site + (reading - anchor_reading) * speed, never going backwards.

    `kind` is "wall" (`time.time`, survives process restarts: a served site) or "trio"
    (`trio.current_time`, so tests on a MockClock run hours of site time in
    milliseconds; continuity then holds within one trio run).
    """

    kind: str
    anchor_reading: float
    anchor_site: float
    speed: float
    _floor: float = 0.0

    def reading(self) -> float:
        return time.time() if self.kind == "wall" else trio.current_time()

    def now(self) -> float:
        value = self.anchor_site + (self.reading() - self.anchor_reading) * self.speed
        if value < self._floor:  # the wall clock stepped back: site time holds still
            return self._floor
        self._floor = value
        return value

    def to_meta(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "anchor_reading": self.anchor_reading,
            "anchor_site": self.anchor_site,
            "speed": self.speed,
        }

    @classmethod
    def start(cls, kind: str, speed: float, site_time: float = 0.0) -> SiteClock:
        clock = cls(kind=kind, anchor_reading=0.0, anchor_site=site_time, speed=speed)
        clock.anchor_reading = clock.reading()
        clock._floor = site_time
        return clock

    @classmethod
    def resume(cls, meta: dict[str, Any], *, kind: str, speed: float, floor: float) -> SiteClock:
        """Continue a persisted clock: the downtime ran at the old speed, from now at `speed`."""
        old = cls(
            kind=str(meta["kind"]),
            anchor_reading=float(meta["anchor_reading"]),
            anchor_site=float(meta["anchor_site"]),
            speed=float(meta["speed"]),
            floor=floor,
        )
        if old.kind == kind:
            site_now = old.now()
        else:  # a wall-clock site opened on a mock clock (or back): keep the last known time
            site_now = floor
        return cls.start(kind, speed, max(site_now, floor))


def default_clock_kind() -> str:
    """`trio` under a MockClock (tests), else `wall`."""
    return "trio" if on_mock_clock() else "wall"


# --------------------------------------------------------------------------- the store


@attrs.frozen
class Loaded:
    meta: dict[str, Any]
    snapshot: Any  # decoded plain state, or None for a new store
    snapshot_upto: int
    snapshot_site_time: float
    records: list[tuple[int, float, str, str, dict[str, Any]]]


class StateStore:
    """The SQLite file. Synchronous; exactly one thread uses it at a time (the writer)."""

    def __init__(self, path: Path, *, fsync: bool = True) -> None:
        self.path = path
        try:
            # the state holds guest data: owner only. SQLite gives its -wal and -shm files the
            # main file's mode, so creating that one 0600 covers all three
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                os.fchmod(fd, 0o600)  # a state file written 0644 by an older flowcopy is closed up too
            finally:
                os.close(fd)
            for extra in (path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
                if extra.exists():
                    os.chmod(extra, 0o600)
        except OSError as exc:
            raise StateError(f"{path}: cannot create the site state: {exc.strerror}") from None
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            # before the first table: lets a compaction hand freed pages back to the file system
            self._db.execute("PRAGMA auto_vacuum=INCREMENTAL")
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit survives power loss. NORMAL (tests on a MockClock only): a commit
            # survives the process being killed, which is all an in-process test can do to it
            self._db.execute(f"PRAGMA synchronous={'FULL' if fsync else 'NORMAL'}")
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise StateError(f"{path}: cannot open the site state: {exc}") from None

    def close(self) -> None:
        self._db.close()

    def load(self) -> Loaded:
        try:
            meta = {k: json.loads(v) for k, v in self._db.execute("SELECT key, value FROM meta")}
            version = meta.get("format")
            if version is not None and version > FORMAT_VERSION:
                raise StateError(
                    f"{self.path}: site state format {version} is newer than this flowcopy understands "
                    f"({FORMAT_VERSION})"
                )
            row = self._db.execute("SELECT upto, site_time, state FROM snapshot WHERE id = 1").fetchone()
            records = [
                (seq, t, component, method, codec.load_plain(_unpack(kwargs)))
                for seq, t, component, method, kwargs in self._db.execute(
                    "SELECT seq, site_time, component, method, kwargs FROM log ORDER BY seq"
                )
            ]
        except (sqlite3.Error, zlib.error, ValueError, TypeError) as exc:
            raise StateError(f"{self.path}: the site state is unreadable: {exc}") from None
        if row is None:
            return Loaded(meta, None, 0, 0.0, records)
        try:
            state = codec.load_plain(_unpack(row[2]))
        except (zlib.error, ValueError, TypeError) as exc:
            raise StateError(f"{self.path}: the site snapshot is unreadable: {exc}") from None
        return Loaded(meta, state, row[0], row[1], records)

    def commit(
        self,
        records: list[tuple[int, float, str, str, str | bytes]],
        *,
        snapshot: tuple[int, float, Any] | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        """One transaction: new log rows, then (optionally) a snapshot that supersedes them.

        The snapshot's state is plain data (`to_state()` builds fresh containers of
        immutable values), encoded here, in the writer's thread, not in the trio loop.
        """
        encoded = None
        if snapshot is not None:
            encoded = (snapshot[0], snapshot[1], zlib.compress(codec.dump_plain(snapshot[2]).encode(), 1))
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            if records:
                db.executemany(
                    "INSERT INTO log (seq, site_time, component, method, kwargs) VALUES (?, ?, ?, ?, ?)",
                    records,
                )
            if meta:
                db.executemany(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                    [(k, json.dumps(v)) for k, v in meta.items()],
                )
            if encoded is not None:
                upto, site_time, state = encoded
                db.execute(
                    "INSERT OR REPLACE INTO snapshot (id, upto, site_time, taken_at, state) VALUES (1, ?, ?, ?, ?)",
                    (upto, site_time, time.time(), state),
                )
                db.execute("DELETE FROM log WHERE seq <= ?", (upto,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def checkpoint(self) -> None:
        """Fold the WAL into the main file and free the truncated log's pages (after a compaction)."""
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._db.executescript("PRAGMA incremental_vacuum;")  # execute() would free one page per step
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")


_PACK_OVER = 512


def _pack(text: str) -> str | bytes:
    """Long records are stored compressed (a BLOB); short ones as readable TEXT."""
    if len(text) <= _PACK_OVER:
        return text
    return zlib.compress(text.encode(), 1)


def _unpack(value: str | bytes) -> str | bytes:
    return zlib.decompress(value) if isinstance(value, bytes) else value


# --------------------------------------------------------------------------- group commit


class MutationLog:
    """Appends mutation records and commits them in batches from one writer task.

    `append` is synchronous (called from the models' mutation hook, in the trio thread);
    `sync` waits until everything appended so far is on disk. `run` is the writer.
    """

    def __init__(
        self,
        store: StateStore,
        *,
        next_seq: int,
        snapshot_fn: Callable[[], tuple[float, Any]],
        compact_every: int = DEFAULT_COMPACT_EVERY,
        threaded: bool = True,
    ) -> None:
        self._store = store
        self._snapshot_fn = snapshot_fn
        self._compact_every = compact_every
        self._threaded = threaded
        self._pending: list[tuple[int, float, str, str, str | bytes]] = []
        self._pending_meta: dict[str, Any] = {}
        self._meta_set = 0  # set_meta calls so far, and how many of them are committed
        self._meta_committed = 0
        self._appended = next_seq - 1
        self._committed = next_seq - 1
        self._since_snapshot = 0
        self._snapshot_wanted = False
        self._work = trio.Event()
        self._committed_event = trio.Event()
        self._failed: BaseException | None = None
        self._closed = False
        self._lock = trio.Lock()  # one transaction at a time: the connection is not shareable
        self.commits = 0  # transactions, for the bench
        self.records = 0

    @property
    def appended(self) -> int:
        return self._appended

    @property
    def committed(self) -> int:
        return self._committed

    def append(self, site_time: float, component: str, method: str, kwargs: dict[str, Any]) -> int:
        if self._failed is not None:
            raise api.SiteUnavailable(f"site state cannot be saved: {self._failed}")
        self._appended += 1
        self._pending.append((self._appended, site_time, component, method, _pack(codec.dump_plain(kwargs))))
        self._since_snapshot += 1
        if self._since_snapshot >= self._compact_every:
            self._snapshot_wanted = True
        self._work.set()
        return self._appended

    def set_meta(self, key: str, value: Any) -> None:
        """A metadata change (fault plan...) committed with the next batch."""
        self._pending_meta[key] = value
        self._meta_set += 1
        self._work.set()

    async def sync(self) -> None:
        """Return once everything appended before this call is committed."""
        if self._closed:
            raise api.SiteUnavailable("the site state is closed")
        target, meta_target = self._appended, self._meta_set
        while self._committed < target or self._meta_committed < meta_target:
            if self._failed is not None:
                raise api.SiteUnavailable(f"site state cannot be saved: {self._failed}")
            await self._committed_event.wait()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await self._work.wait()
            self._work = trio.Event()
            await self._flush(snapshot=self._snapshot_wanted)

    async def compact(self) -> None:
        await self._flush(snapshot=True)

    async def close(self) -> None:
        """Commit what is pending and write a final snapshot (a clean stop replays nothing)."""
        if self._failed is None and not self._closed:
            await self._flush(snapshot=True)
            await self._in_thread(self._store.checkpoint)
        self._closed = True

    async def _flush(self, *, snapshot: bool) -> None:
        async with self._lock:
            await self._flush_locked(snapshot=snapshot)

    async def _flush_locked(self, *, snapshot: bool) -> None:
        batch, self._pending = self._pending, []
        meta, self._pending_meta = self._pending_meta, {}
        meta_upto = self._meta_set
        snap: tuple[int, float, Any] | None = None
        if snapshot:
            # taken in the trio thread between two mutations: state == log up to _appended
            site_time, state = self._snapshot_fn()
            snap = (self._appended, site_time, state)
            self._snapshot_wanted = False
            self._since_snapshot = 0
        if not batch and not meta and snap is None:
            return
        try:
            await self._in_thread(self._store.commit, batch, snapshot=snap, meta=meta)
        except BaseException as exc:
            self._failed = exc
            self._wake()
            log.error("site state commit failed", error=str(exc), path=str(self._store.path))
            raise
        if batch:
            self._committed = batch[-1][0]
        self._meta_committed = meta_upto
        self.commits += 1
        self.records += len(batch)
        self._wake()
        if snap is not None:
            await self._in_thread(self._store.checkpoint)

    def _wake(self) -> None:
        event, self._committed_event = self._committed_event, trio.Event()
        event.set()

    async def _in_thread(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self._threaded:
            return await trio.to_thread.run_sync(lambda: fn(*args, **kwargs))
        # under a MockClock a worker thread would let the clock autojump while the disk
        # works, moving site time under the caller's feet; commit inline instead
        return fn(*args, **kwargs)


# --------------------------------------------------------------------------- the durable site


class DurableSite:
    """A `LocalSite` whose every acknowledged effect is on disk (see the module docstring).

    Calls go through `faults` (a `FaultySite`, empty plan unless the lab or the API set
    one) into `local`; each returns after `sync()`. Methods of `LocalSite` beyond the
    `Site` interface (`rescan`, `vmotion`, `wait_copied`, workloads...) are reachable
    too, and async ones are synced the same way.
    """

    def __init__(self, local: Any, log: MutationLog, faults: Any, state_dir: Path, clock: SiteClock) -> None:
        self.local = local
        self.log = log
        self.faults = faults
        self.state_dir = state_dir
        self.clock = clock

    async def sync(self) -> None:
        await self.log.sync()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.local, name)
        if not inspect.iscoroutinefunction(attr):
            return attr

        async def synced(*args: Any, **kwargs: Any) -> Any:
            result = await attr(*args, **kwargs)
            await self.log.sync()
            return result

        return synced

    async def compact(self) -> None:
        """Write a snapshot now and truncate the log (also done every `compact_every`)."""
        await self.log.compact()


def _durable_method(name: str) -> Callable[..., Any]:
    async def method(self: DurableSite, *args: Any, **kwargs: Any) -> Any:
        try:
            result = await getattr(self.faults, name)(*args, **kwargs)
        except api.SiteError:
            # an injected fault after the fact, or a refusal: nothing to hide, but what the
            # site did before the error (a lost reply) is made as durable as a success
            await self.log.sync()
            raise
        await self.log.sync()
        return result

    method.__name__ = name
    method.__qualname__ = f"DurableSite.{name}"
    method.__doc__ = getattr(api.Site, name).__doc__
    return method


for _name in codec.SITE_METHODS:
    setattr(DurableSite, _name, _durable_method(_name))


class _StateLock:
    """One process per state folder: an flock the kernel drops when the holder dies (kill -9)."""

    def __init__(self, state_dir: Path) -> None:
        import fcntl

        self.path = state_dir / "lock"
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        os.fchmod(self._fd, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 64, 0).decode(errors="replace").strip() or "another process"
            os.close(self._fd)
            raise StateError(f"{state_dir}: the site state is in use by pid {holder}") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        os.close(self._fd)


def _lab_name(lab: Any) -> str | None:
    if lab is None:
        return None
    if isinstance(lab, Mapping):
        return f"<lab document {lab.get('lab', 'lab')!s}>"
    p = Path(lab)
    return str(p.resolve()) if p.exists() else str(lab)


def _build_new(lab: Any, **site_kwargs: Any) -> tuple[Any, Any]:
    """A new LocalSite from the lab, and the plan of the lab's `faults:` section.

    The fault section belongs to this module, not to the inventory: it is taken out of
    the document before the inventory validates the rest.
    """
    from flowcopy.site import inventory
    from flowcopy.site.faults import plan_from_data

    if isinstance(lab, Mapping):  # a generated lab (inventory.generate_lab_spec)
        doc, source = dict(lab), _lab_name(lab) or "<lab>"
    else:
        doc, source = inventory.read_lab(lab)
    faults_data = None
    if isinstance(doc, dict) and "faults" in doc:
        faults_data = doc.pop("faults")
    plan = plan_from_data(faults_data, where=f"{source}: faults")
    return inventory.build_site(doc, source=source, **site_kwargs), plan


@asynccontextmanager
async def open_site(
    state_dir: str | Path,
    lab: str | Path | Mapping[str, Any] | None = None,
    speed: float = 1.0,
    *,
    clock: str | None = None,
    workloads: bool | Sequence[str] = True,
    latency: Any = None,
    compact_every: int = DEFAULT_COMPACT_EVERY,
    threaded: bool | None = None,
    fsync: bool | None = None,
) -> AsyncIterator[DurableSite]:
    """The durable site in `state_dir`: created from `lab` the first time, restored after.

    `lab`: a lab file, a packaged lab's name, a lab document (plain data), or None for
    the seed's default lab; ignored when the state exists (refused if it names another).

    `clock`: "wall" (site time runs with wall time, across restarts), "trio" (trio's
    clock; what tests on a MockClock want), or None to pick "trio" exactly under a
    MockClock. `workloads`: run the lab's autostart guest workloads while open (or
    these, by name; False: none).
    `threaded`: commit in a worker thread (default: not under a MockClock, where a
    thread would let the clock autojump while the disk works). `fsync`: commits survive
    power loss (`synchronous=FULL`); default: yes, except under a MockClock, where only
    process death can be simulated and thousands of fsyncs would only slow tests down.
    """
    from flowcopy.site.faults import FaultPlan, FaultySite, NO_FAULTS
    from flowcopy.site.local import LocalSite

    if speed <= 0 or not math.isfinite(speed):
        raise api.BadRequest(f"the site clock speed must be a positive number, not {speed}")
    kind = clock or default_clock_kind()
    if kind not in ("wall", "trio"):
        raise api.BadRequest(f"clock must be 'wall' or 'trio', not {kind!r}")
    mocked = on_mock_clock()
    if threaded is None:
        threaded = not mocked
    if fsync is None:
        fsync = not mocked
    state_dir = Path(state_dir)
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise StateError(f"{state_dir}: cannot create the site state folder: {exc.strerror}") from None
    lock = _StateLock(state_dir)
    store: StateStore | None = None
    try:
        store = StateStore(state_dir / STATE_FILE, fsync=fsync)
        loaded = await trio.to_thread.run_sync(store.load) if threaded else store.load()
        site_kwargs: dict[str, Any] = {"speed": speed}
        if latency is not None:
            site_kwargs["latency"] = latency
        if loaded.snapshot is None:
            # a wall-clock site starts at site time 0; on trio's clock site time is trio's
            # time, like an in-process LocalSite's, so the two can be compared step by step
            site_clock = SiteClock.start(kind, speed, trio.current_time() if kind == "trio" else 0.0)
            local, plan = _build_new(lab, clock=site_clock.now, **site_kwargs)
            next_seq = 1
            meta = {
                "format": FORMAT_VERSION,
                "created": time.time(),
                "lab": _lab_name(lab),
                "clock": site_clock.to_meta(),
                "faults": codec.unstructure(plan),
            }
            initial = (0, site_clock.now(), local.to_state())
            if threaded:
                await trio.to_thread.run_sync(lambda: store.commit([], snapshot=initial, meta=meta))
            else:
                store.commit([], snapshot=initial, meta=meta)
            log.info("site state created", path=str(state_dir), lab=_lab_name(lab) or "default")
        else:
            recorded = loaded.meta.get("lab")
            if lab is not None and recorded is not None and _lab_name(lab) != recorded:
                raise StateError(
                    f"{state_dir}: this site state was created from lab {recorded}, not {_lab_name(lab)}; "
                    "remove the folder to start a new site from another lab"
                )
            floor = max([loaded.snapshot_site_time] + [r[1] for r in loaded.records[-1:]])
            site_clock = SiteClock.resume(loaded.meta["clock"], kind=kind, speed=speed, floor=floor)
            local = LocalSite.from_state(loaded.snapshot, clock=site_clock.now, **site_kwargs)
            for seq, _t, component, method, kwargs in loaded.records:
                try:
                    local.apply(component, method, kwargs)
                except Exception as exc:  # noqa: BLE001 - a log that does not replay is corruption
                    raise StateError(
                        f"{state_dir}: mutation {seq} ({component}.{method}) does not replay: {exc}"
                    ) from None
            next_seq = (loaded.records[-1][0] if loaded.records else loaded.snapshot_upto) + 1
            plan = codec.structure(loaded.meta.get("faults") or {}, FaultPlan) if loaded.meta.get("faults") else NO_FAULTS
            meta = {"clock": site_clock.to_meta(), "opened": time.time()}
            if threaded:
                await trio.to_thread.run_sync(lambda: store.commit([], meta=meta))
            else:
                store.commit([], meta=meta)
            log.info(
                "site state restored", path=str(state_dir), replayed=len(loaded.records), site_time=site_clock.now()
            )

        def snapshot() -> tuple[float, Any]:
            return site_clock.now(), local.to_state()

        mlog = MutationLog(
            store, next_seq=next_seq, snapshot_fn=snapshot, compact_every=compact_every, threaded=threaded
        )

        def on_mutation(component: str, method: str, kwargs: dict[str, Any]) -> None:
            t = kwargs.get("now")
            mlog.append(float(t) if isinstance(t, (int, float)) else site_clock.now(), component, method, kwargs)

        local.on_mutation = on_mutation
        faulty = FaultySite(
            local,
            plan,
            speed=speed,
            on_change=lambda p: mlog.set_meta("faults", codec.unstructure(p)),
        )
        site = DurableSite(local, mlog, faulty, state_dir, site_clock)
        async with trio.open_nursery() as nursery:
            await nursery.start(mlog.run)
            try:
                async with local.running(workloads):
                    yield site
            finally:
                local.on_mutation = None  # nothing after the final snapshot may go unlogged
                with trio.CancelScope(shield=True):
                    await mlog.close()
                nursery.cancel_scope.cancel()
    finally:
        if store is not None:
            store.close()
        lock.release()


# --------------------------------------------------------------------------- bench


async def bench_embedded(vms: int = 1000, *, concurrency: int = 200, lsses: int | None = None) -> list[dict[str, Any]]:
    """Engine-like traffic on a generated lab, plain `LocalSite` vs the durable site.

    Per VM: get_vm, quiesce, establish (freeze, tag) per disk, get_volume, unfreeze,
    thaw, query by tag, withdraw per disk — 10 calls, 7 of them mutations — with
    `concurrency` VMs in flight, zero modelled latency. What durability costs `flowcopy
    run` against the embedded site.
    """
    import tempfile

    from flowcopy.site import inventory
    from flowcopy.site.local import Latency

    spec = inventory.generate_lab_spec(vms, lsses or max(4, -(-vms // 150)), disks_per_vm=2, targets_per_disk=1)
    targets = {vm["name"]: list(spec["pools"][f"targets:{vm['name']}"]) for vm in spec["vms"]}

    async def unit(site: Any, vm: str) -> None:
        info = await site.get_vm(vm)
        await site.quiesce(vm, api.QuiesceLevel.FILESYSTEM, 60)
        pairs = [(d.serial, t) for d, t in zip(info.disks, targets[vm], strict=False)]
        for source, target in pairs:
            await site.establish(source, target, api.FlashOptions(mode=api.CopyMode.NOCOPY, freeze=True, tag=vm))
        lsses_ = sorted({(await site.get_volume(s)).lss for s, _ in pairs})
        await site.unfreeze(lsses_)
        await site.thaw(vm)
        await site.query(tag=vm)
        for source, target in pairs:
            await site.withdraw(source, target)

    async def drive(site: Any) -> float:
        limiter = trio.CapacityLimiter(concurrency)

        async def one(vm: str) -> None:
            async with limiter:
                await unit(site, vm)

        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for vm in targets:
                nursery.start_soon(one, vm)
        return time.perf_counter() - start

    results: list[dict[str, Any]] = []
    plain = inventory.build_site(spec, latency=Latency.zero())
    elapsed = await drive(plain)
    results.append({"name": "plain LocalSite", "vms": vms, "seconds": elapsed, "vms_per_second": vms / elapsed})
    with tempfile.TemporaryDirectory(prefix="flowcopy-bench-") as tmp:
        start = time.perf_counter()
        async with open_site(Path(tmp) / "site", lab=spec, clock="wall", workloads=False, latency=Latency.zero()) as site:
            created = time.perf_counter() - start
            appended, commits = site.log.appended, site.log.commits
            elapsed = await drive(site)
            mutations = site.log.appended - appended
            results.append({
                "name": "durable site", "vms": vms, "seconds": elapsed, "vms_per_second": vms / elapsed,
                "mutations": mutations, "mutations_per_second": mutations / elapsed,
                "commits": site.log.commits - commits, "create_seconds": created,
            })
            closing = time.perf_counter()
        closed = time.perf_counter() - closing
        start = time.perf_counter()
        async with open_site(Path(tmp) / "site", clock="wall", workloads=False):
            reopened = time.perf_counter() - start
        results.append({"name": "durable close (snapshot) / reopen", "vms": vms, "seconds": closed,
                        "reopen_seconds": reopened})
    return results
