"""The typed records that flow between stages and into the lake: source files, work units, shard
records, version manifests (with their source snapshot).

Each record has one serialisation, `to_json` (a JSON-ready dict, or a string for a step's
row) and `from_json`, and validation lives in `from_json`: a manifest or a sidecar is input
like any other file, so a reader gets a well-formed record or a ValueError naming the field,
never a KeyError deep in search. Optional fields of the formats (docs/formats.md) stay
optional here: a record read and written again gives the same JSON.

Pure: no FAISS, Parquet or quantizer here, so readers of manifests (inspect, vacuum) load
none of them.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

from workers.lake.storage import check_relpath
from workers.vocab import BACKENDS, FLOAT16, INDEX_TYPES, MARK_TYPES, PRECISIONS, RANGE_METHODS, backend_of

VERSION_FORMAT = "quantlake.version/1"
SIDECAR_FORMAT = "quantlake.shard/1"
# Version numbers are zero-padded to 8 digits, so listing (which only counts 8-digit names)
# sees every one of them; a ninth digit would make a version nobody lists.
MAX_VERSION = 99_999_999
DEFAULT_INDEX_TYPE = INDEX_TYPES[0]

_SHARD_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_SCAN_PATH = re.compile(r"^scans/[0-9a-f]{32}\.npy$")


# ---------------------------------------------------------------------------------------------
# Checks every record uses


def _need(cond: bool, where: str, what: str) -> None:
    if not cond:
        raise ValueError(f"{where}: {what}")


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _is_hex64(v: Any) -> bool:
    return isinstance(v, str) and bool(_HEX64.match(v))


def _is_name(v: Any) -> bool:
    return isinstance(v, str) and bool(v.strip())


def _check_path(where: str, name: str, p: Any) -> None:
    try:
        check_relpath(p)
    except ValueError as exc:
        raise ValueError(f"{where}: {name}: {exc}") from None


def _loads(data: bytes | str, where: str) -> Any:
    try:
        return json.loads(data)
    except ValueError as exc:
        raise ValueError(f"{where}: not valid JSON ({exc})") from None
    except RecursionError:  # arrays or objects nested deeper than the parser's stack
        raise ValueError(f"{where}: not a manifest (JSON nested too deeply to read)") from None


def _counts(value: Any) -> tuple[int, ...] | None:
    return None if value is None else tuple(value)


# ---------------------------------------------------------------------------------------------
# Source side: files and work units


@dataclass(frozen=True)
class SourceFile:
    """One file of the source lake, identified by path, size and version (etag or mtime)."""

    relpath: str
    size: int
    version: str
    format: str  # "parquet" | "jsonl"

    def identity(self) -> dict[str, Any]:
        """What a version's source snapshot records of the file: a change to either is a new file."""
        return {"size": self.size, "version": self.version}

    def to_json(self) -> dict[str, Any]:
        return {"relpath": self.relpath, "size": self.size, "version": self.version, "format": self.format}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> "SourceFile":
        return cls(str(doc["relpath"]), int(doc["size"]), str(doc["version"]), str(doc["format"]))


@dataclass(frozen=True)
class Duplicate:
    """A row whose id an earlier row (by file path, then row) already holds: it goes to rejects."""

    row: int
    first_file: str
    first_row: int

    def detail(self) -> str:
        return f"same id as row {self.first_row} of {self.first_file}"


@dataclass(frozen=True)
class ShardSource:
    """The source rows a shard holds: rows [row_start, row_stop) of `file`."""

    file: str
    row_start: int
    row_stop: int

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "row_start": self.row_start, "row_stop": self.row_stop}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> "ShardSource":
        return cls(doc.get("file", ""), doc.get("row_start", 0), doc.get("row_stop", 0))


