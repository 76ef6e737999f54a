"""Feeding the encoder: batches cut by token count, each sentence-transformers' own for its texts,
or by characters as sentence-transformers cuts them (its bytes), the batch halved on CUDA
out-of-memory, the float type (`--precision`), and where CPU tasks may run.

No GPU here: the out-of-memory tests wrap the real model in a stand-in that raises torch's
own `torch.cuda.OutOfMemoryError` above a batch size; fp16 runs on the CPU.
"""
import logging
import os
import threading
import time

import numpy as np
import pytest
import ray
import torch
from sentence_transformers.base.model import BaseModel

from jobs.ingest import ingest_options, parse_args
from workers.embedding.encoder import (BatchTooLarge, Encoder, EncoderConfig, length_order, parallel_tokenizer,
                                      TOKEN_WINDOW_BATCHES, cuts_like_alone, prepare_threads, resolve_model,
                                      token_lengths)
from workers.embedding.quantizer import quantize
from workers.ingest.config import IngestConfig
from workers.ingest.pipeline import NODE_ID_LABEL, cpu_task_args
from workers.ingest.planning import shard_id

N_TEXTS = 32


@pytest.fixture(scope="module")
def texts(docs):
    return [t for _, t in docs[:N_TEXTS]]


@pytest.fixture(scope="module")
def at16(texts):
    """The texts' fp32 embeddings at batch size 16 cut by characters, with no memory trouble."""
    return _encoder(16).encode(texts)


@pytest.fixture(scope="module")
def tokens16(texts):
    """The same, cut by token count."""
    return _encoder(16, order="tokens").encode(texts)


class OutOfMemoryAbove:
    """The real model, except that a batch of more than `limit` texts (or the calls numbered in
    `fail_calls`) raises what torch raises when a GPU runs out of memory, from its forward pass."""

    def __init__(self, model, limit: int, fail_calls=()):
        self.model, self.limit, self.fail_calls, self.sizes = model, limit, set(fail_calls), []

    def __getattr__(self, name):  # preprocess, prompts, truncate_dim...: the real model's
        return getattr(self.model, name)

    def __call__(self, features):
        n = len(features["input_ids"])
        self.sizes.append(n)
        if n > self.limit or len(self.sizes) in self.fail_calls:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 2.00 GiB ({n} texts)")
        return self.model(features)


@pytest.fixture
def tokenizer_env(monkeypatch):
    """An encoder that prepares ahead sets the process's tokenizer parallelism: put it back after."""
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.setenv("RAYON_NUM_THREADS", "2")


class Widths(OutOfMemoryAbove):
    """The real model, recording the (texts, tokens) shape of each batch it runs."""

    def __init__(self, model, preprocess=None):
        super().__init__(model, limit=10**6)
        self.shapes = []
        if preprocess is not None:
            self.preprocess = preprocess

    def __call__(self, features):
        self.shapes.append(tuple(features["input_ids"].shape))
        return super().__call__(features)


def _encoder(batch_size: int, ahead: bool = False, order: str = "characters", **stand_in) -> Encoder:
    """An encoder on the CPU, cutting batches by characters (sentence-transformers' bytes) unless told."""
    enc = Encoder(EncoderConfig(batch_size=batch_size, device="cpu", prepare_ahead=ahead, batch_order=order))
    if stand_in:
        enc.model = OutOfMemoryAbove(enc.model, **stand_in)
    return enc


def test_length_sorted_batches_are_sentence_transformers_own(texts, at16):
    lengths = [-len(t) for t in texts]
    assert length_order(texts).tolist() == np.argsort(lengths).tolist()
    assert length_order(texts, interleave=True).tolist() == \
        BaseModel._interleave_sorted_indices(np.argsort(lengths)).tolist()
    # Encoding those batches one call each gives the bytes of one encode of the whole list,
    # and the rows come back in the texts' order.
    model = _encoder(16).model  # the one SentenceTransformer this process loaded
    want = model.encode(texts, batch_size=16, normalize_embeddings=True, convert_to_numpy=True)
    assert at16.tobytes() == want.astype(np.float32).tobytes()


