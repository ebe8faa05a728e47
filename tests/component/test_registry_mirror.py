"""Mirrors: a pull-through docker-registry in front of the origin, a mirror that is down, and a
mirror that lacks the content. Reads must return the origin's exact bytes in every case."""

from __future__ import annotations

import itertools

import pytest

from overlaybd_py.registry import HttpBlobSource, Reference
from tests.component._registry_helpers import publish, unique_repo, with_client
from tests.fixtures.oci_layout import random_bytes, tar_layer
from tests.fixtures.registry import RegistryServer, free_port

_seeds = itertools.count(1100)


@pytest.fixture(scope="module")
def empty_registry(tmp_path_factory):
    """A plain registry holding nothing: a mirror that lacks every image."""
    with RegistryServer(tmp_path_factory.mktemp("empty-mirror")) as server:
        yield server


def _image(registry, tmp_path, prefix):
    repo = unique_repo(prefix)
    layer = tar_layer({"data": random_bytes(2_000_000, next(_seeds))})  # cold for each test
    image = publish(registry, repo, tmp_path / "layout", [layer])
    return Reference.parse(f"{registry.host}/{repo}:v1"), image, layer


async def _read_some(client, ref, image, layer):
    fetched = await client.get_manifest(ref)
    assert fetched.descriptor.digest == image.digest
    source = await HttpBlobSource.open(client, ref, fetched.parsed.layers[0])
    checks = [(1_000_000, 4096), (0, 100), (len(layer) - 4096, 4096), (123_456, 1 << 20)]
    for offset, length in checks:
        assert await source.read_at(offset, length) == layer[offset : offset + length]
    return client.statistics()


def test_cold_pull_through_mirror_answers_range_with_whole_blob(
    registry, registry_mirror, tmp_path
):
    ref, image, layer = _image(registry, tmp_path, "mirror")
    digest = image.manifest_json["layers"][0]["digest"]
    mirror_mark, origin_mark = registry_mirror.log_mark(), registry.log_mark()

    async def body(client):
        # First a range read with no HEAD before it: distribution's proxy starts caching a
        # blob on a HEAD too, which would race with this read.
        size = len(layer)
        first = await client.read_blob_range(ref, digest, 1_000_000, 4096, blob_size=size)
        assert first == layer[1_000_000:1_004_096]
        return await _read_some(client, ref, image, layer)

    stats = with_client(body, mirrors={registry.host: [registry_mirror.url]})
    assert stats.mirror_fallbacks == 0  # the mirror answered everything
    # Cold: the mirror ignored Range and sent the blob from its start (distribution's proxy
    # streams from upstream); the bytes were right anyway (checked above): we skipped to
    # the offset instead of taking the start.
    assert stats.ranges_ignored >= 1
    assert any(digest in r["http.request.uri"] for r in registry_mirror.blob_requests(mirror_mark))
    # The origin saw no range read from us: only the mirror's own fetches of the blob.
    origin_reads = [
        r
        for r in registry.blob_requests(origin_mark)
        if "overlaybd-py" in r.get("http.request.useragent", "")
    ]
    assert origin_reads == []


def test_mirror_down_falls_back_to_origin(registry, tmp_path):
    ref, image, layer = _image(registry, tmp_path, "mirror-down")
    dead = f"http://127.0.0.1:{free_port()}"
    mark = registry.log_mark()
    stats = with_client(lambda c: _read_some(c, ref, image, layer), mirrors={registry.host: [dead]})
    # The dead mirror is tried once, then rests (cool-down) while the origin serves.
    assert stats.mirror_fallbacks == 1
    assert registry.blob_bytes_served(since=mark) >= 4096 * 2 + 100 + (1 << 20)


def test_mirror_lacking_content_falls_back_to_origin(registry, empty_registry, tmp_path):
    ref, image, layer = _image(registry, tmp_path, "mirror-empty")
    mark = empty_registry.log_mark()
    stats = with_client(
        lambda c: _read_some(c, ref, image, layer), mirrors={registry.host: [empty_registry.url]}
    )
    misses = [r for r in empty_registry.responses(mark) if r["http.response.status"] == 404]
    assert misses and stats.mirror_fallbacks == len(misses)


def test_mirrors_in_order(registry, registry_mirror, empty_registry, tmp_path):
    ref, image, layer = _image(registry, tmp_path, "mirror-order")
    empty_mark, mirror_mark = empty_registry.log_mark(), registry_mirror.log_mark()
    with_client(
        lambda c: _read_some(c, ref, image, layer),
        mirrors={registry.host: [empty_registry.url, registry_mirror.url]},
    )
    assert empty_registry.responses(empty_mark)  # asked first
    assert registry_mirror.blob_bytes_served(since=mirror_mark) > 0  # then served


def test_mirror_serves_a_registry_that_is_unreachable(registry, registry_mirror, tmp_path):
    """Mirrors are keyed by registry name: reads of ``origin.invalid`` go to its mirror only."""
    ref, image, layer = _image(registry, tmp_path, "mirror-only")
    elsewhere = Reference.parse(f"origin.invalid:5000/{ref.repository}:v1")
    stats = with_client(
        lambda c: _read_some(c, elsewhere, image, layer),
        mirrors={"origin.invalid:5000": [registry_mirror.url]},
    )
    assert stats.mirror_fallbacks == 0
