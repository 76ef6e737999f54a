"""Shard writing: quantized vectors as Parquet, a FAISS binary index, rejects; all by content id.

A shard is complete once its sidecar `shards/<id>.json` (its manifest record) exists: the
sidecar is written after the data files, so a rerun can reuse a shard it can verify. A shard
that keeps float16 embeddings can be read back (`float16_rows`) and written under other ranges.
"""
from __future__ import annotations

import json
import logging
import time
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from workers.embedding.quantizer import quantize_all, sign_scales, to_float16
from ranges.encoding import pretty_json, sha256_hex
from workers.lake.dataset import SCALE_COLUMN
from workers.lake.records import SIDECAR_FORMAT, RejectsRef, ShardRecord, ShardSource, sidecar_json, sidecar_path
from workers.lake.storage import join, put_bytes
from workers.vocab import FLOAT16, INDEX_TYPES

log = logging.getLogger(__name__)

REJECT_SCHEMA = pa.schema([("id", pa.string()), ("source_file", pa.string()),
                           ("source_row", pa.int64()), ("reason", pa.string()), ("detail", pa.string())])



def _vectors(a: np.ndarray, precision: str) -> pa.Array:
    n, width = a.shape
    if precision == "ubinary":
        return pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), n, [None, pa.py_buffer(a.tobytes())])
    values = pa.array(a.reshape(-1), type=pa.from_numpy_dtype(a.dtype))  # int8, uint8 or float16
    return pa.FixedSizeListArray.from_arrays(values, width)


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    # Fixed-width vectors do not compress; dictionary pages would only waste time on them.
    pq.write_table(table, sink, compression="zstd", use_dictionary=["id"],
                   write_statistics=["id", "source_row"], row_group_size=1 << 16)
    return sink.getvalue().to_pybytes()


# Graph degree: level 0 keeps 2 M int32 links per vector, 128 bytes beside a 48-byte code at M=16.
HNSW_M = 16


