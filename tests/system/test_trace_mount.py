"""Trace recording and prefetch through the real path: docker-registry on 127.0.0.1, FUSE,
loop, ext4, driven by ``overlaybd_py.coldstart.lazymount`` (the recorder and prefetcher API
around ``fusefs``, without the daemon). The registry's own log says what crossed the network.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from overlaybd_py.coldstart.lazymount import LazyMountProcess
from overlaybd_py.formats import trace as tracefmt
from overlaybd_py.mount import mounts_under
from tests.fixtures.images import build_layers, push_layers
from tests.fixtures.registry import registry  # noqa: F401  (fixture)
from tests.fixtures.system import need_fuse

pytestmark = pytest.mark.system

FILES = {  # path -> (size, seed)
    "app/main.bin": (3 << 20, 1),
    "app/helper.bin": (512 << 10, 2),
    "lib/one.so": (700 << 10, 3),
    "lib/two.so": (90 << 10, 4),
    "lib/sub/three.so": (40 << 10, 5),
    "unused/big.bin": (24 << 20, 6),
}
WORKLOAD = ["app/main.bin", "lib/one.so", "lib/two.so", "app/helper.bin"]


def _content(size: int, seed: int) -> bytes:
    rnd = random.Random(seed)
    return b"".join(rnd.randbytes(2048) + bytes(2048) for _ in range(size // 4096))


def _base(root: Path) -> None:
    for path, (size, seed) in FILES.items():
        if path.startswith("app/"):
            continue
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(_content(size, seed))


def _apps(root: Path) -> None:
    (root / "app").mkdir()
    for path, (size, seed) in FILES.items():
        if path.startswith("app/"):
            (root / path).write_bytes(_content(size, seed))
    os.symlink("/lib", root / "app" / "libs")  # absolute: resolved inside the image


@pytest.fixture(scope="module")
def image(tmp_path_factory, registry):  # noqa: F811
    need_fuse()
    work = tmp_path_factory.mktemp("trace-image")
    layers, _raw = build_layers(work, [_base, _apps])
    return push_layers(registry.host, "system/trace:v1", layers), len(layers)


class Lazy:
    """One lazymount server with its own (cold) cache; always stopped."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.server = LazyMountProcess(str(root / "state"), str(root / "cache"))
        self.target = root / "mnt"
        self.target.mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> Lazy:
        self.server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stop()
        leftover = mounts_under(str(self.root))
        for point in leftover:
            subprocess.run(["umount", "--lazy", point], check=False)
        assert not leftover, f"lazymount left mounts behind: {leftover}"

    def mount(self, ref: str, **params) -> dict:
        return self.server.request("mount", ref=ref, target=str(self.target), **params)

    def read(self, paths: list[str]) -> None:
        for path in paths:
            size, seed = FILES[path]
            assert (self.target / path).read_bytes() == _content(size, seed), path


def _fetch_lengths(registry, since: int) -> Counter:  # noqa: F811
    """(blob digest, bytes) of every blob GET the registry answered: its own account."""
    out: Counter = Counter()
    for r in registry.blob_requests(since):
        if r.get("http.request.method") == "GET" and r.get("http.response.status") in (200, 206):
            digest = r["http.request.uri"].split("?")[0].rsplit("/", 1)[1]
            out[(digest, int(r.get("http.response.written", 0)))] += 1
    return out


