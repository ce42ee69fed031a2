"""Workflow definitions: the examples load and round-trip, broken files are refused with
exact places and messages, random input never escapes as anything but DefinitionError."""

from __future__ import annotations

import io
import json
import os
import textwrap
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ruamel.yaml import YAML

from flowcopy.cli import main
from flowcopy.definition_schema import json_schema
from flowcopy.definitions import (
    MAX_FILE_BYTES,
    Action,
    CopyAction,
    DefinitionError,
    DiskDef,
    Kind,
    Mode,
    PoolTarget,
    Problem,
    RetryPolicy,
    RotateTarget,
    Schedule,
    SerialTarget,
    SiteRef,
    StageTimeouts,
    UnitDef,
    VmDiskTarget,
    Withdraw,
    Workflow,
    converter,
    definition_files,
    dump_text,
    format_path,
    load_definition,
    load_text,
    unstructure,
)
from flowcopy.durations import DurationError, format_duration, parse_duration
from flowcopy.site.api import CopyMode, QuiesceLevel

WORKFLOWS = Path(__file__).resolve().parent.parent / "workflows"
EXAMPLES = sorted(WORKFLOWS.glob("*.yaml"))


def _doc(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


def _problems(text: str | bytes, filename: str = "f.yaml") -> list[tuple[int, int, str, str]]:
    with pytest.raises(DefinitionError) as info:
        load_text(text, filename)
    assert all(p.file == filename for p in info.value.problems)
    return [(p.line, p.col, p.path, p.message) for p in info.value.problems]


# --------------------------------------------------------------------------- examples


def test_there_are_examples_in_run_order() -> None:
    names = [p.name for p in EXAMPLES]
    assert names == [
        "10-w2k-e-drive.yaml",
        "20-sql-consistency-group.yaml",
        "30-nightly-nocopy-export.yaml",
        "40-hourly-rotation.yaml",
        "50-incremental.yaml",
        "60-restore-incremental.yaml",
    ]
    assert definition_files([WORKFLOWS]) == EXAMPLES


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_round_trips(path: Path) -> None:
    workflow = load_definition(path)
    data = unstructure(workflow)
    assert converter.structure(data, Workflow) == workflow
    # the unstructured form is itself a valid document that loads to the same workflow
    assert load_text(dump_text(workflow), "dumped.yaml") == workflow
    assert json.loads(json.dumps(data)) == data  # plain data only


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_schema_accepts_example_and_its_resolved_form(path: Path) -> None:
    validator = jsonschema.Draft202012Validator(json_schema())
    raw = YAML(typ="safe").load(path.read_text())
    assert [e.message for e in validator.iter_errors(raw)] == []
    resolved = unstructure(load_definition(path))
    assert [e.message for e in validator.iter_errors(resolved)] == []


def test_seed_scenario_1_copies_e_drive_to_second_guest() -> None:
    wf = load_definition(WORKFLOWS / "10-w2k-e-drive.yaml")
    (unit,) = wf.units
    assert unit.vm == "rich-w2k-os-1"
    assert unit.disks == (DiskDef(disk="Disk1", target=VmDiskTarget(vm="RICH-W2K-OS-2", disk="Disk1")),)
    assert unit.quiesce is QuiesceLevel.FILESYSTEM
    assert unit.copy == CopyAction(action=Action.MOUNT_CHECK, vm="RICH-W2K-OS-2")
    assert unit.withdraw is Withdraw.ALWAYS
    assert wf.site == SiteRef() and wf.site.embedded


def test_seed_scenario_2_is_one_group_with_application_quiesce() -> None:
    wf = load_definition(WORKFLOWS / "20-sql-consistency-group.yaml")
    (unit,) = wf.units
    assert unit.quiesce is QuiesceLevel.APPLICATION
    assert unit.freeze_timeout == 20.0
    assert [d.disk for d in unit.disks] == ["Disk2", "Disk3", "Disk4", "Disk5"]
    assert {d.target.vm for d in unit.disks if isinstance(d.target, VmDiskTarget)} == {"RICH-W2K-OS-2"}
    assert wf.consistency_groups() == {"w2k-sql": (0,)}
    assert unit.retry.non_retryable == ("size_mismatch", "not_raw_mapped")


def test_nightly_inherits_workflow_defaults() -> None:
    wf = load_definition(WORKFLOWS / "30-nightly-nocopy-export.yaml")
    (unit,) = wf.units
    assert unit.selector == {"os": "linux", "backup": "nightly"}
    assert unit.mode is Mode.NOCOPY and unit.freeze_timeout == 45.0
    assert unit.copy == CopyAction(action=Action.EXPORT, to="exports/nightly", host="backup-proxy")
    assert unit.retry == RetryPolicy(max_attempts=4, initial_interval=5.0, max_interval=60.0)
    assert unit.timeouts.copy == 7200.0 and unit.timeouts.prepare == 300.0
    assert all(isinstance(d.target, PoolTarget) for d in unit.disks)
    assert wf.schedule == Schedule(cron="30 1 * * *", timezone="Europe/Berlin", catch_up=7200.0)
    assert wf.retention is not None and wf.retention.keep == 7
    assert unit.flash_options(tag="t").mode is CopyMode.NOCOPY


def test_rotation_picks_target_by_run_number() -> None:
    wf = load_definition(WORKFLOWS / "40-hourly-rotation.yaml")
    (disk,) = wf.units[0].disks
    assert isinstance(disk.target, RotateTarget) and len(disk.target.rotate) == 12
    picks = [disk.target_for_run(n) for n in range(1, 26)]
    assert picks[0] == SerialTarget(serial="30016698")
    assert picks[11] == SerialTarget(serial="31116698")
    assert picks[12] == picks[0] and picks[24] == picks[0]
    assert len(set(picks[:12])) == 12
    with pytest.raises(ValueError):
        disk.target_for_run(0)
    assert wf.units[0].mode is Mode.COPY


def test_incremental_and_its_restore_name_the_same_pair() -> None:
    backup = load_definition(WORKFLOWS / "50-incremental.yaml")
    restore = load_definition(WORKFLOWS / "60-restore-incremental.yaml")
    (b,) = backup.units
    (r,) = restore.units
    assert b.mode is Mode.INCREMENTAL and b.withdraw is Withdraw.KEEP
    options = b.flash_options(tag="x")
    assert options.record and options.persistent and options.mode is CopyMode.COPY and options.freeze
    assert restore.kind is Kind.RESTORE and restore.is_restore and restore.before is not None
    assert r.quiesce is QuiesceLevel.POWEROFF and r.mode is Mode.INCREMENTAL
    assert (r.vm, r.disks) == (b.vm, b.disks)
    assert b.disks[0].target_for_run(7) == SerialTarget(serial="36116698")


# --------------------------------------------------------------------------- broken files

BROKEN: list[tuple[str, str, list[tuple[int, int, str, str]]]] = [
    (
        "unknown key with a suggestion",
        """
        name: a
        units:
          - vm: v
            quiese: none
            disks: [{disk: Disk1, target: 20413698}]
        """,
        [(4, 5, "units[0].quiese", "unknown key 'quiese' — did you mean 'quiesce'?")],
    ),
    (
        "unknown key without a suggestion, and a misspelt value",
        """
        name: a
        zzz: 1
        units:
          - vm: v
            mode: incremntal
            disks: [{disk: Disk1, target: 20413698}]
        """,
        [
            (2, 1, "zzz", "unknown key 'zzz'"),
            (5, 11, "units[0].mode", "must be one of copy, nocopy, incremental; got 'incremntal' — did you mean 'incremental'?"),
        ],
    ),
    (
        "duplicate keys, all of them",
        """
        name: a
        units:
          - vm: v
            quiesce: none
            quiesce: filesystem
            disks: [{disk: Disk1, target: 20413698}]
        name: b
        """,
        [
            (5, 5, "units[0].quiesce", "duplicate key 'quiesce' (first at line 4)"),
            (7, 1, "name", "duplicate key 'name' (first at line 1)"),
        ],
    ),
    (
        "freeze timeout beyond the ELB timeout",
        """
        name: a
        freeze_timeout: 5m
        units:
          - vm: v
            freeze_timeout: 500ms
            disks: [{disk: Disk1, target: 20413698}]
        """,
        [
            (2, 17, "freeze_timeout", "freeze_timeout must be between 1s and 120s (the array's extended-long-busy timeout), got 5m"),
            (5, 21, "units[0].freeze_timeout", "freeze_timeout must be between 1s and 120s (the array's extended-long-busy timeout), got 500ms"),
        ],
    ),
    (
        "thirteen targets in a rotation set",
        """
        name: a
        units:
          - vm: v
            disks:
              - disk: Disk1
                target:
                  rotate: [30016698, 30116698, 30216698, 30316698, 30416698, 30516698, 30616698,
                           30716698, 30816698, 30916698, 31016698, 31116698, 31216698]
        """,
        [(7, 19, "units[0].disks[0].target.rotate", "a source can have at most 12 targets; this set has 13")],
    ),
    (
        "one target for two sources, a source as target, a VM twice",
        """
        name: a
        units:
          - vm: v1
            disks:
              - {disk: Disk1, target: 20513698}
              - {disk: Disk2, target: 20513698}
          - vm: v1
            disks:
              - {disk: Disk3, target: {vm: v1, disk: Disk1}}
        """,
        [
            (6, 31, "units[0].disks[1].target", "duplicate target 20513698 for two sources (also units[0].disks[0].target)"),
            (7, 9, "units[1].vm", "VM v1 is already in units[0]; list all of its disks in one unit"),
            (9, 31, "units[1].disks[0].target", "disk v1/Disk1 is both a source (units[0].disks[0]) and a target; the array refuses cascades"),
        ],
    ),
    (
        "a serial listed twice in one rotation, and as another source's target",
        """
        name: a
        units:
          - vm: v1
            disks:
              - {disk: Disk1, target: {rotate: ["30016698", "30116698", "30016698"]}}
              - {disk: Disk2, target: {serial: "30116698"}}
        """,
        [
            (5, 65, "units[0].disks[0].target.rotate[2]", "target 30016698 is listed twice in this rotation set"),
            (6, 31, "units[0].disks[1].target", "duplicate target 30116698 for two sources (also units[0].disks[0].target.rotate[1])"),
        ],
    ),
    (
        "incremental needs a fixed target; withdraw must be keep",
        """
        name: a
        mode: incremental
        units:
          - vm: v
            withdraw: always
            disks:
              - {disk: Disk1, target: {pool: spare-256m}}
        """,
        [
            (5, 15, "units[0].withdraw", "mode incremental keeps its relationship between runs (the next run resyncs it); withdraw must be keep, got always"),
            (7, 31, "units[0].disks[0].target", "mode incremental needs one fixed target (serial or vm/disk): the array keeps only one recording relationship per source, so incremental targets cannot rotate or come from a pool"),
        ],
    ),
    (
        "a consistency group mixing quiesced and unquiesced units",
        """
        name: a
        consistency_group: g
        units:
          - vm: v1
            quiesce: application
            disks: [{disk: Disk1, target: 20413698}]
          - vm: v2
            quiesce: none
            disks: [{disk: Disk1, target: 20513698}]
        """,
        [(2, 20, "consistency_group", "consistency group 'g' mixes units with quiesce (units[0]: application) and without (units[1]: none); set mixed_quiesce: true if that is intended")],
    ),
    (
        "copy actions missing what they need",
        """
        name: a
        units:
          - vm: v1
            mode: nocopy
            disks: [{disk: Disk1, target: 20413698}]
          - vm: v2
            copy: {action: export, to: exports/x}
            disks: [{disk: Disk1, target: 20513698}]
          - vm: v3
            copy: {action: mount_check, host: h}
            disks: [{disk: Disk1, target: 20613698}]
        """,
        [
            (3, 5, "units[0]", "mode nocopy has no background copy, so 'wait' keeps nothing once the relationship is withdrawn: export or mount_check the target, or set withdraw: keep"),
            (7, 11, "units[1].copy", "export needs host (to: the folder for images, host: the backup host)"),
            (10, 11, "units[2].copy", "'host' belongs to action export; this action is mount_check"),
            (10, 11, "units[2].copy", "mount_check needs vm: the second guest that mounts and checks the target"),
        ],
    ),
    (
        "wrong types are not coerced",
        """
        name: a
        retry: {max_attempts: "3", backoff: true, non_retryable: [unknown_volum]}
        units:
          - vm: 12
            disks: Disk1
        """,
        [
            (2, 23, "retry.max_attempts", "expected a whole number, got a string ('3')"),
            (2, 37, "retry.backoff", "expected a number, got a boolean (true)"),
            (2, 59, "retry.non_retryable[0]", "unknown error kind 'unknown_volum' — did you mean 'unknown_volume'?"),
            (4, 9, "units[0].vm", "expected a string, got a number (12)"),
            (5, 12, "units[0].disks", "expected a list, got a string ('Disk1')"),
        ],
    ),
    (
        "missing required keys and a bad target",
        """
        name: A
        units:
          - vm: v
            disks:
              - disk: Disk1
              - target: 2041369
                disk: Disk2
              - {disk: Disk3, target: {disk: Disk1}}
        """,
        [
            (1, 7, "name", "'A' is not a workflow name: lower-case letters, digits, '-', '_' and '.', starting with a letter or digit, at most 64 characters"),
            (5, 9, "units[0].disks[0].target", "required key 'target' is missing"),
            (6, 17, "units[0].disks[1].target", "a serial has 8 digits, got 2041369 (quote serials with leading zeros)"),
            (8, 31, "units[0].disks[2].target", "a target needs one of serial, vm (with disk), rotate or pool: {serial: S}, {vm: VM, disk: D}, {rotate: [S, ...]} or {pool: P}"),
        ],
    ),
    (
        "schedule problems",
        """
        name: a
        schedule:
          cron: "61 * * * *"
          timezone: Mars/Olympus
          catch_up: "30"
        units: [{vm: v, disks: [{disk: Disk1, target: 20413698}]}]
        """,
        [
            (3, 9, "schedule.cron", "not a valid cron expression: '61 * * * *'; field 1 (minute) '61' is not valid (0-59)"),
            (4, 13, "schedule.timezone", "unknown time zone 'Mars/Olympus' (use an IANA name like Europe/Berlin)"),
            (5, 13, "schedule.catch_up", "expected a duration like 30s, 5m or 2h, got '30' (a unit is needed: 30s, 5m, 2h, 1d, 500ms)"),
        ],
    ),
    (
        "restore rules",
        """
        name: r
        kind: restore
        schedule: {cron: "0 * * * *"}
        units:
          - vm: v
            mode: copy
            disks: [{disk: Disk1, target: {rotate: ["30016698"]}}]
        """,
        [
            (3, 1, "schedule", "a restore runs on demand (flowcopy run), it takes no schedule"),
            (6, 11, "units[0].mode", "a restore reverses an incremental relationship; mode must be incremental, got copy"),
        ],
    ),
    (
        "a selector needs pool targets and disk names",
        """
        name: a
        before: poweroff
        units:
          - selector: {tier: gold}
            vm: x
            disks: [{disk: "22014698", target: "30016698"}]
        """,
        [
            (2, 1, "before", "'before' applies to restores only (kind: restore)"),
            (4, 5, "units[0].selector", "a unit names either vm or selector, not both"),
            (6, 20, "units[0].disks[0].disk", "a selector expands to many VMs; name the disk (Disk1), a serial is one LUN"),
            (6, 40, "units[0].disks[0].target", "a selector expands to many VMs and each needs its own target: use {pool: NAME}"),
        ],
    ),
    (
        "YAML values that are not plain data",
        """
        name: !custom a
        description: 2024-01-01
        1: one
        units: []
        """,
        [
            (1, 7, "name", "YAML tag !custom is not supported (a definition is plain mappings, lists and scalars): drop the tag, quote a string"),
            (2, 14, "description", "unsupported YAML value: a date (quote it to make it a string)"),
            (3, 1, "", "keys must be strings, got a number (1)"),
            # cross-field rules (an empty units list) wait until the shape is right
        ],
    ),
]


@pytest.mark.parametrize(("text", "expected"), [(t, e) for _, t, e in BROKEN], ids=[n for n, _, _ in BROKEN])
def test_broken_file_is_refused_with_exact_places(text: str, expected: list[tuple[int, int, str, str]]) -> None:
    assert _problems(_doc(text)) == expected


@pytest.mark.parametrize(
    ("content", "message", "line", "col"),
    [
        ("", "the file is empty; a definition needs at least name and units", 1, 1),
        ("   \n\n", "the file is empty; a definition needs at least name and units", 1, 1),
        ("# only a comment\n", "the file is empty; a definition needs at least name and units", 1, 1),
        ("- a\n- b\n", "the top level must be a mapping (name:, units:, ...), got a list", 1, 1),
        ("just words\n", "the top level must be a mapping (name:, units:, ...), got a string ('just words')", 1, 1),
        ("name: a\n  units: [\n", "not valid YAML: mapping values are not allowed here", 2, 8),
        ("name: [a\n", "not valid YAML: while parsing a flow sequence, expected ',' or ']', but got '<stream end>'", 2, 1),
        ("a: 1\n---\nb: 2\n", "not valid YAML: expected a single document in the stream, but found another document", 2, 1),
        (b"name: a\x00\n", "binary content (NUL bytes); a definition is a YAML text file", 1, 1),
        (b"name: \xff\xfe\n", "not UTF-8 text (bad byte at offset 6); a definition is a YAML text file", 1, 1),
        (b"#" * (MAX_FILE_BYTES + 1), "file is larger than 1024 KiB; a definition is a few KiB of YAML", 1, 1),
        ("description: 2024-02-30\n", "not valid YAML: day is out of range for month", 1, 1),
    ],
)
def test_file_level_refusals(content: str | bytes, message: str, line: int, col: int) -> None:
    assert _problems(content) == [(line, col, "", message)]


def test_alias_bomb_is_refused() -> None:
    text = "name: a\nl0: &l0 [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]\n" for i in range(1, 7)
    )
    assert _problems(text) == [(1, 1, "", "the document expands to more than 100000 values (aliases?)")]


