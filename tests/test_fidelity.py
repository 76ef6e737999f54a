"""The fidelity estimate: its values against a brute-force reference, its place in the range manifest,
the ingest summary, `history`, and a reindex's re-measure on the new rows."""
import json
import shutil

import numpy as np
import pytest

from jobs.history import history, report
from jobs.ingest import format_summary
from jobs.reindex import ReindexConfig, format_result, run as reindex
from ranges.manifest import RangeManifest
from workers.embedding.encoder import Encoder, EncoderConfig
from workers.lake.storage import url_to_fs
from workers.search.fidelity import fidelity, split

from conftest import write_parquet_lake

pytestmark = pytest.mark.usefixtures("shared_encoders")  # conftest: warm encoder actors across the module's jobs


@pytest.fixture(scope="module")
def sample_embeddings(docs):
    """Real float32 embeddings of 200 documents, and minmax ranges of them."""
    emb = Encoder(EncoderConfig(batch_size=32)).encode([t for _, t in docs[:200]])
    return emb, np.stack([emb.min(axis=0), emb.max(axis=0)]).astype(np.float32)


def reference(emb: np.ndarray, ranges: np.ndarray, seed: int, k: int = 10) -> dict:
    """The estimate written out in float64 over every pair (as tests/reference.py searches)."""
    n = len(emb)
    q = max(1, min(200, n // 10))
    held = np.sort(np.random.default_rng(seed).permutation(n)[:q])
    rest = np.setdiff1d(np.arange(n), held)
    queries, corpus = emb[held].astype(np.float64), emb[rest]
    x = corpus.astype(np.float64)
    lo, hi = ranges.astype(np.float64)
    step = (hi - lo) / 255
    codes = np.clip(np.floor((corpus - ranges[0]) / ((ranges[1] - ranges[0]) / np.float32(255))), 0, 255) - 128
    centres = lo + (codes + 128.5) * step
    bits = corpus > 0
    signs = bits * 2.0 - 1
    dim = emb.shape[1]
    scales = (x * x).sum(axis=1) * np.sqrt(dim) / np.abs(x).sum(axis=1)
    keep = k * 6
    hits_int8 = hits_default = 0
    for qi in queries:
        truth = set(np.argsort(-(x @ qi), kind="stable")[:k])
        hits_int8 += len(truth & set(np.argsort(-(centres @ qi), kind="stable")[:k]))
        hamming = (bits != (qi > 0)).sum(axis=1)
        pool = np.lexsort((np.arange(len(x)), hamming))[:keep * 4]
        bit = signs[pool] @ qi / np.sqrt(dim) * scales[pool]
        cand = pool[np.argsort(-bit, kind="stable")[:keep]]
        hits_default += len(truth & set(cand[np.argsort(-(centres[cand] @ qi), kind="stable")[:k]]))
    return {"queries": q, "k": k, "recall_int8": round(hits_int8 / (q * k), 4),
            "recall_ubinary_int8": round(hits_default / (q * k), 4)}


@pytest.mark.parametrize("seed", [0, 7])
def test_values_equal_a_brute_force_reference(sample_embeddings, seed):
    emb, ranges = sample_embeddings
    got = fidelity(emb, ranges, seed)
    assert got == reference(emb, ranges, seed)
    assert got["queries"] == 20 and got["k"] == 10
    # Narrow ranges (every value clipped to a few levels) cost recall: the estimate sees it.
    narrow = np.stack([np.full(emb.shape[1], -0.01), np.full(emb.shape[1], 0.01)]).astype(np.float32)
    worse = fidelity(emb, narrow, seed)
    assert worse == reference(emb, narrow, seed) and worse["recall_int8"] < got["recall_int8"]


def test_held_out_queries_follow_the_seed():
    q0, c0 = split(240, 0)
    assert len(q0) == 24 and len(c0) == 216 and not set(q0) & set(c0)
    assert np.array_equal(split(240, 0)[0], q0) and not np.array_equal(split(240, 1)[0], q0)
    assert len(split(5000, 0)[0]) == 200 and len(split(2, 0)[0]) == 1
    with pytest.raises(ValueError, match="at least 2 sampled rows, got 1"):
        split(1, 0)


def manifest(fidelity=None) -> RangeManifest:
    r = np.stack([np.full(4, -1.0), np.full(4, 1.0)]).astype(np.float32)
    return RangeManifest(ranges=r, model_name="m", model_fingerprint="sha256:00", normalize=True, method="minmax",
                         quantiles=None, sample_size=10, seed=0, created_at="2026-01-01T00:00:00Z",
                         fidelity=fidelity)


def test_the_field_round_trips_outside_the_id():
    f = {"queries": 24, "k": 10, "recall_int8": 0.9917, "recall_ubinary_int8": 0.975}
    m = manifest(f)
    back = RangeManifest.from_json(m.to_json())
    assert back.to_json() == m.to_json() and back.fidelity == f
    assert m.id == manifest().id  # a report about the ranges, not part of them
    assert json.loads(m.to_json())["fidelity"] == f


def test_old_manifests_load_and_keep_their_bytes():
    old = manifest().to_json()
    assert b"fidelity" not in old
    loaded = RangeManifest.from_json(old)
    assert loaded.fidelity is None and loaded.to_json() == old


@pytest.mark.parametrize("bad", [{"queries": 0, "k": 10, "recall_int8": 1.0, "recall_ubinary_int8": 1.0},
                                 {"queries": 3, "k": 10, "recall_int8": 1.5, "recall_ubinary_int8": 1.0},
                                 {"queries": 3, "k": 10, "recall_int8": 1.0}, [0.9]])
def test_a_malformed_estimate_is_refused(bad):
    doc = json.loads(manifest().to_json())
    doc["fidelity"] = bad
    with pytest.raises(ValueError, match="invalid range manifest: fidelity"):
        RangeManifest.from_json(json.dumps(doc))


def test_summary_and_history_show_it(small_dataset):
    dest, result = small_dataset
    f = result.summary["fidelity"]
    # 50 sampled rows: 5 held out as queries against the other 45.
    assert f["queries"] == 5 and f["k"] == 10 and 0.5 <= f["recall_ubinary_int8"] <= 1.0
    fs, root = url_to_fs(str(dest))
    ranges = RangeManifest.from_json(fs.cat_file(f"{root}/ranges/{result.summary['ranges_id']}.json"))
    assert ranges.fidelity == f and ranges.sample_size == 50
    assert f"recall of float32's top 10 {f['recall_int8']:.4f} int8, {f['recall_ubinary_int8']:.4f} ubinary" \
        in format_summary(result.summary)
    entries = history(fs, root)
    assert entries[0]["fidelity"] == f
    assert "ranges' fidelity on 5 held-out sample queries" in report(str(dest), entries)


@pytest.mark.parametrize("drift, shown", [
    ("x", None), ([1], None), ({"rows": 5}, None), ({"rows": "5", "clipped_share": 0.1, "baseline_share": 0.0}, None),
    ({"rows": 5, "clipped_share": "a", "baseline_share": 0.0}, None),
    ({"rows": 5, "clipped_share": float("nan"), "baseline_share": 0.0}, None),
    ({"rows": 5, "clipped_share": 0.1, "baseline_share": 0.0, "fidelity": {"k": 1}}, "drift: 10.0000%"),
    ({"rows": 5, "clipped_share": 0.1, "baseline_share": 0.0}, "drift: 10.0000%")])
def test_history_lists_a_version_whose_drift_record_is_damaged(copy_dataset, drift, shown):
    """A manifest is input like any file: a drift record (which no reader needs) that is not one
    stopped `history` with an AttributeError, a KeyError or a format error. Now the version is
    listed without it; a damaged fidelity inside a good record is left out on its own."""
    path = copy_dataset / "versions" / "00000001.json"
    doc = json.loads(path.read_text())
    doc["drift"] = drift
    path.write_text(json.dumps(doc))  # NaN as Python's json writes and reads it
    fs, root = url_to_fs(str(copy_dataset))
    [entry] = history(fs, root)
    text = report(str(copy_dataset), [entry])
    assert entry["documents"] == 91 and "version 1 (first" in text
    assert (entry["drift"] is None) == (shown is None) and "new rows' fidelity" not in text
    assert (shown is not None and f"    {shown} of the new data's values clipped" in text) or "drift" not in text


def test_reindex_measures_the_new_rows(small_dataset, docs, tmp_path):
    dest, result = small_dataset
    lake = tmp_path / "lake"
    shutil.copytree(dest.parent / "lake", lake)  # copy2: file identities (size, mtime) kept
    write_parquet_lake(tmp_path / "new", docs[150:250], files=1, row_group_size=50)
    shutil.copy2(next((tmp_path / "new").glob("*.parquet")), lake / "new.parquet")
    shutil.copytree(dest, tmp_path / "dest")
    out = reindex(ReindexConfig(str(tmp_path / "dest"), source=str(lake), progress=False))
    drift = out.summary["drift"]
    assert out.summary["rows_encoded"] == 100 and drift["rows"] == 100
    # All 100 new rows are probed (fewer than 1,000): 10 held out against the other 90.
    assert drift["fidelity"]["queries"] == 10 and drift["fidelity"]["k"] == 10
    assert out.summary["fidelity"] == result.summary["fidelity"]  # the ranges' own, unchanged
    assert "new data's fidelity on 10 held-out" in format_result(out)
    fs, root = url_to_fs(str(tmp_path / "dest"))
    entries = history(fs, root)
    assert entries[1]["drift"]["fidelity"] == drift["fidelity"]
    assert "new rows' fidelity on 10 held-out" in report(str(tmp_path / "dest"), entries)
