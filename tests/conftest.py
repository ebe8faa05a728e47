"""Shared fixtures: accelerator backends, log checking, capability markers."""

from __future__ import annotations

import logging

import pytest
from hypothesis import HealthCheck, settings

from overlaybd_py import _accel

# The accel fixture swaps module functions once per test; it needs no reset between
# hypothesis examples, so function-scoped fixtures are fine here.
settings.register_profile(
    "overlaybd", suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None
)
settings.load_profile("overlaybd")


def _native_available() -> bool:
    try:
        _accel.backend_module("native")
    except ImportError:
        return False
    return True


@pytest.fixture(params=["pure", "native"])
def accel(request, monkeypatch):
    """Run a test once per accelerator backend, swapping the functions `_accel` exports."""
    from tests.fixtures.system import need

    name = request.param
    if name == "native":
        need(_native_available(), "native extension not built (needs gcc, liblz4-dev, libzstd-dev)")
    module = _accel.backend_module(name)
    for attr in _accel.__all__:
        if attr in ("BACKEND", "FEATURES", "INVALID_OFFSET", "backend_module"):
            continue
        monkeypatch.setattr(_accel, attr, getattr(module, attr))
    monkeypatch.setattr(_accel, "BACKEND", name)
    return module


class _LogChecker(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(autouse=True)
def checklogs(request):
    """Fail any test that logs an unexpected WARNING or ERROR from overlaybd_py.

    A test that expects warnings marks itself ``@pytest.mark.allow_log_warnings``.
    """
    handler = _LogChecker()
    logger = logging.getLogger("overlaybd_py")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
    if request.node.get_closest_marker("allow_log_warnings"):
        return
    bad = [r for r in handler.records if r.name.startswith("overlaybd_py")]
    if bad:
        lines = "\n".join(f"{r.levelname} {r.name}: {r.getMessage()}" for r in bad[:10])
        pytest.fail(f"unexpected warnings/errors were logged:\n{lines}")
