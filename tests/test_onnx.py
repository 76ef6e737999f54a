"""The onnx encoder backend: its int8 codes against torch's, its export cache, and a dataset
encoded with it (recorded, searched, reindexed the same way)."""
import hashlib
import json
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from jobs.ingest import run
from jobs.reindex import ReindexConfig, ingest_config
from ranges.manifest import RangeManifest
from workers.embedding.encoder import Encoder, EncoderConfig, encoder_fingerprint, model_fingerprint, resolve_model
from workers.embedding.quantizer import quantize
from workers.ingest.config import IngestConfig
from workers.lake.records import ModelInfo, VersionManifest
from workers.search.searcher import Searcher, check_dataset

from conftest import write_parquet_lake

pytestmark = pytest.mark.usefixtures("shared_encoders")  # conftest: warm encoder actors across the module's jobs

AGREEMENT_DOCS = 200


@pytest.fixture(scope="module")
def both(docs):
    """The same real documents encoded by each backend, in this process, same batch size."""
    texts = [t for _, t in docs[:AGREEMENT_DOCS]]
    out = {b: Encoder(EncoderConfig(batch_size=32, backend=b, device="cpu", threads=2)).encode(texts)
           for b in ("torch", "onnx")}
    return texts, out


def test_onnx_int8_codes_equal_torchs_for_99_percent_of_values(both):
    texts, emb = both
    assert emb["onnx"].shape == emb["torch"].shape == (len(texts), 384)
    ranges = np.stack([emb["torch"].min(0), emb["torch"].max(0)])
    codes = {b: quantize(e, ranges, "int8") for b, e in emb.items()}
    equal = float((codes["onnx"] == codes["torch"]).mean())
    assert equal >= 0.99, f"only {equal:.4%} of int8 values agree"
    # Where they differ, it is rounding at a bucket edge: one step, never more.
    assert np.abs(codes["onnx"].astype(np.int16) - codes["torch"]).max() <= 1
    assert float((quantize(emb["onnx"], ranges, "ubinary") == quantize(emb["torch"], ranges, "ubinary")).mean()) >= 0.99


def test_the_export_is_cached_by_fingerprint_reused_and_deterministic(both, tmp_path):
    from sentence_transformers import SentenceTransformer

    from workers.embedding.onnx_backend import cache_root, export_key, export_onnx

    path = resolve_model(None)
    files = [cache_root() / "onnx" / export_key(model_fingerprint(path)) / "model.onnx"]
    assert files[0].is_file()  # the encoder of `both` exported it there, never into the model's folder
    assert not list(path.rglob("*.onnx"))
    before = files[0].stat()
    model = SentenceTransformer(str(path), device="cpu")
    assert export_onnx(model, model_fingerprint(path)) == files[0]
    assert files[0].stat().st_mtime_ns == before.st_mtime_ns and files[0].stat().st_ino == before.st_ino
    fresh = export_onnx(model, model_fingerprint(path), root=tmp_path)
    assert fresh.parent.name == files[0].parent.name and fresh.is_relative_to(tmp_path)
    assert not list(fresh.parent.glob("*.tmp-*"))
    sha = [hashlib.sha256(f.read_bytes()).hexdigest() for f in (files[0], fresh)]
    assert sha[0] == sha[1]


@pytest.fixture(scope="module")
def onnx_dataset(tmp_path_factory, docs, ray_session, shared_encoders):
    root = tmp_path_factory.mktemp("onnx")
    write_parquet_lake(root / "lake", docs[:60], files=2, row_group_size=20)
    cfg = IngestConfig(str(root / "lake"), str(root / "dest"), id_column="id", calibration_samples=40,
                       unit_rows=30, encoder=EncoderConfig(batch_size=32, backend="onnx"), progress=False)
    return root / "dest", cfg, run(cfg), docs[:60]


