"""Converter options checked before any work, and the converted-layer cache key."""

from __future__ import annotations

import pytest

from overlaybd_py.convert.converter import ConvertOptions
from overlaybd_py.convert.layer_cache import cache_key
from overlaybd_py.engine.layer_files import commit_layer
from overlaybd_py.errors import UsageError

CHAIN = "sha256:" + "cd" * 32


@pytest.mark.parametrize("algorithm, level", [("lz4", 13), ("zstd", 23), ("zstd", -1)])
def test_a_level_the_codec_has_not_is_refused_up_front(algorithm, level):
    with pytest.raises(UsageError, match=f"{algorithm} compression level must be 0-"):
        ConvertOptions(algorithm=algorithm, level=level)


@pytest.mark.parametrize("options, match", [
    (dict(algorithm="brotli"), "unknown compression algorithm 'brotli'"),
    (dict(level=5.0), "must be an integer"),
    (dict(level=True), "must be an integer"),
])
def test_other_bad_compression_options_are_usage_errors(options, match):
    with pytest.raises(UsageError, match=match):
        ConvertOptions(**options)


def test_a_level_without_an_algorithm_is_refused_by_commit():
    with pytest.raises(UsageError, match="needs a compression algorithm"):
        commit_layer("/nonexistent/data", "/nonexistent/index", "/nonexistent/out", level=5)


def test_the_level_is_part_of_the_cache_key_but_not_at_the_default():
    def key(**kw):
        return cache_key(CHAIN, algorithm="zstd", chunk_size=65536, vsize=64 << 30, **kw)

    # Layers converted before levels existed keep their key.
    assert key() == key(level=0)
    assert key(level=9) != key() and key(level=9) != key(level=19)


def test_the_layout_is_part_of_the_cache_key_but_not_for_tar_order():
    def key(**kw):
        return cache_key(CHAIN, algorithm="lz4", chunk_size=4096, vsize=64 << 30, **kw)

    # Layers converted before layouts existed were in tar order: they keep their key.
    assert key() == key(layout="tar")
    assert key(layout="cold-last") != key()


def test_an_unknown_layout_is_refused_up_front():
    assert ConvertOptions().layout == "cold-last"
    with pytest.raises(UsageError, match="convert: unknown layout 'sorted': use one of "
                                         "cold-last, tar"):
        ConvertOptions(layout="sorted")
