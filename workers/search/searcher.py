"""Searching a committed dataset version: open it once, then query it many times over a thread pool.

`workers/search/ray_searcher.py` runs the same search with Ray actors holding groups of shards.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

import numpy as np

from ranges.manifest import RangeManifest
from workers.lake.dataset import open_version
from workers.lake.records import VersionManifest
from workers.embedding.encoder import Encoder, EncoderConfig, model_fingerprint, resolve_model, resolve_model_name
from workers.embedding.quantizer import quantize
from workers.search.rescore import hamming_scores, merge, top_by_score
from workers.vocab import CANDIDATE_MODES, RESCORE_MODES, SEARCH_INDEXES, CandidateMode, RescoreMode, SearchIndex, check
from workers.search.shard_group import ShardGroup

# Queries searched together: bounds the candidate arrays, whatever the size of a queries file.
QUERY_BATCH = 256
# Asymmetric candidates: the Hamming search keeps this many times k * multiplier candidates, and
# the float query against their sign bits picks the k * multiplier that go on to int8 rescoring.
ASYMMETRIC_POOL = 4


@dataclass(frozen=True)
class SearchOptions:
    """How one search runs.

    Args:
        k: hits per query (a search asks for at most the version's rows).
        rescore_multiplier: binary candidates per hit that go on to rescoring.
        rescore: candidate scoring after the Hamming search: `int8` (float query against the
            int8 bucket centres, the default), `int8-raw` (against the codes as they are),
            `bits` (against the sign bits), `none` (Hamming order).
        candidates: `asymmetric` (the default: a Hamming pool `ASYMMETRIC_POOL` times wider,
            narrowed by the float query against the sign bits) or `hamming` (the Hamming
            top k * multiplier as they are).
        ef_search, nprobe: search breadth of HNSW / IVF shard indexes (None: a default).
    """

    k: int = 10
    rescore_multiplier: int = 4
    rescore: RescoreMode = "int8"
    candidates: CandidateMode = "asymmetric"
    ef_search: int | None = None
    nprobe: int | None = None

    def __post_init__(self):
        if self.k < 1 or self.rescore_multiplier < 1:
            raise ValueError(f"k and rescore_multiplier must be >= 1, got {self.k} and {self.rescore_multiplier}")
        check(self.rescore, RESCORE_MODES, "rescore")
        check(self.candidates, CANDIDATE_MODES, "candidates")


@dataclass(frozen=True)
class Hit:
    """One result: the document id, its score, and where its vectors live (shard id, row)."""

    id: str
    score: float
    shard: str
    row: int
    source_row: int

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "score": self.score, "shard": self.shard, "row": self.row}


def check_dataset(doc: VersionManifest, ranges: RangeManifest, fingerprint: str, model: str) -> None:
    """Raise unless the version, its range manifest and the query encoder belong together."""
    want = doc.model.fingerprint
    if fingerprint != want:
        raise ValueError(f"model {model} has fingerprint {fingerprint}, but version {doc.version} was "
                         f"encoded with {doc.model.name} ({want}): its queries would land in another "
                         "vector space; search with --model set to that model")
    if ranges.id != doc.ranges.id:
        raise ValueError(f"range manifest {doc.ranges.path} has id {ranges.id}, but version "
                         f"{doc.version} was quantized with ranges {doc.ranges.id}: queries would "
                         "be quantized differently from the corpus; restore that range manifest")
    # That the ranges are the version model's (fingerprint, dim) is the reader's check (`read_ranges`).


def open_checked(url: str, version: int | None, storage_options, model: str | None):
    """(opened version, its range manifest, folder of the query model), after `check_dataset`.

    The model is the one the user names (`model`: a folder or a cached name); without one, the
    version's `model.name` is looked up as a name only (`resolve_model_name`), so a manifest
    never chooses a folder to hash or load. Its fingerprint is only compared with the model's.
    """
    ds = open_version(url, version, storage_options)
    ranges = ds.read_ranges()
    if model:
        name, path = model, resolve_model(model)
    else:
        name = ds.manifest.model.name
        path = resolve_model_name(name, f"version {ds.version} of {ds.url}")
    check_dataset(ds.manifest, ranges, model_fingerprint(path), name)
    return ds, ranges, str(path)


class Searcher:
    """A version opened for search: shard indexes loaded once, queries fanned out over threads.

    Open with `Searcher.open(url, version=None, storage_options=None, model=None)`; close (or
    use as a context manager) to drop the local spill of int8 rows.
    """

    def __init__(self, url: str, storage_options, doc: dict, ranges: RangeManifest, model: str,
                 groups: list, owner: np.ndarray, threads: int, index: str, cache_dir: str | None = None):
        self.url, self.storage_options = url, dict(storage_options or {})
        self.manifest, self.ranges, self.model, self.index = doc, ranges, model, index
        self.version = doc.number
        self.dim = ranges.dim
        self._groups, self._owner = groups, owner
        self._shard_ids = [s.id for s in doc.shards]
        self.rows = doc.rows
        self._pool = ThreadPoolExecutor(threads) if threads > 1 else None
        self._cache_dir = cache_dir
        self._encoder: Encoder | None = None

    @classmethod
    def open(cls, url: str, version: int | None = None, storage_options: Mapping[str, Any] | None = None,
             model: str | None = None, *, index: SearchIndex = "binary",
             threads: int | None = None, cache_dir: str | None = None) -> "Searcher":
        """Open version `version` (latest when None) of the dataset at `url`.

        Args:
            url, storage_options: dataset root and its fsspec options.
            version: committed version number; None for the latest.
            model: query encoder (folder or cached name); None: the one the version names, if
                that is the bundled model or a Hugging Face cache entry (never a path).
            index: `binary` (shard FAISS binary indexes, rescoring from int8 rows read on
                demand) or `int8` (one-byte scalar-quantizer indexes built at open).
            threads: shards searched at once (default: the CPUs this process may use).
            cache_dir: local folder for decoded shard columns (default: a temporary one).
        """
        check(index, SEARCH_INDEXES, "index")
        ds, ranges, name = open_checked(url, version, storage_options, model)
        doc = ds.manifest
        threads = threads or len(os.sched_getaffinity(0))
        own = cache_dir is None
        cache_dir = tempfile.mkdtemp(prefix="quantlake-search-") if own else cache_dir
        shards = doc.shards

        def group(o: int) -> ShardGroup:
            return ShardGroup(ds, [o], ranges.ranges, index, cache_dir)

        try:
            with ThreadPoolExecutor(max(1, threads)) as pool:
                groups = list(pool.map(group, range(len(shards))))
        except BaseException:
            if own:
                shutil.rmtree(cache_dir, ignore_errors=True)
            raise
        return cls(url, storage_options, doc, ranges, name, groups, np.arange(len(shards)), threads, index,
                   cache_dir if own else None)

    def _map(self, calls: list[tuple[Any, str, tuple]]) -> list:
        """Run `group.method(*args)` for each call, in parallel; results in call order."""
        if self._pool is None or len(calls) < 2:
            return [getattr(g, m)(*a) for g, m, a in calls]
        return list(self._pool.map(lambda c: getattr(c[0], c[1])(*c[2]), calls))

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Float32 query embeddings, by the version's model (loaded on first use)."""
        if self._encoder is None:
            norm = self.manifest.model.normalize
            self._encoder = Encoder(EncoderConfig(model=self.model, normalize=norm))
        return self._encoder.encode(list(texts))

    def search(self, queries: str | Sequence[str], k: int = 10, **options) -> list[Hit] | list[list[Hit]]:
        """Hits for one query text (a list of hits) or several (a list per query, in order).

        Args:
            queries: a text, or a sequence of texts (encoded in batches, the model loaded once).
            k, options: `SearchOptions` fields.
        """
        single = isinstance(queries, str)
        texts = [queries] if single else list(queries)
        hits = self.search_vectors(self.encode(texts), k, **options) if texts else []
        return hits[0] if single else hits

    def search_vectors(self, q: np.ndarray, k: int = 10, **options) -> list[list[Hit]]:
        """Hits for float32 query embeddings (n, dim) made by the version's model.

        At most the version's rows come back per query, however large `k`: candidate arrays
        are sized by k, so an uncapped k would allocate for rows that do not exist.
        """
        opts = SearchOptions(k=k, **options)
        q = np.ascontiguousarray(q, np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must be float32 (n, {self.dim}), got shape {q.shape}")
        if self.rows == 0:
            return [[] for _ in range(len(q))]
        opts = replace(opts, k=min(opts.k, self.rows))
        out: list[list[Hit]] = []
        for a in range(0, len(q), QUERY_BATCH):
            out += self._search_batch(q[a:a + QUERY_BATCH], opts)
        return out

    def _search_batch(self, q: np.ndarray, o: SearchOptions) -> list[list[Hit]]:
        if not self._groups:  # a version with no shards holds no documents: nothing matches
            return [[] for _ in range(len(q))]
        # Pools past the version's rows would hold only padding: every row is a candidate already.
        n = min(o.k * o.rescore_multiplier, self.rows)
        asymmetric = o.candidates == "asymmetric" and self.index == "binary"
        pool = min(o.k if self.index == "int8" else n * ASYMMETRIC_POOL if asymmetric else n, self.rows)
        qbin = quantize(q, None, "ubinary")
        parts = self._map([(g, "candidates", (q, qbin, pool, asymmetric, o.ef_search, o.nprobe))
                           for g in self._groups])
        found = [np.concatenate(x, axis=1) for x in zip(*parts)]
        # The global Hamming top `pool`, as one combined index would return it, then (asymmetric)
        # the best `n` of those by bit score: neither depends on how rows are split into shards.
        pick = merge(found[0], found[1], found[2], pool)
        keys, shards, rows, bits = (np.take_along_axis(a, pick, axis=1) for a in found)
        if asymmetric:
            pick = top_by_score(bits, rows >= 0, n)
            keys, shards, rows, bits = (np.take_along_axis(a, pick, axis=1) for a in (keys, shards, rows, bits))
        valid = rows >= 0
        mode = o.rescore
        if self.index == "int8" or (asymmetric and mode == "bits"):
            mode = "none"
        scores = np.zeros(rows.shape, np.float32)
        ids = np.empty(rows.shape, object)
        source_rows = np.zeros(rows.shape, np.int64)
        qidx = np.broadcast_to(np.arange(len(q))[:, None], rows.shape)
        owner = np.where(valid, self._owner[np.where(valid, shards, 0)], -1)
        calls, masks = [], []
        for g in np.unique(owner[valid]):
            m = owner == g
            masks.append(m)
            calls.append((self._groups[g], "rescore", (q, mode, qidx[m], shards[m], rows[m])))
        for m, (s, i, r) in zip(masks, self._map(calls)):
            if s is not None:
                scores[m] = s
            ids[m], source_rows[m] = i, r
        if mode == "none":
            scores = (-keys).astype(np.float32) if self.index == "int8" else bits if asymmetric \
                else hamming_scores(keys, self.dim)
        top = top_by_score(scores, valid, o.k)
        return [[Hit(ids[i, j], float(scores[i, j]), self._shard_ids[shards[i, j]], int(rows[i, j]),
                     int(source_rows[i, j])) for j in top[i] if valid[i, j]] for i in range(len(q))]

    def sample(self, n: int, seed: int = 0) -> list[Hit]:
        """`n` distinct documents drawn by seed, as hits (score NaN)."""
        counts = np.array([s.rows for s in self.manifest.shards], np.int64)
        total = int(counts.sum())
        if n > total:
            raise ValueError(f"cannot sample {n} documents from a version holding {total}")
        flat = np.sort(np.random.default_rng(seed).choice(total, n, replace=False))
        shards = np.searchsorted(np.cumsum(counts), flat, side="right")
        rows = flat - np.concatenate([[0], np.cumsum(counts)])[shards]
        out = []
        for s, r in zip(shards, rows):
            _, ids, src = self._map([(self._groups[self._owner[s]], "rescore",
                                      (np.zeros((1, self.dim), np.float32), "none", np.zeros(1, np.int64),
                                       np.array([s]), np.array([r])))])[0]
            out.append(Hit(ids[0], float("nan"), self._shard_ids[s], int(r), int(src[0])))
        return out

    def resident_bytes(self) -> int:
        """Bytes of the indexes held in memory (int8 rows stay in memory-mapped files)."""
        return sum(self._map([(g, "resident_bytes", ()) for g in self._groups]))

    def close(self) -> None:
        for g in self._groups:
            g.close()
        if self._pool is not None:
            self._pool.shutdown()
        if self._cache_dir:
            shutil.rmtree(self._cache_dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def dumps_hits(query: str, hits: Sequence[Hit]) -> str:
    """One JSON Lines record: `{"query": ..., "hits": [{"id", "score", "shard", "row"}, ...]}`."""
    return json.dumps({"query": query, "hits": [h.to_dict() for h in hits]}, ensure_ascii=False)
