"""registry.auth: challenge parsing, the token flow against httpx.MockTransport, docker config."""

from __future__ import annotations

import base64
import json
import logging
import stat

import httpx
import pytest
import trio

from overlaybd_py.errors import AuthError, TransientError, UsageError
from overlaybd_py.registry.auth import (
    Challenge,
    Credentials,
    RegistryAuth,
    docker_config_credentials,
    parse_token_response,
    parse_www_authenticate,
    scopes_for,
)

SECRET = "s3cr3t-Pa55"


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (
            'Bearer realm="https://auth.example/token",service="registry.example",'
            'scope="repository:a/b:pull,push"',
            [
                Challenge(
                    "bearer",
                    {
                        "realm": "https://auth.example/token",
                        "service": "registry.example",
                        "scope": "repository:a/b:pull,push",
                    },
                )
            ],
        ),
        ('Basic realm="Registry Realm"', [Challenge("basic", {"realm": "Registry Realm"})]),
        (
            'Bearer realm="r", Basic realm="x\\"y"',
            [Challenge("bearer", {"realm": "r"}), Challenge("basic", {"realm": 'x"y'})],
        ),
        (
            "BEARER Realm=bare,Service=svc",
            [Challenge("bearer", {"realm": "bare", "service": "svc"})],
        ),
        ("Negotiate", [Challenge("negotiate", {})]),
        ("", []),
    ],
)
def test_parse_www_authenticate(header, expected):
    assert parse_www_authenticate(header) == expected


@pytest.mark.parametrize(
    ("method", "url", "scopes"),
    [
        ("GET", "https://r/v2/a/b/manifests/latest", ("repository:a/b:pull",)),
        ("HEAD", "https://r/v2/x/blobs/sha256:00", ("repository:x:pull",)),
        ("PUT", "https://r/v2/x/manifests/v1", ("repository:x:pull,push",)),
        ("POST", "https://r/v2/x/blobs/uploads/", ("repository:x:pull,push",)),
        ("PATCH", "https://r/v2/x/blobs/uploads/uuid-1?_state=abc", ("repository:x:pull,push",)),
        (
            "POST",
            "https://r/v2/dst/blobs/uploads/?mount=sha256:00&from=src/repo",
            ("repository:dst:pull,push", "repository:src/repo:pull"),
        ),
        ("GET", "https://r/v2/a/manifests/b/manifests/c", ("repository:a/manifests/b:pull",)),
        ("GET", "https://r/v2/a/referrers/sha256:00?artifactType=x", ("repository:a:pull",)),
        ("DELETE", "https://r/v2/a/manifests/sha256:00", ("repository:a:delete",)),
        ("GET", "https://r/v2/", ()),
    ],
)
def test_scopes_for(method, url, scopes):
    assert scopes_for(method, httpx.URL(url)) == scopes


def test_parse_token_response():
    assert parse_token_response(b'{"token": "t", "expires_in": 300}', 10.0) == ("t", 310.0)
    assert parse_token_response(b'{"access_token": "a"}', 0.0) == ("a", 60.0)
    assert parse_token_response(b'{"token": "t", "expires_in": "x"}', 0.0) == ("t", 60.0)
    with pytest.raises(AuthError):
        parse_token_response(b'{"nothing": 1}', 0.0)
    with pytest.raises(AuthError):
        parse_token_response(b"<html>", 0.0)


