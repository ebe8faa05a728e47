"""The node daemon as an operator runs it: from a config file, one per node, serving metrics
(parsed with prometheus_client's own parser), one block cache with a global cap, and
registry credentials reloaded when a registry answers 401."""

from __future__ import annotations

import base64
import json
import random
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from overlaybd_py.registry import ClientConfig, Credentials, RegistryClient
from tests.fixtures.images import (
    build_layers,
    loop_mounted,
    push_layers,
    push_overlaybd_image,
    tree_digest,
)
from tests.fixtures.node import Node
from tests.fixtures.registry import (
    TEST_PASSWORD,
    TEST_USER,
    RegistryServer,
    TokenServer,
    free_port,
    registry,  # noqa: F401  (fixture)
    registry_basic,  # noqa: F401  (fixture)
)
from tests.fixtures.system import need_fuse

pytestmark = pytest.mark.system

CACHE_CAP = 4 << 20


def _step0(root: Path) -> None:
    (root / "etc").mkdir()
    (root / "etc" / "hello.txt").write_text("hello\n")
    rnd = random.Random(3)
    for i in range(3):
        (root / f"blob{i}.bin").write_bytes(rnd.randbytes(2 << 20))


@pytest.fixture(scope="module")
def layers(tmp_path_factory):
    need_fuse()
    work = tmp_path_factory.mktemp("daemon-image")
    layers, raw = build_layers(work, [_step0])
    with loop_mounted(raw, work / "oracle", readonly=True) as root:
        oracle = tree_digest(root)
    return layers, oracle


