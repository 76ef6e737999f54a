"""Requantizing without the model: shards that keep float16 embeddings (`--precisions
int8,ubinary,float16`) are rewritten under recalibrated ranges from that column, and the version
equals, byte for byte, a fresh ingest of the lake with the same options (which calibrates the
same ranges: the same seeded sample, encoded the same way).

The pure part (write, read back, requantize) runs without Ray; the lake part is one small lake
that changes in steps (module-scoped, in order), with real Ray, model, Parquet and FAISS.
"""
from __future__ import annotations

import json
import os
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sentence_transformers.util.quantization import quantize_embeddings

from jobs.cli import main as cli
from jobs.ingest import run as ingest
from jobs.reindex import ReindexConfig, run as reindex
from lakes import ingest_cfg
from test_rerun import _content
from workers.embedding.quantizer import to_float16
from workers.ingest.shard_builder import float16_rows, write_shard
from workers.lake.dataset import open_version
from workers.lake.records import ShardSource
from workers.lake.storage import url_to_fs
from workers.search.searcher import Searcher

pytestmark = pytest.mark.usefixtures("shared_encoders")  # conftest: warm encoder actors across the module's jobs

ROWS = 12  # documents per file; one unit (and shard) per file
F16 = ("int8", "ubinary", "float16")


# --- pure: the column, and requantizing from it ----------------------------------------------------


