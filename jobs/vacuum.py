"""`quantlake vacuum`: delete the files no retained committed version references.

Only the dataset's own folders are considered (`shards/`, `rejects/`, `ranges/`, `scans/`,
`versions/`), and in them only names quantlake writes: shard, rejects, ranges and kept scan
files named by their id, the manifests of versions past `--retain`, and leftover
temporaries of those. Anything else is reported and kept. A folder that holds no committed
version is refused: every file there would look unreferenced. A file goes only when no
retained version needs it and its shard (all files of the same id) was last modified more
than `--older-than` ago, so the fresh shards of a running ingest, and the shards a rerun
reuses (it rewrites their sidecar), are safe; a file whose store gives no modification time
is kept. Before each batch of deletions the versions are read again and the batch's files
looked at again, so a version committed or a shard reused meanwhile keeps its files.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import posixpath
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from jobs.common import add_storage_options, console, joined_negative, run_reporting, storage_options
from workers.lake.records import VersionManifest
from workers.lake.redact import redact_url
from workers.lake.storage import modified_at, on_local_disk, url_to_fs
from workers.lake.versions import list_versions, read_versions

log = logging.getLogger(__name__)

FOLDERS = ("shards", "rejects", "ranges", "scans", "versions")
# Shard ids: 32 hex digits (workers/shard_writer.shard_id), or the row-range names of datasets
# written from precomputed vectors (workers/ingest/from_vectors.py).
_SHARD_ID = r"[0-9a-f]{32}|vectors-[0-9]{12}-[0-9]{12}"
# The names quantlake writes, and their temporaries (`<name>.tmp-<uuid4 hex>`, workers/lake/storage.py).
_OURS = re.compile(
    rf"^(?:shards/(?P<shard>{_SHARD_ID})\.(?:parquet|faiss|json)"
    rf"|rejects/(?P<rejected>{_SHARD_ID})\.parquet"
    r"|ranges/(?P<ranges>[0-9a-f]{64})\.json"
    r"|scans/(?P<scan>[0-9a-f]{32})\.npy"
    r"|versions/(?P<version>(?!0{8})[0-9]{8})\.json)"  # 00000000 is no version (numbering starts at 1)
    r"(?P<tmp>\.tmp-[0-9a-f]{32})?$")
_DURATION = re.compile(r"^\s*(-?[0-9]+(?:\.[0-9]+)?)\s*([smhd]?)\s*$")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
# Files deleted between two looks at the versions and at the files' times: the window in which
# a commit can still land on files vacuum is deleting (docs/formats.md, "Vacuum").
BATCH_FILES = 32


def parse_duration(text: str) -> float:
    """Seconds in `30s`, `15m`, `1h`, `2d` or a bare number of seconds (negative with a `-`:
    `VacuumConfig` refuses it in words)."""
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
class References:
    """What the versions read so far need: paths, shard ids, and which versions were read."""

    paths: set[str] = field(default_factory=set)
    ids: set[str] = field(default_factory=set)
    read: set[int] = field(default_factory=set)

    def add(self, doc: VersionManifest) -> tuple[set[str], set[str]]:
        paths, ids = references(doc)
        self.paths |= paths
        self.ids |= ids
        self.read.add(doc.number)
        return paths, ids

    def needs(self, rel: str) -> bool:
        m = _OURS.match(rel)
        group = m and (m["shard"] or m["rejected"])
        # Any other file of a needed shard (e.g. its completion sidecar shards/<id>.json) stays
        # too, except leftover temporaries.
        return rel in self.paths or bool(group and group in self.ids and not m["tmp"])


@dataclass
class VacuumResult:
    retained: list[int]
    expired: list[int]
    deleted: list[tuple[str, int]]  # (path relative to the root, bytes): deleted, or would be
    young: list[str]  # unreferenced, but too recent (or of unknown age) to delete
    dry_run: bool
    foreign: list[str] = field(default_factory=list)  # not a name quantlake writes: never deleted
    linked: list[str] = field(default_factory=list)  # top folders that are symbolic links: not followed
    in_use: list[str] = field(default_factory=list)  # planned, but a version or job took it up meanwhile
    # Versions committed while vacuum ran that reference files it had deleted: (version, paths).
    damaged: list[tuple[int, list[str]]] = field(default_factory=list)
    refs: References = field(default_factory=References, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {"dry_run": self.dry_run, "retained_versions": self.retained, "expired_versions": self.expired,
                "deleted": [{"path": p, "bytes": b} for p, b in self.deleted],
                "bytes_deleted": sum(b for _, b in self.deleted), "kept_too_recent": self.young,
                "kept_foreign": self.foreign, "kept_linked": self.linked, "kept_in_use": self.in_use,
                "damaged_versions": [{"version": n, "missing": paths} for n, paths in self.damaged]}


def _listing(fs, root: str) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """`(files, linked)`: the files of the dataset's folders (`FOLDERS`), and those folders that
    are symbolic links (local disk), not listed: what one leads to may be another dataset's, or
    anything else, and content-named shards of another dataset look unreferenced here."""
    fs.invalidate_cache()
    found: dict[str, dict[str, Any]] = {}
    linked: list[str] = []
    local = on_local_disk(fs)
    for folder in FOLDERS:
        if local and os.path.islink(posixpath.join(root, folder)):
            linked.append(f"{folder}/")
            continue
        try:
            infos = fs.find(posixpath.join(root, folder), detail=True)
        except FileNotFoundError:
            continue
        for path, info in infos.items():
            if info.get("type", "file") == "file":
                found[posixpath.relpath(path, root)] = info
    return found, linked


def references(doc: VersionManifest) -> tuple[set[str], set[str]]:
    """`(paths, shard ids)` a version needs: its manifest, ranges, shard files, rejects and kept scans."""
    paths = {f"versions/{doc.number:08d}.json", doc.ranges.path} | {f.path for f in doc.files()}
    return paths, {s.id for s in doc.shards}


def group_of(rel: str) -> str:
    """The files judged together: a shard's files (`shards/<id>.*`, `rejects/<id>.*`, their
    temporaries), a range manifest or a kept scan and its temporaries, or a single file of `versions/`."""
    m = _OURS.match(rel)
    if m is None:
        return rel
    if m["shard"] or m["rejected"]:
        return "shard " + (m["shard"] or m["rejected"])
    if m["ranges"]:
        return "ranges " + m["ranges"]
    if m["scan"]:
        return "scan " + m["scan"]
    return rel


def _sidecar(group: str) -> str | None:
    return f"shards/{group[len('shard '):]}.json" if group.startswith("shard ") else None


def _refuse_empty(fs, root: str, dest: str) -> None:
    if not fs.exists(root):
        raise FileNotFoundError(f"{redact_url(dest)} does not exist: nothing to vacuum (check the path "
                                "and --storage-options)")
    raise ValueError(
        f"{redact_url(dest)} holds no committed version (no versions/<8 digits>.json): refusing to vacuum "
        "it, since every file there would look unreferenced. Check the path; if this is a dataset whose "
        "first ingest never committed, rerun that ingest (it reuses the shards already written)")


def _read_all(fs, root: str, refs: References, numbers: list[int]) -> list[tuple[int, set[str], set[str]]]:
    """Add versions `numbers` to `refs` (read a few at a time); an unreadable manifest stops the vacuum."""
    out = []
    for n, doc in read_versions(fs, root, numbers):
        if isinstance(doc, Exception):
            raise doc
        paths, ids = refs.add(doc)
        out.append((n, paths, ids))
    return out


def _read_new(fs, root: str, refs: References, skip: set[int]) -> list[tuple[int, set[str], set[str]]]:
    """Read the versions listed now that `refs` has not read (and are not in `skip`)."""
    return _read_all(fs, root, refs, [n for n in list_versions(fs, root) if n not in refs.read and n not in skip])


def plan(fs, root: str, cfg: VacuumConfig, now: float | None = None) -> VacuumResult:
    """What vacuum would delete; deletes nothing.

    The files are listed before the versions are read, so a version committed meanwhile is
    either read (and protects its files) or was committed after the listing (its files are
    then not in it, or are fresh); the versions are listed again at the end for the same reason.

    Raises:
        FileNotFoundError: `root` does not exist.
        ValueError: `root` holds no committed version.
    """
    now = time.time() if now is None else now
    files, linked = _listing(fs, root)
    versions = list_versions(fs, root)
    if not versions:
        _refuse_empty(fs, root, cfg.dest)
    retained = versions[-cfg.retain:] if cfg.retain else versions
    expired = [n for n in versions if n not in retained]
    refs = References()
    _read_all(fs, root, refs, retained)
    for _ in range(3):
        if not _read_new(fs, root, refs, set(expired)):
            break
    else:
        raise RuntimeError("versions kept being committed while vacuum read them; run it again")
    # A group's age is that of its newest file: a rerun that reuses a shard rewrites only its
    # sidecar, and that must keep the shard's older data files too.
    newest: dict[str, float | None] = {}
    for rel, info in files.items():
        g, t = group_of(rel), modified_at(info)
        if g in newest and newest[g] is None:
            continue  # a file of unknown age: the group is kept whatever the others say
        newest[g] = None if t is None else max(t, newest.get(g, t))
    candidates: dict[str, list[str]] = {}
    foreign = []
    for rel in sorted(files):
        m = _OURS.match(rel)
        if rel in refs.paths:
            continue
        if m is None:
            foreign.append(rel)
            continue
        if refs.needs(rel):
            continue
        if m["version"] and not m["tmp"] and int(m["version"]) not in expired:
            continue  # a version committed after the listing: not ours to judge
        candidates.setdefault(group_of(rel), []).append(rel)
    deleted, young = [], []
    for g, rels in candidates.items():
        for rel in rels:
            # A temporary is never reused, only written or abandoned: its own age decides.
            t = modified_at(files[rel]) if _OURS.match(rel)["tmp"] else newest[g]
            if t is None or now - t < cfg.older_than_s:
                young.append(rel)
            else:
                deleted.append((rel, int(files[rel].get("size") or 0)))
    deleted.sort(key=_deletion_order)
    return VacuumResult(retained, expired, deleted, sorted(young), cfg.dry_run, foreign, linked=linked, refs=refs)


def _deletion_order(d: tuple[str, int]) -> tuple:
    rel = d[0]
    # Expired manifests first: were the run cut short, no version would point at deleted files.
    # Then shard by shard, its sidecar first: a shard without its sidecar is no longer reused
    # by a rerun, which rewrites it instead.
    return (not rel.startswith("versions/"), group_of(rel), _sidecar(group_of(rel)) != rel, rel)


def _batches(deleted: list[tuple[str, int]]) -> list[list[tuple[str, int]]]:
    """`deleted` cut into batches of about BATCH_FILES files, never splitting a group."""
    out: list[list[tuple[str, int]]] = []
    last = None
    for d in deleted:
        g = group_of(d[0])
        if not out or (g != last and len(out[-1]) >= BATCH_FILES):
            out.append([])
        out[-1].append(d)
        last = g
    return out


def delete(fs, root: str, cfg: VacuumConfig, result: VacuumResult, now: Callable[[], float] = time.time,
           before_batch: Callable[[int], None] | None = None) -> VacuumResult:
    """Delete what `plan` chose, looking again before every batch; return what really went.

    Before each batch the versions are listed again (a version committed since the plan is
    read, and its files leave the plan) and each file of the batch, and its shard's sidecar,
    is looked at again (a group with a file newer than `--older-than`, e.g. the sidecar a
    rerun rewrote when it reused the shard, stays). After the last batch the versions are
    listed once more: a version committed meanwhile that references a deleted file is
    reported in `damaged`.

    Args:
        now: the clock the files' ages are measured against.
        before_batch: called with the batch number before each batch's checks (tests land a
            commit there).
    """
    refs, expired = result.refs, set(result.expired)
    done: list[tuple[str, int]] = []
    gone: set[str] = set()
    in_use: list[str] = []

    def look_again() -> None:
        for n, paths, _ in _read_new(fs, root, refs, expired):
            # Only files the version references count (a shard's leftover temporary or its
            # sidecar is none), and only those still missing: a job may have written one again
            # since (names derive from content, so with the same bytes).
            hit = gone & paths
            if hit:
                fs.invalidate_cache()
                hit = {p for p in hit if not fs.exists(posixpath.join(root, p))}
            if hit:
                result.damaged.append((n, sorted(hit)))

    for number, batch in enumerate(_batches(result.deleted)):
        if before_batch is not None:
            before_batch(number)
        look_again()
        fs.invalidate_cache()
        keep: set[str] = set()
        groups: dict[str, list[str]] = {}
        for rel, _ in batch:
            groups.setdefault(group_of(rel), []).append(rel)
        for g, rels in groups.items():
            sidecar = _sidecar(g)
            young = set()
            for rel in rels + ([sidecar] if sidecar and sidecar not in rels else []):
                try:
                    t = modified_at(fs.info(posixpath.join(root, rel)))
                except FileNotFoundError:
                    continue
                if t is None or now() - t < cfg.older_than_s:
                    young.add(rel)
            for rel in rels:
                tmp = _OURS.match(rel)["tmp"]
                if refs.needs(rel) or (rel in young if tmp else bool(young)):
                    keep.add(rel)
        for rel, size in batch:
            if rel in keep:
                in_use.append(rel)
                continue
            try:
                fs.rm_file(posixpath.join(root, rel))
            except FileNotFoundError:
                continue  # someone else deleted it meanwhile
            log.info("deleted %s", rel)
            done.append((rel, size))
            gone.add(rel)
    fs.invalidate_cache()
    look_again()
    result.deleted, result.in_use = done, in_use
    return result


def run(cfg: VacuumConfig, now: float | None = None) -> VacuumResult:
    fs, root = url_to_fs(cfg.dest, cfg.storage_options)
    result = plan(fs, root, cfg, now)
    if not cfg.dry_run:
        delete(fs, root, cfg, result, (lambda: now) if now is not None else time.time)
    return result


def format_result(dest: str, r: VacuumResult) -> str:
    verb = "would delete" if r.dry_run else "deleted"
    lines = [f"{verb} {rel} ({b} bytes)" for rel, b in r.deleted]
    lines += [f"kept {rel}: not a name quantlake writes" for rel in r.foreign]
    lines += [f"kept {rel}: a symbolic link, which vacuum does not follow" for rel in r.linked]
    lines += [f"kept {rel}: a version or a job took it up while vacuum ran" for rel in r.in_use]
    lines.append(f"vacuum {redact_url(dest)}: {verb} {len(r.deleted)} file(s), "
                 f"{sum(b for _, b in r.deleted)} bytes; retained version(s) "
                 f"{', '.join(map(str, r.retained)) or 'none'}"
                 + (f"; expired version(s) {', '.join(map(str, r.expired))}" if r.expired else "")
                 + (f"; kept {len(r.young)} unreferenced file(s) too recent to delete" if r.young else "")
                 + (f"; kept {len(r.foreign)} file(s) quantlake does not write" if r.foreign else "")
                 + (f"; kept {len(r.in_use)} file(s) taken up meanwhile" if r.in_use else ""))
    return "\n".join(lines)


def damage_report(dest: str, r: VacuumResult) -> str:
    """The error for versions committed during the vacuum that reference files it deleted."""
    parts = [f"version {n} references {', '.join(paths[:3])}" + (f" and {len(paths) - 3} more" if len(paths) > 3
                                                                  else "")
             for n, paths in r.damaged]
    return (f"quantlake vacuum: error: version(s) committed while vacuum ran on {redact_url(dest)} reference "
            f"files it had already deleted: {'; '.join(parts)}. Rerun the ingest that made each (same source "
            "and options, with --ranges set to its range manifest): shard names derive from their content, "
            "so it writes those files again with the same bytes and commits a complete version")


def parse_args(argv: list[str] | None = None) -> VacuumConfig:
    p = argparse.ArgumentParser(prog="quantlake vacuum", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dest", help="dataset URL or path")
    p.add_argument("--older-than", default="1h", help="delete only files older than this (default 1h)")
    p.add_argument("--retain", type=int, default=None, help="keep only the latest N versions (default: all)")
    p.add_argument("--dry-run", action="store_true", help="list what would be deleted; delete nothing")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    add_storage_options(p)
    a = p.parse_args(joined_negative(argv, "--older-than"))
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
    if result.damaged:
        print(damage_report(cfg.dest, result), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(console("vacuum", main))
