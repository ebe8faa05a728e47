"""``overlaybd-py pull``: put an overlaybd image into containerd without downloading layers.

What the original's ``ctr rpull`` does, through containerd's gRPC API: resolve the image
(directly or through its overlaybd referrer) in the registry; then, under a lease, write the
manifest and config into containerd's content store, Prepare each layer's snapshot through
containerd with the labels that make our snapshotter commit it as a remote snapshot
(``containerd.io/snapshot.ref`` = the chain ID, the overlaybd blob labels and
``containerd.io/snapshot/image-ref``; AlreadyExists means done; an acceleration layer too,
which the snapshotter prefetches from instead of stacking), set the garbage-collection
labels containerd's own pull sets, and create the image record. ``ctr run --snapshotter``
then finds the image unpacked. Only the manifest(s) and config cross the network.
"""

from __future__ import annotations

import datetime
import json
import logging
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import trio
from google.protobuf import empty_pb2, field_mask_pb2

from ..convert.manifests import chain_ids
from ..errors import FormatError, MountError, UsageError
from ..formats import oci
from ..formats.oci import Manifest, Platform
from ..registry import ClientConfig, Reference, RegistryClient
from ..resolve import resolve_overlaybd
from ._proto import (
    content_pb2,
    content_pb2_grpc,
    images_pb2,
    images_pb2_grpc,
    leases_pb2,
    leases_pb2_grpc,
    snapshots_pb2,
    snapshots_pb2_grpc,
    types_pb2,
    version_pb2_grpc,
)
from .service import LABEL_IMAGE_REF, LABEL_SNAPSHOT_REF

__all__ = ["PullResult", "chain_ids", "pull"]

log = logging.getLogger(__name__)

_LEASE_EXPIRY = datetime.timedelta(hours=1)  # a crashed pull's lease lets GC clean up later
_WRITE_CHUNK = 1 << 20
_TIMEOUT = 60.0  # seconds per containerd call


@dataclass(frozen=True)
class PullResult:
    image: str  # the image record's name
    manifest: str  # digest of the overlaybd manifest the record points at
    via: str
    layers: int
    chain_id: str
    remote_snapshots: int  # layers committed as remote snapshots by this pull
    existing_snapshots: int  # layers already there


@dataclass(frozen=True)
class _Resolved:
    image: Reference  # the overlaybd manifest (repository + digest)
    via: str
    media_type: str
    manifest_bytes: bytes
    manifest: Manifest
    config_bytes: bytes


async def _resolve(ref: Reference, config: ClientConfig,
                   platform: Platform | None) -> _Resolved:
    async with await RegistryClient.open(config) as client:
        resolved = await resolve_overlaybd(client, ref, platform)
        fetched = resolved.fetched
        config_bytes = await client.get_blob(resolved.image, resolved.manifest.config)
    return _Resolved(resolved.image, resolved.via, fetched.descriptor.media_type,
                     fetched.content, resolved.manifest, config_bytes)


def _diff_ids(resolved: _Resolved) -> list[str]:
    try:
        config = json.loads(resolved.config_bytes)
        diff_ids = config["rootfs"]["diff_ids"]
    except (ValueError, KeyError, TypeError):
        raise FormatError(f"{resolved.image}: the image config has no rootfs.diff_ids",
                          field="rootfs.diff_ids") from None
    if not isinstance(diff_ids, list) or len(diff_ids) != len(resolved.manifest.layers):
        raise FormatError(f"{resolved.image}: {len(resolved.manifest.layers)} layers but "
                          f"{len(diff_ids) if isinstance(diff_ids, list) else 0} diff_ids",
                          field="rootfs.diff_ids")
    return [oci.validate_digest(d, "rootfs.diff_ids") for d in diff_ids]


