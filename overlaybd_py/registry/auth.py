"""Registry authentication: ``WWW-Authenticate`` parsing, the token flow, docker credentials.

The token flow is an ``httpx.Auth`` generator (sans-IO: it yields requests and receives
responses), so it is tested with ``httpx.MockTransport`` and never opens a socket itself.
Credentials are never put into log records, exception messages or reprs.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import subprocess
import time
from collections.abc import AsyncGenerator, Callable, Generator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from ..errors import AuthError, TransientError, UsageError
from ._http import parse_retry_after

__all__ = [
    "Challenge",
    "Credentials",
    "RegistryAuth",
    "docker_config_credentials",
    "parse_token_response",
    "parse_www_authenticate",
    "scopes_for",
]

log = logging.getLogger(__name__)

_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_PARAM_RE = re.compile(rf"\s*({_TOKEN})\s*=\s*")
_SCHEME_RE = re.compile(rf"\s*({_TOKEN})")
_QUOTED_RE = re.compile(r'"((?:[^"\\]|\\.)*)"')
_BARE_RE = re.compile(r"[^,\s]*")
_PATH_RE = re.compile(
    r"/v2/(?P<name>.+)/(?:manifests/[^/]+|blobs/uploads/[^/]*|blobs/[^/]+|tags/list"
    r"|referrers/[^/]+)"
)
# Tokens are renewed this long before they expire, so a request is not sent with a token
# that dies in flight (the spec's default lifetime is 60 s).
_EXPIRY_MARGIN = 5.0
_HUB_CONFIG_KEY = "https://index.docker.io/v1/"
_HUB_HOSTS = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})


@dataclass(frozen=True, slots=True)
class Credentials:
    """A user name and secret; the secret never shows in ``repr``."""

    username: str = ""
    password: str = field(default="", repr=False)
    identity_token: str = field(default="", repr=False)

    def basic_header(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")


@dataclass(frozen=True, slots=True)
class Challenge:
    """One challenge of a ``WWW-Authenticate`` header; ``scheme`` is lower-case."""

    scheme: str
    params: dict[str, str]


def parse_www_authenticate(header: str) -> list[Challenge]:
    """Parse every challenge in ``header`` (quoted values may contain commas and escapes)."""
    challenges: list[Challenge] = []
    pos = 0
    while pos < len(header):
        if header[pos] in ", \t":
            pos += 1
            continue
        param = _PARAM_RE.match(header, pos)
        if param and challenges:
            pos = param.end()
            quoted = _QUOTED_RE.match(header, pos)
            if quoted:
                value = re.sub(r"\\(.)", r"\1", quoted.group(1))
                pos = quoted.end()
            else:
                bare = _BARE_RE.match(header, pos)
                assert bare is not None  # the pattern matches the empty string
                value, pos = bare.group(0), bare.end()
            challenges[-1].params[param.group(1).lower()] = value
            continue
        scheme = _SCHEME_RE.match(header, pos)
        if scheme is None:
            pos += 1  # not a token: skip the character rather than fail the whole header
            continue
        challenges.append(Challenge(scheme.group(1).lower(), {}))
        pos = scheme.end()
    return challenges


def scopes_for(method: str, url: httpx.URL) -> tuple[str, ...]:
    """The token scopes a registry request needs (``repository:NAME:pull[,push]``)."""
    match = _PATH_RE.fullmatch(url.path)
    if match is None:
        return ()
    action = (
        "pull" if method in ("GET", "HEAD") else "delete" if method == "DELETE" else "pull,push"
    )
    scopes = [f"repository:{match['name']}:{action}"]
    source = url.params.get("from")
    if source:  # a cross-repository mount also reads the source repository
        scopes.append(f"repository:{source}:pull")
    return tuple(scopes)


def parse_token_response(body: bytes, now: float) -> tuple[str, float]:
    """Return ``(token, expires_at)`` from a token server's JSON answer; raises AuthError."""
    try:
        obj = json.loads(body)
    except ValueError:
        raise AuthError("token server answered with something that is not JSON") from None
    token = obj.get("token") or obj.get("access_token") if isinstance(obj, dict) else None
    if not isinstance(token, str) or not token:
        raise AuthError("token server answer has no token")
    expires_in = obj.get("expires_in")
    if not isinstance(expires_in, int | float) or isinstance(expires_in, bool) or expires_in <= 0:
        expires_in = 60  # the distribution token spec's default
    return token, now + float(expires_in)


@dataclass(slots=True)
class _Token:
    value: str
    expires_at: float


