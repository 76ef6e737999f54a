"""Searching a committed dataset version: open it once, then query it many times.

The shards are held in groups by a backend (`workers/search/backends.py`: threads in this
process, or Ray actors); the candidate and scoring math is `workers/search/rescore.py`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

import numpy as np

from ranges.manifest import RangeManifest
from workers.lake.dataset import open_version
from workers.lake.records import VersionManifest
from workers.lake.redact import redact_url
from workers.embedding.encoder import Encoder, EncoderConfig, encoder_fingerprint, resolve_model, resolve_model_name
from workers.embedding.quantizer import quantize
from workers.search.backends import RayShardGroups, ShardGroups, ThreadShardGroups
from workers.search.rescore import hamming_scores, narrow_candidates, pool_sizes, top_by_score
from workers.vocab import (CANDIDATE_MODES, INDEX_FLAGS, RESCORE_MODES, SEARCH_BACKENDS, SEARCH_INDEXES, CandidateMode,
                           RescoreMode, SearchBackend, SearchIndex, check, whole_number)

# Queries searched together: bounds the candidate arrays, whatever the size of a queries file.
QUERY_BATCH = 256

# The search-breadth options and the shard index class each one sets: (option, flag, class, kind).
BREADTH_OPTIONS = (("ef_search", "--ef-search", "IndexBinaryHNSW", "HNSW"),
                   ("nprobe", "--nprobe", "IndexBinaryIVF", "IVF"))
# Their most: FAISS takes a C int (and HNSW's ef_search is also capped at a shard's rows, which
# FAISS allocates by: a huge one ran the process out of memory).
MAX_BREADTH = 2 ** 31 - 1


@dataclass(frozen=True)
class SearchOptions:
    """How one search runs.

    Args:
        k: hits per query (a search asks for at most the version's rows).
        rescore_multiplier: binary candidates per hit that go on to rescoring. 6 is where recall of
            float32's top 10 passes 0.98 on both benchmark corpora (README, Benchmarks); raise it for
            recall, lower it for speed.
        rescore: candidate scoring after the Hamming search: `int8` (float query against the
            int8 bucket centres, the default), `int8-raw` (against the codes as they are),
            `bits` (against the sign bits), `none` (the candidates' order: Hamming's, or, with
            asymmetric candidates, the sign-bit estimate's, as `bits`).
        candidates: `asymmetric` (the default: a Hamming pool `ASYMMETRIC_POOL` times wider,
            narrowed by the float query against the sign bits) or `hamming` (the Hamming
            top k * multiplier as they are).
        ef_search, nprobe: search breadth of HNSW / IVF shard indexes (None: a default); a search
            of a version without such indexes refuses the option rather than ignore it.
    """

    k: int = 10
    rescore_multiplier: int = 6
    rescore: RescoreMode = "int8"
    candidates: CandidateMode = "asymmetric"
    ef_search: int | None = None
    nprobe: int | None = None

    def __post_init__(self):
        # A numpy integer reached FAISS, which takes Python ints only; True passed for 1.
        for name in ("k", "rescore_multiplier", "ef_search", "nprobe"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, whole_number(value, name))
        if self.k < 1 or self.rescore_multiplier < 1:
            raise ValueError(f"k and rescore_multiplier must be >= 1, got {self.k} and {self.rescore_multiplier}")
        for name in ("ef_search", "nprobe"):  # 0 read as "not given", a negative one reached FAISS
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (or left out for its default), got {getattr(self, name)}")
            if getattr(self, name) is not None and getattr(self, name) > MAX_BREADTH:  # FAISS takes an int
                raise ValueError(f"{name} must be at most {MAX_BREADTH} (a shard's rows are a search's most), "
                                 f"got {getattr(self, name)}")
        check(self.rescore, RESCORE_MODES, "rescore")
        check(self.candidates, CANDIDATE_MODES, "candidates")


@dataclass(frozen=True)
class Hit:
    """One result: the document id, its score, and where its vectors live (shard id, row, source row).

    Where it lives serves the text output and reading the source text back; `to_dict` (`--json`)
    leaves it out: the id names the document, and shards and rows change when a version is rebuilt.
    """

    id: str
    score: float
    shard: str
    row: int
    source_row: int

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "score": self.score}


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
    # Queries are encoded exactly like the version's documents: with its backend too (the
    # fingerprint records it), so the comparison is of the model's files alone.
    check_dataset(ds.manifest, ranges, encoder_fingerprint(path, ds.manifest.model.backend), name)
    return ds, ranges, str(path)


def sample_rows(shard_rows: Sequence[int], n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(shard ordinals, rows) of `n` distinct rows drawn by `seed`, in the order of the rows laid end
    to end: the same rows for the same seed and version, however its shards are held.

    Args:
        shard_rows: rows of each shard, in the version's order.
        n: rows to draw (at most their sum).
    """
    counts = np.asarray(shard_rows, np.int64)
    total = int(counts.sum())
    if n > total:
        raise ValueError(f"cannot sample {n} documents from a version holding {total}")
    flat = np.sort(np.random.default_rng(seed).choice(total, n, replace=False))
    shards = np.searchsorted(np.cumsum(counts), flat, side="right")
    return shards, flat - np.concatenate([[0], np.cumsum(counts)])[shards]


def _layout(manifest: VersionManifest) -> tuple[list[str], list[int]]:
    """The ids and row counts of a version's shards, in its order: what search reads of the shard list."""
    return [s.id for s in manifest.shards], [s.rows for s in manifest.shards]


class Searcher:
    """A version opened for search: shard indexes loaded once into groups held by a backend.

    Open with `Searcher.open(url, ...)`; close (or use as a context manager) to drop the groups,
    their local spill of int8 rows, and a Ray instance the opening started.

    Args:
        url, storage_options: the dataset root and its fsspec options.
        manifest: the opened version's manifest (checked by the reader and `check_dataset`).
        ranges: its range manifest.
        model: folder of the query encoder.
        index: `binary` or `int8`, as the groups were loaded.
        groups: the backend holding every shard of the version.
    """

    def __init__(self, *, url: str, storage_options: Mapping[str, Any] | None, manifest: VersionManifest,
                 ranges: RangeManifest, model: str, index: SearchIndex, groups: ShardGroups):
        self.url, self.storage_options = url, dict(storage_options or {})
        self.manifest, self.ranges, self.model, self.index = manifest, ranges, model, index
        self.groups = groups
        self._closed = False
        self.dim = ranges.dim
        self.version = manifest.number
        self._normalize = manifest.model.normalize
        self._shard_ids, self._shard_rows = _layout(manifest)
        self.rows = sum(self._shard_rows)
        self._encoder: Encoder | None = None

    @classmethod
    def open(cls, url: str, version: int | None = None, storage_options: Mapping[str, Any] | None = None,
             model: str | None = None, *, index: SearchIndex = "binary", backend: SearchBackend = "threads",
             threads: int | None = None, cache_dir: str | None = None, actors: int | None = None,
             actor_cpus: float = 1.0, ray_address: str | None = None) -> "Searcher":
        """Open version `version` (latest when None) of the dataset at `url`.

        Args:
            url, storage_options: dataset root and its fsspec options.
            version: committed version number; None for the latest.
            model: query encoder (folder or cached name); None: the one the version names, if
                that is the bundled model or a Hugging Face cache entry (never a path).
            index: `binary` (shard FAISS binary indexes, rescoring from int8 rows read on
                demand) or `int8` (one-byte scalar-quantizer indexes built at open).
            backend: `threads` (every shard in this process, searched over a thread pool) or
                `ray` (groups of shards held by Ray actors; the same results).
            threads, cache_dir (`threads`): shard groups searched at once, one per thread, and
                shards loaded at once (default: the CPUs this process may use); local folder for
                decoded shard columns (default: a temporary one).
            actors, actor_cpus, ray_address (`ray`): actors (default: one per CPU of the cluster)
                and the CPUs each reserves; the cluster to join when Ray is not running yet (the
                rule is `workers/ray_session.py`'s; `close()` stops an instance this started).
        """
        url = os.fspath(url)  # a pathlib.Path too
        check(index, SEARCH_INDEXES, "index")
        check(backend, SEARCH_BACKENDS, "backend")
        # An option of the other backend would be ignored silently: refuse it instead.
        other = "threads" if backend == "ray" else "ray"
        given = {"threads": threads, "cache_dir": cache_dir} if other == "threads" else \
            {"actors": actors, "actor_cpus": None if actor_cpus == 1.0 else actor_cpus, "ray_address": ray_address}
        stray = [name for name, value in given.items() if value is not None]
        if stray:
            raise ValueError(f"{', '.join(stray)}: only for backend={other!r}, not {backend!r}; leave "
                             f"{'it' if len(stray) == 1 else 'them'} out, or open with backend={other!r}")
        for name, value in (("threads", threads), ("actors", actors)):  # 0 was read as the default
            if value is not None and whole_number(value, name) < 1:
                raise ValueError(f"{name} must be >= 1 (or left out for the default), got {value}")
        ds, ranges, name = open_checked(url, version, storage_options, model)
        if index == "int8" and "int8" not in ds.manifest.precisions:
            raise ValueError(f"version {ds.version} of {redact_url(url)} holds no int8 vectors (ingested with "
                             f"precisions {', '.join(ds.manifest.precisions)}): search it with the binary index "
                             "(the default; index='binary'), not --index int8")
        if backend == "ray":
            groups: ShardGroups = RayShardGroups.open(
                url, storage_options, ds.version, _layout(ds.manifest)[1], ranges.ranges, index,
                actors=actors, actor_cpus=actor_cpus, ray_address=ray_address)
        else:
            groups = ThreadShardGroups.open(ds, ranges.ranges, index, threads=threads, cache_dir=cache_dir)
        return cls(url=url, storage_options=storage_options, manifest=ds.manifest, ranges=ranges, model=name,
                   index=index, groups=groups)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Float32 query embeddings, by the version's model and encoder backend (loaded on first use)."""
        if self._encoder is None:
            # Queries come a few at a time: no tokenizing ahead, and so no tokenizer threads in a
            # process that a server may fork.
            self._encoder = Encoder(EncoderConfig(model=self.model, normalize=self._normalize,
                                                  backend=self.manifest.model.backend, prepare_ahead=False))
        return self._encoder.encode(list(texts))

    def search(self, queries: str | Sequence[str], k: int = 10, **options) -> list[Hit] | list[list[Hit]]:
        """Hits for one query text (a list of hits) or several (a list per query, in order).

        Args:
            queries: a text, or a sequence of texts (encoded in batches, the model loaded once).
            k, options: `SearchOptions` fields.
        """
        self._options(k, options)  # refused before the model is loaded and the texts encoded
        single = isinstance(queries, str)
        texts = [queries] if single else list(queries)
        if any(not isinstance(t, str) for t in texts):
            raise TypeError(f"queries must be a text or texts, got {next(t for t in texts if not isinstance(t, str))!r}"
                            " among them (search_vectors takes embeddings)")
        hits = self.search_vectors(self.encode(texts), k, **options) if texts else []
        return hits[0] if single else hits

    def search_vectors(self, q: np.ndarray, k: int = 10, **options) -> list[list[Hit]]:
        """Hits for float32 query embeddings (n, dim) made by the version's model.

        At most the version's rows come back per query, however large `k`: candidate arrays
        are sized by k, so an uncapped k would allocate for rows that do not exist.
        """
        opts = self._options(k, options)
        q = np.ascontiguousarray(q, np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must be float32 (n, {self.dim}), got shape {q.shape}")
        bad = np.flatnonzero(~np.isfinite(q).all(axis=1)) if q.size else ()
        if len(bad):  # the quantizer's own message speaks of embeddings to drop before an ingest
            raise ValueError(f"query {int(bad[0])} holds NaN or inf: query embeddings must be finite")
        if self.rows == 0:  # a version with no rows holds no documents: nothing matches
            return [[] for _ in range(len(q))]
        opts = replace(opts, k=min(opts.k, self.rows))
        out: list[list[Hit]] = []
        for a in range(0, len(q), QUERY_BATCH):
            out += self._search_batch(q[a:a + QUERY_BATCH], opts)
        return out

    def _options(self, k: int, options: dict[str, Any]) -> SearchOptions:
        """The options of a search, checked against what this version holds (and that it is open)."""
        self._check_open()
        opts = SearchOptions(k=k, **options)
        if opts.rescore in ("int8", "int8-raw") and "int8" not in self.manifest.precisions:
            raise ValueError(f"version {self.manifest.version} of {redact_url(self.url)} holds no int8 vectors to "
                             f"rescore with (ingested with precisions {', '.join(self.manifest.precisions)}): "
                             "search with --rescore bits or --rescore none (rescore='bits' or 'none')")
        self._check_breadth(opts)
        # The int8 indexes score every row as int8 rescoring would: another way of scoring or of
        # finding candidates would be ignored silently.
        if self.index == "int8" and (opts.rescore in ("int8-raw", "bits") or opts.candidates != "asymmetric"):
            given = f"--rescore {opts.rescore}" if opts.rescore in ("int8-raw", "bits") else \
                f"--candidates {opts.candidates}"
            raise ValueError(f"{given}: only for the binary indexes, not the int8 indexes that --index int8 "
                             "(index='int8') builds, whose scores are int8 rescoring's already; leave it out")
        return opts

    def _check_breadth(self, opts: SearchOptions) -> None:
        """Refuse a search-breadth option that no index of this search reads: it would be ignored
        silently (an HNSW index has no lists to probe, a flat or int8 one searches every row)."""
        classes = sorted({s.index_class for s in self.manifest.shards}) or \
            [self.manifest.option("index_type") or "IndexBinaryFlat"]
        flags = {cls: flag for flag, cls in INDEX_FLAGS.items()}
        for name, flag, cls, kind in BREADTH_OPTIONS:
            if getattr(opts, name) is None:
                continue
            if self.index == "int8":
                raise ValueError(f"{flag} ({name}): only for {kind} shard indexes, not the int8 indexes that "
                                 "--index int8 (index='int8') builds; leave it out")
            if cls in classes:
                continue
            held = ", ".join(f"{c} (--index-type {flags.get(c, '?')})" for c in classes)
            others = [f"{f} ({n}) for its {k} indexes" for n, f, c, k in BREADTH_OPTIONS if c in classes]
            raise ValueError(f"{flag} ({name}): only for {kind} shard indexes, not {held}, which version "
                             f"{self.manifest.version} of {redact_url(self.url)} holds; leave it out"
                             + (f", or set {others[0]}" if others else ": a flat index compares every row"))

    def _search_batch(self, q: np.ndarray, o: SearchOptions) -> list[list[Hit]]:
        asymmetric = o.candidates == "asymmetric" and self.index == "binary"
        pool, keep = pool_sizes(o.k, o.rescore_multiplier, self.rows, self.index, asymmetric)
        found = self.groups.candidates(q, quantize(q, None, "ubinary"), pool, asymmetric, o.ef_search, o.nprobe)
        # The global Hamming top `pool`, as one combined index would return it, then (asymmetric)
        # the best `keep` of those by bit score: neither depends on how rows are split into shards.
        keys, shards, rows, bits = narrow_candidates(*found, pool, keep if asymmetric else None)
        valid = rows >= 0
        mode = o.rescore
        if self.index == "int8" or (asymmetric and mode == "bits"):
            mode = "none"  # the candidates are in their final order already
        scores = np.zeros(rows.shape, np.float32)
        ids = np.empty(rows.shape, object)
        source_rows = np.zeros(rows.shape, np.int64)
        if mode == "none":
            ids[valid], source_rows[valid] = self.groups.fetch(shards[valid], rows[valid])
            scores = (-keys).astype(np.float32) if self.index == "int8" else bits if asymmetric \
                else hamming_scores(keys, self.dim)
        else:
            qidx = np.broadcast_to(np.arange(len(q))[:, None], rows.shape)
            scores[valid], ids[valid], source_rows[valid] = self.groups.rescore(
                q, mode, qidx[valid], shards[valid], rows[valid])
        top = top_by_score(scores, valid, o.k)
        return [[Hit(ids[i, j], float(scores[i, j]), self._shard_ids[shards[i, j]], int(rows[i, j]),
                     int(source_rows[i, j])) for j in top[i] if valid[i, j]] for i in range(len(q))]

    def sample(self, n: int, seed: int = 0) -> list[Hit]:
        """`n` distinct documents drawn by seed (`sample_rows`), as hits (score NaN)."""
        self._check_open()
        n = whole_number(n, "n")
        if n < 0:
            raise ValueError(f"cannot sample {n} documents: n must be >= 0")
        shards, rows = sample_rows(self._shard_rows, n, seed)
        ids, source_rows = self.groups.fetch(shards, rows)
        return [Hit(i, float("nan"), self._shard_ids[s], int(r), int(src))
                for i, s, r, src in zip(ids, shards, rows, source_rows)]

    def resident_bytes(self) -> int:
        """Bytes of the indexes held in memory (int8 rows stay in memory-mapped files)."""
        self._check_open()  # a closed searcher holds none, whatever its records say
        return self.groups.resident_bytes()

    def close(self) -> None:
        self.groups.close()
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"this Searcher of version {self.version} of {redact_url(self.url)} is closed "
                               "(close(), or the end of its with block): open another")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def dumps_hits(query: str, hits: Sequence[Hit]) -> str:
    """One JSON Lines record: `{"query": ..., "hits": [{"id", "score"}, ...]}`."""
    return json.dumps({"query": query, "hits": [h.to_dict() for h in hits]}, ensure_ascii=False)
