"""Encoder pool sizing: one actor per GPU when the cluster has GPUs, CPU actors otherwise."""
import ray
from ray.data import ActorPoolStrategy

from workers.ingest.config import IngestConfig
from workers.embedding.encoder import EncoderConfig
from workers.ingest.pipeline import UNITS_IN_FLIGHT_PER_ACTOR, encoder_cfg, encoder_pool


def _pool(monkeypatch, resources, **kw):
    # This machine has no GPU: the cluster's answer is faked to see the GPU branch.
    monkeypatch.setattr(ray, "cluster_resources", lambda: resources)
    cfg = IngestConfig("src", "dst", **kw)
    pool = encoder_pool(cfg)
    return cfg, pool


def test_one_encoder_actor_per_gpu(monkeypatch):
    cfg, pool = _pool(monkeypatch, {"CPU": 16.0, "GPU": 4.0})
    assert pool["num_gpus"] == 1 and isinstance(pool["compute"], ActorPoolStrategy)
    assert pool["compute"].min_size == pool["compute"].max_size == 4
    # more than one unit queued per actor: the next one is read and moved while one encodes
    assert pool["compute"].max_tasks_in_flight_per_actor == UNITS_IN_FLIGHT_PER_ACTOR >= 2
    assert encoder_cfg(cfg, pool).precision == "fp16"  # auto: fp16 on GPU actors
    assert encoder_cfg(cfg, pool).threads is None  # no thread count from the cluster's shape
    cfg, pool = _pool(monkeypatch, {"CPU": 16.0, "GPU": 4.0}, encoder_actors=2,
                      encoder=EncoderConfig(precision="bf16"))
    assert pool["compute"].max_size == 2 and encoder_cfg(cfg, pool).precision == "bf16"


def test_cpu_actors_without_gpus_or_when_asked(monkeypatch):
    cfg, pool = _pool(monkeypatch, {"CPU": 8.0})
    assert "num_gpus" not in pool and pool["compute"].max_size == 1 and pool["num_cpus"] == 1
    assert pool["compute"].max_tasks_in_flight_per_actor == UNITS_IN_FLIGHT_PER_ACTOR
    # auto is fp32 on the CPU; the thread count is the Encoder's own rule, not the cluster's CPUs
    assert encoder_cfg(cfg, pool) == EncoderConfig(precision="fp32")
    cfg, pool = _pool(monkeypatch, {"CPU": 8.0, "GPU": 1.0}, encoder=EncoderConfig(device="cpu"), encoder_actors=3)
    assert "num_gpus" not in pool and pool["compute"].max_size == 3
    assert encoder_cfg(cfg, pool).precision == "fp32"