class RegistryAuth(httpx.Auth):
    """Anonymous, basic and bearer-token authentication for every registry host.

    Remembers per host which scheme it asked for, so later requests authenticate up front
    instead of paying a 401 round trip; caches bearer tokens per (realm, service, scopes)
    until shortly before they expire; on a 401 with a cached token, fetches a fresh one once.
    ``credentials`` maps a registry host (``host[:port]``) to what to present there; hosts not
    in it are accessed anonymously (so an explicit password never reaches a mirror).
    """

    def __init__(
        self,
        credentials: Mapping[str, Credentials] | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        user_agent: str = "overlaybd-py",
    ) -> None:
        self._credentials = dict(credentials or {})
        self._challenges: dict[str, Challenge] = {}
        self._tokens: dict[tuple[str, str, tuple[str, ...]], _Token] = {}
        self._clock = clock
        self._client_id = user_agent
        self.token_fetches = 0

    def set_credentials(self, host: str, credentials: Credentials) -> None:
        """Present ``credentials`` to ``host`` (``host[:port]``) from now on."""
        self._credentials[host] = credentials

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        host = request.url.netloc.decode("ascii")
        scopes = scopes_for(request.method, request.url)
        sent_token: tuple[str, str, tuple[str, ...]] | None = None
        sent_basic = False
        fetched = 0
        known = self._challenges.get(host)
        if known is not None and known.scheme == "bearer":
            sent_token, token = self._cached(known, scopes)
            if token is None:
                token = yield from self._fetch_token(known, scopes, host)
                fetched += 1
            request.headers["Authorization"] = f"Bearer {token}"
        elif known is not None and known.scheme == "basic" and host in self._credentials:
            request.headers["Authorization"] = self._credentials[host].basic_header()
            sent_basic = True
        response = yield request

        # At most two tokens per request: a second one cures a token that expired in flight
        # or was issued already expired (clock skew); more would only hammer a token server
        # that is saying "no". A 401 from another host (a storage back end behind a
        # redirect) is not a registry challenge.
        while response.status_code == 401 and response.request.url.netloc == request.url.netloc:
            offered = parse_www_authenticate(response.headers.get("www-authenticate", ""))
            bearer = next((c for c in offered if c.scheme == "bearer"), None)
            basic = next((c for c in offered if c.scheme == "basic"), None)
            if bearer is not None and fetched < 2:
                self._challenges[host] = bearer
                if sent_token is not None:
                    self._tokens.pop(sent_token, None)  # rejected or expired early
                wanted = tuple(dict.fromkeys(scopes + _challenge_scopes(bearer)))
                sent_token = (
                    bearer.params.get("realm", ""),
                    bearer.params.get("service", ""),
                    wanted,
                )
                token = yield from self._fetch_token(bearer, wanted, host)
                fetched += 1
            elif basic is not None and host in self._credentials and not sent_basic:
                self._challenges[host] = basic
                token = None
                sent_basic = True
            else:
                return
            request.headers["Authorization"] = (
                f"Bearer {token}" if token is not None else self._credentials[host].basic_header()
            )
            response = yield request

    def ready_authorization(self, method: str, url: str) -> tuple[bool, str | None]:
        """The Authorization value a request would carry up front, found without I/O.

        (True, value) when known (value None: anonymous); (False, None) when only a token
        fetch can tell, i.e. the request should go through httpx and this flow."""
        parsed = httpx.URL(url)
        host = parsed.netloc.decode("ascii")
        known = self._challenges.get(host)
        if known is not None and known.scheme == "bearer":
            _, token = self._cached(known, scopes_for(method, parsed))
            return (True, f"Bearer {token}") if token is not None else (False, None)
        if known is not None and known.scheme == "basic" and host in self._credentials:
            return True, self._credentials[host].basic_header()
        return True, None

    def _cached(
        self, challenge: Challenge, scopes: tuple[str, ...]
    ) -> tuple[tuple[str, str, tuple[str, ...]], str | None]:
        key = (challenge.params.get("realm", ""), challenge.params.get("service", ""), scopes)
        token = self._tokens.get(key)
        if token is None or self._clock() >= token.expires_at - _EXPIRY_MARGIN:
            return key, None
        return key, token.value

    def _fetch_token(
        self, challenge: Challenge, scopes: tuple[str, ...], host: str
    ) -> Generator[httpx.Request, httpx.Response, str]:
        realm = challenge.params.get("realm", "")
        service = challenge.params.get("service", "")
        realm_url = httpx.URL(realm) if realm else None
        if realm_url is None or realm_url.scheme not in ("http", "https"):
            raise AuthError(f"{host} asked for a bearer token without a usable realm")
        creds = self._credentials.get(host)
        if creds is not None and creds.identity_token:
            form = {
                "grant_type": "refresh_token",
                "refresh_token": creds.identity_token,
                "client_id": self._client_id,
                "scope": " ".join(scopes),
            }
            if service:
                form["service"] = service
            token_request = httpx.Request("POST", realm_url, data=form)
        else:
            params = ([("service", service)] if service else []) + [("scope", s) for s in scopes]
            headers = {"Authorization": creds.basic_header()} if creds is not None else {}
            token_request = httpx.Request(
                "GET", realm_url.copy_merge_params(params), headers=headers
            )
        self.token_fetches += 1
        log.debug("fetching a token for %s from %s (scopes %s)", host, realm_url.host, scopes)
        response = yield token_request
        status = response.status_code
        if status == 429 or status >= 500:
            raise TransientError(
                f"token server {realm_url.host} answered {status}",
                retry_after=parse_retry_after(response),
                status=status,
            )
        if status != 200:
            who = "the credentials given" if creds is not None else "anonymous access"
            raise AuthError(
                f"token server {realm_url.host} refused {who} for {host} (HTTP {status})",
                status=status,
            )
        token, expires_at = parse_token_response(response.content, self._clock())
        self._tokens[(realm, service, scopes)] = _Token(token, expires_at)
        return token

    # httpx's default flows either never read a response body or read all of them; only
    # token answers need reading, so blob downloads stay streamed.
    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        flow = self.auth_flow(request)
        outgoing = next(flow)
        while True:
            response = yield outgoing
            if outgoing is not request:
                await response.aread()
            try:
                outgoing = flow.send(response)
            except StopIteration:
                return

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response]:
        flow = self.auth_flow(request)
        outgoing = next(flow)
        while True:
            response = yield outgoing
            if outgoing is not request:
                response.read()
            try:
                outgoing = flow.send(response)
            except StopIteration:
                return


