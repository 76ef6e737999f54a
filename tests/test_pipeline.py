"""Encoder pool sizing: one actor per GPU when the cluster has GPUs, CPU actors otherwise; room
for the tasks beside them."""
import logging

import pytest
import ray

from workers.ingest.config import IngestConfig
from workers.embedding.encoder import EncoderConfig
from workers.ingest.pipeline import check_room, encoder_cfg, encoder_pool, gpu_problem, room_problem


def _pool(monkeypatch, resources, **kw):
    # This machine has no GPU: the cluster's answer is faked to see the GPU branch.
    monkeypatch.setattr(ray, "cluster_resources", lambda: resources)
    cfg = IngestConfig("src", "dst", **kw)
    pool = encoder_pool(cfg)
    return cfg, pool


def test_one_encoder_actor_per_gpu(monkeypatch):
    cfg, pool = _pool(monkeypatch, {"CPU": 16.0, "GPU": 4.0})
    assert pool == {"actors": 4, "num_gpus": 1, "num_cpus": 1}
    assert encoder_cfg(cfg, pool).precision == "fp16x3"  # auto: fp16x3 on GPU actors
    assert encoder_cfg(cfg, pool).threads is None  # no thread count from the cluster's shape
    cfg, pool = _pool(monkeypatch, {"CPU": 16.0, "GPU": 4.0}, encoder_actors=2,
                      encoder=EncoderConfig(precision="bf16"))
    assert pool["actors"] == 2 and encoder_cfg(cfg, pool).precision == "bf16"


def test_cpu_actors_without_gpus_or_when_asked(monkeypatch):
    cfg, pool = _pool(monkeypatch, {"CPU": 8.0})
    assert pool == {"actors": 1, "num_cpus": 1}
    # auto is fp32 on the CPU; the thread count is the Encoder's own rule, not the cluster's CPUs
    assert encoder_cfg(cfg, pool) == EncoderConfig(precision="fp32")
    cfg, pool = _pool(monkeypatch, {"CPU": 8.0, "GPU": 1.0}, encoder=EncoderConfig(device="cpu"), encoder_actors=3)
    assert pool == {"actors": 3, "num_cpus": 1}
    assert encoder_cfg(cfg, pool).precision == "fp32"


def test_units_in_flight_cover_the_actors_and_the_cpus():
    from workers.ingest.pipeline import units_in_flight

    assert units_in_flight(1, 2) == 4  # a laptop: one encoder, two CPUs
    assert units_in_flight(4, 1) == 12  # three per actor: one encoded, one queued, one read or written
    assert units_in_flight(8, 64.0) == 128  # GPU encoders, many CPU nodes: two reads per CPU


def test_room_for_the_tasks_beside_the_encoder_actors():
    cpu = {"actors": 1, "num_cpus": 1}
    assert room_problem(cpu, 2) is None and room_problem({**cpu, "actors": 3}, 4) is None
    assert room_problem({"actors": 8, "num_gpus": 1, "num_cpus": 1}, 8 * 4) is None  # GPU nodes of 4 CPUs
    assert room_problem({**cpu, "actors": 2}, 2) == (
        "2 encoder actor(s) of 1 CPU each leave 0 of the cluster's 2 CPUs for the scan, read and write tasks, "
        "which need 1: the job would wait for ever (at most 1 encoder actor(s) fit, --encoder-actors)")
    assert "leave 0.5 of the cluster's 4.5 CPUs" in room_problem({**cpu, "actors": 4}, 4.5)
    assert "leave 0 of the cluster's 2 CPUs" in room_problem({**cpu, "actors": 5}, 2)  # never negative
    assert "(at most 0 encoder actor(s) fit" in room_problem(cpu, 1)  # a one-CPU machine


def test_no_room_is_an_error_on_the_jobs_own_instance_and_a_warning_on_a_cluster(monkeypatch, caplog):
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    pool = {"actors": 2, "num_cpus": 1}
    with pytest.raises(ValueError, match=r"^2 encoder actor\(s\) of 1 CPU each leave 0 .* fit, --encoder-actors\)$"):
        check_room(pool, own_instance=True)
    with caplog.at_level(logging.WARNING, logger="workers.ingest.pipeline"):
        check_room(pool, own_instance=False)  # an autoscaler may add CPU nodes: the job waits, saying why
        check_room({"actors": 1, "num_cpus": 1}, own_instance=True)  # fits: nothing said
    assert [r.getMessage() for r in caplog.records] == [
        room_problem(pool, 2) + ", unless the cluster adds CPU nodes: the job waits for them"]


def test_cuda_encoders_need_a_gpu_somewhere_in_the_cluster():
    cuda = EncoderConfig(device="cuda")
    assert gpu_problem(cuda, {"CPU": 8.0}) == (
        "--device cuda, but the cluster has no GPU (Ray advertises 8 CPUs and no GPU resource): the encoders could "
        "not run (--device auto uses the cluster's GPUs if it has any, else its CPUs; or join a cluster with GPUs, "
        "--ray-address)")
    assert gpu_problem(cuda, {"CPU": 8.0, "GPU": 0.0}) is not None
    # A worker's GPU counts: the driver's machine may have none.
    assert gpu_problem(cuda, {"CPU": 4.0, "GPU": 1.0}) is None
    assert gpu_problem(EncoderConfig(), {"CPU": 8.0}) is None and gpu_problem(EncoderConfig(device="cpu"), {}) is None


def test_an_ingest_on_cuda_without_a_gpu_stops_before_any_work(ray_session, docs, tmp_path, capsys):
    """On the session's real Ray: one line, and nothing in the dataset (the scan had written its
    kept scans, and each CPU actor failed on its first batch with torch's 80-line traceback)."""
    from conftest import write_parquet_lake
    from jobs.cli import main as cli

    if ray.cluster_resources().get("GPU", 0):
        pytest.skip("this machine's Ray has a GPU")
    write_parquet_lake(tmp_path / "lake", docs[:20], files=2)
    assert cli(["ingest", str(tmp_path / "lake"), str(tmp_path / "dest"), "--device", "cuda", "--no-progress"]) == 2
    cpus = ray.cluster_resources()["CPU"]
    assert capsys.readouterr().err == (f"quantlake ingest: error: --device cuda, but the cluster has no GPU (Ray "
                                       f"advertises {cpus:g} CPUs and no GPU resource): the encoders could not run "
                                       "(--device auto uses the cluster's GPUs if it has any, else its CPUs; or join "
                                       "a cluster with GPUs, --ray-address)\n")
    assert not (tmp_path / "dest").exists()
