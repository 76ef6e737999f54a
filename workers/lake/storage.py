"""fsspec helpers: resolve URLs, write whole objects atomically (and durably on local disk) or
create-only, checksums."""
from __future__ import annotations

import datetime as dt
import errno
import inspect
import math
import os
import posixpath
import threading
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from typing import Any, Callable, Iterable, Iterator, Mapping, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

from workers.lake.redact import redact_url

T = TypeVar("T")
R = TypeVar("R")

# memory:// checks for the file and then stores it; this lock makes the pair atomic (the
# store is per process, so a process-wide lock is enough).
_MEMORY_CREATE = threading.Lock()

# Backends whose create-only write is atomic (of several concurrent creators exactly one
# wins, and nobody overwrites): local disk (hard link, or O_EXCL), memory:// (the lock above;
# one process) and S3 (`If-None-Match: *`, which s3fs sends for mode="create"). Elsewhere
# fsspec's default create checks `exists()` and then writes, so two jobs could both commit
# the same version number and one would silently replace the other's version. GCS
# (`ifGenerationMatch=0`) and Azure (`If-None-Match: *`) have the primitive, but not through
# an fsspec call this project can test, so they are refused rather than trusted blindly.
CREATE_ONLY_PROTOCOLS = ("file", "local", "memory", "s3", "s3a")


class NoAtomicCreate(ValueError):
    """The storage backend cannot create a file only if it does not exist, atomically."""


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


def absolute_url(url: str) -> str:
    """`url` with a relative local path made absolute against this process's working directory.

    A job's URLs travel to Ray workers, whose working directory is not the caller's (on a
    joined cluster, not even the same machine's): the driver resolves them once.
    """
    if "://" in url or "::" in url or fsspec.utils.get_protocol(url) not in ("file", "local"):
        return url
    return os.path.abspath(os.path.expanduser(url))


def url_to_fs(url: str, storage_options: Mapping[str, Any] | None = None):
    """Resolve `url` (or a `pathlib.Path`) once into `(filesystem, path)`; local paths become absolute."""
    url = os.fspath(url)
    fs, path = fsspec.core.url_to_fs(url, **with_retry_defaults(url, storage_options))
    return fs, path.rstrip("/") or "/"



def join(root: str, relpath: str) -> str:
    return posixpath.join(root, check_relpath(relpath))


def check_relpath(relpath: str) -> str:
    """Refuse a manifest path that could escape the dataset root, or that names a file other than
    as its listing does (`ranges/./x.json`, `shards//x.parquet`): vacuum compares the paths a
    version references with the names it lists, and would delete a file spelt another way."""
    if (not isinstance(relpath, str) or not relpath or "://" in relpath
            or relpath.startswith(("/", "\\", "~")) or ":" in relpath.split("/")[0]
            or {"..", ".", ""} & set(relpath.replace("\\", "/").split("/"))
            or any(ord(c) < 32 or c == "\x7f" for c in relpath)):
        raise ValueError(
            f"unsafe path {relpath!r} in manifest: paths must be relative to the dataset root, "
            "without scheme, leading '/' or '~', '.' or '..' parts, empty parts or control characters")
    return relpath


def protocols(fs) -> tuple[str, ...]:
    return tuple(fs.protocol) if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)



def shown(fs, path: str) -> str:
    """`path` of `fs` for messages, as a user writes it: `s3://bucket/key` (fsspec strips the
    scheme from the paths it hands out), a local path as it is; credentials masked."""
    return redact_url(path if on_local_disk(fs) else fs.unstrip_protocol(path))


def on_local_disk(fs) -> bool:
    """Whether `fs` is this machine's file system (its paths are local paths)."""
    return bool({"file", "local"} & set(protocols(fs)))

# Filesystems in this machine's memory or on its disks: a read waits for no network round trip.
IN_MACHINE_PROTOCOLS = ("file", "local", "memory")


def over_network(fs) -> bool:
    """Whether `fs` reaches its files over a network (object storage, HTTP): each read then waits
    for round trips that reading several files at once overlaps."""
    return not set(protocols(fs)) & set(IN_MACHINE_PROTOCOLS)


def read_ahead(read: Callable[[T], R], items: Iterable[T], threads: int, ahead: int,
               name: str) -> Iterator[tuple[T, R]]:
    """`(item, read(item))` for each of `items`, in their order, the reads run `threads` at a
    time in threads named `name`: at most `ahead` of them started or done besides the one just
    handed out, so a slow caller holds a few results, not all. An error a read raises is raised
    at its item; reads not yet started when the caller stops are cancelled."""
    todo = iter(items)
    with ThreadPoolExecutor(threads, thread_name_prefix=name) as pool:
        pending = deque((x, pool.submit(read, x)) for x in islice(todo, ahead))
        try:
            while pending:
                x, done = pending.popleft()
                for nxt in islice(todo, 1):
                    pending.append((nxt, pool.submit(read, nxt)))
                got = done.result()
                del done
                yield x, got
                del got
        finally:
            for _, future in pending:
                future.cancel()


