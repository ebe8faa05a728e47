"""The loop device's read-ahead a mount gets (``mount.choose_read_ahead_kb``)."""

from __future__ import annotations

import pytest

from overlaybd_py.errors import UsageError
from overlaybd_py.mount import LEAN_READAHEAD_KB, READAHEAD_KB, choose_read_ahead_kb


def test_defaults_follow_the_kind_of_mount():
    assert choose_read_ahead_kb(None, planned=False) == READAHEAD_KB == 2048
    assert choose_read_ahead_kb(None, planned=True) == LEAN_READAHEAD_KB == 128


@pytest.mark.parametrize("asked", [0, 4, 1024, 65536])
def test_an_asked_value_wins(asked):
    assert choose_read_ahead_kb(asked, planned=True) == asked
    assert choose_read_ahead_kb(asked, planned=False) == asked


@pytest.mark.parametrize("bad", [-1, 2, 65537, 65540, True, "128", 1.5])
def test_bad_values_are_refused_by_name(bad):
    with pytest.raises(UsageError, match=r"read-ahead must be a multiple of 4 KiB .*"
                                         + repr(bad).replace(".", r"\.")):
        choose_read_ahead_kb(bad, planned=False)
