"""Workflow definitions: the admin's YAML -> frozen attrs values the engine runs.

Nothing runs from a file that was not fully understood, so loading is strict and loud:
every problem of a file is collected (not only the first) and each names the file, the
line and column of the offending YAML node, and the path inside the document
(`units[2].disks[0].target`), in words an admin acts on.

Three layers, each pure:

1. YAML -> plain data. ruamel.yaml's round-trip loader keeps the line/column of every
   node; the tree is kept beside the plain copy so any path can be located later.
   File-level refusals (empty, binary, > 1 MiB, not YAML, not a mapping) and duplicate
   keys are found here.
2. plain data -> *document* classes (`WorkflowSpec`, `UnitSpec`: exactly what an admin
   may write, with workflow-level defaults still unresolved) by one configured cattrs
   `Converter`. Its hooks are strict (no `"12"` for a number, no string iterated as a
   list) and its detailed validation errors are walked into paths.
3. document -> *resolved* view (`Workflow`, `UnitDef`): every unit carries its effective
   mode, quiesce level, timeouts... so the engine never re-implements defaulting; the
   cross-field rules (targets, consistency groups, incremental) are checked here, with
   the location of the value that decided.

What needs the site (does the VM exist, is the disk raw-mapped) is the prepare stage's
business, not this module's.
"""

from __future__ import annotations

import difflib
import io
import re
import warnings
import zoneinfo
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import Any, Literal, NewType, Union, get_args, get_origin

import attrs
import cattrs
import cattrs.cols
from cattrs.errors import (
    AttributeValidationNote,
    ClassValidationError,
    ForbiddenExtraKeysError,
    IterableValidationError,
    IterableValidationNote,
)
from cattrs.gen import make_dict_structure_fn
from croniter import croniter
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import YAMLError
from ruamel.yaml.events import (
    MappingEndEvent,
    MappingStartEvent,
    ScalarEvent,
    SequenceEndEvent,
    SequenceStartEvent,
)
from ruamel.yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from ruamel.yaml.scalarbool import ScalarBoolean

from flowcopy.durations import DurationError, format_duration, parse_duration
from flowcopy.site.api import (
    DEFAULT_ELB_TIMEOUT,
    ERRORS_BY_KIND,
    MAX_TARGETS_PER_SOURCE,
    CopyMode,
    FlashOptions,
    QuiesceLevel,
)

__all__ = [
    "MAX_FILE_BYTES",
    "Action",
    "Before",
    "Concurrency",
    "CopyAction",
    "DefinitionError",
    "DiskDef",
    "Kind",
    "Mode",
    "Overlap",
    "PoolTarget",
    "Problem",
    "Retention",
    "RetryPolicy",
    "RotateTarget",
    "Schedule",
    "SerialTarget",
    "SiteRef",
    "StageTimeouts",
    "Target",
    "UnitDef",
    "UnitSpec",
    "VmDiskTarget",
    "Withdraw",
    "Workflow",
    "WorkflowSpec",
    "converter",
    "definition_files",
    "dump_text",
    "load_definition",
    "load_text",
    "unstructure",
]

MAX_FILE_BYTES = 1024 * 1024
"""Definitions are a few KiB; anything over 1 MiB is a mistake (a log, an image) and is refused."""

MAX_DEPTH = 64
"""A definition nests about six levels; hundreds means a broken or hostile file."""

MAX_NODES = 100_000
"""Aliases may multiply a small file into a huge tree ("billion laughs"); refuse beyond this."""

MIN_FREEZE_TIMEOUT = 1.0
MAX_FREEZE_TIMEOUT = DEFAULT_ELB_TIMEOUT
"""A freeze longer than the array's ELB timeout would outlive the consistency it protects."""

DEFAULT_FREEZE_TIMEOUT = 30.0


# --------------------------------------------------------------------------- problems


@attrs.frozen
class Problem:
    """One thing wrong with a definition, where it is and why. Lines and columns are 1-based."""

    file: str
    line: int
    col: int
    path: str  # "units[2].disks[0].target"; "" for the file as a whole
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}:{self.col}"
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class DefinitionError(Exception):
    """A definition that cannot run; `problems` lists every problem found, in file order."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems: tuple[Problem, ...] = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


# --------------------------------------------------------------------------- value types

Duration = NewType("Duration", float)
"""Seconds; written `30s`, `5m`, `2h`, `1h30m`, `500ms` (or a bare number of seconds)."""

FreezeTimeout = NewType("FreezeTimeout", float)
"""A Duration between 1s and the array's ELB timeout (120s)."""

Serial = NewType("Serial", str)
"""An ESS volume serial: 8 digits (volume 3, LSS 2, box 3), e.g. 20313698."""

DiskRef = NewType("DiskRef", str)
"""A VM's disk by host-visible name (`Disk1`), guest path (`E:`) or 8-digit serial."""

Name = NewType("Name", str)
"""A non-empty name of something at the site (VM, host, pool, task, group)."""

WorkflowName = NewType("WorkflowName", str)
"""Lower-case name of a workflow: journal keys, log fields and file names use it."""

Cron = NewType("Cron", str)
"""A five-field cron expression (minute hour day-of-month month day-of-week)."""

TimeZone = NewType("TimeZone", str)
"""An IANA time zone name, e.g. Europe/Berlin."""

ErrorKind = NewType("ErrorKind", str)
"""A `SiteError.kind` from flowcopy.site.api (e.g. `unknown_volume`)."""

Url = NewType("Url", str)
"""`http://` or `https://` address of a served site."""

Count = NewType("Count", int)
"""A whole number >= 1."""

Factor = NewType("Factor", float)
"""A finite number >= 1 (a backoff multiplier)."""

WORKFLOW_NAME_PATTERN = r"^[a-z0-9][a-z0-9\-_.]{0,63}$"
SERIAL_PATTERN = r"^[0-9]{8}$"
URL_PATTERN = r"^https?://[^\s/]+(/\S*)?$"
_WORKFLOW_NAME_RE = re.compile(WORKFLOW_NAME_PATTERN)
_SERIAL_RE = re.compile(SERIAL_PATTERN)
_URL_RE = re.compile(URL_PATTERN)


def is_serial(ref: str) -> bool:
    """True when a disk reference is an ESS serial rather than a host-visible name."""
    return bool(_SERIAL_RE.match(ref))


class Kind(str, Enum):
    BACKUP = "backup"
    RESTORE = "restore"  # incremental reverse restore: target -> source


class Mode(str, Enum):
    """Copy mode of a pair; `incremental` is the array's record + persistent copy."""

    COPY = "copy"
    NOCOPY = "nocopy"
    INCREMENTAL = "incremental"


class Overlap(str, Enum):
    """What the scheduler does when a run is due while the previous one still runs."""

    SKIP = "skip"
    BUFFER_ONE = "buffer_one"
    ALLOW = "allow"


class Action(str, Enum):
    """What the copy stage does with the target image."""

    WAIT = "wait"  # wait for the background copy to finish
    EXPORT = "export"  # mount on a backup host and export an image to a folder
    MOUNT_CHECK = "mount_check"  # mount on a second guest and check it


class Withdraw(str, Enum):
    ALWAYS = "always"  # withdraw at the end of the run
    KEEP = "keep"  # leave the relationship (incremental: the next run resyncs it)
    AFTER_COPY = "after_copy"  # withdraw once the background copy has finished (rmflash -cp)


class Before(str, Enum):
    """How a restore makes the source quiet before the reverse copy."""

    POWEROFF = "poweroff"
    QUIESCE = "quiesce"


def _doc(text: str, **extra: Any) -> dict[str, Any]:
    return {"doc": text, **extra}


def _field(default: Any = attrs.NOTHING, doc: str = "") -> Any:
    return attrs.field(default=default, metadata=_doc(doc))


# --------------------------------------------------------------------------- document classes


