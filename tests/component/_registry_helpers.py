"""Helpers shared by the registry component tests: publish with skopeo, open our client."""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import trio

from overlaybd_py.registry import ClientConfig, Credentials, RegistryClient, RetryPolicy
from tests.fixtures.oci_layout import LayoutImage, add_image, skopeo_copy
from tests.fixtures.registry import TEST_PASSWORD, TEST_USER, RegistryServer

T = TypeVar("T")
CREDS = (TEST_USER, TEST_PASSWORD)
FAST_RETRY = RetryPolicy(deadline=10, base_delay=0.01, max_delay=0.2)
_counter = itertools.count()


def unique_repo(prefix: str) -> str:
    """A repository name no other test uses (the servers are shared by the session)."""
    return f"{prefix}/r{next(_counter)}"


def publish(
    server: RegistryServer,
    repo: str,
    layout: Path,
    layers: list[bytes],
    *,
    tag: str = "v1",
    creds: tuple[str, str] | None = None,
    **kwargs: Any,
) -> LayoutImage:
    """Write an image into an OCI layout and push it with skopeo (the independent client)."""
    image = add_image(layout, layers, tag=tag, **kwargs)
    skopeo_copy(f"oci:{layout}:{tag}", f"docker://{server.host}/{repo}:{tag}", creds=creds)
    return image


def config_for(*, creds: tuple[str, str] | None = None, **kwargs: Any) -> ClientConfig:
    kwargs.setdefault("retry", FAST_RETRY)
    kwargs.setdefault("use_docker_config", False)
    if creds:
        kwargs["default_credentials"] = Credentials(*creds)
    return ClientConfig(plain_http=True, **kwargs)


def with_client(body: Callable[[RegistryClient], Awaitable[T]], **config: Any) -> T:
    """Run ``body(client)`` under trio with a client for loopback registries."""

    async def main() -> T:
        async with await RegistryClient.open(config_for(**config)) as client:
            return await body(client)

    return trio.run(main)
