"""An ordinary full pull: every layer of an image downloaded and unpacked into a directory.

This is what ``mount --fallback`` does when an image has no overlaybd form, so that a user
always gets a working rootfs, and the baseline of the cold-start experiments. Layers are
streamed (downloaded, checked, decompressed and applied in one pass) with the same OCI layer
semantics as the converter (whiteouts, opaque directories, hard links, safe paths).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from functools import partial

from ..errors import FormatError, UsageError
from ..formats import oci
from ..formats.oci import Platform
from ..registry import Reference, RegistryClient
from .source_stream import stream_layer_into
from .tar_apply import apply_tar

__all__ = ["UnpackResult", "unpack_image"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UnpackResult:
    digest: str  # the manifest unpacked
    layers: int
    bytes_downloaded: int
    entries: int


async def unpack_image(client: RegistryClient, ref: Reference, target: str,
                       platform: Platform | None = None) -> UnpackResult:
    """Pull ``ref`` and unpack its layers, bottom first, into the directory ``target``."""
    if not os.path.isdir(target):
        raise UsageError(f"unpack target {target} is not a directory")
    manifest, _index = await client.resolve(ref, platform)
    layers = manifest.parsed.layers
    if oci.is_overlaybd_manifest(manifest.parsed):
        raise UsageError(f"{ref} is an overlaybd image: mount it instead of unpacking it")
    downloaded = entries = 0
    for layer in layers:
        if layer.media_type not in (oci.OCI_LAYER, oci.OCI_LAYER_GZIP, oci.OCI_LAYER_ZSTD,
                                    oci.DOCKER_LAYER, oci.DOCKER_LAYER_GZIP):
            raise FormatError(f"{ref}: layer {layer.digest} has media type {layer.media_type}",
                              field="layers[].mediaType", actual=layer.media_type)
        consume = partial(apply_tar, root=target, layer=layer.digest)
        stats = await stream_layer_into(client, manifest.reference, layer, consume)
        downloaded += layer.size
        entries += stats.entries
        log.info("unpacked layer %s (%d entries)", layer.digest, stats.entries)
    return UnpackResult(manifest.descriptor.digest, len(layers), downloaded, entries)
