"""registry.client protocol decisions against httpx.MockTransport: verification, ranges,
redirects, mirrors, retries, parallelism bound, uploads."""

from __future__ import annotations

import hashlib
import json
import re

import httpx
import pytest
import trio

from overlaybd_py.errors import (
    AuthError,
    DigestMismatchError,
    NotFoundError,
    RegistryError,
    TransientError,
)
from overlaybd_py.formats.oci import OCI_MANIFEST, Descriptor, Manifest, sha256_digest
from overlaybd_py.registry import (
    ClientConfig,
    Credentials,
    EnvProxies,
    HttpBlobSource,
    Reference,
    RegistryClient,
    RetryPolicy,
)
from overlaybd_py.registry.client import _make_transport

BLOB = bytes(range(256)) * 64  # 16 KiB
BLOB_DIGEST = sha256_digest(BLOB)
REF = Reference.parse("reg.test/app/img:v1")
FAST = RetryPolicy(deadline=2, base_delay=0.001, max_delay=0.01)
MANIFEST = json.dumps(
    {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": BLOB_DIGEST,
            "size": len(BLOB),
        },
        "layers": [],
    }
).encode()
MANIFEST_DIGEST = sha256_digest(MANIFEST)


def run(handler, body, **config):
    """Run ``body(client)`` under trio with a client whose transport is ``handler``."""
    config.setdefault("retry", FAST)

    async def main():
        cfg = ClientConfig(transport=httpx.MockTransport(handler), **config)
        async with await RegistryClient.open(cfg) as client:
            return await body(client)

    return trio.run(main)


def range_server(blob=BLOB, *, honour_range=True, log=None):
    def handler(request):
        if log is not None:
            log.append(request)
        if request.method == "HEAD":
            return httpx.Response(200, headers={"Content-Length": str(len(blob))})
        m = re.fullmatch(r"bytes=(\d+)-(\d+)", request.headers.get("range", ""))
        if m and honour_range:
            a, b = int(m[1]), int(m[2])
            return httpx.Response(
                206,
                content=blob[a : b + 1],
                headers={"Content-Range": f"bytes {a}-{b}/{len(blob)}"},
            )
        return httpx.Response(200, content=blob)

    return handler


# ---- manifests ----


def manifest_server(body, *, announced=None):
    def handler(request):
        headers = {"Content-Type": OCI_MANIFEST}
        if announced:
            headers["Docker-Content-Digest"] = announced
        return httpx.Response(200, content=body, headers=headers)

    return handler


def test_manifest_verified_by_digest_and_by_tag():
    fetched = run(
        manifest_server(MANIFEST, announced=MANIFEST_DIGEST),
        lambda c: c.get_manifest(REF.with_digest(MANIFEST_DIGEST)),
    )
    assert fetched.descriptor == Descriptor(OCI_MANIFEST, MANIFEST_DIGEST, len(MANIFEST))
    assert isinstance(fetched.parsed, Manifest) and fetched.content == MANIFEST
    by_tag = run(manifest_server(MANIFEST), lambda c: c.get_manifest(REF))
    assert by_tag.reference.digest == MANIFEST_DIGEST and by_tag.reference.tag == "v1"


def test_manifest_with_wrong_bytes_is_refused():
    tampered = MANIFEST.replace(b'"layers"', b'"layers" ')
    with pytest.raises(DigestMismatchError, match="hashes to"):
        run(manifest_server(tampered), lambda c: c.get_manifest(REF.with_digest(MANIFEST_DIGEST)))
    with pytest.raises(DigestMismatchError, match="registry says"):
        run(manifest_server(tampered, announced=MANIFEST_DIGEST), lambda c: c.get_manifest(REF))


def test_blob_with_wrong_bytes_is_refused():
    def handler(request):
        return httpx.Response(200, content=BLOB[:-1] + b"x")

    with pytest.raises(DigestMismatchError):
        run(handler, lambda c: c.get_blob(REF, BLOB_DIGEST))


