"""The per-work-unit steps run as Ray tasks: scan a file, read a unit, quantize and write it.

Each takes the job config and builds its filesystem from URL and options inside the
worker, so no filesystem object (which may carry credentials) is pickled into a task; the
config they get is `IngestConfig.for_workers`'s copy, whose options stay in the object store.
"""
from __future__ import annotations

import contextlib
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa

from ranges.encoding import sha256_hex
from ranges.manifest import RangeManifest
from workers.ingest.config import IngestConfig
from workers.ingest.scan import (SAMPLE_CAP, FileScan, from_kept, id_digests, kept_bytes, sample_keys, scan_path,
                                 scan_rows)
from workers.ingest.shard_builder import completed_shard, float16_rows, write_shard, write_sidecar
from workers.ingest.source import Mark, SourceError, classify, iter_batches, source_root, unchanged
from workers.lake.records import ScanRef, ShardRecord, SourceFile, WorkUnit
from workers.lake.storage import cat_uncached, join, over_network, put_bytes
from workers.ray_session import node_id

log = logging.getLogger(__name__)

# A scan task reads this many files of its group at once when the source or the dataset (its
# kept scans) is reached over a network: a small file there costs a few requests (a HEAD, then
# the Parquet footer and the columns), each a round trip that reading the files one after
# another would wait for in turn. Files in this machine's memory or disks are read one at a time.
SCAN_FILES_AT_ONCE = 8


class UnitFailed(RuntimeError):
    """A work unit failed for good; the message names its source file and row range."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message  # as raised, whatever a wrapper adds to `args`


@contextlib.contextmanager
def unit_step(unit: WorkUnit, step: str):
    """Re-raise a failure of `step` as UnitFailed naming the unit, so the job's error says where."""
    try:
        yield
    except UnitFailed:
        raise
    except Exception as exc:
        raise UnitFailed(f"{unit.describe()}: {step} failed: {type(exc).__name__}: {exc}") from exc


@dataclass(frozen=True)
class UnitRows:
    """What the read step hands on for one work unit.

    One of three: the rows to encode (`texts`, with their `ids` and source `rows`) and the
    rejected ones; or, when an earlier run wrote the unit's shard and it still verifies, that
    shard's record as `reused`; or, when a shard of the same unit under other ranges kept its
    float16 embeddings, those (`half`, float16 bytes, with `ids`, `rows` and `rejects`) to be
    requantized (`requantized`). The last two have nothing to encode (the encoder passes the
    unit through).
    """

    unit: WorkUnit
    ids: tuple[str, ...] = ()
    rows: tuple[int, ...] = ()
    texts: tuple[str, ...] = ()
    rejects: tuple[dict[str, Any], ...] = ()
    reused: ShardRecord | None = None
    half: bytes = b""
    requantized: bool = False

    def to_row(self) -> dict[str, Any]:
        """The row the read step hands on: one field per attribute, JSON strings and bytes."""
        return {"unit": self.unit.to_json(), "ids": json.dumps(self.ids),
                "rows": np.asarray(self.rows, np.int64).tobytes(), "texts": json.dumps(self.texts),
                "rejects": json.dumps(self.rejects),
                "reused": json.dumps(None if self.reused is None else self.reused.to_json()),
                "half": self.half, "requantized": self.requantized}

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "UnitRows":
        """The record of a row `to_row` made (the encoder may have taken `texts` out of it)."""
        reused = json.loads(row["reused"])
        return cls(WorkUnit.from_json(row["unit"]), tuple(json.loads(row["ids"])),
                   tuple(np.frombuffer(row["rows"], np.int64).tolist()),
                   tuple(json.loads(row["texts"])) if "texts" in row else (),
                   tuple(json.loads(row["rejects"])),
                   None if reused is None else ShardRecord.from_json(reused),
                   bytes(row.get("half") or b""), bool(row.get("requantized", False)))


def _columns(cfg: IngestConfig) -> list[str]:
    return [cfg.text_column] + ([cfg.id_column] if cfg.id_column else [])


