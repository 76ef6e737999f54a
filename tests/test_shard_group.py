"""Shard index types (flat, HNSW, IVF): written deterministically, recorded, loaded accordingly for search."""
import numpy as np
import pytest

from ranges.manifest import RangeManifest
from workers.embedding.encoder import BUNDLED, model_fingerprint, resolve_model
from workers.search.searcher import Searcher
from workers.vocab import INDEX_TYPES
from workers.ingest.shard_builder import build_index
from workers.ingest.from_vectors import write_vectors

DIM, ROWS, UNIT = 384, 3000, 1000


@pytest.fixture(scope="module")
def vectors():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((ROWS, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    pick = rng.choice(ROWS, 100, replace=False)
    q = x[pick] + 0.03 * rng.standard_normal((100, DIM)).astype(np.float32)  # a near copy of each
    return x, q / np.linalg.norm(q, axis=1, keepdims=True), pick


@pytest.mark.parametrize("index_type", INDEX_TYPES)
def test_index_type_is_recorded_loaded_and_finds_near_copies(tmp_path, vectors, index_type):
    x, q, pick = vectors
    rm = RangeManifest(np.stack([x.min(0), x.max(0)]), BUNDLED, model_fingerprint(resolve_model(None)), True,
                       "minmax", None, len(x), 0)
    write_vectors(str(tmp_path), [f"doc{i}" for i in range(ROWS)], x, rm, UNIT, index_type)
    with Searcher.open(str(tmp_path)) as s:
        assert [sh.index_type for sh in s.manifest.shards] == [index_type] * (ROWS // UNIT)
        assert {c for g in s.groups for c in g.index_classes().values()} == {index_type}
        hits = s.search_vectors(q, k=10)
    assert np.mean([h[0].id == f"doc{i}" for h, i in zip(hits, pick)]) >= 0.95


@pytest.mark.parametrize("index_type", INDEX_TYPES)
def test_index_bytes_do_not_depend_on_threads(vectors, index_type):
    import faiss

    codes = np.packbits(vectors[0][:500] > 0, axis=1)
    one = build_index(codes, DIM, index_type)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(2)
    try:
        assert build_index(codes, DIM, index_type) == one
    finally:
        faiss.omp_set_num_threads(threads)


def test_unknown_index_type_is_refused():
    with pytest.raises(ValueError, match="IndexBinaryFlat, IndexBinaryHNSW, IndexBinaryIVF"):
        build_index(np.zeros((1, 48), np.uint8), DIM, "IndexBinaryLSH")


def test_vectors_are_written_into_a_new_dataset_only(tmp_path, vectors):
    """Shards written from vectors are named by row range: a second call into the same dataset
    rewrote the files version 1 records (its checksums then failed), so it is refused."""
    x, _, _ = vectors
    rm = RangeManifest(np.stack([x.min(0), x.max(0)]), BUNDLED, model_fingerprint(resolve_model(None)), True,
                       "minmax", None, len(x), 0)
    assert write_vectors(str(tmp_path), [f"doc{i}" for i in range(100)], x[:100], rm, 50) == 1
    before = {p: p.read_bytes() for p in (tmp_path / "shards").iterdir()}
    with pytest.raises(FileExistsError, match=r"holds version 1 already: write_vectors writes a new dataset"):
        write_vectors(str(tmp_path), [f"doc{i}" for i in range(100)], x[100:200], rm, 50)
    assert {p: p.read_bytes() for p in (tmp_path / "shards").iterdir()} == before
