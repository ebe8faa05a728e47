"""Referrers: the API (``/v2/<name>/referrers/<digest>``) and the tag-schema fallback.

Discovery asks the API and, when the registry answers 404 (it lacks it), reads the
``<alg>-<hex>`` tag, an OCI index of referrer descriptors. Pushing a manifest with a
``subject`` learns from the ``OCI-Subject`` answer header whether the registry indexed it; if
not, the fallback index is updated: read, append, push, re-read to check our descriptor
survived. Distribution has no conditional PUT, so two concurrent pushers can still lose one
entry if both verify before either overwrites the other: best effort, by design of the spec.
The decisions are pure functions; the async functions only sequence client calls.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal
from urllib.parse import quote

import httpx

from ..errors import FormatError, NotFoundError, RegistryError, TransientError
from ..formats.oci import (
    ARTIFACT_TYPE_ACR_STREAMING,
    ARTIFACT_TYPE_OVERLAYBD,
    OCI_INDEX,
    STREAMING_FORMAT,
    STREAMING_PLATFORM_ARCH,
    STREAMING_PLATFORM_OS,
    Descriptor,
    Index,
    Manifest,
    Platform,
    parse_digest,
    parse_manifest_or_index,
)
from .client import PushedManifest, RegistryClient
from .reference import Reference
from .retry import retry

__all__ = [
    "OVERLAYBD_ARTIFACT_TYPES",
    "ReferrerPush",
    "Referrers",
    "add_to_index",
    "fallback_tag",
    "filter_referrers",
    "list_referrers",
    "next_link",
    "pick_overlaybd_referrer",
    "push_referrer",
    "referrer_descriptor",
    "referrers_url",
]

log = logging.getLogger(__name__)

OVERLAYBD_ARTIFACT_TYPES = (ARTIFACT_TYPE_OVERLAYBD, ARTIFACT_TYPE_ACR_STREAMING)
_LINK_RE = re.compile(r"<([^>]*)>\s*((?:;\s*[^;,]+)*)")
_MAX_PAGES = 1000  # a registry answering Link headers forever is broken, not big
_CREATED = "org.opencontainers.image.created"

Source = Literal["api", "fallback-tag"]


@dataclass(frozen=True, slots=True)
class Referrers:
    """What discovery found, and which path answered (``api`` or ``fallback-tag``)."""

    subject: str
    source: Source
    referrers: tuple[Descriptor, ...]


@dataclass(frozen=True, slots=True)
class ReferrerPush:
    descriptor: Descriptor
    source: Source  # api: the registry indexed the subject; fallback-tag: we updated the tag


def fallback_tag(digest: str) -> str:
    """The tag-schema name for ``digest``: ``<alg>-<hex>``, truncated as the spec says."""
    algorithm, encoded = parse_digest(digest)
    return f"{algorithm[:32]}-{encoded[:64]}"


def referrers_url(repository: str, digest: str, artifact_type: str | None = None) -> str:
    """Path (and query) of the first referrers API page."""
    url = f"/v2/{repository}/referrers/{digest}"
    if artifact_type:
        url += "?artifactType=" + quote(artifact_type, safe="")
    return url


def next_link(header: str | None, base: httpx.URL) -> httpx.URL | None:
    """The ``rel="next"`` target of a ``Link`` header, resolved against ``base``."""
    for match in _LINK_RE.finditer(header or ""):
        params = [p.strip().lower().replace(" ", "") for p in match[2].split(";") if p.strip()]
        if 'rel="next"' in params or "rel=next" in params:
            return base.join(match[1])
    return None


def filter_referrers(
    descriptors: Iterable[Descriptor], artifact_types: Sequence[str] | None
) -> tuple[Descriptor, ...]:
    """Keep descriptors whose ``artifactType`` is one of ``artifact_types`` (None: keep all)."""
    if not artifact_types:
        return tuple(descriptors)
    return tuple(d for d in descriptors if d.artifact_type in artifact_types)


def referrer_descriptor(content: bytes, parsed: Manifest | Index, media_type: str) -> Descriptor:
    """The descriptor a referrers list holds for a pushed manifest: artifactType (for a
    manifest without one, its config media type, as the spec says) and its annotations."""
    artifact_type = parsed.artifact_type
    if artifact_type is None and isinstance(parsed, Manifest):
        artifact_type = parsed.config.media_type
    return Descriptor.of(
        content, media_type, annotations=dict(parsed.annotations), artifact_type=artifact_type
    )


def add_to_index(index: Index | None, descriptor: Descriptor) -> Index:
    """``index`` with ``descriptor`` appended (replacing an entry of the same digest)."""
    kept = tuple(d for d in (index.manifests if index else ()) if d.digest != descriptor.digest)
    return Index(OCI_INDEX, (*kept, descriptor), dict(index.annotations) if index else {})


def pick_overlaybd_referrer(
    descriptors: Iterable[Descriptor], platform: Platform | None = None
) -> Descriptor | None:
    """The overlaybd artifact among ``descriptors``, or None.

    Upstream flavour: ``artifactType`` is the overlaybd native type. ACR flavour: the
    streaming type with ``streaming.format=overlaybd``, and, when ``platform`` is given,
    matching ``streaming.platform.os``/``.arch`` annotations. Among several, the newest by
    ``org.opencontainers.image.created`` wins, then the first listed.
    """
    found: list[Descriptor] = []
    for d in descriptors:
        if d.artifact_type == ARTIFACT_TYPE_OVERLAYBD:
            found.append(d)
        elif d.artifact_type == ARTIFACT_TYPE_ACR_STREAMING:
            notes = d.annotations
            if notes.get(STREAMING_FORMAT) != "overlaybd":
                continue
            if platform is not None and (
                notes.get(STREAMING_PLATFORM_OS, platform.os) != platform.os
                or Platform.normalised(
                    "linux", notes.get(STREAMING_PLATFORM_ARCH, platform.architecture)
                ).architecture
                != platform.architecture
            ):
                continue
            found.append(d)
    if not found:
        return None
    newest = max(d.annotations.get(_CREATED, "") for d in found)
    return next(d for d in found if d.annotations.get(_CREATED, "") == newest)


async def list_referrers(
    client: RegistryClient, ref: Reference, digest: str, artifact_type: str | None = None
) -> Referrers:
    """Referrers of ``digest`` in ``ref``'s repository: the API, else the fallback tag.

    Filters by ``artifact_type`` client-side when the registry did not (no
    ``OCI-Filters-Applied: artifactType`` header), as the spec allows either.
    """
    wanted = (artifact_type,) if artifact_type else None
    url: httpx.URL | str | None = referrers_url(ref.repository, digest, artifact_type)
    found: list[Descriptor] = []
    pages = 0
    while url is not None:
        page = await client.referrers_page(ref, str(url))
        if page is None:
            if pages:
                raise RegistryError(f"referrers of {digest}: page {pages + 1} vanished (404)")
            return await _from_fallback_tag(client, ref, digest, wanted)
        body, content_type, headers, final_url = page
        index = parse_manifest_or_index(body, content_type or OCI_INDEX)
        if not isinstance(index, Index):
            raise FormatError("referrers answer is not an index", field="mediaType")
        applied = "artifacttype" in headers.get("oci-filters-applied", "").lower()
        found.extend(index.manifests if applied else filter_referrers(index.manifests, wanted))
        pages += 1
        if pages >= _MAX_PAGES:
            raise RegistryError(f"referrers of {digest}: more than {_MAX_PAGES} pages")
        url = next_link(headers.get("link"), final_url)
    return Referrers(digest, "api", tuple(found))


async def _from_fallback_tag(
    client: RegistryClient, ref: Reference, digest: str, wanted: Sequence[str] | None
) -> Referrers:
    index = await _read_fallback_index(client, ref, digest)
    manifests = index.manifests if index is not None else ()
    return Referrers(digest, "fallback-tag", filter_referrers(manifests, wanted))


async def _read_fallback_index(
    client: RegistryClient, ref: Reference, digest: str, *, origin_only: bool = False
) -> Index | None:
    try:
        fetched = await client.get_manifest(
            ref.with_tag(fallback_tag(digest)), origin_only=origin_only
        )
    except NotFoundError:
        return None
    if not isinstance(fetched.parsed, Index):
        raise FormatError(
            f"fallback tag {fallback_tag(digest)} is not an index",
            field="mediaType",
            actual=fetched.descriptor.media_type,
        )
    return fetched.parsed


async def push_referrer(
    client: RegistryClient, ref: Reference, content: bytes, media_type: str
) -> ReferrerPush:
    """Push a manifest or index that has a ``subject``, and make it discoverable.

    Pushed by digest (a referrer needs no tag). If the registry does not answer
    ``OCI-Subject``, the fallback index of the subject is updated and verified.
    """
    parsed = parse_manifest_or_index(content, media_type)
    if parsed.subject is None:
        raise FormatError("a referrer needs a subject", field="subject")
    pushed: PushedManifest = await client.push_manifest(ref.repository_ref, content, media_type)
    descriptor = referrer_descriptor(content, parsed, media_type)
    if pushed.oci_subject is not None:
        return ReferrerPush(descriptor, "api")
    subject = parsed.subject.digest
    await retry(
        lambda: _add_to_fallback(client, ref, subject, descriptor),
        policy=client.retry_policy,
        what=f"update referrers tag {fallback_tag(subject)}",
    )
    return ReferrerPush(descriptor, "fallback-tag")


async def _add_to_fallback(
    client: RegistryClient, ref: Reference, subject: str, descriptor: Descriptor
) -> None:
    tag_ref = ref.with_tag(fallback_tag(subject))
    index = await _read_fallback_index(client, ref, subject, origin_only=True)
    if index is None or all(d.digest != descriptor.digest for d in index.manifests):
        updated = add_to_index(index, descriptor)
        await client.push_manifest(tag_ref, updated.to_bytes(), OCI_INDEX)
    check = await _read_fallback_index(client, ref, subject, origin_only=True)
    if check is None or all(d.digest != descriptor.digest for d in check.manifests):
        # Another pusher replaced the index between our read and our write.
        raise TransientError(f"{tag_ref}: our referrer was overwritten by a concurrent push")
