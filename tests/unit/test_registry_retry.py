"""registry.retry: what is retried, how long it waits, when it gives up (virtual trio clock)."""

from __future__ import annotations

import httpx
import pytest
import trio
import trio.testing

from overlaybd_py.errors import NotFoundError, TransientError
from overlaybd_py.registry.retry import RetryPolicy, is_transient, retry


def _run(fn):
    return trio.run(fn, clock=trio.testing.MockClock(autojump_threshold=0))


class Flaky:
    def __init__(self, failures, result="ok"):
        self.failures = list(failures)
        self.calls = []
        self.result = result

    async def __call__(self):
        self.calls.append(trio.current_time())
        if self.failures:
            raise self.failures.pop(0)
        return self.result


def test_is_transient():
    assert is_transient(TransientError("x"))
    assert is_transient(httpx.ReadError("reset"))
    assert is_transient(httpx.RemoteProtocolError("incomplete"))
    assert not is_transient(httpx.UnsupportedProtocol("ftp"))
    assert not is_transient(NotFoundError("x"))
    assert not is_transient(ValueError())


@pytest.mark.allow_log_warnings
def test_retries_until_success():
    op = Flaky([TransientError("a"), httpx.ConnectError("b"), TransientError("c")])

    async def main():
        return await retry(op, policy=RetryPolicy(base_delay=0.5, max_delay=1), what="op")

    assert _run(main) == "ok"
    assert len(op.calls) == 4
    gaps = [b - a for a, b in zip(op.calls, op.calls[1:], strict=False)]
    assert all(0 <= g <= 1.0 for g in gaps)


def test_non_transient_is_raised_at_once():
    op = Flaky([NotFoundError("gone")])

    async def main():
        await retry(op, policy=RetryPolicy(), what="op")

    with pytest.raises(NotFoundError):
        _run(main)
    assert len(op.calls) == 1


def test_retry_after_is_honoured():
    op = Flaky([TransientError("busy", retry_after=7)])

    async def main():
        return await retry(op, policy=RetryPolicy(base_delay=0.01), what="op")

    _run(main)
    assert op.calls[1] - op.calls[0] >= 7


def test_too_long_retry_after_gives_up():
    op = Flaky([TransientError("busy", retry_after=3600)])

    async def main():
        await retry(op, policy=RetryPolicy(max_retry_after=30), what="fetch thing")

    with pytest.raises(TransientError, match="asked to wait 3600s"):
        _run(main)
    assert len(op.calls) == 1


@pytest.mark.allow_log_warnings
def test_deadline_bounds_the_whole_operation():
    op = Flaky([TransientError(f"fail {i}", status=503) for i in range(1000)])

    async def main():
        await retry(
            op,
            policy=RetryPolicy(deadline=10, max_attempts=1000, base_delay=1, max_delay=2),
            what="GET blob",
        )

    with pytest.raises(TransientError) as info:
        _run(main)
    message = str(info.value)
    assert message.startswith("GET blob: giving up after")
    assert info.value.status == 503
    assert isinstance(info.value.__cause__, TransientError)
    assert op.calls[-1] <= 10
    assert len(op.calls) > 5


def test_max_attempts():
    op = Flaky([TransientError("x")] * 5)

    async def main():
        await retry(op, policy=RetryPolicy(max_attempts=2, base_delay=0), what="op")

    with pytest.raises(TransientError, match="after 2 attempts"):
        _run(main)


def test_louder_as_attempts_accumulate(caplog):
    caplog.set_level("DEBUG", logger="overlaybd_py")
    op = Flaky([TransientError("x")] * 2)

    async def main():
        await retry(op, policy=RetryPolicy(base_delay=0), what="op")

    _run(main)
    assert [r.levelname for r in caplog.records] == ["DEBUG", "INFO"]


def test_policy_validation():
    with pytest.raises(ValueError):
        RetryPolicy(deadline=0)
    for attempt in range(1, 30):
        assert 0 <= RetryPolicy(base_delay=0.1, max_delay=2).backoff(attempt) <= 2
