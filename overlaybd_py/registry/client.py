"""The OCI distribution client: manifests, blobs, range reads, uploads, mirrors.

The only module that holds an ``httpx.AsyncClient``. Protocol decisions live in pure helpers
(``auth``, ``referrers``, ``formats.oci``); this module sends requests, maps HTTP answers to
the exception tree, and verifies what it receives: a manifest or blob fetched whole is
checked against its digest, a range against the ``Content-Range`` it answers. Runs under trio.

Theory of operation: every request goes through :meth:`RegistryClient._exchange`, which holds
one of ``max_parallel`` slots of the endpoint host while the response is open (so the bound is
on requests in flight, bodies included), and translates httpx transport failures into
:class:`TransientError`. Reads try each mirror of the registry once, in order, then the origin
under the retry policy; writes go to the origin only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import httpx
import trio

from ..errors import (
    DigestMismatchError,
    FormatError,
    NotFoundError,
    RegistryError,
    TransientError,
    UntrustedCertificateError,
    UsageError,
)
from ..formats.oci import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    Index,
    Manifest,
    Platform,
    digest_hasher,
    digest_matches,
    parse_manifest_or_index,
    sha256_digest,
)
from . import tls
from ._http import (
    check_content_range,
    check_unsatisfiable,
    raise_for_status,
    read_limited,
    skip_and_take,
)
from .auth import Credentials, RegistryAuth, docker_config_credentials
from .proxy_env import EnvProxies
from .range_sockets import ErrorAnswer, PartCallback, RangeSockets
from .reference import Reference, select_manifest
from .retry import RetryPolicy, retry

__all__ = [
    "ClientConfig",
    "ClientStatistics",
    "FetchedManifest",
    "PushedManifest",
    "RegistryClient",
    "preload",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

MANIFEST_ACCEPT = ", ".join((OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST))
# The distribution spec asks registries to accept manifests of at least 4 MiB; refusing
# anything larger keeps a hostile registry from making us buffer gigabytes.
MAX_MANIFEST_SIZE = 4 * 1024 * 1024
_OCTET = "application/octet-stream"
_DRAIN_LIMIT = 64 * 1024
# Range reads from this size go through RangeSockets: below it the thread hop costs more
# than the Python it saves.
SOCKET_RANGE_MIN = 256 * 1024


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """How to reach registries. Hosts are ``host[:port]`` as in references.

    ``plain_http`` is True (every origin over http, for loopback registries) or a set of hosts.
    ``credentials`` are explicit per host; ``default_credentials`` apply to every origin host
    (never to mirrors) without an explicit entry; otherwise ``config.json`` is consulted.
    ``mirrors`` maps a registry host to endpoint URLs tried in order before the origin.
    """

    plain_http: bool | frozenset[str] = False
    credentials: Mapping[str, Credentials] = field(default_factory=dict)
    default_credentials: Credentials | None = None
    use_docker_config: bool = True
    docker_config_dir: str | None = None
    mirrors: Mapping[str, Sequence[str]] = field(default_factory=dict)
    proxy: str | None = None  # every request through this proxy (environment ignored)
    # HTTPS_PROXY, HTTP_PROXY and NO_PROXY (proxy_env.py); None: read them from
    # os.environ when the client opens, EnvProxies(): none.
    env_proxies: EnvProxies | None = None
    ca_file: str | None = None
    max_parallel: int = 16
    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    mirror_cooldown: float = 30.0
    tcp_nodelay: bool = True
    user_agent: str = "overlaybd-py"
    transport: httpx.AsyncBaseTransport | None = None  # tests inject httpx.MockTransport
    # Large range reads on plain sockets in worker threads (range_sockets.py); off with a
    # proxy or an injected transport, which only httpx honours, and for the hosts an
    # environment proxy serves.
    socket_ranges: bool = True

    def __post_init__(self) -> None:
        if self.max_parallel < 1:
            raise UsageError("max_parallel must be at least 1")
        for host, urls in self.mirrors.items():
            for url in urls:
                if httpx.URL(url).scheme not in ("http", "https"):
                    raise UsageError(f"mirror {url!r} for {host}: expected an http(s) URL")


@dataclass(frozen=True, slots=True)
class ClientStatistics:
    """Counters since the client opened: requests sent, mirror failures, tokens fetched, and
    range requests answered with the whole blob (a cold mirror or a server without Range)."""

    requests: int
    mirror_fallbacks: int
    token_fetches: int
    ranges_ignored: int
    socket_ranges: int = 0  # range reads answered on the socket path (range_sockets.py)


@dataclass(frozen=True, slots=True)
class FetchedManifest:
    """A manifest or index as fetched: verified bytes, their descriptor, the parsed value."""

    reference: Reference  # with the digest filled in
    descriptor: Descriptor
    content: bytes
    parsed: Manifest | Index


@dataclass(frozen=True, slots=True)
class PushedManifest:
    """What a manifest PUT stored, and whether the registry indexed its subject."""

    descriptor: Descriptor
    # The OCI-Subject answer header: set when the registry processed the subject, i.e. it
    # implements the referrers API; None means "maintain the fallback tag yourself".
    oci_subject: str | None


@dataclass(frozen=True, slots=True)
class _Endpoint:
    base: str  # scheme://host[:port], no trailing slash
    host: str
    mirror: bool


class RegistryClient:
    """Talks OCI distribution to any number of registries. Build with :meth:`open`."""

    def __init__(self, config: ClientConfig, http: httpx.AsyncClient, auth: RegistryAuth,
                 env_proxies: EnvProxies | None = None):
        self._config = config
        self._http = http
        self._auth = auth
        # the socket path serves only hosts reached directly
        self._env_proxies = env_proxies or EnvProxies()
        self._sockets: RangeSockets | None = None
        if config.socket_ranges and config.transport is None and config.proxy is None:
            self._sockets = RangeSockets(
                connect_timeout=config.connect_timeout,
                read_timeout=config.read_timeout,
                user_agent=config.user_agent,
                ssl_context=tls.ssl_context(config.ca_file),
                tcp_nodelay=config.tcp_nodelay,
            )
        self._slots: dict[str, trio.Semaphore] = {}
        self._looked_up: set[str] = set(config.credentials)
        self._cooling: dict[str, float] = {}
        self._requests = 0
        self._mirror_fallbacks = 0
        self._ranges_ignored = 0
        self._endpoint_cache: dict[str, tuple[list[_Endpoint], _Endpoint]] = {}

    @classmethod
    async def open(cls, config: ClientConfig | None = None) -> RegistryClient:
        """Create a client; close it with :meth:`aclose` or use it as an async context manager."""
        config = config or ClientConfig()
        auth = RegistryAuth(config.credentials, user_agent=config.user_agent)
        env_proxies = EnvProxies()
        if config.proxy is None and config.transport is None:
            env_proxies = config.env_proxies if config.env_proxies is not None \
                else EnvProxies.from_environ(os.environ)
        # One context for every transport and the socket path (and every client of this
        # process with the same CA file: tls.ssl_context keeps it).
        context = tls.ssl_context(config.ca_file) if config.transport is None else None
        transport = config.transport or _make_transport(config, env_proxies, context)
        http = httpx.AsyncClient(
            transport=transport,
            auth=auth,
            follow_redirects=True,
            max_redirects=5,
            timeout=httpx.Timeout(config.read_timeout, connect=config.connect_timeout),
            headers={"User-Agent": config.user_agent},
            trust_env=False,
        )
        return cls(config, http, auth, env_proxies)

    async def aclose(self) -> None:
        if self._sockets is not None:
            self._sockets.close()
        await self._http.aclose()

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @property
    def retry_policy(self) -> RetryPolicy:
        """The policy this client retries with (helpers sequencing several calls reuse it)."""
        return self._config.retry

    def statistics(self) -> ClientStatistics:
        return ClientStatistics(
            self._requests, self._mirror_fallbacks, self._auth.token_fetches, self._ranges_ignored,
            self._sockets.served if self._sockets is not None else 0,
        )

    # ---- endpoints, credentials, the one place requests are sent ----

    def _registry_endpoints(self, ref: Reference) -> tuple[list[_Endpoint], _Endpoint]:
        known = self._endpoint_cache.get(ref.registry)
        if known is None:
            host = ref.api_host
            plain = self._config.plain_http
            secure = not (plain is True or (isinstance(plain, frozenset) and host in plain))
            origin = _Endpoint(f"{'https' if secure else 'http'}://{host}", host, mirror=False)
            urls = self._config.mirrors.get(ref.registry) or self._config.mirrors.get(host) or ()
            mirrors = []
            for url in urls:
                parsed = httpx.URL(url.rstrip("/"))
                mirrors.append(_Endpoint(str(parsed), parsed.netloc.decode("ascii"), mirror=True))
            known = self._endpoint_cache[ref.registry] = (mirrors, origin)
        return known

    def _origin(self, ref: Reference) -> _Endpoint:
        return self._registry_endpoints(ref)[1]

    def _endpoints(self, ref: Reference) -> list[_Endpoint]:
        mirrors, origin = self._registry_endpoints(ref)
        if not mirrors:
            return [origin]
        now = trio.current_time()
        usable = [m for m in mirrors if self._cooling.get(m.base, 0.0) <= now]
        return [*usable, origin]

    async def _ensure_credentials(self, endpoint: _Endpoint) -> None:
        host = endpoint.host
        if host in self._looked_up:
            return
        self._looked_up.add(host)
        creds = None
        if not endpoint.mirror and self._config.default_credentials is not None:
            creds = self._config.default_credentials
        elif self._config.use_docker_config:
            creds = await trio.to_thread.run_sync(
                lambda: docker_config_credentials(host, config_dir=self._config.docker_config_dir)
            )
        if creds is not None:
            self._auth.set_credentials(host, creds)

    def _slot(self, host: str) -> trio.Semaphore:
        slot = self._slots.get(host)
        if slot is None:
            slot = self._slots[host] = trio.Semaphore(self._config.max_parallel)
        return slot

    @asynccontextmanager
    async def _exchange(
        self,
        endpoint: _Endpoint,
        method: str,
        url: str | httpx.URL,
        *,
        headers: Mapping[str, str] | None = None,
        content: bytes | None = None,
        params: Mapping[str, str] | None = None,
    ) -> AsyncIterator[httpx.Response]:
        """Send one request and yield the streamed response, holding a slot until it closes."""
        await self._ensure_credentials(endpoint)
        request = self._http.build_request(
            method, url, headers=headers, content=content, params=params
        )
        async with self._slot(endpoint.host):
            self._requests += 1
            try:
                response = await self._http.send(request, stream=True)
            except httpx.TooManyRedirects:
                raise RegistryError(
                    f"{method} {request.url}: too many redirects", url=str(request.url)
                ) from None
            except httpx.HTTPError as exc:
                raise _transient(method, request.url, exc) from exc
            try:
                yield response
                if not response.is_stream_consumed and _drainable(response):
                    # An unread body (HEAD, 201, 202, 204...) would make httpcore close the
                    # connection instead of pooling it: a new TCP connection per request.
                    with contextlib.suppress(httpx.HTTPError):
                        await response.aread()
            except httpx.HTTPError as exc:
                raise _transient(method, request.url, exc) from exc
            finally:
                await response.aclose()

    async def _pull(self, ref: Reference, what: str, op: Callable[[_Endpoint], Awaitable[T]]) -> T:
        """Run a read on each mirror once, then on the origin under the retry policy."""
        *mirrors, origin = self._endpoints(ref)
        for endpoint in mirrors:
            try:
                return await op(endpoint)
            except (RegistryError, FormatError) as exc:
                self._mirror_fallbacks += 1
                if isinstance(exc, TransientError | UntrustedCertificateError):
                    self._cooling[endpoint.base] = (
                        trio.current_time() + self._config.mirror_cooldown
                    )
                log.info(
                    "%s: mirror %s failed (%s); trying the next endpoint", what, endpoint.base, exc
                )
        return await retry(lambda: op(origin), policy=self._config.retry, what=what)

    async def _at_origin(
        self, ref: Reference, what: str, op: Callable[[_Endpoint], Awaitable[T]]
    ) -> T:
        origin = self._origin(ref)
        return await retry(lambda: op(origin), policy=self._config.retry, what=what)

    # ---- manifests ----

    async def get_manifest(self, ref: Reference, *, origin_only: bool = False) -> FetchedManifest:
        """Fetch the manifest or index ``ref`` names, verified against its digest.

        By digest: the bytes must hash to it. By tag: they must hash to the registry's
        ``Docker-Content-Digest`` when it sends one. Raises DigestMismatchError otherwise.
        ``origin_only`` skips mirrors (to read back what was just pushed).
        """
        path = f"/v2/{ref.repository}/manifests/{ref.reference}"

        async def op(endpoint: _Endpoint) -> FetchedManifest:
            async with self._exchange(
                endpoint, "GET", endpoint.base + path, headers={"Accept": MANIFEST_ACCEPT}
            ) as response:
                await raise_for_status(response, f"manifest {ref}")
                content = await read_limited(response, MAX_MANIFEST_SIZE, f"manifest {ref}")
                return _verified_manifest(ref, response, content)

        what = f"GET manifest {ref}"
        return await (self._at_origin(ref, what, op) if origin_only else self._pull(ref, what, op))

    async def head_manifest(self, ref: Reference) -> Descriptor:
        """Descriptor of ``ref`` without its body (falls back to GET if the registry is vague)."""
        path = f"/v2/{ref.repository}/manifests/{ref.reference}"

        async def op(endpoint: _Endpoint) -> Descriptor | None:
            async with self._exchange(
                endpoint, "HEAD", endpoint.base + path, headers={"Accept": MANIFEST_ACCEPT}
            ) as response:
                await raise_for_status(response, f"manifest {ref}")
                digest = response.headers.get("docker-content-digest")
                size = response.headers.get("content-length", "")
                media_type = response.headers.get("content-type", "").split(";")[0].strip()
                if not digest or not size.isdigit() or not media_type:
                    return None
                if ref.digest and digest != ref.digest:
                    raise DigestMismatchError(f"manifest {ref}: registry reports digest {digest}")
                return Descriptor(media_type, digest, int(size))

        found = await self._pull(ref, f"HEAD manifest {ref}", op)
        return found if found is not None else (await self.get_manifest(ref)).descriptor

    async def resolve(
        self, ref: Reference, platform: Platform | None = None
    ) -> tuple[FetchedManifest, FetchedManifest | None]:
        """Return ``(manifest, index)``: the image manifest for ``platform`` and the index it
        was selected from (None if ``ref`` names a manifest directly)."""
        top = await self.get_manifest(ref)
        if isinstance(top.parsed, Manifest):
            return top, None
        chosen = select_manifest(top.parsed, platform)
        manifest = await self.get_manifest(ref.with_digest(chosen.digest))
        if not isinstance(manifest.parsed, Manifest):
            raise FormatError(
                f"{ref}: index entry {chosen.digest} is not an image manifest",
                field="manifests[].mediaType",
                actual=manifest.descriptor.media_type,
            )
        return manifest, top

    async def push_manifest(
        self, ref: Reference, content: bytes, media_type: str
    ) -> PushedManifest:
        """PUT ``content`` under ``ref``'s tag, or under its own digest if ``ref`` has no tag."""
        digest = sha256_digest(content)
        if ref.digest and ref.digest != digest:
            raise UsageError(f"{ref}: content hashes to {digest}, not to the digest named")
        target = ref.tag or digest
        path = f"/v2/{ref.repository}/manifests/{target}"

        async def op(endpoint: _Endpoint) -> PushedManifest:
            async with self._exchange(
                endpoint,
                "PUT",
                endpoint.base + path,
                content=content,
                headers={"Content-Type": media_type},
            ) as response:
                await raise_for_status(response, f"push manifest {ref.repository}:{target}")
                answered = response.headers.get("docker-content-digest")
                if answered and answered != digest:
                    raise DigestMismatchError(
                        f"registry stored manifest {ref.repository}:{target} as {answered}, "
                        f"expected {digest}"
                    )
                return PushedManifest(
                    Descriptor(media_type, digest, len(content)),
                    response.headers.get("oci-subject"),
                )

        return await self._at_origin(ref, f"PUT manifest {ref.repository}:{target}", op)

    # ---- blobs: reading ----

    def _blob_path(self, ref: Reference, digest: str) -> str:
        return f"/v2/{ref.repository}/blobs/{digest}"

    async def blob_size(self, ref: Reference, digest: str) -> int:
        """Size in bytes of blob ``digest`` in ``ref``'s repository (HEAD)."""
        found = await self._head_blob(ref, digest, pull=True)
        if found is None:
            raise NotFoundError(f"blob {digest} not found in {ref.registry}/{ref.repository}")
        return found

    async def _head_blob(self, ref: Reference, digest: str, *, pull: bool) -> int | None:
        path = self._blob_path(ref, digest)

        async def op(endpoint: _Endpoint) -> int | None:
            async with self._exchange(endpoint, "HEAD", endpoint.base + path) as response:
                if response.status_code == 404 and not pull:
                    return None
                await raise_for_status(response, f"blob {digest}")
                size = response.headers.get("content-length", "")
                if not size.isdigit():
                    raise RegistryError(f"blob {digest}: HEAD answer has no Content-Length")
                return int(size)

        what = f"HEAD blob {ref.repository}@{digest}"
        return await (self._pull(ref, what, op) if pull else self._at_origin(ref, what, op))

    async def get_blob(
        self, ref: Reference, descriptor: Descriptor | str, *, max_size: int = 64 * 1024 * 1024
    ) -> bytes:
        """A whole (small) blob in memory, verified against its digest and descriptor size."""
        digest = descriptor if isinstance(descriptor, str) else descriptor.digest
        want = None if isinstance(descriptor, str) else descriptor.size
        path = self._blob_path(ref, digest)

        async def op(endpoint: _Endpoint) -> bytes:
            async with self._exchange(endpoint, "GET", endpoint.base + path) as response:
                await raise_for_status(response, f"blob {digest}")
                data = await read_limited(response, max_size, f"blob {digest}")
            if want is not None and len(data) != want:
                raise DigestMismatchError(
                    f"blob {digest}: {len(data)} bytes, descriptor says {want}"
                )
            if not digest_matches(digest, data):
                raise DigestMismatchError(f"blob {digest}: content hashes to {sha256_digest(data)}")
            return data

        return await self._pull(ref, f"GET blob {ref.repository}@{digest}", op)

    async def read_blob_range(
        self, ref: Reference, digest: str, offset: int, length: int, *, blob_size: int | None = None
    ) -> bytes | bytearray:
        """Exactly ``length`` bytes of blob ``digest`` from byte ``offset``, or an exception.
        With ``RANGE_PROGRESS`` set (the block cache) the socket path returns its receive
        buffer, a bytearray, instead of a copy: do not keep it as a key or resize it.

        Handles servers (cold pull-through mirrors) that ignore Range and send the whole blob
        with 200: the bytes at ``offset`` are taken from the stream, never its start.
        """
        if offset < 0 or length < 0 or (blob_size is not None and offset + length > blob_size):
            raise ValueError(f"range {offset}+{length} outside blob {digest} of size {blob_size}")
        if length == 0:
            return b""
        path = self._blob_path(ref, digest)
        headers = {"Range": f"bytes={offset}-{offset + length - 1}", "Accept-Encoding": "identity"}
        what = f"blob {digest} range {offset}+{length}"

        async def op(endpoint: _Endpoint) -> bytes | bytearray:
            if length >= SOCKET_RANGE_MIN and self._socket_path(endpoint):
                data = await self._socket_get(
                    endpoint, path, f"range {offset}+{length}", what, blob_size,
                    lambda url, auth: self._sockets.get_range(url, offset, length, auth,
                                                              blob_size))
                if data is not None:
                    return data
            async with self._exchange(
                endpoint, "GET", endpoint.base + path, headers=headers
            ) as response:
                status = response.status_code
                if status == 206:
                    check_content_range(response, offset, length, blob_size, what)
                    data = await response.aread()
                elif status == 200:
                    self._ranges_ignored += 1
                    total = response.headers.get("content-length", "")
                    if blob_size is not None and total.isdigit() and int(total) != blob_size:
                        raise DigestMismatchError(
                            f"{what}: server sent a {total}-byte body for a {blob_size}-byte blob"
                        )
                    data = await skip_and_take(response, offset, length)
                else:
                    check_unsatisfiable(status, response.headers, blob_size, what)
                    await raise_for_status(response, what)
                    raise RegistryError(f"{what}: unexpected HTTP {status}", status=status)
            if len(data) != length:
                raise TransientError(f"{what}: short body ({len(data)} bytes)")
            return data

        return await self._pull(ref, f"GET {what}", op)

    async def read_blob_ranges(
        self, ref: Reference, digest: str, ranges: list[tuple[int, int]], *,
        blob_size: int | None = None, on_part: PartCallback | None = None,
    ) -> list[memoryview] | None:
        """The bytes of several (offset, length) ranges of blob ``digest``, in the order
        asked, in one multi-range request (``on_part`` sees each part as it completes, in
        the worker thread; see ``RangeSockets.get_ranges``); None where the registry does
        not answer those with their parts, or this path cannot ask (a proxy, no token yet):
        read range by range then."""
        for offset, length in ranges:
            if offset < 0 or length <= 0 or (blob_size is not None
                                             and offset + length > blob_size):
                raise ValueError(f"range {offset}+{length} outside blob {digest} of size "
                                 f"{blob_size}")
        path = self._blob_path(ref, digest)
        what = f"blob {digest} {len(ranges)} ranges"

        async def op(endpoint: _Endpoint) -> list[memoryview] | None:
            if not self._socket_path(endpoint):
                return None
            return await self._socket_get(
                endpoint, path, what, what, blob_size,
                lambda url, auth: self._sockets.get_ranges(url, ranges, auth, blob_size,
                                                           on_part))

        return await self._pull(ref, f"GET {what}", op)

    def _socket_path(self, endpoint: _Endpoint) -> bool:
        """Whether range GETs to ``endpoint`` may go over RangeSockets (not through a proxy)."""
        return self._sockets is not None and not (
            self._env_proxies and self._env_proxies.proxy_for(endpoint.base))

    async def _socket_get(
        self, endpoint: _Endpoint, path: str, label: str, what: str, blob_size: int | None,
        get: Callable[[str, str | None], Any],
    ) -> Any:
        """``get(url, authorization)`` (a :class:`RangeSockets` read) in a worker thread:
        its result, or None when httpx must do it (no usable token yet, or another answer);
        an error answer is raised as the registry error it means."""
        assert self._sockets is not None
        await self._ensure_credentials(endpoint)
        url = endpoint.base + path
        ready, authorization = self._auth.ready_authorization("GET", url)
        if not ready:
            return None
        async with self._slot(endpoint.host):
            self._requests += 1
            try:
                data = await trio.to_thread.run_sync(partial(get, url, authorization),
                                                     abandon_on_cancel=True)
            except OSError as exc:
                problem = tls.certificate_problem(exc)
                if problem is not None:
                    raise tls.untrusted(endpoint.host, problem, url=url) from exc
                raise TransientError(
                    f"GET {url} {label}: {type(exc).__name__}: {exc}", url=url
                ) from exc
        if isinstance(data, ErrorAnswer):
            await _raise_error_answer(data, url, blob_size, what)
        return data

    async def download_blob(
        self, ref: Reference, descriptor: Descriptor, path: str | os.PathLike[str]
    ) -> None:
        """Stream a blob to ``path`` (atomically), verifying size and digest on the way."""
        target = Path(path)
        blob_path = self._blob_path(ref, descriptor.digest)
        what = f"blob {descriptor.digest}"

        async def op(endpoint: _Endpoint) -> None:
            partial = target.with_name(target.name + ".partial")
            hasher = digest_hasher(descriptor.digest)
            with partial.open("wb") as out:
                async with self._exchange(endpoint, "GET", endpoint.base + blob_path) as response:
                    await raise_for_status(response, what)
                    written, batch = 0, bytearray()

                    def flush(chunk: bytes) -> None:
                        hasher.update(chunk)
                        out.write(chunk)

                    async for piece in response.aiter_raw():
                        batch += piece
                        if len(batch) >= 4 << 20:  # one thread hop per 4 MiB, not per piece
                            written += len(batch)
                            await trio.to_thread.run_sync(flush, bytes(batch))
                            batch.clear()
                    written += len(batch)
                    await trio.to_thread.run_sync(flush, bytes(batch))
            if written != descriptor.size or hasher.hexdigest() != descriptor.digest.split(":")[1]:
                partial.unlink(missing_ok=True)
                raise DigestMismatchError(
                    f"{what}: downloaded {written} bytes that do not match "
                    f"the descriptor (size {descriptor.size})"
                )
            partial.replace(target)

        await self._pull(ref, f"GET {what}", op)

    # ---- blobs: writing ----

    async def push_blob(
        self,
        ref: Reference,
        data: bytes | os.PathLike[str],
        *,
        media_type: str = _OCTET,
        mount_from: Reference | None = None,
        chunk_size: int | None = None,
        digest: str | None = None,
    ) -> Descriptor:
        """Upload ``data`` (bytes, or a file path) unless the repository has it.

        Returns its descriptor. ``mount_from`` asks the registry to link the blob from another
        repository of the same registry (no upload if it agrees). ``chunk_size`` uploads in
        resumable PATCH chunks of that many bytes instead of one PUT. ``digest``, if known,
        saves hashing the data first (the registry still verifies it).
        """
        from ._upload import upload_blob

        return await upload_blob(
            self,
            ref,
            data,
            media_type=media_type,
            mount_from=mount_from,
            chunk_size=chunk_size,
            digest=digest,
        )

    # ---- referrers (HTTP part; logic in referrers.py) ----

    async def referrers_page(
        self, ref: Reference, url: str
    ) -> tuple[bytes, str | None, httpx.Headers, httpx.URL] | None:
        """GET one page of the referrers API at ``url`` (a path or absolute URL).

        Returns ``(body, content_type, headers, final_url)``, or None if the registry answers
        404 (it lacks the API).
        """
        origin = self._origin(ref)
        target = httpx.URL(origin.base).join(url)

        async def op(
            endpoint: _Endpoint,
        ) -> tuple[bytes, str | None, httpx.Headers, httpx.URL] | None:
            async with self._exchange(
                endpoint, "GET", target, headers={"Accept": OCI_INDEX}
            ) as response:
                if response.status_code == 404:
                    await response.aread()
                    return None
                await raise_for_status(response, f"referrers of {ref}")
                body = await read_limited(response, MAX_MANIFEST_SIZE, f"referrers of {ref}")
                return body, response.headers.get("content-type"), response.headers, response.url

        return await self._at_origin(ref, f"GET referrers {ref.repository}", op)


