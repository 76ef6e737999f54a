"""What readers no longer take on trust, item by item, on real datasets (local disk and S3)."""
from __future__ import annotations

import json
import logging

import numpy as np
import pyarrow.parquet as pq
import pytest

from jobs.cli import main as cli
from jobs.ingest import run as ingest
from ranges.manifest import RangeManifest
from workers.ingest.config import IngestConfig
from workers.lake.dataset import SCALE_COLUMN, IntegrityError, index_problems, open_version, schema_problems
from workers.embedding.encoder import EncoderConfig
from workers.search.searcher import Searcher
from workers.vocab import INDEX_TYPES
from workers.ingest.shard_builder import build_index, completed_shard, write_shard, write_sidecar
from ranges.encoding import pretty_json
from workers.lake.records import SIDECAR_FORMAT, ShardSource, sidecar_path
from workers.lake.storage import join, put_bytes, url_to_fs
from workers.lake.versions import MAX_VERSION, commit, list_versions, read_version

from test_hostile_manifests import (MODEL, QUERIES, TARGET, codes_of, hnsw_index_with_link, ivf_index,
                                    manifest_of, replace_index, replace_table, save_manifest)
from test_version import manifest

pytestmark = pytest.mark.usefixtures("shared_encoders")  # conftest: warm encoder actors across the module's jobs


# ---------------------------------------------------------------------------------------------
# Item 6: an index is checked for its class and labels on load


@pytest.mark.parametrize("index_type", INDEX_TYPES)
def test_each_index_class_loads_when_the_record_names_it(copy_dataset, index_type):
    doc = manifest_of(copy_dataset)
    s = doc["shards"][TARGET]
    replace_index(copy_dataset, s, build_index(codes_of(copy_dataset, s), 384, index_type), index_type)
    save_manifest(copy_dataset, doc)
    index = open_version(str(copy_dataset)).read_index(TARGET)
    assert type(index).__name__ == index_type and index.ntotal == s["rows"] == 40
    with Searcher.open(str(copy_dataset), model=MODEL) as searcher:
        groups = searcher.groups
        assert groups[groups.owner[TARGET]].index_classes()[TARGET] == index_type
        codes = codes_of(copy_dataset, s)[:5]  # a shard's own codes find their own rows
        hits = searcher.search_vectors(np.unpackbits(codes, axis=1) * 2.0 - 1, k=1, rescore="none",
                                       candidates="hamming")
        assert [(h[0].shard, h[0].row) for h in hits] == [(s["id"], r) for r in range(5)]
    doc["shards"][TARGET]["index_type"] = [t for t in INDEX_TYPES if t != index_type][0]
    save_manifest(copy_dataset, doc)
    with pytest.raises(IntegrityError, match=rf"{s['index']} of version 1 .* \(shard {s['id']}\) is an "
                                             rf"{index_type}, the manifest says"):
        open_version(str(copy_dataset)).read_index(TARGET)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_labels_past_the_rows_are_refused_on_load_naming_the_shard(copy_dataset, kind):
    doc = manifest_of(copy_dataset)
    s = doc["shards"][TARGET]
    codes = codes_of(copy_dataset, s)
    if kind == "ivf":
        replace_index(copy_dataset, s, ivf_index(codes, np.arange(40) + 1000), "IndexBinaryIVF")
        message = r"labels its 40 stored vectors with ids from 1000 to 1039 \(40 outside the shard's rows 0\.\.39\)"
    else:  # FAISS itself checks HNSW links while reading; the message still names the shard
        replace_index(copy_dataset, s, hnsw_index_with_link(codes, 41), "IndexBinaryHNSW")
        message = r"41 out of range|links to vectors .* outside"
    save_manifest(copy_dataset, doc)
    with pytest.raises(IntegrityError, match=rf"{s['index']} of version 1 .*\(shard {s['id']}\) .*({message})"):
        open_version(str(copy_dataset)).read_index(TARGET)
    with pytest.raises(IntegrityError, match=s["id"]):  # at load, not in the middle of a search
        Searcher.open(str(copy_dataset), model=MODEL)


