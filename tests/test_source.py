"""Source listing and row-range reading, Parquet and JSON Lines alike."""
import json
import os
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from workers.ingest.source import (SourceChanged, SourceError, check_file, classify, iter_batches, list_source,
                                   unchanged)


@pytest.fixture
def lake(tmp_path):
    (tmp_path / "y=1").mkdir()
    pq.write_table(pa.table({"text": [f"p{i}" for i in range(25)], "id": list(range(25))}),
                   tmp_path / "y=1" / "a.parquet", row_group_size=4)
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": f"j{i}", "id": i}) + "\n" for i in range(25)))
    (tmp_path / "_SUCCESS").write_text("")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "c.parquet").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not data")
    return tmp_path


def test_listing_is_recursive_sorted_and_skips_markers(lake):
    fs, root, files = list_source(str(lake))
    assert [(f.relpath, f.format) for f in files] == [("b.jsonl", "jsonl"), ("y=1/a.parquet", "parquet")]
    assert all(f.size > 0 and f.version for f in files)
    fs, root, one = list_source(str(lake / "b.jsonl"))
    assert [f.relpath for f in one] == ["b.jsonl"] and root == str(lake)


def test_symbolic_links_are_followed_once(tmp_path):
    """fsspec lists a link as neither file nor folder: such files were skipped without a word (a
    file a dedup tool replaced by a link to the same bytes left the next version)."""
    elsewhere, lake = tmp_path / "elsewhere", tmp_path / "lake"
    (elsewhere / "more").mkdir(parents=True)
    lake.mkdir()
    for path, text in ((elsewhere / "a.jsonl", "a"), (elsewhere / "more" / "b.jsonl", "b"), (lake / "c.jsonl", "c")):
        path.write_text(json.dumps({"text": text, "id": text}) + "\n")
    os.symlink(elsewhere / "a.jsonl", lake / "a.jsonl")
    os.symlink(elsewhere / "more", lake / "more")
    os.symlink(elsewhere / "more", lake / "again")  # the same folder twice: walked once
    os.symlink(lake, lake / "loop")  # back into the lake: not walked
    fs, root, files = list_source(str(lake))
    assert [(f.relpath, f.size) for f in files] == [("a.jsonl", 25), ("again/b.jsonl", 25), ("c.jsonl", 25)]
    got = {f.relpath: [r[2] for r in _read_all(lake / f.relpath)] for f in files}
    assert got == {"a.jsonl": ["a"], "again/b.jsonl": ["b"], "c.jsonl": ["c"]}
    with unchanged(fs, root, files[0]):
        pass  # the link's identity is its file's, as listed
    os.symlink(tmp_path / "nowhere.jsonl", lake / "gone.jsonl")
    with pytest.raises(SourceError, match=r"^source file gone\.jsonl is a symbolic link to .*nowhere\.jsonl, which "
                                          r"does not exist: fix or remove the link \(or leave it out with "
                                          r"--exclude\)$"):
        list_source(str(lake))
    assert [f.relpath for f in list_source(str(lake), exclude=("gone.*",))[2]] == [f.relpath for f in files]


def test_a_file_name_that_is_not_utf8_is_refused_by_name(tmp_path):
    (tmp_path / "ok.jsonl").write_text(json.dumps({"text": "t"}) + "\n")
    os.close(os.open(os.path.join(os.fsencode(tmp_path), b"caf\xe9.jsonl"), os.O_CREAT | os.O_WRONLY))
    with pytest.raises(SourceError, match=r"^source file name b'caf\\xe9\.jsonl' is not UTF-8, which the version's "
                                          r"manifest \(JSON\) records .*: rename the file"):
        list_source(str(tmp_path))
    assert [f.relpath for f in list_source(str(tmp_path), exclude=("caf*",))[2]] == ["ok.jsonl"]


@pytest.mark.parametrize("patterns, left", [
    ((), ["b.jsonl", "y=1/a.parquet", "y=1/z.jsonl"]),
    (("*.jsonl",), ["y=1/a.parquet"]),  # no /: the name alone, at any depth
    (("y=1/*",), ["b.jsonl"]),  # with /: the path under the source; * crosses folders
    (("y=1/*.parquet", "b.*"), ["y=1/z.jsonl"]),
    (("a.parquet", "[by]*"), ["y=1/z.jsonl"]),  # "[by]*" takes b.jsonl by name; a.parquet by name too
    (("B.JSONL", "y=2/*"), ["b.jsonl", "y=1/a.parquet", "y=1/z.jsonl"]),  # case-sensitive; no match
])
def test_exclude_patterns_leave_files_out(lake, patterns, left):
    (lake / "y=1" / "z.jsonl").write_text(json.dumps({"text": "t", "id": 1}) + "\n")
    assert [f.relpath for f in list_source(str(lake), exclude=patterns)[2]] == left


def test_a_source_whose_every_file_is_excluded_says_so(lake):
    with pytest.raises(SourceError, match=r"holds no Parquet .* files that --exclude \*\.jsonl y=1/\* leaves in$"):
        list_source(str(lake), exclude=("*.jsonl", "y=1/*"))


@pytest.mark.parametrize("index", [0, 1])
@pytest.mark.parametrize("start, stop", [(0, None), (3, 11), (8, 9), (20, 25), (24, 40)])
def test_row_ranges(lake, index, start, stop):
    fs, root, files = list_source(str(lake))
    f = files[index]
    got = []
    for first, batch in iter_batches(fs, root, f, ["text", "id"], start, stop):
        rows = classify(f, first, batch, "text", "id")
        got += list(zip(rows.row.tolist(), rows.ids, rows.texts))
    prefix = "j" if f.format == "jsonl" else "p"
    want = [(i, str(i), f"{prefix}{i}") for i in range(start, min(stop or 25, 25))]
    assert got == want  # ids of another type are cast to strings


