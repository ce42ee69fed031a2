"""structlog set-up, done once per process, with the user's choices winning over defaults.

A command picks its own default (`run` shows only warnings on a terminal, `serve` writes
JSON lines at info); `--log-level`/`--log-format` (or FLOWCOPY_LOG_LEVEL/FLOWCOPY_LOG_FORMAT)
override that default the same way on every command. Each line names its logger
(`flowcopy.engine`, `flowcopy.scheduler`...) so a warning says which part of flowcopy
spoke. Context (run, unit, vm, stage) is bound with structlog's contextvars so every line
of a unit's work carries it without threading loggers through call chains.

A live view hands its rich Console in: lines then go through that console, so they
scroll above the progress bars instead of being drawn over by them.

structlog is imported inside the functions: `flowcopy --help` and `status` never pay for it.
"""

from __future__ import annotations

import logging
import os
import sys
import weakref
from typing import Any

LEVELS = ("debug", "info", "warning", "error", "critical")
FORMATS = ("console", "json")
ENV_LEVEL = "FLOWCOPY_LOG_LEVEL"
ENV_FORMAT = "FLOWCOPY_LOG_FORMAT"

_configured = False
_chosen: dict[str, str] = {}


class LogSettingError(ValueError):
    """A log level or format that is not one of the known ones (from the environment)."""


def choose(*, level: str | None = None, format: str | None = None) -> None:
    """Record the user's choice (command line); it wins over every command's default."""
    if level is not None:
        _chosen["level"] = _check(level.lower(), LEVELS, "--log-level")
    if format is not None:
        _chosen["format"] = _check(format.lower(), FORMATS, "--log-format")


def _check(value: str, allowed: tuple[str, ...], what: str) -> str:
    if value not in allowed:
        raise LogSettingError(f"{what} must be one of {', '.join(allowed)}, not {value!r}")
    return value


def chosen_level() -> str | None:
    if "level" in _chosen:
        return _chosen["level"]
    env = os.environ.get(ENV_LEVEL)
    return _check(env.lower(), LEVELS, ENV_LEVEL) if env else None


def chosen_format() -> str | None:
    if "format" in _chosen:
        return _chosen["format"]
    env = os.environ.get(ENV_FORMAT)
    return _check(env.lower(), FORMATS, ENV_FORMAT) if env else None


def reset_choice() -> None:
    """Forget the command line's choice (tests run many commands in one process)."""
    _chosen.clear()


class _SinkLogger:
    """A structlog logger that hands each rendered line to a function (a stream, a rich
    console); it keeps the name it was created with, for `_add_logger_name`."""

    def __init__(self, sink: Any, name: str | None) -> None:
        self._sink = sink
        self.name = name

    def msg(self, message: str) -> None:
        self._sink(message)

    log = debug = info = warn = warning = err = error = critical = exception = fatal = failure = msg


def configure(*, json: bool | None = None, level: str = "info", stream: Any = None, console: Any = None) -> None:
    """Configure structlog for this process; later calls reconfigure (tests, live views).

    `json`/`level` are this command's defaults; the user's choice wins. With `console`
    (a rich Console) every line is printed through it.
    """
    import structlog

    global _configured
    level = chosen_level() or level
    fmt = chosen_format()
    stream = stream if stream is not None else sys.stderr
    target = console.file if console is not None else stream
    tty = hasattr(target, "isatty") and target.isatty()
    if fmt is not None:
        json = fmt == "json"
    elif json is None:
        json = not tty
    renderer: Any = (
        structlog.processors.JSONRenderer(sort_keys=False)
        if json
        else structlog.dev.ConsoleRenderer(colors=tty)
    )
    if console is not None:
        from rich.text import Text

        def sink(line: str) -> None:
            console.print(Text.from_ansi(line), soft_wrap=True)

    else:

        def sink(line: str) -> None:
            stream.write(line + "\n")
            stream.flush()

    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            _add_logger_name,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=lambda *args: _SinkLogger(sink, args[0] if args else None),
        cache_logger_on_first_use=False,
    )
    _configured = True
    for lazy in list(_LAZIES):
        lazy._forget()


def _add_logger_name(logger: Any, method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    name = getattr(logger, "name", None)
    if name and "logger" not in event_dict:
        event_dict["logger"] = name
    return event_dict


class _Lazy:
    """A logger that configures structlog on its first line, not at import time.

    Each method it hands out (`info`, `warning`...) is kept on the instance until
    `configure` runs again (a live view starting), which forgets them: structlog's lazy
    proxy builds a bound logger for every line, and a line below the level then cost ~10 us
    instead of well under one (a 10,000-VM run logs 120,000 transitions at info).
    """

    def __init__(self, name: str | None) -> None:
        self._name = name
        _LAZIES.add(self)

    def _forget(self) -> None:
        name = self._name
        self.__dict__.clear()
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        if not _configured:
            configure(level="warning")
        import structlog

        proxy = structlog.get_logger(self._name) if self._name else structlog.get_logger()
        value = getattr(proxy.bind(), attr)
        self.__dict__[attr] = value  # found without __getattr__ until the next configure
        return value


_LAZIES: weakref.WeakSet[_Lazy] = weakref.WeakSet()


def get_logger(name: str | None = None) -> Any:
    """A logger whose every line carries `logger=name`; free to create at import time."""
    return _Lazy(name)
