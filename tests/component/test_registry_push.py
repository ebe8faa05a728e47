"""What our client pushes is accepted by independent readers: skopeo and oras-py."""

from __future__ import annotations

import hashlib
import json

import pytest

from overlaybd_py.errors import NotFoundError
from overlaybd_py.formats.oci import (
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER,
    OCI_MANIFEST,
    Descriptor,
    Index,
    Manifest,
    Platform,
)
from overlaybd_py.registry import Reference
from tests.component._registry_helpers import CREDS, unique_repo, with_client
from tests.fixtures.oci_layout import random_bytes, skopeo, skopeo_copy, tar_layer

TITLE = "org.opencontainers.image.title"


def _config(layers):
    return json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {},
            "rootfs": {
                "type": "layers",
                "diff_ids": ["sha256:" + hashlib.sha256(layer).hexdigest() for layer in layers],
            },
        }
    ).encode()


async def _push_image(client, ref, layers, *, chunk_size=None, mount_from=None, tmp_path=None):
    descriptors = []
    for i, layer in enumerate(layers):
        if tmp_path is not None and i == 0:  # the first layer from a file, streamed in pieces
            path = tmp_path / "layer0.tar"
            path.write_bytes(layer)
            d = await client.push_blob(ref, path, media_type=OCI_LAYER, chunk_size=chunk_size)
        else:
            d = await client.push_blob(
                ref, layer, media_type=OCI_LAYER, chunk_size=chunk_size, mount_from=mount_from
            )
        descriptors.append(
            Descriptor(d.media_type, d.digest, d.size, annotations={TITLE: f"layer{i}.tar"})
        )
    config = _config(layers)
    config_d = await client.push_blob(ref, config, media_type=OCI_CONFIG)
    manifest = Manifest(OCI_MANIFEST, config_d, tuple(descriptors))
    pushed = await client.push_manifest(ref, manifest.to_bytes(), OCI_MANIFEST)
    return manifest, pushed


@pytest.mark.parametrize("chunk_size", [None, 1 << 20])
def test_push_image_read_by_skopeo_and_oras(registry, tmp_path, chunk_size):
    repo = unique_repo("push")
    ref = Reference.parse(f"{registry.host}/{repo}:v1")
    layers = [tar_layer({"a": random_bytes(2_500_000, 3)}), tar_layer({"b": b"small"})]
    mark = registry.log_mark()

    async def body(client):
        return await _push_image(client, ref, layers, chunk_size=chunk_size, tmp_path=tmp_path)

    manifest, pushed = with_client(body)
    uploads = [r for r in registry.responses(mark) if "/blobs/uploads/" in r["http.request.uri"]]
    patches = [r for r in uploads if r["http.request.method"] == "PATCH"]
    assert len(patches) == (3 if chunk_size else 0)  # 2.5 MB in 1 MiB chunks

    inspected = json.loads(
        skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{ref}").stdout
    )
    assert inspected == manifest.to_json()
    assert "sha256:" + hashlib.sha256(manifest.to_bytes()).hexdigest() == pushed.descriptor.digest
    out = tmp_path / "copied"
    skopeo_copy(f"docker://{ref}", f"oci:{out}:v1")
    for layer in layers:
        blob = out / "blobs" / "sha256" / hashlib.sha256(layer).hexdigest()
        assert blob.read_bytes() == layer

    import oras.client

    pulled = tmp_path / "oras"
    files = oras.client.OrasClient(hostname=registry.host, insecure=True).pull(
        target=str(ref), outdir=str(pulled)
    )
    assert sorted(p.rsplit("/", 1)[1] for p in files) == ["layer0.tar", "layer1.tar"]
    assert (pulled / "layer0.tar").read_bytes() == layers[0]


