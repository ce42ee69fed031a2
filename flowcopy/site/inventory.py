"""A lab description (YAML, or the same shape as plain data) -> a populated `LocalSite`.

A lab names one ESS array (box, LSSs, volumes), the farm's hosts, the VMs and their disks
(raw device maps of one LUN, or virtual disks on a shared VMFS LUN), pools of spare
target LUNs, and the guest workloads. `flowcopy/labs/default.yaml` is the seed's lab and
documents the format. An array may also declare `space_pools: {name: capacity}` (space-
efficient pools; a volume joins one with `space_pool: name`) and `lss_command_limit: N`
(each LSS refuses copy-services commands beyond N in flight with LssBusy; unset: no limit). Every error says where: `file:line: path.inside.document: why`.

`generate_lab(vms=..., lsses=...)` builds large labs for concurrency tests and benchmarks
straight from plain data (no YAML), cheaply enough that 10,000 VMs load in seconds.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from flowcopy.site import workloads as wl
from flowcopy.site.api import TRACK_SIZE, SiteError
from flowcopy.site.esx import Farm
from flowcopy.site.ess import Array

DEFAULT_LAB = "default"
_SIZE = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB|GiB|TiB)?\s*$")
_UNITS = {None: 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}


class LabError(Exception):
    """A lab file that cannot be loaded; the message names file, line and path."""


def parse_size(value: object) -> int:
    """Bytes from an int or a string like '256MiB'."""
    if isinstance(value, bool):
        raise ValueError(f"a size must be bytes or like '256MiB', not {value!r}")
    if isinstance(value, int):
        return value
    match = _SIZE.match(str(value))
    if not match:
        raise ValueError(f"a size must be bytes or like '256MiB', not {value!r}")
    return int(match.group(1)) * _UNITS[match.group(2)]


# --------------------------------------------------------------------------- locations


class _Where:
    """Builds 'file:line: path' prefixes from ruamel's line info (plain dicts have none)."""

    def __init__(self, source: str) -> None:
        self.source = source

    def __call__(self, node: object, path: str, key: object = None) -> str:
        line = None
        lc = getattr(node, "lc", None)
        if lc is not None:
            try:
                if key is not None and isinstance(node, Mapping) and key in node:
                    line = lc.key(key)[0] + 1
                elif key is not None and isinstance(node, list) and isinstance(key, int) and key < len(node):
                    line = lc.item(key)[0] + 1
                else:
                    line = lc.line + 1
            except (KeyError, IndexError, TypeError, AttributeError):
                line = getattr(lc, "line", None)
                line = line + 1 if line is not None else None
        loc = f"{self.source}:{line}" if line is not None else self.source
        return f"{loc}: {path}" if path else loc


def _kind(node: object) -> str:
    if isinstance(node, Mapping):
        return "a mapping"
    if isinstance(node, list):
        return "a list"
    if isinstance(node, str):
        return f"text {node!r}"
    if node is None:
        return "nothing"
    return f"{node!r}"


def _mapping(node: object, where: _Where, path: str, parent: object = None, key: object = None) -> Mapping[str, Any]:
    if not isinstance(node, Mapping):
        raise LabError(f"{where(parent if parent is not None else node, path, key)}: expected a mapping, got {_kind(node)}")
    return node


def _list(node: object, where: _Where, path: str, parent: object, key: object) -> Sequence[Any]:
    if node is None:
        return []
    if not isinstance(node, list):
        raise LabError(f"{where(parent, path, key)}: expected a list, got {_kind(node)}")
    return node


def _keys(node: Mapping[str, Any], allowed: set[str], required: set[str], where: _Where, path: str) -> None:
    for key in node:
        if key not in allowed:
            raise LabError(
                f"{where(node, f'{path}.{key}', key)}: unknown key {key!r}; allowed: {', '.join(sorted(allowed))}"
            )
    for key in sorted(required):
        if key not in node:
            raise LabError(f"{where(node, path)}: missing required key {key!r}")


def _str(node: Mapping[str, Any], key: str, where: _Where, path: str, default: str | None = None) -> str:
    value = node.get(key, default)
    if value is None:
        raise LabError(f"{where(node, f'{path}.{key}', key)}: missing {key!r}")
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise LabError(f"{where(node, f'{path}.{key}', key)}: expected text, got {value!r}")
    return str(value)


