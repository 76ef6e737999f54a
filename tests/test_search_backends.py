"""Shard groups behind one protocol: candidate narrowing against brute force, seeded sampling, and
threads and Ray actors answering with the same arrays on a real version."""
import json
import shutil
import time

import numpy as np
import pytest

from ranges.manifest import RangeManifest
from workers.embedding.encoder import BUNDLED, model_fingerprint, resolve_model
from workers.embedding.quantizer import quantize, sign_scales
from workers.ingest.from_vectors import write_vectors
from workers.search.rescore import ASYMMETRIC_POOL, bit_scores, bit_tables, narrow_candidates, pool_sizes
from workers.search.searcher import Searcher, sample_rows

# ---------------------------------------------------------------------------------------------
# Pure: narrowing, pool sizes, sampling (no Ray, no model)


def _group_answers(codes, q, bounds, pool):
    """What one group per shard answers: its Hamming top `pool` (ties by row), bit scores filled."""
    qbin, tables = np.packbits(q > 0, axis=1), bit_tables(q)
    parts = []
    for s, (a, b) in enumerate(zip(bounds, bounds[1:])):
        hamming = np.unpackbits(codes[None, a:b] ^ qbin[:, None], axis=2).sum(axis=2)
        rows = np.argsort(hamming, axis=1, kind="stable")[:, :pool]
        qidx = np.repeat(np.arange(len(q)), rows.shape[1])
        bits = bit_scores(codes[a:b][rows.ravel()], tables, qidx).reshape(rows.shape)
        parts.append((np.take_along_axis(hamming, rows, 1).astype(np.float64), np.full(rows.shape, s), rows, bits))
    return parts


def _brute_force(codes, q, pool, keep, scales=None):
    """Global row numbers: the Hamming top `pool` of all rows end to end, then the best `keep` of
    those by float query against ±1/sqrt(dim) signs (times each row's `scales`, when given)."""
    signs = np.unpackbits(codes, axis=1) * 2.0 - 1
    out = []
    for qi in q.astype(np.float64):
        hamming = (np.unpackbits(codes, axis=1) != (qi > 0)).sum(axis=1)
        cand = np.lexsort((np.arange(len(codes)), hamming))[:pool]
        if keep is not None:
            scores = signs[cand] @ qi / np.sqrt(len(qi)) * (1 if scales is None else scales[cand])
            cand = cand[np.argsort(-scores, kind="stable")[:keep]]
        out.append(cand.tolist())
    return out


@pytest.mark.parametrize("keep", [None, 6, 24])
def test_narrowing_equals_brute_force_over_all_rows(keep):
    rng = np.random.default_rng(0)
    dim, n_queries, pool = 64, 9, 24
    codes = np.packbits(rng.standard_normal((300, dim)) > 0, axis=1)  # 64 bits: many Hamming ties
    q = rng.standard_normal((n_queries, dim)).astype(np.float32)
    bounds = [0, 40, 40, 170, 181, 300]  # uneven shards, one of them empty
    parts = _group_answers(codes, q, bounds, pool)
    # Padding (row -1) with the best key and bit score of all: never kept over a real candidate.
    parts.append((np.zeros((n_queries, 3)), np.full((n_queries, 3), 5), np.full((n_queries, 3), -1),
                  np.full((n_queries, 3), 99, np.float32)))
    order = rng.permutation(len(parts))  # the groups answer in any order
    found = [np.concatenate([parts[i][a] for i in order], axis=1) for a in range(4)]
    keys, shards, rows, bits = narrow_candidates(*found, pool, keep)
    assert keys.shape == (n_queries, keep or pool)
    got = (np.array(bounds)[shards] + rows).tolist()
    assert got == _brute_force(codes, q, pool, keep)
    flat = np.array(got)
    assert (keys == np.unpackbits(codes[flat] ^ np.packbits(q > 0, axis=1)[:, None], axis=2).sum(axis=2)).all()
    signs = np.unpackbits(codes, axis=1)[flat] * 2.0 - 1
    np.testing.assert_allclose(bits, np.einsum("qcd,qd->qc", signs, q) / np.sqrt(dim), atol=1e-5)


