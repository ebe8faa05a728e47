"""The public API of overlaybd_py.registry is pinned: changing it is a deliberate act."""

from __future__ import annotations

import overlaybd_py.registry as registry

PUBLIC = {
    "OVERLAYBD_ARTIFACT_TYPES",
    "BlobSourceStatistics",
    "ClientConfig",
    "ClientStatistics",
    "Credentials",
    "EnvProxies",
    "FetchedManifest",
    "HttpBlobSource",
    "PushedManifest",
    "Reference",
    "ReferrerPush",
    "Referrers",
    "RegistryAuth",
    "RegistryClient",
    "RetryPolicy",
    "docker_config_credentials",
    "fallback_tag",
    "host_platform",
    "is_transient",
    "list_referrers",
    "parse_www_authenticate",
    "pick_overlaybd_referrer",
    "preload",
    "push_referrer",
    "retry",
    "select_manifest",
}


def test_all_is_pinned():
    assert set(registry.__all__) == PUBLIC


def test_every_export_exists_and_is_documented():
    for name in registry.__all__:
        obj = getattr(registry, name)
        if callable(obj) and not isinstance(obj, tuple):
            assert obj.__doc__, f"{name} has no docstring"


def test_blob_source_protocol_shape():
    """The engine needs only ``size`` and ``async read_at(offset, length)``."""
    import inspect

    source = registry.HttpBlobSource
    assert inspect.iscoroutinefunction(source.read_at)
    assert list(inspect.signature(source.read_at).parameters) == ["self", "offset", "length"]
