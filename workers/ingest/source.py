"""The source lake: list Parquet/JSON Lines files, check them, read row ranges as batches."""
from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj
import pyarrow.parquet as pq

from workers.lake.records import SourceFile
from workers.lake.redact import redact_url
from workers.lake.storage import url_to_fs

PARQUET_SUFFIXES = (".parquet", ".pq")
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
READ_BATCH_ROWS = 4096


class SourceError(ValueError):
    """The source cannot be ingested as asked; the message names the file and column."""


def _version(info: Mapping[str, Any]) -> str:
    for key in ("ETag", "etag", "md5Hash", "generation"):
        if info.get(key):
            return str(info[key]).strip('"')
    mtime = info.get("mtime") or info.get("LastModified") or info.get("last_modified") or info.get("created")
    if hasattr(mtime, "isoformat"):
        return mtime.isoformat()
    return repr(float(mtime)) if mtime is not None else ""


def _format(name: str) -> str | None:
    lower = name.lower()
    if lower.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if lower.endswith(JSONL_SUFFIXES):
        return "jsonl"
    return None


def list_source(url: str, storage_options: Mapping[str, Any] | None = None) -> tuple[Any, str, list[SourceFile]]:
    """List the data files under `url` (recursively), sorted by relative path.

    Returns `(fs, root, files)`. A single file URL is a source of one file. Names starting
    with `_` or `.` (`_SUCCESS`, `.crc`, hidden folders) are skipped, as Spark and Arrow do.
    """
    fs, root = url_to_fs(url, storage_options)
    if not fs.exists(root):
        raise SourceError(f"source {redact_url(url)} does not exist")
    if fs.isfile(root):
        infos = {root: fs.info(root)}
        root = posixpath.dirname(root)
    else:
        infos = fs.find(root, detail=True)
    files = []
    for path, info in sorted(infos.items()):
        rel = posixpath.relpath(path, root)
        if any(part.startswith(("_", ".")) for part in rel.split("/")):
            continue
        fmt = _format(rel)
        if fmt is None or info.get("type", "file") != "file":
            continue
        files.append(SourceFile(rel, int(info.get("size") or 0), _version(info), fmt))
    if not files:
        raise SourceError(f"source {redact_url(url)} holds no Parquet ({', '.join(PARQUET_SUFFIXES)}) "
                          f"or JSON Lines ({', '.join(JSONL_SUFFIXES)}) files")
    return fs, root, files


def _open_parquet(fs, root: str, f: SourceFile) -> pq.ParquetFile:
    return pq.ParquetFile(fs.open(posixpath.join(root, f.relpath), "rb"))


def check_file(fs, root: str, f: SourceFile, text_column: str, id_column: str | None) -> list[int] | None:
    """Open `f`, check that the columns exist with usable types.

    Returns the row counts of a Parquet file's row groups (work units follow them), None
    for JSON Lines. Raises SourceError naming the file and column.
    """
    try:
        if f.format == "parquet":
            pf = _open_parquet(fs, root, f)
            meta = pf.metadata
            schema, groups = pf.schema_arrow, [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        else:
            with fs.open(posixpath.join(root, f.relpath), "rb") as fh:
                schema, groups = pj.open_json(fh).schema, None
    except Exception as exc:  # noqa: BLE001 - any parse failure means the file is unreadable
        raise SourceError(f"cannot read {f.format} file {f.relpath}: {exc}") from exc
    for role, column in (("text", text_column), ("id", id_column)):
        if column is None:
            continue
        if column not in schema.names:
            raise SourceError(f"file {f.relpath} has no {role} column {column!r} "
                              f"(columns: {', '.join(schema.names)}); pass --{role}-column")
    text_type = schema.field(text_column).type
    if not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type) or pa.types.is_null(text_type)):
        raise SourceError(f"text column {text_column!r} of file {f.relpath} has type {text_type}; "
                          "it must hold strings")
    return groups


