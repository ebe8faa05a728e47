"""Referrers against distribution 2.8, which has no referrers API: the fallback tag path, read
back by skopeo and plain HTTP (independent readers) and by our discovery."""

from __future__ import annotations

import json
import urllib.request

from overlaybd_py.formats import oci
from overlaybd_py.registry import (
    Reference,
    fallback_tag,
    list_referrers,
    pick_overlaybd_referrer,
    push_referrer,
)
from tests.component._registry_helpers import publish, unique_repo, with_client
from tests.fixtures.oci_layout import skopeo, tar_layer


async def _push_artifact(client, ref, subject, *, flavour, layer_bytes):
    empty = await client.push_blob(ref, b"{}", media_type=oci.OCI_EMPTY)
    blob = await client.push_blob(ref, layer_bytes, media_type=oci.OCI_LAYER)
    layer = oci.Descriptor(
        oci.OCI_LAYER,
        blob.digest,
        blob.size,
        annotations={
            oci.ANNOTATION_BLOB_DIGEST: blob.digest,
            oci.ANNOTATION_BLOB_SIZE: str(blob.size),
            oci.ANNOTATION_VERSION: oci.OVERLAYBD_VERSION,
        },
    )
    if flavour == "upstream":
        artifact_type, notes = oci.ARTIFACT_TYPE_OVERLAYBD, {}
    else:
        artifact_type = oci.ARTIFACT_TYPE_ACR_STREAMING
        notes = {
            oci.STREAMING_FORMAT: "overlaybd",
            oci.STREAMING_PLATFORM_OS: "linux",
            oci.STREAMING_PLATFORM_ARCH: "amd64",
            oci.STREAMING_VERSION: "v1",
        }
    manifest = oci.Manifest(
        oci.OCI_MANIFEST,
        empty,
        (layer,),
        annotations=notes,
        subject=subject,
        artifact_type=artifact_type,
    )
    return await push_referrer(client, ref, manifest.to_bytes(), oci.OCI_MANIFEST)


def test_referrer_fallback_tag_round_trip(registry, tmp_path):
    repo = unique_repo("referrers")
    image = publish(registry, repo, tmp_path / "layout", [tar_layer({"f": b"base"})])
    ref = Reference.parse(f"{registry.host}/{repo}:v1")
    subject = oci.Descriptor(oci.OCI_MANIFEST, image.digest, len(image.manifest))

    async def body(client):
        first = await _push_artifact(
            client, ref, subject, flavour="upstream", layer_bytes=b"overlaybd layer 1"
        )
        second = await _push_artifact(
            client, ref, subject, flavour="acr", layer_bytes=b"overlaybd layer 2"
        )
        found = await list_referrers(client, ref, image.digest)
        only_acr = await list_referrers(
            client, ref, image.digest, artifact_type=oci.ARTIFACT_TYPE_ACR_STREAMING
        )
        return first, second, found, only_acr

    first, second, found, only_acr = with_client(body)
    assert first.source == second.source == "fallback-tag"
    assert found.source == "fallback-tag"
    assert [d.digest for d in found.referrers] == [
        first.descriptor.digest,
        second.descriptor.digest,
    ]
    assert [d.digest for d in only_acr.referrers] == [second.descriptor.digest]
    amd64 = oci.Platform.from_spec("linux/amd64")
    assert pick_overlaybd_referrer(only_acr.referrers, amd64).digest == second.descriptor.digest
    assert (
        pick_overlaybd_referrer(only_acr.referrers, oci.Platform.from_spec("linux/arm64")) is None
    )

    # Independent reader 1: skopeo reads the fallback tag.
    tag = fallback_tag(image.digest)
    raw = json.loads(
        skopeo(
            "inspect", "--raw", "--tls-verify=false", f"docker://{registry.host}/{repo}:{tag}"
        ).stdout
    )
    assert raw["mediaType"] == oci.OCI_INDEX
    assert [(m["digest"], m["artifactType"]) for m in raw["manifests"]] == [
        (first.descriptor.digest, oci.ARTIFACT_TYPE_OVERLAYBD),
        (second.descriptor.digest, oci.ARTIFACT_TYPE_ACR_STREAMING),
    ]
    assert raw["manifests"][1]["annotations"][oci.STREAMING_FORMAT] == "overlaybd"
    # Independent reader 2: plain HTTP, and the referrer manifest itself has our subject.
    request = urllib.request.Request(
        f"{registry.url}/v2/{repo}/manifests/{first.descriptor.digest}",
        headers={"Accept": oci.OCI_MANIFEST},
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        pushed = json.loads(answer.read())
    assert pushed["subject"]["digest"] == image.digest
    assert pushed["artifactType"] == oci.ARTIFACT_TYPE_OVERLAYBD


def test_referrers_of_an_image_without_any(registry, tmp_path):
    repo = unique_repo("no-referrers")
    image = publish(registry, repo, tmp_path / "layout", [tar_layer({"f": b"alone"})])
    ref = Reference.parse(f"{registry.host}/{repo}:v1")
    found = with_client(lambda client: list_referrers(client, ref, image.digest))
    assert found.source == "fallback-tag" and found.referrers == ()


def test_successive_referrer_pushes_accumulate(registry, tmp_path):
    """Each push reads, appends to and verifies the fallback index: none is lost."""
    repo = unique_repo("many-referrers")
    image = publish(registry, repo, tmp_path / "layout", [tar_layer({"f": b"popular"})])
    ref = Reference.parse(f"{registry.host}/{repo}:v1")
    subject = oci.Descriptor(oci.OCI_MANIFEST, image.digest, len(image.manifest))

    async def body(client):
        pushed = [
            await _push_artifact(
                client, ref, subject, flavour="upstream", layer_bytes=f"layer {i}".encode()
            )
            for i in range(4)
        ]
        return pushed, await list_referrers(client, ref, image.digest)

    pushed, found = with_client(body)
    assert [p.descriptor.digest for p in pushed] == [d.digest for d in found.referrers]