def test_deep_nesting_is_refused() -> None:
    for depth in (64, 5000):  # + the top-level mapping
        problems = _problems("name: " + "[" * depth + "]" * depth + "\n")
        assert problems == [(1, 1, "", "the document is nested too deeply (more than 64 levels)")]
    # 63 lists inside the top mapping are parsed, and refused for what they are
    assert (1, 7, "name", "expected a string, got a list") in _problems("name: " + "[" * 63 + "]" * 63 + "\n")


def test_anchors_aliases_and_merge_keys_work() -> None:
    wf = load_text(
        _doc(
            """
            name: anchors
            retry: &retry {max_attempts: 7}
            units:
              - &unit
                vm: v1
                retry: *retry
                quiesce: application
                disks: [{disk: Disk1, target: 20413698}]
              - <<: *unit
                vm: v2
                disks: [{disk: Disk1, target: 20513698}]
            """
        )
    )
    assert [u.vm for u in wf.units] == ["v1", "v2"]
    assert [u.quiesce for u in wf.units] == [QuiesceLevel.APPLICATION] * 2
    assert [u.retry.max_attempts for u in wf.units] == [7, 7]


def test_merged_key_problem_points_at_the_merging_mapping() -> None:
    text = _doc(
        """
        name: a
        units:
          - &u
            vm: v1
            quiese: none
            disks: [{disk: Disk1, target: 20413698}]
          - <<: *u
            vm: v2
            disks: [{disk: Disk1, target: 20513698}]
        """
    )
    assert _problems(text) == [
        (5, 5, "units[0].quiese", "unknown key 'quiese' — did you mean 'quiesce'?"),
        (7, 5, "units[1].quiese", "unknown key 'quiese' — did you mean 'quiesce'?"),
    ]


