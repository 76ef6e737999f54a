"""fsspec helpers: resolve URLs, write whole objects atomically or create-only, checksums."""
from __future__ import annotations

import datetime as dt
import errno
import hashlib
import inspect
import json
import os
import posixpath
import threading
import uuid
from typing import Any, Mapping

import fsspec
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

# memory:// checks for the file and then stores it; this lock makes the pair atomic (the
# store is per process, so a process-wide lock is enough).
_MEMORY_CREATE = threading.Lock()


# botocore's retry policy for S3 when the caller sets none. Connection failures, 5xx and
# throttling are retried with jittered exponential backoff (at most 20 s a wait); "adaptive"
# also slows the client while S3 throttles. 10 attempts wait about a minute in all on
# average (the waits are random); botocore's legacy default gives up after about 10 s.
S3_RETRIES = {"max_attempts": 10, "mode": "adaptive"}


def with_retry_defaults(url: str, storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    """`storage_options` plus S3_RETRIES for an S3 URL, unless the caller chose a retry policy
    (`config_kwargs["retries"]`, or AWS_MAX_ATTEMPTS / AWS_RETRY_MODE in the environment)."""
    options = dict(storage_options or {})
    if fsspec.utils.get_protocol(url) not in ("s3", "s3a"):
        return options
    config = dict(options.get("config_kwargs") or {})
    if "retries" in config or os.environ.get("AWS_MAX_ATTEMPTS") or os.environ.get("AWS_RETRY_MODE"):
        return options
    return {**options, "config_kwargs": {**config, "retries": dict(S3_RETRIES)}}


def url_to_fs(url: str, storage_options: Mapping[str, Any] | None = None):
    """Resolve `url` once into `(filesystem, path)`; local paths become absolute."""
    fs, path = fsspec.core.url_to_fs(url, **with_retry_defaults(url, storage_options))
    return fs, path.rstrip("/") or "/"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def join(root: str, relpath: str) -> str:
    return posixpath.join(root, check_relpath(relpath))


def check_relpath(relpath: str) -> str:
    """Refuse a manifest path that could escape the dataset root."""
    if (not isinstance(relpath, str) or not relpath or "://" in relpath
            or relpath.startswith(("/", "\\", "~")) or ":" in relpath.split("/")[0]
            or ".." in relpath.replace("\\", "/").split("/")
            or any(ord(c) < 32 or c == "\x7f" for c in relpath)):
        raise ValueError(
            f"unsafe path {relpath!r} in manifest: paths must be relative to the dataset root, "
            "without scheme, leading '/' or '~', '..' or control characters")
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
    """Create `path` with `data`, raising FileExistsError when it already exists.

    Exactly one of several concurrent creators succeeds, and a reader never sees the file
    partly written. S3 does this itself (`If-None-Match: *`). A local file is written beside
    its name and hard-linked to it: `link` fails when the name exists, and the name appears
    with all its bytes (fsspec's own local create checks, then writes: two writers can both
    pass the check).
    """
    if isinstance(fs, LocalFileSystem):
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        fs.pipe_file(tmp, data)
        try:
            fs.link(tmp, path)
        except FileExistsError:
            raise
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            # No hard links here (some network and FUSE mounts): O_EXCL still lets only
            # one writer create the name, though a reader may briefly see it short.
            with fs.open(path, "xb") as f:
                f.write(data)
        finally:
            fs.rm_file(tmp)
    elif isinstance(fs, MemoryFileSystem):
        with _MEMORY_CREATE:
            fs.pipe_file(path, data, mode="create")
    else:
        fs.pipe_file(path, data, mode="create")


def modified_at(info: Mapping[str, Any]) -> float | None:
    """Last-modified time of a listed file as POSIX seconds; None when the store gives none."""
    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        value = info.get(key)
        if isinstance(value, dt.datetime):
            return (value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)).timestamp()
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str) and value:
            try:
                return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
    return None


def cat_uncached(fs, path: str) -> bytes:
    """The whole file at `path`, by a direct read.

    s3fs answers `cat_file` with a size lookup first, which trusts the listing cache: when
    another thread listed the folder before a concurrent writer created `path`, the file
    would be reported missing. One GET (`max_concurrency=1`) asks the store itself.
    """
    reader = getattr(fs, "_cat_file", None)
    if reader is not None and "max_concurrency" in inspect.signature(reader).parameters:
        return fs.cat_file(path, max_concurrency=1)
    return fs.cat_file(path)


def ls_uncached(fs, path: str) -> list[str]:
    """Names under `path` as the store lists them now, not as a listing cache remembers."""
    fs.invalidate_cache(path)
    return fs.ls(path, detail=False, refresh=True)


def canonical_json(obj: Any) -> bytes:
    """The byte form hashed for ids: sorted keys, no whitespace, no NaN."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def pretty_json(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True, allow_nan=False) + "\n").encode()
