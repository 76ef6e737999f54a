"""The commit protocol on local disk, memory:// and S3: create-only, races, rebase, lost replies."""
import json

import pytest

from workers.lake.storage import create_only, put_bytes
from workers.lake.versions import CommitConflict, commit, list_versions, read_version, version_path

from test_storage import _race

FILES = {"a.parquet": {"size": 10, "version": "1"}, "b.parquet": {"size": 20, "version": "1"}}


def manifest(writer, parent=None, ranges="r1", files=None, **extra):
    """A minimal valid full-snapshot manifest, as jobs.ingest builds it (one shard)."""
    return {"parent": parent, "writer": writer,
            "model": {"name": "m", "fingerprint": "sha256:00", "dim": 8, "normalize": True},
            "ranges": {"id": ranges, "path": f"ranges/{ranges}.json", "method": "minmax"},
            "precisions": ["int8", "ubinary"],
            "source": {"url": "s3://lake/raw", "text_column": "text", "id_column": None,
                       "files": files or FILES},
            "shards": [{"id": "s1", "path": "shards/s1.parquet", "index": "shards/s1.faiss", "rows": 3,
                        "sha256": "0" * 64, "index_sha256": "1" * 64, "bytes": 1, "index_bytes": 1,
                        "rejects": None}], **extra}


def _versions(store):
    return [(d["version"], d["parent"], d["writer"]) for d in
            (read_version(store.fs, store.root, n).to_json() for n in list_versions(store.fs, store.root))]


