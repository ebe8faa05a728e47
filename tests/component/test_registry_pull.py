"""Our client reads what skopeo pushed, from real docker-registry servers in three auth set-ups."""

from __future__ import annotations

import contextlib
import json
import random
import socket
import stat
import threading

import pytest
import trio

from overlaybd_py.errors import AuthError, NotFoundError
from overlaybd_py.formats.oci import Index, Manifest, Platform
from overlaybd_py.registry import ClientConfig, HttpBlobSource, Reference, RegistryClient
from tests.component._registry_helpers import CREDS, publish, unique_repo, with_client
from tests.fixtures.oci_layout import add_image, add_index, random_bytes, skopeo_copy, tar_layer


def _layers():
    return [
        tar_layer({"big": random_bytes(3 * 1024 * 1024 + 123, 1)}),
        tar_layer({"small": b"hello overlaybd\n"}),
    ]


def _check_image(server, repo, image, creds=None):
    ref = Reference.parse(f"{server.host}/{repo}:v1")

    async def body(client):
        fetched = await client.get_manifest(ref)
        assert fetched.descriptor.digest == image.digest
        assert fetched.content == image.manifest
        assert isinstance(fetched.parsed, Manifest)
        config = await client.get_blob(ref, fetched.parsed.config)
        assert config == image.config
        head = await client.head_manifest(ref)
        assert head.digest == image.digest and head.size == len(image.manifest)
        big = fetched.parsed.layers[0]
        source = await HttpBlobSource.open(client, ref, big)
        rng = random.Random(7)
        layer = image.layers[0]
        for _ in range(30):
            length = rng.choice([1, 512, 4096, 65536, 1 << 20])
            offset = rng.randrange(0, len(layer) - length)
            assert await source.read_at(offset, length) == layer[offset : offset + length]
        assert await source.read_at(len(layer) - 5, 5) == layer[-5:]
        # The 1 MiB reads went the socket path (with whatever credentials the host takes).
        assert client.statistics().socket_ranges >= 1
        return source.statistics()

    return with_client(body, creds=creds)


def test_anonymous_registry(registry, tmp_path):
    repo = unique_repo("pull")
    image = publish(registry, repo, tmp_path / "layout", _layers())
    mark = registry.log_mark()
    stats = _check_image(registry, repo, image)
    # The registry's own log agrees with what we read: only the ranges, never whole layers.
    served = registry.blob_bytes_served(
        since=mark, digest=image.manifest_json["layers"][0]["digest"]
    )
    assert served == stats.bytes_read


def test_basic_auth_registry(registry_basic, tmp_path):
    repo = unique_repo("basic")
    image = publish(registry_basic, repo, tmp_path / "layout", _layers(), creds=CREDS)
    _check_image(registry_basic, repo, image, creds=CREDS)
    with pytest.raises(AuthError):
        _check_image(registry_basic, repo, image)
    with pytest.raises(AuthError) as info:
        _check_image(registry_basic, repo, image, creds=("testuser", "wrong-password-123"))
    assert "wrong-password-123" not in str(info.value)


def test_token_auth_registry(registry_token, token_server, tmp_path):
    repo = unique_repo("token")
    image = publish(registry_token, repo, tmp_path / "layout", _layers(), creds=CREDS)
    before = len(token_server.requests)
    _check_image(registry_token, repo, image, creds=CREDS)
    ours = token_server.requests[before:]
    # One token for the whole session of reads: cached per scope, sent up front after that.
    assert [r.scopes for r in ours] == [[f"repository:{repo}:pull"]]
    assert ours[0].user == "testuser" and ours[0].service == token_server.service
    with pytest.raises(AuthError, match="refused"):
        _check_image(registry_token, repo, image, creds=("testuser", "nope-nope"))


