"""THE state table of a unit: states, triggers and their meaning, as data, in one place.

A *unit* is one consistency group of a run (by default one VM's disks). Its life is a
walk through the table below; the journal, the engine, the status view and the chaos
checker all read states from here and never list them by hand.

transitions' `AsyncMachine` gathers callbacks with asyncio, which trio cannot host, so
the plain synchronous `Machine` is used as the *validator and recorder* of moves: the
engine awaits the side effect in trio, then `fire()`s the trigger. No callbacks, no I/O.

One module-level `Machine` serves every unit (`add_model`): a `Machine` per unit builds
its own `State`/`Event`/`Transition` objects and costs an order of magnitude more memory
per unit (see `tests/test_machine.py::test_shared_machine_memory`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import attrs
import transitions

# --------------------------------------------------------------------------- states

FORWARD_PATH: tuple[str, ...] = (
    "pending",
    "preparing",
    "prepared",
    "freezing",
    "frozen",
    "establishing",
    "established",
    "releasing",
    "released",
    "copying",
    "copied",
    "withdrawing",
    "succeeded",
)
"""The happy path, in order."""

RESTORE_PATH: tuple[str, ...] = (
    "pending",
    "preparing",
    "prepared",
    "stopping",
    "stopped",
    "restoring",
    "restored",
    "checking",
    "checked",
    "starting",
    "started",
    "copying",
    "copied",
    "withdrawing",
    "succeeded",
)
"""A restore's happy path: the VMs using the destination LUNs are stopped before the
image overwrites them, the checker judges the LUNs before the VMs start again, and the
run ends once the array's background copy back has finished."""

_RESTORE_ONLY: tuple[str, ...] = tuple(s for s in RESTORE_PATH if s not in FORWARD_PATH)

STATES: tuple[str, ...] = FORWARD_PATH + _RESTORE_ONLY + ("compensating", "failed", "cancelled")
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
NON_TERMINAL: tuple[str, ...] = tuple(s for s in STATES if s not in TERMINAL)

INTENT_STATES: frozenset[str] = frozenset(
    {"preparing", "freezing", "establishing", "releasing", "copying", "withdrawing", "compensating",
     "stopping", "restoring", "checking", "starting"}
)
"""States recorded *before* their side effect starts (write-ahead): after a crash, a unit
found in one of them may have its side effect half done, so resume reconciles it
against the site before acting (DESIGN §3.4)."""

WINDOW_INTENT = "freezing"
"""The intent that declares a whole freeze window: quiesce the guests, establish every
pair under the consistency group's freeze, unfreeze and thaw. Nothing is journaled
between the guests' freeze and the release: every commit there would be time the
guests' and the sources' I/O stays held. A unit found here after a crash may be anywhere
in the window, so resume withdraws what the attempt made, unfreezes, thaws and redoes it
(`redo` from `freezing`)."""

WINDOW_OUTCOME: tuple[str, ...] = ("frozen", "establish", "established", "release", "released")
"""The window's moves after its intent, made durable together in one transaction once the
release is done (`freezing` -> `released`): the history keeps every step of the table,
and the journal never claims a step whose side effect a crash could have left half done."""


@attrs.frozen
class Stage:
    """What a state means to a human and to the progress view."""

    state: str
    index: int
    """Sort order for status views: the forward path in order, then the failure states."""
    step: str | None
    """Which step (backup: prepare, freeze, establish, release, copy, withdraw; restore
    also: stop, restore, check, start) the state belongs to; None for pending and the
    end states."""
    intent: bool
    terminal: bool
    description: str

    @property
    def progress(self) -> float:
        """Fraction of the forward path done; end states count as complete."""
        if self.terminal:
            return 1.0
        if self.state == "compensating":
            return 0.0  # compensation undoes work: no forward progress to show
        if self.state in _RESTORE_ONLY:
            return RESTORE_PATH.index(self.state) / (len(RESTORE_PATH) - 1)
        return FORWARD_PATH.index(self.state) / (len(FORWARD_PATH) - 1)

