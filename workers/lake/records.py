"""Shard records as manifests and sidecars store them: the files one references, where its sidecar lives."""
from __future__ import annotations

from typing import Any


def sidecar_path(shard_id: str) -> str:
    """`shards/<id>.json`: the shard's record, written after its data files (the mark of a complete shard)."""
    return f"shards/{shard_id}.json"


def shard_files(record: dict[str, Any]) -> list[tuple[str, int | None, str | None]]:
    """`(path, bytes, sha256)` of every data file a shard record references."""
    files = [(record["path"], record.get("bytes"), record.get("sha256")),
             (record["index"], record.get("index_bytes"), record.get("index_sha256"))]
    if record.get("rejects"):
        r = record["rejects"]
        files.append((r["path"], r.get("bytes"), r.get("sha256")))
    return files