def scan_file(cfg: IngestConfig, file_index: int, f: SourceFile, n_parts: int,
              kept: ScanRef | None = None, keep: bool = False) -> tuple:
    """Rows, id digests (split into `n_parts` hash partitions) and a local sample of one file.

    Args:
        kept: the file's kept scan an earlier version recorded (its id matches the file's
            identity and columns): read instead of the file when it verifies and no sample
            is needed (the job has ranges). When it is missing or damaged, the file is read
            as if there were none, and the summary's `problem` says why.
        keep: write the file's kept scan when it was read from the source (not in a dry run).

    Returns `(summary, part_0, ..., part_{n-1})` so each partition is its own Ray object; the
    summary's `scan` is the kept scan's record (None unless `keep` or reused), `reused`
    says whether the source file was read, and `marks` where its units may start reading an
    uncompressed JSON Lines file (`Mark`s past its first segment; none otherwise): the read's,
    or the kept scan's when it stands in (none in a record written before marks were kept).
    """
    k = 0 if cfg.ranges else cfg.calibration_samples or SAMPLE_CAP
    dest = cfg.url_to_fs(cfg.dest) if keep or kept is not None else None
    verified, problem = None, None
    if kept is not None:
        try:
            verified = _kept_scan(dest[0], dest[1], kept, file_index, n_parts)
        except (OSError, ValueError) as exc:
            problem = f"kept scan {kept.path} of {f.relpath} cannot be used ({exc}): the file was read"
    if verified is not None and k == 0:
        marks = [Mark(*m) for m in kept.marks or ()]
        if any(len(m.types) != len(_columns(cfg)) for m in marks):
            marks = []  # not of these columns (its name says they are: a record made up): none
        return ({"rows": verified.rows, "valid": verified.valid, "sample": verified.sample, "scan": kept,
                 "reused": True, "problem": None, "marks": marks}, *verified.parts)
    fs, root = cfg.url_to_fs(cfg.source)
    root = source_root(fs, root, f)
    marks: list[Mark] = []  # where a large JSON Lines file's units start reading
    batches = (classify(f, first, b, cfg.text_column, cfg.id_column)
               for first, b in iter_batches(fs, root, f, _columns(cfg), text_column=cfg.text_column, marks=marks))
    try:
        with unchanged(fs, root, f):
            s: FileScan = scan_rows(batches, file_index, n_parts, cfg.seed, k)
    except (pa.ArrowInvalid, OSError) as exc:
        # Bytes Arrow cannot decode (a corrupt Parquet page: a plain OSError); not the store's
        # own errors (a file gone, a connection lost), which are OSError's subclasses.
        if isinstance(exc, OSError) and type(exc) is not OSError:
            raise
        raise SourceError(f"cannot read {f.format} file {f.relpath}: {exc}") from exc
    # A job that calibrates reads the file for its sample, and keeps a kept scan that checked out.
    # Its record takes the marks this read found (one written before marks were kept has none).
    found = tuple(marks) or None
    ref = replace(kept, marks=found) if verified is not None and (s.rows, s.valid) == (kept.rows, kept.valid) \
        else None
    if keep and ref is None:
        data = kept_bytes(s)
        path = scan_path(f, cfg.text_column, cfg.id_column)
        # Same name, same bytes for the same file: a retry or a rerun rewrites it unchanged.
        put_bytes(dest[0], join(dest[1], path), data)
        ref = ScanRef(f.relpath, path, sha256_hex(data), len(data), s.rows, s.valid, marks=found)
    return ({"rows": s.rows, "valid": s.valid, "sample": s.sample, "scan": ref, "reused": False,
             "problem": problem, "marks": marks}, *s.parts)


def scan_files(cfg: IngestConfig, group: list[tuple[int, SourceFile, ScanRef | None]], n_parts: int,
               keep: bool = False) -> tuple:
    """`scan_file` over a group of files in one task: `(summary, part_0, ..., part_{n-1})`.

    `group` holds `(file_index, file, kept)` per file, in listing order. Each part is the
    files' entries of that hash partition, concatenated (every entry names its file); the
    summary's `files` holds each file's summary less its sample, and its `sample` the files'
    samples merged (the bottom-k of the union: what the driver would merge them to). One task
    and `n_parts + 1` objects per group instead of per file: a lake of many small files pays
    Ray's per-task cost per group (`pipeline.scan_groups`). Over a network, SCAN_FILES_AT_ONCE
    files are read at a time; the result is the same, in listing order.
    """
    summaries, parts, sample = [], [[] for _ in range(n_parts)], None
    for summary, *file_parts in _scanned(cfg, group, n_parts, keep):
        file_sample = summary.pop("sample")
        sample = file_sample if sample is None else sample.merge(file_sample)
        summaries.append(summary)
        for p, entries in enumerate(file_parts):
            parts[p].append(entries)
    return ({"files": summaries, "sample": sample}, *(np.concatenate(p) for p in parts))


