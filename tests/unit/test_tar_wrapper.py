"""The tar wrapper of layer blobs: parsing and byte-exact writing."""

from __future__ import annotations

import io
import tarfile

import pytest

from overlaybd_py.errors import CorruptLayerError
from overlaybd_py.formats import tar_wrapper
from tests.fixtures.testdata import sample_bytes


def test_find_payload_of_the_sample():
    blob = sample_bytes("l1.lz4.tar")
    payload = tar_wrapper.find_payload(blob[:4096], len(blob))
    assert payload == tar_wrapper.TarPayload(1536, 32546)
    assert blob[1536 : 1536 + 32546] == sample_bytes("l1.lz4.hdrov.zfile")


def test_wrapping_is_byte_identical():
    payload = sample_bytes("l1.lz4.hdrov.zfile")
    blob = tar_wrapper.wrap_head(len(payload)) + payload + tar_wrapper.wrap_tail(len(payload))
    assert blob == sample_bytes("l1.lz4.tar")


@pytest.mark.parametrize("size", [0, 1, 511, 512, 99_999, 10**8])
def test_wrapped_blobs_are_valid_tars(size):
    head = tar_wrapper.wrap_head(size)
    assert len(head) == 1536 and tar_wrapper.is_tar(head)
    assert tar_wrapper.find_payload(head) == tar_wrapper.TarPayload(1536, size)
    if size < 10**6:
        blob = head + b"x" * size + tar_wrapper.wrap_tail(size)
        with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
            members = tar.getmembers()
        assert [(m.name, m.size) for m in members] == [("overlaybd.commit", size)]


def test_plain_tar_without_pax():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("overlaybd.commit")
        info.size = 1000
        tar.addfile(info, io.BytesIO(b"z" * 1000))
    blob = buf.getvalue()
    assert tar_wrapper.find_payload(blob[:4096], len(blob)) == tar_wrapper.TarPayload(512, 1000)


def test_malformed_wrappers():
    blob = bytearray(sample_bytes("l1.lz4.tar"))
    assert not tar_wrapper.is_tar(b"LSMT" + bytes(600))
    bad = bytearray(blob)
    bad[1030] ^= 1  # member header checksum no longer matches
    with pytest.raises(CorruptLayerError, match="checksum"):
        tar_wrapper.find_payload(bytes(bad[:4096]))
    with pytest.raises(CorruptLayerError, match="beyond the end"):
        tar_wrapper.find_payload(bytes(blob[:4096]), 20_000)
    with pytest.raises(CorruptLayerError, match="probed"):
        tar_wrapper.find_payload(bytes(blob[:1100]))
