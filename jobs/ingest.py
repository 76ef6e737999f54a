"""`quantlake ingest`: calibrate, encode, quantize and write a source lake as a dataset version."""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ranges.manifest import RangeManifest
from ranges.manifest import load as load_ranges
from ranges.stats import merge_all, partial_stats, ranges_from
from workers.config import IngestConfig
from workers.credentials import StorageAccess
from workers.encoder import Encoder, EncoderConfig, model_fingerprint, resolve_model
from workers.redact import describe_error
from workers.scan import Sample, find_duplicates
from workers.shard_writer import shard_files, shard_id
from workers.source import Fragment, SourceError, check_file, list_source
from workers.storage import join, put_bytes, url_to_fs
from workers.units import UnitFailed, read_unit, scan_file, unit_step, write_unit
from workers.version import CommitConflict, commit, list_versions

log = logging.getLogger(__name__)

# Encoder batches per calibration work item. The items are cut from the sample in key order,
# so each sampled text is always encoded beside the same neighbours (padding changes the
# float bits) whatever the number of actors.
CALIBRATION_CHUNK_BATCHES = 4
# Workers never reach a model hub, and per-actor weight-loading bars would flood the driver.
WORKER_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
              "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error"}


@dataclass(frozen=True)
class IngestResult:
    version: int
    manifest_url: str
    summary: dict[str, Any]


