"""`quantlake reindex`: bring a dataset up to date with its changing source lake, as a new version.

Incremental by default: the source is listed and scanned, and planned as a fresh
`quantlake ingest --ranges <the dataset's ranges>` of the current lake would plan it (same
options, recorded in the latest version). A unit whose shard the latest version already lists
(the shard id covers file identity, rows, model, ranges, options and duplicate ids) carries
over without being read or written; only new and changed data is encoded; shards of deleted or
changed files drop out. So the new version holds exactly what that fresh ingest would hold.
A run with no source change commits nothing; it knows that from the listing (every file as the
latest version recorded it, the same model) without scanning the files or starting Ray.

`--recalibrate` (or `--recalibrate-on-drift` when the new data's clipping passes
`--drift-threshold`) calibrates new ranges and rebuilds every shard as one new version;
`--model` re-encodes everything with another model (new ranges too). Both leave older
versions searchable as they are.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import signal
import sys
import threading
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from jobs.common import (add_job_options, add_no_progress, add_storage_options, console, format_fidelity,
                         format_share, joined_negative, one_line, recorded_source, run_reporting, storage_options)
from jobs.ingest import IngestResult, Plan, format_summary, run as ingest
from workers.embedding.encoder import (DEFAULT_BATCH_SIZE, EncoderConfig, encoder_fingerprint, resolve_model,
                                      resolve_model_name)
from workers.ingest.config import IngestConfig
from workers.ingest.pipeline import WarmEncoders
from workers.ingest.source import SourceFile, list_source
from workers.ingest.planning import Float16Source
from workers.ingest.scan import sample_size
from workers.ingest.steps import UnitFailed
from workers.lake.records import VersionManifest
from workers.lake.redact import describe_error, redact, redact_url
from workers.lake.storage import absolute_url, dest_to_fs, join
from workers.lake.versions import CommitConflict, IncompleteVersion, read_version, same_content

log = logging.getLogger(__name__)

DRIFT_THRESHOLD = 0.01
MIN_INTERVAL_S = 1.0  # between --watch cycles


@dataclass(frozen=True)
class ReindexConfig:
    """One reindex run.

    Args:
        dest: the dataset (it must hold a committed version).
        source: the source lake; None: the one the latest version recorded, when it lies on
            the dataset's own storage (a manifest never chooses what these credentials read).
        dry_run: plan and report the cost (rows to encode); write nothing.
        recalibrate: calibrate new ranges and rebuild every shard.
        recalibrate_on_drift: recalibrate when the new data's clipped share passes the
            calibration sample's own by more than `drift_threshold`.
        model: re-encode everything with this model (folder or cached name), with new ranges;
            the latest version's own model (same fingerprint) only says where to load it from.
        model_path: where the latest version's model is (set by `run` from `model`).
        storage_options, ray_address, progress, encoder_actors: as `IngestConfig`.
    """

    dest: str
    source: str | None = None
    dry_run: bool = False
    recalibrate: bool = False
    recalibrate_on_drift: bool = False
    drift_threshold: float = DRIFT_THRESHOLD
    model: str | None = None
    model_path: str | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)
    ray_address: str | None = None
    encoder_actors: int | None = None
    progress: bool = True

    def __repr__(self) -> str:
        return (f"ReindexConfig(dest={redact_url(self.dest)!r}, source={redact_url(self.source or '')!r}, "
                f"dry_run={self.dry_run}, recalibrate={self.recalibrate}, model={self.model!r}, "
                f"storage_options={redact(self.storage_options)!r})")

    def __post_init__(self):
        if self.recalibrate and self.recalibrate_on_drift:
            raise ValueError("--recalibrate and --recalibrate-on-drift exclude each other")
        # NaN turned drift off, and so did a share past 1 (`5` meant for 5%): the excess is at most 1.
        if not (math.isfinite(self.drift_threshold) and 0 <= self.drift_threshold <= 1):
            raise ValueError(f"drift threshold must be a share in [0, 1] (0.05 for 5%), got {self.drift_threshold}")
        if self.dry_run and self.recalibrate_on_drift:  # a dry run encodes nothing: no drift is measured
            raise ValueError("--dry-run plans without encoding, so it measures no drift: "
                             "--recalibrate-on-drift does not apply")
        if self.encoder_actors is not None and self.encoder_actors < 1:
            raise ValueError(f"encoder_actors must be >= 1, got {self.encoder_actors}")


def ingest_config(latest: VersionManifest, cfg: ReindexConfig, source: str, fresh: bool) -> IngestConfig:
    """The ingest a reindex repeats: the latest version's model and encoder backend, columns,
    precisions and options; its ranges unless `fresh` (calibrate anew, with the same calibration
    options)."""
    o = latest.extra.get("options") or {}
    if not isinstance(o, dict):
        raise ValueError(f"version {latest.number}: options is {o!r}, expected an object")
    model = cfg.model or cfg.model_path or latest.model.name
    if cfg.model is None and cfg.model_path is None:
        resolve_model_name(model, f"version {latest.number} of {redact_url(cfg.dest)}")  # a name, never a path
    index_type = o.get("index_type") or (latest.shards[0].index_class if latest.shards else "IndexBinaryFlat")
    return IngestConfig(
        source=source, dest=cfg.dest, text_column=latest.source.text_column, id_column=latest.source.id_column,
        encoder=EncoderConfig(model=model, batch_size=int(o.get("batch_size", DEFAULT_BATCH_SIZE)),
                              normalize=latest.model.normalize, precision=o.get("precision", "auto"),
                              # versions from before the choice were all cut by characters; a new
                              # model re-encodes every row, cut as a first ingest cuts them
                              batch_order=o.get("batch_order", "tokens" if cfg.model else "characters"),
                              backend=latest.model.backend),
        precisions=latest.precisions, calibration_samples=_samples(o.get("calibration_samples", 10_000)),
        range_method=o.get("range_method", latest.ranges.method or "minmax"),
        quantiles=tuple(o.get("quantiles", (0.001, 0.999))), seed=int(o.get("seed", 0)),
        ranges=None if fresh else join(cfg.dest, latest.ranges.path), ray_address=cfg.ray_address,
        unit_rows=int(o.get("unit_rows", 10_000)), encoder_actors=cfg.encoder_actors, index_type=index_type,
        storage_options=cfg.storage_options, progress=cfg.progress, exclude=_exclude(o.get("exclude", [])))


def same_model(model: str, latest: VersionManifest) -> bool:
    """Whether `model` (a folder or cached name) is the latest version's model, by fingerprint."""
    return encoder_fingerprint(resolve_model(model), latest.model.backend) == latest.model.fingerprint


