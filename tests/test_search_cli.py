"""`quantlake search` end to end on real shards: JSON output, queries files, neighbours, errors."""
import json

import pytest

from jobs.cli import main as cli
from jobs.ingest import run
from jobs.search import QueryResult, format_results, parse_args
from workers.search.searcher import Hit, Searcher
from workers.ingest.config import IngestConfig
from workers.embedding.encoder import EncoderConfig

from conftest import write_parquet_lake

pytestmark = pytest.mark.usefixtures("shared_encoders")  # conftest: warm encoder actors across the module's jobs


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, docs, ray_session, shared_encoders):
    root = tmp_path_factory.mktemp("search-cli")
    write_parquet_lake(root / "lake", docs[150:270], files=2, row_group_size=30)
    run(IngestConfig(str(root / "lake"), str(root / "dest"), id_column="id", calibration_samples=120,
                     unit_rows=30, encoder=EncoderConfig(batch_size=32), progress=False))
    return root / "dest", docs[150:270]


def _lines(capsys):
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_json_output_is_one_object_per_query(dataset, capsys):
    dest, docs = dataset
    assert cli(["search", str(dest), docs[3][1], "-k", "4", "--json"]) == 0
    (record,) = _lines(capsys)
    assert record["query"] == docs[3][1] and len(record["hits"]) == 4
    assert all(set(h) == {"id", "score"} for h in record["hits"])
    top = record["hits"][0]
    assert top["id"] == docs[3][0] and isinstance(top["score"], float)
    scores = [h["score"] for h in record["hits"]]
    assert scores == sorted(scores, reverse=True)


def test_queries_file_order_is_preserved(dataset, capsys, tmp_path):
    dest, docs = dataset
    picked = [(i, " ".join(t.split())) for i, t in (docs[j] for j in (90, 4, 57, 33, 4, 110, 12))]  # a repeat
    path = tmp_path / "queries.txt"
    lines = [t for _, t in picked]
    path.write_text("\n".join(lines[:3]) + "\n\n" + "\n".join(lines[3:]) + "\n")  # a blank line is skipped
    assert cli(["search", str(dest), "--queries-file", str(path), "-k", "3", "--json"]) == 0
    records = _lines(capsys)
    assert [r["query"] for r in records] == lines
    assert [r["hits"][0]["id"] for r in records] == [i for i, _ in picked]


