"""The storage contract, one test class run against local disk, memory:// and S3 (moto)."""
import threading
import time

import pytest

from workers.lake.storage import (cat_uncached, check_relpath, create_only, join, ls_uncached, modified_at,
                             put_bytes, url_to_fs)


def _race(n, fn):
    """Run `fn(i)` in `n` threads released together; return each thread's result or exception."""
    barrier, out = threading.Barrier(n), [None] * n

    def worker(i):
        barrier.wait()
        try:
            out[i] = fn(i)
        except Exception as exc:  # noqa: BLE001 - the caller inspects it
            out[i] = exc

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


class TestStorageContract:
    def test_put_bytes_round_trip_overwrite_and_no_temporaries(self, store):
        path = join(store.root, "shards/a.parquet")
        put_bytes(store.fs, path, b"first")
        assert store.fs.cat_file(path) == b"first"
        put_bytes(store.fs, path, b"second, longer")
        assert store.fs.cat_file(path) == b"second, longer"
        assert store.files() == ["shards/a.parquet"]

    def test_create_only_refuses_an_existing_name_and_keeps_its_bytes(self, store):
        path = join(store.root, "versions/00000001.json")
        create_only(store.fs, path, b'{"writer": "a"}')
        with pytest.raises(FileExistsError):
            create_only(store.fs, path, b'{"writer": "b"}')
        assert store.fs.cat_file(path) == b'{"writer": "a"}'
        assert store.files() == ["versions/00000001.json"]

    def test_create_only_race_has_exactly_one_winner(self, store):
        path = join(store.root, "versions/00000007.json")
        out = _race(6, lambda i: create_only(store.fs, path, f"writer {i}".encode()))
        winners = [i for i, r in enumerate(out) if r is None]
        assert len(winners) == 1, out
        assert all(isinstance(r, FileExistsError) for r in out if r is not None), out
        assert store.fs.cat_file(path) == f"writer {winners[0]}".encode()
        assert store.files() == ["versions/00000007.json"]  # no temporaries left behind

    def test_a_file_another_writer_created_after_our_listing_is_seen(self, store):
        put_bytes(store.fs, join(store.root, "versions/00000001.json"), b"1")
        assert len(store.fs.ls(join(store.root, "versions"), detail=False)) == 1  # now in the listing cache
        other, _ = url_to_fs(store.url, {**store.options, "skip_instance_cache": True})
        create_only(other, join(store.root, "versions/00000002.json"), b"2")
        assert cat_uncached(store.fs, join(store.root, "versions/00000002.json")) == b"2"
        assert sorted(p.rsplit("/", 1)[1] for p in ls_uncached(store.fs, join(store.root, "versions"))) == \
            ["00000001.json", "00000002.json"]

    def test_listing_reports_modification_time(self, store):
        put_bytes(store.fs, join(store.root, "shards/b.faiss"), b"x" * 10)
        store.fs.invalidate_cache()
        (info,) = store.fs.find(store.root, detail=True).values()
        assert info["size"] == 10
        assert abs(modified_at(info) - time.time()) < 120


@pytest.mark.parametrize("bad", ["/etc/passwd", "\\\\host\\share", "s3://other-bucket/x", "file:///etc/passwd",
                                 "C:/x", "../outside", "shards/../../outside", "shards\\..\\..\\x", "",
                                 "~/x", "shards/a\x00b", "memory://x", "ranges/./x.json", "./shards/x",
                                 "shards//x.parquet", "shards/", "shards/x/.", "shards\\.\\x"])
def test_unsafe_relative_paths_are_refused(bad):
    with pytest.raises(ValueError, match="unsafe path .* relative to the dataset root"):
        join("bucket/ds", bad)


@pytest.mark.parametrize("good", ["shards/ab.parquet", "ranges/x.json", "a..b/c", "rejects/x-1.parquet"])
def test_relative_paths_are_joined_under_the_root(good):
    assert check_relpath(good) == good
    assert join("bucket/ds", good) == f"bucket/ds/{good}"


def test_modified_at_reads_every_form_a_store_gives_in_utc(monkeypatch):
    """A time without a zone is UTC whether a datetime or a string (a string was read in the
    machine's zone: a file looked hours older or younger to vacuum); NaN or a boolean is no time,
    so the file's age is unknown and vacuum keeps it (NaN counted as old, True as 1970)."""
    import datetime as dt

    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        want = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc).timestamp()
        for value in ("2026-01-01T00:00:00", "2026-01-01T00:00:00Z", "2026-01-01T05:00:00+05:00",
                      dt.datetime(2026, 1, 1), dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc), want, int(want)):
            assert modified_at({"mtime": value}) == want, value
        assert modified_at({"LastModified": "2026-01-01 00:00:00"}) == want
        for value in (float("nan"), float("inf"), True, None, "", "yesterday"):
            assert modified_at({"mtime": value}) is None, value
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
