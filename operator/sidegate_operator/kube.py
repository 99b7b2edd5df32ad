"""A small async Kubernetes client: the handful of verbs the operator needs, over aiohttp.

kopf talks to the API server for watching and its own bookkeeping; this is for the children the
operator owns. It is deliberately tiny (get, list, server-side apply, merge patch, delete on raw
paths) so the objects stay plain dicts, exactly what ``build`` produces. Credentials come from the
same place kopf's come from (a kubeconfig or the in-cluster service account), loaded once and
shared with kopf's login handler.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
import kopf

from sidegate_proxy.config import API_VERSION

FIELD_MANAGER = "sidegate-operator"
INCLUSTER_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"

# kind -> plural, for the kinds the operator touches.
PLURALS: Mapping[str, str] = {
    "Secret": "secrets",
    "Service": "services",
    "Pod": "pods",
    "Deployment": "deployments",
    "NetworkPolicy": "networkpolicies",
    "Connection": "connections",
    "MaskingPolicy": "maskingpolicies",
    "AccessRequest": "accessrequests",
    "MutatingWebhookConfiguration": "mutatingwebhookconfigurations",
    "CustomResourceDefinition": "customresourcedefinitions",
    "Namespace": "namespaces",
    "ServiceAccount": "serviceaccounts",
    "RoleBinding": "rolebindings",
}


class KubeError(RuntimeError):
    """The API server refused a request; ``status`` is its HTTP status."""

    def __init__(self, status: int, method: str, path: str, message: str) -> None:
        super().__init__(f"{method} {path}: {status} {message}")
        self.status = status
        self.message = message


def resource_path(api_version: str, kind: str, namespace: str | None = None, name: str | None = None) -> str:
    """The REST path of a kind (collection) or of one object."""
    try:
        plural = PLURALS[kind]
    except KeyError:
        raise ValueError(f"unknown kind {kind!r}") from None
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    ns = f"/namespaces/{quote(namespace, safe='')}" if namespace else ""
    tail = f"/{quote(name, safe='')}" if name else ""
    return f"{base}{ns}/{plural}{tail}"


def object_path(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    return resource_path(str(obj["apiVersion"]), str(obj["kind"]), meta.get("namespace"), meta["name"])


def connection_path(namespace: str, name: str) -> str:
    return resource_path(API_VERSION, "Connection", namespace, name)


@dataclass(frozen=True)
class ClusterAccess:
    """Where the API server is and how to authenticate to it."""

    server: str
    ca_path: str | None = None
    insecure: bool = False
    token: str | None = None
    token_file: str | None = None  # re-read on use: in-cluster tokens rotate
    cert_path: str | None = None
    key_path: str | None = None
    default_namespace: str | None = None

    @classmethod
    def load(cls, kubeconfig: str | None = None) -> ClusterAccess:
        """From ``kubeconfig`` when given, else in-cluster, else the default kubeconfig."""
        from kubernetes import client, config

        cfg = client.Configuration()
        token_file = None
        if kubeconfig is None:
            try:
                config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
                token_file = INCLUSTER_TOKEN
            except config.ConfigException:
                config.load_kube_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
        else:
            config.load_kube_config(  # type: ignore[no-untyped-call]
                config_file=kubeconfig, client_configuration=cfg)
        header = cfg.get_api_key_with_prefix("BearerToken") or cfg.get_api_key_with_prefix("authorization")
        token = header.split(" ", 1)[-1] if header else None
        return cls(
            server=str(cfg.host).rstrip("/"),
            ca_path=cfg.ssl_ca_cert,
            insecure=not cfg.verify_ssl,
            token=None if token_file else token,
            token_file=token_file,
            cert_path=cfg.cert_file,
            key_path=cfg.key_file,
        )

    def bearer(self) -> str | None:
        if self.token_file:
            return Path(self.token_file).read_text().strip()
        return self.token

    def connection_info(self) -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(
            server=self.server,
            ca_path=self.ca_path,
            insecure=self.insecure,
            token=self.bearer(),
            scheme="Bearer" if self.token or self.token_file else None,
            certificate_path=self.cert_path,
            private_key_path=self.key_path,
            default_namespace=self.default_namespace,
        )

    def ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.ca_path)
        if self.insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if self.cert_path:
            ctx.load_cert_chain(self.cert_path, self.key_path)
        return ctx


class Kube:
    """The verbs on raw paths. Open it in the event loop that uses it (``async with``)."""

    def __init__(self, access: ClusterAccess, *, timeout: float = 10.0) -> None:
        self.access = access
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Kube:
        self.open()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    def open(self) -> None:
        if self._session is None:
            connector = aiohttp.TCPConnector(ssl=self.access.ssl_context())
            self._session = aiohttp.ClientSession(self.access.server, connector=connector,
                                                  timeout=self.timeout)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(self, method: str, path: str, body: Any = None, *,
                      content_type: str = "application/json",
                      params: Mapping[str, str] | None = None) -> dict[str, Any]:
        if self._session is None:
            raise RuntimeError("Kube client used before open()")
        headers = {"Accept": "application/json"}
        token = self.access.bearer()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        data = None
        if body is not None:
            headers["Content-Type"] = content_type
            data = json.dumps(body).encode()
        url = path + (f"?{urlencode(params)}" if params else "")
        async with self._session.request(method, url, data=data, headers=headers) as resp:
            text = await resp.text()
            if resp.status >= 400:
                try:
                    message = json.loads(text).get("message") or text
                except (ValueError, AttributeError):
                    message = text
                raise KubeError(resp.status, method, path, str(message)[:500])
            result = json.loads(text) if text else {}
            return result if isinstance(result, dict) else {}

    async def get(self, path: str) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        try:
            return await self.request("GET", path)
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise

    async def list(self, path: str, label_selector: str | None = None) -> list[dict[str, Any]]:
        params = {"labelSelector": label_selector} if label_selector else None
        items = (await self.request("GET", path, params=params)).get("items") or []
        return [i for i in items if isinstance(i, dict)]

    async def apply(self, obj: Mapping[str, Any], *, field_manager: str = FIELD_MANAGER) -> dict[str, Any]:
        """Server-side apply: an unchanged object is a no-op (its resourceVersion stays)."""
        params = {"fieldManager": field_manager, "force": "true"}
        return await self.request("PATCH", object_path(obj), obj, params=params,
                                  content_type="application/apply-patch+yaml")

    async def merge_patch(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return await self.request("PATCH", path, body, content_type="application/merge-patch+json")

    async def delete(self, path: str, *, uid: str | None = None) -> bool:
        """Delete (only the object with ``uid`` when given); False when it was not there."""
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"}
        if uid:
            body["preconditions"] = {"uid": uid}  # type: ignore[assignment]
        try:
            await self.request("DELETE", path, body)
        except KubeError as exc:
            if exc.status in (404, 409):
                return False
            raise
        return True


@dataclass(frozen=True)
class OperatorContext:
    """What every handler needs, passed through kopf's ``memo`` (no module-level state)."""

    kube: Kube
    image: str
    operator_namespace: str | None = None


def owned_by(obj: Mapping[str, Any], uid: str | None) -> bool:
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return uid is not None and any(r.get("uid") == uid and r.get("controller") for r in refs)