class TestCommitProtocol:
    def test_commits_chain_and_read_back(self, store):
        assert list_versions(store.fs, store.root) == []
        assert commit(store.fs, store.root, manifest("w1")) == 1
        assert commit(store.fs, store.root, manifest("w2", parent=1)) == 2
        assert _versions(store) == [(1, None, "w1"), (2, 1, "w2")]
        assert read_version(store.fs, store.root).number == 2
        assert store.files() == ["versions/00000001.json", "versions/00000002.json"]

    def test_messages_name_the_dataset_as_the_user_wrote_it(self, store):
        # fsspec hands out paths without their scheme: `bucket/ds` alone reads as a local path.
        where = {"file": store.root, "memory": "memory://" + store.root, "s3": store.url}[store.name]
        with pytest.raises(FileNotFoundError, match=f"^no committed version under {where}$"):
            read_version(store.fs, store.root)
        commit(store.fs, store.root, manifest("w1"))
        with pytest.raises(FileNotFoundError, match=f"^version 2 of {where} does not exist$"):
            read_version(store.fs, store.root, 2)

    def test_listing_ignores_temporaries_and_foreign_names(self, store):
        commit(store.fs, store.root, manifest("w1"))
        for name in ("00000002.json.tmp-abc", "notes.txt", "2.json", "00000003.json.bak"):
            put_bytes(store.fs, f"{store.root}/versions/{name}", b"{}")
        assert list_versions(store.fs, store.root) == [1]

    def test_racing_writers_of_the_same_dataset_all_commit_once_each(self, store):
        # Six jobs built on the empty dataset with the same listing: each loser rebases.
        out = _race(6, lambda i: commit(store.fs, store.root, manifest(f"writer-{i}")))
        assert all(isinstance(n, int) for n in out), out
        assert sorted(out) == [1, 2, 3, 4, 5, 6], out
        history = _versions(store)
        assert [v for v, _, _ in history] == [1, 2, 3, 4, 5, 6]
        assert [p for _, p, _ in history] == [None, 1, 2, 3, 4, 5]
        assert sorted(w for _, _, w in history) == [f"writer-{i}" for i in range(6)]
        assert {w: v for v, _, w in history} == {f"writer-{i}": out[i] for i in range(6)}
        assert store.files() == [f"versions/{n:08d}.json" for n in range(1, 7)]

    def test_race_with_other_ranges_has_one_winner_and_a_clear_conflict(self, store):
        out = _race(2, lambda i: commit(store.fs, store.root, manifest(f"w{i}", ranges=f"r{i}")))
        (won,) = [i for i in (0, 1) if out[i] == 1]
        lost = out[1 - won]
        assert isinstance(lost, CommitConflict), out
        assert (lost.version, lost.writer) == (1, f"w{won}")
        msg = str(lost)
        assert f"version 1 was committed by writer w{won}" in msg
        assert f"while this job (writer w{1 - won}) was building on an empty dataset" in msg
        assert f"ranges ('r{won}' there, 'r{1 - won}' here)" in msg
        assert f"rerun to build on version 1, reusing its ranges with --ranges <dest>/ranges/r{won}.json" in msg
        assert store.files() == ["versions/00000001.json"]

    def test_rebase_only_when_the_winner_changed_nothing_this_job_saw_differently(self, store):
        commit(store.fs, store.root, manifest("v1"))
        changed_b = {**FILES, "b.parquet": {"size": 21, "version": "2"}}
        commit(store.fs, store.root, manifest("v2", parent=1, files=changed_b))
        # This job started from version 1 and saw b.parquet changed the same way: rebased.
        assert commit(store.fs, store.root, manifest("v3", parent=1, files=changed_b)) == 3
        # This one also started from version 1 but still saw the old b.parquet: refused.
        with pytest.raises(CommitConflict, match=r"version 3 was committed by writer v3 .* "
                                                 r"it saw source files this job saw differently: b\.parquet"):
            commit(store.fs, store.root, manifest("stale", parent=1))
        assert [v for v, _, _ in _versions(store)] == [1, 2, 3]

    def test_a_winner_that_changed_shards_and_no_file_is_not_undone(self, store):
        """A rollback, or a run with other options, commits while a job built on the version
        before it: it changed shards, not files. Rebasing that job would bring the old shards back."""
        def shards(doc, *ids_files, **options):
            base = doc["shards"][0]
            doc["shards"] = [{**base, "id": i, "path": f"shards/{i}.parquet", "index": f"shards/{i}.faiss",
                              "source": {"file": f, "row_start": 0, "row_stop": 3}} for i, f in ids_files]
            if options:
                doc["options"] = options
            return doc

        fs, root = store.fs, store.root
        changed_b = {**FILES, "b.parquet": {"size": 21, "version": "2"}}
        commit(fs, root, shards(manifest("v1"), ("a1", "a.parquet"), ("b1", "b.parquet"), unit_rows=10))
        commit(fs, root, shards(manifest("v2", parent=1), ("a2", "a.parquet"), ("b2", "b.parquet"), unit_rows=5))
        commit(fs, root, shards(manifest("rollback", parent=2, rollback_of=1), ("a1", "a.parquet"),
                                ("b1", "b.parquet"), unit_rows=10), rebase=None)
        # A job from version 2 that saw b.parquet change keeps version 2's shard of a.parquet.
        stale = shards(manifest("stale", parent=2, files=changed_b), ("a2", "a.parquet"), ("b3", "b.parquet"),
                       unit_rows=5)
        with pytest.raises(CommitConflict, match=r"version 3 was committed by writer rollback .* it rolled the "
                                                 r"dataset back to version 1's content, which this job would undo"):
            commit(fs, root, stale)
        # A winner made with other options than the version both started from and this job.
        commit(fs, root, shards(manifest("v4", parent=3), ("a4", "a.parquet"), ("b4", "b.parquet"), unit_rows=7))
        with pytest.raises(CommitConflict, match=r"version 4 was committed by writer v4 .* it was made with other "
                                                 r"options \(unit_rows 7 there, 10 here\), which this job would undo"):
            commit(fs, root, shards(manifest("old options", parent=3, files=changed_b), ("a1", "a.parquet"),
                                    ("b5", "b.parquet"), unit_rows=10))
        # The same with the version it started from gone (vacuumed): latest's options must be ours.
        v3 = fs.cat_file(f"{root}/versions/00000003.json")
        fs.rm_file(f"{root}/versions/00000003.json")
        with pytest.raises(CommitConflict, match=r"it was made with other options \(unit_rows 7 there, 10 here\)"):
            commit(fs, root, shards(manifest("old options", parent=3), ("a1", "a.parquet"), ("b1", "b.parquet"),
                                    unit_rows=10))
        put_bytes(fs, f"{root}/versions/00000003.json", v3)
        # A winner that added a file, whose ids made rows of a.parquet duplicates (its shard
        # changed), and a job that saw that file and changed b.parquet too: rebased.
        with_c = {**FILES, "c.parquet": {"size": 5, "version": "1"}}
        commit(fs, root, shards(manifest("v5", parent=4, files=with_c), ("a5", "a.parquet"), ("b4", "b.parquet"),
                                ("c5", "c.parquet"), unit_rows=7))
        newer = shards(manifest("newer", parent=4, files={**with_c, **changed_b}), ("a5", "a.parquet"),
                       ("b6", "b.parquet"), ("c5", "c.parquet"), unit_rows=7)
        assert commit(fs, root, newer) == 6
        assert _versions(store)[4:] == [(5, 4, "v5"), (6, 5, "newer")]

    def test_ambiguous_create_that_landed_is_our_commit(self, store):
        calls = []

        def lost_reply(fs, path, data):
            calls.append(path)
            if len(calls) == 1:
                create_only(fs, path, data)
                raise ConnectionResetError("connection reset while reading the response")
            create_only(fs, path, data)

        assert commit(store.fs, store.root, manifest("mine"), create=lost_reply) == 1
        assert len(calls) == 1  # read back, not re-sent
        assert _versions(store) == [(1, None, "mine")]

    def test_store_retry_that_sees_exists_is_resolved_by_the_writer_token(self, store):
        def retried(fs, path, data):  # the store client's retry of a create that had landed
            create_only(fs, path, data)
            raise FileExistsError(path)

        assert commit(store.fs, store.root, manifest("mine"), create=retried) == 1
        assert _versions(store) == [(1, None, "mine")]

    def test_a_name_taken_by_another_writer_is_a_lost_race_not_our_commit(self, store):
        calls = []

        def beaten(fs, path, data):
            calls.append(path)
            if len(calls) == 1:  # another writer takes the name just before us
                create_only(fs, path, data.replace(b'"mine"', b'"theirs"'))
                raise FileExistsError(path)
            create_only(fs, path, data)

        assert commit(store.fs, store.root, manifest("mine"), create=beaten) == 2
        assert calls == [version_path(store.root, 1), version_path(store.root, 2)]
        assert _versions(store) == [(1, None, "theirs"), (2, 1, "mine")]

    def test_failed_create_that_did_not_land_is_retried(self, store):
        calls = []

        def flaky(fs, path, data):
            calls.append(path)
            if len(calls) < 3:
                raise TimeoutError("timed out")
            create_only(fs, path, data)

        assert commit(store.fs, store.root, manifest("mine"), create=flaky) == 1
        assert calls == [version_path(store.root, 1)] * 3
        assert _versions(store) == [(1, None, "mine")]