def _scanned(cfg: IngestConfig, group: list[tuple[int, SourceFile, ScanRef | None]], n_parts: int,
             keep: bool):
    """`scan_file` of each file of `group`, in its order: the files read SCAN_FILES_AT_ONCE at a
    time (threads) when the source or the dataset is reached over a network, else one after
    another. A failure is raised at its file, as one after another would raise it, and the reads
    not yet started are dropped (files after it may have been read by then: their kept scans,
    same bytes for the same file, are unreferenced)."""
    def one(entry):
        return scan_file(cfg, entry[0], entry[1], n_parts, entry[2], keep)

    if len(group) < 2 or not any(over_network(cfg.url_to_fs(url)[0]) for url in (cfg.source, cfg.dest)):
        yield from map(one, group)
        return
    with ThreadPoolExecutor(min(SCAN_FILES_AT_ONCE, len(group)), thread_name_prefix="quantlake-scan") as pool:
        yield from pool.map(one, group)  # in order; closing it cancels the calls not yet started


def _kept_scan(fs, root: str, ref: ScanRef, file_index: int, n_parts: int) -> FileScan:
    """The scan a kept scan stands for; OSError or ValueError when it is missing or does not check out."""
    data = cat_uncached(fs, join(root, ref.path))
    if len(data) != ref.bytes:
        raise ValueError(f"{len(data)} bytes, its record says {ref.bytes}")
    if sha256_hex(data) != ref.sha256:
        raise ValueError("its sha256 is not the one its record gives")
    return from_kept(data, ref.rows, ref.valid, file_index, n_parts)


def read_unit(item: dict[str, Any], cfg: IngestConfig) -> dict[str, Any]:
    """Read a work unit (`{"unit": WorkUnit.to_json(), "requantize": ...}`): a `UnitRows` row.

    A unit whose shard an earlier run wrote and that still verifies is not read again: its
    record travels on as `reused`, and its sidecar is written again to mark the shard as in
    use for vacuum. A unit with a `requantize` shard (the JSON record of the same unit's shard
    under other ranges, with a float16 column) gets that shard's float16 embeddings instead of
    its texts; when that shard cannot serve (a file missing or altered), the unit is read and
    encoded as usual.
    `read_node` says where it ran.
    """
    return {**_read_unit(item, cfg), "read_node": node_id()}


def _read_unit(item: dict[str, Any], cfg: IngestConfig) -> dict[str, Any]:
    unit = WorkUnit.from_json(item["unit"])
    with unit_step(unit, "read"):
        fs, root = cfg.url_to_fs(cfg.dest)
        done = completed_shard(fs, root, unit.shard_id, unit.source)
        if done is not None:
            # Rewrite the sidecar (same bytes): a reused shard keeps its old files, and vacuum
            # judges a shard by the newest of its files, so this keeps a vacuum that runs now
            # (or that listed the files earlier and checks again before deleting) off it.
            write_sidecar(fs, root, done)
            return UnitRows(unit, reused=done).to_row()
        if item.get("requantize"):
            old = ShardRecord.from_json(json.loads(item["requantize"]))
            kept = float16_rows(fs, root, old, unit.source)
            if not isinstance(kept, str):
                ids, rows, half, rejects = kept
                return UnitRows(unit, tuple(ids), tuple(rows.tolist()), rejects=tuple(rejects),
                                half=np.ascontiguousarray(half).tobytes(), requantized=True).to_row()
            log.warning("%s: shard %s %s; encoding the unit instead of requantizing it",
                        unit.describe(), old.id, kept)
        return _read(unit, cfg).to_row()


def _read(unit: WorkUnit, cfg: IngestConfig) -> UnitRows:
    f = unit.file
    dups = {d.row: d for d in unit.duplicates}
    fs, root = cfg.url_to_fs(cfg.source)
    root = source_root(fs, root, f)
    ids, rows, texts, rejects = [], [], [], []
    with unchanged(fs, root, f):
        for first, batch in iter_batches(fs, root, f, _columns(cfg), unit.row_start, unit.row_stop,
                                         text_column=cfg.text_column,
                                         start=Mark(*unit.start) if unit.start else None):
            b = classify(f, first, batch, cfg.text_column, cfg.id_column)
            for i, row in enumerate(b.row.tolist()):
                reason, detail = b.reason[i], ""
                if reason is None and row in dups:
                    reason, detail = "duplicate_id", dups[row].detail()
                if reason is None:
                    ids.append(b.ids[i])
                    rows.append(row)
                    texts.append(b.texts[i])
                else:
                    rejects.append({"id": b.ids[i], "source_file": f.relpath, "source_row": row,
                                    "reason": reason, "detail": detail or reason.replace("_", " ")})
    return UnitRows(unit, tuple(ids), tuple(rows), tuple(texts), tuple(rejects))


