"""Range statistics: the merge is associative and commutative; ranges match the library."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ranges.stats import merge, merge_all, partial_stats, ranges_from


def _split(x, cuts):
    bounds = [0] + sorted(set(cuts)) + [len(x)]
    return [x[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), cuts=st.lists(st.integers(1, 199), max_size=8))
def test_ranges_do_not_depend_on_batch_split_or_order(seed, cuts):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((200, 16)).astype(np.float32)
    whole = partial_stats(x, keep_values=True)
    parts = [partial_stats(b, keep_values=True) for b in _split(x, cuts)]
    rng.shuffle(parts)
    merged = merge_all(parts)
    for method in ("minmax", "quantile"):
        expected = ranges_from(whole, method)
        assert ranges_from(merged, method).tobytes() == expected.tobytes()
    # pairwise, right-folded: same bytes as the left fold
    right = parts[-1]
    for p in reversed(parts[:-1]):
        right = merge(p, right)
    assert ranges_from(right, "quantile").tobytes() == ranges_from(merged, "quantile").tobytes()


def test_minmax_equals_sentence_transformers_calibration():
    from sentence_transformers.util.quantization import _get_quantization_ranges

    x = np.random.default_rng(0).standard_normal((500, 32)).astype(np.float32)
    ours = ranges_from(partial_stats(x), "minmax")
    assert ours.dtype == np.float32 and ours.shape == (2, 32)
    assert np.array_equal(ours, _get_quantization_ranges(x, "int8", x))


def test_quantile_clips_tails():
    x = np.random.default_rng(1).standard_normal((10_000, 4)).astype(np.float32)
    r = ranges_from(partial_stats(x, keep_values=True), "quantile", (0.01, 0.99))
    assert np.allclose(r[0], np.quantile(x, 0.01, axis=0), atol=1e-6)
    assert np.allclose(r[1], np.quantile(x, 0.99, axis=0), atol=1e-6)
    assert (r[0] > x.min(axis=0)).all() and (r[1] < x.max(axis=0)).all()


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="float32"):
        partial_stats(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="NaN"):
        partial_stats(np.array([[np.nan, 0]], np.float32))
    with pytest.raises(ValueError, match="dimension 3 and 4"):
        merge(partial_stats(np.zeros((1, 3), np.float32)), partial_stats(np.zeros((1, 4), np.float32)))
    with pytest.raises(ValueError, match="keep_values=True"):
        ranges_from(partial_stats(np.zeros((2, 3), np.float32)), "quantile")
    with pytest.raises(ValueError, match="calibration sample is empty"):
        merge_all([])