def _num(node: Mapping[str, Any], key: str, where: _Where, path: str, default: float) -> float:
    value = node.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise LabError(f"{where(node, f'{path}.{key}', key)}: expected a positive number, got {value!r}")
    return float(value)


def _size(node: Mapping[str, Any], key: str, where: _Where, path: str, default: object = None) -> int:
    value = node.get(key, default)
    try:
        size = parse_size(value)
    except ValueError as exc:
        raise LabError(f"{where(node, f'{path}.{key}', key)}: {exc}") from None
    return size


# --------------------------------------------------------------------------- loading


def read_lab(path: str | Path | None = None) -> tuple[Any, str]:
    """The lab document and a name for messages; None = the packaged default lab."""
    if path is None or str(path) == DEFAULT_LAB:
        text = resources.files("flowcopy").joinpath("labs", "default.yaml").read_text()
        source = "flowcopy/labs/default.yaml"
    else:
        p = Path(path)
        if not p.exists() and not p.suffix:
            packaged = resources.files("flowcopy").joinpath("labs", f"{p.name}.yaml")
            if packaged.is_file():
                return read_lab_text(packaged.read_text(), f"flowcopy/labs/{p.name}.yaml"), f"flowcopy/labs/{p.name}.yaml"
        try:
            text = p.read_text()
        except OSError as exc:
            raise LabError(f"{p}: cannot read the lab file: {exc.strerror or exc}") from None
        source = str(p)
    return read_lab_text(text, source), source


def read_lab_text(text: str, source: str = "<lab>") -> Any:
    try:
        doc = YAML(typ="rt").load(text)
    except YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        raise LabError(f"{where}: not valid YAML: {getattr(exc, 'problem', None) or exc}") from None
    return doc


def load_lab(path: str | Path | None = None, **site_kwargs: Any) -> Any:
    """Load a lab file (None: the packaged default lab) into a new `LocalSite`.

    `site_kwargs` go to `LocalSite` (clock, speed, latency, on_mutation).
    """
    doc, source = read_lab(path)
    return build_site(doc, source=source, **site_kwargs)


def build_site(lab: Mapping[str, Any], *, source: str = "<lab>", **site_kwargs: Any) -> Any:
    """A populated `LocalSite` from a lab document (parsed YAML or plain data)."""
    from flowcopy.site.local import LocalSite  # local imports inventory's callers, not the reverse

    array, farm, info, loads = _build(lab, _Where(source))
    site = LocalSite(array=array, farm=farm, lab=info, workloads=loads, **site_kwargs)
    site.format_workloads()
    return site