def _exclude(recorded: Any) -> tuple[str, ...]:
    """A version's recorded `--exclude` patterns (none recorded: none given)."""
    if not isinstance(recorded, list) or not all(isinstance(g, str) for g in recorded):
        raise ValueError(f"options.exclude is {recorded!r}, expected a list of glob patterns")
    return tuple(recorded)


def _samples(recorded: Any) -> int | None:
    """A version's recorded `calibration_samples`: a count, or null for the size chosen by the lake's."""
    return None if recorded is None else int(recorded)


def source_of(latest: VersionManifest, cfg: ReindexConfig) -> str:
    """The source lake to read: `--source`, else the latest version's when on the dataset's storage."""
    if cfg.source:
        return cfg.source
    url = recorded_source(cfg.dest, latest, "there is nothing to reindex from")
    if "***" in url:  # its credentials were masked when it was recorded: the URL cannot be read as it is
        raise ValueError(f"version {latest.number} names its source {url}, with masked credentials: pass "
                         "--source with the source lake's URL")
    return url


def run(cfg: ReindexConfig, warm: WarmEncoders | None = None) -> IngestResult:
    """Reindex `cfg.dest`; the result's version is None when nothing was committed.

    `warm`: encoder actors kept between runs by a caller that holds Ray up (`watch`); a
    recalibration after drift uses the same ones as the run that found it.
    """
    cfg = replace(cfg, dest=absolute_url(cfg.dest), source=absolute_url(cfg.source) if cfg.source else None)
    fs, root = dest_to_fs(cfg.dest, cfg.storage_options)  # a dataset no job can commit to is refused first
    latest = read_version(fs, root)
    source = source_of(latest, cfg)
    if cfg.model and same_model(cfg.model, latest):
        # The version's own model, found at another place (a folder: a manifest names no path
        # to load): an incremental reindex with it, not a migration.
        cfg = replace(cfg, model=None, model_path=cfg.model)
    elif cfg.model and cfg.dry_run:
        raise ValueError(f"--dry-run with --model {cfg.model}: a new model re-encodes every row of the source "
                         f"({latest.rows} in version {latest.number})")
    # A recalibration rewrites every shard: those of a version that keeps float16 embeddings are
    # requantized from them, the rest (and new or changed files) read and encoded.
    float16 = Float16Source.of(latest)
    if cfg.dry_run and cfg.recalibrate:  # plan every shard as a first ingest would, with the saved ranges
        icfg = ingest_config(latest, cfg, source, fresh=False)
        result = ingest(icfg, dry_run=True, requantize=float16, warm=warm)
        scanned = result.summary["rows_scanned"]
        # `calibration_samples` as recorded (None: sized to the lake); the sample is at most the lake.
        # Planned with no base version, nothing carries over: the rebuilt version replaces every
        # shard of the latest one (new ranges name every shard anew), so all of them drop out.
        return replace(result, summary={**result.summary, "mode": "dry-run", "recalibrate": True,
                                        "shards_dropped": len(latest.shards),
                                        "float16": float16 is not None,
                                        "calibration_samples": icfg.calibration_samples,
                                        "calibration_rows_max": min(scanned,
                                                                    sample_size(icfg.calibration_samples, scanned))})
    if cfg.recalibrate or cfg.model:
        # New ranges that come out as the latest version's (the lake, sample and options as they
        # were) name its very shards: a copy of it is not committed, as `rollback` commits none.
        result = ingest(ingest_config(latest, cfg, source, fresh=True), requantize=None if cfg.model else float16,
                        warm=warm, accept=lambda draft: not same_content(draft, latest), once=True)
        return replace(result, summary={**result.summary, "mode": "model" if cfg.model else "recalibrate",
                                        "latest": latest.number})
    icfg = ingest_config(latest, cfg, source, fresh=False)
    listed = list_source(icfg.source, icfg.storage_options, icfg.exclude)  # once per cycle: the jobs below take it
    if source_unchanged(latest, icfg, listed[2]):
        # The plan would carry every shard and drop none: skip the scan, which reads every file whole.
        return IngestResult(None, None, {**unchanged_summary(latest),
                                         "mode": "dry-run" if cfg.dry_run else "incremental"})
    drifted: list[dict[str, Any]] = []
    drafts: list[VersionManifest] = []

    def accept(draft: VersionManifest) -> bool:
        drift = draft.extra.get("drift") or {}
        excess = drift.get("clipped_share", 0.0) - drift.get("baseline_share", 0.0)
        if drift.get("rows") and excess > cfg.drift_threshold:
            # In percent, as the summary and `history` print the same shares.
            log.warning("drift: the saved ranges clip %s of the new data's values, %s more than their "
                        "calibration sample (threshold %s)%s", format_share(drift["clipped_share"]),
                        format_share(excess), format_share(cfg.drift_threshold), "; recalibrating"
                        if cfg.recalibrate_on_drift else "; rerun with --recalibrate to calibrate new ranges")
            drifted.append(drift)
            drafts.append(draft)
            return not cfg.recalibrate_on_drift
        return True

    result = ingest(icfg, base=latest, dry_run=cfg.dry_run, accept=accept, warm=warm, listed=listed)
    if drifted and cfg.recalibrate_on_drift:
        # The draft's shards (the latest version's, and those just written for the new data,
        # all under the saved ranges) are complete on storage though not committed: a version
        # keeping float16 has its new rows requantized too, so each is encoded once.
        # The version records the drift that made it, as measured against the saved ranges
        # (`history` shows it; its own ranges were calibrated on the lake as it is).
        again = ingest(ingest_config(latest, cfg, source, fresh=True), requantize=Float16Source.of(drafts[0]),
                       warm=warm, listed=listed, record={"drift": {**drifted[0], "recalibrated": True}}, once=True)
        return replace(again, summary={**again.summary, "mode": "recalibrate", "drift": drifted[0]})
    return replace(result, summary={**result.summary, "mode": "dry-run" if cfg.dry_run else "incremental"})