def test_load_definition_reads_files_and_refuses_what_is_not_one(tmp_path: Path) -> None:
    good = tmp_path / "ok.yaml"
    good.write_text("name: ok\nunits: [{vm: v, disks: [{disk: Disk1, target: 20413698}]}]\n")
    assert load_definition(good).name == "ok"
    missing = tmp_path / "missing.yaml"
    with pytest.raises(DefinitionError) as info:
        load_definition(missing)
    assert info.value.problems == (Problem(str(missing), 1, 1, "", "cannot read the file: No such file or directory"),)
    with pytest.raises(DefinitionError) as info:
        load_definition(tmp_path)
    assert info.value.problems == (Problem(str(tmp_path), 1, 1, "", "is a directory, not a definition file"),)


def test_defaults_resolve_unit_over_workflow_over_builtin() -> None:
    wf = load_text(
        _doc(
            """
            name: layered
            quiesce: none
            timeouts: {copy: 1h}
            units:
              - vm: v1
                disks: [{disk: Disk1, target: 20413698}]
              - vm: v2
                quiesce: application
                mode: incremental
                timeouts: {freeze: 30s}
                disks: [{disk: Disk1, target: {vm: v3, disk: Disk4}}]
            """
        )
    )
    one, two = wf.units
    assert (one.quiesce, one.mode, one.withdraw) == (QuiesceLevel.NONE, Mode.COPY, Withdraw.ALWAYS)
    assert (one.timeouts.copy, one.timeouts.freeze) == (3600.0, 120.0)
    assert (two.quiesce, two.mode, two.withdraw) == (QuiesceLevel.APPLICATION, Mode.INCREMENTAL, Withdraw.KEEP)
    assert (two.timeouts.copy, two.timeouts.freeze) == (86400.0, 30.0)  # a block replaces as a whole
    assert one.freeze_timeout == 30.0 and one.copy == CopyAction() and one.retry == RetryPolicy()
    assert wf.consistency_groups() == {}