def test_hnsw_graph_is_checked_even_where_faiss_reads_it_unchecked(copy_dataset):
    """FAISS 1.15 refuses bad HNSW links while reading; the reader's own check does not rely on that."""
    import faiss

    s = manifest_of(copy_dataset)["shards"][TARGET]
    index = faiss.IndexBinaryHNSW(384, 16)
    index.add(codes_of(copy_dataset, s))
    assert index_problems(index, 40, 384, "IndexBinaryHNSW") == []
    links = faiss.vector_to_array(index.hnsw.neighbors)
    links[3] = 45
    faiss.copy_array_to_vector(links, index.hnsw.neighbors)
    assert index_problems(index, 40, 384, "IndexBinaryHNSW") == [
        "has HNSW links to vectors -1 to 45, outside the shard's rows 0..39"]
    index.hnsw.entry_point = 40
    assert index_problems(index, 40, 384, "IndexBinaryHNSW") == [
        "has an HNSW graph whose levels, link offsets or entry point do not match its vectors"]


def _upload(local, store_url, options):
    fs, root = url_to_fs(store_url, options)
    for p in sorted(local.rglob("*")):
        if p.is_file():
            put_bytes(fs, join(root, p.relative_to(local).as_posix()), p.read_bytes())
    return fs, root


def test_index_and_schema_checks_hold_on_s3(copy_dataset, s3):
    bucket, options = s3
    doc = manifest_of(copy_dataset)
    flat_as_hnsw, wide = doc["shards"][TARGET], doc["shards"][TARGET + 1]
    replace_index(copy_dataset, flat_as_hnsw, build_index(codes_of(copy_dataset, flat_as_hnsw), 384,
                                                          "IndexBinaryHNSW"))
    replace_table(copy_dataset, wide, pq.read_table(copy_dataset / wide["path"]).drop_columns(["int8"]))
    save_manifest(copy_dataset, doc)
    url = f"{bucket}/ds"
    _upload(copy_dataset, url, options)
    v = open_version(url, storage_options=options)
    with pytest.raises(IntegrityError, match=rf"{flat_as_hnsw['index']} .* is an IndexBinaryHNSW, the manifest "
                                             "says IndexBinaryFlat"):
        v.read_index(TARGET)
    with pytest.raises(IntegrityError, match=rf"{wide['path']} of version 1 of s3://.*column int8 is missing"):
        v.read_shard_table(TARGET + 1, columns=["id"])  # checked even when the column is not asked for
    assert v.read_shard_table(0).num_rows == v.read_index(0).ntotal == doc["shards"][0]["rows"]
    with pytest.raises(IntegrityError, match="is an IndexBinaryHNSW"):
        Searcher.open(url, storage_options=options, model=MODEL)


# ---------------------------------------------------------------------------------------------
# Item 7: a sidecar stands only for its own shard's files


DIM = 64


def _two_shards(fs, root):
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(24, DIM)).astype(np.float32)
    ranges = np.stack([emb.min(0), emb.max(0)]).astype(np.float32)
    out = []
    for k, sid in enumerate(("a" * 32, "b" * 32)):
        plan = (sid, ShardSource("part-0.parquet", 12 * k, 12 * k + 13))
        bad = [{"id": f"x{k}", "source_file": "part-0.parquet", "source_row": 12 * k + 12, "reason": "empty_text",
                "detail": "empty text"}]
        record = write_shard(fs, root, *plan, [f"d{k}-{i}" for i in range(12)], np.arange(12) + 12 * k,
                             emb[12 * k:12 * k + 12], ranges, ("int8", "ubinary"), bad)
        write_sidecar(fs, root, record)
        out.append((plan, record))
    return out


