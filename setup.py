"""Optional native build of the data plane's per-statement modules (``SIDEGATE_NATIVE=1``).

mypyc compiles the same typed sources that also run as Python, so there is one implementation:
the whole test suite runs against the compiled modules and again, for the data plane, against
the Python ones. ``sidegate_proxy/_native.py`` picks one at import time. Everything else about
the package is declared in pyproject.toml.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

PACKAGE = Path("proxy", "sidegate_proxy")
_spec = importlib.util.spec_from_file_location("_sidegate_native", PACKAGE / "_native.py")
assert _spec is not None and _spec.loader is not None
native = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(native)  # stdlib only: the modules, the stamp's name and its digests


class BuildWithStamp(build_ext):
    """Record which sources the extensions were built from: an edit since then is noticed."""

    def run(self) -> None:
        super().run()
        stamp = native.source_digests(PACKAGE)
        target = PACKAGE if self.inplace else Path(self.build_lib, "sidegate_proxy")
        target.mkdir(parents=True, exist_ok=True)
        (target / native.STAMP).write_text(json.dumps(stamp, indent=1, sort_keys=True) + "\n")


def _native_build() -> dict[str, Any]:
    if os.environ.get("SIDEGATE_NATIVE", "") in ("", "0"):
        return {}
    from mypyc.build import mypycify  # needed only when compiling

    sources = [str(PACKAGE / f"{name}.py") for name in native.COMPILED]
    lane_sources = [str(PACKAGE / name) for name in native.LANE_SOURCES if name.endswith(".c")]
    lane = Extension(f"sidegate_proxy.{native.LANE}", lane_sources,
                     extra_compile_args=["-O2", "-std=c11", "-D_GNU_SOURCE", "-Wall", "-Wextra", "-Werror"])
    return {"ext_modules": [*mypycify(sources, opt_level="3", group_name="sidegate_proxy._compiled"), lane],
            "cmdclass": {"build_ext": BuildWithStamp}}


setup(**_native_build())