def test_a_pool_wider_than_the_candidates_keeps_them_all_padding_last():
    keys = np.array([[2.0, 0.0, 1.0, 0.0]])
    shards, rows = np.array([[0, 1, 1, 0]]), np.array([[3, -1, 0, 1]])
    bits = np.array([[0.1, 0.9, 0.3, 0.2]], np.float32)
    _, s, r, _ = narrow_candidates(keys, shards, rows, bits, 10)
    assert list(zip(s[0], r[0])) == [(0, 1), (1, 0), (0, 3), (1, -1)]
    _, s, r, b = narrow_candidates(keys, shards, rows, bits, 10, keep=10)
    assert list(zip(s[0], r[0])) == [(1, 0), (0, 1), (0, 3), (1, -1)] and b[0, 0] == np.float32(0.3)


def test_pool_sizes():
    assert pool_sizes(3, 2, 150, "binary", True) == (3 * 2 * ASYMMETRIC_POOL, 6)
    assert pool_sizes(3, 2, 150, "binary", False) == (6, 6)
    assert pool_sizes(3, 2, 150, "int8", False) == (3, 6)
    assert pool_sizes(3, 2, 10, "binary", True) == (10, 6)  # never past the version's rows
    assert pool_sizes(3, 2, 4, "binary", True) == (4, 4)


def test_sample_rows_are_distinct_seeded_and_in_order():
    counts = [5, 0, 12, 3]
    shards, rows = sample_rows(counts, 20, seed=7)
    flat = np.array([0, 5, 5, 17])[shards] + rows
    assert sorted(flat.tolist()) == list(range(20)) and 1 not in shards.tolist()  # all rows, none of the empty shard
    shards, rows = sample_rows(counts, 6, seed=7)
    flat = (np.array([0, 5, 5, 17])[shards] + rows).tolist()
    assert flat == sorted(flat) and len(set(flat)) == 6 and all(r < counts[s] for s, r in zip(shards, rows))
    assert flat == sorted(np.random.default_rng(7).choice(20, 6, replace=False).tolist())
    again = sample_rows(counts, 6, seed=7)
    assert (again[0] == shards).all() and (again[1] == rows).all()
    with pytest.raises(ValueError, match="cannot sample 21 documents from a version holding 20"):
        sample_rows(counts, 21)


def test_options_of_the_other_backend_are_refused(tmp_path):
    # Refused before anything is read: the folder holds no dataset at all.
    with pytest.raises(ValueError, match=r"actors, ray_address: only for backend='ray', not 'threads'; "
                                         r"leave them out, or open with backend='ray'"):
        Searcher.open(str(tmp_path), actors=2, ray_address="auto")
    with pytest.raises(ValueError, match=r"cache_dir: only for backend='threads', not 'ray'; leave it out"):
        Searcher.open(str(tmp_path), backend="ray", cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"backend must be one of threads, ray, got 'spark'"):
        Searcher.open(str(tmp_path), backend="spark")
    # 0 was read as the default, a negative number of threads as one group.
    for name, value in (("threads", 0), ("threads", -2), ("actors", 0)):
        backend = "ray" if name == "actors" else "threads"
        with pytest.raises(ValueError, match=rf"{name} must be >= 1 \(or left out for the default\), got {value}"):
            Searcher.open(str(tmp_path), backend=backend, **{name: value})


# ---------------------------------------------------------------------------------------------
# Threads and Ray actors over the same real version (shard files, FAISS indexes, spills)

DIM, ROWS, UNIT = 384, 700, 150  # five shards: four of 150 rows, one of 100