def test_record_then_prefetch_from_the_trace(image, registry, tmp_path):  # noqa: F811
    ref, layer_count = image
    trace = tmp_path / "start.trace"
    mark = registry.log_mark()
    with Lazy(tmp_path / "a") as lazy:
        mounted = lazy.mount(ref, record_trace=str(trace))
        assert mounted["layers"] == layer_count
        lazy.read(WORKLOAD)
        status = lazy.server.request("umount")
    served = _fetch_lengths(registry, mark)
    assert sum(n * c for (_d, n), c in served.items()) == status["bytes_fetched"]

    records = tracefmt.decode_trace(trace.read_bytes()).records
    assert records and all(r.op == "R" and r.layer_index < layer_count for r in records)
    log = tracefmt.decode_events(Path(str(trace) + ".jsonl").read_text())
    assert len(log.reads) == status["reads"]  # every FUSE read, and only those
    assert sum(r.length for r in log.reads) == status["bytes_read"]
    # Every fetch the recorder saw is one the registry answered, for that layer's blob.
    digests = {layer.index: layer.digest.split(":")[1] for layer in log.header.layers}
    seen = Counter(("sha256:" + digests[f.layer], f.length) for f in log.fetches)
    assert not seen - served
    assert sum(f.length for f in log.fetches) == status["recorder"]["bytes_fetched"]
    # A read is charged with every fetch it started, one still arriving when it ended too.
    started = Counter(f.read for f in log.fetches if f.origin == "read")
    charged = {r.id: r.fetches for r in log.reads}
    assert started and all(charged[read] >= n for read, n in started.items())
    # The workload's files were read: the trace covers at least their bytes.
    covered = sum(r.count for r in records)
    assert covered >= sum(FILES[p][0] for p in WORKLOAD)

    # A new node replays the trace, then runs the same start: no fetch on the way.
    with Lazy(tmp_path / "b") as lazy:
        lazy.mount(ref, prefetch=str(trace))
        done = lazy.server.request("wait_prefetch")
        prefetch = done["prefetch"]
        assert prefetch["failed"] == 0 and prefetch["requests"] == prefetch["planned_requests"]
        assert prefetch["requests"] < len(records)  # coalesced
        mark = registry.log_mark()
        lazy.read(WORKLOAD)
        assert registry.blob_bytes_served(since=mark) == 0
        lazy.server.request("umount")

    # The CLI reads both files.
    shown = subprocess.run([sys.executable, "-m", "overlaybd_py", "trace", "show", "--json",
                            str(trace)], capture_output=True, text=True, check=True)
    summary = json.loads(shown.stdout)
    assert summary["records"] == len(records) and summary["reads"] == len(log.reads)
    assert summary["bytes_fetched"] == sum(f.length for f in log.fetches)


def test_priority_list_prefetches_the_listed_files_only(image, registry, tmp_path):  # noqa: F811
    ref, _ = image
    listed = tmp_path / "list.txt"
    # /app/libs is an absolute symlink to /lib inside the image: resolved there, not on the host.
    listed.write_text("/app/main.bin\n/app/libs/\n/no/such/file\n")
    with Lazy(tmp_path / "c") as lazy:
        lazy.mount(ref, prefetch=str(listed))
        done = lazy.server.request("wait_prefetch")
        assert done["prefetch"]["failed"] == 0 and done["prefetch"]["requests"] > 0
        mark = registry.log_mark()
        lazy.read(["app/main.bin", "lib/one.so", "lib/two.so"])
        (lazy.target / "lib" / "sub" / "three.so").read_bytes()
        assert registry.blob_bytes_served(since=mark) == 0
        lazy.read(["app/helper.bin"])  # not listed: fetched on demand
        registry.log_mark()  # the registry logs a request after its answer: let it settle
        assert registry.blob_bytes_served(since=mark) > 0
        lazy.server.request("umount")