def _challenge_scopes(challenge: Challenge) -> tuple[str, ...]:
    return tuple(challenge.params.get("scope", "").split())


def _config_key_host(key: str) -> str:
    """``https://index.docker.io/v1/`` -> ``index.docker.io``; ``host:5000`` stays."""
    key = key.strip().lower()
    if "://" in key:
        key = key.split("://", 1)[1]
    return key.split("/", 1)[0]


def docker_config_credentials(
    host: str,
    *,
    config_dir: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> Credentials | None:
    """Credentials for registry ``host`` from ``config.json``, or None.

    Looks in ``config_dir``, else ``$DOCKER_CONFIG``, else ``~/.docker``. Order as the docker
    CLI: ``credHelpers[host]``, then ``credsStore``, then ``auths``. Helpers are the
    ``docker-credential-NAME`` programs on PATH; a missing helper counts as no credentials.
    Raises UsageError if the file exists but is not valid (naming the file, not its content).
    """
    env = os.environ if env is None else env
    home = Path(env["HOME"]) if env.get("HOME") else Path.home()
    directory = Path(config_dir or env.get("DOCKER_CONFIG") or home / ".docker")
    path = directory / "config.json"
    try:
        config = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read docker config {path}: {type(exc).__name__}") from None
    if not isinstance(config, dict):
        raise UsageError(f"docker config {path} is not a JSON object")
    wanted = _config_key_host(host)
    hub = wanted in _HUB_HOSTS
    server = _HUB_CONFIG_KEY if hub else host

    def matches(key: str) -> bool:
        got = _config_key_host(key)
        return got == wanted or (hub and got in _HUB_HOSTS)

    helpers = config.get("credHelpers") or {}
    for key, helper in helpers.items() if isinstance(helpers, dict) else ():
        if matches(key) and isinstance(helper, str):
            return _run_helper(helper, server, env)
    store = config.get("credsStore")
    if isinstance(store, str) and store:
        found = _run_helper(store, server, env)
        if found is not None:
            return found
    auths = config.get("auths") or {}
    for key, entry in auths.items() if isinstance(auths, dict) else ():
        if matches(key) and isinstance(entry, dict):
            return _from_auth_entry(entry, path)
    return None


def _from_auth_entry(entry: dict, path: Path) -> Credentials | None:
    if entry.get("identitytoken"):
        return Credentials(entry.get("username", ""), identity_token=str(entry["identitytoken"]))
    if entry.get("auth"):
        try:
            username, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
        except ValueError:
            raise UsageError(f"docker config {path}: an 'auth' entry is not base64") from None
        return Credentials(username, password)
    if entry.get("username"):
        return Credentials(str(entry["username"]), str(entry.get("password", "")))
    return None


def _run_helper(name: str, server: str, env: Mapping[str, str]) -> Credentials | None:
    program = f"docker-credential-{name}"
    try:
        done = subprocess.run(
            [program, "get"],
            input=server.encode(),
            capture_output=True,
            timeout=30,
            env=dict(env),
            check=False,
        )
    except FileNotFoundError:
        log.debug("credential helper %s is not installed", program)
        return None
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise AuthError(f"credential helper {program} failed: {type(exc).__name__}") from None
    if done.returncode != 0:
        # "credentials not found" is the helpers' way of saying "none"; anything else
        # is a failure, reported without the helper's output (it may echo secrets).
        if b"credentials not found" in done.stdout + done.stderr:
            return None
        raise AuthError(f"credential helper {program} exited with status {done.returncode}")
    try:
        answer = json.loads(done.stdout)
        username, secret = str(answer["Username"]), str(answer["Secret"])
    except (ValueError, KeyError, TypeError):
        raise AuthError(f"credential helper {program} printed an unreadable answer") from None
    if username == "<token>":
        return Credentials(identity_token=secret)
    return Credentials(username, secret)