@pytest.mark.parametrize("ahead", [False, True], ids=["inline", "ahead"])
def test_token_order_batches_are_sentence_transformers_own_and_pad_less(texts, at16, tokens16, ahead,
                                                                       tokenizer_env):
    model = _encoder(16).model
    lengths = token_lengths(model.preprocess(texts))
    order = np.argsort(-lengths, kind="stable")
    assert order.tolist() != length_order(texts).tolist()  # these texts: characters and tokens disagree
    # Each batch of 16 cut by token count, encoded by sentence-transformers alone: the same bytes.
    want = np.empty_like(tokens16)
    for start in range(0, len(texts), 16):
        batch = order[start:start + 16]
        want[batch] = model.encode([texts[i] for i in batch], batch_size=16, normalize_embeddings=True)
    assert tokens16.tobytes() == want.tobytes()
    assert tokens16.tobytes() != at16.tobytes()  # other batches: other last bits
    np.testing.assert_allclose(tokens16, at16, atol=1e-5)
    # Fewer tokens through the model: each batch cut to its longest text in tokens.
    by_tokens, by_chars = _encoder(16, ahead, order="tokens"), _encoder(16, ahead)
    by_tokens.model, by_chars.model = Widths(model), Widths(model)
    assert by_tokens.encode(texts).tobytes() == tokens16.tobytes()
    by_chars.encode(texts)
    assert by_tokens.model.shapes == [(16, lengths[order[:16]].max()), (16, lengths[order[16:]].max())]
    assert by_tokens._cut_rows is True  # cut from the window's token ids (the model pads on the right)
    padded = [sum(n * w for n, w in m.model.shapes) for m in (by_tokens, by_chars)]
    assert padded[0] < padded[1], padded
    # A batch cut short: one call, the texts' own order.
    assert by_tokens.encode(texts[:5]).tobytes() == model.encode(
        texts[:5], batch_size=16, normalize_embeddings=True).tobytes()


def test_token_order_windows_are_tokenized_ahead_and_cut_on_their_own(docs, tokenizer_env):
    """Batches of 2 cut by token count from windows of 16 batches (32 texts), the next window
    tokenized while this one's batches run: the bytes of sentence-transformers' encode of each
    batch cut from its window."""
    assert TOKEN_WINDOW_BATCHES == 16
    texts = [t for _, t in docs[:80]]  # windows of 32, 32 and 16 texts
    model = _encoder(16).model
    want = np.empty((len(texts), 384), np.float32)
    for w0 in range(0, len(texts), 32):
        window = texts[w0:w0 + 32]
        order = np.argsort(-token_lengths(model.preprocess(window)), kind="stable")
        for start in range(0, len(order), 2):
            batch = order[start:start + 2]
            want[w0 + batch] = model.encode([window[i] for i in batch], batch_size=2, normalize_embeddings=True)
    events, lock = [], threading.Lock()

    class Timeline(Widths):
        def preprocess(self, batch, **kwargs):
            with lock:
                events.append(("tokenize", len(batch)))
            return model.preprocess(batch, **kwargs)

        def __call__(self, features):
            time.sleep(0.02)  # a device slower than the tokenizer, so that it is seen ahead
            with lock:
                events.append(("forward", len(features["input_ids"])))
            return super().__call__(features)

    for ahead in (False, True):
        enc = _encoder(2, ahead, order="tokens")
        enc.model = Timeline(model)
        events.clear()
        assert enc.encode(texts).tobytes() == want.tobytes()
        assert enc.model.shapes and max(n for n, _ in enc.model.shapes) == 2
        windows = [i for i, e in enumerate(events) if e[0] == "tokenize" and e[1] in (32, 16)]
        assert [events[i][1] for i in windows] == [32, 32, 16]
        # The encoder's first call asks how its model pads (`cuts_like_alone`), of fixed texts.
        assert events[:5] == [("tokenize", 3), ("tokenize", 2), ("tokenize", 1), ("tokenize", 3), ("tokenize", 32)]
        forwards = [i for i, e in enumerate(events) if e[0] == "forward"]
        assert len(forwards) == 40
        if ahead:  # the second window was tokenized before the first window's last batch ran
            assert windows[1] < forwards[15], events
        else:  # tokenized when its batches are due
            assert forwards[15] < windows[1] < forwards[16], events