def _ray_init(cfg: IngestConfig) -> bool:
    """Join `cfg.ray_address` (or RAY_ADDRESS), or start a local instance; True if we started it."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ray.init(address=cfg.ray_address, logging_level=logging.WARNING,
             runtime_env={"env_vars": WORKER_ENV})
    return True


def _encoder_pool(cfg: IngestConfig) -> dict[str, Any]:
    """Ray Data arguments for the encoder actor pool: one actor per GPU, else CPU actors."""
    import ray
    from ray.data import ActorPoolStrategy

    # Ray Data restarts a dead actor and retries its unit (its actor pools default to
    # max_restarts=-1, max_task_retries=-1; tests/test_faults.py kills one to hold it to that).
    # Not passed explicitly: extra remote args to map() are deprecated from Ray 2.60.
    # Encoding is a pure function of the unit, so the retry gives the same bytes.
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus and cfg.encoder.device != "cpu":
        return {"compute": ActorPoolStrategy(size=cfg.encoder_actors or gpus), "num_gpus": 1, "num_cpus": 1}
    return {"compute": ActorPoolStrategy(size=cfg.encoder_actors or 1), "num_cpus": 1}


def _data_context(cfg: IngestConfig):
    from ray.data import DataContext

    ctx = DataContext.get_current()
    # The driver shows one bar in documents; Ray Data's per-operator bars would interleave with it.
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    ctx.print_on_execution_start = False
    # A task's own exception, not a generic UserCodeException: the driver needs the UnitFailed
    # (which names the unit) and Ray passes a wrapped exception's cause on only as text.
    ctx.raise_original_map_exception = True
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    return ctx


def _encoder_cfg(cfg: IngestConfig, pool: dict[str, Any]) -> EncoderConfig:
    if cfg.encoder.threads is None and "num_gpus" not in pool:
        import ray

        # Same thread count whatever the pool size: kernels may block differently per count.
        cpus = int(ray.cluster_resources().get("CPU", 1))
        return replace(cfg.encoder, threads=max(1, cpus))
    return cfg.encoder


def check_source(cfg: IngestConfig):
    """List and open every source file; raise before any work if one cannot be ingested."""
    fs, root, files = list_source(cfg.source, cfg.storage_options)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda f: check_file(fs, root, f, cfg.text_column, cfg.id_column), files))
    return files


def scan(cfg: IngestConfig, files) -> tuple[list[int], dict[int, list], Sample]:
    """Scan every file (Ray tasks): row counts, cross-file duplicate ids, calibration sample.

    Ray Core, not Ray Data: this is a hash-partitioned shuffle whose partitions are the
    separate return values of the scan tasks; each reducer sees one partition of every file,
    so no process holds every id.
    """
    import ray

    n_parts = max(1, min(64, len(files)))
    remote_scan = ray.remote(scan_file).options(num_returns=n_parts + 1, max_retries=3)
    refs = [remote_scan.remote(cfg, i, f, n_parts) for i, f in enumerate(files)]
    dup_task = ray.remote(find_duplicates).options(max_retries=3)
    dup_refs = [dup_task.remote(*[r[p + 1] for r in refs]) for p in range(n_parts)]
    summaries = ray.get([r[0] for r in refs])
    sample = Sample(0 if cfg.ranges else cfg.calibration_samples)
    for s in summaries:
        sample = sample.merge(s["sample"])
    duplicates: dict[int, list] = {}
    for d in ray.get(dup_refs):
        for e in d:
            duplicates.setdefault(int(e["file"]), []).append(
                (int(e["row"]), files[int(e["first_file"])].relpath, int(e["first_row"])))
    return [s["rows"] for s in summaries], duplicates, sample


def calibrate(cfg: IngestConfig, sample: Sample, fingerprint: str, pool: dict[str, Any]) -> RangeManifest:
    """Encode the sample with the encoder actor pool and reduce its statistics to ranges."""
    import ray.data

    if len(sample.ids) < 2:
        raise SourceError(f"only {len(sample.ids)} valid document(s) in {cfg.source}: "
                          "calibration needs at least 2 (or pass --ranges)")
    texts = sample.texts  # ordered by sample key: a fixed order independent of the cluster
    size = CALIBRATION_CHUNK_BATCHES * cfg.encoder.batch_size
    chunks = [{"texts": json.dumps(texts[i:i + size])} for i in range(0, len(texts), size)]
    keep = cfg.range_method == "quantile"
    ds = (ray.data.from_items(chunks, override_num_blocks=len(chunks))
          .map(_CalibrationEncoder, fn_constructor_args=(_encoder_cfg(cfg, pool),), **pool)
          .map(_stats_row, fn_kwargs={"keep": keep}))
    parts = [_row_stats(r) for r in ds.iter_rows()]
    stats = merge_all(parts)
    ranges = ranges_from(stats, cfg.range_method, cfg.quantiles)
    return RangeManifest(ranges=ranges, model_name=cfg.encoder.model_name, model_fingerprint=fingerprint,
                         normalize=cfg.encoder.normalize, method=cfg.range_method,
                         quantiles=tuple(cfg.quantiles) if keep else None,
                         sample_size=stats.count, seed=cfg.seed)


class _CalibrationEncoder(Encoder):
    def __call__(self, row):
        row = dict(row, texts=json.loads(row["texts"]))
        return super().__call__(row)


def _stats_row(row: dict[str, Any], keep: bool) -> dict[str, Any]:
    emb = np.frombuffer(row["embeddings"], np.float32).reshape(-1, int(row["dim"]))
    s = partial_stats(emb, keep_values=keep)
    out = {"count": s.count, "min": s.minimum.tobytes(), "max": s.maximum.tobytes(), "dim": s.dim}
    out["values"] = s.values.tobytes() if keep else b""
    return out


def _row_stats(row: dict[str, Any]):
    from ranges.stats import PartialStats

    dim = int(row["dim"])
    values = np.frombuffer(row["values"], np.float32).reshape(-1, dim) if row["values"] else None
    return PartialStats(int(row["count"]), np.frombuffer(row["min"], np.float32),
                        np.frombuffer(row["max"], np.float32), values)


def plan_units(cfg: IngestConfig, files, rows_per_file: list[int]) -> list[Fragment]:
    """Split files into work units of at most `unit_rows` rows (Parquet: whole row groups)."""
    import pyarrow.parquet as pq

    fs, root = url_to_fs(cfg.source, cfg.storage_options)
    units = []
    for i, (f, n) in enumerate(zip(files, rows_per_file)):
        bounds = [0]
        if f.format == "parquet":
            meta = pq.ParquetFile(fs.open(join(root, f.relpath), "rb")).metadata
            offset = 0
            for g in range(meta.num_row_groups):
                offset += meta.row_group(g).num_rows
                if offset - bounds[-1] >= cfg.unit_rows or offset == n:
                    bounds.append(offset)
        else:
            bounds += list(range(cfg.unit_rows, n, cfg.unit_rows)) + [n]
        bounds = sorted(set(bounds + [n]))
        for a, b in zip(bounds, bounds[1:]):
            units.append(Fragment(i, f, a, b))
    return units


def _unit_items(cfg, units, duplicates, fingerprint, ranges_id) -> list[dict[str, Any]]:
    items = []
    for u in units:
        sid = shard_id(u.file.relpath, u.file.identity(), u.row_start, u.row_stop, fingerprint, ranges_id,
                       cfg.precisions, cfg.text_column, cfg.id_column, cfg.encoder.normalize, cfg.index_type)
        dups = [d for d in duplicates.get(u.file_index, []) if u.row_start <= d[0] < u.row_stop]
        items.append({"unit": json.dumps({
            "shard_id": sid, "file": u.file.__dict__, "row_start": u.row_start, "row_stop": u.row_stop,
            "duplicates": dups})})
    return items


def encode_and_write(cfg: IngestConfig, items, pool, ranges_path: str, ranges_id: str, total_rows: int):
    """The streaming main pass: read (tasks) -> encode (actor pool) -> quantize+write (tasks).

    Each Ray Data row is a whole work unit, so a unit is encoded as one fixed list of texts
    (its embeddings do not depend on how Ray groups rows) and becomes exactly one shard.
    Memory is bounded by the units in flight, which Ray Data's backpressure limits.
    Returns the shard records and how many of them an earlier run had written (and the read
    step verified); a unit that fails for good raises UnitFailed naming it.
    """
    import ray.data
    from tqdm import tqdm

    ds = (ray.data.from_items(items, override_num_blocks=max(1, len(items)))
          .map(read_unit, fn_kwargs={"cfg": cfg}, num_cpus=0.5)
          .map(_UnitEncoder, fn_constructor_args=(_encoder_cfg(cfg, pool),), **pool)
          .map(write_unit, fn_kwargs={"cfg": cfg, "ranges_path": ranges_path, "ranges_id": ranges_id},
               num_cpus=0.5))
    records, reused = [], 0
    with tqdm(total=total_rows, unit="doc", disable=not cfg.progress, file=sys.stderr,
              desc="ingest") as bar:
        try:
            for row in ds.iter_rows():
                rec = json.loads(row["record"])
                records.append(rec)
                reused += bool(row["reused"])
                bar.update(rec["stats"]["rows_read"])
        except Exception as exc:
            failed = _unit_failure(exc)
            if failed is None:
                raise
            raise UnitFailed(f"{failed.message}; nothing was committed") from exc
    return sorted(records, key=lambda r: (r["source"]["file"], r["source"]["row_start"])), reused


def _unit_failure(exc: BaseException | None) -> UnitFailed | None:
    """The UnitFailed inside the wrappers Ray Data puts around a task's exception, if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        inner = getattr(exc, "cause", None)  # a RayTaskError's: the task's own exception
        if isinstance(exc, UnitFailed) and not isinstance(inner, UnitFailed):
            return exc
        exc = inner or exc.__cause__
    return None


