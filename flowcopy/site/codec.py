"""The wire format of the served site, and the on-disk format of a durable site's log.

Two encodings live here because both must round-trip values exactly:

- `converter`: one strict cattrs converter shared by `server` and `client`, so a value
  crosses HTTP unchanged (`api` value classes, request bodies). It is strict on purpose:
  a body saying `"timeout": "10"` is a 400 naming the field, not a silent `int("10")`.
- `encode_plain`/`decode_plain`: a tagged JSON form of the plain data the models hand to
  persistence (`to_state()` snapshots and mutation kwargs). Plain JSON would turn tuples
  into lists, int keys into strings and bytes into nothing; the tags keep a replayed
  mutation byte-for-byte the call that was made.
"""

from __future__ import annotations

import base64
import enum
import importlib
import inspect
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import cattrs
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError, IterableValidationError

from flowcopy.site import api

# --------------------------------------------------------------------------- the Site surface

SITE_METHODS: tuple[str, ...] = tuple(
    name for name, value in vars(api.Site).items() if inspect.iscoroutinefunction(value)
)
"""Every method of the `Site` Protocol, in declaration order (wrappers forward exactly these)."""


# --------------------------------------------------------------------------- request bodies


@attrs.frozen
class EstablishRequest:
    source: str
    target: str
    options: api.FlashOptions = api.FlashOptions()


@attrs.frozen
class ResyncRequest:
    freeze: bool = False
    tag: str | None = None
    options: api.FlashOptions | None = None  # they replace the relationship's (resyncflash)


@attrs.frozen
class ReverseRequest:
    tag: str | None = None
    fast: bool = False  # fast reverse restore


@attrs.frozen
class ElbTimeoutRequest:
    seconds: float


@attrs.frozen
class UnfreezeRequest:
    lsses: tuple[str, ...]


@attrs.frozen
class QuiesceRequest:
    level: api.QuiesceLevel
    timeout: float


@attrs.frozen
class ExecuteTaskRequest:
    tag: str | None = None


@attrs.frozen
class CheckRequest:
    serials: tuple[str, ...]


@attrs.frozen
class MountCheckRequest:
    disks: tuple[str, ...]


# --------------------------------------------------------------------------- strict converter


def _strict_str(value: object, _: type) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__} {value!r}")
    return value


def _strict_int(value: object, _: type) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {type(value).__name__} {value!r}")
    return value


def _strict_float(value: object, _: type) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"expected a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"expected a finite number, got {value!r}")
    return float(value)


def _strict_bool(value: object, _: type) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected true or false, got {type(value).__name__} {value!r}")
    return value


def _strict_tuple(value: object, type_: Any) -> tuple[Any, ...]:
    # cattrs would happily iterate a string into a tuple of characters
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
        raise TypeError(f"expected a list, got {type(value).__name__} {value!r}")
    return converter_base_tuple(value, type_)


def _strict_enum(value: object, type_: type[enum.Enum]) -> enum.Enum:
    # registered explicitly: the str hook would otherwise claim `class X(str, Enum)`
    try:
        return type_(value)
    except ValueError:
        allowed = ", ".join(repr(m.value) for m in type_)
        raise ValueError(f"{value!r} is not one of {allowed}") from None


def _is_enum(t: object) -> bool:
    return isinstance(t, type) and issubclass(t, enum.Enum)


def make_converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=True)
    for cls, hook in ((str, _strict_str), (int, _strict_int), (float, _strict_float), (bool, _strict_bool)):
        conv.register_structure_hook(cls, hook)
    # the str hook above would claim `class CopyMode(str, Enum)`; a more specific class wins
    for value in vars(api).values():
        if _is_enum(value):
            conv.register_structure_hook(value, _strict_enum)
    conv.register_structure_hook_func(_is_enum, _strict_enum)
    conv.register_unstructure_hook_func(_is_enum, lambda e: e.value)
    return conv


converter = make_converter()


def converter_base_tuple(value: Sequence[Any], type_: Any) -> tuple[Any, ...]:
    args = getattr(type_, "__args__", ())
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(converter.structure(v, args[0]) for v in value)
    if args:
        if len(args) != len(value):
            raise ValueError(f"expected {len(args)} items, got {len(value)}")
        return tuple(converter.structure(v, a) for v, a in zip(value, args, strict=True))
    return tuple(value)


converter.register_structure_hook_func(
    lambda t: getattr(t, "__origin__", None) is tuple, _strict_tuple
)


def describe_error(exc: BaseException) -> str:
    """One readable line for a structuring failure: which field, what was wrong."""
    if isinstance(exc, (ClassValidationError, IterableValidationError, ForbiddenExtraKeysError)):
        try:
            return "; ".join(cattrs.transform_error(exc, path="body", format_exception=_format_exception))
        except Exception:  # noqa: BLE001 - fall back to the exception's own words
            return str(exc)
    return str(exc)


