"""Reading a committed version: checksums verified before parsing, hostile manifests refused."""
import json

import faiss
import numpy as np
import pytest

from workers.lake.dataset import IntegrityError, open_version
from ranges.encoding import sha256_hex


def test_open_version_reads_every_shard_verified(small_dataset):
    dest, result = small_dataset
    v = open_version(str(dest))
    assert v.version == result.version == 1 and v.manifest.parent is None
    assert v.manifest.counts == {"rows_read": 93, "documents": 91, "rejects": 2}
    ids, rejects = [], []
    for s in v.shards:
        table = v.read_shard_table(s)
        assert table.num_rows == s.rows == v.read_index(s).ntotal
        assert len(v.read_index_bytes(s)) == s.index_bytes
        ids += table["id"].to_pylist()
        if s.rejects:
            rejects += v.read_rejects(s).to_pylist()
    assert len(ids) == len(set(ids)) == 91 and "fine" in ids
    assert sorted((r["id"], r["reason"]) for r in rejects) == [("blank", "empty_text"), ("null", "null_text")]
    assert v.read_ranges().id == v.manifest.ranges.id
    assert v.read_shard_table(0, columns=["id"]).column_names == ["id"]


def _flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_altered_shard_is_named_and_not_parsed(copy_dataset):
    v = open_version(str(copy_dataset))
    s = v.shards[1]
    _flip_last_byte(copy_dataset / s.path)
    with pytest.raises(IntegrityError, match=rf"{s.path} of version 1 of .* has sha256 [0-9a-f]{{64}}, "
                                             rf"the manifest says {s.sha256}: the file was altered"):
        v.read_shard_table(s)
    (copy_dataset / s.path).write_bytes(b"short")
    with pytest.raises(IntegrityError, match=rf"{s.path} .* has 5 bytes, the manifest says {s.bytes}"):
        v.read_shard_table(s)
    assert v.read_shard_table(0).num_rows == v.shards[0].rows  # the others still read


def test_index_is_deserialised_only_after_its_checksum_matched(copy_dataset, monkeypatch):
    v = open_version(str(copy_dataset))
    s = v.shards[0]
    real, parsed = faiss.deserialize_index_binary, []

    def spy(data):
        parsed.append(sha256_hex(np.asarray(data).tobytes()))
        return real(data)

    monkeypatch.setattr(faiss, "deserialize_index_binary", spy)
    assert v.read_index(s).ntotal == s.rows
    assert parsed == [s.index_sha256]  # the reader goes through the spy, with verified bytes
    _flip_last_byte(copy_dataset / s.index)
    with pytest.raises(IntegrityError, match=rf"{s.index} of version 1 .* has sha256"):
        v.read_index(s)
    assert parsed == [s.index_sha256]  # the altered bytes never reached the parser


def test_missing_shard_file_is_named(copy_dataset):
    v = open_version(str(copy_dataset))
    (copy_dataset / v.shards[0].index).unlink()
    with pytest.raises(FileNotFoundError, match=rf"{v.shards[0].index} of version 1 .* is missing"):
        v.read_index_bytes(0)


def _commit_raw(dest, n, doc):
    (dest / "versions" / f"{n:08d}.json").write_text(json.dumps(doc))


@pytest.mark.parametrize("field, value, message", [
    ("path", "/etc/passwd", r": shards\[0\]\.path: unsafe path '/etc/passwd'"),
    ("path", "s3://other-bucket/x.parquet", r": shards\[0\]\.path: unsafe path 's3://other-bucket"),
    ("index", "../../outside.faiss", r": shards\[0\]\.index: unsafe path '../../outside.faiss'"),
    ("index", "shards/..\\..\\x.faiss", r": shards\[0\]\.index: unsafe path"),
    ("sha256", "not-a-digest", r", shard 0: sha256 is 'not-a-digest', expected 64 lowercase hex digits"),
    ("rows", -1, r", shard 0: rows is -1, expected a count"),
])
def test_hostile_manifest_is_refused(copy_dataset, field, value, message):
    doc = json.loads((copy_dataset / "versions" / "00000001.json").read_text())
    doc.update(version=2, parent=1)
    doc["shards"][0][field] = value
    _commit_raw(copy_dataset, 2, doc)
    with pytest.raises(ValueError, match=r"version 2 \(versions/00000002\.json\)" + message):
        open_version(str(copy_dataset))
    assert open_version(str(copy_dataset), version=1).version == 1


def test_copied_or_renamed_manifest_is_refused(copy_dataset):
    (copy_dataset / "versions" / "00000002.json").write_bytes(
        (copy_dataset / "versions" / "00000001.json").read_bytes())
    with pytest.raises(ValueError, match="the file says it is version 1; a manifest must not be copied"):
        open_version(str(copy_dataset), version=2)


def test_only_committed_versions_are_visible(copy_dataset, tmp_path):
    (copy_dataset / "versions" / "00000002.json.tmp-0123").write_text("{ half written")
    (copy_dataset / "shards" / "uncommitted.parquet").write_bytes(b"x")
    assert open_version(str(copy_dataset)).version == 1
    with pytest.raises(FileNotFoundError, match="version 2 of .* does not exist"):
        open_version(str(copy_dataset), version=2)
    with pytest.raises(FileNotFoundError, match="no committed version under"):
        open_version(str(tmp_path / "empty"))


def test_shard_bytes_match_their_manifest_checksums(small_dataset):
    dest, _ = small_dataset
    v = open_version(str(dest))
    for s in v.shards:
        assert sha256_hex((dest / s.path).read_bytes()) == s.sha256
        codes = np.frombuffer(b"".join(v.read_shard_table(s)["ubinary"].to_pylist()), np.uint8)
        dist, idx = v.read_index(s).search(codes.reshape(s.rows, -1), 1)
        assert (dist[:, 0] == 0).all()
