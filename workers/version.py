"""Dataset versions: manifests under versions/, committed by create-only writes."""
from __future__ import annotations

import datetime as dt
import json
import posixpath
import re
import uuid
from typing import Any

from workers.storage import check_relpath, create_only, pretty_json

FORMAT = "quantlake.version/1"
_NAME = re.compile(r"^(\d{8})\.json$")


class CommitConflict(RuntimeError):
    """Another writer committed the version this job meant to create."""


def version_path(root: str, n: int) -> str:
    return posixpath.join(root, "versions", f"{n:08d}.json")


def list_versions(fs, root: str) -> list[int]:
    try:
        names = [posixpath.basename(p) for p in fs.ls(posixpath.join(root, "versions"), detail=False)]
    except FileNotFoundError:
        return []
    return sorted(int(m.group(1)) for m in map(_NAME.match, names) if m)


def read_version(fs, root: str, n: int | None = None) -> dict[str, Any]:
    """The manifest of version `n` (latest when None), with its paths checked."""
    if n is None:
        versions = list_versions(fs, root)
        if not versions:
            raise FileNotFoundError(f"no committed version under {root}")
        n = versions[-1]
    try:
        doc = json.loads(fs.cat_file(version_path(root, n)))
    except FileNotFoundError:
        raise FileNotFoundError(f"version {n} of {root} does not exist") from None
    validate(doc, f"version {n}")
    return doc


def validate(doc: dict[str, Any], where: str) -> None:
    if doc.get("format") != FORMAT:
        raise ValueError(f"{where}: format is {doc.get('format')!r}, expected {FORMAT!r}")
    paths = [doc["ranges"]["path"]]
    for s in doc["shards"]:
        paths += [s["path"], s["index"]] + ([s["rejects"]["path"]] if s.get("rejects") else [])
    for p in paths:
        try:
            check_relpath(p)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def commit(fs, root: str, manifest: dict[str, Any]) -> int:
    """Commit `manifest` as the next version; return its number.

    The create-only write is the commit point: exactly one of two racing writers creates a
    given number. The loser raises CommitConflict naming the version that won.
    """
    versions = list_versions(fs, root)
    n = versions[-1] + 1 if versions else 1
    parent = versions[-1] if versions else None
    expected = manifest.get("parent", parent)
    if expected != parent:
        raise CommitConflict(f"version {parent} was committed under {root} while this job ran "
                             f"(it started from version {expected}); rerun to build on it")
    doc = {**manifest, "format": FORMAT, "version": n, "parent": parent,
           "writer": manifest.get("writer") or uuid.uuid4().hex, "created_at": now()}
    validate(doc, "new version")
    try:
        create_only(fs, version_path(root, n), pretty_json(doc))
    except FileExistsError:
        raise CommitConflict(f"another writer committed version {n} under {root} first; "
                             "rerun to build on it") from None
    return n