@dataclass(frozen=True)
class WorkUnit:
    """Rows [row_start, row_stop) of one source file: read and encoded as one list, written as one shard.

    Args:
        shard_id: the deterministic name of the shard it becomes (`workers.ingest.planning.shard_id`).
        file: the source file.
        row_start, row_stop: the row range.
        duplicates: rows of the range that go to rejects as duplicate ids.
        start: where to start reading an uncompressed JSON Lines file, as the scan found it:
            `(row, byte, column types)` of a line at or before `row_start`
            (`workers.ingest.source.Mark`); None: at the file's start.
    """

    shard_id: str
    file: SourceFile
    row_start: int
    row_stop: int
    duplicates: tuple[Duplicate, ...] = ()
    start: tuple[int, int, tuple[str, ...]] | None = None

    @property
    def rows(self) -> int:
        return self.row_stop - self.row_start

    @property
    def source(self) -> ShardSource:
        return ShardSource(self.file.relpath, self.row_start, self.row_stop)

    def describe(self) -> str:
        return f"work unit {self.file.relpath} rows [{self.row_start}, {self.row_stop}) (shard {self.shard_id})"

    def to_json(self) -> str:
        """One string: a step's row carries the unit in one field."""
        return json.dumps({"shard_id": self.shard_id, "file": self.file.to_json(), "row_start": self.row_start,
                           "row_stop": self.row_stop,
                           "duplicates": [[d.row, d.first_file, d.first_row] for d in self.duplicates],
                           "start": None if self.start is None else [*self.start[:2], list(self.start[2])]})

    @classmethod
    def from_json(cls, data: str | bytes) -> "WorkUnit":
        doc = _loads(data, "work unit")
        return cls(doc["shard_id"], SourceFile.from_json(doc["file"]), int(doc["row_start"]),
                   int(doc["row_stop"]), tuple(Duplicate(int(r), str(f), int(fr)) for r, f, fr in doc["duplicates"]),
                   None if doc.get("start") is None else (int(doc["start"][0]), int(doc["start"][1]),
                                                          tuple(str(t) for t in doc["start"][2])))


# ---------------------------------------------------------------------------------------------
# Shards


@dataclass(frozen=True)
class FileRef:
    """A data file a record points at: its path under the dataset root, size (None: not recorded) and sha256."""

    path: str
    bytes: int | None
    sha256: str


@dataclass(frozen=True)
class RejectsRef:
    """A shard's rejects file and how many rows it holds."""

    path: str
    rows: int
    sha256: str
    bytes: int | None = None  # absent from the first manifests

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": self.path, "rows": self.rows, "sha256": self.sha256}
        if self.bytes is not None:
            out["bytes"] = self.bytes
        return out