def _daemons(node: Node) -> list[int]:
    """Daemon processes serving ``node``'s state directory."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"daemon" in argv and str(node.state).encode() in argv:
            pids.append(int(entry.name))
    return pids


def _metrics(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return {f.name: f for f in text_string_to_metric_families(response.read().decode())}


def _sample(families: dict, family: str, name: str, **labels: str) -> float:
    (sample,) = [s for s in families[family].samples
                 if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    return sample.value


def test_daemon_from_config_serves_metrics_and_runs_once(tmp_path, layers, registry):  # noqa: F811
    layer_files, oracle = layers
    ref = push_layers(registry.host, "daemon/metrics:v1", layer_files)
    port = free_port()
    config = tmp_path / "config.toml"
    config.write_text(f'cache_size = "{CACHE_CAP}"\n'
                      f'[registry]\ninsecure = ["{registry.host}"]\n'
                      f'[metrics]\naddress = "127.0.0.1:{port}"\n')
    node = Node(tmp_path / "node", config=str(config))
    try:
        # Three starts at once (say, the snapshotter and two mounts): one daemon.
        starts = [subprocess.Popen([sys.executable, "-m", "overlaybd_py", "daemon",
                                    *node.node_flags()], env=node.env(), text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                  for _ in range(3)]
        for start in starts:
            out, err = start.communicate(timeout=120)
            assert start.returncode == 0 and "node daemon running" in out, err
        deadline = time.monotonic() + 30  # the losers exit once they find the lock taken
        while len(_daemons(node)) > 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(_daemons(node)) == 1
        second = node.run("daemon", "--foreground", *node.node_flags(), check=False)
        assert second.returncode == 2 and "another node daemon" in second.stderr
        assert "Traceback" not in second.stderr

        target = tmp_path / "target"
        target.mkdir()
        node.run("mount", ref, target, *node.node_flags())  # no --plain-http: the config's
        assert tree_digest(target) == oracle  # reads 6 MiB through a 4 MiB cache
        status = node.mount_status(target)

        families = _metrics(port)
        labels = {"image": ref, "target": str(target)}
        read = _sample(families, "overlaybd_py_image_read_bytes",
                       "overlaybd_py_image_read_bytes_total", **labels)
        assert read >= 6 << 20
        fetched = _sample(families, "overlaybd_py_image_fetched_bytes",
                          "overlaybd_py_image_fetched_bytes_total", **labels)
        assert fetched == status["bytes_fetched"] > 0
        requests = _sample(families, "overlaybd_py_image_fetch_duration_seconds",
                           "overlaybd_py_image_fetch_duration_seconds_count", **labels)
        assert requests == status["requests"]
        assert _sample(families, "overlaybd_py_image_fetch_duration_seconds",
                       "overlaybd_py_image_fetch_duration_seconds_bucket", le="+Inf",
                       **labels) == requests
        hits = _sample(families, "overlaybd_py_image_cache_hits",
                       "overlaybd_py_image_cache_hits_total", **labels)
        assert hits == status["cache_hits"]
        assert _sample(families, "overlaybd_py_image_serving", "overlaybd_py_image_serving",
                       **labels) == 1
        # The global cap holds and evicting is what kept it.
        assert _sample(families, "overlaybd_py_cache_capacity_bytes",
                       "overlaybd_py_cache_capacity_bytes") == CACHE_CAP
        assert _sample(families, "overlaybd_py_cache_size_bytes",
                       "overlaybd_py_cache_size_bytes") <= CACHE_CAP
        assert _sample(families, "overlaybd_py_cache_evictions",
                       "overlaybd_py_cache_evictions_total") > 0
        assert _sample(families, "overlaybd_py_mounts", "overlaybd_py_mounts") == 1
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/other", timeout=10)
        assert missing.value.code == 404
        node.umount(target)
        assert _sample(_metrics(port), "overlaybd_py_mounts", "overlaybd_py_mounts") == 0
    finally:
        node.stop()


def _push_as_test_user(host: str, ref: str, layer_files: list[Path]) -> None:
    async def push() -> None:
        config = ClientConfig(plain_http=True, use_docker_config=False,
                              credentials={host: Credentials(TEST_USER, TEST_PASSWORD)})
        async with await RegistryClient.open(config) as client:
            await push_overlaybd_image(client, ref, layer_files)

    trio.run(push)


def _docker_config(directory: Path, host: str, password: str) -> None:
    auth = base64.b64encode(f"{TEST_USER}:{password}".encode()).decode()
    directory.mkdir(exist_ok=True)
    (directory / "config.json").write_text(json.dumps({"auths": {host: {"auth": auth}}}))


def test_credentials_are_reloaded_when_the_registry_answers_401(
        tmp_path, layers, registry_basic):  # noqa: F811
    layer_files, oracle = layers
    host = registry_basic.host
    ref = f"{host}/daemon/private:v1"

    _push_as_test_user(host, ref, layer_files)
    docker = tmp_path / "docker"
    _docker_config(docker, host, "wrong-password")
    config = tmp_path / "config.toml"
    config.write_text(f'[registry]\ninsecure = ["{host}"]\ndocker_config_dir = "{docker}"\n')
    node = Node(tmp_path / "node", config=str(config))
    try:
        first, second = tmp_path / "first", tmp_path / "second"
        refused = node.mount(ref, first, check=False)
        assert refused.returncode == 1 and "access denied" in refused.stderr
        pid = node.daemon_pid()
        _docker_config(docker, host, TEST_PASSWORD)  # the credentials are rotated
        node.mount(ref, second)
        assert node.daemon_pid() == pid  # the same daemon, no restart
        assert tree_digest(second) == oracle
        node.umount(second)
    finally:
        node.stop()


def test_credentials_rotated_while_an_image_is_mounted_are_reloaded_by_its_reads(
        tmp_path, layers):
    """A registry whose tokens expire within seconds stops accepting the mounted image's
    credentials: reads of blocks not cached yet fail (EIO) until the docker config has the
    new ones, then go on through the same mount, with no restart or remount."""
    layer_files, oracle = layers
    with TokenServer(tmp_path / "tokens", expires_in=2) as tokens, \
            RegistryServer(tmp_path / "registry", auth="token", token_server=tokens) as server:
        host = server.host
        ref = f"{host}/daemon/rotating:v1"

        _push_as_test_user(host, ref, layer_files)
        docker = tmp_path / "docker"
        _docker_config(docker, host, TEST_PASSWORD)
        config = tmp_path / "config.toml"
        config.write_text(f'[registry]\ninsecure = ["{host}"]\ndocker_config_dir = "{docker}"\n'
                          'retry_deadline = 5\n')
        node = Node(tmp_path / "node", config=str(config))
        target = tmp_path / "mnt"
        try:
            node.mount(ref, target)
            pid = node.daemon_pid()
            assert (target / "etc" / "hello.txt").read_text() == "hello\n"
            sizes = {p.name: p.stat().st_size for p in target.iterdir() if p.is_file()}
            assert sizes == {f"blob{i}.bin": 2 << 20 for i in range(3)}
            tokens.password = "rotated-secret"  # the registry's side: old tokens run out
            time.sleep(3)
            with pytest.raises(OSError) as failed:
                (target / "blob2.bin").read_bytes()  # not cached: needs the registry
            assert failed.value.errno == 5
            issued = len(tokens.requests)  # tokens granted (right password) so far
            _docker_config(docker, host, "rotated-secret")  # the node gets the new ones
            assert tree_digest(target) == oracle  # every byte, through the same mount
            assert node.daemon_pid() == pid
            assert len(tokens.requests) > issued  # granted to the rotated password
            node.umount(target)
        finally:
            node.stop()