_COMMIT_IN_A_PROCESS = """
import json, os, sys, time
from workers.lake.storage import url_to_fs
from workers.lake.versions import commit
url, options, manifest, go = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]
fs, root = url_to_fs(url, options)
open(f"{go}.ready-{os.getpid()}", "w").close()
while not os.path.exists(go):
    time.sleep(0.005)
print(commit(fs, root, manifest))
"""


def test_two_processes_race_on_disk_and_s3(store, tmp_path):
    """Two writer processes, released together: one file per number, both commits in history."""
    import os
    import subprocess
    import sys
    import time

    if store.name == "memory":
        pytest.skip("memory:// is per process")
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", _COMMIT_IN_A_PROCESS, store.url, json.dumps(store.options),
                               json.dumps(manifest(f"proc-{i}")), str(go)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=os.path.dirname(os.path.dirname(__file__)))
             for i in range(2)]
    deadline = time.monotonic() + 60
    while len(list(tmp_path.glob("go.ready-*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)  # both interpreters up and polling
    go.write_text("")
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    assert sorted(int(out) for out, _ in results) == [1, 2]
    assert sorted(w for _, _, w in _versions(store)) == ["proc-0", "proc-1"]
    assert store.files() == ["versions/00000001.json", "versions/00000002.json"]
