"""Registry access shared by every mount of a serving process, with credentials reloaded
when a registry refuses them (401/403)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from ..config import NodeConfig
from ..errors import AuthError, OverlaybdError
from ..registry import (
    ClientConfig,
    Credentials,
    HttpBlobSource,
    Reference,
    RegistryClient,
    RetryPolicy,
    docker_config_credentials,
)
from ..registry.proxy_env import proxy_setting
from ..registry.range_sockets import PartCallback

__all__ = ["ClientPool", "RegistryBlob"]

log = logging.getLogger(__name__)


class ClientPool:
    """Registry clients shared by every mount, one per way of authenticating.

    A client reads a host's credentials from the credentials source (docker ``config.json``)
    once. When a registry answers 401/403, ``refresh`` reads the source again and, if the
    credentials for that host changed since the last look, replaces the client: rotated
    credentials are picked up without restarting the daemon, and a registry that keeps
    refusing unchanged credentials costs no new client.
    """

    def __init__(self, config: NodeConfig) -> None:
        self._config = config
        self._clients: dict[tuple, RegistryClient] = {}
        self._retired: list[RegistryClient] = []  # may still serve reads; closed at exit
        self._seen: dict[tuple, Credentials | None] = {}
        self._lock = trio.Lock()

    @staticmethod
    def key(params: dict[str, Any]) -> tuple:
        return (bool(params.get("plain_http")), params.get("username") or None,
                params.get("password") or None)

    def _client_config(self, key: tuple) -> ClientConfig:
        plain_http, username, password = key
        plain: bool | frozenset[str] = True if plain_http else frozenset(self._config.plain_http)
        creds = Credentials(username, password or "") if username else None
        proxy, env_proxies = proxy_setting(self._config.proxy, "[registry] proxy")
        return ClientConfig(
            plain_http=plain, default_credentials=creds,
            use_docker_config=self._config.use_docker_config,
            mirrors={h: list(u) for h, u in self._config.mirrors.items()},
            proxy=proxy, env_proxies=env_proxies, docker_config_dir=self._config.docker_config_dir,
            ca_file=self._config.ca_file,
            retry=RetryPolicy(deadline=self._config.retry_deadline),
        )

    async def get(self, key: tuple) -> RegistryClient:
        client = self._clients.get(key)
        if client is None:
            client = self._clients[key] = await RegistryClient.open(self._client_config(key))
        return client

    async def refresh(self, key: tuple, failed: RegistryClient, host: str) -> RegistryClient | None:
        """A client to retry with after ``failed`` got 401/403 from ``host``, or None."""
        if key[1] is not None or not self._config.use_docker_config:
            return None  # explicit credentials: nothing to reload
        async with self._lock:
            current = self._clients.get(key)
            if current is not None and current is not failed:
                return current  # another read refreshed it meanwhile
            try:
                creds = await trio.to_thread.run_sync(lambda: docker_config_credentials(
                    host, config_dir=self._config.docker_config_dir))
            except OverlaybdError as exc:  # the refusal stands; say why nothing changed
                log.warning("cannot reload credentials for %s: %s", host, exc)
                return None
            if (key, host) in self._seen and self._seen[(key, host)] == creds:
                return None
            self._seen[(key, host)] = creds
            fresh = await RegistryClient.open(self._client_config(key))
            self._clients[key] = fresh
            self._retired.append(failed)
        log.info("%s refused access: credentials reloaded from the docker config", host)
        return fresh

    async def aclose(self) -> None:
        for client in [*self._clients.values(), *self._retired]:
            with trio.CancelScope(shield=True):
                await client.aclose()


class RegistryBlob:
    """A registry blob (``BlobSource``) that retries once with reloaded credentials when the
    registry refuses a read (see ``ClientPool.refresh``)."""

    def __init__(self, pool: ClientPool, key: tuple, client: RegistryClient, ref: Reference,
                 digest: str, size: int) -> None:
        self._pool, self._key, self._client, self._ref = pool, key, client, ref
        self.digest = digest
        self.size = size
        self._inner = HttpBlobSource(client, ref, digest, size)

    async def read_at(self, offset: int, length: int) -> bytes:
        return await self._read(lambda inner: inner.read_at(offset, length))

    async def read_ranges(self, ranges: list[tuple[int, int]], on_part: PartCallback | None = None
                          ) -> list[memoryview] | None:
        return await self._read(lambda inner: inner.read_ranges(ranges, on_part))

    async def _read(self, read: Callable[[HttpBlobSource], Awaitable[Any]]) -> Any:
        client = self._client
        try:
            return await read(self._inner)
        except AuthError:
            fresh = await self._pool.refresh(self._key, client, self._ref.api_host)
            if fresh is None:
                raise
            self._client = fresh
            self._inner = HttpBlobSource(fresh, self._ref, self.digest, self.size)
            return await read(self._inner)