def test_a_tokenizer_that_pads_to_a_multiple_is_cut_by_characters_whatever_the_data(docs, texts, caplog):
    """Features cut from a window equal a batch's own only when the tokenizer pads on the right
    to the batch's longest. One that pads to a multiple of 8 (a stand-in around the real one)
    is told by fixed texts, not by the first batch: a first batch whose longest text has 256
    tokens, a multiple of 8, would pass a check of it, and every later batch be cut wrong. Its
    batches are cut by characters, as sentence-transformers cuts them, by every encoder."""
    model = _encoder(16).model

    def padded_to_8(batch, **kwargs):
        features = model.preprocess(batch, **kwargs)
        width = -(-features["input_ids"].shape[1] // 8) * 8
        return {k: torch.nn.functional.pad(v, (0, width - v.shape[1])) if isinstance(v, torch.Tensor) else v
                for k, v in features.items()}

    longest = " ".join(t for _, t in docs[:100])  # cut to the model's 256 tokens
    assert token_lengths(model.preprocess([longest]))[0] == model.max_seq_length == 256
    first_long, first_short = _encoder(16, order="tokens"), _encoder(16, order="tokens")
    by_chars = _encoder(16)
    for enc in (first_long, first_short, by_chars):
        enc.model = Widths(model, padded_to_8)
    with caplog.at_level(logging.INFO, logger="workers.embedding.encoder"):
        first_long.encode([longest, *texts[:20]])
        first_short.encode(texts[:2])
    assert first_long._cut_rows is False and first_short._cut_rows is False
    assert "its batches are cut by characters" in caplog.text
    got = [enc.encode(texts) for enc in (first_long, first_short, by_chars)]
    assert got[0].tobytes() == got[1].tobytes() == got[2].tobytes()  # whoever encodes it, the same bytes
    assert {w % 8 for enc in (first_long, first_short) for _, w in enc.model.shapes} == {0}
    assert cuts_like_alone(model) and not cuts_like_alone(Widths(model, padded_to_8))


def test_a_left_padding_tokenizer_is_cut_by_characters(texts):
    """Causal embedding models pad on the left: cut to a narrower batch, a window's token ids
    would lose real tokens and keep padding. Such a model's batches are sentence-transformers'
    own, cut by characters: the bytes of its encode."""
    model = _encoder(16).model
    tokenizer = model.tokenizer
    assert tokenizer.padding_side == "right"
    tokenizer.padding_side = "left"
    try:
        assert not cuts_like_alone(model)
        enc = _encoder(16, order="tokens")
        got = enc.encode(texts)
        assert enc._cut_rows is False
        assert got.tobytes() == model.encode(texts, batch_size=16, normalize_embeddings=True).tobytes()
    finally:
        tokenizer.padding_side = "right"
    assert cuts_like_alone(model)


def test_tokenizing_ahead_gives_the_bytes_of_sentence_transformers_encode(texts, at16, tokenizer_env):
    enc = _encoder(16, ahead=True)
    assert enc.prepare_ahead and not _encoder(16).prepare_ahead  # on a CPU only when asked
    assert os.environ["TOKENIZERS_PARALLELISM"] == "true"  # the tokenizer splits a batch over threads
    assert enc.encode(texts).tobytes() == at16.tobytes()
    assert enc.encode(texts[:5]).tobytes() == _encoder(16).encode(texts[:5]).tobytes()  # one batch, cut short


def test_a_failure_mid_call_ends_the_tokenizing_ahead_before_it_returns(texts, at16, tokenizer_env):
    enc = _encoder(16, ahead=True)
    real, busy, begun = enc.model, [], []

    class DeviceLost(OutOfMemoryAbove):
        def preprocess(self, batch, **kwargs):  # slow enough that the failure comes mid-tokenizing
            begun.append(len(batch))
            busy.append(len(batch))
            time.sleep(0.3)
            features = real.preprocess(batch, **kwargs)
            busy.pop()
            return features

        def __call__(self, features):
            # The first batch's forward: wait until the second batch's tokenizing has begun
            # (it may have begun already), then fail.
            deadline = time.monotonic() + 5
            while len(begun) < 2:
                assert time.monotonic() < deadline, "the next batch was never tokenized ahead"
                time.sleep(0.01)
            raise RuntimeError("device lost")

    enc.model = DeviceLost(real, limit=64)
    with pytest.raises(RuntimeError, match="device lost"):
        enc.encode(texts)
    # The second batch was being tokenized when the first failed: the call waited for it, so no
    # later call finds the shared tokenizer busy ("Already borrowed").
    assert busy == []
    enc.model = OutOfMemoryAbove(real, limit=64)
    enc.model.preprocess = lambda batch, **kwargs: (_ for _ in ()).throw(ValueError("not text"))
    with pytest.raises(ValueError, match="not text"):  # a failure while tokenizing is the call's
        enc.encode(texts)
    enc.model = real
    assert enc.encode(texts).tobytes() == at16.tobytes()


def test_prepare_threads_share_the_node_cores_among_its_gpus():
    assert [prepare_threads(8, 1), prepare_threads(96, 8), prepare_threads(2, 4), prepare_threads(4, 0)] == [8, 12, 1, 4]
    env = {"TOKENIZERS_PARALLELISM": "false"}
    parallel_tokenizer(env, 6)
    assert env == {"TOKENIZERS_PARALLELISM": "true", "RAYON_NUM_THREADS": "6"}
    env = {"RAYON_NUM_THREADS": "3"}  # the user's choice stays
    parallel_tokenizer(env, 6)
    assert env["RAYON_NUM_THREADS"] == "3"


@pytest.mark.parametrize("order", ["characters", "tokens"])
@pytest.mark.parametrize("ahead", [False, True], ids=["inline", "ahead"])
def test_out_of_memory_halves_the_batch_retries_it_and_keeps_the_size(texts, at16, tokens16, caplog, ahead, order,
                                                                      tokenizer_env):
    enc = _encoder(64, ahead, order, limit=16)
    with caplog.at_level(logging.WARNING, logger="workers.embedding.encoder"):
        got = enc.encode(texts)
    assert enc.model.sizes == [N_TEXTS, 16, 16]  # 64 holds all 32 texts: halved to 16, which fits
    assert enc.batch_size == 16 and "batch size now 16" in caplog.text
    # The same batches as an encoder that ran at 16 from the start: the same bytes.
    assert got.tobytes() == (at16 if order == "characters" else tokens16).tobytes()
    enc.model.sizes.clear()
    enc.encode(texts[:20])  # the actor's next unit starts at the size that fitted
    assert enc.model.sizes == [16, 4]


@pytest.mark.parametrize("ahead", [False, True], ids=["inline", "ahead"])
def test_a_passing_out_of_memory_mid_unit_keeps_every_row_in_place(texts, at16, ahead, tokenizer_env):
    enc = _encoder(16, ahead, limit=16, fail_calls={2})  # the second batch fails once
    got = enc.encode(texts)
    assert enc.model.sizes == [16, 16, 8, 8] and enc.batch_size == 8
    want = at16
    # Rows of the retried batch were padded with other neighbours: equal up to float rounding.
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.einsum("ij,ij->i", got, want).min() > 0.99999


@pytest.mark.parametrize("ahead", [False, True], ids=["inline", "ahead"])
def test_out_of_memory_at_one_text_fails_naming_the_cause(texts, ahead, tokenizer_env):
    enc = _encoder(4, ahead, limit=0)
    with pytest.raises(BatchTooLarge, match=r"ran out of memory encoding a single text of \d+ characters "
                                            r"\(batch size 4 was halved down to 1\)") as failed:
        enc.encode(texts[:4])
    assert isinstance(failed.value.__cause__, torch.cuda.OutOfMemoryError)
    assert enc.model.sizes == [4, 2, 1]


@pytest.fixture(scope="module")
def calibration_ranges(docs):
    """fp32 minmax ranges of 128 other documents, as a job's calibration sample gives them: the
    texts compared are not the ones that set the ranges (a value that sets a bound quantizes to
    the edge of a step, where the smallest change flips its code)."""
    emb = _encoder(16).encode([t for _, t in docs[N_TEXTS:N_TEXTS + 128]])
    return np.stack([emb.min(0), emb.max(0)])


def test_float_types_int8_codes_against_fp32(texts, at16, calibration_ranges, caplog):
    """Each float type against fp32 (run on the CPU here), quantized with the same ranges.

    fp16x3 (three fp16 products per linear layer, fp32 elsewhere) is fp32 to ~2e-7: measured,
    1 code of 12,288 differs. fp16 (autocast: one fp16 product) moves a value by up to ~1.5e-4
    against int8 steps of ~1e-3: ~97% equal, all within one step. Casting the weights
    (`model.half()`) loses more, bf16 (8 bits of mantissa to fp16's 11) more again. The
    weights stay fp32 and shared by every float type.
    """
    from sentence_transformers import SentenceTransformer

    fp32 = at16
    a = quantize(fp32, calibration_ranges, "int8").astype(np.int16)

    def codes(emb):
        assert emb.dtype == np.float32 and np.isfinite(emb).all() and emb.tobytes() != fp32.tobytes()
        b = quantize(emb, calibration_ranges, "int8").astype(np.int16)
        return (a == b).mean(), (np.abs(a - b) <= 1).mean(), float(np.abs(emb - fp32).max())

    got = {}
    for precision in ("fp16x3", "fp16", "bf16"):
        enc = Encoder(EncoderConfig(batch_size=16, device="cpu", precision=precision))
        assert enc.precision == precision and enc.model is _encoder(16).model  # one fp32 model
        got[precision] = codes(enc.encode(texts))
    halved = SentenceTransformer(str(resolve_model(None)), device="cpu").half()  # what fp16 was before
    got["half"] = codes(halved.encode(texts, batch_size=16, normalize_embeddings=True).astype(np.float32))
    assert got["fp16x3"][0] >= 0.999 and got["fp16x3"][1] == 1.0 and got["fp16x3"][2] < 2e-6, got
    assert 0.95 <= got["fp16"][0] < 0.99 and got["fp16"][1] == 1.0 and got["fp16"][2] > 2e-5, got
    assert got["half"][0] < got["fp16"][0], got
    assert got["bf16"][0] < got["fp16"][0] and got["bf16"][1] >= 0.99, got
    assert next(_encoder(16).model.parameters()).dtype == torch.float32  # fp32 encoders unaffected
    assert _encoder(16).encode(texts).tobytes() == fp32.tobytes()
    # The same encoder again: the same bytes (the weights' parts are kept, not recomputed).
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="workers.embedding.encoder"):
        enc = Encoder(EncoderConfig(batch_size=16, device="cpu", precision="fp16x3"))
    assert [r.getMessage() for r in caplog.records] == [
        "fp16x3 on a CPU is emulated with fp32 products, about 4x slower than fp32 and with nearly its codes: "
        "use --precision fp32 on CPU encoders"]
    first = enc.encode(texts)
    assert enc.encode(texts).tobytes() == first.tobytes()
    assert len(enc._compensated._weights) == 37  # 6 linear layers in each of 6 blocks, and BERT's pooler