class _UnitEncoder(Encoder):
    def __call__(self, row):
        with unit_step(row["unit"], "encode"):
            row = dict(row, texts=json.loads(row["texts"]))
            return super().__call__(row)


def run(cfg: IngestConfig) -> IngestResult:
    """Ingest `cfg.source` into `cfg.dest` and commit a new version."""
    t0 = time.perf_counter()
    files = check_source(cfg)
    model_path = resolve_model(cfg.encoder.model)
    fingerprint = model_fingerprint(model_path)
    reused = None
    if cfg.ranges:
        reused = load_ranges(cfg.ranges, cfg.storage_options)
        if reused.model_fingerprint != fingerprint:
            raise ValueError(f"range manifest {cfg.ranges} was made with model {reused.model_name} "
                             f"({reused.model_fingerprint}), not {cfg.encoder.model_name} ({fingerprint}); "
                             "calibrate anew for this model")
        if reused.normalize != cfg.encoder.normalize:
            raise ValueError(f"range manifest {cfg.ranges} was made with normalize={reused.normalize}")
    dest_fs, dest_root = url_to_fs(cfg.dest, cfg.storage_options)
    parent = (list_versions(dest_fs, dest_root) or [None])[-1]
    started = _ray_init(cfg)
    try:
        _data_context(cfg)
        pool = _encoder_pool(cfg)
        # Tasks get a copy of the config without storage options; they fetch them through
        # `access` (workers/credentials.py says why), which must live until the tasks are done.
        access = StorageAccess.put(cfg.storage_options)
        wcfg = cfg.for_workers(access)
        rows_per_file, duplicates, sample = scan(wcfg, files)
        t_cal = time.perf_counter()
        manifest = reused or calibrate(cfg, sample, fingerprint, pool)
        t_cal = time.perf_counter() - t_cal
        ranges_path = f"ranges/{manifest.id}.json"
        put_bytes(dest_fs, join(dest_root, ranges_path), manifest.to_json())
        units = plan_units(cfg, files, rows_per_file)
        items = _unit_items(cfg, units, duplicates, fingerprint, manifest.id)
        records, reused_shards = encode_and_write(wcfg, items, pool, ranges_path, manifest.id,
                                                  sum(rows_per_file))
    finally:
        if started:
            import ray

            ray.shutdown()
    rows_read = sum(r["stats"]["rows_read"] for r in records)
    if rows_read != sum(rows_per_file):
        raise RuntimeError(f"read {rows_read} rows but the scan counted {sum(rows_per_file)}: "
                           "the source changed during the job; nothing was committed")
    version_doc = _version_doc(cfg, files, manifest, ranges_path, records, parent)
    check_referenced_files(dest_fs, dest_root, version_doc)
    n = commit(dest_fs, dest_root, version_doc)
    manifest_url = cfg.dest.rstrip("/") + f"/versions/{n:08d}.json"
    summary = _summary(version_doc, records, reused_shards, time.perf_counter() - t0, t_cal, manifest_url, n)
    return IngestResult(n, manifest_url, summary)