def test_derived_ids_name_file_and_row(lake):
    fs, root, files = list_source(str(lake))
    (first, batch), = list(iter_batches(fs, root, files[1], ["text"], 5, 7))
    assert classify(files[1], first, batch, "text", None).ids == ["y=1/a.parquet:5", "y=1/a.parquet:6"]


def test_missing_source(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        list_source(str(tmp_path / "none"))


def _jsonl(path, records, pad: int = 0) -> None:
    """JSON Lines with `pad` characters of an unread key per line (to push rows past a 4 MiB block)."""
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps({**r, "pad": "x" * pad} if pad else r) + "\n")


def _read_all(path, columns=("text", "id"), text="text", id_column="id"):
    fs, root, [f] = list_source(str(path))
    out = []
    for first, batch in iter_batches(fs, root, f, list(columns), text_column=text):
        rows = classify(f, first, batch, text, id_column)
        out += list(zip(rows.row.tolist(), rows.ids, rows.texts, rows.reason))
    return out


def test_jsonl_columns_that_are_null_for_the_first_block_are_read(tmp_path):
    """Arrow fixes a JSON column's type from the first block: a text and an id null throughout the
    first 4 MiB and set after it were refused as 'not a JSON object'; they are read, the nulls
    going to rejects, the ids as the strings they would be had the first block held them."""
    records = [{"id": None if i < 25 else i, "text": None} for i in range(50)]
    records += [{"id": 100 + i, "text": f"text {i}"} for i in range(5)]
    _jsonl(tmp_path / "x.jsonl", records, pad=100_000)
    assert (tmp_path / "x.jsonl").stat().st_size > 1 << 22
    fs, root, [f] = list_source(str(tmp_path / "x.jsonl"))
    assert check_file(fs, root, f, "text", "id") is None
    got = _read_all(tmp_path / "x.jsonl")
    assert [r[3] for r in got] == ["null_id"] * 25 + ["null_text"] * 25 + [None] * 5
    assert got[50:] == [(50 + i, str(100 + i), f"text {i}", None) for i in range(5)]
    assert [r[1] for r in got[25:50]] == [str(i) for i in range(25, 50)]


@pytest.mark.parametrize("ids, want", [
    ([1, 2, 3], ["1", "2", "3"]),
    (["a", None, "c"], ["a", None, "c"]),
    ([1, 2.5, 3], ["1", "2.5", "3"]),
    ([True, False, None], ["true", "false", None]),
])
def test_jsonl_ids_of_any_scalar_type_become_strings(tmp_path, ids, want):
    _jsonl(tmp_path / "x.jsonl", [{"id": i, "text": f"t{n}"} for n, i in enumerate(ids)])
    assert [r[1] for r in _read_all(tmp_path / "x.jsonl")] == want


@pytest.mark.parametrize("ids, want", [
    ([1, 2 ** 63, 2 ** 64 - 1, 0], ["1", str(2 ** 63), str(2 ** 64 - 1), "0"]),  # past int64: uint64
    ([-5, 9_007_199_254_740_993], ["-5", "9007199254740993"]),  # whole numbers only: exact
    ([1000, 2.5, 1e3, 1000.0, 1e15, -0.0, None], ["1000", "2.5", "1000", "1000", "1000000000000000", "0", None]),
])
def test_jsonl_number_ids_keep_their_digits(tmp_path, ids, want):
    """A number id reads as the integer written: once a file's ids were read as floats (a fraction
    among them), 2**64 and 2**64 + 1, or 2**53 and 2**53 + 1, became one id, and 1000 in one file
    was not 1e+03 in another."""
    _jsonl(tmp_path / "x.jsonl", [{"id": i, "text": f"t{n}"} for n, i in enumerate(ids)])
    assert [r[1] for r in _read_all(tmp_path / "x.jsonl")] == want


@pytest.mark.parametrize("ids, want", [
    ([1, 2 ** 64, 2 ** 64 + 1], ["1", str(2 ** 64), str(2 ** 64 + 1)]),  # past 64 bits
    ([2 ** 63, -1], [str(2 ** 63), "-1"]),  # no 64-bit integer type holds both
    ([0.5, 2, 2 ** 53 + 1, 2e3], ["0.5", "2", "9007199254740993", "2000"]),  # float64 holds no 2**53 + 1
    (["a", 5, True, None, 2.5, "b"], ["a", "5", "true", None, "2.5", "b"]),  # a string among numbers
])
def test_jsonl_ids_arrow_cannot_read_as_written_are_read_line_by_line(tmp_path, ids, want):
    """Arrow reads a JSON column as one type, and numbers as 64-bit integers or floats: such a
    file is read on line by line, the rows before as Arrow gave them."""
    path = tmp_path / "x.jsonl"  # a first line, a blank one, then the ids from line 3
    path.write_text('{"id": 7, "text": "t"}\n\n' + "".join(json.dumps({"id": i, "text": "t"}) + "\n" for i in ids))
    fs, root, [f] = list_source(str(path))
    assert check_file(fs, root, f, "text", "id") is None  # Arrow's inference of the first block refused it
    assert [r[1] for r in _read_all(path)] == ["7"] + want


def test_a_utf8_byte_order_mark_is_skipped_by_the_line_by_line_reader_too(tmp_path):
    """Arrow skips it; Python's parser refused the file's first line when its ids sent the file
    to the line-by-line reader from the first row (a string, then a number)."""
    (tmp_path / "x.jsonl").write_bytes(b'\xef\xbb\xbf{"id": "a", "text": "x"}\n{"id": 5, "text": "y"}\n')
    assert [r[:3] for r in _read_all(tmp_path / "x.jsonl")] == [(0, "a", "x"), (1, "5", "y")]


def test_a_jsonl_file_read_line_by_line_from_its_middle_gives_every_row_once(tmp_path):
    records = [{"id": i, "text": f"text {i} " + "x" * 200} for i in range(30_000)]  # past a 4 MiB block
    records[25_000]["id"] = "a string"
    records[29_000]["id"] = 2 ** 70
    _jsonl(tmp_path / "x.jsonl", records)
    got = _read_all(tmp_path / "x.jsonl")
    assert [r[0] for r in got] == list(range(30_000))
    assert [r[1] for r in got] == [str(r["id"]) for r in records] and got[-1][2] == records[-1]["text"]


