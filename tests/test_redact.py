"""Secrets are masked wherever options or URLs are shown, and reach Ray workers outside task arguments."""
import dataclasses
import json

from workers.ingest.config import IngestConfig
from workers.lake.credentials import StorageAccess
from workers.lake.redact import MASK, describe_error, redact, redact_text, redact_url, secret_values

OPTIONS = {
    "key": "AKIAEXAMPLEKEY", "secret": "s3cr3t-value", "profile": "analytics", "anon": False,
    "client_kwargs": {"endpoint_url": "https://svc:url-pass-99@minio.internal:9000", "region_name": "eu-west-1"},
    "config_kwargs": {"aws_session_token": "tok-123456", "retries": {"max_attempts": 3}},
    "extra": [{"Api_Key": "k-abcdef"}, {"PASSWORD": "pw-abcdef", "user": "bob"}, "plain"],
    "Credentials": {"anything": "inside-is-masked"}, "token": None,
}


def test_redact_masks_secret_keys_at_any_depth_and_url_credentials():
    assert redact(OPTIONS) == {
        "key": MASK, "secret": MASK, "profile": "analytics", "anon": False,
        "client_kwargs": {"endpoint_url": f"https://{MASK}@minio.internal:9000", "region_name": "eu-west-1"},
        "config_kwargs": {"aws_session_token": MASK, "retries": {"max_attempts": 3}},
        "extra": [{"Api_Key": MASK}, {"PASSWORD": MASK, "user": "bob"}, "plain"],
        "Credentials": MASK, "token": None,
    }
    assert OPTIONS["secret"] == "s3cr3t-value"  # a copy: the options themselves are untouched


def test_redact_url():
    assert redact_url("s3://AKIA:secret@bucket/raw") == f"s3://{MASK}@bucket/raw"
    assert redact_url("https://user:pw@host/x?y=1") == f"https://{MASK}@host/x?y=1"
    assert redact_url("s3://bucket/a@b/c") == "s3://bucket/a@b/c"  # '@' in the path is no userinfo
    assert redact_url("/local/path") == "/local/path"


def test_secret_values_and_text_redaction(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret-value")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    found = secret_values(OPTIONS)
    assert {"AKIAEXAMPLEKEY", "s3cr3t-value", "tok-123456", "k-abcdef", "pw-abcdef", "inside-is-masked",
            "svc:url-pass-99", "env-secret-value"} <= found
    assert "us-east-1" not in found and "analytics" not in found
    text = ("InvalidAccessKeyId: <AWSAccessKeyId>AKIAEXAMPLEKEY</AWSAccessKeyId> calling "
            "https://svc:url-pass-99@minio.internal:9000/b with env-secret-value")
    assert redact_text(text, found) == (f"InvalidAccessKeyId: <AWSAccessKeyId>{MASK}</AWSAccessKeyId> calling "
                                        f"https://{MASK}@minio.internal:9000/b with {MASK}")
    assert describe_error(PermissionError(text), OPTIONS) == redact_text(text, found)


def test_config_repr_and_worker_copy_hold_no_secret():
    cfg = IngestConfig("s3://AKIA:url-secret@lake/raw", "s3://lake/emb", storage_options=OPTIONS)
    shown = repr(cfg)
    for secret in secret_values(OPTIONS) | {"url-secret"}:
        assert secret not in shown
    assert "'profile': 'analytics'" in shown and "s3://***@lake/raw" in shown
    worker = cfg.for_workers(StorageAccess(ref=None, token="t" * 32))
    assert worker.storage_options == {} and cfg.storage_options == OPTIONS
    dumped = json.dumps(dataclasses.asdict(dataclasses.replace(worker, access=None)), default=str)
    assert "s3cr3t-value" not in dumped and "AKIAEXAMPLEKEY" not in dumped
    assert "tttttttt" in repr(worker.access) and "object store" in repr(worker.access)


def test_workers_fetch_options_and_environment_through_the_object_store(ray_session, monkeypatch):
    def in_worker(cfg):  # defined here so that Ray ships it by value: tests/ is not on workers' path
        import os

        return cfg.access.options(), os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_ENDPOINT_URL")

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "env-key-for-workers")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    cfg = IngestConfig("s3://lake/raw", "s3://lake/emb", storage_options=OPTIONS)
    worker_cfg = cfg.for_workers(StorageAccess.put(cfg.storage_options))
    task = ray_session.remote(in_worker).options(num_cpus=0)
    options, key, endpoint = ray_session.get(task.remote(worker_cfg))
    assert options == OPTIONS and (key, endpoint) == ("env-key-for-workers", "http://127.0.0.1:9")
    # A later job without those variables: the worker puts back what its node had (none here).
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    later = cfg.for_workers(StorageAccess.put({}))
    results = ray_session.get([task.remote(later) for _ in range(4)])
    assert all(r == ({}, None, None) for r in results), results
