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
                                   read_version)


def run(dest: str, to: int, options: dict | None = None) -> int:
    """Commit the content of version `to` as the next version; return its number.

    Raises:
        FileNotFoundError: no such version.
        IncompleteVersion: a file version `to` references is gone (vacuumed).
        CommitConflict: another job committed meanwhile (rerun to roll back on top of it).
    """
    dest = absolute_url(dest)
    fs, root = dest_to_fs(dest, options)
    latest = (list_versions(fs, root) or [None])[-1]
    if latest is None:
        raise FileNotFoundError(f"no committed version under {redact_url(dest)}")
    # Kept scans are a cache for later jobs: one that is gone leaves the version whole.
    target = check_referenced_files(fs, root, read_version(fs, root, to))
    draft = replace(target, parent=latest, version=None, writer=None, created_at=None,
                    extra={**{k: v for k, v in target.extra.items() if k != "drift"}, "rollback_of": to})
    # No rebase: a version committed meanwhile is a newer state the user has not seen.
    return commit(fs, root, draft, rebase=None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="quantlake rollback", description=__doc__)
    p.add_argument("dest", help="dataset URL or path")
    p.add_argument("--to", type=int, required=True, help="the version whose content the new version takes")
    add_storage_options(p)
    a = p.parse_args(argv)
    options = storage_options(p, a)
    status, n = run_reporting("rollback", lambda: run(a.dest, a.to, options), options, [a.dest],
                              failures=(IncompleteVersion, CommitConflict))
    if status == 0:
        print(f"committed version {n}: the content of version {a.to}")
    return status


if __name__ == "__main__":
    sys.exit(console("rollback", main))
