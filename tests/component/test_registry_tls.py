"""A registry on https whose certificate a private CA signed (docker-registry with ``http.tls``,
the CA made by the test): refused with a message that says what to do, and trusted through
``ca_file`` / ``--ca-file`` on every path (httpx and the socket path for large ranges). skopeo
(`--dest-tls-verify=false`) is the independent client that publishes the image."""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from overlaybd_py.errors import UntrustedCertificateError
from overlaybd_py.registry import ClientConfig, Reference, RegistryClient
from overlaybd_py.registry.tls import ssl_context
from tests.component._registry_helpers import FAST_RETRY, publish, unique_repo
from tests.fixtures.oci_layout import random_bytes

LAYER = 3 << 20  # read once whole (the socket path) and once in a small range (httpx)


@pytest.fixture(scope="module")
def image(registry_tls, tmp_path_factory):
    repo = unique_repo("tls")
    layer = random_bytes(LAYER, 7)
    published = publish(registry_tls, repo, tmp_path_factory.mktemp("tls-layout"), [layer])
    return Reference.parse(f"{registry_tls.host}/{repo}:v1"), published, layer


def _run(config: ClientConfig, body):
    async def main():
        async with await RegistryClient.open(config) as client:
            return await body(client)

    return trio.run(main)


def test_an_untrusted_certificate_is_refused_at_once_with_what_to_do(image, registry_tls):
    ref, _published, _layer = image

    async def body(client):
        with pytest.raises(UntrustedCertificateError) as caught:
            await client.get_manifest(ref)
        return str(caught.value)

    # A long retry deadline: the refusal is not retried (it is not a TransientError).
    message = _run(ClientConfig(use_docker_config=False), body)
    assert registry_tls.host in message and "not trusted" in message
    assert "--ca-file" in message and "ca_file" in message


def test_ca_file_trusts_the_registry_on_every_path(image, registry_tls):
    ref, published, layer = image
    digest = published.manifest_json["layers"][0]["digest"]

    async def body(client):
        fetched = await client.get_manifest(ref)
        small = await client.read_blob_range(ref, digest, 1000, 4096)
        whole = await client.read_blob_range(ref, digest, 0, LAYER)
        return fetched.descriptor.digest, bytes(small), bytes(whole), client.statistics()

    config = ClientConfig(use_docker_config=False, ca_file=str(registry_tls.tls.ca_cert),
                          retry=FAST_RETRY)
    digest_seen, small, whole, stats = _run(config, body)
    assert digest_seen == published.digest
    assert small == layer[1000:5096] and whole == layer
    assert stats.socket_ranges >= 1  # the large read went over TLS on the socket path


def test_the_cli_takes_ca_file(image, registry_tls):
    ref, published, _layer = image
    argv = [sys.executable, "-m", "overlaybd_py", "image", "inspect", str(ref), "--json"]
    refused = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1 and "--ca-file" in refused.stderr, refused.stderr
    done = subprocess.run([*argv, "--ca-file", str(registry_tls.tls.ca_cert)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["digest"] == published.digest


def test_the_system_store_is_trusted_as_containerd_trusts_it(registry_tls):
    """No CA file: exactly the CAs of the system's store (httpx alone would use certifi's
    bundle and miss a CA installed on the node); a CA file adds its CAs to them."""
    if ssl.get_default_verify_paths().cafile is None:
        pytest.skip("no system CA file (a directory store lists no certificates up front)")
    def names(context: ssl.SSLContext) -> set[str]:
        # (a context also lists the certificates it looked up in a store directory since)
        return {repr(cert["subject"]) for cert in context.get_ca_certs()}

    system = names(ssl.create_default_context())
    ours = names(ssl_context())
    extended = names(ssl_context(str(registry_tls.tls.ca_cert)))
    ca = extended - ours - system
    assert system <= ours and system <= extended and len(ca) == 1


def test_a_ca_file_that_is_not_pem_certificates_is_a_usage_error(tmp_path):
    from overlaybd_py.errors import UsageError

    with pytest.raises(UsageError, match="does not exist"):
        ssl_context(str(tmp_path / "nope.pem"))
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(UsageError, match="not PEM"):
        ssl_context(str(junk))


def test_a_context_is_built_once_per_ca_file_version(tmp_path):
    """Every client open used to build its own context (~25 ms reading the store); one is
    kept per CA file, and a CA file changed on disk gets a new one."""
    import certifi

    bundle = Path(certifi.where()).read_text()
    first_cert = bundle[:bundle.index("-----END CERTIFICATE-----") + 26]
    ca = tmp_path / "ca.pem"
    ca.write_text(first_cert)
    one = ssl_context(str(ca))
    assert ssl_context(str(ca)) is one
    assert ssl_context() is ssl_context() is not one
    ca.write_text(bundle)  # update-ca-certificates rewrote it
    other = ssl_context(str(ca))
    assert other is not one and len(other.get_ca_certs()) > len(one.get_ca_certs())
    assert ssl_context(str(ca)) is other


def test_preload_does_the_work_of_a_first_client_open():
    """A server preloads at start: its first request then finds the trust store built and
    httpcore imported (a fresh interpreter, as a daemon starts)."""
    code = ("import sys; from overlaybd_py.registry import preload, tls; "
            "assert 'httpcore' not in sys.modules and not tls._contexts; preload(); "
            "assert 'httpcore' in sys.modules and len(tls._contexts) == 1")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
