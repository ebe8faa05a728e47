"""The snapshotter's gRPC API called directly (no containerd): every method, the error codes
containerd maps back, the filter syntax containerd sends, remote Prepare, and crash safety
of the metadata. The snapshotter runs as a process on a unix socket, as containerd sees it;
ordinary layers need no node daemon, so none is started."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys

import grpc
import pytest
from google.protobuf import field_mask_pb2

from overlaybd_py.snapshotter import LABEL_IMAGE_REF, LABEL_REMOTE, LABEL_SNAPSHOT_REF
from overlaybd_py.snapshotter._proto import snapshots_pb2 as pb
from overlaybd_py.snapshotter._proto import snapshots_pb2_grpc as pb_grpc
from tests.fixtures.containerd import SnapshotterProcess
from tests.fixtures.system import need_root

pytestmark = pytest.mark.system

DIGEST = "sha256:" + "ab" * 32


class Api:
    def __init__(self, socket: str) -> None:
        self.channel = grpc.insecure_channel(f"unix://{socket}")
        self.stub = pb_grpc.SnapshotsStub(self.channel)

    def __getattr__(self, method: str):
        call = getattr(self.stub, method)

        def invoke(**fields):
            request_type = {"Prepare": pb.PrepareSnapshotRequest, "View": pb.ViewSnapshotRequest,
                            "Mounts": pb.MountsRequest, "Commit": pb.CommitSnapshotRequest,
                            "Remove": pb.RemoveSnapshotRequest, "Stat": pb.StatSnapshotRequest,
                            "Update": pb.UpdateSnapshotRequest, "Usage": pb.UsageRequest,
                            "Cleanup": pb.CleanupRequest}[method]
            return call(request_type(snapshotter="overlaybd-py", **fields), timeout=30)

        return invoke

    def list(self, *filters: str) -> list[str]:
        request = pb.ListSnapshotsRequest(snapshotter="overlaybd-py", filters=list(filters))
        return sorted(i.name for r in self.stub.List(request, timeout=30) for i in r.info)

    def code(self, method: str, **fields) -> grpc.StatusCode:
        with pytest.raises(grpc.RpcError) as failed:
            getattr(self, method)(**fields)
        return failed.value.code()


@pytest.fixture
def snapshotter(tmp_path):
    need_root()
    process = SnapshotterProcess(tmp_path / "snap.sock", tmp_path / "root").start()
    api = Api(str(process.socket))
    yield process, api
    api.channel.close()
    process.stop()


def _mount(mounts) -> tuple[str, str, list[str]]:
    (m,) = mounts
    return m.type, m.source, list(m.options)


def test_ordinary_layers_have_overlayfs_semantics(snapshotter):
    process, api = snapshotter
    snaps = process.root / "snapshots"
    kind, source, options = _mount(api.Prepare(key="a", labels={"x": "1"}).mounts)
    assert (kind, options) == ("bind", ["rw", "rbind"]) and source == str(snaps / "1" / "fs")
    (snaps / "1" / "fs" / "file").write_bytes(b"x" * 10000)
    assert api.Usage(key="a").size >= 10000
    api.Commit(name="A", key="a", labels={"y": "2"})
    info = api.Stat(key="A").info
    assert (info.kind, info.parent, dict(info.labels)) == (pb.COMMITTED, "", {"y": "2"})
    assert api.Usage(key="A").size >= 10000 and api.Usage(key="A").inodes == 2

    kind, source, options = _mount(api.Prepare(key="b", parent="A").mounts)
    assert kind == "overlay" and source == "overlay"
    assert f"upperdir={snaps / '2' / 'fs'}" in options
    assert f"workdir={snaps / '2' / 'work'}" in options
    assert f"lowerdir={snaps / '1' / 'fs'}" in options
    assert _mount(api.Mounts(key="b").mounts)[2] == options
    assert _mount(api.View(key="v", parent="A").mounts) == ("bind", str(snaps / "1" / "fs"),
                                                            ["ro", "rbind"])
    api.Commit(name="B", key="b")
    kind, _source, options = _mount(api.View(key="v2", parent="B").mounts)
    assert kind == "overlay"
    assert f"lowerdir={snaps / '2' / 'fs'}:{snaps / '1' / 'fs'}" in options
    assert not any(o.startswith(("upperdir", "workdir")) for o in options)

    # Labels: set one, delete one, replace all.
    api.Update(info=pb.Info(name="B", labels={"k": "v"}),
               update_mask=field_mask_pb2.FieldMask(paths=["labels.k"]))
    assert dict(api.Stat(key="B").info.labels) == {"k": "v"}
    api.Update(info=pb.Info(name="B"), update_mask=field_mask_pb2.FieldMask(paths=["labels.k"]))
    assert dict(api.Stat(key="B").info.labels) == {}
    api.Update(info=pb.Info(name="A", labels={"gc": "root"}))
    assert dict(api.Stat(key="A").info.labels) == {"gc": "root"}

    # containerd's filter syntax: "," is and, several filters are or.
    assert api.list() == ["A", "B", "v", "v2"]
    assert api.list("kind==committed") == ["A", "B"]
    assert api.list("kind==view,parent==A") == ["v"]
    assert api.list('labels."gc"==root', "name~=/^v[0-9]$/") == ["A", "v2"]
    assert api.list("labels.gc") == ["A"]
    assert api.list('parent!=""') == ["B", "v", "v2"]

    # The error classes containerd maps back.
    assert api.code("Prepare", key="a2", parent="v") == grpc.StatusCode.INVALID_ARGUMENT
    assert api.code("Prepare", key="v") == grpc.StatusCode.ALREADY_EXISTS
    assert api.code("Prepare", key="c", parent="nope") == grpc.StatusCode.NOT_FOUND
    assert api.code("Commit", name="V", key="v") == grpc.StatusCode.FAILED_PRECONDITION
    assert api.code("Commit", name="A", key="v2") == grpc.StatusCode.FAILED_PRECONDITION
    assert api.code("Remove", key="A") == grpc.StatusCode.FAILED_PRECONDITION  # children
    assert api.code("Remove", key="gone") == grpc.StatusCode.NOT_FOUND
    assert api.code("Mounts", key="A") == grpc.StatusCode.FAILED_PRECONDITION
    assert api.code("Update", info=pb.Info(name="A"),
                    update_mask=field_mask_pb2.FieldMask(paths=["parent"])) == \
        grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as failed:
        api.list("kind=committed")
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    for key in ("v2", "v", "B", "A"):
        api.Remove(key=key)
    assert api.list() == [] and list(snaps.iterdir()) == []


def test_remote_prepare_commits_under_the_ref_and_answers_already_exists(snapshotter):
    _process, api = snapshotter
    chain = ["sha256:" + c * 64 for c in "12"]
    for i, target in enumerate(chain):
        labels = {LABEL_SNAPSHOT_REF: target, LABEL_IMAGE_REF: "127.0.0.1:5000/r/img:v1",
                  "containerd.io/snapshot/overlaybd/blob-digest": DIGEST,
                  "containerd.io/snapshot/overlaybd/blob-size": "4096"}
        code = api.code("Prepare", key=f"ns/{i}/extract-1 {target}",
                        parent=chain[i - 1] if i else "", labels=labels)
        assert code == grpc.StatusCode.ALREADY_EXISTS
    # What containerd looks for after AlreadyExists (metadata/snapshot.go).
    found = api.list(f'labels."{LABEL_SNAPSHOT_REF}"=={chain[1]},parent=="{chain[0]}"')
    assert found == [chain[1]]
    info = api.Stat(key=chain[1]).info
    assert info.kind == pb.COMMITTED and info.parent == chain[0]
    assert info.labels[LABEL_REMOTE] and info.labels[LABEL_SNAPSHOT_REF] == chain[1]
    assert api.Usage(key=chain[1]).size == 0
    # A second Prepare of the same target: still AlreadyExists, nothing new.
    assert api.code("Prepare", key="ns/9/extract-2 x", labels={
        LABEL_SNAPSHOT_REF: chain[0], LABEL_IMAGE_REF: "127.0.0.1:5000/r/img:v1",
        "containerd.io/snapshot/overlaybd/blob-digest": DIGEST,
        "containerd.io/snapshot/overlaybd/blob-size": "4096"}) == grpc.StatusCode.ALREADY_EXISTS
    assert api.list() == sorted(chain)
    # Labels that do not describe an overlaybd layer are refused, not guessed at.
    assert api.code("Prepare", key="ns/10/extract-3 y", labels={
        LABEL_SNAPSHOT_REF: "sha256:" + "3" * 64, LABEL_IMAGE_REF: "127.0.0.1:5000/r/img:v1",
        "containerd.io/snapshot/overlaybd/blob-digest": DIGEST,
        "containerd.io/snapshot/overlaybd/blob-size": "big"}) == grpc.StatusCode.INVALID_ARGUMENT
    api.Remove(key=chain[1])
    api.Remove(key=chain[0])


def test_metadata_survives_a_kill_and_cleanup_removes_orphans(snapshotter):
    process, api = snapshotter
    api.Prepare(key="a")
    api.Commit(name="A", key="a")
    api.Prepare(key="b", parent="A")
    process.kill(signal.SIGKILL)
    orphan = process.root / "snapshots" / "77"
    (orphan / "fs").mkdir(parents=True)  # as a crash between mkdir and commit leaves it
    process.start()
    api = Api(str(process.socket))
    assert api.list() == ["A", "b"]
    assert api.Stat(key="b").info.parent == "A"
    api.Cleanup()
    assert not orphan.exists()
    assert sorted(p.name for p in (process.root / "snapshots").iterdir()) == ["1", "2"]
    api.channel.close()


def test_a_database_of_another_schema_version_is_refused(tmp_path):
    need_root()
    root = tmp_path / "root"
    root.mkdir()
    with sqlite3.connect(root / "metadata.db") as db:
        db.execute("PRAGMA user_version = 99")
    proc = subprocess.run([sys.executable, "-m", "overlaybd_py", "snapshotter", "--socket",
                           str(tmp_path / "s.sock"), "--root", str(root),
                           "--state-dir", str(tmp_path / "state")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "schema version 99" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_nothing_is_stacked_on_an_acceleration_layer(snapshotter):
    """An acceleration layer must be an image's top layer (as `resolve` requires): a remote
    layer prepared on it is refused, while a container's snapshot on it is fine."""
    _process, api = snapshotter
    chain = ["sha256:" + c * 64 for c in "456"]
    remote = {LABEL_IMAGE_REF: "127.0.0.1:5000/r/img:v1",
              "containerd.io/snapshot/overlaybd/blob-digest": DIGEST,
              "containerd.io/snapshot/overlaybd/blob-size": "4096"}
    accel = {**remote, "containerd.io/snapshot/overlaybd/acceleration-layer": "yes"}
    for i, labels in enumerate([remote, accel]):
        assert api.code("Prepare", key=f"ns/{i}/extract-1 {chain[i]}",
                        parent=chain[i - 1] if i else "",
                        labels={LABEL_SNAPSHOT_REF: chain[i], **labels}
                        ) == grpc.StatusCode.ALREADY_EXISTS
    assert api.code("Prepare", key=f"ns/2/extract-1 {chain[2]}", parent=chain[1],
                    labels={LABEL_SNAPSHOT_REF: chain[2], **remote}
                    ) == grpc.StatusCode.FAILED_PRECONDITION
    assert api.list() == sorted(chain[:2])
    api.Remove(key=chain[1])
    api.Remove(key=chain[0])
