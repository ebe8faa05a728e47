"""Benchmark images, built offline and cached: an OCI layout per recipe, made with umoci.

Recipes:

* ``tiny``: no network. ``/bin/sh`` and ``/bin/cat`` copied from this machine with the
  libraries ``ldd`` names, plus seeded data files (19 MiB, of which the start reads 3.5
  MiB) and ``/app/start.sh``. For CI and for testing the harness.
* ``numpy-pandas``: ``debootstrap --variant=minbase --include=python3`` of Debian bookworm
  (layer 1) plus numpy and pandas wheels from PyPI installed with ``pip install --target``
  into ``/usr/local/lib/python3.11/dist-packages`` (layer 2); workload
  ``python3 -c "import numpy, pandas; print('ok')"``. Needs the Debian mirror and PyPI.

A recipe's layout lives in ``<cache>/images/<name>-<version>/`` and is reused while its
``DONE`` marker exists; delete the directory to rebuild.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError
from .servers import shutil_which

__all__ = ["RECIPES", "Recipe", "build_recipe", "source_spec"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recipe:
    name: str
    version: str
    default_run: str
    description: str


RECIPES = {
    "tiny": Recipe("tiny", "3", "/bin/sh /app/start.sh",
                   "host /bin/sh + /bin/cat and 19 MiB of data; the start reads 3.5 MiB (offline)"),
    "numpy-pandas": Recipe("numpy-pandas", "3",
                           "python3 -c \"import numpy, pandas; print('ok')\"",
                           "Debian bookworm minbase + python3 + numpy + pandas wheels"),
}
NUMPY = "numpy==1.26.4"
PANDAS = "pandas==2.2.2"
DEBIAN_MIRROR = "http://deb.debian.org/debian"


def _run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    log.info("$ %s", " ".join(argv))
    proc = subprocess.run(argv, capture_output=True, text=True, **kwargs)
    if proc.returncode:
        raise UsageError(f"{' '.join(argv[:3])}... failed ({proc.returncode}): "
                         f"{(proc.stderr or proc.stdout).strip()[-1500:]}")
    return proc


def _copy_with_libraries(binary: str, root: Path) -> None:
    """Copy ``binary`` and every library ``ldd`` lists (with the loader) under ``root``."""
    real = os.path.realpath(binary)
    dest = root / binary.lstrip("/")
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(real, dest)
    for line in _run(["ldd", real]).stdout.splitlines():
        parts = line.split()
        path = next((p for p in parts if p.startswith("/")), None)
        if path is None:
            continue
        for name in {path, os.path.realpath(path)}:
            target = root / name.lstrip("/")
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(os.path.realpath(path), target)


def _tiny(root: Path) -> None:
    for d in ("proc", "sys", "dev", "tmp", "etc", "app", "data", "usr/bin"):
        (root / d).mkdir(parents=True, exist_ok=True)
    os.chmod(root / "tmp", 0o1777)
    for binary in ("/bin/sh", "/bin/cat"):
        _copy_with_libraries(binary, root)
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/:/bin/sh\n")
    rnd = random.Random(20240601)
    # Data compresses about 2:1, like binaries and libraries.
    for i in range(20):
        size = (256 << 10) if i < 12 else (2 << 20)
        chunk = b"".join(rnd.randbytes(2048) + bytes(2048) for _ in range(size // 4096))
        (root / "data" / f"file{i:02d}.bin").write_bytes(chunk)
    # The start: 6 small files and one large one, like a program and its libraries.
    reads = " ".join(f"/data/file{i:02d}.bin" for i in (0, 2, 3, 5, 7, 11, 15))
    (root / "app" / "start.sh").write_text(f"#!/bin/sh\n/bin/cat {reads} > /dev/null\n"
                                           "echo ok\n")
    os.chmod(root / "app" / "start.sh", 0o755)


def _debian_python(root: Path) -> None:
    shutil_which("debootstrap")
    _run(["debootstrap", "--variant=minbase", "--include=python3", "bookworm", str(root),
          DEBIAN_MIRROR], timeout=3600)
    for sub in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for entry in (root / sub).glob("*"):
            if entry.is_file() and entry.name != "lock":
                entry.unlink()


def _numpy_pandas(root: Path) -> None:
    target = root / "usr/local/lib/python3.11/dist-packages"
    target.mkdir(parents=True, exist_ok=True)
    _run([sys.executable, "-m", "pip", "install", "--quiet", "--no-input", "--target",
          str(target), "--only-binary=:all:", "--python-version", "3.11",
          "--platform", "manylinux2014_x86_64", "--implementation", "cp", NUMPY, PANDAS],
         timeout=3600)
    # Compile the bytecode once here (the image's python is 3.11 too), as an image build
    # would: otherwise every start compiles, and a read-only mount cannot keep the result.
    # A .pyc names its source's mtime in whole seconds and a tar rounds it: sources with
    # sub-second mtimes are truncated first, or ~90 modules' bytecode reads as stale in
    # the image and every start recompiles them (0.3-0.4 s, 2.7 MB written; recipe 2 did).
    _whole_second_mtimes(target)
    _run([sys.executable, "-m", "compileall", "-q", "-j", "2", str(target)], timeout=3600)


def _whole_second_mtimes(root: Path) -> None:
    for path in [root, *root.rglob("*")]:
        st = path.lstat()
        if not path.is_symlink():
            whole = st.st_mtime_ns // 10**9 * 10**9
            os.utime(path, ns=(whole, whole))


STEPS = {"tiny": [_tiny], "numpy-pandas": [_debian_python, _numpy_pandas]}


def _build_layout(steps, layout: Path, bundle: Path, tag: str, run: str) -> None:
    """One layer per step: each step changes the unpacked rootfs, ``umoci repack`` records
    the change. (Debian's umoci 0.4.7 ``insert`` writes truncated tars; ``repack`` does not.)"""
    umoci = shutil_which("umoci")
    image = f"{layout}:{tag}"
    _run([umoci, "init", "--layout", str(layout)])
    _run([umoci, "new", "--image", image])
    _run([umoci, "unpack", "--image", image, str(bundle)])
    for step in steps:
        step(bundle / "rootfs")
        _run([umoci, "repack", "--refresh-bundle", "--image", image, str(bundle)],
             timeout=3600)
    _run([umoci, "config", "--image", image, "--config.env",
          "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
          "--config.cmd", "/bin/sh", "--config.cmd", "-c", "--config.cmd", run,
          "--os", "linux", "--architecture", "amd64"])
    _run([umoci, "gc", "--layout", str(layout)])


def build_recipe(name: str, cache_dir: Path) -> Path:
    """The OCI layout of recipe ``name``, built (or found) under ``cache_dir``."""
    recipe = RECIPES.get(name)
    if recipe is None:
        raise UsageError(f"unknown image recipe {name!r}; known: {', '.join(RECIPES)}")
    layout = cache_dir / "images" / f"{name}-{recipe.version}"
    if (layout / "DONE").exists():
        return layout
    if layout.exists():
        shutil.rmtree(layout)
    work = cache_dir / "images" / f".build-{name}-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    try:
        _build_layout(STEPS[name], layout, work / "bundle", "latest", recipe.default_run)
        (layout / "DONE").write_text(f"{name} {recipe.version}\n")
    except BaseException:
        shutil.rmtree(layout, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return layout


def source_spec(image: str, cache_dir: Path) -> tuple[str, str | None]:
    """A skopeo source for IMAGE, and the recipe's default command if it is a recipe.

    IMAGE may be ``recipe:NAME``, a skopeo transport (``oci:DIR[:TAG]``, ``docker://REF``,
    ``oci-archive:FILE``, ``docker-archive:FILE``, ``dir:DIR``) or a plain registry
    reference (read as ``docker://REF``).
    """
    if image.startswith("recipe:"):
        name = image.split(":", 1)[1]
        layout = build_recipe(name, cache_dir)
        return f"oci:{layout}:latest", RECIPES[name].default_run
    transports = ("oci:", "docker://", "oci-archive:", "docker-archive:", "dir:")
    if image.startswith(transports):
        return image, None
    return f"docker://{image}", None
