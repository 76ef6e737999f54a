"""Byte forms every manifest shares: canonical JSON (hashed for ids), stored JSON, sha256.

Pure functions with no storage: `ranges/` uses nothing of `workers`, and the lake builds its
version manifests and shard ids from the same forms.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def canonical_json(obj: Any) -> bytes:
    """The byte form hashed for ids: sorted keys, no whitespace, no NaN."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def pretty_json(obj: Any) -> bytes:
    """The byte form of a stored manifest: indented, sorted keys, no NaN, a final newline."""
    return (json.dumps(obj, indent=1, sort_keys=True, allow_nan=False) + "\n").encode()
