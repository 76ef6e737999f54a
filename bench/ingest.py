"""Ingest throughput against bare `SentenceTransformer.encode`, measured in the same run.

    python bench/ingest.py [--docs 20000] [--work DIR] [--sources stdlib,numpy] [--no-onnx-ingest | --no-onnx]
                           [--batch-order tokens|characters]

Builds N demo documents (docstrings of installed Python modules), then:
  1. bare:     one process, `SentenceTransformer.encode` of all N texts (all cores; on a
     machine with CUDA, on the GPU, in fp32 and with the weights cast to fp16, the baseline
     issue 10's GPU target names, after one untimed warm-up batch);
  2. bare onnx: the same texts through the onnx backend (onnxruntime, all cores; the export
     to the cache, on first use, is not timed), and the share of int8 codes equal to torch's;
  3. calibrate + ingest end to end on a fresh local Ray (what `quantlake ingest` does, batches
     cut by token count unless --batch-order characters);
  4. ingest again with the saved ranges (the main pass alone: read, encode, quantize, write);
  5. calibrate + ingest end to end with `--backend onnx` (skipped with --no-onnx-ingest;
     --no-onnx skips steps 2 and 5).
Prints docs/s for each and three ratios: main pass / bare, end to end / bare, and calibration's
share of the end-to-end time (with the calibration sample's size and fidelity estimate).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import numpy as np  # noqa: E402
import pyarrow.dataset as pads  # noqa: E402

from jobs.demo import DemoConfig  # noqa: E402
from jobs.demo import run as build_demo  # noqa: E402
from jobs.ingest import run as ingest  # noqa: E402
from workers.ingest.config import IngestConfig  # noqa: E402
from workers.embedding.encoder import Encoder, EncoderConfig, resolve_model  # noqa: E402
from workers.embedding.quantizer import quantize  # noqa: E402
from workers.vocab import BATCH_ORDERS  # noqa: E402


def bare_encode(texts: list[str], batch_size: int, device: str = "cpu", half: bool = False
                ) -> tuple[float, np.ndarray]:
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(os.cpu_count() or 1)
    model = SentenceTransformer(str(resolve_model(None)), device=device)
    if half:
        model.half()
    if device != "cpu":  # the GPU's first batch pays for CUDA's start and kernel choices
        model.encode(texts[:batch_size], batch_size=batch_size, show_progress_bar=False)
    t0 = time.perf_counter()
    emb = model.encode(texts, batch_size=batch_size, normalize_embeddings=True, show_progress_bar=False)
    return time.perf_counter() - t0, emb


def bare_onnx_encode(texts: list[str], batch_size: int) -> tuple[float, np.ndarray]:
    """The onnx backend's encoder in this process (the same tokenizer, batching and pooling)."""
    encoder = Encoder(EncoderConfig(batch_size=batch_size, backend="onnx", threads=os.cpu_count() or 1))
    t0 = time.perf_counter()
    emb = encoder.encode(texts)
    return time.perf_counter() - t0, emb


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--docs", type=int, default=20_000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batch-order", choices=BATCH_ORDERS, default="tokens",
                   help="how the ingests cut batches (the bare encode is sentence-transformers' own order)")
    p.add_argument("--calibration-samples", type=int, default=None,
                   help="default: the ingest default, sized to the lake")
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--sources", default=None,
                   help="comma list of packages (or stdlib) to take docstrings from (default: the demo's)")
    p.add_argument("--no-onnx-ingest", action="store_true", help="skip step 5 (the onnx backend's ingest)")
    p.add_argument("--no-onnx", action="store_true", help="skip steps 2 and 5 (the onnx backend altogether)")
    a = p.parse_args()
    work = a.work or tempfile.mkdtemp(prefix="quantlake-bench-")
    lake = os.path.join(work, "lake")
    sources = {"sources": tuple(a.sources.split(","))} if a.sources else {}
    build_demo(DemoConfig(dest=lake, docs=a.docs, files=8, **sources))
    texts = pads.dataset(lake, format="parquet").to_table(columns=["text"])["text"].to_pylist()
    n = len(texts)
    print(f"{n} documents, {os.cpu_count()} CPU cores, batch size {a.batch_size}, ingest batches cut by "
          f"{a.batch_order}", flush=True)

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    bare_s, emb = bare_encode(texts, a.batch_size, device)
    print(f"bare encode:         {n / bare_s:8.1f} docs/s  ({bare_s:.1f} s, {device})", flush=True)
    fp16_s = None
    if device == "cuda":
        fp16_s, _ = bare_encode(texts, a.batch_size, device, half=True)
        print(f"bare encode, fp16:   {n / fp16_s:8.1f} docs/s  ({fp16_s:.1f} s, {torch.cuda.get_device_name(0)}; "
              f"the pipeline encodes in fp16x3)", flush=True)
    if not a.no_onnx:
        onnx_s, onnx_emb = bare_onnx_encode(texts, a.batch_size)
        ranges_mm = np.stack([emb.min(0), emb.max(0)])
        agree = float((quantize(onnx_emb, ranges_mm, "int8") == quantize(emb, ranges_mm, "int8")).mean())
        print(f"bare encode, onnx:   {n / onnx_s:8.1f} docs/s  ({onnx_s:.1f} s); ratio onnx / torch "
              f"{bare_s / onnx_s:.3f}; int8 codes equal to torch's (min-max ranges): {agree:.4%}", flush=True)

    enc = EncoderConfig(batch_size=a.batch_size, batch_order=a.batch_order)
    dest = os.path.join(work, "emb")
    t0 = time.perf_counter()
    first = ingest(IngestConfig(lake, dest, id_column="id", encoder=enc, progress=False,
                                calibration_samples=a.calibration_samples))
    full_s = time.perf_counter() - t0
    ranges = os.path.join(dest, "ranges", first.summary["ranges_id"] + ".json")
    t0 = time.perf_counter()
    ingest(IngestConfig(lake, os.path.join(work, "emb2"), id_column="id", encoder=enc, progress=False,
                        ranges=ranges))
    main_s = time.perf_counter() - t0
    cal = first.summary["calibrate_s"]
    with open(ranges) as f:
        size = json.load(f)["sample_size"]
    fid = first.summary.get("fidelity") or {}
    print(f"ingest, end to end:  {n / full_s:8.1f} docs/s  ({full_s:.1f} s, of which calibration "
          f"{cal:.1f} s on {size} sampled documents)")
    print(f"ingest, main pass:   {n / main_s:8.1f} docs/s  ({main_s:.1f} s, saved ranges)")
    print(f"ratio main pass / bare encode:   {bare_s / main_s:.3f}  (target >= 0.85)")
    print(f"ratio end to end / bare encode:  {bare_s / full_s:.3f}  (target >= 0.85 at 20,000 documents)")
    if fp16_s is not None:
        print(f"ratio main pass / bare fp16 encode: {fp16_s / main_s:.3f}  (target >= 0.9 on one GPU)")
    print(f"calibration share of end to end: {cal / full_s:.3f}  ({size} of {n} documents encoded twice)")
    if fid:
        print(f"fidelity on {fid['queries']} held-out sample queries: recall@{fid['k']} int8 "
              f"{fid['recall_int8']:.4f}, ubinary + int8 rescoring {fid['recall_ubinary_int8']:.4f}")
    if not (a.no_onnx_ingest or a.no_onnx):
        t0 = time.perf_counter()
        ingest(IngestConfig(lake, os.path.join(work, "emb-onnx"), id_column="id", progress=False,
                            encoder=EncoderConfig(batch_size=a.batch_size, backend="onnx",
                                                  batch_order=a.batch_order),
                            calibration_samples=a.calibration_samples))
        onnx_full_s = time.perf_counter() - t0
        print(f"ingest end to end, onnx: {n / onnx_full_s:8.1f} docs/s  ({onnx_full_s:.1f} s); "
              f"ratio onnx / torch end to end {full_s / onnx_full_s:.3f}")
    if not a.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