# httpcore reads a response 64 KiB per socket receive, and every receive costs a trip
# through h11 and the event loop: ~3 ms of CPU per MiB of blob. 256 KiB per receive halves
# that (measured: 4 MiB range reads on loopback, 237 -> 348 MB/s, 3.1 -> 1.7 ms CPU per MiB)
# and costs nothing for small replies, which come in one short receive anyway. The knob is a
# class attribute of httpcore's HTTP/1.1 connection, so it is set once, if present.
_READ_BYTES = 256 * 1024


def preload(ca_file: str | None = None) -> None:
    """Do the one-off work of a process's first client open now (the trust store and
    httpcore's import, ~50 ms): a long-running server calls it at start so that its first
    request does not wait for it. Raises UsageError for a bad ``ca_file``."""
    tls.ssl_context(ca_file)
    _tune_httpcore()


def _tune_httpcore() -> None:
    try:
        from httpcore._async.http11 import AsyncHTTP11Connection
    except ImportError:  # a future httpcore: keep its default
        return
    if getattr(AsyncHTTP11Connection, "READ_NUM_BYTES", _READ_BYTES) < _READ_BYTES:
        AsyncHTTP11Connection.READ_NUM_BYTES = _READ_BYTES


def _make_transport(config: ClientConfig, env_proxies: EnvProxies,
                    context: ssl.SSLContext) -> httpx.AsyncBaseTransport:
    direct = _http_transport(config, config.proxy, context)
    if not env_proxies:
        return direct
    return _ProxyRouter(direct, lambda proxy: _http_transport(config, proxy, context),
                        env_proxies.proxy_for)


