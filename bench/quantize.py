"""Benchmark workers.embedding.quantizer.quantize against sentence-transformers' quantize_embeddings."""

import argparse
import os
import sys
import time

import numpy as np
from sentence_transformers.util.quantization import quantize_embeddings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from workers.embedding.quantizer import quantize  # noqa: E402


def best_of(fn, repeats: int) -> tuple[float, np.ndarray]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=positive, default=1_000_000, help="float32 unit vectors to quantize")
    p.add_argument("--dim", type=positive, default=384, help="their dimension")
    p.add_argument("--sample", type=positive, default=None,
                   help="rows the ranges are taken from, at most --rows (default: 10,000, or --rows if fewer)")
    p.add_argument("--repeats", type=positive, default=3, help="timed runs of each function; the best counts")
    a = p.parse_args()
    if a.sample is None:
        a.sample = min(10_000, a.rows)
    if a.sample > a.rows:
        p.error(f"--sample {a.sample} is more than --rows {a.rows}")
    rows, dim, sample_rows, repeats = a.rows, a.dim, a.sample, a.repeats
    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sample = x[rng.choice(rows, sample_rows, replace=False)]
    ranges = np.stack([sample.min(axis=0), sample.max(axis=0)])
    print(f"{rows:,} x {dim} float32 unit vectors, ranges from a {sample_rows:,}-row sample, best of {repeats}; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, numpy {np.__version__}")  # fmt: skip
    for precision in ("int8", "ubinary"):
        lib_s, expected = best_of(lambda: quantize_embeddings(x, precision, ranges=ranges), repeats)
        ours_s, got = best_of(lambda: quantize(x, ranges, precision), repeats)
        assert got.dtype == expected.dtype and got.shape == expected.shape
        assert got.tobytes() == expected.tobytes(), f"{precision}: bytes differ"
        print(f"{precision:8s} quantize_embeddings {rows / lib_s:12,.0f} rows/s   "
              f"quantize {rows / ours_s:12,.0f} rows/s   x{lib_s / ours_s:.2f}   bytes identical")  # fmt: skip


if __name__ == "__main__":
    main()
