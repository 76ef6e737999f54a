"""The scan pass: a sample chosen by id alone, and duplicates found across files."""
import numpy as np
import pyarrow as pa

from workers.ingest.scan import DUPLICATE, find_duplicates, scan_rows
from workers.ingest.source import SourceFile, classify

F = SourceFile("a.parquet", 1, "v", "parquet")


def _batches(ids, texts, size):
    out = []
    for a in range(0, len(ids), size):
        b = pa.record_batch({"id": ids[a:a + size], "text": texts[a:a + size]})
        out.append(classify(F, a, b, "text", "id"))
    return out


def test_sample_depends_on_ids_not_on_batching_or_order():
    ids = [f"doc-{i}" for i in range(1000)]
    texts = [f"text {i}" for i in range(1000)]
    one = scan_rows(_batches(ids, texts, 1000), 0, 1, seed=3, k=50).sample
    small = scan_rows(_batches(ids, texts, 7), 0, 1, seed=3, k=50).sample
    # two "files" holding the same rows in another order, merged either way round
    rev = scan_rows(_batches(ids[::-1][:400], texts[::-1][:400], 33), 0, 1, 3, 50).sample
    rest = scan_rows(_batches(ids[::-1][400:], texts[::-1][400:], 64), 1, 1, 3, 50).sample
    assert one.ids == small.ids == rev.merge(rest).ids == rest.merge(rev).ids
    assert len(one.ids) == 50 and len(set(one.ids)) == 50
    assert [texts[ids.index(i)] for i in one.ids] == one.texts
    other = scan_rows(_batches(ids, texts, 1000), 0, 1, seed=4, k=50).sample
    assert len(set(one.ids) & set(other.ids)) < 15  # another seed, another sample


def test_rows_that_cannot_be_encoded_are_not_sampled_or_deduped():
    ids = ["a", "b", None, "d", "e"]
    texts = ["x", None, "y", "   ", "z"]
    s = scan_rows(_batches(ids, texts, 2), 0, 1, seed=0, k=10)
    assert (s.rows, s.valid) == (5, 2)
    assert sorted(s.sample.ids) == ["a", "e"]
    assert sorted(s.parts[0]["row"].tolist()) == [0, 4]


def test_duplicates_across_files_and_partitions():
    ids0, ids1 = ["a", "b", "c", "a"], ["c", "d", "b", "b"]
    n_parts = 3
    s0 = scan_rows(_batches(ids0, ["t"] * 4, 4), 0, n_parts, 0, 0)
    s1 = scan_rows(_batches(ids1, ["t"] * 4, 2), 1, n_parts, 0, 0)
    dups = np.concatenate([find_duplicates(s0.parts[p], s1.parts[p]) for p in range(n_parts)])
    got = sorted(map(tuple, dups.tolist()))
    # (file, row, first_file, first_row): the first occurrence by (file, row) is kept
    assert got == [(0, 3, 0, 0), (1, 0, 0, 2), (1, 2, 0, 1), (1, 3, 0, 1)]
    assert find_duplicates().dtype == DUPLICATE and len(find_duplicates()) == 0
