"""``overlaybd-py image inspect|referrers``, and the registry flags every registry command shares.

Other command groups reuse :func:`registry_options` and :func:`client_from_args`, so that
``--plain-http``, credentials, mirrors and the proxy mean the same everywhere.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..errors import FormatError, UsageError
from ._output import emit_json, emit_table, human_bytes

if TYPE_CHECKING:  # imported where used: building the parser stays light (cli/__init__)
    from ..formats.oci import Descriptor, Platform
    from ..registry import ClientConfig, RegistryClient

__all__ = [
    "client_config_from_args", "client_from_args", "register", "registry_flags",
    "registry_options",
]

log = logging.getLogger(__name__)


def registry_options(parser: argparse.ArgumentParser) -> None:
    """Add the flags of a command that talks to a registry."""
    group = parser.add_argument_group("registry access")
    group.add_argument(
        "--plain-http",
        action="store_true",
        help="use http instead of https (loopback and test registries)",
    )
    group.add_argument(
        "--username",
        help="user name (default: from ~/.docker/config.json, or $DOCKER_CONFIG/config.json)",
    )
    secret = group.add_mutually_exclusive_group()
    secret.add_argument(
        "--password", help="password (visible to other users: prefer --password-stdin)"
    )
    secret.add_argument(
        "--password-stdin", action="store_true", help="read the password from standard input"
    )
    group.add_argument(
        "--mirror",
        action="append",
        default=[],
        metavar="HOST=URL",
        help="try mirror URL before registry HOST for reads (repeatable, in order)",
    )
    group.add_argument(
        "--ca-file", metavar="FILE", help="also trust the CA certificates in FILE (PEM) for "
        "TLS registries (default: the system's CA store only)")
    group.add_argument(
        "--proxy", metavar="URL", help="send all registry traffic through this HTTP proxy, or "
        "'none' for no proxy (default: HTTPS_PROXY, HTTP_PROXY and NO_PROXY from the "
        "environment, as containerd reads them; loopback registries are reached directly)"
    )


def registry_flags(args: argparse.Namespace) -> tuple[str | None, str | None,
                                                      dict[str, list[str]]]:
    """The checked flags of :func:`registry_options`: user name, password (read from stdin
    for ``--password-stdin``) and mirrors by host; raises UsageError."""
    password = args.password
    if args.password_stdin:  # read once: a command may check its flags twice
        password = sys.stdin.readline().rstrip("\r\n")
        args.password, args.password_stdin = password, False
    if password is not None and not args.username:
        raise UsageError("--password needs --username")
    if args.username and password is None:
        raise UsageError("--username needs --password or --password-stdin")
    mirrors: dict[str, list[str]] = {}
    for item in args.mirror:
        host, sep, url = item.partition("=")
        if not sep or not host or not url.startswith(("http://", "https://")):
            raise UsageError(f"--mirror {item!r}: expected HOST=http(s)://...")
        mirrors.setdefault(host, []).append(url)
    return args.username, password, mirrors


def client_config_from_args(args: argparse.Namespace) -> ClientConfig:
    """A ClientConfig from the flags of :func:`registry_options`; raises UsageError."""
    from ..registry import ClientConfig, Credentials
    from ..registry.proxy_env import proxy_setting

    username, password, mirrors = registry_flags(args)
    creds = Credentials(username, password) if username else None
    proxy, env_proxies = proxy_setting(args.proxy, "--proxy")
    return ClientConfig(plain_http=args.plain_http, default_credentials=creds, mirrors=mirrors,
                        proxy=proxy, env_proxies=env_proxies,
                        ca_file=os.path.abspath(args.ca_file) if args.ca_file else None)


async def client_from_args(args: argparse.Namespace) -> RegistryClient:
    """An open client (use ``async with await client_from_args(args) as client``)."""
    from ..registry import RegistryClient

    return await RegistryClient.open(client_config_from_args(args))


def register(subparsers: argparse._SubParsersAction) -> None:
    image = subparsers.add_parser(
        "image",
        help="inspect images and their referrers in a registry",
        description="Inspect images and their referrers in a registry.",
    )
    commands = image.add_subparsers(dest="image_command", metavar="COMMAND")
    commands.required = True

    inspect = commands.add_parser(
        "inspect",
        help="show an image's manifest: digest, media types, layers",
        description="Resolve REF to a manifest (choosing a platform from an index) and show "
        "its digest, media types, layers with sizes and annotations, and whether it is an "
        "overlaybd image.",
    )
    inspect.add_argument("ref", metavar="REF", help="image reference, e.g. host:5000/repo:tag")
    inspect.add_argument(
        "--platform",
        metavar="OS/ARCH[/VARIANT]",
        help="platform to pick from an index (default: this machine's)",
    )
    inspect.add_argument("--json", action="store_true", help="print one JSON object")
    registry_options(inspect)
    inspect.set_defaults(func=_inspect)

    referrers = commands.add_parser(
        "referrers",
        help="list artifacts that refer to an image",
        description="List the referrers of REF (the manifest or index it names) through the "
        "referrers API, or the sha256-<hex> fallback tag where the registry lacks it.",
    )
    referrers.add_argument("ref", metavar="REF", help="image reference")
    referrers.add_argument("--artifact-type", metavar="T", help="only referrers of this type")
    referrers.add_argument("--json", action="store_true", help="print one JSON object")
    registry_options(referrers)
    referrers.set_defaults(func=_referrers)


def _parse_platform(spec: str | None) -> Platform | None:
    from ..formats.oci import Platform

    if spec is None:
        return None
    try:
        return Platform.from_spec(spec)
    except FormatError as exc:
        raise UsageError(f"--platform: {exc}") from None


def _descriptor_json(d: Descriptor) -> dict[str, Any]:
    out = d.to_json()
    out.setdefault("annotations", {})
    return out


async def _inspect_report(args: argparse.Namespace) -> dict[str, Any]:
    from ..formats.oci import is_overlaybd_manifest
    from ..registry import Reference

    ref = Reference.parse(args.ref)
    platform = _parse_platform(args.platform)
    async with await client_from_args(args) as client:
        manifest, index = await client.resolve(ref, platform)
    parsed = manifest.parsed
    chosen = None
    if index is not None:
        chosen = next(
            (
                d
                for d in index.parsed.manifests  # type: ignore[union-attr]
                if d.digest == manifest.descriptor.digest
            ),
            None,
        )
    return {
        "reference": str(ref),
        "digest": manifest.descriptor.digest,
        "media_type": manifest.descriptor.media_type,
        "size": manifest.descriptor.size,
        "index": None
        if index is None
        else {"digest": index.descriptor.digest, "media_type": index.descriptor.media_type},
        "platform": str(chosen.platform) if chosen and chosen.platform else None,
        "artifact_type": parsed.artifact_type,
        "config": _descriptor_json(parsed.config),  # type: ignore[union-attr]
        "layers": [_descriptor_json(d) for d in parsed.layers],  # type: ignore[union-attr]
        "layers_size": sum(d.size for d in parsed.layers),  # type: ignore[union-attr]
        "subject": parsed.subject.digest if parsed.subject else None,
        "annotations": dict(parsed.annotations),
        "overlaybd": is_overlaybd_manifest(parsed),  # type: ignore[arg-type]
    }


def _inspect(args: argparse.Namespace) -> int:
    import trio

    report = trio.run(_inspect_report, args)
    if args.json:
        emit_json(report)
        return 0
    rows: list[tuple[str, Any]] = [
        ("reference", report["reference"]),
        ("digest", report["digest"]),
        ("media type", report["media_type"]),
    ]
    if report["index"]:
        rows.append(("index", f"{report['index']['digest']} ({report['platform']})"))
    rows += [
        ("config", report["config"]["digest"]),
        ("layers", f"{len(report['layers'])}, {human_bytes(report['layers_size'])}"),
        ("overlaybd", "yes" if report["overlaybd"] else "no"),
    ]
    emit_table(rows)
    for i, layer in enumerate(report["layers"]):
        print(f"  [{i}] {layer['digest']}  {layer['size']} bytes  {layer['mediaType']}")
        for key, value in sorted(layer["annotations"].items()):
            print(f"        {key}={value}")
    return 0


async def _referrers_report(args: argparse.Namespace) -> Mapping[str, Any]:
    from ..registry import Reference, list_referrers

    ref = Reference.parse(args.ref)
    async with await client_from_args(args) as client:
        digest = ref.digest or (await client.head_manifest(ref)).digest
        found = await list_referrers(client, ref, digest, args.artifact_type)
    return {
        "reference": str(ref),
        "subject": digest,
        "source": found.source,
        "referrers": [_descriptor_json(d) for d in found.referrers],
    }


def _referrers(args: argparse.Namespace) -> int:
    import trio

    report = trio.run(_referrers_report, args)
    if args.json:
        emit_json(report)
        return 0
    emit_table(
        [
            ("subject", report["subject"]),
            ("source", report["source"]),
            ("referrers", len(report["referrers"])),
        ]
    )
    for d in report["referrers"]:
        print(f"  {d['digest']}  {d.get('artifactType', '-')}  {d['size']} bytes")
    return 0
