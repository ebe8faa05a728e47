"""The curated public surfaces are pinned: changing one is a deliberate act (trio's test)."""

from __future__ import annotations

import importlib

import pytest

PUBLIC = {
    "overlaybd_py.formats": {
        "CommitPlan", "LsmtHeader", "MergedIndex", "Segments", "TarPayload", "WritableIndex",
        "ZFileBuilder", "ZFileHeader", "ZFileIndex", "decode_chunks", "find_payload",
        "plan_commit", "wrap_head", "wrap_tail",
    },
    "overlaybd_py.engine": {
        "BlobSource", "DecodedChunkCache", "FileSource", "Layer", "LayeredDevice",
        "MemorySource", "SliceSource", "WritableLayer", "ZFileSource", "open_layer",
    },
    "overlaybd_py.fusefs": {"BlockFs", "ServedImage", "serve_blockfs"},
    "overlaybd_py.errors": {
        "AuthError", "CorruptLayerError", "DeviceError", "DigestMismatchError", "FormatError",
        "MountError", "NotFoundError", "NotOverlaybdError", "OverlaybdError", "RegistryError",
        "TransientError", "UnsupportedFormatError", "UntrustedCertificateError", "UsageError",
    },
}


@pytest.mark.parametrize("module", sorted(PUBLIC))
def test_public_names_are_pinned_and_exist(module):
    mod = importlib.import_module(module)
    assert set(mod.__all__) == PUBLIC[module]
    for name in mod.__all__:
        assert getattr(mod, name).__doc__, f"{module}.{name} has no docstring"


def test_every_error_is_an_overlaybd_error():
    errors = importlib.import_module("overlaybd_py.errors")
    for name in errors.__all__:
        assert issubclass(getattr(errors, name), errors.OverlaybdError)
