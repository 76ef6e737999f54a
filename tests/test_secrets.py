"""Secrets stay secret: widened redaction (connection strings, SAS tokens, headers, signed URLs),
the search config and ingest summary, and end to end on S3 with Ray, nothing ever shows a secret."""
import json
import logging
import os
import uuid

import numpy as np
import pytest
import s3fs

from jobs.cli import main as cli
from jobs.ingest import _version_doc, format_summary, manifest_url
from jobs.search import SearchConfig
from ranges.manifest import RangeManifest
from workers.ingest.config import IngestConfig

from workers.lake.redact import MASK, describe_error, redact, redact_text, redact_url, secret_values
from lakes import upload_lake

pytestmark = pytest.mark.usefixtures("shared_encoders")  # conftest: warm encoder actors across the module's jobs

AZURE_KEY = "YWNjb3VudC1rZXktdmFsdWU9PQ=="
OPTIONS = {
    "connection_string": f"DefaultEndpointsProtocol=https;AccountName=acct;AccountKey={AZURE_KEY};"
                         "EndpointSuffix=core.windows.net",
    "account_name": "acct", "account_key": "acct-key-123456", "sas_token": "sv=2024&sig=sas-sig-123456",
    "headers": {"Authorization": "Bearer bearer-tok-123456", "Cookie": "session=cookie-123456",
                "X-Api-Key": "api-key-123456", "Accept": "application/json"},
    "client_kwargs": {"headers": {"proxy-authorization": "Basic cHJveHk6cGFzcw=="}},
}
SIGNED_S3 = ("https://lake.s3.amazonaws.com/raw/part-0.parquet?X-Amz-Algorithm=AWS4-HMAC-SHA256"
             "&X-Amz-Credential=AKIAS3SIGNED%2F20261122%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Date=20261122T140000Z"
             "&X-Amz-Expires=3600&X-Amz-SignedHeaders=host&X-Amz-Security-Token=s3-session-tok"
             "&X-Amz-Signature=0a1b2c3d4e5f60718293")
SIGNED_GCS = ("https://storage.googleapis.com/lake/raw.parquet?X-Goog-Algorithm=GOOG4-RSA-SHA256"
              "&X-Goog-Credential=svc%40proj.iam.gserviceaccount.com%2F20261122&X-Goog-Signature=9f8e7d6c5b4a")
SIGNED_AZURE = "https://acct.blob.core.windows.net/lake/raw.parquet?sv=2024-11-04&sp=r&se=2026-11-23&sig=az%2Bsig%3D"


def test_option_names_of_other_stores_and_headers_are_masked():
    assert redact(OPTIONS) == {
        "connection_string": MASK, "account_name": "acct", "account_key": MASK, "sas_token": MASK,
        "headers": {"Authorization": MASK, "Cookie": MASK, "X-Api-Key": MASK, "Accept": "application/json"},
        "client_kwargs": {"headers": {"proxy-authorization": MASK}},
    }
    found = secret_values(OPTIONS, environ={})
    assert {OPTIONS["connection_string"], "acct-key-123456", OPTIONS["sas_token"], "Bearer bearer-tok-123456",
            "session=cookie-123456", "api-key-123456", "Basic cHJveHk6cGFzcw=="} <= found
    assert "acct" not in found and "application/json" not in found