@pytest.mark.parametrize("packed", [False, True])
def test_a_jsonl_unit_deep_in_a_file_reads_the_rows_a_whole_read_gives_there(tmp_path, packed):
    """A unit skips the rows before it as bytes: the same rows as a read of the whole file, blank
    lines, CRLF endings, a last line without its newline and ids read line by line included."""
    lines = []
    for i in range(50_000):
        lines.append(json.dumps({"id": "a string" if i == 40_000 else i, "text": f"text {i} " + "x" * (i % 150)}))
        if i % 997 == 0:
            lines += ["", "  \t"]
    raw = "\r\n".join(lines).encode()
    path = tmp_path / ("x.jsonl.gz" if packed else "x.jsonl")
    path.write_bytes(_compressed(raw, "gzip") if packed else raw)
    fs, root, [f] = list_source(str(path))

    def rows(start, stop):  # as the job takes them: classified, ids as strings
        got = [classify(f, first, b, "text", "id")
               for first, b in iter_batches(fs, root, f, ["text", "id"], start, stop, "text")]
        return [(r, i, t) for c in got for r, i, t in zip(c.row.tolist(), c.ids, c.texts)]
    whole = rows(0, None)
    assert len(whole) == 50_000 and whole[40_000][1] == "a string" and whole[-1][2].startswith("text 49999 ")
    for start, stop in ((0, 10), (12_345, 12_400), (39_990, 40_010), (40_001, 40_002), (49_990, None), (50_000, None)):
        assert rows(start, stop) == whole[start:stop], (start, stop)


def _tricky_jsonl() -> bytes:
    """Blank and whitespace lines, CRLF endings, ids of every type (a string among numbers, one
    past 64 bits, fractions: read line by line from there), a line longer than a 300-byte
    segment, and a last line without its newline."""
    lines = []
    for i in range(400):
        ident = {57: "a string", 150: 2 ** 70, 222: 2.5, 223: True, 300: None}.get(i, i)
        lines.append(json.dumps({"id": ident, "text": f"text {i} " + "y" * (700 if i == 77 else i % 40)}))
        if i % 13 == 0:
            lines += ["", "  \t"]
    return "\r\n".join(lines).encode()


