"""Proxies from the environment: which variable applies to which URL, and what NO_PROXY and
loopback exempt (the meanings containerd, docker and skopeo give them)."""

from __future__ import annotations

import pytest

from overlaybd_py.errors import UsageError
from overlaybd_py.registry import EnvProxies


def test_each_scheme_takes_its_variable_in_either_case_and_all_proxy_fills_in():
    env = EnvProxies.from_environ({"https_proxy": "http://p1:3128", "ALL_PROXY": "p2:8080"})
    assert env.proxy_for("https://reg.example.com/v2/") == "http://p1:3128"
    assert env.proxy_for("http://reg.example.com/v2/") == "http://p2:8080"  # no scheme: http
    assert EnvProxies.from_environ({"HTTP_PROXY": "http://up", "http_proxy": "http://low"}) \
        .proxy_for("http://r.test/") == "http://up"
    assert not EnvProxies.from_environ({})
    assert EnvProxies.from_environ({}).proxy_for("https://r.test/") is None
    assert EnvProxies.from_environ({"HTTPS_PROXY": "http://p"}).proxy_for("http://r.test/") \
        is None


@pytest.mark.parametrize("host", ["localhost", "LOCALHOST:5000", "a.localhost", "127.0.0.1",
                                  "127.1.2.3:5000", "[::1]:5000"])
def test_loopback_is_never_proxied(host):
    env = EnvProxies.from_environ({"HTTP_PROXY": "http://p:1", "HTTPS_PROXY": "http://p:1"})
    assert env.proxy_for(f"http://{host}/v2/") is None
    assert env.proxy_for(f"https://{host}/v2/") is None


@pytest.mark.parametrize(("no_proxy", "url", "proxied"), [
    ("example.com", "https://example.com/", False),
    ("example.com", "https://reg.example.com/", False),
    (".example.com", "https://example.com/", False),
    ("*.example.com", "https://a.b.example.com/", False),
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
    ("*", "https://anything.test/", False),
    ("a.test, b.test other.test", "https://other.test/", False),
    ("A.TEST", "https://a.test/", False),
    ("", "https://a.test/", True),
])
def test_no_proxy(no_proxy, url, proxied):
    env = EnvProxies.from_environ({"HTTPS_PROXY": "http://p:3128", "NO_PROXY": no_proxy})
    assert (env.proxy_for(url) == "http://p:3128") is proxied


@pytest.mark.parametrize("value", ["socks5://p:1080", "http://", "ftp://p:21"])
def test_a_malformed_proxy_is_refused_naming_the_variable(value):
    with pytest.raises(UsageError, match="HTTPS_PROXY"):
        EnvProxies.from_environ({"HTTPS_PROXY": value})
