"""Vacuum loses no data: it refuses folders without a version, deletes only names quantlake
writes, and keeps the files of a version committed, or a shard reused, while it runs.

Real datasets (the session's ingest, copied to local disk, memory:// or the moto S3 server),
real reruns on local Ray with the bundled model.
"""
import json
import os
import time
from functools import partial

import pytest

import jobs.ingest as ingest
import jobs.vacuum as vacuum
from jobs.cli import main as cli
from jobs.vacuum import VacuumConfig, delete, plan
from workers.ingest.config import IngestConfig
from workers.lake.dataset import open_version
from workers.embedding.encoder import EncoderConfig
from workers.ingest.steps import UnitRows, read_unit
from workers.lake.versions import commit, read_version
from lakes import verify_version

pytestmark = pytest.mark.usefixtures("shared_encoders")  # conftest: warm encoder actors across the module's jobs

HOUR = 3600
TMP = "5" * 32  # the uuid4 hex of a temporary's name


def _upload(local, store) -> None:
    """Copy a dataset folder to `store` (written now: every file is new there)."""
    for p in sorted(local.rglob("*")):
        if p.is_file():
            path = f"{store.root}/{p.relative_to(local).as_posix()}"
            store.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            store.fs.pipe_file(path, p.read_bytes())


def _put(store, files: dict) -> None:
    for rel, data in files.items():
        store.fs.makedirs(f"{store.root}/{rel}".rsplit("/", 1)[0], exist_ok=True)
        store.fs.pipe_file(f"{store.root}/{rel}", data)


def _shard_files(store, sid: str) -> set[str]:
    return {f for f in store.files() if f.split("/")[0] in ("shards", "rejects") and f.split("/")[1].startswith(sid)}


def _commit_without(store, version: int, keep: int) -> list[dict]:
    """Commit a copy of `version` that lists only its first `keep` shards; return the dropped ones."""
    v = read_version(store.fs, store.root, version).to_json()
    body = {k: x for k, x in v.items() if k not in ("version", "writer", "created_at")}
    latest = max(int(p[9:17]) for p in store.files() if p.startswith("versions/"))
    commit(store.fs, store.root, {**body, "parent": latest, "shards": v["shards"][:keep]})
    return v["shards"][keep:]


def _commit_with(store, shards: list[dict]) -> int:
    """Commit the latest version plus `shards` (what a rerun that reuses them commits)."""
    v = read_version(store.fs, store.root).to_json()
    body = {k: x for k, x in v.items() if k not in ("version", "writer", "created_at")}
    return commit(store.fs, store.root, {**body, "parent": v["version"], "shards": v["shards"] + shards})



def _reuse(store, shard: dict) -> None:
    """What a rerun's read step does with a shard it can reuse (`workers.ingest.steps.read_unit`)."""
    src = shard["source"]
    unit = {"shard_id": shard["id"], "file": {"relpath": src["file"], "size": 0, "version": "", "format": "parquet"},
            "row_start": src["row_start"], "row_stop": src["row_stop"], "duplicates": []}
    cfg = IngestConfig("unused", store.url, storage_options=store.options)
    out = UnitRows.from_row(read_unit({"unit": json.dumps(unit)}, cfg))
    assert out.reused.id == shard["id"] and out.texts == ()  # reused, not read again


# --- refusing what is not a dataset -------------------------------------------------------------


def test_refuses_a_dest_that_does_not_exist(store, capsys):
    for dry in ([], ["--dry-run"]):
        assert cli(["vacuum", f"{store.url}/nothing-here", "--storage-options", json.dumps(store.options),
                    *dry]) == 2
        err = capsys.readouterr().err
        assert "quantlake vacuum: error:" in err and "nothing-here does not exist: nothing to vacuum" in err
    assert store.files() == []


def test_refuses_a_dataset_whose_versions_were_lost(small_dataset, store, capsys):
    _upload(small_dataset[0], store)
    for f in store.files():
        if f.startswith("versions/"):
            store.fs.rm_file(f"{store.root}/{f}")
    _put(store, {f"shards/{'a' * 32}.parquet": b"x", "shards/notes.txt": b"mine", "ranges/x.json": b"{}"})
    before = store.files()
    assert any(f.startswith("shards/") for f in before) and not any(f.startswith("versions/") for f in before)
    args = ["vacuum", store.url, "--older-than", "0s", "--storage-options", json.dumps(store.options)]
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert "holds no committed version (no versions/<8 digits>.json): refusing to vacuum it" in err
    assert "rerun that ingest" in err
    assert store.files() == before  # nothing deleted


