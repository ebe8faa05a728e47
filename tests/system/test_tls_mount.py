"""The node daemon mounts an image from a registry on https whose certificate a private CA
signed: trusted through the config's ``[registry] ca_file``, refused without it with a
message that says what to do. Real FUSE, loop device and ext4; the raw image built with a
plain loop mount is the truth the files are compared against."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import trio

from overlaybd_py.registry import ClientConfig, RegistryClient
from tests.fixtures.images import build_layers, push_overlaybd_image
from tests.fixtures.node import Node
from tests.fixtures.registry import registry_tls  # noqa: F401  (fixture)
from tests.fixtures.system import need_fuse

pytestmark = pytest.mark.system

DATA = random.Random(11).randbytes(2 << 20)


def _tree(root: Path) -> None:
    (root / "app").mkdir(exist_ok=True)
    (root / "app" / "data.bin").write_bytes(DATA)


def test_daemon_mounts_from_a_private_ca_registry_with_ca_file(registry_tls, tmp_path):  # noqa: F811
    need_fuse()
    ca = str(registry_tls.tls.ca_cert)
    layers, _raw = build_layers(tmp_path / "build", [_tree])
    ref = f"{registry_tls.host}/system/tls-mount:v1"

    async def push() -> None:
        async with await RegistryClient.open(ClientConfig(ca_file=ca)) as client:
            await push_overlaybd_image(client, ref, layers)

    trio.run(push)
    untrusting = Node(tmp_path / "plain")
    config = tmp_path / "node.toml"
    config.write_text(f'[registry]\nca_file = "{ca}"\n')
    trusting = Node(tmp_path / "trusting", config=str(config))
    try:
        target = tmp_path / "t0"
        target.mkdir()
        refused = untrusting.run("mount", ref, target, *untrusting.node_flags(), check=False)
        assert refused.returncode != 0
        assert "not trusted" in refused.stderr and "ca_file" in refused.stderr, refused.stderr
        target = tmp_path / "t1"
        target.mkdir()
        trusting.run("mount", ref, target, *trusting.node_flags())
        assert (target / "app" / "data.bin").read_bytes() == DATA
        assert trusting.mount_status(target)["bytes_fetched"] > 0
        trusting.umount(target)
    finally:
        untrusting.stop()
        trusting.stop()
