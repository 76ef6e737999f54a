"""What `quantlake ingest` prints: a progress bar, then a summary whose figures are the run's."""
import io
import json
import re
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import jobs.ingest
from jobs.cli import main as cli
from jobs.common import format_fidelity

from conftest import write_parquet_lake

pytestmark = pytest.mark.usefixtures("shared_encoders")  # conftest: warm encoder actors across the module's jobs

MIB = 1 << 20
ARGS = ["--id-column", "id", "--calibration-samples", "60", "--unit-rows", "25", "--batch-size", "16"]


@pytest.fixture(scope="module")
def lake(tmp_path_factory, docs):
    """100 documents in 2 Parquet files, and a JSON Lines file with 2 rows to reject."""
    root = tmp_path_factory.mktemp("output")
    write_parquet_lake(root / "lake", docs[:100], files=2, row_group_size=25)
    (root / "lake" / "z.jsonl").write_text(json.dumps({"id": "blank", "text": "  "}) + "\n"
                                           + json.dumps({"id": docs[0][0], "text": "a duplicate id"}) + "\n")
    return root


class _Captured:
    """stdout and stderr of the block (capsys is function-scoped; the ingest runs once per module)."""

    def __enter__(self):
        self._saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = self._out, self._err = io.StringIO(), io.StringIO()
        return self

    def __exit__(self, *exc):
        sys.stdout, sys.stderr = self._saved
        self.out, self.err = self._out.getvalue(), self._err.getvalue()


@pytest.fixture(scope="module")
def human(lake, ray_session, shared_encoders):
    """`quantlake ingest` without --json: (stdout, stderr, the summary that run returned)."""
    runs = []

    def recording(cfg):
        runs.append(real(cfg))
        return runs[-1]

    real = jobs.ingest.run
    with pytest.MonkeyPatch.context() as mp, _Captured() as cap:
        mp.setattr(jobs.ingest, "run", recording)
        status = cli(["ingest", str(lake / "lake"), str(lake / "dest"), *ARGS])
    assert status == 0 and len(runs) == 1, cap.err
    # What --json prints for a run: its summary as JSON.
    return cap.out, cap.err, json.loads(json.dumps(runs[0].summary))


def test_progress_bar_counts_every_row_read(human):
    out, err, s = human
    assert s["rows_read"] == 102
    assert re.search(r"ingest: 100%\|[^|]*\| 102/102 \[", err), err
    assert "ingest:" not in out  # the bar goes to stderr, the summary alone to stdout


def test_summary_figures_are_those_of_the_run(human, lake):
    out, err, s = human
    lines = out.splitlines()
    assert len(lines) == 5, out
    m = re.fullmatch(r"committed version (\d+): (\d+) documents, (\d+) rejects \(of (\d+) rows read\), "
                     r"(\d+) shards \((\d+) reused from an earlier run of the same job\)", lines[0])
    assert m and tuple(map(int, m.groups())) == (1, 100, 2, 102, 5, 0)
    assert (s["version"], s["documents"], s["rejects"], s["rows_read"], s["shards"], s["shards_reused"]) == \
        (1, 100, 2, 102, 5, 0)
    m = re.fullmatch(r"vectors: float32 ([\d.]+) MiB -> int8 ([\d.]+) MiB \(([\d.]+)x\) \+ ubinary ([\d.]+) MiB "
                     r"\(([\d.]+)x\); ([\d.]+) MiB stored with ids and indexes", lines[1])
    assert m, lines[1]
    assert m.groups() == tuple(f"{s[k] / MIB:.2f}" for k in ("bytes_float32", "bytes_int8")) + \
        (str(s["compression_int8"]), f"{s['bytes_ubinary'] / MIB:.2f}", str(s["compression_ubinary"]),
         f"{s['bytes_stored'] / MIB:.2f}")
    m = re.fullmatch(r"throughput: ([\d.]+) documents/s over ([\d.]+) s \(calibration ([\d.]+) s; encode ([\d.]+) s, "
                     r"quantize ([\d.]+) s, write ([\d.]+) s summed over the (\d+) shard\(s\) this run wrote\); "
                     r"(\d+) values clipped in them", lines[2])
    assert m, lines[2]
    assert tuple(map(float, m.groups()[:6])) == tuple(s[k] for k in ("docs_per_s", "wall_s", "calibrate_s",
                                                                      "encode_s", "quantize_s", "write_s"))
    assert (int(m.group(7)), int(m.group(8))) == (s["shards_written"], s["clipped_values"]) == (5, s["clipped_values"])
    assert set(s["fidelity"]) == {"queries", "k", "recall_int8", "recall_ubinary_int8"}
    assert lines[3] == f"ranges {s['ranges_id']}; {format_fidelity(s['fidelity'])}"
    assert lines[4] == f"manifest: {s['manifest']}"
    assert s["manifest"] == str(lake / "dest" / "versions" / "00000001.json")


