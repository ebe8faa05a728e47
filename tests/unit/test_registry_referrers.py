"""registry.referrers: the referrers API (shaped like the OCI distribution spec v1.1 examples,
with pagination and filtering) and the tag-schema fallback, against httpx.MockTransport."""

from __future__ import annotations

import json

import httpx
import pytest
import trio

from overlaybd_py.errors import FormatError
from overlaybd_py.formats import oci
from overlaybd_py.registry import ClientConfig, Reference, RegistryClient, RetryPolicy
from overlaybd_py.registry.referrers import (
    add_to_index,
    fallback_tag,
    filter_referrers,
    list_referrers,
    next_link,
    pick_overlaybd_referrer,
    push_referrer,
    referrer_descriptor,
    referrers_url,
)

SUBJECT = "sha256:" + "5" * 64
REF = Reference.parse("reg.test/app/img:v1")
FAST = RetryPolicy(deadline=5, base_delay=0.001, max_delay=0.01)
SBOM = "application/vnd.example.sbom.v1"
SIG = "application/vnd.example.signature.v1"


def desc(n, artifact_type, **annotations):
    return {
        "mediaType": oci.OCI_MANIFEST,
        "digest": "sha256:" + f"{n:x}" * 64,
        "size": 1000 + n,
        "artifactType": artifact_type,
        "annotations": annotations,
    }


# Two pages as a registry implementing the API answers them.
PAGE_1 = {
    "schemaVersion": 2,
    "mediaType": oci.OCI_INDEX,
    "manifests": [
        desc(1, SBOM, **{"org.opencontainers.image.created": "2024-01-01T00:00:00Z"}),
        desc(2, SIG),
    ],
}
PAGE_2 = {
    "schemaVersion": 2,
    "mediaType": oci.OCI_INDEX,
    "manifests": [
        desc(3, oci.ARTIFACT_TYPE_OVERLAYBD),
    ],
}


def run(handler, body):
    async def main():
        config = ClientConfig(transport=httpx.MockTransport(handler), retry=FAST)
        async with await RegistryClient.open(config) as client:
            return await body(client)

    return trio.run(main)


def api_server(*, filters_applied=False, log=None):
    def handler(request):
        if log is not None:
            log.append(request)
        path = request.url.path
        assert path == f"/v2/app/img/referrers/{SUBJECT}"
        if request.url.params.get("last") == "p1":
            page = PAGE_2
            headers = {}
        else:
            page = PAGE_1
            headers = {"Link": f'</v2/app/img/referrers/{SUBJECT}?n=2&last=p1>; rel="next"'}
        wanted = request.url.params.get("artifactType")
        if filters_applied and wanted:
            page = dict(
                page, manifests=[m for m in page["manifests"] if m["artifactType"] == wanted]
            )
            headers["OCI-Filters-Applied"] = "artifactType"
        return httpx.Response(200, json=page, headers=headers | {"Content-Type": oci.OCI_INDEX})

    return handler


def test_api_with_pagination():
    log = []
    found = run(api_server(log=log), lambda c: list_referrers(c, REF, SUBJECT))
    assert found.source == "api" and found.subject == SUBJECT
    assert [d.artifact_type for d in found.referrers] == [SBOM, SIG, oci.ARTIFACT_TYPE_OVERLAYBD]
    assert found.referrers[0].annotations["org.opencontainers.image.created"].startswith("2024")
    assert [r.url.params.get("last") for r in log] == [None, "p1"]


@pytest.mark.parametrize("filters_applied", [True, False])
def test_api_artifact_type_filter(filters_applied):
    log = []
    found = run(
        api_server(filters_applied=filters_applied, log=log),
        lambda c: list_referrers(c, REF, SUBJECT, artifact_type=SIG),
    )
    assert [d.artifact_type for d in found.referrers] == [SIG]
    assert log[0].url.params["artifactType"] == SIG


def fallback_server(index=None, *, log=None):
    def handler(request):
        if log is not None:
            log.append(request)
        if "/referrers/" in request.url.path:
            return httpx.Response(404, text="404 page not found")
        assert request.url.path == f"/v2/app/img/manifests/{fallback_tag(SUBJECT)}"
        if index is None:
            return httpx.Response(404, json={"errors": [{"code": "MANIFEST_UNKNOWN"}]})
        return httpx.Response(
            200, content=json.dumps(index).encode(), headers={"Content-Type": oci.OCI_INDEX}
        )

    return handler


