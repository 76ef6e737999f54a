"""The search math: dequantized int8 scores, bit scores, the cross-shard merge order."""
import numpy as np
from sentence_transformers.util.quantization import quantize_embeddings

from workers.search.rescore import bit_scores, bit_tables, hamming_scores, int8_query, int8_scores, merge, top_by_score


def _unit(rng, n, dim=64):
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_int8_scores_are_dot_products_with_bucket_centres():
    rng = np.random.default_rng(0)
    x, q = _unit(rng, 300), _unit(rng, 7)
    ranges = np.stack([x.min(0), x.max(0)])
    codes = quantize_embeddings(x, "int8", ranges=ranges)
    centres = ranges[0] + (codes.astype(np.float64) + 128.5) * (ranges[1] - ranges[0]) / 255
    w, off = int8_query(q, ranges, "int8")
    qi, ri = np.repeat(np.arange(7), 300), np.tile(np.arange(300), 7)
    got = int8_scores(codes[ri], w[qi], off[qi]).reshape(7, 300)
    np.testing.assert_allclose(got, q @ centres.T, atol=1e-5)
    assert np.abs(centres - x).max() <= (ranges[1] - ranges[0]).max() / 255  # a centre is within a bucket
    w, off = int8_query(q, ranges, "int8-raw")
    np.testing.assert_allclose(int8_scores(codes[ri], w[qi], off[qi]).reshape(7, 300),
                               q @ codes.T.astype(np.float64), atol=1e-3)


def test_a_dimension_of_one_value_scores_as_that_value_in_the_index_and_in_rescoring():
    """A dimension whose range is one value (a dead dimension; quantiles collapsed on a sparse
    one): its codes stand for that value. Decoded with the quantizer's stand-in step of 1, code
    -128 read as min + 0.5 and added half the query's value there to every int8 score."""
    from workers.search.shard_group import int8_index

    rng = np.random.default_rng(2)
    x, q = _unit(rng, 200), _unit(rng, 5)
    x[:, 0] = 0.0  # dimension 0 is 0 in every vector
    q[:, 0] = 0.6
    ranges = np.stack([x.min(0), x.max(0)])
    codes = quantize_embeddings(x, "int8", ranges=ranges)
    assert (codes[:, 0] == -128).all()
    width = np.where(ranges[1] > ranges[0], ranges[1] - ranges[0], 0)
    centres = ranges[0] + (codes.astype(np.float64) + 128.5) * width / 255
    w, off = int8_query(q, ranges, "int8")
    qi, ri = np.repeat(np.arange(5), 200), np.tile(np.arange(200), 5)
    np.testing.assert_allclose(int8_scores(codes[ri], w[qi], off[qi]).reshape(5, 200), q @ centres.T, atol=1e-5)
    scores, rows = int8_index(codes, ranges).search(q, 200)
    np.testing.assert_allclose(scores, np.take_along_axis(q @ centres.T, rows, 1), atol=1e-4)


def test_bit_scores_use_unit_sign_vectors():
    rng = np.random.default_rng(1)
    x, q = _unit(rng, 50, dim=60), _unit(rng, 5, dim=60)  # 60 bits: the last byte is padded
    signs = np.where(x > 0, 1.0, -1.0) / np.sqrt(60)
    qidx = rng.integers(0, 5, 50)
    got = bit_scores(quantize_embeddings(x, "ubinary"), bit_tables(q), qidx)
    np.testing.assert_allclose(got, np.einsum("ij,ij->i", signs, q[qidx]), atol=1e-6)
    assert hamming_scores(np.array([0, 32, 64]), 64).tolist() == [1.0, 0.0, -1.0]


def test_merge_breaks_ties_by_shard_then_row_and_puts_padding_last():
    keys = np.array([[3, 1, 1, 1, 0, 9]])
    shards = np.array([[0, 2, 1, 1, 5, 0]])
    rows = np.array([[4, 0, 7, 2, 1, -1]])
    pick = merge(keys, shards, rows, 6)[0]
    assert list(zip(shards[0][pick], rows[0][pick])) == [(5, 1), (1, 2), (1, 7), (2, 0), (0, 4), (0, -1)]


def test_merge_of_per_shard_top_n_equals_global_top_n():
    rng = np.random.default_rng(2)
    keys = rng.integers(0, 5, (4, 90))  # many ties
    shards, rows = np.repeat(np.arange(3), 30)[None].repeat(4, 0), np.tile(np.arange(30), 3)[None].repeat(4, 0)
    full = merge(keys, shards, rows, 10)
    parts = [merge(keys[:, s * 30:(s + 1) * 30], shards[:, :30] * 0 + s, rows[:, :30], 10) + s * 30
             for s in range(3)]
    local = np.concatenate(parts, axis=1)
    sub = merge(np.take_along_axis(keys, local, 1), np.take_along_axis(shards, local, 1),
                np.take_along_axis(rows, local, 1), 10)
    assert (np.take_along_axis(local, sub, 1) == full).all()


def test_top_by_score_is_stable_and_skips_invalid():
    scores = np.array([[0.5, 0.9, 0.9, 0.1]])
    valid = np.array([[True, True, True, False]])
    assert top_by_score(scores, valid, 4)[0].tolist() == [1, 2, 0, 3]
