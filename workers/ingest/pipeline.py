"""The ingest job on Ray: scan, calibrate, and the streaming read -> encode -> write pass.

The encoder actors (`Encoders`, Ray Core) are started once per job and serve both the
calibration and the main pass, so each loads the model once. The main pass (`stream_units`)
chains, per work unit, a read task, a call to an encoder actor and a write task, with a bounded
number of units in flight; the scan's dedupe shuffle is Ray Core tasks too (see `scan`). Both
say in their docstrings why not Ray Data. The steps themselves are plain functions in
`workers/ingest/steps.py`.
"""
from __future__ import annotations

import json
import logging
import sys
from collections import Counter, deque
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from ranges.manifest import RangeManifest
from ranges.stats import partial_stats, ranges_from
from workers.ingest.config import IngestConfig
from workers.embedding.encoder import Encoder, EncoderConfig, encoded_row
from workers.ray_session import init_ray
from workers.ingest.scan import SAMPLE_CAP, Sample, find_duplicates, sample_size, scan_path
from workers.ingest.source import SourceError
from workers.ingest.steps import UnitFailed, read_unit, scan_files, unit_step, write_unit
from workers.lake.records import Duplicate, ScanRef, ShardRecord, WorkUnit

log = logging.getLogger(__name__)

# Encoder batches per calibration work item. The items are cut from the sample in key order,
# so each sampled text is always encoded beside the same neighbours (padding changes the
# float bits) whatever the number of actors.
CALIBRATION_CHUNK_BATCHES = 4
# Work units in flight in the main pass: per encoder actor, one encoded, one queued at the actor,
# one read or written; or, when the cluster has more CPUs, two per CPU, so that reads (of an
# object store, say) keep fast GPU encoders fed. Memory is bounded by them, whatever the lake's
# size: a unit is at most --unit-rows rows.
UNITS_IN_FLIGHT_PER_ACTOR = 3
UNITS_IN_FLIGHT_PER_CPU = 2
# Tries of a unit's read or write task after its process or node died (an exception the step
# raises is not retried: it fails the unit). Finite: a file that crashes its reader every time
# fails the job naming the unit rather than being retried for ever.
UNIT_TASK_RETRIES = 4
# Tries of an encoder actor's call after the actor's process died (Ray restarts the actor, for
# ever, and runs the calls it had again). Finite too: a unit whose encoding kills its process
# every time (a text that runs the node out of memory, a crash in native code) fails the job
# naming the unit instead of restarting the actor for ever.
ENCODER_CALL_RETRIES = 4
# What a scan task asks of a CPU, and a unit's read or write task: the encoder actors must leave
# a scan task's (`room_problem`).
SCAN_TASK_CPUS = 1.0
UNIT_TASK_CPUS = 0.5
# A scan task scans a group of consecutive files (`scan_groups`): about the lake's bytes to read
# over SCAN_TASKS_PER_CPU tasks per CPU, at least SCAN_GROUP_BYTES (Ray's ~5 ms per task is then
# nothing beside the reading) and at most SCAN_GROUP_MAX_BYTES (a task holds its files' id
# digests, 28 bytes per row: no more than a scan of one 256 MB file holds, ~55 MB for the Parquet
# of bench/scale.py, 134 bytes per row), and at most SCAN_GROUP_FILES files (what a retry scans again).
SCAN_TASKS_PER_CPU = 4
SCAN_GROUP_BYTES = 32 << 20
SCAN_GROUP_MAX_BYTES = 256 << 20
SCAN_GROUP_FILES = 1000
# The label every Ray node carries with its id; CPU tasks select nodes by it (`cpu_task_args`).
NODE_ID_LABEL = "ray.io/node-id"


def ray_init(cfg: IngestConfig) -> bool:
    """Join `cfg.ray_address` (or RAY_ADDRESS), else start a local instance (`workers/ray_session.py`
    has the rule); True if this call initialised Ray."""
    return init_ray(cfg.ray_address)


