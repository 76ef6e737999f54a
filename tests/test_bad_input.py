"""Bad input stops the job before any work, with an error naming the file and column."""
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.ingest import main, run
from ranges.manifest import RangeManifest
from workers.lake.range_files import save_ranges as save
from workers.ingest.config import IngestConfig
from workers.ingest.source import SourceError

import numpy as np


@pytest.fixture
def lake(tmp_path, docs):
    root = tmp_path / "lake"
    root.mkdir()
    pq.write_table(pa.table({"id": [d[0] for d in docs[:20]], "text": [d[1] for d in docs[:20]]}),
                   root / "a.parquet")
    return root


def _nothing_committed(dest):
    """No version, and no shard, reject or range manifest either: the job stopped before any work."""
    for folder in ("versions", "shards", "rejects", "ranges"):
        assert not os.path.exists(dest / folder), f"{folder}/ was written"


@pytest.mark.parametrize("kwargs, pattern", [
    ({"text_column": "body"}, r"file a\.parquet has no text column 'body' \(columns: id, text\)"),
    ({"id_column": "doc_id"}, r"file a\.parquet has no id column 'doc_id'"),
])
def test_missing_column(lake, tmp_path, kwargs, pattern):
    with pytest.raises(SourceError, match=pattern):
        run(IngestConfig(str(lake), str(tmp_path / "out"), **kwargs))
    _nothing_committed(tmp_path / "out")


def test_unreadable_file_is_named(lake, tmp_path):
    (lake / "sub").mkdir()
    (lake / "sub" / "broken.parquet").write_bytes(b"this is not parquet at all")
    with pytest.raises(SourceError, match=r"cannot read parquet file sub/broken\.parquet"):
        run(IngestConfig(str(lake), str(tmp_path / "out")))
    _nothing_committed(tmp_path / "out")


def test_a_parquet_file_whose_pages_do_not_decode_is_named(lake, tmp_path, ray_session):
    """Its footer reads (the check passes); a data page does not: the scan names the file, where
    the error was Ray's traceback of the scan task."""
    texts = [("word %d " % i) * 20 for i in range(2000)]
    pq.write_table(pa.table({"text": texts, "id": [str(i) for i in range(2000)]}), lake / "b.parquet",
                   compression="snappy")
    chunk = pq.ParquetFile(lake / "b.parquet").metadata.row_group(0).column(0)  # the texts: a dictionary first
    a = chunk.dictionary_page_offset + 2000
    data = bytearray((lake / "b.parquet").read_bytes())
    data[a:a + 400] = bytes(b ^ 0x5A for b in data[a:a + 400])
    (lake / "b.parquet").write_bytes(bytes(data))
    with pytest.raises(SourceError, match=r"^cannot read parquet file b\.parquet: Corrupt snappy compressed data\.$"):
        run(IngestConfig(str(lake), str(tmp_path / "out"), progress=False))
    assert not os.path.exists(tmp_path / "out" / "versions")


def test_text_column_of_wrong_type(tmp_path):
    (tmp_path / "lake").mkdir()
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "lake" / "n.parquet")
    with pytest.raises(SourceError, match="text column 'text' of file n.parquet has type int64"):
        run(IngestConfig(str(tmp_path / "lake"), str(tmp_path / "out")))
    _nothing_committed(tmp_path / "out")


def test_missing_or_empty_source(tmp_path, capsys):
    with pytest.raises(SourceError, match=r"source .*nowhere does not exist"):
        run(IngestConfig(str(tmp_path / "nowhere"), str(tmp_path / "out")))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "_SUCCESS").write_text("")
    assert main([str(tmp_path / "empty"), str(tmp_path / "out")]) == 2
    assert "holds no Parquet" in capsys.readouterr().err
    _nothing_committed(tmp_path / "out")


def test_ranges_of_another_model_are_refused(lake, tmp_path):
    m = RangeManifest(np.array([[0.0] * 384, [1.0] * 384], np.float32), "other-model", "sha256:00",
                      True, "minmax", None, 10, 0)
    save(m, str(tmp_path / "r.json"))
    with pytest.raises(ValueError, match=r"made with model other-model \(sha256:00\).*calibrate anew"):
        run(IngestConfig(str(lake), str(tmp_path / "out"), ranges=str(tmp_path / "r.json")))
    _nothing_committed(tmp_path / "out")


def test_bad_options_are_refused(capsys):
    with pytest.raises(SystemExit):
        main(["a", "b", "--precisions", "int4"])
    assert "unknown precision(s) ['int4']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["a", "b", "--storage-options", "{nope"])
    assert "--storage-options is not valid JSON" in capsys.readouterr().err


def test_a_dest_inside_the_source_is_refused_unless_listing_skips_it(lake, tmp_path, capsys):
    """The first run would work, and every later one (a rerun, a reindex) fail on the dataset's
    own manifests read as JSON Lines ('file emb/versions/00000001.json has no text column')."""
    for dest in (lake / "emb", lake / "sub" / "emb"):
        with pytest.raises(ValueError, match=rf"^destination {dest} is inside the source {lake}: a later run would "
                                             r"read its manifests and shards as source files"):
            run(IngestConfig(str(lake), str(dest), id_column="id"))
        _nothing_committed(dest)
    assert main([str(lake), f"file://{lake}/emb", "--id-column", "id"]) == 2
    assert f"is inside the source {lake}" in capsys.readouterr().err
    # Beside it, or under a folder listing skips (a name starting with '_' or '.'): allowed, so the
    # job goes on to its next check (here: the ranges file given does not exist).
    for dest in (tmp_path / "emb", lake / "_emb", lake / ".quantlake" / "emb", lake.parent / "lake-emb"):
        with pytest.raises(FileNotFoundError, match="nowhere.json"):
            run(IngestConfig(str(lake), str(dest), id_column="id", ranges=str(tmp_path / "nowhere.json")))


def test_a_file_named_as_the_source_is_read_whatever_its_name(tmp_path):
    """Names starting with '_' or '.' are skipped in a folder; a file given as the source is the
    one meant (it was skipped too, and the lake said to hold no files)."""
    from workers.ingest.source import list_source

    (tmp_path / "_part.jsonl").write_text('{"text": "a"}\n')
    (tmp_path / "b.jsonl").write_text('{"text": "b"}\n')
    assert [f.relpath for f in list_source(str(tmp_path))[2]] == ["b.jsonl"]
    assert [f.relpath for f in list_source(str(tmp_path / "_part.jsonl"))[2]] == ["_part.jsonl"]