def test_an_onnx_ingest_records_the_backend_and_agrees_with_torch(onnx_dataset):
    dest, cfg, result, docs = onnx_dataset
    doc = json.loads((dest / "versions" / "00000001.json").read_text())
    fingerprint = model_fingerprint(resolve_model(None))
    assert doc["model"]["backend"] == "onnx" and doc["model"]["fingerprint"] == fingerprint + "+onnx"
    ranges = RangeManifest.from_json((dest / doc["ranges"]["path"]).read_bytes())
    assert ranges.model_fingerprint == fingerprint + "+onnx"
    assert result.summary["documents"] == 60 and len(doc["shards"]) == 2
    ids, codes = [], []
    for s in doc["shards"]:
        t = pq.read_table(dest / s["path"])
        ids += t["id"].to_pylist()
        codes.append(np.array(t["int8"].to_pylist(), np.int8))
    texts = dict(docs)
    torch_codes = quantize(Encoder(EncoderConfig(batch_size=32)).encode([texts[i] for i in ids]),
                           ranges.ranges, "int8")
    assert float((np.concatenate(codes) == torch_codes).mean()) >= 0.99


def test_search_of_an_onnx_version_encodes_queries_with_onnx(onnx_dataset):
    dest, cfg, result, docs = onnx_dataset
    with Searcher.open(str(dest)) as s:
        assert s.manifest.model.backend == "onnx"
        hits = s.search([docs[7][1], docs[42][1]], k=3)
        assert s._encoder.cfg.backend == "onnx"
    assert [h[0].id for h in hits] == [docs[7][0], docs[42][0]]


def test_torch_queries_against_an_onnx_version_are_refused(onnx_dataset):
    dest, cfg, result, docs = onnx_dataset
    with Searcher.open(str(dest)) as s:
        manifest, ranges = s.manifest, s.ranges
    with pytest.raises(ValueError, match=r"\+onnx"):
        check_dataset(manifest, ranges, encoder_fingerprint(resolve_model(None), "torch"), "all-MiniLM-L6-v2")


def test_a_reindex_repeats_the_versions_backend(onnx_dataset):
    dest, cfg, result, docs = onnx_dataset
    latest = VersionManifest.from_json((dest / "versions" / "00000001.json").read_bytes())
    again = ingest_config(latest, ReindexConfig(str(dest)), cfg.source, fresh=False)
    assert (again.encoder.backend, again.encoder.batch_size, again.encoder.model) == ("onnx", 32, "all-MiniLM-L6-v2")


def test_model_info_round_trips_and_checks_the_backend():
    fp = "sha256:" + "ab" * 32
    assert ModelInfo("m", fp, 8, True).to_json() == {"name": "m", "fingerprint": fp, "dim": 8, "normalize": True}
    onnx = ModelInfo("m", fp + "+onnx", 8, True)
    assert onnx.backend == "onnx" and onnx.to_json()["backend"] == "onnx"
    base = {"format": "quantlake.version/1", "version": 1, "writer": "w", "ranges": {"id": "r", "path": "ranges/r.json"},
            "precisions": ["ubinary"], "source": {"url": "/lake", "text_column": "text", "id_column": None,
                                                  "files": {}}, "shards": []}
    assert VersionManifest.from_json({**base, "model": onnx.to_json()}).model == onnx
    for fingerprint, backend in [(fp, "onnx"), (fp + "+onnx", "torch"), (fp, "tensorrt")]:
        bad = {"name": "m", "fingerprint": fingerprint, "dim": 8, "normalize": True, "backend": backend}
        with pytest.raises(ValueError, match="model.backend"):
            VersionManifest.from_json({**base, "model": bad})


def test_encoder_config_refuses_an_unknown_backend_and_onnx_on_cuda():
    with pytest.raises(ValueError, match="backend must be one of torch, onnx, got 'tf'"):
        EncoderConfig(backend="tf")
    with pytest.raises(ValueError, match="onnx runs on the CPU"):
        EncoderConfig(backend="onnx", device="cuda")


def test_a_missing_onnxruntime_is_named_with_the_extra_to_install(monkeypatch, tmp_path):
    from workers.embedding import onnx_backend

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what an install without the extra looks like
    with pytest.raises(ImportError, match=r"quantlake\[onnx\]"):
        onnx_backend.attach(None, tmp_path / "model.onnx")


def test_inspect_vacuum_and_torch_search_never_import_onnxruntime():
    code = ("import sys, jobs.inspect_dataset, jobs.vacuum, jobs.search, jobs.ingest, jobs.reindex; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('onnx', 'onnxruntime') "
            "or m == 'workers.embedding.onnx_backend'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