def test_precision_option_resolves_and_names_the_shards(monkeypatch):
    assert EncoderConfig().resolved_precision("cuda") == "fp16x3"
    assert EncoderConfig().resolved_precision("cpu") == "fp32"
    assert EncoderConfig(precision="bf16").resolved_precision("cpu") == "bf16"
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, fp16x3, fp16, bf16, got 'fp8'"):
        EncoderConfig(precision="fp8")
    cfg, _ = parse_args(["src", "dst", "--precision", "bf16"])
    assert cfg.encoder.precision == "bf16" and ingest_options(cfg)["precision"] == "bf16"
    assert parse_args(["src", "dst"])[0].encoder.precision == "auto"
    with pytest.raises(SystemExit):
        parse_args(["src", "dst", "--precision", "half"])
    args = ("a.parquet", {"size": 1}, 0, 10, "sha256:m", "r", ("int8", "ubinary"), "text", None, True,
            "IndexBinaryFlat", ())
    before = shard_id(*args)  # the name fp32 shards had before the float type was part of it
    assert shard_id(*args, "fp32") == before
    assert len({before, *(shard_id(*args, p) for p in ("fp16x3", "fp16", "bf16"))}) == 4


def test_the_batch_size_names_the_shards_unless_it_is_the_default():
    """Padding moves the last bits, so a rerun at another batch size encodes again; at 64 a shard
    keeps the name it had before the batch size was part of it (the literals were computed by
    the code before that)."""
    args = ("a.parquet", {"size": 1}, 0, 10, "sha256:m", "r", ("int8", "ubinary"), "text", None, True,
            "IndexBinaryFlat", ())
    assert shard_id(*args) == shard_id(*args, "fp32", 64) == "4cdeeeb492c6143d161ae70c82b01cbe"
    assert shard_id(*args, "fp16x3", 64) == "c8e2a94766886f198dcd39abd46a1fb9"
    assert len({shard_id(*args, "fp32", b) for b in (16, 64, 256)}) == 3
    assert shard_id(*args, "fp32", 256) != shard_id(*args, "fp16x3", 256)
    cfg, _ = parse_args(["src", "dst", "--batch-size", "256"])
    assert cfg.encoder.batch_size == 256 and ingest_options(cfg)["batch_size"] == 256
    assert parse_args(["src", "dst"])[0].encoder.batch_size == 64


