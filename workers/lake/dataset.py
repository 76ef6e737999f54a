"""Reading a committed dataset version: its manifest, and shard files checked against their sha256."""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ranges.manifest import RangeManifest
from workers.lake.redact import redact_url
from ranges.encoding import sha256_hex
from workers.lake.storage import cat_uncached, join, url_to_fs
from workers.lake.records import ShardRecord, VersionManifest
from workers.lake.versions import read_version


class IntegrityError(ValueError):
    """A file's bytes or content differ from what the version manifest records for it."""


# The per-vector factor of the sign-bit score estimate (`workers.embedding.quantizer.sign_scales`).
# Optional: shards written before it was added lack it (their record has no `ubinary_scale`), and
# a version holding any of those is searched by the bits alone.
SCALE_COLUMN = "ubinary_scale"
OPTIONAL_COLUMNS = {SCALE_COLUMN: pa.float32()}


def shard_schema(dim: int, precisions: list[str] | tuple[str, ...]) -> dict[str, pa.DataType]:
    """Column name -> Arrow type of a shard's Parquet table, as the manifest implies it.

    `id` and `source_row`, then one vector column per stored precision (docs/formats.md,
    "Shard Parquet"): int8/uint8/float16 hold `dim` values, binary/ubinary `ceil(dim / 8)` bytes.
    """
    width = -(-dim // 8)
    types = {"int8": pa.list_(pa.int8(), dim), "uint8": pa.list_(pa.uint8(), dim),
             "binary": pa.list_(pa.int8(), width), "ubinary": pa.binary(width),
             "float16": pa.list_(pa.float16(), dim)}
    return {"id": pa.string(), "source_row": pa.int64(), **{p: types[p] for p in precisions}}


def _same_type(got: pa.DataType, want: pa.DataType) -> bool:
    # A list's item field name ("item", "element") depends on the writer, not on the data.
    if pa.types.is_fixed_size_list(want):
        return (pa.types.is_fixed_size_list(got) and got.list_size == want.list_size
                and got.value_type == want.value_type)
    return got == want


def _describe(t: pa.DataType) -> str:
    return f"fixed_size_list<{t.value_type}>[{t.list_size}]" if pa.types.is_fixed_size_list(t) else str(t)


def schema_problems(schema: pa.Schema, dim: int, precisions: list[str] | tuple[str, ...]) -> list[str]:
    """What differs between a shard's Parquet schema and `shard_schema(dim, precisions)`.

    `OPTIONAL_COLUMNS` may be absent (older shards); when present they must have their type.
    """
    want = shard_schema(dim, precisions)
    got = {f.name: f.type for f in schema}
    problems = [f"column {name} is missing" for name in want if name not in got]
    problems += [f"column {name} is not expected" for name in got
                 if name not in want and name not in OPTIONAL_COLUMNS]
    want.update({name: t for name, t in OPTIONAL_COLUMNS.items() if name in got})  # present: of its type
    problems += [f"column {name} is {_describe(got[name])}, expected {_describe(t)}" for name, t in want.items()
                 if name in got and not _same_type(got[name], t)]
    return problems


def index_problems(index, rows: int, dim: int, index_type: str) -> list[str]:
    """Why a deserialised binary index cannot serve a shard of `rows` rows; empty when it can.

    Searching trusts the index: its class decides the search parameters, and every label it
    returns is used as a row number of the shard. So the class must be the one the record
    names (`index_type`), and no label may reach past the rows: an IVF index's stored ids
    must be exactly the rows, each once, and an HNSW graph's links must point at stored
    vectors (a link past them makes FAISS read outside its codes).
    """
    import faiss

    name = type(index).__name__
    if name != index_type:
        return [f"is an {name}, the manifest says {index_type}"]
    if index.ntotal != rows:
        return [f"holds {index.ntotal} vectors, the manifest says {rows}"]
    if index.d != dim:
        return [f"holds {index.d}-bit codes, the version's model has {dim} dimensions"]
    if isinstance(index, faiss.IndexBinaryIVF):
        lists, quantizer = index.invlists, index.quantizer
        if lists.nlist != index.nlist or quantizer.ntotal != index.nlist or quantizer.d != dim:
            return [f"has {index.nlist} lists, but {lists.nlist} stored and {quantizer.ntotal} "
                    f"{quantizer.d}-bit centroids"]
        sizes = [lists.list_size(i) for i in range(index.nlist)]
        ids = np.concatenate([np.empty(0, np.int64)] + [
            faiss.rev_swig_ptr(lists.get_ids(i), n).copy() for i, n in enumerate(sizes) if n])
        if len(ids) != rows or not np.array_equal(np.sort(ids), np.arange(rows)):
            past = int(((ids < 0) | (ids >= rows)).sum())
            span = f" from {ids.min()} to {ids.max()}" if len(ids) else ""
            return [f"labels its {len(ids)} stored vectors with ids{span} ({past} outside the shard's "
                    f"rows 0..{rows - 1}), expected each row once"]
    elif isinstance(index, faiss.IndexBinaryHNSW):
        storage, hnsw = faiss.downcast_IndexBinary(index.storage), index.hnsw
        if not isinstance(storage, faiss.IndexBinaryFlat) or storage.ntotal != rows or storage.d != dim:
            return [f"stores {storage.ntotal} {storage.d}-bit codes in an {type(storage).__name__}, "
                    f"expected {rows} {dim}-bit codes in an IndexBinaryFlat"]
        links = faiss.vector_to_array(hnsw.neighbors)
        offsets = faiss.vector_to_array(hnsw.offsets).astype(np.int64)
        levels = faiss.vector_to_array(hnsw.levels).astype(np.int64)
        per_level = faiss.vector_to_array(hnsw.cum_nneighbor_per_level).astype(np.int64)
        top = levels[hnsw.entry_point] - 1 if 0 <= hnsw.entry_point < len(levels) else None
        if (len(levels) != rows or len(offsets) != rows + 1 or (levels < 1).any()
                or (levels >= len(per_level)).any() or offsets[0] != 0 or offsets[-1] != len(links)
                or not np.array_equal(np.diff(offsets), per_level[np.minimum(levels, len(per_level) - 1)])
                or (hnsw.max_level != top if rows else hnsw.entry_point != -1)):
            return ["has an HNSW graph whose levels, link offsets or entry point do not match its vectors"]
        if len(links) and (links.min() < -1 or links.max() >= rows):
            return [f"has HNSW links to vectors {links.min()} to {links.max()}, outside the shard's "
                    f"rows 0..{rows - 1}"]
    return []


@dataclass(frozen=True)
class DatasetVersion:
    """One committed version, opened for reading.

    Every read checks the file's size and sha256 against the manifest before parsing it,
    so a damaged or swapped file fails with its name instead of giving wrong vectors, and
    no FAISS or Parquet parser ever sees unverified bytes.
    """

    url: str  # credentials removed: safe to show
    fs: Any
    root: str
    manifest: VersionManifest

    @property
    def version(self) -> int:
        return self.manifest.number

    @property
    def shards(self) -> tuple[ShardRecord, ...]:
        return self.manifest.shards

    @cached_property
    def scaled(self) -> bool:
        """Whether every shard stores `ubinary_scale`: then (only) search ranks candidates by the
        scaled sign-bit score, so that every row of the version is ranked alike."""
        return all(s.ubinary_scale for s in self.shards)

    @property
    def dim(self) -> int:
        """The embedding dimension of the version's model (every vector column's width follows)."""
        return self.manifest.dim

    def _shard(self, shard: ShardRecord | int) -> ShardRecord:
        return self.shards[shard] if isinstance(shard, int) else shard

    def read_verified(self, relpath: str, sha256: str, size: int | None = None) -> bytes:
        """The bytes of `relpath` (relative to the dataset root), checked against `sha256`.

        Raises:
            IntegrityError: size or checksum differ; the message names the file.
            FileNotFoundError: the file is missing.
        """
        where = f"{relpath} of version {self.version} of {self.url}"
        try:
            data = cat_uncached(self.fs, join(self.root, relpath))
        except FileNotFoundError:
            raise FileNotFoundError(f"{where} is missing: the dataset was damaged or vacuumed "
                                    "while this version was still in use") from None
        if size is not None and len(data) != size:
            raise IntegrityError(f"{where} has {len(data)} bytes, the manifest says {size}: "
                                 "the file was truncated or replaced; do not use this version")
        got = sha256_hex(data)
        if got != sha256:
            raise IntegrityError(f"{where} has sha256 {got}, the manifest says {sha256}: "
                                 "the file was altered or damaged; do not use this version")
        return data

    def read_shard_table(self, shard: ShardRecord | int, columns: list[str] | None = None) -> pa.Table:
        """The shard's Parquet table (optionally only `columns`), after its checksum matched.

        An `OPTIONAL_COLUMNS` name in `columns` that the shard lacks (it predates the column) is
        left out of the table rather than an error.
        """
        s = self._shard(shard)
        data = self.read_verified(s.path, s.sha256, s.bytes)
        where = f"{s.path} of version {self.version} of {self.url}"
        try:
            parquet = pq.ParquetFile(pa.BufferReader(data))
            # The schema is checked before any column is used: a vector of another width than
            # the version's model would be read as another row's bytes, or fail deep in search.
            problems = schema_problems(parquet.schema_arrow, self.dim, self.manifest.precisions)
            if s.ubinary_scale and SCALE_COLUMN not in parquet.schema_arrow.names:
                problems.append(f"column {SCALE_COLUMN} is missing (its record says ubinary_scale)")
            if problems:
                raise IntegrityError(f"{where} does not hold what the manifest says "
                                     f"(dim {self.dim}, precisions {', '.join(self.manifest.precisions)}): "
                                     f"{'; '.join(problems)}; do not use this version")
            if columns is not None:
                names = parquet.schema_arrow.names
                columns = [c for c in columns if c in names or c not in OPTIONAL_COLUMNS]
            table = parquet.read(columns=columns)
        except pa.ArrowException as exc:  # checksum matched, yet no Parquet file: the manifest lies
            raise IntegrityError(f"{where} is not a readable Parquet file ({exc}); "
                                 "do not use this version") from None
        if table.num_rows != s.rows:
            raise IntegrityError(f"{where} has {table.num_rows} rows, the manifest says {s.rows}")
        nulls = [c for c in table.column_names if table[c].null_count]
        if nulls:
            raise IntegrityError(f"{where} has null values in column(s) {', '.join(nulls)}; "
                                 "do not use this version")
        return table

    def read_index_bytes(self, shard: ShardRecord | int) -> bytes:
        """The serialised FAISS index of the shard, after its checksum matched."""
        s = self._shard(shard)
        return self.read_verified(s.index, s.index_sha256, s.index_bytes)

    def read_index(self, shard: ShardRecord | int):
        """The shard's FAISS binary index, deserialised only once its checksum matched."""
        import faiss

        s = self._shard(shard)
        where = f"{s.index} of version {self.version} of {self.url} (shard {s.id})"
        data = self.read_index_bytes(s)
        try:
            index = faiss.deserialize_index_binary(np.frombuffer(data, np.uint8))
        except RuntimeError as exc:  # checksum matched, yet FAISS cannot read it: the manifest lies
            first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            raise IntegrityError(f"{where} cannot be read as a FAISS binary index ({first}); "
                                 "do not use this version") from None
        problems = index_problems(index, s.rows, self.dim, s.index_class)
        if problems:
            raise IntegrityError(f"{where} {'; '.join(problems)}: searching it would return rows the "
                                 "shard does not have; do not use this version")
        return index

    def read_rejects(self, shard: ShardRecord | int) -> pa.Table | None:
        """The shard's rejected rows, or None when it had none."""
        rej = self._shard(shard).rejects
        if rej is None:
            return None
        data = self.read_verified(rej.path, rej.sha256, rej.bytes)
        try:
            return pq.read_table(pa.BufferReader(data))
        except pa.ArrowException as exc:
            raise IntegrityError(f"{rej.path} of version {self.version} of {self.url} is not a readable "
                                 f"Parquet file ({exc}); do not use this version") from None

    def read_ranges(self) -> RangeManifest:
        """The range manifest the version was quantized with.

        Its content hash must be the ranges id, and its dimension and model those of the version.
        """
        r = self.manifest.ranges
        try:
            data = cat_uncached(self.fs, join(self.root, r.path))
        except FileNotFoundError:
            raise FileNotFoundError(f"{r.path} of version {self.version} of {self.url} is missing") from None
        try:
            manifest = RangeManifest.from_json(data, where=f"range manifest {r.path}")
        except ValueError as exc:
            raise IntegrityError(str(exc)) from None
        if manifest.id != r.id:
            raise IntegrityError(f"{r.path} of version {self.version} of {self.url} has id "
                                 f"{manifest.id}, the manifest says {r.id}")
        model = self.manifest.model
        try:
            manifest.check_for(model.fingerprint, model_name=model.name, dim=model.dim,
                               where=f"{r.path} of version {self.version} of {self.url}")
        except ValueError as exc:
            raise IntegrityError(f"{exc}; the version's manifest and its ranges disagree: do not use this "
                                 "version") from None
        return manifest


def open_version(url: str, version: int | None = None,
                 storage_options: Mapping[str, Any] | None = None) -> DatasetVersion:
    """Open committed version `version` (the latest when None) of the dataset at `url`.

    Only committed versions are visible: shards of a running or failed job, which no
    manifest lists yet, are never read.

    Args:
        url: the dataset root (fsspec URL or local path).
        version: version number; None for the latest.
        storage_options: fsspec options (endpoint, credentials).

    Raises:
        FileNotFoundError: no committed version, or no such version.
        ValueError: the manifest is malformed or holds an unsafe path.
    """
    url = os.fspath(url)  # a pathlib.Path too
    fs, root = url_to_fs(url, storage_options)
    manifest = read_version(fs, root, version)
    return DatasetVersion(redact_url(url), fs, root, manifest)
