"""Every reader entry point against a corpus of hostile versions: a clear error, or the right answer.

Each variant tampers a private copy of the real `small_dataset` (its manifest, or a file it
lists, with checksums kept consistent so that only the new checks can catch it). Each entry
point (`open_version` reading everything, `Searcher.open` plus a search, `quantlake inspect`,
`quantlake vacuum --dry-run`) must either raise the expected error, naming what is wrong, or
work and return what the pristine dataset gives; never an IndexError, KeyError,
AttributeError or TypeError, and never a hang.
"""
from __future__ import annotations

import base64
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import inspect_dataset as inspect_job
from jobs import vacuum as vacuum_job
from workers.lake.dataset import IntegrityError, open_version
from workers.embedding.encoder import resolve_model
from workers.search.searcher import Searcher
from workers.ingest.shard_builder import build_index
from ranges.encoding import canonical_json, pretty_json, sha256_hex

pytestmark = pytest.mark.timeout(120)

MODEL = str(resolve_model(None))  # resolved once; Searcher.open only fingerprints it
TARGET = 1  # the shard tampered with: 40 rows of part-00000.parquet
QUERIES = np.random.default_rng(0).standard_normal((4, 384)).astype(np.float32)
QUERIES /= np.linalg.norm(QUERIES, axis=1, keepdims=True)


# ---------------------------------------------------------------------------------------------
# Tampering helpers (also used by test_reader_checks.py)


def manifest_of(dest: Path, n: int = 1) -> dict[str, Any]:
    return json.loads((dest / "versions" / f"{n:08d}.json").read_text())


def save_manifest(dest: Path, doc: Any, n: int = 1) -> None:
    (dest / "versions" / f"{n:08d}.json").write_text(json.dumps(doc))


def replace_index(dest: Path, shard: dict, data: bytes, index_type: str | None = None) -> None:
    """Write `data` as the shard's index and record its size and checksum (the manifest agrees)."""
    (dest / shard["index"]).write_bytes(data)
    shard.update(index_sha256=sha256_hex(data), index_bytes=len(data))
    if index_type:
        shard["index_type"] = index_type


def replace_table(dest: Path, shard: dict, table: pa.Table) -> None:
    """Write `table` as the shard's Parquet file and record its size and checksum."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    data = sink.getvalue().to_pybytes()
    (dest / shard["path"]).write_bytes(data)
    shard.update(sha256=sha256_hex(data), bytes=len(data))


def codes_of(dest: Path, shard: dict) -> np.ndarray:
    """The shard's ubinary codes, (rows, 48) uint8."""
    col = pq.read_table(dest / shard["path"], columns=["ubinary"])["ubinary"]
    return np.frombuffer(b"".join(col.to_pylist()), np.uint8).reshape(shard["rows"], -1)


def ivf_index(codes: np.ndarray, ids: np.ndarray) -> bytes:
    """A real IVF index over `codes`, labelled with `ids` instead of the row numbers."""
    quantizer = faiss.IndexBinaryFlat(codes.shape[1] * 8)
    index = faiss.IndexBinaryIVF(quantizer, codes.shape[1] * 8, 2)
    index.cp.min_points_per_centroid = 1
    index.train(codes)
    index.add_with_ids(codes, ids.astype(np.int64))
    return faiss.serialize_index_binary(index).tobytes()


def hnsw_index_with_link(codes: np.ndarray, link: int) -> bytes:
    """A real HNSW index over `codes` whose first graph link points at vector `link`."""
    index = faiss.IndexBinaryHNSW(codes.shape[1] * 8, 16)
    index.add(codes)
    links = faiss.vector_to_array(index.hnsw.neighbors)
    links[0] = link
    faiss.copy_array_to_vector(links, index.hnsw.neighbors)
    return faiss.serialize_index_binary(index).tobytes()


def replace_ranges(dest: Path, doc: dict, low: float, high: float) -> None:
    """A range manifest with every dimension's bounds set to [low; high], id consistent with it."""
    r = json.loads((dest / doc["ranges"]["path"]).read_text())
    dim = r["ranges"]["shape"][1]
    bounds = np.stack([np.full(dim, low, "<f4"), np.full(dim, high, "<f4")])
    r["ranges"]["base64"] = base64.b64encode(bounds.tobytes()).decode()
    r["id"] = sha256_hex(canonical_json({k: v for k, v in r.items() if k not in ("id", "created_at", "fidelity")}))
    (dest / "ranges" / f"{r['id']}.json").write_bytes(pretty_json(r))
    doc["ranges"].update(id=r["id"], path=f"ranges/{r['id']}.json")


