"""Shared fixtures: one local Ray instance per session, real documents, small real lakes."""
from __future__ import annotations

import collections
import contextlib
import importlib
import inspect
import os
import socket

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
import workers.ray_session  # noqa: E402,F401 - sets Ray's filter of worker noise before anything imports Ray
# Models exported for the onnx backend go to a cache of the test session's own, never the
# user's (Ray workers and job subprocesses inherit it); removed at the end (`pytest_unconfigure`).
_CACHE = None
if "QUANTLAKE_CACHE" not in os.environ:
    import tempfile

    _CACHE = os.environ["QUANTLAKE_CACHE"] = tempfile.mkdtemp(prefix="quantlake-test-cache-")


def pytest_unconfigure(config):
    if _CACHE is not None:
        import shutil

        shutil.rmtree(_CACHE, ignore_errors=True)


# The files that take longest (a full run's test times summed per file: from half a minute to
# nearly three of a worker's time), slowest first, but for the two that share warm encoder actors,
# which lead into the files that do. `make test` hands whole files to two workers in collection
# order, so these go first: a long file handed out last would leave one worker idle meanwhile.
SLOW_FILES_FIRST = ("test_reindex.py", "test_resume.py", "test_faults.py", "test_console.py", "test_demo.py",
                    "test_job_submission.py", "test_ray_session.py", "test_encoder_feeding.py", "test_calibration.py",
                    "test_multinode.py", "test_rerun.py", "test_requantize.py")


def pytest_collection_modifyitems(config, items):
    """Slow files first, then the files that share warm encoder actors (`shared_encoders`, kept
    from one such file to the next while a worker runs them in a row), then the rest; a stable
    sort: each file's tests keep their order."""
    rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
    sharing = {item.path for item in items if "shared_encoders" in item.fixturenames}
    items.sort(key=lambda item: (rank.get(item.path.name, len(rank)), item.path not in sharing))

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

    from workers.ray_session import WORKER_ENV

    # address="local": a new instance, never the cluster a stale `ray start` record names.
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING",
             runtime_env={"env_vars": WORKER_ENV})
    yield ray
    _end_warm_encoders()
    ray.shutdown()


# The warm encoder sets of this process (`shared_encoders`), by what they are: kept from one
# module that shares them to the next, so most such modules find theirs warm. At most
# _WARM_SETS at once; a new one ends the set asked for least often so far (`_ASKED`), since the
# suite's jobs ask for two sets far more often than for any other. An idle kept actor reserves
# no CPU, only its memory (~0.7 GB).
_WARM: dict = {}
_ASKED: collections.Counter = collections.Counter()
_WARM_SETS = 3


def _end_warm_encoders() -> None:
    for warm in _WARM.values():
        warm.stop()
    _WARM.clear()


@pytest.fixture(scope="module", autouse=True)
def _no_warm_encoders_beside_own_ones(request):
    """A module with Ray jobs of its own (not `shared_encoders`) starts with no kept encoder actor
    left: its tests may count the job's actors, kill them or check where Ray placed them."""
    if _WARM:
        mine = [item for item in request.session.items if item.module is request.module]
        if any("ray_session" in item.fixturenames for item in mine) and \
                not any("shared_encoders" in item.fixturenames for item in mine):
            _end_warm_encoders()
    yield


@pytest.fixture(scope="module")
def shared_encoders(ray_session):
    """The in-process jobs of a test module share their encoder actors (one model per session's
    Ray, as far as the modules allow): a job asking for the same actors as an earlier one gets
    them warm instead of starting processes that import torch and load the model (~5 s of a CPU
    each). Real actors all the same; what a job does with them is unchanged.

    The kept actors reserve no CPU (a job's would keep one of the session's two): an idle one
    must not keep a test's other Ray work waiting, a searcher's actors say. They use the cores
    as before (torch's threads are the machine's); so these modules do not test where Ray
    places what, nor room for the tasks beside the encoders. Up to `_WARM_SETS` sets are kept,
    from module to module: a job asking for another set (another encoder config or pool, or a
    test's own `EncoderActor` class) ends the least asked for first when that many are kept. A failed
    job's actors are killed, as the ingest asks, and not kept. A module whose jobs start their
    own actors ends the kept ones first (`_no_warm_encoders_beside_own_ones`), and the session's
    end ends them all. A module uses it with
    `pytestmark = pytest.mark.usefixtures("shared_encoders")`; one that checks its jobs leave no
    encoder actor behind, kills one, or tests placement, does not.
    """
    from dataclasses import replace

    import jobs.ingest
    import workers.ingest.pipeline as pipeline
    from workers.embedding.encoder import resolve_model

    real = pipeline.Encoders

    class Shared(real):
        def __init__(self, cfg, pool):
            # The model as the actors load it: a reindex names the bundled model `all-MiniLM-L6-v2`
            # where a test's own ingest leaves it None; the same folder either way.
            ecfg = pipeline.encoder_cfg(cfg, pool)
            ecfg = replace(ecfg, model=str(resolve_model(ecfg.model)))
            self.key = repr((ecfg, sorted(pool.items()), pipeline.EncoderActor))
            _ASKED[self.key] += 1
            if self.key not in _WARM:
                while len(_WARM) >= _WARM_SETS:
                    _WARM.pop(min(_WARM, key=_ASKED.__getitem__)).stop()  # the oldest of the least asked
                _WARM[self.key] = real(cfg, {**pool, "num_cpus": 0})
            self.actors = list(_WARM[self.key].actors)

        def stop(self, kill: bool = False) -> None:
            if kill and self.key in _WARM:
                _WARM.pop(self.key).stop(kill=True)
            self.actors = []

    pipeline.Encoders = jobs.ingest.Encoders = Shared
    try:
        yield
    finally:
        pipeline.Encoders = jobs.ingest.Encoders = real


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