class _Containerd:
    """The few containerd services a pull needs, on one channel, in one namespace."""

    def __init__(self, address: str, namespace: str) -> None:
        self.address = address
        self.channel = grpc.insecure_channel(f"unix://{address}")
        self.metadata: list[tuple[str, str]] = [("containerd-namespace", namespace)]
        self.content = content_pb2_grpc.ContentStub(self.channel)
        self.leases = leases_pb2_grpc.LeasesStub(self.channel)
        self.images = images_pb2_grpc.ImagesStub(self.channel)
        self.snapshots = snapshots_pb2_grpc.SnapshotsStub(self.channel)

    def call(self, method, request, what: str):
        try:
            return method(request, metadata=self.metadata, timeout=_TIMEOUT)
        except grpc.RpcError as exc:
            raise _translate(exc, what, self.address) from None

    def check(self) -> str:
        stub = version_pb2_grpc.VersionStub(self.channel)
        return self.call(stub.Version, empty_pb2.Empty(), "version").version

    def write(self, data: bytes, media_type: str, labels: dict[str, str]) -> str:
        """Store ``data`` in the content store with ``labels``; returns its digest."""
        digest = oci.sha256_digest(data)

        def requests() -> Iterator[content_pb2.WriteContentRequest]:
            ref = f"overlaybd-py-pull-{digest}"
            yield content_pb2.WriteContentRequest(action=content_pb2.STAT, ref=ref,
                                                  total=len(data), expected=digest)
            for offset in range(0, len(data), _WRITE_CHUNK):
                yield content_pb2.WriteContentRequest(
                    action=content_pb2.WRITE, ref=ref, offset=offset,
                    data=data[offset:offset + _WRITE_CHUNK])
            # The offset must be the current one: an offset of 0 truncates the write.
            yield content_pb2.WriteContentRequest(action=content_pb2.COMMIT, ref=ref,
                                                  total=len(data), expected=digest,
                                                  offset=len(data), labels=labels)

        try:
            for _ in self.content.Write(requests(), metadata=self.metadata, timeout=_TIMEOUT):
                pass
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise _translate(exc, f"writing {media_type} {digest}", self.address) from None
            self.set_labels(digest, labels)  # already stored: make sure it is referenced
        return digest

    def set_labels(self, digest: str, labels: dict[str, str]) -> None:
        request = content_pb2.UpdateRequest(
            info=content_pb2.Info(digest=digest, labels=labels),
            update_mask=field_mask_pb2.FieldMask(paths=[f"labels.{k}" for k in labels]))
        self.call(self.content.Update, request, f"labelling {digest}")


def _translate(exc: grpc.RpcError, what: str, address: str) -> Exception:
    code, detail = exc.code(), exc.details() or ""
    if code == grpc.StatusCode.UNAVAILABLE:
        return MountError(f"cannot reach containerd at {address} ({detail})")
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND):
        return UsageError(f"containerd refused {what}: {detail}")
    return MountError(f"containerd: {what} failed ({code.name}: {detail})")


def _snapshot_labels(layer: oci.Descriptor, chain_id: str, image: Reference,
                     manifest_digest: str) -> dict[str, str]:
    labels = {k: v for k, v in layer.annotations.items()
              if k.startswith("containerd.io/snapshot/")}
    labels[LABEL_SNAPSHOT_REF] = chain_id
    labels[LABEL_IMAGE_REF] = str(image)
    labels["containerd.io/snapshot/cri.layer-digest"] = layer.digest
    labels["containerd.io/snapshot/cri.manifest-digest"] = manifest_digest
    return labels


def _prepare_remote(ctd: _Containerd, snapshotter: str, layer: oci.Descriptor, index: int,
                    chain_id: str, parent: str, labels: dict[str, str]) -> bool:
    """Commit one layer as a remote snapshot; False if it was already there."""
    stat = snapshots_pb2.StatSnapshotRequest(snapshotter=snapshotter, key=chain_id)
    try:
        ctd.snapshots.Stat(stat, metadata=ctd.metadata, timeout=_TIMEOUT)
        return False
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.NOT_FOUND:
            raise _translate(exc, f"stat of snapshot {chain_id}", ctd.address) from None
    key = f"extract-{time.time_ns()}-{secrets.token_hex(4)} {chain_id}"
    request = snapshots_pb2.PrepareSnapshotRequest(snapshotter=snapshotter, key=key,
                                                   parent=parent, labels=labels)
    try:
        ctd.snapshots.Prepare(request, metadata=ctd.metadata, timeout=_TIMEOUT)
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.ALREADY_EXISTS:
            return True  # committed as a remote snapshot: nothing to download
        raise _translate(exc, f"prepare of layer {index} ({layer.digest})", ctd.address) from None
    # The snapshotter made an ordinary active snapshot: it is not overlaybd-py's.
    ctd.call(ctd.snapshots.Remove,
             snapshots_pb2.RemoveSnapshotRequest(snapshotter=snapshotter, key=key), "remove")
    raise UsageError(f"snapshotter {snapshotter!r} did not take layer {index} as a remote "
                     "layer: is it overlaybd-py's snapshotter?")