@pytest.fixture(scope="module")
def version(tmp_path_factory):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((ROWS, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    rm = RangeManifest(np.stack([x.min(0), x.max(0)]), BUNDLED, model_fingerprint(resolve_model(None)), True,
                       "minmax", None, ROWS, 0)
    dest = tmp_path_factory.mktemp("backends") / "dest"
    write_vectors(str(dest), [f"doc{i}" for i in range(ROWS)], x, rm, UNIT)
    q = x[rng.choice(ROWS, 12, replace=False)] + 0.05 * rng.standard_normal((12, DIM)).astype(np.float32)
    return dest, q / np.linalg.norm(q, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def both(version, ray_session):
    dest, _ = version
    threads = Searcher.open(str(dest), threads=2)
    ray_actors = Searcher.open(str(dest), backend="ray", actors=2, actor_cpus=0.5)
    yield threads, ray_actors
    ray_actors.close()
    threads.close()


def test_ray_groups_are_balanced_runs_of_shards(both):
    threads, ray_actors = both
    # Rows 150, 150, 150, 150, 100: the first run ends at the shard that passes half the rows;
    # threads and actors alike (one group per thread).
    assert threads.groups.owner.tolist() == ray_actors.groups.owner.tolist() == [0, 0, 0, 1, 1]
    assert len(threads.groups) == 2


def test_backends_give_the_same_arrays(both, version):
    _, q = version
    qbin = quantize(q, None, "ubinary")
    narrowed = []
    for s in both:
        found = s.groups.candidates(q, qbin, 40, True, None, None)
        narrowed.append(narrow_candidates(*found, 40, 10))
    for a, b in zip(*narrowed):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    _, shards, rows, _ = narrowed[0]
    qidx = np.repeat(np.arange(len(q)), rows.shape[1])
    for mode in ("int8", "int8-raw", "bits"):
        (ts, ti, tr), (rs, ri, rr) = (s.groups.rescore(q, mode, qidx, shards.ravel(), rows.ravel()) for s in both)
        assert np.array_equal(ts, rs) and ti == ri and np.array_equal(tr, rr)
    assert ti == [f"doc{UNIT * s + r}" for s, r in zip(shards.ravel(), rows.ravel())]
    assert both[0].resident_bytes() == both[1].resident_bytes() == \
        sum(s.index_bytes for s in both[0].manifest.shards)


def test_a_query_that_is_not_finite_is_refused_by_its_position(both, version):
    _, q = version
    q = q.copy()
    q[3, 7] = np.inf
    for s in both:
        for rescore in ("int8", "none"):
            with pytest.raises(ValueError, match=r"^query 3 holds NaN or inf: query embeddings must be finite$"):
                s.search_vectors(q, k=3, rescore=rescore)


def test_a_closed_searcher_lets_go_of_its_int8_indexes(version):
    dest, q = version
    s = Searcher.open(str(dest), threads=2, index="int8")
    s.search_vectors(q, k=3)
    assert s.groups.resident_bytes() == ROWS * DIM  # a byte a dimension: the indexes built at open
    s.close()
    assert s.groups.resident_bytes() == 0 and all(g.indexes == {} for g in s.groups)
    with pytest.raises(RuntimeError, match=r"this Searcher of version 1 of .* is closed"):
        s.resident_bytes()  # it answered from the records, as if the indexes were still held


def test_a_cache_folder_serves_a_shard_to_versions_that_read_other_columns_of_it(tmp_path):
    """A shard's spill is named by its checksum. Version 1 holds a shard without sign-bit scales,
    so it is searched by bits alone and its spill of the other shard left the scales out; version
    2 holds that other shard alone, is searched by its scales, and found the spill without them
    (a KeyError) when both shared a cache folder."""
    from workers.ingest.shard_builder import write_shard
    from workers.lake.records import ModelInfo, RangesRef, ShardSource, SourceSnapshot, VersionManifest
    from workers.lake.storage import join, put_bytes, url_to_fs
    from workers.lake.versions import commit

    rng = np.random.default_rng(3)
    x = rng.standard_normal((40, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    rm = RangeManifest(np.stack([x.min(0), x.max(0)]), BUNDLED, model_fingerprint(resolve_model(None)), True,
                       "minmax", None, 40, 0)
    fs, root = url_to_fs(str(tmp_path / "dest"))
    put_bytes(fs, join(root, f"ranges/{rm.id}.json"), rm.to_json())
    shards = [write_shard(fs, root, name, ShardSource("vectors", a, a + 20), [f"doc{i}" for i in range(a, a + 20)],
                          np.arange(a, a + 20), x[a:a + 20], rm.ranges, ("int8", "ubinary"), [], scales=scales)
              for name, a, scales in (("old", 0, False), ("new", 20, True))]
    model = ModelInfo(rm.model_name, rm.model_fingerprint, DIM, rm.normalize)
    for parent, held in ((None, shards), (1, shards[1:])):
        commit(fs, root, VersionManifest.build(model, RangesRef(rm.id, f"ranges/{rm.id}.json", rm.method),
                                               ("int8", "ubinary"), SourceSnapshot("vectors:", "text", None, {}),
                                               held, parent=parent))
    q = x[25:27]
    answers = {}
    for cache in (tmp_path / "shared", tmp_path / "alone"):
        cache.mkdir()
        for v in ((1, 2) if cache.name == "shared" else (2,)):
            with Searcher.open(str(tmp_path / "dest"), v, cache_dir=str(cache), threads=1) as s:
                answers[cache.name, v] = [[(h.id, h.score) for h in hits] for hits in s.search_vectors(q, 3)]
    assert answers["shared", 2] == answers["alone", 2] and answers["shared", 2][0][0][0] == "doc25"


def test_fetch_reads_rows_in_request_order(both):
    shards, rows = np.array([4, 0, 3, 4, 1]), np.array([99, 0, 7, 0, 149])
    for s in both:
        ids, source_rows = s.groups.fetch(shards, rows)
        assert ids == ["doc699", "doc0", "doc457", "doc600", "doc299"]
        assert source_rows.tolist() == [699, 0, 457, 600, 299]  # written with source row = position
        assert s.groups.fetch(np.zeros(0, np.int64), np.zeros(0, np.int64))[0] == []


def test_sample_and_search_agree_across_backends(both, version):
    _, q = version
    threads, ray_actors = both
    drawn = [[(h.id, h.shard, h.row, h.source_row) for h in s.sample(9, seed=3)] for s in both]
    assert drawn[0] == drawn[1]
    shards, rows = sample_rows([UNIT] * 4 + [100], 9, seed=3)
    assert [d[0] for d in drawn[0]] == [f"doc{UNIT * s + r}" for s, r in zip(shards, rows)]
    for options in ({}, {"rescore": "bits"}, {"candidates": "hamming", "rescore": "none"}):
        assert threads.search_vectors(q, k=5, **options) == ray_actors.search_vectors(q, k=5, **options)


def test_a_group_rescores_only_with_a_scoring_mode(both, version):
    _, q = version
    with pytest.raises(ValueError, match="rescoring mode must be int8, int8-raw or bits, got 'none'"):
        both[0].groups[0].rescore(q, "none", np.zeros(1, np.int64), np.zeros(1, np.int64), np.zeros(1, np.int64))


def test_an_actor_that_cannot_open_its_shards_fails_the_open(version, tmp_path, ray_session):
    dest = tmp_path / "dest"
    shutil.copytree(version[0], dest)
    shard = json.loads((dest / "versions" / "00000001.json").read_text())["shards"][3]
    raw = bytearray((dest / shard["index"]).read_bytes())
    raw[-1] ^= 0xFF
    (dest / shard["index"]).write_bytes(bytes(raw))
    with pytest.raises(RuntimeError, match=rf"a search actor could not open its shards: (.|\n)*{shard['index']}"):
        Searcher.open(str(dest), backend="ray", actors=2, actor_cpus=0.5)
    assert ray_session.is_initialized()  # the session's instance: not this searcher's to stop


# ---------------------------------------------------------------------------------------------
# Many small shards (a lake of many small files): a group searches its flat shards as one index

SMALL = 25  # rows per shard: 24 shards over 600 rows


@pytest.fixture(scope="module")
def ties(tmp_path_factory):
    """600 rows that are 30 distinct vectors repeated (every Hamming distance is a tie many times
    over), as shards of 25 rows and as one shard, with their sign-bit scales."""
    rng = np.random.default_rng(5)
    distinct = rng.standard_normal((30, DIM)).astype(np.float32)
    distinct /= np.linalg.norm(distinct, axis=1, keepdims=True)
    x = distinct[rng.integers(0, 30, 600)]
    rm = RangeManifest(np.stack([x.min(0), x.max(0)]), BUNDLED, model_fingerprint(resolve_model(None)), True,
                       "minmax", None, len(x), 0)
    root = tmp_path_factory.mktemp("ties")
    for name, unit in (("small", SMALL), ("one", 10_000)):
        write_vectors(str(root / name), [f"doc{i}" for i in range(len(x))], x, rm, unit)
    q = distinct[:8] + 0.2 * rng.standard_normal((8, DIM)).astype(np.float32)
    return root, x, q / np.linalg.norm(q, axis=1, keepdims=True)


class FaissSearches:
    """Counts the FAISS binary flat searches made (each a call, whatever the rows it covers)."""

    def __init__(self, monkeypatch):
        import faiss

        self.calls = 0
        real = faiss.IndexBinaryFlat.search

        def search(index, *args, **kwargs):
            self.calls += 1
            return real(index, *args, **kwargs)
        monkeypatch.setattr(faiss.IndexBinaryFlat, "search", search)


@pytest.mark.parametrize("threads", [1, 3])
def test_a_group_of_small_flat_shards_is_one_search_with_the_same_ties(ties, threads, monkeypatch):
    root, x, q = ties
    codes = np.packbits(x > 0, axis=1)
    qbin = quantize(q, None, "ubinary")
    with Searcher.open(str(root / "small"), threads=threads) as small, Searcher.open(str(root / "one")) as one:
        groups = small.groups
        assert len(small.manifest.shards) == 24 and len(groups) == threads
        assert all(g.indexes == {} for g in groups)  # each shard's own index dropped once joined
        assert [c for g in groups for c in g.index_classes().values()] == ["IndexBinaryFlat"] * 24
        counted = FaissSearches(monkeypatch)
        for pool, keep in ((40, None), (160, 10), (600, 600)):
            found = groups.candidates(q, qbin, pool, keep is not None, None, None)
            assert counted.calls == threads  # one FAISS search per group, not one per shard
            counted.calls = 0
            _, shards, rows, _ = narrow_candidates(*found, pool, keep)
            assert (shards * SMALL + rows).tolist() == _brute_force(codes, q, pool, keep, sign_scales(x))
        for options in ({}, {"rescore": "bits"}, {"candidates": "hamming", "rescore": "bits"},
                        {"candidates": "hamming", "rescore": "none"}, {"k": 600}):
            a, b = small.search_vectors(q, **options), one.search_vectors(q, **options)
            assert [[(h.id, h.score, h.row + int(h.shard.split("-")[1])) for h in hits]
                    for hits in a] == [[(h.id, h.score, h.row) for h in hits] for hits in b]


def test_an_int8_index_keeps_the_rows_that_tie_at_the_cut_by_row_whatever_the_shards(ties):
    """FAISS's scalar-quantizer search keeps an arbitrary row of those tying with the k-th score,
    so an int8-index search answered other documents of that score for other shard layouts. Now
    each shard's top rows are its best by score, then row, as the binary indexes' are."""
    root, _, q = ties
    with Searcher.open(str(root / "small"), index="int8") as small, \
            Searcher.open(str(root / "one"), index="int8") as one:
        assert len(small.manifest.shards) == 24 and len(one.manifest.shards) == 1
        cut = 0
        for k in (7, 30, 45, 101):
            for options in ({"rescore": "none"}, {}):
                a, b = small.search_vectors(q, k=k, **options), one.search_vectors(q, k=k, **options)
                assert [[(h.id, h.score, h.row + int(h.shard.split("-")[1])) for h in hits]
                        for hits in a] == [[(h.id, h.score, h.row) for h in hits] for hits in b]
            wider = one.search_vectors(q, k=k + 1, rescore="none")
            cut += sum(hits[k - 1].score == hits[k].score for hits in wider)  # a tie at the cut
            # Within a score, the first rows (in the one shard, a row is the document's number).
            assert all(x.row < y.row for hits in wider for x, y in zip(hits, hits[1:]) if x.score == y.score)
        assert cut >= 8


@pytest.mark.parametrize("m", [1, 13, 40])
def test_int8_top_rows_are_the_best_by_score_then_row(m):
    """300 rows of one code, then 10 rows that score higher at the end: FAISS's heap, full of the
    tying rows when the better ones come, drops the first of them (rows 0-9). The top `m` are the
    better rows and then the first rows of the tie, whatever their number."""
    from workers.search.shard_group import _int8_top, int8_index

    codes = np.random.default_rng(3).integers(-128, -100, (600, 16)).astype(np.int8)
    codes[:300], codes[590:] = 50, 100
    ranges = np.stack([np.full(16, -1, np.float32), np.ones(16, np.float32)])
    scores, rows = _int8_top(int8_index(codes, ranges), np.ones((2, 16), np.float32), m)
    assert rows.tolist() == [(list(range(590, 600)) + list(range(300)))[:m]] * 2
    assert (np.diff(scores, axis=1) <= 0).all() and len(set(scores[:, min(m, 10):].ravel().tolist())) <= 1


def test_shards_load_a_few_at_a_time_ahead_of_their_group(ties, monkeypatch):
    """Opening loads each shard's index on the pool, at most twice the threads ahead of the group
    copying them into its joined index, so memory holds a few shards' indexes besides the group's."""
    import threading

    from workers.search.shard_group import FlatRun, ShardGroup

    root, x, _ = ties
    loaded, copied, ahead, where = [], [], [], set()
    real_load, real_append = ShardGroup._load, FlatRun.append
    lock, active, most = threading.Lock(), [0], [0]

    def load(self, o, s):
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        time.sleep(0.005)  # long enough that the next load starts meanwhile when there is room
        out = real_load(self, o, s)
        with lock:
            active[0] -= 1
            loaded.append(o)
            where.add(threading.current_thread().name)
            ahead.append(len(loaded) - len(copied))
        return out

    def append(self, o, index):
        time.sleep(0.02)  # a group slower than the loads: what the bound is for
        copied.append(o)
        return real_append(self, o, index)
    monkeypatch.setattr(ShardGroup, "_load", load)
    monkeypatch.setattr(FlatRun, "append", append)
    with Searcher.open(str(root / "small"), threads=2) as s:
        assert sorted(loaded) == list(range(24))  # each shard once
        assert copied == list(range(24))  # into the groups in ordinal order
        # Loaded and not yet copied: the 2 x 2 read ahead, and the one being copied.
        assert max(ahead) <= 2 * 2 + 1 and most == [2] and all(t.startswith("quantlake-shards") for t in where)
        assert sum(g._flat.index.ntotal for g in s.groups) == len(x)
    where.clear()
    most[0] = 0
    with Searcher.open(str(root / "small"), threads=1):
        assert where == {threading.current_thread().name} and most == [1]  # on local disk, one thread: no pool


def test_a_flat_run_locates_rows_past_empty_shards():
    import faiss

    from workers.lake.dataset import IntegrityError
    from workers.search.shard_group import FlatRun

    rng = np.random.default_rng(7)
    sizes = {3: 0, 4: 5, 6: 0, 7: 0, 9: 3, 12: 0}  # ordinal: rows, empty ones first, between and last
    codes = {o: rng.integers(0, 256, (n, 48), dtype=np.uint8) for o, n in sizes.items()}
    run = FlatRun(DIM, sum(sizes.values()))
    for o, c in codes.items():
        index = faiss.IndexBinaryFlat(DIM)
        if len(c):
            index.add(c)
        run.append(o, index)
    run.done()
    assert run.index.ntotal == 8
    shards, rows = run.locate(np.arange(8)[None, :])
    assert shards.tolist() == [[4] * 5 + [9] * 3] and rows.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2]]
    for o, c in codes.items():
        assert np.array_equal(run.codes_of(o), c)
    keys, at = run.index.search(codes[9][1:2], 1)
    assert keys.tolist() == [[0]] and [a.tolist() for a in run.locate(at)] == [[[9]], [[1]]]
    short = FlatRun(DIM, 9)  # the records give a row more than the indexes hold
    short.append(4, run.index)
    with pytest.raises(IntegrityError, match="shard indexes hold 8 rows, their records give 9"):
        short.done()
    with pytest.raises(IntegrityError, match="more than the 9 rows"):
        short.append(9, run.index)


def test_the_python_api_takes_what_a_script_passes_and_says_what_it_refuses(version):
    """A numpy integer k crashed inside FAISS; a pathlib.Path, a version "1" and a search after
    close() failed with messages that did not say why."""
    from pathlib import Path

    dest, q = version
    with Searcher.open(Path(dest), threads=1) as s:  # a Path, as a script has it
        assert s.search_vectors(q[:2], k=np.int64(3)) == s.search_vectors(q[:2], k=3)
        for bad in (True, 2.0, "3"):
            with pytest.raises(TypeError, match=rf"^k must be a whole number, got {bad!r}$"):
                s.search_vectors(q[:2], k=bad)
        with pytest.raises(TypeError, match=r"^queries must be a text or texts, got 97 among them"):
            s.search(b"abc")
        with pytest.raises(ValueError, match=r"^cannot sample -1 documents: n must be >= 0$"):
            s.sample(-1)
        assert len(s.sample(np.int64(2))) == 2
    for call in (lambda: s.search_vectors(q[:1]), lambda: s.search("text"), lambda: s.sample(1)):
        with pytest.raises(RuntimeError, match=r"^this Searcher of version 1 of .* is closed \(close\(\), or the end "
                                               r"of its with block\): open another$"):
            call()
    with pytest.raises(TypeError, match=r"^a version is a whole number \(1, 2, \.\.\.\), got '1'$"):
        Searcher.open(str(dest), version="1")
    with Searcher.open(str(dest), version=np.int64(1), threads=1) as s:
        assert s.version == 1


def test_the_first_asymmetric_query_decodes_only_the_shards_its_candidates_come_from(tmp_path):
    """Its sign-bit scales are read per shard, when a candidate comes from it: every flat shard was
    spilled (decoded whole to local disk) on the first query, for the scales alone. The hits are
    the same as with every shard spilled first."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2000, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    rm = RangeManifest(np.stack([x.min(0), x.max(0)]), BUNDLED, model_fingerprint(resolve_model(None)), True,
                       "minmax", None, len(x), 0)
    write_vectors(str(tmp_path / "dest"), [f"doc{i}" for i in range(len(x))], x, rm, 50)  # 40 shards
    q = x[[3, 1777]]
    with Searcher.open(str(tmp_path / "dest"), threads=1, cache_dir=str(tmp_path / "cache")) as s:
        hits = s.search_vectors(q, k=1)
        spilled = len(list((tmp_path / "cache").glob("*.arrow")))
    assert [h[0].id for h in hits] == ["doc3", "doc1777"]
    assert 1 <= spilled < 40 // 2, spilled
    with Searcher.open(str(tmp_path / "dest"), threads=1, cache_dir=str(tmp_path / "cache")) as s:
        for g in s.groups:
            for o in g.shards:
                g._spill(o)  # every shard spilled, its scales then read from the spill
        assert s.search_vectors(q, k=1) == hits


def test_a_cache_folder_that_cannot_be_one_is_refused_at_open(version, tmp_path):
    """Accepted, it failed on the first query, naming a temporary file inside it."""
    dest, _ = version
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ValueError, match=r"^cache_dir '.*a-file' is no folder this process can write in "
                                         r"\(FileExistsError"):
        Searcher.open(str(dest), cache_dir=str(tmp_path / "a-file"))
    with Searcher.open(str(dest), cache_dir=str(tmp_path / "new" / "cache")) as s:  # made when missing
        s.search_vectors(np.ones((1, DIM), np.float32) / np.sqrt(DIM), k=1)
    assert list((tmp_path / "new" / "cache").glob("*.arrow"))


def test_a_searcher_never_closed_leaves_no_spill_folder_behind(version):
    """Its temporary folder (spills as large as the version's columns) is removed when the
    searcher is collected, as `close` removes it."""
    import gc
    import os

    dest, q = version
    s = Searcher.open(str(dest), threads=2)
    s.search_vectors(q[:2], k=3)
    folders = {g.cache_dir for g in s.groups}
    assert len(folders) == 1 and os.listdir(folders.pop()) and s.groups
    folder = s.groups[0].cache_dir
    del s
    gc.collect()
    assert not os.path.exists(folder)


def test_a_huge_search_breadth_is_capped_or_refused(tmp_path):
    """An HNSW `ef_search` far past a shard's rows is the rows (FAISS allocates by it, and ran
    the process out of memory); one past a C int is refused in words, not by FAISS's wrapper."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((300, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    rm = RangeManifest(np.stack([x.min(0), x.max(0)]), BUNDLED, model_fingerprint(resolve_model(None)), True,
                       "minmax", None, len(x), 0)
    write_vectors(str(tmp_path / "hnsw"), [f"doc{i}" for i in range(len(x))], x, rm, 150, "IndexBinaryHNSW")
    with Searcher.open(str(tmp_path / "hnsw"), threads=1) as s:
        exhaustive = s.search_vectors(x[:3], k=5, ef_search=300)
        assert s.search_vectors(x[:3], k=5, ef_search=2 ** 31 - 1) == exhaustive
        with pytest.raises(ValueError, match=r"^ef_search must be at most 2147483647 .*got 2147483648$"):
            s.search_vectors(x[:3], k=5, ef_search=2 ** 31)
