"""Run a few awaitables concurrently and surface a failure as the error itself.

trio wraps child failures in an ExceptionGroup; callers of the engine (FUSE errno mapping,
CLI messages, the FormatError contract of the readers) want the first real error, so groups
are collapsed here, in one place.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

__all__ = ["run_concurrently", "unwrap_group"]


def unwrap_group(exc: BaseException) -> BaseException:
    """The first leaf of a (nested) exception group that is not a Cancelled."""
    while isinstance(exc, BaseExceptionGroup):
        leaves = [e for e in exc.exceptions if not isinstance(e, trio.Cancelled)]
        exc = (leaves or list(exc.exceptions))[0]
    return exc


async def run_concurrently(thunks: list[Callable[[], Awaitable[object]]]) -> None:
    """Await every thunk concurrently; if any fails, cancel the rest and raise its error."""
    if len(thunks) == 1:
        await thunks[0]()
        return
    try:
        async with trio.open_nursery() as nursery:
            for thunk in thunks:
                nursery.start_soon(thunk)
    except BaseExceptionGroup as group:
        raise unwrap_group(group) from None
