"""``trace push``: add a trace to an overlaybd image as its acceleration layer (the original's
form of a shipped prefetch trace) and push the new manifest.

The layer is a plain tar (``application/vnd.oci.image.layer.v1.tar``) with one member named
``trace``; its diff_id is its digest; its annotations are the overlaybd blob-digest,
blob-size and version plus ``containerd.io/snapshot/overlaybd/acceleration-layer: yes``. It
is always the top layer and never part of the filesystem (``resolve.overlaybd_layers`` takes
it off). A previous acceleration layer is replaced. An image found directly is re-tagged
(``REF``'s tag, or ``dest``); an image found as a referrer is pushed as a new referrer of the
same subject, newer by ``org.opencontainers.image.created``, and on a registry without the
referrers API the old one is also dropped from the fallback tag's index.
"""

from __future__ import annotations

import datetime
import json
import logging
from dataclasses import replace
from typing import Any

from ..errors import FormatError, UsageError
from ..formats import oci
from ..formats import trace as tracefmt
from ..formats.oci import Descriptor, Index, Manifest
from ..registry import RegistryClient, fallback_tag, list_referrers, push_referrer
from ..registry.reference import Reference
from ..resolve import resolve_overlaybd

__all__ = ["push_trace"]

log = logging.getLogger(__name__)

CREATED = "org.opencontainers.image.created"


def acceleration_descriptor(layer_tar: bytes) -> Descriptor:
    digest = oci.sha256_digest(layer_tar)
    return Descriptor(oci.OCI_LAYER, digest, len(layer_tar), annotations={
        oci.ANNOTATION_BLOB_DIGEST: digest,
        oci.ANNOTATION_BLOB_SIZE: str(len(layer_tar)),
        oci.ANNOTATION_VERSION: oci.OVERLAYBD_VERSION,
        oci.ANNOTATION_ACCELERATION_LAYER: "yes",
    })


def _check_fits(source: tracefmt.TraceFile | tracefmt.PriorityList, layers: int) -> None:
    if isinstance(source, tracefmt.TraceFile):
        bad = sorted({r.layer_index for r in source.records if r.layer_index >= layers})
        if bad:
            raise UsageError(f"the trace names layer(s) {bad} but the image has {layers} "
                             "filesystem layers: it was recorded on another image")


async def push_trace(client: RegistryClient, ref: Reference, trace: bytes,
                     dest: Reference | None = None) -> dict[str, Any]:
    """Push ``ref``'s overlaybd image with ``trace`` (a trace file or a priority list) as its
    acceleration layer. Returns what was pushed (digests, how). Raises UsageError when the
    trace does not fit the image, FormatError/RegistryError from the registry side."""
    source = tracefmt.decode_prefetch_input(trace)
    resolved = await resolve_overlaybd(client, ref)
    _check_fits(source, len(resolved.layers))
    image = resolved.image
    manifest = resolved.manifest
    config_bytes = await client.get_blob(image, manifest.config)
    try:
        config = json.loads(config_bytes)
        diff_ids = config["rootfs"]["diff_ids"]
    except (ValueError, KeyError, TypeError):
        raise FormatError(f"{image}: config has no rootfs.diff_ids", field="rootfs") from None
    layer_tar = tracefmt.acceleration_layer_tar(trace)
    accel = acceleration_descriptor(layer_tar)
    # diff_ids of the filesystem layers stay; a previous acceleration layer's goes.
    config["rootfs"]["diff_ids"] = [*diff_ids[: len(resolved.layers)], accel.digest]
    new_config = oci.canonical_json(config)
    target = dest or ref
    pushed_layer = await client.push_blob(target, layer_tar, media_type=oci.OCI_LAYER)
    assert pushed_layer.digest == accel.digest
    config_desc = await client.push_blob(target, new_config, media_type=manifest.config.media_type)
    config_desc = replace(manifest.config, digest=config_desc.digest, size=config_desc.size)
    annotations = dict(manifest.annotations)
    result: dict[str, Any] = {"acceleration_layer": accel.to_json(),
                              "replaced_acceleration_layer": (
                                  resolved.acceleration_layer.digest
                                  if resolved.acceleration_layer else None),
                              "previous_manifest": image.digest}
    referrer = resolved.via.startswith("referrer") and dest is None
    if referrer:
        annotations[CREATED] = datetime.datetime.now(datetime.UTC).strftime(
            "%Y-%m-%dT%H:%M:%S.%fZ")
    new = Manifest(manifest.media_type, config_desc, (*resolved.layers, accel), annotations,
                   manifest.subject, manifest.artifact_type)
    content = new.to_bytes()
    if not referrer:
        if dest is None and not ref.tag:
            raise UsageError(f"{ref} names a digest: give --dest REF to tag the new manifest")
        pushed = await client.push_manifest(target, content, new.media_type)
        result.update(manifest=pushed.descriptor.digest, pushed_as="tag", ref=str(target))
        return result
    if new.subject is None:
        raise FormatError(f"{image}: found as a referrer but has no subject", field="subject")
    found = await list_referrers(client, ref, new.subject.digest)
    if all(d.digest != image.digest for d in found.referrers):
        raise UsageError(f"{image} is a platform manifest inside a referrer index: push the "
                         "trace to it with --dest REF, or convert per platform")
    pushed_ref = await push_referrer(client, ref, content, new.media_type)
    result.update(manifest=pushed_ref.descriptor.digest, pushed_as="referrer",
                  subject=new.subject.digest, discovered_via=pushed_ref.source)
    if pushed_ref.source == "fallback-tag":
        await _drop_from_fallback(client, ref, new.subject.digest, image.digest)
    return result


async def _drop_from_fallback(client: RegistryClient, ref: Reference, subject: str,
                              old: str) -> None:
    tag_ref = ref.with_tag(fallback_tag(subject))
    fetched = await client.get_manifest(tag_ref, origin_only=True)
    if not isinstance(fetched.parsed, Index):
        return
    kept = tuple(d for d in fetched.parsed.manifests if d.digest != old)
    if len(kept) == len(fetched.parsed.manifests):
        return
    index = Index(oci.OCI_INDEX, kept, dict(fetched.parsed.annotations))
    await client.push_manifest(tag_ref, index.to_bytes(), oci.OCI_INDEX)
    log.info("dropped the replaced referrer %s from %s", old, tag_ref)
