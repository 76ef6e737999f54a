"""Range manifests: exact float32 round trip, content-hash id, tamper detection, no pickle."""
import json

import numpy as np
import pytest

from ranges.manifest import RangeManifest
from workers.lake.range_files import load_ranges as load
from workers.lake.range_files import save_ranges as save


def _manifest(ranges, **kw):
    base = dict(model_name="m", model_fingerprint="sha256:ab", normalize=True, method="minmax",
                quantiles=None, sample_size=10, seed=0)
    return RangeManifest(ranges=ranges, **{**base, **kw})


def test_exact_round_trip_through_storage(tmp_path):
    rng = np.random.default_rng(0)
    lo = rng.standard_normal(384).astype(np.float32)
    # values decimal printing would mangle: subnormals, tiny steps, extremes
    lo[:4] = [np.float32(1e-45), np.nextafter(np.float32(0.1), np.float32(1)), -3.4e38, 0.0]
    r = np.vstack([lo, lo + np.abs(rng.standard_normal(384)).astype(np.float32)])
    m = _manifest(r)
    for url in (str(tmp_path / "r.json"), "memory://ranges/r.json"):
        save(m, url)
        back = load(url)
        assert back.ranges.tobytes() == r.tobytes()
        assert back.id == m.id and back.ranges.dtype == np.float32


def test_id_is_content_hash():
    r = np.array([[0, -1], [1, 1]], np.float32)
    a, b = _manifest(r), _manifest(r.copy(), created_at="1999-01-01T00:00:00Z")
    assert a.id == b.id and len(a.id) == 64
    assert _manifest(r, seed=1).id != a.id
    assert _manifest(r + np.float32(1e-7)).id != a.id


def test_tampered_manifest_is_refused():
    doc = json.loads(_manifest(np.array([[0, 0], [1, 1]], np.float32)).to_json())
    doc["seed"] = 7
    with pytest.raises(ValueError, match="does not match its content"):
        RangeManifest.from_json(json.dumps(doc))


def test_bad_manifests():
    with pytest.raises(ValueError, match=r"\(2, dim\) float32"):
        _manifest(np.zeros((3, 2), np.float32))
    with pytest.raises(ValueError, match="minimum above the maximum"):
        _manifest(np.array([[1.0], [0.0]], np.float32))
    with pytest.raises(ValueError, match="format"):
        RangeManifest.from_json('{"format": "pickle"}')
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load("memory://nowhere/r.json")


@pytest.mark.parametrize("text, match", [("[]", "expected a JSON object, got list"),
                                         ("null", "expected a JSON object, got NoneType"),
                                         ('"s"', "expected a JSON object, got str"), ("1", "got int"),
                                         ("[" * 100_000, "JSON nested too deeply"),
                                         ('{"format": "%s", "ranges": []}', "invalid ranges/x.json: "),
                                         ('{"format": "%s", "ranges": {"dtype": "<f4", "shape": 2}}',
                                          "invalid ranges/x.json: ")])
def test_a_manifest_of_another_shape_is_a_value_error(text, match):
    """Not an object, nested too deeply, or fields of another type: a ValueError naming the file
    (readers report it as such; an AttributeError stopped `quantlake history`)."""
    from ranges.manifest import FORMAT

    with pytest.raises(ValueError, match=match):
        RangeManifest.from_json(text.replace("%s", FORMAT), where="ranges/x.json")
