"""``overlaybd-py layer ...``: the equivalents of the original overlaybd tools."""

from __future__ import annotations

import argparse
import os

from ..errors import FormatError, UsageError
from ._output import emit_json, emit_table, human_bytes

__all__ = ["register"]

GIB = 1024**3


def _chunk_size(text: str) -> int:
    try:
        kib = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of KiB") from None
    if kib not in (4, 8, 16, 32, 64):
        raise argparse.ArgumentTypeError("chunk size must be 4, 8, 16, 32 or 64 (KiB)")
    return kib * 1024


def add_level_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--level", type=int, default=0, metavar="N",
                        help="compression level: lz4 1-12 (LZ4 HC), zstd 1-22; 0 (default): "
                             "the original's (LZ4 default, zstd 3). Higher: smaller "
                             "downloads, slower conversion, the same decoding")


def checked_level(args: argparse.Namespace) -> int:
    """``--level``, checked against ``--algorithm`` (UsageError naming both)."""
    from ..formats import zfile

    if args.level and not args.algorithm:
        raise UsageError("--level needs --algorithm lz4 or zstd")
    try:
        zfile.check_level(args.algorithm or "lz4", args.level)
    except ValueError as exc:
        raise UsageError(f"--level {args.level}: {exc}") from None
    return args.level