# ---------------------------------------------------------------------------------------------
# The corpus


@dataclass(frozen=True)
class Expect:
    """What one entry point must do: `error` None means it works; else the exception type (or,
    for a command, the exit status) and a regex its message must match."""

    error: type[BaseException] | int | None = None
    match: str = ""


OK = Expect()


@dataclass(frozen=True)
class Variant:
    name: str
    tamper: Callable[[Path, dict], Any]  # changes files; returns the manifest to save (None: keep)
    expect: dict[str, Expect] = field(default_factory=dict)
    same_hits: bool = False  # works, and must answer exactly as the pristine dataset


def refused(match: str) -> dict[str, Expect]:
    """A manifest every reader refuses before reading anything else."""
    return {"open": Expect(ValueError, match), "search": Expect(ValueError, match),
            "inspect": Expect(2, match), "vacuum": Expect(2, match)}


def bad_file(error: type[BaseException], match: str) -> dict[str, Expect]:
    """A manifest that reads, naming a file whose content betrays it: readers of that file refuse."""
    return {"open": Expect(error, match), "search": Expect(error, match), "inspect": OK, "vacuum": OK}


FINE = {"open": OK, "search": OK, "inspect": OK, "vacuum": OK}


def _set(path: str, value: Any) -> Callable[[Path, dict], dict]:
    """Tamper one field (`a.b`, `shards.1.id`); a value of `...` deletes it."""
    def tamper(dest: Path, doc: dict) -> dict:
        *parents, last = path.split(".")
        obj = doc
        for p in parents:
            obj = obj[int(p)] if isinstance(obj, list) else obj[p]
        key = int(last) if isinstance(obj, list) else last
        if value is ...:
            del obj[key]
        else:
            obj[key] = value
        return doc
    return tamper


def _write_version(name: str, content: Callable[[dict], bytes]) -> Callable[[Path, dict], None]:
    def tamper(dest: Path, doc: dict) -> None:
        (dest / "versions" / name).write_bytes(content(doc))
    return tamper


def _renumbered(n: int) -> Callable[[dict], bytes]:
    return lambda doc: json.dumps({**doc, "version": n, "parent": 1 if n > 1 else None}).encode()


def _zero_shards(dest, doc):
    doc.update(shards=[], counts={"rows_read": 0, "documents": 0, "rejects": 0})
    return doc


def _wrong_index_class(dest, doc):
    s = doc["shards"][TARGET]
    replace_index(dest, s, build_index(codes_of(dest, s), 384, "IndexBinaryHNSW"))  # record says Flat
    return doc


def _ivf_labels_past_rows(dest, doc):
    s = doc["shards"][TARGET]
    replace_index(dest, s, ivf_index(codes_of(dest, s), np.arange(s["rows"]) + s["rows"]), "IndexBinaryIVF")
    return doc


def _ivf_labels_repeated(dest, doc):
    s = doc["shards"][TARGET]
    ids = np.arange(s["rows"])
    ids[-1] = 0
    replace_index(dest, s, ivf_index(codes_of(dest, s), ids), "IndexBinaryIVF")
    return doc


def _hnsw_link_past_rows(dest, doc):
    s = doc["shards"][TARGET]
    replace_index(dest, s, hnsw_index_with_link(codes_of(dest, s), s["rows"] + 5), "IndexBinaryHNSW")
    return doc


def _not_faiss(dest, doc):
    replace_index(dest, doc["shards"][TARGET], b"not a FAISS index at all")
    return doc


def _parquet_width(dest, doc):
    s = doc["shards"][TARGET]
    t = pq.read_table(dest / s["path"])
    narrow = pa.array([v[:376] for v in t["int8"].to_pylist()], pa.list_(pa.int8(), 376))
    replace_table(dest, s, t.set_column(t.schema.get_field_index("int8"), "int8", narrow))
    return doc


def _parquet_missing_int8(dest, doc):
    s = doc["shards"][TARGET]
    replace_table(dest, s, pq.read_table(dest / s["path"]).drop_columns(["int8"]))
    return doc


def _parquet_ubinary_width(dest, doc):
    s = doc["shards"][TARGET]
    t = pq.read_table(dest / s["path"])
    short = pa.array([v[:40] for v in t["ubinary"].to_pylist()], pa.binary(40))
    replace_table(dest, s, t.set_column(t.schema.get_field_index("ubinary"), "ubinary", short))
    return doc