@attrs.frozen(kw_only=True)
class Schedule:
    """When the service starts runs of this workflow."""

    cron: Cron = _field(doc="five-field cron expression, e.g. '0 * * * *' (hourly)")
    timezone: TimeZone | None = _field(None, "IANA time zone of the cron fields (default: UTC)")
    overlap: Overlap = _field(Overlap.SKIP, "when a run is due while the last one still runs")
    catch_up: Duration = _field(0.0, "after downtime, still start a run missed by at most this long")

    def next_after(self, after: datetime) -> datetime:
        """The first fire time strictly after `after` (an aware datetime), in this schedule's zone."""
        zone = zoneinfo.ZoneInfo(self.timezone or "UTC")
        start = after.astimezone(zone)
        result: datetime = croniter(self.cron, start).get_next(datetime)
        return result


@attrs.frozen(kw_only=True)
class SiteRef:
    """Which site to act on: the embedded lab (optionally another lab file) or a served site."""

    url: Url | None = _field(None, "address of a served site (flowcopy site serve)")
    lab: str | None = _field(None, "lab file for the embedded site (default: the built-in lab)")

    @property
    def embedded(self) -> bool:
        return self.url is None


@attrs.frozen(kw_only=True)
class SerialTarget:
    """A fixed target LUN by serial."""

    serial: Serial = _field(doc="8-digit ESS serial of the target volume")


@attrs.frozen(kw_only=True)
class VmDiskTarget:
    """A fixed target: a disk of another VM (the seed's 'copy to the second guest')."""

    vm: Name = _field(doc="the VM whose disk receives the copy")
    disk: DiskRef = _field(doc="that VM's disk: Disk1, a guest path, or a serial")


@attrs.frozen(kw_only=True)
class RotateTarget:
    """A target set used in turn, one per run (run 1 -> the first, run 13 -> the first again)."""

    rotate: tuple[Serial, ...] = _field(doc="serials, at most 12 (the array's targets per source)")


@attrs.frozen(kw_only=True)
class PoolTarget:
    """Any free volume of a same-size pool, picked at prepare time."""

    pool: Name = _field(doc="name of a pool of spare volumes defined by the site")


Target = Union[SerialTarget, VmDiskTarget, RotateTarget, PoolTarget]
FixedTarget = Union[SerialTarget, VmDiskTarget]


@attrs.frozen(kw_only=True)
class DiskDef:
    """One source disk of a unit and where its point-in-time copy goes."""

    disk: DiskRef = _field(doc="source disk: host-visible name (Disk1), guest path (E:) or serial")
    target: Target = _field(doc="serial, {serial}, {vm, disk}, {rotate: [serials]} or {pool}")

    def target_for_run(self, run: int) -> SerialTarget | VmDiskTarget | PoolTarget:
        """The target of run number `run` (1 for a workflow's first run); pure.

        A rotation set is used in order and wraps around; fixed and pool targets are the
        same for every run (a pool is resolved to a volume by prepare).
        """
        if run < 1:
            raise ValueError(f"run numbers start at 1, got {run}")
        target = self.target
        if isinstance(target, RotateTarget):
            return SerialTarget(serial=target.rotate[(run - 1) % len(target.rotate)])
        return target


@attrs.frozen(kw_only=True)
class CopyAction:
    """What the copy stage does once the point in time exists."""

    action: Action = _field(Action.WAIT, "wait, export or mount_check")
    to: str | None = _field(None, "export: folder for images (relative paths are inside the store)")
    host: Name | None = _field(None, "export: the backup host that mounts the target and exports it")
    vm: Name | None = _field(None, "mount_check: the second guest that mounts and checks the target")


