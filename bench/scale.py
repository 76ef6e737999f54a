"""Per-stage costs on this machine, and how commit, open and listing grow with shards and files.

    python bench/scale.py [--skip-encode] [--skip-s3] [--ingest-docs 0] [--jsonl-rows 200000]
                          [--scan-files 0 [--scan-rows 100000]]
                          [--scan-s3 0] [--open-s3 0] [--latency-ms 0] [--history-versions 0]
                          [--shard-sizes 10000,1000,100 [--shard-size-rows 100000]] [--json]

Measured here, each stage alone:
  read       Parquet rows/s and MB/s of text through the ingest's reader (`iter_batches`);
  jsonl      the same rows as one JSON Lines file (--jsonl-rows, 0 to skip): its read as the scan
             reads it, parsed a segment at a time and leaving marks, against one parse of the
             whole file (what the reader did before segments); then each 10,000-row unit read
             from the file's start (as units were read before marks) against from its mark;
  scan       rows/s of one file's scan read from the file (id and text columns, classified,
             digested) against read from its kept scan (`scans/<id>.npy`), and the bytes of each;
             with --scan-files N, the whole scan phase of a job (`workers/ingest/pipeline.scan`
             on a local Ray: scan tasks, the duplicate shuffle) over N files of --scan-rows rows,
             reading the files and then reading their kept scans (what a reindex does);
             with --scan-s3 N, one scan task's work (`steps.scan_files`) over N small Parquet
             files on S3 (a moto server in a process of its own on 127.0.0.1), reading several
             files at once against one after another; with --latency-ms M, each request reaches
             the server M ms late (a relay process on 127.0.0.1 between the two), as a request
             to an object store across a network would;
  open on S3 with --open-s3 N, `Searcher.open` of a version of N synthetic shards on S3 (the
             same moto server and relay), loading 8 shards at a time per group against one per
             search thread;
  encode     documents/s of the bundled all-MiniLM-L6-v2 on this CPU (demo-like docstrings);
  quantize   vectors/s to int8 + ubinary (`quantize_all`, 384-d);
  write      seconds per MB of a shard written by `write_shard` to local disk and to a moto S3
             server on 127.0.0.1 (Parquet + FAISS index, 10,000 rows);
  commit     commit and read of a version of 100 / 1,000 / 10,000 synthetic shards (copies of
             one real 2-row shard: `synthetic_version`), and the manifest's size;
  open       `Searcher.open` of those versions (real tiny shard files: each index read, checked
             against its sha256 and loaded);
  listing    `list_source` of 1,000 / 10,000 empty Parquet-named files on local disk;
  history    with --history-versions N, `history` and `inspect` over N versions of 10,000
             synthetic shards: seconds and peak RSS, each in a process of its own;
  shard size with --shard-sizes S1,S2,...: the same --shard-size-rows vectors committed as shards
             of each size (a lake of files of that many rows: a shard never spans two files),
             then `Searcher.open` and the default search, batched and one query per call;
  overlap    with --ingest-docs N: an ingest of N demo documents, the sum of the per-shard stage
             seconds against the main pass's wall time.
docs/scaling.md projects these to 100M documents. Figures depend on the machine's load: the
script prints the load average it ran under.
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import replace

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from ranges.manifest import RangeManifest  # noqa: E402
from workers.embedding.encoder import BUNDLED, model_fingerprint, resolve_model  # noqa: E402
from workers.lake.records import ShardSource  # noqa: E402

DIM = 384


def timed(fn, repeat: int = 1) -> float:
    """Best wall time of `repeat` calls (the least disturbed by other load)."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def texts(n: int) -> list[str]:
    """`n` real docstrings (the demo corpus's kind of text), repeated when the modules run out."""
    import collections, email, http.client, json as js, logging, pathlib, re, statistics  # noqa: E401
    out = []
    for mod in (collections, email, http.client, js, logging, pathlib, re, statistics, os, inspect, time):
        for name in sorted(dir(mod)):
            doc = inspect.getdoc(getattr(mod, name, None)) or ""
            if len(doc) >= 40:
                out.append(doc)
    return (out * (n // len(out) + 1))[:n]


def unit_vectors(n: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def ranges_manifest() -> RangeManifest:
    x = unit_vectors(2000)
    return RangeManifest(np.stack([x.min(0), x.max(0)]), BUNDLED, model_fingerprint(resolve_model(None)), True,
                         "minmax", None, len(x), 0)


def bench_read(work: str, rows: int = 200_000) -> dict:
    from workers.ingest.source import iter_batches, list_source

    lake = os.path.join(work, "read")
    os.makedirs(lake)
    body = texts(2000)
    table = pa.table({"id": [f"d{i}" for i in range(rows)], "text": [f"{body[i % len(body)]} ({i})" for i in range(rows)]})
    # Every text distinct (a repeated one would shrink to a dictionary entry); read from the page
    # cache: the CPU cost of decoding, not the disk's or the network's.
    pq.write_table(table, os.path.join(lake, "part-0.parquet"), row_group_size=10_000)
    mb = sum(len(t.encode()) for t in table["text"].to_pylist()) / 1e6
    fs, root, files = list_source(lake)

    def read():
        n = sum(b.num_rows for _, b in iter_batches(fs, root, files[0], ["id", "text"]))
        assert n == rows
    s = timed(read, 3)
    return {"rows": rows, "text_mb": round(mb, 1), "s": round(s, 3), "rows_per_s": round(rows / s),
            "mb_per_s": round(mb / s, 1)}


def bench_jsonl(work: str, rows: int = 200_000, unit_rows: int = 10_000) -> dict:
    """`bench_read`'s rows as one JSON Lines file: the scan's read and the units' reads, with and
    without the segments and marks that let a unit start near its first row."""
    import workers.ingest.source as source
    from workers.ingest.source import iter_batches, list_source

    lake = os.path.join(work, "jsonl")
    os.makedirs(lake)
    body = texts(2000)
    with open(os.path.join(lake, "part-0.jsonl"), "w") as out:
        for i in range(rows):
            out.write(json.dumps({"id": f"d{i}", "text": f"{body[i % len(body)]} ({i})"}) + "\n")
    fs, root, [f] = list_source(lake)

    def read(start=0, stop=None, mark=None, marks=None):
        n = sum(b.num_rows for _, b in iter_batches(fs, root, f, ["id", "text"], start, stop, "text", mark, marks))
        assert n == (stop or rows) - start, n

    def one_parse(start=0, stop=None):  # the reader before segments: one parse from the file's start
        batches = source._jsonl_batches(lambda: source._open(fs, root, f), f, ["id", "text"], "text")
        n = sum(b.num_rows for _, b in source._window(batches, 0, start, stop))
        assert n == (stop or rows) - start, n

    marks: list = []
    read(marks=marks)
    scan = timed(read, 3)
    whole = timed(one_parse, 3)
    bounds = list(range(0, rows, unit_rows))
    at = [max((m for m in marks if m.row <= a), default=None, key=lambda m: m.byte) for a in bounds]
    from_start = [timed(lambda a=a: one_parse(a, min(a + unit_rows, rows)), 2) for a in bounds]
    from_mark = [timed(lambda a=a, m=m: read(a, min(a + unit_rows, rows), m), 2) for a, m in zip(bounds, at)]
    return {"rows": rows, "mb": round(f.size / 1e6, 1), "marks": len(marks),
            "scan_s": round(scan, 3), "one_parse_s": round(whole, 3), "scan_vs_one_parse": round(scan / whole, 3),
            "units": len(bounds), "first_unit_s": [round(from_start[0], 3), round(from_mark[0], 3)],
            "last_unit_s": [round(from_start[-1], 3), round(from_mark[-1], 3)],
            "units_from_start_s": round(sum(from_start), 2), "units_from_marks_s": round(sum(from_mark), 2),
            "units_from_marks_vs_start": round(sum(from_mark) / sum(from_start), 3)}


def bench_scan(work: str) -> dict:
    """The scan of `bench_read`'s file: from the file, and from its kept scan."""
    from workers.ingest.scan import from_kept, kept_bytes, scan_rows
    from workers.ingest.source import classify, iter_batches, list_source

    fs, root, files = list_source(os.path.join(work, "read"))
    f = files[0]

    def from_file():
        batches = (classify(f, first, b, "text", "id") for first, b in iter_batches(fs, root, f, ["text", "id"]))
        return scan_rows(batches, 0, 64, 0, 0)
    s_file = timed(from_file, 3)
    found = from_file()
    data = kept_bytes(found)
    s_kept = timed(lambda: from_kept(data, found.rows, found.valid, 0, 64), 3)
    return {"rows": found.rows, "file_mb": round(f.size / 1e6, 1), "kept_mb": round(len(data) / 1e6, 1),
            "file_s": round(s_file, 3), "kept_s": round(s_kept, 3), "file_rows_per_s": round(found.rows / s_file),
            "kept_rows_per_s": round(found.rows / s_kept), "speedup": round(s_file / s_kept, 1)}


def bench_scan_phase(work: str, n_files: int, rows: int = 100_000) -> dict:
    """`pipeline.scan` over `n_files` files: from the files (writing kept scans), then from the kept
    scans; with its scan tasks grouping files (`scan_groups`) and, as the baseline, one per file."""
    import ray

    import workers.ingest.pipeline as pipeline
    from workers.ingest.config import IngestConfig
    from workers.ingest.pipeline import scan
    from workers.ingest.source import list_source
    from workers.ray_session import init_ray

    lake, dest = os.path.join(work, "scan-lake"), os.path.join(work, "scan-dest")
    os.makedirs(lake)
    body = texts(2000)
    text_bytes = 0
    for f in range(n_files):
        ids = [f"f{f}-d{i}" for i in range(rows)]
        column = [f"{body[i % len(body)]} ({f}, {i})" for i in range(rows)]
        text_bytes += sum(len(t.encode()) for t in column)
        pq.write_table(pa.table({"id": ids, "text": column}), os.path.join(lake, f"part-{f:04d}.parquet"),
                       row_group_size=10_000)
    files = list_source(lake)[2]
    # With ranges (the reindex case): no calibration sample, so kept scans can stand in.
    cfg = IngestConfig(lake, dest, id_column="id", ranges="unused", progress=False)
    grouped = pipeline.scan_groups
    per_file = lambda costs, cpus: [range(i, i + 1) for i in range(len(costs))]  # noqa: E731 - the baseline
    init_ray()
    best: dict[str, float] = {}
    try:
        scan(cfg, files[:1])  # Ray's workers start and import the scan's modules once
        for _ in range(3):  # alternated, best of three each
            for tasks, groups in (("per_file", per_file), ("grouped", grouped)):
                pipeline.scan_groups = groups
                t0 = time.perf_counter()
                first = scan(cfg, files, keep=True)
                best[f"{tasks}_from_files_s"] = min(best.get(f"{tasks}_from_files_s", 1e9), time.perf_counter() - t0)
                kept = {r.file: r for r in first.scans}
                t0 = time.perf_counter()
                again = scan(cfg, files, kept=kept)
                best[f"{tasks}_from_kept_s"] = min(best.get(f"{tasks}_from_kept_s", 1e9), time.perf_counter() - t0)
                assert again.files_reused == n_files and again.rows == first.rows
                assert again.duplicates == first.duplicates
        cpus = ray.cluster_resources()["CPU"]
        tasks = {"grouped_tasks": len(grouped([f.size for f in files], cpus)),
                 "grouped_tasks_from_kept": len(grouped([r.bytes for r in first.scans], cpus))}
    finally:
        pipeline.scan_groups = grouped
        ray.shutdown()
    total = sum(first.rows)
    return {"files": n_files, "rows": total, **{k: round(v, 2) for k, v in best.items()}, **tasks,
            "kept_speedup": round(best["grouped_from_files_s"] / best["grouped_from_kept_s"], 1),
            "grouping_speedup_from_files": round(best["per_file_from_files_s"] / best["grouped_from_files_s"], 2),
            "grouping_speedup_from_kept": round(best["per_file_from_kept_s"] / best["grouped_from_kept_s"], 2),
            "text_mb": round(text_bytes / 1e6, 1), "lake_mb": round(sum(f.size for f in files) / 1e6, 1),
            "kept_mb": round(sum(r.bytes for r in first.scans) / 1e6, 1)}


# A relay between the bench and the moto server, in a process of its own: each chunk the client
# sends (a request's head, most often its whole) is held `delay` seconds before it goes on, which
# is a round trip's latency per request. Argument: listening port, server port, delay in seconds.
RELAY = """
import asyncio, sys
listen, target, delay = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])

async def pump(reader, writer, late):
    try:
        while chunk := await reader.read(1 << 16):
            if late:
                await asyncio.sleep(delay)
            writer.write(chunk)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        writer.close()

async def relay(client_r, client_w):
    server_r, server_w = await asyncio.open_connection("127.0.0.1", target)
    await asyncio.gather(pump(client_r, server_w, True), pump(server_r, client_w, False))

async def main():
    server = await asyncio.start_server(relay, "127.0.0.1", listen)
    async with server:
        await server.serve_forever()

asyncio.run(main())
"""


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def s3_server(work: str, latency_ms: float, bucket: str):
    """A moto S3 server in a process of its own (its request handling is not this process's
    threads) with `bucket` created; yields (options to reach it directly, options to reach it
    through `RELAY`, which holds each request `latency_ms` late: the direct ones without latency)."""
    import subprocess

    import boto3

    port = free_port()
    log = open(os.path.join(work, "moto.log"), "wb")  # its request lines, out of the bench's output
    server = subprocess.Popen([sys.executable, "-c", "import time\nfrom moto.server import ThreadedMotoServer\n"
                               f"ThreadedMotoServer(ip_address='127.0.0.1', port={port}).start()\ntime.sleep(1e6)"],
                              stderr=log, stdout=log)
    relay = None
    endpoint = f"http://127.0.0.1:{port}"
    options = {"key": "bench", "secret": "bench",
               "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
    timed_options = options
    if latency_ms:
        relay_port = free_port()
        relay = subprocess.Popen([sys.executable, "-c", RELAY, str(relay_port), str(port), str(latency_ms / 1000)],
                                 stderr=log, stdout=log)
        timed_options = {**options, "client_kwargs": {**options["client_kwargs"],
                                                      "endpoint_url": f"http://127.0.0.1:{relay_port}"}}
    try:
        for _ in range(100):
            try:
                boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="bench",
                             aws_secret_access_key="bench").create_bucket(Bucket=bucket)
                break
            except Exception:  # the server is still starting
                time.sleep(0.1)
        yield options, timed_options
    finally:
        for proc in (relay, server):
            if proc is not None:
                proc.terminate()
                proc.wait()
        log.close()


def bench_scan_s3(work: str, n_files: int, rows: int = 200, latency_ms: float = 0) -> dict:
    """One scan task over `n_files` small Parquet files on S3, from the files (writing kept scans)
    and from the kept scans: reading SCAN_FILES_AT_ONCE files at a time (what a scan task does over a
    network) against one after another (the baseline), alternated, best of three each, on
    `s3_server` (with `latency_ms`, through its relay)."""
    import workers.ingest.steps as steps
    from workers.ingest.config import IngestConfig
    from workers.ingest.source import list_source
    from workers.lake.storage import url_to_fs

    real = steps.over_network
    with s3_server(work, latency_ms, "scan") as (options, timed_options):
        try:
            fs, root = url_to_fs("s3://scan/lake", options)
            body = texts(rows)
            for f in range(n_files):
                path = os.path.join(work, "one.parquet")
                pq.write_table(pa.table({"id": [f"f{f}-d{i}" for i in range(rows)], "text": body}), path)
                fs.put_file(path, f"{root}/part-{f:05d}.parquet")
            files = list_source("s3://scan/lake", timed_options)[2]
            group = [(i, f, None) for i, f in enumerate(files)]
            best: dict[str, float] = {}
            for _ in range(3):
                for how, network in (("one_by_one", False), ("at_once", True)):
                    steps.over_network = lambda fs, network=network: network
                    cfg = IngestConfig("s3://scan/lake", f"s3://scan/ds-{how}", id_column="id", ranges="unused",
                                       storage_options=timed_options, progress=False)
                    t0 = time.perf_counter()
                    summary = steps.scan_files(cfg, group, 64, True)[0]
                    best[f"{how}_from_files_s"] = min(best.get(f"{how}_from_files_s", 1e9),
                                                      time.perf_counter() - t0)
                    kept_group = [(i, f, s["scan"]) for (i, f, _), s in zip(group, summary["files"])]
                    t0 = time.perf_counter()
                    again = steps.scan_files(cfg, kept_group, 64)[0]
                    best[f"{how}_from_kept_s"] = min(best.get(f"{how}_from_kept_s", 1e9),
                                                     time.perf_counter() - t0)
                    assert all(s["reused"] for s in again["files"])
                    assert sum(s["rows"] for s in again["files"]) == n_files * rows
        finally:
            steps.over_network = real
    return {"files": n_files, "rows_per_file": rows, "at_once": steps.SCAN_FILES_AT_ONCE, "latency_ms": latency_ms,
            **{k: round(v, 2) for k, v in best.items()},
            "speedup_from_files": round(best["one_by_one_from_files_s"] / best["at_once_from_files_s"], 2),
            "speedup_from_kept": round(best["one_by_one_from_kept_s"] / best["at_once_from_kept_s"], 2)}


def bench_open_s3(work: str, rm: RangeManifest, shards: int, latency_ms: float = 0) -> dict:
    """`Searcher.open` of a version of `shards` synthetic shards on S3 (`s3_server`; with
    `latency_ms`, through its relay), 2 search threads: each group loading SHARD_LOADS_AT_ONCE
    shards at a time (what it does over a network) against one per thread (what it did before),
    alternated, best of three each."""
    import workers.search.shard_group as shard_group
    from workers.ingest.from_vectors import synthetic_version
    from workers.lake.storage import url_to_fs
    from workers.lake.versions import commit
    from workers.search.searcher import Searcher

    real = shard_group.over_network
    with s3_server(work, latency_ms, "open") as (options, timed_options):
        try:
            fs, root = url_to_fs("s3://open/ds", options)
            commit(fs, root, synthetic_version(fs, root, shards, rm))
            best: dict[str, float] = {}
            for _ in range(3):
                for how, network in (("per_thread", False), ("at_once", True)):
                    shard_group.over_network = lambda fs, network=network: network
                    t0 = time.perf_counter()
                    with Searcher.open("s3://open/ds", storage_options=timed_options, threads=2) as s:
                        best[f"{how}_s"] = min(best.get(f"{how}_s", 1e9), time.perf_counter() - t0)
                        assert len(s.manifest.shards) == shards
        finally:
            shard_group.over_network = real
    return {"shards": shards, "latency_ms": latency_ms, "at_once": shard_group.SHARD_LOADS_AT_ONCE,
            **{k: round(v, 2) for k, v in best.items()}, "speedup": round(best["per_thread_s"] / best["at_once_s"], 2)}


def bench_encode(n: int = 256) -> dict:
    from workers.embedding.encoder import Encoder, EncoderConfig

    enc = Encoder(EncoderConfig(batch_size=64, threads=os.cpu_count()))
    docs = texts(n)
    enc.encode(docs[:64])  # warm up
    s = timed(lambda: enc.encode(docs), 1)
    return {"docs": n, "s": round(s, 2), "docs_per_s": round(n / s, 1), "ms_per_doc": round(1000 * s / n, 1),
            "mean_chars": round(float(np.mean([len(d) for d in docs])))}


def bench_quantize(rm: RangeManifest, n: int = 200_000) -> dict:
    from workers.embedding.quantizer import quantize_all

    x = unit_vectors(n, 1)
    s = timed(lambda: quantize_all(x, rm.ranges, ("int8", "ubinary")), 3)
    return {"vectors": n, "s": round(s, 3), "vectors_per_s": round(n / s)}


def bench_write(work: str, rm: RangeManifest, s3_url: str | None, options: dict, rows: int = 10_000) -> dict:
    from workers.ingest.shard_builder import write_shard
    from workers.lake.storage import url_to_fs

    x = unit_vectors(rows, 2)
    ids = [f"doc-{i:08d}" for i in range(rows)]
    out = {}
    targets = [("local", os.path.join(work, "write"), {})] + ([("s3", s3_url, options)] if s3_url else [])
    for name, url, opts in targets:
        fs, root = url_to_fs(url, opts)
        k = [0]

        def one():
            k[0] += 1
            return write_shard(fs, root, f"bench-{k[0]}", ShardSource("f", 0, rows), ids, np.arange(rows), x,
                               rm.ranges, ("int8", "ubinary"), [])
        rec = one()
        s = timed(one, 3)
        mb = (rec.bytes + rec.index_bytes) / 1e6
        write_s = rec.stat("write_s")
        out[name] = {"rows": rows, "mb": round(mb, 2), "s": round(s, 3), "s_per_mb": round(s / mb, 4),
                     "files_s_per_mb": round(write_s / mb, 4)}
    return out


def bench_versions(work: str, rm: RangeManifest, counts: list[int]) -> dict:
    from workers.ingest.from_vectors import synthetic_version
    from workers.lake.storage import url_to_fs
    from workers.lake.versions import commit, read_version
    from workers.search.searcher import Searcher

    out = {}
    for n in counts:
        url = os.path.join(work, f"versions-{n}")
        fs, root = url_to_fs(url)
        draft = synthetic_version(fs, root, n, rm)
        commit_s = timed(lambda: commit(fs, root, draft))  # version 1
        again_s = timed(lambda: commit(fs, root, replace(draft, parent=1)))  # version 2, on top of 1
        size = os.path.getsize(os.path.join(url, "versions", "00000002.json"))
        read_s = timed(lambda: read_version(fs, root, 2), 3)
        open_s = timed(lambda: Searcher.open(url).close(), 1)
        out[n] = {"commit_s": round(commit_s, 3), "commit_on_top_s": round(again_s, 3),
                  "manifest_mb": round(size / 1e6, 2), "read_s": round(read_s, 3), "open_s": round(open_s, 3),
                  "open_ms_per_shard": round(1000 * open_s / n, 3)}
        shutil.rmtree(url, ignore_errors=True)
    return out


# Run in a process of its own, so its peak RSS is the command's alone (VmHWM: getrusage's maximum
# would carry over the forking parent's): argv = command, dataset path, repository.
HISTORY_CHILD = """
import json, sys, time
sys.path.insert(0, sys.argv[3])
import jobs.history, jobs.inspect_dataset
from workers.lake.storage import url_to_fs
t0 = time.perf_counter()
if sys.argv[1] == "history":
    jobs.history.history(*url_to_fs(sys.argv[2]))
else:
    jobs.inspect_dataset.run(jobs.inspect_dataset.InspectConfig(sys.argv[2]))
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"s": round(time.perf_counter() - t0, 2), "peak_rss_mb": round(int(hwm.split()[1]) / 1024)}))
"""


def bench_history(work: str, rm: RangeManifest, versions: int, shards: int = 10_000) -> dict:
    """`history` and `inspect` over `versions` versions of `shards` synthetic shards (each version
    one shard fewer than the one before): seconds and peak RSS, each in a process of its own."""
    import subprocess

    from workers.ingest.from_vectors import synthetic_version
    from workers.lake.storage import url_to_fs
    from workers.lake.versions import commit

    url = os.path.join(work, f"history-{versions}")
    fs, root = url_to_fs(url)
    draft = synthetic_version(fs, root, shards, rm)
    for v in range(versions):
        commit(fs, root, replace(draft, parent=v or None, shards=draft.shards[v:]))
    repo = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    out = {"versions": versions, "shards": shards}
    for command in ("history", "inspect"):
        done = subprocess.run([sys.executable, "-c", HISTORY_CHILD, command, url, repo], check=True,
                              capture_output=True, text=True)
        out[command] = json.loads(done.stdout)
    shutil.rmtree(url, ignore_errors=True)
    return out


def bench_listing(work: str, counts: list[int]) -> dict:
    from workers.ingest.source import list_source

    out = {}
    for n in counts:
        lake = os.path.join(work, f"list-{n}")
        for i in range(n):
            sub = os.path.join(lake, f"d={i // 1000:04d}")
            os.makedirs(sub, exist_ok=True)
            open(os.path.join(sub, f"part-{i:07d}.parquet"), "wb").close()
        s = timed(lambda: list_source(lake), 3)
        out[n] = {"s": round(s, 3), "us_per_file": round(1e6 * s / n, 1)}
        shutil.rmtree(lake, ignore_errors=True)
    return out


def bench_overlap(work: str, docs: int) -> dict:
    from jobs.demo import DemoConfig
    from jobs.demo import run as build_demo
    from jobs.ingest import run as ingest
    from workers.ingest.config import IngestConfig

    lake = os.path.join(work, "overlap-lake")
    build_demo(DemoConfig(dest=lake, docs=docs, files=8))
    r = ingest(IngestConfig(lake, os.path.join(work, "overlap-emb"), id_column="id", progress=False,
                            calibration_samples=min(500, docs), unit_rows=max(1, docs // 16))).summary
    main = r["wall_s"] - r["calibrate_s"]
    stages = r["encode_s"] + r["quantize_s"] + r["write_s"]
    return {"docs": docs, "shards": r["shards"], "wall_s": r["wall_s"], "calibrate_s": r["calibrate_s"],
            "main_pass_s": round(main, 2), "encode_s": r["encode_s"], "quantize_s": r["quantize_s"],
            "write_s": r["write_s"], "stage_sum_over_main_pass": round(stages / main, 3)}


def bench_shard_sizes(work: str, rm: RangeManifest, rows: int, sizes: list[int], queries: int = 200,
                      single: int = 50) -> dict:
    """The same `rows` vectors committed as shards of each size in `sizes` (what a lake of files of
    that many rows gives: a shard never spans two source files), then searched (the default search,
    thread backend): `Searcher.open` time, queries/s batched and one per call, each against the
    largest size's. The vectors and queries are random unit vectors, so only the times mean anything."""
    from workers.ingest.from_vectors import write_vectors
    from workers.search.searcher import Searcher

    x = unit_vectors(rows, seed=3)
    q = unit_vectors(queries, seed=4)
    ids = [f"doc-{i}" for i in range(rows)]
    out = {"rows": rows, "sizes": {}}
    for size in sorted(sizes, reverse=True):
        dest = os.path.join(work, f"shard-size-{size}")
        write_vectors(dest, ids, x, rm, unit_rows=size)
        t0 = time.perf_counter()
        searcher = Searcher.open(dest)
        open_s = time.perf_counter() - t0
        try:
            searcher.search_vectors(q[:8])  # warm: the decoded int8 columns, the thread pool
            batch_s = timed(lambda: searcher.search_vectors(q), repeat=2)
            one_s = timed(lambda: [searcher.search_vectors(q[i:i + 1]) for i in range(single)], repeat=2)
        finally:
            searcher.close()
        out["sizes"][size] = {"shards": -(-rows // size), "open_s": round(open_s, 3),
                              "batched_qps": round(queries / batch_s, 1), "single_qps": round(single / one_s, 1)}
    top = out["sizes"][max(sizes)]
    for r in out["sizes"].values():
        r["batched_vs_largest"] = round(r["batched_qps"] / top["batched_qps"], 3)
        r["single_vs_largest"] = round(r["single_qps"] / top["single_qps"], 3)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", default="100,1000,10000")
    p.add_argument("--files", default="1000,10000")
    p.add_argument("--skip-encode", action="store_true")
    p.add_argument("--skip-s3", action="store_true")
    p.add_argument("--ingest-docs", type=int, default=0, help="measure the overlap on an ingest of N demo docs")
    p.add_argument("--jsonl-rows", type=int, default=200_000, help="rows of the JSON Lines read (0: skip it)")
    p.add_argument("--scan-files", type=int, default=0, help="time the scan phase over N files of --scan-rows rows")
    p.add_argument("--scan-rows", type=int, default=100_000)
    p.add_argument("--scan-s3", type=int, default=0, help="time one scan task over N small Parquet files on S3")
    p.add_argument("--latency-ms", type=float, default=0,
                   help="with --scan-s3 or --open-s3: each request that many ms late")
    p.add_argument("--history-versions", type=int, default=0,
                   help="time `history` and `inspect` over N versions of 10,000 shards, with their peak RSS")
    p.add_argument("--open-s3", type=int, default=0,
                   help="time `Searcher.open` of N synthetic shards on S3 (with --latency-ms)")
    p.add_argument("--shard-sizes", default="",
                   help="search the same --shard-size-rows vectors as shards of these sizes, e.g. 10000,1000,100")
    p.add_argument("--shard-size-rows", type=int, default=100_000)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    work = tempfile.mkdtemp(prefix="quantlake-scale-")
    rm = ranges_manifest()
    res: dict = {"cpus": os.cpu_count(), "load_before": os.getloadavg()[0]}
    server = None
    try:
        res["read"] = bench_read(work)
        print("read", res["read"], flush=True)
        if a.jsonl_rows:
            res["jsonl"] = bench_jsonl(work, a.jsonl_rows)
            print("jsonl", res["jsonl"], flush=True)
        res["scan"] = bench_scan(work)
        print("scan", res["scan"], flush=True)
        if a.scan_files:
            res["scan_phase"] = bench_scan_phase(work, a.scan_files, a.scan_rows)
            print("scan phase", res["scan_phase"], flush=True)
        if a.scan_s3:
            res["scan_s3"] = bench_scan_s3(work, a.scan_s3, latency_ms=a.latency_ms)
            print("scan on S3", res["scan_s3"], flush=True)
        if a.open_s3:
            res["open_s3"] = bench_open_s3(work, rm, a.open_s3, latency_ms=a.latency_ms)
            print("open on S3", res["open_s3"], flush=True)
        if not a.skip_encode:
            res["encode"] = bench_encode()
            print("encode", res["encode"], flush=True)
        res["quantize"] = bench_quantize(rm)
        print("quantize", res["quantize"], flush=True)
        s3_url, options = None, {}
        if not a.skip_s3:
            from moto.server import ThreadedMotoServer

            server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
            server.start()
            host, port = server.get_host_and_port()
            endpoint = f"http://{host}:{port}"
            options = {"key": "bench", "secret": "bench", "client_kwargs": {"endpoint_url": endpoint,
                                                                            "region_name": "us-east-1"}}
            import boto3

            boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="bench",
                         aws_secret_access_key="bench").create_bucket(Bucket="bench")
            s3_url = "s3://bench/ds"
        res["write"] = bench_write(work, rm, s3_url, options)
        print("write", res["write"], flush=True)
        res["versions"] = bench_versions(work, rm, [int(x) for x in a.shards.split(",")])
        print("versions", res["versions"], flush=True)
        res["listing"] = bench_listing(work, [int(x) for x in a.files.split(",")])
        print("listing", res["listing"], flush=True)
        if a.history_versions:
            res["history"] = bench_history(work, rm, a.history_versions)
            print("history", res["history"], flush=True)
        if a.shard_sizes:
            res["shard_sizes"] = bench_shard_sizes(work, rm, a.shard_size_rows,
                                                   [int(x) for x in a.shard_sizes.split(",")])
            print("shard sizes", res["shard_sizes"], flush=True)
        if a.ingest_docs:
            res["overlap"] = bench_overlap(work, a.ingest_docs)
            print("overlap", res["overlap"], flush=True)
        res["load_after"] = os.getloadavg()[0]
        print(f"load average {res['load_before']:.1f} before, {res['load_after']:.1f} after, on {res['cpus']} CPUs")
        if a.json:
            print(json.dumps(res, indent=1))
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
