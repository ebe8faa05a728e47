"""OCI and Docker schema2 image structures: media types, digests, descriptors, manifests, indexes.

Pure (stdlib and ``errors`` only, no I/O): the registry client, the converter and the engine
all parse and build image JSON through this module. Parsing validates every field it keeps and
raises :class:`FormatError` naming the field; unknown fields are ignored, as the spec requires.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Self

from ..errors import FormatError

__all__ = [
    "ANNOTATION_ACCELERATION_LAYER",
    "ANNOTATION_BLOB_DIGEST",
    "ANNOTATION_BLOB_FS_TYPE",
    "ANNOTATION_BLOB_SIZE",
    "ANNOTATION_VERSION",
    "ARTIFACT_TYPE_ACR_STREAMING",
    "ARTIFACT_TYPE_OVERLAYBD",
    "DOCKER_CONFIG",
    "DOCKER_LAYER",
    "DOCKER_LAYER_GZIP",
    "DOCKER_MANIFEST",
    "DOCKER_MANIFEST_LIST",
    "INDEX_MEDIA_TYPES",
    "MANIFEST_MEDIA_TYPES",
    "OCI_CONFIG",
    "OCI_EMPTY",
    "OCI_INDEX",
    "OCI_LAYER",
    "OCI_LAYER_GZIP",
    "OCI_LAYER_ZSTD",
    "OCI_MANIFEST",
    "OVERLAYBD_VERSION",
    "STREAMING_FORMAT",
    "STREAMING_PLATFORM_ARCH",
    "STREAMING_PLATFORM_OS",
    "STREAMING_VERSION",
    "Descriptor",
    "Index",
    "Manifest",
    "Platform",
    "canonical_json",
    "digest_hasher",
    "digest_matches",
    "is_overlaybd_manifest",
    "parse_digest",
    "parse_manifest_or_index",
    "sha256_digest",
    "validate_digest",
]

log = logging.getLogger(__name__)

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

MANIFEST_MEDIA_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
INDEX_MEDIA_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})

_OVERLAYBD = "containerd.io/snapshot/overlaybd"
ANNOTATION_BLOB_DIGEST = f"{_OVERLAYBD}/blob-digest"
ANNOTATION_BLOB_SIZE = f"{_OVERLAYBD}/blob-size"
ANNOTATION_VERSION = f"{_OVERLAYBD}/version"
ANNOTATION_BLOB_FS_TYPE = f"{_OVERLAYBD}/blob-fs-type"
ANNOTATION_ACCELERATION_LAYER = f"{_OVERLAYBD}/acceleration-layer"
OVERLAYBD_VERSION = "0.1.0"

ARTIFACT_TYPE_OVERLAYBD = "application/vnd.containerd.overlaybd.native.v1+json"
ARTIFACT_TYPE_ACR_STREAMING = "application/vnd.azure.artifact.streaming.v1"
STREAMING_FORMAT = "streaming.format"
STREAMING_PLATFORM_OS = "streaming.platform.os"
STREAMING_PLATFORM_ARCH = "streaming.platform.arch"
STREAMING_VERSION = "streaming.version"

_SHA256_RE = re.compile(r"sha256:[a-f0-9]{64}")
# The general digest grammar of the image spec; only sha256 is computed here.
_DIGEST_RE = re.compile(r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")
_MEDIA_TYPE_RE = re.compile(
    r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}"
)


def sha256_digest(data: bytes | bytearray | memoryview) -> str:
    """Digest string ``sha256:<hex>`` of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def validate_digest(value: object, field_name: str = "digest") -> str:
    """Return ``value`` if it is a well-formed digest; sha256 ones must be 64 lower-case hex."""
    if not isinstance(value, str) or not _DIGEST_RE.fullmatch(value):
        raise FormatError(f"{field_name}: not a digest", field=field_name, actual=value)
    if value.startswith("sha256:") and not _SHA256_RE.fullmatch(value):
        raise FormatError(
            f"{field_name}: sha256 digest needs 64 lower-case hex digits",
            field=field_name,
            actual=value,
        )
    return value


_HASHES = {"sha256": hashlib.sha256, "sha512": hashlib.sha512}


def digest_hasher(digest: str) -> Any:
    """A fresh hashlib object for the algorithm of ``digest``; raises FormatError if unknown."""
    algorithm, _ = parse_digest(digest)
    if algorithm not in _HASHES:
        raise FormatError(
            f"digest algorithm {algorithm!r} is not supported", field="digest", actual=digest
        )
    return _HASHES[algorithm]()


def digest_matches(digest: str, data: bytes | bytearray | memoryview) -> bool:
    """True if ``data`` hashes to ``digest`` (sha256 or sha512)."""
    hasher = digest_hasher(digest)
    hasher.update(data)
    return hasher.hexdigest() == digest.partition(":")[2]


def parse_digest(value: str) -> tuple[str, str]:
    """Split a valid digest into ``(algorithm, encoded)``; raises FormatError."""
    algorithm, _, encoded = validate_digest(value).partition(":")
    return algorithm, encoded