@attrs.frozen(kw_only=True)
class RetryPolicy:
    """How a failed step is retried; only transient site errors are retried.

    The defaults wait 1, 2, 4, 8, 15, 15 and 15 s (the engine shortens each wait by up
    to a quarter at random, so units that failed together do not return together):
    45..60 s in all, longer than a served site takes to restart (1-7 s measured) and
    than 30 s of site unavailability, yet bounded.
    """

    max_attempts: Count = _field(8, "attempts in all, including the first")
    initial_interval: Duration = _field(1.0, "wait before the first retry")
    backoff: Factor = _field(2.0, "each further wait is this many times longer (>= 1)")
    max_interval: Duration = _field(15.0, "the wait never grows beyond this")
    non_retryable: tuple[ErrorKind, ...] = _field((), "error kinds never retried even if transient")

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based) before the next."""
        if attempt < 1:
            raise ValueError(f"attempts start at 1, got {attempt}")
        try:
            grown = self.initial_interval * self.backoff ** (attempt - 1)
        except OverflowError:
            return float(self.max_interval)
        return float(min(self.max_interval, grown))

    def total_wait(self) -> float:
        """Seconds of waiting between all the attempts (before jitter): what a stage's
        timeout must leave room for, or the stage times out before its retries end."""
        waits = min(int(self.max_attempts), 10_000) - 1
        return float(sum(self.delay(a) for a in range(1, waits + 1)))

    def should_retry(self, attempt: int, kind: str, transient: bool) -> bool:
        """Whether to try again after attempt `attempt` failed with an error of `kind`."""
        return transient and kind not in self.non_retryable and attempt < self.max_attempts


@attrs.frozen(kw_only=True)
class StageTimeouts:
    """Upper bound of each stage of a unit; a stage that overruns fails (and compensates)."""

    prepare: Duration = _field(300.0, "inventory look-ups and checks")
    freeze: Duration = _field(120.0, "quiescing the guests")
    establish: Duration = _field(120.0, "establishing the FlashCopy pairs")
    release: Duration = _field(120.0, "unfreezing the array and thawing the guests")
    copy: Duration = _field(86400.0, "the copy action (background copy, export, mount check)")
    withdraw: Duration = _field(600.0, "withdrawing the relationships")


@attrs.frozen(kw_only=True)
class Concurrency:
    """Limits on simultaneous work, so a big workflow does not swamp the array or the farm."""

    vms: Count = _field(64, "units in flight at once")
    per_lss: Count = _field(8, "copy-services commands in flight per logical subsystem")
    guest_agents: Count = _field(32, "guest quiesce/thaw calls in flight")


@attrs.frozen(kw_only=True)
class Retention:
    """Which backups `flowcopy forget` keeps (restic's meanings), counted per VM and disk
    set; only verified backups count, and a VM's newest verified backup is always kept."""

    keep: Count | None = _field(None, "the same as keep_last")
    keep_last: Count | None = _field(None, "keep the N newest backups")
    keep_daily: Count | None = _field(None, "keep the newest backup of each of the last N days that have one")
    keep_weekly: Count | None = _field(None, "keep the newest backup of each of the last N weeks that have one")


_DEFAULTABLE = (
    "mode",
    "quiesce",
    "freeze_timeout",
    "consistency_group",
    "mixed_quiesce",
    "copy",
    "withdraw",
    "retry",
    "timeouts",
)
"""Fields a unit may set and the workflow may default for all its units."""


@attrs.frozen(kw_only=True)
class UnitSpec:
    """A unit as written: a VM (or a selector of VMs), its disks and optional overrides."""

    vm: Name | None = _field(None, "the VM to protect")
    selector: dict[str, str] | None = _field(None, "labels; every VM carrying all of them is protected")
    task: Name | None = _field(None, "a saved array task run by name instead of listing disks")
    disks: tuple[DiskDef, ...] = _field((), "the source disks and their targets")
    mode: Mode | None = _field(None, "copy, nocopy or incremental (default: the workflow's, else copy)")
    quiesce: QuiesceLevel | None = _field(None, "none, filesystem, application or poweroff")
    freeze_timeout: FreezeTimeout | None = _field(None, "the guest thaws itself after this (1s..120s)")
    consistency_group: Name | None = _field(None, "units with the same group are frozen as one")
    mixed_quiesce: bool | None = _field(None, "allow a group to mix quiesced and unquiesced units")
    copy: CopyAction | None = _field(None, "what the copy stage does")
    withdraw: Withdraw | None = _field(None, "always, keep or after_copy")
    retry: RetryPolicy | None = _field(None, "retry policy (replaces the workflow's as a whole)")
    timeouts: StageTimeouts | None = _field(None, "stage timeouts (replace the workflow's as a whole)")


@attrs.frozen(kw_only=True)
class WorkflowSpec:
    """A definition file as written; `load_text` resolves it into a `Workflow`."""

    name: WorkflowName = _field(doc="lower-case name: letters, digits, - _ .")
    kind: Kind = _field(Kind.BACKUP, "backup, or restore (incremental reverse restore)")
    description: str = _field("", "free text for people")
    schedule: Schedule | None = _field(None, "when the service runs it (without: on demand only)")
    site: SiteRef = _field(SiteRef(), "'embedded' (default), a URL, or {lab: FILE} / {url: URL}")
    before: Before | None = _field(None, "restore only: poweroff (default) or quiesce the VM first")
    mode: Mode | None = _field(None, "default copy mode of the units")
    quiesce: QuiesceLevel | None = _field(None, "default quiesce level of the units")
    freeze_timeout: FreezeTimeout | None = _field(None, "default freeze timeout (1s..120s, default 30s)")
    consistency_group: Name | None = _field(None, "default group: all units in one group")
    mixed_quiesce: bool | None = _field(None, "default for the units' mixed_quiesce")
    copy: CopyAction | None = _field(None, "default copy action")
    withdraw: Withdraw | None = _field(None, "default withdraw policy")
    retry: RetryPolicy | None = _field(None, "default retry policy")
    timeouts: StageTimeouts | None = _field(None, "default stage timeouts")
    concurrency: Concurrency = _field(Concurrency(), "limits on simultaneous work")
    retention: Retention | None = _field(None, "which backups to keep (keep_last, keep_daily, keep_weekly)")
    rpo: Duration | None = _field(None, "recovery point objective, e.g. 26h: VMs whose newest verified backup is older are flagged")
    units: tuple[UnitSpec, ...] = _field(doc="what to protect: VMs (or selectors) and their disks")


# --------------------------------------------------------------------------- resolved view


@attrs.frozen(kw_only=True)
class UnitDef:
    """A unit with every setting effective: what the engine runs, no defaulting left to do.

    A unit with a `selector` expands to one VM each at prepare time; units sharing a
    `consistency_group` are frozen and established as one group (see
    `Workflow.consistency_groups`).
    """

    vm: Name | None = None
    selector: dict[str, str] | None = None
    task: Name | None = None
    disks: tuple[DiskDef, ...] = ()
    mode: Mode = Mode.COPY
    quiesce: QuiesceLevel = QuiesceLevel.FILESYSTEM
    freeze_timeout: FreezeTimeout = FreezeTimeout(DEFAULT_FREEZE_TIMEOUT)
    consistency_group: Name | None = None
    mixed_quiesce: bool = False
    copy: CopyAction = CopyAction()
    withdraw: Withdraw = Withdraw.ALWAYS
    retry: RetryPolicy = RetryPolicy()
    timeouts: StageTimeouts = StageTimeouts()

    @property
    def label(self) -> str:
        """How logs and messages name the unit."""
        if self.vm is not None:
            return self.vm
        if self.selector is not None:
            return "selector " + ",".join(f"{k}={v}" for k, v in sorted(self.selector.items()))
        return f"task {self.task}"

    def flash_options(self, *, tag: str | None = None, freeze: bool = True) -> FlashOptions:
        """The establish options of this unit's pairs (`mkflash` flags)."""
        if self.mode is Mode.INCREMENTAL:
            return FlashOptions(mode=CopyMode.COPY, record=True, persistent=True, freeze=freeze, tag=tag)
        mode = CopyMode.NOCOPY if self.mode is Mode.NOCOPY else CopyMode.COPY
        return FlashOptions(mode=mode, freeze=freeze, tag=tag)


@attrs.frozen(kw_only=True)
class Workflow:
    """A loaded, valid definition: backup (or restore, `kind`) of its units."""

    name: WorkflowName
    kind: Kind = Kind.BACKUP
    description: str = ""
    schedule: Schedule | None = None
    site: SiteRef = SiteRef()
    before: Before | None = None  # restores only (always set for them)
    concurrency: Concurrency = Concurrency()
    retention: Retention | None = None
    rpo: Duration | None = None
    units: tuple[UnitDef, ...]

    @property
    def is_restore(self) -> bool:
        return self.kind is Kind.RESTORE

    def consistency_groups(self) -> dict[str, tuple[int, ...]]:
        """Named groups -> indexes of their units. Units in no group are each their own group
        (and a selector unit outside a group is one group per selected VM)."""
        groups: dict[str, list[int]] = {}
        for index, unit in enumerate(self.units):
            if unit.consistency_group is not None:
                groups.setdefault(unit.consistency_group, []).append(index)
        return {name: tuple(indexes) for name, indexes in groups.items()}


# --------------------------------------------------------------------------- the converter


class _Invalid(ValueError):
    """Raised by structure hooks; the message is shown to the admin as is."""


def _suggest(word: str, choices: Iterable[str]) -> str:
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" — did you mean {match[0]!r}?" if match else ""


def _describe(value: object) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"a string ({shown!r})"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__}"


def _str(value: object, _: object = None) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"expected a string, got {_describe(value)}")
    return value


def _name(value: object, _: object = None) -> str:
    text = _str(value)
    if not text.strip():
        raise _Invalid("must not be empty")
    return text


def _workflow_name(value: object, _: object = None) -> str:
    text = _str(value)
    if not _WORKFLOW_NAME_RE.match(text):
        raise _Invalid(
            f"{text!r} is not a workflow name: lower-case letters, digits, '-', '_' and '.', "
            "starting with a letter or digit, at most 64 characters"
        )
    return text


def _serial(value: object, _: object = None) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        text = str(value)
        if not _SERIAL_RE.match(text):
            raise _Invalid(f"a serial has 8 digits, got {value!r} (quote serials with leading zeros)")
        return text
    text = _str(value)
    if not _SERIAL_RE.match(text):
        raise _Invalid(f"a serial has 8 digits, got {text!r}")
    return text


def _disk_ref(value: object, _: object = None) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return _serial(value)
    return _name(value)


def _bool(value: object, _: object = None) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(f"expected true or false, got {_describe(value)}")
    return value