@dataclass(frozen=True)
class ShardRecord:
    """One shard as a version manifest (and the shard's sidecar) records it.

    Args:
        id: the shard id; its files are `shards/<id>.parquet`, `shards/<id>.faiss`, `rejects/<id>.parquet`.
        path, index: its Parquet file and FAISS binary index, relative to the dataset root.
        rows: documents in the shard.
        sha256, bytes, index_sha256, index_bytes: checksums and sizes of both files.
        rejects: its rejects file, or None.
        index_type: the FAISS class of the index (`workers.vocab.INDEX_TYPES`); None (absent) means flat.
        source: the source rows it holds (absent for records written by hand).
        clipped: values the ranges clipped, over the shard.
        clipped_per_dim: the same per dimension: in the sidecar; the manifest keeps only their sum.
        stats: per-shard timings and rows read (`rows_read`, `encode_s`, `quantize_s`, `write_s`).
        ubinary_scale: its Parquet holds the `ubinary_scale` column (per-vector sign-bit scales);
            False (absent) for shards written before the column existed.
        extra: fields of later formats, kept as read.
    """

    id: str
    path: str
    index: str
    rows: int
    sha256: str
    bytes: int
    index_sha256: str
    index_bytes: int
    rejects: RejectsRef | None = None
    index_type: str | None = None
    source: ShardSource | None = None
    clipped: int | None = None
    clipped_per_dim: tuple[int, ...] | None = None
    stats: Mapping[str, float] | None = None
    ubinary_scale: bool = False
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def index_class(self) -> str:
        return self.index_type or DEFAULT_INDEX_TYPE

    @property
    def rejected(self) -> int:
        return self.rejects.rows if self.rejects else 0

    @property
    def rows_read(self) -> int:
        return int((self.stats or {}).get("rows_read", self.rows + self.rejected))

    def stat(self, name: str) -> float:
        return float((self.stats or {}).get(name, 0.0))

    def files(self) -> list[FileRef]:
        """Every data file the shard references: Parquet, index, then rejects when it has some."""
        out = [FileRef(self.path, self.bytes, self.sha256), FileRef(self.index, self.index_bytes, self.index_sha256)]
        if self.rejects is not None:
            out.append(FileRef(self.rejects.path, self.rejects.bytes, self.rejects.sha256))
        return out

    def with_stats(self, **stats: float) -> "ShardRecord":
        return replace(self, stats={**(self.stats or {}), **stats})

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {**self.extra, "id": self.id, "path": self.path, "index": self.index,
                               "rows": self.rows, "sha256": self.sha256, "bytes": self.bytes,
                               "index_sha256": self.index_sha256, "index_bytes": self.index_bytes,
                               "rejects": self.rejects.to_json() if self.rejects else None}
        for key, value in (("index_type", self.index_type), ("clipped", self.clipped)):
            if value is not None:
                out[key] = value
        if self.source is not None:
            out["source"] = self.source.to_json()
        if self.clipped_per_dim is not None:
            out["clipped_per_dim"] = list(self.clipped_per_dim)
        if self.stats is not None:
            out["stats"] = dict(self.stats)
        if self.ubinary_scale:  # absent when False: an older record stays byte-identical
            out["ubinary_scale"] = True
        return out

    @classmethod
    def from_json(cls, doc: Any, at: str = "shard record", where: str | None = None,
                  name: str = "record", checked: bool = False) -> "ShardRecord":
        """Check and parse one record; `at` names it in messages, `where`/`name` in path errors.

        `checked`: `validate` has just checked it as part of its manifest (not checked twice).
        """
        if not checked:
            _check_shard(doc, at, where or at, name)
        rej = doc.get("rejects")
        return cls(
            id=doc["id"], path=doc["path"], index=doc["index"], rows=doc["rows"], sha256=doc["sha256"],
            bytes=doc["bytes"], index_sha256=doc["index_sha256"], index_bytes=doc["index_bytes"],
            rejects=None if rej is None else RejectsRef(rej["path"], rej["rows"], rej["sha256"], rej.get("bytes")),
            index_type=doc.get("index_type"),
            source=None if doc.get("source") is None else ShardSource.from_json(doc["source"]),
            clipped=doc.get("clipped"), clipped_per_dim=_counts(doc.get("clipped_per_dim")),
            stats=None if doc.get("stats") is None else dict(doc["stats"]),
            ubinary_scale=doc.get("ubinary_scale", False),
            extra={k: v for k, v in doc.items() if k not in _SHARD_KEYS})


_SHARD_KEYS = {"id", "path", "index", "rows", "sha256", "bytes", "index_sha256", "index_bytes", "rejects",
               "index_type", "source", "clipped", "clipped_per_dim", "stats", "ubinary_scale"}


def _check_shard(s: Any, at: str, where: str, name: str) -> None:
    """Raise ValueError naming the field when `s` is not a well-formed shard record."""
    _need(isinstance(s, dict), at, "not an object")
    _need(isinstance(s.get("id"), str) and bool(_SHARD_ID.match(s["id"])), at,
          f"id is {s.get('id')!r}, expected letters, digits, '-' or '_'")
    for key in ("rows", "bytes", "index_bytes"):
        _need(_is_count(s.get(key)), at, f"{key} is {s.get(key)!r}, expected a count")
    for key in ("sha256", "index_sha256"):
        _need(_is_hex64(s.get(key)), at, f"{key} is {s.get(key)!r}, expected 64 lowercase hex digits")
    _need(s.get("index_type", DEFAULT_INDEX_TYPE) in INDEX_TYPES, at,
          f"index_type is {s.get('index_type')!r}, expected one of {', '.join(INDEX_TYPES)}")
    src = s.get("source", {})
    _need(isinstance(src, dict) and all(_is_count(src.get(k, 0)) for k in ("row_start", "row_stop"))
          and isinstance(src.get("file", ""), str), at,
          f"source is {src!r}, expected {{file, row_start, row_stop}}")
    _need(s.get("clipped") is None or _is_count(s["clipped"]), at, f"clipped is {s.get('clipped')!r}, "
          "expected a count")
    per_dim = s.get("clipped_per_dim")
    _need(per_dim is None or (isinstance(per_dim, list) and all(map(_is_count, per_dim))), at,
          "clipped_per_dim must be a list of counts")
    stats = s.get("stats")
    _need(stats is None or (isinstance(stats, dict) and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) for x in stats.values())), at,
        "stats must map names to numbers")
    _need(isinstance(s.get("ubinary_scale", False), bool), at,
          f"ubinary_scale is {s.get('ubinary_scale')!r}, expected true or false")
    _check_path(where, f"{name}.path", s.get("path"))
    _check_path(where, f"{name}.index", s.get("index"))
    rej = s.get("rejects")
    if rej is not None:
        _need(isinstance(rej, dict) and _is_count(rej.get("rows")) and _is_hex64(rej.get("sha256"))
              and _is_count(rej.get("bytes", 0)), at, "rejects must be null or {path, rows, sha256, bytes}")
        _check_path(where, f"{name}.rejects.path", rej.get("path"))


