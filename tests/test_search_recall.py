"""Search quality at the defaults: the sign-bit scale column, its round trip, and shards written before it."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ranges.encoding import sha256_hex
from ranges.manifest import RangeManifest
from reference import Stored
from workers.embedding.encoder import BUNDLED, model_fingerprint, resolve_model
from workers.embedding.quantizer import sign_scales
from workers.ingest.from_vectors import write_vectors
from workers.ingest.shard_builder import _parquet_bytes
from workers.lake.dataset import SCALE_COLUMN, IntegrityError, open_version, schema_problems
from workers.search.searcher import SearchOptions, Searcher

K, DIM, ROWS, UNIT = 10, 384, 4000, 1500  # three shards: 1500, 1500, 1000 rows


def corpus(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(vectors, queries): clusters around a common offset (as sentence embeddings sit), unit
    directions with norms from 0.5 to 1.5 (embeddings stored without normalisation); queries are
    fresh points of the same clusters."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((ROWS // 40, DIM))
    label = rng.integers(0, len(centres), ROWS + 200)
    v = rng.standard_normal(DIM) * 0.5 + centres[label] \
        + 1.6 * rng.standard_normal((len(label), DIM)) * np.sqrt(np.linspace(0.3, 1.7, DIM))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    v[:ROWS] *= rng.uniform(0.5, 1.5, (ROWS, 1))
    return v[:ROWS].astype(np.float32), v[ROWS:].astype(np.float32)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    x, q = corpus()
    ranges = RangeManifest(np.stack([x.min(0), x.max(0)]), BUNDLED, model_fingerprint(resolve_model(None)),
                           False, "minmax", None, ROWS, 0)
    dest = tmp_path_factory.mktemp("recall") / "ds"
    write_vectors(str(dest), [f"v{i}" for i in range(ROWS)], x, ranges, unit_rows=UNIT)
    return dest, x, q


def _ids(hits) -> list[list[str]]:
    return [[h.id for h in row] for row in hits]


def _recall(found: list[list[str]], x: np.ndarray, q: np.ndarray) -> float:
    exact = np.argsort(-(q.astype(np.float64) @ x.T.astype(np.float64)), axis=1, kind="stable")[:, :K]
    return float(np.mean([len(set(f) & {f"v{i}" for i in e}) / K for f, e in zip(found, exact)]))


def test_sign_scales_make_the_bit_score_an_estimate():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((50, 20)) * rng.uniform(0.1, 3, (50, 1))).astype(np.float32)
    x[3] = 0  # a zero vector: its estimate is 0, not a division by zero
    x64 = x.astype(np.float64)
    want = np.zeros(50)
    nz = np.abs(x64).sum(1) > 0
    want[nz] = (x64[nz] ** 2).sum(1) * np.sqrt(20) / np.abs(x64[nz]).sum(1)
    got = sign_scales(x)
    assert got.dtype == np.float32 and got.tobytes() == want.astype(np.float32).tobytes()
    # A vector that is its own sign vector times r: scale * <q, s> / sqrt(dim) is exactly <q, x>.
    s = np.where(rng.standard_normal(20) > 0, 1.0, -1.0)
    vertex = (s * 0.7).astype(np.float32)[None]
    qv = rng.standard_normal(20)
    assert np.isclose(sign_scales(vertex)[0] * (qv @ s) / np.sqrt(20), qv @ vertex[0], rtol=1e-6)


def test_scale_column_round_trips_through_the_shard_format(written):
    dest, x, _ = written
    ds = open_version(str(dest))
    assert [s.rows for s in ds.shards] == [1500, 1500, 1000] and all(s.ubinary_scale for s in ds.shards)
    stored = json.loads((dest / "versions" / "00000001.json").read_text())["shards"]
    assert all(s["ubinary_scale"] is True for s in stored)
    for s in ds.shards:
        table = ds.read_shard_table(s)
        assert table.schema.field(SCALE_COLUMN).type == pa.float32()
        a = s.source.row_start
        assert table[SCALE_COLUMN].to_numpy().tobytes() == sign_scales(x[a:a + s.rows]).tobytes()
    schema = ds.read_shard_table(0).schema
    assert schema_problems(schema, DIM, ["int8", "ubinary"]) == []
    assert schema_problems(schema.remove(schema.get_field_index(SCALE_COLUMN)), DIM, ["int8", "ubinary"]) == []
    wrong = schema.set(schema.get_field_index(SCALE_COLUMN), pa.field(SCALE_COLUMN, pa.float64()))
    assert schema_problems(wrong, DIM, ["int8", "ubinary"]) == [f"column {SCALE_COLUMN} is double, expected float"]


def test_defaults_equal_the_reference_and_find_float32_top_10(written):
    dest, x, q = written
    assert SearchOptions().rescore_multiplier == 6
    with Searcher.open(str(dest)) as s:
        got = s.search_vectors(q, K)
    stored = Stored(str(dest))
    want = stored.search(q, K)  # Hamming pool 4 x k x 6, scaled bit estimate, int8 centres: brute force
    assert _ids(got) == [[i for i, _ in row] for row in want]
    np.testing.assert_allclose([h.score for row in got for h in row], [v for row in want for _, v in row],
                               rtol=1e-5, atol=1e-5)
    assert _recall(_ids(got), x, q) >= 0.98
    # The previous defaults (bits alone, multiplier 4) fall short on the same vectors.
    stored.scales = np.ones_like(stored.scales)
    assert _recall([[i for i, _ in row] for row in stored.search(q, K, multiplier=4)], x, q) < 0.98


def _drop_scales(dest, shards: list[int]) -> None:
    """Rewrite those shards as a writer without the column would have, and their records as it would
    have written them (no `ubinary_scale`, the new sha256 and size)."""
    path = dest / "versions" / "00000001.json"
    manifest = json.loads(path.read_text())
    for i in shards:
        record = manifest["shards"][i]
        table = pq.read_table(dest / record["path"])
        data = _parquet_bytes(table.drop_columns([SCALE_COLUMN]))
        (dest / record["path"]).write_bytes(data)
        record.update(sha256=sha256_hex(data), bytes=len(data))
        del record["ubinary_scale"]
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("old", [[0, 1, 2], [1]], ids=["all-old", "mixed"])
def test_shards_without_scales_search_with_the_previous_estimate(tmp_path, old):
    x, q = corpus(seed=2)
    q = q[:100]
    ranges = RangeManifest(np.stack([x.min(0), x.max(0)]), BUNDLED, model_fingerprint(resolve_model(None)),
                           False, "minmax", None, ROWS, 0)
    dest = tmp_path / "ds"
    write_vectors(str(dest), [f"v{i}" for i in range(ROWS)], x, ranges, unit_rows=UNIT)
    _drop_scales(dest, old)
    assert all(SCALE_COLUMN not in open_version(str(dest)).read_shard_table(i).column_names for i in old)
    stored = Stored(str(dest))
    # One shard without scales is enough for the whole version to rank by the bits alone: scaled
    # and plain scores side by side would demote the old shards' rows (~1/1.26 for unit vectors).
    assert np.all(stored.scales == 1)
    for options in ({}, {"rescore": "bits"}):
        with Searcher.open(str(dest)) as s:
            got = s.search_vectors(q, K, **options)
        want = stored.search(q, K, rescore=options.get("rescore", "int8"))
        assert _ids(got) == [[i for i, _ in row] for row in want]
        np.testing.assert_allclose([h.score for row in got for h in row], [v for row in want for _, v in row],
                                   rtol=1e-5, atol=1e-5)
    with Searcher.open(str(dest)) as s:  # the previous defaults: exactly what the code before the scales gave
        assert _ids(s.search_vectors(q, K, rescore_multiplier=4)) == [
            [i for i, _ in row] for row in stored.search(q, K, multiplier=4)]


def test_a_record_claiming_scales_its_shard_lacks_is_refused(written, tmp_path):
    dest, x, _ = written
    copy = tmp_path / "ds"
    shutil.copytree(dest, copy)
    _drop_scales(copy, [1])
    path = copy / "versions" / "00000001.json"
    manifest = json.loads(path.read_text())
    manifest["shards"][1]["ubinary_scale"] = True  # the file has no such column
    path.write_text(json.dumps(manifest))
    with pytest.raises(IntegrityError, match=rf"{manifest['shards'][1]['path']} of version 1 .* column "
                                             rf"{SCALE_COLUMN} is missing \(its record says ubinary_scale\)"):
        open_version(str(copy)).read_shard_table(1)
    with Searcher.open(str(copy)) as s, pytest.raises(IntegrityError, match=SCALE_COLUMN):
        s.search_vectors(x[1500:1510], K)
    manifest["shards"][1]["ubinary_scale"] = "yes"
    path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="ubinary_scale is 'yes', expected true or false"):
        open_version(str(copy))
