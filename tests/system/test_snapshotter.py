"""containerd + our snapshotter + the node daemon, for real: ``overlaybd-py pull`` and ``ctr
run`` of an overlaybd image from docker-registry on 127.0.0.1, plain OCI images and plain
``ctr image pull`` through the same snapshotter, restarts, clean-up and metrics.

The truths are independent of our code: the registry's access log for what was fetched,
containerd running runc for what a container sees, the kernel's mount table and loop list
for what is left behind, and ``prometheus_client``'s parser for the metrics.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import shutil
import signal
import socket
import stat
import subprocess
import tarfile
import time
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from overlaybd_py.formats import oci
from overlaybd_py.formats import trace as tracefmt
from overlaybd_py.formats.oci import Descriptor, Manifest
from overlaybd_py.mount import mounts_under
from overlaybd_py.registry import ClientConfig, RegistryClient, push_referrer
from overlaybd_py.registry.reference import Reference
from overlaybd_py.snapshotter.service import LABEL_RECORD_TRACE, LABEL_RECORD_TRACE_PATH
from tests.fixtures.containerd import Containerd, SharedDir, SnapshotterProcess
from tests.fixtures.images import build_layers, overlaybd_manifest, push_layers
from tests.fixtures.node import Node
from tests.fixtures.registry import (
    RegistryServer,
    free_port,
    registry,  # noqa: F401  (fixture)
)
from tests.fixtures.system import need_fuse

pytestmark = pytest.mark.system

# -- images: a shell (dash and its libraries from this machine) plus files per layer ----------


def _shell_files() -> dict[str, bytes]:
    """/bin/sh and the shared objects it loads, at the paths ldd names."""
    dash = shutil.which("dash") or "/bin/sh"
    files = {"bin/sh": Path(dash).read_bytes()}
    out = subprocess.run(["ldd", dash], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        path = line.split("=>")[-1].split("(")[0].strip()
        if path.startswith("/"):
            files[path.lstrip("/")] = Path(path).read_bytes()
    return files


def _write_files(root: Path, files: dict[str, bytes], mode: int = 0o755) -> None:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        os.chmod(path, mode)


def _obd_step0(root: Path) -> None:
    _write_files(root, _shell_files())
    for d in ("proc", "dev", "sys", "tmp", "etc", "data"):
        (root / d).mkdir(exist_ok=True)
    (root / "etc" / "l0.txt").write_text("layer zero\n")
    (root / "etc" / "gone.txt").write_text("deleted by layer two\n")


def _obd_step1(root: Path) -> None:
    (root / "etc" / "l1.txt").write_text("layer one\n")
    with open(root / "data" / "big.bin", "wb") as f:  # never read: must not be fetched
        rnd = random.Random(1)
        for _ in range(24):
            f.write(rnd.randbytes(1 << 20))


def _obd_step2(root: Path) -> None:
    (root / "data" / "l2.txt").write_text("layer two\n")
    (root / "etc" / "gone.txt").unlink()


READER = ("while IFS= read -r l; do echo \"$l\"; done < /etc/l0.txt; "
          "while IFS= read -r l; do echo \"$l\"; done < /etc/l1.txt; "
          "while IFS= read -r l; do echo \"$l\"; done < /data/l2.txt; "
          "if [ -e /etc/gone.txt ]; then echo gone-is-back; else echo gone-is-gone; fi; "
          "echo written-by-container > /written.txt; "
          "while IFS= read -r l; do echo \"$l\"; done < /written.txt")
READER_OUTPUT = "layer zero\nlayer one\nlayer two\ngone-is-gone\nwritten-by-container\n"


def _tar(entries: list[tuple[str, bytes | None, int]]) -> bytes:
    """An uncompressed tar; ``None`` data makes a directory."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data, mode in entries:
            info = tarfile.TarInfo(name)
            info.mode, info.mtime = mode, 0
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _push_plain_image(registry_host: str, repo: str) -> str:
    """Two gzip layers; the second deletes a file of the first with an OCI whiteout."""
    shell = [(name, data, 0o755) for name, data in _shell_files().items()]
    layer0 = _tar([("etc", None, 0o755), ("tmp", None, 0o1777), *shell,
                   ("etc/p0.txt", b"plain zero\n", 0o644),
                   ("etc/doomed.txt", b"whited out\n", 0o644)])
    layer1 = _tar([("etc", None, 0o755), ("etc/p1.txt", b"plain one\n", 0o644),
                   ("etc/.wh.doomed.txt", b"", 0o644)])
    ref = Reference.parse(f"{registry_host}/{repo}")

    async def main() -> None:
        async with await RegistryClient.open(ClientConfig(plain_http=True)) as client:
            layers = [await client.push_blob(ref, gzip.compress(t, mtime=0),
                                             media_type=oci.OCI_LAYER_GZIP)
                      for t in (layer0, layer1)]
            config = json.dumps({
                "architecture": "amd64", "os": "linux", "config": {},
                "rootfs": {"type": "layers", "diff_ids": [
                    "sha256:" + hashlib.sha256(t).hexdigest() for t in (layer0, layer1)]},
            }).encode()
            config_desc = await client.push_blob(ref, config, media_type=oci.OCI_CONFIG)
            manifest = Manifest(oci.OCI_MANIFEST, config_desc, tuple(
                Descriptor(oci.OCI_LAYER_GZIP, d.digest, d.size) for d in layers))
            await client.push_manifest(ref, manifest.to_bytes(), oci.OCI_MANIFEST)

    trio.run(main)
    return str(ref)