def encoder_pool(cfg: IngestConfig) -> dict[str, Any]:
    """The encoder actors' number (`actors`) and what each holds: one actor per GPU with one
    GPU and one CPU, else (or for the onnx backend) CPU actors of one CPU."""
    import ray

    resources = ray.cluster_resources()
    problem = gpu_problem(cfg.encoder, resources)
    if problem:
        raise ValueError(problem)
    gpus = int(resources.get("GPU", 0))
    if gpus and cfg.encoder.device != "cpu" and cfg.encoder.backend == "torch":  # onnx runs on CPUs
        return {"actors": cfg.encoder_actors or gpus, "num_gpus": 1, "num_cpus": 1}
    return {"actors": cfg.encoder_actors or 1, "num_cpus": 1}


def gpu_problem(encoder: EncoderConfig, resources: dict[str, float]) -> str | None:
    """Why encoders on `--device cuda` could never run on a cluster of `resources` (Ray's
    `cluster_resources()`: the GPUs of every node, where the driver's machine may have none), or
    None. Asked before any work: CPU actors told to use CUDA would each fail on their first
    batch, with torch's traceback, after the scan had already written to the dataset."""
    if encoder.device != "cuda" or resources.get("GPU", 0) > 0:
        return None
    return (f"--device cuda, but the cluster has no GPU (Ray advertises {resources.get('CPU', 0):g} CPUs and no GPU "
            "resource): the encoders could not run (--device auto uses the cluster's GPUs if it has any, else "
            "its CPUs; or join a cluster with GPUs, --ray-address)")


