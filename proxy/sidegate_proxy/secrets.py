"""Where the gateway-held credentials come from: manifests, a mounted Secret volume, or memory.

The proxy only ever asks for ``(secret name, key)``; a missing one raises ``SecretMissing`` so the
caller fails closed with a message that names exactly what to create.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from .config import SecretKeyRef


class SecretMissing(LookupError):
    def __init__(self, ref: SecretKeyRef, detail: str = "") -> None:
        what = f"secret {ref.name!r}" + (f" key {ref.key!r}" if ref.key else "")
        super().__init__(f"{what} not found" + (f": {detail}" if detail else ""))
        self.ref = ref


class SecretStore(Protocol):
    def get(self, ref: SecretKeyRef, key: str | None = None) -> bytes:
        """The value of ``key`` (or ``ref.key``) in Secret ``ref.name``."""
        ...


class DictSecretStore:
    """Secrets held in memory: ``{name: {key: bytes}}`` (from manifests, or tests)."""

    def __init__(self, secrets: Mapping[str, Mapping[str, bytes]]) -> None:
        self._secrets = {n: dict(v) for n, v in secrets.items()}

    def get(self, ref: SecretKeyRef, key: str | None = None) -> bytes:
        k = key or ref.key
        if k is None:
            raise SecretMissing(ref, "no key given")
        try:
            return self._secrets[ref.name][k]
        except KeyError:
            raise SecretMissing(SecretKeyRef(ref.name, k)) from None


class DirSecretStore:
    """Secrets mounted as volumes: ``<root>/<secret name>/<key>``, re-read on every call so a
    rotated Secret is picked up without a restart."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def get(self, ref: SecretKeyRef, key: str | None = None) -> bytes:
        k = key or ref.key
        if k is None:
            raise SecretMissing(ref, "no key given")
        path = self.root / ref.name / k
        if "/" in ref.name or "/" in k or ref.name.startswith(".") or k.startswith("."):
            raise SecretMissing(SecretKeyRef(ref.name, k), "invalid name")
        try:
            return path.read_bytes()
        except OSError as exc:
            raise SecretMissing(SecretKeyRef(ref.name, k), f"{path}: {exc.strerror}") from None


def secret_data(obj: Mapping[str, Any]) -> dict[str, bytes]:
    """The decoded ``data`` and ``stringData`` of a v1 Secret object."""
    out: dict[str, bytes] = {}
    for k, v in (obj.get("data") or {}).items():
        try:
            out[str(k)] = base64.b64decode(str(v), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"Secret {obj.get('metadata', {}).get('name')!r}: data.{k} is not base64") from None
    for k, v in (obj.get("stringData") or {}).items():
        out[str(k)] = str(v).encode()
    return out
