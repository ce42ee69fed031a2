"""JSON Schema (draft 2020-12) of definition files, generated from the document classes.

Generated, not written: it walks `attrs.fields` and the resolved type hints of
`WorkflowSpec` and everything it reaches, so a field added to a class shows up in
editors' completion without a second place to edit. Checks a schema cannot express
(cross-field rules, cron syntax, time zones) stay with the loader; the schema accepts a
superset of what loads, never less.
"""

from __future__ import annotations

import types
import typing
from enum import Enum
from typing import Any, Literal, Union, get_args, get_origin

import attrs

from flowcopy import definitions as d
from flowcopy.durations import DURATION_PATTERN

SCHEMA_ID = "https://flowcopy.invalid/schemas/workflow.json"

_STRING_NAME = {"type": "string", "minLength": 1, "pattern": r"\S"}

_SCALARS: dict[Any, dict[str, Any]] = {
    str: {"type": "string"},
    bool: {"type": "boolean"},
    int: {"type": "integer"},
    float: {"type": "number"},
    d.Duration: {
        "anyOf": [
            {"type": "string", "pattern": DURATION_PATTERN},
            {"type": "number", "minimum": 0},
        ],
        "description": "a duration: 30s, 5m, 2h, 1d, 500ms, 1h30m, or seconds as a number",
    },
    d.FreezeTimeout: {
        "anyOf": [
            {"type": "string", "pattern": DURATION_PATTERN},
            {"type": "number", "minimum": d.MIN_FREEZE_TIMEOUT, "maximum": d.MAX_FREEZE_TIMEOUT},
        ],
        "description": "a duration between 1s and 120s (the array's ELB timeout)",
    },
    d.Serial: {
        "anyOf": [
            {"type": "string", "pattern": d.SERIAL_PATTERN},
            {"type": "integer", "minimum": 10_000_000, "maximum": 99_999_999},
        ],
        "description": "an 8-digit ESS volume serial",
    },
    d.DiskRef: {"anyOf": [_STRING_NAME, {"type": "integer", "minimum": 10_000_000, "maximum": 99_999_999}]},
    d.Name: _STRING_NAME,
    d.WorkflowName: {"type": "string", "pattern": d.WORKFLOW_NAME_PATTERN},
    d.Cron: {"type": "string", "pattern": r"^\s*\S+(\s+\S+){4}\s*$", "description": "five cron fields"},
    d.TimeZone: {"type": "string", "minLength": 1, "description": "an IANA time zone name"},
    d.ErrorKind: {"enum": sorted(d.ERRORS_BY_KIND)},
    d.Url: {"type": "string", "pattern": d.URL_PATTERN},
    d.Count: {"type": "integer", "minimum": 1},
    d.Factor: {"type": "number", "minimum": 1},
}


def json_schema() -> dict[str, Any]:
    """The schema of a definition file, as a JSON-ready dict."""
    defs: dict[str, Any] = {}
    root = _schema(d.WorkflowSpec, defs)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "flowcopy workflow definition",
        "description": (d.WorkflowSpec.__doc__ or "").strip(),
        **root,
        "$defs": dict(sorted(defs.items())),
    }


def _schema(t: Any, defs: dict[str, Any]) -> dict[str, Any]:
    if t in _SCALARS:
        return dict(_SCALARS[t])
    if t is type(None):
        return {"type": "null"}
    shorthands = d.SHORTHANDS.get(t, ())
    origin = get_origin(t)
    if origin is Literal:
        return {"enum": list(get_args(t))}
    if origin in (Union, types.UnionType):
        args = get_args(t)
        options = [_schema(a, defs) for a in (*shorthands, *args)]
        if len(options) == 1:
            return options[0]
        if type(None) in args:
            return {"anyOf": options}
        return {"oneOf": options}
    if origin is tuple:
        item, _ = get_args(t)
        return {"type": "array", "items": _schema(item, defs)}
    if origin in (dict, typing.Mapping) or (origin is not None and getattr(origin, "__name__", "") == "Mapping"):
        _, value = get_args(t)
        return {"type": "object", "additionalProperties": _schema(value, defs)}
    if isinstance(t, type) and issubclass(t, Enum):
        return {"enum": [m.value for m in t]}
    if isinstance(t, type) and attrs.has(t):
        ref = {"$ref": f"#/$defs/{t.__name__}"}
        if t.__name__ not in defs:
            defs[t.__name__] = {}  # placeholder: recursion-safe
            defs[t.__name__] = _object(t, defs)
        if shorthands:
            return {"anyOf": [*(_schema(s, defs) for s in shorthands), ref]}
        return ref
    raise TypeError(f"no JSON Schema for type {t!r}")  # a new field type: teach _schema


def _object(cls: type, defs: dict[str, Any]) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    properties: dict[str, Any] = {}
    required: list[str] = []
    for field in attrs.fields(cls):
        prop = _schema(hints[field.name], defs)
        doc = field.metadata.get("doc")
        if doc:
            prop = {**prop, "description": doc} if "$ref" not in prop else {"allOf": [prop], "description": doc}
        if field.default is attrs.NOTHING:
            required.append(field.name)
        elif field.default is not None and not isinstance(field.default, attrs.Factory):  # type: ignore[arg-type]
            default = d.converter.unstructure(field.default, hints[field.name])
            if default not in ((), [], {}):
                prop["default"] = default
        properties[field.name] = prop
    schema: dict[str, Any] = {
        "type": "object",
        "properties": properties,
        "additionalProperties": False,
    }
    if cls.__doc__:
        schema["description"] = cls.__doc__.strip().splitlines()[0]
    if required:
        schema["required"] = required
    return schema
