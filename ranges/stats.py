"""Mergeable per-dimension statistics of embeddings, and the calibration ranges they give."""
from __future__ import annotations

from dataclasses import dataclass
from functools import reduce
from typing import Iterable, Literal

import numpy as np

Method = Literal["minmax", "quantile"]


@dataclass(frozen=True)
class PartialStats:
    """Statistics of some embeddings; `merge` of two is the statistics of their union.

    `values` keeps every value, sorted per dimension, and is only present when quantile
    ranges are wanted: exact order statistics need them, and a calibration sample
    (10k x 384 float32 is 15 MB) is small enough that exactness beats a sketch.
    """

    count: int
    minimum: np.ndarray  # (dim,) float32
    maximum: np.ndarray  # (dim,) float32
    values: np.ndarray | None = None  # (count, dim) float32, each column sorted

    @property
    def dim(self) -> int:
        return int(self.minimum.shape[0])


def partial_stats(embeddings: np.ndarray, keep_values: bool = False) -> PartialStats:
    """Statistics of one batch.

    Args:
        embeddings: float32 array of shape (n, dim), n >= 1.
        keep_values: keep the sorted values, needed for quantile ranges.
    """
    x = np.asarray(embeddings)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"partial_stats needs a non-empty (n, dim) array, got shape {x.shape}")
    if x.dtype != np.float32:
        raise ValueError(f"partial_stats needs float32 embeddings, got {x.dtype}")
    if not np.isfinite(x).all():
        raise ValueError("embeddings contain NaN or infinity; check the encoder output")
    return PartialStats(
        count=int(x.shape[0]),
        minimum=x.min(axis=0),
        maximum=x.max(axis=0),
        values=np.sort(x, axis=0) if keep_values else None,
    )


def merge(a: PartialStats, b: PartialStats) -> PartialStats:
    """Associative, commutative merge: the result does not depend on the order or grouping."""
    if a.dim != b.dim:
        raise ValueError(f"cannot merge statistics of dimension {a.dim} and {b.dim}")
    if (a.values is None) != (b.values is None):
        raise ValueError("cannot merge statistics with and without kept values")
    values = None
    if a.values is not None:
        # Sorting the concatenation makes the result canonical whatever the merge order.
        values = np.sort(np.concatenate([a.values, b.values]), axis=0)
    return PartialStats(
        count=a.count + b.count,
        minimum=np.minimum(a.minimum, b.minimum),
        maximum=np.maximum(a.maximum, b.maximum),
        values=values,
    )


def merge_all(parts: Iterable[PartialStats]) -> PartialStats:
    parts = list(parts)
    if not parts:
        raise ValueError("no statistics to merge: the calibration sample is empty")
    if parts[0].values is not None:
        # One sort of everything instead of a sort per pairwise merge.
        values = np.sort(np.concatenate([p.values for p in parts]), axis=0)
        first = reduce(merge, [PartialStats(p.count, p.minimum, p.maximum) for p in parts])
        return PartialStats(first.count, first.minimum, first.maximum, values)
    return reduce(merge, parts)


def ranges_from(stats: PartialStats, method: Method = "minmax",
                quantiles: tuple[float, float] = (0.001, 0.999)) -> np.ndarray:
    """The (2, dim) float32 `[min; max]` array `quantize_embeddings` takes as `ranges`.

    Args:
        stats: merged statistics of the calibration sample.
        method: `minmax` (what sentence-transformers computes from calibration embeddings)
            or `quantile` (clip the tails: values below the `low` and above the `high`
            quantile saturate, so a few outliers do not waste most of the 256 levels).
        quantiles: `(low, high)` fractions for `quantile`.
    """
    if method == "minmax":
        return np.vstack([stats.minimum, stats.maximum]).astype(np.float32)
    if method == "quantile":
        low, high = quantiles
        if not 0.0 <= low < high <= 1.0:
            raise ValueError(f"quantiles must satisfy 0 <= low < high <= 1, got {quantiles}")
        if stats.values is None:
            raise ValueError("quantile ranges need statistics made with keep_values=True")
        q = np.quantile(stats.values, [low, high], axis=0, method="linear")
        return np.ascontiguousarray(q, dtype=np.float32)
    raise ValueError(f"unknown range method {method!r}: use 'minmax' or 'quantile'")