def sidecar_path(shard_id: str) -> str:
    """`shards/<id>.json`: the shard's record, written after its data files (the mark of a complete shard)."""
    return f"shards/{shard_id}.json"


def sidecar_json(record: ShardRecord) -> dict[str, Any]:
    """A shard's sidecar document."""
    return {"format": SIDECAR_FORMAT, "record": record.to_json()}


# ---------------------------------------------------------------------------------------------
# Versions


@dataclass(frozen=True)
class ModelInfo:
    """The model a version was encoded with. `fingerprint` is the encoder's: the model files'
    hash, plus `+onnx` when onnxruntime ran it (`backend`)."""

    name: str
    fingerprint: str
    dim: int
    normalize: bool

    @property
    def backend(self) -> str:
        return backend_of(self.fingerprint)

    def to_json(self) -> dict[str, Any]:
        out = {"name": self.name, "fingerprint": self.fingerprint, "dim": self.dim, "normalize": self.normalize}
        if self.backend != "torch":  # absent means torch: what every version written before it holds
            out["backend"] = self.backend
        return out


@dataclass(frozen=True)
class RangesRef:
    """The range manifest a version was quantized with: its content id and path."""

    id: str
    path: str
    method: str | None = None  # absent from the first manifests: minmax

    def to_json(self) -> dict[str, Any]:
        out = {"id": self.id, "path": self.path}
        if self.method is not None:
            out["method"] = self.method
        return out


@dataclass(frozen=True)
class SourceSnapshot:
    """The source lake a version was built from.

    Args:
        url: where it was read (credentials masked).
        text_column, id_column: the columns read.
        files: relative path -> identity (`SourceFile.identity()`) of every file read.
        format_counts: files per format.
    """

    url: str
    text_column: str
    id_column: str | None = None
    files: Mapping[str, Mapping[str, Any]] | None = None
    format_counts: Mapping[str, int] | None = None

    @classmethod
    def of(cls, url: str, text_column: str, id_column: str | None, files: list[SourceFile]) -> "SourceSnapshot":
        counts: dict[str, int] = {}
        for f in files:
            counts[f.format] = counts.get(f.format, 0) + 1
        return cls(url, text_column, id_column, {f.relpath: f.identity() for f in files}, counts)

    @property
    def file_identities(self) -> Mapping[str, Mapping[str, Any]]:
        return self.files or {}

    def same_files(self, files: list[SourceFile]) -> bool:
        """Whether `files` (a listing) are exactly the files recorded, each with the identity recorded
        (size and version); False when none were recorded (a version written before they were)."""
        return self.files is not None and {f.relpath: dict(f.identity()) for f in files} == {
            k: dict(v) for k, v in self.files.items()}

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"url": self.url, "text_column": self.text_column, "id_column": self.id_column}
        if self.files is not None:
            out["files"] = {k: dict(v) for k, v in self.files.items()}
        if self.format_counts is not None:
            out["format_counts"] = dict(self.format_counts)
        return out