@pytest.mark.parametrize("lie", ["other_shards_files", "other_shards_rejects", "unsafe_path", "scheme_path",
                                 "no_index", "rows_text"])
def test_a_sidecar_naming_other_files_means_rewrite_never_failure(store, lie, caplog):
    (plan, record), (_, other) = _two_shards(store.fs, store.root)
    assert completed_shard(store.fs, store.root, *plan) == record  # the honest sidecar is reused
    forged, other = record.to_json(), other.to_json()
    if lie == "other_shards_files":  # sizes and checksums of those files are right: only the names betray it
        forged.update({k: other[k] for k in ("path", "index", "sha256", "index_sha256", "bytes", "index_bytes")})
    elif lie == "other_shards_rejects":
        forged["rejects"] = other["rejects"]
    elif lie == "unsafe_path":
        forged["path"] = "../../outside.parquet"
    elif lie == "scheme_path":
        forged["index"] = "s3://elsewhere/x.faiss"
    elif lie == "no_index":
        del forged["index"]
    else:
        forged["rows"] = "12"
    put_bytes(store.fs, join(store.root, sidecar_path(plan[0])), pretty_json({"format": SIDECAR_FORMAT,
                                                                              "record": forged}))
    with caplog.at_level(logging.WARNING, logger="workers.ingest.shard_builder"):
        assert completed_shard(store.fs, store.root, *plan) is None
    assert f"shard {plan[0]}: shards/{plan[0]}.json " in caplog.text
    assert "rewriting the shard" in caplog.text


def test_rerun_rewrites_shards_whose_sidecars_lie_and_equals_a_full_run(small_dataset, copy_dataset):
    """Incremental equals full: the rerun's version lists exactly the pristine run's shards and bytes."""
    pristine_dest, _ = small_dataset
    v1 = manifest_of(copy_dataset)
    shards = v1["shards"]
    liars = {shards[1]["id"]: {**shards[1], **{k: shards[2][k] for k in ("path", "index", "sha256",
                                                                         "index_sha256", "bytes", "index_bytes")}},
             shards[3]["id"]: {**shards[3], "path": "../../../outside.parquet"}}
    for sid, record in liars.items():
        (copy_dataset / "shards" / f"{sid}.json").write_text(json.dumps(
            {"format": "quantlake.shard/1", "record": {**record, "clipped_per_dim": [0] * 384}}))
    lake = pristine_dest.parent / "lake"
    cfg = IngestConfig(str(lake), str(copy_dataset), id_column="id", calibration_samples=50, unit_rows=40,
                       encoder=EncoderConfig(batch_size=32), progress=False)
    result = ingest(cfg)  # before, the forged sidecar was reused and the unsafe one failed the job
    assert result.version == 2 and result.summary["shards_reused"] == len(shards) - 2

    def content(doc):
        return [{k: v for k, v in s.items() if k != "stats"} for s in doc["shards"]]
    assert content(manifest_of(copy_dataset, 2)) == content(v1)
    for s in shards:
        for rel in [s["path"], s["index"]] + ([s["rejects"]["path"]] if s["rejects"] else []):
            assert (copy_dataset / rel).read_bytes() == (pristine_dest / rel).read_bytes(), rel
        sidecar = json.loads((copy_dataset / "shards" / f"{s['id']}.json").read_text())["record"]
        assert (sidecar["path"], sidecar["index"]) == (f"shards/{s['id']}.parquet", f"shards/{s['id']}.faiss")
    assert not (copy_dataset.parent / "outside.parquet").exists()


# ---------------------------------------------------------------------------------------------
# Item 8: a shard's Parquet schema is checked against the manifest