class _ProxyRouter(httpx.AsyncBaseTransport):
    """Sends each request directly or through the proxy the environment gives its URL
    (httpx's own environment support is off: it ignores loopback and CIDR exemptions)."""

    def __init__(self, direct: httpx.AsyncBaseTransport,
                 make: Callable[[str], httpx.AsyncBaseTransport],
                 proxy_for: Callable[[httpx.URL], str | None]) -> None:
        self._direct = direct
        self._make = make
        self._proxy_for = proxy_for
        self._proxied: dict[str, httpx.AsyncBaseTransport] = {}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        proxy = self._proxy_for(request.url)
        transport = self._direct
        if proxy is not None:
            transport = self._proxied.get(proxy) or self._proxied.setdefault(
                proxy, self._make(proxy))
        return await transport.handle_async_request(request)

    async def aclose(self) -> None:
        async with contextlib.AsyncExitStack() as stack:  # all of them, even if one fails
            for transport in (self._direct, *self._proxied.values()):
                stack.push_async_callback(transport.aclose)


def _http_transport(config: ClientConfig, proxy: str | None,
                    context: ssl.SSLContext) -> httpx.AsyncHTTPTransport:
    _tune_httpcore()
    # Nagle's algorithm holds back a small write while an earlier one is unacknowledged; with
    # the peer's delayed ACK that is ~40 ms on a request written in two pieces (headers, then
    # body). trio already sets TCP_NODELAY; saying it here keeps it true on any backend and
    # lets the benchmark turn it off to measure it.
    options = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1 if config.tcp_nodelay else 0)]
    limits = httpx.Limits(
        max_connections=None, max_keepalive_connections=config.max_parallel * 4, keepalive_expiry=30
    )
    return httpx.AsyncHTTPTransport(
        verify=context, limits=limits, proxy=proxy, socket_options=options, retries=0
    )


