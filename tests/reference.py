"""Brute-force search references in plain numpy, from a version's stored columns (tests only).

The math is `workers/search/rescore.py`'s, written out again over all rows at once, so a search can be
checked against it without running the code under test: Hamming candidates over every row laid
end to end (ties by shard, then row), optionally narrowed by the float query against the sign
bits times each row's stored scale (asymmetric; 1 for every row unless every shard's record says
`ubinary_scale`), then rescored.
"""
from __future__ import annotations

import functools
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ranges.manifest import RangeManifest
from workers.lake.storage import url_to_fs

ASYMMETRIC_POOL = 4  # the searcher's documented pool width: 4 x k x multiplier Hamming candidates


class Stored:
    """A committed version's rows, read with fsspec and Parquet directly (no checksum reader)."""

    def __init__(self, url: str, version: int | None = None, storage_options=None):
        fs, root = url_to_fs(url, storage_options)
        if version is None:
            version = max(int(p.rsplit("/", 1)[-1][:8]) for p in fs.glob(f"{root}/versions/*.json"))
        self.manifest = json.loads(fs.cat_file(f"{root}/versions/{version:08d}.json"))
        self.ranges = RangeManifest.from_json(fs.cat_file(f"{root}/{self.manifest['ranges']['path']}")).ranges
        tables = [pq.read_table(pa.BufferReader(fs.cat_file(f"{root}/{s['path']}")))
                  for s in self.manifest["shards"]]
        # The sign-bit scale per row, as stored (float32), when every shard has them; else 1 for all.
        scaled = all(s.get("ubinary_scale", False) for s in self.manifest["shards"])
        self.scales = np.concatenate([np.ones(0)] + [
            t["ubinary_scale"].to_numpy().astype(np.float64) if scaled else np.ones(t.num_rows) for t in tables])
        table = pa.concat_tables([t.select([c for c in t.column_names if c != "ubinary_scale"]) for t in tables])
        self.ids = table["id"].to_pylist()
        self.shard = [s["id"] for s in self.manifest["shards"] for _ in range(s["rows"])]
        self.codes = np.array(table["int8"].to_pylist(), np.float64) if "int8" in table.column_names else None
        packed = np.frombuffer(b"".join(table["ubinary"].to_pylist()), np.uint8).reshape(len(table), -1)
        self.bits = np.unpackbits(packed, axis=1)[:, :self.ranges.shape[1]]

    def centres(self) -> np.ndarray:
        """Each int8 code's bucket centre: `min + (code + 128.5) * (max - min) / 255` (computed once)."""
        if getattr(self, "_centres", None) is None:
            lo, hi = self.ranges.astype(np.float64)
            self._centres = lo + (self.codes + 128.5) * ((hi - lo) / 255)
        return self._centres

    def search(self, q: np.ndarray, k: int, multiplier: int = 6, candidates: str = "asymmetric",
               rescore: str = "int8") -> list[list[tuple[str, float]]]:
        """Per query, the top `k` `(id, score)` of the binary-index search with these options."""
        dim = self.bits.shape[1]
        signs = self.bits * 2.0 - 1
        n = k * multiplier
        out = []
        for qi in np.asarray(q, np.float64):
            hamming = (self.bits != (qi > 0)).sum(axis=1)
            order = np.lexsort((np.arange(len(self.ids)), hamming))
            bit_scores = signs @ qi / np.sqrt(dim) * self.scales
            if candidates == "asymmetric":
                pool = order[:n * ASYMMETRIC_POOL]
                cand = pool[np.argsort(-bit_scores[pool], kind="stable")[:n]]
            else:
                cand = order[:n]
            if rescore == "int8":
                scores = self.centres()[cand] @ qi
            elif rescore == "int8-raw":
                scores = self.codes[cand] @ qi
            elif rescore == "bits" or (rescore == "none" and candidates == "asymmetric"):
                scores = bit_scores[cand]  # asymmetric candidates are already in bit-score order
            else:
                scores = 1 - 2 * hamming[cand] / dim
            best = np.argsort(-scores, kind="stable")[:k]
            out.append([(self.ids[cand[i]], float(scores[i])) for i in best])
        return out

    def exhaustive_int8(self, q: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        """Per query, the top `k` of every row scored against its int8 bucket centres."""
        scores = np.asarray(q, np.float64) @ self.centres().T
        return [[(self.ids[i], float(s[i])) for i in np.argsort(-s, kind="stable")[:k]] for s in scores]


@functools.lru_cache(maxsize=1)
def _model():
    from sentence_transformers import SentenceTransformer

    from workers.embedding.encoder import resolve_model

    return SentenceTransformer(str(resolve_model(None)), device="cpu")


def query_vectors(texts: list[str], normalize: bool = True) -> np.ndarray:
    """The queries' float32 embeddings as a search encodes them: one list, batches of 64."""
    return _model().encode(list(texts), batch_size=64, normalize_embeddings=normalize, convert_to_numpy=True)


def assert_same_hits(got: list[dict], want: list[tuple[str, float]], tol: float = 1e-5) -> None:
    """JSON hits (`{"id", "score", ...}`) equal a reference: same ids in order, scores within `tol`."""
    assert [h["id"] for h in got] == [i for i, _ in want], (got, want)
    np.testing.assert_allclose([h["score"] for h in got], [s for _, s in want], rtol=tol, atol=tol)