@pytest.mark.parametrize("precisions", [("int8", "ubinary"), ("int8", "uint8", "binary", "ubinary"), ("ubinary",)])
def test_the_checked_schema_is_what_the_writer_writes(tmp_path, precisions):
    fs, root = url_to_fs(str(tmp_path))
    emb = np.random.default_rng(1).normal(size=(5, DIM)).astype(np.float32)
    record = write_shard(fs, root, "c" * 32, ShardSource("f", 0, 5), list("abcde"), np.arange(5), emb,
                         np.stack([emb.min(0), emb.max(0)]), precisions, [])
    schema = pq.read_schema(tmp_path / record.path)
    assert schema_problems(schema, DIM, list(precisions)) == []
    assert schema_problems(schema, DIM + 8, list(precisions)) == (
        ([f"column int8 is fixed_size_list<int8>[{DIM}], expected fixed_size_list<int8>[{DIM + 8}]"]
         if "int8" in precisions else []) + (
        [f"column uint8 is fixed_size_list<uint8>[{DIM}], expected fixed_size_list<uint8>[{DIM + 8}]"]
         if "uint8" in precisions else []) + (
        ["column binary is fixed_size_list<int8>[8], expected fixed_size_list<int8>[9]"]
         if "binary" in precisions else []) + [
        "column ubinary is fixed_size_binary[8], expected fixed_size_binary[9]"])
    others = [p for p in ("int8", "uint8", "binary") if p not in precisions]
    if others:
        assert schema_problems(schema, DIM, list(precisions) + others[:1]) == [f"column {others[0]} is missing"]
    if len(precisions) > 1:
        assert schema_problems(schema, DIM, ["ubinary"]) == [
            f"column {p} is not expected" for p in schema.names
            if p not in ("id", "source_row", "ubinary", SCALE_COLUMN)]  # the scale column is optional, never unexpected


# ---------------------------------------------------------------------------------------------
# Item 9: manifests are validated up front; empty versions; inspect reads only what it shows


def test_a_version_without_shards_searches_to_no_hits(copy_dataset, ray_session, capsys):
    fs, root = url_to_fs(str(copy_dataset))
    v1 = read_version(fs, root, 1).to_json()
    empty = {k: v for k, v in v1.items() if k not in ("version", "writer", "created_at")}
    empty.update(parent=1, shards=[], counts={"rows_read": 0, "documents": 0, "rejects": 0})
    assert commit(fs, root, empty) == 2
    with Searcher.open(str(copy_dataset), model=MODEL) as s:
        assert s.version == 2 and s.search_vectors(QUERIES, k=5) == [[], [], [], []]
        assert s.search([], k=5) == []
    rs = Searcher.open(str(copy_dataset), model=MODEL, backend="ray")
    try:
        assert rs.search_vectors(QUERIES[:2], k=5) == [[], []]
    finally:
        rs.close()
    assert cli(["inspect", str(copy_dataset)]) == 0
    out = capsys.readouterr().out
    assert "version 2 (latest)" in out and "rows       0 documents, 0 rejects" in out and "shards     0:" in out


