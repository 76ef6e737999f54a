"""Commit embeddings computed elsewhere as a dataset version (benchmarks, tests), by the ingest's shard writer."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from ranges.manifest import RangeManifest
from workers.ingest.shard_builder import ShardPlan, write_shard
from workers.lake.storage import join, put_bytes, url_to_fs
from workers.lake.versions import commit


def write_vectors(dest: str, ids: Sequence[str], embeddings: np.ndarray, ranges: RangeManifest,
                  unit_rows: int = 10_000, index_type: str = "IndexBinaryFlat",
                  precisions: tuple[str, ...] = ("int8", "ubinary"),
                  storage_options: Mapping[str, Any] | None = None) -> int:
    """Write `embeddings` as shards of `unit_rows` rows and commit a version; return its number.

    The version has no source lake (`source.url` is `vectors:`), so `Searcher.source_texts`
    does not apply; everything else (ranges, model fingerprint, checksums) is as ingest writes it.

    Args:
        dest: dataset URL or path.
        ids: document ids, aligned with `embeddings`.
        embeddings: float32 (n, dim), made by the model `ranges` names.
        ranges: the range manifest to quantize with (written under `ranges/`).
        unit_rows, index_type, precisions: as `IngestConfig`.
    """
    fs, root = url_to_fs(dest, storage_options)
    if len(ids) != len(embeddings) or embeddings.shape[1] != ranges.dim:
        raise ValueError(f"{len(ids)} ids for {embeddings.shape} embeddings with {ranges.dim}-d ranges")
    ranges_path = f"ranges/{ranges.id}.json"
    put_bytes(fs, join(root, ranges_path), ranges.to_json())
    shards = []
    for a in range(0, len(ids), unit_rows):
        b = min(a + unit_rows, len(ids))
        plan = ShardPlan(f"vectors-{a:012d}-{b:012d}", "vectors", a, b)
        record = write_shard(fs, root, plan, list(ids[a:b]), np.arange(a, b), embeddings[a:b], ranges.ranges,
                             precisions, [], index_type)
        record.pop("clipped_per_dim")
        shards.append(record)
    n, dim = embeddings.shape
    return commit(fs, root, {
        "model": {"name": ranges.model_name, "fingerprint": ranges.model_fingerprint, "dim": dim,
                  "normalize": ranges.normalize},
        "ranges": {"id": ranges.id, "path": ranges_path, "method": ranges.method},
        "precisions": sorted(set(precisions) | {"ubinary"}),
        "source": {"url": "vectors:", "text_column": "text", "id_column": None, "files": {}},
        "shards": shards,
        "counts": {"rows_read": n, "documents": n, "rejects": 0},
        "bytes": {"float32": n * dim * 4, "int8": n * dim, "ubinary": n * dim // 8,
                  "stored": sum(s["bytes"] + s["index_bytes"] for s in shards)},
    })
