"""The encoder's float types on one device: documents/s and int8 codes against fp32.

    python bench/float_types.py [--docs 2000] [--batch-size 64] [--device auto|cpu|cuda]
                                [--model DIR] [--types fp32,fp16x3,fp16,bf16] [--json PATH]

Builds N demo documents (docstrings of installed Python modules) and, in this one process
(no Ray: it needs torch, sentence-transformers and pyarrow only, so it runs as it is on a GPU
machine), times:
  - bare `SentenceTransformer.encode` of all N texts in fp32 and with the weights cast to
    fp16 (`model.half()`): the baselines issue 10 names;
  - the pipeline's own encoder (`Encoder`, length-sorted batches) at each `--types` float type.
Each is timed after one untimed warm-up batch. Then the int8 codes of each against fp32's, with
minmax ranges of the other half of the documents (as a calibration sample gives them).

Also the tokenizer alone (`preprocess` of the same length-sorted batches) on one thread and on
every core: how fast a device may encode before tokenizing, not the model, sets the pace. On
CUDA the encoder tokenizes the next batch while the device runs one (`prepare_ahead`); the run
"encoder fp16x3, inline" is the same encoder tokenizing between batches instead.

On the CPU, fp16x3 computes the same exact fp16 products as a GPU in fp32, so its codes are
the GPU's but its speed says nothing of a GPU's.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pyarrow.dataset as pads  # noqa: E402

from jobs.demo import DemoConfig  # noqa: E402
from jobs.demo import run as build_demo  # noqa: E402
from workers.embedding.encoder import Encoder, EncoderConfig, length_order, resolve_model  # noqa: E402
from workers.embedding.quantizer import quantize  # noqa: E402


def hardware(device: str) -> str:
    import torch

    cpu = f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}"
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        return f"{p.name} ({p.total_memory / 2**30:.0f} GiB), {cpu}, torch {torch.__version__}"
    return f"{cpu}, torch {torch.__version__}"


def timed(encode, texts: list[str], batch_size: int) -> tuple[float, np.ndarray]:
    """Seconds to encode `texts` after one untimed batch, and the float32 embeddings."""
    encode(texts[:batch_size])
    t0 = time.perf_counter()
    emb = np.asarray(encode(texts), dtype=np.float32)
    return time.perf_counter() - t0, emb


def tokenizer_parallelism(on: bool | None) -> None:
    """TOKENIZERS_PARALLELISM for the next run: unset (None: a plain process, whose tokenizer
    splits a batch over every core), or as a Ray worker has it (`false`; an encoder that
    prepares ahead turns it on itself)."""
    if on is None:
        os.environ.pop("TOKENIZERS_PARALLELISM", None)
    else:
        os.environ["TOKENIZERS_PARALLELISM"] = "true" if on else "false"


def tokenize_rate(model, texts: list[str], batch_size: int) -> float:
    """Documents/s of the model's `preprocess` over `encode`'s length-sorted batches."""
    order = length_order(texts)
    batches = [[texts[i] for i in order[s:s + batch_size]] for s in range(0, len(texts), batch_size)]
    model.preprocess(batches[0])
    t0 = time.perf_counter()
    for b in batches:
        model.preprocess(b)
    return len(texts) / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--docs", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--model", default=None, help="a model folder (default: the bundled all-MiniLM-L6-v2)")
    p.add_argument("--types", default="fp32,fp16x3,fp16,bf16", help="comma list of --precision values to time")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    a = p.parse_args()
    import torch
    from sentence_transformers import SentenceTransformer

    device = a.device if a.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(prefix="quantlake-bench-") as work:
        build_demo(DemoConfig(dest=work, docs=a.docs, files=1))
        texts = pads.dataset(work, format="parquet").to_table(columns=["text"])["text"].to_pylist()
    n, bs = len(texts), a.batch_size
    print(f"{n} documents, batch size {bs}, on {device}: {hardware(device)}", flush=True)

    model = SentenceTransformer(str(resolve_model(a.model)), device=device)
    runs: dict[str, tuple[float, np.ndarray]] = {}

    def bare(m):
        return lambda t: m.encode(t, batch_size=bs, normalize_embeddings=True, show_progress_bar=False)

    tokenizer_parallelism(False)
    one = tokenize_rate(model, texts, bs)
    tokenizer_parallelism(True)
    every = tokenize_rate(model, texts, bs)
    print(f"tokenize: {one:.0f} docs/s on one thread, {every:.0f} on {os.cpu_count()} cores", flush=True)

    tokenizer_parallelism(None)
    runs["bare fp32"] = timed(bare(model), texts, bs)
    for precision in a.types.split(","):
        tokenizer_parallelism(False)
        enc = Encoder(EncoderConfig(model=a.model, batch_size=bs, device=device, precision=precision))
        runs[f"encoder {precision}"] = timed(enc.encode, texts, bs)
        if enc.prepare_ahead and precision == "fp16x3":
            tokenizer_parallelism(False)
            inline = Encoder(EncoderConfig(model=a.model, batch_size=bs, device=device, precision=precision,
                                           prepare_ahead=False))
            runs[f"encoder {precision}, inline"] = timed(inline.encode, texts, bs)
    tokenizer_parallelism(None)
    runs["bare fp16 (half)"] = timed(bare(model.half()), texts, bs)  # last: it casts the shared weights

    fp32 = runs["bare fp32"][1]
    half = n // 2
    ranges = np.stack([fp32[half:].min(0), fp32[half:].max(0)])
    ref = quantize(fp32[:half], ranges, "int8").astype(np.int16)
    base = runs["bare fp16 (half)"][0]
    out = {"documents": n, "batch_size": bs, "device": device, "hardware": hardware(device),
           "tokenize_docs_per_s": {"one_thread": round(one, 1), "every_core": round(every, 1)}, "runs": {}}
    print(f"{'':24}{'docs/s':>10}{'vs bare fp16':>14}{'int8 = fp32':>13}{'within 1':>10}{'max change':>12}")
    for name, (seconds, emb) in runs.items():
        codes = quantize(emb[:half], ranges, "int8").astype(np.int16)
        row = {"docs_per_s": round(n / seconds, 1), "seconds": round(seconds, 3),
               "ratio_to_bare_fp16": round(base / seconds, 3),
               "int8_equal": float((codes == ref).mean()), "int8_within_one": float((np.abs(codes - ref) <= 1).mean()),
               "max_abs_change": float(np.abs(emb - fp32).max())}
        out["runs"][name] = row
        print(f"{name:24}{row['docs_per_s']:10.1f}{row['ratio_to_bare_fp16']:14.3f}{row['int8_equal']:13.4%}"
              f"{row['int8_within_one']:10.4%}{row['max_abs_change']:12.2e}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
