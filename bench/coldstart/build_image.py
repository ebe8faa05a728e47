"""Build a cold-start benchmark image offline and, optionally, push it with skopeo.

    .venv/bin/python bench/coldstart/build_image.py numpy-pandas \\
        [--cache-dir /var/cache/overlaybd-py-bench] [--push REGISTRY/REPO:TAG [--plain-http]]

The recipes live in ``overlaybd_py/coldstart/images.py`` (``bench cold-start recipe:NAME``
builds them the same way): ``tiny`` (offline: this machine's /bin/sh and /bin/cat with
their libraries, plus seeded data) and ``numpy-pandas`` (``debootstrap --variant=minbase
--include=python3`` of Debian bookworm as layer 1, numpy and pandas wheels from PyPI
installed with ``pip install --target`` as layer 2). The OCI layout is cached under
``CACHE/images/<name>-<version>/`` and reused; delete it to rebuild. Pushing is how a peer
(another lazy loader) gets the very same image to convert with its own tool.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from overlaybd_py.coldstart.images import RECIPES, build_recipe


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", choices=sorted(RECIPES))
    parser.add_argument("--cache-dir", default="/var/cache/overlaybd-py-bench")
    parser.add_argument("--push", metavar="REF", help="skopeo copy the image to REF")
    parser.add_argument("--plain-http", action="store_true", help="the registry is http")
    args = parser.parse_args()
    layout = build_recipe(args.recipe, Path(args.cache_dir))
    print(f"oci:{layout}:latest")
    if args.push:
        argv = ["skopeo", "copy", "--preserve-digests", f"oci:{layout}:latest",
                f"docker://{args.push}"]
        if args.plain_http:
            argv.insert(2, "--dest-tls-verify=false")
        return subprocess.run(argv).returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
