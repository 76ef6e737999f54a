"""End to end on real documents, the real model, real Ray, FAISS and Parquet."""
import gzip
import json

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sentence_transformers import SentenceTransformer
from sentence_transformers.util.quantization import quantize_embeddings

from jobs.ingest import run
from ranges.manifest import RangeManifest
from workers.ingest.config import IngestConfig
from workers.embedding.encoder import EncoderConfig, resolve_model
from ranges.encoding import sha256_hex

from conftest import write_parquet_lake

pytestmark = pytest.mark.usefixtures("shared_encoders")  # conftest: warm encoder actors across the module's jobs


@pytest.fixture(scope="module")
def ingested(tmp_path_factory, docs, ray_session, shared_encoders):
    """300 real documents in 3 Parquet files plus a JSON Lines file with bad rows, and a gzipped one."""
    root = tmp_path_factory.mktemp("e2e")
    lake, dest = root / "lake", root / "dest"
    good = docs[:300]
    write_parquet_lake(lake / "year=2026", good, files=3, row_group_size=40)
    bad = [{"id": "null-text", "text": None}, {"id": "blank", "text": "  \n "},
           {"id": good[5][0], "text": "a duplicate of an id from a Parquet file"},
           {"text": "a row without an id"}, {"id": "ok-jsonl", "text": docs[350][1]}]
    # and bytes that are not UTF-8, in a text and in an id (Arrow's JSON reader passes them on)
    not_utf8 = b'{"id": "latin1", "text": "caf\xe9 cr\xe8me"}\n{"id": "id-\xff", "text": "fine"}\n'
    (lake / "z-extra.jsonl").write_bytes("".join(json.dumps(r) + "\n" for r in bad).encode() + not_utf8)
    # and a compressed JSON Lines file, read as the lines it holds
    packed = [{"id": "gz-1", "text": docs[351][1]}, {"id": "gz-blank", "text": ""},
              {"id": "gz-2", "text": docs[352][1]}]
    (lake / "z-packed.ndjson.gz").write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in packed).encode()))
    cfg = IngestConfig(str(lake), str(dest), id_column="id", calibration_samples=150, unit_rows=60,
                       encoder=EncoderConfig(batch_size=32), progress=False)
    with pytest.MonkeyPatch.context() as mp:
        calibrated = _spy_calibration(mp)
        result = run(cfg)
    assert calibrated == [150]  # the spy sees a calibration when there is one
    return lake, dest, cfg, result, good + [("ok-jsonl", docs[350][1]), ("gz-1", docs[351][1]), ("gz-2", docs[352][1])]


def _spy_calibration(mp) -> list[int]:
    """Record, per calibration the job runs, how many sampled texts it hands the encoders."""
    import jobs.ingest

    calls, real = [], jobs.ingest.calibrated

    def spy(cfg, sample, fingerprint, pool):
        calls.append(len(sample.texts))
        return real(cfg, sample, fingerprint, pool)

    mp.setattr(jobs.ingest, "calibrated", spy)
    return calls


def _shards(dest, version):
    for s in version["shards"]:
        yield s, pq.read_table(dest / s["path"])