def test_a_jsonl_read_from_a_mark_gives_the_rows_a_read_from_the_start_gives(tmp_path, monkeypatch):
    """A unit deep in a large JSON Lines file parsed every row before it (a 10 GB file: hours of
    CPU in all): the scan marks where each segment starts, and a unit reads from the mark before
    its first row, the same rows as a read from the file's start."""
    import workers.ingest.source as source

    path = tmp_path / "x.jsonl"
    raw = _tricky_jsonl()
    path.write_bytes(raw)
    fs, root, [f] = list_source(str(path))

    def rows(start=0, stop=None, mark=None, marks=None):
        got = [classify(f, first, b, "text", "id")
               for first, b in iter_batches(fs, root, f, ["text", "id"], start, stop, "text", mark, marks)]
        return [(r, i, t, why) for c in got for r, i, t, why in zip(c.row.tolist(), c.ids, c.texts, c.reason)]

    one_parse = rows()  # the file is one segment: parsed whole, as before segments
    assert len(one_parse) == 400 and one_parse[57][1] == "a string" and one_parse[150][1] == str(2 ** 70)
    assert [one_parse[i][1] for i in (222, 223, 224)] == ["2.5", "true", "224"] and one_parse[300][3] == "null_id"
    monkeypatch.setattr(source, "JSONL_SEGMENT", 300)
    marks = []
    assert rows(marks=marks) == one_parse
    # Batches kept while later segments are read (into the same buffer) keep their values.
    kept = list(iter_batches(fs, root, f, ["text", "id"], text_column="text"))
    got = [classify(f, first, b, "text", "id") for first, b in kept]
    assert len(kept) > 40 and [(r, i, t) for c in got for r, i, t in zip(c.row.tolist(), c.ids, c.texts)] == [
        r[:3] for r in one_parse]
    assert len(marks) > 40 and [m.byte for m in marks] == sorted({m.byte for m in marks})
    for m in marks:  # a line's start, and the rows before it
        assert raw[m.byte - 1:m.byte] == b"\n"
        assert m.row == sum(1 for line in raw[:m.byte].split(b"\n")[:-1] if line.strip())
    long_line = next(i for i, m in enumerate(marks) if m.row > 77)
    assert marks[long_line].byte - marks[long_line - 1].byte > 700  # a line longer than a segment is one segment
    for m in marks[::7] + marks[-1:]:
        for start, stop in ((m.row, m.row + 1), (m.row + 3, m.row + 40), (m.row, None)):
            assert rows(start, stop, m) == one_parse[start:stop], (m, start, stop)
    with pytest.raises(ValueError, match=r"x\.jsonl: a read from row 10 cannot start at the mark of row "):
        rows(10, 20, marks[-1])

    # What lies before the mark is never parsed: the same rows with those bytes ruined (all but
    # the line end before it, which a read checks, as a mark may come from a record).
    m = marks[len(marks) // 2]
    path.write_bytes(b"!" * (m.byte - 1) + raw[m.byte - 1:])
    assert rows(m.row + 2, m.row + 9, m) == one_parse[m.row + 2:m.row + 9]
    with pytest.raises(SourceError, match=r"x\.jsonl: line 1 is not a JSON object"):
        rows(m.row + 2, m.row + 9)
    for byte in (m.byte + 1, len(raw) + 10):  # within a line, past the end
        with pytest.raises(ValueError, match=rf"x\.jsonl: the mark of row {m.row} at byte {byte} is not at a line's "):
            rows(m.row + 2, m.row + 9, m._replace(byte=byte))

    # A line refused past a mark is named by its line in the file, read from the mark or not.
    bad = raw[:m.byte] + raw[m.byte:].replace(b'"text": "text', b'"text": 5, "t": "text', 1)
    path.write_bytes(bad)
    line = raw[:m.byte].count(b"\n") + 1 + raw[m.byte:].split(b'"text": "text')[0].count(b"\n")
    for mark in (None, m):
        with pytest.raises(SourceError, match=rf": line {line} holds a number in the text column 'text'"):
            rows(m.row, None, mark)
    # And one the line-by-line reader refuses, reached from a float (0.5) and an integer float64
    # cannot hold (2**53 + 1), or from a string among numbers.
    for ids in ((b"0.5", b"9007199254740993", b"1e17"), (b'"s"', b"1e17")):
        lines = raw[m.byte:].split(b"\r\n")
        at = [i for i, text in enumerate(lines) if text.strip()][:len(ids)]
        for i, ident in zip(at, ids):
            lines[i] = re.sub(rb'^\{"id": [^,]*,', b'{"id": ' + ident + b",", lines[i])
        path.write_bytes(raw[:m.byte] + b"\r\n".join(lines))
        line = raw[:m.byte].count(b"\n") + 1 + at[-1]
        for mark in (None, m):
            with pytest.raises(SourceError, match=rf": line {line} holds the number 1e17 in column 'id'"):
                rows(m.row, None, mark)


def test_a_jsonl_read_from_a_mark_parses_its_segments_as_the_scan_did(tmp_path, monkeypatch):
    """Boolean ids in the first segment, numbers in the second: the scan's read, with booleans
    found, reads the second line by line with Python's parser, whose error for a line holding
    only a form feed (a row to Arrow too, refused by both) differs from Arrow's. A read from the
    mark starts with the types the scan had found (the mark keeps them), so it reads that
    segment with the same parser, and fails with the same words on the same line."""
    import workers.ingest.source as source

    first = b"".join(b'{"id": true, "text": "a%d"}\n' % i for i in range(4))
    (tmp_path / "x.jsonl").write_bytes(first + b'{"id": 5, "text": "b"}\n{"id": 6, "text": "c"}\n\x0c\n')
    fs, root, [f] = list_source(str(tmp_path))
    monkeypatch.setattr(source, "JSONL_SEGMENT", len(first))
    marks, whole = [], []
    with pytest.raises(SourceError) as refused:
        for r, b in iter_batches(fs, root, f, ["text", "id"], 0, None, "text", marks=marks):
            whole.append((r, b.column("id").to_pylist()))
    assert whole == [(0, [True] * 4)] and marks == [(4, len(first), ("string", "bool"))]
    assert str(refused.value) == ("JSON Lines file x.jsonl: line 7 is not a JSON object (Expecting value: line 1 "
                                  "column 1 (char 0)); fix or remove that line")
    with pytest.raises(SourceError) as from_mark:
        list(iter_batches(fs, root, f, ["text", "id"], 4, None, "text", marks[0]))
    assert str(from_mark.value) == str(refused.value)


def test_a_jsonl_file_of_carriage_returns_alone_is_cut_into_segments(tmp_path, monkeypatch):
    """Arrow reads a carriage return as a line's end: a file of old Mac line ends is cut at them
    (cut only at newlines, it was one segment, held whole in memory, and had no marks)."""
    import workers.ingest.source as source

    records = [{"id": i, "text": f"text {i} " + "z" * (i % 30)} for i in range(200)]
    (tmp_path / "x.jsonl").write_bytes("\r".join(json.dumps(r) for r in records).encode())
    fs, root, [f] = list_source(str(tmp_path))
    monkeypatch.setattr(source, "JSONL_SEGMENT", 300)
    marks = []
    got = [(i, t) for _, b in iter_batches(fs, root, f, ["text", "id"], 0, None, "text", marks=marks)
           for t, i in zip(b.column("text").to_pylist(), b.column("id").to_pylist())]
    assert got == [(r["id"], r["text"]) for r in records] and len(marks) > 30
    for m in marks[::5]:
        from_mark = [b.num_rows for _, b in iter_batches(fs, root, f, ["text", "id"], m.row, None, "text", m)]
        assert sum(from_mark) == 200 - m.row


def test_a_process_that_read_part_of_a_large_jsonl_file_exits_cleanly(tmp_path):
    """A read that stops before the file's end (every unit but a file's last) left Arrow's reader
    thread reading the Python file object: on a loaded machine about one exit in three aborted
    ("terminate called without an active exception") or hung. Eight runs beside two busy
    processes; each must exit 0 and print nothing on stderr."""
    import subprocess
    import sys

    from isolated import REPO

    _jsonl(tmp_path / "x.jsonl", [{"id": f"d{i}", "text": ("word%d " % i) * 80} for i in range(15_000)])
    assert (tmp_path / "x.jsonl").stat().st_size > 2 * (1 << 22)  # three blocks: the first read, more ahead
    script = ("import sys; sys.path.insert(0, sys.argv[1])\n"
              "from workers.ingest.source import iter_batches, list_source\n"
              "fs, root, [f] = list_source(sys.argv[2])\n"
              "print(sum(b.num_rows for _, b in iter_batches(fs, root, f, ['text', 'id'], 0, 1000, 'text')))\n")
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        runs = [subprocess.run([sys.executable, "-c", script, str(REPO), str(tmp_path / "x.jsonl")],
                               capture_output=True, text=True, timeout=60) for _ in range(8)]
    finally:
        for b in busy:
            b.kill()
            b.wait()
    assert [(r.returncode, r.stdout, r.stderr) for r in runs] == [(0, "1000\n", "")] * 8


@pytest.mark.parametrize("line, why", [
    ('{"id": 1e17, "text": "t"}', r"line 4 holds the number 1e17 in column 'id', a whole number past 2\*\*53 written "
                                  r"as a float: it may stand for more than one integer"),
    ('{"id": {"a": 1}, "text": "t"}', r"line 4 holds an object in column 'id'; ids must be strings, numbers or "
                                      r"booleans"),
    ('{"id": "x", "text": 3}', r"line 4 holds a number in the text column 'text'; it must hold strings"),
    ('{"id": "x", "id": "y", "text": "t"}', r"line 4 holds the key 'id' twice"),
    ('["not", "an", "object"]', r"line 4 is not a JSON object"),
    ('{"id": NaN, "text": "t"}', r"line 4 is not a JSON object \(NaN is not a JSON value\)"),
    # Arrow's parser refuses these too; Python's took them, and the read failed with no line named.
    ('{"id": 1e400, "text": "t"}', r"line 4 is not a JSON object \(the number 1e400 is too large for a double\)"),
    ('{"id": "x", "text": "a\\ud800b"}', r"line 4 is not a JSON object \(column 'text' holds a \\u escape of half "
                                       r"a surrogate pair\)"),
])
def test_what_the_line_by_line_reader_refuses_is_named_by_its_line(tmp_path, line, why):
    path = tmp_path / "x.jsonl"
    path.write_text('{"id": 1, "text": "t"}\n{"id": "s", "text": "t"}\n\n' + line + "\n")
    with pytest.raises(SourceError, match=rf"^JSON Lines file x\.jsonl: {why}"):
        _read_all(path)


def test_jsonl_errors_name_the_line_counting_blank_ones(tmp_path):
    """Arrow counts rows and skips blank lines: the line it is on is found in the file."""
    lines = ['{"id": "a", "text": "x"}', "", "   ", '{"id": "b", "text": "y"}', "\t", '{"id": "c", "text": 5}']
    raw = ("\r\n".join(lines) + "\n").encode()
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "x.jsonl").write_bytes(raw)
    (tmp_path / "packed").mkdir()
    (tmp_path / "packed" / "x.jsonl.gz").write_bytes(_compressed(raw, "gzip"))
    for name in ("plain/x.jsonl", "packed/x.jsonl.gz"):
        fs, root, [f] = list_source(str(tmp_path / name))
        with pytest.raises(SourceError, match=r": line 6 holds a number in the text column 'text'; it must hold "
                                              r"strings$"):
            check_file(fs, root, f, "text", "id")
    (tmp_path / "plain" / "x.jsonl").write_bytes(raw.replace(b'"c", "text": 5}', b'"c", "text": "z"'))
    fs, root, [f] = list_source(str(tmp_path / "plain"))
    with pytest.raises(SourceError, match=r"^JSON Lines file x\.jsonl: line 6 is not a JSON object "):
        list(iter_batches(fs, root, f, ["text", "id"], text_column="text"))