def source_unchanged(latest: VersionManifest, icfg: IngestConfig, files: list[SourceFile]) -> bool:
    """Whether the source's `files` (its listing) are exactly those `latest` was built from
    (the same relative paths, each with the same size and version: modification time, ETag or
    generation) and the model is the one it was encoded with (same fingerprint).

    Then an incremental reindex has nothing to do: shard ids derive from those identities, the
    model, the ranges and the options, all the latest version's, so its plan would carry every
    shard and drop none. Listing the source is all it takes to know, where the plan itself needs
    a scan that reads every file (at 100M documents, the whole lake's text: docs/scaling.md).
    """
    if not latest.source.file_identities or not latest.source.same_files(files):
        return False
    return same_model(icfg.encoder.model, latest)  # icfg has the latest version's backend


def unchanged_summary(latest: VersionManifest) -> dict[str, Any]:
    """The summary of an incremental plan that carries every shard of `latest`: what the scan
    would have counted (every row read into the version) and nothing to write."""
    plan = Plan(todo=[], carried=list(latest.shards), dropped=[])
    return {**plan.summary(sum(s.rows_read for s in latest.shards), committed=False), "scan_skipped": True}


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_interval(text: str) -> float:
    """Seconds of `30s`, `10m`, `2h`, `1d` or a plain number of seconds."""
    t = text.strip().lower()
    try:
        value = float(t[:-1]) * _UNITS[t[-1]] if t and t[-1] in _UNITS else float(t)
    except ValueError:
        value = -1.0
    # `inf` or `1e10` passed here, and the watch loop's first wait raised OverflowError; below a
    # second (`0.001`), the watch listed the source without pause.
    if not MIN_INTERVAL_S <= value <= threading.TIMEOUT_MAX:
        raise ValueError(f"interval {text!r} is not a duration of 1s or more like 30s, 10m, 2h or 1d")
    return value