def test_summary_figures_agree_with_the_committed_version(human, lake):
    out, err, s = human
    version = json.loads((lake / "dest" / "versions" / "00000001.json").read_text())
    stored = sum(x["bytes"] + x["index_bytes"] for x in version["shards"])
    assert (s["bytes_float32"], s["bytes_int8"], s["bytes_ubinary"], s["bytes_stored"]) == \
        (100 * 384 * 4, 100 * 384, 100 * 48, stored)
    assert (s["compression_int8"], s["compression_ubinary"]) == (4.0, 32.0)
    assert s["docs_per_s"] == round(100 / s["wall_s"], 2) and 0 < s["calibrate_s"] < s["wall_s"]
    assert s["ranges_id"] == version["ranges"]["id"] and s["clipped_values"] == sum(version["clipped_per_dim"])
    assert s["encode_s"] == round(sum(x["stats"]["encode_s"] for x in version["shards"]), 3) > 0


def test_json_summary_holds_ratios_and_throughput(human, lake, capsys):
    ranges = lake / "dest" / "ranges" / f"{human[2]['ranges_id']}.json"
    assert cli(["ingest", str(lake / "lake"), str(lake / "dest"), *ARGS, "--ranges", str(ranges),
                "--no-progress", "--json"]) == 0
    out, err = capsys.readouterr()
    s = json.loads(out)
    assert err == ""  # --no-progress: no bar
    assert (s["version"], s["documents"], s["shards"], s["shards_reused"]) == (2, 100, 5, 5)  # a rerun
    assert (s["compression_int8"], s["compression_ubinary"]) == (4.0, 32.0)
    # Its figures are its own work: it wrote no shard (the first run's stats are not counted again).
    assert (s["shards_written"], s["documents_written"], s["docs_per_s"], s["encode_s"]) == (0, 0, 0.0, 0.0)
    assert jobs.ingest.format_summary(s).splitlines()[2] == \
        f"throughput: no shard written in {s['wall_s']} s; the version's 5 shard(s): 5 reused from an earlier run " \
        "of the same job"
    assert s["manifest"] == str(lake / "dest" / "versions" / "00000002.json")