def test_mixed_quiesce_allowed_when_explicit_and_groups_span_units() -> None:
    wf = load_text(
        _doc(
            """
            name: mixed
            consistency_group: all
            mixed_quiesce: true
            units:
              - {vm: v1, quiesce: application, disks: [{disk: Disk1, target: 20413698}]}
              - {vm: v2, quiesce: none, disks: [{disk: Disk1, target: 20513698}]}
              - {vm: v3, consistency_group: own, disks: [{disk: Disk1, target: 20613698}]}
            """
        )
    )
    assert wf.consistency_groups() == {"all": (0, 1), "own": (2,)}


def test_site_forms() -> None:
    base = "name: s\nunits: [{vm: v, disks: [{disk: Disk1, target: 20413698}]}]\n"
    assert load_text(base + "site: embedded\n").site == SiteRef()
    assert load_text(base + "site: http://10.0.0.5:8080\n").site == SiteRef(url="http://10.0.0.5:8080")
    assert load_text(base + "site: {lab: labs/big.yaml}\n").site == SiteRef(lab="labs/big.yaml")
    assert _problems(base + "site: {url: http://x, lab: y}\n") == [
        (3, 7, "site", "site takes url (a served site) or lab (the embedded site's lab file), not both")
    ]
    assert _problems(base + "site: ftp://x\n") == [
        (3, 7, "site", "site must be 'embedded', an http(s):// URL, or {lab: FILE} / {url: URL}; got 'ftp://x'")
    ]


