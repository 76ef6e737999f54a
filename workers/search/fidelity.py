"""The fidelity estimate: what quantization costs in recall on a sample of the user's own data.

Part of the sample stands in for queries (chosen by seed), the rest for the corpus; the
truth is float32 exact search of the corpus. Two searches are measured against it, each
with the math the real search runs (`workers/search/rescore.py`):
- `recall_int8`: every corpus row scored by the float query against its int8 bucket centres
  (an int8 index);
- `recall_ubinary_int8`: the default search: the Hamming pool over the ubinary codes (ties
  in row order, as a FAISS flat index breaks them), narrowed by the float query against the
  sign bits with each vector's `ubinary_scale`, then rescored against the int8 codes.
Pure numpy: no Ray, no storage.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from workers.embedding.quantizer import quantize, sign_scales
from workers.search.rescore import (bit_scores, bit_tables, int8_query, int8_scores, merge, narrow_candidates,
                                    pool_sizes, top_by_score)

K = 10
RESCORE_MULTIPLIER = 6  # the search default (`SearchOptions.rescore_multiplier`)
# Held-out queries: a tenth of the sample, at most this many (recall over 200 queries x 10
# hits moves by 0.0005 per hit, finer than any choice it informs).
MAX_QUERIES = 200


def split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(query rows, corpus rows) of a sample of `n` rows: a tenth (1 to `MAX_QUERIES`) held out by
    seed, both in ascending row order. Needs n >= 2."""
    if n < 2:
        raise ValueError(f"a fidelity estimate needs at least 2 sampled rows, got {n}")
    q = max(1, min(MAX_QUERIES, n // 10))
    held = np.zeros(n, bool)
    held[np.random.default_rng(seed).permutation(n)[:q]] = True
    return np.flatnonzero(held), np.flatnonzero(~held)


def exact_top(queries: np.ndarray, corpus: np.ndarray, k: int) -> np.ndarray:
    """Per query, corpus rows of the `k` highest float32 inner products (ties: lower row first)."""
    return top_by_score(queries @ corpus.T, np.ones((len(queries), len(corpus)), bool), k)


def int8_top(queries: np.ndarray, codes: np.ndarray, ranges: np.ndarray, k: int) -> np.ndarray:
    """Per query, corpus rows of the `k` best int8 scores over every row (an int8 index)."""
    w, offset = int8_query(queries, ranges, "int8")
    scores = codes.astype(np.float32) @ w.T + offset  # (rows, queries): int8_scores for all pairs
    return top_by_score(scores.T, np.ones(scores.T.shape, bool), k)


def default_top(queries: np.ndarray, ubinary: np.ndarray, scales: np.ndarray, codes: np.ndarray,
                ranges: np.ndarray, k: int, multiplier: int = RESCORE_MULTIPLIER) -> np.ndarray:
    """Per query, corpus rows the default search returns: Hamming pool, asymmetric narrowing, int8 rescoring."""
    nq, rows = len(queries), len(ubinary)
    pool, keep = pool_sizes(k, multiplier, rows, "binary", asymmetric=True)
    qbin = quantize(queries, None, "ubinary")
    # Hamming distances in query blocks: (block, rows, bytes) stays a few MB.
    hamming = np.concatenate([np.bitwise_count(qbin[a:a + 32, None, :] ^ ubinary[None, :, :]).sum(axis=2)
                              for a in range(0, nq, 32)]).astype(np.float64)
    cand = np.broadcast_to(np.arange(rows), (nq, rows))
    no_shard = np.zeros((nq, rows), np.int64)
    # What one shard group gives (`ShardGroup.candidates`): the Hamming top `pool` with bit scores...
    pick = merge(hamming, no_shard, cand, pool)
    keys, rows_ = (np.take_along_axis(a, pick, axis=1) for a in (hamming, cand))
    qidx = np.broadcast_to(np.arange(nq)[:, None], rows_.shape).ravel()
    bits = bit_scores(ubinary[rows_.ravel()], bit_tables(queries), qidx, scales[rows_.ravel()]).reshape(rows_.shape)
    # ...and what the searcher does with them.
    _, _, found, _ = narrow_candidates(keys, np.zeros(rows_.shape, np.int64), rows_, bits, pool, keep)
    w, offset = int8_query(queries, ranges, "int8")
    qi = np.broadcast_to(np.arange(nq)[:, None], found.shape).ravel()
    scores = int8_scores(codes[found.ravel()], w[qi], offset[qi]).reshape(found.shape)
    return np.take_along_axis(found, top_by_score(scores, found >= 0, k), axis=1)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Share of the true top-k rows found, over all queries."""
    hits = sum(len(set(f.tolist()) & set(t.tolist())) for f, t in zip(found, truth))
    return hits / truth.size


def fidelity(embeddings: np.ndarray, ranges: np.ndarray, seed: int, k: int = K) -> dict[str, Any]:
    """The fidelity estimate of `ranges` on float32 `embeddings` (n >= 2 rows, sample order).

    Args:
        embeddings: the sample's float32 embeddings, in a fixed order (the sample's key order).
        ranges: (2, dim) float32 ranges to quantize with.
        seed: chooses the held-out queries (`split`).
        k: hits per query; fewer when the corpus holds fewer rows.

    Returns:
        `{"queries", "k", "recall_int8", "recall_ubinary_int8"}`, recalls rounded to 4 places.
    """
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    qrows, crows = split(len(x), seed)
    queries, corpus = x[qrows], x[crows]
    k = min(k, len(corpus))
    truth = exact_top(queries, corpus, k)
    codes = quantize(corpus, ranges, "int8")
    return {"queries": int(len(queries)), "k": int(k),
            "recall_int8": round(recall(int8_top(queries, codes, ranges, k), truth), 4),
            "recall_ubinary_int8": round(recall(default_top(queries, quantize(corpus, None, "ubinary"),
                                                            sign_scales(corpus), codes, ranges, k), truth), 4)}
