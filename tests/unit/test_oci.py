"""formats.oci: digests, descriptors, manifests, indexes, platforms, overlaybd detection."""

from __future__ import annotations

import ast
import hashlib
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from overlaybd_py.errors import FormatError
from overlaybd_py.formats import oci

H = "a" * 64
DIGEST = f"sha256:{H}"


def test_module_imports_only_stdlib_and_errors():
    """formats/ is pure: the litmus test of STYLE rule 1, applied to this module."""
    tree = ast.parse(Path(oci.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add("." * node.level + (node.module or ""))
    allowed = {
        "__future__",
        "hashlib",
        "json",
        "logging",
        "re",
        "collections.abc",
        "dataclasses",
        "typing",
        "..errors",
    }
    assert imported <= allowed, imported - allowed


@given(st.binary(max_size=300))
def test_sha256_digest_matches_hashlib(data):
    digest = oci.sha256_digest(data)
    assert digest == "sha256:" + hashlib.sha256(data).hexdigest()
    assert oci.validate_digest(digest) == digest
    assert oci.digest_matches(digest, data)
    assert not oci.digest_matches(digest, data + b"x")


@pytest.mark.parametrize(
    "bad",
    [
        "sha256:" + "A" * 64,  # upper-case hex
        "sha256:" + "a" * 63,
        "sha256:" + "g" * 64,
        "sha256",
        ":abc",
        "",
        5,
        None,
    ],
)
def test_validate_digest_refuses(bad):
    with pytest.raises(FormatError) as info:
        oci.validate_digest(bad, "layers[0].digest")
    assert info.value.field == "layers[0].digest"


def test_parse_digest_and_unknown_algorithm():
    assert oci.parse_digest(DIGEST) == ("sha256", H)
    with pytest.raises(FormatError, match="not supported"):
        oci.digest_matches("md5:abcd", b"")


def _manifest(**extra):
    return {
        "schemaVersion": 2,
        "mediaType": oci.OCI_MANIFEST,
        "config": {"mediaType": oci.OCI_CONFIG, "digest": DIGEST, "size": 7},
        "layers": [
            {
                "mediaType": oci.OCI_LAYER,
                "digest": "sha256:" + "b" * 64,
                "size": 100,
                "annotations": {
                    oci.ANNOTATION_BLOB_DIGEST: "sha256:" + "b" * 64,
                    oci.ANNOTATION_BLOB_SIZE: "100",
                },
            },
        ],
        **extra,
    }


def test_manifest_round_trip_keeps_every_field():
    obj = _manifest(
        artifactType=oci.ARTIFACT_TYPE_OVERLAYBD,
        subject={"mediaType": oci.OCI_MANIFEST, "digest": DIGEST, "size": 10},
        annotations={"k": "v"},
    )
    parsed = oci.Manifest.parse(json.dumps(obj).encode())
    assert parsed.artifact_type == oci.ARTIFACT_TYPE_OVERLAYBD
    assert parsed.subject is not None and parsed.subject.size == 10
    assert parsed.layers[0].annotations[oci.ANNOTATION_BLOB_SIZE] == "100"
    assert oci.Manifest.parse(parsed.to_bytes()) == parsed
    assert json.loads(parsed.to_bytes()) == obj


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda m: m.pop("config"), "manifest.config"),
        (lambda m: m["layers"][0].__setitem__("size", -1), "manifest.layers[0].size"),
        (lambda m: m["layers"][0].__setitem__("size", True), "manifest.layers[0].size"),
        (lambda m: m["layers"][0].__setitem__("digest", "sha256:zz"), "manifest.layers[0].digest"),
        (lambda m: m["config"].__setitem__("mediaType", "not a type"), "manifest.config.mediaType"),
        (lambda m: m.__setitem__("schemaVersion", 1), "manifest.schemaVersion"),
        (lambda m: m.__setitem__("layers", {}), "manifest.layers"),
        (lambda m: m["layers"][0].__setitem__("annotations", {"a": 1}), "a"),
    ],
)
def test_manifest_errors_name_the_field(mutate, field):
    obj = _manifest()
    mutate(obj)
    with pytest.raises(FormatError) as info:
        oci.Manifest.parse(obj)
    assert info.value.field == field


def test_not_json_is_a_format_error():
    with pytest.raises(FormatError, match="not JSON"):
        oci.parse_manifest_or_index(b"\xff{")
    with pytest.raises(FormatError):
        oci.parse_manifest_or_index(b"[1]")


def test_docker_schema2_and_content_type_fallback():
    obj = _manifest()
    del obj["mediaType"]
    parsed = oci.parse_manifest_or_index(json.dumps(obj).encode(), oci.DOCKER_MANIFEST)
    assert isinstance(parsed, oci.Manifest) and parsed.media_type == oci.DOCKER_MANIFEST
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": oci.DOCKER_MANIFEST,
                "digest": DIGEST,
                "size": 3,
                "platform": {"os": "linux", "architecture": "arm64"},
            }
        ],
    }
    parsed_index = oci.parse_manifest_or_index(json.dumps(index).encode(), "text/plain")
    assert isinstance(parsed_index, oci.Index) and parsed_index.media_type == oci.OCI_INDEX
    assert parsed_index.manifests[0].platform == oci.Platform("linux", "arm64", "v8")


def test_index_round_trip():
    index = oci.Index(
        oci.OCI_INDEX,
        (
            oci.Descriptor(
                oci.OCI_MANIFEST,
                DIGEST,
                5,
                annotations={"x": "y"},
                artifact_type=oci.ARTIFACT_TYPE_ACR_STREAMING,
            ),
        ),
    )
    assert oci.parse_manifest_or_index(index.to_bytes()) == index


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("linux/amd64", oci.Platform("linux", "amd64")),
        ("linux/x86_64", oci.Platform("linux", "amd64")),
        ("linux/arm64", oci.Platform("linux", "arm64", "v8")),
        ("linux/aarch64/v8", oci.Platform("linux", "arm64", "v8")),
        ("linux/arm", oci.Platform("linux", "arm", "v7")),
        ("linux/arm/v6", oci.Platform("linux", "arm", "v6")),
    ],
)
def test_platform_spec(spec, expected):
    assert oci.Platform.from_spec(spec) == expected


@pytest.mark.parametrize("spec", ["linux", "linux/", "a/b/c/d", ""])
def test_platform_spec_refused(spec):
    with pytest.raises(FormatError):
        oci.Platform.from_spec(spec)


def test_is_overlaybd_manifest():
    assert oci.is_overlaybd_manifest(oci.Manifest.parse(_manifest()))
    plain = _manifest()
    del plain["layers"][0]["annotations"]
    assert not oci.is_overlaybd_manifest(oci.Manifest.parse(plain))
    empty = _manifest(layers=[])
    assert not oci.is_overlaybd_manifest(oci.Manifest.parse(empty))


def test_descriptor_of_and_unknown_fields_ignored():
    d = oci.Descriptor.of(b"hello", oci.OCI_LAYER)
    assert d.size == 5 and oci.digest_matches(d.digest, b"hello")
    parsed = oci.Descriptor.parse(d.to_json() | {"future": {"field": 1}})
    assert parsed == d
