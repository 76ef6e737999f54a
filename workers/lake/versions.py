"""Dataset versions: manifests under versions/, committed by create-only writes.

The commit protocol (docs/formats.md, "Committing a version"):

1. Every shard, index, rejects and ranges file is written first (content-named, so a
   rerun rewrites the same bytes); the manifest is the last write and the commit point.
2. The manifest is created as `versions/<latest + 1>.json` with a create-only write, so of
   two writers racing for a number exactly one creates it.
3. A create whose outcome is unknown (the response was lost, or the store's own retry saw
   "exists") is settled by reading the file back: it carries the committing job's random
   `writer` token, so our token there means our commit happened.
4. The loser re-reads the latest version and rebases (see `rebase_snapshot`) or raises
   CommitConflict naming the version that won, its writer, and what to do.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import posixpath
import re
import time
import uuid
from dataclasses import replace
from typing import Any, Callable, Iterable, Iterator, Mapping

from ranges.encoding import pretty_json
from workers.lake.records import MAX_VERSION, VersionManifest, validate
from workers.lake.storage import cat_uncached, create_only, join, ls_uncached, over_network, read_ahead, shown

log = logging.getLogger(__name__)

# ASCII digits only: `\d` also matches other scripts' digits, which `int` reads, so a name such as
# `versions/０００００００５.json` would list as version 5, whose file (`00000005.json`) is not there.
_NAME = re.compile(r"^([0-9]{8})\.json$")
_LONG_NAME = re.compile(r"^[0-9]{9,}\.json$")
# Attempts at one create whose failure leaves its outcome unknown.
CREATE_ATTEMPTS = 3
# Commits lost to other writers before giving up (each loss means another job committed).
MAX_REBASES = 8


class CommitConflict(RuntimeError):
    """Another writer committed first and this job's version cannot be rebased on it.

    Attributes:
        version: the number the other writer committed (None when unknown).
        writer: that version's writer token.
    """

    def __init__(self, message: str, version: int | None = None, writer: str | None = None):
        super().__init__(message)
        self.version = version
        self.writer = writer


class AlreadyCommitted(Exception):
    """Another writer committed, meanwhile, a version holding exactly this job's content.

    Two overlapping runs of a scheduled reindex that saw the same change build the same shards
    (content-named): the second commits nothing rather than a copy of the first's version.
    """

    def __init__(self, version: int, writer: str | None):
        super().__init__(f"version {version} (writer {writer}) already holds this job's content")
        self.version = version
        self.writer = writer


class EmptyVersion(ValueError):
    """A version file with no bytes: a crash or power loss hit before its content reached the disk.

    No job committed that version completely, and none can be numbered after it until a
    person removes the file (a job that skipped it on its own could race another doing the
    same, and the two would number their versions from different views of history).
    """

    def __init__(self, where: str, n: int):
        name = posixpath.join("versions", f"{n:08d}.json")
        super().__init__(
            f"{name} of {where} is empty (0 bytes): a crash or power loss hit before its "
            f"content reached the disk, so no job committed version {n} completely. When no job is "
            f"running on this dataset, delete {name} and rerun the job that was committing "
            "(its shards are in place and are reused)")
        self.version = n


def version_path(root: str, n: int) -> str:
    if not 1 <= n <= MAX_VERSION:
        raise ValueError(f"version {n} is outside 1..{MAX_VERSION}: version files have 8 digits")
    return posixpath.join(root, "versions", f"{n:08d}.json")


def list_versions(fs, root: str) -> list[int]:
    """Committed version numbers, ascending: only `versions/<8 digits>.json` names from 1 count.

    `00000000.json` is no version (numbering starts at 1), and a longer name cannot be one
    (see MAX_VERSION); both are ignored, the latter with a warning since it looks like one.
    """
    folder = posixpath.join(root, "versions")
    try:  # a cached listing would hide versions other writers made
        names = [posixpath.basename(p) for p in ls_uncached(fs, folder)]
    except FileNotFoundError:
        return []
    for name in filter(_LONG_NAME.match, names):
        log.warning("ignoring versions/%s under %s: version numbers have 8 digits, so it is no "
                    "committed version (someone put it there)", name, shown(fs, root))
    return sorted(n for n in (int(m.group(1)) for m in map(_NAME.match, names) if m) if n >= 1)


def read_version(fs, root: str, n: int | None = None) -> VersionManifest:
    """The manifest of version `n` (latest when None), validated."""
    if n is None:
        versions = list_versions(fs, root)
        if not versions:
            raise FileNotFoundError(f"no committed version under {shown(fs, root)}")
        n = versions[-1]
    if isinstance(n, bool) or not hasattr(n, "__index__"):
        raise TypeError(f"a version is a whole number (1, 2, ...), got {n!r}")
    n = n.__index__()
    if not 1 <= n <= MAX_VERSION:
        raise FileNotFoundError(f"version {n!r} of {shown(fs, root)} does not exist: version numbers "
                                f"run from 1 to {MAX_VERSION}")
    where = f"version {n} ({posixpath.join('versions', f'{n:08d}.json')})"
    try:
        raw = cat_uncached(fs, version_path(root, n))
    except FileNotFoundError:
        raise FileNotFoundError(f"version {n} of {shown(fs, root)} does not exist") from None
    except IsADirectoryError:
        raise ValueError(f"{where}: is a folder, not a manifest file (someone put it there)") from None
    if not raw:
        raise EmptyVersion(shown(fs, root), n)
    manifest = VersionManifest.from_json(raw, where)
    if manifest.version != n:
        raise ValueError(f"{where}: the file says it is version {manifest.version}; "
                         "a manifest must not be copied or renamed")
    return manifest


# Manifests `read_versions` reads ahead of its caller: enough to overlap object storage's round
# trips with parsing, few enough that a long history is never in memory at once (a version of
# 10,000 shards is ~7 MB of JSON and ~16 MB parsed; a reindex every 10 minutes commits 144 a day).
VERSIONS_READ_AHEAD = 4


def read_versions(fs, root: str, numbers: Iterable[int],
                  ahead: int = VERSIONS_READ_AHEAD) -> Iterator[tuple[int, VersionManifest | Exception]]:
    """`(n, manifest)` for each of `numbers`, in their order; a manifest that cannot be read
    (malformed, empty, vacuumed since it was listed) comes as its ValueError or FileNotFoundError,
    for the caller to report or raise. Other errors (storage unreachable) are raised.

    Over a network (`over_network`) up to `ahead` are read at a time in threads, so their round
    trips overlap; on local disk and memory:// one at a time in the caller's thread (parsing is
    the work there, and threads parsing side by side were slower: 17.4 s against 13.0 s for 30
    versions of 10,000 shards). Either way at most `ahead` manifests are held besides the caller's.
    """
    def read(n: int) -> VersionManifest | Exception:
        try:
            return read_version(fs, root, n)
        except (ValueError, FileNotFoundError) as exc:
            return exc

    if not over_network(fs):
        for n in numbers:
            yield n, read(n)
        return
    ahead = max(1, ahead)
    yield from read_ahead(read, numbers, ahead, ahead, "quantlake-versions")


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------------------------------------
# Rebase rule


def _definition(m: VersionManifest) -> dict[str, Any]:
    """What makes two versions versions of the same dataset (shards comparable, searchable together)."""
    return {"model": m.model.fingerprint, "dim": m.model.dim, "normalize": m.model.normalize,
            "ranges": m.ranges.id, "precisions": sorted(m.precisions), "source": m.source.url,
            "text_column": m.source.text_column, "id_column": m.source.id_column}


def same_content(a: VersionManifest, b: VersionManifest) -> bool:
    """Whether two versions hold the same dataset: the same definition and the same shards (ids
    name a shard's files, rows, model, ranges and options), in the same order."""
    return _definition(a) == _definition(b) and [s.id for s in a.shards] == [s.id for s in b.shards]


def rebase_snapshot(ours: VersionManifest, latest: VersionManifest,
                    parent: VersionManifest | None) -> VersionManifest:
    """Rebase a full-snapshot manifest built on `parent` onto `latest`, or raise CommitConflict.

    A full snapshot lists every shard of the dataset, so it does not depend on its parent's
    content and can be re-pointed at another parent when committing it there reverts
    nothing the other writer did. That holds when:
    - `latest` defines the same dataset: same model fingerprint, dim and normalisation,
      same ranges id, precisions, source URL and text/id columns (otherwise the other job
      recalibrated, changed model or wrote another source there on purpose); and
    - every source file `latest` changed relative to `parent` (added, modified, removed)
      has the same identity (size, version) in ours: this job saw that change too, so its
      snapshot is at least as new as the winner's for every file the winner touched; and
    - `latest` is no rollback, and was made with the shard options (`SHARD_OPTIONS`) of
      `parent` or of ours: a winner that changed shards without changing files (a rollback, a
      run with other options) would otherwise see its work undone by a job that started
      before it. With `parent` unknown, latest's options must be ours.

    Then the result is `ours` with `parent` set to `latest`'s number, to be committed at the
    next number. `parent` is None for a first commit (every file of `latest` then counts as
    changed) or when the parent manifest is gone.
    """
    a, b = _definition(ours), _definition(latest)
    differs = [k for k in a if a[k] != b[k]]
    if differs:
        raise _conflict(ours, latest, "it differs from this job's version in " + ", ".join(
            f"{k} ({b[k]!r} there, {a[k]!r} here)" for k in differs))
    before = parent.source.file_identities if parent else {}
    theirs = latest.source.file_identities
    mine = ours.source.file_identities
    touched = sorted(f for f in set(before) | set(theirs) if before.get(f) != theirs.get(f))
    clash = [f for f in touched if mine.get(f) != theirs.get(f)]
    if clash:
        shown = ", ".join(clash[:5]) + (f" and {len(clash) - 5} more" if len(clash) > 5 else "")
        raise _conflict(ours, latest, f"it saw source files this job saw differently: {shown}")
    undone = _undone(ours, latest, parent)
    if undone:
        raise _conflict(ours, latest, undone)
    log.info("version %s was committed by writer %s meanwhile; rebasing on it", latest.version, latest.writer)
    return replace(ours, parent=latest.version)


# The options a version records that shape its shards besides the definition
# (`jobs/ingest.ingest_options`): the same files give other shards when these differ.
SHARD_OPTIONS = ("unit_rows", "batch_size", "batch_order", "precision", "index_type", "exclude")


def _undone(ours: VersionManifest, latest: VersionManifest, parent: VersionManifest | None) -> str | None:
    """What `latest` did besides changing source files that rebasing `ours` on it would undo (a
    rollback; shards cut, encoded or indexed with other options), in words; None: nothing.

    The shards themselves are not compared: a shard's id also depends on other files' rows (an
    id a file shares with another is a duplicate in the later one), so a winner that added a file
    changes the shards of files it did not touch, and this job, seeing that file too, the same way.
    """
    if latest.extra.get("rollback_of") is not None:
        return (f"it rolled the dataset back to version {latest.extra['rollback_of']!r}'s content, which this "
                "job would undo")
    theirs, mine = ({k: m.option(k) for k in SHARD_OPTIONS} for m in (latest, ours))
    if theirs != mine and (parent is None or theirs != {k: parent.option(k) for k in SHARD_OPTIONS}):
        return "it was made with other options (" + ", ".join(
            f"{k} {theirs[k]!r} there, {mine[k]!r} here" for k in SHARD_OPTIONS if theirs[k] != mine[k]) + \
            "), which this job would undo"
    return None


def rebase_unless_same(ours: VersionManifest, latest: VersionManifest,
                       parent: VersionManifest | None) -> VersionManifest:
    """`rebase_snapshot`, except that a winner holding exactly our shards (same ids, so the same
    files, rows, model, ranges and options) under the same definition raises AlreadyCommitted:
    the change this job made is committed already. For reindexes, where an unchanged lake
    commits nothing either."""
    if same_content(ours, latest):
        raise AlreadyCommitted(latest.version, latest.writer)
    return rebase_snapshot(ours, latest, parent)


def _conflict(ours: VersionManifest, latest: VersionManifest, why: str) -> CommitConflict:
    n, writer = latest.version, latest.writer
    base = f"version {ours.parent}" if ours.parent else "an empty dataset"
    return CommitConflict(
        f"version {n} was committed by writer {writer} at {latest.created_at} while this job "
        f"(writer {ours.writer}) was building on {base}, and {why}. Nothing of this job was "
        f"committed (its shards are in place, and a rerun reuses the unchanged ones): check "
        f"`quantlake inspect` and rerun to build on version {n}, reusing its ranges with "
        f"--ranges <dest>/{latest.ranges.path} to keep the versions comparable",
        version=n, writer=writer)


# ---------------------------------------------------------------------------------------------
# Commit


Rebase = Callable[[VersionManifest, VersionManifest, "VersionManifest | None"], VersionManifest]


def _written_by(fs, path: str, token: str) -> bool:
    try:
        return json.loads(cat_uncached(fs, path)).get("writer") == token
    except ValueError:
        return False


def _is_empty(fs, root: str, n: int) -> bool:
    """Whether version `n` is there with no bytes (a version gone meanwhile is not empty).

    Asks for the size, not the bytes: a version of 10,000 shards is about 7 MB, which every
    commit would otherwise read back just to see that it is not empty.
    """
    path = version_path(root, n)
    fs.invalidate_cache(path)  # a cached size may predate the file's bytes
    try:
        return fs.info(path).get("size") == 0
    except FileNotFoundError:
        return False


def _create(fs, path: str, data: bytes, token: str, create) -> bool:
    """Create-only write of a manifest: True if ours is there now, False if another writer's is."""
    last: Exception | None = None
    for attempt in range(CREATE_ATTEMPTS):
        try:
            create(fs, path, data)
            return True
        except FileExistsError:
            # Ours when an earlier attempt (or the store client's own retry) did land.
            return _written_by(fs, path, token)
        except (PermissionError, ValueError, TypeError):
            raise
        except Exception as exc:  # noqa: BLE001 - the outcome is unknown: look before retrying
            last = exc
            log.warning("creating %s failed (%s); checking whether it landed", shown(fs, path),
                        type(exc).__name__)
            try:
                return _written_by(fs, path, token)
            except FileNotFoundError:
                time.sleep(0.2 * 2 ** attempt)
            except Exception:  # noqa: BLE001 - the store is still unreachable: retry the create
                time.sleep(0.2 * 2 ** attempt)
    assert last is not None
    raise last


def commit(fs, root: str, manifest: VersionManifest | Mapping[str, Any], *,
           rebase: Rebase | None = rebase_snapshot, create=create_only) -> int:
    """Commit `manifest` as the next version; return its number.

    Args:
        fs, root: the dataset's filesystem and root path.
        manifest: the version's content, a draft (`VersionManifest.build`; a dict is read as
            one with `VersionManifest.from_json(..., draft=True)`). `parent` is the version the
            job built on (None: an empty dataset); `writer` is the job's random token (one is
            made when absent).
        rebase: `(ours, latest, parent) -> ours'` when another writer committed since
            `parent`; raise CommitConflict to refuse. None refuses every such case.
        create: the create-only write (tests inject faults through it).

    Raises:
        CommitConflict: another writer won and the rule refused to rebase on its version.
        ValueError: the manifest is malformed, or the latest version is numbered MAX_VERSION
            (a planted file: there is no next number).
    """
    if not isinstance(manifest, VersionManifest):
        manifest = VersionManifest.from_json(manifest, "new version", draft=True)
    doc = replace(manifest, writer=manifest.writer or uuid.uuid4().hex)
    token = doc.writer
    parent_doc: VersionManifest | None = None
    for _ in range(MAX_REBASES + 1):
        versions = list_versions(fs, root)
        latest = versions[-1] if versions else None
        if latest is not None and _is_empty(fs, root, latest):
            raise EmptyVersion(shown(fs, root), latest)  # never number a version after one a crash left empty
        if latest != doc.parent:
            latest_doc = read_version(fs, root, latest)
            if latest_doc.writer == token:  # a commit of ours whose reply was lost
                return latest
            if rebase is None:
                raise _conflict(doc, latest_doc, "this commit was made without rebasing")
            if parent_doc is None and doc.parent:
                try:
                    parent_doc = read_version(fs, root, doc.parent)
                except FileNotFoundError:  # vacuumed: every file of latest counts as changed
                    parent_doc = None
            doc = replace(rebase(doc, latest_doc, parent_doc), parent=latest)
            parent_doc = latest_doc
        n = (latest or 0) + 1
        if n > MAX_VERSION:
            # 100000000.json would be a version no listing sees, and every later commit would
            # "lose the race" for it: refuse, naming the file that used the last number up.
            raise ValueError(
                f"cannot commit under {shown(fs, root)}: versions/{latest:08d}.json already uses the "
                f"last version number the 8-digit format allows ({MAX_VERSION}). Commits count up "
                "from 1, so that file was most likely put there by hand or by a tool: remove or "
                "rename it if it is not a real version; nothing was committed")
        body = replace(doc, version=n, parent=latest, writer=token, created_at=now())
        data = body.to_json()
        validate(data, "new version")  # what readers will check, before anyone reads it
        if _create(fs, version_path(root, n), pretty_json(data), token, create):
            return n
        log.info("another writer committed version %s under %s first; re-reading", n, shown(fs, root))
    raise CommitConflict(f"lost the race for a version number {MAX_REBASES + 1} times under "
                         f"{shown(fs, root)}: too many concurrent writers; rerun the job")


class IncompleteVersion(RuntimeError):
    """A file the new version would reference is missing or has another size: not committed."""


def check_referenced_files(fs, root: str, doc: VersionManifest,
                           remedy: str = "rerun the job to rewrite the shards concerned (a `quantlake vacuum` "
                                         "with an --older-than shorter than a job runs deletes its files meanwhile)"
                           ) -> VersionManifest:
    """Raise IncompleteVersion unless every file `doc` references exists with its recorded size
    (its message ends with `remedy`); return `doc` less the kept scans that are not there whole
    (missing, or of another size).

    The last check before the create-only write, so a version never points at a shard that
    a failed or interrupted write (or anyone else) left missing. One listing per folder
    rather than a request per file; the listing cache is dropped first, as it may predate
    the workers' writes. A kept scan only saves a later job from reading its source file
    again, so one that is gone (vacuumed after a job read it, deleted to save room) leaves
    the version whole: it is left out, and the next job reads that file.
    """
    wanted: dict[str, int | None] = {doc.ranges.path: None}
    wanted.update({f.path: f.bytes for s in doc.shards for f in s.files()})
    fs.invalidate_cache()
    present: dict[str, int] = {}
    for folder in sorted({p.split("/")[0] for p in wanted} | ({"scans"} if doc.scans else set())):
        try:
            present.update({p: int(info.get("size") or 0) for p, info in
                            fs.find(join(root, folder), detail=True).items()})
        except FileNotFoundError:
            pass
    problems = []
    for path, size in wanted.items():
        found = present.get(join(root, path))
        if found is None:
            problems.append(f"{path} is missing")
        elif size is not None and found != size:
            problems.append(f"{path} has {found} bytes, its record says {size}")
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise IncompleteVersion(f"refusing to commit a version of {shown(fs, root)}: {'; '.join(problems[:5])}{more}. "
                                f"Nothing was committed; {remedy}")
    if not doc.scans:
        return doc
    kept = tuple(r for r in doc.scans if present.get(join(root, r.path)) == r.bytes)
    if len(kept) < len(doc.scans):
        log.info("%d kept scan(s) of version %s are gone: the new version lists the %d left",
                 len(doc.scans) - len(kept), doc.version, len(kept))
    return replace(doc, scans=kept)
