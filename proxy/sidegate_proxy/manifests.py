"""Reading Kubernetes YAML from files and folders, keeping where each document came from.

Used by ``sidegate validate`` (errors name file and document) and by ``sidegate proxy
--manifests`` (run the data plane from a GitOps folder with no cluster).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config import API_VERSION, ProxyConfig, build_config
from .secrets import DictSecretStore, secret_data

YAML_SUFFIXES = (".yaml", ".yml")


class ManifestError(ValueError):
    def __init__(self, path: str, index: int | None, message: str) -> None:
        where = path if index is None else f"{path} (document {index})"
        super().__init__(f"{where}: {message}")
        self.path = path
        self.index = index
        self.message = message


@dataclass(frozen=True)
class Document:
    path: str
    index: int  # 0-based position in a multi-document file
    obj: dict[str, Any] = field(hash=False)

    @property
    def kind(self) -> str:
        return str(self.obj.get("kind") or "")

    @property
    def name(self) -> str:
        return str((self.obj.get("metadata") or {}).get("name") or "")

    @property
    def namespace(self) -> str:
        return str((self.obj.get("metadata") or {}).get("namespace") or "default")

    @property
    def is_sidegate(self) -> bool:
        return self.obj.get("apiVersion") == API_VERSION

    def where(self) -> str:
        return f"{self.path} (document {self.index})"


def iter_files(paths: Iterable[str | Path]) -> Iterator[Path]:
    for p in paths:
        path = Path(p)
        if path.is_dir():
            yield from sorted(f for f in path.rglob("*") if f.suffix in YAML_SUFFIXES and f.is_file())
        elif path.exists():
            yield path
        else:
            raise ManifestError(str(path), None, "no such file or directory")


def load_file(path: Path) -> list[Document]:
    """All non-empty documents of one file; malformed YAML raises ``ManifestError``."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(str(path), None, f"cannot read: {exc}") from None
    docs: list[Document] = []
    try:
        for i, obj in enumerate(yaml.safe_load_all(text)):
            if obj is None:
                continue
            if not isinstance(obj, dict):
                raise ManifestError(str(path), i, f"expected a mapping, got {type(obj).__name__}")
            docs.append(Document(str(path), i, obj))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ManifestError(str(path), len(docs), f"malformed YAML{at}: {getattr(exc, 'problem', exc)}") from None
    return docs


def load_documents(paths: Iterable[str | Path]) -> list[Document]:
    return [d for f in iter_files(paths) for d in load_file(f)]


def config_from_manifests(paths: Iterable[str | Path], connection: str,
                          namespace: str | None = None) -> tuple[ProxyConfig, DictSecretStore]:
    """The proxy config for one Connection found in a folder, plus the Secrets found beside it."""
    docs = load_documents(paths)
    conns = [d for d in docs if d.is_sidegate and d.kind == "Connection" and d.name == connection
             and (namespace is None or d.namespace == namespace)]
    if not conns:
        raise ManifestError(", ".join(map(str, paths)), None, f"no Connection named {connection!r}")
    if len(conns) > 1:
        raise ManifestError(conns[1].path, conns[1].index,
                            f"Connection {connection!r} is defined more than once (add --namespace)")
    conn = conns[0]
    policies = [d.obj for d in docs if d.is_sidegate and d.kind == "MaskingPolicy"]
    secrets = {}
    for d in docs:
        if d.kind == "Secret" and d.obj.get("apiVersion") == "v1" and d.namespace == conn.namespace:
            try:
                secrets[d.name] = secret_data(d.obj)
            except ValueError as exc:
                raise ManifestError(d.path, d.index, str(exc)) from None
    return build_config(conn.obj, policies), DictSecretStore(secrets)
