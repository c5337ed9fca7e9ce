"""Build script for proxyd's optional Cython extension (everything else lives in pyproject.toml).

``native/conntable.pyx`` compiles to ``proxyd.modes.userspace._conntable``, the accelerated
twin of ``proxyd/modes/userspace/_conntable_py.py``; ``native/engine.pyx`` (with its C core
``native/engine_core.h``) to ``proxyd._engine``, userspace mode's TCP engine,
whose twin is the asyncio data path (``proxyd/modes/userspace/tcp.py``).
The build is optional, as aiohttp's is: without Cython or a C compiler the pure-Python package installs and
``proxyd.modes.userspace.conntable`` falls back to the twin. The build says which one it made.

An editable install (``pip install -e .``) compiles the extension in place
(``proxyd/modes/userspace/_conntable*.so``); after editing ``native/`` run it again, or
``python setup.py build_ext --inplace`` (the unit tests flag a stale build).

Environment:
  PROXYD_REQUIRE_EXTENSIONS=1  a failed extension build fails the install (CI sets this)
  PROXYD_NO_EXTENSIONS=1       do not build the extension at all (the runtime also
                               honours it: the twin is used even when the extension exists)
"""

from __future__ import annotations

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

REQUIRE = os.environ.get("PROXYD_REQUIRE_EXTENSIONS", "") not in ("", "0")
SKIP = os.environ.get("PROXYD_NO_EXTENSIONS", "") not in ("", "0")
HERE = os.path.dirname(os.path.abspath(__file__))


def _say(message: str) -> None:
    # stderr and a banner: pip hides stdout of successful builds unless -v, but shows warnings
    print(f"*** proxyd: {message}", file=sys.stderr, flush=True)


def _extensions() -> list[Extension]:
    if SKIP:
        _say("PROXYD_NO_EXTENSIONS set: building the pure-Python package")
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        if REQUIRE:
            raise
        _say("Cython is not available: building the pure-Python package")
        return []
    ext = Extension(
        "proxyd.modes.userspace._conntable",
        sources=[os.path.join("native", "conntable.pyx")],
    )
    engine = Extension(
        "proxyd._engine",
        sources=[os.path.join("native", "engine.pyx")],
        include_dirs=[os.path.join(HERE, "native")],
        depends=[os.path.join("native", "engine_core.h"), os.path.join("native", "engine_udp.h"),
                 os.path.join("native", "engine_udp.pxi")],
        extra_compile_args=["-pthread", "-std=gnu11"],
        extra_link_args=["-pthread"],
    )
    try:
        # native/proxyd/modes/userspace/_conntable.pxd (found by the module's full name) includes
        # native/conntable.pxd
        return cythonize(
            [ext, engine],
            include_path=[os.path.join(HERE, "native")],
            compiler_directives={"language_level": "3"},
            quiet=True,
        )
    except Exception as exc:
        if REQUIRE:
            raise
        _say(f"Cython could not translate the extension ({exc}): building the pure-Python package")
        return []


class OptionalBuildExt(build_ext):
    """build_ext that degrades to the pure package unless the extension is required."""

    _reported = False

    def run(self) -> None:
        # failures before compiling (no compiler configured at all) land here
        try:
            super().run()
        except Exception as exc:
            self._failed(exc)

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:
            self._failed(exc)
            return
        _say(f"built the accelerated package: {ext.name} (Cython)")

    def _failed(self, exc: Exception) -> None:
        if not self._reported:
            self._reported = True
            if REQUIRE:
                _say(f"extension build FAILED and PROXYD_REQUIRE_EXTENSIONS is set: {exc}")
            else:
                _say(f"extension build failed ({exc}); building the pure-Python package")
        if REQUIRE:
            raise exc


setup(ext_modules=_extensions(), cmdclass={"build_ext": OptionalBuildExt})
