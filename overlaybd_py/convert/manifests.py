"""What a converted image looks like on the wire (DESIGN.md section 4). Pure functions.

Layer UUIDs derive from the source chainID, so converting the same source twice names the
layers the same; the config keeps everything of the source (history, env, entrypoint) except
``rootfs.diff_ids``, which become the overlaybd blob digests.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

from ..errors import FormatError
from ..formats import oci
from ..formats.oci import Descriptor, Manifest, Platform

__all__ = [
    "FLAVOURS",
    "chain_ids",
    "converted_config",
    "converted_manifest",
    "diff_ids",
    "layer_uuid",
]

FLAVOURS = ("upstream", "acr")


def diff_ids(config: dict[str, Any], layer_count: int, where: str) -> list[str]:
    rootfs = config.get("rootfs")
    ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(ids, list) or len(ids) != layer_count:
        raise FormatError(
            f"{where}: config rootfs.diff_ids does not list one digest per layer",
            field="rootfs.diff_ids", expected=layer_count,
            actual=len(ids) if isinstance(ids, list) else ids,
        )
    for value in ids:
        oci.validate_digest(value, "rootfs.diff_ids[]")
    return list(ids)


def chain_ids(ids: Sequence[str]) -> list[str]:
    """OCI chainIDs: ChainID(L0) = DiffID(L0); ChainID(Ln) = sha256(ChainID(Ln-1) + " " +
    DiffID(Ln))."""
    chains: list[str] = []
    for diff_id in ids:
        if not chains:
            chains.append(diff_id)
        else:
            joined = f"{chains[-1]} {diff_id}".encode()
            chains.append("sha256:" + hashlib.sha256(joined).hexdigest())
    return chains


def layer_uuid(chain_id: str) -> str:
    """First 32 hex digits of the chainID as an upper-case 8-4-4-4-12 UUID."""
    h = chain_id.partition(":")[2][:32].upper()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


def converted_config(source: dict[str, Any], blob_digests: Sequence[str]) -> bytes:
    config = json.loads(json.dumps(source))  # deep copy
    config.setdefault("rootfs", {})["type"] = "layers"
    config["rootfs"]["diff_ids"] = list(blob_digests)
    return json.dumps(config, separators=(",", ":"), sort_keys=True).encode()


def converted_manifest(
    source: Manifest,
    config: Descriptor,
    blobs: Sequence[Descriptor],
    *,
    subject: Descriptor | None = None,
    flavour: str = "upstream",
    platform: Platform | None = None,
) -> Manifest:
    """The overlaybd manifest. With ``subject`` it is a referrer artifact (always OCI, with
    the flavour's artifactType and annotations); without, it keeps the source's media type
    family (OCI or Docker schema2)."""
    docker = source.media_type == oci.DOCKER_MANIFEST and subject is None
    layer_type = oci.DOCKER_LAYER if docker else oci.OCI_LAYER
    layers = tuple(
        Descriptor(layer_type, blob.digest, blob.size, annotations={
            oci.ANNOTATION_BLOB_DIGEST: blob.digest,
            oci.ANNOTATION_BLOB_SIZE: str(blob.size),
            oci.ANNOTATION_VERSION: oci.OVERLAYBD_VERSION,
            oci.ANNOTATION_BLOB_FS_TYPE: "ext4",
        })
        for blob in blobs
    )
    if subject is None:
        media_type = oci.DOCKER_MANIFEST if docker else oci.OCI_MANIFEST
        config_type = config.media_type
        if not docker and config_type == oci.DOCKER_CONFIG:
            config_type = oci.OCI_CONFIG
        return Manifest(media_type, Descriptor(config_type, config.digest, config.size), layers)
    config_desc = Descriptor(oci.OCI_CONFIG, config.digest, config.size)
    if flavour == "upstream":
        return Manifest(oci.OCI_MANIFEST, config_desc, layers, subject=subject,
                        artifact_type=oci.ARTIFACT_TYPE_OVERLAYBD)
    if flavour == "acr":
        notes = {oci.STREAMING_FORMAT: "overlaybd", oci.STREAMING_VERSION: "v1"}
        if platform is not None:
            notes[oci.STREAMING_PLATFORM_OS] = platform.os
            notes[oci.STREAMING_PLATFORM_ARCH] = platform.architecture
        return Manifest(oci.OCI_MANIFEST, config_desc, layers, annotations=notes,
                        subject=subject, artifact_type=oci.ARTIFACT_TYPE_ACR_STREAMING)
    raise ValueError(f"unknown flavour {flavour!r}")