def test_pure_helpers() -> None:
    retry = RetryPolicy(max_attempts=4, initial_interval=1.0, backoff=3.0, max_interval=5.0)
    assert [retry.delay(n) for n in (1, 2, 3, 4)] == [1.0, 3.0, 5.0, 5.0]
    assert retry.should_retry(1, "lss_busy", True)
    assert not retry.should_retry(4, "lss_busy", True)  # attempts used up
    assert not retry.should_retry(1, "unknown_volume", False)
    assert not RetryPolicy(non_retryable=("lss_busy",)).should_retry(1, "lss_busy", True)
    schedule = Schedule(cron="30 1 * * *", timezone="Europe/Berlin")
    after = datetime(2026, 7, 1, 12, 0, tzinfo=timezone.utc)
    fire = schedule.next_after(after)
    assert (fire.hour, fire.minute, fire.day) == (1, 30, 2)
    assert fire.astimezone(timezone.utc).hour == 23  # CEST is UTC+2
    unit = UnitDef(vm="v", disks=(DiskDef(disk="Disk1", target=SerialTarget(serial="20413698")),))
    assert unit.label == "v" and UnitDef(selector={"a": "b"}).label == "selector a=b"
    assert format_path(("units", 2, "disks", 0, "target")) == "units[2].disks[0].target"
    assert format_path(("units", 0, "selector", "app.kubernetes.io/name")) == "units[0].selector['app.kubernetes.io/name']"