def test_fallback_tag_when_api_is_missing():
    found = run(fallback_server(PAGE_2), lambda c: list_referrers(c, REF, SUBJECT))
    assert found.source == "fallback-tag"
    assert [d.digest for d in found.referrers] == [PAGE_2["manifests"][0]["digest"]]
    filtered = run(fallback_server(PAGE_1), lambda c: list_referrers(c, REF, SUBJECT, SBOM))
    assert [d.artifact_type for d in filtered.referrers] == [SBOM]
    nothing = run(fallback_server(None), lambda c: list_referrers(c, REF, SUBJECT))
    assert nothing.source == "fallback-tag" and nothing.referrers == ()


def test_fallback_tag_must_be_an_index():
    manifest = {
        "schemaVersion": 2,
        "mediaType": oci.OCI_MANIFEST,
        "config": {"mediaType": oci.OCI_EMPTY, "digest": SUBJECT, "size": 2},
        "layers": [],
    }
    with pytest.raises(FormatError, match="not an index"):
        run(fallback_server(manifest), lambda c: list_referrers(c, REF, SUBJECT))


def _referrer(artifact_type=oci.ARTIFACT_TYPE_OVERLAYBD, n=0):
    return oci.Manifest(
        oci.OCI_MANIFEST,
        config=oci.Descriptor(oci.OCI_EMPTY, oci.sha256_digest(b"{}"), 2),
        layers=(),
        annotations={"n": str(n)},
        subject=oci.Descriptor(oci.OCI_MANIFEST, SUBJECT, 1234),
        artifact_type=artifact_type,
    ).to_bytes()


class PushWorld:
    """Tags and manifests of one repository; optionally a rival pusher overwriting the tag."""

    def __init__(self, *, oci_subject=False, rival_overwrites=0):
        self.oci_subject = oci_subject
        self.rival_overwrites = rival_overwrites
        self.manifests: dict[str, bytes] = {}
        self.log: list[str] = []

    def __call__(self, request):
        self.log.append(f"{request.method} {request.url.path.rsplit('/', 1)[1][:16]}")
        name = request.url.path.rsplit("/", 1)[1]
        if "/referrers/" in request.url.path:
            return httpx.Response(404)
        if request.method == "PUT":
            body = request.content
            self.manifests[name] = body
            headers = {"Docker-Content-Digest": oci.sha256_digest(body)}
            if self.oci_subject and json.loads(body).get("subject"):
                headers["OCI-Subject"] = json.loads(body)["subject"]["digest"]
            if name == fallback_tag(SUBJECT) and self.rival_overwrites:
                self.rival_overwrites -= 1  # someone else pushes their index right after ours
                self.manifests[name] = json.dumps(
                    {"schemaVersion": 2, "mediaType": oci.OCI_INDEX, "manifests": [desc(9, SIG)]}
                ).encode()
            return httpx.Response(201, headers=headers)
        if name in self.manifests:
            return httpx.Response(
                200, content=self.manifests[name], headers={"Content-Type": oci.OCI_INDEX}
            )
        return httpx.Response(404)


def test_push_referrer_registry_with_api():
    world = PushWorld(oci_subject=True)
    content = _referrer()
    pushed = run(world, lambda c: push_referrer(c, REF, content, oci.OCI_MANIFEST))
    assert pushed.source == "api"
    assert pushed.descriptor.artifact_type == oci.ARTIFACT_TYPE_OVERLAYBD
    assert world.log == [f"PUT {oci.sha256_digest(content)[:16]}"]  # by digest, no tag touched


def test_push_referrer_updates_and_verifies_fallback_index():
    world = PushWorld()
    first, second = _referrer(n=1), _referrer(artifact_type=SBOM, n=2)
    run(world, lambda c: push_referrer(c, REF, first, oci.OCI_MANIFEST))
    pushed = run(world, lambda c: push_referrer(c, REF, second, oci.OCI_MANIFEST))
    assert pushed.source == "fallback-tag"
    index = oci.Index.parse(world.manifests[fallback_tag(SUBJECT)])
    assert [d.digest for d in index.manifests] == [
        oci.sha256_digest(first),
        oci.sha256_digest(second),
    ]
    assert index.manifests[0].annotations == {"n": "1"}
    found = run(world, lambda c: list_referrers(c, REF, SUBJECT))
    assert found.source == "fallback-tag" and len(found.referrers) == 2
    # Pushing the same referrer again does not duplicate it.
    run(world, lambda c: push_referrer(c, REF, first, oci.OCI_MANIFEST))
    assert len(oci.Index.parse(world.manifests[fallback_tag(SUBJECT)]).manifests) == 2


