"""A version's manifest is data, not orders: search never loads a model folder, reads a source or
sizes its arrays because a manifest says so."""
import json
import os
import shutil
import tracemalloc

import numpy as np
import pyarrow.parquet as pq
import pytest

import workers.search.searcher as searcher_module
import jobs.search as search_job
import workers.ingest.source as source_module
from jobs.cli import main as cli
from workers.embedding.encoder import encoder_fingerprint, resolve_model
from workers.embedding.quantizer import quantize
from workers.search.rescore import int8_query, int8_scores
from jobs.common import on_dataset_storage
from workers.search.searcher import Searcher

MANIFEST = "versions/00000001.json"


def _edit(dest, section, **fields):
    path = dest / MANIFEST
    doc = json.loads(path.read_text())
    doc[section].update(fields)
    path.write_text(json.dumps(doc))


@pytest.fixture
def hashed(monkeypatch):
    """Every folder search fingerprints (an observation: the real function still runs)."""
    seen = []

    def spy(path, backend="torch"):
        seen.append(str(path))
        return encoder_fingerprint(path, backend)

    monkeypatch.setattr(searcher_module, "encoder_fingerprint", spy)
    return seen


def _planted_model(folder):
    """A folder holding a working copy of the bundled model: what an attacker could place."""
    shutil.copytree(resolve_model(None), folder, copy_function=os.symlink)
    return folder


def test_a_path_in_the_manifest_is_never_hashed_or_loaded(copy_dataset, tmp_path, hashed, capsys):
    planted = _planted_model(tmp_path / "planted")
    for name in ("/etc", str(planted), "../planted", "~/planted"):
        _edit(copy_dataset, "model", name=name)
        assert cli(["search", str(copy_dataset), "a query", "--json"]) == 2
        err = capsys.readouterr().err
        assert f"version 1 of {copy_dataset} was encoded with model {name!r}, which is not a Hugging Face " \
               "model name" in err and "never hashed or loaded; pass --model" in err, err
    assert hashed == []
    # The user naming the folder is another matter: its fingerprint is checked, then it is used.
    assert cli(["search", str(copy_dataset), "a query", "--json", "--model", str(planted)]) == 0
    assert len(json.loads(capsys.readouterr().out)["hits"]) == 10 and hashed == [str(planted)]


