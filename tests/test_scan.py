"""The scan pass: a sample chosen by id alone, and duplicates found across files."""
import io

import numpy as np
import pyarrow as pa
import pytest

from workers.ingest.scan import (DUPLICATE, ENTRY, KEPT, find_duplicates, from_kept, kept_bytes, scan_id,
                                 scan_rows)
from workers.ingest.source import SourceFile, classify

F = SourceFile("a.parquet", 1, "v", "parquet")


def _batches(ids, texts, size):
    out = []
    for a in range(0, len(ids), size):
        b = pa.record_batch({"id": ids[a:a + size], "text": texts[a:a + size]})
        out.append(classify(F, a, b, "text", "id"))
    return out


def test_sample_depends_on_ids_not_on_batching_or_order():
    ids = [f"doc-{i}" for i in range(1000)]
    texts = [f"text {i}" for i in range(1000)]
    one = scan_rows(_batches(ids, texts, 1000), 0, 1, seed=3, k=50).sample
    small = scan_rows(_batches(ids, texts, 7), 0, 1, seed=3, k=50).sample
    # two "files" holding the same rows in another order, merged either way round
    rev = scan_rows(_batches(ids[::-1][:400], texts[::-1][:400], 33), 0, 1, 3, 50).sample
    rest = scan_rows(_batches(ids[::-1][400:], texts[::-1][400:], 64), 1, 1, 3, 50).sample
    assert one.ids == small.ids == rev.merge(rest).ids == rest.merge(rev).ids
    assert len(one.ids) == 50 and len(set(one.ids)) == 50
    assert [texts[ids.index(i)] for i in one.ids] == one.texts
    other = scan_rows(_batches(ids, texts, 1000), 0, 1, seed=4, k=50).sample
    assert len(set(one.ids) & set(other.ids)) < 15  # another seed, another sample


def test_rows_that_cannot_be_encoded_are_not_sampled_or_deduped():
    ids = ["a", "b", None, "d", "e"]
    texts = ["x", None, "y", "   ", "z"]
    s = scan_rows(_batches(ids, texts, 2), 0, 1, seed=0, k=10)
    assert (s.rows, s.valid) == (5, 2)
    assert sorted(s.sample.ids) == ["a", "e"]
    assert sorted(s.parts[0]["row"].tolist()) == [0, 4]


def test_duplicates_across_files_and_partitions():
    ids0, ids1 = ["a", "b", "c", "a"], ["c", "d", "b", "b"]
    n_parts = 3
    s0 = scan_rows(_batches(ids0, ["t"] * 4, 4), 0, n_parts, 0, 0)
    s1 = scan_rows(_batches(ids1, ["t"] * 4, 2), 1, n_parts, 0, 0)
    dups = np.concatenate([find_duplicates(s0.parts[p], s1.parts[p]) for p in range(n_parts)])
    got = sorted(map(tuple, dups.tolist()))
    # (file, row, first_file, first_row): the first occurrence by (file, row) is kept
    assert got == [(0, 3, 0, 0), (1, 0, 0, 2), (1, 2, 0, 1), (1, 3, 0, 1)]
    assert find_duplicates().dtype == DUPLICATE and len(find_duplicates()) == 0


def test_a_kept_scan_stands_for_the_scan_whatever_the_partitions():
    ids = [f"doc-{i}" for i in range(300)] + [None, "x"]
    texts = [f"text {i}" for i in range(300)] + ["no id", "  "]
    four = scan_rows(_batches(ids, texts, 64), 2, 4, seed=0, k=0)
    data = kept_bytes(four)
    assert data == kept_bytes(scan_rows(_batches(ids, texts, 7), 5, 3, seed=1, k=0))  # bytes of the file alone
    assert 0 < len(data) - 24 * 300 <= 256  # the .npy header, then 24 bytes per valid row
    back = from_kept(data, four.rows, four.valid, 2, 4)
    assert (back.rows, back.valid, len(back.sample.ids)) == (302, 300, 0)
    for a, b in zip(back.parts, four.parts):
        assert a.dtype == ENTRY and np.array_equal(np.sort(a, order="row"), np.sort(b, order="row"))
    # The duplicate check gives the same answer from either
    other = scan_rows(_batches(ids[::3], texts[::3], 50), 1, 4, seed=0, k=0)
    assert all(np.array_equal(find_duplicates(a, o), find_duplicates(b, o))
               for a, b, o in zip(back.parts, four.parts, other.parts))


def _npy(a) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _object_npy() -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|O", "fortran_order": False, "shape": (1,)})
    return buf.getvalue() + b"\x80\x04N."  # what an object array's data would be: a pickle stream


