"""The source lake: list Parquet/JSON Lines files, check them, read row ranges as batches."""
from __future__ import annotations

import bisect
import contextlib
import fnmatch
import functools
import json
import os
import posixpath
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj
import pyarrow.parquet as pq

from workers.lake.records import SourceFile
from workers.lake.redact import redact_url
from workers.lake.storage import url_to_fs
from workers.vocab import MARK_TYPES

PARQUET_SUFFIXES = (".parquet", ".pq")
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
# JSON Lines files may be compressed as a whole (`part-0.jsonl.gz`): read through Arrow's stream
# codecs, named by the last suffix. A compressed file is read from its start by every unit; an
# uncompressed one from the scan's mark before the unit's first row (`Mark`).
COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd", ".zstd": "zstd", ".lz4": "lz4"}
READ_BATCH_ROWS = 4096


class SourceError(ValueError):
    """The source cannot be ingested as asked; the message names the file and column."""


class SourceChanged(SourceError):
    """A source file is no longer the one the job listed: rows read from it may not match its
    scan (ids the duplicate check never saw, rows past the counted end), so nothing from it
    may be committed."""


def _identity(info: Mapping[str, Any]) -> tuple[int, str]:
    """A file's (size, version) from its fsspec info: what the listing records of it
    (`SourceFile`), and what `unchanged` compares with that record."""
    return int(info.get("size") or 0), _version(info)


def _version(info: Mapping[str, Any]) -> str:
    for key in ("ETag", "etag", "md5Hash", "generation"):
        if info.get(key):
            return str(info[key]).strip('"')
    # HTTP's `Last-Modified` header as fsspec's HTTP filesystem gives it (a file served without
    # an ETag had no version, so one rewritten at its size passed for unchanged)
    mtime = (info.get("mtime") or info.get("LastModified") or info.get("last_modified") or info.get("created")
             or info.get("Last-Modified"))
    if hasattr(mtime, "isoformat"):
        return mtime.isoformat()
    if isinstance(mtime, str):
        return mtime
    return repr(float(mtime)) if mtime is not None else ""


def _format(name: str) -> str | None:
    lower = name.lower()
    if lower.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if posixpath.splitext(lower)[1] in COMPRESSIONS:
        lower = posixpath.splitext(lower)[0]
    if lower.endswith(JSONL_SUFFIXES):
        return "jsonl"
    return None


def _codec(f: SourceFile) -> str | None:
    """The codec a JSON Lines file is compressed with, by its name (None: not compressed)."""
    return COMPRESSIONS.get(posixpath.splitext(f.relpath.lower())[1]) if f.format == "jsonl" else None


def hidden(relpath: str) -> bool:
    """Whether a path under the source has a part whose name starts with `_` or `.` (`_SUCCESS`,
    `.crc`, a hidden folder): listing skips it, as Spark and Arrow do."""
    return any(part.startswith(("_", ".")) for part in relpath.split("/"))


def excluded(relpath: str, patterns: Sequence[str]) -> bool:
    """Whether a source file is left out by `--exclude` patterns: shell globs (`*`, `?`, `[...]`;
    `*` also crosses `/`), each matched against the file's path under the source, or, for a
    pattern without `/`, against its name alone (`*.json` leaves out every .json file,
    `metadata/*` everything under the top folder `metadata`). Case-sensitive."""
    name = posixpath.basename(relpath)
    return any(fnmatch.fnmatchcase(relpath if "/" in p else name, p) for p in patterns)


def list_source(url: str, storage_options: Mapping[str, Any] | None = None,
                exclude: Sequence[str] = ()) -> tuple[Any, str, list[SourceFile]]:
    """List the data files under `url` (recursively), sorted by relative path.

    Returns `(fs, root, files)`. A single file URL is a source of one file. Names starting
    with `_` or `.` (`_SUCCESS`, `.crc`, hidden folders) are skipped in a folder, as Spark and
    Arrow do (a file named on its own is read).
    JSON Lines files may be compressed (`COMPRESSIONS`: `part-0.jsonl.gz`). Files `exclude`
    matches (`excluded`) are left out.
    """
    fs, root = url_to_fs(url, storage_options)
    if not fs.exists(root):
        raise SourceError(f"source {redact_url(url)} does not exist")
    single = fs.isfile(root)  # a file named on its own is read whatever its name
    if single:
        infos = {root: fs.info(root)}
        root = posixpath.dirname(root)
    else:
        infos = _find(fs, root)
    files = []
    prefix = root.rstrip("/") + "/"
    for path, info in sorted(infos.items()):
        # The name under the root as the store spells it: `relpath` read an object store's key
        # `a//x.jsonl` as `a/x.jsonl`, which is not there, and `x/../a.jsonl` as another file's
        # name. Such a key (its parts are not a path's) is refused, naming it.
        rel = path[len(prefix):] if path.startswith(prefix) else posixpath.relpath(path, root)
        if {"", ".", ".."} & set(rel.split("/")) and not excluded(rel, exclude):
            raise SourceError(f"source file {rel!r} (under {redact_url(url)}) has an empty, '.' or '..' part in its "
                              "name, which a path reads as another file's: rename it (or leave it out with "
                              "--exclude)")
        if not single and hidden(rel):
            continue
        fmt = _format(rel)
        if fmt is None or excluded(rel, exclude):
            continue
        if info.get("type", "file") == "broken link":
            raise SourceError(f"source file {rel} is a symbolic link to {info.get('destination')}, which does not "
                              "exist: fix or remove the link (or leave it out with --exclude)")
        if info.get("type", "file") != "file":
            continue
        try:
            rel.encode("utf-8")
        except UnicodeEncodeError:
            raise SourceError(f"source file name {os.fsencode(rel)!r} is not UTF-8, which the version's manifest "
                              "(JSON) records and the default ids are made of: rename the file (or leave it out "
                              "with --exclude)") from None
        files.append(SourceFile(rel, *_identity(info), fmt))
    if not files:
        raise SourceError(f"source {redact_url(url)} holds no Parquet ({', '.join(PARQUET_SUFFIXES)}) "
                          f"or JSON Lines ({', '.join(JSONL_SUFFIXES)}, or those compressed: "
                          f"{', '.join(COMPRESSIONS)}) files" + (f" that --exclude {' '.join(exclude)} leaves in"
                                                                 if exclude else ""))
    return fs, root, files