def _int(value: object, _: object = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Invalid(f"expected a whole number, got {_describe(value)}")
    return int(value)


def _count(value: object, _: object = None) -> int:
    number = _int(value)
    if number < 1:
        raise _Invalid(f"must be at least 1, got {number}")
    return number


def _float(value: object, _: object = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Invalid(f"expected a number, got {_describe(value)}")
    try:
        return float(value)
    except OverflowError as exc:
        raise _Invalid(f"number {value!r} is too large") from exc


def _factor(value: object, _: object = None) -> float:
    number = _float(value)
    if not 1.0 <= number < float("inf"):
        raise _Invalid(f"must be a number >= 1, got {value!r}")
    return number


def _duration(value: object, _: object = None) -> float:
    try:
        return parse_duration(value)
    except DurationError as exc:
        raise _Invalid(str(exc)) from None


def _freeze_timeout(value: object, _: object = None) -> float:
    seconds = _duration(value)
    if not MIN_FREEZE_TIMEOUT <= seconds <= MAX_FREEZE_TIMEOUT:
        raise _Invalid(
            f"freeze_timeout must be between {MIN_FREEZE_TIMEOUT:g}s and {MAX_FREEZE_TIMEOUT:g}s "
            f"(the array's extended-long-busy timeout), got {format_duration(seconds)}"
        )
    return seconds


def _cron(value: object, _: object = None) -> str:
    text = _str(value).strip()
    fields = text.split()
    if len(fields) != 5:
        raise _Invalid(
            f"cron needs 5 fields (minute hour day-of-month month day-of-week), got {len(fields)}: {text!r}"
        )
    try:
        valid = croniter.is_valid(text)
    except Exception:  # croniter's validation raises assorted types on odd input
        valid = False
    if not valid:
        raise _Invalid(f"not a valid cron expression: {text!r}{_bad_cron_fields(fields)}")
    never = _never_fires(text)
    if never is not None:
        raise _Invalid(f"cron {text!r} can never fire: {never}")
    return text


_CRON_FIELDS = (("minute", "0-59"), ("hour", "0-23"), ("day-of-month", "1-31"), ("month", "1-12 or jan-dec"),
                ("day-of-week", "0-7 or sun-sat"))


def _bad_cron_fields(fields: list[str]) -> str:
    """'; field 2 (hour) '25' is not valid (0-23)': each field judged alone, the others '*'."""
    bad = []
    for i, (name, allowed) in enumerate(_CRON_FIELDS):
        probe = " ".join(f if j == i else "*" for j, f in enumerate(fields))
        try:
            ok = croniter.is_valid(probe)
        except Exception:  # croniter's validation raises assorted types on odd input
            ok = False
        if not ok:
            bad.append(f"field {i + 1} ({name}) {fields[i]!r} is not valid ({allowed})")
    return ("; " + "; ".join(bad)) if bad else ""


_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
           "October", "November", "December")
_MONTH_DAYS = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


def _never_fires(text: str) -> str | None:
    """Why a (syntactically valid) cron expression has no fire time at all, else None.

    The service asks croniter for the next and the previous fire; croniter gives up on
    a date that does not exist (Feb 30) with an error, so the same question is asked
    here, once, and the answer names the fields that cannot meet.
    """
    base = datetime(2001, 1, 1)
    try:
        croniter(text, base).get_next(datetime)
        croniter(text, base).get_prev(datetime)
        return None
    except Exception:  # CroniterBadDateError and friends: no such date in its search
        pass
    minute, hour, dom, month, dow = text.split()
    try:
        expanded = croniter(text, base).expanded
        days = [d for d in expanded[2] if isinstance(d, int)]
        months = [m for m in expanded[3] if isinstance(m, int)]
    except Exception:
        days, months = [], []
    if days and months and dow == "*" and min(days) > max(_MONTH_DAYS[m - 1] for m in months):
        names = ", ".join(_MONTHS[m - 1] for m in months)
        return (f"day-of-month field {dom!r} names no day that month field {month!r} ({names}) has; "
                "fix the day-of-month or the month field")
    return (f"day-of-month field {dom!r}, month field {month!r} and day-of-week field {dow!r} never "
            "meet on a real date; fix one of them")


def _timezone(value: object, _: object = None) -> str:
    text = _name(value)
    try:
        zoneinfo.ZoneInfo(text)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        raise _Invalid(f"unknown time zone {text!r} (use an IANA name like Europe/Berlin)") from None
    return text


def _error_kind(value: object, _: object = None) -> str:
    text = _str(value)
    if text not in ERRORS_BY_KIND:
        raise _Invalid(f"unknown error kind {text!r}{_suggest(text, ERRORS_BY_KIND)}")
    return text


def _url(value: object, _: object = None) -> str:
    text = _str(value)
    if not _URL_RE.match(text):
        raise _Invalid(f"expected an http:// or https:// address, got {text!r}")
    return text


def _enum_hook(cls: type[Enum]) -> Any:
    values = [str(member.value) for member in cls]

    def structure(value: object, _: object = None) -> Enum:
        if isinstance(value, str):
            for member in cls:
                if member.value == value:
                    return member
            raise _Invalid(f"must be one of {', '.join(values)}; got {value!r}{_suggest(value, values)}")
        raise _Invalid(f"must be one of {', '.join(values)}; got {_describe(value)}")

    return structure


_TARGET_KEYS: dict[type, str] = {
    SerialTarget: "serial",
    VmDiskTarget: "vm",
    RotateTarget: "rotate",
    PoolTarget: "pool",
}

_SCALAR_HOOKS: dict[Any, Any] = {
    str: _str,
    bool: _bool,
    int: _int,
    float: _float,
    Duration: _duration,
    FreezeTimeout: _freeze_timeout,
    Serial: _serial,
    DiskRef: _disk_ref,
    Name: _name,
    WorkflowName: _workflow_name,
    Cron: _cron,
    TimeZone: _timezone,
    ErrorKind: _error_kind,
    Url: _url,
    Count: _count,
    Factor: _factor,
}

_ENUMS: tuple[type[Enum], ...] = (Kind, Mode, Overlap, Action, Withdraw, Before, QuiesceLevel)

_UNSTRUCTURE_HOOKS: dict[Any, Any] = {
    Duration: format_duration,
    FreezeTimeout: format_duration,
}

SHORTHANDS: dict[Any, tuple[Any, ...]] = {
    SiteRef: (Literal["embedded"], Url),
    Target: (Serial,),
}
"""Scalar forms a mapping-typed value may also be written as (read by the JSON Schema)."""


def _is_tuple(t: Any) -> bool:
    args = get_args(t)
    return get_origin(t) is tuple and len(args) == 2 and args[1] is Ellipsis


def _is_dict(t: Any) -> bool:
    return get_origin(t) in (dict, Mapping)


def _make_converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=True, omit_if_default=True, detailed_validation=True)
    for t, hook in _SCALAR_HOOKS.items():
        if isinstance(t, type):  # str, int, ...: cattrs dispatches these by class (and subclass)
            conv.register_structure_hook(t, hook)
        else:  # NewTypes
            conv.register_structure_hook_func(lambda candidate, t=t: candidate is t, hook)
    for enum in _ENUMS:  # by class, so a str Enum does not fall to the str hooks
        conv.register_structure_hook(enum, _enum_hook(enum))
        conv.register_unstructure_hook(enum, _enum_value)
    for t, hook in _UNSTRUCTURE_HOOKS.items():
        conv.register_unstructure_hook(t, hook)

    def tuple_factory(t: Any) -> Any:
        inner = cattrs.cols.homogenous_tuple_structure_factory(t, conv)

        def structure(value: object, type_: Any) -> Any:
            if not isinstance(value, list):
                raise _Invalid(f"expected a list, got {_describe(value)}")
            return inner(value, type_)

        return structure

    conv.register_structure_hook_factory(_is_tuple, tuple_factory)

    def dict_factory(t: Any) -> Any:
        key_t, value_t = get_args(t)

        def structure(value: object, _: Any) -> dict[Any, Any]:
            if not isinstance(value, dict):
                raise _Invalid(f"expected a mapping, got {_describe(value)}")
            errors: list[Exception] = []
            result: dict[Any, Any] = {}
            for key, item in value.items():
                try:
                    result[conv.structure(key, key_t)] = conv.structure(item, value_t)
                except Exception as exc:
                    exc.__notes__ = [*getattr(exc, "__notes__", []), IterableValidationNote(f"key {key!r}", key, value_t)]
                    errors.append(exc)
            if errors:
                raise IterableValidationError(f"While structuring {t!r}", errors, t)
            return result

        return structure

    conv.register_structure_hook_factory(_is_dict, dict_factory)

    def attrs_factory(cls: type) -> Any:
        inner = make_dict_structure_fn(cls, conv)

        def structure(value: object, _: Any) -> Any:
            if not isinstance(value, dict):
                raise _Invalid(f"expected a mapping ({_keys_hint(cls)}), got {_describe(value)}")
            return inner(value, cls)

        return structure

    conv.register_structure_hook_factory(attrs.has, attrs_factory)
    site_fields = attrs_factory(SiteRef)

    def site_ref(value: object, _: object = None) -> SiteRef:
        if value == "embedded":
            return SiteRef()
        if isinstance(value, str):
            if value.startswith(("http://", "https://")):
                return SiteRef(url=Url(_url(value)))
            raise _Invalid(
                f"site must be 'embedded', an http(s):// URL, or {{lab: FILE}} / {{url: URL}}; got {value!r}"
            )
        site: SiteRef = site_fields(value, SiteRef)
        if site.url is not None and site.lab is not None:
            raise _Invalid("site takes url (a served site) or lab (the embedded site's lab file), not both")
        return site

    def target(value: object, _: object = None) -> Target:
        """A target by its one distinguishing key; a bare serial is short for {serial: ...}."""
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            return SerialTarget(serial=Serial(_serial(value)))
        if not isinstance(value, dict):
            raise _Invalid(f"a target is a serial or a mapping, got {_describe(value)}")
        present = [cls for cls, key in _TARGET_KEYS.items() if key in value]
        if len(present) == 1:
            result: Target = conv.structure(value, present[0])
            return result
        if not present:
            raise _Invalid(
                "a target needs one of serial, vm (with disk), rotate or pool: "
                "{serial: S}, {vm: VM, disk: D}, {rotate: [S, ...]} or {pool: P}"
            )
        keys = ", ".join(_TARGET_KEYS[cls] for cls in present)
        raise _Invalid(f"a target takes one of serial, vm, rotate or pool, not several ({keys})")

    conv.register_structure_hook(SiteRef, site_ref)
    conv.register_structure_hook_func(lambda t: t == Target, target)
    conv.register_unstructure_hook(SiteRef, _unstructure_site)
    return conv


