"""The shared registry flags of the CLI (cli/image.py): parsing into a ClientConfig."""

from __future__ import annotations

import argparse
import io

import pytest

from overlaybd_py.cli.image import client_config_from_args, register, registry_options
from overlaybd_py.errors import UsageError
from overlaybd_py.registry import Credentials


def _parse(*argv):
    parser = argparse.ArgumentParser()
    registry_options(parser)
    return parser.parse_args(list(argv))


def test_defaults():
    config = client_config_from_args(_parse())
    assert config.plain_http is False and config.default_credentials is None
    assert config.mirrors == {} and config.proxy is None and config.use_docker_config


def test_all_flags():
    config = client_config_from_args(
        _parse(
            "--plain-http",
            "--username",
            "u",
            "--password",
            "p",
            "--mirror",
            "docker.io=http://m1:5000",
            "--mirror",
            "docker.io=https://m2",
            "--mirror",
            "ghcr.io=http://m3",
            "--proxy",
            "http://proxy:3128",
        )
    )
    assert config.plain_http is True
    assert config.default_credentials == Credentials("u", "p")
    assert config.mirrors == {
        "docker.io": ["http://m1:5000", "https://m2"],
        "ghcr.io": ["http://m3"],
    }
    assert config.proxy == "http://proxy:3128"


def test_password_stdin(monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("from-stdin\n"))
    args = _parse("--username", "u", "--password-stdin")
    config = client_config_from_args(args)
    assert config.default_credentials == Credentials("u", "from-stdin")
    # read once: mount --fallback checks the flags for the lazy try, then for the pull
    assert client_config_from_args(args).default_credentials == Credentials("u", "from-stdin")


def test_proxy_flag():
    assert client_config_from_args(_parse("--proxy", "http://p:3128")).proxy == "http://p:3128"
    config = client_config_from_args(_parse("--proxy", "none"))
    assert config.proxy is None and config.env_proxies is not None and not config.env_proxies
    assert client_config_from_args(_parse()).env_proxies is None  # the environment decides
    assert client_config_from_args(_parse("--proxy", "")).env_proxies is None
    with pytest.raises(UsageError, match="--proxy"):
        client_config_from_args(_parse("--proxy", "socks5://p:1080"))


def test_ca_file_flag(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert client_config_from_args(_parse()).ca_file is None
    config = client_config_from_args(_parse("--ca-file", "ca.pem"))
    assert config.ca_file == str(tmp_path / "ca.pem")  # absolute: the daemon may run elsewhere


@pytest.mark.parametrize(
    "argv",
    [
        ("--password", "p"),
        ("--username", "u"),
        ("--mirror", "no-equals"),
        ("--mirror", "host=ftp://x"),
        ("--mirror", "=http://x"),
    ],
)
def test_bad_flags(argv):
    with pytest.raises(UsageError):
        client_config_from_args(_parse(*argv))


def test_password_and_stdin_exclusive():
    with pytest.raises(SystemExit):
        _parse("--password", "p", "--password-stdin")


def test_register_adds_image_group():
    parser = argparse.ArgumentParser()
    subparsers = parser.add_subparsers(dest="command")
    register(subparsers)
    args = parser.parse_args(
        ["image", "referrers", "h:5000/r:t", "--artifact-type", "x/y", "--json", "--plain-http"]
    )
    assert callable(args.func) and args.artifact_type == "x/y" and args.json
    args = parser.parse_args(["image", "inspect", "r", "--platform", "linux/arm64"])
    assert callable(args.func) and args.platform == "linux/arm64" and not args.json
