"""Searcher on real shards: self-retrieval, a brute-force reference, shard merging, Ray, clear errors."""
import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.ingest import run
from ranges.manifest import RangeManifest
from workers.ingest.config import IngestConfig
from workers.lake.dataset import IntegrityError
from workers.embedding.encoder import EncoderConfig, resolve_model
from workers.search.rescore import ASYMMETRIC_POOL
from workers.search.searcher import Searcher

from conftest import write_parquet_lake

pytestmark = pytest.mark.usefixtures("shared_encoders")  # conftest: warm encoder actors across the module's jobs

K, MULT = 3, 2  # 24 asymmetric pool candidates out of 150 documents


@pytest.fixture(scope="module")
def datasets(tmp_path_factory, docs, ray_session, shared_encoders):
    """The same 150 documents as 3 shards and as 1; batch size 1 makes vectors batch-independent."""
    root = tmp_path_factory.mktemp("search")
    write_parquet_lake(root / "lake", docs[:150], files=1, row_group_size=25)
    out, ranges = {}, None
    for name, unit in (("multi", 50), ("one", 1000)):  # the second with the first's ranges: no second calibration
        result = run(IngestConfig(str(root / "lake"), str(root / name), id_column="id", calibration_samples=150,
                                  unit_rows=unit, encoder=EncoderConfig(batch_size=1), progress=False, ranges=ranges))
        ranges = str(root / name / "ranges" / f"{result.summary['ranges_id']}.json")
        out[name] = root / name
    with Searcher.open(str(out["multi"])) as s:
        out["q"] = s.encode([t for _, t in docs[:150]])
    return out


def _brute_force(dest, q, k, mult, asymmetric=False):
    """Hamming candidates over all rows laid end to end (asymmetric: a 4x pool narrowed by the
    float query against ±1/sqrt(dim) signs times each row's stored scale), rescored against int8
    bucket centres."""
    version = json.loads((dest / "versions" / "00000001.json").read_text())
    ranges = RangeManifest.from_json((dest / version["ranges"]["path"]).read_bytes()).ranges.astype(np.float64)
    t = pa.concat_tables([pq.read_table(dest / s["path"]) for s in version["shards"]])
    ids, codes = t["id"].to_pylist(), np.array(t["int8"].to_pylist(), np.float64)
    bits = np.unpackbits(np.frombuffer(b"".join(t["ubinary"].to_pylist()), np.uint8).reshape(len(t), -1), axis=1)
    scales = t["ubinary_scale"].to_numpy().astype(np.float64)
    qbits = (q > 0).astype(np.uint8)
    centres = ranges[0] + (codes + 128.5) * ((ranges[1] - ranges[0]) / 255)
    out = []
    for qi, qb in zip(q.astype(np.float64), qbits):
        hamming = (bits != qb).sum(axis=1)
        cand = np.lexsort((np.arange(len(t)), hamming))[:k * mult * (ASYMMETRIC_POOL if asymmetric else 1)]
        if asymmetric:
            bit_scores = (bits[cand] * 2.0 - 1) @ qi / np.sqrt(len(qi)) * scales[cand]
            cand = cand[np.argsort(-bit_scores, kind="stable")[:k * mult]]
        scores = centres[cand] @ qi
        best = cand[np.argsort(-scores, kind="stable")[:k]]
        out.append([(ids[i], centres[i] @ qi) for i in best])
    return out


def test_own_text_finds_itself_first(datasets, docs):
    with Searcher.open(str(datasets["multi"])) as s:
        hits = s.search([t for _, t in docs[:30]], k=3)
        assert [h[0].id for h in hits] == [i for i, _ in docs[:30]]
        assert s.search(docs[7][1], k=1)[0].id == docs[7][0]  # a single text gives one list


@pytest.mark.parametrize("candidates", ["asymmetric", "hamming"])
def test_results_equal_brute_force_reference(datasets, candidates):
    q = datasets["q"][:40]
    with Searcher.open(str(datasets["multi"])) as s:
        got = s.search_vectors(q, k=K, rescore_multiplier=MULT, candidates=candidates)
    for hits, want in zip(got, _brute_force(datasets["multi"], q, K, MULT, candidates == "asymmetric")):
        assert [h.id for h in hits] == [i for i, _ in want]
        np.testing.assert_allclose([h.score for h in hits], [s for _, s in want], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("options", [{}, {"rescore": "bits"}, {"candidates": "hamming"},
                                     {"candidates": "hamming", "rescore": "none"}])
def test_merging_shards_equals_one_combined_index(datasets, options):
    q = datasets["q"]
    with Searcher.open(str(datasets["multi"])) as multi, Searcher.open(str(datasets["one"])) as one:
        assert len(multi.manifest.shards) == 3 and len(one.manifest.shards) == 1
        a, b = multi.search_vectors(q, k=K, **options), one.search_vectors(q, k=K, **options)
    assert [[(h.id, h.score, h.source_row) for h in x] for x in a] == \
           [[(h.id, h.score, h.source_row) for h in x] for x in b]


def test_int8_index_equals_exhaustive_int8_scores(datasets):
    q = datasets["q"][:20]
    with Searcher.open(str(datasets["multi"]), index="int8") as s:
        got = s.search_vectors(q, k=K)
    want = _brute_force(datasets["multi"], q, K, mult=10_000)  # every row is a candidate
    assert [[h.id for h in x] for x in got] == [[i for i, _ in w] for w in want]


def test_ray_actors_equal_threads(datasets, ray_session):
    q = datasets["q"][:50]
    with Searcher.open(str(datasets["multi"])) as s:
        want = s.search_vectors(q, k=K)
    rs = Searcher.open(str(datasets["multi"]), backend="ray", actors=2, actor_cpus=0.5)
    try:
        assert sorted(set(rs.groups.owner.tolist())) == [0, 1]  # shards really split over two actors
        assert rs.search_vectors(q, k=K) == want
    finally:
        rs.close()
    assert ray_session.is_initialized()  # a joined instance is left running for its owner


@pytest.fixture
def damaged(datasets, tmp_path):
    dest = tmp_path / "copy"
    shutil.copytree(datasets["multi"], dest)
    return dest, json.loads((dest / "versions" / "00000001.json").read_text())


def test_wrong_model_is_refused(damaged, tmp_path):
    dest, _ = damaged
    model = tmp_path / "other-model"  # the same files plus one: another fingerprint
    shutil.copytree(resolve_model(None), model, copy_function=os.symlink)
    (model / "extra.txt").write_text("changed")
    with pytest.raises(ValueError, match="fingerprint.*search with --model"):
        Searcher.open(str(dest), model=str(model))


def test_wrong_ranges_are_refused(damaged):
    dest, version = damaged
    path = dest / version["ranges"]["path"]
    other = RangeManifest.from_json(path.read_bytes())
    path.write_bytes(RangeManifest(other.ranges * 2, other.model_name, other.model_fingerprint, True,
                                   "minmax", None, 150, 0).to_json())
    with pytest.raises(IntegrityError, match="has id"):
        Searcher.open(str(dest))


def test_corrupted_index_is_refused(damaged):
    dest, version = damaged
    path = dest / version["shards"][1]["index"]
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError, match=f"{version['shards'][1]['index']}.*sha256"):
        Searcher.open(str(dest))


def test_missing_shard_is_refused(damaged):
    dest, version = damaged
    (dest / version["shards"][2]["path"]).unlink()
    with pytest.raises(FileNotFoundError, match=f"{version['shards'][2]['path']}.*missing"):
        Searcher.open(str(dest))
