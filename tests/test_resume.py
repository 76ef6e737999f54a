"""Exactly once across failures: a killed job's rerun resumes, and a broken job commits nothing.

Real parts throughout: local Ray, the bundled model, Parquet, a moto S3 server on 127.0.0.1.
"""
import json
import re
import signal

import pytest

import jobs.ingest as ingest
from jobs.ingest import IncompleteVersion, run
from isolated import Job
from lakes import (UNIT_ROWS, committed_ids, corrupting_plan, encoder_actors_left, ingest_args, ingest_cfg, s3_lake,
                   sidecars, wait_for_sidecars)
from workers.lake.storage import url_to_fs

N_DOCS = 200  # 2 files of 100 rows: 10 units


@pytest.fixture
def lake(s3, docs, tmp_path):
    bucket, options = s3
    corpus = docs[:N_DOCS]
    return s3_lake(f"{bucket}/lake", options, tmp_path / "lake", corpus), f"{bucket}/dest", options, corpus


def test_killed_driver_rerun_resumes_and_holds_every_row_once(lake, ray_session, tmp_path, capsys):
    source, dest, options, corpus = lake
    args = ingest_args(source, dest, options, "--json")
    with Job(["-m", "jobs.ingest", *args], tmp_path) as job:
        p = job.start()
        wait_for_sidecars(dest, options, 2, alive=lambda: p.poll() is None)
        job.stop()  # SIGKILL the driver, then whatever of its Ray survives it
        assert p.returncode == -signal.SIGKILL, f"the job ended by itself before it was killed: {job.output()}"
        done = sidecars(dest, options)
        assert 2 <= len(done) < N_DOCS // UNIT_ROWS
        fs, root = url_to_fs(dest, options)
        assert not fs.exists(f"{root}/versions")
        # Damage one complete shard: the rerun must notice (sha256) and write it again.
        damaged = json.loads(fs.cat_file(done[0]))["record"]
        data = fs.cat_file(f"{root}/{damaged['path']}")
        fs.pipe_file(f"{root}/{damaged['path']}", data[: len(data) // 2])

    # The same command again; in this process, on the test session's Ray (a rerun is a job like
    # any: what it finds is the dataset, not the killed job's processes, all gone).
    capsys.readouterr()
    rc = ingest.main(args)
    out, err = capsys.readouterr()
    assert rc == 0, err
    summary = json.loads(out)
    assert (summary["documents"], summary["shards"]) == (N_DOCS, N_DOCS // UNIT_ROWS)
    assert summary["shards_reused"] == len(done) - 1
    assert committed_ids(dest, options) == sorted(i for i, _ in corpus)
    version = json.loads(fs.cat_file(f"{root}/versions/00000001.json"))
    rewritten = [s for s in version["shards"] if s["id"] == damaged["id"]]
    assert [(s["sha256"], s["bytes"]) for s in rewritten] == [(damaged["sha256"], damaged["bytes"])]


def test_missing_shard_file_blocks_the_commit_and_a_rerun_rewrites_it(lake, ray_session, monkeypatch):
    source, dest, options, corpus = lake
    fs, root = url_to_fs(dest, options)
    real = ingest.encode_and_write
    lost = []

    def lose_one_index(*args, **kwargs):  # after every shard is written, before the commit
        records, *rest = real(*args, **kwargs)
        lost.append(records[3].index)
        fs.rm_file(f"{root}/{lost[0]}")
        return records, *rest

    monkeypatch.setattr(ingest, "encode_and_write", lose_one_index)
    with pytest.raises(IncompleteVersion, match="Nothing was committed") as failed:
        run(ingest_cfg(source, dest, options))
    assert f"{lost[0]} is missing" in str(failed.value)
    assert str(failed.value).endswith("rerun the job to rewrite the shards concerned (a `quantlake vacuum` with an "
                                      "--older-than shorter than a job runs deletes its files meanwhile)")
    assert not fs.exists(f"{root}/versions")
    assert encoder_actors_left() == []  # the failed job's encoder actors are gone: no CPU held

    monkeypatch.setattr(ingest, "encode_and_write", real)
    result = run(ingest_cfg(source, dest, options))
    assert result.version == 1 and result.summary["shards_reused"] == N_DOCS // UNIT_ROWS - 1
    assert committed_ids(dest, options) == sorted(i for i, _ in corpus)
    assert encoder_actors_left() == []  # and so are a finished job's


def test_a_unit_that_fails_for_good_fails_the_job_naming_it(lake, ray_session, capsys, monkeypatch):
    """The command, with one fault injected in the driver: a source file breaks after it was
    checked, scanned and planned, so reading its units fails on every attempt."""
    source, dest, options, corpus = lake
    monkeypatch.setattr(ingest, "plan_units", corrupting_plan(ingest.plan_units))
    rc = ingest.main(ingest_args(source, dest, options))
    out, err = capsys.readouterr()
    assert rc == 1 and out == ""
    assert re.search(r"quantlake ingest: error: work unit part-00001\.parquet rows \[\d+, \d+\) "
                     r"\(shard [0-9a-f]{32}\): read failed: SourceChanged: source file part-00001\.parquet "
                     r"changed while the job ran \(.*\); run the job again to read it as it is; "
                     r"nothing was committed", err), err
    fs, root = url_to_fs(dest, options)
    assert not fs.exists(f"{root}/versions")
    assert encoder_actors_left() == []
