"""Work-unit planning without I/O: cut files into row ranges and name the shard each becomes."""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from ranges.encoding import canonical_json, sha256_hex
from workers.embedding.encoder import DEFAULT_BATCH_SIZE
from workers.ingest.config import IngestConfig
from workers.lake.records import Duplicate, ShardRecord, SourceFile, VersionManifest, WorkUnit
from workers.vocab import FLOAT16


def plan_units(cfg: IngestConfig, files: Sequence[SourceFile], rows_per_file: Sequence[int],
               row_groups: Sequence[Sequence[int] | None], duplicates: Mapping[int, Sequence[Duplicate]],
               fingerprint: str, ranges_id: str, marks: Sequence[Sequence] | None = None) -> list[WorkUnit]:
    """Split files into work units of at most `unit_rows` rows (Parquet: whole row groups), each
    named by the shard it becomes.

    Args:
        files, rows_per_file: the source files and the scan's row counts.
        row_groups: per file, its Parquet row group sizes (from `check_file`), or None.
        duplicates: per file index, the scan's duplicate-id rows.
        fingerprint, ranges_id: the model's and the ranges', part of every shard id.
        marks: per file, the scan's marks (`workers.ingest.source.Mark`, by row): a unit starts
            reading at the last one at or before its first row. Not part of its shard's name.
    """
    units = []
    for i, (f, n, groups) in enumerate(zip(files, rows_per_file, row_groups)):
        bounds = row_bounds(n, cfg.unit_rows, groups)
        file_marks = [(int(m[0]), int(m[1]), tuple(m[2])) for m in marks[i]] if marks else []
        mark_rows = [m[0] for m in file_marks]
        for a, b in zip(bounds, bounds[1:]):
            at = bisect.bisect_right(mark_rows, a)
            start = file_marks[at - 1] if at else None
            dups = tuple(d for d in duplicates.get(i, ()) if a <= d.row < b)
            # The duplicates decide which rows the shard holds (and its rejects' text), and they
            # depend on other files: they are part of the shard's name, so a rerun after the lake
            # changed cannot reuse a shard whose duplicates differ.
            sid = shard_id(f.relpath, f.identity(), a, b, fingerprint, ranges_id, cfg.precisions,
                           cfg.text_column, cfg.id_column, cfg.encoder.normalize, cfg.index_type,
                           [(d.row, d.first_file, d.first_row) for d in dups], cfg.encoder.precision,
                           cfg.encoder.batch_size, cfg.encoder.batch_order)
            units.append(WorkUnit(sid, f, a, b, dups, start))
    return units


def row_bounds(rows: int, unit_rows: int, row_groups: Sequence[int] | None = None) -> list[int]:
    """Cut points `[0, ..., rows]` of one file's work units, each of at most `unit_rows` rows.

    A Parquet file (`row_groups` given) is cut only on row-group bounds, so no two units read
    the same row group; a row group larger than `unit_rows` is a unit of its own.
    """
    bounds = [0]
    if row_groups is not None:
        offset = 0
        for g in row_groups:
            offset += g
            if offset - bounds[-1] >= unit_rows or offset == rows:
                bounds.append(offset)
    else:
        bounds += list(range(unit_rows, rows, unit_rows)) + [rows]
    return sorted(set(bounds + [rows]))


def shard_id(source_file: str, identity: dict[str, Any], row_start: int, row_stop: int,
             model_fingerprint: str, ranges_id: str, precisions: tuple[str, ...],
             text_column: str, id_column: str | None, normalize: bool, index_type: str,
             duplicates: Sequence[tuple[int, str, int]] = (), float_precision: str = "fp32",
             batch_size: int = DEFAULT_BATCH_SIZE, batch_order: str = "characters") -> str:
    """Deterministic name: a retry or rerun of the same work writes the same name and bytes.

    Args:
        duplicates: the unit's rows rejected as duplicate ids, as `(row, first occurrence's
            file, its row)`. They depend on other files (a file added before this one can
            take an id over), so they are part of what decides the shard's rows and rejects,
            hence of its name.
        float_precision: the encoder's float type (the job resolves `auto` before planning);
            fp16x3, fp16 and bf16 give other float bits than fp32, hence other shards.
        batch_size: the encoder's texts per forward pass: a text is padded to its batch's
            longest, and the padding changes the last bits of its floats (and now and then an
            int8 code), so a rerun at another batch size encodes again rather than reusing.
        batch_order: how the encoder cuts batches (`EncoderConfig.batch_order`): another cut,
            other padding, for the same reason.
    """
    key = {"file": source_file, "identity": identity, "rows": [row_start, row_stop],
           "model": model_fingerprint, "ranges": ranges_id, "precisions": sorted(precisions),
           "text_column": text_column, "id_column": id_column, "normalize": normalize,
           "index": index_type}
    if duplicates:
        # Only when there are some: a unit without duplicates keeps the name it had before
        # duplicates were part of the key, so reruns over existing datasets still reuse it.
        key["duplicates"] = sorted([int(r), str(f), int(fr)] for r, f, fr in duplicates)
    if float_precision != "fp32":
        # Likewise only then: fp32 shards keep the names they had before the field existed.
        # "autocast": how the encoder computes fp16 and bf16 (the model's weights cast to it
        # gave other bits, so shards from that time are never reused as these).
        key["float"] = f"{float_precision}/autocast" if float_precision in ("fp16", "bf16") else float_precision
    if batch_size != DEFAULT_BATCH_SIZE:
        # Likewise only then: shards at the default keep the names they had before.
        key["batch"] = int(batch_size)
    if batch_order != "characters":
        # Likewise: shards from before the choice, all cut by characters, keep their names.
        key["order"] = batch_order
    return sha256_hex(canonical_json(key))[:32]


@dataclass(frozen=True)
class Float16Source:
    """Shards that kept their float16 embeddings, all quantized with ranges `ranges_id`: a job
    with other ranges requantizes a unit from the shard of the same unit among them instead of
    encoding it (`quantlake reindex --recalibrate`)."""

    ranges_id: str
    shards: tuple[ShardRecord, ...]

    @classmethod
    def of(cls, version: VersionManifest) -> "Float16Source | None":
        """A version's shards, when the version keeps float16 (every shard of it then has the column)."""
        return cls(version.ranges.id, tuple(version.shards)) if FLOAT16 in version.precisions else None


def requantize_map(units: Sequence[WorkUnit], same_units: Sequence[WorkUnit],
                   source: Float16Source | None) -> dict[str, ShardRecord]:
    """Shard id -> the shard to requantize it from, for the units that have one.

    Args:
        units: the job's units (named with its ranges).
        same_units: the same units, in the same order, named with `source.ranges_id` (what
            `plan_units` gives with that ranges id): a shard id covers everything that decides
            a unit's rows and embeddings besides the ranges (file identity, rows, model,
            precisions, columns, normalisation, duplicates), so a source shard of that name
            holds exactly this unit's rows, encoded exactly as this job would encode them.
        source: the shards to requantize from (None: none).
    """
    if source is None:
        return {}
    if len(units) != len(same_units):
        raise ValueError(f"{len(units)} units against {len(same_units)} to match: plan both from the same scan")
    have = {s.id: s for s in source.shards}
    return {u.shard_id: have[o.shard_id] for u, o in zip(units, same_units) if o.shard_id in have}