def _build(lab: object, where: _Where) -> tuple[Array, Farm, dict[str, Any], list[Any]]:
    doc = _mapping(lab, where, "")
    # `faults:` is read by the durable and served site (persist.py), which apply it
    _keys(doc, {"lab", "description", "arrays", "pools", "hosts", "vms", "workloads", "host_luns", "faults"}, {"arrays", "hosts"}, where, "lab")
    name = _str(doc, "lab", where, "lab", default="lab")
    description = str(doc.get("description", "") or "")
    host_luns = str(doc.get("host_luns", "all"))
    if host_luns not in ("all", "own"):
        raise LabError(f"{where(doc, 'host_luns', 'host_luns')}: must be 'all' or 'own', not {host_luns!r}")

    arrays = _list(doc.get("arrays"), where, "arrays", doc, "arrays")
    if len(arrays) != 1:
        raise LabError(f"{where(doc, 'arrays', 'arrays')}: a lab has exactly one array (ESS box), found {len(arrays)}")
    array, lsses = _build_array(arrays[0], where, "arrays[0]")
    limit = arrays[0].get("lss_command_limit") if isinstance(arrays[0], Mapping) else None
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
        raise LabError(f"{where(arrays[0], 'arrays[0].lss_command_limit', 'lss_command_limit')}: "
                       f"expected a positive whole number of concurrent copy-services commands per LSS, got {limit!r}")
    capacity = {v.serial: v.capacity for v in array.volumes()}

    farm = Farm()
    for i, host in enumerate(_list(doc.get("hosts"), where, "hosts", doc, "hosts")):
        path = f"hosts[{i}]"
        host = _mapping(host, where, path)
        _keys(host, {"name", "kind", "version", "model"}, {"name"}, where, path)
        try:
            farm.add_host(
                name=_str(host, "name", where, path),
                kind=_str(host, "kind", where, path, "esx"),
                version=_str(host, "version", where, path, "ESX Server 2.5.0"),
                model=str(host.get("model", "") or ""),
            )
        except SiteError as exc:
            raise LabError(f"{where(host, path)}: {exc.message}") from None

    vmfs_used: dict[str, int] = {}
    for i, vm in enumerate(_list(doc.get("vms"), where, "vms", doc, "vms")):
        path = f"vms[{i}]"
        vm = _mapping(vm, where, path)
        _keys(vm, {"name", "host", "os", "quiesce", "freeze_limit", "labels", "power", "disks"}, {"name", "host"}, where, path)
        vm_name = _str(vm, "name", where, path)
        labels = vm.get("labels") or {}
        if not isinstance(labels, Mapping):
            raise LabError(f"{where(vm, f'{path}.labels', 'labels')}: labels must be a mapping of text to text")
        levels = vm.get("quiesce", ["none", "filesystem", "application", "poweroff"])
        if not isinstance(levels, list):
            raise LabError(f"{where(vm, f'{path}.quiesce', 'quiesce')}: expected a list of quiesce levels")
        try:
            farm.add_vm(
                name=vm_name,
                host=_str(vm, "host", where, path),
                os=str(vm.get("os", "") or ""),
                quiesce_levels=[str(x) for x in levels],
                labels={str(k): str(v) for k, v in labels.items()},
                freeze_limit=_num(vm, "freeze_limit", where, path, 3600.0),
                power=_str(vm, "power", where, path, "on"),
            )
        except (SiteError, ValueError) as exc:
            raise LabError(f"{where(vm, path)}: {getattr(exc, 'message', exc)}") from None
        for j, disk in enumerate(_list(vm.get("disks"), where, f"{path}.disks", vm, "disks")):
            dpath = f"{path}.disks[{j}]"
            disk = _mapping(disk, where, dpath)
            _keys(disk, {"name", "rdm", "vmfs", "guest_path", "label", "capacity"}, {"name"}, where, dpath)
            if ("rdm" in disk) == ("vmfs" in disk):
                raise LabError(f"{where(disk, dpath)}: a disk is either `rdm: SERIAL` or `vmfs: SERIAL`")
            kind = "rdm" if "rdm" in disk else "vmfs"
            serial = _str(disk, kind, where, dpath)
            if serial not in capacity:
                raise LabError(f"{where(disk, f'{dpath}.{kind}', kind)}: no volume {serial} on the array")
            if kind == "rdm":
                size = capacity[serial]
            else:
                size = _size(disk, "capacity", where, dpath, "64MiB")
                vmfs_used[serial] = vmfs_used.get(serial, 0) + size
                if vmfs_used[serial] > capacity[serial]:
                    raise LabError(
                        f"{where(disk, dpath)}: VMFS LUN {serial} ({capacity[serial]} bytes) is too small for "
                        f"the virtual disks placed on it ({vmfs_used[serial]} bytes)"
                    )
            try:
                farm.add_disk(
                    vm=vm_name,
                    name=_str(disk, "name", where, dpath),
                    kind=kind,
                    serial=serial,
                    guest_path=None if disk.get("guest_path") is None else str(disk["guest_path"]),
                    label=None if disk.get("label") is None else str(disk["label"]),
                    capacity=size,
                )
            except SiteError as exc:
                raise LabError(f"{where(disk, dpath)}: {exc.message}") from None

    _map_luns(array, farm, host_luns)

    pools: dict[str, tuple[str, ...]] = {}
    raw_pools = doc.get("pools") or {}
    if not isinstance(raw_pools, Mapping):
        raise LabError(f"{where(doc, 'pools', 'pools')}: pools must map a pool name to a list of serials")
    for pool, members in raw_pools.items():
        items = _list(members, where, f"pools.{pool}", raw_pools, pool)
        for serial in items:
            if str(serial) not in capacity:
                raise LabError(f"{where(raw_pools, f'pools.{pool}', pool)}: no volume {serial} on the array")
        pools[str(pool)] = tuple(str(s) for s in items)

    loads = []
    seen: set[str] = set()
    for i, spec in enumerate(_list(doc.get("workloads"), where, "workloads", doc, "workloads")):
        path = f"workloads[{i}]"
        spec = _mapping(spec, where, path)
        loads.append(_build_workload(spec, farm, capacity, where, path, seen))

    info = {"name": name, "description": description, "pools": pools, "lsses": lsses}
    if limit is not None:
        info["lss_command_limit"] = limit  # LocalSite reads it (and keeps it with its state)
    return array, farm, info, loads


