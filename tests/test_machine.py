"""The unit state table: every trigger from every state, the shared machine, histories."""

from __future__ import annotations

import gc
import tracemalloc

import pytest
import transitions
from hypothesis import given
from hypothesis import strategies as st

from flowcopy import machine
from flowcopy.machine import (
    FORWARD_PATH,
    INTENT_STATES,
    MACHINE,
    STAGES,
    STATES,
    TERMINAL,
    TRANSITIONS,
    TRIGGERS,
    IllegalTransition,
    NotAttached,
    UnitModel,
    attach,
    detach,
    fire,
    is_valid_path,
    next_state,
    validate_history,
)

# The table as the brief states it, written out independently so that a slip in
# machine.py's data cannot be confirmed by itself.
EXPECTED = {
    ("pending", "prepare"): "preparing",
    ("preparing", "prepared"): "prepared",
    ("prepared", "freeze"): "freezing",
    ("freezing", "frozen"): "frozen",
    ("frozen", "establish"): "establishing",
    ("establishing", "established"): "established",
    ("established", "release"): "releasing",
    ("releasing", "released"): "released",
    ("released", "copy"): "copying",
    ("copying", "copied"): "copied",
    ("copied", "withdraw"): "withdrawing",
    ("withdrawing", "succeed"): "succeeded",
    ("freezing", "redo"): "prepared",
    ("frozen", "redo"): "prepared",
    ("establishing", "redo"): "prepared",
    ("compensating", "compensated"): "failed",
    ("compensating", "compensated_cancel"): "cancelled",
    # a restore: stop what uses the destination, overwrite it, check it, start again
    ("prepared", "stop"): "stopping",
    ("stopping", "stopped"): "stopped",
    ("stopped", "restore"): "restoring",
    ("restoring", "restored"): "restored",
    ("restored", "check"): "checking",
    ("checking", "checked"): "checked",
    ("checked", "start"): "starting",
    ("starting", "started"): "started",
    ("started", "copy"): "copying",
}
for _s in [
    "pending", "preparing", "prepared", "freezing", "frozen", "establishing", "established",
    "releasing", "released", "copying", "copied", "withdrawing",
    "stopping", "stopped", "restoring", "restored", "checking", "checked", "starting", "started",
]:
    EXPECTED[(_s, "fail")] = "compensating"
    EXPECTED[(_s, "cancel")] = "compensating"

ALL_TRIGGERS = sorted(set(TRIGGERS))


def test_states_and_sets() -> None:
    assert set(STATES) == {
        "pending", "preparing", "prepared", "freezing", "frozen", "establishing", "established",
        "releasing", "released", "copying", "copied", "withdrawing", "succeeded",
        "compensating", "failed", "cancelled",
        "stopping", "stopped", "restoring", "restored", "checking", "checked", "starting", "started",
    }
    assert len(STATES) == len(set(STATES)) == 24
    assert TERMINAL == {"succeeded", "failed", "cancelled"}
    assert INTENT_STATES == {
        "preparing", "freezing", "establishing", "releasing", "copying", "withdrawing", "compensating",
        "stopping", "restoring", "checking", "starting",
    }
    assert FORWARD_PATH[0] == "pending" and FORWARD_PATH[-1] == "succeeded"
    # the forward path is a path through the table
    for a, b in zip(FORWARD_PATH, FORWARD_PATH[1:]):
        assert b in {dest for (src, _), dest in EXPECTED.items() if src == a}


def test_table_is_exactly_the_specified_one() -> None:
    table = {(s, t.trigger): t.dest for t in TRANSITIONS for s in t.source}
    assert table == EXPECTED
    # deterministic: no (source, trigger) listed twice
    assert sum(len(t.source) for t in TRANSITIONS) == len(table)


def test_reachability() -> None:
    reach = {"pending"}
    frontier = ["pending"]
    while frontier:
        s = frontier.pop()
        for (src, _), dest in EXPECTED.items():
            if src == s and dest not in reach:
                reach.add(dest)
                frontier.append(dest)
    assert reach == set(STATES)
    for state in STATES:
        outgoing = machine.triggers_from(state)
        assert (not outgoing) == (state in TERMINAL), state


