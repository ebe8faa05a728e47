"""OCI image -> overlaybd image, pushed as a new image or as a referrer of the source.

Theory of operation
-------------------
Each source layer is applied by the kernel: a writable overlaybd layer stacked on the layers
converted before it is served through this process's FUSE file system, attached to a loop
device and mounted as ext4; the layer's tar is streamed from the registry, decompressed and
applied (``tar_apply``) in a worker thread while the event loop serves the kernel's reads
and writes. The first layer also holds the filesystem itself (``mkfs_into``).

Pipelining: once layer i is applied and unmounted, its writable layer is used directly as a
lower of layer i+1 (``writable_as_layer``) while a worker thread seals it (commit, ZFile,
tar wrapper). Nothing is pushed until every layer is sealed, so a bad layer pushes nothing.

Disk: the writable layers and sealed blobs of the image being converted (about twice the
image's uncompressed data, plus the compressed blobs); memory: bounded by the range-request
size of the source stream and the decoded-chunk cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import trio

from ..engine._tasks import run_concurrently
from ..engine.layer import Layer, open_layer, writable_as_layer
from ..engine.layer_files import commit_layer
from ..engine.layered import LayeredDevice
from ..engine.mkfs import mkfs_into
from ..engine.source import FileSource
from ..engine.writable import WritableLayer
from ..engine.zfile_source import DecodedChunkCache
from ..errors import FormatError, UsageError
from ..formats import oci, zfile
from ..formats.lsmt import NULL_UUID
from ..formats.oci import Descriptor, Index, Manifest, Platform
from ..fusefs import BlockFs, serve_blockfs
from ..mount import attach_loop, detach_loop, mount_ext4, unmount
from ..registry import Reference, RegistryClient, push_referrer
from .layer_cache import CachedLayer, LayerCache, cache_key
from .layout import DEFAULT_LAYOUT, deferral
from .manifests import chain_ids, converted_config, converted_manifest, diff_ids, layer_uuid
from .normalize import normalize_ext4
from .progress import Progress
from .source_stream import stream_layer_into
from .tar_apply import ApplyStatistics, apply_tar

__all__ = ["ConvertOptions", "Converter"]

log = logging.getLogger(__name__)

GIB = 1 << 30
NORMALIZED_TIME = 1_700_000_000  # what "now" becomes in converted filesystems
_ATTESTATION = "vnd.docker.reference.type"


@dataclass(frozen=True)
class ConvertOptions:
    referrer: bool = False
    dest: Reference | None = None
    flavour: str = "upstream"
    algorithm: str = "lz4"
    chunk_size: int = 4096
    level: int = 0  # compression level; 0: the original's (see formats.zfile.MAX_LEVEL)
    layout: str = DEFAULT_LAYOUT  # where files' blocks go (convert.layout)
    vsize: int = 64 * GIB
    platform: Platform | None = None
    cache_dir: str | None = None  # None: no converted-layer cache
    work_dir: str | None = None

    def __post_init__(self) -> None:
        try:  # refused before any layer is downloaded, not when the first one is sealed
            zfile.check_level(self.algorithm, self.level)
            deferral(self.layout)
        except ValueError as exc:
            raise UsageError(f"convert: {exc}") from None


@dataclass
class _Layer:
    """One layer of the image being converted."""

    index: int
    source: Descriptor
    chain_id: str
    uuid: str
    parent_uuid: str
    dir: Path  # scratch files of this layer
    cached: CachedLayer | None = None
    blob_path: Path | None = None
    blob: Descriptor | None = None
    stats: ApplyStatistics | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        assert self.blob is not None
        return {
            "source_digest": self.source.digest, "source_size": self.source.size,
            "blob_digest": self.blob.digest, "blob_size": self.blob.size, "uuid": self.uuid,
            "cached": self.cached is not None,
            "entries": self.stats.entries if self.stats else None,
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
        }


class Converter:
    """Converts one source reference. Use ``await Converter(...).run(ref)``."""

    def __init__(self, client: RegistryClient, options: ConvertOptions,
                 progress: Progress | None = None) -> None:
        if options.referrer == (options.dest is not None):
            raise UsageError("convert needs exactly one of --referrer and --dest REF")
        self.client = client
        self.options = options
        self.progress = progress or Progress(enabled=False)
        self.cache = LayerCache(options.cache_dir) if options.cache_dir else None
        self.chunk_cache = DecodedChunkCache(32 << 20)
        self.fs: BlockFs | None = None
        self.work: Path | None = None

    # -- top level ----------------------------------------------------------------------------

    async def run(self, ref: Reference) -> dict[str, Any]:
        if os.geteuid() != 0:
            raise UsageError("convert applies layers through the kernel's ext4: run it as root")
        started = time.monotonic()
        top = await self.client.get_manifest(ref)
        work = tempfile.mkdtemp(prefix="overlaybd-convert-", dir=self.options.work_dir)
        self.work = Path(work)
        try:
            async with serve_blockfs(str(self.work / "fuse")) as fs:
                self.fs = fs
                if isinstance(top.parsed, Index):
                    pushed, platforms = await self._convert_index(ref, top)
                else:
                    pushed, platforms = await self._convert_single(ref, top)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return {"source": {"reference": str(ref), "digest": top.descriptor.digest,
                           "mediaType": top.descriptor.media_type},
                "pushed": pushed, "platforms": platforms, "layout": self.options.layout,
                "seconds": round(time.monotonic() - started, 3)}

    async def _convert_single(self, ref: Reference, fetched) -> tuple[list, list]:
        manifest: Manifest = fetched.parsed
        config = await self._source_config(ref, manifest)
        platform = self.options.platform or _config_platform(config)
        layers = await self._convert_layers(ref, manifest, config, str(platform))
        pushed = [await self._push_image(ref, fetched.descriptor, manifest, config, layers,
                                         platform, tag=True)]
        summary = [layer.summary() for layer in layers]
        return pushed, [{"platform": str(platform), "layers": summary}]

    async def _convert_index(self, ref: Reference, fetched) -> tuple[list, list]:
        index: Index = fetched.parsed
        children = [d for d in index.manifests
                    if d.annotations.get(_ATTESTATION) != "attestation-manifest"
                    and d.media_type in oci.MANIFEST_MEDIA_TYPES
                    and not (d.platform and d.platform.os == "unknown")]
        if self.options.platform is not None:
            children = [d for d in children if d.platform and d.platform.matches(
                self.options.platform)]
            if not children:
                raise UsageError(f"{ref}: no manifest for platform {self.options.platform}")
        if not children:
            raise FormatError(f"{ref}: the index lists no image manifests", field="manifests")
        pushed, platforms, converted = [], [], []
        for child in children:
            child_fetched = await self.client.get_manifest(ref.with_digest(child.digest))
            manifest = child_fetched.parsed
            if not isinstance(manifest, Manifest):
                raise FormatError(f"{ref}: index entry {child.digest} is not a manifest",
                                  field="manifests[].mediaType")
            config = await self._source_config(ref, manifest)
            platform = child.platform or _config_platform(config)
            layers = await self._convert_layers(ref, manifest, config, str(platform))
            single = self.options.platform is not None
            desc = await self._push_image(ref, child_fetched.descriptor, manifest, config,
                                          layers, platform, tag=single)
            pushed.append(desc)
            converted.append((desc, platform))
            platforms.append({"platform": str(platform),
                              "layers": [layer.summary() for layer in layers]})
        if self.options.platform is None and not (self.options.referrer
                                                  and self.options.flavour == "acr"):
            pushed.append(await self._push_index(ref, fetched.descriptor, converted))
        return pushed, platforms

    # -- layers -------------------------------------------------------------------------------

    async def _source_config(self, ref: Reference, manifest: Manifest) -> dict[str, Any]:
        raw = await self.client.get_blob(ref, manifest.config)
        try:
            config = json.loads(raw)
        except ValueError:
            raise FormatError(f"{ref}: config {manifest.config.digest} is not JSON",
                              field="config") from None
        if not isinstance(config, dict):
            raise FormatError(f"{ref}: config is not a JSON object", field="config")
        return config

    async def _convert_layers(self, ref: Reference, manifest: Manifest,
                              config: dict[str, Any], platform: str) -> list[_Layer]:
        if not manifest.layers:
            raise FormatError(f"{ref}: the image has no layers", field="layers")
        for desc in manifest.layers:
            if desc.annotations.get(oci.ANNOTATION_BLOB_DIGEST):
                raise UsageError(f"{ref} is already an overlaybd image")
            if desc.media_type not in _LAYER_TYPES:
                raise FormatError(f"{ref}: layer {desc.digest} has media type "
                                  f"{desc.media_type}, not an OCI/Docker tar layer",
                                  field="layers[].mediaType", actual=desc.media_type)
        chains = chain_ids(diff_ids(config, len(manifest.layers), str(ref)))
        uuids = [layer_uuid(chain) for chain in chains]
        assert self.work is not None
        image_dir = Path(tempfile.mkdtemp(prefix="image-", dir=self.work))
        layers = [_Layer(i, desc, chains[i], uuids[i], uuids[i - 1] if i else NULL_UUID,
                         image_dir / f"layer{i}")
                  for i, desc in enumerate(manifest.layers)]
        for layer in layers:
            layer.dir.mkdir()
        self.progress.start_image(platform, [layer.source for layer in layers])
        lowers: list[Layer] = []
        prefix_cached = True
        async with trio.open_nursery() as nursery:
            for layer in layers:
                lower_digest = lowers[-1].key if lowers else None
                if prefix_cached and self.cache is not None:
                    layer.cached = self.cache.get(self._key(layer), lower_digest)
                if layer.cached is not None:
                    layer.blob_path = self.cache.blob_path(layer.cached.digest)
                    layer.blob = Descriptor(oci.OCI_LAYER, layer.cached.digest,
                                            layer.cached.size)
                    blob = await FileSource.open(layer.blob_path)
                    lowers.append(await open_layer(blob, key=layer.cached.digest,
                                                   chunk_cache=self.chunk_cache))
                    self.progress.layer_done(layer.index, "cached")
                    continue
                prefix_cached = False
                upper = await self._apply(ref, layer, lowers)
                lowers.append(await writable_as_layer(upper, key=f"converted-{layer.index}"))
                # Seal layer i in a worker thread while layer i+1 is applied on its view.
                nursery.start_soon(self._seal, layer, upper)
        for lower in lowers:
            await lower.blob.aclose()
        return layers

    def _key(self, layer: _Layer) -> str:
        o = self.options
        return cache_key(layer.chain_id, algorithm=o.algorithm, chunk_size=o.chunk_size,
                         vsize=o.vsize, level=o.level, layout=o.layout)

    async def _apply(self, ref: Reference, layer: _Layer, lowers: list[Layer]) -> WritableLayer:
        """Apply the source layer on a new writable layer over ``lowers``; return it closed
        for writing (its files stay for the seal)."""
        assert self.work is not None and self.fs is not None
        i = layer.index
        started = time.monotonic()
        data, index = layer.dir / "data", layer.dir / "index"
        upper = WritableLayer.create(str(data), str(index), self.options.vsize,
                                     layer_uuid=layer.uuid)
        try:
            if i == 0:
                self.progress.phase(i, "mkfs")
                await mkfs_into(upper, tmpdir=str(layer.dir))
            device = LayeredDevice(lowers, upper)
            name = f"{layer.dir.parent.name}-{i}"
            self.fs.add(name, device)
            target = layer.dir / "mnt"
            target.mkdir()
            try:
                loop = await attach_loop(str(self.work / "fuse" / name / "block"),
                                         readonly=False)
                try:
                    # nodelalloc: blocks are allocated by the (pinned) applier thread, in tar
                    # order, not later by writeback threads: reproducible placement.
                    await mount_ext4(loop, str(target), readonly=False,
                                     extra_options="nodelalloc,noatime")
                    try:
                        self.progress.phase(i, "apply", layer.source.size)
                        consume = partial(_pinned_apply, root=str(target),
                                          layer=layer.source.digest,
                                          vsize_limit=self.options.vsize,
                                          defer=deferral(self.options.layout),
                                          spool_dir=str(layer.dir))
                        layer.stats = await stream_layer_into(
                            self.client, ref, layer.source, consume,
                            on_progress=partial(self.progress.bytes, i))
                    finally:
                        await unmount(str(target))
                finally:
                    await detach_loop(loop)
                await normalize_ext4(device, timestamp=NORMALIZED_TIME)
            finally:
                self.fs.remove(name)
            await upper.fsync()
        except BaseException:
            upper.close()
            raise
        upper.close()
        layer.seconds["apply"] = time.monotonic() - started
        return WritableLayer.open(str(data), str(index), readonly=True)

    async def _seal(self, layer: _Layer, upper: WritableLayer) -> None:
        """Commit + ZFile + tar wrapper in a worker thread; the blob's digest on the way."""
        assert self.work is not None
        started = time.monotonic()
        self.progress.phase(layer.index, "seal")
        out = layer.dir / "blob"
        data, index = upper.paths
        upper.close()
        result = await trio.to_thread.run_sync(partial(
            commit_layer, data, index, str(out), algorithm=self.options.algorithm,
            chunk_size=self.options.chunk_size, tar=True, layer_uuid=layer.uuid,
            parent_uuid=layer.parent_uuid, level=self.options.level, merge_runs=True))
        digest = await trio.to_thread.run_sync(_sha256_file, out)
        # The writable pair is no longer needed once sealed (the view of it may still be
        # open as a lower: unlinking keeps its data readable until then).
        os.unlink(data)
        os.unlink(index)
        layer.blob_path = out
        layer.blob = Descriptor(oci.OCI_LAYER, digest, result.size)
        layer.seconds["seal"] = time.monotonic() - started
        self.progress.layer_done(layer.index, "sealed")

    # -- pushing ------------------------------------------------------------------------------

    async def _push_image(self, ref: Reference, source: Descriptor, manifest: Manifest,
                          config: dict[str, Any], layers: list[_Layer], platform: Platform,
                          *, tag: bool) -> dict[str, Any]:
        target = self.options.dest or ref
        started = time.monotonic()
        blobs = [layer.blob for layer in layers]
        assert all(blobs)
        await run_concurrently([partial(self._push_layer, target, layer) for layer in layers])
        self._remember(layers, target)
        config_bytes = converted_config(config, [b.digest for b in blobs])
        config_type = manifest.config.media_type
        config_desc = await self.client.push_blob(target, config_bytes, media_type=config_type)
        subject = source if self.options.referrer else None
        new = converted_manifest(manifest, config_desc, blobs, subject=subject,  # type: ignore
                                 flavour=self.options.flavour, platform=platform)
        content = new.to_bytes()
        seconds = time.monotonic() - started
        if self.options.referrer:
            result = await push_referrer(self.client, ref, content, new.media_type)
            out = {"digest": result.descriptor.digest, "mediaType": new.media_type,
                   "size": len(content), "reference": f"{ref.repository_ref}@"
                   f"{result.descriptor.digest}", "subject": source.digest,
                   "artifactType": new.artifact_type, "referrers": result.source}
        else:
            push_ref = self.options.dest if tag else self.options.dest.with_digest(
                oci.sha256_digest(content))
            pushed = await self.client.push_manifest(push_ref, content, new.media_type)
            out = {"digest": pushed.descriptor.digest, "mediaType": new.media_type,
                   "size": len(content), "reference": str(push_ref)}
        out["platform"] = str(platform)
        out["upload_seconds"] = round(seconds, 3)
        for layer in layers:
            layer.seconds["upload"] = seconds
        return out

    async def _push_layer(self, target: Reference, layer: _Layer) -> None:
        assert layer.blob is not None and layer.blob_path is not None
        mount_from = None
        if layer.cached is not None:
            for repo in layer.cached.pushed_to:
                host, _, name = repo.partition("/")
                if host == target.registry and name != target.repository:
                    mount_from = Reference(target.registry, name)
                    break
        self.progress.phase(layer.index, "upload", layer.blob.size)
        await self.client.push_blob(target, layer.blob_path, media_type=oci.OCI_LAYER,
                                    mount_from=mount_from, digest=layer.blob.digest)

    def _remember(self, layers: list[_Layer], target: Reference) -> None:
        """Record converted layers in the cache, each with the layer it was built on."""
        if self.cache is None:
            return
        where = f"{target.registry}/{target.repository}"
        lower = None
        for layer in layers:
            assert layer.blob is not None and layer.blob_path is not None
            entry = layer.cached or CachedLayer(
                key=self._key(layer), chain_id=layer.chain_id, lower=lower,
                digest=layer.blob.digest, size=layer.blob.size, uuid=layer.uuid)
            if where not in entry.pushed_to:
                entry.pushed_to.append(where)
            if layer.cached is None:
                self.cache.put(entry, layer.blob_path)
            else:
                self.cache.save(entry)
            lower = layer.blob.digest

    async def _push_index(self, ref: Reference, source: Descriptor,
                          converted: list[tuple[dict[str, Any], Platform]]) -> dict[str, Any]:
        manifests = tuple(
            Descriptor(desc["mediaType"], desc["digest"], desc["size"], platform=platform,
                       artifact_type=desc.get("artifactType"))
            for desc, platform in converted)
        if self.options.referrer:
            index = Index(oci.OCI_INDEX, manifests, subject=source,
                          artifact_type=oci.ARTIFACT_TYPE_OVERLAYBD)
            content = index.to_bytes()
            result = await push_referrer(self.client, ref, content, oci.OCI_INDEX)
            return {"digest": result.descriptor.digest, "mediaType": oci.OCI_INDEX,
                    "size": len(content), "subject": source.digest,
                    "artifactType": oci.ARTIFACT_TYPE_OVERLAYBD, "referrers": result.source}
        assert self.options.dest is not None
        index = Index(oci.OCI_INDEX, manifests)
        content = index.to_bytes()
        pushed = await self.client.push_manifest(self.options.dest, content, oci.OCI_INDEX)
        return {"digest": pushed.descriptor.digest, "mediaType": oci.OCI_INDEX,
                "size": len(content), "reference": str(self.options.dest)}


_LAYER_TYPES = frozenset({oci.OCI_LAYER, oci.OCI_LAYER_GZIP, oci.OCI_LAYER_ZSTD,
                          oci.DOCKER_LAYER, oci.DOCKER_LAYER_GZIP})


def _pinned_apply(stream, **kwargs) -> ApplyStatistics:
    """apply_tar on one CPU: ext4 picks block groups per CPU for small files, so a thread
    that migrates between CPUs would place them differently from run to run."""
    previous = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(previous)})
    try:
        return apply_tar(stream, **kwargs)
    finally:
        os.sched_setaffinity(0, previous)


def _config_platform(config: dict[str, Any]) -> Platform:
    return Platform.normalised(str(config.get("os", "linux")),
                               str(config.get("architecture", "amd64")),
                               str(config.get("variant", "")))


def _sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()