class IncompleteVersion(RuntimeError):
    """A file the new version would reference is missing or has another size: not committed."""


def check_referenced_files(fs, root: str, doc: dict[str, Any]) -> None:
    """Raise IncompleteVersion unless every file `doc` references exists with its recorded size.

    The last check before the create-only write, so a version never points at a shard that
    a failed or interrupted write (or anyone else) left missing. One listing per folder
    rather than a request per file; the listing cache is dropped first, as it may predate
    the workers' writes.
    """
    wanted = {doc["ranges"]["path"]: None}
    for record in doc["shards"]:
        wanted.update({path: size for path, size, _ in shard_files(record)})
    fs.invalidate_cache()
    present: dict[str, int] = {}
    for folder in sorted({p.split("/")[0] for p in wanted}):
        try:
            present.update({p: int(info.get("size") or 0) for p, info in
                            fs.find(join(root, folder), detail=True).items()})
        except FileNotFoundError:
            pass
    problems = []
    for path, size in wanted.items():
        found = present.get(join(root, path))
        if found is None:
            problems.append(f"{path} is missing")
        elif size is not None and found != size:
            problems.append(f"{path} has {found} bytes, its record says {size}")
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise IncompleteVersion(f"refusing to commit a version of {root}: {'; '.join(problems[:5])}{more}. "
                                "Nothing was committed; rerun the job to rewrite the shards concerned")


