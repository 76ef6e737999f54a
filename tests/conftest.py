"""Shared fixtures: one local Ray instance per session, real documents, small real lakes."""
from __future__ import annotations

import importlib
import inspect
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_MODULES = ["json", "collections", "os", "pathlib", "re", "string", "textwrap", "itertools",
            "functools", "datetime", "decimal", "fractions", "statistics", "random", "shutil",
            "argparse", "logging", "csv", "heapq", "bisect", "tarfile", "zipfile", "email.message",
            "http.client", "urllib.parse", "asyncio.queues", "threading", "subprocess", "typing"]


def real_documents(n: int) -> list[tuple[str, str]]:
    """`n` real (id, text) pairs: first paragraphs of standard-library docstrings."""
    seen, out = set(), []
    for name in _MODULES:
        mod = importlib.import_module(name)
        for attr in sorted(dir(mod)):
            if attr.startswith("_"):
                continue
            doc = inspect.getdoc(getattr(mod, attr, None)) or ""
            text = doc.split("\n\n")[0].strip()
            if len(text) < 30 or text in seen:
                continue
            seen.add(text)
            out.append((f"{name}.{attr}", text))
            if len(out) == n:
                return out
    raise RuntimeError(f"only {len(out)} documents found, {n} asked")


@pytest.fixture(scope="session")
def docs() -> list[tuple[str, str]]:
    return real_documents(400)


@pytest.fixture(scope="session")
def ray_session():
    """The one local Ray instance of the test session (2 CPUs), stopped at the end."""
    import ray

    from jobs.ingest import WORKER_ENV

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING",
             runtime_env={"env_vars": WORKER_ENV})
    yield ray
    ray.shutdown()


def write_parquet_lake(root, docs, files: int = 3, row_group_size: int = 50, extra=None) -> list[str]:
    """Split `docs` over `files` Parquet files under `root` (a local folder)."""
    os.makedirs(root, exist_ok=True)
    paths = []
    per = -(-len(docs) // files)
    for i in range(files):
        part = docs[i * per:(i + 1) * per]
        table = pa.table({"id": [d[0] for d in part], "text": [d[1] for d in part]})
        path = os.path.join(root, f"part-{i:05d}.parquet")
        pq.write_table(table, path, row_group_size=row_group_size)
        paths.append(path)
    return paths


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 endpoint: moto's server on 127.0.0.1, on a free port, for the session."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch):
    """A fresh bucket; returns `(bucket_url, storage_options)`.

    Credentials and endpoint are also in the environment, the way a job on a cluster gets
    them, so Ray workers started after this point see the same endpoint.
    """
    import uuid

    import boto3
    import s3fs

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing-key-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    options = {"key": "testing-key-id", "secret": "testing-secret",
               "client_kwargs": {"endpoint_url": s3_server, "region_name": "us-east-1"}}
    bucket = f"ql-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=bucket)
    fs = s3fs.S3FileSystem(**options)
    yield f"s3://{bucket}", options
    fs.rm(bucket, recursive=True)
    s3fs.S3FileSystem.clear_instance_cache()
