"""`flowcopy site ...`: serve a site, and the array admin's commands against a served one.

In the style of the array's own CLI (dscli `lsflash`/`mkflash`, ESS Copy Services
`rsList2105s`/`rsPrimeServer`/`rsExecuteTask`), for hand inspection and repairs while
the engine is down or stuck. Every command takes `--site URL` and `--token-file F`
(defaults `$FLOWCOPY_SITE`, `$FLOWCOPY_SITE_TOKEN_FILE`); listings print a table (rich,
on a terminal) or `--json`. Errors: one line on stderr, exit 2.
"""

from __future__ import annotations

import functools
import json
import ssl
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import click
import trio

from flowcopy.site import api, codec
from flowcopy.site.client import ENV_SITE, ENV_TOKEN_FILE, SiteClient, connect_site


class _Fail(Exception):
    pass


def _fail(message: str) -> None:
    click.echo(f"flowcopy site: {message}", err=True)
    sys.exit(2)


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


def _user_message(exc: BaseException) -> str | None:
    """One line for an error the user can act on; None for a bug (keep its traceback)."""
    from flowcopy.site.inventory import LabError
    from flowcopy.site.persist import StateError

    if isinstance(exc, api.SiteError):
        return exc.message
    if isinstance(exc, (_Fail, LabError, StateError)):
        return str(exc)
    if isinstance(exc, OSError):
        return f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
    return None


