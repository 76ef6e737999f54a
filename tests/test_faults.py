"""Faults while the job runs: an encoder actor killed, the S3 endpoint gone for a while.

Real parts throughout: local Ray, the bundled model, Parquet, moto's S3 server on 127.0.0.1.
"""
import json
import logging
import os
import re
import signal
import threading
import time
import uuid

import pytest

import jobs.ingest as ingest
from jobs.ingest import run
from lakes import (UNIT_ROWS, committed_ids, encoder_actors_left, ingest_args, ingest_cfg, s3_lake, sidecars,
                   wait_for_sidecars)
from workers.lake.storage import S3_RETRIES, url_to_fs, with_retry_defaults

N_DOCS = 160  # 2 files of 80 rows: 8 units


def _encoder_actor() -> dict | None:
    """The live encoder actor of the running job (Ray names its process after the class)."""
    # The state API (ray.util.state) needs the dashboard, which the test session's Ray does not run.
    from ray._private.state import actors

    for a in actors().values():
        if a["State"] != "ALIVE" or not a["Pid"]:
            continue
        try:
            with open(f"/proc/{a['Pid']}/cmdline", "rb") as f:
                if b"EncoderActor" in f.read():
                    return a
        except OSError:
            continue
    return None


def _comparable(manifest: dict) -> dict:
    """A version manifest without what differs between two runs of the same work: when, who, timings."""
    out = {k: v for k, v in manifest.items() if k not in ("created_at", "writer")}
    out["shards"] = [{**s, "stats": {"rows_read": s["stats"]["rows_read"]}} for s in manifest["shards"]]
    return out


def test_killed_encoder_actor_is_replaced_and_the_result_is_unchanged(ray_session, s3, docs, tmp_path):
    bucket, options = s3
    corpus = docs[:N_DOCS]
    source = s3_lake(f"{bucket}/lake", options, tmp_path / "lake", corpus)
    calm = run(ingest_cfg(source, f"{bucket}/calm", options))
    ranges = f"{bucket}/calm/ranges/{calm.summary['ranges_id']}.json"

    killed = {}

    def kill_encoder_mid_run():
        while not killed.get("stop"):
            if wait_for_sidecars(f"{bucket}/killed", options, 1, timeout_s=0.5) and (a := _encoder_actor()):
                killed.update(actor=a["ActorID"], done=len(sidecars(f"{bucket}/killed", options)))
                os.kill(a["Pid"], signal.SIGKILL)
                return

    killer = threading.Thread(target=kill_encoder_mid_run)
    killer.start()
    try:
        result = run(ingest_cfg(source, f"{bucket}/killed", options, ranges=ranges))
    finally:
        killed["stop"] = True
        killer.join()
    assert "actor" in killed and killed["done"] < N_DOCS // UNIT_ROWS, "the encoder was not killed mid-run"
    from ray._private.state import actors

    assert actors(killed["actor"])["NumRestarts"] >= 1  # Ray replaced the process; its unit was retried
    fs, root = url_to_fs(bucket, options)
    a, b = (json.loads(fs.cat_file(f"{root}/{d}/versions/00000001.json")) for d in ("calm", "killed"))
    assert _comparable(a) == _comparable(b)
    assert result.summary["documents"] == N_DOCS and result.summary["shards_reused"] == 0
    for s in b["shards"]:  # same bytes, not just the same recorded checksums
        for name in (s["path"], s["index"]):
            assert fs.cat_file(f"{root}/killed/{name}") == fs.cat_file(f"{root}/calm/{name}")


def _fails_naming_the_second_file(tmp_path, docs, cause: str) -> None:
    """An ingest of two 20-row files fails naming the unit of the second (`cause`: the start of
    the error's words after the unit), commits nothing and leaves no encoder actor behind."""
    from conftest import write_parquet_lake
    from workers.embedding.encoder import EncoderConfig
    from workers.ingest.config import IngestConfig
    from workers.ingest.steps import UnitFailed

    write_parquet_lake(tmp_path / "lake", docs[:40], files=2, row_group_size=20)
    cfg = IngestConfig(str(tmp_path / "lake"), str(tmp_path / "emb"), id_column="id", calibration_samples=20,
                       unit_rows=20, encoder=EncoderConfig(batch_size=16), progress=False)
    with pytest.raises(UnitFailed, match=r"(?s)^work unit part-00001\.parquet rows \[0, 20\) \(shard [0-9a-f]{32}\): "
                                         rf"{cause}.*; nothing was committed$"):
        run(cfg)
    assert not (tmp_path / "emb" / "versions").exists()
    assert encoder_actors_left() == []


