"""The model is hashed and loaded once per process, and anew when its files change."""
import os
import shutil
import threading

import numpy as np
import pytest
from sentence_transformers import SentenceTransformer

import workers.embedding.encoder as encoder
from workers.embedding.encoder import Encoder, EncoderConfig, model_fingerprint, resolve_model


@pytest.fixture
def folder(tmp_path):
    """A model-like folder: the fingerprint hashes any files, weights or not."""
    root = tmp_path / "model"
    (root / "1_Pooling").mkdir(parents=True)
    (root / "config.json").write_text('{"dim": 384}')
    (root / "weights.bin").write_bytes(bytes(range(256)) * 64)
    (root / "1_Pooling" / "config.json").write_text("{}")
    return root


@pytest.fixture
def opened(monkeypatch):
    """Paths of the files `model_fingerprint` reads from now on."""
    seen = []

    def spy(path, *args, **kwargs):
        seen.append(os.path.basename(path))
        return open(path, *args, **kwargs)

    monkeypatch.setattr(encoder, "open", spy, raising=False)
    return seen


def test_fingerprint_is_hashed_once_until_a_file_changes(folder, opened):
    first = model_fingerprint(folder)
    assert sorted(opened) == ["config.json", "config.json", "weights.bin"]
    opened.clear()
    assert model_fingerprint(folder) == first and opened == []  # from the cache

    weights = folder / "weights.bin"
    st = weights.stat()
    data = bytearray(weights.read_bytes())
    data[100] ^= 0xFF
    weights.write_bytes(bytes(data))  # same size, and the old mtime put back: only ctime tells
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    changed = model_fingerprint(folder)
    assert changed != first and "weights.bin" in opened

    (folder / "extra.txt").write_text("x")
    assert model_fingerprint(folder) not in (first, changed)
    (folder / "extra.txt").unlink()
    encoder._FINGERPRINTS.clear()
    assert model_fingerprint(folder) == changed  # what a fresh process computes


def test_two_folders_with_the_same_files_share_a_fingerprint_not_an_entry(folder, tmp_path, opened):
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    assert model_fingerprint(folder) == model_fingerprint(copy)
    assert opened.count("weights.bin") == 2  # each folder was hashed: a cache entry is per folder


def test_encoders_share_one_loaded_model_and_encode_like_sentence_transformers():
    texts = ["a query about json parsing", "how to read a tar archive", "threads and locks"] * 4
    a = Encoder(EncoderConfig(batch_size=4))
    b = Encoder(EncoderConfig(batch_size=4, normalize=False))
    assert a.model is b.model and a.dim == 384
    reference = SentenceTransformer(str(resolve_model(None)), device="cpu")
    want = reference.encode(texts, batch_size=4, normalize_embeddings=True, convert_to_numpy=True)
    assert a.encode(texts).tobytes() == want.astype(np.float32).tobytes()

    # Encoders sharing the model, called from several threads at once, each get their own texts.
    out, errors = {}, []

    def work(i):
        try:
            out[i] = (a if i % 2 else b).encode(texts[i:] + texts[:i])
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for i in range(6):
        np.testing.assert_allclose(out[i], np.roll(want, -i, axis=0), atol=1e-6)