def test_inspect_shows_a_version_beside_unreadable_ones(copy_dataset, capsys):
    fs, root = url_to_fs(str(copy_dataset))
    v1 = read_version(fs, root, 1).to_json()
    assert commit(fs, root, {k: v for k, v in v1.items() if k not in ("version", "writer", "created_at")}) == 2
    (copy_dataset / "versions" / "00000003.json").write_text("{ cut short")
    broken = {**v1, "version": 4, "parent": 3}
    del broken["precisions"]
    (copy_dataset / "versions" / "00000004.json").write_text(json.dumps(broken))

    assert cli(["inspect", str(copy_dataset), "--version", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"dataset {copy_dataset}: 4 committed version(s)"
    assert [line.split()[0] for line in out[2:6]] == ["1", "2", "3", "4"]
    assert out[4].startswith("        3  unreadable: version 3 (versions/00000003.json): not valid JSON")
    assert out[5].startswith("        4  unreadable: version 4 (versions/00000004.json): precisions is None")
    assert out[6] == f"version 1, committed {v1['created_at']} by writer {v1['writer']}"
    assert cli(["inspect", str(copy_dataset), "--version", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["shards"] == v1["shards"]

    assert cli(["inspect", str(copy_dataset)]) == 2  # the version asked for (the latest) must be sound
    err = capsys.readouterr().err.splitlines()
    assert err == [f"quantlake inspect: error: version 4 (versions/00000004.json): precisions is None, "
                   "expected distinct names of int8, uint8, binary, ubinary, float16 including ubinary (the shard "
                   "indexes are built on it)"]


# ---------------------------------------------------------------------------------------------
# Item 10: ranges wider than float32 are refused


def _ranges(low, high, dim=4):
    return np.stack([np.full(dim, low, np.float32), np.full(dim, high, np.float32)])


@pytest.mark.parametrize("low, high, ok", [(-3e38, 3e38, False), (-3.4e38, 1e38, False), (0.0, 3.4e38, True),
                                           (-1e38, 1e38, True), (-1.0, 1.0, True)])
def test_ranges_whose_width_overflows_float32_are_refused(low, high, ok):
    r = _ranges(low, high)
    if ok:
        m = RangeManifest(r, "m", "sha256:00", True, "minmax", None, 1, 0)
        assert RangeManifest.from_json(m.to_json()).id == m.id
        assert np.isfinite((r[1] - r[0]) / np.float32(255)).all()
        return
    with pytest.raises(ValueError, match=r"ranges of dimension 0 \(\[-3.*\]\) and 3 other\(s\) are wider than "
                                         "float32 can hold"):
        RangeManifest(r, "m", "sha256:00", True, "minmax", None, 1, 0)


# ---------------------------------------------------------------------------------------------
# Item 11: version numbers stay within the format's 8 digits


@pytest.mark.parametrize("started_on", [1, MAX_VERSION])
def test_no_commit_past_the_last_version_number(store, started_on):
    assert commit(store.fs, store.root, manifest("w1")) == 1
    planted = {**read_version(store.fs, store.root, 1).to_json(), "version": MAX_VERSION, "parent": 1, "writer": "planted"}
    put_bytes(store.fs, f"{store.root}/versions/99999999.json", json.dumps(planted).encode())
    before = store.files()
    assert read_version(store.fs, store.root).writer == "planted"  # readers take it for the latest
    with pytest.raises(ValueError, match=r"versions/99999999\.json already uses the last version number the "
                                         r"8-digit format allows \(99999999\).*nothing was committed"):
        commit(store.fs, store.root, manifest("w2", parent=started_on))
    assert store.files() == before


def test_names_outside_the_numbering_are_not_versions(copy_dataset, caplog):
    doc = manifest_of(copy_dataset)
    for n in (0, 100_000_000):
        (copy_dataset / "versions" / f"{n:08d}.json").write_text(json.dumps({**doc, "version": n, "parent": 1}))
    fs, root = url_to_fs(str(copy_dataset))
    with caplog.at_level(logging.WARNING, logger="workers.lake.versions"):
        assert list_versions(fs, root) == [1]
    assert "ignoring versions/100000000.json" in caplog.text
    assert open_version(str(copy_dataset)).version == 1
    for n in (0, MAX_VERSION + 1):
        with pytest.raises(FileNotFoundError, match=rf"version {n} of .* does not exist: version numbers run "
                                                    rf"from 1 to {MAX_VERSION}"):
            open_version(str(copy_dataset), version=n)
    # A real manifest commits after a planted last number only once that file is gone.
    (copy_dataset / "versions" / "99999999.json").write_text(json.dumps({**doc, "version": MAX_VERSION, "parent": 1}))
    again = {k: v for k, v in doc.items() if k not in ("version", "writer", "created_at")}
    with pytest.raises(ValueError, match=r"versions/99999999\.json already uses the last version number"):
        commit(fs, root, again)
    (copy_dataset / "versions" / "99999999.json").unlink()
    assert commit(fs, root, again) == 2 and list_versions(fs, root) == [1, 2]
