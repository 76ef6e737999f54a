"""The scan pass over a source file: id digests for duplicate detection, the calibration sample."""
from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from ranges.encoding import canonical_json, sha256_hex
from workers.ingest.source import Rows
from workers.lake.records import SourceFile

DIGEST = np.dtype([("h1", "<u8"), ("h2", "<u8")])
ENTRY = np.dtype([("h1", "<u8"), ("h2", "<u8"), ("file", "<i4"), ("row", "<i8")])
DUPLICATE = np.dtype([("file", "<i4"), ("row", "<i8"), ("first_file", "<i4"), ("first_row", "<i8")])
_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)
# A file's kept scan (`scans/<id>.npy` in the dataset): the digests of its valid rows' ids and
# their row numbers, in row order. What the scan finds depends on the file's bytes and the
# columns read alone, so a later job over the same file reads this instead of the file
# (docs/formats.md, "Kept scans"). SCAN_FORMAT is part of every scan id: a change to what a
# scan counts as valid, to this layout, or to the marks its record keeps (where a JSON Lines
# file's segments start, `source.JSONL_SEGMENT`, and the types each is read with) must change
# it, so no older scan is taken for one.
SCAN_FORMAT = "quantlake.scan/1"
KEPT = np.dtype([("h1", "<u8"), ("h2", "<u8"), ("row", "<i8")])

# The default calibration sample, sized to the lake: a twentieth of its valid rows, at least
# SAMPLE_FLOOR and at most SAMPLE_CAP. Measured (README, Benchmarks: `bench/calibration.py`):
# ranges from 1,000 sampled rows of 3,000 lose 0.002 of recall against ranges from all 3,000
# (500 rows lose 0.01), while the old fixed 10,000 encoded half of a 20,000-row lake twice. A
# twentieth keeps that second encoding to 5% of the lake past the floor.
SAMPLE_CAP = 10_000
SAMPLE_FLOOR = 1_000
SAMPLE_SHARE = 20