def test_signed_url_query_strings_are_masked():
    assert redact_url(SIGNED_S3) == (
        "https://lake.s3.amazonaws.com/raw/part-0.parquet?X-Amz-Algorithm=AWS4-HMAC-SHA256"
        f"&X-Amz-Credential={MASK}&X-Amz-Date=20261122T140000Z&X-Amz-Expires=3600&X-Amz-SignedHeaders=host"
        f"&X-Amz-Security-Token={MASK}&X-Amz-Signature={MASK}")
    assert redact_url(SIGNED_GCS) == ("https://storage.googleapis.com/lake/raw.parquet?X-Goog-Algorithm="
                                      f"GOOG4-RSA-SHA256&X-Goog-Credential={MASK}&X-Goog-Signature={MASK}")
    assert redact_url(SIGNED_AZURE) == ("https://acct.blob.core.windows.net/lake/raw.parquet?sv=2024-11-04&sp=r"
                                        f"&se=2026-11-23&sig={MASK}")
    assert redact_url("https://h/x?AWSAccessKeyId=AKIAV2&Signature=v2sig&Expires=1&access_token=at&token=t&a=1") \
        == f"https://h/x?AWSAccessKeyId={MASK}&Signature={MASK}&Expires=1&access_token={MASK}&token={MASK}&a=1"
    assert redact_url("https://u:p@h/x?versionId=3&sig=") == f"https://{MASK}@h/x?versionId=3&sig="
    # Free text: a URL inside a message, a connection string, an Authorization header.
    text = (f"GET {SIGNED_AZURE} failed; conn DefaultEndpointsProtocol=https;AccountKey={AZURE_KEY};x=1\n"
            "Authorization: AWS4-HMAC-SHA256 Credential=AKIAHDR/2026, Signature=hdrsig123\nBearer tok-abcdef")
    shown = redact_text(text)
    for secret in ("az%2Bsig%3D", AZURE_KEY, "AKIAHDR", "hdrsig123", "tok-abcdef"):
        assert secret not in shown
    assert shown.endswith(f"AccountKey={MASK};x=1\nAuthorization: {MASK}\nBearer {MASK}")
    # A library quoting the bare signature (decoded) is caught by value.
    found = secret_values(urls=[SIGNED_S3, SIGNED_AZURE], environ={})
    assert {"0a1b2c3d4e5f60718293", "s3-session-tok", "AKIAS3SIGNED/20261122/us-east-1/s3/aws4_request",
            "az+sig="} <= found
    assert describe_error(OSError("bad signature az+sig= for key AKIAS3SIGNED/20261122/us-east-1/s3/aws4_request"),
                          urls=[SIGNED_S3, SIGNED_AZURE]) == f"bad signature {MASK} for key {MASK}"


def test_search_config_repr_hides_options_and_url_credentials():
    cfg = SearchConfig(dest="s3://AKIAD:dest-pass-1@lake/emb", neighbours_of=2, storage_options=OPTIONS,
                       source=SIGNED_S3, queries_file=None, ray_address="ray://u:ray-pass-1@head:10001")
    shown = repr(cfg)
    for secret in secret_values(OPTIONS, environ={}) | {"dest-pass-1", "ray-pass-1", "0a1b2c3d4e5f60718293",
                                                        "s3-session-tok", AZURE_KEY}:
        assert secret not in shown, secret
    assert f"dest='s3://{MASK}@lake/emb'" in shown and "'account_name': 'acct'" in shown
    ingest = IngestConfig(SIGNED_AZURE, "s3://lake/emb", storage_options=OPTIONS)
    assert "az%2Bsig" not in repr(ingest) and AZURE_KEY not in repr(ingest)


def test_summary_and_manifest_never_hold_url_credentials():
    url = manifest_url("https://user:dest-pw-123@lake.example/emb/", 3)
    assert url == f"https://{MASK}@lake.example/emb/versions/00000003.json"
    summary = {"version": 3, "documents": 1, "rejects": 0, "rows_read": 1, "shards": 1, "shards_reused": 0,
               "shards_written": 1, "precisions": ["int8", "ubinary"], "bytes_float32": 1, "bytes_int8": 1,
               "bytes_ubinary": 1, "bytes_stored": 1, "compression_int8": 1, "compression_ubinary": 1, "docs_per_s": 1,
               "wall_s": 1, "calibrate_s": 0, "encode_s": 0, "quantize_s": 0, "write_s": 0, "clipped_values": 0,
               "ranges_id": "r", "manifest": url}
    assert "dest-pw-123" not in format_summary(summary)
    ranges = RangeManifest(np.zeros((2, 8), np.float32), "m", "sha256:" + "0" * 64, True, "minmax", None, 2, 0)
    doc = _version_doc(IngestConfig(SIGNED_S3, "s3://lake/emb"), [], ranges, "ranges/r.json", [], None, [])
    assert doc.source.url == redact_url(SIGNED_S3) and "0a1b2c3d4e5f60718293" not in json.dumps(doc.to_json())



def _ray_logs() -> dict[str, bytes]:
    """Every file of this Ray session's log folder (worker and driver logs, dumps)."""
    import ray

    folder = ray._private.worker._global_node.get_logs_dir_path()
    out = {}
    for base, _, names in os.walk(folder):
        for name in names:
            with open(os.path.join(base, name), "rb") as f:
                out[os.path.join(base, name)] = f.read()
    return out


