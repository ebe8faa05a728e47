"""Regenerate the stubs in this directory from its ``.proto`` files (needs grpcio-tools).

Run from anywhere: ``python -m overlaybd_py.snapshotter._proto.generate``. The protos are
compiled with the repository root as the include path, so the generated modules import each
other as ``overlaybd_py.snapshotter._proto.X_pb2``.
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path


def main() -> int:
    from grpc_tools import protoc

    here = Path(__file__).resolve().parent
    root = here.parents[2]
    includes = str(resources.files("grpc_tools") / "_proto")
    protos = sorted(str(p.relative_to(root)) for p in here.glob("*.proto"))
    argv = ["protoc", f"-I{root}", f"-I{includes}", f"--python_out={root}",
            f"--pyi_out={root}", f"--grpc_python_out={root}", *protos]
    return protoc.main(argv)


if __name__ == "__main__":
    sys.exit(main())
