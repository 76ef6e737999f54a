"""Typed records: each round-trips through its one serialisation, and validation names the field."""
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from workers.lake.records import (MAX_VERSION, Duplicate, ModelInfo, RangesRef, RejectsRef, ScanRef, ShardRecord,
                                  ShardSource, SourceFile, SourceSnapshot, VersionManifest, WorkUnit,
                                  sidecar_json)

H = "ab" * 32


def shard(i: int = 0, rejects: bool = True, per_dim=(1, 2, 0)) -> ShardRecord:
    sid = f"{i:032x}"
    return ShardRecord(
        id=sid, path=f"shards/{sid}.parquet", index=f"shards/{sid}.faiss", index_type="IndexBinaryFlat",
        rows=40, source=ShardSource("part-0.parquet", 0, 42), sha256=H, bytes=1000, index_sha256=H,
        index_bytes=2000, rejects=RejectsRef(f"rejects/{sid}.parquet", 2, H, 300) if rejects else None,
        clipped=sum(per_dim or (3,)), clipped_per_dim=per_dim, stats={"rows_read": 42 if rejects else 40, "encode_s": 0.5})


MODEL = ModelInfo("all-MiniLM-L6-v2", "sha256:" + H, 3, True)
RANGES = RangesRef(H, f"ranges/{H}.json", "minmax")
SOURCE = SourceSnapshot("s3://lake/raw", "text", "id", {"part-0.parquet": {"size": 10, "version": "e1"}},
                        {"parquet": 1})


def manifest(**kw) -> VersionManifest:
    fields = dict(
        model=MODEL, ranges=RANGES, precisions=("int8", "ubinary"), source=SOURCE,
        shards=(shard(0, per_dim=None), shard(1, rejects=False, per_dim=None)),
        counts={"rows_read": 82, "documents": 80, "rejects": 2},
        bytes={"float32": 960, "int8": 240, "ubinary": 80, "stored": 6000}, clipped_per_dim=(2, 4, 0),
        parent=2, version=3, writer="w" * 32, created_at="2026-11-23T00:00:00Z")
    fields.update(kw)
    return VersionManifest(**fields)


def test_version_manifest_round_trips_through_json_bytes():
    m = manifest()
    data = json.dumps(m.to_json()).encode()
    again = VersionManifest.from_json(data)
    assert again == m
    assert again.to_json() == m.to_json()
    assert again.number == 3 and again.rows == 80 and again.dim == 3
    assert [f.path for f in again.files()] == [
        m.shards[0].path, m.shards[0].index, m.shards[0].rejects.path, m.shards[1].path, m.shards[1].index]


def test_kept_scans_round_trip_with_their_marks_types_written_where_they_change():
    source = SourceSnapshot("s3://lake/raw", "text", "id", {"a.jsonl": {"size": 10**9, "version": "e1"},
                                                             "b.parquet": {"size": 10, "version": "e2"}})
    marks = ((0, 4194000, ("string", "string")), (9000, 8388000, ("string", "string")),
             (18000, 12582000, ("string", "int64")), (27000, 16776000, ("string", "int64")))
    scans = [ScanRef("a.jsonl", "scans/" + "1" * 32 + ".npy", H, 100, 30000, 29990, marks=marks),
             ScanRef("b.parquet", "scans/" + "2" * 32 + ".npy", H, 50, 5, 5, row_groups=(2, 3))]
    m = manifest(source=source, scans=tuple(scans))
    doc = json.loads(json.dumps(m.to_json()))
    assert doc["scans"][0]["marks"] == [[0, 4194000, ["string", "string"]], [9000, 8388000],
                                        [18000, 12582000, ["string", "int64"]], [27000, 16776000]]
    assert "marks" not in doc["scans"][1]
    again = VersionManifest.from_json(doc)
    assert again == m and again.kept_scans()["a.jsonl"].marks == marks and again.to_json() == m.to_json()
    assert again.kept_scans()["b.parquet"].marks is None


