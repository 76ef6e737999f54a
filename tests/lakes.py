"""Test helpers for the failure tests: a small real lake on S3, and what a committed version holds."""
from __future__ import annotations

import json
import time

from conftest import write_parquet_lake
from workers.ingest.config import IngestConfig
from workers.lake.dataset import open_version
from workers.embedding.encoder import EncoderConfig
from workers.lake.storage import url_to_fs

UNIT_ROWS = 20  # the lakes' row groups hold 20 rows too: one work unit, one shard per row group


def ingest_cfg(source: str, dest: str, options: dict, **kw) -> IngestConfig:
    """A small, quick ingest of an `s3_lake`: several shards, a 50-row calibration sample."""
    return IngestConfig(source, dest, id_column="id", calibration_samples=50, unit_rows=UNIT_ROWS,
                        encoder=EncoderConfig(batch_size=16), storage_options=options, progress=False, **kw)


def ingest_args(source: str, dest: str, options: dict, *extra: str) -> list[str]:
    """`ingest_cfg` as `quantlake ingest` arguments."""
    return [source, dest, "--id-column", "id", "--unit-rows", str(UNIT_ROWS), "--calibration-samples", "50",
            "--batch-size", "16", "--no-progress", "--storage-options", json.dumps(options), *extra]


def s3_lake(url: str, options: dict, local_dir, docs, files: int = 2, row_group_size: int = 20) -> str:
    """Write `docs` as Parquet files under `local_dir` and upload them to `url`; return `url`."""
    write_parquet_lake(local_dir, docs, files=files, row_group_size=row_group_size)
    fs, root = url_to_fs(url, options)
    fs.put(str(local_dir) + "/", root + "/", recursive=True)
    return url


def sidecars(url: str, options: dict) -> list[str]:
    """Paths of the shard sidecars (`shards/<id>.json`) under a dataset root: the complete shards."""
    fs, root = url_to_fs(url, options)
    fs.invalidate_cache()
    return sorted(fs.glob(f"{root}/shards/*.json"))


def wait_for_sidecars(url: str, options: dict, n: int, timeout_s: float = 300, alive=lambda: True) -> int:
    """Poll until at least `n` shards are complete (or `alive()` turns false); return the count."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and alive():
        found = len(sidecars(url, options))
        if found >= n:
            return found
        time.sleep(0.05)
    return len(sidecars(url, options))


def committed_ids(url: str, options: dict) -> list[str]:
    """Every document id of the latest committed version, sorted, each as often as it is stored;
    read through checksum-verifying reads."""
    version = open_version(url, storage_options=options)
    ids = []
    for shard in version.shards:
        ids += version.read_shard_table(shard, columns=["id"])["id"].to_pylist()
        version.read_index_bytes(shard)  # the index must verify too
    return sorted(ids)


def upload_lake(fs, url: str, docs, files: int = 2) -> None:
    """Write `docs` as `files` Parquet files (20-row groups) under `<url>/raw` with `fs`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    per = -(-len(docs) // files)
    for i in range(files):
        part = docs[i * per:(i + 1) * per]
        sink = pa.BufferOutputStream()
        pq.write_table(pa.table({"id": [d[0] for d in part], "text": [d[1] for d in part]}), sink, row_group_size=20)
        fs.pipe_file(f"{url}/raw/part-{i}.parquet", sink.getvalue().to_pybytes())


def verify_version(url: str, options: dict | None = None, version: int | None = None):
    """Open a committed version and read every file it references through the checked reader."""
    v = open_version(url, version, storage_options=options)
    for s in v.shards:
        v.read_shard_table(s)
        v.read_index(s)
        v.read_rejects(s)
    v.read_ranges()
    return v


def encoder_actors_left(timeout_s: float = 60) -> list[str]:
    """The ids of the session's encoder actors still alive once `timeout_s` has passed (or none
    is left): a finished or failed job must leave none holding a CPU or GPU."""
    from ray._private.state import actors

    deadline = time.monotonic() + timeout_s
    while True:
        left = [a["ActorID"] for a in actors().values()
                if a["ActorClassName"] == "EncoderActor" and a["State"] != "DEAD"]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def corrupting_plan(plan_units, relpath: str = "part-00001.parquet"):
    """`plan_units` that then breaks the source file `relpath`: the file was checked, scanned
    and planned, so reading its units fails on every attempt (a fault injected in the driver;
    the read names the file as changed since the job listed it)."""
    def corrupt_after_planning(cfg, *args, **kwargs):
        units = plan_units(cfg, *args, **kwargs)
        fs, root = url_to_fs(cfg.source, cfg.storage_options)
        fs.pipe_file(f"{root}/{relpath}", b"PAR1 this is no longer a Parquet file PAR1")
        return units
    return corrupt_after_planning
