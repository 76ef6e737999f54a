"""A shard's sidecar marks it complete; a rerun reuses it only while every file verifies."""
import numpy as np
import pytest

from workers.ingest.shard_builder import completed_shard, write_shard, write_sidecar
from workers.lake.records import ShardSource
from workers.lake.storage import join, url_to_fs

DIM = 64


@pytest.fixture(params=["file", "memory"])
def dest(request, tmp_path):
    url = str(tmp_path / "dest") if request.param == "file" else f"memory://shards-{tmp_path.name}"
    fs, root = url_to_fs(url)
    yield fs, root
    if request.param == "memory":
        fs.rm(root, recursive=True)


def _written(dest, rejects=True):
    fs, root = dest
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(12, DIM)).astype(np.float32)
    ranges = np.stack([emb.min(0), emb.max(0)]).astype(np.float32)
    plan = ("a" * 32, ShardSource("part-0.parquet", 0, 13))
    bad = [{"id": "x", "source_file": "part-0.parquet", "source_row": 12, "reason": "empty_text",
            "detail": "empty text"}] if rejects else []
    record = write_shard(fs, root, *plan, [f"d{i}" for i in range(12)], np.arange(12), emb, ranges,
                         ("int8", "ubinary"), bad)
    return plan, record


def test_no_sidecar_means_not_complete(dest):
    fs, root = dest
    plan, record = _written(dest)
    assert completed_shard(fs, root, *plan) is None  # data files alone: the writer may have died before the sidecar
    write_sidecar(fs, root, record)
    assert completed_shard(fs, root, *plan) == record
    assert [f.path for f in record.files()] == [record.path, record.index, record.rejects.path]
    assert record.rejects.bytes == fs.info(join(root, record.rejects.path))["size"]


@pytest.mark.parametrize("damage", ["truncate", "same_size", "delete_index", "delete_rejects"])
def test_a_damaged_file_makes_the_shard_incomplete(dest, damage, caplog):
    fs, root = dest
    plan, record = _written(dest)
    write_sidecar(fs, root, record)
    data_path = join(root, record.path)
    data = fs.cat_file(data_path)
    if damage == "truncate":
        fs.pipe_file(data_path, data[: len(data) // 2])
    elif damage == "same_size":
        fs.pipe_file(data_path, data[:-1] + bytes([data[-1] ^ 1]))
    elif damage == "delete_index":
        fs.rm_file(join(root, record.index))
    else:
        fs.rm_file(join(root, record.rejects.path))
    assert completed_shard(fs, root, *plan) is None
    assert "rewriting the shard" in caplog.text


def test_a_sidecar_for_other_work_is_not_trusted(dest):
    fs, root = dest
    plan, record = _written(dest, rejects=False)
    write_sidecar(fs, root, record)
    assert record.rejects is None and completed_shard(fs, root, *plan) == record
    assert completed_shard(fs, root, plan[0], ShardSource("part-0.parquet", 0, 12)) is None
    fs.pipe_file(join(root, f"shards/{plan[0]}.json"), b'{"format": "quantlake.sha')
    assert completed_shard(fs, root, *plan) is None