@pytest.mark.allow_log_warnings
def test_push_referrer_retries_when_a_rival_overwrites_the_tag():
    world = PushWorld(rival_overwrites=1)
    content = _referrer()
    run(world, lambda c: push_referrer(c, REF, content, oci.OCI_MANIFEST))
    index = oci.Index.parse(world.manifests[fallback_tag(SUBJECT)])
    # The rival's entry survives and ours was put back.
    assert [d.artifact_type for d in index.manifests] == [SIG, oci.ARTIFACT_TYPE_OVERLAYBD]
    assert world.log.count(f"PUT {fallback_tag(SUBJECT)[:16]}") == 2


def test_push_referrer_needs_subject():
    no_subject = oci.Manifest(oci.OCI_MANIFEST, oci.Descriptor(oci.OCI_EMPTY, SUBJECT, 2), ())
    with pytest.raises(FormatError, match="subject"):
        run(PushWorld(), lambda c: push_referrer(c, REF, no_subject.to_bytes(), oci.OCI_MANIFEST))


# ---- pure helpers ----


def test_fallback_tag_and_url():
    assert fallback_tag(SUBJECT) == "sha256-" + "5" * 64
    assert (
        referrers_url("a/b", SUBJECT, "application/x+json")
        == f"/v2/a/b/referrers/{SUBJECT}?artifactType=application%2Fx%2Bjson"
    )


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ('</v2/a/referrers/x?last=1>; rel="next"', "https://r.test/v2/a/referrers/x?last=1"),
        ("<https://other.test/p?n=1>;rel=next", "https://other.test/p?n=1"),
        ('</prev>; rel="prev", </nxt>; rel="next"', "https://r.test/nxt"),
        ('</self>; rel="self"', None),
        ("", None),
        (None, None),
    ],
)
def test_next_link(header, expected):
    got = next_link(header, httpx.URL("https://r.test/v2/a/referrers/x"))
    assert (str(got) if got else None) == expected


def test_referrer_descriptor_artifact_type_from_config():
    manifest = oci.Manifest(
        oci.OCI_MANIFEST, oci.Descriptor(SBOM, SUBJECT, 2), (), annotations={"a": "b"}
    )
    content = manifest.to_bytes()
    d = referrer_descriptor(content, manifest, oci.OCI_MANIFEST)
    assert d.artifact_type == SBOM and d.annotations == {"a": "b"}
    assert d.digest == oci.sha256_digest(content) and d.size == len(content)


def test_add_to_index_replaces_same_digest():
    d1 = oci.Descriptor(oci.OCI_MANIFEST, SUBJECT, 1, artifact_type=SIG)
    d1b = oci.Descriptor(oci.OCI_MANIFEST, SUBJECT, 1, artifact_type=SBOM)
    index = add_to_index(add_to_index(None, d1), d1b)
    assert index.manifests == (d1b,) and index.media_type == oci.OCI_INDEX


def _acr(n, arch, fmt="overlaybd", created=""):
    notes = {
        oci.STREAMING_FORMAT: fmt,
        oci.STREAMING_PLATFORM_OS: "linux",
        oci.STREAMING_PLATFORM_ARCH: arch,
        oci.STREAMING_VERSION: "v1",
    }
    if created:
        notes["org.opencontainers.image.created"] = created
    return oci.Descriptor.parse(desc(n, oci.ARTIFACT_TYPE_ACR_STREAMING, **notes))


def test_pick_overlaybd_referrer():
    sig = oci.Descriptor.parse(desc(1, SIG))
    upstream = oci.Descriptor.parse(desc(2, oci.ARTIFACT_TYPE_OVERLAYBD))
    amd, arm = _acr(3, "amd64"), _acr(4, "arm64")
    other_format = _acr(5, "amd64", fmt="teleport")
    amd64 = oci.Platform.from_spec("linux/amd64")
    assert pick_overlaybd_referrer([sig]) is None
    assert pick_overlaybd_referrer([sig, upstream]) is upstream
    assert pick_overlaybd_referrer([other_format, arm, amd], amd64) is amd
    assert pick_overlaybd_referrer([other_format, arm], amd64) is None
    assert pick_overlaybd_referrer([arm], oci.Platform.from_spec("linux/aarch64")) is arm
    old, new = _acr(6, "amd64", created="2024-01-01"), _acr(7, "amd64", created="2025-01-01")
    assert pick_overlaybd_referrer([old, new, upstream], amd64) is new


def test_filter_referrers():
    items = [oci.Descriptor.parse(desc(i, t)) for i, t in enumerate([SIG, SBOM, SIG])]
    assert filter_referrers(items, None) == tuple(items)
    assert [d.artifact_type for d in filter_referrers(items, [SIG])] == [SIG, SIG]
