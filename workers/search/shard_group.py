"""The shards one searcher holds (a thread's group or a Ray actor's): indexes resident, rows on demand."""
from __future__ import annotations

import os
import shutil
import tempfile
import threading
import weakref
from typing import Any, Iterator, Sequence

import faiss
import numpy as np
import pyarrow as pa

from workers.vocab import SearchIndex
from workers.lake.dataset import SCALE_COLUMN, DatasetVersion, IntegrityError
from workers.lake.records import ShardRecord
from workers.search.rescore import bit_scores, bit_tables, int8_query, int8_scores, merge, steps_of
from workers.lake.storage import join, over_network, read_ahead

# Shards a group loads at once when the dataset is reached over a network (object storage): each
# load is two round trips (its size, its index), which loading several at once overlaps.
SHARD_LOADS_AT_ONCE = 8

# Spilled columns: what a hit needs besides its index entry (ids, rescoring, the source row), and
# the sign-bit scales of the candidate estimate (absent from shards written before them).
SPILL_COLUMNS = ("id", "source_row", "int8", "ubinary", SCALE_COLUMN)


def _codes_view(index) -> np.ndarray | None:
    """The packed codes a flat (or HNSW's flat storage) binary index holds, without a copy."""
    flat = index if isinstance(index, faiss.IndexBinaryFlat) else None
    if isinstance(index, faiss.IndexBinaryHNSW):
        flat = faiss.downcast_IndexBinary(index.storage)
    if flat is None or flat.ntotal == 0:
        return None
    n, width = flat.ntotal, flat.code_size
    return faiss.rev_swig_ptr(flat.xb.data(), n * width).reshape(n, width)


def int8_index(codes: np.ndarray, ranges: np.ndarray) -> faiss.IndexScalarQuantizer:
    """A one-byte-per-dimension FAISS index scoring float queries against int8 bucket centres.

    FAISS's QT_8bit decodes code c as `vmin + (c + 0.5) / 255 * vdiff`: with our mins and
    `vdiff = 255 * steps` that is exactly `rescore.int8_query`'s dequantization. (The
    `QT_8bit_direct*` types would store the values too, but their SIMD inner product quantizes
    the query to bytes as well, which scores wrongly.)
    """
    dim = codes.shape[1]
    mins, steps = steps_of(ranges)
    index = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
    faiss.copy_array_to_vector(np.concatenate([mins, steps * np.float32(255)]).astype(np.float32),
                               index.sq.trained)
    index.is_trained = True
    if len(codes):
        index.add_sa_codes(np.ascontiguousarray(codes).view(np.uint8) ^ np.uint8(0x80))
    return index


