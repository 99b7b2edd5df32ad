"""The data plane's per-statement modules: compiled by mypyc from their sources, or those sources.

`make test` runs the whole suite on the compiled modules, then the data plane's tests again with
SIDEGATE_PURE_PYTHON=1: both implementations are the same source, and both are checked.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.machinery
import json
import os
import sys
from pathlib import Path

import pytest

import sidegate_proxy
from sidegate_proxy import _native

PURE = os.environ.get(_native.PURE_ENV, "") not in ("", "0")


def test_the_modules_imported_are_the_ones_announced() -> None:
    for name in _native.COMPILED:
        module = importlib.import_module(f"sidegate_proxy.{name}")
        assert module.__file__ is not None
        assert module.__file__.endswith(".py") is not sidegate_proxy.NATIVE.active, (name, module.__file__)


@pytest.mark.skipif(PURE, reason="this run checks the Python source")
def test_ci_runs_the_compiled_data_plane() -> None:
    """CI must not pass on a silent fallback: `make native` builds them before the tests."""
    if not os.environ.get("CI") and not sidegate_proxy.NATIVE.active:
        pytest.skip(f"data plane not compiled here: {sidegate_proxy.NATIVE.reason}")
    assert sidegate_proxy.NATIVE.active, sidegate_proxy.NATIVE.reason


@pytest.mark.skipif(not PURE, reason="only when the Python source is asked for")
def test_pure_python_is_honoured() -> None:
    assert not sidegate_proxy.NATIVE.active
    assert _native.PURE_ENV in sidegate_proxy.NATIVE.reason


def _package(tmp_path: Path, stamp: dict[str, str] | None) -> Path:
    """A package ``fake`` whose COMPILED modules each exist twice: as ``name.py`` and as a
    directory package ``name/``, which Python's own finders prefer (as they prefer an extension)."""
    pkg = tmp_path / "fake"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for name in _native.COMPILED:
        (pkg / f"{name}.py").write_text("KIND = 'source'\n")
        (pkg / name).mkdir()
        (pkg / name / "__init__.py").write_text("KIND = 'built'\n")
        # what the build leaves beside the source; the directory above is what imports
        (pkg / f"{name}{importlib.machinery.EXTENSION_SUFFIXES[0]}").write_bytes(b"")
    if stamp is not None:
        (pkg / _native.STAMP).write_text(json.dumps(stamp))
    return pkg


def _digests(pkg: Path) -> dict[str, str]:
    return {name: hashlib.sha256((pkg / f"{name}.py").read_bytes()).hexdigest() for name in _native.COMPILED}


@pytest.fixture
def isolated_imports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv(_native.PURE_ENV, raising=False)
    for name in [m for m in sys.modules if m == "fake" or m.startswith("fake.")]:
        monkeypatch.delitem(sys.modules, name)


def _kinds() -> set[str]:
    return {importlib.import_module(f"fake.{name}").KIND for name in _native.COMPILED}


@pytest.mark.usefixtures("isolated_imports")
def test_current_build_runs_compiled(tmp_path: Path) -> None:
    pkg = _package(tmp_path, None)
    (pkg / _native.STAMP).write_text(json.dumps(_digests(pkg)))
    status = _native.select("fake", pkg)
    assert status == _native.NativeStatus(True, "compiled")
    assert _kinds() == {"built"}


@pytest.mark.usefixtures("isolated_imports")
def test_a_source_edited_after_the_build_runs_as_python(tmp_path: Path) -> None:
    """A stale extension never runs: the edited source does, and the reason names it."""
    pkg = _package(tmp_path, None)
    (pkg / _native.STAMP).write_text(json.dumps(_digests(pkg)))
    (pkg / "pgproxy.py").write_text("KIND = 'source'  # edited\n")
    status = _native.select("fake", pkg)
    assert not status.active and "pgproxy" in status.reason and "make native" in status.reason
    assert _kinds() == {"source"}


