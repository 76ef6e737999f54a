"""fsspec helpers: resolve URLs, write whole objects atomically or create-only, checksums."""
from __future__ import annotations

import hashlib
import json
import posixpath
import uuid
from typing import Any, Mapping

import fsspec
from fsspec.implementations.local import LocalFileSystem


def url_to_fs(url: str, storage_options: Mapping[str, Any] | None = None):
    """Resolve `url` once into `(filesystem, path)`; local paths become absolute."""
    fs, path = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    return fs, path.rstrip("/") or "/"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def join(root: str, relpath: str) -> str:
    return posixpath.join(root, check_relpath(relpath))


def check_relpath(relpath: str) -> str:
    """Refuse a manifest path that could escape the dataset root."""
    if (not isinstance(relpath, str) or not relpath or "://" in relpath
            or relpath.startswith(("/", "\\")) or ":" in relpath.split("/")[0]
            or ".." in relpath.replace("\\", "/").split("/")):
        raise ValueError(
            f"unsafe path {relpath!r} in manifest: paths must be relative to the dataset root, "
            "without scheme, leading '/' or '..'")
    return relpath


def put_bytes(fs, path: str, data: bytes) -> None:
    """Write a whole object so that readers see all of it or nothing.

    Object stores publish a PUT atomically; a local file is written beside its name and
    renamed, so a killed writer leaves a temporary file, never a truncated shard.
    """
    if isinstance(fs, LocalFileSystem):
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        fs.pipe_file(tmp, data)
        fs.mv(tmp, path)
    else:
        fs.pipe_file(path, data)


def create_only(fs, path: str, data: bytes) -> None:
    """Create `path` with `data`, raising FileExistsError when it already exists."""
    if isinstance(fs, LocalFileSystem):
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
    fs.pipe_file(path, data, mode="create")


def canonical_json(obj: Any) -> bytes:
    """The byte form hashed for ids: sorted keys, no whitespace, no NaN."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def pretty_json(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True, allow_nan=False) + "\n").encode()