class ShardGroup:
    """Shards searched by one worker: binary (or int8) indexes in memory, everything else mapped.

    Args:
        ds: the opened version (`workers.lake.dataset.open_version`).
        ordinals: positions, in the version, of this group's shards (ties across shards break by it).
        ranges: (2, dim) float32 ranges of the version.
        index: `binary` keeps the shards' FAISS binary indexes; `int8` builds one-byte scalar
            quantizer indexes from the int8 vectors instead (8x the memory, no rescoring).
        cache_dir: local folder for the spilled columns (None: a temporary one, removed on close).
        threads: shards loaded at once (each read and checked against its sha256); over a
            network at least SHARD_LOADS_AT_ONCE.
    """

    def __init__(self, ds: DatasetVersion, ordinals: Sequence[int], ranges: np.ndarray,
                 index: SearchIndex = "binary", cache_dir: str | None = None, threads: int = 1):
        self.ds = ds
        self.shards = {int(o): self.ds.shards[int(o)] for o in ordinals}
        self.ranges = np.asarray(ranges, np.float32)
        self.dim = self.ranges.shape[1]
        self.kind = index
        self.cache_dir = tempfile.mkdtemp(prefix="quantlake-search-") if cache_dir is None else cache_dir
        # A folder of its own is removed by `close`, or when the group is collected without it.
        self._remove_dir = weakref.finalize(self, shutil.rmtree, self.cache_dir, True) if cache_dir is None else None
        self._spills: dict[int, dict[str, Any]] = {}
        # The estimate must rank every row of the version alike (a scaled score is ~1.26x a plain
        # one for unit vectors): scales only when every shard has them, else bits alone, as before.
        # Read from the version (worked out once per version): a group per shard asking every
        # shard would make opening 10,000 shards cost 10,000 x 10,000 checks.
        self.scaled = ds.scaled
        self._lock = threading.Lock()
        # Flat-index shards are laid end to end in one `IndexBinaryFlat`, in ordinal order, as
        # they load: a query then costs one FAISS search for them all instead of one per shard
        # with its per-shard merge and bit scores (~0.25 ms of overhead per shard and query, which
        # made a version of 10,000 shards take seconds per query). The results are the same:
        # FAISS keeps the lowest row among equal distances, so ties break by (shard ordinal, row)
        # as `merge` breaks them across shards. Each shard's own index is dropped once its codes
        # are copied, so the group holds them once. HNSW and IVF shards keep their own index.
        self.indexes: dict[int, Any] = {}
        joined = {o for o, s in self.shards.items() if index == "binary" and s.index_class == "IndexBinaryFlat"}
        self._flat = FlatRun(self.dim, sum(self.shards[o].rows for o in joined)) if joined else None
        loads = max(threads, SHARD_LOADS_AT_ONCE) if over_network(ds.fs) else threads
        try:
            for (o, _), loaded in self._loaded(loads):
                if o in joined:  # its class was checked against the record as it loaded
                    self._flat.append(o, loaded)
                else:
                    self.indexes[o] = loaded
                del loaded
        except BaseException:
            self.close()
            raise
        if self._flat is not None:
            self._flat.done()

    def _loaded(self, threads: int) -> Iterator[tuple[tuple[int, ShardRecord], Any]]:
        """`((ordinal, record), loaded index)` of each shard, in ordinal order, `threads` loads at
        a time with at most twice that many loaded ahead of the caller (`read_ahead`: reads from
        object storage overlap, and memory holds a few shards' indexes besides the group's, not
        all of them); with one thread, in the caller's."""
        shards = sorted(self.shards.items())
        if threads <= 1 or len(shards) < 2:
            return (((o, s), self._load(o, s)) for o, s in shards)
        return read_ahead(lambda shard: self._load(*shard), shards, threads, 2 * threads, "quantlake-shards")

    def index_classes(self) -> dict[int, str]:
        """The FAISS class each shard of the group was loaded as, by ordinal."""
        out = {o: type(index).__name__ for o, index in self.indexes.items()}
        if self._flat is not None:
            out.update({int(o): "IndexBinaryFlat" for o in self._flat.ordinals})
        return dict(sorted(out.items()))

    def _load(self, o: int, s: ShardRecord):
        ds = self.ds
        try:
            size = ds.fs.info(join(ds.root, s.path))["size"]
        except FileNotFoundError:
            raise FileNotFoundError(f"shard {s.path} of version {ds.version} of {ds.url} is missing: "
                                    "the dataset is incomplete; restore the file or search another version") from None
        if size != s.bytes:
            raise IntegrityError(f"shard {s.path} of version {ds.version} of {ds.url} has {size} bytes, "
                                 f"the manifest says {s.bytes}: the file was truncated or replaced")
        if self.kind == "int8":
            return int8_index(self._spill(o)["int8"], self.ranges)
        index = ds.read_index(s)  # deserialised only after its sha256 matched the manifest
        if index.d != self.dim:
            raise IntegrityError(f"index {s.index} holds {index.d}-bit codes, the version's model has "
                                 f"{self.dim} dimensions")
        return index

    def resident_bytes(self) -> int:
        """Bytes of the in-memory indexes (the spilled columns are memory-mapped files)."""
        if self.kind == "int8":
            return sum(i.ntotal * i.code_size for i in self.indexes.values())
        return sum(s.index_bytes for s in self.shards.values())

    def _spill(self, o: int) -> dict[str, np.ndarray]:
        """The shard's columns as memory-mapped arrays, decoded once into a local Arrow file.

        Parquet pages are compressed, so a row cannot be read in place; the spill is uncompressed
        Arrow IPC named by the Parquet checksum, so the OS pages in only the rows a query touches.
        """
        with self._lock:
            if o not in self._spills:
                self._spills[o] = _columns(self._spill_locked(o), self.dim)
        return self._spills[o]

    def _spill_locked(self, o: int) -> pa.Table:
        s = self.shards[o]
        # Local scratch files, not dataset data: Arrow's memory map needs a local path.
        path = os.path.join(self.cache_dir, f"{s.sha256}.arrow")
        if not os.path.exists(path):
            # The columns the shard holds, whatever this version reads of them: the file is named by
            # the shard's checksum alone, and a cache folder may serve another version of it next.
            present = [c for c in SPILL_COLUMNS if (c != "int8" or "int8" in self.ds.manifest.precisions)
                       and (c != SCALE_COLUMN or s.ubinary_scale)]
            table = self.ds.read_shard_table(s, columns=present)  # checked against its sha256
            tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
            with pa.OSFile(tmp, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
                writer.write_table(table)
            os.replace(tmp, path)
        return pa.ipc.open_file(pa.memory_map(path)).read_all()

    def candidates(self, q: np.ndarray, qbin: np.ndarray, n: int, asymmetric: bool = False,
                   ef_search: int | None = None, nprobe: int | None = None):
        """The group's best `n` candidates per query: (keys, shard ordinals, rows, bit scores).

        Ordered by key (Hamming distance; with an int8 index, minus the score), then shard, then
        row. Bit scores (float query against sign bits) are filled only when `asymmetric`. Each
        shard gives at most its `ntotal` rows, so the arrays have at most the group's rows columns.
        """
        # A zero-width part first: a group whose shards are all empty still gives (queries, 0) arrays.
        parts = [(np.zeros((len(q), 0)), np.zeros((len(q), 0), np.int64), np.zeros((len(q), 0), np.int64),
                  np.zeros((len(q), 0), np.float32))]
        tables = bit_tables(q) if asymmetric and self.kind == "binary" else None
        if self._flat is not None and self._flat.index.ntotal:
            m = min(n, self._flat.index.ntotal)
            keys, at = self._flat.index.search(qbin, m)
            shards, rows = self._flat.locate(at)
            bits = np.zeros(rows.shape, np.float32)
            if tables is not None:
                bits = bit_scores(self._flat.codes()[at.ravel()], tables, np.repeat(np.arange(len(q)), m),
                                  self._flat_scales(at.ravel())).reshape(rows.shape)
            parts.append((keys.astype(np.float64), shards, rows, bits))
        for o, index in self.indexes.items():
            # FAISS allocates (queries, m) results whatever the shard holds: ask only for rows it has.
            m = min(n, index.ntotal)
            if m == 0:
                continue
            if self.kind == "int8":
                scores, rows = _int8_top(index, q, m)
                keys = -scores
            else:
                keys, rows = index.search(qbin, m, params=_params(index, m, ef_search, nprobe))
            bits = self._bits(o, index, tables, rows) if tables is not None else np.zeros(rows.shape, np.float32)
            parts.append((keys.astype(np.float64), np.full(rows.shape, o, np.int64), rows.astype(np.int64), bits))
        keys, shards, rows, bits = (np.concatenate(x, axis=1) for x in zip(*parts))
        pick = merge(keys, shards, rows, n)
        return tuple(np.take_along_axis(a, pick, axis=1) for a in (keys, shards, rows, bits))

    def _flat_scales(self, at: np.ndarray) -> np.ndarray | None:
        """The sign-bit scales of rows `at` of the joined flat shards (None: searched by bits alone)."""
        if not self.scaled:
            return None
        run = self._flat
        # A shard's scales are read the first time a query's candidates come from it: that column
        # alone, from its spill if it has one, else from its Parquet file (spilling every shard
        # for them made the first query decode the whole version to local disk).
        with self._lock:
            if run.scales is None:
                run.scales = np.zeros(run.rows, np.float32)
            for o in np.unique(run.locate(at)[0]).tolist():
                if o in run.scaled:
                    continue
                spill = self._spills.get(o)
                col = spill[SCALE_COLUMN] if spill is not None else \
                    self.ds.read_shard_table(self.shards[o], columns=[SCALE_COLUMN])[SCALE_COLUMN]
                i = run.position[o]
                run.scales[run.starts[i]:run.stops[i]] = np.asarray(col, np.float32)
                run.scaled.add(o)
        return run.scales[at]

    def _codes(self, o: int, spill: dict[str, Any]) -> np.ndarray:
        """Shard `o`'s packed codes: a view of its index's (flat or HNSW), else its spill's (IVF
        keeps its codes in inverted lists)."""
        if self._flat is not None and o in self._flat.position:
            return self._flat.codes_of(o)
        codes = _codes_view(self.indexes[o])
        return spill["ubinary"] if codes is None else codes

    def _bits(self, o: int, index, tables: np.ndarray, rows: np.ndarray) -> np.ndarray:
        spill = self._spill(o)
        codes = self._codes(o, spill)
        valid = rows >= 0
        out = np.zeros(rows.shape, np.float32)
        r = rows[valid]
        out[valid] = bit_scores(codes[r], tables, np.nonzero(valid)[0], self._scales(spill, r))
        return out

    def _scales(self, spill: dict[str, Any], rows: np.ndarray) -> np.ndarray | None:
        """The sign-bit scales of `rows`, or None when the version is searched by the bits alone."""
        return spill[SCALE_COLUMN][rows] if self.scaled else None

    def fetch(self, shards: np.ndarray, rows: np.ndarray) -> tuple[list[str], np.ndarray]:
        """Ids and source rows of the rows `(shards[i], rows[i])` of this group, in that order.

        Args:
            shards, rows: aligned 1-D arrays of shard ordinals (of this group) and rows.
        """
        ids, source_rows = np.empty(len(rows), object), np.empty(len(rows), np.int64)
        for o in np.unique(shards):
            at = np.nonzero(shards == o)[0]
            spill = self._spill(int(o))
            ids[at] = spill["id"].take(pa.array(rows[at])).to_pylist()
            source_rows[at] = spill["source_row"][rows[at]]
        return ids.tolist(), source_rows

    def rescore(self, q: np.ndarray, mode: str, qidx: np.ndarray, shards: np.ndarray, rows: np.ndarray):
        """Scores, ids and source rows of candidates `(qidx, shard, row)`: all three in one call,
        so rescoring costs one round trip to an actor.

        Args:
            q: float32 queries (n, dim).
            mode: `int8`, `int8-raw` or `bits` (for ids alone, `fetch`).
            qidx, shards, rows: aligned 1-D arrays, one entry per candidate of this group.
        """
        if mode not in ("int8", "int8-raw", "bits"):
            raise ValueError(f"rescoring mode must be int8, int8-raw or bits, got {mode!r}; fetch reads ids alone")
        ids, source_rows = self.fetch(shards, rows)
        scores = np.empty(len(rows), np.float32)
        if mode == "bits":
            tables = bit_tables(q)
        else:
            w, offset = int8_query(q, self.ranges, mode)
        for o in np.unique(shards):
            at = np.nonzero(shards == o)[0]
            r = rows[at]
            spill = self._spill(int(o))
            if mode == "bits":
                scores[at] = bit_scores(self._codes(int(o), spill)[r], tables, qidx[at], self._scales(spill, r))
            elif "int8" not in spill:
                raise ValueError(f"shard {self.shards[int(o)].path} has no int8 vectors (the dataset "
                                 "was ingested without them): search with rescore='bits' or 'none'")
            else:
                scores[at] = int8_scores(spill["int8"][r], w[qidx[at]], offset[qidx[at]])
        return scores, ids, source_rows

    def close(self) -> None:
        self._spills.clear()
        self.indexes.clear()
        self._flat = None
        if self._remove_dir is not None:
            self._remove_dir()


class FlatRun:
    """Flat-index shards laid end to end in one `IndexBinaryFlat`: shard `ordinals[i]` holds its
    rows `[starts[i], stops[i])`. Filled by `append` in ordinal order, then `done`.

    Args:
        dim: bits per code.
        rows: the rows the shards' records give, all allocated at once: an index grown shard by
            shard would reallocate as it grows and leave the freed blocks in the heap (~1.5x the
            codes resident after opening, measured).
    """

    def __init__(self, dim: int, rows: int):
        self.index = faiss.IndexBinaryFlat(dim)
        self.rows = rows
        if rows:
            self.index.xb.resize(rows * self.index.code_size)
        self._filled = 0
        self._ordinals: list[int] = []
        self._starts: list[int] = []
        # Sign-bit scales of every row, filled shard by shard (`ShardGroup._flat_scales`).
        self.scales: np.ndarray | None = None
        self.scaled: set[int] = set()

    def append(self, o: int, index) -> None:
        """Copy shard `o`'s codes (a loaded `IndexBinaryFlat`, checked against its record) after
        those copied so far."""
        codes = _codes_view(index)
        n = 0 if codes is None else len(codes)
        if self._filled + n > self.rows:
            raise IntegrityError(f"shard indexes hold more than the {self.rows} rows their records give")
        self._ordinals.append(o)
        self._starts.append(self._filled)
        if n:
            width = self.index.code_size
            whole = faiss.rev_swig_ptr(self.index.xb.data(), self.rows * width).reshape(self.rows, width)
            whole[self._filled:self._filled + n] = codes
            self._filled += n

    def done(self) -> None:
        if self._filled != self.rows:
            raise IntegrityError(f"shard indexes hold {self._filled} rows, their records give {self.rows}")
        self.index.ntotal = self.rows
        self.ordinals = np.array(self._ordinals, np.int64)
        self.starts = np.array(self._starts, np.int64)
        self.stops = np.append(self.starts[1:], self.rows).astype(np.int64)
        self.position = {o: i for i, o in enumerate(self._ordinals)}

    def codes(self) -> np.ndarray:
        return _codes_view(self.index) if self.index.ntotal else np.zeros((0, self.index.code_size), np.uint8)

    def codes_of(self, o: int) -> np.ndarray:
        i = self.position[o]
        return self.codes()[self.starts[i]:self.stops[i]]

    def locate(self, at: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard ordinals, rows in their shard) of positions `at` of the joined index."""
        # The last shard starting at or before each position: an empty shard shares its start
        # with the next one, which is the one holding the row.
        i = np.searchsorted(self.starts, at, side="right") - 1
        return self.ordinals[i], (at - self.starts[i]).astype(np.int64)


def _columns(t: pa.Table, dim: int) -> dict[str, Any]:
    """Zero-copy numpy views of a memory-mapped spill (ids stay an Arrow array)."""
    def one(name):  # a single IPC batch is one chunk: viewing it copies nothing
        col = t[name]
        return col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()

    out: dict[str, Any] = {"id": one("id"), "source_row": one("source_row").to_numpy()}
    if "int8" in t.column_names:
        out["int8"] = one("int8").flatten().to_numpy().reshape(-1, dim)
    if "ubinary" in t.column_names:
        col, width = one("ubinary"), -(-dim // 8)
        data = np.frombuffer(col.buffers()[1], np.uint8) if len(col) else np.empty(0, np.uint8)
        out["ubinary"] = data[col.offset * width:(col.offset + len(col)) * width].reshape(-1, width)
    if SCALE_COLUMN in t.column_names:
        out[SCALE_COLUMN] = one(SCALE_COLUMN).to_numpy()
    return out


def _int8_top(index, q: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, rows) of the `m` best rows of a scalar-quantizer index per query, by score, then
    row. FAISS's heap keeps an arbitrary row of those that tie with the m-th score, so a query's
    rows are asked for (twice as many each time) until one scores below its m-th, and then sorted:
    the rows a binary index would keep, whatever the shards a version's rows lie in."""
    n = index.ntotal
    out_scores, out_rows = np.empty((len(q), m), np.float32), np.empty((len(q), m), np.int64)
    todo, k = np.arange(len(q)), min(n, 2 * m)
    while len(todo):
        scores, rows = index.search(np.ascontiguousarray(q[todo]), k)
        done = (scores[:, k - 1] < scores[:, m - 1]) | (k == n)
        order = np.lexsort((rows[done], -scores[done]))[:, :m]
        out_scores[todo[done]] = np.take_along_axis(scores[done], order, 1)
        out_rows[todo[done]] = np.take_along_axis(rows[done], order, 1)
        todo, k = todo[~done], min(n, 2 * k)
    return out_scores, out_rows


def _params(index, n: int, ef_search: int | None, nprobe: int | None):
    if isinstance(index, faiss.IndexBinaryHNSW):
        p = faiss.SearchParametersHNSW()
        # At most the shard's rows: FAISS allocates by it (a huge value ran the process out of memory).
        p.efSearch = max(n, min(ef_search or 2 * n, index.ntotal))
        return p
    if isinstance(index, faiss.IndexBinaryIVF):
        p = faiss.SearchParametersIVF()
        p.nprobe = min(index.nlist, nprobe or max(16, index.nlist // 8))
        return p
    return None