def canonical_json(obj: Any) -> bytes:
    """Compact JSON bytes for pushing: the digest of a manifest is the digest of these bytes."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _require(obj: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in obj:
        raise FormatError(f"{where}.{key}: missing", field=f"{where}.{key}")
    return _check(obj[key], kind, f"{where}.{key}")


def _optional(obj: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    value = obj.get(key)
    return None if value is None else _check(value, kind, f"{where}.{key}")


def _check(value: Any, kind: type | tuple[type, ...], name: str) -> Any:
    if (isinstance(value, bool) and kind is int) or not isinstance(value, kind):
        raise FormatError(f"{name}: wrong type {type(value).__name__}", field=name, actual=value)
    return value


def _media_type(value: Any, name: str) -> str:
    if not isinstance(value, str) or not _MEDIA_TYPE_RE.fullmatch(value):
        raise FormatError(f"{name}: not a media type", field=name, actual=value)
    return value


def _annotations(obj: Mapping[str, Any], where: str) -> dict[str, str]:
    raw = _optional(obj, "annotations", dict, where) or {}
    for key, value in raw.items():
        if not isinstance(value, str):
            raise FormatError(
                f"{where}.annotations[{key!r}]: not a string", field=key, actual=value
            )
    return dict(raw)


@dataclass(frozen=True, slots=True)
class Platform:
    """Where an image runs. ``variant`` is normalised (arm64 implies v8, arm implies v7)."""

    os: str
    architecture: str
    variant: str = ""
    os_version: str = ""

    @classmethod
    def parse(cls, obj: Mapping[str, Any], where: str = "platform") -> Self:
        _check(obj, dict, where)
        return cls.normalised(
            _require(obj, "os", str, where),
            _require(obj, "architecture", str, where),
            _optional(obj, "variant", str, where) or "",
            _optional(obj, "os.version", str, where) or "",
        )

    @classmethod
    def from_spec(cls, spec: str) -> Self:
        """Parse ``os/arch[/variant]`` as given on a command line (``linux/arm64/v8``)."""
        parts = spec.strip().split("/")
        if not 2 <= len(parts) <= 3 or not all(parts):
            raise FormatError(f"platform {spec!r}: expected os/arch[/variant]", field="platform")
        return cls.normalised(*parts)

    @classmethod
    def normalised(
        cls, os: str, architecture: str, variant: str = "", os_version: str = ""
    ) -> Self:
        arch = {"x86_64": "amd64", "x86-64": "amd64", "aarch64": "arm64", "i386": "386"}.get(
            architecture.lower(), architecture.lower()
        )
        variant = variant.lower()
        if arch == "arm64" and variant in ("", "8"):
            variant = "v8"
        elif arch == "arm" and variant in ("", "7"):
            variant = "v7"
        return cls(os.lower(), arch, variant, os_version)

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)

    def matches(self, wanted: Platform) -> bool:
        """True if an image for ``self`` runs on ``wanted`` (same os, arch and variant)."""
        return (self.os, self.architecture, self.variant) == (
            wanted.os,
            wanted.architecture,
            wanted.variant,
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"architecture": self.architecture, "os": self.os}
        if self.os_version:
            out["os.version"] = self.os_version
        if self.variant:
            out["variant"] = self.variant
        return out


@dataclass(frozen=True, slots=True)
class Descriptor:
    """A content descriptor: what a blob or manifest is, how big, and its digest.

    ``annotations`` is a plain dict for JSON convenience: treat it as read-only.
    """

    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict)
    artifact_type: str | None = None
    platform: Platform | None = None
    urls: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        validate_digest(self.digest)
        if self.size < 0:
            raise FormatError("descriptor.size: negative", field="size", actual=self.size)

    @classmethod
    def parse(cls, obj: Any, where: str = "descriptor") -> Self:
        _check(obj, dict, where)
        size = _require(obj, "size", int, where)
        if size < 0:
            raise FormatError(f"{where}.size: negative", field=f"{where}.size", actual=size)
        platform = obj.get("platform")
        artifact_type = _optional(obj, "artifactType", str, where)
        urls = _optional(obj, "urls", list, where) or []
        for url in urls:
            _check(url, str, f"{where}.urls[]")
        return cls(
            media_type=_media_type(_require(obj, "mediaType", str, where), f"{where}.mediaType"),
            digest=validate_digest(_require(obj, "digest", str, where), f"{where}.digest"),
            size=size,
            annotations=_annotations(obj, where),
            artifact_type=None
            if artifact_type is None
            else _media_type(artifact_type, f"{where}.artifactType"),
            platform=None if platform is None else Platform.parse(platform, f"{where}.platform"),
            urls=tuple(urls),
        )

    @classmethod
    def of(cls, data: bytes, media_type: str, **kwargs: Any) -> Self:
        """Descriptor of ``data`` (digest and size computed)."""
        return cls(media_type=media_type, digest=sha256_digest(data), size=len(data), **kwargs)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
        }
        if self.urls:
            out["urls"] = list(self.urls)
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        if self.artifact_type:
            out["artifactType"] = self.artifact_type
        if self.platform:
            out["platform"] = self.platform.to_json()
        return out


def _load(data: bytes | Mapping[str, Any], what: str) -> Mapping[str, Any]:
    if isinstance(data, Mapping):
        return data
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"{what}: not JSON ({exc})", field=what) from None
    return _check(obj, dict, what)


def _schema_version(obj: Mapping[str, Any], what: str) -> int:
    version = _require(obj, "schemaVersion", int, what)
    if version != 2:
        raise FormatError(
            f"{what}.schemaVersion: unsupported",
            field=f"{what}.schemaVersion",
            expected=2,
            actual=version,
        )
    return version


@dataclass(frozen=True, slots=True)
class Manifest:
    """An image manifest (OCI or Docker schema2): a config blob and ordered layers."""

    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]
    annotations: dict[str, str] = field(default_factory=dict)
    subject: Descriptor | None = None
    artifact_type: str | None = None

    @classmethod
    def parse(cls, data: bytes | Mapping[str, Any], media_type: str | None = None) -> Self:
        """Parse manifest JSON; ``media_type`` (Content-Type) applies if the JSON has none."""
        obj = _load(data, "manifest")
        _schema_version(obj, "manifest")
        mt = _optional(obj, "mediaType", str, "manifest") or media_type or OCI_MANIFEST
        if mt not in MANIFEST_MEDIA_TYPES:
            raise FormatError(
                "manifest.mediaType: not an image manifest", field="mediaType", actual=mt
            )
        layers = _require(obj, "layers", list, "manifest")
        subject = obj.get("subject")
        artifact_type = _optional(obj, "artifactType", str, "manifest")
        return cls(
            media_type=mt,
            config=Descriptor.parse(_require(obj, "config", dict, "manifest"), "manifest.config"),
            layers=tuple(
                Descriptor.parse(d, f"manifest.layers[{i}]") for i, d in enumerate(layers)
            ),
            annotations=_annotations(obj, "manifest"),
            subject=None if subject is None else Descriptor.parse(subject, "manifest.subject"),
            artifact_type=None
            if artifact_type is None
            else _media_type(artifact_type, "manifest.artifactType"),
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"schemaVersion": 2, "mediaType": self.media_type}
        if self.artifact_type:
            out["artifactType"] = self.artifact_type
        out["config"] = self.config.to_json()
        out["layers"] = [d.to_json() for d in self.layers]
        if self.subject:
            out["subject"] = self.subject.to_json()
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        return out

    def to_bytes(self) -> bytes:
        return canonical_json(self.to_json())


@dataclass(frozen=True, slots=True)
class Index:
    """An image index (OCI) or manifest list (Docker): manifests per platform, or referrers."""

    media_type: str
    manifests: tuple[Descriptor, ...]
    annotations: dict[str, str] = field(default_factory=dict)
    subject: Descriptor | None = None
    artifact_type: str | None = None

    @classmethod
    def parse(cls, data: bytes | Mapping[str, Any], media_type: str | None = None) -> Self:
        obj = _load(data, "index")
        _schema_version(obj, "index")
        mt = _optional(obj, "mediaType", str, "index") or media_type or OCI_INDEX
        if mt not in INDEX_MEDIA_TYPES:
            raise FormatError("index.mediaType: not an index", field="mediaType", actual=mt)
        manifests = _require(obj, "manifests", list, "index")
        subject = obj.get("subject")
        artifact_type = _optional(obj, "artifactType", str, "index")
        return cls(
            media_type=mt,
            manifests=tuple(
                Descriptor.parse(d, f"index.manifests[{i}]") for i, d in enumerate(manifests)
            ),
            annotations=_annotations(obj, "index"),
            subject=None if subject is None else Descriptor.parse(subject, "index.subject"),
            artifact_type=None
            if artifact_type is None
            else _media_type(artifact_type, "index.artifactType"),
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"schemaVersion": 2, "mediaType": self.media_type}
        if self.artifact_type:
            out["artifactType"] = self.artifact_type
        out["manifests"] = [d.to_json() for d in self.manifests]
        if self.subject:
            out["subject"] = self.subject.to_json()
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        return out

    def to_bytes(self) -> bytes:
        return canonical_json(self.to_json())


def parse_manifest_or_index(data: bytes, content_type: str | None = None) -> Manifest | Index:
    """Parse either kind, deciding by the JSON ``mediaType``, then Content-Type, then shape."""
    obj = _load(data, "manifest")
    mt = obj.get("mediaType") or (content_type or "").split(";")[0].strip() or None
    if mt in INDEX_MEDIA_TYPES or (mt not in MANIFEST_MEDIA_TYPES and "manifests" in obj):
        return Index.parse(obj, mt if mt in INDEX_MEDIA_TYPES else None)
    return Manifest.parse(obj, mt if mt in MANIFEST_MEDIA_TYPES else None)


def is_overlaybd_manifest(manifest: Manifest) -> bool:
    """True if every layer of ``manifest`` carries the overlaybd blob-digest annotation.

    This is how the original snapshotter recognises a converted image; an image with no
    layers is not one.
    """
    return bool(manifest.layers) and all(
        ANNOTATION_BLOB_DIGEST in layer.annotations for layer in manifest.layers
    )
