"""Source listing and row-range reading, Parquet and JSON Lines alike."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from workers.ingest.source import SourceError, classify, iter_batches, list_source


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
