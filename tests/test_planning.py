"""Work-unit planning (pure): every row in exactly one unit, Parquet cut on row-group bounds."""
from dataclasses import replace

from hypothesis import given
from hypothesis import strategies as st

from workers.embedding.encoder import EncoderConfig
from workers.ingest.config import IngestConfig
from workers.ingest.planning import plan_units, row_bounds, shard_id
from workers.lake.records import Duplicate, SourceFile, WorkUnit

groups_st = st.lists(st.integers(0, 50), max_size=12)


def _check_cover(bounds: list[int], rows: int) -> None:
    assert bounds[0] == 0 and bounds[-1] == rows
    assert all(a < b for a, b in zip(bounds, bounds[1:])) or rows == 0  # no empty unit


@given(st.integers(0, 500), st.integers(1, 60))
def test_jsonl_units_cover_every_row_once_and_stay_within_unit_rows(rows, unit_rows):
    bounds = row_bounds(rows, unit_rows)
    _check_cover(bounds, rows)
    assert all(b - a <= unit_rows for a, b in zip(bounds, bounds[1:]))


@given(groups_st, st.integers(1, 60))
def test_parquet_units_cut_on_row_group_bounds(groups, unit_rows):
    rows = sum(groups)
    bounds = row_bounds(rows, unit_rows, groups)
    _check_cover(bounds, rows)
    starts = [sum(groups[:i]) for i in range(len(groups))]
    assert set(bounds) <= set(starts) | {rows}  # only row-group edges
    for a, b in zip(bounds, bounds[1:]):
        # Cut as soon as a unit reaches unit_rows: only its last row group may take it past.
        last = max(s for s, g in zip(starts, groups) if a <= s < b and g)
        assert last - a < unit_rows


@given(st.lists(st.tuples(st.integers(0, 200), st.booleans()), min_size=1, max_size=6), st.integers(1, 40))
def test_plan_units_assigns_every_row_of_every_file_to_exactly_one_unit(shapes, unit_rows):
    files = [SourceFile(f"part-{i}.{'parquet' if pq else 'jsonl'}", 10, "v", "parquet" if pq else "jsonl")
             for i, (_, pq) in enumerate(shapes)]
    rows = [n for n, _ in shapes]
    groups = [[n // 2, n - n // 2] if pq else None for n, pq in shapes]
    cfg = IngestConfig("src", "dst", unit_rows=unit_rows)
    units = plan_units(cfg, files, rows, groups, {}, "sha256:m", "r" * 64)
    seen = {}
    for u in units:
        for r in range(u.row_start, u.row_stop):
            assert (u.file.relpath, r) not in seen
            seen[(u.file.relpath, r)] = u
    assert len(seen) == sum(rows)
    assert len({u.shard_id for u in units}) == len(units)
    assert all(WorkUnit.from_json(u.to_json()) == u for u in units)


def test_a_jsonl_unit_starts_reading_at_the_last_mark_before_its_first_row():
    """The scan's marks say where a unit starts reading a JSON Lines file; where it reads from
    is not what it holds, so its shard's name is the same with or without them."""
    f = SourceFile("a.jsonl", 100, "v", "jsonl")
    cfg = IngestConfig("src", "dst", unit_rows=10)
    marks = [[r, b, ["string", "int64"]] for r, b in ((4, 400), (9, 900), (10, 1000), (10, 1010), (23, 2300))]
    units = plan_units(cfg, [f], [35], [None], {}, "sha256:m", "r" * 64, [marks])  # a segment of blank lines: 1000
    t = ("string", "int64")
    assert [(u.row_start, u.start) for u in units] == [(0, None), (10, (10, 1010, t)), (20, (10, 1010, t)),
                                                       (30, (23, 2300, t))]
    bare = plan_units(cfg, [f], [35], [None], {}, "sha256:m", "r" * 64)
    assert [u.shard_id for u in bare] == [u.shard_id for u in units] and {u.start for u in bare} == {None}
    assert all(WorkUnit.from_json(u.to_json()) == u for u in units)


def test_shard_ids_are_deterministic_and_cover_what_decides_the_rows():
    f = SourceFile("a.parquet", 100, "etag1", "parquet")
    cfg = IngestConfig("src", "dst", unit_rows=10)
    first = plan_units(cfg, [f], [20], [[10, 10]], {}, "sha256:m", "r" * 64)
    assert first == plan_units(cfg, [f], [20], [[10, 10]], {}, "sha256:m", "r" * 64)
    assert len({u.shard_id for u in first}) == 2
    dup = Duplicate(3, "z.parquet", 0)
    with_dup = plan_units(cfg, [f], [20], [[10, 10]], {0: [dup]}, "sha256:m", "r" * 64)
    assert with_dup[0].duplicates == (dup,) and with_dup[1].duplicates == ()
    # Only the unit holding row 3 changes name.
    assert with_dup[0].shard_id != first[0].shard_id and with_dup[1].shard_id == first[1].shard_id
    # The encoder's batch size and float type decide the float bits: other names.
    for encoder in (EncoderConfig(batch_size=16), EncoderConfig(precision="fp16x3")):
        other = plan_units(replace(cfg, encoder=encoder), [f], [20], [[10, 10]], {}, "sha256:m", "r" * 64)
        assert not {u.shard_id for u in other} & {u.shard_id for u in first}
    assert shard_id("a", {"size": 1}, 0, 1, "m", "r", ("int8",), "text", None, True, "IndexBinaryFlat") != \
        shard_id("a", {"size": 2}, 0, 1, "m", "r", ("int8",), "text", None, True, "IndexBinaryFlat")
