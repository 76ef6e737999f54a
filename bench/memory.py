"""Peak memory of every process of an ingest, at 5k and at 20k documents: does it grow with the corpus?

    python bench/memory.py [--docs 5000,20000] [--unit-rows 500] [--work DIR] [--json]

Builds a demo lake of the largest size (docstrings of installed modules, 8 Parquet files) and
smaller ones taken from it (every 4th document for 5k of 20k), then ingests each in its own
driver process (a fresh local Ray each time, so no run inherits another's heap). Meanwhile
this process reads, every 0.2 s, the kernel's peak resident set (`VmHWM` in /proc/<pid>/status:
the true peak, not a sampled one) of the driver and every process under it (raylet, GCS, Ray
workers: the encoder actor, the read/write and scan tasks). Prints each process role's peak
per run and the ratio largest/smallest run. Target: 4x the documents costs < 1.2x the peak of
any process.

Units are capped at `--unit-rows` rows in both runs, so the work in flight is the same size
and only the corpus grows. Calibration samples a fixed 1,000 documents in both runs.
Linux only (/proc).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
_DRIVER = """
import json, sys
sys.path.insert(0, sys.argv[1])
from jobs.ingest import run
from workers.ingest.config import IngestConfig
r = run(IngestConfig(sys.argv[2], sys.argv[3], id_column="id", progress=False,
                     calibration_samples=1000, unit_rows=int(sys.argv[4])))
print(json.dumps(r.summary))
"""


def _status_kb(pid: int, field: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _descendants(root: int) -> list[int]:
    """`root` and every process under it (Ray's raylet and workers are children of the driver)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


# The main pass's task functions (`stream_units`); a worker's title names the one it runs.
MAIN_PASS_TASKS = {"read_task", "write_unit"}


def role(pid: int, driver: int, titles: set[str]) -> str:
    """A stable name for a process across runs: driver, a Ray daemon, or what a Ray worker ran."""
    if pid == driver:
        return "driver"
    work = sorted({t.split()[0] for t in titles if t.startswith("ray::") and "IDLE" not in t})
    if work:  # a Ray worker, named by what it ran (an actor keeps its class in its title)
        if any("Encoder" in t for t in work):
            return "ray worker: encoder actor"
        main = any(t.split("::")[-1] in MAIN_PASS_TASKS for t in work)
        other = any(t.split("::")[-1] not in MAIN_PASS_TASKS for t in work)
        return {(True, False): "ray worker: main-pass tasks (read, write)", (False, True): "ray worker: scan tasks",
                (True, True): "ray worker: scan and main-pass tasks"}[(main, other)]
    if any(t.startswith("ray::") for t in titles):
        return "ray worker: idle"
    first = next(iter(titles), "?").split()[0]
    return os.path.basename(first) if first else "?"


def measure(source: str, dest: str, unit_rows: int) -> tuple[dict, dict[str, dict]]:
    """Run one ingest in a child driver; (its summary, role -> {peak_mb, processes})."""
    proc = subprocess.Popen([sys.executable, "-c", _DRIVER, ROOT, source, dest, str(unit_rows)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONPATH": ROOT})
    peak: dict[int, int] = {}
    titles: dict[int, set[str]] = {}
    while proc.poll() is None:
        for pid in _descendants(proc.pid):
            hwm = _status_kb(pid, "VmHWM")
            if hwm is None:
                continue
            peak[pid] = max(peak.get(pid, 0), hwm)
            if (title := _cmdline(pid)):
                titles.setdefault(pid, set()).add(title)
        time.sleep(0.2)
    out = proc.stdout.read()
    if proc.returncode:
        raise RuntimeError(f"ingest of {source} failed with status {proc.returncode}")
    roles: dict[str, dict] = {}
    for pid, kb in peak.items():
        r = roles.setdefault(role(pid, proc.pid, titles.get(pid, set())), {"peak_mb": 0.0, "processes": 0})
        r["peak_mb"] = max(r["peak_mb"], round(kb / 1024, 1))
        r["processes"] += 1
    return json.loads(out.strip().splitlines()[-1]), roles


def build_lakes(work: str, sizes: list[int]) -> dict[int, str]:
    """A demo lake of the largest size, and each smaller one as an even stride through it."""
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    from jobs.demo import DemoConfig
    from jobs.demo import run as build_demo

    top = max(sizes)
    demo = os.path.join(work, f"demo-{top}")
    if not os.path.isdir(demo):  # a --work folder keeps its lakes for the next run
        build_demo(DemoConfig(dest=demo, docs=top, files=8))
    table = pads.dataset(demo, format="parquet").to_table()
    lakes = {}
    for n in sizes:
        lakes[n] = os.path.join(work, f"lake-{n}")
        if os.path.isdir(lakes[n]):
            continue
        sub = table.take(list(range(0, top, top // n))[:n])
        os.makedirs(lakes[n])
        per = -(-n // 8)
        for i in range(8):
            # Small row groups: a unit never splits one, so this lets --unit-rows cap every unit.
            pq.write_table(sub.slice(i * per, per), os.path.join(lakes[n], f"part-{i:05d}.parquet"),
                           row_group_size=50)
    return lakes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--docs", default="5000,20000", help="comma list of corpus sizes")
    p.add_argument("--unit-rows", type=int, default=500)
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    sizes = sorted(int(x) for x in a.docs.split(","))
    work = a.work or tempfile.mkdtemp(prefix="quantlake-memory-")
    try:
        lakes = build_lakes(work, sizes)
        runs = {}
        for n in sizes:
            t0 = time.perf_counter()
            dest = os.path.join(work, f"emb-{n}")
            shutil.rmtree(dest, ignore_errors=True)  # a fresh dataset: no shard reused from a run before
            summary, roles = measure(lakes[n], dest, a.unit_rows)
            runs[n] = {"wall_s": round(time.perf_counter() - t0, 1), "shards": summary["shards"],
                       "documents": summary["documents"], "roles": roles,
                       **{k: summary[k] for k in ("calibrate_s", "encode_s", "quantize_s", "write_s")}}
            print(f"{n} docs: {summary['documents']} documents, {summary['shards']} shards, "
                  f"{runs[n]['wall_s']} s", flush=True)
            for name, r in sorted(roles.items()):
                print(f"  {name:32s} {r['peak_mb']:8.1f} MB peak RSS ({r['processes']} process(es))", flush=True)
        lo, hi = sizes[0], sizes[-1]
        ratios = {name: round(r["peak_mb"] / runs[lo]["roles"][name]["peak_mb"], 3)
                  for name, r in runs[hi]["roles"].items()
                  if name in runs[lo]["roles"] and runs[lo]["roles"][name]["peak_mb"]}
        print(f"peak RSS ratio {hi} / {lo} documents (target < 1.2 for every process):")
        for name, ratio in sorted(ratios.items()):
            print(f"  {name:32s} {ratio:6.3f}{'' if ratio < 1.2 else '  <-- over target'}")
        if a.json:
            print(json.dumps({"runs": runs, "ratios": ratios}, indent=1))
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