def test_the_summary_and_the_manifest_count_only_the_precisions_stored(human, lake, tmp_path, capsys):
    # --precisions ubinary stores no int8 column: no int8 size or ratio, in the summary or the manifest.
    ranges = lake / "dest" / "ranges" / f"{human[2]['ranges_id']}.json"
    assert cli(["ingest", str(lake / "lake"), str(tmp_path / "dest"), *ARGS, "--ranges", str(ranges),
                "--precisions", "ubinary", "--no-progress"]) == 0
    lines = capsys.readouterr().out.splitlines()
    stored = json.loads((tmp_path / "dest" / "versions" / "00000001.json").read_text())["bytes"]
    assert stored == {"float32": 100 * 384 * 4, "ubinary": 100 * 48, "stored": stored["stored"]}
    assert lines[1] == (f"vectors: float32 {100 * 384 * 4 / MIB:.2f} MiB -> ubinary {100 * 48 / MIB:.2f} MiB (32.0x); "
                        f"{stored['stored'] / MIB:.2f} MiB stored with ids and indexes")
    # The ranges' fidelity speaks of int8 searches, which this version has none of: it says so.
    unmeasured = ("; this version stores no int8 vectors, so neither is a search of it: it is searched with "
                  "--rescore bits or none, which this does not measure")
    assert lines[3].startswith(f"ranges {human[2]['ranges_id']}; fidelity on ") and lines[3].endswith(unmeasured)
    assert cli(["history", str(tmp_path / "dest")]) == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith(unmeasured)
    assert unmeasured not in format_fidelity(human[2]["fidelity"], ["int8", "ubinary"])
    # Searching it: what needs int8 vectors is refused naming the options that do not (the int8
    # index was a KeyError, and the default search named a shard and Python keywords only).
    dest = str(tmp_path / "dest")
    assert cli(["search", dest, "a query", "--index", "int8"]) == 2
    assert capsys.readouterr().err == (
        f"quantlake search: error: version 1 of {dest} holds no int8 vectors (ingested with precisions ubinary): "
        "search it with the binary index (the default; index='binary'), not --index int8\n")
    for rescore in ("int8", "int8-raw"):  # int8-raw was a KeyError
        assert cli(["search", dest, "a query", "--rescore", rescore]) == 2
        assert capsys.readouterr().err == (
            f"quantlake search: error: version 1 of {dest} holds no int8 vectors to rescore with (ingested with "
            "precisions ubinary): search with --rescore bits or --rescore none (rescore='bits' or 'none')\n")
    assert cli(["search", dest, "a query", "--rescore", "bits", "-k", "3", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["hits"]) == 3


def test_an_ingest_that_rejects_every_row_prints_no_ratio(human, lake, tmp_path, capsys):
    ranges = lake / "dest" / "ranges" / f"{human[2]['ranges_id']}.json"
    (tmp_path / "lake").mkdir()
    (tmp_path / "lake" / "blank.jsonl").write_text(json.dumps({"id": "a", "text": " "}) + "\n")
    assert cli(["ingest", str(tmp_path / "lake"), str(tmp_path / "dest"), *ARGS, "--ranges", str(ranges),
                "--no-progress", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert (s["documents"], s["rejects"], s["compression_int8"], s["compression_ubinary"]) == (0, 1, None, None)
    shown = jobs.ingest.format_summary(s)
    assert shown.splitlines()[1] == f"vectors: none (no document); {s['bytes_stored'] / MIB:.2f} MiB stored with " \
                                    "ids and indexes" and "None" not in shown, shown


def test_an_ingest_of_zero_row_files_says_the_version_holds_no_shard(human, lake, tmp_path, capsys):
    # Saved ranges (no calibration needed): the job runs, reads no row and writes no shard.
    ranges = lake / "dest" / "ranges" / f"{human[2]['ranges_id']}.json"
    (tmp_path / "lake").mkdir()
    pq.write_table(pa.table({"id": pa.array([], pa.string()), "text": pa.array([], pa.string())}),
                   tmp_path / "lake" / "empty.parquet")
    (tmp_path / "lake" / "empty.jsonl").write_text("")
    assert cli(["ingest", str(tmp_path / "lake"), str(tmp_path / "dest"), *ARGS, "--ranges", str(ranges),
                "--no-progress", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert (s["version"], s["rows_read"], s["shards"], s["shards_written"], s["shards_reused"]) == (1, 0, 0, 0, 0)
    # It said "the version's 0 shard(s): " and named nothing.
    assert jobs.ingest.format_summary(s).splitlines()[2] == \
        f"throughput: no shard written in {s['wall_s']} s; the version holds no shard (0 rows read)"
