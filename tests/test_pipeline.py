"""Encoder pool sizing: one actor per GPU when the cluster has GPUs, CPU actors otherwise."""
import ray

from workers.ingest.config import IngestConfig
from workers.embedding.encoder import EncoderConfig
from workers.ingest.pipeline import encoder_cfg, encoder_pool


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
