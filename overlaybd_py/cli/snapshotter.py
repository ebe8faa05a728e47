"""``overlaybd-py snapshotter`` (containerd's proxy snapshotter) and ``overlaybd-py pull``.

``snapshotter`` serves containerd's snapshots API on a unix socket and reaches (or starts)
the node daemon with the same node options; ``pull`` puts an overlaybd image into
containerd as remote snapshots, so that ``ctr run --snapshotter NAME REF`` starts it lazily.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict

from ..errors import UsageError
from ._output import emit_json
from .image import client_config_from_args, registry_options
from .node import node_config, node_options

__all__ = ["register"]

DEFAULT_CONTAINERD = "/run/containerd/containerd.sock"


def _snapshotter(args: argparse.Namespace) -> int:
    from ..snapshotter import serve

    config = node_config(args)
    socket_path = os.path.abspath(args.socket or config.snapshotter_socket)
    root = os.path.abspath(args.root or config.snapshotter_root)
    serve(socket_path, root, config, args.config)
    return 0


def _pull(args: argparse.Namespace) -> int:
    from ..formats.oci import Platform
    from ..snapshotter import pull

    address = args.address or os.environ.get("CONTAINERD_ADDRESS") or DEFAULT_CONTAINERD
    namespace = args.namespace or os.environ.get("CONTAINERD_NAMESPACE") or "default"
    if not args.snapshotter:
        raise UsageError("--snapshotter must not be empty")
    platform = Platform.from_spec(args.platform) if args.platform else None
    result = pull(args.ref, address=address, namespace=namespace, snapshotter=args.snapshotter,
                  client=client_config_from_args(args), platform=platform)
    if args.json:
        emit_json(asdict(result))
    else:
        print(f"pulled {result.image} ({result.layers} layers as remote snapshots of "
              f"{args.snapshotter!r}, {result.remote_snapshots} new; manifest "
              f"{result.manifest}, via {result.via})")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "snapshotter", help="serve containerd's snapshots API (a proxy snapshotter)",
        description="Serve containerd's snapshots v1 API on a unix socket: overlaybd layers "
        "become remote snapshots mounted lazily by the node daemon (started if none runs), "
        "ordinary layers behave as with containerd's overlayfs snapshotter. Point a "
        "[proxy_plugins.NAME] entry of containerd's config at the socket.")
    p.add_argument("--socket", metavar="PATH",
                   help="unix socket to serve (default: the config's snapshotter.socket, "
                   "/run/overlaybd-py/snapshotter.sock)")
    p.add_argument("--root", metavar="DIR",
                   help="snapshot directories and metadata (default: the config's "
                   "snapshotter.root, /var/lib/overlaybd-py/snapshotter)")
    node_options(p)
    p.set_defaults(func=_snapshotter)

    p = subparsers.add_parser(
        "pull", help="pull an overlaybd image into containerd without its layers",
        description="Resolve REF (an overlaybd image, or an image with an overlaybd "
        "referrer), store its manifest and config in containerd and commit each layer as a "
        "remote snapshot of SNAPSHOTTER, like the original's 'ctr rpull'. Then 'ctr run "
        "--snapshotter SNAPSHOTTER REF ...' starts it; layers are fetched as they are read.")
    p.add_argument("ref", metavar="REF")
    p.add_argument("--address", metavar="SOCKET",
                   help=f"containerd's socket (default $CONTAINERD_ADDRESS or "
                   f"{DEFAULT_CONTAINERD})")
    p.add_argument("--namespace", "-n", metavar="NS",
                   help="containerd namespace (default $CONTAINERD_NAMESPACE or 'default')")
    p.add_argument("--snapshotter", metavar="NAME", default="overlaybd-py",
                   help="the proxy snapshotter's name in containerd's config "
                   "(default overlaybd-py)")
    p.add_argument("--platform", metavar="OS/ARCH[/VARIANT]")
    p.add_argument("--json", action="store_true")
    registry_options(p)
    p.set_defaults(func=_pull)
