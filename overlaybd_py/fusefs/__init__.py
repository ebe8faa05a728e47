"""FUSE front end: the per-image ``block`` files the loop devices read."""

from .fs import BlockFs, ServedImage
from .server import serve_blockfs

__all__ = ["BlockFs", "ServedImage", "serve_blockfs"]
