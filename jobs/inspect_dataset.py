"""`quantlake inspect`: a dataset's committed versions, shards, rows and bytes per precision."""
from __future__ import annotations

import argparse
import json
import sys
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

from jobs.common import add_storage_options, console, one_line, run_reporting, storage_options
from workers.lake.records import ShardSource, VersionManifest
from workers.lake.redact import redact_url
from workers.lake.storage import url_to_fs
from workers.lake.versions import list_versions, read_version, read_versions


@dataclass(frozen=True)
class InspectConfig:
    """Args:
        dest: the dataset root (fsspec URL or path).
        version: the version to detail (None: the latest committed one).
        as_json: print that version's manifest as JSON instead of the report.
        storage_options: fsspec options (endpoint, credentials).
        last: list only the last `last` versions in the table (None: all); each listed one's
            manifest is read, which a dataset reindexed on a schedule has thousands of.
    """

    dest: str
    version: int | None = None
    as_json: bool = False
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)
    last: int | None = None

    def __post_init__(self):
        for name in ("version", "last"):
            if (value := getattr(self, name)) is not None and value < 1:
                raise ValueError(f"--{name} must be >= 1, got {value}")


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def report(dest: str, versions: list[int], history: Iterable[tuple[int, VersionManifest | str]],
           doc: VersionManifest, shown: int | None = None) -> str:
    """The human-readable report: one line per version, then the chosen version in detail.

    Args:
        versions: the committed versions' numbers, ascending.
        history: `(number, manifest)` of each of them (the last `shown` of them, when given), in
            that order; instead of the manifest, why it could not be read (one bad manifest hides
            neither the others nor the version asked for). Taken one at a time: each manifest
            can go once its line is written.
        doc: the version to detail (validated).
    """
    some = "" if shown in (None, len(versions)) else f", the last {shown} shown"
    lines = [f"dataset {redact_url(dest)}: {len(versions)} committed version(s){some}",
             f"  {'version':>7}  {'created_at':<20}  {'writer':<8}  {'parent':>6}  {'shards':>6}  "
             f"{'documents':>9}  {'rejects':>7}  {'ranges':<12}  model"]
    for n, h in history:
        if isinstance(h, str):
            lines.append(f"  {n:>7}  unreadable: {one_line(h)}")
            continue
        c = h.counts or {}
        lines.append(f"  {h.number:>7}  {one_line(h.created_at or ''):<20}  {one_line(h.writer[:8]):<8}  "
                     f"{h.parent if h.parent is not None else '-':>6}  {len(h.shards):>6}  "
                     f"{c.get('documents', '-'):>9}  {c.get('rejects', '-'):>7}  {h.ranges.id[:12]:<12}  "
                     f"{one_line(h.model.name)}")
    latest = versions[-1]
    model, ranges, counts, b = doc.model, doc.ranges, doc.counts or {}, doc.bytes or {}
    exclude = doc.option("exclude")
    if not (isinstance(exclude, list) and all(isinstance(g, str) for g in exclude)):
        exclude = None  # not what an ingest records: a reindex of this version refuses it, naming it
    lines += [
        f"version {doc.number}{' (latest)' if doc.number == latest else ''}, "
        f"committed {one_line(doc.created_at)} by writer {one_line(doc.writer)}",
        f"  model      {one_line(model.name)} ({model.fingerprint}), dim {model.dim}, normalize {model.normalize}, "
        f"backend {one_line(str(model.backend))}",
        f"  ranges     {ranges.id} ({one_line(ranges.method or 'minmax')}), {ranges.path}",
        f"  source     {one_line(redact_url(doc.source.url))}: {len(doc.source.file_identities)} file(s)"
        + ("" if doc.scans is None else
           f", {len(doc.scans)} kept scan(s) of {_size(sum(r.bytes for r in doc.scans))} (scans/)")
        + ("; excluding " + " ".join(map(one_line, exclude)) if exclude else ""),
        f"  rows       {counts.get('documents', '-')} documents, {counts.get('rejects', '-')} rejects, "
        f"{counts.get('rows_read', '-')} rows read",
        "  bytes      " + ", ".join(f"{p} {_size(b.get(p))}" for p in ["float32", *doc.precisions])
        + f"; stored {_size(b.get('stored'))} (Parquet and indexes)",
        f"  shards     {len(doc.shards)}:",
    ]
    for s in doc.shards:
        src = s.source or ShardSource(None, None, None)
        lines.append(f"    {s.path}  {s.rows:>7} rows  {_size(s.bytes):>10}  index {_size(s.index_bytes):>10}"
                     f"  {s.rejected:>4} rejects  {one_line(str(src.file))} [{src.row_start}, {src.row_stop})")
    return "\n".join(lines)


def run(cfg: InspectConfig) -> str:
    """The report (or JSON) for `cfg.dest`; only committed versions are read."""
    fs, root = url_to_fs(cfg.dest, cfg.storage_options)
    versions = list_versions(fs, root)
    if not versions:
        raise FileNotFoundError(f"no committed version under {redact_url(cfg.dest)}")
    if cfg.version is not None and cfg.version not in versions:
        raise FileNotFoundError(f"version {cfg.version} of {redact_url(cfg.dest)} does not exist; "
                                f"committed versions: {', '.join(map(str, versions))}")
    wanted = cfg.version or versions[-1]
    doc = read_version(fs, root, wanted)  # the version shown must be sound: its errors stop the command
    if cfg.as_json:
        return json.dumps(doc.to_json(), indent=1, sort_keys=True)
    table = versions[-cfg.last:] if cfg.last else versions
    return report(cfg.dest, versions, _history(fs, root, table, doc), doc, len(table))


def _history(fs, root: str, versions: list[int], doc: VersionManifest) -> Iterator[tuple[int, VersionManifest | str]]:
    """The manifest of each of `versions` for the history table (`doc` for its own number, not
    read again), or why it cannot be read (malformed, or vacuumed since the listing); read a few
    at a time."""
    with closing(read_versions(fs, root, [n for n in versions if n != doc.number])) as others:
        for n in versions:
            if n == doc.number:
                yield n, doc
                continue
            _, m = next(others)
            yield n, str(m) if isinstance(m, Exception) else m


def parse_args(argv: list[str] | None = None) -> InspectConfig:
    p = argparse.ArgumentParser(prog="quantlake inspect", description=__doc__)
    p.add_argument("dest", help="dataset URL or path")
    p.add_argument("--version", type=int, default=None, help="version to show (default: the latest)")
    p.add_argument("--last", type=int, default=None, metavar="N",
                   help="list only the last N versions (each listed version's manifest is read)")
    p.add_argument("--json", action="store_true", help="print the version's manifest as JSON")
    add_storage_options(p)
    a = p.parse_args(argv)
    options = storage_options(p, a)
    try:
        return InspectConfig(a.dest, a.version, a.json, options, a.last)
    except ValueError as exc:
        p.error(str(exc))


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    status, text = run_reporting("inspect", lambda: run(cfg), cfg.storage_options, [cfg.dest])
    if status == 0:
        print(text)
    return status


if __name__ == "__main__":
    sys.exit(console("inspect", main))