@pytest.mark.parametrize("end", ["\n", "\r\n", "\r"])
def test_jsonl_errors_name_the_line_whatever_the_line_ends_and_a_form_feed_is_a_line(tmp_path, end):
    """Lines end as Arrow ends them ("\\r" alone too: a file of old Mac line ends read as one line
    here), and only spaces and tabs make a line blank: Arrow reads a form feed's line as a row,
    and refuses it (it was skipped here, and the next line named)."""
    lines = ['{"id": "a", "text": "x"}', " \t", '{"id": "b", "text": "y"}', "\f", '{"id": "c", "text": "z"}']
    (tmp_path / "x.jsonl").write_bytes((end.join(lines) + end).encode())
    fs, root, [f] = list_source(str(tmp_path))
    with pytest.raises(SourceError, match=r"^JSON Lines file x\.jsonl: line 4 is not a JSON object"):
        list(iter_batches(fs, root, f, ["text", "id"], text_column="text"))
    # The line-by-line reader (ids Arrow cannot read as written) counts the same lines.
    (tmp_path / "x.jsonl").write_bytes((end.join(lines[:3] + ['{"id": 1e17, "text": "t"}']) + end).encode())
    with pytest.raises(SourceError, match=r"^JSON Lines file x\.jsonl: line 4 holds the number 1e17"):
        _read_all(tmp_path / "x.jsonl")


def test_lines_split_as_arrow_splits_them_across_chunks():
    """`_lines` over chunk edges: a "\\r\\n" cut in two is one line end, a last "\\r" ends a line."""
    import io

    from workers.ingest import source

    class Chunks(io.RawIOBase):
        def __init__(self, parts):
            self.parts = list(parts)

        def read(self, n=-1):
            return self.parts.pop(0) if self.parts else b""

    cases = [([b"a\r", b"\nb\r", b"\r", b"c"], [b"a", b"b", b"", b"c"]),
             ([b"a\r\n\r\nb\n"], [b"a", b"", b"b"]), ([b"a\r"], [b"a"]), ([b"a\rb\r\r"], [b"a", b"b", b""])]
    for parts, want in cases:
        assert list(source._lines(Chunks(parts))) == want, parts


def test_a_utf16_jsonl_file_is_named_as_such(tmp_path):
    (tmp_path / "x.jsonl").write_bytes('{"id": "a", "text": "x"}\n'.encode("utf-16"))
    fs, root, [f] = list_source(str(tmp_path))
    with pytest.raises(SourceError, match=r"^JSON Lines file x\.jsonl is UTF-16 \(it starts with a UTF-16 byte "
                                          r"order mark\): JSON Lines must be UTF-8; convert it"):
        check_file(fs, root, f, "text", "id")


