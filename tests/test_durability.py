"""Commits that stay whole: only on backends with an atomic create-only write, fsynced on local
disk, and a version file a crash left empty stops readers and writers with a clear error."""
import json
import os
import threading

import fsspec
import pytest
from fsspec import AbstractFileSystem
from fsspec.implementations.memory import MemoryFileSystem

from jobs.cli import main as cli
from jobs.ingest import run
from workers.ingest.config import IngestConfig
from workers.lake.dataset import open_version
from workers.embedding.encoder import EncoderConfig
from workers.lake.storage import NoAtomicCreate, create_only, put_bytes, require_create_only, url_to_fs
from workers.lake.versions import EmptyVersion, commit, list_versions, read_version, version_path

from test_storage import _race

pytestmark = pytest.mark.usefixtures("shared_encoders")  # conftest: warm encoder actors across the module's jobs


class NoCreateFS(MemoryFileSystem):
    """Stands for a backend we cannot run here whose create is fsspec's `exists()`, then write.

    Two writers that both pass `exists()` before either writes both "create" the file; while
    `gate` is set, `exists` returns only when two callers have looked, to make that race happen.
    """

    protocol = "nocreate"
    store: dict = {}
    pseudo_dirs = [""]
    gate: threading.Barrier | None = None
    pipe_file = AbstractFileSystem.pipe_file  # fsspec's default create: `exists()`, then write

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(str(path).removeprefix("nocreate://"))

    def exists(self, path, **kwargs):
        found = super().exists(path, **kwargs)
        if self.gate is not None:  # both writers have looked before either goes on
            self.gate.wait(timeout=10)
        return found


fsspec.register_implementation("nocreate", NoCreateFS, clobber=True)
NOT_ATOMIC = (r"cannot commit dataset versions to nocreate://ds: its storage backend \(nocreate://, "
              r"NoCreateFS\) has no atomic create-only write, so two jobs committing at once could "
              r"overwrite each other's version\. Versions are committed only on local disk \(file://\), "
              r"memory:// and S3 \(s3://, s3a://, with If-None-Match\)")


def _next(doc, **changes):
    """Version `doc`'s content, as a job would commit it again."""
    out = {k: v for k, v in doc.items() if k not in ("version", "writer", "created_at")}
    return {**out, **changes}


@pytest.fixture
def lake(small_dataset):
    return small_dataset[0].parent / "lake"


@pytest.fixture
def v1(copy_dataset):
    fs, root = url_to_fs(str(copy_dataset))
    return read_version(fs, root, 1).to_json()


# --- 13. commit atomicity on other backends ----------------------------------------------------

def test_fsspec_default_create_lets_two_writers_create_the_same_name():
    # What the refusal below prevents: on such a backend both racers "create" the file.
    fs, root = url_to_fs("nocreate://probe")
    NoCreateFS.gate = threading.Barrier(2)
    try:
        both = _race(2, lambda i: fs.pipe_file(f"{root}/versions/00000001.json", b"%d" % i, mode="create"))
    finally:
        NoCreateFS.gate = None
        fs.rm(root, recursive=True)
    assert both == [None, None]


def test_racing_commits_on_a_backend_without_atomic_create_are_refused(v1):
    fs, root = url_to_fs("nocreate://ds")
    out = _race(2, lambda i: commit(fs, root, _next(v1, parent=None, writer=f"w{i}")))
    assert all(isinstance(e, NoAtomicCreate) for e in out), out
    assert str(out[0]).startswith("cannot commit dataset versions to /ds/versions/00000001.json: its "
                                  "storage backend (nocreate://, NoCreateFS) has no atomic create-only write")
    assert list_versions(fs, root) == []
    with pytest.raises(NoAtomicCreate):
        create_only(fs, version_path(root, 1), b"{}")
    assert not fs.exists(version_path(root, 1))