def test_neighbours_of_uses_each_sampled_document_as_query(dataset, capsys):
    dest, docs = dataset
    assert cli(["search", str(dest), "--neighbours-of", "3", "-k", "2", "--json"]) == 0
    records = _lines(capsys)
    assert len(records) == 3 and len({r["of"] for r in records}) == 3
    assert all(r["hits"][0]["id"] == r["of"] and r["query"] == dict(docs)[r["of"]] for r in records)
    assert cli(["search", str(dest), "--neighbours-of", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("neighbours of ") and "   1. " in out


def test_neighbours_in_a_source_file_changed_since_the_version_are_refused(dataset, docs, capsys, tmp_path):
    """A source file rewritten since the version was built gave each sampled document another's
    text (its rows reversed), or None (cut short), and the search ran on. Now the ids read with
    the texts are checked, and the command stops naming the row; with no id column, the size."""
    import re
    import shutil

    import pyarrow.parquet as pq

    dest, _ = dataset
    lake = tmp_path / "lake"
    shutil.copytree(dest.parent / "lake", lake)
    args = ["search", str(dest), "--neighbours-of", "20", "--source", str(lake), "--json"]
    assert cli(args) == 0 and len(_lines(capsys)) == 20  # a copy of the lake: the same documents
    part = lake / "part-00000.parquet"
    table = pq.read_table(part)
    pq.write_table(table.take(list(range(table.num_rows))[::-1]), part)
    assert cli(args) == 2
    changed = "it changed since version 1 was built; pass --source with the lake as it was then"
    assert re.search(r"row \d+ of source file part-00000\.parquet holds document '[^']+', not '[^']+': "
                     + re.escape(changed), capsys.readouterr().err)
    pq.write_table(table.slice(0, 3), part)
    assert cli(args) == 2
    assert re.search(r"source file part-00000\.parquet has no row \d+ \(document '[^']+'\): " + re.escape(changed),
                     capsys.readouterr().err)

    # No id column: a document's id is its file and row, so the file's size is what is checked.
    write_parquet_lake(tmp_path / "plain", docs[:20], files=1)
    run(IngestConfig(str(tmp_path / "plain"), str(tmp_path / "plain-dest"), calibration_samples=20, unit_rows=10,
                     encoder=EncoderConfig(batch_size=32), progress=False))
    plain = ["search", str(tmp_path / "plain-dest"), "--neighbours-of", "2", "--json"]
    assert cli(plain) == 0 and {r["of"].split(":")[0] for r in _lines(capsys)} == {"part-00000.parquet"}
    table = pq.read_table(tmp_path / "plain" / "part-00000.parquet")
    pq.write_table(table.take(list(range(20))[::-1]), tmp_path / "plain" / "part-00000.parquet",
                   compression="none")
    assert cli(plain) == 2
    assert re.search(r"source file part-00000\.parquet is \d+ bytes, \d+ when read: " + re.escape(changed),
                     capsys.readouterr().err)


def test_ray_flag_gives_the_same_hits(dataset, capsys, ray_session):
    dest, docs = dataset
    args = ["search", str(dest), docs[20][1], "-k", "5", "--json"]
    assert cli(args) == 0 and cli(args + ["--ray", "--actors", "2"]) == 0
    threaded, actors = _lines(capsys)
    assert threaded == actors


def test_errors_exit_2_with_a_message(dataset, capsys):
    dest, docs = dataset
    assert cli(["search", str(dest), "q", "--version", "7"]) == 2
    assert "version 7" in capsys.readouterr().err
    assert cli(["search", str(dest.parent / "nowhere"), "q"]) == 2
    assert "no committed version" in capsys.readouterr().err
    (dest.parent / "latin1.txt").write_bytes(b"caf\xe9\n")
    assert cli(["search", str(dest), "--queries-file", str(dest.parent / "latin1.txt")]) == 2
    assert f"queries file {dest.parent / 'latin1.txt'} is not UTF-8 text (byte 3: b'\\xe9')" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args([str(dest)])  # no query, no file, no --neighbours-of
    for blank in ("", "  \n"):  # searched, and answered with arbitrary hits
        with pytest.raises(SystemExit):
            parse_args([str(dest), blank])
        assert "the query is blank: give a text to search for" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args([str(dest), "q", "--rescore-multiplier", "0"])
    # 0 was read as the default, and a negative --nprobe reached FAISS after the model had loaded.
    for flag, value, name in (("--nprobe", "-1", "nprobe"), ("--nprobe", "0", "nprobe"),
                              ("--ef-search", "0", "ef_search"), ("--ef-search", "-4", "ef_search"),
                              ("--actors", "0", "--actors")):
        with pytest.raises(SystemExit) as refused:
            parse_args([str(dest), "q", flag, value, *(["--ray"] if flag == "--actors" else [])])
        assert refused.value.code == 2 and f"{name} must be >= 1 (or left out" in capsys.readouterr().err


def test_a_search_breadth_option_the_indexes_do_not_read_is_refused(dataset, capsys):
    """--ef-search on flat shard indexes (or with --index int8) was accepted and ignored."""
    dest, docs = dataset
    assert cli(["search", str(dest), "q", "--ef-search", "64"]) == 2
    assert capsys.readouterr().err == (
        "quantlake search: error: --ef-search (ef_search): only for HNSW shard indexes, not IndexBinaryFlat "
        f"(--index-type flat), which version 1 of {dest} holds; leave it out: a flat index compares every row\n")
    assert cli(["search", str(dest), "q", "--index", "int8", "--nprobe", "4"]) == 2
    assert capsys.readouterr().err == (
        "quantlake search: error: --nprobe (nprobe): only for IVF shard indexes, not the int8 indexes that --index "
        "int8 (index='int8') builds; leave it out\n")
    with Searcher.open(str(dest)) as searcher:  # the Python API refuses it the same way, before encoding
        with pytest.raises(ValueError, match=r"^--nprobe \(nprobe\): only for IVF shard indexes, not IndexBinaryFlat"):
            searcher.search("q", k=3, nprobe=4)
        assert searcher._encoder is None and len(searcher.search("q", k=3)) == 3


def test_the_query_may_follow_the_options(tmp_path):
    for argv in ([str(tmp_path), "-k", "3", "what is a socket"], ["-k", "3", str(tmp_path), "what is a socket"],
                 [str(tmp_path), "--version", "2", "--rescore", "bits", "what is a socket", "--json"]):
        cfg = parse_args(argv)
        assert (cfg.dest, cfg.query) == (str(tmp_path), "what is a socket")
    assert (cfg.version, cfg.options.rescore, cfg.json) == (2, "bits", True)
    assert parse_args([str(tmp_path), "-k", "3", "--queries-file", "q.txt"]).query is None


def test_the_table_keeps_each_hit_on_one_line_whatever_its_id():
    hits = [Hit("two\nlines", 0.9, "a" * 32, 0, 0), Hit("tab\there é", 0.8, "b" * 32, 1, 1),
            Hit("plain", 0.7, "c" * 32, 2, 2)]
    lines = format_results([QueryResult("q", hits, of=hits[0])]).splitlines()
    assert lines[0] == "neighbours of two\\nlines: q"
    assert [line.split()[2] for line in lines[1:]] == ["two\\nlines", "tab\\there", "plain"]
    assert "tab\\there é" in lines[2] and len(lines) == 4


def test_an_option_of_a_mode_not_asked_for_is_refused(capsys):
    """--actors without --ray, --source or --seed without --neighbours-of were taken and ignored
    (the Python API refuses the other backend's options the same way)."""
    for args, words in ((["--actors", "4"], "--actors is the number of Ray actors: it needs --ray"),
                        (["--source", "/elsewhere"], "--source is for --neighbours-of"),
                        (["--seed", "3"], "--seed is for --neighbours-of")):
        with pytest.raises(SystemExit) as refused:
            parse_args(["dest", "q", *args])
        assert refused.value.code == 2 and words in capsys.readouterr().err
    assert parse_args(["dest", "q", "--ray", "--actors", "4"]).actors == 4
    assert parse_args(["dest", "--neighbours-of", "2", "--source", "/x", "--seed", "3"]).seed == 3
