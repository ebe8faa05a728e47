"""``overlaybd-py image inspect|referrers`` against a real registry: JSON keys, text, errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from overlaybd_py import cli
from overlaybd_py.formats import oci
from overlaybd_py.registry import Reference
from tests.component._registry_helpers import CREDS, publish, unique_repo, with_client
from tests.component.test_registry_referrers import _push_artifact
from tests.fixtures.oci_layout import add_image, add_index, skopeo_copy, tar_layer


@pytest.fixture(autouse=True)
def image_group(monkeypatch):
    """Run the CLI with the image group registered, whatever the dispatcher lists today."""
    if "image" not in cli._GROUPS:
        monkeypatch.setattr(cli, "_GROUPS", (*cli._GROUPS, "image"))


def run_cli(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_inspect_json(registry, tmp_path, capsys):
    repo = unique_repo("cli")
    note = {oci.ANNOTATION_BLOB_DIGEST: "sha256:" + "1" * 64, oci.ANNOTATION_BLOB_SIZE: "9"}
    image = publish(
        registry, repo, tmp_path / "layout", [tar_layer({"a": b"x"})], layer_annotations=[note]
    )
    code, out, err = run_cli(
        capsys, "image", "inspect", f"{registry.host}/{repo}:v1", "--plain-http", "--json"
    )
    assert code == 0, err
    report = json.loads(out)
    assert report["digest"] == image.digest
    assert report["media_type"] == oci.OCI_MANIFEST
    assert report["overlaybd"] is True
    assert report["index"] is None and report["platform"] is None
    [layer] = report["layers"]
    assert layer["size"] == len(image.layers[0]) and layer["annotations"] == note
    assert layer["mediaType"] == oci.OCI_LAYER
    assert report["config"]["digest"] == image.manifest_json["config"]["digest"]


def test_inspect_index_text_and_platform(registry, tmp_path, capsys):
    repo = unique_repo("cli-index")
    layout = tmp_path / "layout"
    amd = add_image(layout, [tar_layer({"f": b"amd"})], arch="amd64")
    arm = add_image(layout, [tar_layer({"f": b"arm"})], arch="arm64", variant="v8")
    _, index_digest = add_index(layout, [amd, arm], tag="multi")
    skopeo_copy(f"oci:{layout}:multi", f"docker://{registry.host}/{repo}:multi", all_images=True)
    ref = f"{registry.host}/{repo}:multi"
    code, out, _ = run_cli(
        capsys, "image", "inspect", ref, "--plain-http", "--json", "--platform", "linux/arm64"
    )
    report = json.loads(out)
    assert code == 0 and report["digest"] == arm.digest and report["platform"] == "linux/arm64/v8"
    assert report["index"]["digest"] == index_digest and report["overlaybd"] is False
    code, out, _ = run_cli(
        capsys, "image", "inspect", ref, "--plain-http", "--platform", "linux/amd64"
    )
    assert code == 0 and amd.digest in out and "overlaybd: no" in out.replace("  ", " ")


def test_referrers_json(registry, tmp_path, capsys):
    repo = unique_repo("cli-referrers")
    image = publish(registry, repo, tmp_path / "layout", [tar_layer({"f": b"s"})])
    ref = Reference.parse(f"{registry.host}/{repo}:v1")
    subject = oci.Descriptor(oci.OCI_MANIFEST, image.digest, len(image.manifest))
    pushed = with_client(
        lambda c: _push_artifact(c, ref, subject, flavour="acr", layer_bytes=b"cli layer")
    )
    code, out, err = run_cli(capsys, "image", "referrers", str(ref), "--plain-http", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["source"] == "fallback-tag" and report["subject"] == image.digest
    [found] = report["referrers"]
    assert found["digest"] == pushed.descriptor.digest
    assert found["artifactType"] == oci.ARTIFACT_TYPE_ACR_STREAMING
    assert found["annotations"][oci.STREAMING_FORMAT] == "overlaybd"
    code, out, _ = run_cli(
        capsys,
        "image",
        "referrers",
        str(ref),
        "--plain-http",
        "--json",
        "--artifact-type",
        oci.ARTIFACT_TYPE_OVERLAYBD,
    )
    assert code == 0 and json.loads(out)["referrers"] == []


def test_errors_are_clear_and_without_traceback(registry, registry_basic, capsys):
    code, out, err = run_cli(capsys, "image", "inspect", "Not A Ref", "--json")
    assert code == 2 and out == "" and "invalid image reference" in err
    code, out, err = run_cli(
        capsys, "image", "inspect", f"{registry.host}/nothing/here:v1", "--plain-http", "--json"
    )
    assert code == 1 and out == "" and "not found" in err and "Traceback" not in err
    code, _, err = run_cli(
        capsys, "image", "inspect", f"{registry.host}/a:v1", "--plain-http", "--platform", "linux"
    )
    assert code == 2 and "--platform" in err
    code, _, err = run_cli(capsys, "image", "inspect", f"{registry.host}/a:v1", "--password", "x")
    assert code == 2 and "--username" in err
    code, _, err = run_cli(
        capsys,
        "image",
        "inspect",
        f"{registry_basic.host}/a:v1",
        "--plain-http",
        "--username",
        CREDS[0],
        "--password",
        "bad-secret-1",
    )
    assert code == 1 and "access denied" in err and "bad-secret-1" not in err


def test_help_and_entry_point():
    for argv in (
        ["image", "--help"],
        ["image", "inspect", "--help"],
        ["image", "referrers", "--help"],
    ):
        with pytest.raises(SystemExit) as info:
            cli.main(argv)
        assert info.value.code == 0


def test_password_stdin(registry_basic, tmp_path):
    repo = unique_repo("cli-stdin")
    image = publish(
        registry_basic, repo, tmp_path / "layout", [tar_layer({"a": b"s"})], creds=CREDS
    )
    code = (
        "import sys; from overlaybd_py import cli\n"
        "cli._GROUPS = tuple(dict.fromkeys((*cli._GROUPS, 'image')))\n"
        "sys.exit(cli.main(sys.argv[1:]))\n"
    )
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "image",
            "inspect",
            f"{registry_basic.host}/{repo}:v1",
            "--plain-http",
            "--json",
            "--username",
            CREDS[0],
            "--password-stdin",
        ],
        input=CREDS[1] + "\n",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["digest"] == image.digest
