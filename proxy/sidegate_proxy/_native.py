"""Which implementation of the per-statement modules runs: mypyc-compiled, or their Python.

``SIDEGATE_NATIVE=1 setup.py build_ext`` compiles ``COMPILED`` from the very sources that ship
beside them and records their digests. The compiled modules run only while those sources are
unchanged, so an edit since the build (a developer's, a patched install) can never run stale
code, and ``SIDEGATE_PURE_PYTHON=1`` asks for the Python ones outright.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

COMPILED = ("pgwire", "pgproxy", "masking", "detectors")  # setup.py's NATIVE_MODULES
STAMP = "_native_build.json"
LANE = "_lane"  # the native lane of a PostgreSQL session: C, built beside the compiled modules
LANE_SOURCE = f"{LANE}.c"
LANE_SOURCES = (LANE_SOURCE, "_seal.c", "_tls.c", "_seal.h", "_tls.h", "_buf.h")  # linked in: audit sealing, TLS
PURE_ENV = "SIDEGATE_PURE_PYTHON"
LANE_THREAD = "sidegate-lane"  # the lane thread's name (_lane.c THREAD_NAME): bench/ splits its CPU out


@dataclass(frozen=True)
class NativeStatus:
    active: bool  # the compiled modules are the ones imported
    reason: str  # why not, or "compiled"


class _PythonFirst(importlib.abc.MetaPathFinder):
    """Imports the listed modules from their ``.py`` files, ahead of an extension beside them."""

    def __init__(self, sources: dict[str, Path]) -> None:
        self._sources = sources

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        source = self._sources.get(fullname)
        return None if source is None else importlib.util.spec_from_file_location(fullname, source)


def source_digests(package_dir: Path) -> dict[str, str | None]:
    """What the build records and the import compares: each compiled module's source, hashed
    (and the native lane's C source, under its file name)."""
    digests = {name: _digest(package_dir / f"{name}.py") for name in COMPILED}
    digests.update({name: _digest(package_dir / name) for name in LANE_SOURCES})
    return digests


def _digest(source: Path) -> str | None:
    try:
        return hashlib.sha256(source.read_bytes()).hexdigest()
    except OSError:
        return None  # unreadable: it cannot be shown to match the build


def _stale(package_dir: Path) -> str | None:
    """None: the compiled modules were built from these very sources."""
    try:
        built = json.loads((package_dir / STAMP).read_text())
    except FileNotFoundError:
        return "not compiled (`make native`, or SIDEGATE_NATIVE=1 when building the package)"
    except (OSError, ValueError) as exc:
        return f"build record {STAMP} unreadable: {exc}"
    suffixes = importlib.machinery.EXTENSION_SUFFIXES
    missing = [name for name in COMPILED
               if not any((package_dir / f"{name}{suffix}").exists() for suffix in suffixes)]
    if missing:
        return f"compiled modules missing beside their build record: {', '.join(missing)} (rebuild: `make native`)"
    current = source_digests(package_dir)
    changed = [name for name in COMPILED if current[name] is None or built.get(name) != current[name]]
    if changed:
        return f"sources changed since the native build: {', '.join(changed)} (rebuild: `make native`)"
    return None


def select(package: str, package_dir: Path) -> NativeStatus:
    """Run at the package's import, before any of ``COMPILED`` is imported."""
    reason = f"{PURE_ENV} is set" if os.environ.get(PURE_ENV, "") not in ("", "0") else _stale(package_dir)
    if reason is None:
        return NativeStatus(True, "compiled")
    sys.meta_path.insert(0, _PythonFirst({f"{package}.{name}": package_dir / f"{name}.py" for name in COMPILED}))
    return NativeStatus(False, reason)


def _lane_current(package_dir: Path) -> bool:
    """The lane's extension was built from these very C sources."""
    try:
        built = json.loads((package_dir / STAMP).read_text())
        return all(built.get(name) is not None and built.get(name) == _digest(package_dir / name)
                   for name in LANE_SOURCES)
    except (OSError, ValueError, AttributeError):
        return False


def lane(package: str, package_dir: Path, status: NativeStatus) -> ModuleType | None:
    """The native lane, when the compiled data plane runs and the lane was built from these very
    C sources; else None (every statement goes through the Python relay)."""
    if not status.active:
        return None
    if not _lane_current(package_dir):
        return None
    try:
        return importlib.import_module(f"{package}.{LANE}")
    except ImportError:
        return None


if __name__ == "__main__":  # `make native`: exit 0 when the compiled modules are current
    here = Path(__file__).parent
    sys.exit(0 if _stale(here) is None and _lane_current(here) else 1)
