"""`ray job submit` for real: a head with its dashboard on 127.0.0.1, then `python -m jobs.ingest`
and, after the lake grew, `python -m jobs.reindex`, each submitted with the repository as working dir.

The head runs without PYTHONPATH, so the jobs import the repository's code from the uploaded
working dir. Its processes (the head, the job supervisors, the drivers, their workers) all carry
the head's private RAY_TMPDIR in their environment; teardown kills them by that mark, not with
`ray stop`, which would stop every Ray instance of the machine (the test session's included).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import free_ports, write_parquet_lake
from isolated import REPO, Job
from lakes import committed_ids
from workers.lake.storage import url_to_fs
from workers.lake.versions import list_versions, read_version

RAY = os.path.join(os.path.dirname(sys.executable), "ray")  # the CLI of this Python's environment
# Kept out of the upload: Ray skips .gitignore's entries and, since 2.5x, .git, .venv and
# __pycache__ by itself; listed anyway so an older Ray or a changed .gitignore keeps the package
# small (Ray refuses one of 512 MiB or more). Anchored with a leading `/`: a bare `lake` also
# drops the `workers/lake` package, and the jobs then silently import an installed copy of it
# (the test's first submission catches that).
EXCLUDES = [".git", ".venv", "**/__pycache__", "/lake/", "/out/", "/build/", ".pytest_cache", ".hypothesis"]
ROWS = 20  # documents per lake file; --unit-rows 20 makes one shard per file


def _cli_env() -> dict[str, str]:
    # The CLI reads the cluster from --address only; RAY_AUTH_MODE=disabled (conftest) is kept.
    return {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}


def _ray(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([RAY, *args], cwd=REPO, env=_cli_env(), capture_output=True, text=True, timeout=timeout_s)


@pytest.fixture
def head(tmp_path, monkeypatch):
    """A `ray start --head` cluster with its dashboard, every port free and on 127.0.0.1."""
    flags = ("--port", "--dashboard-port", "--ray-client-server-port", "--node-manager-port",
             "--object-manager-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
             "--runtime-env-agent-port", "--metrics-export-port")
    ports = dict(zip(flags, free_ports(len(flags))))
    args = ["-c", "from ray.scripts.scripts import main; main()", "start", "--head", "--block",
            "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
            "--num-cpus=2", "--disable-usage-stats", *(f"{flag}={port}" for flag, port in ports.items())]
    url = f"http://127.0.0.1:{ports['--dashboard-port']}"
    with Job(args, tmp_path) as job:
        with monkeypatch.context() as mp:
            mp.delenv("PYTHONPATH", raising=False)  # the code reaches the jobs through --working-dir only
            job.start()
        deadline = time.monotonic() + 300
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/version", timeout=5) as reply:
                    # and the head's agent, which runs the submitted jobs: the head waits 10 s
                    # for it, then refuses a submission ("No available agent")
                    with socket.create_connection(("127.0.0.1", ports["--dashboard-agent-listen-port"]), 5):
                        if reply.status == 200:
                            break
            except OSError:
                pass
            assert job.proc.poll() is None and time.monotonic() < deadline, \
                f"the head's dashboard or agent did not come up at {url}: {job.output()}"
            time.sleep(1)
        yield SimpleNamespace(url=url, ray_tmp=job.ray_tmp)
    # Job.__exit__ killed the head and every process carrying its RAY_TMPDIR, or raised.


def _submit(head, submission_id: str, *entrypoint: str, timeout_s: float = 900) -> tuple[str, dict | None]:
    """Submit `python ENTRYPOINT` with the repository as working dir, wait for it and check that
    it SUCCEEDED; return its logs and its driver as the head knows it (None: no driver joined)."""
    done = _ray("job", "submit", "--address", head.url, "--submission-id", submission_id,
                "--working-dir", str(REPO), "--runtime-env-json", json.dumps({"excludes": EXCLUDES}),
                "--", sys.executable, *entrypoint, timeout_s=timeout_s)
    assert done.returncode == 0, f"{submission_id} failed:\n{done.stdout}\n{done.stderr}"
    logs = _ray("job", "logs", "--address", head.url, submission_id)
    assert logs.returncode == 0, logs.stderr
    # What `ray job status` prints, from the same REST API, without its colours.
    with urllib.request.urlopen(f"{head.url}/api/jobs/{submission_id}", timeout=30) as reply:
        info = json.load(reply)
    assert (info["status"], info["entrypoint"].split()[:2]) == ("SUCCEEDED", [sys.executable, entrypoint[0]]), info
    # A driver that started a local instance of its own instead of joining this head has none.
    return logs.stdout, info.get("driver_info")


def test_ingest_then_reindex_submitted_to_a_head(head, docs, tmp_path):
    raw, dest = tmp_path / "raw", tmp_path / "emb"
    write_parquet_lake(raw, docs[:2 * ROWS], files=2, row_group_size=ROWS)

    # The code the jobs run is the uploaded copy, not this checkout nor an installed one.
    logs, driver = _submit(head, "where", "-c", "import jobs.reindex, workers.lake.storage as s; print(s.__file__)")
    where = Path(logs.strip().splitlines()[-1])
    assert where.name == "storage.py" and str(where).startswith(head.ray_tmp), logs
    assert not str(where).startswith(str(REPO))
    assert driver is None  # this driver never called ray.init: the head knows no driver of it

    logs, driver = _submit(head, "ingest", "-m", "jobs.ingest", str(raw), str(dest), "--id-column", "id",
                           "--calibration-samples", str(2 * ROWS), "--unit-rows", str(ROWS),
                           "--batch-size", "16", "--no-progress")
    assert f"committed version 1: {2 * ROWS} documents, 0 rejects" in logs, logs
    assert driver is not None, "the ingest driver did not join the head"
    fs, root = url_to_fs(str(dest))
    assert list_versions(fs, root) == [1]

    write_parquet_lake(tmp_path / "more", docs[2 * ROWS:2 * ROWS + 10], files=1)
    os.rename(tmp_path / "more" / "part-00000.parquet", raw / "part-00002.parquet")
    logs, driver = _submit(head, "reindex", "-m", "jobs.reindex", str(dest), "--no-progress")
    assert f"committed version 2: {2 * ROWS + 10} documents, 0 rejects" in logs, logs
    assert f"10 rows to encode of {2 * ROWS + 10} scanned; shards: 2 carried over, 1 added, 0 dropped" in logs, logs
    assert driver is not None, "the reindex driver did not join the head"

    assert list_versions(fs, root) == [1, 2]
    v1, v2 = read_version(fs, root, 1), read_version(fs, root, 2)
    assert v2.parent == 1 and len({s.id for s in v1.shards} & {s.id for s in v2.shards}) == 2
    assert committed_ids(str(dest), {}) == sorted(d[0] for d in docs[:2 * ROWS + 10])
