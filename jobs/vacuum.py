"""`quantlake vacuum`: delete the files no retained committed version references.

Only the dataset's own folders are considered (`shards/`, `rejects/`, `ranges/`, and in
`versions/` leftover `*.tmp-*` files and the manifests of versions past `--retain`); a file
is deleted only when no retained version needs it and it is older than `--older-than`, so
the fresh, not yet committed shards of a running ingest are safe (keep `--older-than`
above the longest ingest). A file whose store gives no modification time is kept.
"""
from __future__ import annotations

import argparse
import json
import logging
import posixpath
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from jobs.common import add_storage_options, run_reporting, storage_options
from workers.redact import redact_url
from workers.storage import modified_at, url_to_fs
from workers.version import list_versions, read_version

log = logging.getLogger(__name__)

FOLDERS = ("shards", "rejects", "ranges", "versions")
_VERSION = re.compile(r"^versions/(\d{8})\.json$")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """Seconds in `30s`, `15m`, `1h`, `2d` or a bare number of seconds."""
    m = _DURATION.match(text)
    if not m:
        raise ValueError(f"cannot read duration {text!r}: use a number with s, m, h or d (e.g. 1h, 30m)")
    return float(m.group(1)) * _UNIT_S[m.group(2)]


@dataclass(frozen=True)
class VacuumConfig:
    """Args:
        dest: the dataset root (fsspec URL or path).
        older_than_s: only files last modified at least this long ago are deleted.
        retain: keep only the latest `retain` versions (None: keep every version).
        dry_run: list what would go, delete nothing.
        as_json: print the result as JSON.
        storage_options: fsspec options (endpoint, credentials).
    """

    dest: str
    older_than_s: float = 3600.0
    retain: int | None = None
    dry_run: bool = False
    as_json: bool = False
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.older_than_s < 0:
            raise ValueError(f"--older-than must not be negative, got {self.older_than_s} s")
        if self.retain is not None and self.retain < 1:
            raise ValueError(f"--retain must be >= 1 (the latest version is always kept), got {self.retain}")


@dataclass
class VacuumResult:
    retained: list[int]
    expired: list[int]
    deleted: list[tuple[str, int]]  # (path relative to the root, bytes): deleted, or would be
    young: list[str]  # unreferenced, but too recent (or of unknown age) to delete
    dry_run: bool

    def to_json(self) -> dict[str, Any]:
        return {"dry_run": self.dry_run, "retained_versions": self.retained, "expired_versions": self.expired,
                "deleted": [{"path": p, "bytes": b} for p, b in self.deleted],
                "bytes_deleted": sum(b for _, b in self.deleted), "kept_too_recent": self.young}


def _listing(fs, root: str) -> dict[str, dict[str, Any]]:
    fs.invalidate_cache()
    found: dict[str, dict[str, Any]] = {}
    for folder in FOLDERS:
        try:
            infos = fs.find(posixpath.join(root, folder), detail=True)
        except FileNotFoundError:
            continue
        for path, info in infos.items():
            if info.get("type", "file") == "file":
                found[posixpath.relpath(path, root)] = info
    return found


def references(doc: dict[str, Any]) -> tuple[set[str], set[str]]:
    """`(paths, shard ids)` a version needs: its manifest, ranges, shard files and rejects."""
    paths = {f"versions/{doc['version']:08d}.json", doc["ranges"]["path"]}
    ids = set()
    for s in doc["shards"]:
        paths.update((s["path"], s["index"]))
        if s.get("rejects"):
            paths.add(s["rejects"]["path"])
        ids.add(s["id"])
    return paths, ids


def _needed(rel: str, paths: set[str], ids: set[str]) -> bool:
    if rel in paths:
        return True
    # Any other file of a needed shard (e.g. its completion sidecar shards/<id>.json) stays too.
    folder, _, name = rel.partition("/")
    return folder in ("shards", "rejects") and name.split(".")[0] in ids and ".tmp-" not in name