def test_build_sums_the_shards_and_keeps_per_dimension_counts_in_the_sidecars_only():
    built = VersionManifest.build(MODEL, RANGES, ("int8",), SOURCE, [shard(0), shard(1, rejects=False, per_dim=(0, 5, 1))],
                                  parent=2)
    assert built.precisions == ("int8", "ubinary")  # the index is built on ubinary: always stored
    assert built.counts == {"rows_read": 82, "documents": 80, "rejects": 2}
    # dim 3: a ubinary vector is its 3 bits packed into one byte
    assert built.bytes == {"float32": 80 * 3 * 4, "int8": 240, "ubinary": 80 * 1, "stored": 6000}
    assert built.clipped_per_dim == (1, 7, 1)
    assert all(s.clipped_per_dim is None for s in built.shards)
    assert [s.clipped for s in built.shards] == [3, 6]
    assert (built.version, built.writer, built.parent) == (None, None, 2)
    assert VersionManifest.from_json(built.to_json(), draft=True) == built
    empty = VersionManifest.build(MODEL, RANGES, ("ubinary",), SOURCE, [])
    assert empty.clipped_per_dim == (0, 0, 0) and empty.counts["documents"] == 0


def test_build_counts_the_bytes_of_the_precisions_stored_and_no_other():
    two = [shard(0), shard(1, rejects=False)]
    assert VersionManifest.build(MODEL, RANGES, ("ubinary",), SOURCE, two).bytes == \
        {"float32": 960, "ubinary": 80, "stored": 6000}  # no int8 column, no int8 size
    assert VersionManifest.build(MODEL, RANGES, ("uint8", "binary", "float16"), SOURCE, two).bytes == \
        {"float32": 960, "binary": 80, "float16": 480, "ubinary": 80, "uint8": 240, "stored": 6000}


def test_unknown_fields_of_a_later_format_are_kept():
    doc = manifest().to_json()
    doc["drift"] = {"clipped_share": 0.01}
    doc["shards"][0]["float16"] = "shards/x.f16"
    again = VersionManifest.from_json(doc).to_json()
    assert again["drift"] == {"clipped_share": 0.01} and again["shards"][0]["float16"] == "shards/x.f16"


def test_optional_fields_stay_absent_when_read_and_written_again():
    doc = manifest().to_json()
    for key in ("counts", "bytes", "clipped_per_dim", "created_at"):
        del doc[key]
    del doc["ranges"]["method"]
    del doc["source"]["files"], doc["source"]["format_counts"]
    for key in ("index_type", "source", "clipped", "stats"):
        del doc["shards"][1][key]
    del doc["shards"][0]["rejects"]["bytes"]
    m = VersionManifest.from_json(doc)
    assert m.to_json() == doc
    assert m.shards[1].index_class == "IndexBinaryFlat" and m.shards[1].rows_read == 40
    assert m.shards[0].files()[2].bytes is None and m.source.file_identities == {}


def test_shard_record_round_trips_with_its_per_dimension_counts():
    s = shard()
    assert ShardRecord.from_json(json.loads(json.dumps(s.to_json()))) == s
    assert sidecar_json(s) == {"format": "quantlake.shard/1", "record": s.to_json()}
    assert sidecar_json(s)["record"]["clipped_per_dim"] == [1, 2, 0]
    assert s.with_stats(write_s=1.5).stats == {"rows_read": 42, "encode_s": 0.5, "write_s": 1.5}
    assert s.rows_read == 42 and s.rejected == 2 and s.stat("missing") == 0.0


@given(st.text(min_size=1), st.integers(0, 10**12), st.integers(0, 10**6),
       st.lists(st.tuples(st.integers(0, 10**6), st.text(min_size=1), st.integers(0, 10**6)), max_size=5),
       st.none() | st.tuples(st.integers(0, 10**6), st.integers(1, 10**12),
                             st.lists(st.sampled_from(["string", "int64", "double"]), max_size=2).map(tuple)))
def test_work_unit_round_trips(relpath, size, start, dups, mark):
    unit = WorkUnit("f" * 32, SourceFile(relpath, size, "etag", "parquet"), start, start + 7,
                    tuple(Duplicate(*d) for d in dups), mark)
    assert WorkUnit.from_json(unit.to_json()) == unit
    assert unit.rows == 7 and unit.source == ShardSource(relpath, start, start + 7)