_DESCRIPTIONS: dict[str, tuple[str | None, str]] = {
    "pending": (None, "waiting to start"),
    "preparing": ("prepare", "resolving VMs and disks to LUNs, checking and choosing targets"),
    "prepared": ("prepare", "disks resolved and targets chosen"),
    "freezing": ("freeze", "freeze window: quiescing the guests, establishing, releasing"),
    "frozen": ("freeze", "guests quiesced, writes held"),
    "establishing": ("establish", "establishing FlashCopy relationships for every pair"),
    "established": ("establish", "point-in-time image taken"),
    "releasing": ("release", "unfreezing the consistency group and thawing the guests"),
    "released": ("release", "guests running again"),
    "stopping": ("stop", "restore: powering off the VMs that use the destination LUNs"),
    "stopped": ("stop", "restore: nothing uses the destination LUNs"),
    "restoring": ("restore", "restore: FlashCopy back, reverse restore, or writing the image back"),
    "restored": ("restore", "restore: the destination LUNs hold the image"),
    "checking": ("check", "restore: the independent checker on the restored LUNs"),
    "checked": ("check", "restore: the restored LUNs checked"),
    "starting": ("start", "restore: powering the VMs on again"),
    "started": ("start", "restore: the VMs run on the restored LUNs"),
    "copying": ("copy", "background copy, export or mount-and-check of the targets"),
    "copied": ("copy", "target image complete"),
    "withdrawing": ("withdraw", "withdrawing relationships the policy does not keep"),
    "succeeded": (None, "done: image taken and verified"),
    "compensating": (None, "undoing: thaw, unfreeze, withdraw what this run established"),
    "failed": (None, "failed; compensation finished"),
    "cancelled": (None, "cancelled; compensation finished"),
}

STAGES: Mapping[str, Stage] = {
    state: Stage(
        state=state,
        index=i,
        step=_DESCRIPTIONS[state][0],
        intent=state in INTENT_STATES,
        terminal=state in TERMINAL,
        description=_DESCRIPTIONS[state][1],
    )
    for i, state in enumerate(STATES)
}


# --------------------------------------------------------------------------- transitions


@attrs.frozen
class Transition:
    trigger: str
    source: tuple[str, ...]
    dest: str
    description: str = ""


_FAILABLE = tuple(s for s in NON_TERMINAL if s != "compensating")

TRANSITIONS: tuple[Transition, ...] = (
    Transition("prepare", ("pending",), "preparing", "intent: resolve and choose targets"),
    Transition("prepared", ("preparing",), "prepared"),
    Transition("freeze", ("prepared",), "freezing",
               "intent: the whole freeze window (quiesce, establish under the group's freeze, release)"),
    Transition("frozen", ("freezing",), "frozen"),
    Transition("establish", ("frozen",), "establishing", "intent: establish every pair"),
    Transition("established", ("establishing",), "established"),
    Transition("release", ("established",), "releasing", "intent: unfreeze and thaw"),
    Transition("released", ("releasing",), "released"),
    Transition("stop", ("prepared",), "stopping", "restore intent: power off what uses the destination"),
    Transition("stopped", ("stopping",), "stopped"),
    Transition("restore", ("stopped",), "restoring", "restore intent: overwrite the destination with the image"),
    Transition("restored", ("restoring",), "restored"),
    Transition("check", ("restored",), "checking", "restore intent: check the restored LUNs"),
    Transition("checked", ("checking",), "checked"),
    Transition("start", ("checked",), "starting", "restore intent: power the VMs on"),
    Transition("started", ("starting",), "started"),
    Transition("copy", ("released", "started"), "copying", "intent: background copy / export / check"),
    Transition("copied", ("copying",), "copied"),
    Transition("withdraw", ("copied",), "withdrawing", "intent: withdraw by policy"),
    Transition("succeed", ("withdrawing",), "succeeded"),
    Transition(
        "redo",
        ("freezing", "frozen", "establishing"),
        "prepared",
        "after reconciliation: the freeze is thawed (and any inconsistent copy withdrawn); freeze again",
    ),
    Transition("fail", _FAILABLE, "compensating", "intent: undo after a failure"),
    Transition("cancel", _FAILABLE, "compensating", "intent: undo after a cancel"),
    Transition("compensated", ("compensating",), "failed"),
    Transition("compensated_cancel", ("compensating",), "cancelled"),
)