def _find(fs, root: str) -> dict[str, dict[str, Any]]:
    """Every entry under `root` with its info, as `fs.find` lists them, symbolic links followed
    (local disk: fsspec lists a link as "other"): a link to a file is listed with the file's info
    under the link's path, a link to a folder is walked as a folder of the lake, unless it leads
    back into the lake or to a folder already walked (a file would be read twice). A link to
    nothing is listed as a "broken link"."""
    infos = fs.find(root, detail=True)
    if not any(info.get("islink") for info in infos.values()):
        return infos
    walked = [os.path.realpath(root)]
    out: dict[str, dict[str, Any]] = {}
    pending = [infos]
    while pending:
        for path, info in pending.pop().items():
            if not info.get("islink"):
                out[path] = info
                continue
            try:
                target = fs.info(path)  # follows the link
            except FileNotFoundError:
                out[path] = {**info, "type": "broken link"}
                continue
            if target.get("type") != "directory":
                out[path] = {**target, "name": path}
                continue
            real = os.path.realpath(path)
            if any(real == w or real.startswith(w + os.sep) or w.startswith(real + os.sep) for w in walked):
                continue
            walked.append(real)
            pending.append(fs.find(path, detail=True))
    return out


@contextlib.contextmanager
def unchanged(fs, root: str, f: SourceFile) -> Iterator[None]:
    """Read `f` inside this block: when the block ends (or fails), raise SourceChanged if the
    file's size or version is no longer what the listing found (replaced, appended to or removed
    since the job listed it, or while it was read). One metadata request per block."""
    try:
        yield
    except SourceChanged:
        raise
    except Exception as exc:
        try:
            _check_identity(fs, root, f, exc)
        except SourceChanged:
            raise
        except Exception:  # noqa: BLE001 - the read's own error says more than a failed look at the file
            pass
        raise
    _check_identity(fs, root, f, None)


def _check_identity(fs, root: str, f: SourceFile, cause: BaseException | None) -> None:
    path = posixpath.join(root, f.relpath)
    fs.invalidate_cache(path)  # an object store's listing cache would answer with the listed entry
    try:
        info = fs.info(path)
    except FileNotFoundError:
        now = "it is gone"
    else:
        size, version = _identity(info)
        if (size, version) == (f.size, f.version):
            return
        now = f"now {size} bytes, version {version}"
    raise SourceChanged(f"source file {f.relpath} changed while the job ran (listed at {f.size} bytes, "
                        f"version {f.version}; {now}); run the job again to read it as it is") from cause


def _open(fs, root: str, f: SourceFile):
    """`f` opened for reading as the store holds it now. fsspec keeps one filesystem object per
    URL and options, and an object store's keeps the folder listings it made: in a process that
    lists and reads the lake again (`reindex --watch`, every cycle; a long-lived Ray worker) the
    file would be looked up there, unknown if added since, or with the old ETag of a file
    rewritten since (s3fs then refuses the read)."""
    path = posixpath.join(root, f.relpath)
    fs.invalidate_cache(path)
    fh = fs.open(path, "rb")
    codec = _codec(f)
    return fh if codec is None else pa.CompressedInputStream(fh, codec)


def _open_parquet(fs, root: str, f: SourceFile) -> pq.ParquetFile:
    return pq.ParquetFile(_open(fs, root, f))