def plan(fs, root: str, cfg: VacuumConfig, now: float | None = None) -> VacuumResult:
    """What vacuum would delete; deletes nothing.

    The files are listed before the versions are read, so a version committed meanwhile is
    either read (and protects its files) or was committed after the listing (its files are
    then not in it, or are fresh); the versions are listed again at the end for the same reason.
    """
    now = time.time() if now is None else now
    files = _listing(fs, root)
    versions = list_versions(fs, root)
    retained = versions[-cfg.retain:] if cfg.retain else versions
    expired = [n for n in versions if n not in retained]
    paths: set[str] = set()
    ids: set[str] = set()
    wanted, seen = set(retained), set()
    for _ in range(3):
        for n in sorted(wanted - seen):
            p, i = references(read_version(fs, root, n))  # an unreadable manifest stops the vacuum
            paths |= p
            ids |= i
            seen.add(n)
        later = {n for n in list_versions(fs, root) if n > (versions[-1] if versions else 0)}
        if later <= seen:
            break
        wanted |= later
    else:
        raise RuntimeError("versions kept being committed while vacuum read them; run it again")
    deleted, young = [], []
    for rel, info in sorted(files.items()):
        if _needed(rel, paths, ids):
            continue
        if rel.startswith("versions/"):
            m = _VERSION.match(rel)
            if not ((m and int(m.group(1)) in expired) or ".tmp-" in rel):
                continue  # not ours to judge: a later version, or a file someone put there
        mtime = modified_at(info)
        if mtime is None or now - mtime < cfg.older_than_s:
            young.append(rel)
        else:
            deleted.append((rel, int(info.get("size") or 0)))
    # Expired manifests go first: were the run cut short, no version would point at deleted files.
    deleted.sort(key=lambda d: (not d[0].startswith("versions/"), d[0]))
    return VacuumResult(retained, expired, deleted, young, cfg.dry_run)


def run(cfg: VacuumConfig, now: float | None = None) -> VacuumResult:
    fs, root = url_to_fs(cfg.dest, cfg.storage_options)
    result = plan(fs, root, cfg, now)
    if not cfg.dry_run:
        for rel, _ in result.deleted:
            fs.rm_file(posixpath.join(root, rel))
            log.info("deleted %s", rel)
        fs.invalidate_cache()
    return result


def format_result(dest: str, r: VacuumResult) -> str:
    verb = "would delete" if r.dry_run else "deleted"
    lines = [f"{verb} {rel} ({b} bytes)" for rel, b in r.deleted]
    lines.append(f"vacuum {redact_url(dest)}: {verb} {len(r.deleted)} file(s), "
                 f"{sum(b for _, b in r.deleted)} bytes; retained version(s) "
                 f"{', '.join(map(str, r.retained)) or 'none'}"
                 + (f"; expired version(s) {', '.join(map(str, r.expired))}" if r.expired else "")
                 + (f"; kept {len(r.young)} unreferenced file(s) too recent to delete" if r.young else ""))
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> VacuumConfig:
    p = argparse.ArgumentParser(prog="quantlake vacuum", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dest", help="dataset URL or path")
    p.add_argument("--older-than", default="1h", help="delete only files older than this (default 1h)")
    p.add_argument("--retain", type=int, default=None, help="keep only the latest N versions (default: all)")
    p.add_argument("--dry-run", action="store_true", help="list what would be deleted; delete nothing")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    add_storage_options(p)
    a = p.parse_args(argv)
    options = storage_options(p, a)
    try:
        return VacuumConfig(a.dest, parse_duration(a.older_than), a.retain, a.dry_run, a.json, options)
    except ValueError as exc:
        p.error(str(exc))


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    status, result = run_reporting("vacuum", lambda: run(cfg), cfg.storage_options, [cfg.dest])
    if status:
        return status
    print(json.dumps(result.to_json(), indent=1) if cfg.as_json else format_result(cfg.dest, result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