@pytest.mark.usefixtures("isolated_imports")
def test_pure_python_env_wins_over_a_current_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = _package(tmp_path, None)
    (pkg / _native.STAMP).write_text(json.dumps(_digests(pkg)))
    monkeypatch.setenv(_native.PURE_ENV, "1")
    assert _native.select("fake", pkg) == _native.NativeStatus(False, f"{_native.PURE_ENV} is set")
    assert _kinds() == {"source"}


@pytest.mark.usefixtures("isolated_imports")
def test_a_build_record_without_its_extensions_runs_python(tmp_path: Path) -> None:
    """Sources copied with their record but not their extensions: say so, never claim "compiled"."""
    pkg = _package(tmp_path, None)
    (pkg / _native.STAMP).write_text(json.dumps(_digests(pkg)))
    (pkg / f"masking{importlib.machinery.EXTENSION_SUFFIXES[0]}").unlink()
    status = _native.select("fake", pkg)
    assert not status.active and "missing" in status.reason and "masking" in status.reason
    assert _kinds() == {"source"}


@pytest.mark.usefixtures("isolated_imports")
@pytest.mark.parametrize(("stamp", "reason"), [(None, "not compiled"), ("{not json", "unreadable")])
def test_missing_or_garbled_build_record_runs_python(tmp_path: Path, stamp: str | None, reason: str) -> None:
    pkg = _package(tmp_path, None)
    if stamp is not None:
        (pkg / _native.STAMP).write_text(stamp)
    status = _native.select("fake", pkg)
    assert not status.active and reason in status.reason
    assert _kinds() == {"source"}


# --------------------------------------------------------------------------- the native lane


@pytest.mark.skipif(PURE, reason="this run checks the Python source")
def test_ci_builds_the_native_lane() -> None:
    """The compiled data plane comes with its lane: CI must not pass without it."""
    if not sidegate_proxy.NATIVE.active:
        pytest.skip(f"data plane not compiled here: {sidegate_proxy.NATIVE.reason}")
    assert sidegate_proxy.LANE is not None


def test_the_lane_thread_is_named_for_the_benchmark() -> None:
    """bench/bench_pg.py tells the relay's CPU from the rest of the proxy's by this name."""
    lane = sidegate_proxy.LANE
    if lane is None:
        pytest.skip("no native lane here")
    assert lane.THREAD_NAME == _native.LANE_THREAD
    loop = lane.Loop(0.02, 128)
    try:
        names = [(task / "comm").read_text().strip() for task in Path("/proc/self/task").iterdir()]
    finally:
        loop.close()
    assert names.count(_native.LANE_THREAD) == 1


@pytest.mark.skipif(not PURE, reason="only when the Python source is asked for")
def test_pure_python_has_no_lane() -> None:
    assert sidegate_proxy.LANE is None


def _lane_package(tmp_path: Path) -> Path:
    pkg = tmp_path / "lanepkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for name in _native.LANE_SOURCES:
        (pkg / name).write_text(f"/* {name} */\n")
    (pkg / f"{_native.LANE}.py").write_text("KIND = 'lane'\n")  # stands in for the extension
    (pkg / _native.STAMP).write_text("{}")
    return pkg


@pytest.mark.usefixtures("isolated_imports")
def test_the_lane_loads_only_when_built_from_this_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = _lane_package(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    active, inactive = _native.NativeStatus(True, "compiled"), _native.NativeStatus(False, "pure")
    current = {name: hashlib.sha256((pkg / name).read_bytes()).hexdigest() for name in _native.LANE_SOURCES}
    assert _native.lane("lanepkg", pkg, active) is None  # never built
    (pkg / _native.STAMP).write_text(json.dumps({**current, _native.LANE_SOURCE: "0" * 64}))
    assert _native.lane("lanepkg", pkg, active) is None  # built from another source
    (pkg / _native.STAMP).write_text(json.dumps({**current, "_seal.c": "0" * 64}))
    assert _native.lane("lanepkg", pkg, active) is None  # the sealer it links was built from another
    (pkg / _native.STAMP).write_text(json.dumps(current))
    assert _native.lane("lanepkg", pkg, inactive) is None  # the data plane runs as Python
    lane = _native.lane("lanepkg", pkg, active)
    assert lane is not None and lane.KIND == "lane"
