"""`quantlake search` options end to end, each checked against a numpy brute-force reference:
--version of an older version, --rescore, --candidates, --index int8, --model."""
import json

import pytest

from jobs.cli import main as cli
from jobs.ingest import run
from reference import Stored, assert_same_hits, query_vectors
from workers.ingest.config import IngestConfig
from workers.embedding.encoder import BUNDLED, EncoderConfig, resolve_model

from conftest import write_parquet_lake

pytestmark = pytest.mark.usefixtures("shared_encoders")  # conftest: warm encoder actors across the module's jobs

K, MULT = 4, 2


@pytest.fixture(scope="module")
def versions(tmp_path_factory, docs, ray_session, shared_encoders):
    """Version 1: 80 documents in 2 files; version 2: a third file added, the ranges reused."""
    root = tmp_path_factory.mktemp("search-options")
    lake, dest = root / "lake", root / "dest"
    write_parquet_lake(lake, docs[:80], files=2, row_group_size=20)
    first = run(IngestConfig(str(lake), str(dest), id_column="id", calibration_samples=80, unit_rows=20,
                             encoder=EncoderConfig(batch_size=16), progress=False))
    write_parquet_lake(root / "more", docs[80:120], files=1, row_group_size=20)
    (root / "more" / "part-00000.parquet").rename(lake / "part-00002.parquet")
    second = run(IngestConfig(str(lake), str(dest), id_column="id", unit_rows=20,
                              ranges=str(dest / f"ranges/{first.summary['ranges_id']}.json"),
                              encoder=EncoderConfig(batch_size=16), progress=False))
    assert (first.version, second.version) == (1, 2)
    assert second.summary["shards_reused"] == first.summary["shards"] == 4  # only the new file was encoded
    # Queries: documents of each file (the last ones only in version 2), and free text.
    queries = [docs[i][1] for i in (3, 25, 47, 70, 81, 99, 118)] + [
        "parse a JSON document into Python objects", "run a command in a subprocess and wait for it",
        "temporary directory removed on exit", "decimal arithmetic with exact rounding"]
    path = root / "queries.txt"
    path.write_text("\n".join(" ".join(q.split()) for q in queries) + "\n")
    return dest, path, [" ".join(q.split()) for q in queries]


def _search(capsys, dest, queries_file, *options) -> list[dict]:
    assert cli(["search", str(dest), "--queries-file", str(queries_file), "-k", str(K),
                "--rescore-multiplier", str(MULT), "--json", *options]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_version_option_searches_the_older_version(versions, docs, capsys):
    dest, path, queries = versions
    q = query_vectors(queries)
    old, new = Stored(str(dest), 1), Stored(str(dest), 2)
    assert len(old.ids) == 80 and len(new.ids) == 120
    got = _search(capsys, dest, path, "--version", "1")
    for record, want in zip(got, old.search(q, K, MULT)):
        assert_same_hits(record["hits"], want)
        assert all(h["id"] in set(old.ids) for h in record["hits"])
    latest = _search(capsys, dest, path)
    for record, want in zip(latest, new.search(q, K, MULT)):
        assert_same_hits(record["hits"], want)
    # A document of the added file finds itself in version 2 only.
    assert latest[5]["hits"][0]["id"] == docs[99][0] and got[5]["hits"][0]["id"] != docs[99][0]
    assert cli(["search", str(dest), "q", "--version", "3"]) == 2
    assert "version 3" in capsys.readouterr().err


@pytest.mark.parametrize("candidates", ["asymmetric", "hamming"])
@pytest.mark.parametrize("rescore", ["int8", "int8-raw", "bits", "none"])
def test_rescore_and_candidates_equal_brute_force(versions, capsys, rescore, candidates):
    dest, path, queries = versions
    got = _search(capsys, dest, path, "--rescore", rescore, "--candidates", candidates)
    want = Stored(str(dest)).search(query_vectors(queries), K, MULT, candidates, rescore)
    assert [r["query"] for r in got] == queries
    for record, hits in zip(got, want):
        assert_same_hits(record["hits"], hits)


def test_int8_index_equals_exhaustive_int8_scores(versions, capsys):
    dest, path, queries = versions
    got = _search(capsys, dest, path, "--index", "int8")
    for record, want in zip(got, Stored(str(dest)).exhaustive_int8(query_vectors(queries), K)):
        assert_same_hits(record["hits"], want, tol=1e-4)  # FAISS sums in float32
    # Rescoring and candidate options the int8 indexes do not read were ignored silently.
    for option in (["--rescore", "bits"], ["--rescore", "int8-raw"], ["--candidates", "hamming"]):
        assert cli(["search", str(dest), "q", "--index", "int8", *option]) == 2
        assert f"{' '.join(option)}: only for the binary indexes, not the int8 indexes that --index int8" in \
            capsys.readouterr().err


@pytest.mark.parametrize("model", ["name", "folder"])
def test_model_given_explicitly(versions, capsys, tmp_path, model):
    dest, path, queries = versions
    given = BUNDLED if model == "name" else str(resolve_model(None))
    got = _search(capsys, dest, path, "--model", given)
    for record, want in zip(got, Stored(str(dest)).search(query_vectors(queries), K, MULT)):
        assert_same_hits(record["hits"], want)
    assert cli(["search", str(dest), "q", "--model", str(tmp_path / "no-such-model")]) == 2
    assert "is neither a local folder nor in the local Hugging Face cache" in capsys.readouterr().err