def _enum_value(member: Enum) -> Any:
    return member.value


def _keys_hint(cls: type) -> str:
    names = [a.name for a in attrs.fields(cls)]
    shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
    return f"keys {shown}"


def _unstructure_site(site: SiteRef) -> object:
    if site.url is None and site.lab is None:
        return "embedded"
    return {k: v for k, v in (("url", site.url), ("lab", site.lab)) if v is not None}


converter = _make_converter()
"""The one converter: structure(dict, WorkflowSpec | Workflow), unstructure(Workflow) -> dict."""



def unstructure(workflow: Workflow) -> dict[str, Any]:
    """Plain data of a workflow; a valid document that loads back to an equal `Workflow`."""
    data: dict[str, Any] = converter.unstructure(workflow)
    return data


# --------------------------------------------------------------------------- YAML

_RawProblem = tuple[tuple[str | int, ...], str, bool]
"""path, message, whether to point at the key (rather than the value)."""

_PlacedProblem = tuple[tuple[str | int, ...], str, "tuple[int, int] | None"]
"""path, message, 0-based (line, col) when known better than the path's place."""



def _yaml() -> YAML:
    yaml = YAML(typ="rt")
    yaml.allow_duplicate_keys = True  # found (all of them, with places) by _duplicate_keys
    return yaml


class _Located:
    """Finds the line and column of a document path in the round-trip tree."""

    def __init__(self, tree: Any) -> None:
        self.tree = tree

    def position(self, path: Sequence[str | int], *, key: bool = False) -> tuple[int, int]:
        node = self.tree
        line, col = 0, 0
        if isinstance(node, (CommentedMap, CommentedSeq)):
            line, col = node.lc.line or 0, node.lc.col or 0
        for depth, step in enumerate(path):
            last = depth == len(path) - 1
            if isinstance(node, CommentedMap) and _has_key(node, step):
                try:
                    pos = node.lc.key(step) if (last and key) else node.lc.value(step)
                except (KeyError, TypeError):  # merged (<<) keys have no place of their own
                    pos = None
                if pos is not None:
                    line, col = pos
                node = node[step]
            elif (
                isinstance(node, CommentedSeq)
                and isinstance(step, int)
                and not isinstance(step, bool)
                and 0 <= step < len(node)
            ):
                try:
                    line, col = node.lc.item(step)
                except (KeyError, TypeError):  # pragma: no cover - every item has a place
                    pass
                node = node[step]
            else:
                break
        return line + 1, col + 1


def _has_key(node: CommentedMap, step: object) -> bool:
    try:
        return step in node
    except TypeError:  # unhashable step
        return False


def _duplicate_keys(root: Node) -> list[tuple[tuple[str | int, ...], str, int, int]]:
    """Every repeated key of every mapping, with its place and the first one's line."""
    found: list[tuple[tuple[str | int, ...], str, int, int]] = []
    seen: set[int] = set()
    stack: list[tuple[Node, tuple[str | int, ...]]] = [(root, ())]
    while stack:
        node, path = stack.pop()
        if id(node) in seen:  # an alias: already visited where the anchor is
            continue
        seen.add(id(node))
        if isinstance(node, MappingNode):
            first: dict[tuple[str, str], Node] = {}
            for key_node, value_node in node.value:
                if isinstance(key_node, ScalarNode):
                    ident = (key_node.tag.value if hasattr(key_node.tag, "value") else str(key_node.tag), key_node.value)
                    if key_node.value == "<<":
                        stack.append((value_node, path))
                        continue
                    if ident in first:
                        mark = key_node.start_mark
                        found.append(
                            (
                                (*path, key_node.value),
                                f"duplicate key {key_node.value!r} (first at line {first[ident].start_mark.line + 1})",
                                mark.line + 1,
                                mark.column + 1,
                            )
                        )
                    else:
                        first[ident] = key_node
                    stack.append((value_node, (*path, key_node.value)))
                else:
                    stack.append((value_node, path))
        elif isinstance(node, SequenceNode):
            for index, item in enumerate(node.value):
                stack.append((item, (*path, index)))
    return found


def _plain(tree: Any, problems: list[_PlacedProblem]) -> Any:
    """The round-trip tree as plain dict/list/str/int/float/bool/None, refusing what cattrs
    should never see: non-string keys, YAML tags, dates, recursion, alias bombs."""
    count = 0

    def convert(value: Any, path: tuple[str | int, ...], active: frozenset[int]) -> Any:
        nonlocal count
        count += 1
        if count > MAX_NODES:
            raise _TooBig
        if isinstance(value, dict):
            if id(value) in active:
                problems.append((path, "an alias refers to a node that contains it (recursive document)", None))
                return None
            inner = active | {id(value)}
            result: dict[str, Any] = {}
            for key, item in value.items():
                if not isinstance(key, str):
                    problems.append((path, f"keys must be strings, got {_describe_yaml(key)}", _key_place(value, key)))
                    continue
                result[key] = convert(item, (*path, key), inner)
            return result
        if isinstance(value, list):
            if id(value) in active:
                problems.append((path, "an alias refers to a node that contains it (recursive document)", None))
                return None
            inner = active | {id(value)}
            return [convert(item, (*path, index), inner) for index, item in enumerate(value)]
        if value is None or isinstance(value, bool):
            return value
        if isinstance(value, ScalarBoolean):  # an anchored boolean
            return bool(value)
        if isinstance(value, int):
            return int(value)
        if isinstance(value, float):
            return float(value)
        if isinstance(value, str):
            return str(value)
        problems.append((path, f"unsupported YAML value: {_describe_yaml(value)}", None))
        return _UNSUPPORTED

    return convert(tree, (), frozenset())


def _key_place(mapping: Any, key: Any) -> tuple[int, int] | None:
    try:
        line, col = mapping.lc.key(key)
    except (AttributeError, KeyError, TypeError):
        return None
    return int(line), int(col)


class _TooBig(Exception):
    pass


class _Unsupported:
    """Stands in for a value already reported (a date, a tagged value); fails any hook quietly."""

    def __repr__(self) -> str:
        return "<unsupported>"


_UNSUPPORTED = _Unsupported()


def _describe_yaml(value: object) -> str:
    tag = getattr(value, "tag", None)
    if tag is not None and getattr(tag, "value", None):
        return f"a value tagged {tag.value} (tags are not supported)"
    if isinstance(value, datetime):
        return "a timestamp (quote it to make it a string)"
    if type(value).__name__ == "date" or hasattr(value, "isoformat"):
        return "a date (quote it to make it a string)"
    if isinstance(value, (tuple, list)) or type(value).__name__.startswith("CommentedKey"):
        return "a list or mapping"
    return _describe(value)


# --------------------------------------------------------------------------- loading




