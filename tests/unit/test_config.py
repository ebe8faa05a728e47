"""The node config file: every key, its defaults, and a precise error for anything wrong."""

from __future__ import annotations

import pytest

from overlaybd_py.config import (
    DEFAULT_SNAPSHOTTER_ROOT,
    NodeConfig,
    load_config,
    parse_address,
    parse_size,
)
from overlaybd_py.errors import UsageError

FULL = """
state_dir = "/srv/obd/run"
cache_dir = "/srv/obd/cache"
cache_size = "20GiB"
memory_cache_size = "128MiB"

[registry]
insecure = ["127.0.0.1:5000", "registry.local"]
mirrors = { "docker.io" = ["https://mirror.example.com", "http://10.0.0.2:5000"] }
proxy = "http://proxy.example.com:3128"
retry_deadline = 30
credentials = "docker-config"
docker_config_dir = "/etc/overlaybd-py/docker"

[prefetch]
concurrency = 8
gap = "256KiB"

[metrics]
address = "127.0.0.1:9863"

[download]
rate = "50MiB"

[snapshotter]
root = "/srv/obd/snapshotter"
socket = "/srv/obd/run/snapshotter.sock"
"""


def _load(tmp_path, text: str) -> NodeConfig:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return load_config(str(path))


def test_every_key(tmp_path):
    config = _load(tmp_path, FULL)
    assert config.state_dir == "/srv/obd/run" and config.cache_dir == "/srv/obd/cache"
    assert config.cache_size == 20 << 30 and config.memory_cache_size == 128 << 20
    assert config.plain_http == ("127.0.0.1:5000", "registry.local")
    assert config.mirrors == {"docker.io": ("https://mirror.example.com",
                                            "http://10.0.0.2:5000")}
    assert config.proxy == "http://proxy.example.com:3128"
    assert config.retry_deadline == 30.0 and config.use_docker_config
    assert config.docker_config_dir == "/etc/overlaybd-py/docker"
    assert config.prefetch_concurrency == 8 and config.prefetch_gap == 256 << 10
    assert config.metrics_address == "127.0.0.1:9863"
    assert config.download_rate == 50 << 20
    assert config.snapshotter_root == "/srv/obd/snapshotter"
    assert config.snapshotter_socket == "/srv/obd/run/snapshotter.sock"
    assert config.daemon_socket == "/srv/obd/run/daemon/control.sock"
    assert config.source == str(tmp_path / "config.toml")


def test_defaults_and_missing_files(tmp_path, monkeypatch):
    monkeypatch.delenv("OVERLAYBD_PY_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    config = _load(tmp_path, "")
    assert config.cache_size == 0 and config.metrics_address is None
    assert config.snapshotter_root == DEFAULT_SNAPSHOTTER_ROOT and config.use_docker_config
    with pytest.raises(UsageError, match="does not exist"):
        load_config(str(tmp_path / "missing.toml"))
    monkeypatch.setenv("OVERLAYBD_PY_CONFIG", str(tmp_path / "config.toml"))
    (tmp_path / "config.toml").write_text('cache_size = "1MiB"\n')
    assert load_config(None).cache_size == 1 << 20
    monkeypatch.setenv("OVERLAYBD_PY_CONFIG", str(tmp_path / "absent.toml"))
    assert load_config(None) == NodeConfig()  # the implicit file is optional


def test_overrides_keep_unset_values(tmp_path):
    config = _load(tmp_path, 'cache_dir = "/a"\n').with_overrides(cache_dir=None, cache_size=5)
    assert config.cache_dir == "/a" and config.cache_size == 5


@pytest.mark.parametrize("text, message", [
    ("cache_sise = 1\n", "unknown setting(s) cache_sise"),
    ("[registry]\ninsecur = []\n", "unknown setting(s) [registry] insecur"),
    ("[metrics]\nadress = 'x'\n", "[metrics] adress"),
    ("registry = 3\n", "[registry] should be a table"),
    ("cache_size = [1]\n", "'cache_size' should be str or int"),
    ("cache_size = '10 parsecs'\n", "not a size"),
    ("cache_size = -1\n", "negative"),
    ("[prefetch]\nconcurrency = '4'\n", "'concurrency' should be int"),
    ("[prefetch]\nconcurrency = true\n", "'concurrency' should be int"),
    ("[prefetch]\nconcurrency = 0\n", "between 1 and 256"),
    ("[prefetch]\ngap = '1GiB'\n", "prefetch.gap must be at most 16MiB"),
    ("[prefetch]\ngap = 'wide'\n", "not a size"),
    ("[metrics]\naddress = 'localhost'\n", "not host:port"),
    ("[metrics]\naddress = '127.0.0.1:70000'\n", "out of range"),
    ("[registry]\ncredentials = 'keychain'\n", "must be one of docker-config, none"),
    ("[registry]\nmirrors = { 'docker.io' = 'https://m' }\n", "should be a list of URLs"),
    ("[registry]\nmirrors = { 'docker.io' = ['ftp://m'] }\n", "not an http(s) URL"),
    ("[registry]\nretry_deadline = 0\n", "must be positive"),
    ("[registry]\nproxy = 'socks5://p:1080'\n", "should be an http(s) URL or 'none'"),
    ("[snapshotter]\nroot = 'relative/dir'\n", "must be an absolute path"),
    ("[registry]\nca_file = 'ca.pem'\n", "registry.ca_file must be an absolute path"),
    ("[registry]\nca_file = '/nonexistent/ca.pem'\n", "/nonexistent/ca.pem does not exist"),
    ("state_dir = \n", "cannot read config file"),
])
def test_errors_name_the_file_and_the_key(tmp_path, text, message):
    with pytest.raises(UsageError) as failed:
        _load(tmp_path, text)
    assert message in str(failed.value)
    assert str(tmp_path / "config.toml") in str(failed.value)
    assert failed.value.exit_code == 2


def test_proxy_none_is_kept_for_the_clients(tmp_path):
    assert _load(tmp_path, "[registry]\nproxy = 'none'\n").proxy == "none"


def test_credentials_none_turns_the_docker_config_off(tmp_path):
    assert not _load(tmp_path, "[registry]\ncredentials = 'none'\n").use_docker_config


@pytest.mark.parametrize("text, value", [
    ("0", 0), ("1000", 1000), ("4KiB", 4096), ("1.5MiB", 1536 << 10), ("2gb", 2 * 10**9),
    (" 3 G ", 3 << 30), (7, 7),
])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text, value", [
    ("127.0.0.1:9863", ("127.0.0.1", 9863)), ("[::1]:80", ("::1", 80)),
    ("node.local:1", ("node.local", 1)),
])
def test_parse_address(text, value):
    assert parse_address(text) == value


@pytest.mark.parametrize("text", ["", ":80", "host", "host:0", "a:b:80", "[::1]80"])
def test_parse_address_refuses(text):
    with pytest.raises(UsageError):
        parse_address(text)


def test_ca_file_is_kept_for_the_clients_and_checked(tmp_path):
    import ssl

    system = ssl.get_default_verify_paths().cafile  # PEM certificates on any Debian
    if system is None:
        pytest.skip("no system CA file to use as a valid one")
    assert _load(tmp_path, f"[registry]\nca_file = '{system}'\n").ca_file == system
    junk = tmp_path / "junk.pem"
    junk.write_text("-----BEGIN CERTIFICATE-----\n")
    with pytest.raises(UsageError, match="not PEM certificates"):
        _load(tmp_path, f"[registry]\nca_file = '{junk}'\n")
