"""The converter end to end: ordinary OCI images (written by an independent tar writer, pushed
with skopeo) -> overlaybd -> mounted lazily, compared with umoci's unpacking of the same
image. Any difference in paths, types, modes, owners, sizes, contents, link targets, xattrs,
device numbers, hard-link groups or mtimes fails."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.fixtures.images import tree_digest
from tests.fixtures.node import Node
from tests.fixtures.oci_images import push_layout, umoci_unpack, write_layout
from tests.fixtures.oci_layout import skopeo
from tests.fixtures.registry import registry  # noqa: F401  (fixture)
from tests.fixtures.system import need_fuse, need_program
from tests.fixtures.tars import make_tar

pytestmark = pytest.mark.system

CAP = bytes.fromhex("0100000200c00000000000000000000000000000").decode("utf-8", "surrogateescape")
T0 = 1_600_000_000


def _rnd(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def feature_layers() -> list[bytes]:
    """Three layers that use every tar feature the converter must get right."""
    l0 = make_tar([
        {"name": "etc", "type": "dir", "mtime": T0},
        {"name": "etc/hello", "data": b"hello\n", "mtime": T0 + 1},
        {"name": "etc/shadow", "data": b"secret\n", "mode": 0o600, "uid": 0, "gid": 42},
        {"name": "usr", "type": "dir"}, {"name": "usr/lib", "type": "dir"},
        {"name": "lib", "type": "sym", "link": "usr/lib"},
        {"name": "usr/bin", "type": "dir"},
        {"name": "usr/bin/sudo", "data": b"\x7fELF sudo", "mode": 0o4755},
        {"name": "usr/bin/wall", "data": b"\x7fELF wall", "mode": 0o2755, "gid": 5},
        {"name": "usr/bin/ping", "data": b"\x7fELF ping", "mode": 0o755,
         "xattrs": {"security.capability": CAP}},
        {"name": "tmp", "type": "dir", "mode": 0o1777},
        {"name": "home", "type": "dir"},
        {"name": "home/user", "type": "dir", "uid": 1000, "gid": 1000, "mode": 0o700},
        {"name": "home/user/.profile", "data": b"export A=1\n", "uid": 1000, "gid": 1000,
         "xattrs": {"user.note": "kept"}},
        {"name": "dev", "type": "dir"},
        {"name": "dev/null", "type": "chr", "major": 1, "minor": 3, "mode": 0o666},
        {"name": "dev/sda", "type": "chr", "major": 8, "minor": 0, "mode": 0o660},
        {"name": "run", "type": "dir"}, {"name": "run/initctl", "type": "fifo"},
        {"name": "var", "type": "dir"}, {"name": "var/lib", "type": "dir"},
        {"name": "var/lib/data.bin", "data": _rnd(2 << 20, 1)},
        {"name": "var/lib/sparse.img", "data": b"head" + bytes(3 << 20) + b"tail"},
        {"name": "opt", "type": "dir"}, {"name": "opt/app", "type": "dir"},
        {"name": "opt/app/a", "data": b"a"}, {"name": "opt/app/b", "data": b"b"},
        {"name": "opt/app/sub", "type": "dir"}, {"name": "opt/app/sub/c", "data": b"c"},
        {"name": "gone", "type": "dir"}, {"name": "gone/x", "data": b"x"},
        {"name": "file-to-dir", "data": b"was a file"},
        {"name": "dir-to-file", "type": "dir"}, {"name": "dir-to-file/inner", "data": b"i"},
        {"name": "deep", "type": "dir"}, {"name": "deep/" + "n" * 100, "type": "dir"},
        {"name": "deep/" + "n" * 100 + "/" + "m" * 120, "type": "dir"},
        {"name": "deep/" + "n" * 100 + "/" + "m" * 120 + "/long-name-file", "data": b"long"},
        {"name": "etc/hello.link", "type": "sym", "link": "/etc/hello"},
    ])
    l1 = make_tar([
        {"name": "etc/.wh.shadow"},
        {"name": ".wh.gone"},
        {"name": "opt/app", "type": "dir"},
        {"name": "opt/app/.wh..wh..opq"},
        {"name": "opt/app/new", "data": b"new in l1"},
        {"name": "file-to-dir", "type": "dir"}, {"name": "file-to-dir/now", "data": b"dir"},
        {"name": "dir-to-file", "data": b"now a file"},
        # a hard link to a lower-layer file (headers agree: see test_tar_apply for the
        # containerd rule when they do not, where umoci behaves differently)
        {"name": "usr/bin/sudo-link", "type": "link", "link": "usr/bin/sudo", "mode": 0o4755},
        {"name": "lib/libfoo.so", "data": b"via the lib symlink"},
        {"name": "var/lib/data.bin", "data": _rnd(1 << 20, 2)},  # replaced
    ])
    l2 = make_tar([
        {"name": "etc/hello", "data": b"hello again\n", "mode": 0o640, "mtime": T0 + 9},
        {"name": "etc/hello-hard", "type": "link", "link": "etc/hello", "mode": 0o640,
         "mtime": T0 + 9},
        {"name": "opt/app/.wh.new"},
        {"name": "home/user/.wh..profile"},
        {"name": "srv", "type": "dir"}, {"name": "srv/big.bin", "data": _rnd(6 << 20, 3)},
        {"name": "srv/text.txt", "data": b"overlaybd " * 300_000},
    ])
    return [l0, l1, l2]


@pytest.fixture(scope="module")
def source(tmp_path_factory, registry):  # noqa: F811
    need_fuse()
    need_program("skopeo")
    need_program("umoci")
    work = tmp_path_factory.mktemp("convert-src")
    tars = feature_layers()
    image = write_layout(work / "layout", tars, compression=["gzip", "zstd", None])
    ref = push_layout(image, registry.host, "convert/features:v1")
    # umoci 0.4 cannot read zstd layers: it unpacks the same tars, all gzip-compressed.
    oracle_image = write_layout(work / "oracle-layout", tars)
    oracle = umoci_unpack(oracle_image, work / "bundle")
    return ref, image, oracle


@pytest.fixture
def node(tmp_path):
    node = Node(tmp_path / "node")
    yield node
    node.stop()


def convert(node: Node, *args: str, check: bool = True):
    return node.run("convert", *args, "--plain-http", "--quiet", "--json", check=check)


def _compare_with_oracle(target: Path, oracle: Path) -> None:
    ours = tree_digest(target, mtimes=True, skip=("lost+found",))
    theirs = tree_digest(oracle, mtimes=True)
    assert ours.keys() == theirs.keys(), (sorted(ours.keys() ^ theirs.keys()))
    fields = ("mode", "uid", "gid", "size", "sha256", "link", "xattrs", "link-group", "rdev",
              "mtime")
    diffs = [f"{path}: {name} ours={a!r} umoci={b!r}"
             for path in sorted(ours) for name, a, b in zip(fields, ours[path], theirs[path],
                                                            strict=True) if a != b]
    assert not diffs, "\n".join(diffs[:40])


def test_referrer_conversion_matches_umoci(node, source, registry, tmp_path):  # noqa: F811
    ref, _image, oracle = source
    summary = json.loads(convert(node, ref, "--referrer", "--no-cache").stdout)
    (pushed,) = summary["pushed"]
    assert pushed["referrers"] == "fallback-tag"  # distribution 2.8 has no referrers API
    layers = summary["platforms"][0]["layers"]
    assert len(layers) == 3 and all(not layer["cached"] for layer in layers)
    # The source is untouched: its tag still names the same manifest.
    raw = skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{ref}").stdout
    assert json.loads(raw)["layers"][0]["mediaType"].endswith("tar+gzip")
    # The referrer is visible to an independent reader of the fallback tag.
    subject = pushed["subject"]
    host_repo = ref.rsplit(":", 1)[0]
    fallback = skopeo("inspect", "--raw", "--tls-verify=false",
                      f"docker://{host_repo}:sha256-{subject.partition(':')[2]}").stdout
    assert pushed["digest"] in fallback
    # Mount the ORIGINAL reference: found through the referrer, served lazily.
    target = tmp_path / "mnt"
    node.mount(ref, target)
    assert node.mount_status(target)["via"] == "referrer:fallback-tag"
    _compare_with_oracle(target, oracle)
    node.umount(target)


def test_dest_conversion_round_trips_through_skopeo(node, source, registry, tmp_path):  # noqa: F811
    ref, _image, oracle = source
    dest = f"{registry.host}/convert/features:obd"
    summary = json.loads(convert(node, ref, "--dest", dest, "--algorithm", "zstd",
                                 "--chunk-size", "16", "--level", "9", "--no-cache").stdout)
    assert summary["pushed"][0]["reference"] == dest
    info = json.loads(skopeo("inspect", "--tls-verify=false", f"docker://{dest}").stdout)
    assert len(info["Layers"]) == 3
    manifest = json.loads(skopeo("inspect", "--raw", "--tls-verify=false",
                                 f"docker://{dest}").stdout)
    for layer in manifest["layers"]:
        notes = layer["annotations"]
        assert layer["mediaType"] == "application/vnd.oci.image.layer.v1.tar"
        assert notes["containerd.io/snapshot/overlaybd/blob-digest"] == layer["digest"]
        assert notes["containerd.io/snapshot/overlaybd/blob-size"] == str(layer["size"])
    config = json.loads(skopeo("inspect", "--config", "--raw", "--tls-verify=false",
                               f"docker://{dest}").stdout)
    assert config["rootfs"]["diff_ids"] == [layer["digest"] for layer in manifest["layers"]]
    assert config["config"]["Cmd"] == ["/bin/sh"]  # the rest of the config is kept
    skopeo("copy", "--src-tls-verify=false", f"docker://{dest}", f"oci:{tmp_path}/copy:obd")
    for layer in manifest["layers"]:  # written at the level asked for
        blob = tmp_path / "blob"
        url = f"http://{registry.host}/v2/convert/features/blobs/{layer['digest']}"
        with urllib.request.urlopen(url) as answer:
            blob.write_bytes(answer.read())
        proc = subprocess.run(
            [sys.executable, "-m", "overlaybd_py", "layer", "inspect", "--json", str(blob)],
            capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        info = json.loads(proc.stdout)
        assert (info["algorithm"], info["level"], info["chunk_size"]) == ("zstd", 9, 16384)
    target = tmp_path / "mnt"
    node.mount(dest, target)
    _compare_with_oracle(target, oracle)
    node.umount(target)


def test_two_conversions_give_identical_digests_and_the_cache_skips(node, source, registry,  # noqa: F811
                                                                   tmp_path):
    ref, _image, _oracle = source
    cache = tmp_path / "convert-cache"
    first = json.loads(convert(node, ref, "--dest", f"{registry.host}/convert/repro:a",
                               "--cache-dir", str(cache)).stdout)
    second = json.loads(convert(node, ref, "--dest", f"{registry.host}/convert/repro:b",
                                "--no-cache").stdout)
    again = json.loads(convert(node, ref, "--dest", f"{registry.host}/convert/repro:c",
                               "--cache-dir", str(cache)).stdout)
    assert all(layer["cached"] for layer in again["platforms"][0]["layers"])
    digests = [[layer["blob_digest"] for layer in s["platforms"][0]["layers"]]
               for s in (first, second, again)]
    assert digests[0] == digests[2]  # cached: same blobs
    trees = []
    for tag in ("a", "b"):
        target = tmp_path / f"mnt-{tag}"
        node.mount(f"{registry.host}/convert/repro:{tag}", target)
        trees.append(tree_digest(target, mtimes=True, skip=("lost+found",)))
        node.umount(target)
    assert trees[0] == trees[1]
    # Reproducible to the byte: two conversions with empty caches give the same blobs,
    # hence the same manifest digest (see convert/normalize.py).
    assert digests[0] == digests[1]
    assert first["pushed"][0]["digest"] == second["pushed"][0]["digest"]


@pytest.mark.parametrize("entries,what", [
    ([{"name": "../../escape", "data": b"x"}], "escapes the image root"),
    ([{"name": "x", "type": "link", "link": "../../../etc/passwd"}], "escapes the image root"),
    ([{"name": "missing-target", "type": "link", "link": "nope"}], "does not exist"),
])
def test_hostile_layers_push_nothing(node, registry, tmp_path, entries, what):  # noqa: F811
    good = make_tar([{"name": "etc", "type": "dir"}, {"name": "etc/ok", "data": b"ok"}])
    image = write_layout(tmp_path / "layout", [good, make_tar(entries)])
    ref = push_layout(image, registry.host, "convert/hostile:v1")
    mark = registry.log_mark()
    proc = convert(node, ref, "--referrer", "--no-cache", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert what in proc.stderr and "layer sha256:" in proc.stderr
    writes = [r for r in registry.responses(since=mark)
              if r.get("http.request.method") in ("PUT", "POST", "PATCH")]
    assert writes == []
    assert not (Path("/") / "escape").exists() and not (tmp_path.parent / "escape").exists()


def test_truncated_and_corrupt_source_layers(node, registry, tmp_path):  # noqa: F811
    tar = make_tar([{"name": "big", "data": _rnd(1 << 20, 5)}])
    image = write_layout(tmp_path / "layout", [tar[: len(tar) // 2]], compression=[None])
    ref = push_layout(image, registry.host, "convert/truncated:v1")
    proc = convert(node, ref, "--referrer", "--no-cache", check=False)
    assert proc.returncode == 1 and "truncated" in proc.stderr.lower()


def test_multi_platform_index_flavours(node, registry, tmp_path):  # noqa: F811
    layout = tmp_path / "layout"
    tars = {arch: make_tar([{"name": "arch", "data": arch.encode()}]) for arch in ("amd64",
                                                                                     "arm64")}
    from tests.fixtures.oci_layout import LayoutImage, add_index

    images = []
    for arch, tar in tars.items():
        img = write_layout(tmp_path / f"l-{arch}", [tar], config={"architecture": arch})
        images.append((arch, img))
    # merge the two single-image layouts into one index-bearing layout
    layout.mkdir()
    for _arch, img in images:
        subprocess.run(["cp", "-rn", f"{img.layout}/.", str(layout)], check=True)
    entries = []
    for arch, img in images:
        manifest = (img.layout / "blobs" / "sha256" /
                    img.manifest_digest.partition(":")[2]).read_bytes()
        config = json.loads((img.layout / "blobs" / "sha256" / json.loads(manifest)["config"][
            "digest"].partition(":")[2]).read_bytes())
        entries.append(LayoutImage(manifest, img.manifest_digest, json.dumps(config).encode(),
                                   []))
        del arch
    add_index(layout, entries, tag="multi")
    ref = f"{registry.host}/convert/multi:v1"
    subprocess.run(["skopeo", "--insecure-policy", "copy", "--all", "--dest-tls-verify=false",
                    f"oci:{layout}:multi", f"docker://{ref}"], check=True, capture_output=True)
    upstream = json.loads(convert(node, ref, "--referrer", "--no-cache").stdout)
    kinds = [p["mediaType"] for p in upstream["pushed"]]
    assert kinds.count("application/vnd.oci.image.index.v1+json") == 1 and len(kinds) == 3
    acr = json.loads(convert(node, ref, "--referrer", "--flavour", "acr", "--no-cache").stdout)
    assert len(acr["pushed"]) == 2
    assert {p["artifactType"] for p in acr["pushed"]} == {
        "application/vnd.azure.artifact.streaming.v1"}
    target = tmp_path / "mnt"
    node.mount(ref, target)  # this host's platform, found through a referrer
    assert (target / "arch").read_bytes() == b"amd64"
    node.umount(target)
    assert os.path.isdir(target)


def test_cached_layers_are_mounted_across_repositories(node, source, registry,  # noqa: F811
                                                       tmp_path):
    ref, _image, _oracle = source
    cache = tmp_path / "convert-cache"
    convert(node, ref, "--dest", f"{registry.host}/convert/xrepo-a:v1", "--cache-dir",
            str(cache))
    mark = registry.log_mark()
    again = json.loads(convert(node, ref, "--dest", f"{registry.host}/convert/xrepo-b:v1",
                               "--cache-dir", str(cache)).stdout)
    assert all(layer["cached"] for layer in again["platforms"][0]["layers"])
    uploads = [r for r in registry.responses(since=mark)
               if r.get("http.request.method") in ("POST", "PUT", "PATCH")
               and "/blobs/uploads/" in r.get("http.request.uri", "")]
    mounted = [r for r in uploads if "mount=" in r["http.request.uri"]]
    assert len(mounted) == 3  # every layer blob linked from repository a, none re-uploaded
    assert not [r for r in uploads if r.get("http.request.method") == "PATCH"]


def test_mount_fallback_unpacks_an_ordinary_image(node, registry, tmp_path):  # noqa: F811
    tars = feature_layers()
    image = write_layout(tmp_path / "layout", tars)
    ref = push_layout(image, registry.host, "convert/plain:v1")
    oracle = umoci_unpack(image, tmp_path / "bundle")
    target = tmp_path / "target"
    proc = node.mount(ref, target, check=False)
    assert proc.returncode == 1 and "no overlaybd referrer" in proc.stderr
    assert "--fallback" in proc.stderr
    proc = node.mount(ref, target, "--fallback")
    assert "not a lazy mount" in proc.stdout
    _compare_with_oracle(target, oracle)


def test_acr_flavour_referrer_is_found_and_mounted(node, registry, tmp_path):  # noqa: F811
    tars = [make_tar([{"name": "etc", "type": "dir"}, {"name": "etc/flavour", "data": b"acr"}])]
    ref = push_layout(write_layout(tmp_path / "layout", tars), registry.host, "convert/acr:v1")
    summary = json.loads(convert(node, ref, "--referrer", "--flavour", "acr", "--no-cache").stdout)
    (pushed,) = summary["pushed"]
    assert pushed["artifactType"] == "application/vnd.azure.artifact.streaming.v1"
    referrers = json.loads(node.run("image", "referrers", ref, "--plain-http", "--json").stdout)
    assert referrers["source"] == "fallback-tag"
    (found,) = referrers["referrers"]
    assert found["annotations"]["streaming.format"] == "overlaybd"
    assert found["annotations"]["streaming.platform.arch"] == "amd64"
    target = tmp_path / "mnt"
    node.mount(ref, target)
    assert (target / "etc/flavour").read_bytes() == b"acr"
    node.umount(target)
