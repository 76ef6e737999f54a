"""The ONNX encoder backend: a model's transformer exported once to a local cache, run by onnxruntime.

Only `workers/embedding/encoder.py` imports this module, and only for `backend="onnx"`, so
nothing else (inspect, vacuum, search of a torch version) needs onnx or onnxruntime.

Why not sentence-transformers' own `backend="onnx"`: it loads and exports through
`optimum.onnxruntime` (the `optimum-onnx` package), whose releases require a transformers
older than the one sentence-transformers 6 needs. So the transformer is exported here with
`torch.onnx.export`, and the loaded SentenceTransformer keeps everything else: its tokenizer,
its length-sorted batching, its pooling and normalisation. Only the transformer's forward pass
runs in onnxruntime, which is why the codes agree with the torch backend's (tests/test_onnx.py).
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np

# Part of the cache key: a change to how the graph is exported must not reuse older files.
EXPORT_RECIPE = 1
OPSET = 17
MISSING = ("the onnx encoder backend needs the packages onnx and onnxruntime: install them with "
           "pip install 'quantlake[onnx]', or use --backend torch")


def cache_root() -> Path:
    """Where exported models go: `QUANTLAKE_CACHE`, else `$XDG_CACHE_HOME/quantlake`, else
    `~/.cache/quantlake`. Never the model's own folder: an installed package or a shared
    Hugging Face cache is not ours to write, and a file added there would change the
    model's fingerprint."""
    if os.environ.get("QUANTLAKE_CACHE"):
        return Path(os.environ["QUANTLAKE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "quantlake"


def export_key(fingerprint: str) -> str:
    """The cache folder's name for a model: its fingerprint plus what decides the exported bytes
    (torch's and transformers' versions: the exporter and the traced modelling code; the opset;
    this module's recipe)."""
    import torch
    import transformers

    recipe = json.dumps({"torch": torch.__version__, "transformers": transformers.__version__, "opset": OPSET,
                         "recipe": EXPORT_RECIPE}, sort_keys=True)
    return f"{fingerprint.removeprefix('sha256:')[:32]}-{hashlib.sha256(recipe.encode()).hexdigest()[:12]}"


def _input_names(model) -> list[str]:
    """The tensors the model's tokenizer produces that its transformer takes, in a fixed order."""
    features = model[0].preprocess(["a", "b c"])
    accepted = model[0].model_forward_params
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in features]
    return [n for n in names if accepted is None or n in accepted]


def _check_supported(model) -> None:
    from sentence_transformers.base.modules.transformer import Transformer

    first = model[0] if len(model) else None
    text = getattr(first, "modality_config", {}).get("text", {}) if isinstance(first, Transformer) else {}
    if text.get("method") != "forward" or text.get("method_output_name") != "last_hidden_state":
        raise ValueError(f"the onnx backend runs models whose first module is a text transformer returning "
                         f"last_hidden_state; this model's is {first!r}: use --backend torch")


def _traceable(transformer, names: list[str]):
    """The transformer as a module of positional tensors (what the exporter traces), returning
    its token embeddings."""
    import torch

    class Traceable(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = transformer

        def forward(self, *tensors):
            return self.inner(**dict(zip(names, tensors))).last_hidden_state

    return Traceable().eval()


def export_onnx(model, fingerprint: str, root: Path | None = None) -> Path:
    """The ONNX file of `model`'s transformer, exported into the cache on first use.

    The same model, torch version and recipe give the same bytes, so concurrent actors (or
    nodes) that each export write identical files; each writes a private temporary and renames
    it into place, so a reader never sees half a file.

    Args:
        model: a loaded SentenceTransformer (on the CPU, fp32).
        fingerprint: the model folder's fingerprint (`model_fingerprint`), the cache key.
        root: the cache folder (default `cache_root()`).
    """
    _check_supported(model)
    folder = (root or cache_root()) / "onnx" / export_key(fingerprint)
    target = folder / "model.onnx"
    if target.is_file():
        return target
    try:
        import onnx  # noqa: F401 - torch's exporter needs it; fail with our message, not torch's
        import torch
    except ImportError:
        raise ImportError(MISSING) from None
    names = _input_names(model)
    # Two texts of different lengths: a padded batch, so the mask path is the one traced.
    sample = model[0].preprocess(["an example", "a slightly longer example sentence"])
    dynamic = {n: {0: "batch", 1: "tokens"} for n in [*names, "token_embeddings"]}
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"model.onnx.tmp-{uuid.uuid4().hex}"
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # The tracer warns about Python branches on shapes in the attention code; for an
            # encoder they take the same side for every batch (the agreement test encodes padded
            # batches of many lengths), and the warnings would only clutter the job's stderr.
            warnings.simplefilter("ignore")
            torch.onnx.export(_traceable(model[0].model, names), tuple(sample[n] for n in names), str(tmp),
                              input_names=names, output_names=["token_embeddings"], dynamic_axes=dynamic,
                              opset_version=OPSET, dynamo=False, do_constant_folding=True)
        with open(tmp, "rb+") as fd:
            os.fsync(fd.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def attach(model, onnx_path: Path, threads: int | None = None) -> None:
    """Make `model`'s transformer run `onnx_path` in onnxruntime (CPU); the tokenizer, pooling and
    normalisation stay the SentenceTransformer's own.

    Args:
        model: the SentenceTransformer the file was exported from.
        onnx_path: `export_onnx`'s file.
        threads: onnxruntime intra-op threads (None: onnxruntime's default, every core).
    """
    try:
        import onnxruntime as ort
    except ImportError:
        raise ImportError(MISSING) from None
    import torch

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    first = model[0]

    def forward(features: dict[str, Any], **kwargs) -> dict[str, Any]:
        feeds = {n: np.ascontiguousarray(features[n].cpu().numpy(), dtype=np.int64) for n in names}
        features[first.module_output_name] = torch.from_numpy(session.run(None, feeds)[0])
        return features

    # An instance attribute: nn.Module's __call__ looks `forward` up on the instance first.
    first.forward = forward
