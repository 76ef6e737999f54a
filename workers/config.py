"""The ingest job's configuration, passed whole to tasks and actors."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from workers.encoder import EncoderConfig
from workers.quantizer import PRECISIONS


@dataclass(frozen=True)
class IngestConfig:
    """One ingest run.

    Args:
        source: URL or path of the source lake (Parquet / JSON Lines files under it).
        dest: URL or path of the dataset root the shards and versions go to.
        text_column, id_column: source columns; without an id column, `<file>:<row>` is the id.
        encoder: model, batch size, normalisation, device.
        precisions: stored precisions; `ubinary` is always added (the index is built on it).
        calibration_samples: rows sampled (by seed, from row ids) to calibrate the ranges.
        range_method, quantiles: how the sample becomes ranges.
        seed: sampling seed.
        ranges: URL of an existing range manifest to reuse instead of calibrating.
        ray_address: cluster to join; None starts or reuses a local instance (or RAY_ADDRESS).
        unit_rows: largest work unit (rows per shard); Parquet units follow row groups.
        encoder_actors: size of the encoder actor pool (None: one per GPU, else 1).
        storage_options: fsspec options for source and destination (credentials, endpoint).
        progress: show a progress bar in the driver.
    """

    source: str
    dest: str
    text_column: str = "text"
    id_column: str | None = None
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    precisions: tuple[str, ...] = ("int8", "ubinary")
    calibration_samples: int = 10_000
    range_method: Literal["minmax", "quantile"] = "minmax"
    quantiles: tuple[float, float] = (0.001, 0.999)
    seed: int = 0
    ranges: str | None = None
    ray_address: str | None = None
    unit_rows: int = 10_000
    encoder_actors: int | None = None
    index_type: str = "IndexBinaryFlat"
    storage_options: dict[str, Any] = field(default_factory=dict)
    progress: bool = True

    def __post_init__(self):
        bad = [p for p in self.precisions if p not in PRECISIONS]
        if bad or not self.precisions:
            raise ValueError(f"unknown precision(s) {bad or self.precisions}: choose from {', '.join(PRECISIONS)}")
        if self.range_method not in ("minmax", "quantile"):
            raise ValueError(f"range method must be minmax or quantile, got {self.range_method!r}")
        low, high = self.quantiles
        if not 0.0 <= low < high <= 1.0:
            raise ValueError(f"quantiles must satisfy 0 <= low < high <= 1, got {self.quantiles}")
        if self.ranges is None and self.calibration_samples < 2:
            raise ValueError("calibration needs at least 2 samples (--calibration-samples)")
        if self.unit_rows < 1:
            raise ValueError(f"unit_rows must be >= 1, got {self.unit_rows}")
        if self.encoder_actors is not None and self.encoder_actors < 1:
            raise ValueError(f"encoder_actors must be >= 1, got {self.encoder_actors}")
        if not self.text_column:
            raise ValueError("text column must be named")
