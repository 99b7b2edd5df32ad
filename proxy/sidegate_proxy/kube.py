"""A tiny asyncio Kubernetes API client for the data plane.

The proxy needs a handful of verbs on two kinds of objects (AccessRequests, and Events about its
Connection), so it speaks the REST API over aiohttp itself instead of pulling in the
``kubernetes`` package. Credentials come from the pod's service account (the token file is
re-read, since the kubelet rotates it) or a kubeconfig with a bearer token or client certificate.
Every refusal from the API server is a ``KubeError`` subclass carrying the HTTP status.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import ssl
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import aiohttp
import yaml

log = logging.getLogger(__name__)

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
TOKEN_REFRESH_SECONDS = 60.0  # like client-go: re-read the projected token file every minute
WATCH_TIMEOUT_SECONDS = 290  # server-side watch timeout; the stream is then resumed

WatchType = Literal["ADDED", "MODIFIED", "DELETED"]


# --------------------------------------------------------------------------- errors


class KubeConfigError(ValueError):
    """No usable API server address or credentials."""


class KubeError(RuntimeError):
    """The API server refused a request (``status`` is the HTTP status, 0 = not reached)."""

    def __init__(self, status: int, method: str, path: str, message: str, reason: str = "") -> None:
        super().__init__(f"{method} {path}: {status} {reason + ': ' if reason else ''}{message}")
        self.status = status
        self.reason = reason
        self.message = message


class Unauthorized(KubeError):
    """401: the token or certificate was not accepted."""


class Forbidden(KubeError):
    """403: RBAC or an admission check said no."""


class NotFound(KubeError):
    """404."""


class Conflict(KubeError):
    """409, or a failed resourceVersion precondition: someone else changed the object first."""


class Gone(KubeError):
    """410: the resourceVersion to watch from is too old; list again."""


class Invalid(KubeError):
    """422: the object failed schema or admission validation."""


_ERRORS: Mapping[int, type[KubeError]] = {
    401: Unauthorized, 403: Forbidden, 404: NotFound, 409: Conflict, 410: Gone, 422: Invalid,
}


def kube_error(status: int, method: str, path: str, body: Any) -> KubeError:
    """The exception for a ``Status`` body (or any text) the API server answered with."""
    message, reason = str(body)[:500], ""
    if isinstance(body, Mapping):
        message = str(body.get("message") or body)[:500]
        reason = str(body.get("reason") or "")
    return _ERRORS.get(status, KubeError)(status, method, path, message, reason)


# --------------------------------------------------------------------------- resources


@dataclass(frozen=True)
class Resource:
    """A namespaced API resource: ``group`` is empty for the core API."""

    group: str
    version: str
    plural: str

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(self, namespace: str | None, name: str | None = None, subresource: str | None = None) -> str:
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        ns = f"/namespaces/{quote(namespace, safe='')}" if namespace else ""
        tail = f"/{quote(name, safe='')}" if name else ""
        if subresource:
            if not name:
                raise ValueError("a subresource needs an object name")
            tail += f"/{subresource}"
        return f"{base}{ns}/{self.plural}{tail}"


ACCESS_REQUESTS = Resource("sidegate.dev", "v1alpha1", "accessrequests")
CONNECTIONS = Resource("sidegate.dev", "v1alpha1", "connections")
EVENTS = Resource("events.k8s.io", "v1", "events")


@dataclass(frozen=True)
class ObjectList:
    items: tuple[dict[str, Any], ...]
    resource_version: str


@dataclass(frozen=True)
class WatchEvent:
    type: WatchType
    object: dict[str, Any]


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class KubeConfig:
    """Where the API server is and how to authenticate to it."""

    server: str
    namespace: str = "default"
    ca_file: str | None = None
    ca_data: bytes | None = None
    insecure: bool = False
    token: str | None = None
    token_file: str | None = None
    cert_data: bytes | None = None  # PEM client certificate and key (files are read at load time)
    key_data: bytes | None = None

    def __post_init__(self) -> None:
        if not self.server.startswith(("https://", "http://")):
            raise KubeConfigError(f"API server address must be http(s): {self.server!r}")
        if (self.cert_data is None) != (self.key_data is None):
            raise KubeConfigError("a client certificate needs both the certificate and the key")

    @classmethod
    def in_cluster(
        cls, env: Mapping[str, str] | None = None, root: Path = SERVICE_ACCOUNT_DIR
    ) -> KubeConfig:
        """The pod's service account: KUBERNETES_SERVICE_HOST/PORT, token file and CA file."""
        env = os.environ if env is None else env
        host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT")
        if not host or not port:
            raise KubeConfigError("not in a cluster: KUBERNETES_SERVICE_HOST/PORT are not set")
        token_file = root / "token"
        if not token_file.is_file():
            raise KubeConfigError(f"service account token {token_file} is missing")
        ca = root / "ca.crt"
        ns_file = root / "namespace"
        host = f"[{host}]" if ":" in host else host
        return cls(
            server=f"https://{host}:{port}",
            namespace=ns_file.read_text().strip() if ns_file.is_file() else "default",
            ca_file=str(ca) if ca.is_file() else None,
            token_file=str(token_file),
        )

    @classmethod
    def from_kubeconfig(cls, path: str | os.PathLike[str], context: str | None = None) -> KubeConfig:
        """A kubeconfig file: token, tokenFile or client certificate auth (no exec plugins)."""
        path = Path(path)
        try:
            doc = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise KubeConfigError(f"cannot read kubeconfig {path}: {exc}") from None
        if not isinstance(doc, Mapping):
            raise KubeConfigError(f"kubeconfig {path} is not a mapping")
        name = context or doc.get("current-context")
        if not name:
            raise KubeConfigError(f"kubeconfig {path} has no current-context")
        ctx = _named(doc, "contexts", name, "context", path)
        cluster = _named(doc, "clusters", ctx.get("cluster"), "cluster", path)
        user = _named(doc, "users", ctx.get("user"), "user", path) if ctx.get("user") else {}
        base = path.parent

        def file_or_data(section: Mapping[str, Any], key: str) -> bytes | None:
            if section.get(f"{key}-data"):
                return base64.b64decode(section[f"{key}-data"])
            if section.get(key):
                return (base / str(section[key])).read_bytes()
            return None

        if "exec" in user or "auth-provider" in user:
            raise KubeConfigError(f"kubeconfig {path}: exec and auth-provider credentials are not supported")
        server = cluster.get("server")
        if not server:
            raise KubeConfigError(f"kubeconfig {path}: cluster {ctx.get('cluster')!r} has no server")
        try:
            cert, key = file_or_data(user, "client-certificate"), file_or_data(user, "client-key")
            ca = file_or_data(cluster, "certificate-authority")
        except (OSError, ValueError) as exc:
            raise KubeConfigError(f"kubeconfig {path}: {exc}") from None
        token_file = user.get("tokenFile")
        return cls(
            server=str(server).rstrip("/"),
            namespace=str(ctx.get("namespace") or "default"),
            ca_data=ca,
            insecure=bool(cluster.get("insecure-skip-tls-verify", False)),
            token=user.get("token"),
            token_file=str(base / token_file) if token_file else None,
            cert_data=cert,
            key_data=key,
        )

    @classmethod
    def load(cls, kubeconfig: str | None = None, context: str | None = None) -> KubeConfig:
        """``kubeconfig`` when given, else in-cluster, else ``$KUBECONFIG`` or ``~/.kube/config``."""
        if kubeconfig:
            return cls.from_kubeconfig(kubeconfig, context)
        with contextlib.suppress(KubeConfigError):
            return cls.in_cluster()
        default = os.environ.get("KUBECONFIG", "").split(os.pathsep)[0] or str(Path.home() / ".kube/config")
        return cls.from_kubeconfig(default, context)

    def ssl_context(self) -> ssl.SSLContext | None:
        if self.server.startswith("http://"):
            return None
        ctx = ssl.create_default_context(
            cafile=self.ca_file, cadata=self.ca_data.decode() if self.ca_data else None
        )
        if self.insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if self.cert_data is not None and self.key_data is not None:
            # ssl can only load a key pair from files: a private temporary folder, gone at once.
            with tempfile.TemporaryDirectory(prefix="sidegate-kube-") as tmp:
                cert, key = Path(tmp) / "tls.crt", Path(tmp) / "tls.key"
                for p, data in ((cert, self.cert_data), (key, self.key_data)):
                    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                    with os.fdopen(fd, "wb") as f:
                        f.write(data)
                ctx.load_cert_chain(str(cert), str(key))
        return ctx