def _reachable_text(obj, seen=None) -> bytes:
    """Every string and bytes value reachable from `obj` (containers, dataclasses, object
    attributes, arrays' bytes), joined: what Ray would serialise of it into a task spec."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return b""
    seen.add(id(obj))
    if isinstance(obj, str):
        return obj.encode() + b"\0"
    if isinstance(obj, (bytes, bytearray)):
        return bytes(obj) + b"\0"
    if hasattr(obj, "tobytes"):
        return obj.tobytes() + b"\0"
    if isinstance(obj, dict):
        return b"".join(_reachable_text(k, seen) + _reachable_text(v, seen) for k, v in obj.items())
    if isinstance(obj, (list, tuple, set, frozenset)):
        return b"".join(_reachable_text(v, seen) for v in obj)
    fields = getattr(obj, "__dict__", None) or {n: getattr(obj, n) for n in getattr(obj, "__slots__", ())
                                                 if hasattr(obj, n)}
    return _reachable_text(fields, seen) + repr(obj).encode()


@pytest.fixture
def actor_arguments(monkeypatch):
    """(class name, text reachable from the constructor arguments) of every Ray actor created:
    what Ray puts in the actor's task specification (an observation: creation goes on unchanged)."""
    from ray.actor import ActorClass

    seen = []
    real = ActorClass._remote

    def spy(self, args=None, kwargs=None, **options):
        seen.append((self.__ray_metadata__.class_name, _reachable_text((args, kwargs))))
        return real(self, args=args, kwargs=kwargs, **options)

    monkeypatch.setattr(ActorClass, "_remote", spy)
    return seen


def test_ingest_and_ray_search_on_s3_never_show_a_secret(s3, s3_server, docs, ray_session, monkeypatch, capfd,
                                                         caplog, actor_arguments):
    bucket, _ = s3
    # The storage options are the only credentials: nothing in the environment.
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(var)
    key, secret = f"AKIA{uuid.uuid4().hex[:12].upper()}", f"ql-secret-{uuid.uuid4().hex}"
    signature, credential = uuid.uuid4().hex, f"AKIASIGNED{uuid.uuid4().hex[:8].upper()}"
    secrets = (key, secret, signature, credential)
    options = {"key": key, "secret": secret, "client_kwargs": {"endpoint_url": s3_server, "region_name": "us-east-1"}}
    fs = s3fs.S3FileSystem(**options)
    upload_lake(fs, bucket, docs[200:240])
    opts = ["--storage-options", json.dumps(options)]
    caplog.set_level(logging.INFO)
    logs_before = _ray_logs()

    # A signed URL for a source that cannot be reached: the error names the URL, masked.
    signed = (f"https://127.0.0.1:9/lake/part-0.parquet?X-Amz-Credential={credential}%2F20261122"
              f"&X-Amz-Signature={signature}")
    assert cli(["ingest", signed, f"{bucket}/emb", "--no-progress"]) == 2
    failed = capfd.readouterr()
    assert "quantlake ingest: error: source https://127.0.0.1:9/lake/part-0.parquet?X-Amz-Credential=***" \
           "&X-Amz-Signature=*** does not exist" in failed.err

    assert cli(["ingest", f"{bucket}/raw", f"{bucket}/emb", *opts, "--id-column", "id", "--calibration-samples",
                "40", "--unit-rows", "20", "--batch-size", "32", "--no-progress", "--json"]) == 0
    ingest = capfd.readouterr()
    summary = json.loads(ingest.out)
    assert summary["documents"] == 40 and summary["manifest"] == f"{bucket}/emb/versions/00000001.json"

    query = docs[205][1]
    assert cli(["search", f"{bucket}/emb", query, "-k", "3", "--ray", "--actors", "2", "--json", *opts]) == 0
    assert cli(["search", f"{bucket}/emb", "--neighbours-of", "2", "-k", "1", "--ray", "--json", *opts]) == 0
    searched = capfd.readouterr()
    first, *neighbours = [json.loads(line) for line in searched.out.splitlines()]
    assert first["hits"][0]["id"] == docs[205][0] and len(first["hits"]) == 3
    assert [r["hits"][0]["id"] for r in neighbours] == [r["of"] for r in neighbours] and len(neighbours) == 2
    searchers = [args for name, args in actor_arguments if name == "ShardGroupActor"]
    assert len(searchers) == 4  # --actors 2, then one per CPU of the session's 2

    shown = "".join([failed.out, failed.err, ingest.out, ingest.err, searched.out, searched.err, caplog.text])
    fs.invalidate_cache()
    objects = {p: fs.cat_file(p) for p in fs.find(bucket.removeprefix("s3://"))}
    # 2 source files; the ranges, 2 shards of 3 files each, 2 kept scans, the manifest.
    assert any(p.endswith("/emb/versions/00000001.json") for p in objects) and len(objects) == 12
    logs = {p: data for p, data in _ray_logs().items() if logs_before.get(p) != data}
    for s in secrets:
        assert s not in shown, s
        assert not [p for p, data in objects.items() if s.encode() in data], s
        assert not [p for p, data in logs.items() if s.encode() in data], s
        assert not [name for name, data in actor_arguments if s.encode() in data], s