def _build_array(node: object, where: _Where, path: str) -> tuple[Array, list[str]]:
    arr = _mapping(node, where, path)
    _keys(arr, {"name", "box", "model", "elb_timeout", "copy_rate", "lsses", "volumes", "space_pools",
                "lss_command_limit"}, {"box"}, where, path)
    box = _str(arr, "box", where, path)
    try:
        array = Array(
            box=box,
            elb_timeout=_num(arr, "elb_timeout", where, path, 120.0),
            bandwidth=float(_size(arr, "copy_rate", where, path, 100_000_000)),
        )
    except SiteError as exc:
        raise LabError(f"{where(arr, path)}: {exc.message}") from None
    lsses = [str(x) for x in _list(arr.get("lsses"), where, f"{path}.lsses", arr, "lsses")]
    se_pools = arr.get("space_pools") or {}
    if not isinstance(se_pools, Mapping):
        raise LabError(f"{where(arr, f'{path}.space_pools', 'space_pools')}: space_pools must map a pool name to its capacity")
    for pool in se_pools:
        ppath = f"{path}.space_pools.{pool}"
        capacity = _size(se_pools, pool, where, ppath)
        try:
            array.add_space_pool(str(pool), capacity)
        except SiteError as exc:
            raise LabError(f"{where(se_pools, ppath, pool)}: {exc.message}") from None
    for i, vol in enumerate(_list(arr.get("volumes"), where, f"{path}.volumes", arr, "volumes")):
        vpath = f"{path}.volumes[{i}]"
        vol = _mapping(vol, where, vpath)
        _keys(vol, {"serial", "capacity", "label", "lss", "online", "space_pool"}, {"serial", "capacity"}, where, vpath)
        serial = _str(vol, "serial", where, vpath)
        lss = str(vol.get("lss", serial[3:5]))
        if lsses and lss not in lsses:
            raise LabError(f"{where(vol, vpath)}: volume {serial} is on LSS {lss}, which the array does not list ({', '.join(lsses)})")
        size = _size(vol, "capacity", where, vpath)
        if size <= 0 or size % TRACK_SIZE:
            raise LabError(f"{where(vol, f'{vpath}.capacity', 'capacity')}: capacity must be a positive multiple of 64 KiB, not {size}")
        try:
            array.add_volume(serial, lss=lss, capacity=size, label=None if vol.get("label") is None else str(vol["label"]),
                             online=bool(vol.get("online", True)),
                             space_pool=None if vol.get("space_pool") is None else str(vol["space_pool"]))
        except SiteError as exc:
            raise LabError(f"{where(vol, vpath)}: {exc.message}") from None
    if not lsses:
        lsses = sorted({v.lss for v in array.volumes()})
    return array, lsses


def _map_luns(array: Array, farm: Farm, host_luns: str) -> None:
    """Array host mappings: each VM sees its RDMs by its own disk names; ESX hosts see the farm's.

    With `host_luns: all` every ESX host sees every raw-mapped LUN (a shared-storage farm,
    what VMotion needs) as Disk1.. in serial order, plus the VMFS LUNs by label; with `own`
    a host sees only the LUNs of the VMs it runs (big generated labs).
    """
    rdm: list[tuple[str, str]] = []  # (serial, home host)
    for vm in farm.vms.values():
        for disk in vm.disks:
            if disk.kind.value == "rdm":
                array.map_lun(vm.name, disk.name, disk.serial)
                rdm.append((disk.serial, vm.host))
    vmfs = sorted(farm.vmfs_luns())
    esx = [h.name for h in farm.hosts.values() if h.kind == "esx"]
    rdm.sort()
    for host in esx:
        mine = [s for s, home in rdm if host_luns == "all" or home == host]
        for n, serial in enumerate(mine, start=1):
            array.map_lun(host, f"Disk{n}", serial)
        for n, serial in enumerate(vmfs):
            array.map_lun(host, f"vmfs{n}", serial)


