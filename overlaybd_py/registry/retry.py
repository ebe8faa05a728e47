"""The one retry helper of the registry client: what is transient, how long to wait, when to stop.

Call sites never loop themselves; they pass an async callable to :func:`retry`. Only
:class:`TransientError` (and httpx transport errors, which the client translates into it) is
retried. Runs under trio.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import httpx
import trio

from ..errors import TransientError

__all__ = ["RetryPolicy", "is_transient", "retry"]

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How hard to try. Times are seconds.

    ``deadline`` bounds the whole operation's retrying: no attempt starts, and no back-off
    sleep is entered, that would end past it. A single attempt is bounded by the client's
    timeouts instead, so a slow but progressing download is never cut short by it.
    """

    deadline: float = 60.0
    max_attempts: int = 10
    base_delay: float = 0.1
    max_delay: float = 5.0
    # A Retry-After longer than this is treated as "give up": the caller is better off
    # failing fast than sleeping for minutes inside a page fault.
    max_retry_after: float = 30.0

    def __post_init__(self) -> None:
        if self.deadline <= 0 or self.max_attempts < 1 or self.base_delay < 0:
            raise ValueError(f"invalid retry policy {self!r}")

    def backoff(self, attempt: int) -> float:
        """Delay before attempt ``attempt + 1`` (``attempt`` >= 1): full jitter, capped."""
        ceiling = min(self.max_delay, self.base_delay * (2 ** (attempt - 1)))
        return random.uniform(0, ceiling)


NO_RETRY = RetryPolicy(deadline=1e9, max_attempts=1)


def is_transient(exc: BaseException) -> bool:
    """True for failures that another attempt may cure (5xx, 429, resets, short bodies)."""
    if isinstance(exc, TransientError):
        return True
    # The client translates these, but a helper may see them raw from httpx.
    return isinstance(exc, httpx.TransportError) and not isinstance(exc, httpx.UnsupportedProtocol)


async def retry(operation: Callable[[], Awaitable[T]], *, policy: RetryPolicy, what: str) -> T:
    """Run ``operation`` until it succeeds, raises a non-transient error, or time runs out.

    On giving up, raises a TransientError saying how many attempts over how long, chained
    to the last failure. ``what`` names the operation in logs (never with credentials).
    """
    start = trio.current_time()
    deadline = start + policy.deadline
    attempt = 0
    while True:
        attempt += 1
        try:
            return await operation()
        except Exception as exc:
            if not is_transient(exc):
                raise
            last = exc
        retry_after = getattr(last, "retry_after", None)
        delay = policy.backoff(attempt)
        if retry_after is not None:
            if retry_after > policy.max_retry_after:
                raise _give_up(
                    what,
                    attempt,
                    trio.current_time() - start,
                    last,
                    f"server asked to wait {retry_after:.0f}s",
                )
            delay = max(delay, retry_after)
        now = trio.current_time()
        if attempt >= policy.max_attempts or now + delay >= deadline:
            raise _give_up(what, attempt, now - start, last, None)
        # Louder as attempts accumulate: the first retries are routine on a busy registry.
        level = logging.DEBUG if attempt < 2 else logging.INFO if attempt < 4 else logging.WARNING
        log.log(level, "%s: attempt %d failed (%s); retrying in %.2fs", what, attempt, last, delay)
        await trio.sleep(delay)


def _give_up(
    what: str, attempts: int, elapsed: float, last: BaseException, why: str | None
) -> TransientError:
    reason = f"; {why}" if why else ""
    error = TransientError(
        f"{what}: giving up after {attempts} attempt{'s' if attempts > 1 else ''} "
        f"in {elapsed:.1f}s{reason}: {last}",
        status=getattr(last, "status", None),
        url=getattr(last, "url", None),
    )
    error.__cause__ = last
    return error
