"""``overlaybd-py convert``: an OCI image -> an overlaybd image or referrer artifact."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from ..convert.layout import DEFAULT_LAYOUT, LAYOUTS
from ..convert.manifests import FLAVOURS
from ..errors import UsageError
from ._output import emit_json
from .image import client_from_args, registry_options
from .layer import _chunk_size, add_level_option

__all__ = ["register"]

log = logging.getLogger(__name__)

DEFAULT_CACHE = "/var/lib/overlaybd-py/convert-cache"


def _vsize(text: str) -> int:
    try:
        gib = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of GiB") from None
    if not 1 <= gib <= 65536:
        raise argparse.ArgumentTypeError("--vsize must be 1..65536 GiB")
    return gib << 30


def _convert(args: argparse.Namespace) -> int:
    import trio

    from ..convert.converter import Converter, ConvertOptions
    from ..convert.progress import Progress
    from ..formats.oci import Platform
    from ..registry import Reference

    if bool(args.referrer) == bool(args.dest):
        raise UsageError("give exactly one of --referrer and --dest REF")
    source = Reference.parse(args.source)
    dest = Reference.parse(args.dest) if args.dest else None
    if dest is not None and not dest.tag:
        raise UsageError(f"--dest {args.dest}: name a tag to push to")
    options = ConvertOptions(
        referrer=args.referrer, dest=dest, flavour=args.flavour, algorithm=args.algorithm,
        chunk_size=args.chunk_size, level=args.level, layout=args.layout, vsize=args.vsize,
        platform=Platform.from_spec(args.platform) if args.platform else None,
        cache_dir=None if args.no_cache else (args.cache_dir or DEFAULT_CACHE),
        work_dir=args.work_dir,
    )
    if args.work_dir:
        os.makedirs(args.work_dir, exist_ok=True)
    progress = Progress(enabled=not args.quiet, stream=sys.stderr)

    async def main() -> dict:
        async with await client_from_args(args) as client:
            return await Converter(client, options, progress).run(source)

    summary = trio.run(main)
    if args.json:
        emit_json(summary)
        return 0
    for pushed in summary["pushed"]:
        where = pushed.get("reference") or pushed["digest"]
        how = (f" (referrer of {pushed['subject']}, via {pushed['referrers']})"
               if pushed.get("subject") else "")
        print(f"pushed {where}{how}")
    print(f"converted in {summary['seconds']:.1f} s")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "convert", help="convert an OCI image into an overlaybd image",
        description="Convert SRC_REF into overlaybd layers and push them, either as an image "
        "(--dest REF) or as a referrer artifact of the source (--referrer), which keeps the "
        "source's tags and signatures untouched. Runs as root (layers are applied through "
        "the kernel's ext4).")
    p.add_argument("source", metavar="SRC_REF")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--dest", metavar="REF", help="push the converted image under REF")
    target.add_argument("--referrer", action="store_true",
                        help="push it as a referrer of SRC_REF (fallback tag when needed)")
    p.add_argument("--flavour", choices=FLAVOURS, default="upstream",
                   help="referrer artifact type: upstream overlaybd or ACR artifact streaming")
    p.add_argument("--algorithm", choices=("lz4", "zstd"), default="lz4")
    p.add_argument("--chunk-size", type=_chunk_size, default=4096, metavar="KIB",
                   help="ZFile chunk size in KiB: 4, 8, 16, 32 or 64 (default 4)")
    add_level_option(p)
    p.add_argument("--layout", choices=LAYOUTS, default=DEFAULT_LAYOUT,
                   help="where files go in each layer: cold-last (default) writes sources "
                   "and headers a start does not read (*.py next to their bytecode, *.h, "
                   "*.c, ...) after the other files, so lazy starts fetch fewer useless "
                   "bytes; tar keeps the layer's order")
    p.add_argument("--platform", metavar="OS/ARCH[/VARIANT]",
                   help="convert only this platform of an index (default: all)")
    p.add_argument("--vsize", type=_vsize, default=64 << 30, metavar="GIB",
                   help="virtual device size in GiB (default 64)")
    p.add_argument("--cache-dir", metavar="DIR",
                   help=f"converted-layer cache (default {DEFAULT_CACHE})")
    p.add_argument("--no-cache", action="store_true", help="convert every layer afresh")
    p.add_argument("--work-dir", metavar="DIR",
                   help="where scratch layers go (default: $TMPDIR)")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.add_argument("--json", action="store_true",
                   help="print a JSON summary: pushed descriptors, per-layer timings")
    registry_options(p)
    p.set_defaults(func=_convert)