def test_stages_describe_every_state() -> None:
    assert list(STAGES) == list(STATES)
    assert [STAGES[s].index for s in STATES] == list(range(len(STATES)))
    for s in STATES:
        stage = STAGES[s]
        assert stage.intent == (s in INTENT_STATES)
        assert stage.terminal == (s in TERMINAL)
        assert stage.description
    assert STAGES["pending"].progress == 0.0
    assert STAGES["succeeded"].progress == 1.0
    assert [STAGES[s].progress for s in FORWARD_PATH] == sorted(STAGES[s].progress for s in FORWARD_PATH)
    assert STAGES["freezing"].step == "freeze" and STAGES["copied"].step == "copy"


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("trigger", ALL_TRIGGERS)
def test_fire_every_trigger_from_every_state(state: str, trigger: str) -> None:
    unit = UnitModel(f"u-{state}-{trigger}", state=state)
    attach(unit)
    try:
        expected = EXPECTED.get((state, trigger))
        if expected is None:
            with pytest.raises(IllegalTransition) as info:
                fire(unit, trigger)
            assert str(info.value) == f"unit {unit.unit_id}: cannot {trigger!r} from {state!r}"
            assert unit.state == state
            with pytest.raises(IllegalTransition):
                next_state(state, trigger)
            # the transitions Machine itself refuses it too: the table is what it enforces
            with pytest.raises(transitions.MachineError):
                MACHINE.events[trigger].trigger(unit)
            assert unit.state == state
        else:
            assert next_state(state, trigger) == expected
            assert fire(unit, trigger) == (state, expected)
            assert unit.state == expected
    finally:
        detach(unit)


def test_unknown_trigger_and_state() -> None:
    unit = UnitModel("u1")
    attach(unit)
    try:
        with pytest.raises(IllegalTransition, match=r"^unit u1: cannot 'explode' from 'pending' \(no such trigger"):
            fire(unit, "explode")
    finally:
        detach(unit)
    with pytest.raises(IllegalTransition, match=r"cannot 'prepare' from 'limbo' \(no such state"):
        next_state("limbo", "prepare")
    with pytest.raises(ValueError, match="unit u2: unknown state 'limbo'"):
        attach(UnitModel("u2", state="limbo"))


def test_message_of_the_brief() -> None:
    unit = UnitModel("u1")
    attach(unit)
    try:
        with pytest.raises(IllegalTransition) as info:
            fire(unit, "establish")
        assert str(info.value) == "unit u1: cannot 'establish' from 'pending'"
        assert (info.value.unit_id, info.value.state, info.value.trigger) == ("u1", "pending", "establish")
    finally:
        detach(unit)


def test_attach_resumes_in_the_journalled_state_and_detach_forgets() -> None:
    before = machine.attached_count()
    a = UnitModel("same", state="frozen")
    b = UnitModel("same", state="frozen")  # equal fields, still two units
    attach(a)
    attach(b)
    attach(a)  # idempotent
    assert machine.attached_count() == before + 2
    assert fire(a, "establish") == ("frozen", "establishing")
    assert b.state == "frozen"
    assert fire(a, "redo") == ("establishing", "prepared")
    detach(a)
    detach(a)  # idempotent
    with pytest.raises(NotAttached, match="unit same: not attached"):
        fire(a, "freeze")
    assert a.state == "prepared"
    assert fire(b, "fail") == ("frozen", "compensating")
    detach(b)
    assert machine.attached_count() == before


def test_ten_thousand_units_walk_and_leave_nothing_behind() -> None:
    before = machine.attached_count()
    units = [UnitModel(f"u{i}") for i in range(10_000)]
    for u in units:
        attach(u)
    path = [(s, t.trigger) for s in FORWARD_PATH[:-1] for t in TRANSITIONS
            if s in t.source and t.dest == FORWARD_PATH[FORWARD_PATH.index(s) + 1]]
    for u in units:
        for _, trigger in path:
            fire(u, trigger)
    assert {u.state for u in units} == {"succeeded"}
    for u in units:
        detach(u)
    assert machine.attached_count() == before


def _tracked(build) -> float:  # type: ignore[no-untyped-def]
    gc.collect()
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        keep = build()
        used = tracemalloc.get_traced_memory()[0] - start
    finally:
        tracemalloc.stop()
    del keep
    return used


def test_shared_machine_memory() -> None:
    """Attaching to the shared machine costs a small fraction of a Machine per unit."""
    n = 500
    spec = [{"trigger": t.trigger, "source": list(t.source), "dest": t.dest} for t in TRANSITIONS]
    shared_units = [UnitModel(f"m{i}") for i in range(n)]

    def attach_all() -> list[UnitModel]:
        for u in shared_units:
            attach(u)
        return shared_units

    def machine_each() -> list[transitions.Machine]:
        return [
            transitions.Machine(model=UnitModel(f"p{i}"), states=list(STATES), transitions=spec,
                                initial="pending", auto_transitions=False)
            for i in range(n)
        ]

    try:
        shared = _tracked(attach_all) / n
    finally:
        for u in shared_units:
            detach(u)
    separate = _tracked(machine_each) / n
    assert shared * 10 < separate, (shared, separate)


