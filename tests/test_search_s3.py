"""Search on S3 (moto's server): `quantlake search` with --storage-options or environment
credentials, lazy checksums of int8 rows, and only binary indexes in memory."""
import json
import uuid

import boto3
import pytest
import s3fs

from jobs.cli import main as cli
from jobs.ingest import run
from reference import Stored, assert_same_hits, query_vectors
from workers.ingest.config import IngestConfig
from workers.lake.dataset import IntegrityError
from workers.embedding.encoder import EncoderConfig
from workers.search.searcher import Searcher

from conftest import write_parquet_lake

pytestmark = pytest.mark.usefixtures("shared_encoders")  # conftest: warm encoder actors across the module's jobs

KEY, SECRET = "AKIAQLSEARCHKEY01", "ql-search-secret-7Yq"
AWS_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION",
            "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE")
N_DOCS = 80


@pytest.fixture(scope="module")
def dataset(s3_server, docs, ray_session, shared_encoders, tmp_path_factory):
    """80 documents ingested from S3 to S3 in 4 shards, credentials given as storage options only."""
    options = {"key": KEY, "secret": SECRET,
               "client_kwargs": {"endpoint_url": s3_server, "region_name": "us-east-1"}}
    bucket = f"s3://ql-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1", aws_access_key_id=KEY,
                 aws_secret_access_key=SECRET).create_bucket(Bucket=bucket[5:])
    fs = s3fs.S3FileSystem(**options)
    local = tmp_path_factory.mktemp("search-s3") / "lake"
    write_parquet_lake(local, docs[:N_DOCS], files=2, row_group_size=20)
    fs.put(str(local) + "/", f"{bucket}/lake/", recursive=True)
    with pytest.MonkeyPatch.context() as mp:
        for var in AWS_VARS:
            mp.delenv(var, raising=False)
        run(IngestConfig(f"{bucket}/lake", f"{bucket}/emb", id_column="id", calibration_samples=80,
                         unit_rows=20, encoder=EncoderConfig(batch_size=16), storage_options=options,
                         progress=False))
    yield f"{bucket}/emb", options, s3_server
    fs.rm(bucket[5:], recursive=True)
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def no_aws_env(monkeypatch):
    for var in AWS_VARS:
        monkeypatch.delenv(var, raising=False)


QUERIES = [5, 33, 61, 79]


def _queries(docs, tmp_path):
    texts = [" ".join(docs[i][1].split()) for i in QUERIES] + ["read a compressed archive member by member"]
    (tmp_path / "q.txt").write_text("\n".join(texts) + "\n")
    return texts, str(tmp_path / "q.txt")


def _check(capsys, url, texts, options):
    out, err = capsys.readouterr()
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["query"] for r in records] == texts
    want = Stored(url, storage_options=options).search(query_vectors(texts), 3, 4)
    for r, w in zip(records, want):
        assert_same_hits(r["hits"], w)
    assert KEY not in out + err and SECRET not in out + err
    return records


def test_search_with_storage_options(dataset, docs, tmp_path, capsys, no_aws_env):
    url, options, _ = dataset
    texts, path = _queries(docs, tmp_path)
    assert cli(["search", url, "--queries-file", path, "-k", "3", "--json",
                "--storage-options", json.dumps(options)]) == 0
    records = _check(capsys, url, texts, options)
    assert [r["hits"][0]["id"] for r in records[:4]] == [docs[i][0] for i in QUERIES]


def test_search_with_environment_credentials(dataset, docs, tmp_path, capsys, monkeypatch):
    url, options, endpoint = dataset
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    texts, path = _queries(docs, tmp_path)
    assert cli(["search", url, "--queries-file", path, "-k", "3", "--json"]) == 0
    records = _check(capsys, url, texts, options)
    assert [r["hits"][0]["id"] for r in records[:4]] == [docs[i][0] for i in QUERIES]
    # The neighbours of sampled documents: their texts are read from the source lake on S3.
    assert cli(["search", url, "--neighbours-of", "2", "-k", "1", "--json"]) == 0
    for r in (json.loads(line) for line in capsys.readouterr().out.splitlines()):
        assert r["hits"][0]["id"] == r["of"] and r["query"] == dict(docs)[r["of"]]


