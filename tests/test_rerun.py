"""A rerun into the same DEST after the lake changed holds what a fresh ingest of the new lake holds.

The case that broke it: a new file that sorts first takes over ids unchanged files hold, so
rows of unchanged files become duplicates (and an existing duplicate's first occurrence
moves). Their shards must not be reused as they were. Real Ray, model, Parquet, FAISS, and
a moto S3 server on 127.0.0.1 for the S3 variant.
"""
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.ingest import run
from lakes import UNIT_ROWS, ingest_cfg
from workers.lake.dataset import open_version
from workers.lake.storage import url_to_fs

pytestmark = pytest.mark.usefixtures("shared_encoders")  # conftest: warm encoder actors across the module's jobs


def _write(base: str, options: dict, local_dir, name: str, rows) -> None:
    """Write `rows` as the Parquet file `name` of the lake at `base` (through a local copy)."""
    local_dir.mkdir(exist_ok=True)
    pq.write_table(pa.table({"id": [r[0] for r in rows], "text": [r[1] for r in rows]}), local_dir / name,
                   row_group_size=UNIT_ROWS)
    fs, root = url_to_fs(base, options)
    fs.makedirs(root, exist_ok=True)
    fs.put_file(str(local_dir / name), f"{root}/{name}")


def _content(url: str, options: dict):
    """Per document (id, int8 bytes, ubinary bytes), the rejects' rows, and the shards' bytes
    (id and checksums) of the latest version, all sorted; read through verified reads."""
    v = open_version(url, storage_options=options)
    docs, rejects, shards = [], [], []
    for s in v.shards:
        t = v.read_shard_table(s, columns=["id", "int8", "ubinary"]).to_pydict()
        docs += [(i, bytes(b & 0xFF for b in q), u) for i, q, u in zip(t["id"], t["int8"], t["ubinary"])]
        if s.rejects:
            r = v.read_rejects(s).to_pydict()
            rejects += list(zip(r["id"], r["source_file"], r["source_row"], r["reason"], r["detail"]))
        shards.append((s.id, s.sha256, s.index_sha256, s.rejects.sha256 if s.rejects else None))
    return sorted(docs), sorted(rejects), sorted(shards)


@pytest.fixture
def where(s3):
    """`(base URL, storage options)` the lake and both datasets live under: the S3 endpoint.
    Only there (it ran on local disk too): a rerun's planning and reuse are the same code on
    any storage, and tests/test_ingest.py and tests/test_reindex.py rerun on local disk."""
    bucket, options = s3
    return bucket, options


def test_rerun_after_a_file_takes_over_ids_equals_a_fresh_ingest(docs, tmp_path, ray_session, where):
    base, options = where
    lake, dest, fresh_dest = f"{base}/lake", f"{base}/dest", f"{base}/fresh"
    # part-00000: 40 documents. part-00001: 40 more, and at row 25 a document carrying the
    # id of part-00000's row 5, a duplicate from the start.
    first, second = docs[:40], docs[40:80]
    _write(lake, options, tmp_path / "lake", "part-00000.parquet", first)
    _write(lake, options, tmp_path / "lake", "part-00001.parquet",
           second[:25] + [(first[5][0], docs[100][1])] + second[25:])
    v1 = run(ingest_cfg(lake, dest, options))
    assert (v1.summary["documents"], v1.summary["rejects"]) == (80, 1)
    ranges = f"{dest}/{open_version(dest, storage_options=options).manifest.ranges.path}"

    # A new file that sorts first, holding part-00000 row 5's id and part-00001 row 30's.
    _write(lake, options, tmp_path / "lake", "a-new.parquet",
           [(first[5][0], docs[101][1]), (docs[102][0], docs[102][1]), (second[29][0], docs[103][1])])
    rerun = run(ingest_cfg(lake, dest, options, ranges=ranges))
    fresh = run(ingest_cfg(lake, fresh_dest, options, ranges=ranges))

    got, want = _content(dest, options), _content(fresh_dest, options)
    assert got[0] == want[0]  # ids, int8 and ubinary bytes
    assert got[1] == want[1]  # rejects
    assert got[2] == want[2]  # the same shards, byte for byte
    ids = [d[0] for d in got[0]]
    assert len(ids) == len(set(ids)) == 81  # 80 + 3 new - 2 taken over by a-new
    assert [r[:4] for r in got[1]] == sorted([
        (first[5][0], "part-00000.parquet", 5, "duplicate_id"),
        (first[5][0], "part-00001.parquet", 25, "duplicate_id"),
        (second[29][0], "part-00001.parquet", 30, "duplicate_id")])
    assert {r[4] for r in got[1]} == {"same id as row 0 of a-new.parquet", "same id as row 2 of a-new.parquet"}
    assert (rerun.summary["documents"], rerun.summary["rejects"]) == (81, 3)
    # Units whose duplicates did not change keep their shard names and are reused: part-00000
    # rows [20, 40), part-00001 rows [0, 20) and [40, 41). part-00000 [0, 20) and part-00001
    # [20, 40) are written anew, and a-new.parquet's unit.
    assert (rerun.summary["shards"], rerun.summary["shards_reused"]) == (fresh.summary["shards"], 3) == (6, 3)
    # On S3 too, the unchanged files' kept scans (found by their ETags) stood in for them: only
    # a-new.parquet was read to scan, and the version lists the kept scans a fresh ingest does.
    assert (rerun.summary["files_scanned"], rerun.summary["scans_reused"]) == (1, 2)
    assert (fresh.summary["files_scanned"], fresh.summary["scans_reused"]) == (3, 0)
    kept = open_version(dest, storage_options=options).manifest.scans
    assert kept == open_version(fresh_dest, storage_options=options).manifest.scans and len(kept) == 3


@pytest.mark.parametrize("dups", [[], [(3, "b.parquet", 7)]])
def test_shard_id_covers_duplicates_and_keeps_old_names_without_them(dups):
    from workers.ingest.planning import shard_id

    args = ("a.parquet", {"size": 10, "version": "1"}, 0, 20, "sha256:m", "r" * 64, ("int8", "ubinary"),
            "text", "id", True, "IndexBinaryFlat")
    # The name a unit without duplicates had before duplicates were part of the key.
    old = "7cdff321d7a5f4057d5768375d5e603a"
    sid = shard_id(*args, dups)
    if not dups:
        assert sid == shard_id(*args) == old
    else:
        assert sid != old and sid == shard_id(*args, [tuple(dups[0])])
        assert sid != shard_id(*args, [(3, "c.parquet", 7)]) != shard_id(*args, [(3, "b.parquet", 8)])
