"""Proxies from the environment: which variable applies to which URL, and what NO_PROXY and
loopback exempt (as Go's HTTP client, so containerd, docker and skopeo, read them)."""

from __future__ import annotations

import logging

import pytest

from overlaybd_py.registry import EnvProxies


def test_each_scheme_takes_its_own_variable_in_either_case():
    env = EnvProxies.from_environ({"https_proxy": "http://p1:3128", "HTTP_PROXY": "p2:8080"})
    assert env.proxy_for("https://reg.example.com/v2/") == "http://p1:3128"
    assert env.proxy_for("http://reg.example.com/v2/") == "http://p2:8080"  # no scheme: http
    assert EnvProxies.from_environ({"HTTP_PROXY": "http://up", "http_proxy": "http://low"}) \
        .proxy_for("http://r.test/") == "http://up"
    assert not EnvProxies.from_environ({})
    assert EnvProxies.from_environ({}).proxy_for("https://r.test/") is None
    # https requests never fall back to HTTP_PROXY, and ALL_PROXY is not read (as in Go)
    assert EnvProxies.from_environ({"HTTP_PROXY": "http://p", "ALL_PROXY": "http://q"}) \
        .proxy_for("https://r.test/") is None


@pytest.mark.parametrize("host", ["localhost", "LOCALHOST:5000", "127.0.0.1", "127.1.2.3:5000",
                                  "[::1]:5000", "[::ffff:127.0.0.1]"])
def test_loopback_is_never_proxied(host):
    env = EnvProxies.from_environ({"HTTP_PROXY": "http://p:1", "HTTPS_PROXY": "http://p:1"})
    assert env.proxy_for(f"http://{host}/v2/") is None
    assert env.proxy_for(f"https://{host}/v2/") is None


@pytest.mark.parametrize(("no_proxy", "url", "proxied"), [
    ("example.com", "https://example.com/", False),
    ("example.com", "https://reg.example.com/", False),
    (".example.com", "https://reg.example.com/", False),
    (".example.com", "https://example.com/", True),  # a leading dot: subdomains only
    ("*.example.com", "https://a.b.example.com/", False),
    ("*.example.com", "https://example.com/", True),
    ("example.com", "https://badexample.com/", True),
    ("example.com", "https://example.com.evil.test/", True),
    ("10.1.2.3", "https://10.1.2.3:5000/", False),
    ("10.1.2.3", "https://10.1.2.4/", True),
    ("10.0.0.0/8", "https://10.200.0.1/", False),
    ("10.0.0.0/8", "https://11.0.0.1/", True),
    ("fd00::/8", "https://[fd00::5]:5000/", False),
    ("reg.test:5000", "https://reg.test:5000/", False),
    ("reg.test:5000", "https://reg.test/", True),  # port 443
    ("reg.test:443", "https://reg.test/", False),
    ("reg.test:", "https://reg.test:5000/", False),  # an empty port: any port
    ("reg.test:\u00b2", "https://reg.test:5000/", False),  # not a number: any port
    ("[fd00::5]:5000", "https://[fd00::5]:5000/", False),
    ("*", "https://anything.test/", False),
    ("a.test, b.test other.test", "https://other.test/", False),
    ("A.TEST", "https://a.test/", False),
    ("", "https://a.test/", True),
    ("a.localhost", "https://b.localhost/", True),  # only "localhost" itself is special
])
def test_no_proxy(no_proxy, url, proxied):
    env = EnvProxies.from_environ({"HTTPS_PROXY": "http://p:3128", "NO_PROXY": no_proxy})
    assert (env.proxy_for(url) == "http://p:3128") is proxied


@pytest.mark.allow_log_warnings
@pytest.mark.parametrize("value", ["socks5://user:s3cret@p:1080", "http://", "ftp://p:21"])
def test_a_proxy_this_client_cannot_use_is_ignored_with_a_warning(value, caplog):
    with caplog.at_level(logging.WARNING):
        env = EnvProxies.from_environ({"HTTPS_PROXY": value, "HTTP_PROXY": "http://ok:1"})
    assert env.proxy_for("https://r.test/") is None
    assert env.proxy_for("http://r.test/") == "http://ok:1"
    assert "HTTPS_PROXY" in caplog.text and "s3cret" not in caplog.text


def test_the_proxy_setting_none_turns_the_environment_off_and_a_url_overrides_it():
    from overlaybd_py.errors import UsageError
    from overlaybd_py.registry.proxy_env import proxy_setting

    assert proxy_setting(None, "--proxy") == (None, None)  # the environment decides
    assert proxy_setting("None", "--proxy") == (None, EnvProxies())
    assert proxy_setting("http://p:3128", "--proxy") == ("http://p:3128", None)
    with pytest.raises(UsageError, match=r"--proxy 'socks5://\*\*\*@p:1'") as caught:
        proxy_setting("socks5://u:s3cret@p:1", "--proxy")
    assert "s3cret" not in str(caught.value)