def watch(cfg: ReindexConfig, interval_s: float, stop: threading.Event,
          report: Callable[[IngestResult], None] = lambda r: print(format_result(r)),
          keep_encoders: bool | WarmEncoders = False) -> int:
    """Reindex every `interval_s` until `stop` is set; a commit per change set.

    A run in progress when `stop` is set (SIGTERM) finishes, commit included, before the loop
    ends: it never stops between writing shards and committing them. A failure of the first
    cycle ends the watch (the configuration is wrong); a later one (storage unreachable, a
    concurrent commit that cannot be rebased) is logged and retried at the next cycle.
    Ray is started once, for every cycle. In the main thread, SIGTERM and SIGINT set `stop`.

    Each cycle with changes starts encoder actors (each imports torch and loads the model:
    seconds on a CPU, more with a GPU's start) and ends them when it is done. With
    `keep_encoders` (True, or a `WarmEncoders` to keep them in) a cycle leaves its actors for
    the next, which uses them if it needs the same ones: short intervals skip the start, and
    the actors hold their CPUs or GPUs while the watch waits.
    """
    from workers.ray_session import init_ray

    warm = keep_encoders if isinstance(keep_encoders, WarmEncoders) else WarmEncoders() if keep_encoders else None
    started = init_ray(cfg.ray_address)
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        # After Ray's start: its core worker installs a handler that aborts the process on SIGTERM.
        # Put back when the watch ends (a caller that goes on, a test, keeps its own).
        for sig in (signal.SIGTERM, signal.SIGINT):
            # `set` from another thread: the handler runs in the main thread, which may hold the
            # event's lock right then (entering or leaving `stop.wait`), and `set` takes it too.
            handlers[sig] = signal.signal(sig, lambda *_: threading.Thread(target=stop.set, daemon=True).start())
    cycle = 0
    try:
        while not stop.is_set():
            cycle += 1
            try:
                report(run(cfg, warm))
            except Exception as exc:  # noqa: BLE001 - retried next cycle, or fatal in the first
                if cycle == 1:
                    raise
                log.warning("reindex cycle %d failed (%s: %s); retrying in %.0f s", cycle, type(exc).__name__,
                            describe_error(exc, cfg.storage_options, [cfg.dest, cfg.source]), interval_s)
            sys.stdout.flush()
            stop.wait(interval_s)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)  # None: not set from Python
        if warm is not None:
            warm.stop()
        if started:
            import ray

            ray.shutdown()
    log.info("watch stopped after %d cycle(s)", cycle)
    return 0


