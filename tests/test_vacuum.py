"""`quantlake vacuum` on real files: only unreferenced, old enough files go; dry run; --retain."""
import json
import os
import time

import pytest

from jobs.cli import main as cli
from jobs.common import joined_negative
from jobs.vacuum import parse_duration
from workers.lake.dataset import open_version
from workers.lake.storage import url_to_fs
from workers.lake.versions import commit, read_version
from lakes import verify_version

HOUR = 3600


def _age(path, seconds):
    t = time.time() - seconds
    os.utime(path, (t, t))


def _all_files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())



ORPHAN = "ab" * 16  # a shard id no version lists
FRESH = "cd" * 16
RANGES = "ef" * 32
TMP = "0123456789abcdef" * 2  # the uuid4 hex of a temporary's name


@pytest.fixture
def littered(copy_dataset):
    """The dataset with leftovers of failed jobs, most of them two hours old, and files of
    other origins (which vacuum must keep whatever their age)."""
    d = copy_dataset
    old = {f"shards/{ORPHAN}.parquet": b"o" * 10, f"shards/{ORPHAN}.faiss": b"o" * 20,
           f"shards/{ORPHAN}.json": b"{}", f"rejects/{ORPHAN}.parquet": b"r" * 5,
           f"ranges/{RANGES}.json": b"{}", f"versions/00000002.json.tmp-{TMP}": b"{",
           "versions/notes.txt": b"someone's notes", "README.txt": b"not a dataset file",
           "shards/orphan.parquet": b"not named by a shard id", "ranges/0000abcd.json": b"{}",
           f"scans/{ORPHAN}.npy": b"s" * 3, "scans/notes.npy": b"n"}
    sid = json.loads((d / "versions" / "00000001.json").read_text())["shards"][0]["id"]
    old[f"shards/{sid}.parquet.tmp-{TMP}"] = b"t" * 7
    for rel, data in old.items():
        (d / rel).write_bytes(data)
        _age(d / rel, 2 * HOUR)
    (d / "shards" / f"{FRESH}.parquet").write_bytes(b"a running job's shard")
    return d, sid