def _version_doc(cfg, files, manifest: RangeManifest, ranges_path, records, parent) -> dict[str, Any]:
    docs = sum(r["rows"] for r in records)
    rejects = sum(r["rejects"]["rows"] for r in records if r["rejects"])
    clipped = np.zeros(manifest.dim, np.int64)
    shards = []
    for r in records:
        clipped += np.asarray(r.pop("clipped_per_dim"), np.int64)
        shards.append(r)
    dim = manifest.dim
    return {
        "parent": parent,
        "model": {"name": cfg.encoder.model_name, "fingerprint": manifest.model_fingerprint,
                  "dim": dim, "normalize": cfg.encoder.normalize},
        "ranges": {"id": manifest.id, "path": ranges_path, "method": manifest.method},
        "precisions": sorted(set(cfg.precisions) | {"ubinary"}),
        "source": {"url": _public_url(cfg.source), "text_column": cfg.text_column,
                   "id_column": cfg.id_column, "format_counts": _format_counts(files),
                   "files": {f.relpath: f.identity() for f in files}},
        "shards": shards,
        "counts": {"rows_read": docs + rejects, "documents": docs, "rejects": rejects},
        "clipped_per_dim": clipped.tolist(),
        "bytes": {"float32": docs * dim * 4, "int8": docs * dim, "ubinary": docs * dim // 8,
                  "stored": sum(r["bytes"] + r["index_bytes"] for r in records)},
    }


def _format_counts(files) -> dict[str, int]:
    out: dict[str, int] = {}
    for f in files:
        out[f.format] = out.get(f.format, 0) + 1
    return out


def _public_url(url: str) -> str:
    """The URL without any user:password@ part."""
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest.split("/")[0]:
        rest = rest.split("@", 1)[1]
    return scheme + sep + rest if sep else url


def _summary(doc, records, reused, wall_s, calibrate_s, manifest_url, n) -> dict[str, Any]:
    b = doc["bytes"]
    docs = doc["counts"]["documents"]
    return {
        "version": n, "documents": docs, "rejects": doc["counts"]["rejects"],
        "rows_read": doc["counts"]["rows_read"], "shards": len(records), "shards_reused": reused,
        "bytes_float32": b["float32"], "bytes_int8": b["int8"], "bytes_ubinary": b["ubinary"],
        "bytes_stored": b["stored"],
        "compression_int8": round(b["float32"] / b["int8"], 2) if b["int8"] else None,
        "compression_ubinary": round(b["float32"] / b["ubinary"], 2) if b["ubinary"] else None,
        "wall_s": round(wall_s, 3), "calibrate_s": round(calibrate_s, 3),
        "docs_per_s": round(docs / wall_s, 2) if wall_s else None,
        "encode_s": round(sum(r["stats"]["encode_s"] for r in records), 3),
        "quantize_s": round(sum(r["stats"]["quantize_s"] for r in records), 3),
        "write_s": round(sum(r["stats"]["write_s"] for r in records), 3),
        "clipped_values": int(sum(doc["clipped_per_dim"])), "ranges_id": doc["ranges"]["id"],
        "manifest": manifest_url,
    }


def format_summary(s: dict[str, Any]) -> str:
    mib = 1 << 20
    return "\n".join([
        f"committed version {s['version']}: {s['documents']} documents, {s['rejects']} rejects "
        f"(of {s['rows_read']} rows read), {s['shards']} shards "
        f"({s['shards_reused']} reused from an earlier run of the same job)",
        f"vectors: float32 {s['bytes_float32'] / mib:.2f} MiB -> int8 {s['bytes_int8'] / mib:.2f} MiB "
        f"({s['compression_int8']}x) + ubinary {s['bytes_ubinary'] / mib:.2f} MiB ({s['compression_ubinary']}x); "
        f"{s['bytes_stored'] / mib:.2f} MiB stored with ids and indexes",
        f"throughput: {s['docs_per_s']} documents/s over {s['wall_s']} s "
        f"(calibration {s['calibrate_s']} s; encode {s['encode_s']} s, quantize {s['quantize_s']} s, "
        f"write {s['write_s']} s summed over shards); {s['clipped_values']} values clipped",
        f"ranges {s['ranges_id']}",
        f"manifest: {s['manifest']}",
    ])


INDEX_TYPE_FLAGS = {"flat": "IndexBinaryFlat", "hnsw": "IndexBinaryHNSW", "ivf": "IndexBinaryIVF"}


def parse_args(argv: list[str] | None = None) -> tuple[IngestConfig, bool]:
    """The config, and whether to print the summary as JSON."""
    p = argparse.ArgumentParser(prog="quantlake ingest", description=__doc__)
    p.add_argument("source", help="source lake URL or path (Parquet / JSON Lines files under it)")
    p.add_argument("dest", help="dataset URL or path to write shards and versions to")
    p.add_argument("--text-column", default="text")
    p.add_argument("--id-column", default=None, help="default: <file>:<row>")
    p.add_argument("--model", default=None, help="model folder or cached name (default: bundled all-MiniLM-L6-v2)")
    p.add_argument("--precisions", default="int8,ubinary", help="comma list of int8,uint8,binary,ubinary")
    p.add_argument("--calibration-samples", type=int, default=10_000)
    p.add_argument("--range-method", choices=["minmax", "quantile"], default="minmax")
    p.add_argument("--quantiles", default="0.001,0.999", help="low,high for --range-method quantile")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ranges", default=None, help="reuse this range manifest instead of calibrating")
    p.add_argument("--ray-address", default=None)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--no-normalize", action="store_true", help="keep raw (unnormalised) embeddings")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--encoder-actors", type=int, default=None)
    p.add_argument("--unit-rows", type=int, default=10_000, help="largest work unit (rows per shard)")
    p.add_argument("--index-type", choices=sorted(INDEX_TYPE_FLAGS), default="flat",
                   help="shard binary index: flat (exact), or approximate hnsw / ivf for big shards")
    p.add_argument("--storage-options", default=None, help="fsspec options as JSON (endpoint, credentials)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    a = p.parse_args(argv)
    try:
        options = json.loads(a.storage_options) if a.storage_options else {}
    except json.JSONDecodeError as exc:
        p.error(f"--storage-options is not valid JSON: {exc}")
    try:
        low, high = (float(x) for x in a.quantiles.split(","))
        return IngestConfig(
            source=a.source, dest=a.dest, text_column=a.text_column, id_column=a.id_column,
            encoder=EncoderConfig(model=a.model, batch_size=a.batch_size, normalize=not a.no_normalize,
                                  device=a.device),
            precisions=tuple(p.strip() for p in a.precisions.split(",") if p.strip()),
            calibration_samples=a.calibration_samples, range_method=a.range_method, quantiles=(low, high),
            seed=a.seed, ranges=a.ranges, ray_address=a.ray_address, unit_rows=a.unit_rows,
            encoder_actors=a.encoder_actors, storage_options=options, progress=not a.no_progress,
            index_type=INDEX_TYPE_FLAGS[a.index_type]), a.json
    except ValueError as exc:
        p.error(str(exc))


def _redacted(exc: BaseException, cfg: IngestConfig) -> str:
    return describe_error(exc, cfg.storage_options, [cfg.source, cfg.dest, cfg.ranges])


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cfg, as_json = parse_args(argv)
    try:
        result = run(cfg)
    # Messages are redacted: a library's error may quote an endpoint URL or a key it was given.
    except (SourceError, ValueError, FileNotFoundError) as exc:
        print(f"quantlake ingest: error: {_redacted(exc, cfg)}", file=sys.stderr)
        return 2
    except (UnitFailed, IncompleteVersion, CommitConflict) as exc:
        print(f"quantlake ingest: error: {_redacted(exc, cfg)}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - a traceback would print the message unredacted
        print(f"quantlake ingest: error: {type(exc).__name__}: {_redacted(exc, cfg)}", file=sys.stderr)
        return 1
    print(json.dumps(result.summary, indent=1) if as_json else format_summary(result.summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