def test_a_reader_that_dies_every_time_fails_the_job_naming_its_unit(ray_session, docs, tmp_path, monkeypatch):
    """A unit whose read task's process dies is run again, a bounded number of times: a file
    that crashes its reader fails the job with an error naming the unit, commits nothing, and
    leaves no encoder actor behind."""
    import workers.ingest.pipeline as pipeline

    tries = tmp_path / "tries"
    tries.mkdir()
    read_unit = pipeline.read_unit

    def dies_on_one_file(item, cfg):  # defined here so that Ray ships it by value
        import os
        import uuid

        if '"part-00001.parquet"' in item["unit"]:
            open(os.path.join(str(tries), uuid.uuid4().hex), "w").close()
            os._exit(1)  # the process dies (a crash in a reader's native code, say)
        return read_unit(item, cfg)

    monkeypatch.setattr(pipeline, "read_unit", dies_on_one_file)
    _fails_naming_the_second_file(tmp_path, docs, "WorkerCrashedError: ")
    assert len(os.listdir(tries)) == 1 + pipeline.UNIT_TASK_RETRIES


def test_a_unit_that_kills_its_encoder_every_time_fails_the_job_naming_it(ray_session, docs, tmp_path, monkeypatch):
    """An encoder actor whose process dies is restarted and its calls run again, a bounded number
    of times: a unit whose encoding kills the process every time (a text that runs the node out
    of memory) fails the job naming the unit, instead of restarting the actor for ever."""
    import workers.ingest.pipeline as pipeline

    tries = tmp_path / "tries"
    tries.mkdir()

    class DiesOnOneFile(pipeline.EncoderActor):  # defined here so that Ray ships it by value
        def encode_unit(self, row):
            import os
            import uuid

            if '"part-00001.parquet"' in row["unit"]:
                open(os.path.join(str(tries), uuid.uuid4().hex), "w").close()
                os._exit(1)
            return super().encode_unit(row)

    monkeypatch.setattr(pipeline, "EncoderActor", DiesOnOneFile)
    monkeypatch.setattr(pipeline, "ENCODER_CALL_RETRIES", 1)  # each restart loads the model again
    _fails_naming_the_second_file(tmp_path, docs, "")
    assert len(os.listdir(tries)) == 1 + pipeline.ENCODER_CALL_RETRIES


class RestartableMoto:
    """moto's S3 server on a fixed port of 127.0.0.1 that can go away and come back.

    The buckets live in this process (moto's backends), so they survive a restart.
    """

    def __init__(self):
        from moto.server import ThreadedMotoServer
        from conftest import free_ports

        self._cls = ThreadedMotoServer
        # Below the kernel's ephemeral range: during an outage the port is free, and a port the
        # kernel hands out (to a connection, to a bind on port 0) could be taken meanwhile.
        self.port = free_ports(1)[0]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.start()

    def start(self):
        self._server = self._cls(ip_address="127.0.0.1", port=self.port, verbose=False)
        # moto's start() waits for ever when its server thread cannot bind: wait a while, then say so.
        starting = threading.Thread(target=self._server.start, daemon=True)
        starting.start()
        starting.join(60)
        if starting.is_alive():
            raise RuntimeError(f"moto's S3 server did not start on 127.0.0.1:{self.port} (port taken?)")

    def stop(self):
        self._server.stop()
        # moto's stop() leaves the socket listening: clients would hang, not be refused.
        self._server._server.server_close()


@pytest.fixture
def flaky_s3(monkeypatch):
    import boto3

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = RestartableMoto()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing-key-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)
    bucket = f"ql-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    options = {"key": "testing-key-id", "secret": "testing-secret",
               "client_kwargs": {"endpoint_url": server.endpoint, "region_name": "us-east-1"}}
    yield server, f"s3://{bucket}", options
    fs, _ = url_to_fs(f"s3://{bucket}", {**options, "skip_instance_cache": True})
    fs.rm(bucket, recursive=True)
    server.stop()


