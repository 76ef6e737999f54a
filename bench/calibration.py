"""Recall against the calibration sample's size: how small a sample keeps the ranges as good.

    python bench/calibration.py [--docs 3000] [--lake DIR] [--sizes 100,250,500,1000,2000]

Encodes N demo documents once (or the texts of an existing Parquet lake), then for each sample
size takes the sample `quantlake ingest` would take (the rows of smallest seeded key), makes
minmax ranges of it, and measures the fidelity estimate (`workers/search/fidelity.py`) of those
ranges on all N documents: recall of float32's top 10 for int8 and for the default search, on
the same 200 held-out queries each time. The last row uses every document as the sample.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pyarrow.dataset as pads  # noqa: E402

from jobs.demo import DemoConfig  # noqa: E402
from jobs.demo import run as build_demo  # noqa: E402
from workers.embedding.encoder import Encoder, EncoderConfig  # noqa: E402
from workers.ingest.scan import id_digests, sample_keys  # noqa: E402
from workers.search.fidelity import fidelity  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--docs", type=int, default=3000)
    p.add_argument("--lake", default=None, help="a Parquet lake with id and text columns (default: build one)")
    p.add_argument("--sizes", default="100,250,500,1000,2000")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    lake = a.lake or os.path.join(tempfile.mkdtemp(prefix="quantlake-cal-"), "lake")
    if not a.lake:
        build_demo(DemoConfig(dest=lake, docs=a.docs, files=8))
    t = pads.dataset(lake, format="parquet").to_table(columns=["id", "text"])
    ids, texts = t["id"].to_pylist(), t["text"].to_pylist()
    emb = Encoder(EncoderConfig(threads=os.cpu_count())).encode(texts)
    order = np.lexsort((np.array(ids, object).astype(str), sample_keys(id_digests(ids), a.seed)))
    print(f"{len(ids)} documents; recall of float32's top 10 on all of them, 200 held-out queries")
    print("sample size | recall int8 | recall ubinary + int8 (default search)")
    for size in [int(s) for s in a.sizes.split(",") if int(s) < len(ids)] + [len(ids)]:
        s = emb[order[:size]]
        ranges = np.stack([s.min(axis=0), s.max(axis=0)]).astype(np.float32)
        f = fidelity(emb, ranges, a.seed)
        print(f"{size:11d} | {f['recall_int8']:.4f}      | {f['recall_ubinary_int8']:.4f}", flush=True)


if __name__ == "__main__":
    main()
