"""`quantlake rollback`: commit a new version whose content equals an earlier version's.

Nothing is rewritten: the new version lists version N's shards and ranges, after checking
that every file it references is still there (vacuum may have deleted an old version's files),
and those of its kept scans that are still there.
Versions are never removed, so a rollback can itself be rolled back.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from jobs.common import add_storage_options, console, run_reporting, storage_options
from workers.lake.redact import redact_url
from workers.lake.storage import absolute_url, dest_to_fs
from workers.lake.versions import (CommitConflict, IncompleteVersion, check_referenced_files, commit, list_versions,
                                   read_version, same_content)


def run(dest: str, to: int, options: dict | None = None) -> tuple[int, bool]:
    """Commit the content of version `to` as the next version; return `(its number, True)`. When
    the latest version holds that content already (it is version `to`, or a rollback to it),
    commit nothing and return `(the latest version's number, False)`: a rollback run twice, or
    retried by a script, adds one version.

    Raises:
        FileNotFoundError: no such version.
        IncompleteVersion: a file version `to` references is gone (vacuumed).
        CommitConflict: another job committed other content meanwhile (rerun to roll back on top of
            it); the same content committed meanwhile returns `(its number, False)`.
    """
    dest = absolute_url(dest)
    fs, root = dest_to_fs(dest, options)
    latest = (list_versions(fs, root) or [None])[-1]
    if latest is None:
        raise FileNotFoundError(f"no committed version under {redact_url(dest)}")
    target = read_version(fs, root, to)
    if same_content(target, target if to == latest else read_version(fs, root, latest)):
        return latest, False
    # Kept scans are a cache for later jobs: one that is gone leaves the version whole.
    target = check_referenced_files(
        fs, root, target, f"version {to} can no longer be rolled back to, as files it lists were deleted since (by "
        "hand, or a storage lifecycle rule); `quantlake history` lists the versions to choose from")
    draft = replace(target, parent=latest, version=None, writer=None, created_at=None,
                    extra={**{k: v for k, v in target.extra.items() if k != "drift"}, "rollback_of": to})
    # No rebase: a version committed meanwhile is a newer state the user has not seen.
    try:
        return commit(fs, root, draft, rebase=None), True
    except CommitConflict as exc:
        if exc.version is not None and same_content(target, read_version(fs, root, exc.version)):
            return exc.version, False  # the same rollback (a retry, a second run) got there first
        raise CommitConflict(
            f"version {exc.version} was committed (writer {exc.writer}) while this rollback to version {to} was "
            "being committed: nothing was committed, as it would undo a state you have not seen; check "
            "`quantlake history`, then run the rollback again to roll back on top of it",
            exc.version, exc.writer) from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="quantlake rollback", description=__doc__)
    p.add_argument("dest", help="dataset URL or path")
    p.add_argument("--to", type=int, required=True, help="the version whose content the new version takes")
    add_storage_options(p)
    a = p.parse_args(argv)
    options = storage_options(p, a)
    status, done = run_reporting("rollback", lambda: run(a.dest, a.to, options), options, [a.dest],
                              failures=(IncompleteVersion, CommitConflict))
    if status == 0:
        n, committed = done
        print(f"committed version {n}: the content of version {a.to}" if committed else
              f"nothing committed: version {n}, the latest, already holds the content of version {a.to}"
              + ("" if n == a.to else " (it is a rollback to it, or holds the same shards)"))
    return status


if __name__ == "__main__":
    sys.exit(console("rollback", main))