def load_definition(path: str | Path) -> Workflow:
    """Load and check one definition file; raises DefinitionError (only) if it cannot run."""
    name = str(path)
    file = Path(path)
    try:
        if file.is_dir():
            raise DefinitionError([Problem(name, 1, 1, "", "is a directory, not a definition file")])
        with file.open("rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
    except DefinitionError:
        raise
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise DefinitionError([Problem(name, 1, 1, "", f"cannot read the file: {reason}")]) from None
    return load_text(data, name)


def load_text(text: str | bytes, filename: str = "<string>") -> Workflow:
    """Load and check a definition held in memory; raises DefinitionError (only) if it cannot run."""

    def refuse(message: str, line: int = 1, col: int = 1) -> DefinitionError:
        return DefinitionError([Problem(filename, line, col, "", message)])

    if isinstance(text, bytes):
        if len(text) > MAX_FILE_BYTES:
            raise refuse(f"file is larger than {MAX_FILE_BYTES // 1024} KiB; a definition is a few KiB of YAML")
        if b"\x00" in text:
            raise refuse("binary content (NUL bytes); a definition is a YAML text file")
        try:
            text = text.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise refuse(f"not UTF-8 text (bad byte at offset {exc.start}); a definition is a YAML text file") from None
    elif len(text.encode("utf-8", "surrogatepass")) > MAX_FILE_BYTES:
        raise refuse(f"file is larger than {MAX_FILE_BYTES // 1024} KiB; a definition is a few KiB of YAML")
    if "\x00" in text:
        raise refuse("binary content (NUL characters); a definition is a YAML text file")

    yaml = _yaml()
    try:
        tags = _check_events(text)
        with warnings.catch_warnings():  # a re-defined anchor is valid YAML; the newest wins
            warnings.simplefilter("ignore")
            node = yaml.compose(text)
            untagged = _untag(node, tags) if node is not None else []
            tree = yaml.constructor.construct_document(node) if node is not None else None  # parsed once
    except YAMLError as exc:
        raise _yaml_refusal(exc, filename) from None
    except (RecursionError, _TooDeep):
        raise refuse(f"the document is nested too deeply (more than {MAX_DEPTH} levels)") from None
    except (ValueError, TypeError, OverflowError) as exc:  # e.g. a timestamp like 2024-02-30
        raise refuse(f"not valid YAML: {exc}") from None
    if tree is None:
        raise refuse("the file is empty; a definition needs at least name and units")
    located = _Located(tree)
    if not isinstance(tree, CommentedMap):
        got = "a list" if isinstance(tree, list) else _describe_yaml(tree)
        raise refuse(f"the top level must be a mapping (name:, units:, ...), got {got}")

    raw: list[_RawProblem] = []
    placed: list[_PlacedProblem] = []
    problems: list[Problem] = []
    try:
        for path, message, line, col in _duplicate_keys(node):
            problems.append(Problem(filename, line, col, format_path(path), message))
    except RecursionError:  # pragma: no cover - compose would have failed first
        raise refuse("the document is nested too deeply") from None
    try:
        plain = _plain(tree, placed)
    except _TooBig:
        raise refuse(f"the document expands to more than {MAX_NODES} values (aliases?)") from None
    except RecursionError:
        raise refuse("the document is nested too deeply") from None

    placed[:0] = untagged
    workflow: Workflow | None = None
    for path, message, place in placed:
        line, col = (place[0] + 1, place[1] + 1) if place is not None else located.position(path)
        problems.append(Problem(filename, line, col, format_path(path), message))
    reported = {path for path, _, _ in placed}
    try:
        spec = converter.structure(plain, WorkflowSpec)
    except (ClassValidationError, IterableValidationError) as exc:
        raw.extend(p for p in _walk(exc, ()) if p[0] not in reported)
    else:
        workflow, checks = resolve(spec)
        raw.extend(checks)

    for path, message, at_key in raw:
        line, col = located.position(path, key=at_key)
        problems.append(Problem(filename, line, col, format_path(path), message))
    if problems or workflow is None:
        problems = sorted(set(problems), key=lambda p: (p.line, p.col, p.path, p.message))
        raise DefinitionError(problems)
    return workflow


class _TooDeep(Exception):
    pass


_CORE = "tag:yaml.org,2002:"
_SCALAR_TAGS = frozenset(_CORE + t for t in ("str", "int", "float", "bool", "null"))


_Kind = type[Node]
_TagProblems = dict[tuple[int, int, _Kind], "str | None"]
"""(0-based line, col, node class) of an explicitly tagged node -> why its tag is refused."""


def _check_events(text: str) -> _TagProblems:
    """From the parser's events, before anything is composed: refuse deep nesting
    (the recursive composer would spend seconds climbing into a RecursionError) and
    find every explicit YAML tag flowcopy does not support.

    A definition is plain YAML: a tag is accepted only where it changes nothing a
    reader could misread (`!!str` on a scalar, `!!map` on a mapping, `!!seq` on a
    list, `!!int 3`). Any other (`!!omap`, `!!set`, `!!binary`, `!custom`, `!!bool x`)
    would reach ruamel's constructors, which build types cattrs cannot read, or crash.
    """
    depth = 0
    found: _TagProblems = {}
    events = YAML(typ="safe", pure=True)  # no comment gathering: a third of the round-trip parser's time
    resolver = events.resolver
    for event in events.parse(text):
        if isinstance(event, (MappingStartEvent, SequenceStartEvent)):
            depth += 1
            if depth > MAX_DEPTH:
                raise _TooDeep
        elif isinstance(event, (MappingEndEvent, SequenceEndEvent)):
            depth -= 1
        tag = getattr(event, "tag", None)
        if tag is None:
            continue
        tag = str(getattr(tag, "value", tag))
        mark = event.start_mark
        kind: _Kind
        if isinstance(event, ScalarEvent):
            kind = ScalarNode
            if tag == _CORE + "str":
                found[mark.line, mark.column, kind] = None
                continue
            if tag in _SCALAR_TAGS:
                implicit = resolver.resolve(ScalarNode, event.value, (True, False))
                found[mark.line, mark.column, kind] = (
                    None if str(getattr(implicit, "value", implicit)) == tag
                    else f"YAML tag {_short_tag(tag)} does not fit the value {event.value!r}: drop the tag")
                continue
        elif isinstance(event, MappingStartEvent):
            kind = MappingNode
            if tag == _CORE + "map":
                found[mark.line, mark.column, kind] = None
                continue
        elif isinstance(event, SequenceStartEvent):
            kind = SequenceNode
            if tag == _CORE + "seq":
                found[mark.line, mark.column, kind] = None
                continue
        else:  # pragma: no cover - only nodes carry tags
            continue
        found[mark.line, mark.column, kind] = (
            f"YAML tag {_short_tag(tag)} is not supported (a definition is plain mappings, lists and "
            "scalars): drop the tag, quote a string")
    return found


_PLAIN_TAGS: dict[_Kind, str] = {ScalarNode: _CORE + "str", MappingNode: _CORE + "map", SequenceNode: _CORE + "seq"}


def _untag(root: Node, refused: _TagProblems) -> list[_PlacedProblem]:
    """Make every explicit tag implicit, giving each refused node its plain tag, so ruamel's constructors (which crash or
    build odd types on `!!omap x`, `!!bool x`) see only plain YAML, and the load goes on
    to report the file's other problems too; one problem per refused tag, with its path."""
    if not refused:
        return []
    found: list[_PlacedProblem] = []
    seen: set[int] = set()
    stack: list[tuple[Node, tuple[str | int, ...]]] = [(root, ())]
    while stack:
        node, path = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        mark = node.start_mark
        place = (mark.line, mark.column, type(node))
        if place in refused:
            node.tag = _PLAIN_TAGS[type(node)] if refused[place] is not None else node.tag  # plain, not "explicit"
            if refused[place] is not None:
                found.append((path, str(refused[place]), (mark.line, mark.column)))
        if isinstance(node, MappingNode):
            for key, value in node.value:
                step = key.value if isinstance(key, ScalarNode) else "?"
                stack.append((key, path))
                stack.append((value, path if step == "<<" else (*path, step)))
        elif isinstance(node, SequenceNode):
            stack.extend((item, (*path, index)) for index, item in enumerate(node.value))
    return found


def _short_tag(tag: str) -> str:
    return "!!" + tag[len(_CORE):] if tag.startswith(_CORE) else tag


def _yaml_refusal(exc: YAMLError, filename: str) -> DefinitionError:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context = getattr(exc, "context", None)
    what = f"{context}, {problem}" if context else str(problem)
    line, col = (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)
    return DefinitionError([Problem(filename, line, col, "", f"not valid YAML: {what}")])


def format_path(path: Sequence[str | int]) -> str:
    """`("units", 2, "disks", 0, "target")` -> `units[2].disks[0].target`."""
    out = ""
    for step in path:
        if isinstance(step, int) and not isinstance(step, bool):
            out += f"[{step}]"
        elif isinstance(step, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_\-]*", step):
            out += f".{step}" if out else step
        else:
            out += f"[{str(step)!r}]"
    return out


def _note(exc: BaseException, kind: type) -> Any:
    for note in getattr(exc, "__notes__", ()):
        if note.__class__ is kind:
            return note
    return None


def _walk(exc: BaseException, path: tuple[str | int, ...]) -> Iterator[_RawProblem]:
    """cattrs' detailed validation tree -> (path, message) per leaf, like `transform_error`."""
    if isinstance(exc, ClassValidationError):
        for sub in exc.exceptions:
            note = _note(sub, AttributeValidationNote)
            yield from _walk(sub, path if note is None else (*path, note.name))
    elif isinstance(exc, IterableValidationError):
        for sub in exc.exceptions:
            note = _note(sub, IterableValidationNote)
            yield from _walk(sub, path if note is None else (*path, note.index))
    elif isinstance(exc, ForbiddenExtraKeysError):
        known = _document_keys(exc.cl)
        for key in sorted(exc.extra_fields, key=str):
            yield (*path, key), f"unknown key {key!r}{_suggest(str(key), known)}", True
    elif isinstance(exc, KeyError):
        yield path, f"required key {path[-1]!r} is missing" if path else "a required key is missing", False
    elif isinstance(exc, _Invalid):
        yield path, str(exc), False
    else:
        yield path, f"invalid value ({exc})", False


def _document_keys(cls: type) -> list[str]:
    return [a.name for a in attrs.fields(cls)]


def dump_text(workflow: Workflow) -> str:
    """A workflow as YAML text that `load_text` reads back into an equal workflow."""
    yaml = YAML(typ="safe", pure=True)
    yaml.default_flow_style = False
    out = io.StringIO()
    yaml.dump(unstructure(workflow), out)
    return out.getvalue()


def definition_files(paths: Iterable[str | Path]) -> list[Path]:
    """Files named, with folders expanded to their *.yaml/*.yml in name order (= run order)."""
    result: list[Path] = []
    for entry in paths:
        path = Path(entry)
        if path.is_dir():
            result.extend(sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file()))
        else:
            result.append(path)
    return result