def test_every_row_is_in_one_shard_or_in_rejects(ingested):
    lake, dest, cfg, result, accepted = ingested
    version = json.loads((dest / "versions" / "00000001.json").read_text())
    seen = {}
    for s, table in _shards(dest, version):
        for i, row in zip(table["id"].to_pylist(), table["source_row"].to_pylist()):
            key = (s["source"]["file"], row)
            assert key not in seen, f"{key} is in two shards"
            seen[key] = i
    rejects = {}
    for s in version["shards"]:
        if s["rejects"]:
            for r in pq.read_table(dest / s["rejects"]["path"]).to_pylist():
                rejects[(r["source_file"], r["source_row"])] = (r["id"], r["reason"])
    assert not set(seen) & set(rejects)
    assert sorted(seen.values()) == sorted(i for i, _ in accepted)
    assert rejects == {("z-extra.jsonl", 0): ("null-text", "null_text"), ("z-extra.jsonl", 1): ("blank", "empty_text"),
                       ("z-extra.jsonl", 2): (accepted[5][0], "duplicate_id"), ("z-extra.jsonl", 3): (None, "null_id"),
                       ("z-extra.jsonl", 5): ("latin1", "text_not_utf8"),
                       ("z-extra.jsonl", 6): ("id-\ufffd", "id_not_utf8"),
                       ("z-packed.ndjson.gz", 1): ("gz-blank", "empty_text")}
    assert version["counts"] == {"rows_read": 310, "documents": 303, "rejects": 7}
    s = result.summary
    assert (s["documents"], s["rejects"], s["shards"]) == (303, 7, len(version["shards"]))
    assert s["bytes_float32"] == 303 * 384 * 4 and s["bytes_ubinary"] == 303 * 48
    # 100 rows per file in row groups of 40: units end at row groups 80 and 100, plus the JSONL file
    assert [(x["source"]["row_start"], x["source"]["row_stop"]) for x in version["shards"]][:2] == [(0, 80), (80, 100)]


def test_vectors_equal_quantize_embeddings_of_reencoded_documents(ingested):
    lake, dest, cfg, result, accepted = ingested
    version = json.loads((dest / "versions" / "00000001.json").read_text())
    ranges = RangeManifest.from_json((dest / version["ranges"]["path"]).read_bytes())
    assert ranges.id == version["ranges"]["id"] and ranges.sample_size == 150
    text = dict(accepted)
    model = SentenceTransformer(str(resolve_model(None)), device="cpu")
    for s, table in _shards(dest, version):
        emb = model.encode([text[i] for i in table["id"].to_pylist()], batch_size=32,
                           normalize_embeddings=True, convert_to_numpy=True)
        want8 = quantize_embeddings(emb, "int8", ranges=ranges.ranges)
        got8 = np.array(table["int8"].to_pylist(), np.int8)
        # another process may differ in the last float bit: a value on a bucket edge moves by one
        assert np.abs(got8.astype(int) - want8).max() <= 1
        assert (got8 == want8).mean() > 0.999
        got_bits = np.frombuffer(b"".join(table["ubinary"].to_pylist()), np.uint8).reshape(len(table), -1)
        assert (np.unpackbits(got_bits) == np.unpackbits(quantize_embeddings(emb, "ubinary"))).mean() > 0.999


def test_shard_index_finds_each_document_itself(ingested):
    lake, dest, cfg, result, accepted = ingested
    version = json.loads((dest / "versions" / "00000001.json").read_text())
    for s, table in _shards(dest, version):
        raw = (dest / s["index"]).read_bytes()
        assert sha256_hex(raw) == s["index_sha256"]
        assert sha256_hex((dest / s["path"]).read_bytes()) == s["sha256"]
        index = faiss.deserialize_index_binary(np.frombuffer(raw, np.uint8))
        assert index.ntotal == len(table) == s["rows"]
        codes = np.frombuffer(b"".join(table["ubinary"].to_pylist()), np.uint8).reshape(len(table), -1)
        dist, idx = index.search(codes, 1)
        assert (dist[:, 0] == 0).all()
        assert (idx[:, 0] == np.arange(len(table))).mean() > 0.95  # ties only for identical codes


def test_rerun_with_saved_ranges_writes_identical_shards(ingested, tmp_path, monkeypatch):
    lake, dest, cfg, result, accepted = ingested
    version = json.loads((dest / "versions" / "00000001.json").read_text())
    calibrated = _spy_calibration(monkeypatch)
    again = run(IngestConfig(str(lake), str(tmp_path / "d2"), id_column="id", unit_rows=60,
                             ranges=str(dest / version["ranges"]["path"]),
                             encoder=EncoderConfig(batch_size=32), progress=False))
    v2 = json.loads((tmp_path / "d2" / "versions" / "00000001.json").read_text())
    # Nothing was encoded for calibration: the encoders saw only the 303 documents of the shards.
    assert calibrated == [] and again.summary["documents"] == sum(s["rows"] for s in v2["shards"]) == 303
    assert v2["ranges"]["id"] == version["ranges"]["id"]
    assert [(s["id"], s["sha256"], s["index_sha256"]) for s in v2["shards"]] == \
           [(s["id"], s["sha256"], s["index_sha256"]) for s in version["shards"]]