def test_a_name_shaped_like_a_folder_of_the_working_directory_is_looked_up_in_the_cache_only(
        copy_dataset, tmp_path, hashed, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _planted_model(tmp_path / "acme" / "minilm")  # `acme/minilm` relative to the working directory
    _edit(copy_dataset, "model", name="acme/minilm")
    with pytest.raises(ValueError, match="model 'acme/minilm', which is not in the local Hugging Face cache; "
                                         "download it first, or pass --model"):
        Searcher.open(str(copy_dataset))
    assert hashed == []


def test_bundled_and_cached_names_are_resolved_by_name(copy_dataset, docs, tmp_path, hashed, monkeypatch):
    import huggingface_hub.constants

    # A Hugging Face cache entry, laid out as the hub lays it out, holding the bundled model's files.
    repo = tmp_path / "hub" / "models--acme--minilm"
    rev = "0123456789abcdef0123456789abcdef01234567"
    _planted_model(repo / "snapshots" / rev)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    text = docs[7][1]
    for name in ("sentence-transformers/all-MiniLM-L6-v2", "acme/minilm"):
        _edit(copy_dataset, "model", name=name)
        with Searcher.open(str(copy_dataset), threads=1) as s:
            assert s.search(text, k=1)[0].id == docs[7][0]
    assert hashed == [str(resolve_model(None)), str(repo / "snapshots" / rev)]


def test_source_on_the_dataset_storage():
    assert on_dataset_storage("s3://lake/emb", "s3://lake/raw")
    assert on_dataset_storage("s3://key:pass@lake/emb", "s3://***@lake/raw")
    assert not on_dataset_storage("s3://lake/emb", "s3://other-bucket/raw")
    assert not on_dataset_storage("s3://lake/emb", "gs://lake/raw")
    assert not on_dataset_storage("s3://lake/emb", "/lake/raw")
    assert not on_dataset_storage("s3://lake/emb", "simplecache::s3://lake/raw")
    # Locally: inside the folder holding the dataset (`lake/raw` next to `lake/emb`), nowhere else.
    assert on_dataset_storage("/data/lake/emb", "/data/lake/raw")
    assert on_dataset_storage("file:///data/lake/emb", "/data/lake/raw/part.parquet")
    assert on_dataset_storage("/data/lake/emb", "file:///data/lake")
    assert not on_dataset_storage("/data/lake/emb", "/data/lake/../../etc")
    assert not on_dataset_storage("/data/lake/emb", "/data/lakeside/raw")
    assert not on_dataset_storage("/data/lake/emb", "/etc")
    assert not on_dataset_storage("/data/lake/emb", "s3://data/lake/raw")
    assert not on_dataset_storage("/emb", "/raw")  # the folder holding /emb is the whole disk


@pytest.fixture
def listed(monkeypatch):
    """Every source URL search lists (an observation: the real function still runs)."""
    seen = []
    real = source_module.list_source

    def spy(url, storage_options=None):
        seen.append(url)
        return real(url, storage_options)

    monkeypatch.setattr(search_job, "list_source", spy)
    return seen


def test_neighbours_read_a_source_outside_the_dataset_folder_only_when_named(small_dataset, copy_dataset,
                                                                                listed, capsys):
    lake = str(small_dataset[0].parent / "lake")
    # The session dataset sits next to its lake: the manifest's source is used as it is.
    assert cli(["search", str(small_dataset[0]), "--neighbours-of", "2", "-k", "1", "--json"]) == 0
    records = [json.loads(r) for r in capsys.readouterr().out.splitlines()]
    assert len(records) == 2 and [r["hits"][0]["id"] for r in records] == [r["of"] for r in records]
    assert listed == [lake]
    # The copy lives elsewhere, so that lake is outside its folder; and a manifest naming /etc.
    for url in (lake, "/etc"):
        _edit(copy_dataset, "source", url=url)
        assert cli(["search", str(copy_dataset), "--neighbours-of", "2", "--json"]) == 2
        err = capsys.readouterr().err
        assert f"version 1 names its source {url}, which is not on the dataset's own storage (the folder " \
               f"{copy_dataset.parent}); a manifest alone never chooses what this job's credentials read: " \
               "pass --source" in err, err
    assert listed == [lake]
    assert cli(["search", str(copy_dataset), "--neighbours-of", "2", "-k", "1", "--json", "--source", lake]) == 0
    records = [json.loads(r) for r in capsys.readouterr().out.splitlines()]
    assert [r["hits"][0]["id"] for r in records] == [r["of"] for r in records] and listed == [lake, lake]


def _upload(fs, local, url):
    for f in sorted(os.listdir(local)):
        fs.pipe_file(f"{url}/{f}", (local / f).read_bytes())


def test_neighbours_on_s3_read_only_the_dataset_bucket_unless_named(small_dataset, s3, s3_server, listed, capsys):
    """The dataset in one bucket; the manifest points its source at another bucket the same
    credentials reach: refused until the user names it with --source."""
    import uuid

    import boto3
    import s3fs

    bucket, options = s3
    fs = s3fs.S3FileSystem(**options)
    dest, lake = small_dataset[0], small_dataset[0].parent / "lake"
    for sub in os.listdir(dest):  # versions, ranges, shards, rejects: a dataset is relocatable
        _upload(fs, dest / sub, f"{bucket}/emb/{sub}")
    _upload(fs, lake, f"{bucket}/raw")
    other = f"ql-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=other)
    try:
        _upload(fs, lake, f"s3://{other}/raw")
        doc = json.loads((dest / MANIFEST).read_text())
        opts = ["--storage-options", json.dumps(options), "--neighbours-of", "2", "-k", "1", "--json"]
        for source, allowed in ((f"s3://{other}/raw", False), (f"{bucket}/raw", True)):
            doc["source"]["url"] = source
            fs.pipe_file(f"{bucket}/emb/{MANIFEST}", json.dumps(doc).encode())
            out_err = (cli(["search", f"{bucket}/emb", *opts]), capsys.readouterr())
            if allowed:
                assert out_err[0] == 0 and len(out_err[1].out.splitlines()) == 2
            else:
                assert out_err[0] == 2 and f"version 1 names its source s3://{other}/raw, which is not on the " \
                    f"dataset's own storage ({bucket}); a manifest alone never chooses" in out_err[1].err
        assert listed == [f"{bucket}/raw"]
        assert cli(["search", f"{bucket}/emb", *opts, "--source", f"s3://{other}/raw"]) == 0
        records = [json.loads(r) for r in capsys.readouterr().out.splitlines()]
        assert [r["hits"][0]["id"] for r in records] == [r["of"] for r in records]
        assert listed == [f"{bucket}/raw", f"s3://{other}/raw"]
    finally:
        fs.rm(other, recursive=True)


def _brute_force(dest, s: Searcher, q):
    """Every row of the version ranked by the int8 rescoring score, straight from the Parquet files."""
    ids, codes = [], []
    for shard in s.manifest.shards:
        t = pq.read_table(dest / shard.path, columns=["id", "int8"])
        ids += t["id"].to_pylist()
        codes.append(np.stack(t["int8"].to_numpy(zero_copy_only=False)).astype(np.int8))
    codes = np.concatenate(codes)
    w, offset = int8_query(q, s.ranges.ranges, "int8")
    out = []
    for i in range(len(q)):
        wi = np.ascontiguousarray(np.broadcast_to(w[i], codes.shape))
        scores = int8_scores(codes, wi, np.full(len(codes), offset[i], np.float32))
        order = np.argsort(-scores, kind="stable")
        out.append([(ids[j], float(scores[j])) for j in order])
    return out


def test_k_is_capped_at_the_rows_of_the_version(small_dataset, docs):
    dest = small_dataset[0]
    with Searcher.open(str(dest), threads=1) as s:
        rows = s.manifest.counts["documents"]
        q = s.encode([docs[3][1], docs[50][1], "reading a compressed archive"])
        tracemalloc.start()
        try:
            hits = s.search_vectors(q, k=10**6)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        # Unbounded, each shard's Hamming search alone would return 3 queries x 16M candidates x 12 bytes.
        assert peak < 8 << 20, peak
        assert [len(h) for h in hits] == [rows] * 3
        assert [[(h.id, h.score) for h in hh] for hh in hits] == _brute_force(dest, s, q)
        assert [h.id for h in s.search_vectors(q, k=rows)[0]] == [h.id for h in hits[0]]
        # A group's pool stops at what its shards hold: each of their rows once.
        assert len(s.groups) == 1
        for g in s.groups:
            keys, shards, found, bits = g.candidates(q, quantize(q, None, "ubinary"), 10**6, True)
            assert keys.shape == (3, rows)
            assert sorted(zip(shards[0].tolist(), found[0].tolist())) == \
                [(o, r) for o, shard in sorted(g.shards.items()) for r in range(shard.rows)]