# --------------------------------------------------------------------------- resolution + rules


def resolve(spec: WorkflowSpec) -> tuple[Workflow, list[_RawProblem]]:
    """The document with defaults pushed into every unit, and every cross-field problem.

    A unit-level setting wins over the workflow-level one, which wins over the built-in
    default; a `retry` or `timeouts` block replaces the inherited one as a whole (YAML
    anchors and `<<` merge keys share parts). Problems point at the value that decided.
    """
    problems: list[_RawProblem] = []
    restore = spec.kind is Kind.RESTORE

    def add(path: tuple[str | int, ...], message: str, at_key: bool = False) -> None:
        problems.append((path, message, at_key))

    if not spec.units:
        add(("units",), "a workflow needs at least one unit")
    if restore and spec.schedule is not None:
        add(("schedule",), "a restore runs on demand (flowcopy run), it takes no schedule", True)
    if not restore and spec.before is not None:
        add(("before",), "'before' applies to restores only (kind: restore)", True)
    before = (spec.before or Before.POWEROFF) if restore else None

    units: list[UnitDef] = []
    origins: list[dict[str, tuple[str | int, ...]]] = []
    for index, unit in enumerate(spec.units):
        here: tuple[str | int, ...] = ("units", index)
        origin: dict[str, tuple[str | int, ...]] = {}
        values: dict[str, Any] = {}
        for field in _DEFAULTABLE:
            own, shared = getattr(unit, field), getattr(spec, field)
            if own is not None:
                values[field], origin[field] = own, (*here, field)
            elif shared is not None:
                values[field], origin[field] = shared, (field,)
            else:
                values[field], origin[field] = None, here
        mode = values["mode"] or (Mode.INCREMENTAL if restore else Mode.COPY)
        quiesce = values["quiesce"]
        if restore and before is Before.POWEROFF:
            if quiesce not in (None, QuiesceLevel.POWEROFF):
                add(origin["quiesce"], f"before: poweroff powers the VM off; quiesce {quiesce.value} does not apply")
            quiesce = QuiesceLevel.POWEROFF
        elif restore and quiesce is QuiesceLevel.NONE:
            add(origin["quiesce"], "before: quiesce needs a quiesce level other than none")
        quiesce = quiesce or QuiesceLevel.FILESYSTEM
        default_withdraw = Withdraw.KEEP if mode is Mode.INCREMENTAL else Withdraw.ALWAYS
        resolved = UnitDef(
            vm=unit.vm,
            selector=unit.selector,
            task=unit.task,
            disks=unit.disks,
            mode=mode,
            quiesce=quiesce,
            freeze_timeout=values["freeze_timeout"] or FreezeTimeout(DEFAULT_FREEZE_TIMEOUT),
            consistency_group=values["consistency_group"],
            mixed_quiesce=bool(values["mixed_quiesce"]),
            copy=values["copy"] or CopyAction(),
            withdraw=values["withdraw"] or default_withdraw,
            retry=values["retry"] or RetryPolicy(),
            timeouts=values["timeouts"] or StageTimeouts(),
        )
        units.append(resolved)
        origins.append(origin)
        _check_unit(resolved, index, origin, restore, add)

    _check_vms(units, add)
    _check_disks(units, add)
    _check_groups(units, origins, add)
    if spec.retention is not None and not any(
        (spec.retention.keep, spec.retention.keep_last, spec.retention.keep_daily, spec.retention.keep_weekly)
    ):
        add(("retention",), "retention needs keep_last, keep_daily or keep_weekly (a number of backups to keep)", True)
    if spec.retention is not None and spec.retention.keep and spec.retention.keep_last:
        add(("retention", "keep"), "keep is the older name of keep_last: give one of them", True)
    if restore and spec.retention is not None:
        add(("retention",), "a restore makes no backups to keep; retention belongs to backup workflows", True)
    if restore and spec.rpo is not None:
        add(("rpo",), "an RPO belongs to backup workflows, not to a restore", True)
    if spec.rpo is not None and spec.rpo <= 0:
        add(("rpo",), "rpo must be a positive duration, e.g. 26h")

    workflow = Workflow(
        name=spec.name,
        kind=spec.kind,
        description=spec.description,
        schedule=spec.schedule,
        site=spec.site,
        before=before,
        concurrency=spec.concurrency,
        retention=spec.retention,
        rpo=spec.rpo,
        units=tuple(units),
    )
    return workflow, problems