def test_status_mapping():
    def handler(request):
        if "missing" in request.url.path:
            return httpx.Response(
                404, json={"errors": [{"code": "MANIFEST_UNKNOWN", "message": "manifest unknown"}]}
            )
        if "teapot" in request.url.path:
            return httpx.Response(418)
        return httpx.Response(403, json={"errors": [{"code": "DENIED", "message": "no"}]})

    with pytest.raises(NotFoundError, match="MANIFEST_UNKNOWN: manifest unknown"):
        run(handler, lambda c: c.get_manifest(Reference.parse("reg.test/missing:v1")))
    with pytest.raises(AuthError, match="DENIED"):
        run(handler, lambda c: c.get_manifest(REF))
    with pytest.raises(RegistryError, match="HTTP 418"):
        run(handler, lambda c: c.get_manifest(Reference.parse("reg.test/teapot:v1")))


def test_oversized_manifest_refused():
    def handler(request):
        return httpx.Response(200, content=b" " * (4 * 1024 * 1024 + 1))

    with pytest.raises(RegistryError, match="allowed"):
        run(handler, lambda c: c.get_manifest(REF))


# ---- ranges ----


@pytest.mark.parametrize("honour_range", [True, False])
def test_range_reads_are_exact(honour_range):
    async def body(client):
        source = await HttpBlobSource.open(client, REF, BLOB_DIGEST)
        assert source.size == len(BLOB)
        out = []
        for offset, length in [(0, 1), (1000, 4096), (len(BLOB) - 10, 10), (5, 0)]:
            out.append((offset, length, await source.read_at(offset, length)))
        with pytest.raises(ValueError):
            await source.read_at(len(BLOB) - 1, 2)
        return out, source.statistics()

    results, stats = run(range_server(honour_range=honour_range), body)
    for offset, length, data in results:
        assert data == BLOB[offset : offset + length]
    assert stats.reads == 4 and stats.bytes_read == 1 + 4096 + 10  # the empty read counts


def test_whole_body_of_the_wrong_size_is_refused():
    handler = range_server(BLOB + b"extra", honour_range=False)
    with pytest.raises(DigestMismatchError, match="byte body"):
        run(handler, lambda c: c.read_blob_range(REF, BLOB_DIGEST, 10, 10, blob_size=len(BLOB)))


@pytest.mark.parametrize("content_range", ["bytes 11-20/16384", "bytes 10-19/99", "", "bytes */1"])
def test_wrong_content_range_is_refused(content_range):
    def handler(request):
        return httpx.Response(206, content=BLOB[10:20], headers={"Content-Range": content_range})

    with pytest.raises(RegistryError):
        run(handler, lambda c: c.read_blob_range(REF, BLOB_DIGEST, 10, 10, blob_size=len(BLOB)))


@pytest.mark.allow_log_warnings
def test_short_body_is_an_error_never_short_data():
    def handler(request):  # honest headers, but the last range byte never comes
        return httpx.Response(
            206, content=BLOB[10:19], headers={"Content-Range": "bytes 10-19/16384"}
        )

    with pytest.raises(TransientError, match="short body"):
        run(handler, lambda c: c.read_blob_range(REF, BLOB_DIGEST, 10, 10, blob_size=len(BLOB)))


def test_redirect_keeps_range_and_drops_authorization_across_hosts():
    seen = []

    def handler(request):
        seen.append((request.url.host, dict(request.headers)))
        if request.url.host == "reg.test":
            if "authorization" not in request.headers:
                return httpx.Response(401, headers={"WWW-Authenticate": 'Basic realm="r"'})
            return httpx.Response(307, headers={"Location": "https://storage.test/b?sig=abc"})
        return range_server()(request)

    data = run(
        handler,
        lambda c: c.read_blob_range(REF, BLOB_DIGEST, 100, 50),
        default_credentials=Credentials("u", "p"),
    )
    assert data == BLOB[100:150]
    storage = [h for host, h in seen if host == "storage.test"]
    assert storage and all("authorization" not in h for h in storage)
    assert all(h["range"] == "bytes=100-149" for h in storage)
    assert seen[-2][1]["authorization"].startswith("Basic ")


@pytest.mark.allow_log_warnings
def test_429_retry_after_then_success():
    calls = []

    def handler(request):
        calls.append(trio.current_time())
        if len(calls) < 3:
            return httpx.Response(429, headers={"Retry-After": "0"})
        return range_server()(request)

    assert run(handler, lambda c: c.read_blob_range(REF, BLOB_DIGEST, 0, 5)) == BLOB[:5]
    assert len(calls) == 3


