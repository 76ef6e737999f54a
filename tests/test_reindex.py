"""`quantlake reindex`, `history` and `rollback` on a changing lake: each new version holds what a
fresh ingest of the current lake holds, and only changed data is encoded.

One lake changes step by step (module-scoped, in order): a file added that sorts between
others and takes over an id an unchanged file holds, a file rewritten, a file deleted; then
no change; a dry run; drift with recalibration; history and rollback. Real Ray, model,
Parquet and FAISS on local disk.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import threading
import time
from dataclasses import replace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.cli import main as cli
from jobs.common import format_share
from jobs.history import history, report as history_report
from jobs.ingest import run as ingest
from jobs.reindex import (ReindexConfig, format_result, ingest_config, parse_args, run as reindex, source_of,
                          source_unchanged, watch)
from jobs.rollback import run as rollback
from isolated import Job
from lakes import ingest_cfg
from test_rerun import _content
from workers.embedding.encoder import EncoderConfig, model_fingerprint, resolve_model
from workers.ingest.pipeline import WarmEncoders
from workers.ingest.source import list_source
from workers.lake.dataset import open_version
from workers.lake.storage import url_to_fs
from workers.lake.versions import CommitConflict, list_versions, read_version
from workers.search.searcher import Searcher

pytestmark = pytest.mark.usefixtures("shared_encoders")  # conftest: warm encoder actors across the module's jobs

ROWS = 12  # documents per file; one unit (and shard) per file


def _write(lake, name: str, rows) -> None:
    """Write a Parquet file of the lake whole (a hidden name, then renamed): a watching reindex
    never lists a half-written file."""
    lake.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": [r[0] for r in rows], "text": [r[1] for r in rows]}), lake / f".{name}")
    os.replace(lake / f".{name}", lake / name)


def _cfg(source, dest, **kw):
    return replace(ingest_cfg(str(source), str(dest), {}, **kw), unit_rows=ROWS)


def _fresh(base, lake, name: str, ranges_of=None):
    """A fresh ingest of the lake as it is now (with `ranges_of`'s ranges when given)."""
    dest = base / name
    ranges = None
    if ranges_of is not None:
        ranges = str(ranges_of / open_version(str(ranges_of)).manifest.ranges.path)
    ingest(_cfg(lake, dest, ranges=ranges))
    return dest


def _files(dest) -> list[str]:
    return sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def lake(tmp_path_factory, docs, ray_session, shared_encoders):
    base = tmp_path_factory.mktemp("reindex")
    raw, dest = base / "raw", base / "emb"
    for i in range(5):
        _write(raw, f"part-{i}.parquet", docs[i * ROWS:(i + 1) * ROWS])
    first = ingest(_cfg(raw, dest))
    assert first.version == 1 and first.summary["shards"] == 5
    return base, raw, dest


def test_reindex_encodes_only_what_changed_and_equals_a_fresh_ingest(lake, docs, caplog, capsys, monkeypatch):
    import jobs.ingest
    import jobs.reindex

    base, raw, dest = lake
    opened, listings = [], []
    real_check = jobs.ingest.check_file
    monkeypatch.setattr(jobs.ingest, "check_file", lambda fs, root, f, *a: opened.append(f.relpath)
                        or real_check(fs, root, f, *a))
    for module in (jobs.ingest, jobs.reindex):  # each imports list_source by name
        monkeypatch.setattr(module, "list_source", lambda *a, real=module.list_source: listings.append(a[0])
                            or real(*a))
    # A new file sorting between part-1 and part-2 that holds part-3's row 4 id (so that row
    # becomes a duplicate and part-3's shard changes), a rewritten part-2, a deleted part-4.
    _write(raw, "part-1a.parquet", [(docs[3 * ROWS + 4][0], docs[200][1])] + docs[201:206])
    _write(raw, "part-2.parquet", docs[210:210 + ROWS])
    (raw / "part-4.parquet").unlink()

    # Drift past the threshold without --recalibrate-on-drift: a warning, and the saved ranges stay.
    result = reindex(ReindexConfig(str(dest), drift_threshold=0.0))
    assert result.version == 2
    # The progress bar is the command's, over the rows it encodes (it was labelled `ingest`).
    bar = capsys.readouterr().err.split("\r")[-1]
    assert re.match(rf"reindex: 100%\|[^|]*\| {6 + 2 * ROWS}/{6 + 2 * ROWS} ", bar), bar
    assert "drift: the saved ranges clip" in caplog.text and "rerun with --recalibrate" in caplog.text
    s = result.summary
    # The warning gives the shares in percent, as stdout and `history` do (it gave fractions: 0.0646).
    share = s["drift"]["clipped_share"]
    assert 0 < share < 1 and s["drift"]["baseline_share"] == 0.0  # minmax ranges clip none of their sample
    assert (f"drift: the saved ranges clip {share:.4%} of the new data's values, {share:.4%} more than their "
            "calibration sample (threshold 0.0000%); rerun with --recalibrate") in caplog.text
    assert f"drift: the ranges clip {share:.4%} of the new data's values (calibration sample: 0.0000%)" \
        in format_result(result).splitlines()
    assert (s["mode"], s["rows_scanned"], s["rows_encoded"]) == ("incremental", 4 * ROWS + 6, 6 + 2 * ROWS)
    assert (s["shards_carried"], s["shards_added"], s["shards_dropped"]) == (2, 3, 3)
    assert s["files_to_encode"] == ["part-1a.parquet", "part-2.parquet", "part-3.parquet"]
    assert (s["documents"], s["rejects"]) == (4 * ROWS + 6 - 1, 1)
    # Only the new and the rewritten file were read to scan: the others' kept scans stood in.
    assert (s["files_scanned"], s["scans_reused"]) == (2, 3)
    # ... nor opened to check and plan them: their kept scans recorded their row groups.
    assert sorted(opened) == ["part-1a.parquet", "part-2.parquet"]
    assert len(listings) == 1, listings  # the source listed once: to see it changed, and to plan the change
    monkeypatch.undo()

    fresh = _fresh(base, raw, "fresh-2", ranges_of=dest)
    assert _content(str(dest), {}) == _content(str(fresh), {})  # ids, vector bytes, rejects, shard bytes
    v1, v2 = (read_version(*url_to_fs(str(dest)), n) for n in (1, 2))
    fresh_v = open_version(str(fresh)).manifest
    assert v2.scans == fresh_v.scans and [r.file for r in v2.scans] == sorted(p.name for p in raw.iterdir())
    assert all((dest / r.path).read_bytes() == (fresh / r.path).read_bytes() for r in v2.scans)
    assert v2.parent == 1 and v2.ranges == v1.ranges and v2.extra["options"] == v1.extra["options"]
    carried = {x.id for x in v1.shards} & {x.id for x in v2.shards}
    assert len(carried) == 2 and v2.extra["drift"]["rows"] == 6 + 2 * ROWS - 1
    # The summary's throughput and stage times are this run's: the 3 shards it wrote, not the 2 carried.
    wrote = [x for x in v2.shards if x.id not in carried]
    assert (s["shards_written"], s["documents_written"]) == (3, sum(x.rows for x in wrote)) == (3, 6 + 2 * ROWS - 1)
    assert s["encode_s"] == round(sum(x.stat("encode_s") for x in wrote), 3)
    assert s["clipped_values"] == sum(x.clipped for x in wrote)
    assert "summed over the 3 shard(s) this run wrote; not counted: 2 carried over from the version it builds on)" \
        in format_result(result)


def test_no_change_commits_nothing_and_a_dry_run_writes_nothing(lake, docs, capsys, monkeypatch):
    import jobs.reindex

    base, raw, dest = lake
    before = _files(dest)
    # Every file as the latest version recorded it: the plan is known from the listing, without
    # the scan (which reads every file), and is the one the scan would give.
    fs, root = url_to_fs(str(dest))
    latest = read_version(fs, root)
    full = ingest(ingest_config(latest, ReindexConfig(str(dest)), str(raw), fresh=False), base=latest)
    with monkeypatch.context() as m:
        m.setattr(jobs.reindex, "ingest", lambda *a, **k: pytest.fail("the unchanged source was scanned"))
        fast = reindex(ReindexConfig(str(dest), progress=False))
        assert cli(["reindex", str(dest), "--no-progress"]) == 0
        assert cli(["reindex", str(dest), "--dry-run", "--no-progress"]) == 0
    assert full.version is None and fast.version is None
    assert fast.summary == {**full.summary, "mode": "incremental", "scan_skipped": True}
    assert (fast.summary["rows_scanned"], fast.summary["shards_carried"]) == (4 * ROWS + 6, 5)
    # Nothing was scanned: the rows are the latest version's, carried over (it said "0 rows to
    # encode of 54 scanned").
    kept = f"{4 * ROWS + 6} rows carried over in 5 shard(s), scan skipped"
    assert capsys.readouterr().out.splitlines() == [
        f"no source change since the latest version: nothing committed ({kept})",
        f"dry run, nothing written: no source change since the latest version ({kept})"]
    _write(raw, "part-9.parquet", docs[300:300 + ROWS])
    assert cli(["reindex", str(dest), "--dry-run", "--json", "--no-progress"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert (plan["version"], plan["committed"], plan["rows_encoded"], plan["shards_added"]) == (None, False, ROWS, 1)
    assert plan["files_to_encode"] == ["part-9.parquet"]
    assert cli(["reindex", str(dest), "--dry-run", "--recalibrate", "--json", "--no-progress"]) == 0
    plan = json.loads(capsys.readouterr().out)  # every row would be encoded again under new ranges
    assert (plan["rows_encoded"], plan["rows_scanned"], plan["shards_carried"]) == (5 * ROWS + 6, 5 * ROWS + 6, 0)
    # The rebuilt version replaces every shard of the latest one: as the real run's history counts them.
    assert (plan["shards_added"], plan["shards_dropped"]) == (6, 5)
    assert _files(dest) == before and list_versions(*url_to_fs(str(dest))) == [1, 2]
    (raw / "part-9.parquet").unlink()


def test_a_reindex_cuts_batches_as_the_version_did(lake):
    """A version records how its encoder cut batches; one written before the choice recorded
    nothing, and its shards were all cut by characters: a reindex goes on cutting them so, and
    their names (`shard_id`) stay the ones it can reuse."""
    base, raw, dest = lake
    fs, root = url_to_fs(str(dest))
    latest = read_version(fs, root)
    options = latest.extra["options"]
    assert options["batch_order"] == "tokens"
    assert ingest_config(latest, ReindexConfig(str(dest)), str(raw), fresh=False).encoder.batch_order == "tokens"
    before = replace(latest, extra={"options": {k: v for k, v in options.items() if k != "batch_order"}})
    assert ingest_config(before, ReindexConfig(str(dest)), str(raw), fresh=False).encoder.batch_order == "characters"
    by_chars = replace(latest, extra={"options": {**options, "batch_order": "characters"}})
    assert ingest_config(by_chars, ReindexConfig(str(dest)), str(raw), fresh=False).encoder.batch_order == "characters"
    # A new model re-encodes every row: one cut as before the choice is cut as a first ingest
    # cuts it, one that chose characters keeps them.
    migrate = ReindexConfig(str(dest), model="another-model")
    assert ingest_config(before, migrate, str(raw), fresh=True).encoder.batch_order == "tokens"
    assert ingest_config(by_chars, migrate, str(raw), fresh=True).encoder.batch_order == "characters"


def test_a_reindex_that_only_drops_a_file_reports_no_work_of_its_own(lake, tmp_path):
    """Its version's shards were all written by earlier runs: no throughput, stage time or clip
    count of theirs is shown as this run's."""
    base, raw, dest = lake
    shutil.copytree(raw, tmp_path / "raw")  # copies keep their files' times: only the deletion changes
    shutil.copytree(dest, tmp_path / "emb")
    sorted((tmp_path / "raw").glob("*.parquet"))[0].unlink()
    result = reindex(ReindexConfig(str(tmp_path / "emb"), source=str(tmp_path / "raw"), progress=False))
    s = result.summary
    assert result.version is not None and (s["shards_added"], s["shards_dropped"], s["rows_encoded"]) == (0, 1, 0)
    assert (s["shards_written"], s["documents_written"], s["docs_per_s"]) == (0, 0, 0.0)
    assert (s["encode_s"], s["quantize_s"], s["write_s"], s["clipped_values"]) == (0.0, 0.0, 0.0, 0)
    assert format_result(result).splitlines()[2] == (
        f"throughput: no shard written in {s['wall_s']} s; the version's {s['shards']} shard(s): {s['shards']} "
        "carried over from the version it builds on")


def test_a_reindex_counts_the_rows_it_encoded_not_the_rows_it_planned_to(lake, docs, tmp_path):
    """A reindex whose commit was lost (a crash right before it) is run again: the shard its first
    run wrote for the changed file is found and reused, not encoded, and its summary said 12 rows
    encoded all the same (the plan's counts stood over what was done)."""
    base, raw, dest = lake
    shutil.copytree(raw, tmp_path / "raw")
    shutil.copytree(dest, tmp_path / "emb")
    _write(tmp_path / "raw", "part-1.parquet", docs[200:200 + ROWS])
    cfg = ReindexConfig(str(tmp_path / "emb"), source=str(tmp_path / "raw"), progress=False)
    first = reindex(cfg)  # the module's lake may hold earlier tests' changes too
    added = first.summary["shards_added"]
    assert first.summary["rows_encoded"] >= ROWS and first.summary["shards_written"] == added >= 1
    (tmp_path / "emb" / "versions" / f"{first.version:08d}.json").unlink()  # its commit lost
    again = reindex(cfg)
    s = again.summary
    assert again.version == first.version and (s["shards_added"], s["shards_reused"]) == (added, added)
    assert (s["rows_encoded"], s["shards_written"], s["documents_written"]) == (0, 0, 0)


def test_a_file_without_rows_is_recorded_so_the_next_reindex_skips_the_scan(lake, tmp_path, monkeypatch):
    """An empty part file (Spark writes them) changes no shard: the reindex committed nothing and
    said the source had not changed, so its version never listed the file, and every later run
    found the listing changed and scanned the whole lake again. Now the version records it (and
    its removal), the next run skips the scan, and no encoder is started for nothing to encode."""
    import jobs.ingest

    base, raw, dest = lake
    shutil.copytree(raw, tmp_path / "raw")
    shutil.copytree(dest, tmp_path / "emb")
    cfg = ReindexConfig(str(tmp_path / "emb"), source=str(tmp_path / "raw"), progress=False)
    latest = open_version(str(tmp_path / "emb")).manifest
    started = []
    monkeypatch.setattr(jobs.ingest, "Encoders", lambda *a, **k: started.append(a) or pytest.fail("encoders"))
    for change in ("add", "remove"):
        if change == "add":
            pq.write_table(pa.table({"id": pa.array([], pa.string()), "text": pa.array([], pa.string())}),
                           tmp_path / "raw" / "part-9.parquet")
        else:
            (tmp_path / "raw" / "part-9.parquet").unlink()
        result = reindex(cfg)
        s = result.summary
        assert result.version == latest.version + 1 and (s["shards_added"], s["shards_dropped"]) == (0, 0)
        now = open_version(str(tmp_path / "emb")).manifest
        assert [sh.id for sh in now.shards] == [sh.id for sh in latest.shards]
        assert ("part-9.parquet" in now.source.file_identities) == (change == "add")
        again = reindex(cfg)
        assert again.version is None and again.summary["scan_skipped"]
        assert format_result(again).startswith("no source change since the latest version: nothing committed")
        latest = now
    assert started == []


def test_a_version_of_no_shards_is_not_committed_again_by_each_run(lake, tmp_path, monkeypatch):
    """Every file emptied: the reindex commits a version of no shards (no encoder started), and
    the next run, with nothing changed, commits nothing (it committed a copy every time)."""
    import jobs.ingest

    base, raw, dest = lake
    shutil.copytree(raw, tmp_path / "raw")
    shutil.copytree(dest, tmp_path / "emb")
    monkeypatch.setattr(jobs.ingest, "Encoders", lambda *a, **k: pytest.fail("encoders"))
    for f in (tmp_path / "raw").glob("*.parquet"):
        pq.write_table(pa.table({"id": pa.array([], pa.string()), "text": pa.array([], pa.string())}), f)
    cfg = ReindexConfig(str(tmp_path / "emb"), source=str(tmp_path / "raw"), progress=False)
    emptied = reindex(cfg)
    assert emptied.version is not None and open_version(str(tmp_path / "emb")).manifest.shards == ()
    for _ in range(2):
        again = reindex(cfg)
        assert again.version is None and again.summary["scan_skipped"], again.summary
    assert list_versions(*url_to_fs(str(tmp_path / "emb")))[-1] == emptied.version


def test_a_recalibration_an_overlapping_run_committed_is_not_committed_twice(lake, tmp_path):
    """Two overlapping `reindex --recalibrate` runs calibrate the same ranges (the sample is
    deterministic) and build the same shards: the one that finishes second commits nothing and
    names the other's version, as two overlapping incremental runs do."""
    from workers.lake.versions import same_content

    base, raw, dest = lake
    shutil.copytree(raw, tmp_path / "raw")
    shutil.copytree(dest, tmp_path / "emb")
    _write(tmp_path / "raw", "part-7.parquet", [(f"new-{i}", f"a new text about rivers, number {i}")
                                                 for i in range(ROWS)])
    cfg = ReindexConfig(str(tmp_path / "emb"), source=str(tmp_path / "raw"), recalibrate=True, progress=False)
    started_from = open_version(str(tmp_path / "emb")).manifest
    first = reindex(cfg)
    assert first.version == started_from.version + 1
    # The overlapping run's ingest, as reindex started it from the version before the first's.
    late = ingest(ingest_config(started_from, cfg, source_of(started_from, cfg), fresh=True), once=True,
                  accept=lambda draft: not same_content(draft, started_from))
    assert late.version is None and late.summary["committed_meanwhile"] == first.version
    assert format_result(replace(late, summary={**late.summary, "mode": "recalibrate"})) == (
        f"version {first.version}, committed meanwhile by another run, holds these ranges and shards already: "
        "nothing committed")
    assert list_versions(*url_to_fs(str(tmp_path / "emb")))[-1] == first.version


@pytest.mark.parametrize("samples", [None, 50])
def test_a_recalibration_dry_run_says_how_big_its_sample_is(docs, tmp_path, capsys, samples):
    # None: the ingest sized its sample to the lake (a 20th of its rows, at least 1,000: here all 24).
    raw, dest = tmp_path / "raw", tmp_path / "emb"
    for i in range(2):
        _write(raw, f"part-{i}.parquet", docs[300 + i * ROWS:300 + (i + 1) * ROWS])
    ingest(replace(_cfg(raw, dest), calibration_samples=samples))
    assert cli(["reindex", str(dest), "--recalibrate", "--dry-run", "--no-progress"]) == 0
    out = capsys.readouterr().out
    # No shard carries over: the 2 of the latest version drop out, as the real run drops them.
    assert out.splitlines()[0] == ("dry run, nothing written: 24 rows to encode of 24 scanned; shards: 0 carried "
                                   "over, 2 added, 2 dropped"), out
    sized = " sized to the lake" if samples is None else ""
    assert out.splitlines()[1] == (f"recalibrating encodes a sample{sized} of up to 24 rows and rewrites every shard: "
                                   "0 rows requantized from float16, 24 re-encoded"), out


def test_drift_past_the_threshold_recalibrates_and_rebuilds_every_shard(lake, docs, caplog):
    base, raw, dest = lake
    # Texts from another part of the corpus: their embeddings reach past the saved ranges.
    _write(raw, "part-8.parquet", docs[-ROWS:])
    result = reindex(ReindexConfig(str(dest), recalibrate_on_drift=True, drift_threshold=0.0, progress=False))
    assert "drift: the saved ranges clip" in caplog.text and "recalibrating" in caplog.text
    assert result.version == 3 and result.summary["mode"] == "recalibrate"
    assert result.summary["drift"]["clipped_share"] > 0
    v2, v3 = (read_version(*url_to_fs(str(dest)), n) for n in (2, 3))
    # The version records the drift that made it (it recorded none, so `history` never showed it).
    assert v3.extra["drift"] == {**result.summary["drift"], "recalibrated": True}
    shown = history_report(str(dest), history(*url_to_fs(str(dest)), last=1))
    assert f"drift: {format_share(v3.extra['drift']['clipped_share'])} of the new data's values clipped" in shown
    assert "; new ranges calibrated for it" in shown
    assert v3.ranges.id != v2.ranges.id and not {x.id for x in v2.shards} & {x.id for x in v3.shards}
    fresh = _fresh(base, raw, "fresh-3")  # calibrated anew, with the same options and seed
    assert open_version(str(fresh)).manifest.ranges.id == v3.ranges.id
    assert _content(str(dest), {}) == _content(str(fresh), {})


def test_a_recalibration_that_gives_the_latest_versions_ranges_commits_nothing(lake, tmp_path):
    """Calibrating again on the lake the latest version was calibrated on gives its ranges, so
    its shards: the version committed was a copy of the latest one."""
    base, raw, dest = lake
    shutil.copytree(raw, tmp_path / "raw")
    shutil.copytree(dest, tmp_path / "emb")
    cfg = ReindexConfig(str(tmp_path / "emb"), source=str(tmp_path / "raw"), recalibrate=True, progress=False)
    first = reindex(cfg)  # from the copy of the lake: another source than the latest version's
    assert first.version is not None and format_result(first).startswith("rebuilt every shard with new ranges")
    again = reindex(cfg)
    assert again.version is None and list_versions(*url_to_fs(str(tmp_path / "emb")))[-1] == first.version
    assert format_result(again) == (f"nothing committed: calibrating again gave the ranges and shards of version "
                                    f"{first.version}, the latest (the same lake, sample and options)")


def test_history_and_rollback(lake, capsys):
    base, raw, dest = lake
    fs, root = url_to_fs(str(dest))
    # A kept scan only version 1 lists (part-4 was deleted since) is gone: the rollback lists the rest.
    gone = read_version(fs, root, 1).kept_scans()["part-4.parquet"]
    (dest / gone.path).unlink()
    assert rollback(str(dest), 1) == (4, True)
    v1, v4 = read_version(fs, root, 1), read_version(fs, root, 4)
    assert v4.shards == v1.shards and v4.ranges == v1.ranges and v4.parent == 3
    assert v4.scans == tuple(r for r in v1.scans if r != gone) and len(v4.scans) == 4
    assert v4.extra["rollback_of"] == 1 and "drift" not in v4.extra
    entries = history(fs, root)
    assert [(e["version"], e["parent"]) for e in entries] == [(1, None), (2, 1), (3, 2), (4, 3)]
    c2 = entries[1]["changes"]
    assert (c2["files_added"], c2["files_changed"], c2["files_removed"]) == (
        ["part-1a.parquet"], ["part-2.parquet"], ["part-4.parquet"])
    assert (c2["shards_added"], c2["shards_dropped"], c2["ranges_changed"]) == (3, 3, False)
    assert entries[2]["changes"]["ranges_changed"] and entries[3]["rollback_of"] == 1
    assert cli(["history", str(dest)]) == 0
    out = capsys.readouterr().out
    assert "version 4 (on 3" in out and "rollback to the content of version 1" in out and "drift:" in out
    assert cli(["rollback", str(dest), "--to", "7"]) == 2
    assert "version 7 of" in capsys.readouterr().err and list_versions(fs, root) == [1, 2, 3, 4]
    # Run again (a script's retry), or to the latest version itself: the content is there already.
    for to, why in ((1, " (it is a rollback to it, or holds the same shards)"), (4, "")):
        assert cli(["rollback", str(dest), "--to", str(to)]) == 0
        assert capsys.readouterr().out == (f"nothing committed: version 4, the latest, already holds the content of "
                                           f"version {to}{why}\n")
    assert list_versions(fs, root) == [1, 2, 3, 4]


def _wait_for(cond, proc, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert proc.poll() is None, f"the watch exited early with status {proc.returncode}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.5)


def test_watch_commits_each_change_set_and_stops_cleanly_on_sigterm(lake, docs, tmp_path):
    base, raw, dest = lake
    fs, root = url_to_fs(str(dest))
    start = len(list_versions(fs, root))
    with Job(["-m", "jobs.reindex", str(dest), "--watch", "--interval", "1s"], tmp_path) as job:
        proc = job.start()
        # The first cycle brings the dataset (rolled back to version 1's content) up to the lake.
        _wait_for(lambda: len(list_versions(fs, root)) == start + 1, proc)
        # The lake's storage goes away for a while (its prefix is moved aside, during the pause
        # after an idle cycle): the cycles that meet it fail, are logged, and the watch carries
        # on when it is back.
        _wait_for(lambda: "no source change" in job.output()[0], proc)
        raw.rename(base / "raw-away")
        _wait_for(lambda: "does not exist); retrying in 1 s" in job.output()[1], proc)
        (base / "raw-away").rename(raw)
        _write(raw, "part-5.parquet", docs[320:320 + ROWS])
        _wait_for(lambda: len(list_versions(fs, root)) == start + 2, proc)
        _write(raw, "part-6.parquet", docs[340:340 + ROWS])
        _wait_for(lambda: len(list_versions(fs, root)) == start + 3, proc)
        idle = job.output()[0].count("no source change")
        _wait_for(lambda: job.output()[0].count("no source change") > idle, proc)  # an idle cycle commits nothing
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
        out, err = job.output()
    assert out.count("committed version") == 3 and len(list_versions(fs, root)) == start + 3
    failed = [line for line in err.splitlines() if line.startswith("WARNING ") and ": reindex cycle " in line]
    assert failed and all("failed (SourceError: source " in line and line.endswith("does not exist); retrying in 1 s")
                          for line in failed)
    others = [line for line in err.splitlines() if line not in failed]
    assert not [line for line in others if "error" in line.lower()], others  # the whole lines, when it fails
    fresh = _fresh(base, raw, "fresh-watch", ranges_of=dest)
    assert _content(str(dest), {}) == _content(str(fresh), {})


def test_watch_with_keep_encoders_starts_its_encoder_actors_once(lake, docs, capsys, caplog, monkeypatch):
    import ray

    import jobs.ingest

    base, raw, dest = lake
    fs, root = url_to_fs(str(dest))
    start = len(list_versions(fs, root))
    warm, stop, cycles, kept = WarmEncoders(), threading.Event(), [], []
    real, fail = jobs.ingest.encode_and_write, []

    def fails_once(*args, **kwargs):  # the storage goes away mid-job, once
        if fail:
            raise OSError(fail.pop())
        return real(*args, **kwargs)

    def report(result):
        # Between cycles the set is kept, alive, for the next one.
        cycles.append((result.version, warm.starts, warm.encoders is not None))
        if len(cycles) == 1:
            kept.extend(warm.encoders.actors)
            _write(raw, "part-w2.parquet", docs[112:124])
        elif len(cycles) == 2:
            _write(raw, "part-w3.parquet", docs[124:136])
            fail.append("storage went away")
        elif len(cycles) == 4:
            stop.set()

    monkeypatch.setattr(jobs.ingest, "encode_and_write", fails_once)
    _write(raw, "part-w1.parquet", docs[100:112])
    assert watch(ReindexConfig(str(dest), progress=False), 0.1, stop, report, keep_encoders=warm) == 0
    # Two cycles with changes on one set of actors; the third failed after it took the set,
    # which was killed, not kept; the fourth started a new one; the fifth had nothing to do.
    assert cycles == [(start + 1, 1, True), (start + 2, 1, True), (start + 3, 2, True), (None, 2, True)]
    assert "reindex cycle 3 failed (OSError: storage went away)" in caplog.text
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(kept[0].encode_row.remote({"texts": json.dumps(["a queue of items"])}))
    assert warm.encoders is None and warm.starts == 2  # ended with the watch
    fresh = _fresh(base, raw, "fresh-warm", ranges_of=dest)
    assert _content(str(dest), {}) == _content(str(fresh), {})
    assert parse_args([str(dest), "--watch", "--keep-encoders"])[2:] == (600.0, True)

    # A job asking for other actors (another model fingerprint: the model's files changed) ends
    # the kept set and starts its own; the same ask again gets it warm.
    latest = read_version(fs, root)
    icfg = ingest_config(latest, ReindexConfig(str(dest)), str(raw), fresh=False)
    pool = {"actors": 1, "num_cpus": 1}
    first = warm.get(icfg, pool, latest.model.fingerprint)
    assert warm.get(icfg, pool, latest.model.fingerprint) is first and warm.starts == 3
    other = warm.get(icfg, pool, "0" * 16)
    assert other is not first and first.actors == [] and warm.starts == 4
    assert ray.get(other.actors[0].encode_row.remote({"texts": json.dumps(["a queue of items"])}))["dim"] == 384
    warm.stop()
    assert warm.encoders is None and other.actors == []

    with pytest.raises(SystemExit) as exit_:  # only between --watch cycles
        cli(["reindex", str(dest), "--keep-encoders"])
    assert exit_.value.code == 2
    assert "--keep-encoders keeps encoder actors between --watch cycles: it needs --watch" in capsys.readouterr().err


def _racing(dest, meanwhile):
    """A reindex of `dest` that runs `meanwhile` (another run's commit) between its plan and its commit."""
    fs, root = url_to_fs(str(dest))
    latest = read_version(fs, root)
    cfg = ReindexConfig(str(dest), progress=False)

    def accept(draft):
        meanwhile()
        return True

    return ingest(ingest_config(latest, cfg, source_of(latest, cfg), fresh=False), base=latest, accept=accept)


def test_overlapping_runs_rebase_or_stop_with_a_clear_message(lake, docs):
    base, raw, dest = lake
    fs, root = url_to_fs(str(dest))
    n = list_versions(fs, root)[-1]
    # A slow run sees files X and Y; meanwhile a run that saw only X commits. The slow run saw
    # X the same way, so its change still applies: it rebases and commits on top.
    _write(raw, "part-x.parquet", docs[352:364])
    _write(raw, "part-y.parquet", docs[364:376])

    def commit_x_only():
        (raw / "part-y.parquet").rename(base / "part-y.parquet")
        assert reindex(ReindexConfig(str(dest), progress=False)).version == n + 1
        (base / "part-y.parquet").rename(raw / "part-y.parquet")  # the same file: same size and mtime

    result = _racing(dest, commit_x_only)
    assert result.version == n + 2 and read_version(fs, root, n + 2).parent == n + 1
    assert _content(str(dest), {}) == _content(str(_fresh(base, raw, "fresh-rebased", ranges_of=dest)), {})

    # A slow run sees file Z; meanwhile Z is rewritten and another run commits that: the slow
    # run's snapshot is older for Z, so it stops, naming the version that won, and commits nothing.
    _write(raw, "part-z.parquet", docs[376:388])

    def rewrite_and_commit_z():
        _write(raw, "part-z.parquet", docs[376:388][::-1])
        assert reindex(ReindexConfig(str(dest), progress=False)).version == n + 3

    with pytest.raises(CommitConflict, match=rf"version {n + 3} was committed by writer \w+ .* it saw source "
                                             r"files this job saw differently: part-z.parquet"):
        _racing(dest, rewrite_and_commit_z)
    assert list_versions(fs, root)[-1] == n + 3
    # Both runs seeing the same change (the later commits nothing) is tests/test_reindex_overlap.py's case.


def test_a_damaged_or_missing_kept_scan_is_read_again(lake, docs, caplog):
    base, raw, dest = lake
    fs, root = url_to_fs(str(dest))
    latest = read_version(fs, root)
    damaged, missing = latest.scans[0], latest.scans[1]
    before = {r.path: (dest / r.path).read_bytes() for r in (damaged, missing)}
    (dest / damaged.path).write_bytes(before[damaged.path][:-24] + bytes(24))  # one row's digest and number
    (dest / missing.path).unlink()
    _write(raw, "part-9.parquet", docs[240:240 + ROWS])
    result = reindex(ReindexConfig(str(dest), progress=False))
    assert result.version == latest.number + 1
    assert (result.summary["files_scanned"], result.summary["scans_reused"]) == (3, len(latest.scans) - 2)
    assert (f"scan: 3 file(s) read, {len(latest.scans) - 2} unchanged file(s) from their kept scans"
            in format_result(result).splitlines())
    assert f"kept scan {damaged.path} of {damaged.file} cannot be used (its sha256 is not" in caplog.text
    assert f"kept scan {missing.path} of {missing.file} cannot be used" in caplog.text
    # Read again, each file's kept scan has the bytes it had, and the version lists it as before.
    assert {p: (dest / p).read_bytes() for p in before} == before
    new = read_version(fs, root)
    assert [r for r in new.scans if r.file != "part-9.parquet"] == list(latest.scans)


def test_a_kept_scan_vacuumed_while_a_job_runs_is_left_out_of_its_version(lake, docs, monkeypatch):
    import jobs.ingest

    base, raw, dest = lake
    fs, root = url_to_fs(str(dest))
    latest = read_version(fs, root)
    gone = latest.scans[0]
    real = jobs.ingest.plan_units

    def plan_after_a_vacuum(*a, **k):
        # What a vacuum does that deletes the kept scan once the job's scan has read it (a newer
        # version no longer listing it, the one listing it expired by --retain).
        (dest / gone.path).unlink(missing_ok=True)
        return real(*a, **k)
    _write(raw, "part-9b.parquet", docs[252:252 + ROWS])
    with monkeypatch.context() as m:
        m.setattr(jobs.ingest, "plan_units", plan_after_a_vacuum)
        result = reindex(ReindexConfig(str(dest), progress=False))
    # The kept scan served the job before it went: the version commits without it.
    assert result.version == latest.number + 1 and result.summary["scans_reused"] == len(latest.scans)
    v = read_version(fs, root)
    assert gone.file not in v.kept_scans() and len(v.scans) == len(latest.scans)  # one gone, part-9b's added
    # The next job reads that file again and keeps its scan again, with the same bytes.
    _write(raw, "part-9c.parquet", docs[264:264 + ROWS])
    result = reindex(ReindexConfig(str(dest), progress=False))
    assert (result.summary["files_scanned"], result.summary["scans_reused"]) == (2, len(latest.scans))
    assert read_version(fs, root).kept_scans()[gone.file] == gone and (dest / gone.path).is_file()


def test_model_migration_keeps_pinned_versions_searchable(lake, docs, tmp_path, capsys):
    base, raw, dest = lake
    fs, root = url_to_fs(str(dest))
    for name in ("part-5", "part-6", "part-8", "part-9", "part-9b", "part-9c", "part-w1", "part-w2", "part-w3",
                 "part-x", "part-y", "part-z"):
        (raw / f"{name}.parquet").unlink(missing_ok=True)  # a smaller lake to re-encode
    old = list_versions(fs, root)[-1]
    # Another model: a copy of the bundled one with one file changed (the same weights, another fingerprint).
    model = tmp_path / "model"
    shutil.copytree(resolve_model(None), model)
    (model / "README.md").write_text((model / "README.md").read_text() + "\nfine-tuned copy\n")

    result = reindex(ReindexConfig(str(dest), model=str(model), progress=False))
    assert result.summary["mode"] == "model" and result.version == old + 1
    v_old, v_new = read_version(fs, root, old), read_version(fs, root, old + 1)
    assert v_new.model.fingerprint == model_fingerprint(model) != v_old.model.fingerprint
    assert v_new.ranges.id != v_old.ranges.id and not {s.id for s in v_old.shards} & {s.id for s in v_new.shards}
    # Unchanged files are no change only for the model the version was encoded with.
    icfg = ingest_config(v_new, ReindexConfig(str(dest), model_path=str(model)), str(raw), fresh=False)
    files = list_source(str(raw))[2]
    assert source_unchanged(v_new, icfg, files)
    assert not source_unchanged(v_new, replace(icfg, encoder=replace(icfg.encoder, model=None)), files)
    assert not source_unchanged(v_new, icfg, files[1:])
    fresh = base / "fresh-model"
    ingest(replace(_cfg(raw, fresh), encoder=EncoderConfig(model=str(model), batch_size=16)))
    assert _content(str(dest), {}) == _content(str(fresh), {})

    # The old version, pinned, keeps its model; the latest refuses the old model, naming both.
    with Searcher.open(str(dest), version=old) as pinned:
        assert len(pinned.search("a queue of items", k=3)) == 3
    with pytest.raises(ValueError, match=rf"fingerprint {v_old.model.fingerprint}, but version {old + 1} was "
                                         rf"encoded with .*model \({v_new.model.fingerprint}\)"):
        Searcher.open(str(dest), model="all-MiniLM-L6-v2")
    with Searcher.open(str(dest), model=str(model)) as latest:
        assert len(latest.search("a queue of items", k=3)) == 3

    # The new model is a folder, which a manifest never names for loading: later reindexes say
    # where it is with --model, and the same fingerprint makes that an incremental run.
    _write(raw, "part-7.parquet", docs[192:200])
    assert cli(["reindex", str(dest), "--no-progress"]) == 2
    assert "pass --model" in capsys.readouterr().err
    result = reindex(ReindexConfig(str(dest), model=str(model), progress=False))
    assert (result.summary["mode"], result.summary["rows_encoded"], result.version) == ("incremental", 8, old + 2)
    assert (result.summary["files_scanned"], result.summary["scans_reused"]) == (1, 5)



def test_interval_without_watch_is_refused(capsys):
    """A one-shot reindex given --interval ran once and said nothing of it."""
    with pytest.raises(SystemExit) as exit_:
        parse_args(["dest", "--interval", "3s"])
    assert exit_.value.code == 2
    assert "--interval sets the time between --watch cycles: it needs --watch" in capsys.readouterr().err
    assert parse_args(["dest", "--watch", "--interval", "3s"])[2] == 3.0
    assert parse_args(["dest", "--watch"])[2] == 600.0 and parse_args(["dest"])[2] is None
    # A negative interval is refused in words (argparse took `-5m` for an option).
    with pytest.raises(SystemExit):
        parse_args(["dest", "--watch", "--interval", "-5m"])
    assert "error: interval '-5m' is not a duration of 1s or more like 30s" in capsys.readouterr().err
    # Past what a wait can take: the watch loop raised OverflowError after its first cycle.
    # Below a second, the watch listed the source without pause.
    for text in ("inf", "infd", "nan", "1e10", "2e5d", "0.001", "1e-9s", "0.5"):
        with pytest.raises(SystemExit):
            parse_args(["dest", "--watch", "--interval", text])
        assert f"error: interval '{text}' is not a duration of 1s or more" in capsys.readouterr().err
    assert parse_args(["dest", "--watch", "--interval", "1e3"])[2] == 1000.0
    assert parse_args(["dest", "--watch", "--interval", "1s"])[2] == 1.0
    # A threshold of NaN turned drift detection off silently.
    # So did one past 1 (`5` meant for 5%): the excess over the sample's share is at most 1.
    for value in ("nan", "inf", "-0.1", "5", "1.01"):
        with pytest.raises(SystemExit):
            parse_args(["dest", "--recalibrate-on-drift", "--drift-threshold", value])
        assert "drift threshold must be a share in [0, 1] (0.05 for 5%), got" in capsys.readouterr().err
    # A dry run encodes nothing, so it measures no drift to recalibrate on; no actors is no run.
    for args, words in ((["--dry-run", "--recalibrate-on-drift"], "--dry-run plans without encoding, so it measures "
                                                                   "no drift: --recalibrate-on-drift does not apply"),
                        (["--encoder-actors", "0"], "encoder_actors must be >= 1, got 0")):
        with pytest.raises(SystemExit):
            parse_args(["dest", *args])
        assert words in capsys.readouterr().err


def test_excluded_files_stay_out_of_the_first_version_and_every_reindex(docs, tmp_path, capsys):
    """A lake folder that also holds files of other tools (a pretty-printed JSON document, which is
    not JSON Lines, and a folder of them): `--exclude` leaves them out, and is recorded, so a
    reindex leaves them out too and equals a fresh ingest given the same patterns."""
    raw, dest = tmp_path / "raw", tmp_path / "emb"
    for i in range(2):
        _write(raw, f"part-{i}.parquet", docs[i * ROWS:(i + 1) * ROWS])
    (raw / "dataset_info.json").write_text(json.dumps({"description": "not JSON Lines", "rows": 24}, indent=2))
    (raw / "meta").mkdir()
    (raw / "meta" / "schema.jsonl").write_text('{"name": "id", "type": "string"}\n')
    assert [f.relpath for f in list_source(str(raw))[2]] == ["dataset_info.json", "meta/schema.jsonl",
                                                            "part-0.parquet", "part-1.parquet"]
    exclude = ("*.json", "meta/*")
    assert cli(["ingest", str(raw), str(dest), "--id-column", "id", "--unit-rows", str(ROWS), "--batch-size", "16",
                "--calibration-samples", "20", "--no-progress", "--json", "--exclude", "*.json",
                "--exclude", "meta/*"]) == 0
    assert json.loads(capsys.readouterr().out)["documents"] == 2 * ROWS
    v1 = read_version(*url_to_fs(str(dest)), 1)
    assert sorted(v1.source.file_identities) == ["part-0.parquet", "part-1.parquet"]
    assert v1.extra["options"]["exclude"] == list(exclude)
    _write(raw, "part-2.parquet", docs[2 * ROWS:3 * ROWS])
    (raw / "meta" / "more.jsonl").write_text("not JSON at all\n")
    result = reindex(ReindexConfig(str(dest), progress=False))
    assert result.version == 2 and result.summary["files_to_encode"] == ["part-2.parquet"]
    v2 = read_version(*url_to_fs(str(dest)), 2)
    assert sorted(v2.source.file_identities) == [f"part-{i}.parquet" for i in range(3)]
    assert v2.extra["options"]["exclude"] == list(exclude)
    assert cli(["inspect", str(dest)]) == 0
    [line] = [x for x in capsys.readouterr().out.splitlines() if x.startswith("  source ")]
    assert line.startswith(f"  source     {raw}: 3 file(s), 3 kept scan(s) of ")
    assert line.endswith(" (scans/); excluding *.json meta/*")
    fresh = tmp_path / "fresh"
    ingest(replace(ingest_config(v2, ReindexConfig(str(dest)), str(raw), fresh=False), dest=str(fresh)))
    assert _content(str(dest), {}) == _content(str(fresh), {})


def test_a_dataset_ingested_without_naming_ubinary_reindexes_only_what_changed(docs, tmp_path):
    """`--precisions int8` stores ubinary too and its versions record it: the reindex named the
    shards from the recorded list, the ingest from the one given, so every shard looked new."""
    raw, dest = tmp_path / "raw", tmp_path / "emb"
    for i in range(2):
        _write(raw, f"part-{i}.parquet", docs[i * ROWS:(i + 1) * ROWS])
    assert _cfg(raw, dest, precisions=("int8", "int8")).precisions == ("int8", "ubinary")
    ingest(_cfg(raw, dest, precisions=("int8",)))
    assert read_version(*url_to_fs(str(dest)), 1).precisions == ("int8", "ubinary")
    _write(raw, "part-2.parquet", docs[2 * ROWS:3 * ROWS])
    s = reindex(ReindexConfig(str(dest), progress=False)).summary
    assert (s["shards_carried"], s["shards_added"], s["shards_dropped"], s["rows_encoded"]) == (2, 1, 0, ROWS)
