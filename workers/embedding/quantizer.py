"""Quantize float32 embeddings to int8/uint8/binary/ubinary, byte-identical to sentence-transformers."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from workers.vocab import QUANTIZED_PRECISIONS

# A float32 block plus its float32 scratch copy stay in L2, so every pass after the first reads
# cache rather than memory (0.5-2 MiB measured alike on a 1 MiB-L2 core).
_BLOCK_BYTES = 1 << 20
# Blocks per thread-pool task: enough to amortize dispatch, few enough to balance busy cores.
_BLOCKS_PER_TASK = 8
# Streaming passes like these saturate memory bandwidth at a few cores; more threads only contend.
_MAX_THREADS = 8


def quantize(embeddings: np.ndarray, ranges: np.ndarray | None, precision: str) -> np.ndarray:
    """Quantize as `sentence_transformers.quantize_embeddings(embeddings, precision, ranges=ranges)`.

    Args:
        embeddings: finite float32 array of shape (n, dim).
        ranges: float32 array of shape (2, dim), per-dimension min (row 0) and max (row 1).
            Required for int8/uint8, ignored for binary/ubinary.
        precision: one of `QUANTIZED_PRECISIONS`.

    Returns:
        (n, dim) int8/uint8 for int8/uint8; (n, ceil(dim / 8)) int8/uint8 for binary/ubinary
        (bits `x > 0` packed big-endian, the last byte zero-padded).
    """
    _check_precisions((precision,))
    if precision.endswith("binary"):
        ranges = None
    return _run(embeddings, ranges, (precision,), count=False)[0][precision]


def clipped_counts(embeddings: np.ndarray, ranges: np.ndarray) -> np.ndarray:
    """Count, per dimension, the values strictly below its min or strictly above its max.

    Args:
        embeddings: finite float32 array of shape (n, dim).
        ranges: float32 array of shape (2, dim), per-dimension min (row 0) and max (row 1).

    Returns:
        int64 array of shape (dim,).
    """
    return _run(embeddings, ranges, (), count=True)[1]


def quantize_all(
    embeddings: np.ndarray, ranges: np.ndarray, precisions: tuple[str, ...] | list[str]
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Quantize to several precisions and count clipped values in one pass over the data.

    Args:
        embeddings: finite float32 array of shape (n, dim).
        ranges: float32 array of shape (2, dim), per-dimension min (row 0) and max (row 1).
        precisions: any of `QUANTIZED_PRECISIONS`.

    Returns:
        ({precision: what `quantize` returns}, what `clipped_counts` returns).
    """
    _check_precisions(precisions)
    return _run(embeddings, ranges, tuple(precisions), count=True)


_SCALE_ROWS = 8192


def sign_scales(embeddings: np.ndarray) -> np.ndarray:
    """Per vector, the factor that turns its sign bits' score into an estimate of the inner product.

    A ubinary code keeps the signs `s` (+1 for `x > 0`, else -1) of `x`. A float query scored
    against them, `<q, s> / sqrt(dim)`, estimates `<q, x>` up to the vector's own factor
    `||x|| / <x/||x||, s/sqrt(dim)>` = `||x||^2 sqrt(dim) / ||x||_1` (RaBitQ's and Elasticsearch
    BBQ's correction; for a unit vector, `sqrt(dim) / ||x||_1`): the sign vector of a vector
    whose mass spreads over many dimensions is a close copy of it, a peaked one's is not, and
    the factor says by how much. A zero vector gets 0 (its estimate is 0).

    Computed in float64 from the float32 input and returned as float32, so the same input gives
    the same bytes (a shard rewritten by a rerun is byte-identical).

    Args:
        embeddings: finite float32 array of shape (n, dim).

    Returns:
        float32 array of shape (n,).
    """
    _check_embeddings(embeddings)
    n, dim = embeddings.shape
    out = np.zeros(n, np.float32)
    for lo in range(0, n, _SCALE_ROWS):  # in blocks: a float64 copy of a whole shard could be GBs
        x = embeddings[lo:lo + _SCALE_ROWS].astype(np.float64)
        l1 = np.abs(x).sum(axis=1)
        scale = np.zeros(len(x), np.float64)
        np.divide(np.einsum("ij,ij->i", x, x) * np.sqrt(dim), l1, out=scale, where=l1 > 0)
        out[lo:lo + len(x)] = scale
    return out