def _drainable(response: httpx.Response) -> bool:
    """True if reading the rest of the body is cheaper than a new connection (<= 64 KiB)."""
    if response.request.method == "HEAD" or response.status_code in (204, 304):
        return True
    length = response.headers.get("content-length", "")
    return length.isdigit() and int(length) <= _DRAIN_LIMIT


def _transient(method: str, url: httpx.URL, exc: httpx.HTTPError) -> RegistryError:
    problem = tls.certificate_problem(exc)
    if problem is not None:  # retrying cannot help
        return tls.untrusted(url.netloc.decode("ascii"), problem, url=str(url))
    return TransientError(
        f"{method} {url.copy_with(query=None)}: {type(exc).__name__}: {exc}", url=str(url)
    )


def _verified_manifest(ref: Reference, response: httpx.Response, content: bytes) -> FetchedManifest:
    digest = sha256_digest(content)
    if ref.digest:
        if not digest_matches(ref.digest, content):
            raise DigestMismatchError(
                f"manifest {ref}: content hashes to {digest}", url=str(response.url)
            )
        digest = ref.digest
    else:
        announced = response.headers.get("docker-content-digest")
        if announced and announced.startswith("sha256:") and announced != digest:
            raise DigestMismatchError(
                f"manifest {ref}: registry says {announced} but the content hashes to {digest}",
                url=str(response.url),
            )
    parsed = parse_manifest_or_index(content, response.headers.get("content-type"))
    descriptor = Descriptor(parsed.media_type, digest, len(content))
    return FetchedManifest(ref.with_digest(digest), descriptor, content, parsed)


async def _raise_error_answer(answer: ErrorAnswer, url: str, blob_size: int | None,
                              what: str) -> NoReturn:
    """Raise what an error answer of the socket path means (as httpx's path would)."""
    check_unsatisfiable(answer.status, answer.headers, blob_size, what)
    await raise_for_status(httpx.Response(
        answer.status, headers=answer.headers, content=answer.body,
        request=httpx.Request("GET", url)), what)
    raise RegistryError(f"{what}: unexpected HTTP {answer.status}", status=answer.status)