def test_refuses_a_folder_a_user_keeps_other_files_in(tmp_path, capsys):
    d = tmp_path / "mine"
    for rel in ("shards/holiday.parquet", f"rejects/{'b' * 32}.parquet", "ranges/budget.json", "notes.txt"):
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_bytes(b"precious")
        t = time.time() - 30 * 24 * HOUR
        os.utime(d / rel, (t, t))
    assert cli(["vacuum", str(d), "--older-than", "0s", "--json"]) == 2
    assert "holds no committed version" in capsys.readouterr().err
    assert sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file()) == [
        "notes.txt", "ranges/budget.json", f"rejects/{'b' * 32}.parquet", "shards/holiday.parquet"]


# --- only quantlake's own names -----------------------------------------------------------------


def test_deletes_only_names_quantlake_writes(small_dataset, store, capsys):
    _upload(small_dataset[0], store)
    sid = read_version(store.fs, store.root, 1).shards[0].id
    orphan, vec = "0f" * 16, "vectors-000000000000-000000000010"
    ours = {f"shards/{orphan}.parquet": b"p" * 3, f"shards/{orphan}.faiss": b"f" * 4, f"shards/{orphan}.json": b"{}",
            f"rejects/{orphan}.parquet": b"r" * 5, f"ranges/{'e' * 64}.json": b"{}",
            f"shards/{vec}.parquet": b"v" * 6, f"shards/{vec}.faiss": b"v" * 7,
            f"shards/{sid}.faiss.tmp-{TMP}": b"t", f"ranges/{'e' * 64}.json.tmp-{TMP}": b"t",
            f"versions/00000002.json.tmp-{TMP}": b"{"}
    foreign = {"shards/orphan.parquet", f"shards/{orphan}.parquet.bak", f"shards/{orphan}.txt",
               f"shards/sub/{orphan}.parquet", f"shards/{orphan.upper()}.parquet", f"rejects/{orphan}.json",
               f"ranges/{'e' * 32}.json", f"shards/{sid}.parquet.tmp-1234", f"shards/{sid}.parquet.tmp-{TMP}x",
               "versions/notes.txt", "versions/1.json", "versions/000000003.json"}
    _put(store, {**ours, **{rel: b"someone else's" for rel in foreign}})
    before = store.files()
    # Everything looks two hours old: only the names decide.
    assert cli(["vacuum", store.url, "--json", "--storage-options", json.dumps(store.options)]) == 0
    nothing = json.loads(capsys.readouterr().out)
    assert nothing["deleted"] == [] and set(nothing["kept_too_recent"]) == set(ours)
    res = vacuum.run(VacuumConfig(store.url, storage_options=store.options), now=time.time() + 2 * HOUR)
    assert {p for p, _ in res.deleted} == set(ours)
    assert sum(b for _, b in res.deleted) == sum(len(v) for v in ours.values())
    assert res.foreign == sorted(foreign) and res.young == [] and res.in_use == []
    assert store.files() == sorted(set(before) - set(ours))
    verify_version(store.url, store.options)