def _check_unit(unit: UnitDef, index: int, origin: Mapping[str, tuple[str | int, ...]], restore: bool, add: Any) -> None:
    here: tuple[str | int, ...] = ("units", index)
    if unit.vm is not None and unit.selector is not None:
        add((*here, "selector"), "a unit names either vm or selector, not both", True)
    elif unit.vm is None and unit.selector is None:
        add(here, "a unit needs vm (one VM) or selector (labels of many VMs)")
    if unit.selector is not None and not unit.selector:
        add((*here, "selector"), "selector needs at least one label")
    if unit.task is not None and unit.disks:
        add((*here, "task"), "a unit lists disks or runs a saved task, not both", True)
    elif unit.task is None and not unit.disks:
        add(here, "a unit needs disks (each with a target) or a saved task")
    if unit.task is not None and unit.selector is not None:
        add((*here, "task"), "a saved task names fixed pairs; use vm, not selector", True)
    if restore and unit.task is not None:
        add((*here, "task"), "a restore reverses listed disks; a saved task cannot be reversed", True)

    mode = unit.mode
    if restore and mode is not Mode.INCREMENTAL:
        add(origin["mode"], f"a restore reverses an incremental relationship; mode must be incremental, got {mode.value}")

    for d, disk in enumerate(unit.disks):
        at = (*here, "disks", d)
        target = disk.target
        if unit.selector is not None:
            if not isinstance(target, PoolTarget):
                add((*at, "target"), "a selector expands to many VMs and each needs its own target: use {pool: NAME}")
            if is_serial(disk.disk):
                add((*at, "disk"), "a selector expands to many VMs; name the disk (Disk1), a serial is one LUN")
        if mode is Mode.INCREMENTAL and isinstance(target, (RotateTarget, PoolTarget)):
            add(
                (*at, "target"),
                "mode incremental needs one fixed target (serial or vm/disk): the array keeps only one "
                "recording relationship per source, so incremental targets cannot rotate or come from a pool",
            )
        if isinstance(target, RotateTarget):
            if not target.rotate:
                add((*at, "target", "rotate"), "a rotation set needs at least one target")
            if len(target.rotate) > MAX_TARGETS_PER_SOURCE:
                add(
                    (*at, "target", "rotate"),
                    f"a source can have at most {MAX_TARGETS_PER_SOURCE} targets; this set has {len(target.rotate)}",
                )

    copy, copy_at = unit.copy, origin["copy"]
    if copy.to is not None:
        problem = export_path_problem(copy.to)
        if problem:
            add((*copy_at, "to"), problem)
    if copy.action is Action.EXPORT and (copy.to is None or copy.host is None):
        missing = " and ".join(k for k in ("to", "host") if getattr(copy, k) is None)
        add(copy_at, f"export needs {missing} (to: the folder for images, host: the backup host)")
    if copy.action is Action.MOUNT_CHECK and copy.vm is None:
        add(copy_at, "mount_check needs vm: the second guest that mounts and checks the target")
    for key, action in (("to", Action.EXPORT), ("host", Action.EXPORT), ("vm", Action.MOUNT_CHECK)):
        if getattr(copy, key) is not None and copy.action is not action:
            add(copy_at, f"'{key}' belongs to action {action.value}; this action is {copy.action.value}")
    if mode is Mode.NOCOPY and copy.action is Action.WAIT and unit.withdraw is Withdraw.ALWAYS:
        add(
            copy_at,
            "mode nocopy has no background copy, so 'wait' keeps nothing once the relationship is "
            "withdrawn: export or mount_check the target, or set withdraw: keep",
        )
    if mode is Mode.NOCOPY and unit.withdraw is Withdraw.AFTER_COPY:
        add(origin["withdraw"], "withdraw: after_copy waits for a background copy, and mode nocopy has none")
    if mode is Mode.INCREMENTAL and unit.withdraw is not Withdraw.KEEP:
        add(
            origin["withdraw"],
            f"mode incremental keeps its relationship between runs (the next run resyncs it); "
            f"withdraw must be keep, got {unit.withdraw.value}",
        )


EXPORT_ROOTS_ENV = "FLOWCOPY_EXPORT_ROOTS"
"""Absolute folders (os.pathsep-separated) where exports may live outside the store."""

STORE_STATE = ("site", "journal.sqlite", "journal.lock", "scheduler.json")
"""The store's own state: no export folder may be one of them."""


def configured_export_roots() -> list[Path]:
    import os

    roots = []
    for entry in os.environ.get(EXPORT_ROOTS_ENV, "").split(os.pathsep):
        if entry and Path(entry).is_absolute():
            roots.append(Path(entry).resolve())
    return roots


def export_path_problem(to: str) -> str | None:
    """Why `copy.to` may not be used (None: it may). Exports live inside the store, or
    inside a root the admin configured; retention deletes there and nowhere else."""
    from pathlib import PurePath

    if not to.strip():
        return "copy.to is empty: name a folder inside the store, e.g. exports/nightly"
    path = PurePath(to)
    if ".." in path.parts:
        return f"copy.to {to!r} contains '..' and so leaves the store: name a folder inside it"
    if path.is_absolute():
        resolved = Path(to).resolve()
        roots = configured_export_roots()
        if not any(resolved == r or r in resolved.parents for r in roots):
            where = ", ".join(str(r) for r in roots) or "none configured"
            return (
                f"copy.to {to!r} is outside the store: use a folder inside the store, or list a "
                f"parent folder in ${EXPORT_ROOTS_ENV} (export roots: {where})"
            )
        return None
    parts = [p for p in path.parts if p != "."]
    if parts and parts[0] in STORE_STATE:
        return f"copy.to {to!r} is inside the store's own state ({parts[0]}): choose another folder, e.g. exports/"
    return None


def _check_vms(units: Sequence[UnitDef], add: Any) -> None:
    first: dict[str, int] = {}
    for index, unit in enumerate(units):
        if unit.vm is None:
            continue
        if unit.vm in first:
            add(
                ("units", index, "vm"),
                f"VM {unit.vm} is already in units[{first[unit.vm]}]; list all of its disks in one unit",
            )
        else:
            first[unit.vm] = index


def _source_id(unit: UnitDef, disk: str) -> tuple[str, ...] | None:
    if is_serial(disk):
        return ("serial", disk)
    if unit.vm is not None:
        return ("disk", unit.vm, disk)
    return None  # selector: names resolve per VM at prepare time


def _target_ids(target: Target) -> list[tuple[tuple[str, ...], tuple[str | int, ...]]]:
    if isinstance(target, SerialTarget):
        return [(("serial", target.serial), ())]
    if isinstance(target, VmDiskTarget):
        if is_serial(target.disk):
            return [(("serial", target.disk), ())]
        return [(("disk", target.vm, target.disk), ())]
    if isinstance(target, RotateTarget):
        return [(("serial", serial), ("rotate", k)) for k, serial in enumerate(target.rotate)]
    return []


def _show(ident: tuple[str, ...]) -> str:
    return ident[1] if ident[0] == "serial" else f"{ident[1]}/{ident[2]}"


def _check_disks(units: Sequence[UnitDef], add: Any) -> None:
    sources: dict[tuple[str, ...], tuple[str | int, ...]] = {}
    for index, unit in enumerate(units):
        for d, disk in enumerate(unit.disks):
            ident = _source_id(unit, disk.disk)
            if ident is None:
                continue
            at: tuple[str | int, ...] = ("units", index, "disks", d, "disk")
            if ident in sources:
                add(at, f"disk {_show(ident)} is already a source at {format_path(sources[ident][:-1])}")
            else:
                sources[ident] = at
    targets: dict[tuple[str, ...], tuple[str | int, ...]] = {}
    for index, unit in enumerate(units):
        for d, disk in enumerate(unit.disks):
            base: tuple[str | int, ...] = ("units", index, "disks", d, "target")
            for ident, sub in _target_ids(disk.target):
                at = (*base, *sub)
                if ident in sources:
                    add(
                        at,
                        f"disk {_show(ident)} is both a source ({format_path(sources[ident][:-1])}) and a "
                        "target; the array refuses cascades",
                    )
                if ident in targets:
                    previous = targets[ident]
                    if previous[:5] == base:
                        add(at, f"target {_show(ident)} is listed twice in this rotation set")
                    else:
                        add(at, f"duplicate target {_show(ident)} for two sources (also {format_path(previous)})")
                else:
                    targets[ident] = at


def _check_groups(units: Sequence[UnitDef], origins: Sequence[Mapping[str, tuple[str | int, ...]]], add: Any) -> None:
    groups: dict[str, list[int]] = {}
    for index, unit in enumerate(units):
        if unit.consistency_group is not None:
            groups.setdefault(unit.consistency_group, []).append(index)
    for name, members in groups.items():
        quiet = [i for i in members if units[i].quiesce is not QuiesceLevel.NONE]
        loud = [i for i in members if units[i].quiesce is QuiesceLevel.NONE]
        if not quiet or not loud or all(units[i].mixed_quiesce for i in members):
            continue
        odd = loud if members[0] in quiet else quiet
        for i in odd:
            add(
                origins[i]["consistency_group"],
                f"consistency group {name!r} mixes units with quiesce (units[{quiet[0]}]: "
                f"{units[quiet[0]].quiesce.value}) and without (units[{loud[0]}]: none); set "
                "mixed_quiesce: true if that is intended",
            )
