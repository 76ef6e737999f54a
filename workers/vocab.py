"""The project's vocabularies: one Literal per kind of name, the tuple of its values, one check.

Configs type their fields with these Literals, argparse takes its `choices` from the tuples,
and `check` is the one place an unknown value is refused.
"""
from __future__ import annotations

import operator
from typing import Literal, get_args

from ranges.manifest import RANGE_METHODS, RangeMethod  # noqa: F401 - defined with the range manifest

# What the quantizer makes (sentence-transformers' precisions), and what a shard can store: those
# plus `float16`, the embeddings themselves at half width, kept so that shards can be requantized
# under new ranges without running the model again (docs/formats.md, "Shard Parquet").
QuantizedPrecision = Literal["int8", "uint8", "binary", "ubinary"]
FLOAT16 = "float16"
Precision = Literal["int8", "uint8", "binary", "ubinary", "float16"]
# FAISS class names, as manifests store them; the CLI spells them `flat|hnsw|ivf` (INDEX_FLAGS).
IndexType = Literal["IndexBinaryFlat", "IndexBinaryHNSW", "IndexBinaryIVF"]
RescoreMode = Literal["int8", "int8-raw", "bits", "none"]
CandidateMode = Literal["asymmetric", "hamming"]
SearchIndex = Literal["binary", "int8"]
SearchBackend = Literal["threads", "ray"]
Device = Literal["auto", "cpu", "cuda"]
# The encoder model's float type; `auto` is fp16x3 on CUDA, fp32 on the CPU.
FloatPrecision = Literal["auto", "fp32", "fp16x3", "fp16", "bf16"]
# What runs the model's transformer: torch, or onnxruntime on CPUs (workers/embedding/onnx_backend.py).
Backend = Literal["torch", "onnx"]
# How an encoder cuts a unit's texts into batches: by token count (a window of texts tokenized
# once, so a batch pads less), or by characters, as `SentenceTransformer.encode` sorts (versions written
# before the choice existed). Part of the float bits, hence of a shard's name.
BatchOrder = Literal["tokens", "characters"]
# The types a JSON Lines column may be read with, by Arrow's names (`str(pyarrow type)`): a mark
# where a large file's units start reading records them (`workers.ingest.source.Mark`).
MarkType = Literal["string", "int64", "uint64", "double", "bool"]

QUANTIZED_PRECISIONS: tuple[str, ...] = get_args(QuantizedPrecision)
PRECISIONS: tuple[str, ...] = get_args(Precision)
INDEX_TYPES: tuple[str, ...] = get_args(IndexType)
RESCORE_MODES: tuple[str, ...] = get_args(RescoreMode)
CANDIDATE_MODES: tuple[str, ...] = get_args(CandidateMode)
SEARCH_INDEXES: tuple[str, ...] = get_args(SearchIndex)
SEARCH_BACKENDS: tuple[str, ...] = get_args(SearchBackend)
DEVICES: tuple[str, ...] = get_args(Device)
FLOAT_PRECISIONS: tuple[str, ...] = get_args(FloatPrecision)
BACKENDS: tuple[str, ...] = get_args(Backend)
BATCH_ORDERS: tuple[str, ...] = get_args(BatchOrder)
MARK_TYPES: tuple[str, ...] = get_args(MarkType)

# The one mapping between the CLI's index names and the manifest's.
INDEX_FLAGS: dict[str, str] = {"flat": "IndexBinaryFlat", "hnsw": "IndexBinaryHNSW", "ivf": "IndexBinaryIVF"}
# The one mapping between a backend and the suffix it adds to the model fingerprint a dataset
# records (`workers/embedding/encoder.encoder_fingerprint`). torch adds none, so every dataset
# written before backends existed keeps its fingerprint, and its shards their ids.
FINGERPRINT_SUFFIX: dict[str, str] = {"torch": "", "onnx": "+onnx"}


def backend_of(fingerprint: str) -> str:
    """The backend a recorded model fingerprint names (`FINGERPRINT_SUFFIX`)."""
    return "onnx" if fingerprint.endswith(FINGERPRINT_SUFFIX["onnx"]) else "torch"


def check(value: object, allowed: tuple[str, ...], what: str) -> str:
    """`value` if it is one of `allowed`, else a ValueError naming `what`, the value and the choices."""
    if value not in allowed:
        raise ValueError(f"{what} must be one of {', '.join(allowed)}, got {value!r}")
    return value  # type: ignore[return-value]


def whole_number(value: object, name: str) -> int:
    """`value` as a Python int: an int or a numpy integer (the API's callers pass them); a bool, a
    float or a string is refused, naming `name`."""
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(f"{name} must be a whole number, got {value!r}")
    return operator.index(value)
