"""Range manifests on storage: save one to a URL, load one from a URL (its id checked)."""
from __future__ import annotations

from typing import Any, Mapping

from ranges.manifest import RangeManifest
from workers.lake.redact import redact_url
from workers.lake.storage import put_bytes, url_to_fs


def save_ranges(manifest: RangeManifest, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
    fs, path = url_to_fs(url, storage_options)
    put_bytes(fs, path, manifest.to_json())


def load_ranges(url: str, storage_options: Mapping[str, Any] | None = None) -> RangeManifest:
    fs, path = url_to_fs(url, storage_options)
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"range manifest {redact_url(url)} does not exist") from None
    return RangeManifest.from_json(data, where=f"range manifest {redact_url(url)}")