def check_file(fs, root: str, f: SourceFile, text_column: str, id_column: str | None) -> list[int] | None:
    """Open `f`, check that the columns exist with usable types.

    Returns the row counts of a Parquet file's row groups (work units follow them), None
    for JSON Lines. Raises SourceError naming the file and column. A JSON Lines file with no
    line at all (empty, or blank lines only) holds no rows and passes, as an empty Parquet
    file does; its columns are those of its first block (Arrow's inference).
    """
    try:
        if f.format == "parquet":
            pf = _open_parquet(fs, root, f)
            meta = pf.metadata
            schema, groups = pf.schema_arrow, [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        else:
            columns = [c for c in (text_column, id_column) if c is not None]
            schema, groups = _jsonl_schema(lambda: _open(fs, root, f), f, columns, text_column), None
            if schema is None:
                return None
    except SourceError:
        raise
    except Exception as exc:  # noqa: BLE001 - any parse failure means the file is unreadable
        raise SourceError(f"cannot read {f.format} file {f.relpath}: {exc}") from exc
    for role, column in (("text", text_column), ("id", id_column)):
        if column is None:
            continue
        if column not in schema.names:
            if f.format == "jsonl" and _holds_key(lambda: _open(fs, root, f), f, column, text_column):
                continue
            raise SourceError(f"file {f.relpath} has no {role} column {column!r} "
                              f"(columns: {', '.join(schema.names)}); pass --{role}-column")
        if len(schema.get_all_field_indices(column)) > 1:
            raise SourceError(f"file {f.relpath} has {len(schema.get_all_field_indices(column))} columns named "
                              f"{column!r}: which one holds the {role}s is not known; rename one of them")
    # A JSON Lines column first seen past the first block: its reader checks its values.
    text_type = schema.field(text_column).type if text_column in schema.names else pa.null()
    if not (_is_text(text_type) or pa.types.is_null(text_type)
            or (pa.types.is_dictionary(text_type) and _is_text(text_type.value_type))):
        raise SourceError(f"text column {text_column!r} of file {f.relpath} has type {text_type}; "
                          "it must hold strings")
    if id_column is not None and id_column in schema.names:
        id_type = schema.field(id_column).type
        try:  # what classify does to ids: refused here, before any work, if Arrow cannot do it
            pc.cast(pa.array([], id_type), pa.string())
        except (pa.ArrowNotImplementedError, pa.ArrowInvalid):
            raise SourceError(f"id column {id_column!r} of file {f.relpath} has type {id_type}; "
                              "it must hold strings or numbers") from None
    return groups


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _jsonl_schema(open_file, f: SourceFile, columns: list[str], text_column: str) -> pa.Schema | None:
    """The columns of a JSON Lines file's first block as Arrow infers them (None: no lines). When
    a key the job does not read trips Arrow's inference (a string on one line, an object on
    another; a key twice in one object), the job's own columns as the reader gives them
    instead: their presence is not checked then (a missing one is null on every row, so its
    rows go to rejects)."""
    try:
        with open_file() as fh:
            return pj.open_json(fh, read_options=pj.ReadOptions(block_size=JSONL_BLOCK, use_threads=False)).schema
    except pa.ArrowInvalid as exc:
        if _empty(exc):
            return None
        tripped = _CHANGED.search(str(exc)) or _TWICE.search(str(exc))
        # The reader takes what inference does not: other keys' trouble, an id of several types.
        if not (tripped and tripped.group(1) not in columns) and not _by_line(exc, {c: None for c in columns},
                                                                              text_column):
            raise _jsonl_error(f, exc, 0, text_column, open_file) from None
    for batch in _jsonl_batches(open_file, f, columns, text_column):
        return batch.schema
    return None


def _holds_key(open_file, f: SourceFile, column: str, text_column: str) -> bool:
    """Whether a line of a JSON Lines file holds a value for `column`, which its first block
    lacks (a writer that leaves out null keys: the first 4 MiB without ids, then ids). Reads up
    to the first such line: the whole file when there is none (a misspelt column)."""
    for batch in _jsonl_batches(open_file, f, [column], text_column if column == text_column else None):
        if batch.column(0).null_count < batch.num_rows:
            return True
    return False


class Mark(NamedTuple):
    """Where a segment of an uncompressed JSON Lines file starts (`_jsonl_segments`): its first
    row, the byte it starts at (a line's first), and the types the read that left it had found
    for its columns by then (names: `_TYPE_OF`), so that a read from the mark parses every
    segment as that read did, with the same parser, and gives its rows from that row on."""

    row: int
    byte: int
    types: tuple[str, ...] = ()


def mark_before(marks: Sequence[Sequence], row: int, types: tuple[str, ...] | None = None) -> Mark | None:
    """The last of `marks` (a file's, in file order) at or before `row`: where a read of the rows
    from `row` on may start; None: at the file's start. `types` replaces the mark's column types
    (a read of other columns: the text column alone is read as strings from any mark)."""
    at = bisect.bisect_right([m[0] for m in marks], row)
    if not at:
        return None
    m = marks[at - 1]
    return Mark(int(m[0]), int(m[1]), tuple(m[2]) if types is None else types)


def iter_batches(fs, root: str, f: SourceFile, columns: list[str], row_start: int = 0,
                 row_stop: int | None = None, text_column: str | None = None, start: Mark | None = None,
                 marks: list[Mark] | None = None) -> Iterator[tuple[int, pa.RecordBatch]]:
    """Stream rows [row_start, row_stop) of `f` as `(first row number, batch)` pairs.

    `text_column`, one of `columns`, must hold strings in a JSON Lines file (a line where it
    holds something else raises SourceError naming the line); the other columns may hold
    strings, numbers or booleans.

    An uncompressed JSON Lines file is read from `start` (a mark at or before `row_start` that
    an earlier read of the file appended to its `marks`: the scan's), not from its start: JSON
    Lines has no row index, and a unit deep in a large file parsed every row before it.
    """
    if f.format == "parquet":
        pf = _open_parquet(fs, root, f)
        groups, first, offset = [], None, 0
        # Only the row groups that overlap the range are read.
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if offset + n > row_start and (row_stop is None or offset < row_stop):
                groups.append(g)
                first = offset if first is None else first
            offset += n
        if not groups:
            return
        batches = pf.iter_batches(batch_size=READ_BATCH_ROWS, row_groups=groups, columns=columns)
        yield from _window(batches, first, row_start, row_stop)
    elif _codec(f) is None:
        at = start or Mark(0, 0)
        if at.row > row_start:
            raise ValueError(f"{f.relpath}: a read from row {row_start} cannot start at the mark of row {at.row}")
        yield from _window(_jsonl_segments(fs, root, f, columns, text_column, at, marks), at.row, row_start, row_stop)
    else:
        yield from _window(_jsonl_batches(lambda: _open(fs, root, f), f, columns, text_column), 0,
                           row_start, row_stop)


JSONL_BLOCK = 1 << 22
# An uncompressed JSON Lines file is parsed a segment at a time: the bytes from where the last
# one ended, JSONL_SEGMENT of them cut after their last line (a longer line: to its end), so
# where a segment starts depends on the bytes alone, whichever mark the read began at. Kept
# scans record marks at these starts: a change to them must change `scan.SCAN_FORMAT`.
JSONL_SEGMENT = JSONL_BLOCK
# Arrow's JSON reader parses without threads of its own (`use_threads=False`): with them, a read
# that stops before the file's end (a unit's last row) left a thread reading the Python file
# object, and the process aborted ("terminate called without an active exception") or hung
# when it exited. A read task is one CPU's work anyway, and this parser was as fast without them.
# What a JSON value's type becomes in Arrow when a column is read with an explicit type.
_JSON_TYPES = {"string": pa.string(), "number": pa.int64(), "boolean": pa.bool_()}
# Every type a column may be read with, by name (a mark records them).
_TYPE_OF = {name: pa.type_for_alias(name) for name in MARK_TYPES}
_CHANGED = re.compile(r"Column\(/(.+?)\) changed from (\w+) to (\w+)")
_TWICE = re.compile(r"Column\(/(.+?)\) was specified twice")
_NOT_CONVERTED = re.compile(r"Failed to convert JSON to (u?int64), couldn't parse:\s*(\S+)")
# What Arrow's stream codecs raise on bytes that are not what the file's name says.
_CORRUPT = re.compile(r"Truncated compressed stream|decompress failed|inflate failed")


def _jsonl_segments(fs, root: str, f: SourceFile, columns: list[str], text_column: str | None, at: Mark,
                    marks: list[Mark] | None) -> Iterator[pa.RecordBatch]:
    """The rows of an uncompressed JSON Lines file from mark `at` on, parsed a segment at a time
    (JSONL_SEGMENT), each as `_jsonl_batches` parses a file: the same rows, ids and errors (lines
    counted from the file's first) as one parse from the file's start, since a segment starts
    at a line's start and a value's string does not depend on the lines before it. Each
    segment's mark but the file's first is appended to `marks`. The column types one segment
    found go on to the next, so a file of number ids is not parsed twice per segment; a mark
    records them, as which of Arrow's parser and Python's (`_line_batches`) reads a segment
    depends on them, and the two differ at the edges (a line of only a form feed)."""
    types = {c: pa.string() for c in columns}
    if at.types:
        types = {c: _TYPE_OF[t] for c, t in zip(columns, at.types, strict=True)}
    row, byte = at.row, at.byte
    # One buffer for every segment (a fresh 4 MiB object per segment cost a quarter of the parse
    # in page faults); a line longer than a segment is read into bytes of its own.
    buf, held = bytearray(JSONL_SEGMENT), 0
    with _open(fs, root, f) as fh:
        if byte:
            # A mark from a record (a kept scan's) is checked as far as is cheap: at a line's start.
            fh.seek(byte - 1)
            if fh.read(1) not in (b"\n", b"\r"):
                raise ValueError(f"{f.relpath}: the mark of row {row} at byte {byte} is not at a line's start")
        while True:
            n = held + _read_into(fh, memoryview(buf)[held:])
            if n == 0:
                return
            data, cut = buf, n if n < JSONL_SEGMENT else _after_last_line(buf)
            if cut == 0:  # no line ends in the segment's bytes: it runs to the end of its line
                pieces = [bytes(buf)]
                while cut == 0:
                    more = fh.read(JSONL_SEGMENT)
                    end = _line_end(more)
                    cut = n if not more else n + end + 1 if end >= 0 else 0
                    pieces.append(more)
                    n += len(more)
                data = b"".join(pieces)
            segment = memoryview(data)[:cut]
            if marks is not None and byte:
                marks.append(Mark(row, byte, tuple(str(types[c]) for c in columns)))
            # The lines before the segment are counted only for an error that names a line.
            lines = 0 if byte == 0 else functools.partial(_lines_before, fs, root, f, byte)
            for batch in _jsonl_batches(lambda: pa.BufferReader(segment), f, columns, text_column, types, lines):
                row += batch.num_rows
                yield batch
            byte += cut
            held = n - cut  # the bytes read past the segment start the next one
            buf[:held] = data[cut:n]


def _after_last_line(window) -> int:
    """Where the bytes after `window`'s last line end start: after its last newline, else after
    its last carriage return (a file of old Mac line ends, which Arrow reads as lines); 0: none."""
    return (window.rfind(b"\n") + 1) or (window.rfind(b"\r") + 1)


def _line_end(data: bytes) -> int:
    """`data`'s first newline, else its first carriage return (as `_after_last_line`); -1: none."""
    end = data.find(b"\n")
    return end if end >= 0 else data.find(b"\r")


def _read_into(fh, view: memoryview) -> int:
    """Fill `view` from `fh`: its length, less only at the file's end."""
    got = 0
    while got < len(view) and (n := fh.readinto(view[got:])):
        got += n
    return got


def _lines_before(fs, root: str, f: SourceFile, byte: int) -> int:
    """The lines of `f` before byte `byte`, a line's start (lines end as `_lines` ends them)."""
    lines = 0
    cr = False  # the piece before ended with "\r": a "\n" starting this one ends the same line
    with _open(fs, root, f) as fh:
        while byte > 0 and (piece := fh.read(min(byte, JSONL_SEGMENT))):
            lines += piece.count(b"\n") + piece.count(b"\r") - piece.count(b"\r\n") - (cr and piece[:1] == b"\n")
            cr = piece[-1:] == b"\r"
            byte -= len(piece)
    return lines


def _line_number(base: int | Callable[[], int]) -> int:
    return base() if callable(base) else base


def _jsonl_batches(open_file, f: SourceFile, columns: list[str], text_column: str | None,
                   types: dict | None = None, line_base: int | Callable[[], int] = 0) -> Iterator[pa.RecordBatch]:
    """A JSON Lines file's rows, in the requested columns only, as batches (one per block).

    The columns are read with explicit types and every other key is ignored, so a key the job
    does not read cannot stop it, and a column's type does not hang on its first block (Arrow
    infers a type from the first block and refuses what differs later: a column that is null
    throughout the first 4 MiB and a string after it). Each column but the text starts as a
    string; where a line holds a number (or a number with a fraction, or a boolean) the file
    is read again with that type, skipping the rows already given: at most a few passes over
    the rows before the first such line. Ids Arrow cannot read as written (a string among
    numbers, an integer past 64 bits, one past 2**53 among fractions) are read on, from the
    first row not given, line by line (`_line_batches`). A line that cannot be parsed, or a
    text that is not a string, raises SourceError naming the file and the line (the line Arrow's
    row is on, blank lines counted, plus `line_base`: the lines before the bytes `open_file`
    gives, 0 at the file's start, or a call that counts them). An empty file gives no rows.
    `types`: the columns' types to start with (all strings when None), updated in place as they
    change.
    """
    types = {c: pa.string() for c in columns} if types is None else types
    given = 0
    for _ in range(3 * len(columns) + 1):
        schema = pa.schema([(c, types[c]) for c in columns])
        options = pj.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")
        rows = 0
        with open_file() as fh:
            try:
                reader = pj.open_json(fh, read_options=pj.ReadOptions(block_size=JSONL_BLOCK, use_threads=False),
                                      parse_options=options)
                while True:
                    try:
                        b = reader.read_next_batch()
                    except StopIteration:
                        return
                    skip = min(max(given - rows, 0), b.num_rows)
                    rows += b.num_rows
                    if skip < b.num_rows:
                        given += b.num_rows - skip
                        yield _exact_ids(b.slice(skip), types, text_column, f, given - (b.num_rows - skip),
                                         open_file)
            except _ByLine as turn:
                yield from _line_batches(open_file, f, columns, text_column, turn.row, line_base)
                return
            except pa.ArrowInvalid as exc:
                if _empty(exc):
                    return
                retyped = _retype(exc, types, text_column)
                if retyped is None and _by_line(exc, types, text_column):
                    yield from _line_batches(open_file, f, columns, text_column, given, line_base)
                    return
                if retyped is None:
                    raise _jsonl_error(f, exc, rows, text_column, open_file, line_base) from None
                types.update(retyped)
            except OSError as exc:
                if not _CORRUPT.search(str(exc)):
                    raise  # the store's own error (a network failure, a file gone): not the file's bytes
                raise SourceError(f"JSON Lines file {f.relpath} is not valid {_codec(f)} data after its first "
                                  f"{rows} line(s) ({exc}); recompress or remove it") from None
    raise SourceError(f"JSON Lines file {f.relpath}: the columns {', '.join(columns)} change type too often; "
                      "each must hold one type of value")


def _empty(exc: pa.ArrowInvalid) -> bool:
    return str(exc).startswith("Empty JSON stream")


def _retype(exc: pa.ArrowInvalid, types: dict, text_column: str | None) -> dict | None:
    """The column types to read again with, after Arrow refused a value of `exc`'s type; None
    when the value is not one a column may hold (a text that is not a string, an object, an
    array, a string in a column of numbers)."""
    m = _CHANGED.search(str(exc))
    if m:
        column, new = m.group(1), _JSON_TYPES.get(m.group(3))
        if column not in types or column == text_column or new is None or types[column] != pa.string():
            return None
        return {**types, column: new}
    failed = _NOT_CONVERTED.search(str(exc))
    if failed:  # a number the column's integer type cannot hold: after whole numbers, or too large
        ints = [c for c, t in types.items() if t == pa.int64() or t == pa.uint64()]
        if len(ints) == 1:
            value, big = failed.group(2), types[ints[0]] == pa.int64() and failed.group(2).isdigit()
            if big:  # past int64's range: uint64 holds it to 2**64 - 1
                return {**types, ints[0]: pa.uint64()}
            if re.fullmatch(r"-?\d+", value):  # beyond 64 bits: a float would change its digits
                return None
            return {**types, ints[0]: pa.float64()}
    return None


def _exact_ids(batch: pa.RecordBatch, types: dict, text_column: str | None, f: SourceFile, first: int,
               open_file) -> pa.RecordBatch:
    """`batch`, its number column of JSON numbers with fractions (read as float64) turned to
    the strings ids are: a whole number as an integer is written (`1e3` and `1000.0` are `1000`,
    as the id 1000 of a file of whole numbers is), another as Arrow writes a float (`2.5`). A
    whole number past 2**53 in such a column raises _ByLine: float64 holds only some of them, so
    the file is read on by `_line_batches`, which keeps an integer's digits. `first`: the
    batch's first row in the file."""
    column = next((c for c, t in types.items() if t == pa.float64() and c != text_column), None)
    if column is None:
        return batch
    col = batch.column(column)
    values = col.to_numpy(zero_copy_only=False)
    present = ~np.asarray(col.is_null().to_numpy(zero_copy_only=False), bool)
    whole = present & (values == np.floor(values))
    if (whole & (np.abs(values) >= 2.0 ** 53)).any():
        raise _ByLine(first)
    strings = pc.cast(col, pa.string()).to_pylist()
    for i in np.flatnonzero(whole):
        strings[i] = str(int(values[i]))
    return batch.set_column(batch.schema.get_field_index(column), column, pa.array(strings, pa.string()))


class _ByLine(Exception):
    """Arrow cannot read a JSON Lines file's ids as they are written: read on from row `row` with
    `_line_batches`."""

    def __init__(self, row: int):
        super().__init__(row)
        self.row = row


def _by_line(exc: pa.ArrowInvalid, types: dict, text_column: str | None) -> bool:
    """Whether Arrow refused an id `_line_batches` reads: a string among numbers (or the other
    way round, or booleans), or an integer that no 64-bit type holds (past 2**64 - 1, or a
    negative one among integers past 2**63 - 1)."""
    m = _CHANGED.search(str(exc))
    if m:
        return m.group(1) in types and m.group(1) != text_column and m.group(3) in _JSON_TYPES
    return _NOT_CONVERTED.search(str(exc)) is not None


def _line_batches(open_file, f: SourceFile, columns: list[str], text_column: str | None,
                  start: int, line_base: int | Callable[[], int] = 0) -> Iterator[pa.RecordBatch]:
    """A JSON Lines file's rows from row `start` on, parsed line by line with Python's JSON reader:
    for the rare file whose ids Arrow cannot read as written (`_by_line`). The same rows, and
    the same strings for the same values, as Arrow's path gives (an integer's digits, `true`,
    a float with a fraction as Arrow writes it, a whole one as an integer), in string columns;
    a whole float past 2**53 (`1e17`, `9007199254740993.0`) is refused naming its line, as it
    may stand for more than one integer. Bytes that are not UTF-8 stay as they are (the
    rejects' check finds them). Lines are counted after `line_base` (as `_jsonl_batches`)."""
    row = number = 0
    out: dict[str, list] = {c: [] for c in columns}

    def batch() -> pa.RecordBatch:
        arrays = []
        for c in columns:
            values = out[c]
            floats = [i for i, v in enumerate(values) if isinstance(v, float)]
            if floats:  # as Arrow writes a float64 as a string
                shown = pc.cast(pa.array([values[i] for i in floats], pa.float64()), pa.string()).to_pylist()
                for i, text in zip(floats, shown):
                    values[i] = text
            raw = [v.encode() if isinstance(v, str) else v for v in values]  # strings were encoded when read
            arrays.append(pa.array(raw, pa.binary()).view(pa.string()))
            out[c] = []
        return pa.RecordBatch.from_arrays(arrays, names=columns)

    def refuse(why: str) -> SourceError:
        return SourceError(f"JSON Lines file {f.relpath}: line {number + _line_number(line_base)} {why}")

    with open_file() as fh:
        for raw in _lines(fh):
            number += 1
            if _blank(raw):
                continue
            row += 1
            if row <= start:
                continue
            if number == 1 and line_base == 0:  # the file's first line: a UTF-8 byte order mark, as Arrow skips it
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            try:
                pairs = json.loads(raw.decode("utf-8", "surrogateescape"), object_pairs_hook=_Object,
                                   parse_float=_Float, parse_constant=_not_json)
            except ValueError as exc:
                raise refuse(f"is not a JSON object ({exc}); fix or remove that line") from None
            if not isinstance(pairs, _Object):
                raise refuse("is not a JSON object; fix or remove that line")
            keys = [k for k, _ in pairs]
            obj = dict(pairs)
            for c in columns:
                if keys.count(c) > 1:
                    raise refuse(f"holds the key {c!r} twice: which value is meant is not known; fix that line")
                v = obj.get(c)
                kind = _json_kind(v)
                if c == text_column and kind not in ("string", "null"):
                    raise refuse(f"holds a {kind} in the text column {c!r}; it must hold strings")
                if kind in ("object", "array"):
                    raise refuse(f"holds an {kind} in column {c!r}; ids must be strings, numbers or booleans")
                if isinstance(v, bool):
                    v = "true" if v else "false"
                elif isinstance(v, int):
                    v = str(v)
                elif isinstance(v, float) and v == int(v):
                    if abs(v) >= 2.0 ** 53:
                        raise refuse(f"holds the number {v.text} in column {c!r}, a whole number past 2**53 "
                                     "written as a float: it may stand for more than one integer; write the ids as "
                                     "strings or integers")
                    v = str(int(v))
                if isinstance(v, str):
                    try:  # the line's bytes that are not UTF-8 as they were (`_lines` decoded them so)
                        v = v.encode("utf-8", "surrogateescape")
                    except UnicodeEncodeError:  # a \u escape of half a surrogate pair: as Arrow's parser does
                        raise refuse(f"is not a JSON object (column {c!r} holds a \\u escape of half a surrogate "
                                     "pair); fix or remove that line") from None
                out[c].append(v)
            if len(out[columns[0]]) == READ_BATCH_ROWS:
                yield batch()
    if out[columns[0]]:
        yield batch()


def _not_json(name: str):
    """Python's reader takes NaN and Infinity, which are not JSON (Arrow's reader refuses them)."""
    raise ValueError(f"{name} is not a JSON value")


class _Object(list):
    """A JSON object as its (key, value) pairs, in order: a key twice is seen."""


class _Float(float):
    """A JSON number with a fraction or an exponent, as written."""

    def __new__(cls, text: str):
        value = super().__new__(cls, text)
        if value in (float("inf"), float("-inf")):  # as Arrow's parser refuses it
            raise ValueError(f"the number {text} is too large for a double")
        value.text = text
        return value


def _json_kind(v: Any) -> str:
    """A Python JSON value's type in Arrow's words."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, (int, float)):
        return "number"
    return {str: "string", _Object: "object", list: "array"}[type(v)]


def _line_of(open_file, row: int, line_base: int | Callable[[], int] = 0) -> int | str:
    """The line (from 1, after `line_base`) of a JSON Lines file's row `row` (from 0): Arrow counts
    rows, and skips blank lines. "a line after line N" when the file ends first (it changed meanwhile)."""
    n = lines = 0
    with open_file() as fh:
        for raw in _lines(fh):
            lines += 1
            if not _blank(raw):
                if n == row:
                    return lines + _line_number(line_base)
                n += 1
    return f"a line after line {lines + _line_number(line_base)}"


# Line ends as Arrow's JSON reader takes them: "\n", "\r\n", and "\r" alone (old Mac files).
_LINE_END = re.compile(rb"\r\n|\r|\n")


def _lines(fh) -> Iterator[bytes]:
    """The lines of a binary stream, without their ends (`_LINE_END`; a stream of one of Arrow's
    codecs has no line iterator)."""
    rest = b""
    while chunk := fh.read(1 << 20):
        data = rest + chunk
        held = data[-1:] == b"\r"  # the "\n" of a "\r\n" may start the next chunk
        parts = _LINE_END.split(data[:-1] if held else data)
        rest = parts.pop() + (b"\r" if held else b"")
        yield from parts
    if rest:
        yield rest.removesuffix(b"\r")


def _blank(line: bytes) -> bool:
    """Whether Arrow skips `line` as blank: JSON's whitespace only (a form feed is a row, refused)."""
    return not line.strip(b" \t")


def _jsonl_error(f: SourceFile, exc: pa.ArrowInvalid, rows: int, text_column: str | None, open_file,
                 line_base: int | Callable[[], int] = 0) -> SourceError:
    """The error naming the line of a JSON Lines file that Arrow refused (`rows`: the rows Arrow
    gave before the block it refused; `line_base`: the lines before the bytes `open_file` gives)."""
    first = str(exc).splitlines()[0]
    m = re.search(r"\bin row (\d+)", first)
    line = _line_of(open_file, rows + int(m.group(1)), line_base) if m else None
    at = (f"line {line}" if isinstance(line, int) else line or f"a line after line {_line_number(line_base) + rows}")
    first = re.sub(r"\s*\bin row \d+$", "", first)  # Arrow's row, counted from 0 within its block
    changed = _CHANGED.search(first)
    twice = _TWICE.search(first)
    if twice:
        return SourceError(f"JSON Lines file {f.relpath}: {at} holds the key {twice.group(1)!r} twice: which value "
                           "is meant is not known; fix that line")
    if changed and changed.group(1) == text_column:
        return SourceError(f"JSON Lines file {f.relpath}: {at} holds a {changed.group(3)} in the text column "
                           f"{text_column!r}; it must hold strings")
    if changed:
        return SourceError(f"JSON Lines file {f.relpath}: {at} holds a {changed.group(3)} in column "
                           f"{changed.group(1)!r}, where earlier lines hold a {changed.group(2)}; "
                           "fix or remove that line")
    head = b""  # a segment past the file's start has no byte order mark: the file is not opened for it
    if line_base == 0:
        with open_file() as fh:
            head = fh.read(4)
    if head[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return SourceError(f"JSON Lines file {f.relpath} is UTF-16 (it starts with a UTF-16 byte order mark): "
                           "JSON Lines must be UTF-8; convert it (e.g. iconv -f UTF-16 -t UTF-8)")
    return SourceError(f"JSON Lines file {f.relpath}: {at} is not a JSON object ({first}); "
                       "fix or remove that line")


def source_root(fs, root: str, f: SourceFile) -> str:
    """The folder `f.relpath` is relative to: the source's root, or its parent when the source
    URL is that one file (as `list_source` lists it)."""
    if posixpath.basename(root) == f.relpath and fs.isfile(root):
        return posixpath.dirname(root)
    return root


def _window(batches, first: int, row_start: int, row_stop: int | None):
    with contextlib.closing(batches):  # stopped early: its file is closed now, not at exit
        yield from _rows_in(batches, first, row_start, row_stop)


def _rows_in(batches, first: int, row_start: int, row_stop: int | None):
    offset = first
    for batch in batches:
        lo, hi = offset, offset + batch.num_rows
        offset = hi
        if hi <= row_start:
            continue
        if row_stop is not None and lo >= row_stop:
            break
        a = max(row_start - lo, 0)
        b = batch.num_rows if row_stop is None else min(row_stop - lo, batch.num_rows)
        yield lo + a, batch.slice(a, b - a)


@dataclass
class Rows:
    """One batch of source rows, classified: `reason[i]` is None for a row to encode."""

    file: SourceFile
    row: np.ndarray  # int64 row numbers in the file
    ids: list  # str | None
    texts: list  # str | None
    reason: list  # str | None


def classify(f: SourceFile, first_row: int, batch: pa.RecordBatch, text_column: str,
             id_column: str | None) -> Rows:
    """Derive ids and mark rows that cannot be encoded: null id, id or text that is not UTF-8
    (Arrow's readers do not check the bytes of a JSON string or a Parquet string column; such
    a value is kept in the rejects with U+FFFD where its bytes are invalid), null or blank text."""
    n = batch.num_rows
    rows = np.arange(first_row, first_row + n, dtype=np.int64)
    if text_column in batch.schema.names:
        texts, bad_texts = _strings(batch.column(text_column))
    else:  # a JSON Lines block where no line had the key
        texts, bad_texts = [None] * n, ()
    bad_ids: Any = ()
    if id_column is None:
        ids = [f"{f.relpath}:{r}" for r in rows.tolist()]
    elif id_column in batch.schema.names:
        ids, bad_ids = _strings(batch.column(id_column))
    else:
        ids = [None] * n
    reason = [
        "null_id" if i is None else "null_text" if t is None else "empty_text" if not t.strip() else None
        for i, t in zip(ids, texts)
    ]
    for i in bad_texts:
        reason[i] = "text_not_utf8" if ids[i] is not None else reason[i]
    for i in bad_ids:
        reason[i] = "id_not_utf8"
    return Rows(f, rows, ids, texts, reason)


def _strings(col: pa.Array) -> tuple[list, list[int]]:
    """`col` as Python strings (numbers and other types cast by Arrow), and the positions of the
    values whose bytes are not UTF-8, which come back decoded with U+FFFD for the bad bytes."""
    if pa.types.is_dictionary(col.type):
        col = col.dictionary_decode()
    try:
        if _is_text(col.type):
            return col.to_pylist(), []
        return pc.cast(col, pa.string()).to_pylist(), []
    except (UnicodeDecodeError, pa.ArrowInvalid):
        pass
    if _is_text(col.type):  # the same bytes, unchecked
        col = col.cast(pa.large_binary() if pa.types.is_large_string(col.type) else pa.binary())
    values, bad = [], []
    for i, raw in enumerate(col.to_pylist()):
        if raw is None:
            values.append(None)
            continue
        try:
            values.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            values.append(raw.decode("utf-8", "replace"))
            bad.append(i)
    return values, bad
