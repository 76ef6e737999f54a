"""Calibration on the job's encoder actors: the ranges do not depend on the number of actors."""
import os
from collections import Counter

import numpy as np
import pytest
from sentence_transformers import SentenceTransformer

import workers.ingest.pipeline
from jobs.ingest import check_source
from workers.ingest.pipeline import EncoderActor, calibrate, encoder_pool, scan
from workers.ingest.config import IngestConfig
from workers.embedding.encoder import EncoderConfig, model_fingerprint, resolve_model

from conftest import write_parquet_lake


@pytest.fixture(scope="module")
def sampled(tmp_path_factory, docs, ray_session):
    lake = tmp_path_factory.mktemp("cal") / "lake"
    write_parquet_lake(lake, docs[:200], files=4, row_group_size=30)
    cfg = IngestConfig(str(lake), "unused", id_column="id", calibration_samples=120, seed=7, progress=False,
                       encoder=EncoderConfig(batch_size=8))
    sample = scan(cfg, check_source(cfg)[0]).sample
    return cfg, sample, model_fingerprint(resolve_model(None))


# One method: the actors only encode (the sample's embeddings come back to the driver, which
# reduces them to ranges by either method), so what depends on the actor count is the same.
@pytest.mark.parametrize("method", ["quantile"])
def test_same_ranges_with_one_or_two_encoder_actors(sampled, method, monkeypatch, tmp_path):
    cfg, sample, fp = sampled
    log = tmp_path / "encoded.log"

    class Logged(EncoderActor):  # defined here so that Ray ships it by value: tests/ is not on workers' path
        def encode_row(self, row):
            out = super().encode_row(row)
            with open(log, "a") as f:  # one short line per call: an atomic append
                f.write(f"{os.getpid()} {len(out['embeddings']) // (4 * out['dim'])}\n")
            return out

    monkeypatch.setattr(workers.ingest.pipeline, "EncoderActor", Logged)
    out, encoded = [], []
    for actors in (1, 2):
        c = IngestConfig(cfg.source, cfg.dest, id_column="id", calibration_samples=120, seed=7,
                         encoder=cfg.encoder, encoder_actors=actors, range_method=method,
                         quantiles=(0.01, 0.99), progress=False)
        out.append(calibrate(c, sample, fp, encoder_pool(c)))
        per_actor = Counter()
        for line in log.read_text().splitlines():
            pid, n = map(int, line.split())
            per_actor[pid] += n
        encoded.append(sorted(per_actor.values()))
        log.unlink()
    # 120 texts in chunks of 4 batches of 8 (32, 32, 32, 24): one actor encodes all four, or
    # each of two every other one.
    assert encoded == [[120], [56, 64]], encoded
    assert out[0].ranges.tobytes() == out[1].ranges.tobytes()
    assert out[0].id == out[1].id and out[0].sample_size == 120 and out[0].method == method


def test_ranges_are_those_of_the_sample(sampled):
    cfg, sample, fp = sampled
    assert len(sample.ids) == 120 and len(set(sample.ids)) == 120
    m = calibrate(cfg, sample, fp, encoder_pool(cfg))
    model = SentenceTransformer(str(resolve_model(None)), device="cpu")
    emb = model.encode(sample.texts, batch_size=8, normalize_embeddings=True)
    # re-encoded in this process: equal up to the last float bits
    assert np.allclose(m.ranges[0], emb.min(axis=0), atol=1e-5)
    assert np.allclose(m.ranges[1], emb.max(axis=0), atol=1e-5)
    assert m.model_fingerprint == fp and m.seed == 7 and m.normalize