@dataclass(frozen=True)
class ScanRef:
    """A source file's kept scan (`scans/<id>.npy`): the digests of its valid rows' ids.

    Args:
        file: the source file's relative path (a key of the snapshot's files).
        path: the scan file, under the dataset root.
        sha256, bytes: the scan file's checksum and size.
        rows, valid: the file's rows, and those with a text and an id (the scan file's rows).
        row_groups: a Parquet file's row group sizes, which planning cuts units by (None: a
            JSON Lines file): with them a later job need not open the file to plan it.
        marks: an uncompressed JSON Lines file's marks, where its units start reading it
            (`workers.ingest.source.Mark`: `(row, byte, column types)`, in file order; none
            for a file of one segment), so that a unit deep in it need not parse it from its
            start when the kept scan stands in for the scan. None: another kind of file, or a
            record written before marks were kept.
    """

    file: str
    path: str
    sha256: str
    bytes: int
    rows: int
    valid: int
    row_groups: tuple[int, ...] | None = None
    marks: tuple[tuple[int, int, tuple[str, ...]], ...] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"file": self.file, "path": self.path, "sha256": self.sha256, "bytes": self.bytes,
                               "rows": self.rows, "valid": self.valid}
        if self.row_groups is not None:
            out["row_groups"] = list(self.row_groups)
        if self.marks is not None:
            # [row, byte], and the column types where they differ from the mark before's (a
            # 10 GB file has 2,500 marks, and its column types seldom change).
            out["marks"], types = [], None
            for row, byte, now in self.marks:
                out["marks"].append([row, byte] if now == types else [row, byte, list(now)])
                types = now
        return out

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> "ScanRef":
        marks = None
        if doc.get("marks") is not None:
            marks, types = [], ()
            for m in doc["marks"]:
                types = tuple(m[2]) if len(m) > 2 else types
                marks.append((m[0], m[1], types))
        return cls(doc["file"], doc["path"], doc["sha256"], doc["bytes"], doc["rows"], doc["valid"],
                   _counts(doc.get("row_groups")), None if marks is None else tuple(marks))


_SCAN_KEYS = {"file", "path", "sha256", "bytes", "rows", "valid"}
_VERSION_KEYS = {"format", "version", "parent", "writer", "created_at", "model", "ranges", "precisions",
                 "source", "shards", "counts", "bytes", "clipped_per_dim", "scans"}


def vector_bytes(precision: str, dim: int) -> int:
    """Bytes one `dim`-dimensional vector takes at `precision` (a name of PRECISIONS), or at float32:
    a byte a value for int8 and uint8, a bit packed into bytes for binary and ubinary, two for float16."""
    if precision in ("binary", "ubinary"):
        return (dim + 7) // 8
    return dim * {"int8": 1, "uint8": 1, FLOAT16: 2, "float32": 4}[precision]


