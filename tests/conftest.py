"""Shared pytest wiring: fixture plugins for the real PostgreSQL and the real API server."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

HERE = Path(__file__).parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

pytest_plugins = [
    name
    for name in ("pg_fixtures", "k8s_fixtures")
    if importlib.util.find_spec(name) is not None
]