def room_problem(pool: dict[str, Any], cpus: float) -> str | None:
    """Why the job's tasks could never start beside the encoder actors of `pool` on a cluster
    of `cpus` CPUs (the actors keep theirs for the whole job), or None when a scan task fits."""
    left = cpus - pool["actors"] * pool["num_cpus"]
    if left >= SCAN_TASK_CPUS:
        return None
    fits = max(0, int((cpus - SCAN_TASK_CPUS) // pool["num_cpus"]))
    return (f"{pool['actors']} encoder actor(s) of {pool['num_cpus']:g} CPU each leave {max(left, 0):g} of the "
            f"cluster's {cpus:g} CPUs for the scan, read and write tasks, which need {SCAN_TASK_CPUS:g}: the job "
            f"would wait for ever (at most {fits} encoder actor(s) fit, --encoder-actors)")


def check_room(pool: dict[str, Any], own_instance: bool) -> None:
    """`room_problem` on the cluster as it is: an error on the job's own local instance, which
    nothing can add CPUs to; a warning on a cluster, whose autoscaler may add nodes."""
    import ray

    problem = room_problem(pool, ray.cluster_resources().get("CPU", 0))
    if problem and own_instance:
        raise ValueError(problem)
    if problem:
        log.warning("%s, unless the cluster adds CPU nodes: the job waits for them", problem)


class EncoderActor(Encoder):
    """An encoder actor of the job: `Encoder` with a method per kind of work."""

    def encode_row(self, row: dict[str, Any]) -> dict[str, Any]:
        """A calibration chunk (`texts`) with its embeddings (`Encoder.__call__`)."""
        return self(row)

    def encode_unit(self, row: dict[str, Any]) -> dict[str, Any]:
        """A work unit's row with its embeddings; a failure names the unit."""
        with unit_step(WorkUnit.from_json(row["unit"]), "encode"):
            return self(row)


class Encoders:
    """The job's encoder actors, started once and used by the calibration and the main pass.

    Ray Core actors, not a Ray Data actor pool: a Ray Data pool lives for one dataset, so the
    calibration's and the main pass's would each start processes and load the model (about 4 s
    of a CPU per actor here, importing torch and sentence-transformers). Each is restarted by Ray
    if its process dies, and the calls it had are run again on the new one (`max_restarts=-1`,
    up to `ENCODER_CALL_RETRIES` times per call; tests/test_faults.py kills one): encoding is a
    pure function of the texts, so a retry gives the same bytes. `stop` (or leaving the `with`
    block) ends them.
    """

    def __init__(self, cfg: IngestConfig, pool: dict[str, Any]):
        import ray

        remote = ray.remote(EncoderActor).options(
            num_cpus=pool["num_cpus"], num_gpus=pool.get("num_gpus", 0), max_restarts=-1,
            max_task_retries=ENCODER_CALL_RETRIES)
        ecfg = encoder_cfg(cfg, pool)
        self.actors = [remote.remote(ecfg) for _ in range(pool["actors"])]

    def stop(self, kill: bool = False) -> None:
        """End the actors. By default drop the handles: Ray ends an actor whose handles are all
        gone once the calls queued at it are done, with a process exit. With `kill` (the job
        failed), `ray.kill` them now instead: the exception's traceback may keep handles alive
        in the frames it references, and an actor left running would hold its CPU or GPU for
        as long. (`ray.kill` stops the process mid-flight, where torch's threads may abort it: a
        driver that stays up, `reindex --watch`, would show "Fatal Python error: Aborted" after
        every cycle. An actor's own `__ray_terminate__` counts as a failure to restart from,
        given `max_restarts`.)
        """
        import gc

        import ray

        actors, self.actors = self.actors, []
        if kill:
            for a in actors:
                ray.kill(a, no_restart=True)
        del actors
        gc.collect()  # handles that finished frames (a traceback's, a generator's) still hold in cycles

    def __enter__(self) -> "Encoders":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.stop(kill=exc_type is not None)


class WarmEncoders:
    """Encoder actors kept between the jobs of one driver that holds Ray up (`quantlake reindex
    --watch --keep-encoders`): a job asking for the same actors as the one before (same encoder
    config, pool and model fingerprint) gets them warm instead of starting processes that import
    torch and load the model; one asking for others (the model files changed, a GPU node joined)
    ends the kept set and starts its own. One set at a time. The kept actors hold their CPUs or
    GPUs while the driver waits between jobs: that is the price. A failed job's set is killed,
    not kept. `stop` ends the kept set (the driver calls it before `ray.shutdown()`).
    """

    def __init__(self):
        self.key: str | None = None
        self.encoders: Encoders | None = None
        self.starts = 0  # sets started so far (a set kept for the next job counts once)

    def get(self, cfg: IngestConfig, pool: dict[str, Any], fingerprint: str) -> Encoders:
        """The kept set if it is the one `cfg`, `pool` and `fingerprint` ask for, else a new one."""
        # The model by its fingerprint, not its name: `all-MiniLM-L6-v2` and None load the same folder.
        key = repr((replace(encoder_cfg(cfg, pool), model=None), sorted(pool.items()), fingerprint))
        if self.encoders is not None and key != self.key:
            log.info("the kept encoder actors are not this job's (its encoder, pool or model differs): "
                     "starting new ones")
            self.stop()
        if self.encoders is None:
            self.encoders, self.key = Encoders(cfg, pool), key
            self.starts += 1
        return self.encoders

    def stop(self, kill: bool = False) -> None:
        """End the kept set, if any (`Encoders.stop`)."""
        encoders, self.encoders, self.key = self.encoders, None, None
        if encoders is not None:
            encoders.stop(kill=kill)


def cpu_task_args(pool: dict[str, Any]) -> dict[str, Any]:
    """Ray arguments for the CPU tasks (scan, read, quantize+write, statistics): where they may run.

    When the encoders hold GPUs and the cluster has nodes without one, the tasks run only on
    those: a GPU node's CPUs are for feeding its GPU (its encoder actor's tokenizing and the
    transfer of queued units), and a read there would compete with it. On one machine, or a
    cluster whose every node has a GPU, they run anywhere. The rule names the GPU nodes alive
    when the job starts (a label selector on the node id, which every Ray node carries), so a
    CPU node that joins later takes tasks too; with every CPU node gone, the tasks wait for one.
    """
    if "num_gpus" not in pool:
        return {}
    import ray

    alive = [n for n in ray.nodes() if n.get("Alive")]
    gpu_nodes = sorted(n["NodeID"] for n in alive if n["Resources"].get("GPU", 0) > 0)
    cpu_nodes = [n for n in alive if n["Resources"].get("CPU", 0) > 0 and not n["Resources"].get("GPU", 0)]
    if not gpu_nodes or not cpu_nodes:
        return {}
    return {"label_selector": {NODE_ID_LABEL: f"!in({','.join(gpu_nodes)})"}}


def encoder_cfg(cfg: IngestConfig, pool: dict[str, Any]) -> EncoderConfig:
    """The encoder config with `auto` precision resolved for the pool: fp16x3 on GPU actors, fp32
    on CPU actors. The job resolves it before planning, since the float type is part of every
    shard's name and of the version's options; the actors then all use the same one."""
    device = "cuda" if "num_gpus" in pool else "cpu"
    return replace(cfg.encoder, precision=cfg.encoder.resolved_precision(device))


@dataclass
class Scanned:
    """What the scan of every file found.

    Args:
        rows: rows per file, in file order.
        duplicates: per file index, its rows whose id an earlier row holds.
        sample: the calibration sample (empty when the job has ranges).
        scans: each file's kept scan (None: none kept, in a dry run).
        files_reused: files whose kept scan was read instead of the file.
        marks: per file, where its units may start reading it (`workers.ingest.source.Mark`:
            an uncompressed JSON Lines file read by the scan; empty for the others).
    """

    rows: list[int]
    duplicates: dict[int, list[Duplicate]]
    sample: Sample
    scans: list[ScanRef] | None = None
    files_reused: int = 0
    marks: list[list] = field(default_factory=list)


def scan(cfg: IngestConfig, files, pool: dict[str, Any] | None = None,
         kept: Mapping[str, ScanRef] | None = None, keep: bool = False,
         row_groups: list[list[int] | None] | None = None) -> Scanned:
    """Scan every file (Ray tasks, one per group of consecutive files: `scan_groups`; placed by
    `cpu_task_args(pool)`): row counts, cross-file duplicate ids, calibration sample.

    Ray Core, not Ray Data: this is a hash-partitioned shuffle whose partitions are the
    separate return values of the scan tasks; each reducer sees one partition of every task,
    so no process holds every id.

    Args:
        kept: the latest version's kept scans by source path: a file whose kept scan has the
            name its identity and columns give is not read again when the job has ranges.
        keep: write each file's kept scan (the version will list them).
        row_groups: per file, its Parquet row group sizes (`check_source`), recorded with its
            kept scan.
    """
    import ray

    n_parts = max(1, min(64, len(files)))
    where = cpu_task_args(pool or {})
    remote_scan = ray.remote(scan_files).options(num_returns=n_parts + 1, num_cpus=SCAN_TASK_CPUS, max_retries=3,
                                                 **where)
    kept = kept or {}
    refs_kept = [kept_scan_for(kept, f, cfg) for f in files]
    # What each file's scan reads: its kept scan where one will stand in (a job with ranges), else the file.
    costs = [r.bytes if r is not None and cfg.ranges else f.size for f, r in zip(files, refs_kept)]
    groups = scan_groups(costs, ray.cluster_resources().get("CPU", 1))
    refs = [remote_scan.remote(cfg, [(i, files[i], refs_kept[i]) for i in g], n_parts, keep) for g in groups]
    dup_task = ray.remote(find_duplicates).options(num_cpus=SCAN_TASK_CPUS, max_retries=3, **where)
    dup_refs = [dup_task.remote(*[r[p + 1] for r in refs]) for p in range(n_parts)]
    summary_refs = [r[0] for r in refs]
    del refs  # the partitions live on through dup_refs' tasks; the summaries are fetched below
    sample = Sample(0 if cfg.ranges else cfg.calibration_samples or SAMPLE_CAP)
    rows: list[int] = []
    marks: list[list] = []
    scans: list[ScanRef] = []
    valid = reused = 0
    try:
        # One group's summary at a time, merged and dropped: each holds up to a whole calibration
        # sample of texts, so fetching them all at once would hold groups x samples texts in the
        # driver (1,000 groups of a 100M-document lake: 10M texts, about 5 GB).
        for g, group in enumerate(groups):
            summary = ray.get(summary_refs[g])
            summary_refs[g] = None  # frees the object once merged
            sample = sample.merge(summary["sample"])
            for i, s in zip(group, summary["files"]):
                rows.append(s["rows"])
                marks.append(s["marks"])
                valid += s["valid"]
                reused += s["reused"]
                if s["problem"]:
                    log.warning("%s", s["problem"])
                if s["scan"] is not None:
                    sizes = None if row_groups is None or row_groups[i] is None else tuple(row_groups[i])
                    scans.append(replace(s["scan"], row_groups=sizes))
    except ray.exceptions.RayTaskError as exc:
        # A file that cannot be read is bad input: its own SourceError (file and line), not Ray's wrapper.
        if isinstance(getattr(exc, "cause", None), SourceError):
            raise exc.cause from None
        raise
    # The default size follows the lake's valid rows, known only now: scanned at the cap, then cut
    # (the bottom-k of the bottom-cap is the bottom-k).
    sample = sample.first(sample_size(cfg.calibration_samples, valid))
    duplicates: dict[int, list[Duplicate]] = {}
    for d in ray.get(dup_refs):
        for e in d:
            duplicates.setdefault(int(e["file"]), []).append(
                Duplicate(int(e["row"]), files[int(e["first_file"])].relpath, int(e["first_row"])))
    return Scanned(rows, duplicates, sample, scans if keep else None, reused, marks)


def scan_groups(costs: list[int], cpus: float) -> list[range]:
    """The files of each scan task: consecutive runs of the listing, each closed once it holds
    the lake's bytes to read (`costs`, per file) over SCAN_TASKS_PER_CPU tasks per CPU (within
    SCAN_GROUP_BYTES and SCAN_GROUP_MAX_BYTES), or SCAN_GROUP_FILES files. A file larger than
    that is a group of its own, so a lake of large files scans one file per task as before, and
    a lake of many small ones pays Ray's per-task cost per group, not per file."""
    share = sum(costs) / max(1.0, SCAN_TASKS_PER_CPU * cpus)
    target = min(SCAN_GROUP_MAX_BYTES, max(SCAN_GROUP_BYTES, share))
    groups, start, held = [], 0, 0
    for i, cost in enumerate(costs):
        held += cost
        if held >= target or i + 1 - start == SCAN_GROUP_FILES:
            groups.append(range(start, i + 1))
            start, held = i + 1, 0
    if start < len(costs):
        groups.append(range(start, len(costs)))
    return groups


def kept_scan_for(kept: Mapping[str, ScanRef], f, cfg: IngestConfig) -> ScanRef | None:
    """`f`'s kept scan, when the one recorded for its path is named for its identity and the job's columns."""
    ref = kept.get(f.relpath)
    if ref is None or ref.path != scan_path(f, cfg.text_column, cfg.id_column):
        return None
    return ref


def calibrate(cfg: IngestConfig, sample: Sample, fingerprint: str, pool: dict[str, Any]) -> RangeManifest:
    """Encode the sample with encoder actors of their own and reduce its statistics to ranges."""
    with Encoders(cfg, pool) as encoders:
        return ranges_of(cfg, encode_sample(cfg, sample, encoders), fingerprint)


def encode_sample(cfg: IngestConfig, sample: Sample, encoders: Encoders) -> np.ndarray:
    """The sample's float32 embeddings, in sample-key order, encoded by the job's encoder actors.

    The texts are cut into chunks of `CALIBRATION_CHUNK_BATCHES` batches in key order, so each
    is encoded beside the same neighbours whatever the number of actors. They come back to the
    driver (10,000 x 384 float32 is 15 MB): the ranges and the fidelity estimate both need them.

    The main pass encodes these texts again rather than reusing them: a text's float bits depend
    on its batch neighbours (sentence-transformers sorts a call's texts by length, so the padding
    differs between a calibration chunk and the text's work unit). Measured on 200 real documents
    sampled from 400: 5 rows' float32 differed (by up to 1.4e-7) and 1 int8 value of 1 row, so a
    shard built from reused embeddings would not be byte-identical to one from a run with saved
    ranges (README, Benchmarks).
    """
    import ray

    if len(sample.ids) < 2:
        raise SourceError(f"only {len(sample.ids)} valid document(s) in {cfg.source}: "
                          "calibration needs at least 2 (or pass --ranges)")
    texts = sample.texts  # ordered by sample key: a fixed order independent of the cluster
    size = CALIBRATION_CHUNK_BATCHES * cfg.encoder.batch_size
    actors = encoders.actors
    # Every chunk is queued at once, in turn over the actors (a chunk is a few batches: the
    # sample is at most SAMPLE_CAP texts), and the results come back in chunk order.
    refs = [actors[n % len(actors)].encode_row.remote({"chunk": n, "texts": json.dumps(texts[i:i + size])})
            for n, i in enumerate(range(0, len(texts), size))]
    try:
        rows = ray.get(refs)
    except BaseException:
        # Cancelled while queued at the actors, as a failed main pass does (`stream_units`): the
        # job then kills the actors, and Ray would retry each call, with a warning (a Ctrl-C here).
        for ref in refs:
            ray.cancel(ref)
        raise
    return np.concatenate([np.frombuffer(r["embeddings"], np.float32).reshape(-1, int(r["dim"])) for r in rows])


def ranges_of(cfg: IngestConfig, embeddings: np.ndarray, fingerprint: str) -> RangeManifest:
    """The range manifest of the sample's embeddings (the reducer's merge of one part: exact, so
    equal to merging the chunks' statistics in any order)."""
    keep = cfg.range_method == "quantile"
    stats = partial_stats(embeddings, keep_values=keep)
    ranges = ranges_from(stats, cfg.range_method, cfg.quantiles)
    return RangeManifest(ranges=ranges, model_name=cfg.encoder.model_name, model_fingerprint=fingerprint,
                         normalize=cfg.encoder.normalize, method=cfg.range_method,
                         quantiles=tuple(cfg.quantiles) if keep else None,
                         sample_size=stats.count, seed=cfg.seed)


@dataclass(frozen=True)
class Written:
    """How the main pass came by its shards: reused from an earlier run of the job (the shards
    `reused_ids`), or written from embeddings the encoders made (`encoded_rows`) or from a shard's
    float16 column (`requantized_rows`); rows count every row of a unit, rejects included."""

    reused_ids: frozenset[str] = frozenset()
    encoded_rows: int = 0
    requantized_rows: int = 0

    @property
    def reused(self) -> int:
        """How many shards an earlier run of the job had written."""
        return len(self.reused_ids)


def encode_and_write(cfg: IngestConfig, units: list[WorkUnit], pool, encoders: Encoders, ranges_path: str,
                     ranges_id: str,
                     total_rows: int, requantize: Mapping[str, ShardRecord] | None = None,
                     nodes: dict[str, Counter] | None = None, probe: int = 0, label: str = "ingest"
                     ) -> tuple[list[ShardRecord], Written, np.ndarray | None]:
    """The streaming main pass: read (tasks) -> encode (the job's encoder actors) -> quantize+write (tasks).

    Each step's row is a whole work unit, so a unit is encoded as one fixed list of texts (its
    embeddings do not depend on how the work is split) and becomes exactly one shard. The rows
    are the typed records' row forms: `WorkUnit.to_json`, then `UnitRows.to_row` (plus the
    encoder's embeddings), then the written `ShardRecord`.
    Memory is bounded by the units in flight (`stream_units`).
    A unit named in `requantize` (shard id -> a shard of the same unit that kept float16
    embeddings) is requantized from that shard rather than read and encoded.
    Returns the shard records and how they came about (`Written`: how many an earlier run had
    written, and the read step verified); a unit that fails for good raises UnitFailed naming it.
    `nodes`, when given, is filled with the units each step (`read`, `encode`, `write`) ran per
    Ray node id.
    With `probe`, also the float32 embeddings of about `probe` of the encoded rows (None
    without): the rows of smallest sample key, in key order, as the main pass encoded them
    (`probe_threshold`). `label`: the progress bar's, the command's name.
    """
    from tqdm import tqdm

    requantize = requantize or {}
    items = [{"unit": u.to_json(), "requantize": json.dumps(requantize[u.shard_id].to_json())
              if u.shard_id in requantize else ""} for u in units]
    rows = stream_units(items, cfg, encoders, cpu_task_args(pool), read_unit, write_unit,
                        {"ranges_path": ranges_path, "ranges_id": ranges_id,
                         "probe_below": probe_threshold(probe, total_rows)})
    records, reused, encoded, requantized, probed = [], [], 0, 0, []
    with tqdm(total=total_rows, unit="doc", disable=not cfg.progress, file=sys.stderr,
              desc=label) as bar:
        try:
            for row in rows:
                rec = ShardRecord.from_json(json.loads(row["record"]))
                records.append(rec)
                if row["reused"]:
                    reused.append(rec.id)
                if row["requantized"]:
                    requantized += rec.rows_read
                elif not row["reused"]:
                    encoded += rec.rows_read
                if nodes is not None:
                    for step, node in json.loads(row["nodes"]).items():
                        if node is not None:
                            nodes.setdefault(step, Counter())[node] += 1
                if row["probe"]:
                    ids = json.loads(row["probe_ids"])
                    emb = np.frombuffer(row["probe"], np.float32).reshape(len(ids), -1)
                    probed += zip(np.frombuffer(row["probe_keys"], np.uint64).tolist(), ids, emb)
                bar.update(rec.rows_read)
        except Exception as exc:
            failed = _unit_failure(exc)
            if failed is None:
                raise
            raise UnitFailed(f"{failed.message}; nothing was committed") from exc
        finally:
            rows.close()  # on an error here too: its calls queued at the actors are cancelled now
    probed = sorted(probed, key=lambda p: (p[0], p[1]))[:probe]  # the bottom-`probe`, as `Sample` orders it
    sample = np.stack([p[2] for p in probed]) if probed else None
    return (sorted(records, key=lambda r: (r.source.file, r.source.row_start)),
            Written(frozenset(reused), encoded, requantized),
            sample)


def probe_threshold(rows: int, total_rows: int) -> int:
    """The sample key below which about 1.25 x `rows` of `total_rows` rows fall (0: no probe).

    Keys are uniform 64-bit hashes, so the share of rows below `t` is about `t / 2**64`; the
    margin makes fewer than `rows` unlikely, and the driver keeps the `rows` smallest.
    """
    if rows <= 0 or total_rows <= 0:
        return 0
    return min(2 ** 64 - 1, int(2 ** 64 * min(1.0, 1.25 * rows / total_rows)))


def _unit_failure(exc: BaseException | None) -> UnitFailed | None:
    """The UnitFailed inside the wrappers Ray puts around a task's exception, if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        inner = getattr(exc, "cause", None)  # a RayTaskError's: the task's own exception
        if isinstance(exc, UnitFailed) and not isinstance(inner, UnitFailed):
            return exc
        exc = inner or exc.__cause__
    return None


def read_task(read: Callable, item: dict[str, Any], cfg: IngestConfig) -> tuple[bool, dict[str, Any]]:
    """The main pass's read task: whether the unit has texts for an encoder, and its row.

    A unit with nothing to encode (reused, requantized, or every row rejected) gets the encode
    step's fields here (`encoded_row`, no embeddings, `dim` None: the write takes the ranges')
    and goes straight to its write. It needs nothing of the encoders, so the first units are
    read while the actors still load the model.
    """
    row = read(item, cfg)
    if row["texts"] == "[]":
        return False, encoded_row(row, b"", None, None, 0.0)
    return True, row


def stream_units(items: list[dict[str, Any]], cfg: IngestConfig, encoders: Encoders, where: dict[str, Any],
                 read: Callable, write: Callable, write_args: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The main pass's scheduler: per work unit, a read task (`read_task` around `read`), then,
    if it has texts, a call to the least busy encoder actor, then a write task (`write`
    with `write_args`); yields each unit's written row as it completes.

    At most `units_in_flight` units are in flight, so memory is bounded, and an actor has the
    next unit queued while it encodes one: units are read on CPU tasks (placed by `where`),
    and a call waits at its actor, not in a process. A unit goes to the actor with the fewest
    units in hand. Each arrow is an object reference: Ray hands a read's row to its actor and
    the actor's embeddings to the write task directly; the driver sees only the small "has
    texts" flag and the written record. A task whose process or node
    died runs again (`UNIT_TASK_RETRIES`; an actor's calls are retried by its restarts), as
    does one whose lost result a later step needs. A failure raises UnitFailed naming the
    unit, and the calls queued at the actors are cancelled.

    Ray Core, not Ray Data: the actors are the job's (`Encoders`), and a Ray Data task can use
    them only by blocking on the call, which holds a worker process per queued unit. With Ray
    Data (its executor in the driver, its stats and autoscaling actors, the blocked tasks'
    processes), the encoder of a 2-core machine took 65.6 to 69.1 s on a 3,000-document main
    pass; with this scheduler 57.6 s, against 53.3 s for the same units in one plain process.
    """
    import ray

    read_remote = ray.remote(read_task).options(num_returns=2, num_cpus=UNIT_TASK_CPUS, max_retries=UNIT_TASK_RETRIES,
                                                **where)
    write_remote = ray.remote(write).options(num_cpus=UNIT_TASK_CPUS, max_retries=UNIT_TASK_RETRIES, **where)
    actors = encoders.actors
    todo = deque(items)
    limit = units_in_flight(len(actors), ray.cluster_resources().get("CPU", 0))
    reading: dict[Any, tuple[Any, dict[str, Any]]] = {}  # "has texts" flag -> (row, item)
    # written record -> (item, the actor's call it waits on and that actor's index, or None)
    writing: dict[Any, tuple[dict[str, Any], tuple[Any, int] | None]] = {}
    load = [0] * len(actors)  # units each actor has queued or is encoding
    try:
        while todo or reading or writing:
            while todo and len(reading) + len(writing) < limit:
                item = todo.popleft()
                flag, row = read_remote.remote(read, item, cfg)
                reading[flag] = (row, item)
            [ready], _ = ray.wait([*reading, *writing], num_returns=1)
            if ready in reading:
                row, item = reading.pop(ready)
                call = None
                if _unit_result(ready, item):
                    i = load.index(min(load))
                    load[i] += 1
                    row = actors[i].encode_unit.remote(row)
                    call = (row, i)
                writing[write_remote.remote(row, cfg, **write_args)] = (item, call)
            else:
                item, call = writing.pop(ready)
                if call is not None:
                    load[call[1]] -= 1
                yield _unit_result(ready, item)
    finally:
        # A failed (or abandoned) pass cancels its calls queued at the actors: the job then kills
        # the actors, and Ray would retry each call, with a warning. The reads and writes in
        # flight are left to end (a write whose call was cancelled fails at once): cancelling
        # a task that waits on an actor call's result trips a reference-count check in Ray's
        # core worker ("submitted_task_ref_count > 0"), which aborts the driver.
        for _, call in writing.values():
            if call is not None:
                ray.cancel(call[0])


def units_in_flight(actors: int, cpus: float) -> int:
    """How many work units the main pass keeps in flight (`UNITS_IN_FLIGHT_PER_ACTOR`,
    `UNITS_IN_FLIGHT_PER_CPU`)."""
    return max(UNITS_IN_FLIGHT_PER_ACTOR * actors, int(UNITS_IN_FLIGHT_PER_CPU * cpus))


def _unit_result(ref, item: dict[str, Any]) -> Any:
    """`ray.get(ref)` of a unit's step; a failure that does not name the unit (a process or a
    node that died for good) is raised as UnitFailed naming it."""
    import ray

    try:
        return ray.get(ref)
    except Exception as exc:
        if _unit_failure(exc) is not None:
            raise
        raise UnitFailed(f"{WorkUnit.from_json(item['unit']).describe()}: {type(exc).__name__}: {exc}") from exc