_WL_KEYS = {"name", "kind", "vm", "disk", "log", "data", "seed", "interval", "pages", "autostart",
            "db", "journal", "mode", "write_latency"}
_REAL_KEYS = {"sqlite": {"db", "journal", "mode", "write_latency"}, "ext4": {"disk", "journal", "write_latency"}}


def _build_workload(spec: Mapping[str, Any], farm: Farm, capacity: Mapping[str, int], where: _Where, path: str, seen: set[str]) -> Any:
    _keys(spec, _WL_KEYS, {"name", "kind", "vm"}, where, path)
    name = _str(spec, "name", where, path)
    if name in seen:
        raise LabError(f"{where(spec, f'{path}.name', 'name')}: a workload {name!r} is already defined")
    seen.add(name)
    kind = _str(spec, "kind", where, path)
    vm = _str(spec, "vm", where, path)
    if vm not in farm.vms:
        raise LabError(f"{where(spec, f'{path}.vm', 'vm')}: no VM {vm!r} in the lab")
    seed = spec.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise LabError(f"{where(spec, f'{path}.seed', 'seed')}: seed must be an integer, not {seed!r}")
    autostart = bool(spec.get("autostart", False))

    def disk(key: str) -> str:
        ref = _str(spec, key, where, path)
        try:
            info = farm.lun_of(vm, ref)
        except SiteError as exc:
            raise LabError(f"{where(spec, f'{path}.{key}', key)}: {exc.message}") from None
        return info.serial

    if kind in _REAL_KEYS:
        _no(spec, (_WL_KEYS - {"name", "kind", "vm", "seed", "interval", "autostart"}) - _REAL_KEYS[kind], where, path, kind)
        latency = spec.get("write_latency", 0.001)
        if isinstance(latency, bool) or not isinstance(latency, (int, float)) or latency < 0:
            raise LabError(f"{where(spec, f'{path}.write_latency', 'write_latency')}: expected zero or a positive number of seconds, got {latency!r}")
        latency = float(latency)
    if kind == "sqlite":
        from flowcopy.site.apps.sqlite_app import JOURNALS, SqliteWorkload

        db, journal = disk("db"), disk("journal")
        if db == journal:
            raise LabError(f"{where(spec, path)}: the SQLite database and its journal must be on two LUNs")
        mode = _str(spec, "mode", where, path, "rollback")
        if mode not in JOURNALS:
            raise LabError(f"{where(spec, f'{path}.mode', 'mode')}: mode must be 'rollback' (journal) or 'wal', not {mode!r}")
        load = SqliteWorkload(name=name, vm=vm, db_serial=db, journal_serial=journal, seed=seed, journal=mode,
                              interval=_num(spec, "interval", where, path, 0.1), write_latency=latency)
    elif kind == "ext4":
        from flowcopy.site.apps.ext4_app import Ext4Workload

        serial = disk("disk")
        if capacity[serial] < 16 * 2**20:
            raise LabError(f"{where(spec, f'{path}.disk', 'disk')}: LUN {serial} is too small for ext4 (needs 16 MiB)")
        journal_lun = disk("journal") if "journal" in spec else None  # external journal device; else inode 8
        if journal_lun == serial:
            raise LabError(f"{where(spec, f'{path}.journal', 'journal')}: an external journal needs its own LUN, not the file system's")
        if journal_lun is not None and capacity[journal_lun] < 4 * 2**20:
            raise LabError(f"{where(spec, f'{path}.journal', 'journal')}: LUN {journal_lun} is too small for an ext4 journal (needs 4 MiB)")
        load = Ext4Workload(name=name, vm=vm, serial=serial, seed=seed, size=capacity[serial], journal_serial=journal_lun,
                            journal_size=capacity[journal_lun] if journal_lun else 0,
                            interval=_num(spec, "interval", where, path, 1.0), write_latency=latency)
    elif kind == "filesystem":
        _no(spec, {"log", "data", "pages"} | _REAL_KEYS["sqlite"], where, path, kind)
        serial = disk("disk")
        if capacity[serial] < wl.FS_MIN_BYTES:
            raise LabError(f"{where(spec, f'{path}.disk', 'disk')}: LUN {serial} is too small for the file system (needs {wl.FS_MIN_BYTES} bytes)")
        load: Any = wl.FilesystemWorkload(
            name=name, vm=vm, serial=serial, seed=seed, interval=_num(spec, "interval", where, path, 1.0), label=name
        )
    elif kind == "database":
        _no(spec, {"disk"} | _REAL_KEYS["sqlite"], where, path, kind)
        log, data = disk("log"), disk("data")
        if log == data:
            raise LabError(f"{where(spec, path)}: the database's log and data must be two LUNs")
        pages = int(_num(spec, "pages", where, path, wl.DEFAULT_PAGES))
        if capacity[data] < (pages + 1) * wl.PAGE_SIZE:
            raise LabError(f"{where(spec, f'{path}.data', 'data')}: LUN {data} is too small for {pages} pages")
        cap = wl.log_capacity(capacity[log])
        if cap < 16:
            raise LabError(f"{where(spec, f'{path}.log', 'log')}: LUN {log} is too small for a log")
        load = wl.DatabaseWorkload(
            name=name, vm=vm, log_serial=log, data_serial=data, seed=seed,
            interval=_num(spec, "interval", where, path, 0.1), pages=pages, capacity=cap,
        )
    else:
        raise LabError(f"{where(spec, f'{path}.kind', 'kind')}: kind must be 'filesystem', 'database', 'sqlite' or 'ext4', not {kind!r}")
    load.autostart = autostart
    return load


