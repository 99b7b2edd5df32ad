"""Sidegate data plane: the identity-aware PostgreSQL and HTTP proxies and their policy core."""

from pathlib import Path as _Path

from sidegate_proxy import _native

__version__ = "0.1.0"

# the per-statement modules: compiled when built from these sources, else their Python
NATIVE = _native.select(__name__, _Path(__file__).parent)
# the native lane of PostgreSQL sessions (None: not built, or the data plane runs as Python)
LANE = _native.lane(__name__, _Path(__file__).parent, NATIVE)