def _push_with_referrer(registry_host: str, repo: str, layer_files: list[Path]) -> str:
    """An ordinary image whose overlaybd form is a referrer artifact (upstream flavour)."""
    ref = _push_plain_image(registry_host, repo)
    target = Reference.parse(ref)

    async def main() -> None:
        async with await RegistryClient.open(ClientConfig(plain_http=True)) as client:
            subject = (await client.get_manifest(target)).descriptor
            layers = [await client.push_blob(target, path, media_type=oci.OCI_LAYER)
                      for path in layer_files]
            config = await client.push_blob(target, json.dumps({
                "architecture": "amd64", "os": "linux",
                "rootfs": {"type": "layers", "diff_ids": [d.digest for d in layers]},
            }).encode(), media_type=oci.OCI_CONFIG)
            manifest = replace(overlaybd_manifest(layers, config), subject=subject,
                               artifact_type=oci.ARTIFACT_TYPE_OVERLAYBD)
            await push_referrer(client, target, manifest.to_bytes(), oci.OCI_MANIFEST)

    trio.run(main)
    return ref


@dataclass
class Stack:
    node: Node
    snapshotter: SnapshotterProcess
    containerd: Containerd
    registry: RegistryServer
    metrics_port: int
    obd_ref: str
    obd_layer_bytes: int
    plain_ref: str
    referrer_ref: str

    def pull(self, namespace: str, ref: str | None = None) -> dict:
        proc = self.node.run("pull", ref or self.obd_ref, "--address", self.containerd.address,
                             "--namespace", namespace, "--plain-http", "--json")
        return json.loads(proc.stdout)

    def daemon_status(self) -> dict:
        return self.node.status()

    def image_mounts(self) -> list[str]:
        """Mount points under the snapshotter root, in the host's and containerd's tables."""
        root = str(self.snapshotter.root)
        host = mounts_under(root)
        ctd = [p for p in self.containerd.mount_points() if p.startswith(root + "/")]
        return sorted(set(host) | set(ctd))


@pytest.fixture(scope="module")
def stack(tmp_path_factory, registry):  # noqa: F811
    need_fuse()
    base = tmp_path_factory.mktemp("ctd")
    work = tmp_path_factory.mktemp("ctd-images")
    layers, _raw = build_layers(work, [_obd_step0, _obd_step1, _obd_step2])
    obd_ref = push_layers(registry.host, "ctd/obd:v1", layers)
    plain_ref = _push_plain_image(registry.host, "ctd/plain:v1")
    referrer_ref = _push_with_referrer(registry.host, "ctd/withref:v1", layers)
    metrics_port = free_port()
    with SharedDir(base):
        config = base / "node.toml"
        config.write_text(f'[registry]\ninsecure = ["{registry.host}"]\n'
                          f'[metrics]\naddress = "127.0.0.1:{metrics_port}"\n')
        node = Node(base / "node", config=str(config))
        snapshotter = SnapshotterProcess(base / "snapshotter.sock", base / "snapshotter", node)
        containerd = Containerd(base / "containerd", snapshotter.socket)
        try:
            snapshotter.start()  # before containerd, which keeps one connection
            containerd.start()
            yield Stack(node, snapshotter, containerd, registry, metrics_port, obd_ref,
                        sum(p.stat().st_size for p in layers), plain_ref, referrer_ref)
        finally:
            containerd.stop()
            snapshotter.stop()
            node.stop()