def _named(doc: Mapping[str, Any], section: str, name: Any, key: str, path: Path) -> Mapping[str, Any]:
    for entry in doc.get(section) or []:
        if isinstance(entry, Mapping) and entry.get("name") == name:
            value = entry.get(key) or {}
            if not isinstance(value, Mapping):
                break
            return value
    raise KubeConfigError(f"kubeconfig {path}: no {section[:-1]} named {name!r}")


class _Token:
    """The bearer token, re-read from its file at most every ``TOKEN_REFRESH_SECONDS``."""

    def __init__(self, config: KubeConfig, clock: Callable[[], float]) -> None:
        self._config = config
        self._clock = clock
        self._value: str | None = config.token
        self._read_at = -1e18

    def get(self) -> str | None:
        file = self._config.token_file
        if file is None or self._config.token:
            return self._value
        now = self._clock()
        if now - self._read_at >= TOKEN_REFRESH_SECONDS:
            try:
                self._value = Path(file).read_text().strip()
            except OSError as exc:
                if self._value is None:
                    raise KubeConfigError(f"cannot read service account token {file}: {exc}") from None
                log.warning("cannot re-read %s (%s); keeping the previous token", file, exc)
            self._read_at = now
        return self._value

    def invalidate(self) -> None:
        self._read_at = -1e18


