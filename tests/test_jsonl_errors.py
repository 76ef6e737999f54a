"""A JSON Lines file with a malformed line far into it: a clear error, and nothing committed."""
import contextlib
import io
import json
import re

import pytest

from jobs.cli import main as cli

from conftest import write_parquet_lake

LINES, BAD = 16_000, 15_000  # about 5 MB: the bad line is past the first block any reader parses


@pytest.fixture(scope="module")
def failed(tmp_path_factory, docs, ray_session):
    """`quantlake ingest` of a lake whose big.jsonl has one broken line near its end."""
    root = tmp_path_factory.mktemp("jsonl-errors")
    write_parquet_lake(root / "lake", docs[:40], files=1, row_group_size=20)
    filler = " ".join(t for _, t in docs[40:44])[:300]
    with open(root / "lake" / "big.jsonl", "w") as f:
        for i in range(LINES):
            if i == BAD:
                f.write('{"id": "doc-15000", "text": "an unterminated string\n')
            else:
                f.write(json.dumps({"id": f"doc-{i}", "text": f"{i} {filler}"}) + "\n")
    assert (root / "lake" / "big.jsonl").stat().st_size > 4 << 20  # more than one 4 MiB read block
    dest = root / "dest"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = cli(["ingest", str(root / "lake"), str(dest), "--id-column", "id", "--calibration-samples", "50",
                      "--no-progress"])
    return status, err.getvalue(), dest


def test_the_job_fails_and_commits_nothing(failed):
    status, err, dest = failed
    assert status in (1, 2) and err.startswith("quantlake ingest: error: "), err
    for folder in ("versions", "shards", "rejects", "ranges"):
        assert not (dest / folder).exists(), f"{folder}/ was written"


def test_the_error_names_the_file_and_line(failed):
    status, err, dest = failed
    assert status == 2  # bad input, like the other source errors
    assert re.search(rf"big\.jsonl.* line {BAD + 1}\b", err), err
    assert len(err.splitlines()) == 1 and "ray::" not in err and "Traceback" not in err
