"""pytest plugin: fixtures backed by a real control plane (see tests/controlplane.py).

Register it from tests/conftest.py with ``pytest_plugins = ["k8s_fixtures"]`` (or
``"tests.k8s_fixtures"`` when tests/ is a package). Tests that use these fixtures
should be marked ``@pytest.mark.k8s``.

Environment:
    SIDEGATE_CONTROLPLANE_BIN   folder with etcd / kube-apiserver / kube-controller-manager
    SIDEGATE_CONTROLPLANE_BUILD set to 0 to fail instead of building missing binaries
    SIDEGATE_CONTROLPLANE_KCM   set to 0 to not start kube-controller-manager
    SIDEGATE_CONTROLPLANE_LOG_DIR  where the combined logs go on teardown
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from controlplane import ControlPlane


@pytest.fixture(scope="session")
def controlplane() -> Iterator[ControlPlane]:
    """A running etcd + kube-apiserver (+ kube-controller-manager when built), for the whole session."""
    kcm_env = os.environ.get("SIDEGATE_CONTROLPLANE_KCM")
    cp = ControlPlane(
        controller_manager=None if kcm_env is None else kcm_env != "0",
        build_if_missing=os.environ.get("SIDEGATE_CONTROLPLANE_BUILD", "1") != "0",
    )
    cp.start()
    try:
        yield cp
    finally:
        log_file = cp.stop()
        if log_file is not None:
            print(f"\ncontrol plane logs: {log_file}", file=sys.stderr)


@pytest.fixture(scope="session")
def k8s_admin_client(controlplane: ControlPlane) -> Iterator[Any]:
    """A kubernetes.client.ApiClient authenticated as the `admin` user (system:masters)."""
    api = controlplane.api_client("admin")
    try:
        yield api
    finally:
        api.close()


@pytest.fixture
def k8s_namespace(k8s_admin_client: Any) -> Iterator[str]:
    """A fresh namespace per test, deleted afterwards (without waiting for it to go)."""
    from kubernetes import client

    name = f"t-{uuid.uuid4().hex[:10]}"
    core = client.CoreV1Api(k8s_admin_client)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    try:
        yield name
    finally:
        try:
            core.delete_namespace(name)
        except client.ApiException as e:
            if e.status != 404:
                raise
