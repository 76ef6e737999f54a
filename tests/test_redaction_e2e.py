"""Credentials in URLs after a successful ingest, and in vacuum's errors: stored and shown masked.

The source with `user:pass@` is a real HTTP server on 127.0.0.1 that refuses requests without
those credentials (tests/http_lake.py), so the ingest can only succeed by using them.
"""
import json

import pytest
import s3fs

from http_lake import HttpLake
from jobs.cli import main as cli

from conftest import write_parquet_lake

pytestmark = pytest.mark.usefixtures("shared_encoders")  # conftest: warm encoder actors across the module's jobs

USER, PASSWORD = "ql-reader", "ql-pass-W7c2rT"
SIGNATURE = "5d41402abc4b2a76b9719d911017c592ae1c"


@pytest.fixture(scope="module")
def http_lake(tmp_path_factory, docs):
    root = tmp_path_factory.mktemp("http-lake")
    write_parquet_lake(root / "lake", docs[:40], files=1, row_group_size=20)
    server = HttpLake(root, USER, PASSWORD)
    yield server
    server.close()


def _files_hold(dest, secret: str) -> list[str]:
    return [str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


def test_source_credentials_are_stored_and_printed_masked(http_lake, ray_session, tmp_path, capsys):
    source = f"{http_lake.url}/lake/part-00000.parquet"
    masked = source.replace(f"{USER}:{PASSWORD}@", "***@")
    dest = tmp_path / "dest"
    assert cli(["ingest", source, str(dest), "--id-column", "id", "--calibration-samples", "40",
                "--batch-size", "16", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["documents"] == 40
    assert http_lake.requests and all(ok for *_, ok in http_lake.requests)  # the credentials were used
    manifest = json.loads((dest / "versions" / "00000001.json").read_text())
    assert manifest["source"]["url"] == masked
    assert cli(["inspect", str(dest)]) == 0
    report, err2 = capsys.readouterr()
    assert f"  source     {masked}: 1 file(s)" in report
    for secret in (PASSWORD, f"{USER}:"):
        assert secret not in out + err + report + err2
        assert _files_hold(dest, secret) == []
    # The lake is still usable: its URL with credentials is given again, never read from the manifest.
    assert cli(["search", str(dest), "--neighbours-of", "2", "-k", "1", "--source", source, "--json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert all(r["hits"][0]["id"] == r["of"] for r in records)


def test_signed_query_string_is_masked_in_what_ingest_prints(http_lake, tmp_path, capsys):
    # A pre-signed URL's signature is a credential too. (Such a source is refused today: the listed
    # name keeps the query string, so it has no Parquet suffix; see the test above for the rest.)
    source = f"{http_lake.url}/lake/part-00000.parquet?X-Amz-Expires=300&X-Amz-Signature={SIGNATURE}"
    status = cli(["ingest", source, str(tmp_path / "dest"), "--id-column", "id", "--no-progress"])
    err = capsys.readouterr().err
    assert status != 0 and err.startswith("quantlake ingest: error: ")
    assert SIGNATURE not in err and PASSWORD not in err


def test_vacuum_errors_mask_url_credentials(s3, capsys):
    bucket, options = s3
    # botocore quotes the whole netloc as an invalid bucket name: user, password and all.
    url = f"s3://AKIAVACUUMKEY:vacuum-pass-123@{bucket[5:]}/emb"
    for args in ([], ["--dry-run", "--json"], ["--retain", "1", "--older-than", "0s"]):
        assert cli(["vacuum", url, *args]) == 1
        err = capsys.readouterr().err
        assert err.startswith("quantlake vacuum: error: ParamValidationError: ")
        assert f'Invalid bucket name "***@{bucket[5:]}"' in err
        assert "vacuum-pass-123" not in err and "AKIAVACUUMKEY" not in err


def test_vacuum_errors_show_no_storage_option_secrets(s3, monkeypatch, capsys):
    bucket, _ = s3
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    options = {"key": "AKIAVACUUMOPTKEY", "secret": "vacuum-secret-Q9z", "token": "vacuum-token-8Hk",
               "client_kwargs": {"endpoint_url": "http://127.0.0.1:9", "region_name": "us-east-1"}}
    assert cli(["vacuum", f"{bucket}/emb", "--dry-run", "--storage-options", json.dumps(options)]) == 1
    err = capsys.readouterr().err
    assert err.startswith('quantlake vacuum: error: EndpointConnectionError: Could not connect to the endpoint '
                          'URL: "http://127.0.0.1:9/'), err
    assert len(err.splitlines()) == 1  # one line, no traceback
    for secret in ("AKIAVACUUMOPTKEY", "vacuum-secret-Q9z", "vacuum-token-8Hk"):
        assert secret not in err
    s3fs.S3FileSystem.clear_instance_cache()