# float16's largest finite value: anything beyond it would be stored as inf.
_FLOAT16_MAX = float(np.finfo(np.float16).max)


def to_float16(embeddings: np.ndarray) -> np.ndarray:
    """The embeddings rounded to float16 (IEEE half, round to nearest even), as a shard keeps them.

    Exact both ways after the first rounding: `to_float16(h.astype(np.float32))` gives `h`
    again, which is what lets a shard be requantized from its float16 column with the bytes a
    fresh write gives (`workers/ingest/shard_builder.write_shard`).

    Args:
        embeddings: finite float32 array of shape (n, dim).

    Returns:
        float16 array of shape (n, dim).

    Raises:
        ValueError: a value lies beyond float16's range (+-65504), naming its row.
    """
    _check_embeddings(embeddings)
    with np.errstate(over="ignore"):  # an overflow becomes inf, refused just below with its row
        half = embeddings.astype(np.float16)
    if not np.isfinite(half).all():
        row = int(np.flatnonzero(~np.isfinite(half).all(axis=1))[0])
        raise ValueError(
            f"embeddings row {row} holds a value beyond float16's range (+-{_FLOAT16_MAX:g}) or NaN; "
            "drop float16 from the precisions for this model, or normalize its embeddings"
        )
    return half


def _check_precisions(precisions) -> None:
    for precision in precisions:
        if precision not in QUANTIZED_PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; choose from {QUANTIZED_PRECISIONS}")


def _check_embeddings(embeddings) -> None:
    if not isinstance(embeddings, np.ndarray) or embeddings.dtype != np.float32:
        got = getattr(embeddings, "dtype", type(embeddings).__name__)
        raise ValueError(
            f"embeddings must be a float32 numpy array, got {got}; "
            "convert with np.asarray(embeddings, dtype=np.float32)"
        )
    if embeddings.ndim != 2:
        raise ValueError(
            f"embeddings must be 2-D (n, dim), got shape {embeddings.shape}; "
            "pass a single vector as vector[None, :]"
        )