TRIGGERS: tuple[str, ...] = tuple(t.trigger for t in TRANSITIONS)

_TABLE: dict[tuple[str, str], str] = {}
for _t in TRANSITIONS:
    for _s in _t.source:
        if (_s, _t.trigger) in _TABLE:  # pragma: no cover - a broken table must not load
            raise AssertionError(f"state table: {_t.trigger!r} from {_s!r} defined twice")
        _TABLE[(_s, _t.trigger)] = _t.dest
del _t, _s


_at = WINDOW_INTENT
for _trigger in WINDOW_OUTCOME:
    _at = _TABLE[(_at, _trigger)]  # a KeyError here: the window's outcome is no path of the table
if _at != "released":  # pragma: no cover - a broken window must not load
    raise AssertionError(f"state table: the freeze window's outcome ends in {_at!r}, not 'released'")
del _at, _trigger


def triggers_from(state: str) -> tuple[str, ...]:
    """The triggers legal in `state`, in table order."""
    return tuple(t.trigger for t in TRANSITIONS if state in t.source)


# --------------------------------------------------------------------------- errors


class IllegalTransition(Exception):
    """A trigger that the state table does not allow from the unit's current state."""

    def __init__(self, state: str, trigger: str, unit_id: str | None = None) -> None:
        self.state = state
        self.trigger = trigger
        self.unit_id = unit_id
        prefix = f"unit {unit_id}: " if unit_id is not None else ""
        why = ""
        if trigger not in TRIGGERS:
            why = f" (no such trigger; known: {', '.join(dict.fromkeys(TRIGGERS))})"
        elif state not in STAGES:
            why = f" (no such state; known: {', '.join(STATES)})"
        super().__init__(f"{prefix}cannot {trigger!r} from {state!r}{why}")


class NotAttached(Exception):
    """fire() on a unit that is not (or no longer) attached to the machine."""


# --------------------------------------------------------------------------- the machine


@attrs.define(slots=False, eq=False)
class UnitModel:
    """The object the shared machine decorates with trigger methods.

    `slots=False` because transitions adds methods to the instance; `eq=False` because
    transitions keeps models in a list and finds them with `==`: two units with equal
    fields must stay two models.
    """

    unit_id: str
    state: str = "pending"


class _Models:
    """`Machine.models` backed by a dict keyed on identity.

    transitions keeps models in a list and tests membership with `in` / removes with
    `list.remove`: O(n) per attach and detach, so 10k units cost O(n^2). The machine only
    appends, removes, tests membership, iterates and takes len(); this provides exactly
    that in O(1), preserving insertion order.
    """

    __slots__ = ("_by_id",)

    def __init__(self) -> None:
        self._by_id: dict[int, object] = {}

    def __contains__(self, model: object) -> bool:
        return id(model) in self._by_id

    def append(self, model: object) -> None:
        self._by_id[id(model)] = model

    def remove(self, model: object) -> None:
        try:
            del self._by_id[id(model)]
        except KeyError:
            raise ValueError("model is not attached") from None

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(list(self._by_id.values()))

    def __len__(self) -> int:
        return len(self._by_id)

    def __getitem__(self, index: int) -> object:
        return list(self._by_id.values())[index]


class _UnitMachine(transitions.Machine):
    """The shared machine, tuned for thousands of short-lived models.

    transitions stamps every model with a bound partial per trigger, `may_<trigger>`
    and `is_<state>` (54 here): ~15 KB and ~200 us per attach, which at 10k units is
    150 MB and 2 s spent on methods nobody calls, since units move only through
    `fire()`. `model_override=True` would skip them too, but logs a warning for each
    skipped name. So binding is switched off here, and so is the per-state scan for
    `on_enter_<state>` methods on the model (units have none: no callbacks, no I/O);
    attach then costs only `set_state`.
    """

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.models = _Models()  # type: ignore[assignment]

    def _checked_assignment(self, model: object, name: str, func: object) -> None:
        return None

    def _add_model_to_state(self, state: object, model: object) -> None:
        return None

    def _add_trigger_to_model(self, trigger: str, model: object) -> None:
        # the bound trigger and `may_<trigger>` partials would be built only for
        # `_checked_assignment` to drop them: 50 partials per attach, ~8% of a 10k run's CPU
        return None