@dataclass(frozen=True)
class VersionManifest:
    """One dataset version: model, ranges, precisions, source snapshot, shards and totals.

    A draft (not yet committed) has `version` and `created_at` unset and maybe no `writer`;
    `workers.lake.versions.commit` fills them. Build a new one with `VersionManifest.build`.

    Args:
        counts: `{rows_read, documents, rejects}`.
        bytes: `float32` (what the embeddings would take unquantized), one entry per stored
            precision (`precisions`: what its vectors take), and `stored` (what the shards take on
            storage, ids and indexes included).
        clipped_per_dim: values the ranges clipped, per dimension, over every shard.
        parent: the version this one was built on (None: the first).
        scans: each source file's kept scan, in file order (None: none kept, as in manifests
            written before scans were kept, or a dataset written from precomputed vectors).
        extra: fields of later formats, kept as read.
    """

    model: ModelInfo
    ranges: RangesRef
    precisions: tuple[str, ...]
    source: SourceSnapshot
    shards: tuple[ShardRecord, ...]
    counts: Mapping[str, int] | None = None
    bytes: Mapping[str, int] | None = None
    clipped_per_dim: tuple[int, ...] | None = None
    parent: int | None = None
    version: int | None = None
    writer: str | None = None
    created_at: str | None = None
    scans: tuple[ScanRef, ...] | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def build(cls, model: ModelInfo, ranges: RangesRef, precisions: tuple[str, ...], source: SourceSnapshot,
              shards: list[ShardRecord], parent: int | None = None,
              scans: list[ScanRef] | None = None) -> "VersionManifest":
        """A draft of the shards' version: totals summed from the records, per-dimension clip
        counts moved from the shards (their sidecars keep them) to the version's sum."""
        docs = sum(s.rows for s in shards)
        rejects = sum(s.rejected for s in shards)
        per_dim = None
        if shards and all(s.clipped_per_dim is not None for s in shards):
            per_dim = tuple(int(sum(c)) for c in zip(*(s.clipped_per_dim for s in shards)))
        elif not shards:
            per_dim = (0,) * model.dim
        dim = model.dim
        stored = tuple(sorted(set(precisions) | {"ubinary"}))
        return cls(
            model=model, ranges=ranges, precisions=stored, source=source,
            shards=tuple(replace(s, clipped_per_dim=None) for s in shards),
            counts={"rows_read": docs + rejects, "documents": docs, "rejects": rejects},
            bytes={"float32": docs * dim * 4, **{p: docs * vector_bytes(p, dim) for p in stored},
                   "stored": sum(s.bytes + s.index_bytes for s in shards)},
            clipped_per_dim=per_dim, parent=parent,
            scans=None if scans is None else tuple(sorted(scans, key=lambda r: r.file)))

    @property
    def number(self) -> int:
        """The version number (a draft has none)."""
        if self.version is None:
            raise ValueError("a draft version manifest has no number until it is committed")
        return self.version

    @property
    def dim(self) -> int:
        return self.model.dim

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)

    def count(self, name: str) -> int | None:
        return (self.counts or {}).get(name)

    def option(self, name: str) -> Any:
        """An ingest option the version records (`options` in the manifest), None when there is
        none. Options are not validated with the manifest: a reindex, which repeats them, checks
        each; any other reader must check the type of what it gets."""
        opts = self.extra.get("options")
        return opts.get(name) if isinstance(opts, dict) else None

    def files(self) -> list[FileRef]:
        """Every data file the version references: its shards' files and its kept scans."""
        return [f for s in self.shards for f in s.files()] + [FileRef(r.path, r.bytes, r.sha256)
                                                              for r in self.scans or ()]

    def kept_scans(self) -> dict[str, ScanRef]:
        """Source file path -> its kept scan."""
        return {r.file: r for r in self.scans or ()}

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {**self.extra, "format": VERSION_FORMAT, "model": self.model.to_json(),
                               "ranges": self.ranges.to_json(), "precisions": list(self.precisions),
                               "source": self.source.to_json(), "shards": [s.to_json() for s in self.shards],
                               "parent": self.parent}
        for key in ("counts", "bytes"):
            if getattr(self, key) is not None:
                out[key] = dict(getattr(self, key))
        if self.clipped_per_dim is not None:
            out["clipped_per_dim"] = list(self.clipped_per_dim)
        if self.scans is not None:
            out["scans"] = [r.to_json() for r in self.scans]
        for key in ("version", "writer", "created_at"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out

    @classmethod
    def from_json(cls, data: bytes | str | Mapping[str, Any], where: str = "version manifest",
                  draft: bool = False) -> "VersionManifest":
        """Check (see `validate`) and parse; `draft` accepts a manifest with no number or writer yet."""
        doc = data if isinstance(data, Mapping) else _loads(data, where)
        validate(doc, where, draft=draft)
        model, ranges, source = doc["model"], doc["ranges"], doc["source"]
        return cls(
            model=ModelInfo(model["name"], model["fingerprint"], model["dim"], model["normalize"]),
            ranges=RangesRef(ranges["id"], ranges["path"], ranges.get("method")),
            precisions=tuple(doc["precisions"]),
            source=SourceSnapshot(source["url"], source["text_column"], source.get("id_column"),
                                  source.get("files"), source.get("format_counts")),
            shards=tuple(ShardRecord.from_json(s, checked=True) for s in doc["shards"]),
            counts=doc.get("counts"), bytes=doc.get("bytes"), clipped_per_dim=_counts(doc.get("clipped_per_dim")),
            parent=doc.get("parent"), version=doc.get("version"), writer=doc.get("writer"),
            created_at=doc.get("created_at"),
            scans=None if doc.get("scans") is None else tuple(ScanRef.from_json(r) for r in doc["scans"]),
            extra={k: v for k, v in doc.items() if k not in _VERSION_KEYS})


def validate(doc: Any, where: str, draft: bool = False) -> None:
    """Raise ValueError naming the field when `doc` is not a well-formed version manifest.

    Every field a reader uses is checked here, once, so that a damaged or hostile manifest
    fails with its field named instead of a KeyError or TypeError deep in a reader. Besides
    types and checksums' shape, every stored path must be relative to the dataset root (no
    scheme, no leading `/`, no `..`): a manifest is input like any other file and must not
    make a reader open a file outside the dataset. Optional fields (`created_at`, `counts`,
    `bytes`, a shard's `source` and `index_type`) are checked when present. A `draft` may
    lack `version` and `writer`.
    """
    _need(isinstance(doc, Mapping), where, "a version manifest must be a JSON object")
    _need(doc.get("format", VERSION_FORMAT if draft else None) == VERSION_FORMAT, where,
          f"format is {doc.get('format')!r}, expected {VERSION_FORMAT!r}")
    v, parent = doc.get("version"), doc.get("parent")
    if not (draft and v is None):
        _need(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_VERSION, where, f"version is {v!r}")
    _need(parent is None or (isinstance(parent, int) and not isinstance(parent, bool) and 1 <= parent
                             and (v is None or parent < v)), where, f"parent {parent!r} is not an earlier version")
    if not draft or doc.get("writer") is not None:
        _need(isinstance(doc.get("writer"), str) and doc["writer"], where, "no writer token")
    _need(isinstance(doc.get("created_at", ""), str), where, f"created_at is {doc.get('created_at')!r}, "
          "expected an ISO-8601 string")
    model = doc.get("model")
    _need(isinstance(model, dict), where, f"model is {model!r}, expected {{name, fingerprint, dim, normalize}}")
    _need(_is_name(model.get("name")), where, f"model.name is {model.get('name')!r}, expected a model name")
    _need(_is_name(model.get("fingerprint")), where,
          f"model.fingerprint is {model.get('fingerprint')!r}, expected 'sha256:<hex>'")
    backend = model.get("backend", "torch")
    _need(backend in BACKENDS and backend == backend_of(model["fingerprint"]), where,
          f"model.backend is {backend!r} for fingerprint {model['fingerprint']!r}, expected "
          f"{backend_of(model['fingerprint'])!r} (the fingerprint ends in +onnx exactly for onnx)")
    dim = model.get("dim")
    _need(_is_count(dim) and dim > 0, where, f"model.dim is {dim!r}, expected a positive integer")
    _need(isinstance(model.get("normalize"), bool), where,
          f"model.normalize is {model.get('normalize')!r}, expected true or false")
    precisions = doc.get("precisions")
    _need(isinstance(precisions, list) and all(p in PRECISIONS for p in precisions)
          and len(set(precisions)) == len(precisions) and "ubinary" in precisions, where,
          f"precisions is {precisions!r}, expected distinct names of {', '.join(PRECISIONS)} including "
          "ubinary (the shard indexes are built on it)")
    source = doc.get("source")
    _need(isinstance(source, dict) and isinstance(source.get("url"), str)
          and _is_name(source.get("text_column"))
          and (source.get("id_column") is None or _is_name(source["id_column"]))
          and isinstance(source.get("files", {}), dict)
          and all(isinstance(i, dict) for i in source.get("files", {}).values())
          and (source.get("format_counts") is None or (isinstance(source["format_counts"], dict) and all(
              _is_count(c) for c in source["format_counts"].values()))), where,
          "source must be {url, text_column, id_column, files} with a URL, column names and an "
          "object of files")
    for key in ("counts", "bytes"):
        value = doc.get(key, {})
        _need(isinstance(value, dict) and all(_is_count(c) for c in value.values()), where,
              f"{key} is {value!r}, expected an object of counts")
    per_dim = doc.get("clipped_per_dim")
    _need(per_dim is None or (isinstance(per_dim, list) and all(map(_is_count, per_dim))), where,
          "clipped_per_dim must be a list of counts")
    ranges = doc.get("ranges")
    _need(isinstance(ranges, dict) and isinstance(ranges.get("id"), str), where, "no ranges id")
    _need(ranges.get("method", "minmax") in RANGE_METHODS, where,
          f"ranges.method is {ranges.get('method')!r}, expected one of {', '.join(RANGE_METHODS)}")
    _check_path(where, "ranges.path", ranges.get("path"))
    shards = doc.get("shards")
    _need(isinstance(shards, list), where, "shards is not a list")
    seen: set[str] = set()
    for i, s in enumerate(shards):
        _check_shard(s, f"{where}, shard {i}", where, f"shards[{i}]")
        _need(s["path"] not in seen, f"{where}, shard {i}", f"path {s['path']!r} is listed twice")
        seen.add(s["path"])
    scans = doc.get("scans")
    _need(scans is None or isinstance(scans, list), where, "scans is not a list")
    known = source.get("files")
    scanned: set[str] = set()
    for i, r in enumerate(scans or ()):
        at = f"{where}, scan {i}"
        _need(isinstance(r, dict) and _SCAN_KEYS <= set(r), at,
              f"expected an object with {', '.join(sorted(_SCAN_KEYS))}")
        _need(isinstance(r["file"], str) and (known is None or r["file"] in known), at,
              f"file {r['file']!r} is not a file of the source snapshot")
        _need(r["file"] not in scanned, at, f"file {r['file']!r} has two scans")
        scanned.add(r["file"])
        _check_path(at, "path", r["path"])
        _need(_SCAN_PATH.match(r["path"]) is not None, at, f"path {r['path']!r} is not scans/<32 hex digits>.npy")
        _need(_is_hex64(r["sha256"]), at, f"sha256 is {r['sha256']!r}, expected 64 hex digits")
        _need(all(_is_count(r[k]) for k in ("bytes", "rows", "valid")) and r["valid"] <= r["rows"], at,
              "bytes, rows and valid must be counts, with valid <= rows")
        groups = r.get("row_groups")
        _need(groups is None or (isinstance(groups, list) and all(_is_count(g) for g in groups)
                                 and sum(groups) == r["rows"]), at,
              f"row_groups is {groups!r}, expected null or a list of counts that add up to rows")
        _check_marks(r, at, (known or {}).get(r["file"]), 1 + (source.get("id_column") is not None))


def _check_marks(scan: Mapping[str, Any], at: str, identity: Mapping[str, Any] | None, columns: int) -> None:
    """A kept scan's `marks`, when present: `[row, byte]` or `[row, byte, types]`, the first with
    its types (one name of MARK_TYPES per column read, the text column's `string`), rows not
    decreasing and within the file's rows, bytes increasing, past the file's first and before
    its size."""
    marks = scan.get("marks")
    if marks is None:
        return
    _need(isinstance(marks, list), at, f"marks is {marks!r}, expected null or a list")
    size = identity.get("size") if identity is not None else None
    row = byte = 0
    for j, m in enumerate(marks):
        _need(isinstance(m, list) and len(m) in (2, 3) and _is_count(m[0]) and _is_count(m[1]), f"{at}, mark {j}",
              f"{m!r} is not [row, byte] or [row, byte, types]")
        _need(len(m) == 3 or j > 0, f"{at}, mark {j}", "the first mark must give the column types")
        _need(len(m) == 2 or (isinstance(m[2], list) and len(m[2]) == columns and m[2][0] == "string"
                              and all(t in MARK_TYPES for t in m[2])), f"{at}, mark {j}",
              f"types {m[-1]!r} are not {columns} of {', '.join(MARK_TYPES)}, the text's a string")
        _need(row <= m[0] <= scan["rows"], f"{at}, mark {j}", f"row {m[0]} is not in [{row}, {scan['rows']}]")
        _need(byte < m[1] and (not _is_count(size) or m[1] < size), f"{at}, mark {j}",
              f"byte {m[1]} is not past {byte} and before the file's size ({size})")
        row, byte = m[0], m[1]