# --------------------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30.0), ("5m", 300.0), ("2h", 7200.0), ("1d", 86400.0), ("500ms", 0.5), ("1h30m", 5400.0), ("1.5s", 1.5), (45, 45.0), (0.25, 0.25)],
)
def test_parse_duration(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["30", "5 minutes", "-1s", "1x", "", True, None, [1], float("nan"), -3, 10**400])
def test_parse_duration_refuses(text: object) -> None:
    with pytest.raises(DurationError):
        parse_duration(text)


@given(st.floats(min_value=0, max_value=1e12, allow_nan=False) | st.integers(0, 10**9).map(lambda ms: ms / 1000))
def test_duration_format_is_parse_inverse(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == seconds


# --------------------------------------------------------------------------- random input

@st.composite
def valid_documents(draw: st.DrawFn) -> dict[str, Any]:
    """Documents valid by construction: distinct VMs, disks and targets; consistent modes."""
    serial = draw(st.integers(10_000_000, 90_000_000))
    next_serial = iter(range(serial, serial + 10_000))
    doc: dict[str, Any] = {"name": draw(st.from_regex(r"\A[a-z0-9][a-z0-9\-_.]{0,20}\Z"))}
    if draw(st.booleans()):
        doc["schedule"] = {
            "cron": draw(st.sampled_from(["0 * * * *", "*/5 * * * *", "30 1 * * 1-5", "0 0 1 * *"])),
            "overlap": draw(st.sampled_from(["skip", "buffer_one", "allow"])),
            "catch_up": draw(st.sampled_from(["0s", "30m", "2h", 90])),
        }
        if draw(st.booleans()):
            doc["schedule"]["timezone"] = draw(st.sampled_from(["UTC", "Europe/Berlin", "America/New_York"]))
    if draw(st.booleans()):
        doc["freeze_timeout"] = draw(st.sampled_from(["1s", "30s", "2m", 60, 1.5]))
    if draw(st.booleans()):
        doc["retry"] = {"max_attempts": draw(st.integers(1, 9)), "backoff": draw(st.floats(1, 4))}
    group = draw(st.sampled_from([None, "g1"]))
    if group:
        doc["consistency_group"], doc["mixed_quiesce"] = group, True
    units = []
    for index in range(draw(st.integers(1, 4))):
        mode = draw(st.sampled_from(["copy", "nocopy", "incremental"]))
        unit: dict[str, Any] = {"vm": f"vm-{index}", "mode": mode}
        unit["quiesce"] = draw(st.sampled_from(["none", "filesystem", "application", "poweroff"]))
        disks = []
        for d in range(draw(st.integers(1, 3))):
            kind = "serial" if mode == "incremental" else draw(st.sampled_from(["serial", "vmdisk", "rotate", "pool", "bare"]))
            if kind == "serial":
                target: Any = {"serial": str(next(next_serial))}
            elif kind == "bare":
                target = next(next_serial)
            elif kind == "vmdisk":
                target = {"vm": f"spare-{index}", "disk": f"Disk{d + 1}"}
            elif kind == "rotate":
                target = {"rotate": [str(next(next_serial)) for _ in range(draw(st.integers(1, 12)))]}
            else:
                target = {"pool": "spares"}
            disks.append({"disk": f"Disk{d + 1}", "target": target})
        unit["disks"] = disks
        if mode == "nocopy":
            unit["copy"] = draw(
                st.sampled_from([{"action": "export", "to": "exports/x", "host": "backup-proxy"}, {"action": "mount_check", "vm": "checker"}])
            )
        units.append(unit)
    doc["units"] = units
    return doc


def _yaml_text(doc: Any) -> str:
    out = io.StringIO()
    yaml = YAML(typ="safe", pure=True)
    yaml.default_flow_style = False
    yaml.dump(doc, out)
    return out.getvalue()


def _assert_only_definition_error(text: str | bytes) -> Workflow | None:
    try:
        return load_text(text, "fuzz.yaml")
    except DefinitionError as exc:
        assert exc.problems, "a DefinitionError without problems"
        for problem in exc.problems:
            assert problem.file == "fuzz.yaml" and problem.line >= 1 and problem.col >= 1 and problem.message
        return None


# FLOWCOPY_FUZZ_EXAMPLES=5000 for a deeper hand run; the suite's default stays quick
_FUZZ = settings(
    max_examples=int(os.environ.get("FLOWCOPY_FUZZ_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@_FUZZ
@given(valid_documents())
def test_valid_documents_load_and_round_trip(doc: dict[str, Any]) -> None:
    workflow = load_text(_yaml_text(doc), "gen.yaml")
    assert [u.vm for u in workflow.units] == [u["vm"] for u in doc["units"]]
    assert load_text(dump_text(workflow)) == workflow
    assert converter.structure(unstructure(workflow), Workflow) == workflow


_junk = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(["Disk1", "20413698", "30s", "incremental", "embedded", "http://x"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8) | st.sampled_from(["vm", "disks", "target", "mode", "rotate"]), inner, max_size=3),
    max_leaves=8,
)


def _paths(node: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [path]
    if isinstance(node, dict):
        for key, value in node.items():
            found += _paths(value, (*path, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += _paths(value, (*path, index))
    return found


@_FUZZ
@given(valid_documents(), st.data())
def test_mangled_documents_raise_only_definition_error(doc: dict[str, Any], data: st.DataObject) -> None:
    for _ in range(data.draw(st.integers(1, 3))):
        paths = _paths(doc)
        path = data.draw(st.sampled_from(paths))
        action = data.draw(st.sampled_from(["replace", "delete", "add"]))
        if not path:
            doc = data.draw(_junk) if action == "replace" else doc
            if not isinstance(doc, dict):
                break
            continue
        parent = doc
        for step in path[:-1]:
            parent = parent[step]
        last = path[-1]
        if action == "replace":
            parent[last] = data.draw(_junk)
        elif action == "delete":
            del parent[last]
        elif isinstance(parent, dict):
            parent[data.draw(st.sampled_from(["quiese", "x", "vm", "selector", "task", "mode", "serial", "pool"]))] = data.draw(_junk)
        else:
            parent.append(data.draw(_junk))
    _assert_only_definition_error(_yaml_text(doc))


@_FUZZ
@given(valid_documents(), st.data())
def test_mangled_text_raises_only_definition_error(doc: dict[str, Any], data: st.DataObject) -> None:
    text = _yaml_text(doc)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(text)))
        edit = data.draw(st.sampled_from(["cut", "insert", "dup"]))
        if edit == "cut":
            text = text[:at] + text[at + data.draw(st.integers(1, 20)) :]
        elif edit == "insert":
            text = text[:at] + data.draw(st.text(alphabet=st.sampled_from(list(":-[]{}&*!|>'\"#,? \n\tab1") + ["\x85", "\ufeff"]), max_size=6)) + text[at:]
        else:
            line_start = text.rfind("\n", 0, at) + 1
            line_end = text.find("\n", at)
            line = text[line_start : line_end if line_end >= 0 else len(text)]
            text = text[:line_start] + line + "\n" + text[line_start:]
    _assert_only_definition_error(text)


@_FUZZ
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_random_bytes_raise_only_definition_error(blob: bytes) -> None:
    _assert_only_definition_error(blob)


# --------------------------------------------------------------------------- CLI


def test_cli_validate_ok() -> None:
    result = CliRunner().invoke(main, ["validate", *map(str, EXAMPLES)])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [f"ok: {p} (1 unit)" for p in EXAMPLES]
    assert result.stderr == ""


def test_cli_validate_folder() -> None:
    result = CliRunner().invoke(main, ["validate", str(WORKFLOWS)])
    assert result.exit_code == 0
    assert len(result.stdout.splitlines()) == len(EXAMPLES)


def test_cli_validate_reports_every_problem_and_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(_doc(BROKEN[5][1]))
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    result = CliRunner().invoke(main, ["validate", str(EXAMPLES[0]), str(bad), str(empty), str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2
    assert result.stdout == f"ok: {EXAMPLES[0]} (1 unit)\n"
    assert result.stderr.splitlines() == [
        f"{bad}:6:31: units[0].disks[1].target: duplicate target 20513698 for two sources (also units[0].disks[0].target)",
        f"{bad}:7:9: units[1].vm: VM v1 is already in units[0]; list all of its disks in one unit",
        f"{bad}:9:31: units[1].disks[0].target: disk v1/Disk1 is both a source (units[0].disks[0]) and a target; the array refuses cascades",
        f"{empty}:1:1: the file is empty; a definition needs at least name and units",
        f"{tmp_path / 'nope.yaml'}:1:1: cannot read the file: No such file or directory",
    ]
    assert "Traceback" not in result.output


def test_cli_schema_prints_the_generated_schema() -> None:
    result = CliRunner().invoke(main, ["schema"])
    assert result.exit_code == 0
    schema = json.loads(result.stdout)
    assert schema == json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    unit = schema["$defs"]["UnitSpec"]
    assert unit["additionalProperties"] is False
    assert {"vm", "selector", "task", "disks", "mode", "quiesce", "freeze_timeout", "copy", "retry"} <= set(unit["properties"])
    assert schema["$defs"]["WorkflowSpec"]["required"] == ["name", "units"]


def test_schema_refuses_what_the_loader_refuses_structurally() -> None:
    validator = jsonschema.Draft202012Validator(json_schema())
    base = {"name": "a", "units": [{"vm": "v", "disks": [{"disk": "Disk1", "target": "20413698"}]}]}
    assert validator.is_valid(base)
    for bad in (
        {**base, "quiese": "none"},
        {**base, "mode": "incremntal"},
        {**base, "freeze_timeout": 500},
        {"units": base["units"]},
        {**base, "units": [{"vm": "v", "disks": [{"disk": "Disk1", "target": {"serial": "123"}}]}]},
    ):
        assert not validator.is_valid(bad), bad


# --------------------------------------------------------------------------- never-firing cron, YAML tags

UTC = timezone.utc
UNIT_YAML = "units:\n  - vm: rich-w2k-os-1\n    disks:\n      - {disk: Disk1, target: 20413698}\n"


@pytest.mark.parametrize(
    ("cron", "fields"),
    [
        ("0 0 30 2 *", ("day-of-month field '30'", "month field '2' (February)")),
        ("0 0 31 4,6,9,11 *", ("day-of-month field '31'", "April, June, September, November")),
        ("15 3 30,31 2 *", ("day-of-month field '30,31'", "February")),
        ("0 0 31 2 5#5", ("day-of-week field '5#5'",)),
    ],
)
def test_a_schedule_that_can_never_fire_is_refused_naming_the_field(tmp_path: Path, cron: str, fields: tuple[str, ...]) -> None:
    path = tmp_path / "w.yaml"
    path.write_text(f'name: w\nschedule:\n  cron: "{cron}"\n' + UNIT_YAML)
    with pytest.raises(DefinitionError) as caught:
        load_definition(path)
    (problem,) = caught.value.problems
    assert (problem.file, problem.line, problem.col, problem.path) == (str(path), 3, 9, "schedule.cron")
    assert "can never fire" in problem.message and all(f in problem.message for f in fields), problem.message


@pytest.mark.parametrize("cron", ["0 0 29 2 *", "0 0 30 2 1", "0 0 L 2 *", "0 0 31 */2 *", "0 0 * * 5#5"])
def test_rare_but_real_schedules_are_accepted(cron: str) -> None:
    workflow = load_text(f'name: w\nschedule: {{cron: "{cron}"}}\n' + UNIT_YAML)
    assert workflow.schedule is not None and workflow.schedule.next_after(datetime(2025, 1, 1, tzinfo=UTC)).year >= 2025


@pytest.mark.parametrize(
    ("tagged", "shown"),
    [
        ("!!omap", "!!omap"),
        ("!!omap [a: 1]", "!!omap"),
        ("!!set {a, b}", "!!set"),
        ("!!pairs [a: 1]", "!!pairs"),
        ("!!binary aGVsbG8=", "!!binary"),
        ("!!timestamp 2024-01-01", "!!timestamp"),
        ("!!python/object:os.system x", "!!python/object:os.system"),
        ("!custom a", "!custom"),
        ("!<tag:example.com,2024:x> a", "tag:example.com,2024:x"),
        ("!!bool not-a-bool", "!!bool"),
        ("!!int twelve", "!!int"),
        ("!!str {a: 1}", "!!str"),
        ("!!map [1]", "!!map"),
    ],
)
def test_unsupported_yaml_tags_are_refused_with_their_place(tagged: str, shown: str) -> None:
    with pytest.raises(DefinitionError) as caught:
        load_text(f"name: w\ndescription: {tagged}\n" + UNIT_YAML, "w.yaml")
    problems = [p for p in caught.value.problems if p.path == "description"]
    assert [(p.file, p.line, p.col) for p in problems] == [("w.yaml", 2, 14)], caught.value.problems
    assert f"YAML tag {shown} " in problems[0].message and "drop the tag" in problems[0].message


def test_a_tag_deep_inside_is_refused_and_the_other_problems_still_reported() -> None:
    text = "name: w\nunits:\n  - !thing\n    vm: !!set {a}\n    quiesce: frozen-solid\n    disks: []\n"
    with pytest.raises(DefinitionError) as caught:
        load_text(text, "w.yaml")
    shown = [(p.line, p.col, p.path) for p in caught.value.problems]
    assert (3, 5, "units[0]") in shown and (4, 9, "units[0].vm") in shown and (5, 14, "units[0].quiesce") in shown


def test_redundant_core_tags_are_accepted() -> None:
    workflow = load_text("name: !!str w\ndescription: !!str 123\nconcurrency: !!map {vms: !!int 3}\n" + UNIT_YAML)
    assert (workflow.description, workflow.concurrency.vms) == ("123", 3)


def test_default_retries_ride_out_thirty_seconds_of_site_unavailability_within_every_stage_timeout() -> None:
    from flowcopy.engine import RETRY_JITTER

    retry, timeouts = RetryPolicy(), StageTimeouts()
    waits = [retry.delay(a) for a in range(1, retry.max_attempts)]
    assert waits == sorted(waits) and max(waits) == retry.max_interval  # exponential, then bounded
    assert retry.total_wait() * (1 - RETRY_JITTER) >= 30.0  # even with every wait cut short by the jitter
    assert retry.total_wait() <= 120.0  # bounded: a dead site fails the unit within minutes
    for stage in ("prepare", "freeze", "establish", "release", "withdraw"):
        assert getattr(timeouts, stage) >= retry.total_wait(), stage
