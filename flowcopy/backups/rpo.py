"""RPO: the age of each VM's newest verified backup against its workflow's `rpo:`. Pure."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs

from flowcopy.backups.catalog import Backup
from flowcopy.durations import format_duration


@attrs.frozen
class VmRpo:
    vm: str
    workflow: str
    rpo: float
    newest: str | None  # backup id
    age: float | None  # seconds; None: never backed up (verified)

    @property
    def past(self) -> bool:
        return self.age is None or self.age > self.rpo

    def line(self) -> str:
        rpo = format_duration(self.rpo)
        if self.age is None:
            return f"{self.vm}: no verified backup ({self.workflow}, rpo {rpo}): PAST RPO"
        verdict = "PAST RPO" if self.past else "ok"
        return f"{self.vm}: newest verified backup {self.newest} is {format_duration(round(self.age))} old ({self.workflow}, rpo {rpo}): {verdict}"

    def to_json(self) -> dict[str, Any]:
        return {**attrs.asdict(self), "past": self.past}


def status(backups: Sequence[Backup], workflows: Mapping[str, tuple[float, Iterable[str]]], now: float) -> list[VmRpo]:
    """`workflows`: name -> (rpo seconds, the VMs it protects). A VM counts its newest
    verified backup from any workflow that protects it with an RPO."""
    newest: dict[str, Backup] = {}
    for b in backups:
        if not b.verified_ok:
            continue
        for vm in b.vms:
            if vm not in newest or (b.wall_time or 0.0) > (newest[vm].wall_time or 0.0):
                newest[vm] = b
    out = []
    for name, (rpo, vms) in sorted(workflows.items()):
        for vm in sorted(set(vms)):
            b = newest.get(vm)
            age = None if b is None or b.wall_time is None else max(0.0, now - b.wall_time)
            out.append(VmRpo(vm, name, rpo, None if b is None else b.id, age))
    return out
