"""Benchmark workers.embedding.quantizer.quantize against sentence-transformers' quantize_embeddings."""

import os
import sys
import time

import numpy as np
from sentence_transformers.util.quantization import quantize_embeddings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from workers.embedding.quantizer import quantize  # noqa: E402

ROWS, DIM, SAMPLE, REPEATS = 1_000_000, 384, 10_000, 3


def best_of(fn) -> tuple[float, np.ndarray]:
    times, result = [], None
    for _ in range(REPEATS):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((ROWS, DIM), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sample = x[rng.choice(ROWS, SAMPLE, replace=False)]
    ranges = np.stack([sample.min(axis=0), sample.max(axis=0)])
    print(f"{ROWS:,} x {DIM} float32 unit vectors, ranges from a {SAMPLE:,}-row sample, best of {REPEATS}; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, numpy {np.__version__}")  # fmt: skip
    for precision in ("int8", "ubinary"):
        lib_s, expected = best_of(lambda: quantize_embeddings(x, precision, ranges=ranges))
        ours_s, got = best_of(lambda: quantize(x, ranges, precision))
        assert got.dtype == expected.dtype and got.shape == expected.shape
        assert got.tobytes() == expected.tobytes(), f"{precision}: bytes differ"
        print(f"{precision:8s} quantize_embeddings {ROWS / lib_s:12,.0f} rows/s   "
              f"quantize {ROWS / ours_s:12,.0f} rows/s   x{lib_s / ours_s:.2f}   bytes identical")  # fmt: skip


if __name__ == "__main__":
    main()