class FakeWorld:
    """A registry (reg.test) in token mode and its token server (auth.test), as MockTransport."""

    def __init__(
        self, *, scheme: str = "bearer", expires_in: int = 300, users: dict[str, str] | None = None
    ) -> None:
        self.scheme = scheme
        self.expires_in = expires_in
        self.users = users or {}
        self.valid: set[str] = set()
        self.issued = 0
        self.log: list[httpx.Request] = []
        self.reject_next = 0  # the registry rejects this many valid tokens (revocation)

    def handler(self, request: httpx.Request) -> httpx.Response:
        # A snapshot: the auth flow re-sends the same request object with new headers.
        self.log.append(
            httpx.Request(
                request.method, request.url, headers=request.headers.copy(), content=request.content
            )
        )
        if request.url.host == "auth.test":
            return self.token(request)
        given = request.headers.get("authorization", "")
        if self.scheme == "basic":
            if given == Credentials("u", SECRET).basic_header():
                return httpx.Response(200, json={"ok": True})
            return httpx.Response(401, headers={"WWW-Authenticate": 'Basic realm="r"'})
        if given.startswith("Bearer ") and given[7:] in self.valid:
            if self.reject_next:
                self.reject_next -= 1
                self.valid.discard(given[7:])
            else:
                return httpx.Response(200, json={"ok": True})
        scope = scopes_for(request.method, request.url)
        challenge = f'Bearer realm="https://auth.test/token",service="reg.test",scope="{scope[0]}"'
        return httpx.Response(401, headers={"WWW-Authenticate": challenge})

    def token(self, request: httpx.Request) -> httpx.Response:
        if self.users:
            header = request.headers.get("authorization", "")
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
            if self.users.get(user) != password:
                return httpx.Response(401, json={"details": "denied"})
        self.issued += 1
        token = f"tok-{self.issued}"
        self.valid.add(token)
        return httpx.Response(200, json={"token": token, "expires_in": self.expires_in})

    def token_requests(self) -> list[httpx.Request]:
        return [r for r in self.log if r.url.host == "auth.test"]


def _client(world: FakeWorld, creds: dict[str, Credentials] | None = None, clock=None):
    auth = RegistryAuth(creds, clock=clock) if clock else RegistryAuth(creds)
    return httpx.Client(transport=httpx.MockTransport(world.handler), auth=auth), auth


def test_anonymous_token_flow_caches_per_scope():
    world = FakeWorld()
    client, auth = _client(world)
    assert client.get("https://reg.test/v2/a/manifests/v1").status_code == 200
    assert [r.url.host for r in world.log] == ["reg.test", "auth.test", "reg.test"]
    token_request = world.token_requests()[0]
    assert "authorization" not in token_request.headers
    assert token_request.url.params.get_list("scope") == ["repository:a:pull"]
    assert token_request.url.params["service"] == "reg.test"
    # Same scope: the cached token goes up front, no 401 and no token request.
    world.log.clear()
    assert client.get("https://reg.test/v2/a/blobs/sha256:00").status_code == 200
    assert [r.url.host for r in world.log] == ["reg.test"]
    # New scope on a known host: a token is fetched before the request, still no 401.
    world.log.clear()
    assert client.put("https://reg.test/v2/a/manifests/v1", content=b"{}").status_code == 200
    assert [r.url.host for r in world.log] == ["auth.test", "reg.test"]
    assert world.log[0].url.params["scope"] == "repository:a:pull,push"
    assert auth.token_fetches == 2


def test_credentials_go_to_the_token_server_only():
    world = FakeWorld(users={"u": SECRET})
    client, _ = _client(world, {"reg.test": Credentials("u", SECRET)})
    assert client.get("https://reg.test/v2/a/manifests/v1").status_code == 200
    basic = Credentials("u", SECRET).basic_header()
    assert world.token_requests()[0].headers["authorization"] == basic
    registry_auth = [r.headers.get("authorization") for r in world.log if r.url.host == "reg.test"]
    assert registry_auth == [None, "Bearer tok-1"]


def test_token_refreshed_when_expired():
    now = [1000.0]
    world = FakeWorld(expires_in=60)
    client, auth = _client(world, clock=lambda: now[0])
    client.get("https://reg.test/v2/a/manifests/v1")
    client.get("https://reg.test/v2/a/manifests/v1")
    assert auth.token_fetches == 1
    now[0] += 56  # within the renewal margin of the 60 s lifetime
    client.get("https://reg.test/v2/a/manifests/v1")
    assert auth.token_fetches == 2
    assert world.log[-1].headers["authorization"] == "Bearer tok-2"


def test_token_refreshed_on_401():
    world = FakeWorld()
    client, auth = _client(world)
    client.get("https://reg.test/v2/a/manifests/v1")
    world.reject_next = 1  # the registry revokes tok-1
    response = client.get("https://reg.test/v2/a/manifests/v1")
    assert response.status_code == 200
    assert response.request.headers["authorization"] == "Bearer tok-2"
    assert auth.token_fetches == 2


