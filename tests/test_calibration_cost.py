"""What calibration costs: the default sample sized to the lake, and the cut of a sample scanned at the cap."""
import numpy as np
import pytest

from workers.ingest.config import IngestConfig
from workers.ingest.scan import SAMPLE_CAP, Sample, sample_size


@pytest.mark.parametrize("valid, want", [(0, 1_000), (500, 1_000), (3_000, 1_000), (20_000, 1_000),
                                         (40_000, 2_000), (100_000, 5_000), (200_000, 10_000),
                                         (10_000_000, 10_000)])
def test_default_sample_follows_the_lake(valid, want):
    assert sample_size(None, valid) == want


def test_a_requested_size_is_kept():
    assert sample_size(120, 10_000_000) == 120 and sample_size(50_000, 100) == 50_000


def test_cutting_a_sample_scanned_at_the_cap_equals_scanning_at_the_size():
    rng = np.random.default_rng(0)
    keys = rng.integers(0, 2 ** 63, 3 * SAMPLE_CAP, dtype=np.uint64)
    keys[:50] = keys[50:100]  # ties on the key, broken by id
    ids = [f"d{i}" for i in range(len(keys))]
    texts = [f"text {i}" for i in range(len(keys))]
    at_cap, at_size = Sample(SAMPLE_CAP), Sample(1_000)
    for a in range(0, len(keys), 7_000):  # batches, as files arrive
        at_cap.add(keys[a:a + 7_000], ids[a:a + 7_000], texts[a:a + 7_000])
        at_size.add(keys[a:a + 7_000], ids[a:a + 7_000], texts[a:a + 7_000])
    cut = at_cap.first(1_000)
    assert cut.ids == at_size.ids and cut.texts == at_size.texts and np.array_equal(cut.keys, at_size.keys)


def test_the_default_is_the_lake_sized_one_and_a_tiny_request_is_refused():
    assert IngestConfig("lake", "dest").calibration_samples is None
    with pytest.raises(ValueError, match="at least 2 samples"):
        IngestConfig("lake", "dest", calibration_samples=1)