def pull(ref: str, *, address: str, namespace: str, snapshotter: str, client: ClientConfig,
         platform: Platform | None = None) -> PullResult:
    """Pull ``ref`` into containerd (module docstring). Raises UsageError, MountError
    (containerd unreachable or failing), RegistryError and FormatError."""
    reference = Reference.parse(ref)
    ctd = _Containerd(address, namespace)
    try:
        version = ctd.check()
        log.info("containerd %s at %s", version, address)
        resolved = trio.run(_resolve, reference, client, platform)
        return _pull(ctd, reference, resolved, snapshotter)
    finally:
        ctd.channel.close()


def _pull(ctd: _Containerd, reference: Reference, resolved: _Resolved,
          snapshotter: str) -> PullResult:
    layers = list(resolved.manifest.layers)
    chains = chain_ids(_diff_ids(resolved))
    manifest_digest = oci.sha256_digest(resolved.manifest_bytes)
    source = {f"containerd.io/distribution.source.{resolved.image.registry}":
              resolved.image.repository}
    expires = datetime.datetime.now(datetime.UTC) + _LEASE_EXPIRY
    lease_id = f"overlaybd-py-pull-{secrets.token_hex(8)}"
    ctd.call(ctd.leases.Create, leases_pb2.CreateRequest(
        id=lease_id, labels={"containerd.io/gc.expire": expires.strftime("%Y-%m-%dT%H:%M:%SZ")}),
        "lease creation")
    ctd.metadata.append(("containerd-lease", lease_id))
    try:
        created = existing = 0
        for i, (layer, chain_id) in enumerate(zip(layers, chains, strict=True)):
            labels = _snapshot_labels(layer, chain_id, resolved.image, manifest_digest)
            parent = chains[i - 1] if i else ""
            if _prepare_remote(ctd, snapshotter, layer, i, chain_id, parent, labels):
                created += 1
            else:
                existing += 1
        # The garbage-collection references containerd's own pull and unpack set (layers
        # are not referenced: they are not in the content store, as with ctr rpull).
        config_digest = ctd.write(resolved.config_bytes, resolved.manifest.config.media_type, {
            **source, f"containerd.io/gc.ref.snapshot.{snapshotter}": chains[-1]})
        if config_digest != resolved.manifest.config.digest:
            raise FormatError(f"{resolved.image}: config digest mismatch",
                              expected=resolved.manifest.config.digest, actual=config_digest)
        ctd.write(resolved.manifest_bytes, resolved.media_type,
                  {**source, "containerd.io/gc.ref.content.config": config_digest})
        name = str(reference)
        image = images_pb2.Image(name=name, target=types_pb2.Descriptor(
            media_type=resolved.media_type, digest=manifest_digest,
            size=len(resolved.manifest_bytes)))
        try:
            ctd.images.Create(images_pb2.CreateImageRequest(image=image),
                              metadata=ctd.metadata, timeout=_TIMEOUT)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise _translate(exc, f"creating image {name}", ctd.address) from None
            ctd.call(ctd.images.Update, images_pb2.UpdateImageRequest(image=image),
                     f"updating image {name}")
    finally:
        ctd.metadata.pop()
        try:
            ctd.call(ctd.leases.Delete, leases_pb2.DeleteRequest(id=lease_id), "lease deletion")
        except (MountError, UsageError) as exc:
            log.warning("could not delete lease %s (it expires by itself): %s", lease_id, exc)
    return PullResult(name, manifest_digest, resolved.via, len(layers), chains[-1], created,
                      existing)
