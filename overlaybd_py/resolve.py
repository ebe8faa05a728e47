"""From a reference to the overlaybd image to mount: direct, or through a referrer artifact.

``mount REF`` accepts an overlaybd image or an ordinary image with an overlaybd referrer
(upstream or ACR flavour, DESIGN.md section 4). Discovery looks at the referrers of the
platform manifest first, then of the index it came from; each lookup tries the referrers
API, then the ``sha256-<hex>`` fallback tag. The result lists the layer blobs bottom first,
without the acceleration (trace) layer, which is returned apart.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .errors import FormatError, NotOverlaybdError, UnsupportedFormatError
from .formats import oci
from .formats.oci import Descriptor, Index, Manifest, Platform
from .registry import (
    FetchedManifest,
    RegistryClient,
    list_referrers,
    pick_overlaybd_referrer,
    select_manifest,
)
from .registry.reference import Reference

__all__ = ["ResolvedImage", "overlaybd_layers", "resolve_overlaybd"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResolvedImage:
    requested: Reference
    source_digest: str  # the manifest the user's reference resolved to
    fetched: FetchedManifest  # the overlaybd manifest as fetched (bytes, media type)
    layers: list[Descriptor]  # bottom first, acceleration layer excluded
    acceleration_layer: Descriptor | None
    via: str  # "direct", "referrer:api" or "referrer:fallback-tag"

    @property
    def image(self) -> Reference:
        """The overlaybd manifest (repository + digest)."""
        return self.fetched.reference

    @property
    def manifest(self) -> Manifest:
        return self.fetched.parsed  # type: ignore[return-value]  # checked when resolved


def overlaybd_layers(manifest: Manifest, where: str) -> tuple[list[Descriptor], Descriptor | None]:
    """Split an overlaybd manifest's layers into filesystem layers and the optional
    acceleration layer (which must be the last). Raises FormatError when the manifest is not
    an overlaybd image."""
    layers = list(manifest.layers)
    accel = None
    if layers and layers[-1].annotations.get(oci.ANNOTATION_ACCELERATION_LAYER) == "yes":
        accel = layers.pop()
    if not layers:
        raise FormatError(f"{where}: the overlaybd manifest has no layers", field="layers")
    for i, layer in enumerate(layers):
        notes = layer.annotations
        if oci.ANNOTATION_BLOB_DIGEST not in notes:
            raise FormatError(
                f"{where}: layer {i} ({layer.digest}) is not an overlaybd layer",
                field=f"layers[{i}].annotations", expected=oci.ANNOTATION_BLOB_DIGEST,
            )
        if notes[oci.ANNOTATION_BLOB_DIGEST] != layer.digest:
            raise FormatError(
                f"{where}: layer {i} annotation blob-digest differs from its digest",
                field=f"layers[{i}].annotations", expected=layer.digest,
                actual=notes[oci.ANNOTATION_BLOB_DIGEST],
            )
        fs_type = notes.get(oci.ANNOTATION_BLOB_FS_TYPE, "ext4")
        if fs_type != "ext4":
            raise UnsupportedFormatError(
                f"{where}: layer {i} holds a {fs_type} filesystem; overlaybd-py mounts ext4 only",
                field=f"layers[{i}].annotations", actual=fs_type,
            )
        if layer.annotations.get(oci.ANNOTATION_ACCELERATION_LAYER) == "yes":
            raise FormatError(f"{where}: acceleration layer {i} is not the top layer",
                              field=f"layers[{i}]")
    return layers, accel


async def _referrer(client: RegistryClient, ref: Reference, digest: str,
                    platform: Platform | None) -> tuple[Descriptor, str] | None:
    found = await list_referrers(client, ref, digest)
    chosen = pick_overlaybd_referrer(found.referrers, platform)
    if chosen is None:
        return None
    return chosen, found.source


async def resolve_overlaybd(client: RegistryClient, ref: Reference,
                            platform: Platform | None = None) -> ResolvedImage:
    """Find the overlaybd image for ``ref`` (see the module docstring).

    Raises NotOverlaybdError (a NotFoundError) naming what was checked when there is none.
    """
    manifest, index = await client.resolve(ref, platform)
    source_digest = manifest.descriptor.digest
    if oci.is_overlaybd_manifest(manifest.parsed):
        layers, accel = overlaybd_layers(manifest.parsed, str(ref))
        return ResolvedImage(ref, source_digest, manifest, layers, accel, "direct")
    subjects = [source_digest] + ([index.descriptor.digest] if index is not None else [])
    for subject in subjects:
        hit = await _referrer(client, ref, subject, platform)
        if hit is None:
            continue
        descriptor, source = hit
        found = await client.get_manifest(ref.with_digest(descriptor.digest))
        parsed = found.parsed
        if isinstance(parsed, Index):
            # Upstream flavour of a multi-platform source: one converted index.
            child = select_manifest(parsed, platform)
            found = await client.get_manifest(ref.with_digest(child.digest))
            parsed = found.parsed
        if not isinstance(parsed, Manifest) or not oci.is_overlaybd_manifest(parsed):
            raise FormatError(f"{ref}: referrer {descriptor.digest} is not an overlaybd image",
                              field="layers")
        layers, accel = overlaybd_layers(parsed, f"{ref} (referrer {descriptor.digest})")
        log.info("%s: using overlaybd referrer %s (found via %s)", ref, found.reference, source)
        return ResolvedImage(ref, source_digest, found, layers, accel, f"referrer:{source}")
    raise NotOverlaybdError(
        f"{ref} is not an overlaybd image and has no overlaybd referrer (checked the referrers "
        f"of {', '.join(subjects)} through the referrers API and the sha256-<hex> fallback tag); "
        "convert it with 'overlaybd-py convert --referrer', or mount with --fallback for an "
        "ordinary full pull"
    )