def _not_parquet(dest, doc):
    s = doc["shards"][TARGET]
    data = b"PAR1 but not Parquet PAR1"
    (dest / s["path"]).write_bytes(data)
    s.update(sha256=sha256_hex(data), bytes=len(data))
    return doc


def _ranges(low, high):
    def tamper(dest, doc):
        replace_ranges(dest, doc, low, high)
        return doc
    return tamper


def _ranges_missing(dest, doc):
    (dest / doc["ranges"]["path"]).unlink()


def _sidecar(record_of: Callable[[dict, dict], dict]):
    """Rewrite the target shard's completion sidecar (readers must not care: they never read it)."""
    def tamper(dest, doc):
        s = doc["shards"][TARGET]
        path = dest / "shards" / f"{s['id']}.json"
        side = json.loads(path.read_text())
        side["record"] = record_of(side["record"], doc)
        path.write_bytes(pretty_json(side))
    return tamper


def _other_shards_files(record, doc):
    other = doc["shards"][TARGET + 1]
    return {**record, **{k: other[k] for k in ("path", "index", "sha256", "index_sha256", "bytes", "index_bytes")}}


VARIANTS = [
    Variant("missing_model", _set("model", ...), refused(r"model is None, expected")),
    Variant("model_not_object", _set("model", "all-MiniLM-L6-v2"), refused(r"model is 'all-MiniLM-L6-v2'")),
    Variant("missing_model_name", _set("model.name", ...), refused(r"model\.name is None")),
    Variant("model_dim_zero", _set("model.dim", 0), refused(r"model\.dim is 0, expected a positive integer")),
    Variant("model_dim_text", _set("model.dim", "384"), refused(r"model\.dim is '384'")),
    Variant("model_normalize_text", _set("model.normalize", "yes"), refused(r"model\.normalize is 'yes'")),
    Variant("missing_precisions", _set("precisions", ...), refused(r"precisions is None")),
    Variant("unknown_precision", _set("precisions", ["int4", "ubinary"]), refused(r"precisions is \['int4'")),
    Variant("precisions_without_ubinary", _set("precisions", ["int8"]), refused(r"including ubinary")),
    Variant("missing_source", _set("source", ...), refused(r"source must be \{url")),
    Variant("shards_not_list", _set("shards", {}), refused(r"shards is not a list")),
    Variant("shard_not_object", _set("shards.1", "shard"), refused(r"shard 1: not an object")),
    Variant("shard_id_number", _set("shards.1.id", 7), refused(r"shard 1: id is 7")),
    Variant("shard_id_with_slash", _set("shards.1.id", "../x"), refused(r"shard 1: id is '\.\./x'")),
    Variant("shard_source_text", _set("shards.1.source", "part-0"), refused(r"shard 1: source is 'part-0'")),
    Variant("shard_rows_text", _set("shards.1.rows", "40"), refused(r"shard 1: rows is '40', expected a count")),
    Variant("unknown_index_type", _set("shards.1.index_type", "IndexFlatL2"),
            refused(r"shard 1: index_type is 'IndexFlatL2'")),
    Variant("rejects_without_checksum", _set("shards.0.rejects.sha256", ...), refused(r"rejects must be null")),
    Variant("counts_not_object", _set("counts", [91]), refused(r"counts is \[91\]")),
    Variant("created_at_null", _set("created_at", None), refused(r"created_at is None")),
    Variant("parent_true", _set("parent", True), refused(r"parent True is not an earlier version")),
    Variant("unsafe_shard_path", _set("shards.1.path", "../outside.parquet"),
            refused(r"shards\[1\]\.path: unsafe path '\.\./outside\.parquet'")),
    Variant("unsafe_ranges_path", _set("ranges.path", "/etc/passwd"), refused(r"ranges\.path: unsafe path")),
    Variant("unsafe_rejects_path", _set("shards.0.rejects.path", "s3://elsewhere/r.parquet"),
            refused(r"shards\[0\]\.rejects\.path: unsafe path")),
    Variant("shard_listed_twice", lambda d, doc: {**doc, "shards": doc["shards"] + doc["shards"][1:2]},
            refused(r"is listed twice")),
    Variant("not_json", _write_version("00000001.json", lambda doc: b"{ not json"), refused(r"not valid JSON")),
    Variant("json_array", _write_version("00000001.json", lambda doc: b"[]"), refused(r"must be a JSON object")),
    Variant("latest_version_a_folder", lambda dest, doc: (dest / "versions" / "00000002.json").mkdir(),
            refused(r"version 2 \(versions/00000002\.json\): is a folder, not a manifest file")),
    # Digits of another script are no version number (`int` reads them; the name a version has
    # is ASCII): the file is foreign, version 1 the latest.
    Variant("version_name_fullwidth_digits", _write_version("\uff10" * 7 + "\uff12.json", _renumbered(2)), FINE,
            same_hits=True),
    Variant("version_zero", _write_version("00000000.json", _renumbered(0)), FINE, same_hits=True),
    # Options no ingest writes: only a reindex uses them (and refuses these, naming them).
    Variant("options_not_object", _set("options", "x"), FINE, same_hits=True),
    Variant("options_exclude_number", _set("options.exclude", 5), FINE, same_hits=True),
    Variant("json_nested_deep", _write_version("00000001.json", lambda doc: b"[" * 100_000),
            refused(r"version 1 .*: not a manifest \(JSON nested too deeply to read\)")),
    # A path spelt otherwise than its file's listed name: vacuum, comparing names, would delete
    # the file the version needs.
    Variant("ranges_path_with_dot", lambda dest, doc: _set("ranges.path", doc["ranges"]["path"].replace(
        "ranges/", "ranges/./"))(dest, doc), refused(r"ranges\.path: unsafe path 'ranges/\./")),
    Variant("shard_path_double_slash", lambda dest, doc: _set("shards.1.path", doc["shards"][1]["path"].replace(
        "shards/", "shards//"))(dest, doc), refused(r"shards\[1\]\.path: unsafe path 'shards//")),
    Variant("zero_shards", _zero_shards, FINE),
    Variant("wrong_index_class", _wrong_index_class,
            bad_file(IntegrityError, r"\.faiss .*is an IndexBinaryHNSW, the manifest says IndexBinaryFlat")),
    Variant("ivf_labels_past_rows", _ivf_labels_past_rows,
            bad_file(IntegrityError, r"\.faiss .*ids from 40 to 79 \(40 outside the shard's rows 0\.\.39\)")),
    Variant("ivf_labels_repeated", _ivf_labels_repeated, bad_file(IntegrityError, r"\.faiss .*each row once")),
    Variant("hnsw_link_past_rows", _hnsw_link_past_rows,
            bad_file(IntegrityError, r"\.faiss .*(out of range|outside the shard's rows)")),
    Variant("not_faiss", _not_faiss, bad_file(IntegrityError, r"\.faiss .*cannot be read as a FAISS binary index")),
    Variant("parquet_int8_width", _parquet_width,
            bad_file(IntegrityError, r"\.parquet .*column int8 is fixed_size_list<int8>\[376\], "
                                     r"expected fixed_size_list<int8>\[384\]")),
    Variant("parquet_ubinary_width", _parquet_ubinary_width,
            bad_file(IntegrityError, r"\.parquet .*column ubinary is fixed_size_binary\[40\], "
                                     r"expected fixed_size_binary\[48\]")),
    Variant("parquet_missing_int8", _parquet_missing_int8, bad_file(IntegrityError, r"column int8 is missing")),
    Variant("not_parquet", _not_parquet, bad_file(IntegrityError, r"\.parquet .*is not a readable Parquet file")),
    Variant("model_dim_mismatch", _set("model.dim", 256),
            bad_file(IntegrityError, r"ranges/.* holds 384-d ranges made with model .* \(sha256:[0-9a-f]+\), "
                                     r"not 256-d ")),
    Variant("model_fingerprint_mismatch", _set("model.fingerprint", "sha256:" + "0" * 64),
            bad_file(IntegrityError, r"ranges made with model .* \(sha256:[0-9a-f]+\), not 384-d .* \(sha256:0000")),
    Variant("huge_ranges", _ranges(-3e38, 3e38), bad_file(IntegrityError, r"wider than float32 can hold")),
    Variant("wide_finite_ranges", _ranges(-1e38, 1e38), FINE),
    Variant("ranges_missing", _ranges_missing, bad_file(FileNotFoundError, r"ranges/.*\.json of version 1 .*missing")),
    Variant("planted_99999999", _write_version("99999999.json", _renumbered(99_999_999)), FINE, same_hits=True),
    Variant("planted_99999999_garbage", _write_version("99999999.json", lambda doc: b"\x00garbage"),
            refused(r"version 99999999 \(versions/99999999\.json\): not valid JSON")),
    Variant("planted_100000000", _write_version("100000000.json", _renumbered(100_000_000)), FINE, same_hits=True),
    Variant("planted_00000000", _write_version("00000000.json", _renumbered(0)), FINE, same_hits=True),
    Variant("scans_not_list", _set("scans", {}), refused(r"scans is not a list")),
    Variant("scan_unsafe_path", _set("scans.0.path", "../outside.npy"), refused(r"scan 0: path: unsafe path")),
    Variant("scan_path_elsewhere", _set("scans.0.path", "shards/" + "0" * 32 + ".npy"),
            refused(r"scan 0: path 'shards/0+\.npy' is not scans/<32 hex digits>\.npy")),
    Variant("scan_of_unknown_file", _set("scans.0.file", "other.parquet"),
            refused(r"scan 0: file 'other\.parquet' is not a file of the source snapshot")),
    Variant("scan_valid_past_rows", _set("scans.0.valid", 10**9), refused(r"scan 0: .*valid <= rows")),
    Variant("scan_row_groups_short", _set("scans.0.row_groups", [1]),
            refused(r"scan 0: row_groups is \[1\], expected null or a list of counts that add up to rows")),
    Variant("scan_without_checksum", _set("scans.0.sha256", ...), refused(r"scan 0: expected an object with")),
    # A kept scan's marks (scans.0 is extra.jsonl's: 3 rows, 2 columns read) send a later job's
    # reads to a byte of the file: refused unless they are in order and within the file.
    Variant("scan_marks_not_list", _set("scans.0.marks", {"0": 1}),
            refused(r"scan 0: marks is \{'0': 1\}, expected null or a list")),
    Variant("scan_mark_short", _set("scans.0.marks", [[1]]),
            refused(r"scan 0, mark 0: \[1\] is not \[row, byte\] or \[row, byte, types\]")),
    Variant("scan_mark_negative_byte", _set("scans.0.marks", [[1, -5, ["string", "string"]]]),
            refused(r"scan 0, mark 0: \[1, -5, .* is not \[row, byte\]")),
    Variant("scan_mark_first_without_types", _set("scans.0.marks", [[1, 20]]),
            refused(r"scan 0, mark 0: the first mark must give the column types")),
    Variant("scan_mark_types_one_column", _set("scans.0.marks", [[1, 20, ["string"]]]),
            refused(r"scan 0, mark 0: types \['string'\] are not 2 of string, int64, uint64, double, bool")),
    Variant("scan_mark_types_without_id_column",
            lambda dest, doc: _set("scans.0.marks", [[1, 20, ["string", "string"]]])(
                dest, _set("source.id_column", None)(dest, doc)),
            refused(r"scan 0, mark 0: types \['string', 'string'\] are not 1 of")),
    Variant("scan_mark_text_not_string", _set("scans.0.marks", [[1, 20, ["int64", "string"]]]),
            refused(r"scan 0, mark 0: types .* the text's a string")),
    Variant("scan_mark_unknown_type", _set("scans.0.marks", [[1, 20, ["string", "date32"]]]),
            refused(r"scan 0, mark 0: types \['string', 'date32'\] are not 2 of")),
    Variant("scan_mark_rows_back", _set("scans.0.marks", [[2, 20, ["string", "string"]], [1, 30]]),
            refused(r"scan 0, mark 1: row 1 is not in \[2, 3\]")),
    Variant("scan_mark_past_rows", _set("scans.0.marks", [[4, 20, ["string", "string"]]]),
            refused(r"scan 0, mark 0: row 4 is not in \[0, 3\]")),
    Variant("scan_mark_bytes_back", _set("scans.0.marks", [[1, 20, ["string", "string"]], [2, 20]]),
            refused(r"scan 0, mark 1: byte 20 is not past 20 and before the file's size")),
    Variant("scan_mark_at_file_start", _set("scans.0.marks", [[0, 0, ["string", "string"]]]),
            refused(r"scan 0, mark 0: byte 0 is not past 0")),
    Variant("scan_mark_past_file", _set("scans.0.marks", [[1, 10**6, ["string", "string"]]]),
            refused(r"scan 0, mark 0: byte 1000000 is not past 0 and before the file's size \(\d+\)")),
    # Well formed: readers do not use marks (only a later ingest and search's source texts do).
    Variant("scan_marks_well_formed", _set("scans.0.marks", [[1, 20, ["string", "string"]], [1, 30], [3, 40]]),
            FINE, same_hits=True),
    # Readers never read a kept scan (only a later ingest does, checking it): they do not care.
    Variant("scan_file_missing", lambda dest, doc: (dest / doc["scans"][0]["path"]).unlink(), FINE, same_hits=True),
    Variant("sidecar_names_other_shard", _sidecar(_other_shards_files), FINE, same_hits=True),
    Variant("sidecar_unsafe_path", _sidecar(lambda r, doc: {**r, "path": "../../outside.parquet"}), FINE,
            same_hits=True),
]