_RANGES: dict[tuple[str, str, str], RangeManifest] = {}


def _ranges(cfg: IngestConfig, path: str, ranges_id: str) -> RangeManifest:
    # Quantizers read the range manifest from storage, as the reducer wrote it. Cached per
    # process by content id: a manifest whose content hash matched once is that content.
    key = (cfg.dest, path, ranges_id)
    if key not in _RANGES:
        fs, root = cfg.url_to_fs(cfg.dest)
        manifest = RangeManifest.from_json(fs.cat_file(join(root, path)), where=path)
        if manifest.id != ranges_id:
            raise ValueError(f"range manifest {path} has id {manifest.id}, expected {ranges_id}")
        _RANGES[key] = manifest
    return _RANGES[key]


def write_unit(row: dict[str, Any], cfg: IngestConfig, ranges_path: str, ranges_id: str,
               probe_below: int = 0) -> dict[str, Any]:
    """Quantize an encoded (or requantized) unit's embeddings, write its shard, then its sidecar
    (the mark of a complete shard); return the shard record as JSON, whether an earlier run had
    written it, whether it came from float16 embeddings rather than the encoder, and the nodes
    each step ran on (`nodes`: read, encode, write; JSON).

    With `probe_below`, also the float32 embeddings of the encoded rows whose sample key
    (`sample_keys` of the id with `cfg.seed`) lies below it, with their keys and ids (`probe`,
    `probe_keys`, `probe_ids`): the driver's sample of the newly encoded rows for the fidelity
    re-measure. A function of the ids alone, so the same rows whatever the units; a reused or
    requantized shard gives none.
    """
    unit = UnitRows.from_row(row)
    nodes = json.dumps({"read": row.get("read_node"), "encode": row.get("encode_node"), "write": node_id()})
    none = {"probe": b"", "probe_keys": b"", "probe_ids": "[]", "nodes": nodes}
    if unit.reused is not None:
        return {"record": json.dumps(unit.reused.to_json()), "reused": True, "requantized": False, **none}
    with unit_step(unit.unit, "write"):
        record = _write(unit, row, cfg, ranges_path, ranges_id)
    out = {"record": json.dumps(record.to_json()), "reused": False, "requantized": unit.requantized, **none}
    if probe_below and unit.ids and not unit.requantized:
        keys = sample_keys(id_digests(list(unit.ids)), cfg.seed)
        at = np.flatnonzero(keys < np.uint64(probe_below))
        emb = np.frombuffer(row["embeddings"], dtype=np.float32).reshape(len(unit.ids), -1)
        out.update(probe=emb[at].tobytes(), probe_keys=keys[at].tobytes(),
                   probe_ids=json.dumps([unit.ids[i] for i in at]))
    return out


def _write(unit: UnitRows, row: dict[str, Any], cfg: IngestConfig, ranges_path: str, ranges_id: str) -> ShardRecord:
    manifest = _ranges(cfg, ranges_path, ranges_id)
    dim = manifest.dim if row["dim"] is None else int(row["dim"])  # None: nothing was encoded
    if dim != manifest.dim:
        raise ValueError(f"the model gives {dim}-dimensional embeddings but the ranges are for {manifest.dim}")
    fs, root = cfg.url_to_fs(cfg.dest)
    if unit.requantized:  # float16 values, exact in float32: write_shard rounds them to themselves
        emb = np.frombuffer(unit.half, dtype=np.float16).reshape(-1, dim).astype(np.float32)
    else:
        emb = np.frombuffer(row["embeddings"], dtype=np.float32).reshape(-1, dim)
    record = write_shard(fs, root, unit.unit.shard_id, unit.unit.source, list(unit.ids),
                         np.asarray(unit.rows, np.int64), emb, manifest.ranges, cfg.precisions,
                         list(unit.rejects), cfg.index_type)
    record = record.with_stats(encode_s=round(float(row["encode_s"]), 6))
    write_sidecar(fs, root, record)
    return record
