"""Reading a committed dataset version: its manifest, and shard files checked against their sha256."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ranges.manifest import RangeManifest
from workers.redact import redact_url
from workers.storage import cat_uncached, join, sha256_hex, url_to_fs
from workers.version import read_version


class IntegrityError(ValueError):
    """A file's bytes differ from what the version manifest records for it."""


@dataclass(frozen=True)
class DatasetVersion:
    """One committed version, opened for reading.

    Every read checks the file's size and sha256 against the manifest before parsing it,
    so a damaged or swapped file fails with its name instead of giving wrong vectors, and
    no FAISS or Parquet parser ever sees unverified bytes.
    """

    url: str  # credentials removed: safe to show
    fs: Any
    root: str
    manifest: dict[str, Any]

    @property
    def version(self) -> int:
        return int(self.manifest["version"])

    @property
    def shards(self) -> list[dict[str, Any]]:
        return self.manifest["shards"]

    def _shard(self, shard: Mapping[str, Any] | int) -> Mapping[str, Any]:
        return self.shards[shard] if isinstance(shard, int) else shard

    def read_verified(self, relpath: str, sha256: str, size: int | None = None) -> bytes:
        """The bytes of `relpath` (relative to the dataset root), checked against `sha256`.

        Raises:
            IntegrityError: size or checksum differ; the message names the file.
            FileNotFoundError: the file is missing.
        """
        where = f"{relpath} of version {self.version} of {self.url}"
        try:
            data = cat_uncached(self.fs, join(self.root, relpath))
        except FileNotFoundError:
            raise FileNotFoundError(f"{where} is missing: the dataset was damaged or vacuumed "
                                    "while this version was still in use") from None
        if size is not None and len(data) != size:
            raise IntegrityError(f"{where} has {len(data)} bytes, the manifest says {size}: "
                                 "the file was truncated or replaced; do not use this version")
        got = sha256_hex(data)
        if got != sha256:
            raise IntegrityError(f"{where} has sha256 {got}, the manifest says {sha256}: "
                                 "the file was altered or damaged; do not use this version")
        return data

    def read_shard_table(self, shard: Mapping[str, Any] | int, columns: list[str] | None = None) -> pa.Table:
        """The shard's Parquet table (optionally only `columns`), after its checksum matched."""
        s = self._shard(shard)
        data = self.read_verified(s["path"], s["sha256"], s.get("bytes"))
        table = pq.read_table(pa.BufferReader(data), columns=columns)
        if table.num_rows != s["rows"]:
            raise IntegrityError(f"{s['path']} of version {self.version} of {self.url} has "
                                 f"{table.num_rows} rows, the manifest says {s['rows']}")
        return table

    def read_index_bytes(self, shard: Mapping[str, Any] | int) -> bytes:
        """The serialised FAISS index of the shard, after its checksum matched."""
        s = self._shard(shard)
        return self.read_verified(s["index"], s["index_sha256"], s.get("index_bytes"))

    def read_index(self, shard: Mapping[str, Any] | int):
        """The shard's FAISS binary index, deserialised only once its checksum matched."""
        import faiss

        s = self._shard(shard)
        index = faiss.deserialize_index_binary(np.frombuffer(self.read_index_bytes(s), np.uint8))
        if index.ntotal != s["rows"]:
            raise IntegrityError(f"{s['index']} of version {self.version} of {self.url} holds "
                                 f"{index.ntotal} vectors, the manifest says {s['rows']}")
        return index

    def read_rejects(self, shard: Mapping[str, Any] | int) -> pa.Table | None:
        """The shard's rejected rows, or None when it had none."""
        rej = self._shard(shard).get("rejects")
        if not rej:
            return None
        return pq.read_table(pa.BufferReader(self.read_verified(rej["path"], rej["sha256"])))

    def read_ranges(self) -> RangeManifest:
        """The range manifest the version was quantized with; its content hash must be the ranges id."""
        r = self.manifest["ranges"]
        try:
            data = cat_uncached(self.fs, join(self.root, r["path"]))
        except FileNotFoundError:
            raise FileNotFoundError(f"{r['path']} of version {self.version} of {self.url} is missing") from None
        try:
            manifest = RangeManifest.from_json(data, where=f"range manifest {r['path']}")
        except ValueError as exc:
            raise IntegrityError(str(exc)) from None
        if manifest.id != r["id"]:
            raise IntegrityError(f"{r['path']} of version {self.version} of {self.url} has id "
                                 f"{manifest.id}, the manifest says {r['id']}")
        return manifest


def open_version(url: str, version: int | None = None,
                 storage_options: Mapping[str, Any] | None = None) -> DatasetVersion:
    """Open committed version `version` (the latest when None) of the dataset at `url`.

    Only committed versions are visible: shards of a running or failed job, which no
    manifest lists yet, are never read.

    Args:
        url: the dataset root (fsspec URL or local path).
        version: version number; None for the latest.
        storage_options: fsspec options (endpoint, credentials).

    Raises:
        FileNotFoundError: no committed version, or no such version.
        ValueError: the manifest is malformed or holds an unsafe path.
    """
    fs, root = url_to_fs(url, storage_options)
    manifest = read_version(fs, root, version)
    return DatasetVersion(redact_url(url), fs, root, manifest)
