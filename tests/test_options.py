"""Non-default `quantlake ingest` options end to end, each followed by a search: every precision,
HNSW and IVF shard indexes, quantile ranges, derived ids, --no-normalize, --ray-address."""
import contextlib
import io
import json
import os
import time
import uuid
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from isolated import Job
from jobs.cli import main as cli
from ranges.manifest import RangeManifest

from conftest import free_ports, write_parquet_lake

pytestmark = pytest.mark.usefixtures("shared_encoders")  # conftest: warm encoder actors across the module's jobs

QUANTILE_ARGS = ["--precisions", "int8,uint8,binary,ubinary", "--index-type", "hnsw", "--range-method", "quantile",
                 "--quantiles", "0.01,0.99", "--calibration-samples", "60", "--unit-rows", "20", "--batch-size", "16",
                 "--no-progress", "--json"]


@pytest.fixture(scope="module")
def quantile(tmp_path_factory, docs, ray_session, shared_encoders):
    """60 documents in 2 files, no id column: every precision, HNSW indexes, 1%/99% quantile ranges."""
    root = tmp_path_factory.mktemp("options")
    write_parquet_lake(root / "lake", docs[:60], files=2, row_group_size=20)
    for f in (root / "lake").iterdir():  # the documents without their id column
        pq.write_table(pq.read_table(f).drop_columns(["id"]), f, row_group_size=20)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli(["ingest", str(root / "lake"), str(root / "dest"), *QUANTILE_ARGS]) == 0
    summary = json.loads(out.getvalue())
    version = json.loads((root / "dest" / "versions" / "00000001.json").read_text())
    return root, summary, version


def _queries_file(path, texts) -> str:
    path.write_text("\n".join(" ".join(t.split()) for t in texts) + "\n")
    return str(path)


def _top_hits(capsys, dest, texts, path, *options) -> list[str]:
    assert cli(["search", str(dest), "--queries-file", _queries_file(path, texts), "-k", "1", "--json",
                *options]) == 0
    return [json.loads(line)["hits"][0]["id"] for line in capsys.readouterr().out.splitlines()]


def test_every_precision_is_stored_as_sentence_transformers_makes_it(quantile):
    root, summary, version = quantile
    assert version["precisions"] == ["binary", "int8", "ubinary", "uint8"]
    for s in version["shards"]:
        t = pq.read_table(root / "dest" / s["path"])
        assert t.schema.field("int8").type == pa.list_(pa.int8(), 384)
        assert t.schema.field("uint8").type == pa.list_(pa.uint8(), 384)
        assert t.schema.field("binary").type == pa.list_(pa.int8(), 48)
        assert t.schema.field("ubinary").type == pa.binary(48)
        int8 = np.array(t["int8"].to_pylist(), np.int16)
        uint8 = np.array(t["uint8"].to_pylist(), np.int16)
        ubinary = np.frombuffer(b"".join(t["ubinary"].to_pylist()), np.uint8).reshape(len(t), 48)
        binary = np.array(t["binary"].to_pylist(), np.int16)
        # quantize_embeddings: uint8 = clip(floor((x - min) / step), 0, 255), int8 = that - 128;
        # binary = packbits(x > 0) - 128, ubinary = packbits(x > 0).
        assert (int8 + 128 == uint8).all() and (binary == ubinary.astype(np.int16) - 128).all()
        assert uint8.min() == 0 and uint8.max() == 255  # quantile ranges: clipped at both ends


def test_hnsw_shard_indexes_find_each_document(quantile, docs, capsys, tmp_path):
    root, summary, version = quantile
    for s in version["shards"]:
        assert s["index_type"] == "IndexBinaryHNSW"
        index = faiss.deserialize_index_binary(np.frombuffer((root / "dest" / s["index"]).read_bytes(), np.uint8))
        assert isinstance(index, faiss.IndexBinaryHNSW) and index.ntotal == s["rows"] > 0
    picked = [0, 14, 22, 31, 45, 59]
    found = _top_hits(capsys, root / "dest", [docs[i][1] for i in picked], tmp_path / "q.txt")
    # No id column: a document's id is <file relative to SOURCE>:<row>.
    assert found == [f"part-{i // 30:05d}.parquet:{i % 30}" for i in picked]
    assert _top_hits(capsys, root / "dest", [docs[i][1] for i in picked], tmp_path / "q.txt",
                     "--ef-search", "40") == found
    # IVF's option on HNSW indexes was accepted and ignored: refused, naming the one that applies.
    assert cli(["search", str(root / "dest"), "a query", "--nprobe", "4"]) == 2
    assert capsys.readouterr().err == (
        "quantlake search: error: --nprobe (nprobe): only for IVF shard indexes, not IndexBinaryHNSW (--index-type "
        f"hnsw), which version 1 of {root / 'dest'} holds; leave it out, or set --ef-search (ef_search) for its "
        "HNSW indexes\n")


def test_quantile_ranges_are_recorded_and_clip(quantile):
    root, summary, version = quantile
    ranges = RangeManifest.from_json((root / "dest" / version["ranges"]["path"]).read_bytes())
    assert (ranges.method, ranges.quantiles, ranges.sample_size) == ("quantile", (0.01, 0.99), 60)
    assert version["ranges"]["method"] == "quantile" and version["source"]["id_column"] is None
    # Every dimension's 1% and 99% quantiles of 60 samples lie strictly inside the sample's range.
    assert summary["clipped_values"] >= 2 * 384 and (np.array(version["clipped_per_dim"]) >= 2).all()