def iter_batches(fs, root: str, f: SourceFile, columns: list[str], row_start: int = 0,
                 row_stop: int | None = None) -> Iterator[tuple[int, pa.RecordBatch]]:
    """Stream rows [row_start, row_stop) of `f` as `(first row number, batch)` pairs."""
    path = posixpath.join(root, f.relpath)
    if f.format == "parquet":
        pf = _open_parquet(fs, root, f)
        groups, first, offset = [], None, 0
        # Only the row groups that overlap the range are read.
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if offset + n > row_start and (row_stop is None or offset < row_stop):
                groups.append(g)
                first = offset if first is None else first
            offset += n
        if not groups:
            return
        batches = pf.iter_batches(batch_size=READ_BATCH_ROWS, row_groups=groups, columns=columns)
        yield from _window(batches, first, row_start, row_stop)
    else:
        with fs.open(path, "rb") as fh:
            reader = pj.open_json(fh, read_options=pj.ReadOptions(block_size=1 << 22))
            yield from _window(_jsonl_batches(reader, f, columns), 0, row_start, row_stop)


def _jsonl_batches(reader, f: SourceFile, columns: list[str]) -> Iterator[pa.RecordBatch]:
    """The reader's batches (one per block); a line it cannot parse raises SourceError naming the
    file and the line (Arrow counts the row within its block: the rows before it are added)."""
    rows = 0
    while True:
        try:
            b = reader.read_next_batch()
        except StopIteration:
            return
        except pa.ArrowInvalid as exc:
            m = re.search(r"\bin row (\d+)", str(exc))
            at = f"line {rows + int(m.group(1)) + 1}" if m else f"a line after line {rows}"
            raise SourceError(f"JSON Lines file {f.relpath}: {at} is not a JSON object "
                              f"({str(exc).splitlines()[0]}); fix or remove that line") from None
        rows += b.num_rows
        yield b.select([c for c in columns if c in b.schema.names])


def source_root(fs, root: str, f: SourceFile) -> str:
    """The folder `f.relpath` is relative to: the source's root, or its parent when the source
    URL is that one file (as `list_source` lists it)."""
    if posixpath.basename(root) == f.relpath and fs.isfile(root):
        return posixpath.dirname(root)
    return root


def _window(batches, first: int, row_start: int, row_stop: int | None):
    offset = first
    for batch in batches:
        lo, hi = offset, offset + batch.num_rows
        offset = hi
        if hi <= row_start:
            continue
        if row_stop is not None and lo >= row_stop:
            break
        a = max(row_start - lo, 0)
        b = batch.num_rows if row_stop is None else min(row_stop - lo, batch.num_rows)
        yield lo + a, batch.slice(a, b - a)


@dataclass
class Rows:
    """One batch of source rows, classified: `reason[i]` is None for a row to encode."""

    file: SourceFile
    row: np.ndarray  # int64 row numbers in the file
    ids: list  # str | None
    texts: list  # str | None
    reason: list  # str | None


def classify(f: SourceFile, first_row: int, batch: pa.RecordBatch, text_column: str,
             id_column: str | None) -> Rows:
    """Derive ids and mark rows that cannot be encoded (null id, null or blank text)."""
    n = batch.num_rows
    rows = np.arange(first_row, first_row + n, dtype=np.int64)
    if text_column in batch.schema.names:
        texts = batch.column(text_column).cast(pa.string()).to_pylist()
    else:  # a JSON Lines block where no line had the key
        texts = [None] * n
    if id_column is None:
        ids = [f"{f.relpath}:{r}" for r in rows.tolist()]
    elif id_column in batch.schema.names:
        col = batch.column(id_column)
        ids = (col if pa.types.is_string(col.type) else pc.cast(col, pa.string())).to_pylist()
    else:
        ids = [None] * n
    reason = [
        "null_id" if i is None else "null_text" if t is None else "empty_text" if not t.strip() else None
        for i, t in zip(ids, texts)
    ]
    return Rows(f, rows, ids, texts, reason)