def test_token_refreshed_when_registry_rejects_it(registry_token, token_server, tmp_path):
    repo = unique_repo("token-refresh")
    image = publish(registry_token, repo, tmp_path / "layout", _layers(), creds=CREDS)
    ref = Reference.parse(f"{registry_token.host}/{repo}:v1")
    before = len(token_server.requests)
    token_server.issue_expired = 1  # the first token is already dead when it arrives

    async def body(client):
        return await client.get_manifest(ref)

    assert with_client(body, creds=CREDS).descriptor.digest == image.digest
    assert len(token_server.requests) - before == 2


def test_docker_config_credentials_and_helper(registry_basic, tmp_path, monkeypatch):
    repo = unique_repo("dockercfg")
    image = publish(registry_basic, repo, tmp_path / "layout", _layers()[1:], creds=CREDS)
    bins = tmp_path / "bin"
    bins.mkdir()
    helper = bins / "docker-credential-overlaybdtest"
    helper.write_text(
        "#!/bin/sh\nread server\n"
        f'printf \'{{"ServerURL":"%s","Username":"{CREDS[0]}","Secret":"{CREDS[1]}"}}\' '
        '"$server"\n'
    )
    helper.chmod(helper.stat().st_mode | stat.S_IEXEC)
    config_dir = tmp_path / "docker"
    config_dir.mkdir()
    (config_dir / "config.json").write_text(
        json.dumps({"credHelpers": {registry_basic.host: "overlaybdtest"}})
    )
    monkeypatch.setenv("PATH", f"{bins}:{__import__('os').environ['PATH']}")
    monkeypatch.setenv("DOCKER_CONFIG", str(config_dir))
    ref = Reference.parse(f"{registry_basic.host}/{repo}:v1")

    async def main():
        async with await RegistryClient.open(ClientConfig(plain_http=True)) as client:
            return await client.get_manifest(ref)

    assert trio.run(main).descriptor.digest == image.digest


def test_multi_platform_index(registry, tmp_path):
    repo = unique_repo("multi")
    layout = tmp_path / "layout"
    amd = add_image(layout, [tar_layer({"f": b"amd64"})], arch="amd64")
    arm = add_image(layout, [tar_layer({"f": b"arm64"})], arch="arm64", variant="v8")
    index_body, index_digest = add_index(layout, [amd, arm], tag="multi")
    skopeo_copy(f"oci:{layout}:multi", f"docker://{registry.host}/{repo}:multi", all_images=True)
    ref = Reference.parse(f"{registry.host}/{repo}:multi")

    async def body(client):
        top = await client.get_manifest(ref)
        assert isinstance(top.parsed, Index) and top.descriptor.digest == index_digest
        picked = {}
        for spec in ("linux/amd64", "linux/arm64"):
            manifest, index = await client.resolve(ref, Platform.from_spec(spec))
            assert index is not None and index.descriptor.digest == index_digest
            picked[spec] = manifest.descriptor.digest
        with pytest.raises(NotFoundError, match="linux/amd64, linux/arm64/v8"):
            await client.resolve(ref, Platform.from_spec("linux/s390x"))
        return picked

    assert with_client(body) == {"linux/amd64": amd.digest, "linux/arm64": arm.digest}
    assert json.loads(index_body)["manifests"][1]["platform"]["variant"] == "v8"


def test_missing_things_are_not_found(registry):
    ref = Reference.parse(f"{registry.host}/{unique_repo('missing')}:v1")

    async def body(client):
        with pytest.raises(NotFoundError):
            await client.get_manifest(ref)
        with pytest.raises(NotFoundError):
            await client.blob_size(ref, "sha256:" + "0" * 64)

    with_client(body)