def test_the_batch_order_names_the_shards_unless_it_is_by_characters():
    """Shards cut by characters (all of them, before the choice) keep their names; by tokens, another."""
    args = ("a.parquet", {"size": 1}, 0, 10, "sha256:m", "r", ("int8", "ubinary"), "text", None, True,
            "IndexBinaryFlat", ())
    assert shard_id(*args, "fp32", 64, "characters") == "4cdeeeb492c6143d161ae70c82b01cbe"
    assert len({shard_id(*args, "fp32", 64, "tokens"), shard_id(*args, "fp32", 64),
                shard_id(*args, "fp32", 16, "tokens"), shard_id(*args, "fp16x3", 64, "tokens")}) == 4
    cfg, _ = parse_args(["src", "dst"])
    assert cfg.encoder.batch_order == "tokens" and ingest_options(cfg)["batch_order"] == "tokens"
    cfg, _ = parse_args(["src", "dst", "--batch-order", "characters"])
    assert cfg.encoder.batch_order == "characters" and ingest_options(cfg)["batch_order"] == "characters"
    with pytest.raises(SystemExit):
        parse_args(["src", "dst", "--batch-order", "words"])
    with pytest.raises(ValueError, match="batch_order must be one of tokens, characters, got 'length'"):
        EncoderConfig(batch_order="length")