def _written_files(stack: Stack) -> list[Path]:
    return sorted(stack.snapshotter.root.glob("snapshots/*/fs/written.txt"))


def test_pull_fetches_no_layers_and_the_container_runs_lazily(stack):
    ns = "lazy"
    plugins = stack.containerd.ctr("plugins", "ls").stdout.splitlines()
    assert any(line.split()[:2] == ["io.containerd.snapshotter.v1", "overlaybd-py"]
               and line.split()[-1] == "ok" for line in plugins), plugins
    mark = stack.registry.log_mark()
    result = stack.pull(ns)
    pulled = stack.registry.blob_bytes_served(since=mark)
    assert result["layers"] == 3 and result["remote_snapshots"] == 3
    assert pulled <= 0.05 * stack.obd_layer_bytes, (pulled, stack.obd_layer_bytes)
    assert stack.obd_ref in stack.containerd.ctr("image", "ls", "-q", namespace=ns).stdout

    mark = stack.registry.log_mark()
    run = stack.containerd.run(ns, stack.obd_ref, "lazy-1", READER)
    assert run.stdout == READER_OUTPUT
    fetched = stack.registry.blob_bytes_served(since=mark)
    # The 24 MiB of random data in layer one is never read: far less than that is fetched.
    assert fetched < 0.25 * stack.obd_layer_bytes, (fetched, stack.obd_layer_bytes)
    print(f"pull fetched {pulled} of {stack.obd_layer_bytes} layer bytes; "
          f"the first run {fetched}")

    # The write went to the container's upper directory, not to the image.
    (written,) = _written_files(stack)
    assert written.read_text() == "written-by-container\n"
    images = [m for m in stack.daemon_status()["mounts"]
              if m["owner"].startswith("snapshotter:")]
    assert len(images) == 1 and images[0]["layers"] == 3 and not images[0]["writable"]
    image_dir = Path(images[0]["target"])
    assert (image_dir / "etc" / "l1.txt").read_text() == "layer one\n"
    assert not (image_dir / "written.txt").exists()
    assert written.parent.parent != image_dir.parent

    # A second container on the same image shares the mounted device, sees its own rootfs.
    run = stack.containerd.run(ns, stack.obd_ref, "lazy-2", READER, "--rm")
    assert run.stdout == READER_OUTPUT
    assert len([m for m in stack.daemon_status()["mounts"]
                if m["owner"].startswith("snapshotter:")]) == 1
    # Pulling again changes nothing.
    again = stack.pull(ns)
    assert (again["remote_snapshots"], again["existing_snapshots"]) == (0, 3)


def test_record_trace_labels_record_the_containers_start(stack, tmp_path):
    """The original's snapshot labels: the image's reads, from its mount on, go into the
    trace path, written when the image is unmounted (here: the container is removed)."""
    ns = "trace"

    def step(root: Path) -> None:  # an image of its own: no other test has it mounted
        _obd_step0(root)
        (root / "etc" / "traced.txt").write_text("traced start\n")

    layers, _raw = build_layers(tmp_path / "build", [step])
    ref = push_layers(stack.registry.host, "ctd/traced:v1", layers)
    stack.pull(ns, ref)
    trace = tmp_path / "start.trace"
    script = "while IFS= read -r l; do echo \"$l\"; done < /etc/traced.txt"
    run = stack.containerd.run(
        ns, ref, "traced-1", script, "--rm",
        "--snapshotter-label", f"{LABEL_RECORD_TRACE}=yes",
        "--snapshotter-label", f"{LABEL_RECORD_TRACE_PATH}={trace}")
    assert run.stdout == "traced start\n"
    # containerd removes the snapshot in its garbage collection, a moment after `ctr run`
    # returns; the image is unmounted then, and the trace written.
    deadline = time.monotonic() + 60
    while not Path(f"{trace}.ok").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert Path(f"{trace}.ok").exists()
    records = tracefmt.decode_trace(trace.read_bytes()).records
    assert records and all(r.op == "R" for r in records)
    log = tracefmt.decode_events(Path(f"{trace}.jsonl").read_text())
    assert log.reads and sum(r.length for r in log.reads) > 0
    # Without a path the labels are refused, naming what is missing.
    bad = stack.containerd.run(ns, ref, "traced-2", script, "--rm",
                               "--snapshotter-label", f"{LABEL_RECORD_TRACE}=yes", check=False)
    assert bad.returncode != 0 and LABEL_RECORD_TRACE_PATH in bad.stderr