MACHINE = _UnitMachine(
    model=None,
    states=list(STATES),
    transitions=[
        {"trigger": t.trigger, "source": list(t.source), "dest": t.dest} for t in TRANSITIONS
    ],
    initial="pending",
    auto_transitions=False,
    ignore_invalid_triggers=False,
    model_attribute="state",
    send_event=False,
)
"""The one machine every unit is attached to."""


def attach(unit: UnitModel) -> None:
    """Register `unit` with the shared machine in its current state (resume passes the
    journal's state). Attaching twice is harmless."""
    if unit.state not in STAGES:
        raise ValueError(
            f"unit {unit.unit_id}: unknown state {unit.state!r} (known: {', '.join(STATES)})"
        )
    MACHINE.add_model(unit, initial=unit.state)


def detach(unit: UnitModel) -> None:
    """Forget `unit` (it finished, or the engine let go of it); safe to call twice."""
    if unit in MACHINE.models:
        MACHINE.remove_model(unit)


def is_attached(unit: UnitModel) -> bool:
    return unit in MACHINE.models


def attached_count() -> int:
    return len(MACHINE.models)


def fire(unit: UnitModel, trigger: str) -> tuple[str, str]:
    """Apply `trigger` to `unit` through the shared machine; return (from, to).

    The lookup in `_TABLE` (built from the same `TRANSITIONS` as the machine) gives the
    precise error and keeps an illegal trigger from touching the unit; the machine then
    records the new state with `set_state`. Going through `Event.trigger` instead would
    only re-check the same table and run the empty callback chain (conditions, before,
    exit, enter, after, with a debug log line each): three quarters of the cost of a move
    in `flowcopy bench`, for no behaviour of ours.
    """
    source = unit.state
    dest = _TABLE.get((source, trigger))
    if dest is None:
        raise IllegalTransition(source, trigger, unit.unit_id)
    if unit not in MACHINE.models:
        raise NotAttached(f"unit {unit.unit_id}: not attached to the state machine")
    MACHINE.set_state(dest, model=unit)
    return source, dest


def next_state(state: str, trigger: str) -> str:
    """Where `trigger` leads from `state`; pure."""
    try:
        return _TABLE[(state, trigger)]
    except KeyError:
        raise IllegalTransition(state, trigger) from None


# --------------------------------------------------------------------------- histories

HistoryStep = tuple[str, str, str]
"""(from_state, trigger, to_state), as the journal's events record them."""


def validate_history(moves: Iterable[Sequence[str]]) -> list[str]:
    """Every problem with a unit's event history as a path through the table from
    `pending` (invariant 5); empty when the history is valid. An empty history is valid:
    the unit never moved."""
    problems: list[str] = []
    expected = "pending"
    for n, move in enumerate(moves, start=1):
        if len(move) != 3:
            problems.append(f"move {n}: expected (from, trigger, to), got {tuple(move)!r}")
            continue
        source, trigger, dest = move
        if source != expected:
            problems.append(
                f"move {n}: starts from {source!r} but the unit was in {expected!r}"
            )
        legal = _TABLE.get((source, trigger))
        if legal is None:
            problems.append(f"move {n}: cannot {trigger!r} from {source!r}")
        elif legal != dest:
            problems.append(
                f"move {n}: {trigger!r} from {source!r} leads to {legal!r}, not {dest!r}"
            )
        expected = dest
    return problems


def is_valid_path(moves: Sequence[HistoryStep]) -> bool:
    """True when `moves` is a path through the state table starting at `pending`."""
    return not validate_history(moves)