def _unit(seed: int, n: int = 30, dim: int = 64):
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((n, dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    lo, hi = np.quantile(emb, [0.05, 0.95], axis=0).astype(np.float32)  # some values clip
    return emb, np.stack([lo, hi])


def test_float16_column_round_trips_and_requantizing_it_equals_a_fresh_write(tmp_path):
    emb, old = _unit(0)
    _, new = _unit(1)
    fs, root = url_to_fs(str(tmp_path / "ds"))
    src = ShardSource("f.parquet", 0, 32)
    ids, rows = [f"d{i}" for i in range(30)], np.arange(30)
    rejects = [{"id": None, "source_file": "f.parquet", "source_row": 30, "reason": "null_id", "detail": "null id"}]
    first = write_shard(fs, root, "a" * 32, src, ids, rows, emb, old, F16, rejects)
    table = pq.read_table(f"{root}/{first.path}")
    assert table.column_names == ["id", "source_row", "int8", "ubinary", "float16", "ubinary_scale"]
    assert table.schema.field("float16").type == pa.list_(pa.float16(), 64)
    half = np.asarray(table["float16"].combine_chunks().flatten()).reshape(30, 64)
    assert half.dtype == np.float16 and np.array_equal(half.view(np.uint16), emb.astype(np.float16).view(np.uint16))
    # int8 and ubinary are those of the float16 values, as sentence-transformers quantizes them.
    x = half.astype(np.float32)
    int8 = np.asarray(table["int8"].combine_chunks().flatten()).reshape(30, 64)
    assert np.array_equal(int8, quantize_embeddings(x, "int8", ranges=old))
    assert np.asarray(table["ubinary"]).tolist() == [r.tobytes() for r in quantize_embeddings(x, "ubinary")]

    kept = float16_rows(fs, root, first, src)
    got_ids, got_rows, got_half, got_rejects = kept
    assert (got_ids, got_rows.tolist(), got_rejects) == (ids, rows.tolist(), rejects)
    assert np.array_equal(got_half.view(np.uint16), half.view(np.uint16))
    # Requantized under new ranges from the column: the bytes of a write of the float32 embeddings.
    again = write_shard(fs, root, "b" * 32, src, got_ids, got_rows, got_half.astype(np.float32), new, F16,
                        got_rejects)
    fresh = write_shard(fs, root, "c" * 32, src, ids, rows, emb, new, F16, rejects)
    assert (again.sha256, again.index_sha256, again.rejects.sha256, again.clipped_per_dim) == \
        (fresh.sha256, fresh.index_sha256, fresh.rejects.sha256, fresh.clipped_per_dim)
    int8 = np.asarray(pq.read_table(f"{root}/{again.path}")["int8"].combine_chunks().flatten()).reshape(30, 64)
    assert np.array_equal(int8, quantize_embeddings(x, "int8", ranges=new))
    assert first.sha256 != again.sha256  # the new ranges did change the codes

    # A shard that cannot serve says why (the caller encodes the unit instead).
    assert "holds rows" in float16_rows(fs, root, first, ShardSource("f.parquet", 0, 31))
    plain = write_shard(fs, root, "d" * 32, src, ids, rows, emb, old, ("int8", "ubinary"), rejects)
    assert "cannot be read for requantizing" in float16_rows(fs, root, plain, src)
    with open(f"{root}/{first.path}", "r+b") as f:
        f.seek(100)
        f.write(b"\0")
    assert "differs from its record" in float16_rows(fs, root, first, src)


def test_float16_refuses_values_beyond_its_range():
    x = np.ones((3, 4), np.float32)
    x[2, 1] = 7e4
    with pytest.raises(ValueError, match=r"row 2 holds a value beyond float16's range.*drop float16"):
        to_float16(x)


# --- a lake ingested with float16, recalibrated ------------------------------------------------------


def _write(lake, name: str, rows) -> None:
    lake.mkdir(parents=True, exist_ok=True)
    ids, texts = [r[0] for r in rows], [r[1] for r in rows]
    pq.write_table(pa.table({"id": ids, "text": texts}), lake / f".{name}")
    os.replace(lake / f".{name}", lake / name)


def _cfg(source, dest, **kw):
    return replace(ingest_cfg(str(source), str(dest), {}, **kw), unit_rows=ROWS)


def _float16_and_int8(url: str):
    """Per document of the latest version: id, float16 bits, int8 codes; and the version's ranges."""
    v = open_version(url)
    out = {}
    for s in v.shards:
        t = v.read_shard_table(s, columns=["id", "float16", "int8"])
        half = np.asarray(t["float16"].combine_chunks().flatten()).reshape(-1, v.dim)
        int8 = np.asarray(t["int8"].combine_chunks().flatten()).reshape(-1, v.dim)
        for i, h, q in zip(t["id"].to_pylist(), half, int8):
            out[i] = (h, q)
    return out, v.read_ranges().ranges


@pytest.fixture(scope="module")
def lake(tmp_path_factory, docs, ray_session, shared_encoders):
    base = tmp_path_factory.mktemp("requantize")
    raw, dest = base / "raw", base / "emb"
    for i in range(3):
        _write(raw, f"part-{i}.parquet", docs[i * ROWS:(i + 1) * ROWS])
    _write(raw, "part-2b.parquet", docs[40:44] + [("no-text", None)])  # a reject travels with its shard
    first = ingest(_cfg(raw, dest, precisions=F16))
    assert first.version == 1 and first.summary["rows_encoded"] == 3 * ROWS + 5
    assert open_version(str(dest)).manifest.precisions == ("float16", "int8", "ubinary")
    return base, raw, dest


def test_recalibrate_requantizes_float16_shards_and_equals_a_fresh_ingest(lake, docs, capsys):
    base, raw, dest = lake
    _write(raw, "part-3.parquet", docs[-ROWS:])  # new data: the ranges calibrated anew differ
    assert cli(["reindex", str(dest), "--dry-run", "--recalibrate", "--json", "--no-progress"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert (plan["rows_requantized"], plan["rows_encoded"], plan["float16"]) == (3 * ROWS + 5, ROWS, True)
    assert plan["files_to_encode"] == ["part-3.parquet"] and plan["committed"] is False

    result = reindex(ReindexConfig(str(dest), recalibrate=True, progress=False))
    s = result.summary
    assert (result.version, s["mode"]) == (2, "recalibrate")
    # Only the new file and the calibration sample (50 of the 52 valid rows) went through the
    # model; the 41 rows of the old shards were requantized from float16.
    assert (s["rows_requantized"], s["rows_encoded"], s["calibration_rows"]) == (3 * ROWS + 5, ROWS, 50)
    v1, v2 = (open_version(str(dest), n).manifest for n in (1, 2))
    assert v2.ranges.id != v1.ranges.id and not {x.id for x in v1.shards} & {x.id for x in v2.shards}

    fresh = base / "fresh-2"
    assert ingest(_cfg(raw, fresh, precisions=F16)).summary["rows_requantized"] == 0
    assert open_version(str(fresh)).manifest.ranges.id == v2.ranges.id  # the same calibration
    assert _content(str(dest), {}) == _content(str(fresh), {})  # ids, codes, rejects, shard bytes
    got, ranges = _float16_and_int8(str(dest))
    want, _ = _float16_and_int8(str(fresh))
    assert sorted(got) == sorted(want) and len(got) == 4 * ROWS + 4
    for i, (h, q) in got.items():
        assert np.array_equal(h.view(np.uint16), want[i][0].view(np.uint16))
        assert np.array_equal(q, quantize_embeddings(h.astype(np.float32)[None], "int8", ranges=ranges)[0])

    # Readers take the extra column in their stride.
    with Searcher.open(str(dest)) as searcher:
        assert searcher.search(docs[3][1], k=3)[0].id == docs[3][0]
    assert cli(["inspect", str(dest)]) == 0 and "float16" in capsys.readouterr().out
    assert cli(["vacuum", str(dest), "--dry-run", "--older-than", "0s", "--retain", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)


def test_drift_recalibration_encodes_each_new_row_once(lake, docs):
    base, raw, dest = lake
    before, _ = _float16_and_int8(str(dest))
    _write(raw, "part-4.parquet", docs[-2 * ROWS:-ROWS])
    result = reindex(ReindexConfig(str(dest), recalibrate_on_drift=True, drift_threshold=0.0, progress=False))
    s = result.summary
    assert (result.version, s["mode"]) == (3, "recalibrate") and s["drift"]["clipped_share"] > 0
    # The first pass encoded part-4 under the saved ranges (its draft not committed); the
    # recalibration requantized every shard, part-4's from that pass's float16 column.
    assert (s["rows_requantized"], s["rows_encoded"]) == (5 * ROWS + 5, 0)
    # What the shards hold is then fixed by their float16 values and the ranges, as the previous
    # test holds against a fresh ingest (not repeated here: it costs a third ingest).
    got, ranges = _float16_and_int8(str(dest))
    assert len(got) == len(before) + ROWS
    for i, (h, q) in got.items():
        assert i not in before or np.array_equal(h.view(np.uint16), before[i][0].view(np.uint16))
        assert np.array_equal(q, quantize_embeddings(h.astype(np.float32)[None], "int8", ranges=ranges)[0])


def test_dry_run_of_a_lake_without_float16_counts_the_rows_to_reencode(small_dataset, capsys):
    dest, _ = small_dataset
    assert cli(["reindex", str(dest), "--dry-run", "--recalibrate", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "0 rows requantized from float16, 93 re-encoded" in out
    assert "keep no float16 embeddings, so every row must be re-encoded" in out
