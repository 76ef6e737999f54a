"""Search math without I/O: query-side scaling, candidate scores, the cross-shard merge and narrowing."""
from __future__ import annotations

import numpy as np

from workers.embedding.quantizer import range_steps

# Asymmetric candidates: the Hamming search keeps this many times k * multiplier candidates, and
# the float query against their sign bits picks the k * multiplier that go on to rescoring.
ASYMMETRIC_POOL = 4


def steps_of(ranges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mins, steps) of the int8 buckets, as the quantizer computed them for the corpus, except
    where a dimension's range is one value: its codes stand for that value, so its step here is
    0 (the quantizer's step of 1 there only spares a division by zero; decoded with it, code
    -128 read as min + 0.5, adding half the query's value there to every score)."""
    ranges = np.asarray(ranges, np.float32)
    mins, maxs, steps = range_steps(ranges, ranges.shape[1])
    return mins, np.where(maxs == mins, np.float32(0), steps).astype(np.float32)


def int8_query(q: np.ndarray, ranges: np.ndarray, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Fold the dequantization into the query: `score = codes @ w.T + offset`.

    `int8` scores against bucket centres, `mins + (code + 128.5) * steps` (the code
    `floor((x - min) / step) - 128` says x lies in that bucket, so its centre is the
    unbiased guess); `int8-raw` scores against the codes as they are.

    Args:
        q: float32 queries (n, dim).
        ranges: (2, dim) float32 ranges the codes were made with.
        mode: `int8` or `int8-raw`.

    Returns:
        (w, offset): float32 (n, dim) weights and (n,) offsets.
    """
    q = np.asarray(q, np.float32)
    if mode == "int8-raw":
        return q, np.zeros(len(q), np.float32)
    if mode != "int8":
        raise ValueError(f"int8 scoring mode must be int8 or int8-raw, got {mode!r}")
    mins, steps = steps_of(ranges)
    w = q * steps
    return w, q @ mins + np.float32(128.5) * w.sum(axis=1)


def int8_scores(codes: np.ndarray, w: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """Row-wise scores of candidate codes (t, dim) int8 against their queries' (t, dim) weights."""
    return np.einsum("ij,ij->i", codes.astype(np.float32), w) + offset


# Row v: the eight signs (+1 for a set bit, most significant first, as np.packbits packs) of byte v.
_BYTE_SIGNS = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).astype(np.float32) * 2 - 1


def bit_tables(q: np.ndarray) -> np.ndarray:
    """Per query, the score of every byte value at every byte position: (n, ceil(dim / 8), 256).

    A packed code then scores as the sum of one table entry per byte (a gather, no unpacking),
    the way BBQ / RaBitQ score a float query against sign bits. Each bit stands for
    ±1/sqrt(dim), the sign vector's unit-norm form; `bit_scores` applies each vector's stored
    correction (`workers.embedding.quantizer.sign_scales`, RaBitQ's) when the shard has it.
    """
    n, dim = q.shape
    width = -(-dim // 8)
    padded = np.zeros((n, width * 8), np.float32)
    padded[:, :dim] = q  # padding bits meet a zero weight
    return (padded.reshape(n, width, 8) @ _BYTE_SIGNS.T) / np.float32(np.sqrt(dim))


def bit_scores(codes: np.ndarray, tables: np.ndarray, qidx: np.ndarray,
               scales: np.ndarray | None = None) -> np.ndarray:
    """Scores of packed codes (t, width) against their queries' `bit_tables` (rows `qidx`, (t,)).

    With `scales` (t,), the codes' stored `sign_scales`, each score becomes the estimate of the
    inner product with the vector the code was made from; without (shards written before the
    scales were stored), the plain sign-vector score.
    """
    if not len(codes):
        return np.zeros(0, np.float32)
    scores = tables[qidx[:, None], np.arange(codes.shape[1])[None, :], codes].sum(axis=1)
    return scores if scales is None else scores * scales


def hamming_scores(distances: np.ndarray, dim: int) -> np.ndarray:
    """The cosine between sign vectors: `1 - 2 * hamming / dim`."""
    return 1 - 2 * np.asarray(distances, np.float32) / np.float32(dim)


def merge(keys: np.ndarray, shards: np.ndarray, rows: np.ndarray, n: int) -> np.ndarray:
    """Per query, positions of the `n` best candidates: smallest key, then shard, then row.

    The tie order (shard ordinal, then row) is the order of the shards' rows laid end to end,
    the order one combined FAISS index breaks ties in, so merging per-shard results equals
    searching all shards as one index. Padding (row -1) sorts last.

    Args:
        keys, shards, rows: (q, m) arrays of the candidates of every shard, any order.
        n: candidates to keep per query.
    """
    keys = np.where(rows < 0, np.inf, keys.astype(np.float64))
    order = np.lexsort((rows, shards, keys), axis=-1)
    return order[:, :n]


def top_by_score(scores: np.ndarray, valid: np.ndarray, k: int) -> np.ndarray:
    """Per query, positions of the `k` highest scores; ties keep candidate order (stable)."""
    s = np.where(valid, -scores.astype(np.float64), np.inf)
    return np.argsort(s, axis=-1, kind="stable")[:, :k]


def pool_sizes(k: int, multiplier: int, rows: int, index: str, asymmetric: bool) -> tuple[int, int]:
    """(Hamming pool, candidates kept) per query for top `k` of a version holding `rows`.

    Kept: `k * multiplier`. Pool: that (`hamming` candidates), `ASYMMETRIC_POOL` times that
    (`asymmetric`), or `k` (an int8 index, whose order is final). Neither goes past `rows`:
    a larger pool would hold only padding, as every row is a candidate already.
    """
    keep = min(k * multiplier, rows)
    pool = k if index == "int8" else keep * ASYMMETRIC_POOL if asymmetric else keep
    return min(pool, rows), keep


def narrow_candidates(keys: np.ndarray, shards: np.ndarray, rows: np.ndarray, bits: np.ndarray, pool: int,
                      keep: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per query, the global Hamming top `pool` of all groups' candidates, then (with `keep`) the
    `keep` best of those by bit score.

    The first step is `merge`: the pool one combined index would return. The second is the
    asymmetric step: the float query scored against the candidates' sign bits (`bits`, as
    `bit_scores` gives them) reorders the pool, ties kept in Hamming order. Neither depends on
    how rows are split into shards or groups, or on the order the groups answered in.

    Args:
        keys, shards, rows, bits: (q, m) candidates of every group side by side; row -1 is padding.
        pool: Hamming candidates kept per query.
        keep: asymmetric candidates kept per query; None: the Hamming pool, in Hamming order.

    Returns:
        (keys, shards, rows, bits), each (q, min(m, pool or keep)).
    """
    found = (keys, shards, rows, bits)
    pick = merge(keys, shards, rows, pool)
    found = tuple(np.take_along_axis(a, pick, axis=1) for a in found)
    if keep is not None:
        pick = top_by_score(found[3], found[2] >= 0, keep)
        found = tuple(np.take_along_axis(a, pick, axis=1) for a in found)
    return found