# --------------------------------------------------------------------------- the client


class KubeClient:
    """The verbs the data plane needs. Use it in the event loop that opened it (``async with``)."""

    def __init__(
        self,
        config: KubeConfig,
        *,
        timeout: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        user_agent: str = "sidegate-proxy",
    ) -> None:
        self.config = config
        self.timeout = timeout
        self._token = _Token(config, clock)
        self._user_agent = user_agent
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> KubeClient:
        self._open()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(ssl=self.config.ssl_context() or False)
            self._session = aiohttp.ClientSession(self.config.server, connector=connector)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _headers(self, content_type: str | None) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": self._user_agent}
        token = self._token.get()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if content_type:
            headers["Content-Type"] = content_type
        return headers

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: Mapping[str, str] | None = None,
        content_type: str = "application/json",
    ) -> dict[str, Any]:
        """One API call; the decoded JSON answer, or a ``KubeError``."""
        session = self._open()
        data = None if body is None else json.dumps(body).encode()
        headers = self._headers(content_type if data is not None else None)
        try:
            async with session.request(
                method, path, data=data, headers=headers, params=params,
                timeout=aiohttp.ClientTimeout(total=self.timeout),
            ) as resp:
                text = await resp.text()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise KubeError(0, method, path, f"{type(exc).__name__}: {exc}") from exc
        try:
            decoded: Any = json.loads(text) if text else {}
        except ValueError:
            decoded = text
        if status >= 400:
            if status == 401:
                self._token.invalidate()
            raise kube_error(status, method, path, decoded)
        if not isinstance(decoded, dict):
            raise KubeError(status, method, path, f"unexpected answer: {str(decoded)[:200]}")
        return decoded

    # ------------------------------------------------------------------ verbs

    async def get(self, resource: Resource, namespace: str, name: str) -> dict[str, Any]:
        return await self.request("GET", resource.path(namespace, name))

    async def create(self, resource: Resource, namespace: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return await self.request("POST", resource.path(namespace), body=body)

    async def merge_patch(
        self, resource: Resource, namespace: str, name: str, patch: Mapping[str, Any],
        *, subresource: str | None = None,
    ) -> dict[str, Any]:
        """RFC 7386 merge patch; put ``metadata.resourceVersion`` in it for optimistic locking."""
        return await self.request(
            "PATCH", resource.path(namespace, name, subresource), body=patch,
            content_type="application/merge-patch+json",
        )

    async def json_patch(
        self, resource: Resource, namespace: str, name: str, ops: Sequence[Mapping[str, Any]],
        *, subresource: str | None = None, resource_version: str | None = None,
    ) -> dict[str, Any]:
        """RFC 6902 patch; with ``resource_version`` it applies only to exactly that version
        (a ``test`` op first), else ``Conflict``: the way to make a state change happen once."""
        body = list(ops)
        if resource_version is not None:
            body.insert(0, {"op": "test", "path": "/metadata/resourceVersion", "value": resource_version})
        path = resource.path(namespace, name, subresource)
        try:
            return await self.request("PATCH", path, body=body, content_type="application/json-patch+json")
        except Invalid as exc:
            # A failed ``test`` op is a bare 422 with no details, like a malformed patch: tell the
            # two apart by whether the object moved on from the version we tested.
            if resource_version is None:
                raise
            current = await self.get(resource, namespace, name)
            if str((current.get("metadata") or {}).get("resourceVersion")) != resource_version:
                raise Conflict(409, "PATCH", path, f"resourceVersion is no longer {resource_version}",
                               "Conflict") from exc
            raise

    async def list(
        self, resource: Resource, namespace: str, *, label_selector: str | None = None,
        field_selector: str | None = None,
    ) -> ObjectList:
        params = _selectors(label_selector, field_selector)
        answer = await self.request("GET", resource.path(namespace), params=params)
        items = tuple(i for i in answer.get("items") or [] if isinstance(i, dict))
        return ObjectList(items, str((answer.get("metadata") or {}).get("resourceVersion") or ""))

    async def watch(
        self,
        resource: Resource,
        namespace: str,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
        resource_version: str | None = None,
        timeout_seconds: int = WATCH_TIMEOUT_SECONDS,
        retry_delay: float = 1.0,
    ) -> AsyncIterator[WatchEvent]:
        """Changes from ``resource_version`` on, forever (stop by leaving the ``async for``).

        Without a resourceVersion the current objects are listed first and yielded as ADDED.
        When the server ends the stream it is resumed from the last version seen (bookmarks
        included); when that version is too old (410 Gone) the objects are listed again and each
        is yielded as ADDED, so a consumer that only cares about current state misses nothing.
        Connection errors are retried after ``retry_delay``; refusals (403, 404...) are raised.
        """
        rv = resource_version
        path = resource.path(namespace)
        while True:
            if rv is None:
                listed = await self.list(
                    resource, namespace, label_selector=label_selector, field_selector=field_selector
                )
                for item in listed.items:
                    yield WatchEvent("ADDED", item)
                rv = listed.resource_version
            params = {
                **_selectors(label_selector, field_selector),
                "watch": "1",
                "allowWatchBookmarks": "true",
                "resourceVersion": rv,
                "timeoutSeconds": str(timeout_seconds),
            }
            try:
                async for kind, obj in self._stream(path, params, timeout_seconds):
                    new_rv = str((obj.get("metadata") or {}).get("resourceVersion") or rv)
                    if kind == "BOOKMARK":
                        rv = new_rv
                    elif kind == "ERROR":
                        error = kube_error(int(obj.get("code") or 500), "WATCH", path, obj)
                        if isinstance(error, Gone):
                            log.debug("watch %s: %s; listing again", path, error.message)
                            rv = None
                            break
                        raise error
                    elif kind in ("ADDED", "MODIFIED", "DELETED"):
                        rv = new_rv
                        yield WatchEvent(kind, obj)  # type: ignore[arg-type]
            except Gone:
                rv = None
            except KubeError as exc:
                if exc.status != 0:
                    raise
                log.debug("watch %s interrupted (%s); resuming from %s", path, exc, rv)
                await asyncio.sleep(retry_delay)

    async def _stream(
        self, path: str, params: Mapping[str, str], timeout_seconds: int
    ) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        session = self._open()
        timeout = aiohttp.ClientTimeout(total=None, connect=self.timeout, sock_read=timeout_seconds + 30)
        try:
            async with session.get(path, params=params, headers=self._headers(None), timeout=timeout) as resp:
                if resp.status >= 400:
                    text = await resp.text()
                    try:
                        body: Any = json.loads(text)
                    except ValueError:
                        body = text
                    if resp.status == 401:
                        self._token.invalidate()
                    raise kube_error(resp.status, "WATCH", path, body)
                while True:
                    line = await resp.content.readline()
                    if not line:
                        return
                    if not line.strip():
                        continue
                    try:
                        event = json.loads(line)
                    except ValueError:
                        raise KubeError(0, "WATCH", path, f"undecodable watch line {line[:100]!r}") from None
                    obj = event.get("object")
                    yield str(event.get("type")), obj if isinstance(obj, dict) else {}
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise KubeError(0, "WATCH", path, f"{type(exc).__name__}: {exc}") from exc


def _selectors(label_selector: str | None, field_selector: str | None) -> dict[str, str]:
    params = {}
    if label_selector:
        params["labelSelector"] = label_selector
    if field_selector:
        params["fieldSelector"] = field_selector
    return params