def test_pull_of_an_image_with_an_overlaybd_referrer_runs_the_overlaybd_form(stack):
    ns = "referrer"
    result = stack.pull(ns, stack.referrer_ref)
    assert result["via"].startswith("referrer:") and result["image"] == stack.referrer_ref
    # The image record names the user's reference; its content is the overlaybd form.
    run = stack.containerd.run(ns, stack.referrer_ref, "referrer-1", READER, "--rm")
    assert run.stdout == READER_OUTPUT


# Reads the image's file and checks the acceleration layer's `trace` is not in the rootfs.
ACCEL_SCRIPT = "read -r l < /etc/acc.txt; echo $l; test ! -e /trace && echo no-trace"


def _push_accelerated(stack: Stack, tmp_path: Path, repo: str) -> tuple[str, bytes]:
    """An image of its own (two layers) with a priority list naming one file of it pushed as
    its acceleration layer (``trace push``); returns the reference and that file's bytes."""
    listed = random.Random(repo).randbytes(3 << 20)

    def step(root: Path) -> None:
        (root / "data").mkdir(exist_ok=True)
        (root / "data" / "listed.bin").write_bytes(listed)
        (root / "etc" / "acc.txt").write_text("accelerated\n")

    layers, _raw = build_layers(tmp_path / "build", [_obd_step0, step])
    ref = push_layers(stack.registry.host, repo, layers)
    priority = tmp_path / "list.txt"
    priority.write_text("/data/listed.bin\n")
    stack.node.run("trace", "push", ref, str(priority), "--plain-http")
    return ref, listed


def _prefetched_image(stack: Stack, repo: str, timeout: float = 60) -> dict:
    """The daemon's mount of ``repo``'s image for the snapshotter, once its prefetch ended."""
    deadline = time.monotonic() + timeout
    while True:
        (mount,) = [m for m in stack.daemon_status()["mounts"]
                    if m["owner"].startswith("snapshotter:") and repo in m["image"]]
        prefetch = mount["prefetch"]
        assert prefetch is not None, mount  # the acceleration layer was not used
        if not prefetch["running"] and prefetch["planned_requests"]:
            assert prefetch["failed"] == 0 and prefetch["requests"] > 0, prefetch
            return mount
        assert time.monotonic() < deadline, f"prefetch did not finish: {mount}"
        time.sleep(0.1)


def test_pull_of_an_image_with_an_acceleration_layer_prefetches_its_trace(stack, tmp_path):
    """The acceleration layer is committed like the others but not stacked: the image is
    the two filesystem layers, and the list it carries is prefetched when it is mounted."""
    ns = "accel"
    ref, listed = _push_accelerated(stack, tmp_path, "ctd/accel:v1")
    result = stack.pull(ns, ref)
    assert (result["layers"], result["remote_snapshots"]) == (3, 3)
    run = stack.containerd.run(ns, ref, "accel-1", ACCEL_SCRIPT)
    assert run.stdout == "accelerated\nno-trace\n"  # not in the container's rootfs
    mount = _prefetched_image(stack, "ctd/accel")
    assert mount["layers"] == 2
    # The listed file came with the prefetch: reading it now fetches nothing.
    mark = stack.registry.log_mark()
    assert (Path(mount["target"]) / "data" / "listed.bin").read_bytes() == listed
    assert stack.registry.blob_bytes_served(since=mark) == 0
    assert not (Path(mount["target"]) / "trace").exists()
    _remove_all(stack, ns)


def test_plain_ctr_pull_of_an_accelerated_image_prefetches_from_the_unpacked_trace(
        stack, tmp_path):
    ns = "plainaccel"
    ref, listed = _push_accelerated(stack, tmp_path, "ctd/plainaccel:v1")
    stack.containerd.ctr("image", "pull", "--plain-http", "--snapshotter", "overlaybd-py", ref,
                         namespace=ns)
    assert len(sorted(stack.snapshotter.root.glob("snapshots/*/fs/trace"))) >= 1
    run = stack.containerd.run(ns, ref, "plainaccel-1", ACCEL_SCRIPT)
    assert run.stdout == "accelerated\nno-trace\n"  # not in the container's rootfs
    (mount,) = [m for m in stack.daemon_status()["mounts"]
                if m["owner"].startswith("snapshotter:") and "overlaybd.commit" in m["image"]
                and m["prefetch"] is not None]
    deadline = time.monotonic() + 60
    while mount["prefetch"]["running"] or not mount["prefetch"]["planned_requests"]:
        assert time.monotonic() < deadline, mount
        time.sleep(0.1)
        mount = stack.node.mount_status(Path(mount["target"]))
    assert mount["layers"] == 2 and mount["prefetch"]["failed"] == 0
    assert (Path(mount["target"]) / "data" / "listed.bin").read_bytes() == listed
    _remove_all(stack, ns)


