"""Two scheduled reindexes that overlap, as two processes against one dataset on S3 (moto's
server on 127.0.0.1): exactly one version holds the change, with no shard lost or doubled.

Each process has its own local Ray, as two `ray job submit` runs on separate drivers would.
The deterministic interleavings (the later run rebasing, or stopping on a conflict) are in
tests/test_reindex.py.
"""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from isolated import Job
from jobs.ingest import IngestResult, run as ingest
from jobs.reindex import ReindexConfig, format_result, run as reindex
from lakes import ingest_cfg, s3_lake
from test_rerun import _content
from workers.lake.storage import url_to_fs
from workers.lake.versions import list_versions, read_version

pytestmark = pytest.mark.usefixtures("shared_encoders")  # conftest: warm encoder actors across the module's jobs


def test_two_overlapping_reindex_processes_commit_the_change_once(docs, tmp_path, ray_session, s3):
    bucket, options = s3
    source, dest = s3_lake(f"{bucket}/lake", options, tmp_path / "lake", docs[:40]), f"{bucket}/emb"
    assert ingest(ingest_cfg(source, dest, options)).version == 1
    new = tmp_path / "part-new.parquet"
    pq.write_table(pa.table({"id": [d[0] for d in docs[40:60]], "text": [d[1] for d in docs[40:60]]}), new)
    src_fs, src_root = url_to_fs(source, options)
    src_fs.put(str(new), f"{src_root}/part-new.parquet")

    args = ["-m", "jobs.reindex", dest, "--json", "--no-progress", "--storage-options", json.dumps(options)]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with Job(args, tmp_path / "a") as a, Job(args, tmp_path / "b") as b:
        procs = a.start(), b.start()  # both plan on version 1: each takes far longer than reading it
        statuses = [p.wait(timeout=540) for p in procs]
        outputs = [a.output(), b.output()]
    assert statuses == [0, 0], outputs
    results = sorted((json.loads(out) for out, _ in outputs), key=lambda r: r["version"] is None)
    won, lost = results
    assert (won["version"], won["shards_added"], won["rows_encoded"]) == (2, 1, 20)
    assert (lost["version"], lost["committed"], lost["committed_meanwhile"]) == (None, False, 2)
    shown = format_result(IngestResult(None, None, {**lost, "mode": "incremental"}))
    assert shown == ("version 2, committed meanwhile by another run, already holds this change: nothing committed "
                     "(20 rows to encode of 60 scanned; shards: 2 carried over, 1 added, 0 dropped)")

    fs, root = url_to_fs(dest, options)
    assert list_versions(fs, root) == [1, 2]
    v2 = read_version(fs, root, 2)
    ids = [s.id for s in v2.shards]
    assert len(ids) == len(set(ids)) == 3 and v2.rows == 60
    ranges = f"{dest}/{v2.ranges.path}"
    assert ingest(ingest_cfg(source, f"{bucket}/fresh", options, ranges=ranges)).version == 1
    assert _content(dest, options) == _content(f"{bucket}/fresh", options)
    # Nothing new on the store since: known from the listing (sizes and ETags as recorded), no scan.
    again = reindex(ReindexConfig(dest, storage_options=options, progress=False))
    assert (again.version, again.summary["scan_skipped"], again.summary["rows_scanned"]) == (None, True, 60)
