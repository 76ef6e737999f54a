"""The per-work-unit steps run as Ray tasks: scan a file, read a unit, quantize and write it.

Each takes the job config and builds its filesystem from URL and options inside the
worker, so no filesystem object (which may carry credentials) is pickled into a task; the
config they get is `IngestConfig.for_workers`'s copy, whose options stay in the object store.
"""
from __future__ import annotations

import json
from typing import Any

import numpy as np

from ranges.manifest import RangeManifest
from workers.config import IngestConfig
from workers.scan import FileScan, scan_rows
from workers.shard_writer import ShardPlan, write_shard
from workers.source import SourceFile, classify, iter_batches
from workers.storage import join


def _columns(cfg: IngestConfig) -> list[str]:
    return [cfg.text_column] + ([cfg.id_column] if cfg.id_column else [])


def scan_file(cfg: IngestConfig, file_index: int, f: SourceFile, n_parts: int) -> tuple:
    """Rows, id digests (split into `n_parts` hash partitions) and a local sample of one file.

    Returns `(summary, part_0, ..., part_{n-1})` so each partition is its own Ray object.
    """
    fs, root = cfg.url_to_fs(cfg.source)
    batches = (classify(f, first, b, cfg.text_column, cfg.id_column)
               for first, b in iter_batches(fs, root, f, _columns(cfg)))
    k = 0 if cfg.ranges else cfg.calibration_samples
    s: FileScan = scan_rows(batches, file_index, n_parts, cfg.seed, k)
    return ({"rows": s.rows, "valid": s.valid, "sample": s.sample}, *s.parts)


def read_unit(item: dict[str, Any], cfg: IngestConfig) -> dict[str, Any]:
    """Read a work unit: accepted texts to encode, the rest as rejects with their reason."""
    unit = json.loads(item["unit"])
    f = SourceFile(**unit["file"])
    dups = {int(r): (ff, int(fr)) for r, ff, fr in unit["duplicates"]}
    fs, root = cfg.url_to_fs(cfg.source)
    ids, rows, texts, rejects = [], [], [], []
    for first, batch in iter_batches(fs, root, f, _columns(cfg), unit["row_start"], unit["row_stop"]):
        b = classify(f, first, batch, cfg.text_column, cfg.id_column)
        for i, row in enumerate(b.row.tolist()):
            reason, detail = b.reason[i], ""
            if reason is None and row in dups:
                reason = "duplicate_id"
                detail = "same id as row {1} of {0}".format(*dups[row])
            if reason is None:
                ids.append(b.ids[i])
                rows.append(row)
                texts.append(b.texts[i])
            else:
                rejects.append({"id": b.ids[i], "source_file": f.relpath, "source_row": row,
                                "reason": reason, "detail": detail or reason.replace("_", " ")})
    return {"unit": item["unit"], "ids": json.dumps(ids), "rows": np.asarray(rows, np.int64).tobytes(),
            "texts": json.dumps(texts), "rejects": json.dumps(rejects)}


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


def write_unit(row: dict[str, Any], cfg: IngestConfig, ranges_path: str, ranges_id: str) -> dict[str, Any]:
    """Quantize a unit's embeddings and write its shard; return the shard record as JSON."""
    unit = json.loads(row["unit"])
    manifest = _ranges(cfg, ranges_path, ranges_id)
    dim = int(row["dim"])
    if dim != manifest.dim:
        raise ValueError(f"the model gives {dim}-dimensional embeddings but the ranges are for {manifest.dim}")
    fs, root = cfg.url_to_fs(cfg.dest)
    emb = np.frombuffer(row["embeddings"], dtype=np.float32).reshape(-1, dim)
    plan = ShardPlan(unit["shard_id"], unit["file"]["relpath"], unit["row_start"], unit["row_stop"])
    record = write_shard(fs, root, plan, json.loads(row["ids"]), np.frombuffer(row["rows"], np.int64),
                         emb, manifest.ranges, cfg.precisions, json.loads(row["rejects"]), cfg.index_type)
    record["stats"]["encode_s"] = round(float(row["encode_s"]), 6)
    return {"record": json.dumps(record)}