def sample_size(requested: int | None, valid_rows: int) -> int:
    """Rows to calibrate on: `requested`, else `min(SAMPLE_CAP, max(SAMPLE_FLOOR, valid_rows // SAMPLE_SHARE))`
    (never more than the lake holds: the sample is then the whole lake)."""
    if requested is not None:
        return requested
    return min(SAMPLE_CAP, max(SAMPLE_FLOOR, valid_rows // SAMPLE_SHARE))


def id_digests(ids: list[str]) -> np.ndarray:
    """128-bit digests of ids: collisions are out of reach (p ~ n^2 / 2^129)."""
    raw = b"".join(hashlib.blake2b(i.encode("utf-8"), digest_size=16).digest() for i in ids)
    return np.frombuffer(raw, dtype=DIGEST).copy()


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def sample_keys(digests: np.ndarray, seed: int) -> np.ndarray:
    """Seeded pseudo-random key per row, a function of the row's id alone.

    The sample is the rows with the smallest keys, so it does not depend on file order,
    batching or the number of workers; another seed gives an independent sample.
    """
    s = _splitmix64(np.array([seed], dtype=np.uint64) & _M64)
    return _splitmix64(digests["h1"] ^ s ^ _splitmix64(digests["h2"]))


@dataclass
class Sample:
    """Bottom-k of (key, id, text): merging two samples gives the sample of the union."""

    k: int
    keys: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    ids: list = field(default_factory=list)
    texts: list = field(default_factory=list)

    def add(self, keys: np.ndarray, ids: list, texts: list) -> None:
        keys = np.concatenate([self.keys, keys])
        ids, texts = self.ids + list(ids), self.texts + list(texts)
        # Sort by (key, id): ties and duplicate ids resolve the same way in any merge order.
        order = sorted(range(len(keys)), key=lambda i: (int(keys[i]), ids[i]))
        seen, keep = set(), []
        for i in order:
            if ids[i] in seen:
                continue
            seen.add(ids[i])
            keep.append(i)
            if len(keep) == self.k:
                break
        self.keys = keys[keep]
        self.ids = [ids[i] for i in keep]
        self.texts = [texts[i] for i in keep]

    def first(self, k: int) -> "Sample":
        """The bottom-`k` of this sample: the sample a scan with `k` would have given."""
        return Sample(k, self.keys[:k], self.ids[:k], self.texts[:k])

    def merge(self, other: "Sample") -> "Sample":
        out = Sample(self.k, self.keys, list(self.ids), list(self.texts))
        out.add(other.keys, other.ids, other.texts)
        return out


@dataclass
class FileScan:
    """What scanning one file gives: row counts, dedupe entries by partition, sample."""

    rows: int
    valid: int
    parts: list  # of ENTRY arrays, one per partition
    sample: Sample


def scan_rows(batches: list[Rows] | object, file_index: int, n_parts: int, seed: int, k: int) -> FileScan:
    """Scan classified batches of one file.

    Args:
        batches: iterable of `Rows` from `workers.ingest.source.classify`.
        file_index: index of the file in the sorted listing (orders first occurrences).
        n_parts: number of hash partitions the dedupe entries are split into.
        seed: calibration sampling seed.
        k: calibration sample size.
    """
    rows = valid = 0
    chunks: list[np.ndarray] = []
    sample = Sample(k)
    for b in batches:
        rows += len(b.ids)
        ok = [i for i, r in enumerate(b.reason) if r is None]
        valid += len(ok)
        if not ok:
            continue
        ids = [b.ids[i] for i in ok]
        d = id_digests(ids)
        e = np.empty(len(ok), ENTRY)
        e["h1"], e["h2"], e["file"], e["row"] = d["h1"], d["h2"], file_index, b.row[ok]
        chunks.append(e)
        if k > 0:
            keys = sample_keys(d, seed)
            # Pre-select this batch's k smallest before the exact (key, id) merge.
            top = np.argsort(keys, kind="stable")[:k]
            sample.add(keys[top], [ids[i] for i in top], [b.texts[ok[i]] for i in top])
    entries = np.concatenate(chunks) if chunks else np.zeros(0, ENTRY)
    return FileScan(rows, valid, partition(entries, n_parts), sample)


def partition(entries: np.ndarray, n_parts: int) -> list[np.ndarray]:
    """ENTRY rows split into the `n_parts` hash partitions of the dedupe shuffle."""
    part = entries["h1"] % np.uint64(n_parts)
    return [entries[part == p] for p in range(n_parts)]


def scan_id(relpath: str, identity: Mapping[str, Any], text_column: str, id_column: str | None) -> str:
    """The name of a file's kept scan: everything that decides what scanning it finds."""
    return sha256_hex(canonical_json({"format": SCAN_FORMAT, "file": relpath, "identity": dict(identity),
                                      "text_column": text_column, "id_column": id_column}))[:32]


def scan_path(f: SourceFile, text_column: str, id_column: str | None) -> str:
    """Where a job keeps `f`'s scan, under the dataset root: `scans/<scan id>.npy`."""
    return f"scans/{scan_id(f.relpath, f.identity(), text_column, id_column)}.npy"


def kept_bytes(s: FileScan) -> bytes:
    """A scan's valid rows as the bytes of its kept scan: digests and rows in row order, so
    the bytes do not depend on how many partitions the job split them into."""
    e = np.concatenate(s.parts) if s.parts else np.zeros(0, ENTRY)
    e = e[np.argsort(e["row"], kind="stable")]
    out = np.empty(len(e), KEPT)
    out["h1"], out["h2"], out["row"] = e["h1"], e["h2"], e["row"]
    buf = io.BytesIO()
    np.save(buf, out, allow_pickle=False)
    return buf.getvalue()


def from_kept(data: bytes, rows: int, valid: int, file_index: int, n_parts: int) -> FileScan:
    """The scan a file's kept scan stands for (no sample: a job that calibrates reads the file).

    Raises ValueError when the bytes are not a kept scan of `valid` rows, in increasing row
    order, below `rows` (the caller has checked their sha256 against the version's record).
    """
    try:
        a = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ValueError(f"not a kept scan ({exc})") from None
    if a.dtype != KEPT or a.ndim != 1:
        raise ValueError(f"a kept scan holds {a.dtype} x {a.shape}, expected {KEPT} rows")
    if len(a) != valid or valid > rows:
        raise ValueError(f"a kept scan of {len(a)} rows, its record says {valid} valid of {rows}")
    r = a["row"]
    if len(r) and (r[0] < 0 or r[-1] >= rows or bool(np.any(r[1:] <= r[:-1]))):
        raise ValueError(f"a kept scan's rows are not increasing within [0, {rows})")
    e = np.empty(len(a), ENTRY)
    e["h1"], e["h2"], e["file"], e["row"] = a["h1"], a["h2"], file_index, r
    return FileScan(rows, valid, partition(e, n_parts), Sample(0))


def find_duplicates(*parts: np.ndarray) -> np.ndarray:
    """Rows whose id occurred earlier (by file index, then row): DUPLICATE entries."""
    e = np.concatenate(parts) if parts else np.zeros(0, ENTRY)
    if len(e) == 0:
        return np.zeros(0, DUPLICATE)
    # Only entries whose first digest half occurs twice can be duplicates, and they are rare:
    # one sort of that half finds them, and only they go through the four-key sort (together
    # 2.6x faster than sorting every entry by four keys, measured on 2M entries).
    order = np.argsort(e["h1"])
    h = e["h1"][order]
    repeated = np.flatnonzero(h[1:] == h[:-1])
    if len(repeated) == 0:
        return np.zeros(0, DUPLICATE)
    e = e[order[np.union1d(repeated, repeated + 1)]]
    e = e[np.lexsort((e["row"], e["file"], e["h2"], e["h1"]))]
    same = (e["h1"][1:] == e["h1"][:-1]) & (e["h2"][1:] == e["h2"][:-1])
    dup = np.flatnonzero(same) + 1
    # Index of each entry's group head: the first occurrence.
    head = np.maximum.accumulate(np.where(np.concatenate([[True], ~same]), np.arange(len(e)), 0))
    out = np.empty(len(dup), DUPLICATE)
    out["file"], out["row"] = e["file"][dup], e["row"][dup]
    out["first_file"], out["first_row"] = e["file"][head[dup]], e["row"][head[dup]]
    return out
