"""A version of 10,000 shards: committed, read and opened for search with work linear in its shards.

docs/scaling.md gives the measured times (bench/scale.py); these tests hold the behaviour those
times rest on, without timing anything: counts, bytes, how often the manifest is read and
checked, how many storage calls each step makes; and that the scan's driver holds one file's
calibration sample at a time, whatever the number of files.
"""
import gc
import json
import os
import math
import threading
import weakref
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest

from ranges.encoding import pretty_json
from ranges.manifest import RangeManifest
from workers.embedding.encoder import BUNDLED, model_fingerprint, resolve_model
from workers.ingest.from_vectors import synthetic_version
from workers.lake import records
from workers.lake.dataset import open_version
from workers.lake.storage import url_to_fs
from workers.lake.versions import commit, read_version
from workers.search.backends import ThreadShardGroups
from workers.search.searcher import Searcher

SHARDS, ROWS = 10_000, 2
CALLS = ("cat_file", "info", "ls", "find")


@pytest.fixture(scope="module")
def ranges():
    r = np.stack([-np.full(384, 0.2, np.float32), np.full(384, 0.2, np.float32)])
    return RangeManifest(r, BUNDLED, model_fingerprint(resolve_model(None)), True, "minmax", None, 100, 0)


@pytest.fixture
def lake(tmp_path):
    """A dataset root on local disk (memory:// lists its whole store per write: quadratic at 20,000 files)."""
    url = str(tmp_path / "ds")
    fs, root = url_to_fs(url)
    return url, fs, root


@pytest.fixture(scope="module")
def big(tmp_path_factory, ranges):
    """A dataset whose version 1 lists 10,000 shards of 2 rows, and that version's draft."""
    url = str(tmp_path_factory.mktemp("scale") / "ds")
    fs, root = url_to_fs(url)
    draft = synthetic_version(fs, root, SHARDS, ranges, rows=ROWS)
    assert commit(fs, root, draft) == 1
    return url, fs, root, draft


class Calls:
    """Storage calls on one real filesystem instance, and the bytes its reads returned, per path."""

    def __init__(self, monkeypatch, fs):
        self.count: Counter = Counter()
        self.read: Counter = Counter()
        for name in CALLS:
            monkeypatch.setattr(fs, name, self._wrap(name, getattr(fs, name)))

    def _wrap(self, name, fn):
        def call(path, *a, **kw):
            self.count[name] += 1
            out = fn(path, *a, **kw)
            if name == "cat_file":
                self.read[str(path)] += len(out)
            return out
        return call

    def total(self) -> int:
        return sum(self.count.values())

    def clear(self) -> None:
        self.count.clear()
        self.read.clear()


def checks(monkeypatch) -> Counter:
    """How many shard records `records._check_shard` checks (a manifest read checks each once)."""
    seen: Counter = Counter()
    real = records._check_shard

    def counted(s, *a):
        seen["shards"] += 1
        return real(s, *a)
    monkeypatch.setattr(records, "_check_shard", counted)
    return seen


def test_commit_and_read_of_10000_shards_touch_the_manifest_once(big, monkeypatch):
    url, fs, root, draft = big
    calls, checked = Calls(monkeypatch, fs), checks(monkeypatch)
    # A commit on top of version 1: it must not read the 10,000-shard manifest back just to
    # see that it is not empty (it asks for its size), and asks storage what a small one asks.
    assert commit(fs, root, replace(draft, parent=1)) == 2
    assert calls.read == Counter()
    assert calls.count["ls"] == 1 and calls.total() <= 4  # list versions/, sizes: a constant few
    assert checked["shards"] == SHARDS  # the records checked once, as readers will check them

    raw = fs.cat_file(f"{root}/versions/00000002.json")
    calls.clear()
    checked.clear()
    m = read_version(fs, root, 2)
    assert (len(m.shards), m.rows, m.count("documents"), m.parent) == (SHARDS, SHARDS * ROWS, SHARDS * ROWS, 1)
    assert len({s.id for s in m.shards}) == SHARDS
    assert checked["shards"] == SHARDS  # checked once, not once by `validate` and again per record
    assert calls.read == Counter({f"{root}/versions/00000002.json": len(raw)})  # one read of the file
    assert pretty_json(m.to_json()) == raw  # the fast writer gives what `json` would


def test_opening_10000_shards_parses_once_and_reads_each_shard_once(big, monkeypatch):
    url, fs, root, _ = big
    calls, checked = Calls(monkeypatch, fs), checks(monkeypatch)
    with Searcher.open(url) as s:
        assert (s.rows, len(s.groups.owner), s.version) == (SHARDS * ROWS, SHARDS, s.manifest.number)
        # One group per thread, each holding its run of shards as one flat index.
        assert len(s.groups) == min(SHARDS, len(os.sched_getaffinity(0)))
        assert sum(len(g.index_classes()) for g in s.groups) == SHARDS
        assert checked["shards"] == SHARDS
        version_reads = [p for p in calls.read if "/versions/" in p]
        assert version_reads == [f"{root}/versions/{s.version:08d}.json"]
        # Per shard: its size, then its index (checked against its sha256); then a constant few.
        assert calls.count["cat_file"] <= SHARDS + 3 and calls.count["info"] <= SHARDS + 3
        assert calls.total() <= 2 * SHARDS + 10
        hits = s.search_vectors(np.ones((1, 384), np.float32) / math.sqrt(384), k=5)
        assert len(hits[0]) == 5