def test_a_unit_with_every_row_rejected_is_written_with_the_ranges_dimension(tmp_path, docs, ray_session):
    """Such a unit skips the encoders (the read task gives it no `dim`; the write takes the ranges'),
    and its empty shard and index still have the model's 384 dimensions."""
    lake, dest = tmp_path / "lake", tmp_path / "dest"
    write_parquet_lake(lake, docs[:12], files=1)
    bad = [{"id": "null-text", "text": None}, {"id": "blank", "text": " "}]
    (lake / "z-bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bad))
    run(IngestConfig(str(lake), str(dest), id_column="id", calibration_samples=12,
                     encoder=EncoderConfig(batch_size=32), progress=False))
    version = json.loads((dest / "versions" / "00000001.json").read_text())
    [empty] = [s for s in version["shards"] if s["source"]["file"] == "z-bad.jsonl"]
    assert empty["rows"] == 0 and version["counts"] == {"rows_read": 14, "documents": 12, "rejects": 2}
    rejects = pq.read_table(dest / empty["rejects"]["path"]).to_pylist()
    assert [(r["id"], r["reason"]) for r in rejects] == [("null-text", "null_text"), ("blank", "empty_text")]
    table = pq.read_table(dest / empty["path"])
    assert table.num_rows == 0 and table.schema.field("int8").type.list_size == 384
    index = faiss.read_index_binary(str(dest / empty["index"]))
    assert (index.d, index.ntotal) == (384, 0)


def test_units_deep_in_a_large_jsonl_file_read_it_from_the_scans_mark(tmp_path, docs, monkeypatch):
    """A JSON Lines file of two 4 MiB segments: its last units read from the mark the scan left
    where the second starts, not from the file's start, and write the shards a read from the
    start writes, rejects (a blank text, a duplicate id) included."""
    import jobs.ingest
    from workers.lake.versions import read_version
    from workers.lake.storage import url_to_fs

    lake = tmp_path / "lake"
    lake.mkdir()
    records = [{"id": d, "text": t, "pad": "x" * 100_000} for d, t in docs[:64]]
    records[60] = {**records[60], "text": " "}
    records[62] = {**records[62], "id": docs[3][0]}
    (lake / "big.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    real, planned = jobs.ingest.plan_units, []

    def plan(*args, marks=True):
        units = real(*args[:7], *args[7:] if marks else ())
        planned.append(units)
        return units
    cfg = IngestConfig(str(lake), str(tmp_path / "marks"), id_column="id", calibration_samples=64, unit_rows=8,
                       encoder=EncoderConfig(batch_size=32), progress=False)
    monkeypatch.setattr(jobs.ingest, "plan_units", plan)
    run(cfg)
    ranges = read_version(*url_to_fs(cfg.dest)).ranges.path
    monkeypatch.setattr(jobs.ingest, "plan_units", lambda *args: plan(*args, marks=False))
    run(IngestConfig(str(lake), str(tmp_path / "start"), id_column="id", ranges=f"{cfg.dest}/{ranges}", unit_rows=8,
                     encoder=EncoderConfig(batch_size=32), progress=False))
    raw = (lake / "big.jsonl").read_bytes()
    starts = [(u.row_start, u.start) for u in planned[0] if u.start]
    assert [a for a, _ in starts] == [48, 56] and {m for _, m in starts} == {starts[0][1]}
    row, byte, types = starts[0][1]
    assert types == ("string", "string") and 40 < row <= 48
    assert raw[byte - 1:byte] == b"\n" and raw[:byte].count(b"\n") == row
    assert {u.start for u in planned[1]} == {None} and [u.shard_id for u in planned[1]] == [
        u.shard_id for u in planned[0]]

    def shards(dest):
        return [(s.id, s.rows, s.sha256, s.index_sha256, s.rejects and s.rejects.sha256)
                for s in read_version(*url_to_fs(str(tmp_path / dest))).shards]
    assert shards("marks") == shards("start") and sum(s[1] for s in shards("marks")) == 62
    assert sum(isinstance(s[4], str) for s in shards("marks")) == 1

    # The version keeps the marks with the file's kept scan: a job whose kept scan stands in for
    # the scan (ranges given: the file is not read) still starts its units at them. Other units
    # (16 rows) mean other shards, all read and encoded: the same as a fresh job's.
    [ref] = read_version(*url_to_fs(cfg.dest)).scans
    assert ref.marks == (starts[0][1],)
    again = IngestConfig(str(lake), cfg.dest, id_column="id", ranges=f"{cfg.dest}/{ranges}", unit_rows=16,
                         encoder=EncoderConfig(batch_size=32), progress=False)
    monkeypatch.setattr(jobs.ingest, "plan_units", plan)
    summary = run(again).summary
    assert (summary["files_scanned"], summary["scans_reused"], summary["rows_encoded"]) == (0, 1, 64)
    assert [(u.row_start, u.start) for u in planned[2]] == [(0, None), (16, None), (32, None), (48, ref.marks[0])]
    run(IngestConfig(**{**vars(again), "dest": str(tmp_path / "fresh")}))
    assert shards("marks") == shards("fresh") and len(shards("marks")) == 4
    assert read_version(*url_to_fs(cfg.dest)).scans == read_version(*url_to_fs(str(tmp_path / "fresh"))).scans

    # Search's texts of a hit deep in the file are read from the kept scan's mark: the bytes
    # before it (the same size and time: the same file to the version) are never parsed.
    import os
    from jobs.search import source_texts
    from workers.search.searcher import Searcher
    stat = (lake / "big.jsonl").stat()
    (lake / "big.jsonl").write_bytes(b"!" * (byte - 1) + raw[byte - 1:])
    os.utime(lake / "big.jsonl", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with Searcher.open(cfg.dest, model=str(resolve_model(None))) as searcher:
        [[hit]] = searcher.search([docs[50][1]], 1)
        assert hit.id == docs[50][0] and hit.source_row == 50
        assert source_texts(searcher, [hit], str(lake)) == [docs[50][1]]


@pytest.mark.parametrize("when", ["list_source", "plan_units"])
def test_a_file_replaced_while_the_job_runs_stops_it_and_commits_nothing(tmp_path, docs, monkeypatch, when):
    """A writer replaces part-00001 after the job listed the lake (the scan reads the new file) or
    after it planned the units (the reads do), with rows that hold part-00000's ids. The job read
    the new rows as the listed file: a version of 40 rows with 20 ids stored twice and no reject.
    Now the job fails naming the file, and a rerun reads the lake as it is."""
    import jobs.ingest

    lake, dest = tmp_path / "lake", tmp_path / "dest"
    write_parquet_lake(lake, docs[:40], files=2)
    replacement = pa.table({"id": [d[0] for d in docs[:20]], "text": [d[1] for d in docs[100:120]]})
    step = getattr(jobs.ingest, when)

    def then_replaced(*args, **kwargs):
        out = step(*args, **kwargs)
        pq.write_table(replacement, lake / "part-00001.parquet")
        return out

    monkeypatch.setattr(jobs.ingest, when, then_replaced)
    cfg = IngestConfig(str(lake), str(dest), id_column="id", calibration_samples=20,
                       encoder=EncoderConfig(batch_size=32), progress=False)
    with pytest.raises(Exception, match=r"source file part-00001\.parquet changed while the job ran"):
        run(cfg)
    assert not (dest / "versions").exists()
    monkeypatch.undo()
    result = run(cfg)
    version = json.loads((dest / "versions" / "00000001.json").read_text())
    assert version["counts"] == {"rows_read": 40, "documents": 20, "rejects": 20}
    stored = [i for s, table in _shards(dest, version) for i in table["id"].to_pylist()]
    assert sorted(stored) == sorted(d[0] for d in docs[:20]) and result.summary["rejects"] == 20