def test_dry_run_lists_and_run_deletes_only_old_unreferenced_files(littered, capsys):
    d, sid = littered
    before = _all_files(d)
    assert cli(["vacuum", str(d), "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    expected = [{"path": f"rejects/{ORPHAN}.parquet", "bytes": 5}, {"path": f"ranges/{RANGES}.json", "bytes": 2},
                {"path": f"shards/{ORPHAN}.faiss", "bytes": 20}, {"path": f"shards/{ORPHAN}.json", "bytes": 2},
                {"path": f"shards/{ORPHAN}.parquet", "bytes": 10}, {"path": f"scans/{ORPHAN}.npy", "bytes": 3},
                {"path": f"shards/{sid}.parquet.tmp-{TMP}", "bytes": 7},
                {"path": f"versions/00000002.json.tmp-{TMP}", "bytes": 1}]
    assert sorted(plan["deleted"], key=lambda x: x["path"]) == sorted(expected, key=lambda x: x["path"])
    assert plan["dry_run"] is True and plan["bytes_deleted"] == 50 and plan["retained_versions"] == [1]
    assert plan["kept_too_recent"] == [f"shards/{FRESH}.parquet"]
    assert plan["kept_foreign"] == ["ranges/0000abcd.json", "scans/notes.npy", "shards/orphan.parquet",
                                    "versions/notes.txt"]
    assert _all_files(d) == before

    assert cli(["vacuum", str(d)]) == 0
    out = capsys.readouterr().out
    assert f"deleted shards/{ORPHAN}.parquet (10 bytes)" in out
    assert "kept shards/orphan.parquet: not a name quantlake writes" in out
    assert out.splitlines()[-1] == (f"vacuum {d}: deleted 8 file(s), 50 bytes; retained version(s) 1; "
                                    "kept 1 unreferenced file(s) too recent to delete; "
                                    "kept 4 file(s) quantlake does not write")
    assert _all_files(d) == sorted(set(before) - {e["path"] for e in expected})
    assert {"versions/notes.txt", "README.txt", f"shards/{FRESH}.parquet", "shards/orphan.parquet",
            "ranges/0000abcd.json", "scans/notes.npy"} <= set(_all_files(d))
    # every file the version needs is still there and verifies, its kept scans too
    kept = {r.path for r in verify_version(str(d)).manifest.scans}
    assert len(kept) == 3 and kept <= set(_all_files(d))


def _drop_a_shard(d) -> dict:
    """Commit version 2 of dataset `d`: version 1 less its last shard, whose record is returned."""
    fs, root = url_to_fs(str(d))
    v1 = read_version(fs, root, 1).to_json()
    v2 = {k: v for k, v in v1.items() if k not in ("version", "writer", "created_at")}
    v2.update(parent=1, shards=v1["shards"][:-1])
    assert commit(fs, root, v2) == 2
    return v1["shards"][-1]


def test_retain_drops_old_versions_and_what_only_they_needed(copy_dataset, capsys):
    d = copy_dataset
    for p in d.rglob("*"):  # written now (the copy keeps the session dataset's times)
        os.utime(p)
    dropped = _drop_a_shard(d)
    assert cli(["vacuum", str(d), "--retain", "1"]) == 0  # default --older-than 1h: all too new
    assert "deleted 0 file(s)" in capsys.readouterr().out and (d / "versions/00000001.json").exists()

    # The expired manifest and every file of the shard only it listed (a completion sidecar too).
    only_v1 = {"versions/00000001.json", dropped["path"], dropped["index"]} | \
        ({dropped["rejects"]["path"]} if dropped["rejects"] else set())
    only_v1 |= {p for p in _all_files(d) if p.startswith(f"shards/{dropped['id']}.")}
    assert cli(["vacuum", str(d), "--retain", "1", "--older-than", "0s", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert (res["retained_versions"], res["expired_versions"]) == ([2], [1])
    assert {e["path"] for e in res["deleted"]} == only_v1
    assert res["deleted"][0]["path"] == "versions/00000001.json"  # manifests go first
    assert not (d / "versions/00000001.json").exists() and not (d / dropped["path"]).exists()
    assert verify_version(str(d)).version == 2
    with pytest.raises(FileNotFoundError, match="version 1 of .* does not exist"):
        open_version(str(d), 1)


def test_a_rollback_to_a_version_whose_shards_were_deleted_commits_nothing_and_says_why(copy_dataset, capsys):
    d = copy_dataset
    dropped = _drop_a_shard(d)
    (d / dropped["index"]).unlink()  # as a storage lifecycle rule would
    assert cli(["rollback", str(d), "--to", "1"]) == 1
    assert capsys.readouterr().err == (
        f"quantlake rollback: error: refusing to commit a version of {d}: {dropped['index']} is missing. Nothing was "
        "committed; version 1 can no longer be rolled back to, as files it lists were deleted since (by hand, or "
        "a storage lifecycle rule); `quantlake history` lists the versions to choose from\n")
    assert sorted(os.listdir(d / "versions")) == ["00000001.json", "00000002.json"]


@pytest.mark.parametrize("winner", ["the same rollback", "another version"])
def test_a_rollback_that_loses_a_race(copy_dataset, capsys, monkeypatch, winner):
    """Another writer commits between the rollback's look at the versions and its commit (its
    commit is run first, for real). The same rollback winning is this one done (three at once
    printed one success, one no-op and one failure); other content is a conflict in a rollback's
    words (it spoke of shards to reuse and --ranges, as to an ingest)."""
    import jobs.rollback

    d = copy_dataset
    fs, root = url_to_fs(str(d))
    _drop_a_shard(d)
    real, raced = jobs.rollback.commit, []

    def racing(fs_, root_, draft, **kw):
        if raced:  # the winner's own commit
            return real(fs_, root_, draft, **kw)
        raced.append(True)
        if winner == "the same rollback":
            assert jobs.rollback.run(str(d), 1) == (3, True)
        else:
            doc = read_version(fs, root, 2).to_json()
            other = {k: v for k, v in doc.items() if k not in ("version", "writer", "created_at")}
            assert real(fs, root, {**other, "parent": 2, "shards": doc["shards"][:-1]}) == 3
        return real(fs_, root_, draft, **kw)

    monkeypatch.setattr(jobs.rollback, "commit", racing)
    if winner == "the same rollback":
        assert cli(["rollback", str(d), "--to", "1"]) == 0
        assert capsys.readouterr().out == ("nothing committed: version 3, the latest, already holds the content of "
                                           "version 1 (it is a rollback to it, or holds the same shards)\n")
    else:
        assert cli(["rollback", str(d), "--to", "1"]) == 1
        err = capsys.readouterr().err
        assert err.startswith("quantlake rollback: error: version 3 was committed (writer ")
        assert err.endswith(") while this rollback to version 1 was being committed: nothing was committed, as it "
                            "would undo a state you have not seen; check `quantlake history`, then run the rollback "
                            "again to roll back on top of it\n")
    assert sorted(os.listdir(d / "versions")) == ["00000001.json", "00000002.json", "00000003.json"]


def test_durations_and_bad_options(capsys):
    assert [parse_duration(t) for t in ("1h", "30m", "45s", "2d", "90", "0.5h")] == [3600, 1800, 45, 172800, 90, 1800]
    with pytest.raises(ValueError, match="cannot read duration 'soon'"):
        parse_duration("soon")
    # A negative age is refused in words, however it is written (argparse took `-5m` for an option).
    for args in (["--older-than", "-5m"], ["--older-than=-5m"]):
        with pytest.raises(SystemExit):
            cli(["vacuum", "x", *args])
        assert "quantlake vacuum: error: --older-than must not be negative, got -300.0 s" in capsys.readouterr().err
    # Only a value after the option is joined to it, and only one that starts like a number.
    assert joined_negative(["-5", "--older-than", "-5m", "--older-than", "--json", "-1"], "--older-than") == \
        ["-5", "--older-than=-5m", "--older-than", "--json", "-1"]
    with pytest.raises(SystemExit):
        cli(["vacuum", "x", "--retain", "0"])
    assert "--retain must be >= 1" in capsys.readouterr().err