def _run(fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
    """Run an async command body; every error the user can act on is one line, exit 2."""
    try:
        return trio.run(fn, *args)
    except KeyboardInterrupt:
        _fail("interrupted")
    except BaseException as exc:
        # trio wraps errors of nested nurseries in groups: report the first real one
        for leaf in _leaves(exc):
            if isinstance(leaf, KeyboardInterrupt):
                _fail("interrupted")
            message = _user_message(leaf)
            if message is not None:
                _fail(message)
        raise


def site_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option(
        "--token-file", envvar=ENV_TOKEN_FILE, default=None, show_envvar=True,
        help="File holding the site's bearer token.",
    )(fn)
    fn = click.option("--site", "site_url", envvar=ENV_SITE, default=None, show_envvar=True, help="URL of the served site.")(fn)
    return fn


def json_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")(fn)


def with_client(body: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
    """Command body `async def body(client, **options)`; connection options handled here."""

    @functools.wraps(body)
    def command(site_url: str | None, token_file: str | None, **options: Any) -> None:
        async def main() -> Any:
            async with connect_site(site_url, token_file) as client:
                return await body(client, **options)

        _run(main)

    return command


# --------------------------------------------------------------------------- output


def _emit_json(value: object) -> None:
    click.echo(json.dumps(codec.unstructure(value), indent=2, default=str))


def _table(title: str | None, columns: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    from rich.console import Console
    from rich.table import Table

    from rich import box

    console = Console(width=None if sys.stdout.isatty() else 400)  # lsflash has 13 columns, dates among them
    table = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False)
    for col in columns:
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*["-" if v is None else str(v) for v in row])
    console.print(table)


def _size(n: int) -> str:
    for unit, factor in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= factor and n % factor == 0:
            return f"{n // factor} {unit}"
    return f"{n} B"


def _show_relationships(rels: Sequence[api.RelationshipInfo], as_json: bool, *, site_now: float | None = None) -> None:
    """With `site_now` (the site's clock read now), site times are shown as local dates,
    taking the site clock to run at wall speed as a served site does."""
    if as_json:
        _emit_json(list(rels))
        return

    def when(t: float) -> str:
        if site_now is None:
            return f"{t:.3f}"
        import time
        from datetime import datetime

        return datetime.fromtimestamp(time.time() - (site_now - t)).astimezone().strftime("%Y-%m-%d %H:%M:%S")

    def state(r: api.RelationshipInfo) -> str:
        if r.state is api.CopyState.FAILED:
            return "failed (space-efficient pool full)" if r.space_efficient else "failed"
        if r.mode is api.CopyMode.NOCOPY and r.state is api.CopyState.COPYING:
            return "active (nocopy)"  # point in time held, no background copy
        return r.state.value

    _table(
        None,
        ["ID", "SeqNum/tag", "Mode", "Recording", "Persistent", "OutOfSyncTracks", "Tracks", "State",
         "TargetSE", "SourceWriteEnabled", "TargetWriteEnabled", "ELB deadline", "Created", "Synced"],
        [
            (r.id, r.tag, r.mode.value, _yn(r.recording), _yn(r.persistent), r.out_of_sync_tracks, r.total_tracks,
             state(r), _yn(r.space_efficient), _yn(r.source_write_enabled), _yn(not r.inhibit_target_writes),
             "-" if r.elb_deadline is None else when(r.elb_deadline), when(r.created), when(r.synced))
            for r in rels
        ],
    )


def _yn(flag: bool) -> str:
    return "yes" if flag else "no"


def _show_disks(disks: Sequence[api.HostDisk], as_json: bool) -> None:
    if as_json:
        _emit_json(list(disks))
        return
    _table(None, ["Host", "Disk", "Serial", "Primed name"], [(d.host, d.name, d.serial, d.primed_name) for d in disks])


def _is_ref(ref: str) -> bool:
    """A task's volume reference: an 8-digit serial, or HOST:DISK (a disk name or a primed
    device name, which may itself end in a colon, as in `esx1:E:`)."""
    if ref.isdigit():
        return len(ref) == 8
    host, sep, name = ref.partition(":")
    return bool(sep and host and name)


def _pair(value: str) -> tuple[str, str]:
    """SOURCE:TARGET where each side is a serial or HOST:DISK: the colon between them is
    the one split point that leaves two valid references (`esx1:Disk1:20413698`)."""
    parts = value.split(":")
    splits = [(":".join(parts[:k]), ":".join(parts[k:])) for k in range(1, len(parts))]
    valid = [(s, t) for s, t in splits if _is_ref(s) and _is_ref(t)]
    if len(valid) == 1:
        return valid[0]
    if not valid:
        raise click.BadParameter(
            f"a pair is SOURCE:TARGET, each an 8-digit serial or HOST:DISK (e.g. 20313698:20413698 or "
            f"esx1:Disk1:20413698), not {value!r}", param_hint="--pair")
    raise click.BadParameter(
        f"{value!r} can be read as {' or '.join(f'{s} -> {t}' for s, t in valid)}: write one side as a serial",
        param_hint="--pair")


async def _check_task(client: SiteClient, name: str, pairs: Sequence[tuple[str, str]]) -> None:
    """Resolve every reference now and check what the array would refuse at once (unknown
    host, disk or volume, unequal sizes, a target twice): a saved task is run unattended."""
    listings: dict[str, list[api.HostDisk]] = {}

    async def serial_of(ref: str) -> str:
        if ref.isdigit():
            return ref
        host, _, disk = ref.partition(":")
        if host not in listings:
            listings[host] = await client.list_disks(host)
        for d in listings[host]:
            if disk in (d.name, d.primed_name):
                return d.serial
        known = ", ".join(f"{d.name}" + (f" ({d.primed_name})" if d.primed_name else "") for d in listings[host])
        raise _Fail(f"task {name}: {ref}: {host} has no disk or primed device {disk!r} (it has: {known or 'none'}; "
                    f"`flowcopy site prime --host {host}` loads device names)")

    resolved = []
    for source, target in pairs:
        s, t = await serial_of(source), await serial_of(target)
        if s == t:
            raise _Fail(f"task {name}: {source}:{target}: source and target are the same volume {s}")
        sv, tv = await client.get_volume(s), await client.get_volume(t)
        if sv.capacity != tv.capacity:
            raise _Fail(f"task {name}: {source}:{target}: {s} has {sv.capacity} bytes, {t} has {tv.capacity}: "
                        "FlashCopy needs equal sizes")
        resolved.append((s, t))
    targets = [t for _, t in resolved]
    for t in targets:
        if targets.count(t) > 1:
            raise _Fail(f"task {name}: target {t} is used by {targets.count(t)} pairs")
        if t in {s for s, _ in resolved}:
            raise _Fail(f"task {name}: {t} is both a source and a target")


def _options(nocp: bool, record: bool, persist: bool, freeze: bool, seqnum: str | None, tgtinhibit: bool) -> api.FlashOptions:
    if record and not persist:
        raise click.UsageError("--record needs --persist (change recording is for incremental relationships)")
    return api.FlashOptions(
        mode=api.CopyMode.NOCOPY if nocp else api.CopyMode.COPY,
        record=record,
        persistent=persist,
        freeze=freeze,
        tag=seqnum,
        inhibit_target_writes=tgtinhibit,
    )


def flash_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    for decorator in reversed(
        [
            click.option("--nocp", is_flag=True, help="No background copy (copy-on-write only; lasts until rmflash)."),
            click.option("--record", is_flag=True, help="Record changes (incremental; needs --persist)."),
            click.option("--persist", is_flag=True, help="Keep the relationship after the copy completes."),
            click.option("--freeze", is_flag=True, help="Consistency group: hold writes to the source volume until unfreeze of its LSS (or its ELB timeout)."),
            click.option("--seqnum", default=None, help="Sequence number / tag stored on the relationship."),
            click.option("--tgtinhibit", is_flag=True, help="Refuse host writes to the target."),
        ]
    ):
        fn = decorator(fn)
    return fn


# --------------------------------------------------------------------------- the group


@click.group("site")
def site_group() -> None:
    """The site model: serve it over HTTP, and array/farm commands against a served site."""


@site_group.command("serve")
@click.option("--lab", default=None, help="Lab file for a new site state (default: the seed's lab).")
@click.option("--state", "state_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="State folder (default: ./store/site-served).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (loopback by default).")
@click.option("--port", type=int, default=8470, show_default=True, help="Port; 0 picks a free one.")
@click.option("--token-file", default=None, help="Bearer token file (default: STATE/token, generated 0600).")
@click.option("--speed", type=float, default=1.0, show_default=True, help="Site seconds per real second.")
@click.option("--certfile", default=None, help="TLS certificate (PEM): serve HTTPS; needed to listen beyond loopback.")
@click.option("--keyfile", default=None, help="TLS private key (PEM) of --certfile.")
@click.option("--max-read", type=int, default=64 * 1024 * 1024, show_default=True,
              help="Longest volume read one request may ask for, in bytes (longer reads stream).")
def serve(lab: str | None, state_dir: Path | None, host: str, port: int, token_file: str | None, speed: float,
          certfile: str | None, keyfile: str | None, max_read: int) -> None:
    """Serve the whole site (array, farm, workloads) over HTTP(S), with durable state."""
    from flowcopy import logs
    from flowcopy.site.server import InsecureBind, check_bind, serve_state

    logs.configure(level="info")
    if speed <= 0:
        _fail(f"--speed must be positive, not {speed}")
    if not 0 <= port <= 65535:
        _fail(f"--port must be 0..65535, not {port}")
    if max_read < 1:
        _fail(f"--max-read must be at least 1 byte, not {max_read}")
    try:
        check_bind(host, certfile, keyfile)
    except InsecureBind as exc:
        _fail(str(exc))
    state = state_dir or Path("store") / "site-served"

    async def main() -> None:
        try:
            await serve_state(state, lab=lab, host=host, port=port, token_file=token_file, speed=speed,
                              certfile=certfile, keyfile=keyfile, max_read=max_read)
        except BaseException as exc:
            for leaf in _leaves(exc):
                if isinstance(leaf, ssl.SSLError):
                    raise _Fail(f"cannot serve TLS with --certfile {certfile} --keyfile {keyfile}: {leaf}") from None
                if isinstance(leaf, OSError) and leaf.errno is not None and not leaf.filename:
                    raise _Fail(f"cannot serve on {host}:{port}: {leaf.strerror}") from None
            raise

    _run(main)


@site_group.command("lsvol")
@site_options
@json_option
@with_client
async def lsvol(client: SiteClient, as_json: bool) -> None:
    """List the array's volumes (LUNs)."""
    vols = await client.list_volumes()
    if as_json:
        _emit_json(vols)
        return
    _table(None, ["Serial", "LSS", "Capacity", "Online", "Label", "SE pool"],
           [(v.serial, v.lss, _size(v.capacity), _yn(v.online), v.label, v.space_pool or "-") for v in vols])


@site_group.command("lssestg")
@site_options
@json_option
@with_client
async def lssestg(client: SiteClient, as_json: bool) -> None:
    """List the space-efficient pools (repositories): capacity, space used, volumes."""
    pools = await client.list_space_pools()
    if as_json:
        _emit_json(pools)
        return
    _table(None, ["Pool", "Capacity", "Used", "Used %", "Volumes"],
           [(p.name, _size(p.capacity), _size(p.used), f"{100 * p.used / p.capacity:.1f}", " ".join(p.volumes))
            for p in pools])


@site_group.command("lspool")
@site_options
@json_option
@with_client
async def lspool(client: SiteClient, as_json: bool) -> None:
    """List the lab's pools of spare target volumes."""
    pools = await client.list_pools()
    if as_json:
        _emit_json(pools)
        return
    _table(None, ["Pool", "Volumes", "Serials"], [(name, len(v), " ".join(v)) for name, v in sorted(pools.items())])


@site_group.command("lsflash")
@click.option("--volume", default=None, help="Only relationships of this volume.")
@click.option("--seqnum", "tag", default=None, help="Only relationships with this sequence number / tag.")
@site_options
@json_option
@with_client
async def lsflash(client: SiteClient, volume: str | None, tag: str | None, as_json: bool) -> None:
    """List FlashCopy relationships (dscli lsflash); times as dates."""
    _show_relationships(await client.query(volume=volume, tag=tag), as_json, site_now=await client.now())


@site_group.command("lsfrozen")
@site_options
@json_option
@with_client
async def lsfrozen(client: SiteClient, as_json: bool) -> None:
    """List the LSSs' consistency groups: their frozen source volumes (long busy) and ELB timer."""
    frozen = await client.frozen_lsses()
    if as_json:
        _emit_json(frozen)
        return
    now = await client.now()
    _table(None, ["LSS", "Frozen sources", "Since", "ELB timeout (s)", "ELB deadline", "Released in (s)"],
           [(f.lss, " ".join(f.sources) or "-", f"{f.since:.3f}", f"{f.elb_timeout:g}", f"{f.deadline:.3f}",
             f"{max(0.0, f.deadline - now):.1f}") for f in frozen])


@site_group.command("lslss")
@site_options
@json_option
@with_client
async def lslss(client: SiteClient, as_json: bool) -> None:
    """List the LSSs with their consistency-group (ELB) timeout and frozen sources."""
    lsses = await client.list_lsses()
    if as_json:
        _emit_json(lsses)
        return
    _table(None, ["LSS", "Volumes", "ELB timeout (s)", "Frozen sources"],
           [(i.lss, i.volumes, f"{i.elb_timeout:g}", " ".join(i.frozen_sources) or "-") for i in lsses])


@site_group.command("chlss")
@click.argument("lss")
@click.option("--extlongbusy", "seconds", type=float, required=True,
              help="Consistency-group (ELB) timeout in seconds for groups formed from now on (default 120).")
@site_options
@json_option
@with_client
async def chlss(client: SiteClient, lss: str, seconds: float, as_json: bool) -> None:
    """Change an LSS's consistency-group (extended long busy) timeout (dscli chlss -extlongbusy)."""
    info = await client.set_elb_timeout(lss, seconds)
    if as_json:
        _emit_json(info)
        return
    click.echo(f"LSS {info.lss}: ELB timeout {info.elb_timeout:g} s")


@site_group.command("lsholds")
@site_options
@json_option
@with_client
async def lsholds(client: SiteClient, as_json: bool) -> None:
    """List the source-volume holds the array recorded (freeze to release)."""
    holds = await client.hold_history()
    if as_json:
        _emit_json(holds)
        return
    _table(None, ["Source", "LSS", "Since", "Released at", "Held (s)", "By ELB timeout"],
           [(h.serial, h.lss, f"{h.since:.3f}", "-" if h.released_at is None else f"{h.released_at:.3f}",
             "-" if h.released_at is None else f"{h.released_at - h.since:.3f}", _yn(h.by_timeout)) for h in holds])


@site_group.command("lshost")
@site_options
@json_option
@with_client
async def lshost(client: SiteClient, as_json: bool) -> None:
    """List the farm's hosts and their VMs."""
    hosts = await client.list_hosts()
    if as_json:
        _emit_json(hosts)
        return
    _table(None, ["Host", "Kind", "Version", "VMs"], [(h.name, h.kind, h.version, ", ".join(h.vms)) for h in hosts])


@site_group.command("lsvm")
@click.option("--label", "labels", multiple=True, help="KEY=VALUE selector (repeatable).")
@site_options
@json_option
@with_client
async def lsvm(client: SiteClient, labels: tuple[str, ...], as_json: bool) -> None:
    """List VMs, their power state and disks."""
    selector = {}
    for item in labels:
        key, sep, value = item.partition("=")
        if not sep:
            raise _Fail(f"--label must be KEY=VALUE, not {item!r}")
        selector[key] = value
    vms = await client.list_vms(selector or None)
    if as_json:
        _emit_json(vms)
        return
    _table(None, ["VM", "Host", "Power", "Quiesce", "Disks"], [
        (v.name, v.host, v.power.value, ",".join(q.value for q in v.quiesce_levels),
         " ".join(f"{d.name}={d.serial}({d.kind.value})" for d in v.disks))
        for v in vms
    ])


@site_group.command("list-disks")
@click.option("--host", required=True, help="Host (or VM) whose disk names to list.")
@site_options
@json_option
@with_client
async def list_disks(client: SiteClient, host: str, as_json: bool) -> None:
    """Disk names -> ESS volume serials of a host (rsList2105s)."""
    _show_disks(await client.list_disks(host), as_json)


@site_group.command("prime")
@click.option("--host", required=True, help="Host (or VM) whose device names to load.")
@site_options
@json_option
@with_client
async def prime(client: SiteClient, host: str, as_json: bool) -> None:
    """Load a host's device names into Copy Services (rsPrimeServer)."""
    _show_disks(await client.prime(host), as_json)


@site_group.command("mktask")
@click.argument("name")
@click.option("--pair", "pairs", multiple=True, required=True,
              help="SOURCE:TARGET, each a serial or HOST:DISK (repeatable), e.g. esx1:Disk1:20413698.")
@flash_options
@site_options
@with_client
async def mktask(client: SiteClient, name: str, pairs: tuple[str, ...], nocp: bool, record: bool, persist: bool,
                 freeze: bool, seqnum: str | None, tgtinhibit: bool) -> None:
    """Save a named copy-services task (a set of pairs and options), checked against the
    array first: every host disk and volume exists, sizes match, no target twice."""
    task = api.SavedTask(name=name, pairs=tuple(_pair(p) for p in pairs),
                         options=_options(nocp, record, persist, freeze, seqnum, tgtinhibit))
    await _check_task(client, name, task.pairs)
    await client.save_task(task)
    click.echo(f"task {name} saved: {len(task.pairs)} pair(s)")


@site_group.command("lstask")
@site_options
@json_option
@with_client
async def lstask(client: SiteClient, as_json: bool) -> None:
    """List saved copy-services tasks."""
    tasks = await client.list_tasks()
    if as_json:
        _emit_json(tasks)
        return
    _table(None, ["Task", "Pairs", "Mode", "Options"], [
        (t.name, " ".join(f"{s}:{d}" for s, d in t.pairs), t.options.mode.value,
         ",".join(k for k in ("record", "persistent", "freeze", "inhibit_target_writes") if getattr(t.options, k))
         + (f" tag={t.options.tag}" if t.options.tag else ""))
        for t in tasks
    ])


@site_group.command("exec-task")
@click.argument("name")
@click.option("--seqnum", default=None, help="Tag for the relationships (overrides the task's).")
@site_options
@json_option
@with_client
async def exec_task(client: SiteClient, name: str, seqnum: str | None, as_json: bool) -> None:
    """Run a saved task: establish its pairs, all or none (rsExecuteTask)."""
    _show_relationships(await client.execute_task(name, tag=seqnum), as_json)


@site_group.command("mkflash")
@click.argument("source")
@click.argument("target")
@flash_options
@site_options
@json_option
@with_client
async def mkflash(client: SiteClient, source: str, target: str, nocp: bool, record: bool, persist: bool,
                  freeze: bool, seqnum: str | None, tgtinhibit: bool, as_json: bool) -> None:
    """Establish a FlashCopy relationship SOURCE -> TARGET."""
    rel = await client.establish(source, target, _options(nocp, record, persist, freeze, seqnum, tgtinhibit))
    _show_relationships([rel], as_json)


@site_group.command("rmflash")
@click.argument("source")
@click.argument("target")
@click.option("--cp", "after_copy", is_flag=True, help="Finish the background copy first, then end the relationship.")
@click.option("--tgtreleasespace", "release_space", is_flag=True,
              help="Give a space-efficient target's tracks back to its pool (the target then reads as zeros).")
@site_options
@with_client
async def rmflash(client: SiteClient, source: str, target: str, after_copy: bool, release_space: bool) -> None:
    """Withdraw the relationship SOURCE -> TARGET."""
    await client.withdraw(source, target, after_copy=after_copy, release_space=release_space)
    click.echo(f"FlashCopy relationship {source}:{target} withdrawn" + (" (after copy)" if after_copy else "")
               + (", target space released" if release_space else ""))


@site_group.command("resyncflash")
@click.argument("source")
@click.argument("target")
@flash_options
@site_options
@json_option
@with_client
async def resyncflash(client: SiteClient, source: str, target: str, nocp: bool, record: bool, persist: bool,
                      freeze: bool, seqnum: str | None, tgtinhibit: bool, as_json: bool) -> None:
    """Incremental refresh of a recording relationship: copy only changed tracks.

    The flags given replace the relationship's, as with dscli: give --record --persist
    again to keep it incremental (without them it dissolves after this copy)."""
    options = _options(nocp, record, persist, freeze, seqnum, tgtinhibit)
    _show_relationships([await client.resync(source, target, options=options)], as_json)


@site_group.command("reverseflash")
@click.argument("source")
@click.argument("target")
@click.option("--seqnum", default=None, help="New sequence number / tag.")
@click.option("--fast", is_flag=True, help="Fast reverse restore: before the background copy has finished; "
              "the former target is then no usable image until established again.")
@site_options
@json_option
@with_client
async def reverseflash(client: SiteClient, source: str, target: str, seqnum: str | None, fast: bool, as_json: bool) -> None:
    """Reverse restore TARGET -> SOURCE (changed tracks only); the roles swap."""
    _show_relationships([await client.reverse(source, target, tag=seqnum, fast=fast)], as_json)


@site_group.command("unfreeze")
@click.argument("lsses", nargs=-1, required=True)
@site_options
@json_option
@with_client
async def unfreeze(client: SiteClient, lsses: tuple[str, ...], as_json: bool) -> None:
    """Release the extended long busy of these LSSs (unfreezeflash: consistency created)."""
    releases = await client.unfreeze(list(lsses))
    if as_json:
        _emit_json(releases)
        return
    if not releases:
        click.echo(f"not frozen: {' '.join(lsses)}")
        return
    _table(None, ["LSS", "Released sources", "Since", "Released at", "By timeout"],
           [(r.lss, " ".join(r.sources) or "-", f"{r.since:.3f}", f"{r.released_at:.3f}", _yn(r.by_timeout))
            for r in releases])


@site_group.command("faults")
@click.option("--set", "plan_file", type=click.File("r"), default=None, help="Install the fault plan in this JSON/YAML file ('-': stdin).")
@click.option("--absolute", is_flag=True, help="Windows are site times, not offsets from now.")
@click.option("--clear", is_flag=True, help="Remove every fault.")
@site_options
@with_client
async def faults(client: SiteClient, plan_file: Any, absolute: bool, clear: bool) -> None:
    """Show, set or clear the served site's fault plan (chaos)."""
    from flowcopy.site.faults import plan_from_data

    if clear:
        await client.clear_faults()
    if plan_file is not None:
        from ruamel.yaml import YAML

        try:
            data = YAML(typ="safe").load(plan_file.read())
        except Exception as exc:  # noqa: BLE001 - YAML's own message says where
            raise _Fail(f"{plan_file.name}: not a valid fault plan document: {exc}") from None
        await client.set_faults(plan_from_data(data, where=plan_file.name), absolute=absolute)
    _emit_json(await client.fault_report())


@site_group.command("bench")
@click.option("--site", "site_url", envvar=ENV_SITE, default=None, help="Bench this served site (default: start one in-process).")
@click.option("--token-file", envvar=ENV_TOKEN_FILE, default=None)
@click.option("--calls", type=int, default=2000, show_default=True, help="Calls per measurement.")
@click.option("--concurrency", type=int, default=16, show_default=True, help="Concurrent callers for the parallel figures.")
@click.option("--vms", type=int, default=0, help="Instead: engine-like traffic for this many VMs, plain vs durable embedded site.")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def bench(site_url: str | None, token_file: str | None, calls: int, concurrency: int, vms: int, as_json: bool) -> None:
    """Per-call overhead over loopback: calls/s for cheap reads and for establish+withdraw."""
    from flowcopy.site.server import run_bench

    if vms > 0:
        from flowcopy.site.persist import bench_embedded

        rows = _run(functools.partial(bench_embedded, vms))
        if as_json:
            click.echo(json.dumps(rows, indent=2))
            return
        _table("flowcopy site bench --vms", ["measurement", "VMs", "seconds", "VMs/s", "mutations/s", "commits"], [
            (r["name"], r["vms"], f"{r['seconds']:.2f}", f"{r.get('vms_per_second', 0):.0f}",
             f"{r.get('mutations_per_second', 0):.0f}", r.get("commits", "-"))
            for r in rows
        ])
        return
    results = _run(functools.partial(run_bench, site_url, token_file, calls=calls, concurrency=concurrency))
    if as_json:
        click.echo(json.dumps(results, indent=2))
        return
    _table("flowcopy site bench", ["measurement", "calls", "concurrency", "calls/s", "mean ms"],
           [(r["name"], r["calls"], r["concurrency"], f"{r['per_second']:.0f}", f"{r['mean_ms']:.3f}") for r in results])
