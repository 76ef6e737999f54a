"""`reindex --watch` cycle time with and without `--keep-encoders`, measured in the same run.

    python bench/watch.py [--docs 1000] [--cycles 4] [--per-cycle 50] [--work DIR]

Builds a demo lake of N documents (docstrings of installed Python modules) and ingests it,
then, once per mode, ingests it again with the saved ranges as a dataset of its own and
watches it for C cycles, a new Parquet file of M other documents arriving before each cycle:
  1. plain: each cycle starts its encoder actor and ends it (the default);
  2. keep:  `--keep-encoders`, the first cycle's actor serves the rest;
then one more cycle with nothing new (known from the listing: no scan). Each watch starts and
stops its own local Ray. Prints each cycle's seconds, the mean of cycles 2 to C (the first
starts an actor in both modes) and the ratio plain / keep of that mean.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import pyarrow.parquet as pq  # noqa: E402

from jobs.demo import DemoConfig  # noqa: E402
from jobs.demo import run as build_demo  # noqa: E402
from jobs.ingest import run as ingest  # noqa: E402
from jobs.reindex import ReindexConfig, watch  # noqa: E402
from workers.ingest.config import IngestConfig  # noqa: E402


def watched(lake: str, dest: str, arrivals: list, keep: bool) -> list[float]:
    """Seconds of each watch cycle over `dest`, one of `arrivals` (tables) written before each,
    then of one more cycle with nothing new (last)."""
    stop, ends = threading.Event(), []

    def arrive(i: int) -> None:
        pq.write_table(arrivals[i], os.path.join(lake, f".new-{i:03d}.parquet"))
        os.replace(os.path.join(lake, f".new-{i:03d}.parquet"), os.path.join(lake, f"new-{i:03d}.parquet"))

    def report(result) -> None:
        ends.append(time.perf_counter())
        if len(ends) > len(arrivals):  # the idle cycle after the last arrival
            assert result.version is None and result.summary.get("scan_skipped"), result.summary
            stop.set()
            return
        assert result.version is not None, "a cycle with a new file committed nothing"
        if len(ends) < len(arrivals):
            arrive(len(ends))
        starts.append(time.perf_counter())

    arrive(0)
    starts = [time.perf_counter()]
    watch(ReindexConfig(dest, progress=False), 0.01, stop, report, keep_encoders=keep)
    return [e - s for s, e in zip(starts, ends)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--docs", type=int, default=1000, help="documents in the lake before the watch")
    p.add_argument("--cycles", type=int, default=4)
    p.add_argument("--per-cycle", type=int, default=50, help="documents arriving before each cycle")
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    a = p.parse_args()
    work = a.work or tempfile.mkdtemp(prefix="quantlake-bench-")
    extra = 2 * a.cycles * a.per_cycle
    build_demo(DemoConfig(dest=os.path.join(work, "all"), docs=a.docs + extra, files=1))
    table = pq.read_table(os.path.join(work, "all", "part-00000.parquet"))
    base, rest = table.slice(0, a.docs), table.slice(a.docs)
    first = None
    times = {}
    for m, mode in enumerate(("plain", "keep")):
        lake, dest = os.path.join(work, f"lake-{mode}"), os.path.join(work, f"emb-{mode}")
        os.makedirs(lake)
        pq.write_table(base, os.path.join(lake, "part-00000.parquet"))
        ranges = None if first is None else os.path.join(first, "ranges", first_ranges + ".json")
        r = ingest(IngestConfig(lake, dest, id_column="id", progress=False, ranges=ranges))
        if first is None:
            first, first_ranges = dest, r.summary["ranges_id"]
        arrivals = [rest.slice((m * a.cycles + i) * a.per_cycle, a.per_cycle) for i in range(a.cycles)]
        *times[mode], idle = watched(lake, dest, arrivals, keep=mode == "keep")
        print(f"{mode:5s}: cycles of {a.per_cycle} new documents: "
              + ", ".join(f"{t:.1f}" for t in times[mode]) + f" s; then an idle cycle: {idle:.2f} s", flush=True)
    steady = {mode: sum(t[1:]) / max(1, len(t) - 1) for mode, t in times.items()}
    print(f"{a.docs} documents in the lake, {os.cpu_count()} CPU cores; mean of cycles 2-{a.cycles}: "
          f"plain {steady['plain']:.1f} s, keep {steady['keep']:.1f} s; ratio plain / keep "
          f"{steady['plain'] / steady['keep']:.2f}")
    if not a.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
