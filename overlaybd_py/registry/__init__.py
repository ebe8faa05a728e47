"""OCI distribution client: references, auth, manifests, blobs, range reads, referrers, pushes.

The only package that speaks HTTP. The curated names below are the public API; modules with a
leading underscore are private.
"""

from .auth import Credentials, RegistryAuth, docker_config_credentials, parse_www_authenticate
from .blob_source import BlobSourceStatistics, HttpBlobSource
from .client import (
    ClientConfig,
    ClientStatistics,
    FetchedManifest,
    PushedManifest,
    RegistryClient,
    preload,
)
from .proxy_env import EnvProxies
from .reference import Reference, host_platform, select_manifest
from .referrers import (
    OVERLAYBD_ARTIFACT_TYPES,
    ReferrerPush,
    Referrers,
    fallback_tag,
    list_referrers,
    pick_overlaybd_referrer,
    push_referrer,
)
from .retry import RetryPolicy, is_transient, retry

__all__ = [
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
]