def format_result(r: IngestResult) -> str:
    s = r.summary
    if s.get("mode") in ("recalibrate", "model"):
        why = "a new model" if s["mode"] == "model" else "new ranges"
        if r.version is None and s.get("committed_meanwhile"):
            return (f"version {s['committed_meanwhile']}, committed meanwhile by another run, holds these ranges "
                    "and shards already: nothing committed")
        if r.version is None and s.get("committed") is False and "latest" in s:
            return (f"nothing committed: calibrating again gave the ranges and shards of version {s['latest']}, "
                    "the latest (the same lake, sample and options)")
        return f"rebuilt every shard with {why}\n" + format_summary(s)
    if s.get("scan_skipped"):
        # Known from the listing alone: nothing was scanned, and `rows_scanned` is the rows the
        # latest version read, all of them carried over.
        kept = f"{s['rows_scanned']} rows carried over in {s['shards_carried']} shard(s), scan skipped"
        if s["mode"] == "dry-run":
            return f"dry run, nothing written: no source change since the latest version ({kept})"
        return f"no source change since the latest version: nothing committed ({kept})"
    plan = (f"{s['rows_encoded']} rows to encode of {s['rows_scanned']} scanned; shards: {s['shards_carried']} "
            f"carried over, {s['shards_added']} added, {s['shards_dropped']} dropped")
    if s["mode"] == "dry-run":
        files = s["files_to_encode"]
        shown = ", ".join(map(one_line, files[:10])) + (f" and {len(files) - 10} more" if len(files) > 10 else "")
        lines = [f"dry run, nothing written: {plan}"]
        if s.get("recalibrate"):
            sized = "" if s["calibration_samples"] is not None else " sized to the lake"
            lines.append(f"recalibrating encodes a sample{sized} of up to {s['calibration_rows_max']} rows and "
                         f"rewrites every shard: {s['rows_requantized']} rows requantized from float16, "
                         f"{s['rows_encoded']} re-encoded")
            if not s["float16"]:
                lines.append("the shards keep no float16 embeddings, so every row must be re-encoded; a dataset "
                             "ingested with --precisions int8,ubinary,float16 is requantized without the model")
        return "\n".join(lines) + (f"\nfiles to encode: {shown}" if files else "")
    if r.version is None and s.get("committed_meanwhile"):
        return (f"version {s['committed_meanwhile']}, committed meanwhile by another run, already holds this "
                f"change: nothing committed ({plan})")
    if r.version is None and s.get("shards_added", 0) == 0 and s.get("shards_dropped", 0) == 0:
        return f"no source change since the latest version: nothing committed ({plan})"
    if r.version is None:
        return f"nothing committed: {plan}"
    drift = s.get("drift") or {}
    lines = [format_summary(s), plan]
    if drift.get("rows"):
        lines.append(f"drift: the ranges clip {format_share(drift['clipped_share'])} of the new data's values "
                     f"(calibration sample: {format_share(drift['baseline_share'])})")
        if drift.get("fidelity"):
            lines.append(f"new data's {format_fidelity(drift['fidelity'], s.get('precisions'))}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> tuple[ReindexConfig, bool, float | None, bool]:
    """The config, whether to print JSON, the watch interval in seconds (None: one run) and
    whether the watch keeps its encoder actors between cycles."""
    p = argparse.ArgumentParser(prog="quantlake reindex", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dest", help="dataset URL or path (holds at least one committed version)")
    p.add_argument("--source", default=None,
                   help="source lake URL (default: the latest version's, if on the dataset's storage)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and its cost; write nothing")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--recalibrate", action="store_true", help="calibrate new ranges and rebuild every shard")
    g.add_argument("--recalibrate-on-drift", action="store_true",
                   help="recalibrate when the new data's clipping passes --drift-threshold")
    p.add_argument("--drift-threshold", type=float, default=DRIFT_THRESHOLD,
                   help="share of clipped values, above the calibration sample's, that counts as drift "
                        "(0 to 1: 0.05 for 5%%)")
    p.add_argument("--model", default=None, help="re-encode everything with this model (folder or cached name)")
    p.add_argument("--watch", action="store_true", help="keep reindexing every --interval until SIGTERM")
    p.add_argument("--interval", default=None,
                   help="time between --watch cycles: 30s, 10m, 2h (default 10m; 1s at least)")
    p.add_argument("--keep-encoders", action="store_true",
                   help="keep the encoder actors (and their GPUs) between --watch cycles rather than load the "
                        "model in every cycle with changes: for short intervals")
    add_job_options(p)
    add_storage_options(p)
    add_no_progress(p)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    a = p.parse_args(joined_negative(argv, "--interval"))
    options = storage_options(p, a)
    try:
        interval = parse_interval(a.interval or "10m") if a.watch else None
        if a.interval is not None and not a.watch:
            raise ValueError("--interval sets the time between --watch cycles: it needs --watch")
        if a.watch and (a.dry_run or a.recalibrate):
            raise ValueError("--watch repeats incremental reindexes: not with --dry-run or --recalibrate")
        if a.keep_encoders and not a.watch:
            raise ValueError("--keep-encoders keeps encoder actors between --watch cycles: it needs --watch")
        return ReindexConfig(a.dest, a.source, dry_run=a.dry_run, recalibrate=a.recalibrate,
                             recalibrate_on_drift=a.recalibrate_on_drift, drift_threshold=a.drift_threshold,
                             model=a.model, storage_options=options, ray_address=a.ray_address,
                             encoder_actors=a.encoder_actors, progress=not a.no_progress and not a.watch), \
            a.json, interval, a.keep_encoders
    except ValueError as exc:
        p.error(str(exc))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cfg, as_json, interval, keep_encoders = parse_args(argv)

    def show(result: IngestResult) -> str:
        return json.dumps({"version": result.version, **result.summary}, indent=1) if as_json \
            else format_result(result)

    if interval is not None:
        stop = threading.Event()  # set by SIGTERM or SIGINT (`watch`)
        status, _ = run_reporting("reindex",
                                  lambda: watch(cfg, interval, stop, lambda r: print(show(r)), keep_encoders),
                                  cfg.storage_options, [cfg.source, cfg.dest],
                                  failures=(UnitFailed, IncompleteVersion, CommitConflict))
        return status
    status, result = run_reporting("reindex", lambda: run(cfg), cfg.storage_options, [cfg.source, cfg.dest],
                                   failures=(UnitFailed, IncompleteVersion, CommitConflict))
    if status == 0:
        print(show(result))
    return status


if __name__ == "__main__":
    sys.exit(console("reindex", main))