def test_acceleration_layer_prefetches_on_mount_and_is_not_in_the_filesystem(
        image, registry, tmp_path):  # noqa: F811
    ref, layer_count = image
    trace = tmp_path / "accel.trace"
    with Lazy(tmp_path / "rec") as lazy:
        lazy.mount(ref, record_trace=str(trace))
        lazy.read(WORKLOAD)
        lazy.server.request("umount")
    accel_ref = f"{registry.host}/system/trace:accel"
    subprocess.run(["skopeo", "copy", "--src-tls-verify=false", "--dest-tls-verify=false",
                    "--preserve-digests", f"docker://{ref}", f"docker://{accel_ref}"],
                   check=True, capture_output=True)
    pushed = subprocess.run([sys.executable, "-m", "overlaybd_py", "trace", "push", accel_ref,
                             str(trace), "--plain-http", "--json"],
                            capture_output=True, text=True)
    assert pushed.returncode == 0, pushed.stderr
    result = json.loads(pushed.stdout)
    assert result["pushed_as"] == "tag"
    inspect = subprocess.run([sys.executable, "-m", "overlaybd_py", "image", "inspect",
                              accel_ref, "--plain-http", "--json"],
                             capture_output=True, text=True, check=True)
    layers = json.loads(inspect.stdout)["layers"]
    assert len(layers) == layer_count + 1
    top = layers[-1]
    assert top["mediaType"] == "application/vnd.oci.image.layer.v1.tar"
    notes = top["annotations"]
    assert notes["containerd.io/snapshot/overlaybd/acceleration-layer"] == "yes"
    assert notes["containerd.io/snapshot/overlaybd/blob-digest"] == top["digest"]
    assert notes["containerd.io/snapshot/overlaybd/blob-size"] == str(top["size"])

    with Lazy(tmp_path / "d") as lazy:
        mounted = lazy.mount(accel_ref)
        assert mounted["acceleration_layer"] and mounted["layers"] == layer_count
        done = lazy.server.request("wait_prefetch")
        assert done["prefetch"]["requests"] > 0 and done["prefetch"]["failed"] == 0
        mark = registry.log_mark()
        lazy.read(WORKLOAD)
        assert registry.blob_bytes_served(since=mark) == 0
        assert sorted(os.listdir(lazy.target)) == ["app", "lib", "lost+found", "unused"]
        lazy.server.request("umount")

    # Pushing again replaces the acceleration layer instead of stacking a second one.
    again = subprocess.run([sys.executable, "-m", "overlaybd_py", "trace", "push", accel_ref,
                            str(trace), "--plain-http", "--json"],
                           capture_output=True, text=True, check=True)
    assert json.loads(again.stdout)["replaced_acceleration_layer"] == top["digest"]
    inspect = subprocess.run([sys.executable, "-m", "overlaybd_py", "image", "inspect",
                              accel_ref, "--plain-http", "--json"],
                             capture_output=True, text=True, check=True)
    assert len(json.loads(inspect.stdout)["layers"]) == layer_count + 1


def test_trace_push_replaces_a_referrer(registry, tmp_path):  # noqa: F811
    """An ordinary image converted as a referrer: ``trace push`` pushes a newer referrer of
    the same subject with the acceleration layer, and drops the old one from the fallback
    tag's index (distribution 2.8 has no referrers API)."""
    from tests.fixtures.oci_images import push_layout, write_layout
    from tests.fixtures.tars import make_tar

    need_fuse()
    tar = make_tar([{"name": "app", "type": "dir"}]
                   + [{"name": path, "data": _content(size, seed)}
                      for path, (size, seed) in FILES.items() if path.startswith("app/")])
    ref = push_layout(write_layout(tmp_path / "layout", [tar]), registry.host,
                      "system/trace-referrer:v1")
    converted = subprocess.run([sys.executable, "-m", "overlaybd_py", "convert", ref,
                                "--referrer", "--plain-http", "--no-cache", "--quiet",
                                "--work-dir", str(tmp_path / "convert")],
                               capture_output=True, text=True)
    assert converted.returncode == 0, converted.stderr

    def referrers() -> list[dict]:
        out = subprocess.run([sys.executable, "-m", "overlaybd_py", "image", "referrers", ref,
                              "--plain-http", "--json"], capture_output=True, text=True,
                             check=True)
        return json.loads(out.stdout)["referrers"]

    (old,) = referrers()
    trace = tmp_path / "r.trace"
    with Lazy(tmp_path / "rec") as lazy:
        assert lazy.mount(ref, record_trace=str(trace))["via"] == "referrer:fallback-tag"
        lazy.read(["app/main.bin", "app/helper.bin"])
        lazy.server.request("umount")
    pushed = subprocess.run([sys.executable, "-m", "overlaybd_py", "trace", "push", ref,
                             str(trace), "--plain-http", "--json"],
                            capture_output=True, text=True)
    assert pushed.returncode == 0, pushed.stderr
    result = json.loads(pushed.stdout)
    assert result["pushed_as"] == "referrer" and result["previous_manifest"] == old["digest"]
    (new,) = referrers()  # replaced, not added
    assert new["digest"] == result["manifest"] != old["digest"]
    with Lazy(tmp_path / "use") as lazy:
        mounted = lazy.mount(ref)
        assert mounted["acceleration_layer"] and mounted["layers"] == 1
        done = lazy.server.request("wait_prefetch")
        assert done["prefetch"]["requests"] > 0
        mark = registry.log_mark()
        lazy.read(["app/main.bin", "app/helper.bin"])
        assert registry.blob_bytes_served(since=mark) == 0
        lazy.server.request("umount")
