"""The one retry policy of site calls: stages and planning alike (stamina over tenacity).

Exponential backoff from the definition's `retry:` block (initial interval, backoff
factor, cap, attempts) plus a random jitter of up to one initial interval, so a thousand
units that met the same transient error do not call the site again in lockstep.
Sleeping is trio's (stamina detects it), so tests on MockClock jump over the waits.
stamina's own retry log lines are switched off: the caller logs each retry once, with
its unit's context.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

import attrs

T = TypeVar("T")

_quiet = False


@attrs.frozen
class Policy:
    attempts: int = 5
    initial: float = 1.0
    backoff: float = 2.0
    max_interval: float = 30.0
    non_retryable: tuple[str, ...] = ()


def retryable(exc: BaseException, policy: Policy) -> bool:
    """A transient site error (or a retryable stage error) whose kind the policy allows."""
    from flowcopy.site.api import SiteError
    from flowcopy.stages import StageError

    if isinstance(exc, SiteError):
        return exc.transient and exc.kind not in policy.non_retryable
    if isinstance(exc, StageError):
        return exc.retryable and exc.kind not in policy.non_retryable
    return False


async def call(
    fn: Callable[[], Awaitable[T]],
    policy: Policy,
    *,
    on_retry: Callable[[int, BaseException, float], None] | None = None,
    on_error: Callable[[BaseException], None] | None = None,
) -> T:
    """`await fn()`, retried on retryable errors under `policy`; the last error propagates.

    `on_retry(attempt, error, wait)` runs before each wait; `on_error` sees every error
    (the caller keeps the last one to explain a timeout)."""
    attempts = max(1, policy.attempts)
    # The first attempt runs bare: nearly every call succeeds at once, and a stamina retry
    # context costs more than a call to the in-process site (~90 us, `flowcopy bench`).
    # Only after a retryable error does stamina take over, its backoff continuing from the
    # second wait, so the waits are those of one stamina context over every attempt
    # (tenacity's exponential jitter: min(initial * backoff**(n-1) + U(0, jitter), max)).
    try:
        return await fn()
    except Exception as exc:
        if on_error is not None:
            on_error(exc)
        if attempts == 1 or not retryable(exc, policy):
            raise
        wait = min(policy.initial + random.uniform(0, policy.initial), policy.max_interval)
        if on_retry is not None:
            on_retry(1, exc, wait)
    import trio  # here, not at the top: `flowcopy status` imports this module without trio

    await trio.sleep(wait)

    import stamina

    global _quiet
    if not _quiet:
        stamina.instrumentation.set_on_retry_hooks([])
        _quiet = True
    async for attempt in stamina.retry_context(
        on=lambda exc: retryable(exc, policy),
        attempts=attempts - 1,
        timeout=None,  # the stage's trio deadline bounds the time, on trio's clock
        wait_initial=policy.initial * policy.backoff,
        wait_max=policy.max_interval,
        wait_jitter=policy.initial,
        wait_exp_base=policy.backoff,
    ):
        with attempt:
            try:
                return await fn()
            except Exception as exc:
                if on_error is not None:
                    on_error(exc)
                if on_retry is not None and attempt.num + 1 < attempts and retryable(exc, policy):
                    on_retry(attempt.num + 1, exc, attempt.next_wait)
                raise
    raise AssertionError("unreachable: stamina raises the last error")  # pragma: no cover