def test_jsonl_keys_absent_from_the_first_block_are_looked_for_further(tmp_path):
    """A writer that leaves out null keys: no id through the first 4 MiB, ids after; the rows
    without one go to rejects. A key no line holds (a misspelt column) is still refused."""
    records = [{"text": f"t{i}", "pad": "x" * 100_000} for i in range(50)]
    records += [{"id": f"d{i}", "text": f"late {i}"} for i in range(3)]
    _jsonl(tmp_path / "x.jsonl", records)
    fs, root, [f] = list_source(str(tmp_path))
    assert check_file(fs, root, f, "text", "id") is None
    got = _read_all(tmp_path / "x.jsonl")
    assert [r[3] for r in got] == ["null_id"] * 50 + [None] * 3 and got[50] == (50, "d0", "late 0", None)
    with pytest.raises(SourceError, match=r"^file x\.jsonl has no id column 'ident' \(columns: text, pad\)"):
        check_file(fs, root, f, "text", "ident")


def test_a_jsonl_key_twice_in_one_object(tmp_path):
    """Twice in a key the job does not read: the line is read (Arrow's inference refused it).
    Twice in the text or id: refused naming the line, as which value is meant is not known."""
    (tmp_path / "x.jsonl").write_text('{"id": "a", "text": "x", "meta": 1, "meta": 2}\n\n'
                                      '{"id": "b", "text": "y", "text": "z"}\n')
    fs, root, [f] = list_source(str(tmp_path))
    with pytest.raises(SourceError, match=r"^JSON Lines file x\.jsonl: line 3 holds the key 'text' twice: which "
                                          r"value is meant is not known; fix that line$"):
        check_file(fs, root, f, "text", "id")
    (tmp_path / "x.jsonl").write_text('{"id": "a", "text": "x", "meta": 1, "meta": 2}\n')
    assert check_file(fs, root, f, "text", "id") is None
    assert _read_all(tmp_path / "x.jsonl") == [(0, "a", "x", None)]


def test_jsonl_keys_the_job_does_not_read_cannot_stop_it(tmp_path):
    """A key holding a string on one line and an object on another was a parse error for the
    whole file; only the text and id columns are read now."""
    records = [{"id": f"d{i}", "text": f"t{i}", "meta": "s" if i % 2 else {"k": [i]}} for i in range(6)]
    _jsonl(tmp_path / "x.jsonl", records)
    fs, root, [f] = list_source(str(tmp_path / "x.jsonl"))
    assert check_file(fs, root, f, "text", "id") is None
    assert [(r[1], r[2]) for r in _read_all(tmp_path / "x.jsonl")] == [(f"d{i}", f"t{i}") for i in range(6)]


@pytest.mark.parametrize("lines, pad, bad_line", [(5, 0, 6), (200, 7_000, 201), (700, 7_000, 701)])
def test_a_malformed_jsonl_line_is_named_by_its_line_number_whatever_the_file_size(tmp_path, lines, pad, bad_line):
    """Under 1 MiB, 1 to 4 MiB (the first block is parsed when the reader opens) and past 4 MiB:
    the same message, with the line counted from 1."""
    path = tmp_path / "x.jsonl"
    _jsonl(path, [{"id": f"d{i}", "text": f"t{i}"} for i in range(lines)], pad=pad)
    with open(path, "a") as f:
        f.write('{"id": "broken", "text": "missing brace"\n')
    fs, root, [f] = list_source(str(path))
    # Arrow's own row number (from 0, within a block) is left out of the quoted cause
    pattern = rf"^JSON Lines file x\.jsonl: line {bad_line} is not a JSON object " \
              r"\((?!.*\bin row \d)JSON parse error: .*\); fix or remove that line$"
    with pytest.raises(SourceError, match=pattern):
        list(iter_batches(fs, root, f, ["text", "id"], text_column="text"))
    if bad_line < (4 << 20) // (pad + 40):  # within the first block, which the check reads
        with pytest.raises(SourceError, match=pattern):
            check_file(fs, root, f, "text", "id")


def test_a_jsonl_text_that_is_not_a_string_is_named_by_its_line(tmp_path):
    records = [{"id": f"d{i}", "text": f"t{i}"} for i in range(700)] + [{"id": "n", "text": 5}]
    _jsonl(tmp_path / "x.jsonl", records, pad=7_000)
    fs, root, [f] = list_source(str(tmp_path / "x.jsonl"))
    check_file(fs, root, f, "text", "id")  # the first block's texts are strings
    with pytest.raises(SourceError, match=r"^JSON Lines file x\.jsonl: line 701 holds a number in the text "
                                          r"column 'text'; it must hold strings$"):
        list(iter_batches(fs, root, f, ["text", "id"], text_column="text"))


def _compressed(data: bytes, codec: str) -> bytes:
    out = pa.BufferOutputStream()
    with pa.CompressedOutputStream(out, codec) as stream:
        stream.write(data)
    return out.getvalue().to_pybytes()


# A JSON Lines file of more than one 4 MiB block, its ids numbers (read again as such: the file is opened twice).
BIG = [{"id": i, "text": f"text {i} " + "x" * (i % 300)} for i in range(40_000)]


@pytest.mark.parametrize("name, codec", [("a.jsonl.gz", "gzip"), ("b.ndjson.bz2", "bz2"), ("c.json.zst", "zstd"),
                                         ("d.JSONL.ZSTD", "zstd"), ("e.jsonl.lz4", "lz4")])
def test_compressed_jsonl_files_read_as_the_same_lines_uncompressed(tmp_path, name, codec):
    raw = "".join(json.dumps(r) + "\n" for r in BIG).encode()
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "x.jsonl").write_bytes(raw)
    (tmp_path / "packed").mkdir()
    (tmp_path / "packed" / name).write_bytes(_compressed(raw, codec))
    (tmp_path / "packed" / "x.parquet.gz").write_bytes(b"no compressed Parquet")
    (tmp_path / "packed" / "y.gz").write_bytes(_compressed(raw, "gzip"))
    fs, root, [f] = list_source(str(tmp_path / "packed"))
    assert (f.relpath, f.format, f.size) == (name, "jsonl", len((tmp_path / "packed" / name).read_bytes()))
    assert check_file(fs, root, f, "text", "id") is None
    want = _read_all(tmp_path / "plain" / "x.jsonl")
    assert len(want) == 40_000 and want[-1] == (39_999, "39999", BIG[-1]["text"], None)
    assert _read_all(tmp_path / "packed" / name) == want
    window = [(first, len(b)) for first, b in iter_batches(fs, root, f, ["text", "id"], 19_990, 30_010, "text")]
    assert window[0][0] == 19_990 and sum(n for _, n in window) == 10_020


