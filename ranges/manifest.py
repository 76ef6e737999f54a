"""The range manifest: calibration ranges plus provenance, identified by a content hash."""
from __future__ import annotations

import base64
import datetime as dt
import json
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import numpy as np

from ranges.encoding import canonical_json, pretty_json, sha256_hex

FORMAT = "quantlake.ranges/1"
RangeMethod = Literal["minmax", "quantile"]
RANGE_METHODS: tuple[str, ...] = get_args(RangeMethod)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class RangeManifest:
    """Per-dimension `[min; max]` ranges and how they were made."""

    ranges: np.ndarray  # (2, dim) float32
    model_name: str
    model_fingerprint: str
    normalize: bool
    method: str
    quantiles: tuple[float, float] | None
    sample_size: int
    seed: int
    created_at: str = field(default_factory=_now)
    # The fidelity estimate measured at calibration (`workers/search/fidelity.py`), or None (not
    # measured, or a manifest written before it existed). A report about the ranges, not part of
    # what they are: like `created_at`, outside the id, so equal ranges keep one id either way.
    fidelity: dict[str, Any] | None = None

    def __post_init__(self):
        r = self.ranges
        if not isinstance(r, np.ndarray) or r.dtype != np.float32 or r.ndim != 2 or r.shape[0] != 2:
            raise ValueError(f"ranges must be a (2, dim) float32 array, got {getattr(r, 'shape', r)}")
        if not np.isfinite(r).all():
            raise ValueError("ranges contain NaN or infinity")
        if (r[0] > r[1]).any():
            raise ValueError("ranges have a minimum above the maximum")
        # Quantizing and rescoring divide by the float32 step (max - min) / 255: finite bounds
        # like ±3e38 still overflow it to infinity, which turns every score into NaN.
        with np.errstate(over="ignore", invalid="ignore"):
            width = r[1] - r[0]
            wide = np.flatnonzero(~np.isfinite(width) | ~np.isfinite(width / np.float32(255)))
        if len(wide):
            d = int(wide[0])
            raise ValueError(f"ranges of dimension {d} ([{float(r[0, d]):g}; {float(r[1, d]):g}]) and "
                             f"{len(wide) - 1} other(s) are wider than float32 can hold: these are no "
                             "embedding value ranges; recalibrate")
        if self.method not in RANGE_METHODS:
            raise ValueError(f"unknown range method {self.method!r}")
        if self.fidelity is not None:
            check_fidelity(self.fidelity)

    @property
    def dim(self) -> int:
        return int(self.ranges.shape[1])

    def _content(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "model": {"name": self.model_name, "fingerprint": self.model_fingerprint},
            "dim": self.dim,
            "normalize": self.normalize,
            "method": self.method,
            "quantiles": list(self.quantiles) if self.quantiles is not None else None,
            "sample_size": self.sample_size,
            "seed": self.seed,
            "ranges": {
                "dtype": "<f4",
                "shape": [2, self.dim],
                "base64": base64.b64encode(self.ranges.astype("<f4").tobytes()).decode(),
            },
        }

    def check_for(self, model_fingerprint: str, *, model_name: str = "", normalize: bool | None = None,
                  dim: int | None = None, where: str = "range manifest") -> None:
        """Raise ValueError unless these ranges were made by that model (with that normalisation
        and dimension, where given): the one check that corpus and queries share a vector space.

        Args:
            model_fingerprint, model_name: the model that will use the ranges (the name only for
                the message).
            normalize, dim: what it will be used with; None: not checked.
            where: how the message names these ranges.
        """
        if self.model_fingerprint != model_fingerprint or (dim is not None and self.dim != dim):
            want = f"{dim}-d " if dim is not None else ""
            raise ValueError(f"{where} holds {self.dim}-d ranges made with model {self.model_name} "
                             f"({self.model_fingerprint}), not {want}{model_name or 'the model'} "
                             f"({model_fingerprint}); calibrate anew for this model")
        if normalize is not None and self.normalize != normalize:
            raise ValueError(f"{where} was made with normalize={self.normalize}, this job encodes with "
                             f"normalize={normalize}; calibrate anew (or match --no-normalize)")

    @property
    def id(self) -> str:
        """Content hash: equal ranges made the same way have the same id, whenever made."""
        return sha256_hex(canonical_json(self._content()))

    def to_json(self) -> bytes:
        extra = {"fidelity": self.fidelity} if self.fidelity is not None else {}
        return pretty_json({**self._content(), "id": self.id, "created_at": self.created_at, **extra})

    @classmethod
    def from_json(cls, data: bytes | str, where: str = "range manifest") -> "RangeManifest":
        try:
            doc = json.loads(data)
            if not isinstance(doc, dict):
                raise ValueError(f"expected a JSON object, got {type(doc).__name__}")
            if doc.get("format") != FORMAT:
                raise ValueError(f"format is {doc.get('format')!r}, expected {FORMAT!r}")
            spec = doc["ranges"]
            if spec["dtype"] != "<f4" or len(spec["shape"]) != 2 or spec["shape"][0] != 2:
                raise ValueError(f"unsupported ranges encoding {spec['dtype']} {spec['shape']}")
            raw = base64.b64decode(spec["base64"], validate=True)
            ranges = np.frombuffer(raw, dtype="<f4").reshape(spec["shape"]).astype(np.float32)
            q = doc.get("quantiles")
            manifest = cls(
                ranges=ranges,
                model_name=doc["model"]["name"],
                model_fingerprint=doc["model"]["fingerprint"],
                normalize=bool(doc["normalize"]),
                method=doc["method"],
                quantiles=tuple(q) if q is not None else None,
                sample_size=int(doc["sample_size"]),
                seed=int(doc["seed"]),
                created_at=doc.get("created_at", ""),
                fidelity=doc.get("fidelity"),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"invalid {where}: {exc}") from exc
        except RecursionError:  # JSON nested deeper than the parser's stack
            raise ValueError(f"invalid {where}: JSON nested too deeply to read") from None
        if doc.get("id") != manifest.id:
            raise ValueError(f"invalid {where}: stored id {doc.get('id')!r} does not match its "
                             f"content ({manifest.id}); the file was altered or corrupted")
        return manifest



FIDELITY_FIELDS = ("queries", "k", "recall_int8", "recall_ubinary_int8")


def check_fidelity(f: Any) -> None:
    """Raise ValueError unless `f` is a fidelity estimate: positive `queries` and `k`, recalls in [0, 1]."""
    if not isinstance(f, dict) or set(f) != set(FIDELITY_FIELDS):
        raise ValueError(f"fidelity must be an object with fields {', '.join(FIDELITY_FIELDS)}, got {f!r}")
    counts_ok = all(isinstance(f[n], int) and not isinstance(f[n], bool) and f[n] >= 1 for n in ("queries", "k"))
    recalls_ok = all(isinstance(f[n], (int, float)) and not isinstance(f[n], bool) and 0.0 <= f[n] <= 1.0
                     for n in ("recall_int8", "recall_ubinary_int8"))
    if not counts_ok or not recalls_ok:
        raise ValueError(f"fidelity {f!r} holds a count below 1 or a recall outside [0, 1]")
