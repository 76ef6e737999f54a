"""The ingest job's configuration, passed whole to tasks and actors."""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from typing import Any

from workers.embedding.encoder import EncoderConfig
from workers.lake.redact import redact, redact_url
from workers.lake.storage import url_to_fs
from workers.vocab import (INDEX_TYPES, PRECISIONS, RANGE_METHODS, IndexType, Precision, RangeMethod, check,
                           whole_number)


@dataclass(frozen=True)
class IngestConfig:
    """One ingest run.

    Args:
        source: URL or path of the source lake (Parquet / JSON Lines files under it).
        dest: URL or path of the dataset root the shards and versions go to.
        text_column, id_column: source columns; without an id column, `<file>:<row>` is the id.
        encoder: model, batch size, normalisation, device.
        precisions: stored precisions; `ubinary` is always added (the index is built on it), here,
            before any shard is named: a version records it, and a reindex names its shards from
            what the version records.
        calibration_samples: rows sampled (by seed, from row ids) to calibrate the ranges; None:
            sized to the lake (`workers.ingest.scan.sample_size`).
        range_method, quantiles: how the sample becomes ranges.
        seed: sampling seed.
        ranges: URL of an existing range manifest to reuse instead of calibrating.
        ray_address: cluster to join (`host:port`, `ray://host:port`, `auto`); None joins
            RAY_ADDRESS when set, else starts a new local instance (`workers/ray_session.py`).
        unit_rows: largest work unit (rows per shard); Parquet units follow row groups.
        encoder_actors: size of the encoder actor pool (None: one per GPU, else 1).
        index_type: each shard's FAISS binary index: IndexBinaryFlat (exact), or the approximate
            IndexBinaryHNSW / IndexBinaryIVF for big shards.
        storage_options: fsspec options for source and destination (credentials, endpoint).
            Only the driver's copy holds them; see `for_workers`.
        progress: show a progress bar in the driver.
        exclude: source files not to read: glob patterns (`source.excluded`) matched against a
            file's path under the source, or against its name alone for a pattern without `/`.
        access: set only in the copy given to Ray tasks (`for_workers`): where they find
            the storage options, which are not in that copy.
    """

    source: str
    dest: str
    text_column: str = "text"
    id_column: str | None = None
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    precisions: tuple[Precision, ...] = ("int8", "ubinary")
    calibration_samples: int | None = None
    range_method: RangeMethod = "minmax"
    quantiles: tuple[float, float] = (0.001, 0.999)
    seed: int = 0
    ranges: str | None = None
    ray_address: str | None = None
    unit_rows: int = 10_000
    encoder_actors: int | None = None
    index_type: IndexType = "IndexBinaryFlat"
    storage_options: dict[str, Any] = field(default_factory=dict)
    progress: bool = True
    exclude: tuple[str, ...] = ()
    access: Any = None  # workers.lake.credentials.StorageAccess

    def __repr__(self) -> str:
        # A config shows up in logs, tracebacks and Ray's task errors: never with its secrets.
        shown = {f.name: getattr(self, f.name) for f in fields(self)}
        shown["storage_options"] = redact(self.storage_options)
        for name in ("source", "dest", "ranges", "ray_address"):
            if isinstance(shown[name], str):
                shown[name] = redact_url(shown[name])
        return f"IngestConfig({', '.join(f'{k}={v!r}' for k, v in shown.items())})"

    def for_workers(self, access) -> "IngestConfig":
        """The copy passed to Ray tasks: no storage options, a `StorageAccess` to fetch them."""
        return replace(self, storage_options={}, access=access)

    def url_to_fs(self, url: str):
        """`(filesystem, path)` of `url` with this job's storage options, in the driver or a worker."""
        if self.access is not None:
            return self.access.url_to_fs(url)
        return url_to_fs(url, self.storage_options)

    def __post_init__(self):
        # What a caller of the Python API passes as the CLI would take it: a pathlib.Path, a
        # precision list or an exclude pattern as one string (a string is a sequence of letters).
        for name in ("source", "dest"):
            object.__setattr__(self, name, os.fspath(getattr(self, name)))
        if isinstance(self.precisions, str):
            object.__setattr__(self, "precisions", tuple(p.strip() for p in self.precisions.split(",") if p.strip()))
        if isinstance(self.exclude, str):
            object.__setattr__(self, "exclude", (self.exclude,))
        for name in ("unit_rows", "calibration_samples", "encoder_actors", "seed"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, whole_number(getattr(self, name), name))
        bad = [p for p in self.precisions if p not in PRECISIONS]
        if bad or not self.precisions:
            raise ValueError(f"unknown precision(s) {bad or self.precisions}: choose from {', '.join(PRECISIONS)}")
        object.__setattr__(self, "precisions", tuple(dict.fromkeys((*self.precisions, "ubinary"))))
        check(self.range_method, RANGE_METHODS, "range method")
        if not (0 <= self.seed < 2 ** 64):  # the sample's hash key (numpy's uint64)
            raise ValueError(f"seed must be in [0, 2**64), got {self.seed}")
        try:
            low, high = self.quantiles
        except (TypeError, ValueError):
            raise ValueError(f"quantiles must be two numbers (low, high), got {self.quantiles!r}") from None
        if not 0.0 <= low < high <= 1.0:
            raise ValueError(f"quantiles must satisfy 0 <= low < high <= 1, got {self.quantiles}")
        if self.ranges is None and self.calibration_samples is not None and self.calibration_samples < 2:
            raise ValueError("calibration needs at least 2 samples (--calibration-samples)")
        if self.unit_rows < 1:
            raise ValueError(f"unit_rows must be >= 1, got {self.unit_rows}")
        if self.encoder_actors is not None and self.encoder_actors < 1:
            raise ValueError(f"encoder_actors must be >= 1, got {self.encoder_actors}")
        if not isinstance(self.text_column, str) or not self.text_column.strip():
            raise ValueError(f"text column must be named, got {self.text_column!r}")
        if self.id_column is not None and (not isinstance(self.id_column, str) or not self.id_column.strip()):
            raise ValueError(f"id column must be named (or left out), got {self.id_column!r}")
        check(self.index_type, INDEX_TYPES, "index_type")
        if any(not isinstance(g, str) or not g.strip() for g in self.exclude):
            raise ValueError(f"exclude patterns must be non-empty globs, got {list(self.exclude)!r}")
