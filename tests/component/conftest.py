"""Component-test fixtures: real docker-registry servers on 127.0.0.1 (see tests/fixtures)."""

from tests.fixtures.registry import (  # noqa: F401  (pytest finds fixtures by name)
    registry,
    registry_basic,
    registry_mirror,
    registry_tls,
    registry_token,
    token_server,
)
