"""structlog set-up, done once per process.

JSON lines when stderr is not a terminal (so `serve` and CI logs are machine-readable),
a pretty console renderer on a terminal. Context (run, unit, vm, stage) is bound with
structlog's contextvars so every line of a unit's work carries it without threading
loggers through call chains.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

_configured = False


def configure(*, json: bool | None = None, level: str = "info", stream: Any = None) -> None:
    """Configure structlog for this process; later calls reconfigure (tests, CLI flags)."""
    global _configured
    stream = stream if stream is not None else sys.stderr
    if json is None:
        json = not (hasattr(stream, "isatty") and stream.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer(sort_keys=False)
        if json
        else structlog.dev.ConsoleRenderer(colors=hasattr(stream, "isatty") and stream.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    _configured = True


def get_logger(name: str | None = None) -> Any:
    if not _configured:
        configure(level="warning")
    return structlog.get_logger(name)
