"""The virtual disk: ``BlobSource``s stacked into layers and a merged (writable) device."""

from .layer import Layer, open_layer
from .layered import LayeredDevice
from .source import BlobSource, FileSource, MemorySource, SliceSource
from .writable import WritableLayer
from .zfile_source import DecodedChunkCache, ZFileSource

__all__ = [
    "BlobSource",
    "DecodedChunkCache",
    "FileSource",
    "Layer",
    "LayeredDevice",
    "MemorySource",
    "SliceSource",
    "WritableLayer",
    "ZFileSource",
    "open_layer",
]
