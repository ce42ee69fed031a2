"""Durations as admins write them (`30s`, `5m`, `1h30m`, `500ms`) <-> seconds as floats.

Seconds as plain floats is what the site interface and trio's clock speak, so the parsed
form is a float; the written form is for humans, and `format_duration` is the exact
inverse of `parse_duration` (parse(format(x)) == x for every finite x >= 0), which is what
lets a loaded definition be written back out and loaded again unchanged.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation

UNITS: dict[str, Decimal] = {
    "d": Decimal(86400),
    "h": Decimal(3600),
    "m": Decimal(60),
    "s": Decimal(1),
    "ms": Decimal("0.001"),
}
"""Unit suffixes, largest first (the order `format_duration` decomposes in)."""

_PART = r"(\d+(?:\.\d+)?)(ms|d|h|m|s)"
DURATION_PATTERN = rf"^(?:{_PART})+$"
"""The written form as a regular expression (also used by the JSON Schema)."""

_PART_RE = re.compile(_PART)
_WHOLE_RE = re.compile(DURATION_PATTERN)


class DurationError(ValueError):
    """A duration an admin wrote that does not parse; the message says what is expected."""


def parse_duration(value: object) -> float:
    """Seconds from `30s`, `5m`, `2h`, `1d`, `500ms`, compounds (`1h30m`) or a plain number.

    A bare number means seconds (YAML gives us ints and floats for `30` and `1.5`); a bare
    *string* number is refused, because `"30"` in a file is more often a forgotten unit
    than a deliberate quote.
    """
    if isinstance(value, bool):
        raise DurationError(f"expected a duration like 30s, 5m or 2h, got {value!r}")
    if isinstance(value, (int, float)):
        try:
            seconds = float(value)
        except OverflowError:
            seconds = math.inf
        if not math.isfinite(seconds) or seconds < 0:
            raise DurationError(f"a duration must be a finite number of seconds >= 0, got {value!r}")
        return seconds
    if not isinstance(value, str):
        raise DurationError(f"expected a duration like 30s, 5m or 2h, got {type(value).__name__}")
    text = value.strip()
    if not _WHOLE_RE.match(text):
        hint = " (a unit is needed: 30s, 5m, 2h, 1d, 500ms)" if _is_number(text) else ""
        raise DurationError(f"expected a duration like 30s, 5m or 2h, got {value!r}{hint}")
    try:
        total = sum(
            (Decimal(number) * UNITS[unit] for number, unit in _PART_RE.findall(text)),
            Decimal(0),
        )
    except InvalidOperation as exc:  # pragma: no cover - the regex admits only decimals
        raise DurationError(f"expected a duration like 30s, 5m or 2h, got {value!r}") from exc
    seconds = float(total)
    if not math.isfinite(seconds):
        raise DurationError(f"duration {value!r} is too large")
    return seconds


def format_duration(seconds: float) -> str:
    """The shortest usual written form: 30 -> `30s`, 5400 -> `1h30m`, 0.5 -> `500ms`.

    Values that are not a whole number of milliseconds keep full float precision in
    seconds (`0.0001s`, never an exponent) so the round trip stays exact.
    """
    seconds = float(seconds)
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"not a duration: {seconds!r}")
    exact = Decimal(repr(seconds))
    millis = exact * 1000
    if millis != millis.to_integral_value():
        return f"{format(exact, 'f')}s"  # plain digits: the written form has no exponent
    rest = int(millis)
    if rest == 0:
        return "0s"
    parts: list[str] = []
    for unit, size in UNITS.items():
        unit_ms = int(size * 1000)
        count, rest = divmod(rest, unit_ms)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