def _format_exception(exc: BaseException, type_: Any) -> str:
    # our strict hooks say exactly what was wrong; keep their words
    if isinstance(exc, (TypeError, ValueError)) and str(exc) and not isinstance(exc, cattrs.BaseValidationError):
        if type(exc).__module__ == "builtins" and not isinstance(exc, KeyError):
            return str(exc)
    return cattrs.v.format_exception(exc, type_)


def structure(data: object, cls: type[Any]) -> Any:
    """Structure `data` as `cls` or raise `api.BadRequest` saying where and why."""
    if attrs.has(cls) and not isinstance(data, dict):
        raise api.BadRequest(
            f"bad request body: expected a JSON object, got {_json_type(data)}"
        )
    try:
        return converter.structure(data, cls)
    except Exception as exc:  # noqa: BLE001 - every structuring failure is the caller's fault
        raise api.BadRequest(f"bad request body: {describe_error(exc)}") from None


def _json_type(data: object) -> str:
    names = {type(None): "null", bool: "a boolean", str: "a string", int: "a number",
             float: "a number", list: "an array", dict: "an object"}
    return names.get(type(data), type(data).__name__)


def unstructure(value: object) -> Any:
    return converter.unstructure(value)


def dumps(value: object) -> bytes:
    return json.dumps(converter.unstructure(value), separators=(",", ":")).encode()


# --------------------------------------------------------------------------- tagged plain data

_ALLOWED_MODULE_PREFIX = "flowcopy."


def encode_plain(value: Any) -> Any:
    """Plain data (incl. bytes, tuples, non-str keys, enums, attrs values) -> JSON-able."""
    t = type(value)
    if value is None or t is str or t is int or t is bool:
        return value
    if t is float:
        if math.isfinite(value):
            return value
        return {"$f": repr(value)}
    if t is dict:
        if all(type(k) is str and not k.startswith("$") for k in value):
            return {k: encode_plain(v) for k, v in value.items()}
        return {"$m": [[encode_plain(k), encode_plain(v)] for k, v in value.items()]}
    if t is list:
        return [encode_plain(v) for v in value]
    if t is tuple:
        return {"$t": [encode_plain(v) for v in value]}
    if t is bytes:
        return {"$b": base64.b64encode(value).decode("ascii")}
    if t is bytearray:
        return {"$ba": base64.b64encode(value).decode("ascii")}
    if t is set or t is frozenset:
        return {"$s" if t is set else "$fs": [encode_plain(v) for v in value]}
    if isinstance(value, enum.Enum):
        return {"$e": _qualname(t), "v": encode_plain(value.value)}
    if attrs.has(t):
        return {
            "$a": _qualname(t),
            "v": {f.name: encode_plain(getattr(value, f.name)) for f in attrs.fields(t) if f.init},
        }
    if isinstance(value, Mapping):
        return encode_plain(dict(value))
    if isinstance(value, int):  # IntEnum handled above; numpy-like ints
        return int(value)
    raise TypeError(f"cannot persist a value of type {t.__module__}.{t.__qualname__}: {value!r}")


def decode_plain(data: Any) -> Any:
    t = type(data)
    if data is None or t is str or t is int or t is bool or t is float:
        return data
    if t is list:
        return [decode_plain(v) for v in data]
    if t is dict:
        if len(data) <= 2:
            if "$t" in data:
                return tuple(decode_plain(v) for v in data["$t"])
            if "$b" in data:
                return base64.b64decode(data["$b"])
            if "$ba" in data:
                return bytearray(base64.b64decode(data["$ba"]))
            if "$m" in data:
                return {decode_plain(k): decode_plain(v) for k, v in data["$m"]}
            if "$s" in data:
                return {decode_plain(v) for v in data["$s"]}
            if "$fs" in data:
                return frozenset(decode_plain(v) for v in data["$fs"])
            if "$f" in data:
                return float(data["$f"])
            if "$e" in data:
                return _resolve(data["$e"])(decode_plain(data["v"]))
            if "$a" in data:
                cls = _resolve(data["$a"])
                return cls(**{k: decode_plain(v) for k, v in data["v"].items()})
        return {k: decode_plain(v) for k, v in data.items()}
    raise TypeError(f"cannot decode persisted value {data!r}")


def dump_plain(value: Any) -> str:
    return json.dumps(encode_plain(value), separators=(",", ":"), allow_nan=False)


def load_plain(text: str | bytes) -> Any:
    return decode_plain(json.loads(text))


def _qualname(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _resolve(name: str) -> Any:
    module_name, _, qualname = name.partition(":")
    if not module_name.startswith(_ALLOWED_MODULE_PREFIX):
        raise TypeError(f"refusing to load persisted type {name!r} from outside flowcopy")
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj
