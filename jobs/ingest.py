"""`quantlake ingest`: calibrate, encode, quantize and write a source lake as a dataset version."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping

import numpy as np

from jobs.common import (add_job_options, add_no_progress, add_storage_options, console, format_fidelity, run_reporting,
                         storage_options)
from ranges.manifest import RangeManifest
from workers.vocab import BACKENDS, BATCH_ORDERS, DEVICES, FLOAT_PRECISIONS, INDEX_FLAGS, RANGE_METHODS
from workers.ingest.config import IngestConfig
from workers.lake.credentials import StorageAccess
from workers.embedding.encoder import DEFAULT_BATCH_SIZE, EncoderConfig, encoder_fingerprint, resolve_model
from workers.ingest.pipeline import (Encoders, WarmEncoders, Written, check_room, encode_and_write, encode_sample,
                                     encoder_cfg, encoder_pool, kept_scan_for, ranges_of, ray_init, scan)
from workers.ingest.planning import Float16Source, plan_units, requantize_map
from workers.lake.range_files import load_ranges
from workers.lake.records import (ModelInfo, RangesRef, ScanRef, ShardRecord, SourceSnapshot, VersionManifest,
                                  WorkUnit, sidecar_path)
from workers.lake.redact import redact_url
from workers.ray_session import choose_address, ctrl_c_held
from workers.ingest.source import SourceFile, check_file, hidden, list_source
from workers.lake.storage import absolute_url, dest_to_fs, join, protocols, put_bytes, url_to_fs
from workers.ingest.steps import UnitFailed
from workers.search.fidelity import fidelity
from workers.lake.versions import (AlreadyCommitted, CommitConflict, IncompleteVersion, check_referenced_files, commit,
                                   list_versions, read_version, rebase_snapshot, rebase_unless_same, same_content)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IngestResult:
    """The committed version, its manifest's URL (credentials masked: it is printed) and the summary."""

    version: int | None  # None: nothing committed (a dry run, or no change to commit)
    manifest_url: str | None
    summary: dict[str, Any]


def manifest_url(dest: str, n: int) -> str:
    """URL of version `n`'s manifest under `dest`, safe to show: DEST's credentials masked."""
    return redact_url(dest.rstrip("/") + f"/versions/{n:08d}.json")


def check_source(cfg: IngestConfig, kept: Mapping[str, ScanRef] | None = None, listed=None):
    """List and open every source file; raise before any work if one cannot be ingested.

    Returns the files and, per file, its Parquet row group sizes (None for JSON Lines), so
    planning need not open every file again.

    Args:
        kept: the latest version's kept scans: a file with one (`kept_scan_for`: the same
            identity and columns) was checked by the job that kept it, so it is not opened
            again when the scan recorded its row groups, or it is JSON Lines. A change cycle of
            a 1,000-file lake on object storage so opens only its new and changed files.
        listed: what `list_source` gave for `cfg.source`, when the caller listed it already.
    """
    fs, root, files = listed or list_source(cfg.source, cfg.storage_options, cfg.exclude)
    kept = kept or {}

    def check(f):
        ref = kept_scan_for(kept, f, cfg)
        if ref is not None and (ref.row_groups is not None or f.format != "parquet"):
            return None if ref.row_groups is None else list(ref.row_groups)
        return check_file(fs, root, f, cfg.text_column, cfg.id_column)
    with ThreadPoolExecutor(8) as pool:
        groups = list(pool.map(check, files))
    return files, groups


def run(cfg: IngestConfig, *, base: VersionManifest | None = None, dry_run: bool = False,
        accept: Callable[[VersionManifest], bool] | None = None,
        requantize: Float16Source | None = None, warm: WarmEncoders | None = None,
        listed: tuple[Any, str, list[SourceFile]] | None = None,
        record: Mapping[str, Any] | None = None, once: bool = False) -> IngestResult:
    """Ingest `cfg.source` into `cfg.dest` and commit a new version.

    Args:
        base: a committed version to build on (`quantlake reindex`): a unit whose shard it
            lists (same shard id: same file identity, rows, model, ranges, options and
            duplicates) is carried over without being read or written; the rest is encoded.
            When every planned shard is carried and none dropped, nothing is committed
            (`version` None).
        dry_run: plan only (needs saved ranges): list and scan the source, then report what
            would be encoded, carried and dropped; nothing is written.
        accept: called with the finished draft before its commit; False commits nothing
            (`version` None; the shards stay for a rerun).
        once: commit nothing when the latest version holds exactly this job's content (the same
            definition, files and shards), read at the start or committed meanwhile: a reindex's
            recalibration, which an overlapping run may have made as well (`committed_meanwhile`
            names that version). With `base` it is always so.
        requantize: shards that kept float16 embeddings (`quantlake reindex --recalibrate` passes
            the latest version's): a unit whose shard under their ranges is among them is
            requantized from that shard's float16 column instead of read and encoded, which
            gives the bytes encoding it would (docs/formats.md, "Shard Parquet").
        warm: encoder actors kept by the caller between its jobs (`reindex --watch
            --keep-encoders`): this job uses the kept set if it asks for the same actors and
            leaves its own set there when it succeeds. Only while the caller holds Ray up: a
            job that starts its own Ray instance ignores it.
        listed: `list_source(cfg.source, ...)` as the caller just took it (`reindex`, which lists
            the source to know whether anything changed): not listed a second time.
        record: fields the version manifest records besides its own (a reindex that recalibrates
            on drift records the drift that made it).
    """
    cfg = replace(cfg, source=absolute_url(cfg.source), dest=absolute_url(cfg.dest),
                  ranges=absolute_url(cfg.ranges) if cfg.ranges else None)
    if dry_run and not cfg.ranges:
        raise ValueError("a dry run plans with saved ranges (--ranges): calibrating is real work")
    t0 = time.perf_counter()
    # Refuse a destination this job could never commit to before hours of work, not after:
    # a backend without an atomic create-only write, or a latest version a crash left empty.
    dest_fs, dest_root = dest_to_fs(cfg.dest, cfg.storage_options)
    check_dest_outside_source(cfg, dest_fs, dest_root)
    # The source first: a source that is not there is the error to report, before the dataset's.
    if listed is None:
        listed = list_source(cfg.source, cfg.storage_options, cfg.exclude)
    latest = base
    if base is not None:
        parent = base.number  # read (and so checked) by the caller
    else:
        parent = (list_versions(dest_fs, dest_root) or [None])[-1]
        if parent is not None:
            latest = read_version(dest_fs, dest_root, parent)
    kept = latest.kept_scans() if latest is not None else {}
    files, row_groups = check_source(cfg, kept, listed)
    model_path = resolve_model(cfg.encoder.model)
    fingerprint = encoder_fingerprint(model_path, cfg.encoder.backend)
    saved_ranges = None
    if cfg.ranges:
        saved_ranges = load_ranges(cfg.ranges, cfg.storage_options)
        saved_ranges.check_for(fingerprint, model_name=cfg.encoder.model_name, normalize=cfg.encoder.normalize,
                         where=f"range manifest {cfg.ranges}")
    started = ray_init(cfg)
    if started:
        warm = None  # this job's Ray ends with it, and so would any actor kept for the next job
    encoders = None

    def start() -> Encoders:
        return warm.get(cfg, pool, fingerprint) if warm is not None else Encoders(cfg, pool)

    try:
        pool = encoder_pool(cfg)
        check_room(pool, own_instance=started and choose_address(cfg.ray_address)[0] == "local")
        # `auto` precision becomes the pool's (fp16x3 on GPU actors) before planning: the float
        # type is part of every shard's name and of the version's options.
        cfg = replace(cfg, encoder=encoder_cfg(cfg, pool))
        # Tasks get a copy of the config without storage options; they fetch them through
        # `access` (workers/lake/credentials.py says why), which must live until the tasks are done.
        access = StorageAccess.put(cfg.storage_options)
        wcfg = cfg.for_workers(access)
        if base is None and not dry_run:
            # One set of encoder actors for the calibration and the main pass, started now: each
            # loads the model (seconds) while the source is scanned. A reindex starts them only
            # once it knows something changed.
            encoders = start()
        # The latest version's kept scans stand for its unchanged files, so only new and changed
        # files are read (when the job has ranges: calibrating needs every file's sample).
        found = scan(wcfg, files, pool, kept=kept, keep=not dry_run, row_groups=row_groups)
        rows_per_file, duplicates, sample = found.rows, found.duplicates, found.sample
        scanned = sum(rows_per_file)
        t_cal = time.perf_counter()
        if saved_ranges is None:
            encoders = encoders or start()
        manifest = saved_ranges or calibrated(cfg, sample, fingerprint, encoders)
        t_cal = time.perf_counter() - t_cal
        ranges_path = f"ranges/{manifest.id}.json"
        units = plan_units(cfg, files, rows_per_file, row_groups, duplicates, fingerprint, manifest.id, found.marks)
        # The same units named with the float16 shards' ranges: those names find their shards.
        same = units if requantize is None or requantize.ranges_id == manifest.id else plan_units(
            cfg, files, rows_per_file, row_groups, duplicates, fingerprint, requantize.ranges_id, found.marks)
        plan = Plan.of(units, base, requantize_map(units, same, requantize))
        # Files that hold no rows change no shard, yet the version must record them: else every
        # later reindex finds the listing changed and scans the lake again (and said nothing changed).
        if dry_run or (base is not None and plan.unchanged and base.source.same_files(files)):
            return IngestResult(None, None, plan.summary(scanned, committed=False))
        put_bytes(dest_fs, join(dest_root, ranges_path), manifest.to_json())
        nodes: dict[str, Counter] = {}
        records, written, probed = [], Written(), None
        if plan.todo or base is None:  # a reindex with nothing to write starts no encoder
            encoders = encoders or start()
            # A reindex re-measures the fidelity on a sample of the rows it encodes, as encoded.
            records, written, probed = encode_and_write(
                wcfg, plan.todo, pool, encoders, ranges_path, manifest.id, sum(u.rows for u in plan.todo),
                plan.requantize, nodes=nodes, probe=FIDELITY_PROBE_ROWS if base is not None else 0,
                label="reindex" if base is not None else "ingest")
    except BaseException:
        if encoders is not None:
            # The job failed: end its actors now, whatever still holds their handles (a kept set
            # included: a failed job's actors are not kept).
            (warm or encoders).stop(kill=True)
        raise
    finally:
        with ctrl_c_held():  # a Ctrl-C now is raised once the actors and Ray are stopped
            if encoders is not None and warm is None:
                encoders.stop()
            if started:
                import ray

                ray.shutdown()
    new = records
    records = sorted(records + carry_over(dest_fs, dest_root, plan.carried),
                     key=lambda r: (r.source.file, r.source.row_start))
    rows_read = sum(r.rows_read for r in records)
    if rows_read != scanned:
        raise RuntimeError(f"read {rows_read} rows but the scan counted {scanned}: "
                           "the source changed during the job; nothing was committed")
    version_doc = _version_doc(cfg, files, manifest, ranges_path, records, parent, found.scans)
    summary_extra: dict[str, Any] = {}
    if base is not None:
        drift = drift_of(new, manifest)
        drift["fidelity"] = fidelity(probed, manifest.ranges, cfg.seed) if probed is not None and len(probed) >= 2 \
            else None
        version_doc = replace(version_doc, extra={**version_doc.extra, "drift": drift})
        summary_extra = {**plan.summary(scanned, committed=True), "drift": drift}
    if record:
        version_doc = replace(version_doc, extra={**version_doc.extra, **record})
    # A kept scan deleted meanwhile (a vacuum, by hand) has served this job already: the version
    # lists the ones left, and a later job reads that file again.
    version_doc = check_referenced_files(dest_fs, dest_root, version_doc)
    if accept is not None and not accept(version_doc):
        return IngestResult(None, None, {**summary_extra, "committed": False})
    once = once or base is not None
    if once and latest is not None and same_content(version_doc, latest) and \
            version_doc.source.file_identities == latest.source.file_identities:
        log.info("version %s holds this job's content already; nothing committed", latest.number)
        return IngestResult(None, None, {**summary_extra, "committed": False, "committed_meanwhile": latest.number})
    try:
        # A reindex that lost the race to a run with the same change commits no copy of it.
        n = commit(dest_fs, dest_root, version_doc, rebase=rebase_unless_same if once else rebase_snapshot)
    except AlreadyCommitted as exc:
        log.info("%s; nothing committed", exc)
        return IngestResult(None, None, {**summary_extra, "committed": False, "committed_meanwhile": exc.version})
    url = manifest_url(cfg.dest, n)
    summary = _summary(version_doc, records, [r for r in new if r.id not in written.reused_ids], written.reused,
                       time.perf_counter() - t0, t_cal, url, n)
    summary.update(rows_encoded=written.encoded_rows, rows_requantized=written.requantized_rows,
                   calibration_rows=0 if saved_ranges else manifest.sample_size,
                   files_scanned=len(files) - found.files_reused, scans_reused=found.files_reused)
    summary["nodes"] = {step: dict(sorted(count.items())) for step, count in sorted(nodes.items())}
    summary["fidelity"] = manifest.fidelity
    # The plan's counts are what it meant to do; the summary's, what was done (a shard a crashed
    # run wrote is found and reused, not encoded).
    return IngestResult(n, url, {**summary_extra, **summary})


# Rows of the newly encoded data a reindex re-measures the fidelity estimate on.
FIDELITY_PROBE_ROWS = 1_000


def calibrated(cfg: IngestConfig, sample, fingerprint: str, encoders: Encoders) -> RangeManifest:
    """Calibrate on the scan's sample: the ranges, with the fidelity estimate measured on the sample."""
    emb = encode_sample(cfg, sample, encoders)
    manifest = ranges_of(cfg, emb, fingerprint)
    return replace(manifest, fidelity=fidelity(emb, manifest.ranges, cfg.seed))


@dataclass(frozen=True)
class Plan:
    """Which planned units are written (encoded, or requantized from the float16 shard named in
    `requantize`) and which shards of a base version carry over."""

    todo: list[WorkUnit]
    carried: list[ShardRecord]
    dropped: list[ShardRecord]
    requantize: Mapping[str, ShardRecord] = field(default_factory=dict)

    @classmethod
    def of(cls, units: list[WorkUnit], base: VersionManifest | None,
           requantize: Mapping[str, ShardRecord] | None = None) -> "Plan":
        have = {s.id: s for s in (base.shards if base else ())}
        planned = {u.shard_id for u in units}
        todo = [u for u in units if u.shard_id not in have]
        twins = requantize or {}
        return cls(todo, [have[u.shard_id] for u in units if u.shard_id in have],
                   [s for s in have.values() if s.id not in planned],
                   {u.shard_id: twins[u.shard_id] for u in todo if u.shard_id in twins})

    @property
    def unchanged(self) -> bool:
        """Nothing to write and nothing dropped (a version of no shards included)."""
        return not self.todo and not self.dropped

    def summary(self, rows_scanned: int, committed: bool) -> dict[str, Any]:
        encode = [u for u in self.todo if u.shard_id not in self.requantize]
        return {"committed": committed, "rows_scanned": rows_scanned,
                "rows_encoded": sum(u.rows for u in encode),
                "rows_requantized": sum(u.rows for u in self.todo if u.shard_id in self.requantize),
                "shards_carried": len(self.carried), "shards_added": len(self.todo),
                "shards_dropped": len(self.dropped), "files_to_encode": sorted({u.file.relpath for u in encode})}


def carry_over(fs, root: str, records: list[ShardRecord]) -> list[ShardRecord]:
    """The carried shards' records, with the per-dimension clip counts their sidecars keep.

    Each sidecar is written again (same bytes): vacuum judges a shard by the newest of its
    files, so this keeps a vacuum that runs now off the shards the new version will list.
    """
    def one(r: ShardRecord) -> ShardRecord:
        path = join(root, sidecar_path(r.id))
        try:
            data = fs.cat_file(path)
            side = ShardRecord.from_json(json.loads(data)["record"])
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return r  # the manifest's record stands; only the version's clip totals go
        put_bytes(fs, path, data)
        same = (side.id, side.sha256, side.index_sha256) == (r.id, r.sha256, r.index_sha256)
        return replace(r, clipped_per_dim=side.clipped_per_dim) if same else r

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, records))


def drift_of(new: list[ShardRecord], ranges: RangeManifest) -> dict[str, Any]:
    """How much of the newly encoded data the saved ranges clip, against the calibration sample's share.

    `baseline_share` is what the ranges clip of their own sample: none for minmax, the two tails
    for quantile ranges. `worst_dims`: the five dimensions clipped most, `[dim, share]`.
    """
    rows = sum(r.rows for r in new)
    per_dim = np.zeros(ranges.dim, np.int64)
    for r in new:
        if r.clipped_per_dim is not None:
            per_dim += np.asarray(r.clipped_per_dim, np.int64)
    low, high = ranges.quantiles or (0.0, 1.0)
    share = per_dim / rows if rows else np.zeros(ranges.dim)
    worst = np.argsort(-share, kind="stable")[:5]
    return {"rows": rows, "clipped_share": round(float(per_dim.sum() / (rows * ranges.dim)) if rows else 0.0, 6),
            "baseline_share": round(low + 1.0 - high, 6),
            "worst_dims": [[int(d), round(float(share[d]), 6)] for d in worst if share[d] > 0]}


def _version_doc(cfg: IngestConfig, files, manifest: RangeManifest, ranges_path: str,
                 records: list[ShardRecord], parent: int | None, scans: list[ScanRef] | None) -> VersionManifest:
    doc = VersionManifest.build(
        model=ModelInfo(cfg.encoder.model_name, manifest.model_fingerprint, manifest.dim, cfg.encoder.normalize),
        ranges=RangesRef(manifest.id, ranges_path, manifest.method), precisions=cfg.precisions,
        source=SourceSnapshot.of(redact_url(cfg.source), cfg.text_column, cfg.id_column, files),
        shards=records, parent=parent, scans=scans)
    return replace(doc, extra={"options": ingest_options(cfg)})


def check_dest_outside_source(cfg: IngestConfig, dest_fs, dest_root: str) -> None:
    """Refuse a destination inside the source folder: the next run (a rerun, a reindex) would list
    its manifests and shards as source files and fail on them. One under a folder whose name
    starts with `_` or `.` is fine: listing skips those (`list_source`)."""
    src_fs, src_root = url_to_fs(cfg.source, cfg.storage_options)
    inside = src_root.rstrip("/") + "/"
    if set(protocols(src_fs)) != set(protocols(dest_fs)) or not dest_root.startswith(inside):
        return
    if hidden(dest_root[len(inside):]):
        return
    raise ValueError(f"destination {redact_url(cfg.dest)} is inside the source {redact_url(cfg.source)}: a later "
                     "run would read its manifests and shards as source files. Put it outside the source, or "
                     "under a folder whose name starts with '_' or '.' (listing skips those)")


def ingest_options(cfg: IngestConfig) -> dict[str, Any]:
    """The options a version records besides model, columns and precisions: what a reindex needs
    to plan and encode the same shards (unit size, batch size and order: padding changes the float
    bits; the model's float type, resolved from `auto`), and to calibrate the same way."""
    return {"unit_rows": cfg.unit_rows, "batch_size": cfg.encoder.batch_size, "batch_order": cfg.encoder.batch_order,
            "precision": cfg.encoder.precision, "index_type": cfg.index_type,
            "calibration_samples": cfg.calibration_samples, "range_method": cfg.range_method,
            "quantiles": list(cfg.quantiles), "seed": cfg.seed,
            # only when given: the versions written without it stay as they were
            **({"exclude": list(cfg.exclude)} if cfg.exclude else {})}


def _summary(doc: VersionManifest, records: list[ShardRecord], wrote: list[ShardRecord], shards_reused: int,
             wall_s: float, calibrate_s: float, manifest_url: str, n: int) -> dict[str, Any]:
    """The job's summary: the version's counts and sizes (`records`: its every shard), and the figures
    of this run's work, from the shards it wrote (`wrote`): not those carried over from the version
    it builds on, nor those reused from an earlier run of the job, whose stats are other runs' work."""
    b = doc.bytes
    docs = doc.count("documents")
    docs_written = sum(r.rows for r in wrote)
    wall_s = round(wall_s, 3)  # docs_per_s is worked out from the figure printed, so the two agree
    # Sizes and ratios for the precisions the shards store, and those only (`bytes_<precision>`,
    # `compression_<precision>`: float32's size over its; None without documents).
    stored = list(doc.precisions)
    return {
        "version": n, "documents": docs, "rejects": doc.count("rejects"),
        "rows_read": doc.count("rows_read"), "shards": len(records), "shards_reused": shards_reused,
        "precisions": stored, "bytes_float32": b["float32"], **{f"bytes_{p}": b[p] for p in stored},
        "bytes_stored": b["stored"],
        **{f"compression_{p}": round(b["float32"] / b[p], 2) if b[p] else None for p in stored},
        "shards_written": len(wrote), "documents_written": docs_written,
        "wall_s": wall_s, "calibrate_s": round(calibrate_s, 3),
        "docs_per_s": round(docs_written / wall_s, 2) if wall_s else None,
        "encode_s": round(sum(r.stat("encode_s") for r in wrote), 3),
        "quantize_s": round(sum(r.stat("quantize_s") for r in wrote), 3),
        "write_s": round(sum(r.stat("write_s") for r in wrote), 3),
        "clipped_values": int(sum(r.clipped or 0 for r in wrote)), "ranges_id": doc.ranges.id,
        "manifest": manifest_url,
    }


def _throughput(s: dict[str, Any]) -> str:
    """The summary's line on this run's work: the shards it wrote, and which of the version's it did not."""
    reused = s["shards_reused"]
    carried = s["shards"] - s["shards_written"] - reused
    kept = " and ".join(f"{n} {how}" for n, how in ((carried, "carried over from the version it builds on"),
                                                    (reused, "reused from an earlier run of the same job")) if n)
    if not s["shards_written"] and not kept:  # a lake of zero-row files: nothing to write, nothing kept
        return f"throughput: no shard written in {s['wall_s']} s; the version holds no shard " \
               f"({s['rows_read']} rows read)"
    if not s["shards_written"]:
        return f"throughput: no shard written in {s['wall_s']} s; the version's {s['shards']} shard(s): {kept}"
    return (f"throughput: {s['docs_per_s']} documents/s over {s['wall_s']} s (calibration {s['calibrate_s']} s; "
            f"encode {s['encode_s']} s, quantize {s['quantize_s']} s, write {s['write_s']} s summed over the "
            f"{s['shards_written']} shard(s) this run wrote" + (f"; not counted: {kept}" if kept else "")
            + f"); {s['clipped_values']} values clipped in them")


def format_summary(s: dict[str, Any]) -> str:
    mib = 1 << 20
    return "\n".join([
        f"committed version {s['version']}: {s['documents']} documents, {s['rejects']} rejects "
        f"(of {s['rows_read']} rows read), {s['shards']} shards "
        f"({s['shards_reused']} reused from an earlier run of the same job)",
        "vectors: " + (f"float32 {s['bytes_float32'] / mib:.2f} MiB -> " + " + ".join(
            f"{p} {s[f'bytes_{p}'] / mib:.2f} MiB ({s[f'compression_{p}']}x)" for p in s["precisions"])
            if s["bytes_float32"] else "none (no document)")
        + f"; {s['bytes_stored'] / mib:.2f} MiB stored with ids and indexes",
        _throughput(s),
        f"ranges {s['ranges_id']}" + (f"; {format_fidelity(s['fidelity'], s['precisions'])}" if s.get("fidelity")
                                      else ""),
        f"manifest: {s['manifest']}",
    ] + ([f"requantized {s['rows_requantized']} rows from their shards' float16 embeddings without the model; "
          f"encoded {s['rows_encoded']} (and {s['calibration_rows']} to calibrate)"]
         if s.get("rows_requantized") else [])
       + ([f"scan: {s['files_scanned']} file(s) read, {s['scans_reused']} unchanged file(s) from their kept scans"]
          if s.get("scans_reused") else []))


def parse_args(argv: list[str] | None = None) -> tuple[IngestConfig, bool]:
    """The config, and whether to print the summary as JSON."""
    p = argparse.ArgumentParser(prog="quantlake ingest", description=__doc__)
    p.add_argument("source", help="source lake URL or path (Parquet / JSON Lines files under it)")
    p.add_argument("dest", help="dataset URL or path to write shards and versions to")
    p.add_argument("--text-column", default="text", help="column (JSON Lines: key) of the text to encode")
    p.add_argument("--id-column", default=None, help="default: <file>:<row>")
    p.add_argument("--model", default=None, help="model folder or cached name (default: bundled all-MiniLM-L6-v2)")
    p.add_argument("--precisions", default="int8,ubinary",
                   help="comma list of int8,uint8,binary,ubinary,float16 (ubinary is always stored; float16: keep "
                        "the embeddings at half width, so a recalibration requantizes shards without the model)")
    p.add_argument("--calibration-samples", type=int, default=None,
                   help="rows to calibrate on (default: a 20th of the lake's rows, 1,000 to 10,000)")
    p.add_argument("--range-method", choices=RANGE_METHODS, default="minmax",
                   help="per-dimension int8 ranges from the sample: its min/max, or --quantiles")
    p.add_argument("--quantiles", default="0.001,0.999", help="low,high for --range-method quantile")
    p.add_argument("--seed", type=int, default=0, help="which rows the calibration sample takes (by id)")
    p.add_argument("--ranges", default=None, help="reuse this range manifest instead of calibrating")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                   help="texts per encoder batch (GPUs: 256 or more; halved and retried on CUDA out-of-memory)")
    p.add_argument("--batch-order", choices=BATCH_ORDERS, default="tokens",
                   help="how a unit's texts are cut into batches: tokens (by token count: less padding, faster), "
                        "or characters (sentence-transformers' own order); recorded, so reindex keeps it")
    p.add_argument("--no-normalize", action="store_true", help="keep raw (unnormalised) embeddings")
    p.add_argument("--device", choices=DEVICES, default="auto",
                   help="where the encoders run: auto (the cluster's GPUs if it has any), cpu, cuda")
    p.add_argument("--precision", choices=FLOAT_PRECISIONS, default="auto",
                   help="the model's float type: auto (fp16x3 on GPU encoders, fp32 on CPU), fp32, fp16x3, "
                        "fp16, bf16")
    p.add_argument("--backend", choices=BACKENDS, default="torch",
                   help="what runs the model: torch, or onnx (onnxruntime on CPUs; needs quantlake[onnx])")
    add_job_options(p)
    p.add_argument("--unit-rows", type=int, default=10_000,
                   help="largest work unit, in rows (rows per shard); a Parquet row group larger than this is one unit")
    p.add_argument("--index-type", choices=sorted(INDEX_FLAGS), default="flat",
                   help="shard binary index: flat (exact), or approximate hnsw / ivf for big shards")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                   help="leave out source files matching GLOB (*, ?, [abc]; [[] for a literal [): a path under "
                        "SOURCE (metadata/*), or a file name when it has no / (*.json); repeatable; recorded, so "
                        "reindex leaves them out too")
    add_storage_options(p)
    add_no_progress(p)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    a = p.parse_args(argv)
    options = storage_options(p, a)
    try:
        low, high = (float(x) for x in a.quantiles.split(","))
        return IngestConfig(
            source=a.source, dest=a.dest, text_column=a.text_column, id_column=a.id_column,
            encoder=EncoderConfig(model=a.model, batch_size=a.batch_size, normalize=not a.no_normalize,
                                  device=a.device, precision=a.precision, backend=a.backend,
                                  batch_order=a.batch_order),
            precisions=tuple(p.strip() for p in a.precisions.split(",") if p.strip()),
            calibration_samples=a.calibration_samples, range_method=a.range_method, quantiles=(low, high),
            seed=a.seed, ranges=a.ranges, ray_address=a.ray_address, unit_rows=a.unit_rows,
            encoder_actors=a.encoder_actors, storage_options=options, progress=not a.no_progress,
            index_type=INDEX_FLAGS[a.index_type], exclude=tuple(a.exclude)), a.json
    except ValueError as exc:
        p.error(str(exc))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cfg, as_json = parse_args(argv)
    status, result = run_reporting("ingest", lambda: run(cfg), cfg.storage_options, [cfg.source, cfg.dest, cfg.ranges],
                                   failures=(UnitFailed, IncompleteVersion, CommitConflict))
    if status == 0:
        print(json.dumps(result.summary, indent=1) if as_json else format_summary(result.summary))
    return status


if __name__ == "__main__":
    sys.exit(console("ingest", main))
