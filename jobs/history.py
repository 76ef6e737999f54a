"""`quantlake history`: a dataset's versions, each with its parent, what changed, rows and drift."""
from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

from jobs.common import (add_storage_options, console, format_fidelity, format_share, one_line, run_reporting,
                         storage_options)
from ranges.manifest import RangeManifest, check_fidelity
from workers.lake.records import VersionManifest
from workers.lake.redact import redact_url
from workers.lake.storage import join, url_to_fs
from workers.lake.versions import list_versions, read_version, read_versions


def changes(before: VersionManifest | None, after: VersionManifest) -> dict[str, Any]:
    """What `after` changed relative to `before` (None: an empty dataset): source files added,
    changed and removed (by identity), shards added and dropped, and whether ranges or model changed."""
    old = before.source.file_identities if before else {}
    new = after.source.file_identities
    shards_before = {s.id for s in before.shards} if before else set()
    shards_after = {s.id for s in after.shards}
    return {
        "files_added": sorted(set(new) - set(old)),
        "files_changed": sorted(f for f in set(new) & set(old) if new[f] != old[f]),
        "files_removed": sorted(set(old) - set(new)),
        "shards_added": len(shards_after - shards_before), "shards_dropped": len(shards_before - shards_after),
        "ranges_changed": before is not None and before.ranges.id != after.ranges.id,
        "model_changed": before is not None and before.model.fingerprint != after.model.fingerprint,
    }


def ranges_fidelity(fs, root: str, path: str) -> dict[str, Any] | None:
    """The fidelity estimate stored with the range manifest at `path` (None: not measured, or the
    manifest cannot be read: the history shows the versions anyway, and search says what is wrong)."""
    try:
        return RangeManifest.from_json(fs.cat_file(join(root, path)), where=path).fidelity
    except (OSError, ValueError):
        return None


def _version_number(v: Any) -> int | None:
    """A version's `rollback_of`, when it is a version number (like `drift`, a record no reader
    needs: anything else is left out, not printed as it is)."""
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 1 else None