def test_parallel_requests_are_bounded_and_connections_shared():
    state = {"now": 0, "max": 0}

    async def handler(request):
        state["now"] += 1
        state["max"] = max(state["max"], state["now"])
        await trio.sleep(0.01)
        state["now"] -= 1
        return range_server()(request)

    async def body(client):
        source = HttpBlobSource(client, REF, BLOB_DIGEST, len(BLOB))
        results = {}

        async def one(i):
            results[i] = await source.read_at(i * 100, 100)

        async with trio.open_nursery() as nursery:
            for i in range(40):
                nursery.start_soon(one, i)
        return results

    results = run(handler, body, max_parallel=4)
    assert all(results[i] == BLOB[i * 100 : i * 100 + 100] for i in range(40))
    assert state["max"] == 4


# ---- mirrors ----


def mirror_world(mirror_behaviour):
    log = []

    def handler(request):
        log.append(request)
        if request.url.host == "mirror.test":
            if mirror_behaviour == "404":
                return httpx.Response(404)
            if mirror_behaviour == "500":
                return httpx.Response(500)
            if mirror_behaviour == "reset":
                raise httpx.ReadError("connection reset", request=request)
            if mirror_behaviour == "cold":
                return range_server(honour_range=False)(request)
            if mirror_behaviour == "wrong":
                return httpx.Response(200, content=MANIFEST + b" ")
        return (
            range_server()(request)
            if "/blobs/" in request.url.path
            else manifest_server(MANIFEST)(request)
        )

    return handler, log


@pytest.mark.parametrize("behaviour", ["404", "500", "reset", "cold", "wrong"])
def test_mirror_then_origin(behaviour):
    handler, log = mirror_world(behaviour)

    async def body(client):
        data = await client.read_blob_range(REF, BLOB_DIGEST, 7, 9, blob_size=len(BLOB))
        manifest = await client.get_manifest(REF.with_digest(MANIFEST_DIGEST))
        return data, manifest, client.statistics()

    data, manifest, stats = run(
        handler,
        body,
        mirrors={"reg.test": ["http://mirror.test"]},
        default_credentials=Credentials("u", "secret"),
    )
    assert data == BLOB[7:16] and manifest.content == MANIFEST
    hosts = [r.url.host for r in log]
    assert hosts[0] == "mirror.test"
    if behaviour == "cold":
        assert "reg.test" not in hosts[:1] and hosts.count("mirror.test") == 2
    # Explicit credentials belong to the origin, never to a mirror.
    assert all("authorization" not in r.headers for r in log if r.url.host == "mirror.test")
    if behaviour in ("500", "reset"):  # a failing mirror rests; the manifest skipped it
        assert hosts.count("mirror.test") == 1
        assert stats.mirror_fallbacks == 1


def test_pushes_never_go_to_mirrors():
    log = []

    def push_handler(request):
        log.append(request)
        return httpx.Response(201, headers={"Docker-Content-Digest": MANIFEST_DIGEST})

    run(
        push_handler,
        lambda c: c.push_manifest(REF, MANIFEST, OCI_MANIFEST),
        mirrors={"reg.test": ["http://mirror.test"]},
    )
    assert [r.url.host for r in log] == ["reg.test"]
    assert log[0].url.path == "/v2/app/img/manifests/v1"


# ---- uploads ----


