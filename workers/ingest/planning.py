"""Work-unit planning without I/O: cut files into row ranges and name the shard each becomes."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Sequence

from ranges.encoding import canonical_json, sha256_hex
from workers.ingest.config import IngestConfig
from workers.ingest.source import SourceFile


@dataclass(frozen=True)
class WorkUnit:
    """A work unit: rows [row_start, row_stop) of one source file."""

    file_index: int
    file: SourceFile
    row_start: int
    row_stop: int

    @property
    def rows(self) -> int:
        return self.row_stop - self.row_start


def plan_units(cfg: IngestConfig, files, rows_per_file: list[int],
               row_groups: list[list[int] | None]) -> list[WorkUnit]:
    """Split files into work units of at most `unit_rows` rows (Parquet: whole row groups).

    Args:
        rows_per_file: the scan's row counts.
        row_groups: per file, its Parquet row group sizes (from `check_file`), or None.
    """
    units = []
    for i, (f, n, groups) in enumerate(zip(files, rows_per_file, row_groups)):
        bounds = row_bounds(n, cfg.unit_rows, groups)
        units += [WorkUnit(i, f, a, b) for a, b in zip(bounds, bounds[1:])]
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


def unit_items(cfg: IngestConfig, units: list[WorkUnit], duplicates: dict[int, list], fingerprint: str,
               ranges_id: str) -> list[dict[str, Any]]:
    """The Ray Data rows of the main pass: one per unit, with its shard id and duplicate rows.

    Args:
        duplicates: per file index, `(row, first occurrence's file, its row)` of the scan.
        fingerprint, ranges_id: the model's and the ranges', part of every shard id.
    """
    items = []
    for u in units:
        dups = [d for d in duplicates.get(u.file_index, []) if u.row_start <= d[0] < u.row_stop]
        # The duplicates decide which rows the shard holds (and its rejects' text), and they
        # depend on other files: they are part of the shard's name, so a rerun after the lake
        # changed cannot reuse a shard whose duplicates differ.
        sid = shard_id(u.file.relpath, u.file.identity(), u.row_start, u.row_stop, fingerprint, ranges_id,
                       cfg.precisions, cfg.text_column, cfg.id_column, cfg.encoder.normalize, cfg.index_type,
                       dups)
        items.append({"unit": json.dumps({
            "shard_id": sid, "file": u.file.__dict__, "row_start": u.row_start, "row_stop": u.row_stop,
            "duplicates": dups})})
    return items


def shard_id(source_file: str, identity: dict[str, Any], row_start: int, row_stop: int,
             model_fingerprint: str, ranges_id: str, precisions: tuple[str, ...],
             text_column: str, id_column: str | None, normalize: bool, index_type: str,
             duplicates: Sequence[tuple[int, str, int]] = ()) -> str:
    """Deterministic name: a retry or rerun of the same work writes the same name and bytes.

    Args:
        duplicates: the unit's rows rejected as duplicate ids, as `(row, first occurrence's
            file, its row)`. They depend on other files (a file added before this one can
            take an id over), so they are part of what decides the shard's rows and rejects,
            hence of its name.
    """
    key = {"file": source_file, "identity": identity, "rows": [row_start, row_stop],
           "model": model_fingerprint, "ranges": ranges_id, "precisions": sorted(precisions),
           "text_column": text_column, "id_column": id_column, "normalize": normalize,
           "index": index_type}
    if duplicates:
        # Only when there are some: a unit without duplicates keeps the name it had before
        # duplicates were part of the key, so reruns over existing datasets still reuse it.
        key["duplicates"] = sorted([int(r), str(f), int(fr)] for r, f, fr in duplicates)
    return sha256_hex(canonical_json(key))[:32]