def _uuid(text: str) -> str:
    from ..formats.lsmt import check_uuid

    try:
        return check_uuid(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _vsize(text: str) -> int:
    try:
        gib = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of GiB") from None
    if gib <= 0 or gib > 65536:
        raise argparse.ArgumentTypeError("virtual size must be 1..65536 GiB")
    return gib * GIB


def _need_file(path: str) -> None:
    if not os.path.isfile(path):
        raise UsageError(f"{path}: no such file")


def _inspect(args: argparse.Namespace) -> int:
    import trio

    from ..engine import layer_files

    _need_file(args.file)
    info = trio.run(layer_files.inspect_file, args.file)
    if args.json:
        emit_json(info)
        return 0
    rows = [(k, v) for k, v in info.items()]
    rows = [(k, human_bytes(v) if k.endswith(("size", "_bytes")) and k != "chunk_size" else v)
            for k, v in rows]
    emit_table(rows)
    return 0


def _verify(args: argparse.Namespace) -> int:
    import trio

    from ..engine import layer_files

    _need_file(args.file)
    try:
        report = trio.run(layer_files.verify_file, args.file)
    except FormatError as exc:
        if args.json:
            emit_json({"path": args.file, "valid": False, "error": str(exc)})
        else:
            print(f"{args.file}: CORRUPT: {exc}")
        return 1
    report["valid"] = True
    if args.json:
        emit_json(report)
        return 0
    chunks = report["chunks_checked"]
    print(f"{args.file}: valid {report['kind']} layer, {report['segments']} segments"
          + (f", {chunks} chunk checksums verified" if chunks else ""))
    if "note" in report:
        print(f"note: {report['note']}")
    return 0


async def _create(args: argparse.Namespace) -> dict:
    from ..engine.mkfs import mkfs_into
    from ..engine.writable import WritableLayer
    from ..formats.lsmt import NULL_UUID

    for path in (args.data, args.index):
        if os.path.exists(path):
            raise UsageError(f"{path} already exists (layer create never overwrites)")
    layer = WritableLayer.create(args.data, args.index, args.vsize,
                                 parent_uuid=args.parent_uuid or NULL_UUID)
    try:
        imported = await mkfs_into(layer) if args.mkfs else 0
        await layer.fsync()
    except BaseException:
        layer.close()
        os.unlink(args.data)
        os.unlink(args.index)
        raise
    layer.close()
    return {"data": args.data, "index": args.index, "virtual_size": args.vsize,
            "uuid": layer.header.uuid, "mkfs_bytes": imported}


def _create_cmd(args: argparse.Namespace) -> int:
    import trio

    info = trio.run(_create, args)
    if args.json:
        emit_json(info)
    else:
        print(f"created writable layer {args.data} + {args.index} "
              f"({human_bytes(args.vsize)}, uuid {info['uuid']})"
              + (f", ext4 made ({human_bytes(info['mkfs_bytes'])} of metadata)"
                 if args.mkfs else ""))
    return 0


def _commit(args: argparse.Namespace) -> int:
    from ..engine import layer_files

    level = checked_level(args)
    _need_file(args.data)
    _need_file(args.index)
    result = layer_files.commit_layer(
        args.data, args.index, args.out, algorithm=args.algorithm, chunk_size=args.chunk_size,
        tar=args.tar, layer_uuid=args.uuid, parent_uuid=args.parent_uuid, message=args.message,
        level=level,
    )
    if args.json:
        emit_json({"output": result.path, "size": result.size, "segments": result.segments,
                   "data_bytes": result.data_bytes})
    else:
        print(f"committed {args.out}: {human_bytes(result.size)}, {result.segments} segments")
    return 0


def _compress(args: argparse.Namespace) -> int:
    from ..engine import layer_files

    level = checked_level(args)
    _need_file(args.input)
    size = layer_files.compress_file(args.input, args.output, algorithm=args.algorithm,
                                     chunk_size=args.chunk_size, level=level)
    if args.json:
        emit_json({"output": args.output, "size": size})
    else:
        print(f"compressed {args.input} -> {args.output} ({human_bytes(size)})")
    return 0


def _decompress(args: argparse.Namespace) -> int:
    import trio

    from ..engine import layer_files

    _need_file(args.input)
    size = trio.run(layer_files.decompress_file, args.input, args.output)
    if args.json:
        emit_json({"output": args.output, "size": size})
    else:
        print(f"decompressed {args.input} -> {args.output} ({human_bytes(size)})")
    return 0


def _extract(args: argparse.Namespace) -> int:
    import trio

    from ..engine import layer_files

    for path in args.layers:
        _need_file(path)
    info = trio.run(layer_files.extract_image, args.layers, args.output)
    if args.json:
        emit_json(info)
    else:
        print(f"extracted {info['layers']} layer(s) into {args.output}: "
              f"{human_bytes(info['virtual_size'])} device, "
              f"{human_bytes(info['data_bytes'])} of data")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    group = subparsers.add_parser("layer", help="inspect, verify, create and convert layer files")
    sub = group.add_subparsers(dest="layer_command", metavar="ACTION")
    sub.required = True

    p = sub.add_parser("inspect", help="describe a layer file")
    p.add_argument("file")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_inspect)

    p = sub.add_parser("verify", help="check a sealed layer's structure and checksums")
    p.add_argument("file")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_verify)

    p = sub.add_parser("create", help="create a writable data/index pair")
    p.add_argument("data")
    p.add_argument("index")
    p.add_argument("vsize", type=_vsize, metavar="VSIZE_GIB", help="virtual size in GiB")
    p.add_argument("--mkfs", action="store_true", help="make an empty ext4 inside the layer")
    p.add_argument("--parent-uuid", type=_uuid)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_create_cmd)

    p = sub.add_parser("commit", help="seal a writable pair into a layer file")
    p.add_argument("data")
    p.add_argument("index")
    p.add_argument("out")
    p.add_argument("--algorithm", choices=("lz4", "zstd"),
                   help="write a ZFile (header-overwrite) with this compression")
    p.add_argument("--chunk-size", type=_chunk_size, default=4096, metavar="KIB",
                   help="ZFile chunk size in KiB: 4, 8, 16, 32 or 64 (default 4)")
    add_level_option(p)
    p.add_argument("--tar", action="store_true", help="wrap the result in a tar (the blob form)")
    p.add_argument("--uuid", type=_uuid, help="layer UUID (default: all zeros)")
    p.add_argument("--parent-uuid", type=_uuid, help="parent UUID (default: from the data file)")
    p.add_argument("-m", "--message", default="", help="commit message (user tag, <= 256 bytes)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_commit)

    p = sub.add_parser("compress", help="ZFile-compress any file (trailer-only, overlaybd-zfile)")
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--algorithm", choices=("lz4", "zstd"), default="lz4")
    p.add_argument("--chunk-size", type=_chunk_size, default=4096, metavar="KIB")
    add_level_option(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_compress)

    p = sub.add_parser("decompress", help="decode a ZFile (bare or tar-wrapped)")
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_decompress)

    p = sub.add_parser("extract", help="merge sealed layers (lowest first) into a raw image")
    p.add_argument("layers", nargs="+", metavar="LAYER")
    p.add_argument("--output", "-o", required=True, metavar="RAW")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_extract)