def test_cpu_tasks_avoid_gpu_nodes_only_when_there_are_cpu_nodes(monkeypatch):
    def node(i, **res):
        return {"NodeID": f"n{i}", "Alive": True, "Resources": res}

    gpu_pool, cpu_pool = {"num_gpus": 1, "num_cpus": 1}, {"num_cpus": 1}
    # This machine is one node: the cluster's answer is faked to see the other shapes.
    monkeypatch.setattr(ray, "nodes", lambda: [node(0, CPU=8.0), node(1, CPU=8.0, GPU=1.0),
                                               node(2, CPU=4.0, GPU=2.0), {**node(3, CPU=2.0), "Alive": False}])
    assert cpu_task_args(gpu_pool) == {"label_selector": {NODE_ID_LABEL: "!in(n1,n2)"}}
    assert cpu_task_args(cpu_pool) == {}  # encoders on CPUs: GPU nodes are CPU capacity like any
    monkeypatch.setattr(ray, "nodes", lambda: [node(1, CPU=8.0, GPU=1.0), {**node(0, CPU=8.0), "Alive": False}])
    assert cpu_task_args(gpu_pool) == {}  # only GPU nodes (or one machine with a GPU): anywhere


def test_the_next_unit_waits_at_the_encoder_while_one_is_encoded(ray_session, docs, tmp_path, monkeypatch):
    """One encoder actor, eight units: units are read and queued at the actor before the unit
    ahead of them is done, so the actor does not wait on a read; and the job's encoder actor is
    the one the calibration used (one model load)."""
    import workers.ingest.pipeline as pipeline
    from conftest import write_parquet_lake
    from jobs.ingest import run
    from lakes import encoder_actors_left

    log = tmp_path / "calls.log"
    forward = pipeline.read_unit

    def stamped(item, cfg):  # defined here so that Ray ships it by value
        import time as t

        row = forward(item, cfg)
        row["queued_at"] = t.time()  # read: the driver hands it to the actor now
        return row

    class Logged(pipeline.EncoderActor):
        def encode_row(self, row):
            import os

            with open(log, "a") as f:
                f.write(f"calibration {os.getpid()}\n")
            return super().encode_row(row)

        def encode_unit(self, row):
            import os
            import time as t

            start = t.time()
            # A unit of 20 short texts encodes in ~0.2 s, as fast as a task reads one under load:
            # a slower encoder (as a GPU's actor is slow beside its share of reads) makes the
            # queue the thing observed, not a race between the two.
            t.sleep(1.0)
            out = super().encode_unit(row)
            with open(log, "a") as f:  # one short line per call: an atomic append
                f.write(f"unit {os.getpid()} {row['queued_at']} {start} {t.time()}\n")
            out.pop("queued_at", None)
            return out

    monkeypatch.setattr(pipeline, "read_unit", stamped)
    monkeypatch.setattr(pipeline, "EncoderActor", Logged)
    write_parquet_lake(tmp_path / "lake", docs[:160], files=2, row_group_size=20)
    cfg = IngestConfig(str(tmp_path / "lake"), str(tmp_path / "emb"), id_column="id", calibration_samples=40,
                       unit_rows=20, encoder=EncoderConfig(batch_size=16), progress=False)
    assert run(cfg).summary["shards"] == 8
    lines = [line.split() for line in log.read_text().splitlines()]
    pids = {line[1] for line in lines}
    assert len(pids) == 1 and {line[0] for line in lines} == {"calibration", "unit"}  # one actor for both
    # (queued, started, ended) per unit, in the order the actor ran them
    calls = sorted(((float(q), float(s), float(e)) for _, _, q, s, e in (x for x in lines if x[0] == "unit")),
                   key=lambda c: c[1])
    assert len(calls) == 8
    waiting = [later[0] < earlier[2] for earlier, later in zip(calls, calls[1:])]
    # Queued while the one ahead was encoded: all but the first few (reads start as the actor
    # loads its model); with one unit in flight, none would be.
    assert sum(waiting) >= 5, calls
    assert encoder_actors_left() == []


