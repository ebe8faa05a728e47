"""Build hook for the optional C accelerator ``overlaybd_py._native`` (native/*.c).

The project metadata lives in pyproject.toml; this file only declares the extension. The
extension is optional: if the compiler, liblz4-dev or libzstd-dev is missing, the build
prints a warning and the package still installs, running on the pure-Python backend
(``overlaybd_py._pure``). Build in place with ``python setup.py build_ext --inplace``.
"""

from __future__ import annotations

import sys
from glob import glob

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CCompilerError, CompileError, ExecError, LinkError, PlatformError

BUILD_ERRORS = (CCompilerError, CompileError, ExecError, LinkError, PlatformError, OSError)

NATIVE = Extension(
    "overlaybd_py._native",
    sources=sorted(glob("native/*.c")),
    depends=sorted(glob("native/*.h")),
    include_dirs=["native"],
    libraries=["lz4", "zstd", "pthread"],
    optional=True,
)

# GCC/Clang flags. SSE4.2 is enabled per function (a target attribute in crc32c.c), so
# the module loads on any x86-64 CPU and picks the instruction at run time.
UNIX_FLAGS = ["-O2", "-Wall", "-Wextra", "-fvisibility=hidden"]


class OptionalBuildExt(build_ext):
    """build_ext that turns a failed compile or link into a warning."""

    def build_extensions(self) -> None:
        if self.compiler.compiler_type == "unix":
            for ext in self.extensions:
                ext.extra_compile_args = [*UNIX_FLAGS, *ext.extra_compile_args]
        super().build_extensions()

    def run(self) -> None:
        try:
            super().run()
        except PlatformError as exc:  # no usable C compiler at all
            self._warn(exc)

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except BUILD_ERRORS as exc:
            self._warn(exc)

    @staticmethod
    def _warn(exc: BaseException) -> None:
        bar = "*" * 78
        print(
            f"\n{bar}\nWARNING: the optional C extension overlaybd_py._native was not built:\n"
            f"  {exc}\n"
            "overlaybd-py is installed anyway and uses its pure-Python backend (slower).\n"
            "To build it, install gcc, liblz4-dev and libzstd-dev, then reinstall.\n"
            f"{bar}\n",
            file=sys.stderr,
        )


setup(ext_modules=[NATIVE], cmdclass={"build_ext": OptionalBuildExt})