def test_a_damaged_kept_scan_is_refused():
    good = np.zeros(3, KEPT)
    good["row"] = [0, 2, 5]
    assert from_kept(_npy(good), 6, 3, 0, 1).valid == 3
    for data, rows, valid, match in [
            (b"not a numpy file", 6, 3, "not a kept scan"),
            (_npy(np.zeros(3, np.float64)), 6, 3, "float64"),
            (_npy(good), 6, 4, "of 3 rows, its record says 4 valid of 6"),
            (_npy(good), 5, 3, r"not increasing within \[0, 5\)"),
            (_npy(good[::-1].copy()), 6, 3, "not increasing"),
            (_object_npy(), 6, 1, "not a kept scan")]:  # an object array would be unpickled: never loaded
        with pytest.raises(ValueError, match=match):
            from_kept(data, rows, valid, 0, 1)


def test_a_kept_scan_is_named_by_the_file_identity_and_columns():
    one = scan_id("a.parquet", {"size": 1, "version": "v"}, "text", "id")
    assert one == scan_id("a.parquet", {"version": "v", "size": 1}, "text", "id") and len(one) == 32
    assert len({one, scan_id("b.parquet", {"size": 1, "version": "v"}, "text", "id"),
                scan_id("a.parquet", {"size": 2, "version": "v"}, "text", "id"),
                scan_id("a.parquet", {"size": 1, "version": "w"}, "text", "id"),
                scan_id("a.parquet", {"size": 1, "version": "v"}, "body", "id"),
                scan_id("a.parquet", {"size": 1, "version": "v"}, "text", None)}) == 6