def test_mixed_image_stacks_ordinary_layers_on_the_overlaybd_device(stack, tmp_path):
    """What containerd's unpacker does for an ordinary layer on overlaybd layers (labels, no
    overlaybd blob label), called on the snapshotter's socket directly."""
    from overlaybd_py.snapshotter._proto import snapshots_pb2 as pb
    from overlaybd_py.snapshotter._proto import snapshots_pb2_grpc as pb_grpc

    top = stack.pull("mixed")["chain_id"]  # remote snapshots, shared by name
    with grpc.insecure_channel(f"unix://{stack.snapshotter.socket}") as channel:
        api = pb_grpc.SnapshotsStub(channel)
        ref = {"containerd.io/snapshot.ref": "sha256:" + "e" * 64}
        (m,) = api.Prepare(pb.PrepareSnapshotRequest(key="mixed/1/extract-1 x", parent=top,
                                                     labels=ref)).mounts
        options = dict(o.split("=", 1) for o in m.options if "=" in o)
        assert m.type == "overlay" and options["lowerdir"].endswith("/image")
        upper = Path(options["upperdir"])
        (upper / "etc").mkdir()
        (upper / "etc" / "mixed.txt").write_text("ordinary layer\n")
        os.mknod(upper / "etc" / "l0.txt", 0o600 | stat.S_IFCHR, 0)  # overlay whiteout
        api.Commit(pb.CommitSnapshotRequest(name="mixed-layer", key="mixed/1/extract-1 x",
                                            labels=ref))
        (m,) = api.View(pb.ViewSnapshotRequest(key="mixed-view", parent="mixed-layer")).mounts
        root = tmp_path / "view"
        root.mkdir()
        subprocess.run(["mount", "-t", m.type, m.source, str(root), "-o", ",".join(m.options)],
                       check=True)
        try:
            assert (root / "etc" / "mixed.txt").read_text() == "ordinary layer\n"
            assert (root / "etc" / "l1.txt").read_text() == "layer one\n"  # overlaybd below
            assert not (root / "etc" / "l0.txt").exists()  # deleted by the upper layer
        finally:
            subprocess.run(["umount", str(root)], check=True)
        for key in ("mixed-view", "mixed-layer"):
            api.Remove(pb.RemoveSnapshotRequest(key=key))


def test_metrics_endpoint_has_the_expected_series(stack):
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.metrics_port}/metrics",
                                timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("overlaybd_py_image_read_bytes", "overlaybd_py_image_fetched_bytes",
                 "overlaybd_py_image_cache_hits", "overlaybd_py_image_cache_misses",
                 "overlaybd_py_image_errors", "overlaybd_py_image_fetch_duration_seconds",
                 "overlaybd_py_cache_size_bytes", "overlaybd_py_cache_evictions",
                 "overlaybd_py_cache_capacity_bytes", "overlaybd_py_mounts"):
        assert name in families, name
    status = stack.daemon_status()
    (mount,) = [m for m in status["mounts"] if m["owner"].startswith("snapshotter:")]
    labels = {"image": mount["image"], "target": mount["target"]}

    def value(family: str, suffix: str = "") -> float:
        (sample,) = [s for s in families[family].samples
                     if s.name == family + suffix and s.labels == labels]
        return sample.value

    assert value("overlaybd_py_image_read_bytes", "_total") >= mount["bytes_read"] > 0
    assert value("overlaybd_py_image_fetched_bytes", "_total") == mount["bytes_fetched"] > 0
    assert value("overlaybd_py_image_errors", "_total") == 0
    count = value("overlaybd_py_image_fetch_duration_seconds", "_count")
    assert count == mount["requests"] > 0
    inf = [s for s in families["overlaybd_py_image_fetch_duration_seconds"].samples
           if s.name.endswith("_bucket") and s.labels.get("le") == "+Inf"
           and s.labels["target"] == mount["target"]]
    assert inf[0].value == count
    (cache_size,) = families["overlaybd_py_cache_size_bytes"].samples
    assert cache_size.value == status["cache"]["size"] > 0