@pytest.fixture
def ray_head(tmp_path):
    """`ray start --head` in a private temp dir on free ports; yields (address, its temp dir), and
    kills every process of it afterwards (never `ray stop`: that stops every Ray on the machine)."""
    gcs, client, agent, agent_grpc, env_agent, metrics, node, objects = free_ports(8)
    (tmp_path / "head").mkdir()
    with Job([], tmp_path / "head") as head:
        head.args = ["-m", "ray.scripts.scripts", "start", "--head", "--block", f"--temp-dir={head.ray_tmp}",
                     f"--port={gcs}", f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
                     f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={env_agent}",
                     f"--metrics-export-port={metrics}", f"--node-manager-port={node}",
                     f"--object-manager-port={objects}", "--num-cpus=2", "--include-dashboard=false",
                     "--object-store-memory=200000000", "--disable-usage-stats"]
        p = head.start()
        address_file = f"{head.ray_tmp}/ray_current_cluster"
        deadline = time.monotonic() + 180
        while not os.path.exists(address_file) and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert os.path.exists(address_file), f"ray start failed: {head.output()}"
        yield f"127.0.0.1:{gcs}", head.ray_tmp


def test_ivf_without_normalisation_on_a_running_cluster(ray_head, docs, tmp_path, capsys):
    address, head_tmp = ray_head
    write_parquet_lake(tmp_path / "lake", docs[100:200], files=1, row_group_size=50)
    dest = tmp_path / "dest"
    args = ["-m", "jobs.ingest", str(tmp_path / "lake"), str(dest), "--id-column", "id", "--index-type", "ivf",
            "--no-normalize", "--unit-rows", "100", "--calibration-samples", "100", "--batch-size", "16",
            "--no-progress", "--json", "--ray-address", address]
    with Job(args, tmp_path) as job:
        rc, out, err = job.run(timeout_s=480)
        assert rc == 0, err
        driver_pid = job.proc.pid
        assert list(Path(job.ray_tmp).iterdir()) == []  # the job started no Ray of its own...
    # ...it ran on the head's: the driver's log is in that cluster's session folder.
    assert list(Path(head_tmp).glob(f"session_*/logs/python-core-driver-*_{driver_pid}.log")), \
        sorted(p.name for p in Path(head_tmp).glob("session_*/logs/*"))
    summary = json.loads(out)
    assert (summary["documents"], summary["shards"]) == (100, 1)

    version = json.loads((dest / "versions" / "00000001.json").read_text())
    assert version["model"]["normalize"] is False and version["shards"][0]["index_type"] == "IndexBinaryIVF"
    ranges = RangeManifest.from_json((dest / version["ranges"]["path"]).read_bytes())
    assert ranges.normalize is False
    index = faiss.deserialize_index_binary(np.frombuffer((dest / version["shards"][0]["index"]).read_bytes(),
                                                         np.uint8))
    assert isinstance(index, faiss.IndexBinaryIVF) and index.nlist == 2  # 100 rows: 2 lists of >= 39
    picked = [100, 117, 150, 163, 199]
    found = _top_hits(capsys, dest, [docs[i][1] for i in picked], tmp_path / "q.txt")
    assert found == [docs[i][0] for i in picked]


def test_normalised_ranges_are_refused_for_no_normalize(quantile, tmp_path, capsys):
    root, summary, version = quantile
    ranges = root / "dest" / version["ranges"]["path"]
    assert cli(["ingest", str(root / "lake"), str(tmp_path / "dest"), "--no-normalize", "--ranges", str(ranges),
                "--no-progress"]) == 2
    assert f"range manifest {ranges} was made with normalize=True" in capsys.readouterr().err
    assert not (tmp_path / "dest").exists()


def test_relative_paths_resolve_against_the_callers_directory(docs, ray_session, tmp_path, monkeypatch, capsys):
    # Names no other directory has: a worker resolving them elsewhere must find nothing to read.
    lake, dest = f"lake-{uuid.uuid4().hex[:8]}", f"dest-{uuid.uuid4().hex[:8]}"
    write_parquet_lake(tmp_path / lake, docs[:20], files=1, row_group_size=20)
    monkeypatch.chdir(tmp_path)
    assert cli(["ingest", lake, dest, "--id-column", "id", "--calibration-samples", "20", "--no-progress"]) == 0, \
        capsys.readouterr().err
    assert json.loads((tmp_path / dest / "versions" / "00000001.json").read_text())["counts"]["documents"] == 20


def test_a_single_file_is_a_source(docs, ray_session, tmp_path, capsys):
    write_parquet_lake(tmp_path / "lake", docs[:20], files=1, row_group_size=20)
    source = tmp_path / "lake" / "part-00000.parquet"
    assert cli(["ingest", str(source), str(tmp_path / "dest"), "--id-column", "id", "--calibration-samples", "20",
                "--no-progress"]) == 0, capsys.readouterr().err
    version = json.loads((tmp_path / "dest" / "versions" / "00000001.json").read_text())
    assert version["counts"]["documents"] == 20 and list(version["source"]["files"]) == ["part-00000.parquet"]