def test_duplicates_match_a_first_occurrence_dictionary_on_colliding_digests():
    rng = np.random.default_rng(5)
    for _ in range(50):
        n = int(rng.integers(1, 400))
        e = np.empty(n, ENTRY)
        # Few distinct values: many rows share h1, some of them share h2 too (the same id).
        e["h1"], e["h2"] = rng.integers(0, 40, n), rng.integers(0, 3, n)
        e["file"], e["row"] = rng.integers(0, 4, n), rng.permutation(n)
        first, want = {}, set()
        for i in sorted(range(n), key=lambda i: (int(e["file"][i]), int(e["row"][i]))):
            key = (int(e["h1"][i]), int(e["h2"][i]))
            if key in first:
                want.add((int(e["file"][i]), int(e["row"][i])) + first[key])
            else:
                first[key] = (int(e["file"][i]), int(e["row"][i]))
        got = find_duplicates(e[: n // 3], e[n // 3:])
        assert got.dtype == DUPLICATE and len(got) == len(want)
        assert {tuple(int(x) for x in d) for d in got} == want
    assert len(find_duplicates(e[np.unique(e["h1"], return_index=True)[1]])) == 0  # no h1 twice: none


def test_scan_groups_are_consecutive_files_of_about_the_target_bytes(monkeypatch):
    import workers.ingest.pipeline as pipeline
    from workers.ingest.pipeline import scan_groups

    monkeypatch.setattr(pipeline, "SCAN_GROUP_BYTES", 100)
    monkeypatch.setattr(pipeline, "SCAN_GROUP_MAX_BYTES", 300)
    monkeypatch.setattr(pipeline, "SCAN_GROUP_FILES", 4)
    # 1 CPU, 4 tasks: a group closes at a fourth of the 830 bytes; a file above that is a group alone.
    assert [list(g) for g in scan_groups([100, 100, 60, 400, 10, 10, 10, 10, 10, 90, 30], 1)] == \
        [[0, 1, 2], [3], [4, 5, 6, 7], [8, 9, 10]]
    # More CPUs, smaller groups, down to SCAN_GROUP_BYTES; 100 CPUs: every file from 100 bytes on alone.
    assert [len(g) for g in scan_groups([100] * 8, 1)] == [2, 2, 2, 2]
    assert [len(g) for g in scan_groups([100] * 8, 100)] == [1] * 8
    assert [len(g) for g in scan_groups([1] * 10, 1)] == [4, 4, 2]  # at most SCAN_GROUP_FILES
    assert [len(g) for g in scan_groups([100] * 40, 1)] == [3] * 13 + [1]  # a fourth, 1,000, is over the cap
    assert scan_groups([], 2) == [] and [list(g) for g in scan_groups([0], 2)] == [[0]]


def test_grouped_scan_tasks_give_what_one_task_per_file_gives(ray_session, docs, tmp_path, monkeypatch):
    """Rows, duplicates (across files, hence across groups), the calibration sample and the kept
    scans are the same whether the files are scanned one per task, in pairs or all in one."""
    import pyarrow.parquet as pq

    import workers.ingest.pipeline as pipeline
    from workers.ingest.config import IngestConfig
    from workers.ingest.pipeline import scan
    from workers.ingest.source import list_source

    lake = tmp_path / "lake"
    lake.mkdir()
    rows = [docs[i] for i in range(120)]
    for i in range(6):  # each file repeats two ids of the file before it; one id is null
        part = rows[i * 20:(i + 1) * 20] + (rows[(i - 1) * 20:(i - 1) * 20 + 2] if i else [(None, "no id")])
        pq.write_table(pa.table({"id": [d[0] for d in part], "text": [d[1] for d in part]}),
                       lake / f"part-{i}.parquet")
    files = list_source(str(lake))[2]
    out = {}
    for name, groups in (("one per task", lambda costs, cpus: [range(i, i + 1) for i in range(len(costs))]),
                         ("pairs", lambda costs, cpus: [range(i, min(i + 2, len(costs))) for i in range(0, 6, 2)]),
                         ("one task", lambda costs, cpus: [range(len(costs))])):
        monkeypatch.setattr(pipeline, "scan_groups", groups)
        cfg = IngestConfig(str(lake), str(tmp_path / name), id_column="id", calibration_samples=30, seed=5,
                           progress=False)
        s = scan(cfg, files, keep=True)
        out[name] = (s.rows, s.duplicates, s.sample.ids, s.sample.texts, s.sample.keys.tolist(),
                     [(r.file, r.path, r.sha256, r.rows, r.valid) for r in s.scans])
    first = out["one per task"]
    assert first[0] == [21, 22, 22, 22, 22, 22] and sum(len(d) for d in first[1].values()) == 10
    assert len(first[2]) == 30 and len(first[5]) == 6
    assert out["pairs"] == first and out["one task"] == first


def _lake_files(docs, n: int) -> list[tuple[str, bytes]]:
    """`n` small Parquet files of 15 real documents each (the third repeats an id of the second)."""
    import pyarrow.parquet as pq

    out = []
    for i in range(n):
        part = docs[i * 15:(i + 1) * 15] + ([docs[16]] if i == 2 else [])
        buf = io.BytesIO()
        pq.write_table(pa.table({"id": [d[0] for d in part], "text": [d[1] for d in part]}), buf)
        out.append((f"part-{i}.parquet", buf.getvalue()))
    return out


def _scan_group(cfg, files, keep=True):
    """`steps.scan_files` over all `files` in this process, as one scan task runs it."""
    from workers.ingest.steps import scan_files

    summary, *parts = scan_files(cfg, [(i, f, None) for i, f in enumerate(files)], 4, keep)
    return ([(s["rows"], s["valid"], s["scan"]) for s in summary["files"]], summary["sample"].ids,
            summary["sample"].keys.tolist(), [p.tobytes() for p in parts])


@pytest.mark.parametrize("where", ["file", "s3"])
def test_a_scan_task_reads_files_at_once_only_over_a_network(where, docs, tmp_path, monkeypatch, request):
    """On S3 a scan task's files are read several at a time (a round trip per request, each
    waited for in turn one after another); on local disk one at a time. The result, kept scans
    included, is the same either way: the files' scans in listing order."""
    import threading

    import workers.ingest.steps as steps
    from workers.ingest.config import IngestConfig
    from workers.ingest.source import list_source
    from workers.lake.storage import url_to_fs

    if where == "s3":
        bucket, options = request.getfixturevalue("s3")
        source, dest = f"{bucket}/lake", f"{bucket}/ds"
    else:
        options, source, dest = {}, str(tmp_path / "lake"), str(tmp_path / "ds")
    fs, root = url_to_fs(source, options)
    fs.makedirs(root, exist_ok=True)
    for name, data in _lake_files(docs, 6):
        fs.pipe_file(f"{root}/{name}", data)
    files = list_source(source, options)[2]
    cfg = IngestConfig(source, dest, id_column="id", calibration_samples=20, seed=3, storage_options=options,
                       progress=False)
    assert steps.over_network(fs) is (where == "s3")

    monkeypatch.setattr(steps, "SCAN_FILES_AT_ONCE", 3)
    running, most, threads, lock = [0], [0], set(), threading.Lock()
    first_three_in = threading.Barrier(3, timeout=20)
    real = steps.scan_file

    def counted(cfg, file_index, *args):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
            threads.add(threading.current_thread())
        try:
            if where == "s3" and file_index < 3:
                first_three_in.wait()  # read at the same time, or this times out and the test fails
            return real(cfg, file_index, *args)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(steps, "scan_file", counted)
    at_once = _scan_group(cfg, files)
    if where == "s3":
        assert most[0] == 3  # never more than SCAN_FILES_AT_ONCE
    else:
        assert threads == {threading.main_thread()}

    monkeypatch.setattr(steps, "scan_file", real)
    monkeypatch.setattr(steps, "over_network", lambda fs: False)  # one after another, as on local disk
    assert _scan_group(cfg, files) == at_once
    per_file = at_once[0]
    assert [(rows, valid) for rows, valid, _ in per_file] == [(15, 15)] * 2 + [(16, 16)] + [(15, 15)] * 3
    assert [ref.file for _, _, ref in per_file] == [f.relpath for f in files]
    assert len(at_once[1]) == 20


def test_a_file_that_fails_among_files_read_at_once_fails_the_task_with_its_own_error(s3, docs, monkeypatch):
    """Read several at a time, the group's first bad file (in listing order) raises what reading
    one after another raises: here the second file's error, not the fourth's (an empty file)."""
    import workers.ingest.steps as steps
    from workers.ingest.config import IngestConfig
    from workers.ingest.source import list_source
    from workers.lake.storage import url_to_fs

    bucket, options = s3
    fs, root = url_to_fs(f"{bucket}/lake", options)
    for name, data in _lake_files(docs, 5):
        fs.pipe_file(f"{root}/{name}", {"part-1.parquet": b"not parquet", "part-3.parquet": b""}.get(name, data))
    files = list_source(f"{bucket}/lake", options)[2]
    cfg = IngestConfig(f"{bucket}/lake", f"{bucket}/ds", id_column="id", storage_options=options, progress=False)
    errors = []
    for network in (True, False):
        monkeypatch.setattr(steps, "over_network", lambda fs: network)
        with pytest.raises(Exception) as exc:
            _scan_group(cfg, files)
        errors.append((type(exc.value), str(exc.value)))
    assert errors[0] == errors[1] and "magic bytes not found" in errors[0][1], errors


def test_a_kept_scan_keeps_the_marks_of_its_file_and_gives_them_when_it_stands_in(tmp_path, docs, monkeypatch):
    """A large JSON Lines file's marks go with its kept scan's record, and come back from it when
    the kept scan stands in for the file (the file is not read then). A record written before
    marks were kept gets the marks of the next read of the file (a job that calibrates)."""
    import json
    from dataclasses import replace

    import workers.ingest.source as source
    from workers.embedding.encoder import EncoderConfig
    from workers.ingest.config import IngestConfig
    from workers.ingest.source import list_source
    from workers.ingest.steps import scan_file

    (tmp_path / "lake").mkdir()
    raw = "".join(json.dumps({"id": d, "text": t}) + "\n" for d, t in docs[:60]).encode()
    (tmp_path / "lake" / "a.jsonl").write_bytes(raw)
    _, _, [f] = list_source(str(tmp_path / "lake"))
    monkeypatch.setattr(source, "JSONL_SEGMENT", 2000)
    cfg = IngestConfig(str(tmp_path / "lake"), str(tmp_path / "dest"), id_column="id",
                       encoder=EncoderConfig(batch_size=8), progress=False)
    read, *parts = scan_file(cfg, 0, f, 2, keep=True)
    ref = read["scan"]
    assert not read["reused"] and len(read["marks"]) >= 2 and ref.marks == tuple(read["marks"])
    for row, byte, types in ref.marks:
        assert raw[byte - 1:byte] == b"\n" and raw[:byte].count(b"\n") == row and types == ("string", "string")

    with_ranges = replace(cfg, ranges=str(tmp_path / "ranges.json"))  # no sample: the kept scan stands in
    (tmp_path / "lake" / "a.jsonl").rename(tmp_path / "away.jsonl")  # not read: gone meanwhile
    kept, *kept_parts = scan_file(with_ranges, 0, f, 2, kept=ref, keep=True)
    assert kept["reused"] and kept["scan"] == ref and kept["marks"] == read["marks"]
    assert [p.tobytes() for p in kept_parts] == [p.tobytes() for p in parts]
    # Marks of other columns than its name says (a record made up) are not used.
    narrow = replace(ref, marks=tuple((r, b, ("string",)) for r, b, _ in ref.marks))
    assert scan_file(with_ranges, 0, f, 2, kept=narrow, keep=True)[0]["marks"] == []

    (tmp_path / "away.jsonl").rename(tmp_path / "lake" / "a.jsonl")
    older = replace(ref, marks=None)  # a record written before marks were kept
    assert scan_file(with_ranges, 0, f, 2, kept=older, keep=True)[0]["marks"] == []
    calibrating, *_ = scan_file(cfg, 0, f, 2, kept=older, keep=True)
    assert not calibrating["reused"] and calibrating["scan"] == ref and calibrating["marks"] == read["marks"]