def test_proxy_option(registry, tmp_path):
    from tests.fixtures.httpproxy import ForwardProxy

    repo = unique_repo("proxied")
    image = publish(registry, repo, tmp_path / "layout", _layers()[1:])
    ref = Reference.parse(f"{registry.host}/{repo}:v1")

    async def body(client):
        fetched = await client.get_manifest(ref)
        layer = fetched.parsed.layers[0]
        return await client.read_blob_range(ref, layer.digest, 10, 20, blob_size=layer.size)

    with ForwardProxy() as proxy:
        data = with_client(body, proxy=proxy.url)
    assert data == image.layers[0][10:30]
    assert proxy.requests[0] == f"GET {registry.url}/v2/{repo}/manifests/v1"
    assert any("/blobs/" in r for r in proxy.requests)


def test_proxies_from_the_environment(registry, tmp_path, monkeypatch):
    """HTTP_PROXY is honoured for a named registry, large range reads included (they then
    go through httpx, not the direct socket path); a loopback registry is reached directly
    (NO_PROXY matching: tests/unit/test_registry_proxy_env.py)."""
    from tests.fixtures.httpproxy import ForwardProxy

    repo = unique_repo("envproxy")
    image = publish(registry, repo, tmp_path / "layout", _layers()[:1])
    named = f"registry.proxied.test:{registry.port}"

    async def body(client, host):
        fetched = await client.get_manifest(Reference.parse(f"{host}/{repo}:v1"))
        layer = fetched.parsed.layers[0]
        return await client.read_blob_range(Reference.parse(f"{host}/{repo}:v1"), layer.digest,
                                            1000, 1 << 20, blob_size=layer.size)

    with ForwardProxy(hosts={"registry.proxied.test": "127.0.0.1"}) as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        monkeypatch.setenv("NO_PROXY", "elsewhere.test")
        assert with_client(lambda c: body(c, named)) == image.layers[0][1000 : 1000 + (1 << 20)]
        assert proxy.requests[0] == f"GET http://{named}/v2/{repo}/manifests/v1"
        assert sum("/blobs/" in r for r in proxy.requests) == 1  # the 1 MiB range
        seen = len(proxy.requests)
        assert with_client(lambda c: body(c, registry.host)) == \
            image.layers[0][1000 : 1000 + (1 << 20)]
        assert len(proxy.requests) == seen  # 127.0.0.1: direct


def test_several_ranges_in_one_request(registry, tmp_path):
    """docker-registry answers a multi-range GET with multipart/byteranges: the client takes
    the ranges from its parts (in the order asked, each part seen as it completes) and the
    registry's log shows one request for them."""
    repo = unique_repo("multirange")
    image = publish(registry, repo, tmp_path / "layout", _layers()[:1])
    ref = Reference.parse(f"{registry.host}/{repo}:v1")
    blob = image.layers[0]
    ranges = [(3 << 20, 100), (7, 4096), (1 << 20, 300_000), (1 << 20 | 300_000, 5)]
    parts: list = []

    async def body(client):
        layer = (await client.get_manifest(ref)).parsed.layers[0]
        mark = registry.log_mark()
        data = await client.read_blob_ranges(ref, layer.digest, ranges, blob_size=layer.size,
                                             on_part=lambda _body, part: parts.append(part))
        return mark, [bytes(d) for d in data]

    mark, data = with_client(body)
    assert data == [blob[o : o + n] for o, n in ranges]
    assert sorted((p.start, p.length) for p in parts) == sorted(ranges)
    gets = [r for r in registry.responses(mark) if "/blobs/" in r["http.request.uri"]]
    assert len(gets) == 1
    assert gets[0]["http.response.contenttype"].startswith("multipart/byteranges")