def test_rejected_credentials_raise_without_the_secret(caplog):
    caplog.set_level(logging.DEBUG)
    world = FakeWorld(users={"u": "other"})
    client, _ = _client(world, {"reg.test": Credentials("u", SECRET)})
    with pytest.raises(AuthError) as info:
        client.get("https://reg.test/v2/a/manifests/v1")
    assert "refused the credentials" in str(info.value)
    assert SECRET not in str(info.value) and SECRET not in repr(info.value)
    assert SECRET not in caplog.text
    assert SECRET not in repr(Credentials("u", SECRET))


def test_token_server_overload_is_transient():
    def handler(request):
        if request.url.host == "auth.test":
            return httpx.Response(503, headers={"Retry-After": "2"})
        return httpx.Response(
            401, headers={"WWW-Authenticate": 'Bearer realm="https://auth.test/t"'}
        )

    client = httpx.Client(transport=httpx.MockTransport(handler), auth=RegistryAuth())
    with pytest.raises(TransientError) as info:
        client.get("https://reg.test/v2/a/manifests/v1")
    assert info.value.retry_after == 2.0


def test_realm_must_be_http():
    def handler(request):
        return httpx.Response(401, headers={"WWW-Authenticate": 'Bearer realm="file:///etc/x"'})

    client = httpx.Client(transport=httpx.MockTransport(handler), auth=RegistryAuth())
    with pytest.raises(AuthError, match="realm"):
        client.get("https://reg.test/v2/a/manifests/v1")


def test_basic_challenge():
    world = FakeWorld(scheme="basic")
    client, _ = _client(world, {"reg.test": Credentials("u", SECRET)})
    assert client.get("https://reg.test/v2/a/manifests/v1").status_code == 200
    world.log.clear()
    assert client.get("https://reg.test/v2/a/manifests/v2").status_code == 200
    assert len(world.log) == 1  # sent up front once the host is known to want basic
    anonymous, _ = _client(FakeWorld(scheme="basic"))
    assert anonymous.get("https://reg.test/v2/a/manifests/v1").status_code == 401


def test_no_credentials_for_other_hosts():
    world = FakeWorld(scheme="basic")
    client, _ = _client(world, {"mirror.test": Credentials("u", SECRET)})
    assert client.get("https://reg.test/v2/a/manifests/v1").status_code == 401
    assert all("authorization" not in r.headers for r in world.log)


def test_401_after_redirect_to_storage_is_not_a_challenge():
    seen = []

    def handler(request):
        seen.append(request)
        if request.url.host == "reg.test":
            return httpx.Response(307, headers={"Location": "https://storage.test/blob?sig=1"})
        return httpx.Response(401, headers={"WWW-Authenticate": 'Bearer realm="https://a/t"'})

    client = httpx.Client(
        transport=httpx.MockTransport(handler), auth=RegistryAuth(), follow_redirects=True
    )
    assert client.get("https://reg.test/v2/a/blobs/sha256:00").status_code == 401
    assert [r.url.host for r in seen] == ["reg.test", "storage.test"]


def test_identity_token_uses_oauth_refresh_grant():
    world = FakeWorld()
    client, _ = _client(world, {"reg.test": Credentials("u", identity_token="refresh-xyz")})
    client.get("https://reg.test/v2/a/manifests/v1")
    token_request = world.token_requests()[0]
    assert token_request.method == "POST"
    form = dict(httpx.QueryParams(token_request.content.decode()))
    assert form["grant_type"] == "refresh_token" and form["refresh_token"] == "refresh-xyz"
    assert form["scope"] == "repository:a:pull" and form["service"] == "reg.test"


def test_async_flow_under_trio():
    world = FakeWorld()

    async def main():
        async with httpx.AsyncClient(
            transport=httpx.MockTransport(world.handler), auth=RegistryAuth()
        ) as client:
            for _ in range(3):
                assert (await client.get("https://reg.test/v2/a/manifests/v1")).status_code == 200

    trio.run(main)
    assert world.issued == 1


# ---- docker config.json ----


def _write_config(directory, config):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))