class CountedTuple(tuple):
    """A shard list that counts how often it is walked from end to end."""

    walks = 0

    def __iter__(self):
        CountedTuple.walks += 1
        return super().__iter__()


def test_shard_groups_do_not_walk_the_shard_list_once_per_shard(lake, ranges):
    """One group per shard used to ask every shard whether it stores scales: 10,000 x 10,000."""
    url, fs, root = lake
    commit(fs, root, synthetic_version(fs, root, 300, ranges, rows=ROWS))
    ds = open_version(url)
    object.__setattr__(ds.manifest, "shards", CountedTuple(ds.manifest.shards))
    CountedTuple.walks = 0
    groups = ThreadShardGroups.open(ds, ranges.ranges, "binary", threads=2)
    try:
        assert len(groups) == 2 and all(g.scaled for g in groups)
        assert CountedTuple.walks <= 2
    finally:
        groups.close()


@pytest.mark.parametrize("obj", [
    {"b": [1, 2.5, -0.0, 1e-300, None, True, False, "é\n\"", [], {}], "a": {"z": {"y": [[]]}}},
    [], {}, "x", 3, 1.0, None, (1, (2, 3)),
    {"shards": [{"id": "s", "stats": {"encode_s": 0.1 + 0.2}}]},
])
def test_pretty_json_is_the_bytes_json_writes(obj):
    assert pretty_json(obj) == (json.dumps(obj, indent=1, sort_keys=True, allow_nan=False) + "\n").encode()


def test_pretty_json_leaves_what_it_does_not_know_to_json():
    assert pretty_json({1: "a", 2: [3]}) == (json.dumps({1: "a", 2: [3]}, indent=1, sort_keys=True) + "\n").encode()

    class Sub(dict):
        pass
    assert pretty_json({"a": Sub(b=1)}) == b'{\n "a": {\n  "b": 1\n }\n}\n'
    with pytest.raises(ValueError, match="JSON compliant"):
        pretty_json({"a": [float("nan")]})
    with pytest.raises(TypeError, match="not JSON serializable"):
        pretty_json({"a": object()})


def test_the_scan_fetches_one_tasks_sample_at_a_time(tmp_path, docs, ray_session, monkeypatch):
    """Each scan task's summary carries up to a whole calibration sample of texts: the driver
    merges them one by one, so it never holds tasks x samples texts (1,000 tasks: ~5 GB)."""
    import ray

    import workers.ingest.pipeline as pipeline
    from conftest import write_parquet_lake
    from jobs.ingest import check_source
    from workers.ingest.config import IngestConfig
    from workers.ingest.pipeline import scan

    # Three scan tasks of two files each (a lake this small is one task: `scan_groups`).
    monkeypatch.setattr(pipeline, "scan_groups", lambda costs, cpus: [range(i, i + 2) for i in range(0, len(costs), 2)])

    write_parquet_lake(tmp_path / "lake", docs[:60], files=6, row_group_size=10)
    cfg = IngestConfig(str(tmp_path / "lake"), "unused", id_column="id", calibration_samples=8, progress=False)
    held = []
    real_get = ray.get

    def get(refs, *a, **kw):
        out = real_get(refs, *a, **kw)
        values = out if isinstance(out, list) else [out]
        held.append(sum(isinstance(v, dict) and "sample" in v for v in values))
        return out
    monkeypatch.setattr(ray, "get", get)
    found = scan(cfg, check_source(cfg)[0])
    rows, duplicates, sample = found.rows, found.duplicates, found.sample
    assert found.scans is None and found.files_reused == 0  # kept scans are written only when asked
    assert rows == [10] * 6 and duplicates == {} and len(sample.ids) == 8
    assert max(held) == 1 and sum(held) == 3


def test_one_shard_without_scales_turns_them_off_for_every_group(lake, ranges):
    url, fs, root = lake
    draft = synthetic_version(fs, root, 3, ranges, rows=ROWS)
    shards = list(draft.shards)
    shards[1] = replace(shards[1], ubinary_scale=False)  # as a shard written before the column
    commit(fs, root, replace(draft, shards=tuple(shards)))
    groups = ThreadShardGroups.open(open_version(url), ranges.ranges, "binary", threads=1)
    try:
        assert len(groups) == 1 and not groups[0].scaled
    finally:
        groups.close()


HISTORY = 14  # versions: several times what `read_versions` reads ahead


