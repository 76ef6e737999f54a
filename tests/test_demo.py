"""The demo corpus (real docstrings, deterministic, written as Parquet through fsspec), and the
README's `make demo` flow run at a small size."""
import importlib
import re
import shlex
from pathlib import Path

import fsspec
import pyarrow.parquet as pq
import pytest

import jobs.demo
from jobs.cli import main as quantlake
from jobs.demo import DEFAULT_SOURCES, SCHEMA, DemoConfig, collect_documents, run

REPO = Path(__file__).resolve().parents[1]

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


@pytest.fixture(scope="module")
def default_corpus():
    """The default corpus, walked once for this module: it imports every default source (minutes)."""
    return collect_documents()


def test_default_corpus_is_large(default_corpus):
    table = default_corpus
    assert table.num_rows > 20_000
    ids = table.column("id").to_pylist()
    assert len(set(ids)) == len(ids) and ids == sorted(ids)
    assert "json.decoder.JSONDecoder.decode" in ids
    assert min(map(len, table.column("text").to_pylist())) >= 40


def demo_commands(docs: int) -> list[list[str]]:
    """The Makefile's `demo` recipe, as argument lists, with DEMO_DOCS set to `docs`."""
    lines = (REPO / "Makefile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("demo:"))
    recipe = []
    for line in lines[start + 1:]:
        if not line.startswith("\t"):
            break
        recipe.append(shlex.split(line.strip().replace("$(DEMO_DOCS)", str(docs))))
    return recipe


def test_make_demo_flow_at_a_small_size(default_corpus, ray_session, tmp_path, monkeypatch, capsys):
    """The Makefile's demo recipe, read from the Makefile, so `make demo` cannot silently break."""
    assert "make demo" in (REPO / "README.md").read_text()
    assert re.search(r"^DEMO_DOCS \?= \d+$", (REPO / "Makefile").read_text(), re.M)  # the size knob
    real = jobs.demo.collect_documents
    monkeypatch.setattr(jobs.demo, "collect_documents",  # the module's walk, not a second one
                        lambda sources=DEFAULT_SOURCES: default_corpus if sources == DEFAULT_SOURCES else real(sources))
    # The recipe's relative paths (lake/...), made absolute under tmp_path: this process's Ray
    # workers run in the directory pytest started in, and resolve relative paths there.
    commands = [[str(tmp_path / a) if a.startswith("lake/") else a for a in argv] for argv in demo_commands(200)]
    assert len(commands) == 3, commands
    outputs = []
    for argv in commands:  # run as `make demo` would, in this process: the session's Ray is joined
        if argv[:3] == ["$(BIN)/python", "-m", "jobs.demo"]:
            assert importlib.import_module("jobs.demo").main(argv[3:]) in (None, 0)
        elif argv[0] == "$(BIN)/quantlake":
            assert quantlake(argv[1:]) == 0, capsys.readouterr().err
        else:
            pytest.fail(f"the demo recipe runs {argv}, which this test does not know how to run")
        outputs.append(capsys.readouterr().out)
    corpus, ingest, search = outputs
    assert corpus.strip() == f"demo corpus: 200 documents, 4 files, {tmp_path}/lake/docs"
    assert ingest.startswith("committed version 1: 200 documents, 0 rejects (of 200 rows read), 4 shards")
    assert f"manifest: {tmp_path}/lake/emb/versions/00000001.json" in ingest
    blocks = re.findall(r"^neighbours of (\S+): .*\n +1\. +[-\d.]+ +(\S+) ", search, re.M)
    assert len(blocks) == 3 and all(doc == first for doc, first in blocks), search
