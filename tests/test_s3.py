"""End to end on S3 (moto's server): ingest, inspect and vacuum through the object store only,
with credentials from the environment or from --storage-options, and never shown."""
import json
import logging
import re

import pytest
import s3fs

from jobs.cli import main as cli
from workers.lake.dataset import open_version
from lakes import upload_lake

pytestmark = pytest.mark.usefixtures("shared_encoders")  # conftest: warm encoder actors across the module's jobs

INGEST = ["--id-column", "id", "--calibration-samples", "50", "--unit-rows", "20", "--batch-size", "32",
          "--no-progress", "--json"]



def _objects(fs, bucket):
    fs.invalidate_cache()
    return {p: fs.cat_file(p) for p in fs.find(bucket.removeprefix("s3://"))}


def _verify_all(url, options=None):
    v = open_version(url, storage_options=options)
    rows = 0
    for s in v.shards:
        rows += v.read_shard_table(s).num_rows
        assert v.read_index(s).ntotal == s.rows
    return v, rows


def test_ingest_inspect_vacuum_with_environment_credentials(s3, docs, ray_session, tmp_path, monkeypatch, capsys):
    bucket, options = s3
    fs = s3fs.S3FileSystem(**options)
    upload_lake(fs, bucket, docs[:60])
    monkeypatch.chdir(tmp_path)  # nothing may land on local disk
    # Only the environment (AWS_ENDPOINT_URL, key, secret) says where S3 is and who we are;
    # the session's Ray workers were started without it and get it through the object store.
    assert cli(["ingest", f"{bucket}/raw", f"{bucket}/emb", *INGEST]) == 0
    out, err = capsys.readouterr()
    summary = json.loads(out)
    assert (summary["version"], summary["documents"], summary["rejects"], summary["shards"]) == (1, 60, 0, 4)
    assert summary["manifest"] == f"{bucket}/emb/versions/00000001.json"
    assert list(tmp_path.iterdir()) == []
    objects = _objects(fs, bucket)
    name = bucket.removeprefix("s3://")
    assert f"{name}/emb/versions/00000001.json" in objects
    assert sum(p.startswith(f"{name}/emb/shards/") and p.endswith(".parquet") for p in objects) == 4
    assert not any(b"testing-secret" in data for data in objects.values())
    assert "testing-secret" not in out + err

    v, rows = _verify_all(f"{bucket}/emb")
    assert rows == 60 and v.manifest.source.url == f"{bucket}/raw"
    assert cli(["inspect", f"{bucket}/emb", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(objects[f"{name}/emb/versions/00000001.json"])

    orphan, tmp = f"shards/{'ab' * 16}.parquet", f"versions/00000002.json.tmp-{'0' * 32}"
    fs.pipe_file(f"{bucket}/emb/{orphan}", b"left by a failed job")
    fs.pipe_file(f"{bucket}/emb/{tmp}", b"{")
    fs.pipe_file(f"{bucket}/emb/shards/notes.txt", b"not a name quantlake writes")
    assert cli(["vacuum", f"{bucket}/emb", "--json"]) == 0  # default --older-than 1h: all too new
    assert json.loads(capsys.readouterr().out)["deleted"] == []
    assert cli(["vacuum", f"{bucket}/emb", "--older-than", "0s", "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["deleted"] == [{"path": tmp, "bytes": 1}, {"path": orphan, "bytes": 20}]
    assert plan["kept_foreign"] == ["shards/notes.txt"]
    assert cli(["vacuum", f"{bucket}/emb", "--older-than", "0s"]) == 0
    capsys.readouterr()
    left = set(_objects(fs, bucket))
    assert left == set(objects) | {f"{name}/emb/shards/notes.txt"} and _verify_all(f"{bucket}/emb")[1] == 60


KEY, SECRET = "AKIAQLTESTKEY0001", "ql-secret-Zq9vX2wT"


def test_storage_options_only_and_secrets_never_shown(s3, s3_server, docs, ray_session, monkeypatch, capsys, caplog):
    bucket, _ = s3
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(var)
    options = {"key": KEY, "secret": SECRET,
               "client_kwargs": {"endpoint_url": s3_server, "region_name": "us-east-1"}}
    fs = s3fs.S3FileSystem(**options)
    upload_lake(fs, bucket, docs[60:120])
    caplog.set_level(logging.INFO)
    opts = ["--storage-options", json.dumps(options)]

    # An odd source URL with credentials in it: botocore's error quotes them as a bucket name.
    assert cli(["ingest", f"s3://AKIAURLKEY:url-pass-123@{bucket[5:]}/raw", f"{bucket}/emb", *opts, *INGEST]) == 1
    err = capsys.readouterr().err
    assert f'quantlake ingest: error: ParamValidationError: Parameter validation failed:\n' \
           f'Invalid bucket name "***@{bucket[5:]}"' in err
    assert "url-pass-123" not in err and "AKIAURLKEY" not in err
    assert cli(["ingest", f"{bucket}/nowhere", f"{bucket}/emb", *opts, *INGEST]) == 2
    assert f"source {bucket}/nowhere does not exist" in capsys.readouterr().err

    assert cli(["ingest", f"{bucket}/raw", f"{bucket}/emb", *opts, *INGEST]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["documents"] == 60
    assert cli(["inspect", f"{bucket}/emb", *opts]) == 0
    report, err2 = capsys.readouterr()
    assert "rows       60 documents, 0 rejects, 60 rows read" in report
    shown = out + err + report + err2 + caplog.text
    objects = _objects(fs, bucket)
    for secret in (KEY, SECRET):
        assert secret not in shown
        assert not any(secret.encode() in data for data in objects.values())
    assert _verify_all(f"{bucket}/emb", options)[1] == 60


def test_unreachable_endpoint_gives_a_clear_error_without_secrets(s3, monkeypatch, capsys):
    bucket, _ = s3
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    options = {"key": KEY, "secret": SECRET, "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}}
    assert cli(["inspect", f"{bucket}/emb", "--storage-options", json.dumps(options)]) == 1
    err = capsys.readouterr().err
    assert err.startswith('quantlake inspect: error: EndpointConnectionError: Could not connect to the '
                          'endpoint URL: "http://127.0.0.1:9/')
    assert KEY not in err and SECRET not in err


def test_profile_in_storage_options_reaches_botocore(s3, s3_server, tmp_path, monkeypatch, capsys):
    from workers.lake.storage import url_to_fs
    from workers.lake.versions import commit
    from test_version import manifest

    bucket, _ = s3
    (tmp_path / "credentials").write_text(f"[analytics]\naws_access_key_id = {KEY}\n"
                                          f"aws_secret_access_key = {SECRET}\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    options = {"profile": "analytics", "client_kwargs": {"endpoint_url": s3_server}}
    fs, root = url_to_fs(f"{bucket}/emb", options)
    assert commit(fs, root, manifest("w1")) == 1
    assert cli(["inspect", f"{bucket}/emb", "--json", "--storage-options", json.dumps(options)]) == 0
    assert json.loads(capsys.readouterr().out)["writer"] == "w1"
    options["profile"] = "missing"
    assert cli(["inspect", f"{bucket}/emb", "--storage-options", json.dumps(options)]) == 1
    assert "ProfileNotFound: The config profile (missing) could not be found" in capsys.readouterr().err


def test_a_lake_listed_again_in_one_process_sees_new_and_rewritten_files(s3, s3_server):
    """`reindex --watch` lists the lake every cycle in one process, with the one s3fs object fsspec
    keeps per options: its cached folder listing from the first cycle made a file added later
    unreadable ('cannot read parquet file …') and a rewritten one fail on its old ETag, every
    cycle. Listing and opening ask the store, not that cache."""
    import io

    import boto3
    import pyarrow as pa
    import pyarrow.parquet as pq

    from workers.ingest.source import check_file, iter_batches, list_source

    bucket, options = s3
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")

    def put(key, texts):
        buf = io.BytesIO()
        pq.write_table(pa.table({"text": texts, "id": [f"{key}-{i}" for i in range(len(texts))]}), buf)
        client.put_object(Bucket=bucket[len("s3://"):], Key=f"raw/{key}.parquet", Body=buf.getvalue())

    def texts(fs, root, f):
        return [t for _, b in iter_batches(fs, root, f, ["text"]) for t in b.column("text").to_pylist()]

    put("a", ["one", "two"])
    fs, root, files = list_source(f"{bucket}/raw", options)
    assert [check_file(fs, root, f, "text", "id") for f in files] == [[2]]
    assert texts(fs, root, files[0]) == ["one", "two"]
    put("a", ["three", "four", "five"])
    put("b", ["six"])
    fs2, root, files = list_source(f"{bucket}/raw", options)
    assert fs2 is fs  # the same cached object, as in a watch's next cycle
    assert [(f.relpath, check_file(fs, root, f, "text", "id")) for f in files] == [("a.parquet", [3]),
                                                                                   ("b.parquet", [1])]
    assert [texts(fs, root, f) for f in files] == [["three", "four", "five"], ["six"]]


def test_keys_with_empty_dot_or_dot_dot_parts_are_refused_naming_them(s3, s3_server):
    """An object store's key is a name, not a path: `lake/a//x.jsonl` was listed as `a/x.jsonl`,
    which does not exist, and `lake/sub/../ok.jsonl` as a second `ok.jsonl`, read from the first.
    Such a key is refused naming it, unless --exclude leaves it out."""
    import boto3

    from workers.ingest.source import SourceError, iter_batches, list_source

    bucket, options = s3
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    client.put_object(Bucket=bucket[len("s3://"):], Key="lake/ok.jsonl", Body=b'{"text": "ok"}\n')
    for key, rel in (("lake/a//x.jsonl", "a//x.jsonl"), ("lake//y.jsonl", "/y.jsonl"),
                     ("lake/sub/../ok.jsonl", "sub/../ok.jsonl"), ("lake/./z.jsonl", "./z.jsonl")):
        client.put_object(Bucket=bucket[len("s3://"):], Key=key, Body=b'{"text": "odd"}\n')
        with pytest.raises(SourceError, match=rf"^source file {re.escape(repr(rel))} \(under s3://ql-\w+/lake\) has an "
                                              r"empty, '\.' or '\.\.' part in its name"):
            list_source(f"{bucket}/lake", options)
        client.delete_object(Bucket=bucket[len("s3://"):], Key=key)
    client.put_object(Bucket=bucket[len("s3://"):], Key="lake/sub/../ok.jsonl", Body=b'{"text": "odd"}\n')
    fs, root, files = list_source(f"{bucket}/lake", options, exclude=["sub/*"])
    assert [f.relpath for f in files] == ["ok.jsonl"]
    assert [t for _, b in iter_batches(fs, root, files[0], ["text"]) for t in b.column("text").to_pylist()] == ["ok"]