def test_docker_config_auths(tmp_path):
    auth = base64.b64encode(f"alice:{SECRET}".encode()).decode()
    _write_config(
        tmp_path,
        {
            "auths": {
                "https://registry.example:5000/v2/": {"auth": auth},
                "https://index.docker.io/v1/": {"username": "bob", "password": "pw"},
                "token.example": {"identitytoken": "idt"},
            }
        },
    )
    creds = docker_config_credentials("registry.example:5000", config_dir=tmp_path)
    assert creds == Credentials("alice", SECRET)
    assert docker_config_credentials("registry-1.docker.io", config_dir=tmp_path) == Credentials(
        "bob", "pw"
    )
    assert docker_config_credentials("token.example", config_dir=tmp_path).identity_token == "idt"
    assert docker_config_credentials("other.example", config_dir=tmp_path) is None


def test_docker_config_env_and_missing(tmp_path):
    _write_config(
        tmp_path / "d", {"auths": {"h.example": {"auth": base64.b64encode(b"u:p").decode()}}}
    )
    env = {"DOCKER_CONFIG": str(tmp_path / "d"), "HOME": str(tmp_path)}
    assert docker_config_credentials("h.example", env=env) == Credentials("u", "p")
    assert docker_config_credentials("h.example", env={"HOME": str(tmp_path)}) is None
    _write_config(tmp_path / ".docker", {"auths": {"h.example": {"username": "home"}}})
    assert docker_config_credentials("h.example", env={"HOME": str(tmp_path)}).username == "home"


def test_docker_config_invalid_names_file_not_content(tmp_path):
    (tmp_path / "config.json").write_text('{"auths": {"h": {"auth": "' + SECRET)
    with pytest.raises(UsageError) as info:
        docker_config_credentials("h", config_dir=tmp_path)
    assert str(tmp_path) in str(info.value) and SECRET not in str(info.value)


def _helper(bin_dir, name, body):
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / f"docker-credential-{name}"
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_credential_helpers(tmp_path):
    bins = tmp_path / "bin"
    _helper(
        bins,
        "good",
        'read server; [ "$1" = get ] || exit 9\n'
        'printf \'{"ServerURL":"%s","Username":"helper-user","Secret":"'
        + SECRET
        + '"}\' "$server"\n',
    )
    _helper(bins, "tok", 'read server; printf \'{"Username":"<token>","Secret":"idtok"}\'\n')
    _helper(bins, "none", 'echo "credentials not found in native keychain"; exit 1\n')
    _helper(bins, "broken", f'echo "{SECRET} leaked"; exit 3\n')
    env = {"PATH": f"{bins}:/usr/bin:/bin"}
    _write_config(
        tmp_path,
        {
            "credHelpers": {
                "a.example": "good",
                "t.example": "tok",
                "n.example": "none",
                "b.example": "broken",
                "m.example": "missing-helper",
            },
            "auths": {"n.example": {"auth": base64.b64encode(b"file:user").decode()}},
        },
    )
    got = docker_config_credentials("a.example", config_dir=tmp_path, env=env)
    assert got == Credentials("helper-user", SECRET)
    assert docker_config_credentials("t.example", config_dir=tmp_path, env=env) == Credentials(
        identity_token="idtok"
    )
    assert docker_config_credentials("n.example", config_dir=tmp_path, env=env) is None
    assert docker_config_credentials("m.example", config_dir=tmp_path, env=env) is None
    with pytest.raises(AuthError) as info:
        docker_config_credentials("b.example", config_dir=tmp_path, env=env)
    assert SECRET not in str(info.value)


def test_creds_store_then_auths(tmp_path):
    bins = tmp_path / "bin"
    _helper(
        bins,
        "store",
        'read server\n[ "$server" = "s.example" ] || '
        '{ echo "credentials not found"; exit 1; }\n'
        'echo \'{"Username":"store-user","Secret":"x"}\'\n',
    )
    env = {"PATH": f"{bins}:/usr/bin:/bin"}
    _write_config(
        tmp_path,
        {"credsStore": "store", "auths": {"f.example": {"username": "file-user", "password": "y"}}},
    )
    assert (
        docker_config_credentials("s.example", config_dir=tmp_path, env=env).username
        == "store-user"
    )
    assert (
        docker_config_credentials("f.example", config_dir=tmp_path, env=env).username == "file-user"
    )
