"""Commit embeddings computed elsewhere as a dataset version (benchmarks, tests), by the ingest's shard writer."""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping, Sequence

import numpy as np

from ranges.manifest import RangeManifest
from workers.ingest.shard_builder import write_shard
from workers.lake.records import ModelInfo, RangesRef, ShardSource, SourceSnapshot, VersionManifest
from workers.lake.storage import join, put_bytes, url_to_fs
from workers.lake.versions import commit, list_versions


def write_vectors(dest: str, ids: Sequence[str], embeddings: np.ndarray, ranges: RangeManifest,
                  unit_rows: int = 10_000, index_type: str = "IndexBinaryFlat",
                  precisions: tuple[str, ...] = ("int8", "ubinary"),
                  storage_options: Mapping[str, Any] | None = None, scales: bool = True) -> int:
    """Write `embeddings` as shards of `unit_rows` rows and commit a version; return its number.

    The version has no source lake (`source.url` is `vectors:`), so `quantlake search
    --neighbours-of` does not apply; everything else (ranges, model fingerprint, checksums)
    is as ingest writes it. `dest` must hold no version: its shards are named by row range, not
    content, so a second call would rewrite the files the first version's records describe.

    Args:
        dest: dataset URL or path.
        ids: document ids, aligned with `embeddings`.
        embeddings: float32 (n, dim), made by the model `ranges` names.
        ranges: the range manifest to quantize with (written under `ranges/`).
        unit_rows, index_type, precisions: as `IngestConfig`.
        scales: store each vector's sign-bit scale (`write_shard`); False: shards as written before.
    """
    fs, root = url_to_fs(dest, storage_options)
    if len(ids) != len(embeddings) or embeddings.shape[1] != ranges.dim:
        raise ValueError(f"{len(ids)} ids for {embeddings.shape} embeddings with {ranges.dim}-d ranges")
    if held := list_versions(fs, root):
        raise FileExistsError(f"{dest} holds version {held[-1]} already: write_vectors writes a new dataset "
                              "(its shards are named by row range, and would replace that version's)")
    ranges_path = f"ranges/{ranges.id}.json"
    put_bytes(fs, join(root, ranges_path), ranges.to_json())
    shards = []
    for a in range(0, len(ids), unit_rows):
        b = min(a + unit_rows, len(ids))
        shards.append(write_shard(fs, root, f"vectors-{a:012d}-{b:012d}", ShardSource("vectors", a, b),
                                  list(ids[a:b]), np.arange(a, b), embeddings[a:b], ranges.ranges, precisions,
                                  [], index_type, scales))
    return commit(fs, root, VersionManifest.build(
        model=ModelInfo(ranges.model_name, ranges.model_fingerprint, embeddings.shape[1], ranges.normalize),
        ranges=RangesRef(ranges.id, ranges_path, ranges.method), precisions=precisions,
        source=SourceSnapshot("vectors:", "text", None, {}), shards=shards,
        parent=None))


def synthetic_version(fs, root: str, shards: int, ranges: RangeManifest, rows: int = 2,
                      files_per_shard: int = 1) -> VersionManifest:
    """A draft version of `shards` shards that are copies of one real shard (scale benchmarks, tests).

    One shard of `rows` random unit vectors is written for real (Parquet, FAISS index, checksums);
    every other shard is its files' bytes under another id, so the records are all distinct and all
    verifiable while the lake costs `shards` small writes. `files_per_shard` source files are named
    per shard in the snapshot (what a lake of that many files records). Nothing is committed.
    """
    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, ranges.dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    put_bytes(fs, join(root, f"ranges/{ranges.id}.json"), ranges.to_json())
    first = write_shard(fs, root, "synthetic-0", ShardSource("part-0.parquet", 0, rows),
                        [f"doc-0-{i}" for i in range(rows)], np.arange(rows), x, ranges.ranges,
                        ("int8", "ubinary"), [])
    data = fs.cat_file(join(root, first.path)), fs.cat_file(join(root, first.index))
    records, copies = [first], {}
    for i in range(1, shards):
        sid = f"synthetic-{i}"
        rec = replace(first, id=sid, path=f"shards/{sid}.parquet", index=f"shards/{sid}.faiss",
                      source=ShardSource(f"part-{i}.parquet", 0, rows))
        copies[join(root, rec.path)], copies[join(root, rec.index)] = data
        records.append(rec)
    fs.pipe(copies)  # plain writes: these files stand in for shards, nothing relies on their fsync
    files = [f"part-{i}-{j}.parquet" for i in range(shards) for j in range(files_per_shard)]
    return VersionManifest.build(
        model=ModelInfo(ranges.model_name, ranges.model_fingerprint, ranges.dim, ranges.normalize),
        ranges=RangesRef(ranges.id, f"ranges/{ranges.id}.json", ranges.method), precisions=("int8", "ubinary"),
        source=SourceSnapshot("synthetic:", "text", None, {f: {"size": 1000, "version": "1"} for f in files}),
        shards=records)