def test_only_binary_indexes_are_resident(dataset, docs, tmp_path, no_aws_env):
    url, options, _ = dataset
    fs = s3fs.S3FileSystem(**options)
    fs.invalidate_cache()
    index_bytes = sum(fs.size(p) for p in fs.glob(f"{url}/shards/*.faiss"))
    cache = tmp_path / "spill"
    cache.mkdir()
    with Searcher.open(url, storage_options=options, cache_dir=str(cache)) as s:
        assert len(s.manifest.shards) == 4
        assert s.resident_bytes() == index_bytes < N_DOCS * 384 // 4  # 48-byte codes, no int8 rows
        assert list(cache.iterdir()) == []  # nothing decoded before a query needs it
        hits = s.search([docs[i][1] for i in QUERIES], k=3)
        assert [h[0].id for h in hits] == [docs[i][0] for i in QUERIES]
        # int8 rows were decoded into local memory-mapped files, which do not count as resident.
        assert len(list(cache.glob("*.arrow"))) == 4 and s.resident_bytes() == index_bytes
    with Searcher.open(url, storage_options=options, index="int8") as s:
        assert s.resident_bytes() == N_DOCS * 384  # one byte per dimension: what --index int8 costs


def test_shard_altered_in_place_fails_on_the_first_query_that_touches_it(dataset, docs, tmp_path, capsys,
                                                                          no_aws_env):
    url, options, _ = dataset
    fs = s3fs.S3FileSystem(**options)
    copy = url + "-altered"
    fs.copy(url, copy, recursive=True)
    fs.invalidate_cache()
    manifest = json.loads(fs.cat_file(f"{copy}/versions/00000001.json"))
    first, last = manifest["shards"][0], manifest["shards"][-1]
    assert first["source"] == {"file": "part-00000.parquet", "row_start": 0, "row_stop": 20}
    assert last["source"] == {"file": "part-00001.parquet", "row_start": 20, "row_stop": 40}
    data = bytearray(fs.cat_file(f"{copy}/{last['path']}"))
    data[len(data) // 2] ^= 0x01  # one bit, same size: only the checksum can tell
    fs.pipe_file(f"{copy}/{last['path']}", bytes(data))

    cache = tmp_path / "spill"
    cache.mkdir()
    with Searcher.open(copy, storage_options=options, cache_dir=str(cache)) as s:  # sizes match
        # k = 1, multiplier 1, Hamming candidates: only the best candidate's shard is read to rescore
        # it. (Asymmetric candidates read the scales of every shard in their Hamming pool.)
        assert s.search(docs[3][1], k=1, rescore_multiplier=1, candidates="hamming")[0].id == docs[3][0]
        assert [p.stem for p in cache.iterdir()] == [first["sha256"]]
        with pytest.raises(IntegrityError, match=rf"{last['path']} of version 1 of {copy} has sha256 "
                                                 rf"[0-9a-f]{{64}}, the manifest says {last['sha256']}"):
            s.search(docs[75][1], k=1, rescore_multiplier=1)
    assert cli(["search", copy, docs[75][1], "--storage-options", json.dumps(options)]) == 2
    err = capsys.readouterr().err
    assert f"quantlake search: error: {last['path']} of version 1 of {copy} has sha256" in err
    assert KEY not in err and SECRET not in err
    fs.rm(copy[5:], recursive=True)


def test_shards_on_s3_load_several_at_once(dataset, docs, no_aws_env, monkeypatch):
    """Each shard's load is two round trips (its size, its index): over a network a group loads
    several at once, even on one thread of search."""
    import threading
    import time

    from workers.search.shard_group import ShardGroup

    url, options, _ = dataset
    where, lock, active, most = [], threading.Lock(), [0], [0]
    real = ShardGroup._load

    def load(self, o, s):
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        time.sleep(0.05)  # held, as a slow network would: the other loads start meanwhile
        try:
            return real(self, o, s)
        finally:
            with lock:
                active[0] -= 1
                where.append(threading.current_thread().name)
    monkeypatch.setattr(ShardGroup, "_load", load)
    with Searcher.open(url, storage_options=options, threads=1) as s:
        assert len(s.groups) == 1 and len(where) == 4 and most[0] >= 2  # several at once (all 4, unless held up)
        assert all(name.startswith("quantlake-shards") for name in where)
        assert s.search(docs[QUERIES[0]][1], k=1)[0].id == docs[QUERIES[0]][0]