class Store:
    """A dataset root on one storage backend: its URL, options and resolved filesystem."""

    def __init__(self, name: str, url: str, options: dict):
        from workers.lake.storage import url_to_fs

        self.name, self.url, self.options = name, url, options
        self.fs, self.root = url_to_fs(url, options)

    def __repr__(self):
        return f"Store({self.name})"

    def files(self) -> list[str]:
        """Every file under the root, relative to it, sorted."""
        self.fs.invalidate_cache()
        try:
            return sorted(p[len(self.root) + 1:] for p in self.fs.find(self.root))
        except FileNotFoundError:
            return []


@pytest.fixture(params=["file", "memory", "s3"])
def store(request, tmp_path):
    """The storage contract's three backends: local disk (file://), memory:// and S3 (moto).

    memory:// lives in one process, so it serves driver-side pieces only (create-only
    writes, version listing, commits), never a Ray ingest.
    """
    import uuid

    if request.param == "file":
        yield Store("file", (tmp_path / "ds").as_uri(), {})
    elif request.param == "memory":
        s = Store("memory", f"memory://ql-{uuid.uuid4().hex[:12]}/ds", {})
        yield s
        if s.fs.exists(s.root):
            s.fs.rm(s.root, recursive=True)
    else:
        bucket, options = request.getfixturevalue("s3")
        yield Store("s3", f"{bucket}/ds", options)


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory, docs, ray_session):
    """One real ingest (90 documents, 2 Parquet files, a JSON Lines file with 2 bad rows) on
    local disk, for the read-side tests. Tests that change it work on a copy (`copy_dataset`)."""
    import json

    from jobs.ingest import run
    from workers.ingest.config import IngestConfig
    from workers.embedding.encoder import EncoderConfig

    root = tmp_path_factory.mktemp("small")
    write_parquet_lake(root / "lake", docs[:90], files=2, row_group_size=20)
    bad = [{"id": "blank", "text": " "}, {"id": "null", "text": None}, {"id": "fine", "text": docs[95][1]}]
    (root / "lake" / "extra.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bad))
    cfg = IngestConfig(str(root / "lake"), str(root / "dest"), id_column="id", calibration_samples=50,
                       unit_rows=40, encoder=EncoderConfig(batch_size=32), progress=False)
    result = run(cfg)
    return root / "dest", result


@pytest.fixture
def copy_dataset(small_dataset, tmp_path):
    """A private copy of `small_dataset` (file timestamps kept)."""
    import shutil

    dest = tmp_path / "dest"
    shutil.copytree(small_dataset[0], dest)
    return dest



def free_ports(n: int) -> list[int]:
    """`n` distinct free ports on 127.0.0.1, for a `ray start` given every port: each socket stays
    bound until all are chosen (a port released at once can be handed out again, and two Ray
    components given one port refuse to start).

    They are drawn below the kernel's ephemeral range (`ip_local_port_range`, where it hands out
    ports to outgoing connections and to sockets bound to port 0) and above Ray's worker ports
    (10002-19999): a port the kernel picked could be taken by any connection between the choice
    and Ray's bind, and a head's dashboard failed so ("address already in use"). Where that range
    leaves no room, the kernel chooses, as before.
    """
    import random

    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 0
    candidates = list(range(20000, low))
    random.SystemRandom().shuffle(candidates)  # two test processes choosing at once rarely meet
    with contextlib.ExitStack() as stack:
        chosen: list[int] = []
        for port in candidates:
            s = stack.enter_context(socket.socket())
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            chosen.append(port)
            if len(chosen) == n:
                return chosen
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