@pytest.fixture(scope="module")
def corpus(small_dataset, tmp_path_factory):
    """Variant name -> its tampered copy of the dataset, built once (every entry point only reads)."""
    built: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("hostile")

    def get(v: Variant) -> Path:
        if v.name not in built:
            dest = root / v.name
            shutil.copytree(small_dataset[0], dest)
            doc = v.tamper(dest, manifest_of(dest))
            if doc is not None:
                save_manifest(dest, doc)
            built[v.name] = dest
        return built[v.name]
    return get


@pytest.fixture(scope="module")
def pristine(small_dataset):
    """(hits of QUERIES, every document id) of the untouched dataset."""
    with Searcher.open(str(small_dataset[0]), model=MODEL) as s:
        hits = s.search_vectors(QUERIES, k=3)
    v = open_version(str(small_dataset[0]))
    return hits, {i for s in v.shards for i in v.read_shard_table(s, columns=["id"])["id"].to_pylist()}


# ---------------------------------------------------------------------------------------------
# The entry points: each returns what it produced, or raises


def _open(dest: Path, variant: Variant, pristine) -> None:
    v = open_version(str(dest))
    ranges = v.read_ranges()
    assert ranges.dim == v.manifest.dim == 384
    rows = 0
    for s in v.shards:
        table, index = v.read_shard_table(s), v.read_index(s)
        assert table.num_rows == index.ntotal == s.rows
        assert table["ubinary"].type == pa.binary(48) and table["int8"].type.list_size == 384
        rows += table.num_rows
        v.read_rejects(s)
    assert rows == sum(s.rows for s in v.shards) == (0 if variant.name == "zero_shards" else 91)