def require_create_only(fs, url: str) -> None:
    """Raise NoAtomicCreate unless versions can be committed on `fs` (see CREATE_ONLY_PROTOCOLS).

    Jobs call it on their destination before any work, so a destination they could never
    commit to fails in seconds rather than after hours of encoding.
    """
    if not set(protocols(fs)) & set(CREATE_ONLY_PROTOCOLS):
        raise _no_atomic_create(url, "/".join(protocols(fs)), type(fs).__name__)


def dest_to_fs(url: str, storage_options: Mapping[str, Any] | None = None):
    """`url_to_fs` for a dataset a job commits versions to: NoAtomicCreate for a backend that
    cannot hold one (`require_create_only`), told by the URL's protocol before the filesystem
    is built, so that a backend whose package is not installed (gs:// without gcsfs) gets the
    same refusal rather than that package's ImportError."""
    protocol = fsspec.utils.get_protocol(url)
    if protocol not in CREATE_ONLY_PROTOCOLS:
        raise _no_atomic_create(url, protocol, _backend_name(protocol))
    fs, root = url_to_fs(url, storage_options)
    require_create_only(fs, url)
    return fs, root


def _backend_name(protocol: str) -> str:
    """The fsspec class of `protocol`, by name, without importing its package."""
    from fsspec.registry import known_implementations, registry

    if protocol in registry:
        return registry[protocol].__name__
    known = known_implementations.get(protocol)
    return known["class"].rsplit(".", 1)[-1] if known else "not an fsspec backend"


def _no_atomic_create(url: str, protocols: str, backend: str) -> NoAtomicCreate:
    return NoAtomicCreate(
        f"cannot commit dataset versions to {redact_url(url)}: its storage backend "
        f"({protocols}://, {backend}) has no atomic create-only write, "
        "so two jobs committing at once could overwrite each other's version. Versions are "
        "committed only on local disk (file://), memory:// and S3 (s3://, s3a://, with "
        "If-None-Match): write the dataset to one of those")


def _write_synced(fs, path: str, data: bytes, mode: str = "wb") -> None:
    """Write a local file and fsync it, so its bytes are on disk before any name points at them."""
    with fs.open(path, mode) as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _sync_folder(folder: str) -> None:
    """fsync a local folder, so a name just created, renamed or linked in it survives a power loss."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as exc:
        # Some filesystems (and platforms) cannot fsync a folder; the file's own fsync stands.
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def put_bytes(fs, path: str, data: bytes) -> None:
    """Write a whole object so that readers see all of it or nothing.

    Object stores publish a PUT atomically; a local file is written beside its name, fsynced,
    renamed, and its folder fsynced, so neither a killed writer nor a power loss leaves a
    truncated or empty file under the name (at worst a temporary, which vacuum removes).
    """
    if isinstance(fs, LocalFileSystem):
        folder = posixpath.dirname(path)
        fs.makedirs(folder, exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        _write_synced(fs, tmp, data)
        fs.mv(tmp, path)
        _sync_folder(folder)
    else:
        fs.pipe_file(path, data)


def create_only(fs, path: str, data: bytes) -> None:
    """Create `path` with `data`, raising FileExistsError when it already exists.

    Exactly one of several concurrent creators succeeds, and a reader never sees the file
    partly written. S3 does this itself (`If-None-Match: *`). A local file is written beside
    its name, fsynced, and hard-linked to it: `link` fails when the name exists, and the name
    appears with all its bytes (fsspec's own local create checks, then writes: two writers
    can both pass the check); the folder is fsynced after, so a committed version survives a
    power loss whole. Other backends raise NoAtomicCreate (see `require_create_only`).
    """
    require_create_only(fs, path)
    if isinstance(fs, LocalFileSystem):
        folder = posixpath.dirname(path)
        fs.makedirs(folder, exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        _write_synced(fs, tmp, data)
        try:
            fs.link(tmp, path)
        except FileExistsError:
            raise
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            # No hard links here (some network and FUSE mounts): O_EXCL still lets only
            # one writer create the name, though a reader may briefly see it short.
            _write_synced(fs, path, data, "xb")
        finally:
            fs.rm_file(tmp)
        _sync_folder(folder)
    elif isinstance(fs, MemoryFileSystem):
        with _MEMORY_CREATE:
            fs.pipe_file(path, data, mode="create")
    else:
        fs.pipe_file(path, data, mode="create")


def modified_at(info: Mapping[str, Any]) -> float | None:
    """Last-modified time of a listed file as POSIX seconds; None when the store gives none (or
    one that is no time: NaN, a boolean). A time without a zone is UTC, as a string or not (a
    string was read in the machine's zone, hours off where that is not UTC)."""
    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        value = info.get(key)
        if isinstance(value, str) and value:
            try:
                value = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError:
                continue
        if isinstance(value, dt.datetime):
            return (value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)).timestamp()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value) if math.isfinite(value) else None
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