class _RangeServer:
    """A blob server that answers single ranges with 206 and several ranges the way
    ``mode`` says: "whole" (200 and the whole blob, as a server ignoring Range), "refuse"
    (416, which RFC 9110 allows for many ranges), "merge" (one 206 part from the first asked
    byte to the last). ``seen`` logs every Range header."""

    def __init__(self, blob: bytes, mode: str) -> None:
        self.blob, self.mode, self.seen = blob, mode, []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.host = f"127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._connection, args=(conn,), daemon=True).start()

    def _connection(self, conn: socket.socket) -> None:
        blob = self.blob
        with conn, contextlib.suppress(OSError):
            buf = b""
            while True:
                while b"\r\n\r\n" not in buf:
                    piece = conn.recv(65536)
                    if not piece:
                        return
                    buf += piece
                head, _, buf = buf.partition(b"\r\n\r\n")
                lines = head.decode().split("\r\n")
                rng = next(x for x in lines if x.lower().startswith("range:")).split("=")[1]
                self.seen.append(rng)
                spans = [tuple(int(x) for x in r.split("-")) for r in rng.split(",")]
                if len(spans) > 1 and self.mode == "whole":
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(blob))
                    conn.sendall(blob[:65536])  # the client must not wait for the rest
                    continue
                if len(spans) > 1 and self.mode == "refuse":
                    conn.sendall(b"HTTP/1.1 416 Range Not Satisfiable\r\nContent-Length: 0\r\n"
                                 b"Content-Range: bytes */%d\r\n\r\n" % len(blob))
                    continue
                first, last = min(a for a, _ in spans), max(b for _, b in spans)
                conn.sendall(b"HTTP/1.1 206 Partial Content\r\nContent-Length: %d\r\n"
                             b"Content-Range: bytes %d-%d/%d\r\n\r\n"
                             % (last - first + 1, first, last, len(blob)))
                conn.sendall(blob[first : last + 1])

    def close(self) -> None:
        self.listener.close()


@pytest.mark.parametrize("mode", ["whole", "refuse"])
def test_a_server_that_does_not_answer_several_ranges_is_asked_one_at_a_time(tmp_path, mode):
    """A multi-range GET answered with the whole blob (200, not read: the connection is
    dropped) or refused (416) gives None, and the host is not asked for several ranges again;
    the block cache then fetches the ranges one request each."""
    from overlaybd_py.engine.block_cache import BlockCache

    blob = bytes(range(256)) * 4096
    server = _RangeServer(blob, mode)
    ref = Reference.parse(f"{server.host}/r:v1")
    digest = "sha256:" + "a" * 64
    ranges = [(8192, 300 << 10), (700 << 10, 300 << 10)]

    async def body(client):
        first = await client.read_blob_ranges(ref, digest, ranges, blob_size=len(blob))
        again = await client.read_blob_ranges(ref, digest, ranges, blob_size=len(blob))
        cache = BlockCache.open(tmp_path / "cache", 0)
        source = cache.source(HttpBlobSource(client, ref, digest, len(blob)), digest)
        await source.fill_many(ranges)
        data = [bytes(await source.read_at(o, n)) for o, n in ranges]
        await source.aclose()
        cache.close()
        return first, again, data

    try:
        first, again, data = with_client(body)
    finally:
        server.close()
    assert first is None and again is None
    assert data == [blob[o : o + n] for o, n in ranges]
    assert [r for r in server.seen if "," in r] == ["8192-315391,716800-1023999"]  # once
    assert len(server.seen) == 3  # the multi-range GET, then a GET per range


def test_a_merged_single_part_answer_is_cut_into_the_ranges():
    """A server may answer close ranges with one part covering them: the ranges are cut out
    of it. One that would send far more than was asked (ranges far apart) is not read."""
    blob = bytes(range(256)) * 4096
    server = _RangeServer(blob, "merge")
    ref = Reference.parse(f"{server.host}/r:v1")
    close = [(5000, 1000), (4000, 20), (6100, 5)]
    far = [(700_000, 1000), (10, 20)]

    async def body(client):
        got = await client.read_blob_ranges(ref, "sha256:" + "b" * 64, close,
                                            blob_size=len(blob))
        refused = await client.read_blob_ranges(ref, "sha256:" + "b" * 64, far,
                                                blob_size=len(blob))
        return [bytes(d) for d in got], refused

    try:
        got, refused = with_client(body)
    finally:
        server.close()
    assert got == [blob[o : o + n] for o, n in close]
    assert refused is None