class HeldManifests:
    """Calls of `read_version` per version, whether each ran in a read-ahead thread, and the most
    manifests alive at any call (the history readers' memory, in manifests)."""

    def __init__(self, monkeypatch):
        import jobs.history
        import jobs.inspect_dataset
        import workers.lake.versions as versions

        self.reads: Counter = Counter()
        self.in_threads: Counter = Counter()
        self.alive: dict[int, weakref.ref] = {}  # manifests are unhashable: by id
        self.most = 0
        real = versions.read_version

        lock = threading.Lock()  # read-ahead threads call this side by side

        def read(fs, root, n=None):
            gc.collect()
            with lock:
                self.most = max(self.most, sum(r() is not None for r in self.alive.values()))
            m = real(fs, root, n)
            with lock:
                self.alive[id(m)] = weakref.ref(m)
            self.reads[n] += 1
            self.in_threads[n] += threading.current_thread().name.startswith("quantlake-versions")
            return m
        for module in (versions, jobs.history, jobs.inspect_dataset):
            monkeypatch.setattr(module, "read_version", read)

    def clear(self) -> None:
        self.reads.clear()
        self.in_threads.clear()
        self.most = 0


@pytest.fixture(params=["local", "s3"])
def long_history(request, ranges):
    """HISTORY versions of a 40-shard dataset, each without the first shard and source file of
    the one before: on local disk (manifests read one at a time) or S3 (read ahead in threads)."""
    if request.param == "s3":
        bucket, options = request.getfixturevalue("s3")
        url = f"{bucket}/ds"
    else:
        url, options = request.getfixturevalue("lake")[0], {}
    fs, root = url_to_fs(url, options)
    draft = synthetic_version(fs, root, 40, ranges, rows=ROWS)
    for v in range(HISTORY):
        files = {f: i for f, i in draft.source.file_identities.items() if int(f.split("-")[1]) >= v}
        assert commit(fs, root, replace(draft, parent=v or None, shards=draft.shards[v:],
                                        source=replace(draft.source, files=files))) == v + 1
    return url, options, fs, root, request.param == "s3"


def test_history_and_inspect_hold_a_few_manifests_however_long_the_history(long_history, monkeypatch, capsys):
    """They used to hold every version's manifest at once: ~16 MB each at 10,000 shards, and a
    dataset reindexed every 10 minutes commits 144 versions a day. `--last N` reads N of them."""
    from jobs.cli import main as cli
    from jobs.history import history, report
    from jobs.inspect_dataset import InspectConfig, run as inspect
    from workers.lake.versions import VERSIONS_READ_AHEAD

    url, options, fs, root, remote = long_history
    every = Counter(range(1, HISTORY + 1))
    held = HeldManifests(monkeypatch)
    entries = history(fs, root)
    assert held.reads == every  # each manifest read once, as a parent not again
    assert held.in_threads == (every if remote else Counter())  # read ahead over a network only
    assert held.most <= VERSIONS_READ_AHEAD + 2 < HISTORY  # those read ahead, the one in hand, its parent
    assert [(e["version"], e["parent"], e["shards"]) for e in entries] == [
        (v, v - 1 or None, 40 - v + 1) for v in range(1, HISTORY + 1)]
    for v, e in enumerate(entries[1:], start=1):
        c = e["changes"]
        assert (c["files_removed"], c["files_added"], c["files_changed"]) == ([f"part-{v - 1}-0.parquet"], [], [])
        assert (c["shards_dropped"], c["shards_added"], c["ranges_changed"]) == (1, 0, False)

    # The last few: the first one's parent is read on its own, for its changes.
    held.clear()
    tail = history(fs, root, last=3)
    assert tail == entries[-3:]
    assert held.reads == Counter(range(HISTORY - 3, HISTORY + 1))
    assert report(url, tail, HISTORY).startswith(f"dataset {url}: {HISTORY} committed version(s), the last 3 shown\n")
    assert cli(["history", url, "--last", "2", "--json", "--storage-options", json.dumps(options)]) == 0
    assert json.loads(capsys.readouterr().out) == entries[-2:]
    with pytest.raises(SystemExit) as bad:
        cli(["history", url, "--last", "0"])
    assert bad.value.code == 2
    assert "--last must be >= 1, got 0" in capsys.readouterr().err

    held.clear()
    text = inspect(InspectConfig(url, version=5, storage_options=options))
    assert held.reads == every  # version 5, the one detailed, read once
    assert held.most <= VERSIONS_READ_AHEAD + 2
    rows = [line.split() for line in text.splitlines()[2:HISTORY + 2]]
    assert [(int(r[0]), r[3], int(r[4])) for r in rows] == [(v, str(v - 1 or "-"), 40 - v + 1)
                                                            for v in range(1, HISTORY + 1)]
    assert "version 5, committed" in text

    # The table's last few: their manifests and the detailed version's, no other.
    held.clear()
    lines = inspect(InspectConfig(url, version=5, storage_options=options, last=3)).splitlines()
    assert held.reads == Counter([5, HISTORY - 2, HISTORY - 1, HISTORY])
    assert lines[0] == f"dataset {url}: {HISTORY} committed version(s), the last 3 shown"
    assert [int(line.split()[0]) for line in lines[2:5]] == [HISTORY - 2, HISTORY - 1, HISTORY]
    assert lines[5].startswith("version 5, committed")
    with pytest.raises(SystemExit) as bad:
        cli(["inspect", url, "--last", "0"])
    assert bad.value.code == 2 and "--last must be >= 1, got 0" in capsys.readouterr().err
