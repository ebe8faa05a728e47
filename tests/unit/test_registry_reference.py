"""registry.reference: parsing, normalisation, platform selection."""

from __future__ import annotations

import pytest

from overlaybd_py.errors import NotFoundError, UsageError
from overlaybd_py.formats.oci import OCI_MANIFEST, Descriptor, Index, Platform
from overlaybd_py.registry import reference as refmod
from overlaybd_py.registry.reference import Reference, select_manifest

D = "sha256:" + "c" * 64

CASES = [
    # text, registry, repository, tag, digest, canonical
    ("busybox", "docker.io", "library/busybox", "latest", None, "docker.io/library/busybox:latest"),
    ("busybox:1.36", "docker.io", "library/busybox", "1.36", None, None),
    ("docker.io/busybox", "docker.io", "library/busybox", "latest", None, None),
    ("index.docker.io/library/busybox", "docker.io", "library/busybox", "latest", None, None),
    ("user/app", "docker.io", "user/app", "latest", None, None),
    ("localhost/app", "localhost", "app", "latest", None, None),
    ("localhost:5000/a/b:v1", "localhost:5000", "a/b", "v1", None, None),
    ("127.0.0.1:5000/x@" + D, "127.0.0.1:5000", "x", None, D, "127.0.0.1:5000/x@" + D),
    ("ghcr.io/o/r:t@" + D, "ghcr.io", "o/r", "t", D, "ghcr.io/o/r:t@" + D),
    ("Registry/app", "Registry", "app", "latest", None, None),  # upper case means a host
    ("[::1]:5000/app", "[::1]:5000", "app", "latest", None, None),
    ("a.b/c__d/e-f.g", "a.b", "c__d/e-f.g", "latest", None, None),
]


@pytest.mark.parametrize(("text", "registry", "repository", "tag", "digest", "canonical"), CASES)
def test_parse(text, registry, repository, tag, digest, canonical):
    ref = Reference.parse(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (
        registry,
        repository,
        tag,
        digest,
    )
    assert Reference.parse(str(ref)) == ref  # canonical text parses back to the same
    if canonical:
        assert str(ref) == canonical


@pytest.mark.parametrize(
    "text",
    [
        "",
        " busybox",
        "UPPER",
        "a//b",
        "host:5000/App",
        "repo:bad tag",
        "repo@sha256:123",
        "repo:" + "t" * 129,
        "-lead",
        "host:/x",
    ],
)
def test_parse_refuses(text):
    with pytest.raises(UsageError, match="invalid"):
        Reference.parse(text)


def test_api_host_and_helpers():
    hub = Reference.parse("busybox")
    assert hub.api_host == "registry-1.docker.io"
    assert Reference.parse("localhost:5000/a").api_host == "localhost:5000"
    assert hub.reference == "latest"
    assert hub.with_digest(D).reference == D
    bare = Reference.parse("localhost:5000/a", default_tag=None)
    with pytest.raises(UsageError, match="repository"):
        _ = bare.reference
    assert hub.with_tag("sha256-" + "c" * 64).tag == "sha256-" + "c" * 64
    with pytest.raises(UsageError):
        hub.with_tag("bad tag")


def _index(*platforms):
    return Index(
        "application/vnd.oci.image.index.v1+json",
        tuple(
            Descriptor(OCI_MANIFEST, "sha256:" + f"{i:x}" * 64, 10, platform=p)
            for i, p in enumerate(platforms)
        ),
    )


def test_select_manifest_platforms():
    index = _index(
        None,  # an attestation or artifact: never selected
        Platform("linux", "amd64"),
        Platform("linux", "arm", "v6"),
        Platform("linux", "arm", "v7"),
        Platform("linux", "arm64", "v8"),
    )
    assert select_manifest(index, Platform.from_spec("linux/amd64")) is index.manifests[1]
    assert select_manifest(index, Platform.from_spec("linux/arm")) is index.manifests[3]
    assert select_manifest(index, Platform.from_spec("linux/arm/v6")) is index.manifests[2]
    assert select_manifest(index, Platform.from_spec("linux/arm64")) is index.manifests[4]
    with pytest.raises(NotFoundError, match="linux/amd64, linux/arm/v6"):
        select_manifest(index, Platform.from_spec("windows/amd64"))


@pytest.mark.parametrize(
    ("machine", "expected"),
    [
        ("x86_64", "linux/amd64"),
        ("aarch64", "linux/arm64/v8"),
        ("armv7l", "linux/arm/v7"),
        ("armv6l", "linux/arm/v6"),
    ],
)
def test_host_platform(monkeypatch, machine, expected):
    monkeypatch.setattr(refmod._platform, "machine", lambda: machine)
    monkeypatch.setattr(refmod._platform, "system", lambda: "Linux")
    assert str(refmod.host_platform()) == expected
    index = _index(Platform.from_spec(expected))
    assert select_manifest(index) is index.manifests[0]
