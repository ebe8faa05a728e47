"""The main job, end to end, on one machine (root; Debian's mirror reachable on first run).

1. A real image: a Debian bookworm rootfs (debootstrap --variant=minbase, with python3),
   cached after the first run, plus a small application layer, pushed with skopeo to a
   private docker-registry on 127.0.0.1 as an ordinary OCI image (gzip layers).
2. ``overlaybd-py convert --referrer``: the overlaybd image is pushed as a referrer artifact
   of the original, whose tag and digest stay untouched.
3. ``overlaybd-py mount`` of the ORIGINAL reference: discovery finds the referrer, the node
   daemon serves it lazily (FUSE + loop + ext4).
4. ``chroot TARGET /usr/bin/python3 ...`` runs in the mounted rootfs; we print how many
   bytes crossed the network against the image size; then unmount and stop everything.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OBD = [sys.executable, "-m", "overlaybd_py"]
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "overlaybd-py"
MIRROR = "http://deb.debian.org/debian"


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def run(*argv: str, env: dict | None = None, quiet: bool = False) -> str:
    proc = subprocess.run(list(argv), capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.exit(f"demo: {' '.join(argv[:4])}... failed:\n{proc.stdout}{proc.stderr}")
    if not quiet and proc.stdout.strip():
        print(proc.stdout.rstrip())
    return proc.stdout


def rootfs_tar() -> Path:
    """A Debian minbase rootfs with python3, as an uncompressed tar (cached)."""
    tar_path = CACHE / "demo-bookworm-minbase-python3.tar"
    if tar_path.exists():
        print(f"using the cached rootfs {tar_path}")
        return tar_path
    CACHE.mkdir(parents=True, exist_ok=True)
    rootfs = CACHE / "demo-rootfs"
    shutil.rmtree(rootfs, ignore_errors=True)
    print("debootstrap --variant=minbase bookworm (a few minutes, once) ...", flush=True)
    run("debootstrap", "--variant=minbase", "--include=python3-minimal", "bookworm",
        str(rootfs), MIRROR, quiet=True)
    shutil.rmtree(rootfs / "var/cache/apt/archives", ignore_errors=True)
    tmp = tar_path.with_suffix(".tmp")
    run("tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-C", str(rootfs),
        "-cf", str(tmp), ".")
    tmp.rename(tar_path)
    shutil.rmtree(rootfs, ignore_errors=True)
    return tar_path


def app_layer() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in {"app/hello.py": b"print('hello from a lazily loaded image')\n",
                           "app/data.bin": os.urandom(4 << 20)}.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_layout(layout: Path, tars: list[bytes]) -> int:
    """An OCI layout with gzip layers; returns the total compressed layer bytes."""
    def blob(data: bytes) -> dict:
        digest = hashlib.sha256(data).hexdigest()
        path = layout / "blobs" / "sha256" / digest
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return {"digest": f"sha256:{digest}", "size": len(data)}

    layout.mkdir(parents=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    layers = [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
               **blob(gzip.compress(t, compresslevel=6, mtime=0))} for t in tars]
    config = {"architecture": "amd64", "os": "linux",
              "config": {"Cmd": ["/usr/bin/python3", "/app/hello.py"]},
              "rootfs": {"type": "layers", "diff_ids": [
                  "sha256:" + hashlib.sha256(t).hexdigest() for t in tars]}}
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                           **blob(json.dumps(config).encode())},
                "layers": layers}
    entry = {"mediaType": manifest["mediaType"], **blob(json.dumps(manifest).encode()),
             "annotations": {"org.opencontainers.image.ref.name": "demo"}}
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [entry]}))
    return sum(layer["size"] for layer in layers)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_registry(work: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    config = work / "registry.yml"
    config.write_text(json.dumps({
        "version": "0.1", "log": {"level": "error"},
        "storage": {"filesystem": {"rootdirectory": str(work / "registry")}},
        "http": {"addr": f"127.0.0.1:{port}"}}))
    log = open(work / "registry.log", "wb")  # noqa: SIM115 (lives as long as the process)
    proc = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=log, stderr=log,
                            stdin=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, f"127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    proc.kill()
    sys.exit("demo: docker-registry did not start")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", default="/var/tmp/overlaybd-py-demo")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("demo: run as root (debootstrap, FUSE, loop devices, mounts)")
    work = Path(args.work_dir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = dict(os.environ, OVERLAYBD_PY_STATE_DIR=str(work / "state"))
    node = ["--cache-dir", str(work / "cache")]
    target = work / "rootfs"
    target.mkdir()
    registry, host = start_registry(work)
    mounted = False
    try:
        step("1. a real image: Debian bookworm minbase + python3, and an app layer")
        base = rootfs_tar().read_bytes()
        image_bytes = write_layout(work / "layout", [base, app_layer()])
        ref = f"{host}/demo/debian:bookworm"
        run("skopeo", "--insecure-policy", "copy", "--dest-tls-verify=false",
            f"oci:{work / 'layout'}:demo", f"docker://{ref}", quiet=True)
        print(f"pushed {ref} with skopeo: 2 gzip layers, {image_bytes / 2**20:.1f} MiB "
              f"({len(base) / 2**20:.0f} MiB uncompressed rootfs)")

        step("2. convert it; push the result as a referrer of the original")
        started = time.monotonic()
        summary = json.loads(run(*OBD, "convert", ref, "--referrer", "--plain-http", "--quiet",
                                 "--json", "--no-cache", env=env, quiet=True))
        pushed = summary["pushed"][0]
        print(f"converted in {time.monotonic() - started:.1f} s; referrer {pushed['digest']} "
              f"(subject {pushed['subject'][:19]}..., found via {pushed['referrers']})")

        step("3. mount the ORIGINAL reference lazily")
        started = time.monotonic()
        run(*OBD, "mount", ref, str(target), "--plain-http", *node, env=env)
        mounted = True
        print(f"mounted in {time.monotonic() - started:.2f} s")

        step("4. run python3 inside the mounted rootfs")
        started = time.monotonic()
        run("chroot", str(target), "/usr/bin/python3", "-c",
            "import sys, os; print('python', sys.version.split()[0], 'sees', "
            "len(os.listdir('/usr/lib/python3.11')), 'stdlib entries')")
        run("chroot", str(target), "/usr/bin/python3", "/app/hello.py")
        print(f"ran in {time.monotonic() - started:.2f} s")
        status = json.loads(run(*OBD, "status", str(target), "--json", env=env, quiet=True))
        m = status["mounts"][0]
        blobs = sum(layer["blob_size"] for p in summary["platforms"] for layer in p["layers"])
        share = 100 * m["bytes_fetched"] / blobs
        print(f"fetched {m['bytes_fetched'] / 2**20:.1f} MiB in {m['requests']} range requests "
              f"of a {blobs / 2**20:.1f} MiB overlaybd image ({share:.1f}%; source image "
              f"{image_bytes / 2**20:.1f} MiB); fetch p50 {m['fetch_p50_ms']} ms, "
              f"p99 {m['fetch_p99_ms']} ms")
    finally:
        if mounted:
            step("5. unmount and stop")
            run(*OBD, "umount", str(target), env=env)
        sock = work / "state" / "daemon" / "control.sock"
        if sock.exists():
            subprocess.run([*OBD[:-2], "-c", f"from overlaybd_py.control import request; "
                            f"request({str(sock)!r}, 'shutdown')"], env=env, check=False)
        registry.terminate()
        registry.wait(10)
    print("\ndemo finished: everything is unmounted and stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