def test_ingest_to_such_a_backend_fails_before_any_work(lake, tmp_path, capsys):
    # The source is bad too: the destination is checked first, so that is the error shown.
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.jsonl").write_text(json.dumps({"body": "no text column"}) + "\n")
    for source in (lake, bad):
        with pytest.raises(NoAtomicCreate, match=NOT_ATOMIC):
            run(IngestConfig(str(source), "nocreate://ds"))
    assert cli(["ingest", str(lake), "nocreate://ds", "--no-progress"]) == 2
    assert "quantlake ingest: error: cannot commit dataset versions to nocreate://ds" in capsys.readouterr().err
    assert NoCreateFS.store == {}


@pytest.mark.parametrize("dest, backend", [("gs://bucket/emb", "GCSFileSystem"),
                                           ("abfs://box/emb", "AzureBlobFileSystem"),
                                           ("http://127.0.0.1:9/emb", "HTTPFileSystem")])
def test_other_backends_are_refused_by_the_destinations_protocol(tmp_path, capsys, dest, backend):
    """Told by the URL, before its filesystem is built: gs:// and abfs:// get the refusal whether
    or not gcsfs and adlfs are installed (here they are not), never their ImportError."""
    refusal = (f"cannot commit dataset versions to {dest}: its storage backend ({dest.split(':')[0]}://, "
               f"{backend}) has no atomic create-only write")
    assert cli(["ingest", str(tmp_path), dest, "--no-progress"]) == 2
    assert capsys.readouterr().err.startswith(f"quantlake ingest: error: {refusal}")
    for command in (["reindex", dest], ["rollback", dest, "--to", "1"]):
        assert cli(command) == 2
        assert capsys.readouterr().err.startswith(f"quantlake {command[0]}: error: {refusal}")


def test_supported_backends_commit_a_real_version(store, v1):
    require_create_only(store.fs, store.url)
    assert commit(store.fs, store.root, _next(v1, parent=None)) == 1
    got = read_version(store.fs, store.root, 1).to_json()
    assert {k: got[k] for k in ("shards", "ranges", "source", "counts")} == \
        {k: v1[k] for k in ("shards", "ranges", "source", "counts")}
    with pytest.raises(FileExistsError):
        create_only(store.fs, version_path(store.root, 1), b"{}")
    assert store.files() == ["versions/00000001.json"]


def test_s3_create_sends_if_none_match(s3, v1):
    bucket, options = s3
    fs, root = url_to_fs(f"{bucket}/ds", options)
    fs.ls(bucket)  # connects, so the client exists to hook
    sent = []
    fs.s3.meta.events.register("before-parameter-build.s3.PutObject",
                               lambda params, **_: sent.append((params["Key"], params.get("IfNoneMatch"))))
    assert commit(fs, root, _next(v1, parent=None)) == 1
    assert sent == [("ds/versions/00000001.json", "*")]


# --- 14. durability: fsync, and a version file a crash left empty -------------------------------