def test_a_folder_that_is_a_symbolic_link_is_not_followed(copy_dataset, tmp_path, capsys):
    """`rejects/` linked to a folder another dataset uses: shards there are named by their
    content and no version here lists them, so vacuum deleted them. It now lists no linked
    folder, says so, and deletes what the others hold as before."""
    from conftest import Store

    other = tmp_path / "elsewhere"
    (copy_dataset / "rejects").rename(other)  # ours, reached through the link from now on
    theirs = other / f"{'ab' * 16}.parquet"  # another dataset's rejects file beside them, old
    theirs.write_bytes(b"theirs")
    (copy_dataset / "rejects").symlink_to(other, target_is_directory=True)
    dropped = _commit_without(Store("file", str(copy_dataset), {}), 1, keep=3)
    for p in [*copy_dataset.rglob("*"), *other.iterdir()]:
        t = time.time() - 2 * HOUR
        os.utime(p, (t, t), follow_symlinks=False)
    assert cli(["vacuum", str(copy_dataset), "--retain", "1", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["kept_linked"] == ["rejects/"] and theirs.read_bytes() == b"theirs"
    went = {d["path"] for d in res["deleted"]}
    assert went and not [p for p in went if p.startswith("rejects/")]
    assert {s["path"] for s in dropped} <= went  # the shards' own files went as before
    assert cli(["vacuum", str(copy_dataset), "--dry-run"]) == 0
    assert "kept rejects/: a symbolic link, which vacuum does not follow" in capsys.readouterr().out.splitlines()


# --- races with a job --------------------------------------------------------------------------


def test_a_version_or_a_reuse_that_lands_while_vacuum_runs_keeps_its_shards(small_dataset, store):
    """Three unreferenced shards, all old: one a rerun reuses before vacuum lists the files, one a
    rerun reuses between plan and delete, one a version commits between plan and delete."""
    _upload(small_dataset[0], store)
    before_plan, before_delete, committed = _commit_without(store, 1, keep=2)
    cfg = VacuumConfig(store.url, older_than_s=5, retain=1, storage_options=store.options)
    time.sleep(6.5)  # every file is now older than --older-than (S3 times are whole seconds)
    _reuse(store, before_plan)

    planned = plan(store.fs, store.root, cfg)
    assert set(planned.young) == _shard_files(store, before_plan["id"])  # its sidecar is new
    going = {p for p, _ in planned.deleted}
    assert going == {"versions/00000001.json"} | _shard_files(store, before_delete["id"]) \
        | _shard_files(store, committed["id"])

    _reuse(store, before_delete)
    assert _commit_with(store, [committed]) == 3
    done = delete(store.fs, store.root, cfg, planned)
    assert [p for p, _ in done.deleted] == ["versions/00000001.json"]
    assert set(done.in_use) == going - {"versions/00000001.json"}
    assert done.damaged == []
    verify_version(store.url, store.options)  # version 3, with the committed shard
    for s in (before_plan, before_delete):  # still complete, as a rerun would reuse them
        assert {s["path"], s["index"], f"shards/{s['id']}.json"} <= _shard_files(store, s["id"])


def test_a_commit_after_a_batch_was_deleted_is_reported(copy_dataset, monkeypatch, capsys):
    """The residual window: a job that checked its files before vacuum deleted them commits
    afterwards. Vacuum cannot undo it, but says so (exit 1) and how to repair it."""
    from conftest import Store

    store = Store("file", str(copy_dataset), {})
    dropped = _commit_without(store, 1, keep=3)
    for p in copy_dataset.rglob("*"):
        t = time.time() - 2 * HOUR
        os.utime(p, (t, t))
    monkeypatch.setattr(vacuum, "BATCH_FILES", 1)  # batches: version 1's manifest, then one shard each
    landed = []

    def commit_after_a_shard_went(number):
        gone = [s for s in dropped if not (copy_dataset / s["path"]).exists()]
        if gone and not landed:
            landed.append(gone[0])
            _commit_with(store, gone)

    monkeypatch.setattr(vacuum, "delete", partial(delete, before_batch=commit_after_a_shard_went))
    assert cli(["vacuum", str(copy_dataset), "--retain", "1", "--json"]) == 1
    out, err = capsys.readouterr()
    res = json.loads(out)
    (s,) = landed
    missing = sorted({s["path"], s["index"]} | ({s["rejects"]["path"]} if s["rejects"] else set()))
    assert res["damaged_versions"] == [{"version": 3, "missing": missing}]
    assert f"version 3 references {missing[0]}" in err
    assert "Rerun the ingest that made each" in err
    # The other dropped shard, which version 3 does not list either, went in the next batch.
    (other,) = [x for x in dropped if x is not s]
    assert not (copy_dataset / other["path"]).exists() and (copy_dataset / "versions/00000003.json").exists()


def _rerun_cfg(small_dataset, dest) -> IngestConfig:
    """The session dataset's ingest, again, into `dest` with its ranges: every shard is reused."""
    lake = small_dataset[0].parent / "lake"
    ranges = f"{dest}/{open_version(str(dest)).manifest.ranges.path}"
    return IngestConfig(str(lake), str(dest), id_column="id", calibration_samples=50, unit_rows=40,
                        encoder=EncoderConfig(batch_size=32), progress=False, ranges=ranges)


@pytest.fixture
def expired_shard(copy_dataset):
    """The dataset with a version 2 that drops the last shard of version 1, every file two hours
    old: `vacuum --retain 1` deletes version 1 and that shard."""
    from conftest import Store

    store = Store("file", str(copy_dataset), {})
    (dropped,) = _commit_without(store, 1, keep=4)
    for p in copy_dataset.rglob("*"):
        t = time.time() - 2 * HOUR
        os.utime(p, (t, t))
    return store, dropped


def test_a_version_needing_no_file_still_missing_is_not_reported(expired_shard, monkeypatch, capsys):
    """Vacuum deletes a leftover temporary of a shard the latest version keeps and the files of
    the shard version 2 dropped; a job then writes that shard again (same names, same bytes) and
    commits it beside the kept ones. Neither the temporary nor a file written again is a loss:
    the version is complete, and vacuum says nothing of it."""
    store, dropped = expired_shard
    root = store.root
    kept = read_version(store.fs, root).shards[0]
    leftovers = [f"shards/{kept.id}.parquet.tmp-{TMP}", f"shards/{'f' * 32}.parquet.tmp-{TMP}"]  # the last batch
    _put(store, {rel: b"partial" for rel in leftovers})
    for rel in leftovers:
        t = time.time() - 2 * HOUR
        os.utime(f"{root}/{rel}", (t, t))
    files = _shard_files(store, dropped["id"])
    saved = {rel: open(f"{root}/{rel}", "rb").read() for rel in files}
    monkeypatch.setattr(vacuum, "BATCH_FILES", 1)
    landed = []

    def rewrite_and_commit(number):
        if not landed and not any(os.path.exists(f"{root}/{rel}") for rel in [*files, leftovers[0]]):
            _put(store, saved)
            landed.append(_commit_with(store, [dropped]))

    monkeypatch.setattr(vacuum, "delete", partial(delete, before_batch=rewrite_and_commit))
    assert cli(["vacuum", root, "--retain", "1", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert landed == [3] and res["damaged_versions"] == []
    assert {d["path"] for d in res["deleted"]} == {"versions/00000001.json", *leftovers, *files}
    assert len(verify_version(store.url, {}).shards) == 5  # version 3, complete


def test_a_rerun_committing_between_plan_and_delete_keeps_its_shards(small_dataset, expired_shard, ray_session):
    """--older-than 0s: the files' age protects nothing, only reading the versions again does."""
    store, dropped = expired_shard
    cfg = VacuumConfig(store.url, older_than_s=0, retain=1)
    planned = plan(store.fs, store.root, cfg)
    assert dropped["path"] in {p for p, _ in planned.deleted}

    rerun = ingest.run(_rerun_cfg(small_dataset, store.root))  # reuses every shard, commits version 3
    assert rerun.version == 3 and rerun.summary["shards_reused"] == rerun.summary["shards"] == 5
    done = delete(store.fs, store.root, cfg, planned)
    assert [p for p, _ in done.deleted] == ["versions/00000001.json"]
    assert dropped["path"] in done.in_use and done.damaged == []
    assert len(verify_version(store.url, {}).shards) == 5


def test_a_rerun_reusing_a_shard_is_safe_from_a_vacuum_that_planned_earlier(small_dataset, expired_shard,
                                                                            ray_session, monkeypatch):
    """The vacuum planned before the rerun began, and deletes after the rerun reused the shard and
    checked its files, just before the rerun commits: the rewritten sidecar keeps the shard."""
    store, dropped = expired_shard
    cfg = VacuumConfig(store.url, retain=1)  # --older-than 1h
    planned = plan(store.fs, store.root, cfg)
    assert dropped["path"] in {p for p, _ in planned.deleted}
    results = []

    def vacuum_then_commit(fs, root, doc, **kw):
        results.append(delete(store.fs, store.root, cfg, planned))
        return commit(fs, root, doc, **kw)

    monkeypatch.setattr(ingest, "commit", vacuum_then_commit)
    rerun = ingest.run(_rerun_cfg(small_dataset, store.root))
    assert rerun.version == 3 and rerun.summary["shards_reused"] == 5
    (done,) = results
    assert [p for p, _ in done.deleted] == ["versions/00000001.json"]
    assert set(done.in_use) == _shard_files(store, dropped["id"])
    assert len(verify_version(store.url, {}).shards) == 5