class UploadServer:
    """Enough of the upload protocol to check what the client sends and in which order."""

    def __init__(self, *, fail_patch_once=False, mount_ok=False, present=False):
        self.fail_patch_once = fail_patch_once
        self.mount_ok = mount_ok
        self.present = present
        self.data = bytearray()
        self.log = []

    def __call__(self, request):
        path = request.url.path
        query = request.url.query.decode()
        self.log.append(f"{request.method} {path}{'?' + query if query else ''}")
        if request.method == "HEAD":
            return httpx.Response(
                200 if self.present else 404, headers={"Content-Length": str(len(self.data))}
            )
        if request.method == "POST":
            if self.mount_ok and "mount" in request.url.params:
                return httpx.Response(
                    201, headers={"Docker-Content-Digest": request.url.params["mount"]}
                )
            return httpx.Response(
                202, headers={"Location": "/v2/app/img/blobs/uploads/u1?_state=s"}
            )
        if request.method == "PATCH":
            start, _ = map(int, request.headers["content-range"].split("-"))
            assert start == len(self.data)
            body = request.content
            if self.fail_patch_once:
                self.fail_patch_once = False
                self.data += body[: len(body) // 2]  # half arrived before the reset
                raise httpx.RemoteProtocolError("peer closed", request=request)
            self.data += body
            return httpx.Response(
                202,
                headers={
                    "Location": "/v2/app/img/blobs/uploads/u1?_state=t",
                    "Range": f"0-{len(self.data) - 1}",
                },
            )
        if request.method == "GET":
            return httpx.Response(
                204,
                headers={
                    "Range": f"0-{len(self.data) - 1}",
                    "Location": "/v2/app/img/blobs/uploads/u1?_state=r",
                },
            )
        if request.method == "PUT":
            self.data += request.content
            digest = "sha256:" + hashlib.sha256(self.data).hexdigest()
            if request.url.params["digest"] != digest:
                return httpx.Response(400, json={"errors": [{"code": "DIGEST_INVALID"}]})
            return httpx.Response(201, headers={"Docker-Content-Digest": digest})
        raise AssertionError(request)


def test_monolithic_upload():
    server = UploadServer()
    desc = run(server, lambda c: c.push_blob(REF, BLOB))
    assert desc == Descriptor("application/octet-stream", BLOB_DIGEST, len(BLOB))
    assert bytes(server.data) == BLOB
    assert server.log == [
        f"HEAD /v2/app/img/blobs/{BLOB_DIGEST}",
        "POST /v2/app/img/blobs/uploads/",
        f"PUT /v2/app/img/blobs/uploads/u1?_state=s&digest={BLOB_DIGEST.replace(':', '%3A')}",
    ]


def test_upload_skipped_when_present_and_mount():
    server = UploadServer(present=True)
    server.data += BLOB
    run(server, lambda c: c.push_blob(REF, BLOB))
    assert server.log == [f"HEAD /v2/app/img/blobs/{BLOB_DIGEST}"]
    mounter = UploadServer(mount_ok=True)
    run(mounter, lambda c: c.push_blob(REF, BLOB, mount_from=Reference.parse("reg.test/other")))
    assert (
        mounter.log[1]
        == f"POST /v2/app/img/blobs/uploads/?mount={BLOB_DIGEST.replace(':', '%3A')}&from=other"
    )
    assert len(mounter.log) == 2


def test_chunked_upload_resumes_where_the_registry_stopped(caplog):
    server = UploadServer(fail_patch_once=True)
    run(server, lambda c: c.push_blob(REF, BLOB, chunk_size=5000))
    assert bytes(server.data) == BLOB
    methods = [line.split()[0] for line in server.log]
    assert methods[:4] == ["HEAD", "POST", "PATCH", "GET"]  # failed chunk, then status
    assert methods[-1] == "PUT"


def test_upload_from_file(tmp_path):
    path = tmp_path / "layer.tar"
    path.write_bytes(BLOB)
    server = UploadServer()
    desc = run(server, lambda c: c.push_blob(REF, path, chunk_size=4096))
    assert desc.digest == BLOB_DIGEST and bytes(server.data) == BLOB


def test_transport_sets_tcp_nodelay():
    import socket
    import ssl

    for flag in (True, False):
        transport = _make_transport(ClientConfig(tcp_nodelay=flag), EnvProxies(),
                                    ssl.create_default_context())
        options = transport._pool._socket_options
        assert (socket.IPPROTO_TCP, socket.TCP_NODELAY, int(flag)) in options


def test_a_416_naming_another_blob_size_is_a_size_mismatch():
    """A range inside the size the manifest gives, refused because the blob is shorter: the
    message names both sizes (the open's tail fetch is often the first to find out)."""
    from overlaybd_py.errors import DigestMismatchError
    from overlaybd_py.registry._http import check_unsatisfiable

    with pytest.raises(DigestMismatchError, match="blob of 1000 bytes, expected 5000"):
        check_unsatisfiable(416, {"content-range": "bytes */1000"}, 5000, "blob x range")
    check_unsatisfiable(416, {"content-range": "bytes */5000"}, 5000, "same size: not ours")
    check_unsatisfiable(416, {}, 5000, "no header")
    check_unsatisfiable(404, {"content-range": "bytes */1000"}, 5000, "not a 416")
    check_unsatisfiable(416, {"content-range": "bytes */1000"}, None, "size unknown")