def _search(dest: Path, variant: Variant, pristine) -> None:
    with Searcher.open(str(dest), model=MODEL) as s:
        hits = s.search_vectors(QUERIES, k=3)
    if variant.name == "zero_shards":
        assert hits == [[] for _ in QUERIES]
        return
    pristine_hits, ids = pristine
    assert [len(h) for h in hits] == [3] * len(QUERIES)
    assert all(h.id in ids and np.isfinite(h.score) for x in hits for h in x)
    if variant.same_hits:
        assert hits == pristine_hits


def _command(module, args):
    def run(dest: Path, variant: Variant, pristine, capsys) -> tuple[int, str, str]:
        status = module.main([str(dest), *args])
        out, err = capsys.readouterr()
        return status, out, err
    return run


ENTRIES = {"open": _open, "search": _search, "inspect": _command(inspect_job, []),
           "vacuum": _command(vacuum_job, ["--dry-run"])}


@pytest.mark.parametrize("entry", list(ENTRIES))
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_reader_entry_point_against_hostile_version(corpus, pristine, variant, entry, capsys):
    dest = corpus(variant)
    want = variant.expect[entry]
    if entry in ("open", "search"):
        if want.error is None:
            ENTRIES[entry](dest, variant, pristine)
        else:
            with pytest.raises(want.error, match=want.match) as caught:
                ENTRIES[entry](dest, variant, pristine)
            # A reader's own error, not a parser's: IndexError & co. are no ValueError anyway.
            assert "\n" not in str(caught.value)
        return
    status, out, err = ENTRIES[entry](dest, variant, pristine, capsys)
    if want.error is None:
        assert (status, err) == (0, ""), err
        latest = "99999999" if variant.name == "planted_99999999" else "1"
        if entry == "inspect":
            assert f"version {latest} (latest)" in out
            assert f"shards     {0 if variant.name == 'zero_shards' else 5}:" in out
        else:
            assert out.splitlines()[-1].startswith(f"vacuum {dest}: would delete")
            assert ", ".join(["1", "99999999"] if latest != "1" else ["1"]) in out.splitlines()[-1]
            foreign = {"version_name_fullwidth_digits": "\uff10" * 7 + "\uff12.json", "version_zero": "00000000.json"}
            if variant.name in foreign:  # reported and kept, like any name quantlake does not write
                assert f"kept versions/{foreign[variant.name]}: not a name quantlake writes" in out.splitlines()
        return
    assert status == want.error and out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"quantlake {entry}: error: "), err
    assert re.search(want.match, lines[0]), lines[0]

