"""Faults between our client and a real registry (a scheduling TCP proxy): resets, 503s,
truncated and delayed answers, stalls, corrupted bytes, uploads cut mid-body. Range reads
return exact bytes or fail with a clear error once the retry deadline is spent."""

from __future__ import annotations

import pytest
import trio

from overlaybd_py.errors import DigestMismatchError, TransientError
from overlaybd_py.formats.oci import OCI_LAYER
from overlaybd_py.registry import HttpBlobSource, Reference, RetryPolicy
from tests.component._registry_helpers import publish, unique_repo, with_client
from tests.fixtures.faultproxy import FaultProxy
from tests.fixtures.oci_layout import random_bytes, tar_layer

pytestmark = pytest.mark.allow_log_warnings  # retries log louder as they accumulate


@pytest.fixture(scope="module")
def published(registry, tmp_path_factory):
    repo = unique_repo("faults")
    layer = tar_layer({"data": random_bytes(3_000_000, 21)})
    image = publish(registry, repo, tmp_path_factory.mktemp("faults") / "layout", [layer])
    return repo, image, layer


@pytest.fixture
def proxy(registry):
    with FaultProxy(registry.host) as p:
        yield p


def _ref(proxy, repo, **kw):
    return Reference.parse(f"{proxy.host}/{repo}:v1", **kw)


async def _parallel_reads(client, ref, layer, digest, ranges, schedule=None, proxy=None):
    source = await HttpBlobSource.open(client, ref, digest)
    if proxy is not None:  # faults start after the HEAD, so they hit the reads
        proxy.set_schedule(schedule)
    results = {}

    async def one(i, offset, length):
        results[i] = await source.read_at(offset, length)

    async with trio.open_nursery() as nursery:
        for i, (offset, length) in enumerate(ranges):
            nursery.start_soon(one, i, offset, length)
    for i, (offset, length) in enumerate(ranges):
        assert results[i] == layer[offset : offset + length], f"range {i} differs"


PATIENT = RetryPolicy(deadline=30, max_attempts=30, base_delay=0.01, max_delay=0.1)
RANGES = [
    (0, 4096),
    (1_000_000, 1 << 20),
    (2_999_000, 1000),
    (12_345, 65536),
    (500_000, 4096),
    (1_900_000, 1 << 20),
    (7, 1),
    (1_500_000, 300_000),
]


@pytest.mark.parametrize(
    "fault", ["reset", "503", "truncate:150", "truncate:5000", "delay:0.3", "mixed"]
)
def test_range_reads_survive_faults(proxy, published, fault):
    repo, image, layer = published
    digest = image.manifest_json["layers"][0]["digest"]
    if fault == "mixed":
        schedule = ["reset", "503", "truncate:5000", "delay:0.2", "truncate:150", "503"] * 2
    else:
        schedule = [fault] * 10
    with_client(
        lambda c: _parallel_reads(c, _ref(proxy, repo), layer, digest, RANGES, schedule, proxy),
        retry=PATIENT,
    )
    taken = [a for a in proxy.actions_taken if a != "pass"]
    # The faults really happened: every new connection took one (one read reuses the
    # connection of the HEAD that opened the source).
    assert len(taken) >= min(len(schedule), len(RANGES) - 1)


def test_stalled_answer_times_out_and_is_retried(proxy, published):
    repo, image, layer = published
    digest = image.manifest_json["layers"][0]["digest"]
    with_client(
        lambda c: _parallel_reads(
            c, _ref(proxy, repo), layer, digest, RANGES[:3], ["stall", "stall"], proxy
        ),
        read_timeout=0.5,
    )
    assert proxy.actions_taken[:2] == ["stall", "stall"]


@pytest.mark.parametrize("fault", ["503", "reset"])
def test_persistent_failure_gives_up_at_the_deadline(proxy, published, fault):
    repo, image, _ = published
    digest = image.manifest_json["layers"][0]["digest"]
    proxy.set_schedule([], default=fault)
    policy = RetryPolicy(deadline=1.5, max_attempts=1000, base_delay=0.05, max_delay=0.2)

    async def body(client):
        start = trio.current_time()
        with pytest.raises(TransientError) as info:
            await client.read_blob_range(_ref(proxy, repo), digest, 0, 4096)
        return info.value, trio.current_time() - start

    error, elapsed = with_client(body, retry=policy)
    assert "giving up after" in str(error) and digest in str(error)
    assert len(proxy.actions_taken) > 3
    assert elapsed >= 1.0  # it kept trying for most of the deadline before giving up


def test_corrupted_manifest_is_refused(proxy, published):
    repo, image, _ = published
    by_digest = _ref(proxy, repo).with_digest(image.digest)

    async def body(client):
        proxy.set_schedule(["corrupt:40"])
        with pytest.raises(DigestMismatchError, match="hashes to"):
            await client.get_manifest(by_digest)
        proxy.set_schedule(["corrupt:40"])
        await client.aclose()  # a fresh connection, so the fault hits the next answer

    with_client(body)

    async def by_tag(client):
        proxy.set_schedule(["corrupt:40"])
        with pytest.raises(DigestMismatchError, match="registry says"):
            await client.get_manifest(_ref(proxy, repo))
        # A clean connection reads it fine afterwards.
        return await client.get_manifest(_ref(proxy, repo))

    assert with_client(by_tag, max_parallel=1).descriptor.digest == image.digest


def test_corrupted_blob_is_refused(proxy, published):
    repo, image, _ = published
    config = image.manifest_json["config"]
    proxy.set_schedule(["corrupt:3"])

    async def body(client):
        with pytest.raises(DigestMismatchError):
            await client.get_blob(_ref(proxy, repo), config["digest"])

    with_client(body)


def test_chunked_upload_resumes_after_a_cut(proxy, registry):
    repo = unique_repo("upload-cut")
    data = random_bytes(3_500_000, 31)
    # The first connection dies 1.5 MB into what the client sends: inside the second chunk.
    proxy.set_schedule(["cut:1500000"])

    async def body(client):
        ref = _ref(proxy, repo)
        pushed = await client.push_blob(ref, data, media_type=OCI_LAYER, chunk_size=1 << 20)
        return pushed, await client.get_blob(ref, pushed.digest)

    pushed, read_back = with_client(body)
    assert read_back == data and pushed.size == len(data)
    assert proxy.actions_taken[0] == "cut:1500000"
    session = [
        r["http.request.method"]
        for r in registry.responses()
        if "/blobs/uploads/" in r["http.request.uri"] and repo in r["http.request.uri"]
    ]
    # The client asked where the session stood; distribution cannot resume a session whose
    # PATCH died mid-body (its _state no longer matches), so the client started a new one.
    assert session[:2] == ["POST", "PATCH"]
    assert "GET" in session and session.count("POST") == 2 and session[-1] == "PUT"
