"""The demo corpus: real docstrings, deterministic, written as Parquet through fsspec."""

import fsspec
import pyarrow.parquet as pq
import pytest

from jobs.demo import SCHEMA, DemoConfig, collect_documents, run

# The stdlib and numpy walk in a couple of seconds; the full default set takes longer.
QUICK = ("stdlib", "numpy")


def read_parts(result):
    return [pq.read_table(fsspec.open(url, "rb").open()) for url in result.files]


def test_subset_into_files(tmp_path):
    result = run(DemoConfig(dest=str(tmp_path), docs=500, files=3, sources=QUICK))
    assert result.documents == 500
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    tables = read_parts(result)
    assert all(t.schema.equals(SCHEMA) for t in tables)
    ids = [i for t in tables for i in t.column("id").to_pylist()]
    texts = [x for t in tables for x in t.column("text").to_pylist()]
    assert len(ids) == 500 and len(set(ids)) == 500 and ids == sorted(ids)
    assert min(map(len, texts)) >= 40 and len(set(texts)) == 500


def test_rerun_is_byte_identical_and_overwrites(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    run(DemoConfig(dest=str(first), docs=500, files=3, sources=QUICK))
    run(DemoConfig(dest=str(second), docs=500, files=3, sources=QUICK))
    run(DemoConfig(dest=str(second), docs=500, files=3, sources=QUICK))  # over itself
    assert sorted(p.name for p in second.iterdir()) == sorted(p.name for p in first.iterdir())
    for part in first.iterdir():
        assert part.read_bytes() == (second / part.name).read_bytes(), part.name
    run(DemoConfig(dest=str(second), docs=100, files=2, sources=QUICK))
    assert len(list(second.iterdir())) == 2, "a rerun with fewer files left stale parts"


def test_memory_url():
    result = run(DemoConfig(dest="memory://demo-corpus", docs=10, files=2, sources=("json",)))
    assert result.files[0].startswith("memory://")
    assert sum(t.num_rows for t in read_parts(result)) == 10


def test_rejects_more_docs_than_the_corpus_has(tmp_path):
    with pytest.raises(ValueError, match="docs=100000"):
        run(DemoConfig(dest=str(tmp_path), docs=100_000, sources=("json",)))
    with pytest.raises(ValueError, match="files"):
        DemoConfig(dest=str(tmp_path), files=0)


def test_default_corpus_is_large():
    table = collect_documents()
    assert table.num_rows > 20_000
    ids = table.column("id").to_pylist()
    assert len(set(ids)) == len(ids) and ids == sorted(ids)
    assert "json.decoder.JSONDecoder.decode" in ids
    assert min(map(len, table.column("text").to_pylist())) >= 40