def test_a_compressed_jsonl_file_on_s3_reads_as_its_lines(s3):
    import s3fs

    bucket, options = s3
    rows = BIG[:5_000]
    s3fs.S3FileSystem(**options).pipe(f"{bucket}/raw/p.jsonl.zst",
                                      _compressed("".join(json.dumps(r) + "\n" for r in rows).encode(), "zstd"))
    fs, root, [f] = list_source(f"{bucket}/raw", options)
    assert check_file(fs, root, f, "text", "id") is None
    got = [(first, b.num_rows) for first, b in iter_batches(fs, root, f, ["text", "id"], 100, 4_100, "text")]
    texts = [t for _, b in iter_batches(fs, root, f, ["text", "id"], text_column="text") for t in b["text"].to_pylist()]
    assert got[0][0] == 100 and sum(n for _, n in got) == 4_000 and texts == [r["text"] for r in rows]


@pytest.mark.parametrize("damage", ["truncated", "not compressed"])
def test_a_compressed_jsonl_file_that_does_not_decompress_is_named(tmp_path, damage):
    raw = "".join(json.dumps(r) + "\n" for r in BIG).encode()
    packed = _compressed(raw, "gzip")
    (tmp_path / "x.jsonl.gz").write_bytes(packed[:len(packed) // 2] if damage == "truncated" else raw)
    fs, root, [f] = list_source(str(tmp_path))
    pattern = r"^JSON Lines file x\.jsonl\.gz is not valid gzip data after its first \d+ line\(s\) \(.+\); " \
              "recompress or remove it$"
    with pytest.raises(SourceError, match=pattern):
        list(iter_batches(fs, root, f, ["text", "id"], text_column="text"))
    if damage == "not compressed":  # the first block, which the check reads, does not decompress
        with pytest.raises(SourceError, match="cannot read jsonl file x.jsonl.gz: zlib inflate failed"):
            check_file(fs, root, f, "text", "id")


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"])
def test_an_empty_jsonl_file_holds_no_rows(tmp_path, content):
    (tmp_path / "x.jsonl").write_bytes(content)
    fs, root, [f] = list_source(str(tmp_path / "x.jsonl"))
    assert check_file(fs, root, f, "text", "id") is None
    assert _read_all(tmp_path / "x.jsonl") == []


def test_text_and_ids_that_are_not_utf8_go_to_rejects(tmp_path):
    """JSON Lines: Arrow's parser does not check a string's bytes; such a row is a reject
    (its values kept with U+FFFD for the bad bytes), and the rest of the file is read."""
    with open(tmp_path / "x.jsonl", "wb") as f:
        f.write(b'{"id": "a", "text": "fine"}\n')
        f.write(b'{"id": "latin1", "text": "caf\xe9 cr\xe8me"}\n')
        f.write(b'{"id": "b\xff", "text": "fine again"}\n')
        f.write(b'{"id": null, "text": "caf\xe9"}\n')
    assert _read_all(tmp_path / "x.jsonl") == [
        (0, "a", "fine", None), (1, "latin1", "caf\ufffd cr\ufffdme", "text_not_utf8"),
        (2, "b\ufffd", "fine again", "id_not_utf8"), (3, None, "caf\ufffd", "null_id")]


def test_parquet_columns_that_are_not_utf8_go_to_rejects(tmp_path):
    """A Parquet string column is not checked by Arrow either; a binary id column may hold anything."""
    texts = pa.Array.from_buffers(pa.string(), 3, [None, pa.py_buffer(np.array([0, 2, 5, 7], np.int32).tobytes()),
                                                   pa.py_buffer(b"okc\xe9xhi")])
    pq.write_table(pa.table({"text": texts, "id": pa.array([b"i0", b"i1", b"\x80"], pa.binary())}),
                   tmp_path / "x.parquet")
    assert _read_all(tmp_path / "x.parquet") == [
        (0, "i0", "ok", None), (1, "i1", "c\ufffdx", "text_not_utf8"), (2, "\ufffd", "hi", "id_not_utf8")]


def test_a_string_view_text_column_is_read(tmp_path):
    texts = ["first text", None, "caf\u00e9"]
    pq.write_table(pa.table({"text": pa.array(texts, pa.string_view()), "id": ["a", "b", "c"]}), tmp_path / "x.parquet")
    fs, root, [f] = list_source(str(tmp_path))
    assert check_file(fs, root, f, "text", "id") == [3]
    assert [(r[2], r[3]) for r in _read_all(tmp_path / "x.parquet")] == [("first text", None), (None, "null_text"),
                                                                        ("caf\u00e9", None)]


def test_a_parquet_file_with_two_columns_of_the_name_asked_for_is_refused(tmp_path):
    pq.write_table(pa.table([pa.array(["a"]), pa.array(["b"]), pa.array(["i"])], names=["text", "text", "id"]),
                   tmp_path / "x.parquet")
    fs, root, [f] = list_source(str(tmp_path))
    with pytest.raises(SourceError, match=r"^file x\.parquet has 2 columns named 'text': which one holds the texts "
                                          r"is not known; rename one of them$"):
        check_file(fs, root, f, "text", "id")


def test_a_dictionary_encoded_text_column_is_read(tmp_path):
    """What a pandas categorical column becomes in Parquet."""
    pq.write_table(pa.table({"text": pa.array(["x", "y", "x", None]).dictionary_encode(), "id": [1, 2, 3, 4]}),
                   tmp_path / "x.parquet")
    fs, root, [f] = list_source(str(tmp_path / "x.parquet"))
    assert check_file(fs, root, f, "text", "id") == [4]
    assert _read_all(tmp_path / "x.parquet") == [
        (0, "1", "x", None), (1, "2", "y", None), (2, "3", "x", None), (3, "4", None, "null_text")]


@pytest.mark.parametrize("ids", [pa.array([[1], [2]]), pa.array([{"a": 1}, {"a": 2}]),
                                 pa.array([[("k", 1)], [("k", 2)]], pa.map_(pa.string(), pa.int64()))])
def test_an_id_column_that_cannot_be_a_string_is_refused_before_any_work(tmp_path, ids):
    pq.write_table(pa.table({"text": ["a", "b"], "id": ids}), tmp_path / "x.parquet")
    fs, root, [f] = list_source(str(tmp_path / "x.parquet"))
    kind = str(ids.type).split("<")[0]  # list, struct, map: Parquet renames what is inside
    with pytest.raises(SourceError, match=rf"^id column 'id' of file x\.parquet has type {kind}<.*>; "
                                          "it must hold strings or numbers$"):
        check_file(fs, root, f, "text", "id")


@pytest.mark.parametrize("change", ["append", "replace", "remove", "none"])
def test_a_file_that_changed_since_it_was_listed_is_not_read_as_listed(tmp_path, change):
    """Rows read from a file that is not the one listed may not match its scan (ids the duplicate
    check never saw, rows past the counted end): the read fails, naming the file."""
    path = tmp_path / "x.parquet"
    pq.write_table(pa.table({"text": ["a", "b"], "id": ["1", "2"]}), path)
    fs, root, [f] = list_source(str(tmp_path))
    if change == "append":
        pq.write_table(pa.table({"text": ["a", "b", "c"], "id": ["1", "2", "3"]}), path)
    elif change == "replace":  # the same size, written a little later
        before = path.stat().st_mtime_ns
        pq.write_table(pa.table({"text": ["c", "d"], "id": ["1", "2"]}), path)
        os.utime(path, ns=(before + 10**9, before + 10**9))
    elif change == "remove":
        path.unlink()
    if change == "none":
        with unchanged(fs, root, f):
            assert len(_read_all(path)) == 2
        return
    with pytest.raises(SourceChanged, match=r"^source file x\.parquet changed while the job ran \(listed at \d+ "
                                            r"bytes, version .*; (now \d+ bytes, version .*|it is gone)\); "
                                            "run the job again to read it as it is$"):
        with unchanged(fs, root, f):
            list(iter_batches(fs, root, f, ["text", "id"]))


def test_an_ingest_config_takes_what_a_script_passes(tmp_path):
    """A string where a sequence is meant was taken letter by letter: exclude="*.json" left out
    every file (the pattern "*")."""
    from workers.ingest.config import IngestConfig

    cfg = IngestConfig(tmp_path / "lake", tmp_path / "dest", precisions="int8, float16", exclude="*.json",
                       unit_rows=np.int64(500))
    assert (cfg.source, cfg.dest) == (str(tmp_path / "lake"), str(tmp_path / "dest"))
    assert (cfg.precisions, cfg.exclude, cfg.unit_rows) == (("int8", "float16", "ubinary"), ("*.json",), 500)
    assert type(cfg.unit_rows) is int
    for name, bad in (("unit_rows", "100"), ("calibration_samples", 2.5), ("seed", True)):
        with pytest.raises(TypeError, match=rf"^{name} must be a whole number, got {bad!r}$"):
            IngestConfig("a", "b", **{name: bad})


@pytest.mark.parametrize("options, match", [
    # the sample's hash key is numpy's uint64: out of range, it failed in a Ray task naming neither
    ({"seed": -1}, r"^seed must be in \[0, 2\*\*64\), got -1$"),
    ({"seed": 2 ** 64}, r"^seed must be in \[0, 2\*\*64\), got 18446744073709551616$"),
    ({"quantiles": (0.01, 0.5, 0.99)}, r"^quantiles must be two numbers \(low, high\), got \(0\.01, 0\.5, 0\.99\)$"),
    ({"quantiles": 0.5}, r"^quantiles must be two numbers \(low, high\), got 0\.5$"),
    # a blank name passed the config and was refused by the commit, after all the encoding
    ({"text_column": " "}, r"^text column must be named, got ' '$"),
    ({"text_column": None}, r"^text column must be named, got None$"),
    ({"id_column": ""}, r"^id column must be named \(or left out\), got ''$"),
    ({"id_column": "\t"}, r"^id column must be named \(or left out\), got '\\t'$"),
])
def test_an_ingest_config_refuses_options_a_job_would_fail_on_later(options, match):
    from workers.ingest.config import IngestConfig

    with pytest.raises(ValueError, match=match):
        IngestConfig("a", "b", **options)
    assert IngestConfig("a", "b", seed=2 ** 64 - 1, id_column="id").seed == 2 ** 64 - 1


def test_a_file_served_over_http_has_a_version_and_a_rewrite_at_its_size_is_seen(tmp_path):
    """A server that sends no ETag sends Last-Modified: the file's version. Without it a file
    rewritten at the same size passed for unchanged (mid-job check, reuse, reindex)."""
    from http_lake import HttpLake

    (tmp_path / "x.jsonl").write_text('{"text": "first"}\n')
    server = HttpLake(tmp_path, "u", "p")
    try:
        os.utime(tmp_path / "x.jsonl", (1767225600, 1767225600))  # 2026-01-01, as the server says it
        fs, root, [f] = list_source(f"{server.url}/x.jsonl")
        assert f.version == "Thu, 01 Jan 2026 00:00:00 GMT"
        (tmp_path / "x.jsonl").write_text('{"text": "other"}\n')  # the same size, later
        os.utime(tmp_path / "x.jsonl", (1767225660, 1767225660))
        with pytest.raises(SourceChanged, match=r"^source file x\.jsonl changed while the job ran"):
            with unchanged(fs, root, f):
                list(iter_batches(fs, root, f, ["text"]))
    finally:
        server.close()