def readable_drift(drift: Any) -> dict[str, Any] | None:
    """A version's `drift` record, when it is one: `rows` a count, the two shares finite numbers,
    `fidelity` an estimate or null (else null in what is returned). None otherwise: a manifest is
    input like any file, and a record no reader needs (damaged, or made up) must not stop the
    listing of every version (it raised AttributeError or KeyError)."""
    def share(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if not (isinstance(drift, dict) and isinstance(drift.get("rows"), int) and not isinstance(drift["rows"], bool)
            and drift["rows"] >= 0 and share(drift.get("clipped_share")) and share(drift.get("baseline_share"))):
        return None
    try:
        if drift.get("fidelity") is not None:
            check_fidelity(drift["fidelity"])
    except ValueError:
        drift = {**drift, "fidelity": None}
    return drift


def history(fs, root: str, last: int | None = None, listed: list[int] | None = None) -> list[dict[str, Any]]:
    """One entry per committed version, ascending (the `last` ones only, when given); an
    unreadable one says why. `listed`: `list_versions(fs, root)`, when the caller took it.

    The manifests are read a few at a time (`read_versions`) and each is dropped once the next
    version's changes are known: a version's parent is the version before it, so memory holds
    a few manifests however long the history (a version of 10,000 shards is ~16 MB parsed).
    A parent that is not the version read just before (the first one shown, or one after a
    gap) is read on its own.
    """
    listed = list_versions(fs, root) if listed is None else listed
    shown = listed[-last:] if last else listed
    out, fidelities = [], {}
    before: VersionManifest | None = None  # the last manifest read, the next one's parent as a rule
    for n, m in read_versions(fs, root, shown):
        if isinstance(m, Exception):
            out.append({"version": n, "unreadable": str(m)})
            before = None
            continue
        parent = before if before is not None and before.number == m.parent else None
        if parent is None and m.parent in listed and m.parent < n:
            try:
                parent = read_version(fs, root, m.parent)
            except (ValueError, FileNotFoundError):  # says so in its own entry, if shown
                parent = None
        entry = {"version": n, "parent": m.parent, "created_at": m.created_at, "writer": m.writer,
                 "documents": m.count("documents"), "rejects": m.count("rejects"), "shards": len(m.shards),
                 "ranges": m.ranges.id, "model": m.model.name, "precisions": list(m.precisions),
                 "rollback_of": _version_number(m.extra.get("rollback_of")),
                 "drift": readable_drift(m.extra.get("drift"))}
        if m.ranges.path not in fidelities:  # versions mostly share their ranges: read each once
            fidelities[m.ranges.path] = ranges_fidelity(fs, root, m.ranges.path)
        entry["fidelity"] = fidelities[m.ranges.path]
        if m.parent is None or parent is not None:
            entry["changes"] = changes(parent, m)
        out.append(entry)
        before = m
    return out


def report(dest: str, entries: list[dict[str, Any]], total: int | None = None) -> str:
    """The human-readable history; `total`: the versions committed, when `entries` shows the last few."""
    shown = "" if total in (None, len(entries)) else f", the last {len(entries)} shown"
    lines = [f"dataset {redact_url(dest)}: {total or len(entries)} committed version(s){shown}"]
    for e in entries:
        if "unreadable" in e:
            lines.append(f"  version {e['version']}: unreadable: {one_line(e['unreadable'])}")
            continue
        parent = f"on {e['parent']}" if e["parent"] else "first"
        counts = {k: "-" if e[k] is None else e[k] for k in ("documents", "rejects")}
        lines.append(f"  version {e['version']} ({parent}, {one_line(e['created_at'])}): {counts['documents']} "
                     f"documents, {counts['rejects']} rejects, {e['shards']} shards, ranges {e['ranges'][:12]}, "
                     f"model {one_line(e['model'])}")
        c = e.get("changes")
        if e["rollback_of"]:
            lines.append(f"    rollback to the content of version {e['rollback_of']}")
        if c:
            lines.append(f"    files +{len(c['files_added'])} ~{len(c['files_changed'])} -{len(c['files_removed'])}; "
                         f"shards +{c['shards_added']} -{c['shards_dropped']}"
                         + ("; new ranges" if c["ranges_changed"] else "")
                         + ("; new model" if c["model_changed"] else ""))
        if e.get("fidelity"):
            lines.append(f"    ranges' {format_fidelity(e['fidelity'], e.get('precisions'))}")
        d = e.get("drift")
        if d and d.get("rows"):
            lines.append(f"    drift: {format_share(d['clipped_share'])} of the new data's values clipped "
                         f"(calibration sample {format_share(d['baseline_share'])}) over {d['rows']} new rows"
                         + ("; new ranges calibrated for it" if d.get("recalibrated") is True else ""))
            if d.get("fidelity"):
                lines.append(f"    new rows' {format_fidelity(d['fidelity'], e.get('precisions'))}")
    return "\n".join(lines)


def run(dest: str, options: dict[str, Any], as_json: bool, last: int | None = None) -> str:
    fs, root = url_to_fs(dest, options)
    listed = list_versions(fs, root)
    entries = history(fs, root, last, listed)
    if not entries:
        raise FileNotFoundError(f"no committed version under {redact_url(dest)}")
    return json.dumps(entries, indent=1) if as_json else report(dest, entries, len(listed))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="quantlake history", description=__doc__)
    p.add_argument("dest", help="dataset URL or path")
    p.add_argument("--last", type=int, default=None, metavar="N",
                   help="only the last N versions (a dataset reindexed on a schedule has thousands)")
    p.add_argument("--json", action="store_true", help="print the history as JSON")
    add_storage_options(p)
    a = p.parse_args(argv)
    if a.last is not None and a.last < 1:
        p.error(f"--last must be >= 1, got {a.last}")
    options = storage_options(p, a)
    status, text = run_reporting("history", lambda: run(a.dest, options, a.json, a.last), options, [a.dest])
    if status == 0:
        print(text)
    return status


if __name__ == "__main__":
    sys.exit(console("history", main))