@pytest.mark.parametrize("change, field", [
    (lambda d: d.pop("model"), "model"),
    (lambda d: d["model"].pop("fingerprint"), "fingerprint"),
    (lambda d: d["model"].update(dim=0), "dim"),
    (lambda d: d["model"].update(normalize="yes"), "normalize"),
    (lambda d: d.pop("precisions"), "precisions"),
    (lambda d: d.update(precisions=["int8"]), "precisions"),
    (lambda d: d.update(precisions=["float8", "ubinary"]), "precisions"),
    (lambda d: d.update(shards={}), "shards"),
    (lambda d: d["shards"][0].update(rows=-1), "rows"),
    (lambda d: d["shards"][0].update(sha256="XYZ"), "sha256"),
    (lambda d: d["shards"][0].update(path="../../etc/passwd"), r"shards\[0\]\.path"),
    (lambda d: d["shards"][0].update(index="s3://other/x.faiss"), r"shards\[0\]\.index"),
    (lambda d: d["shards"][0].update(index_type="IndexFlatL2"), "index_type"),
    (lambda d: d["shards"][0].update(clipped=-3), "clipped"),
    (lambda d: d["shards"][0].update(stats={"encode_s": "slow"}), "stats"),
    (lambda d: d["shards"][1].update(path=d["shards"][0]["path"]), "listed twice"),
    (lambda d: d["shards"][0]["rejects"].update(path="/abs"), r"shards\[0\]\.rejects\.path"),
    (lambda d: d["ranges"].update(method="kmeans"), "method"),
    (lambda d: d["ranges"].update(path="ranges/../../x"), "ranges.path"),
    (lambda d: d.update(version=MAX_VERSION + 1), "version"),
    (lambda d: d.update(version=True), "version"),
    (lambda d: d.update(parent=3), "parent"),
    (lambda d: d.pop("writer"), "writer"),
    (lambda d: d.update(format="quantlake.version/9"), "format"),
    (lambda d: d.update(counts={"documents": -1}), "counts"),
    (lambda d: d.update(clipped_per_dim=[1.5]), "clipped_per_dim"),
    (lambda d: d["source"].update(files=[]), "source"),
    (lambda d: d["source"].update(format_counts={"parquet": "one"}), "source"),
])
def test_validation_names_the_field(change, field):
    doc = json.loads(json.dumps(manifest().to_json()))
    change(doc)
    with pytest.raises(ValueError, match=rf"^version 3.*{field}"):
        VersionManifest.from_json(doc, where="version 3")


@pytest.mark.parametrize("data", [b"", b"{", b"[]", b"null", b'"text"'])
def test_not_a_manifest(data):
    with pytest.raises(ValueError, match="^version 3"):
        VersionManifest.from_json(data, where="version 3")


def test_a_draft_has_no_number_until_committed():
    draft = manifest(version=None, writer=None, created_at=None)
    assert VersionManifest.from_json(draft.to_json(), draft=True) == draft
    with pytest.raises(ValueError, match="version is None"):
        VersionManifest.from_json(draft.to_json())
    with pytest.raises(ValueError, match="draft"):
        draft.number


def test_an_ingested_version_reads_back_to_the_bytes_on_disk(small_dataset):
    """What ingest committed is what the type writes: reading and writing again changes nothing."""
    from ranges.encoding import pretty_json

    raw = (small_dataset[0] / "versions" / "00000001.json").read_bytes()
    m = VersionManifest.from_json(raw)
    assert pretty_json(m.to_json()) == raw
    assert m.counts["documents"] == m.rows == sum(s.rows for s in m.shards) > 0
    assert m.source.format_counts == {"parquet": 2, "jsonl": 1}
    for s in m.shards:
        sidecar = json.loads((small_dataset[0] / "shards" / f"{s.id}.json").read_bytes())
        record = ShardRecord.from_json(sidecar["record"])
        assert record.clipped_per_dim is not None and sum(record.clipped_per_dim) == s.clipped
        assert record.to_json() == sidecar["record"]