# --------------------------------------------------------------------------- histories


@st.composite
def walks(draw: st.DrawFn) -> list[tuple[str, str, str]]:
    """Random legal paths from pending, up to and maybe into a terminal state."""
    state = "pending"
    moves = []
    for _ in range(draw(st.integers(0, 40))):
        options = [(t, d) for (s, t), d in sorted(EXPECTED.items()) if s == state]
        if not options:
            break
        trigger, dest = draw(st.sampled_from(options))
        moves.append((state, trigger, dest))
        state = dest
    return moves


@given(walks())
def test_generated_walks_are_valid(moves: list[tuple[str, str, str]]) -> None:
    assert is_valid_path(moves)
    assert validate_history(moves) == []


@given(walks().filter(lambda m: len(m) >= 1), st.data())
def test_a_wrong_destination_is_caught(moves: list[tuple[str, str, str]], data: st.DataObject) -> None:
    i = data.draw(st.integers(0, len(moves) - 1))
    src, trig, dest = moves[i]
    wrong = data.draw(st.sampled_from([s for s in STATES if s != dest]))
    broken = moves[:i] + [(src, trig, wrong)] + moves[i + 1:]
    assert not is_valid_path(broken)
    assert f"move {i + 1}: {trig!r} from {src!r} leads to {dest!r}, not {wrong!r}" in validate_history(broken)


@given(walks().filter(lambda m: len(m) >= 2), st.data())
def test_a_dropped_move_is_caught(moves: list[tuple[str, str, str]], data: st.DataObject) -> None:
    i = data.draw(st.integers(0, len(moves) - 2))  # not the last: a prefix is a valid path
    assert not is_valid_path(moves[:i] + moves[i + 1:])


TO_TERMINAL = {
    "succeeded": [(s, t, d) for (s, t), d in EXPECTED.items()
                  if t not in ("fail", "cancel", "redo", "compensated", "compensated_cancel")
                  and s in FORWARD_PATH and d in FORWARD_PATH],
    "failed": [("pending", "prepare", "preparing"), ("preparing", "fail", "compensating"),
               ("compensating", "compensated", "failed")],
    "cancelled": [("pending", "cancel", "compensating"), ("compensating", "compensated_cancel", "cancelled")],
}


@pytest.mark.parametrize("end", sorted(TERMINAL))
@pytest.mark.parametrize("trigger", ALL_TRIGGERS)
def test_nothing_follows_a_terminal_state(end: str, trigger: str) -> None:
    moves = TO_TERMINAL[end]
    assert is_valid_path(moves) and moves[-1][2] == end
    extra = (end, trigger, "compensating")
    assert validate_history(moves + [extra]) == [f"move {len(moves) + 1}: cannot {trigger!r} from {end!r}"]


def test_history_must_start_at_pending() -> None:
    assert validate_history([("prepared", "freeze", "freezing")]) == [
        "move 1: starts from 'prepared' but the unit was in 'pending'"
    ]
    assert is_valid_path([])
    assert validate_history([("pending", "prepare")]) == [  # type: ignore[list-item]
        "move 1: expected (from, trigger, to), got ('pending', 'prepare')"
    ]


def test_the_freeze_window_outcome_is_one_path_from_its_intent() -> None:
    """The window journals its intent and then, once released, its outcome in one
    transaction: the outcome must be the table's own steps from the intent to `released`,
    and a unit found in the intent after a crash must be able to go back and redo."""
    from flowcopy.machine import INTENT_STATES, WINDOW_INTENT, WINDOW_OUTCOME

    assert WINDOW_INTENT in INTENT_STATES
    state, path = WINDOW_INTENT, []
    for trigger in WINDOW_OUTCOME:
        path.append((state, trigger, next_state(state, trigger)))
        state = path[-1][2]
    assert state == "released"
    before = [("pending", "prepare", "preparing"), ("preparing", "prepared", "prepared"), ("prepared", "freeze", "freezing")]
    assert validate_history(before + path) == []
    assert next_state(WINDOW_INTENT, "redo") == "prepared"
