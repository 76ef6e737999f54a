"""`quantlake inspect` on a real ingested dataset: report, JSON, errors; only committed versions."""
import json

from jobs.cli import main as cli
from workers.lake.versions import commit, read_version
from workers.lake.storage import url_to_fs


def test_report_shows_versions_shards_rows_and_bytes(small_dataset, capsys):
    dest, _ = small_dataset
    assert cli(["inspect", str(dest)]) == 0
    out = capsys.readouterr().out
    doc = json.loads((dest / "versions" / "00000001.json").read_text())
    lines = out.splitlines()
    assert lines[0] == f"dataset {dest}: 1 committed version(s)"
    assert lines[2].split()[:2] == ["1", doc["created_at"]] and lines[2].split()[-1] == "all-MiniLM-L6-v2"
    assert f"version 1 (latest), committed {doc['created_at']} by writer {doc['writer']}" in out
    assert f"ranges     {doc['ranges']['id']} (minmax), ranges/{doc['ranges']['id']}.json" in out
    kept = sum(r["bytes"] for r in doc["scans"])  # 93 rows, 91 valid: 91 x 24 bytes and 3 headers
    assert 91 * 24 < kept <= 91 * 24 + 3 * 256
    assert f"source     {doc['source']['url']}: 3 file(s), 3 kept scan(s) of {kept / 1024:.1f} KiB (scans/)" in out
    assert "rows       91 documents, 2 rejects, 93 rows read" in out
    # 91 documents x 384 dimensions: float32 139776 B, int8 34944 B, ubinary 4368 B
    assert "bytes      float32 136.5 KiB, int8 34.1 KiB, ubinary 4.3 KiB; stored" in out
    assert f"shards     {len(doc['shards'])}:" in out
    for s in doc["shards"]:
        assert any(line.split()[:3] == [s["path"], str(s["rows"]), "rows"] for line in lines)


def test_json_is_the_committed_manifest(small_dataset, capsys):
    dest, _ = small_dataset
    assert cli(["inspect", str(dest), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((dest / "versions" / "00000001.json").read_text())
    assert sum(s["rows"] for s in printed["shards"]) == 91
    assert all(s["path"].startswith("shards/") and (dest / s["path"]).is_file() for s in printed["shards"])


def test_given_version_and_uncommitted_files(copy_dataset, capsys):
    fs, root = url_to_fs(str(copy_dataset))
    v1 = read_version(fs, root, 1).to_json()
    smaller = {k: v for k, v in v1.items() if k not in ("version", "writer", "created_at")}
    smaller.update(parent=1, shards=v1["shards"][:1])
    assert commit(fs, root, smaller) == 2
    (copy_dataset / "versions" / "00000003.json.tmp-1").write_text("{")  # a writer killed mid-way
    assert cli(["inspect", str(copy_dataset), "--json", "--version", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == 1
    assert cli(["inspect", str(copy_dataset)]) == 0
    out = capsys.readouterr().out
    assert "2 committed version(s)" in out and "version 2 (latest)" in out and "shards     1:" in out
    assert cli(["inspect", str(copy_dataset), "--version", "3"]) == 2
    assert f"version 3 of {copy_dataset} does not exist; committed versions: 1, 2" in capsys.readouterr().err


def test_a_source_file_name_with_a_line_break_stays_on_its_shards_line(copy_dataset, capsys):
    fs, root = url_to_fs(str(copy_dataset))
    v1 = read_version(fs, root, 1).to_json()
    doc = {k: v for k, v in v1.items() if k not in ("version", "writer", "created_at")}
    doc["shards"][0]["source"]["file"] = "two\nlines.jsonl"
    assert commit(fs, root, {**doc, "parent": 1}) == 2
    assert cli(["inspect", str(copy_dataset)]) == 0
    [line] = [x for x in capsys.readouterr().out.splitlines() if doc["shards"][0]["path"] in x]
    assert line.endswith(f"  two\\nlines.jsonl [{doc['shards'][0]['source']['row_start']}, "
                         f"{doc['shards'][0]['source']['row_stop']})")


def test_no_dataset(tmp_path, capsys):
    assert cli(["inspect", str(tmp_path / "nothing")]) == 2
    assert f"no committed version under {tmp_path / 'nothing'}" in capsys.readouterr().err


def test_manifest_strings_are_shown_escaped_and_options_no_job_writes_left_out(copy_dataset, capsys):
    """A manifest is input: its strings are printed escaped (a line break or a terminal escape in
    a model name forges no line), and `options` or `rollback_of` of a form no job writes are left
    out of the report instead of stopping it (inspect raised AttributeError on such options)."""
    v1 = json.loads((copy_dataset / "versions" / "00000001.json").read_text())
    forged = "m\n  version 7 (latest), committed 2024 by writer FORGED\x1b[2K"
    v2 = {**v1, "version": 2, "parent": 1, "writer": "w\nFORGED", "created_at": "2026\nFORGED",
          "model": {**v1["model"], "name": forged}, "options": "x", "rollback_of": "1\nFORGED"}
    (copy_dataset / "versions" / "00000002.json").write_text(json.dumps(v2))
    for command in ("inspect", "history"):
        assert cli([command, str(copy_dataset)]) == 0
        out = capsys.readouterr().out
        assert "FORGED\\x1b[2K" in out and "\x1b" not in out, out  # shown, escaped
        assert not [x for x in out.splitlines() if x.lstrip().startswith(("FORGED", "version 7"))], out
        assert "excluding" not in out and "rollback" not in out
    assert cli(["history", str(copy_dataset), "--json"]) == 0
    assert [e["rollback_of"] for e in json.loads(capsys.readouterr().out)] == [None, None]