def _no(spec: Mapping[str, Any], keys: set[str], where: _Where, path: str, kind: str) -> None:
    for key in sorted(keys):
        if key in spec:
            raise LabError(f"{where(spec, f'{path}.{key}', key)}: a {kind} workload has no {key!r}")


# --------------------------------------------------------------------------- large labs


def generate_lab_spec(
    vms: int,
    lsses: int,
    *,
    disks_per_vm: int = 2,
    targets_per_disk: int = 1,
    hosts: int | None = None,
    capacity: int = 64 << 20,
    box: str = "698",
    vmfs_every: int = 0,
    workloads: int = 0,
    labels: Callable[[int], Mapping[str, str]] | None = None,
    real_apps: int = 0,
    copy_rate: int = 8 << 30,
) -> dict[str, Any]:
    """A lab document for `vms` VMs over `lsses` LSSs (same shape as a lab YAML file).

    VM i is `vm{i:05d}` with RDM disks `Disk1..` (`/data1..`); each disk's targets are
    spare LUNs labelled `<vm>-<disk>-T<k>`, listed in the pool `targets` and, per VM,
    `targets:<vm>`. Serials spread round-robin over LSSs `10..`; the volume part is hex,
    so an LSS holds 4096 volumes. `workloads` VMs (the first ones) get a database on
    Disk1/Disk2 (needs disks_per_vm >= 2). `real_apps` VMs after those run real software:
    alternately a SQLite bank (main file Disk1, journal Disk2; rollback journal, then WAL)
    and an ext4 file system on Disk1 with its journal on Disk2. `vmfs_every` > 0 gives every n-th VM a system disk
    on a shared VMFS LUN. `copy_rate` is the array's background-copy bandwidth, shared by
    all running copies (a fleet-sized box: 8 GiB/s, so 2,000 64 MiB copies take ~16 s).
    """
    if vms <= 0 or lsses <= 0 or disks_per_vm <= 0 or targets_per_disk < 0:
        raise ValueError("vms, lsses and disks_per_vm must be positive, targets_per_disk not negative")
    if lsses > 0xF0:
        raise ValueError("at most 240 LSSs (two hex digits from 10)")
    per_lss = -(-vms * disks_per_vm * (1 + targets_per_disk) // lsses) + 1
    if per_lss > 0xFFF:
        raise ValueError(f"{per_lss} volumes per LSS do not fit the 3-digit volume number: use more LSSs")
    hosts = hosts or max(1, -(-vms // 50))
    lss_names = [f"{0x10 + i:02X}" for i in range(lsses)]
    counters = [0] * lsses
    cursor = 0
    volumes: list[dict[str, Any]] = []

    def new_volume(label: str, size: int) -> str:
        nonlocal cursor
        k = cursor % lsses
        cursor += 1
        serial = f"{counters[k]:03X}{lss_names[k]}{box}"
        counters[k] += 1
        volumes.append({"serial": serial, "capacity": size, "label": label})
        return serial

    vmfs_serial = new_volume("VMFS_SHARED", max(capacity, (vms // max(vmfs_every, 1) + 1) * TRACK_SIZE)) if vmfs_every else None
    host_names = [f"esx{h:03d}" for h in range(hosts)]
    vm_docs: list[dict[str, Any]] = []
    pools: dict[str, list[str]] = {"targets": []}
    loads: list[dict[str, Any]] = []
    for i in range(vms):
        name = f"vm{i:05d}"
        disks: list[dict[str, Any]] = []
        if vmfs_serial and i % vmfs_every == 0:
            disks.append({"name": "Disk0", "vmfs": vmfs_serial, "guest_path": "/", "capacity": TRACK_SIZE})
        mine: list[str] = []
        for d in range(1, disks_per_vm + 1):
            serial = new_volume(f"{name}-Disk{d}", capacity)
            disks.append({"name": f"Disk{d}", "rdm": serial, "guest_path": f"/data{d}", "label": f"{name}-Disk{d}"})
            for k in range(targets_per_disk):
                mine.append(new_volume(f"{name}-Disk{d}-T{k}", capacity))
        pools["targets"].extend(mine)
        pools[f"targets:{name}"] = mine
        vm_labels = dict(labels(i)) if labels else {"group": f"g{i % 10}", "backup": "nightly"}
        vm_docs.append(
            {
                "name": name,
                "host": host_names[i % hosts],
                "os": "Red Hat Enterprise Linux 3",
                "quiesce": ["none", "filesystem", "application", "poweroff"],
                "freeze_limit": 600,
                "labels": vm_labels,
                "disks": disks,
            }
        )
        if i < workloads and disks_per_vm >= 2:
            loads.append({"name": f"{name}-db", "kind": "database", "vm": name, "log": "Disk1",
                          "data": "Disk2", "seed": i, "interval": 0.5, "pages": 256, "autostart": True})
        elif workloads <= i < workloads + real_apps and disks_per_vm >= 2:
            j = i - workloads
            if j % 2 == 0:
                loads.append({"name": f"{name}-sqlite", "kind": "sqlite", "vm": name, "db": "Disk1", "journal": "Disk2",
                              "mode": ("rollback", "wal")[(j // 2) % 2], "seed": i, "interval": 0.2, "autostart": True})
            else:
                loads.append({"name": f"{name}-ext4", "kind": "ext4", "vm": name, "disk": "Disk1", "journal": "Disk2", "seed": i,
                              "interval": 1.0, "autostart": True})
    return {
        "lab": f"generated-{vms}",
        "description": f"{vms} VMs over {lsses} LSSs, {disks_per_vm} RDM disks each, {targets_per_disk} target(s) per disk",
        "host_luns": "own",
        "arrays": [{"name": f"ess-{box}", "box": box, "lsses": lss_names, "volumes": volumes, "copy_rate": copy_rate}],
        "pools": pools,
        "hosts": [{"name": h, "kind": "esx"} for h in host_names] + [{"name": "backup-proxy", "kind": "backup"}],
        "vms": vm_docs,
        "workloads": loads,
    }


def generate_lab(vms: int, lsses: int, **kwargs: Any) -> Any:
    """A `LocalSite` with `vms` generated VMs (see `generate_lab_spec`); LocalSite kwargs pass through."""
    spec_keys = {"disks_per_vm", "targets_per_disk", "hosts", "capacity", "box", "vmfs_every", "workloads", "labels", "real_apps"}
    spec = generate_lab_spec(vms, lsses, **{k: v for k, v in kwargs.items() if k in spec_keys})
    return build_site(spec, source=f"<generated lab: {vms} VMs>", **{k: v for k, v in kwargs.items() if k not in spec_keys})