def _watch_fsync(monkeypatch):
    """Record each real os.fsync: the path it synced and the names existing at that moment."""
    calls, real = [], os.fsync

    def fsync(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        calls.append((path, sorted(os.listdir(path if os.path.isdir(path) else os.path.dirname(path)))))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return calls


def test_a_local_commit_is_on_disk_before_and_after_its_name_appears(copy_dataset, v1, monkeypatch):
    fs, root = url_to_fs(str(copy_dataset))
    calls = _watch_fsync(monkeypatch)
    assert commit(fs, root, _next(v1, parent=1)) == 2
    folder = str(copy_dataset / "versions")
    (tmp, before), (synced_folder, after) = calls
    # The manifest's bytes are synced under a temporary name, before the version's name exists;
    # then the folder, with the name in it and the temporary gone.
    assert tmp.startswith(f"{folder}/00000002.json.tmp-")
    assert before == ["00000001.json", os.path.basename(tmp)]
    assert (synced_folder, after) == (folder, ["00000001.json", "00000002.json"])
    assert read_version(fs, root, 2).to_json()["shards"] == v1["shards"]


def test_a_local_put_is_synced_before_its_rename_and_the_folder_after(copy_dataset, v1, monkeypatch):
    fs, root = url_to_fs(str(copy_dataset))
    shard = v1["shards"][0]
    data = (copy_dataset / shard["path"]).read_bytes()
    target = copy_dataset / "shards" / "copy.parquet"
    calls = _watch_fsync(monkeypatch)
    put_bytes(fs, str(target), data)
    (tmp, before), (folder, after) = calls
    assert tmp.startswith(f"{target}.tmp-") and "copy.parquet" not in before
    assert folder == str(target.parent) and "copy.parquet" in after and os.path.basename(tmp) not in after
    assert target.read_bytes() == data


EMPTY = (r"versions/00000002\.json of .* is empty \(0 bytes\): a crash or power loss hit before its "
         r"content reached the disk, so no job committed version 2 completely\. When no job is running "
         r"on this dataset, delete versions/00000002\.json and rerun the job that was committing")


def test_an_empty_version_file_is_a_clear_error_for_readers(copy_dataset):
    (copy_dataset / "versions" / "00000002.json").write_bytes(b"")
    fs, root = url_to_fs(str(copy_dataset))
    for n in (2, None):
        with pytest.raises(EmptyVersion, match=EMPTY):
            read_version(fs, root, n)
        with pytest.raises(EmptyVersion, match=EMPTY):
            open_version(str(copy_dataset), version=n)
    assert open_version(str(copy_dataset), version=1).version == 1


def test_inspect_names_the_empty_version_file(copy_dataset, capsys):
    (copy_dataset / "versions" / "00000002.json").write_bytes(b"")
    for args in ([], ["--json"]):  # both detail the latest version: the empty one
        assert cli(["inspect", str(copy_dataset), *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("quantlake inspect: error: versions/00000002.json of ")
        assert "delete versions/00000002.json and rerun" in err
    # Version 1 is sound and can be shown; the history names the empty file and the fix.
    assert cli(["inspect", str(copy_dataset), "--version", "1"]) == 0
    out = capsys.readouterr().out
    assert "version 1, committed" in out
    line = next(x for x in out.splitlines() if x.strip().startswith("2 "))
    assert "unreadable" in line and "delete versions/00000002.json and rerun" in line


def test_no_commit_numbers_past_an_empty_version_until_it_is_deleted(copy_dataset, v1):
    empty = copy_dataset / "versions" / "00000002.json"
    empty.write_bytes(b"")
    fs, root = url_to_fs(str(copy_dataset))
    # A job that started before the crash (parent 1), one that listed the empty file as its
    # parent (what ingest would take), one with no parent: none commits a version 3.
    for parent in ({"parent": 1}, {"parent": 2}, {}):
        with pytest.raises(EmptyVersion, match=EMPTY):
            commit(fs, root, {**_next(v1), **parent})
    out = _race(2, lambda i: commit(fs, root, _next(v1, parent=2, writer=f"w{i}")))
    assert all(isinstance(e, EmptyVersion) for e in out), out
    assert sorted(os.listdir(empty.parent)) == ["00000001.json", "00000002.json"] and empty.stat().st_size == 0
    # The recovery the message gives: delete it, and the next commit takes its number.
    empty.unlink()
    assert commit(fs, root, _next(v1, parent=1)) == 2
    assert read_version(fs, root, 2).parent == 1


def test_ingest_stops_at_start_on_an_empty_version_and_resumes_after_recovery(copy_dataset, lake, v1):
    empty = copy_dataset / "versions" / "00000002.json"
    empty.write_bytes(b"")
    cfg = IngestConfig(str(lake), str(copy_dataset), id_column="id", calibration_samples=50,
                       unit_rows=40, encoder=EncoderConfig(batch_size=32), progress=False)
    with pytest.raises(EmptyVersion, match=EMPTY):
        run(cfg)
    assert sorted(os.listdir(empty.parent)) == ["00000001.json", "00000002.json"]
    empty.unlink()
    result = run(cfg)
    assert result.version == 2 and result.summary["shards_reused"] == len(v1["shards"])
    fs, root = url_to_fs(str(copy_dataset))
    v2 = read_version(fs, root, 2).to_json()
    # The same lake and config: the same shards, byte for byte, as the version before the crash.
    assert v2["parent"] == 1 and v2["shards"] == v1["shards"] and v2["ranges"] == v1["ranges"]