def test_push_skips_existing_blobs_and_mounts(registry, tmp_path):
    source_repo, target_repo = unique_repo("mount-src"), unique_repo("mount-dst")
    source = Reference.parse(f"{registry.host}/{source_repo}:v1")
    target = Reference.parse(f"{registry.host}/{target_repo}:v1")
    layers = [tar_layer({"m": random_bytes(200_000, 4)})]

    async def body(client):
        await _push_image(client, source, layers)
        mark = registry.log_mark()
        await _push_image(client, source, layers)  # again: every blob is skipped
        again = [r for r in registry.responses(mark) if "/uploads/" in r["http.request.uri"]]
        mark = registry.log_mark()
        await _push_image(client, target, layers, mount_from=source)
        mounted = [r for r in registry.responses(mark) if "/uploads/" in r["http.request.uri"]]
        return again, mounted

    again, mounted = with_client(body)
    assert again == []
    layer_post = [r for r in mounted if "mount=" in r["http.request.uri"]]
    assert layer_post and layer_post[0]["http.response.status"] == 201  # mounted, not uploaded
    assert not [
        r
        for r in mounted
        if r["http.request.method"] in ("PATCH", "PUT")
        and layer_post
        and hashlib.sha256(layers[0]).hexdigest() in r["http.request.uri"]
    ]
    copied = tmp_path / "copied"
    skopeo_copy(f"docker://{target}", f"oci:{copied}:v1")


def test_push_index_by_digest_and_tag(registry, tmp_path):
    repo = unique_repo("index")
    base = Reference.parse(f"{registry.host}/{repo}:amd64")

    async def body(client):
        _, p1 = await _push_image(client, base, [tar_layer({"x": b"amd"})])
        _, p2 = await _push_image(client, base.with_tag("arm64"), [tar_layer({"x": b"arm"})])
        index = Index(
            OCI_INDEX,
            (
                Descriptor(
                    OCI_MANIFEST,
                    p1.descriptor.digest,
                    p1.descriptor.size,
                    platform=Platform.from_spec("linux/amd64"),
                ),
                Descriptor(
                    OCI_MANIFEST,
                    p2.descriptor.digest,
                    p2.descriptor.size,
                    platform=Platform.from_spec("linux/arm64"),
                ),
            ),
        )
        by_digest = await client.push_manifest(base.repository_ref, index.to_bytes(), OCI_INDEX)
        by_tag = await client.push_manifest(base.with_tag("multi"), index.to_bytes(), OCI_INDEX)
        assert by_digest.descriptor == by_tag.descriptor
        read_back = await client.get_manifest(base.with_digest(by_digest.descriptor.digest))
        return index, by_tag, read_back

    index, pushed, read_back = with_client(body)
    assert read_back.parsed == index
    raw = skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{registry.host}/{repo}:multi")
    assert json.loads(raw.stdout) == index.to_json()
    out = tmp_path / "all"
    skopeo_copy(f"docker://{registry.host}/{repo}:multi", f"oci:{out}:multi", all_images=True)
    assert (out / "blobs" / "sha256" / pushed.descriptor.digest.split(":")[1]).exists()


def test_push_to_basic_auth_registry(registry_basic):
    repo = unique_repo("push-basic")
    ref = Reference.parse(f"{registry_basic.host}/{repo}:v1")

    async def body(client):
        _, pushed = await _push_image(client, ref, [tar_layer({"y": b"auth"})])
        return pushed

    pushed = with_client(body, creds=CREDS)
    skopeo(
        "inspect",
        "--raw",
        "--tls-verify=false",
        "--creds",
        f"{CREDS[0]}:{CREDS[1]}",
        f"docker://{ref}",
    )
    assert pushed.oci_subject is None


def test_push_to_token_registry(registry_token, token_server):
    repo = unique_repo("push-token")
    ref = Reference.parse(f"{registry_token.host}/{repo}:v1")
    before = len(token_server.requests)

    async def body(client):
        return await _push_image(client, ref, [tar_layer({"z": b"token"})])

    with_client(body, creds=CREDS)
    scopes = {s for r in token_server.requests[before:] for s in r.scopes}
    assert f"repository:{repo}:pull,push" in scopes
    # Tokens are cached: a handful of token requests for a dozen registry requests.
    assert len(token_server.requests) - before <= 2


def test_get_blob_of_unknown_digest(registry):
    ref = Reference.parse(f"{registry.host}/{unique_repo('nothing')}:v1")

    async def body(client):
        with pytest.raises(NotFoundError):
            await client.get_blob(ref, "sha256:" + "1" * 64)

    with_client(body)