def test_job_rides_out_an_s3_outage(ray_session, flaky_s3, docs, tmp_path):
    server, bucket, options = flaky_s3
    corpus = docs[:N_DOCS]
    source = s3_lake(f"{bucket}/lake", options, tmp_path / "lake", corpus)
    dest = f"{bucket}/dest"
    outage = {}

    def outage_mid_run(seconds=5.0):
        outage["done"] = wait_for_sidecars(dest, options, 1, timeout_s=300)
        server.stop()
        outage["start"] = time.monotonic()
        time.sleep(seconds)
        server.start()
        outage["end"] = time.monotonic()

    cutter = threading.Thread(target=outage_mid_run)
    cutter.start()
    try:
        result = run(ingest_cfg(source, dest, options))
        finished = time.monotonic()
    finally:
        cutter.join()
    # The outage began while the job ran (with units left), and the job outlived it.
    assert outage["done"] < N_DOCS // UNIT_ROWS and outage["start"] < outage["end"] < finished
    assert result.version == 1 and result.summary["shards"] == N_DOCS // UNIT_ROWS
    assert committed_ids(dest, options) == sorted(i for i, _ in corpus)


def test_job_that_gives_up_on_s3_commits_nothing_and_its_rerun_resumes(ray_session, flaky_s3, docs, tmp_path,
                                                                        capsys):
    server, bucket, options = flaky_s3
    corpus = docs[:N_DOCS]
    source = s3_lake(f"{bucket}/lake", options, tmp_path / "lake", corpus)
    dest = f"{bucket}/dest"
    # The caller's own retry policy (kept as given): give up after 2 attempts. The command as
    # run by hand, in this process on the session's Ray; the endpoint goes away after its first
    # shard and stays away until the command has returned.
    impatient = {**options, "config_kwargs": {"retries": {"max_attempts": 2, "mode": "standard"}}}
    outage = {}

    def outage_after_the_first_shard():
        outage["done"] = wait_for_sidecars(dest, options, 1, timeout_s=300)
        server.stop()

    cutter = threading.Thread(target=outage_after_the_first_shard)
    cutter.start()
    try:
        rc = ingest.main(ingest_args(source, dest, impatient))
    finally:
        cutter.join()
        server.start()
    out, err = capsys.readouterr()
    assert rc == 1 and out == "" and 1 <= outage["done"] < N_DOCS // UNIT_ROWS, err
    assert re.search(r"error: work unit part-0000\d\.parquet rows \[\d+, \d+\) \(shard \w+\): \w+ failed: "
                     r"EndpointConnectionError: .*; nothing was committed", err), err
    fs, root = url_to_fs(dest, options)
    assert not fs.exists(f"{root}/versions")
    assert encoder_actors_left() == []  # the failed job holds no CPU of the session's Ray

    result = run(ingest_cfg(source, dest, options))
    assert result.version == 1 and result.summary["shards_reused"] >= outage["done"]
    assert committed_ids(dest, options) == sorted(i for i, _ in corpus)


def test_s3_retry_defaults_leave_the_callers_choice_alone(monkeypatch):
    monkeypatch.delenv("AWS_MAX_ATTEMPTS", raising=False)
    monkeypatch.delenv("AWS_RETRY_MODE", raising=False)
    opts = {"config_kwargs": {"connect_timeout": 5}, "anon": True}
    assert with_retry_defaults("s3://b/x", opts) == {
        "anon": True, "config_kwargs": {"connect_timeout": 5, "retries": S3_RETRIES}}
    assert opts == {"config_kwargs": {"connect_timeout": 5}, "anon": True}  # not modified in place
    mine = {"config_kwargs": {"retries": {"max_attempts": 2, "mode": "standard"}}}
    assert with_retry_defaults("s3://b/x", mine) == mine
    assert with_retry_defaults("file:///tmp/x", {}) == {} and with_retry_defaults("/tmp/x", None) == {}
    monkeypatch.setenv("AWS_RETRY_MODE", "standard")
    assert with_retry_defaults("s3://b/x", {}) == {}
    monkeypatch.delenv("AWS_RETRY_MODE")
    fs, _ = url_to_fs("s3://b/x", {"anon": True, "skip_instance_cache": True})
    assert fs.config_kwargs["retries"] == S3_RETRIES