def test_plain_oci_image_through_the_same_snapshotter(stack):
    ns = "plain"
    stack.containerd.ctr("image", "pull", "--plain-http", "--snapshotter", "overlaybd-py",
                         stack.plain_ref, namespace=ns)
    script = ("while IFS= read -r l; do echo \"$l\"; done < /etc/p0.txt; "
              "while IFS= read -r l; do echo \"$l\"; done < /etc/p1.txt; "
              "if [ -e /etc/doomed.txt ]; then echo whiteout-ignored; else echo whiteout-ok; fi")
    run = stack.containerd.run(ns, stack.plain_ref, "plain-1", script, "--rm")
    assert run.stdout == "plain zero\nplain one\nwhiteout-ok\n"


def test_overlaybd_image_with_plain_ctr_pull_runs_from_local_layer_files(stack):
    ns = "plainobd"
    stack.containerd.ctr("image", "pull", "--plain-http", "--snapshotter", "overlaybd-py",
                         stack.obd_ref, namespace=ns)
    commits = sorted(stack.snapshotter.root.glob("snapshots/*/fs/overlaybd.commit"))
    assert len(commits) == 3  # the blobs were unpacked: each layer dir holds its commit file
    run = stack.containerd.run(ns, stack.obd_ref, "plainobd-1", READER, "--rm")
    assert run.stdout == READER_OUTPUT  # the image's files, not overlaybd.commit


def _wait_unavailable_over(ctd: Containerd, argv: list[str], ns: str):
    """containerd reconnects to a restarted snapshotter with a backoff of up to 3 s."""
    deadline = time.monotonic() + 30
    while True:
        proc = ctd.ctr(*argv, namespace=ns, check=False)
        if proc.returncode == 0 or time.monotonic() > deadline:
            return proc
        if "Unavailable" not in proc.stderr and "connection" not in proc.stderr:
            return proc
        time.sleep(0.5)


def test_killed_snapshotter_and_daemon_come_back_for_a_stopped_container(stack):
    ns = "restart"
    stack.pull(ns)
    run = stack.containerd.run(ns, stack.obd_ref, "restart-1", READER)
    assert run.stdout == READER_OUTPUT
    daemon_pid = stack.node.daemon_pid()
    assert daemon_pid
    stack.snapshotter.kill(signal.SIGKILL)
    os.kill(daemon_pid, signal.SIGKILL)
    for _ in range(200):
        try:
            os.kill(daemon_pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    started = time.monotonic()
    stack.snapshotter.start()  # reaches no daemon: starts one, which re-serves the image
    proc = _wait_unavailable_over(
        stack.containerd, ["task", "start", "--fifo-dir", str(stack.containerd.fifo_dir),
                           "restart-1"], ns)
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr + stack.snapshotter.log_tail()
    # The second run finds the first run's write in its upper directory.
    assert proc.stdout == READER_OUTPUT
    assert stack.node.daemon_pid() not in (None, daemon_pid)
    print(f"snapshotter + daemon restart to a running container: {elapsed:.2f} s")


def _remove_all(stack: Stack, ns: str) -> None:
    """Remove the namespace's containers and images (containerd's GC removes snapshots)."""
    for container in stack.containerd.ctr("container", "ls", "-q", namespace=ns).stdout.split():
        stack.containerd.ctr("container", "rm", container, namespace=ns)
    for image in stack.containerd.ctr("image", "ls", "-q", namespace=ns).stdout.split():
        stack.containerd.ctr("image", "rm", "--sync", image, namespace=ns)


def test_remove_and_cleanup_leave_nothing_behind(stack):
    for ns in ("lazy", "referrer", "mixed", "plain", "plainobd", "restart", "trace", "accel",
               "plainaccel"):
        _remove_all(stack, ns)
    # containerd's garbage collector removed every snapshot (Remove) and called Cleanup.
    left = sorted(p.name for p in (stack.snapshotter.root / "snapshots").iterdir())
    assert left == [], left
    assert stack.image_mounts() == []
    assert [m for m in stack.daemon_status()["mounts"]] == []
    loops = subprocess.run(["losetup", "--list", "--noheadings", "--output", "BACK-FILE"],
                           capture_output=True, text=True, check=True).stdout
    assert str(stack.node.state) not in loops
    with socket.socket(socket.AF_UNIX) as probe:  # and the snapshotter still serves
        probe.connect(str(stack.snapshotter.socket))