def range_steps(ranges, dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate ranges; return float32 (mins, maxs, steps), steps computed as the library does.

    The one computation of the int8 bucket width: queries are scored against the buckets the
    corpus was quantized into (`workers.search.rescore`), so both must be these bytes.
    """
    if ranges is None:
        raise ValueError(
            "ranges is None: int8/uint8 and clip counts need a (2, dim) array of per-dimension "
            "[min; max], e.g. from the range manifest"
        )
    ranges = np.asarray(ranges)
    if ranges.shape != (2, dim):
        raise ValueError(
            f"ranges must have shape (2, {dim}) (row 0 min, row 1 max) to match the embeddings, "
            f"got {ranges.shape}"
        )
    mins, maxs = ranges.astype(np.float32, copy=False)
    width = maxs - mins
    if not np.isfinite(width).all():
        raise ValueError("ranges hold NaN or inf, or max - min overflows float32; recalibrate them")
    if (width < 0).any():
        bad = int(np.flatnonzero(width < 0)[0])
        raise ValueError(f"ranges min > max in dimension {bad}; row 0 must hold mins, row 1 maxs")
    steps = width / 255
    steps[steps == 0] = 1
    return mins, maxs, steps


def _run(embeddings, ranges, precisions: tuple[str, ...], count: bool):
    _check_embeddings(embeddings)
    n, dim = embeddings.shape
    x = np.ascontiguousarray(embeddings)
    scalar = "int8" in precisions or "uint8" in precisions
    bounds = range_steps(ranges, dim) if scalar or count else None
    packed = (dim + 7) // 8
    layout = {"int8": (dim, np.int8), "uint8": (dim, np.uint8),
              "binary": (packed, np.int8), "ubinary": (packed, np.uint8)}  # fmt: skip
    outs = {p: np.empty((n, layout[p][0]), layout[p][1]) for p in precisions}

    # Per-block counts are summed in uint16, numpy's cheapest reduction here, so blocks stay < 65536 rows.
    block = max(1, min(_BLOCK_BYTES // (4 * max(dim, 1)), 65535))
    span = block * _BLOCKS_PER_TASK
    starts = range(0, n, span)

    def work(lo: int) -> np.ndarray:
        return _quantize_rows(x, lo, min(lo + span, n), block, bounds, outs, count)

    threads = min(_thread_budget(), len(starts), _MAX_THREADS)
    if threads > 1:
        # numpy releases the GIL inside ufuncs, so spans run in parallel on separate outputs.
        with ThreadPoolExecutor(threads) as pool:
            partial = list(pool.map(work, starts))
    else:
        partial = [work(lo) for lo in starts]
    return outs, np.sum(partial, axis=0, dtype=np.int64) if partial else np.zeros(dim, np.int64)


def _thread_budget() -> int:
    # Ray sets OMP_NUM_THREADS to a task's num_cpus: honouring it keeps us inside the reservation.
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# Overflow to inf is expected: huge squared norms (see _check_finite), and (x - min) / steps for
# tiny steps, which clips to 255 exactly as in the library.
@np.errstate(over="ignore")
def _quantize_rows(x, lo, hi, block, bounds, outs, count) -> np.ndarray:
    """Quantize rows lo:hi block by block into outs; return their clip counts (zeros unless count)."""
    dim = x.shape[1]
    scalar = "int8" in outs or "uint8" in outs
    binary = "binary" in outs or "ubinary" in outs
    scratch = np.empty((block, dim), np.float32) if scalar else None
    mask = np.empty((block, dim), bool) if binary or count else None
    mask2 = np.empty((block, dim), bool) if count else None
    counts = np.zeros(dim, np.int64)
    for a in range(lo, hi, block):
        b = min(a + block, hi)
        xb = x[a:b]
        _check_finite(xb, a)
        if scalar:
            mins, _, steps = bounds
            f = scratch[: b - a]
            np.subtract(xb, mins, out=f)
            # A true division, as the library does: multiplying by 1 / steps changes some bytes.
            np.divide(f, steps, out=f)
            # Clipped to [0, 255] the values are >= 0, where the truncating cast equals the
            # library's floor-then-clip: one pass fewer.
            np.clip(f, 0, 255, out=f)
            u = outs["uint8"][a:b] if "uint8" in outs else outs["int8"][a:b].view(np.uint8)
            np.copyto(u, f, casting="unsafe")
            if "int8" in outs:
                # Flipping the top bit of q in [0, 255] gives q - 128 in two's complement.
                np.bitwise_xor(u, 0x80, out=outs["int8"][a:b].view(np.uint8))
        if binary:
            m = mask[: b - a]
            np.greater(xb, 0, out=m)
            bits = np.packbits(m, axis=-1)
            if "ubinary" in outs:
                outs["ubinary"][a:b] = bits
            if "binary" in outs:
                np.bitwise_xor(bits, 0x80, out=outs["binary"][a:b].view(np.uint8))
        if count:
            mins, maxs, _ = bounds
            m, m2 = mask[: b - a], mask2[: b - a]
            # Compare the floats, not the codes: code 255 cannot tell "at max" from "above max".
            np.less(xb, mins, out=m)
            np.greater(xb, maxs, out=m2)
            np.logical_or(m, m2, out=m)
            counts += np.add.reduce(m.view(np.uint8), axis=0, dtype=np.uint16)
    return counts


def _check_finite(xb: np.ndarray, first_row: int) -> None:
    # Squared row norms turn NaN or inf with any NaN or inf in the row, in one pass (cheaper than
    # min() plus max()); they also overflow for |values| > ~1e19, which the exact test clears.
    if np.isfinite(np.vecdot(xb, xb)).all():
        return
    bad = np.flatnonzero(~np.isfinite(xb).all(axis=1))
    if bad.size:
        raise ValueError(
            f"embeddings row {first_row + int(bad[0])} contains NaN or inf; "
            "drop or re-encode such rows before quantizing"
        )