def ivf_lists(rows: int) -> int:
    """Inverted lists of an IVF shard index: ~sqrt(n), with >= 39 training points per list."""
    return max(1, min(int(np.sqrt(rows)), rows // 39))


def build_index(ubinary: np.ndarray, dim: int, index_type: str = "IndexBinaryFlat") -> bytes:
    """Serialised FAISS binary index whose vector i is row i of the shard.

    Flat is exact; HNSW and IVF are approximate, for big shards. They are built on one thread:
    FAISS's parallel HNSW insertion and k-means depend on thread timing, and a shard's bytes
    must not (a rerun rewrites the same name with the same content).
    """
    if index_type not in INDEX_TYPES:
        raise ValueError(f"unknown binary index type {index_type!r}; choose from {', '.join(INDEX_TYPES)}")
    codes = np.ascontiguousarray(ubinary, dtype=np.uint8)
    if index_type == "IndexBinaryFlat":
        index = faiss.IndexBinaryFlat(dim)
    elif index_type == "IndexBinaryHNSW":
        index = faiss.IndexBinaryHNSW(dim, HNSW_M)
    else:
        quantizer = faiss.IndexBinaryFlat(dim)  # kept referenced: the IVF index does not own it
        index = faiss.IndexBinaryIVF(quantizer, dim, ivf_lists(len(codes)))
        index.cp.min_points_per_centroid = 1  # tiny shards get one list; no warning about it
        # k-means on a seeded sample of 64 codes per list: single-threaded training stays seconds.
        index.cp.max_points_per_centroid = 64
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        if index_type == "IndexBinaryIVF":
            index.train(codes if len(codes) else np.zeros((1, dim // 8), np.uint8))
        if len(codes):
            index.add(codes)
    finally:
        faiss.omp_set_num_threads(threads)
    return faiss.serialize_index_binary(index).tobytes()


def write_shard(fs, root: str, shard_id: str, source: ShardSource, ids: list[str], rows: np.ndarray,
                embeddings: np.ndarray, ranges: np.ndarray, precisions: tuple[str, ...],
                rejects: list[dict[str, Any]], index_type: str = "IndexBinaryFlat",
                scales: bool = True) -> ShardRecord:
    """Quantize one work unit and write its files; return its record (not yet its sidecar).

    Args:
        fs, root: destination filesystem and dataset root.
        shard_id, source: the shard's name and the source rows it holds.
        ids, rows: accepted documents' ids and source row numbers, aligned with `embeddings`.
        embeddings: float32 (n, dim).
        ranges: (2, dim) float32 calibration ranges.
        precisions: precisions to store; `ubinary` is always stored (the index is built on it).
            With `float16`, the embeddings are kept rounded to float16, and every other column
            (codes, scales, clip counts) is made from those rounded values.
        rejects: rejected rows (`REJECT_SCHEMA` fields).
        index_type: the FAISS binary index class (`workers.vocab.INDEX_TYPES`).
        scales: store the `ubinary_scale` column; False writes a shard as before it existed
            (benchmarks and tests of the previous estimate).
    """
    dim = int(ranges.shape[1])
    t0 = time.perf_counter()
    embeddings = embeddings.reshape(-1, dim)
    half = None
    if FLOAT16 in precisions:
        half = to_float16(embeddings)
        # Everything else comes from the float16 values, not the float32 ones: a later
        # requantization has only those, and must write the bytes this write gives.
        embeddings = half.astype(np.float32)
    wanted = tuple(dict.fromkeys(tuple(p for p in precisions if p != FLOAT16) + ("ubinary",)))
    quantized, clipped = quantize_all(embeddings, ranges, wanted)
    t1 = time.perf_counter()
    columns = {"id": pa.array(ids, pa.string()), "source_row": pa.array(rows, pa.int64())}
    for p in ("int8", "uint8", "binary", "ubinary"):
        if p in quantized:
            columns[p] = _vectors(quantized[p], p)
    if half is not None:
        columns[FLOAT16] = _vectors(half, FLOAT16)
    # Search ranks Hamming candidates by the float query against their sign bits; this factor
    # per vector makes that score an estimate of the inner product (docs/formats.md).
    if scales:
        columns[SCALE_COLUMN] = pa.array(sign_scales(embeddings), pa.float32())
    data = _parquet_bytes(pa.table(columns))
    index = build_index(quantized["ubinary"], dim, index_type)
    path, index_path = f"shards/{shard_id}.parquet", f"shards/{shard_id}.faiss"
    put_bytes(fs, join(root, index_path), index)
    put_bytes(fs, join(root, path), data)
    reject_record = None
    if rejects:
        rdata = _parquet_bytes(pa.Table.from_pylist(rejects, schema=REJECT_SCHEMA))
        rpath = f"rejects/{shard_id}.parquet"
        put_bytes(fs, join(root, rpath), rdata)
        reject_record = RejectsRef(rpath, len(rejects), sha256_hex(rdata), len(rdata))
    t2 = time.perf_counter()
    return ShardRecord(
        id=shard_id, path=path, index=index_path, index_type=index_type, rows=len(ids), source=source,
        sha256=sha256_hex(data), index_sha256=sha256_hex(index), bytes=len(data), index_bytes=len(index),
        rejects=reject_record, clipped=int(clipped.sum()), clipped_per_dim=tuple(clipped.tolist()),
        ubinary_scale=scales,
        stats={"rows_read": len(ids) + len(rejects), "quantize_s": round(t1 - t0, 6),
               "write_s": round(t2 - t1, 6)})




def write_sidecar(fs, root: str, record: ShardRecord) -> None:
    """Mark a shard complete by writing its record beside it; call after its data files."""
    put_bytes(fs, join(root, sidecar_path(record.id)), pretty_json(sidecar_json(record)))


def _sidecar_record(record: Any, shard_id: str, source: ShardSource) -> ShardRecord | str:
    """The sidecar's record when it can stand for this shard, else why not.

    A sidecar is trusted only for its own shard: the files it lists must be exactly the
    names `write_shard` gives that shard id. One naming another shard's files (or any path
    outside them, an unsafe one included) would make the rerun commit a record whose files
    are not this unit's rows; such a shard is rewritten instead.
    """
    if not isinstance(record, dict) or record.get("id") != shard_id or record.get("source") != source.to_json():
        return "does not describe this shard"
    rejects = record.get("rejects")
    if (record.get("path") != f"shards/{shard_id}.parquet" or record.get("index") != f"shards/{shard_id}.faiss"
            or not (rejects is None or (isinstance(rejects, dict)
                                        and rejects.get("path") == f"rejects/{shard_id}.parquet"))):
        return (f"lists files other than shards/{shard_id}.parquet, shards/{shard_id}.faiss and "
                f"rejects/{shard_id}.parquet")
    try:
        parsed = ShardRecord.from_json(record, "record", sidecar_path(shard_id), "record")
    except ValueError as exc:
        return f"has a malformed record ({exc})"
    # Stricter than a manifest's record: a sidecar is ours, written whole, with every field.
    if "index_type" not in record or (rejects is not None and "bytes" not in rejects):
        return "has a malformed record"
    return parsed


def completed_shard(fs, root: str, shard_id: str, source: ShardSource) -> ShardRecord | None:
    """The record of a shard an earlier run wrote completely, or None when it must be written.

    Complete means: the sidecar exists, names this shard and source range, lists exactly
    this shard's files (`shards/<id>.parquet`, `shards/<id>.faiss`, `rejects/<id>.parquet`),
    and every file it lists has the recorded size and sha256. A missing sidecar is the usual
    case (a new shard, or a writer killed before it finished); anything else is logged with
    the reason. A sidecar never fails the job: at worst the shard is written again.
    """
    where = sidecar_path(shard_id)
    try:
        doc = json.loads(fs.cat_file(join(root, where)))
    except FileNotFoundError:
        return None
    except ValueError as exc:  # a sidecar that is not JSON: rewrite the shard
        log.warning("shard %s: %s is unreadable (%s); rewriting the shard", shard_id, where, exc)
        return None
    found = doc.get("record") if isinstance(doc, dict) and doc.get("format") == SIDECAR_FORMAT else None
    record = _sidecar_record(found, shard_id, source)
    if isinstance(record, str):
        log.warning("shard %s: %s %s; rewriting the shard", shard_id, where, record)
        return None
    for f in record.files():
        try:
            data = fs.cat_file(join(root, f.path))
        except FileNotFoundError:
            log.warning("shard %s: %s is missing; rewriting the shard", shard_id, f.path)
            return None
        got = sha256_hex(data)
        if len(data) != f.bytes or got != f.sha256:
            log.warning("shard %s: %s has %d bytes with sha256 %s, its record says %s bytes with %s; "
                        "rewriting the shard", shard_id, f.path, len(data), got, f.bytes, f.sha256)
            return None
    return record


def float16_rows(fs, root: str, record: ShardRecord, source: ShardSource
                 ) -> tuple[list[str], np.ndarray, np.ndarray, list[dict[str, Any]]] | str:
    """What a shard kept of its unit, for requantizing it under other ranges, or why it cannot serve.

    Reads the shard's Parquet file and rejects (each checked against the record's size and
    sha256 before it is parsed) and returns `(ids, source rows, float16 embeddings (n, dim),
    rejects)`: with the float16 values as float32 these are exactly the arguments `write_shard`
    had, so writing them under new ranges gives the bytes a fresh ingest with those ranges gives.
    A shard that cannot serve (another unit's, a file missing or altered, no float16 column)
    returns the reason: the caller encodes the unit instead.
    """
    if record.source != source:
        return f"holds rows {record.source}, not {source}"
    files = {f.path: f for f in record.files()}
    data = {}
    for path, ref in files.items():
        try:
            blob = fs.cat_file(join(root, path))
        except FileNotFoundError:
            return f"{path} is missing"
        if (ref.bytes is not None and len(blob) != ref.bytes) or sha256_hex(blob) != ref.sha256:
            return f"{path} differs from its record (size or sha256)"
        data[path] = blob
    try:
        table = pq.read_table(pa.BufferReader(data[record.path]), columns=["id", "source_row", FLOAT16])
        column = table[FLOAT16].combine_chunks()
        if not (pa.types.is_fixed_size_list(column.type) and column.type.value_type == pa.float16()):
            return f"{record.path} has a {FLOAT16} column of type {column.type}"
        if table.num_rows != record.rows or column.null_count:
            return f"{record.path} has {table.num_rows} rows (nulls among them?), its record says {record.rows}"
        half = np.asarray(column.flatten().to_numpy(zero_copy_only=False), np.float16)
        half = half.reshape(table.num_rows, column.type.list_size)
        rejects = []
        if record.rejects is not None:
            rejects = pq.read_table(pa.BufferReader(data[record.rejects.path])).to_pylist()
    except (pa.ArrowException, KeyError) as exc:
        return f"{record.path} cannot be read for requantizing ({type(exc).__name__}: {exc})"
    return (table["id"].to_pylist(), table["source_row"].to_numpy().astype(np.int64), half, rejects)