def test_a_unit_goes_to_the_encoder_actor_with_the_fewest_units_in_hand(ray_session, docs, tmp_path, monkeypatch):
    """Two encoder actors, one that encodes no unit until the other has encoded 10 (a slow node,
    made certain rather than timed): the fast one takes all units but the few the slow one holds.
    Dealt in turn, each would take 8, and the slow one would wait out its 120 s for nothing."""
    import jobs.ingest
    import workers.ingest.pipeline as pipeline
    from conftest import write_parquet_lake
    from jobs.ingest import run

    log = str(tmp_path / "units.log")

    class Uneven(pipeline.EncoderActor):  # defined here so that Ray ships it by value
        def __init__(self, cfg):
            super().__init__(cfg)
            try:  # the first actor here is the slow one (a busy GPU, a slower node)
                os.close(os.open(log + ".slow", os.O_CREAT | os.O_EXCL))
                self.role = "slow"
            except FileExistsError:
                self.role = "fast"

        def encode_unit(self, row):
            import time

            deadline = time.time() + 120
            while self.role == "slow" and time.time() < deadline and (
                    not os.path.exists(log) or open(log).read().split().count("fast") < 10):
                time.sleep(0.05)
            out = super().encode_unit(row)
            with open(log, "a") as f:
                f.write(self.role + "\n")
            return out

    monkeypatch.setattr(pipeline, "EncoderActor", Uneven)
    # Two actors of half a CPU each on the session's two: one CPU left for the tasks beside them,
    # as two actors of one CPU leave on three (6 units in flight).
    monkeypatch.setattr(jobs.ingest, "encoder_pool", lambda cfg: {"actors": 2, "num_cpus": 0.5})
    write_parquet_lake(tmp_path / "lake", docs[:160], files=2, row_group_size=10)
    result = run(IngestConfig(str(tmp_path / "lake"), str(tmp_path / "emb"), id_column="id", calibration_samples=40,
                              unit_rows=10, encoder_actors=2, encoder=EncoderConfig(batch_size=16), progress=False))
    assert (result.summary["shards"], result.summary["documents"]) == (16, 160)
    roles = open(log).read().split()
    assert len(roles) == 16 and roles.count("fast") >= 10 and roles.count("slow") >= 1, roles
