"""Search benchmark (by hand, not CI): quality on two real corpora, speed and memory on 1M synthetic vectors.

Quality, on two corpora built and encoded at run time (bundled all-MiniLM-L6-v2): the demo
docstrings with a document's first sentence as its query (short queries, long documents), and
the sentences of the installed packages' READMEs with the rest of a paragraph as the query for
its first sentence (long queries, short documents). Against float32 exact search: int8,
ubinary, then the curve to choose from: candidate estimate (sign bits alone, as shards written
before the scales search, or scaled by each vector's stored correction), Hamming pool and
rescore multiplier -> recall of float32's top 10, NDCG@10 retention, queries/s.
Speed: queries/s (one query per call and batched), single-query p50/p99 latency and resident
bytes of float32 IndexFlatIP, int8, ubinary and ubinary + int8 rescoring at several
multipliers on `--rows` synthetic unit vectors.

    python bench/search.py [--docs 2000] [--queries 300] [--readme-queries 500] [--rows 1000000]
                           [--cache DIR] [--approx]
"""
from __future__ import annotations

import argparse
import glob
from importlib import metadata
import os
import re
import sys
import tempfile
import time

import faiss
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from ranges.manifest import RangeManifest  # noqa: E402
from workers.embedding.encoder import BUNDLED, model_fingerprint, resolve_model  # noqa: E402
from workers.search.searcher import Searcher  # noqa: E402
from workers.ingest.from_vectors import write_vectors  # noqa: E402

K = 10
MULTIPLIERS = (2, 3, 4, 5, 6, 8, 10)
_SENTENCE = re.compile(r"(?<=[.!?])\s+")


def demo_corpus(n: int, tmp: str) -> tuple[list[str], list[str]]:
    """(ids, texts) of `n` demo documents: jobs.demo when present, else stdlib docstrings."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from jobs.demo import DemoConfig, run

        run(DemoConfig(dest=os.path.join(tmp, "demo"), docs=n, files=4))
        t = pa.concat_tables([pq.read_table(p, columns=["id", "text"])
                              for p in sorted(glob.glob(os.path.join(tmp, "demo", "*.parquet")))])
        return t["id"].to_pylist(), t["text"].to_pylist()
    except ImportError:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
        from conftest import real_documents

        pairs = real_documents(n)
        return [i for i, _ in pairs], [t for _, t in pairs]


def held_out_queries(texts: list[str], n: int, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """First sentences of documents that have more than one, unique among them; and their rows."""
    firsts = {}
    for i, t in enumerate(texts):
        parts = _SENTENCE.split(" ".join(t.split()), 1)
        if len(parts) == 2 and len(parts[0]) >= 25:
            firsts.setdefault(parts[0], []).append(i)
    unique = sorted((rows[0], s) for s, rows in firsts.items() if len(rows) == 1)
    pick = np.random.default_rng(seed).choice(len(unique), min(n, len(unique)), replace=False)
    return [unique[p][1] for p in pick], np.array([unique[p][0] for p in pick])


def scores(found: list[list[int]], exact: np.ndarray, relevant: np.ndarray) -> tuple[float, float]:
    """(recall of the float32 exact top-k, NDCG@k with the one relevant document)."""
    recall = np.mean([len(set(f[:K]) & set(e[:K])) / K for f, e in zip(found, exact)])
    ndcg = np.mean([next((1 / np.log2(r + 2) for r, i in enumerate(f[:K]) if i == rel), 0.0)
                    for f, rel in zip(found, relevant)])
    return float(recall), float(ndcg)


def readme_corpus(n_queries: int, seed: int = 0) -> tuple[list[str], list[str], np.ndarray]:
    """(texts, queries, relevant rows): a corpus of another nature than the demo's, built at run time.

    Documents: the sentences (>= 30 characters) of the installed packages' descriptions (their
    READMEs, in the distributions' metadata): short prose about software, not API docstrings.
    Queries: the rest of a paragraph after its first sentence (longer than the documents); the
    relevant document is that first sentence. Long queries against short documents, where the
    demo set has short queries against long documents.
    """
    paragraphs = []
    for dist in sorted(metadata.distributions(), key=lambda d: (d.metadata["Name"] or "").lower()):
        text = dist.metadata.get_payload() or dist.metadata.get("Description") or ""
        for para in re.split(r"\n\s*\n", text):
            para = " ".join(para.split())
            # Prose only: code fences, tables, lists, headings, badges and directives start with these.
            if len(para) >= 40 and not para.startswith(("```", "|", "..", ">", "<", "[", "!", "*", "-", "#", "=", ":")):
                paragraphs.append(_SENTENCE.split(para))
    texts = sorted({s for parts in paragraphs for s in parts if len(s) >= 30})
    row = {t: i for i, t in enumerate(texts)}
    pairs = sorted({(" ".join(parts[1:]), row[parts[0]]) for parts in paragraphs
                    if len(parts) > 1 and parts[0] in row and len(" ".join(parts[1:])) >= 60})
    pick = np.random.default_rng(seed).choice(len(pairs), min(n_queries, len(pairs)), replace=False)
    return texts, [pairs[p][0] for p in pick], np.array([pairs[p][1] for p in pick])


def _embedded(name: str, build, args) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """(corpus, queries, relevant, seconds) of one quality corpus, encoded by the bundled model.

    With `--cache DIR` the embeddings are kept in DIR (keyed by the corpus and its sizes), so a
    rerun that only changes search code does not encode again.
    """
    from sentence_transformers import SentenceTransformer

    sizes = f"{args.docs}-{args.queries}" if name == "demo" else f"{args.readme_queries}"
    path = os.path.join(args.cache, f"{name}-{sizes}.npz") if args.cache else None
    if path and os.path.exists(path):
        z = np.load(path)
        return z["x"], z["q"], z["rel"], 0.0
    t0 = time.perf_counter()
    texts, queries, relevant = build()
    model = SentenceTransformer(str(resolve_model(None)), device="cpu")
    enc = lambda x: model.encode(x, batch_size=32, normalize_embeddings=True, convert_to_numpy=True)  # noqa: E731
    corpus, q = enc(texts).astype(np.float32), enc(queries).astype(np.float32)
    if path:
        os.makedirs(args.cache, exist_ok=True)
        np.savez(path, x=corpus, q=q, rel=relevant)
    return corpus, q, relevant, time.perf_counter() - t0


def _batch_qps(fn, q: np.ndarray, repeats: int = 3) -> float:
    """Queries/s with all queries in one call, best of `repeats` (the least disturbed run)."""
    fn(q[:2])
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        fn(q)
        best = max(best, len(q) / (time.perf_counter() - t))
    return best


def quality(args, tmp: str) -> None:
    """Both quality corpora: the fixed comparisons, then the curve users choose a multiplier from."""
    def demo():
        ids, texts = demo_corpus(args.docs, tmp)
        queries, relevant = held_out_queries(texts, args.queries)
        return texts, queries, relevant

    corpora = (("demo", "demo docstrings, a document's first sentence as its query (short queries, long "
                        "documents)", demo),
               ("readme", "package README sentences, the rest of a paragraph as the query for its first "
                          "sentence (long queries, short documents)", lambda: readme_corpus(args.readme_queries)))
    embedded = {name: _embedded(name, build, args) for name, _, build in corpora}
    for name, what, _ in corpora:
        corpus, q, relevant, took = embedded[name]
        print(f"\n## Quality, {name}: {len(corpus)} documents, {len(q)} queries: {what}; k={K} "
              f"({took:.0f} s to build and encode)\n")
        _quality_table(name, corpus, q, relevant, args, tmp)
    # Unit vectors' scales are nearly all alike (their spread is ~1% on both corpora), so the
    # correction barely moves the ranking there; embeddings stored without normalisation (inner
    # product search) are where it counts: the same vectors with norms drawn from [0.5, 1.5].
    for name, _, _ in corpora:
        corpus, q, relevant, _ = embedded[name]
        corpus = corpus * np.random.default_rng(0).uniform(0.5, 1.5, (len(corpus), 1)).astype(np.float32)
        print(f"\n## Candidate estimate, {name} with norms from 0.5 to 1.5 (inner product), k={K}\n")
        _quality_table(f"{name}-norms", corpus, q, relevant, args, tmp, short=True)


def _quality_table(name, corpus, q, relevant, args, tmp, short: bool = False) -> None:
    """One corpus's table: fixed comparisons (unless `short`), then estimate x pool x multiplier."""
    from workers.search import rescore

    ranges = RangeManifest(np.stack([corpus.min(0), corpus.max(0)]), BUNDLED,
                           model_fingerprint(resolve_model(None)), not short, "minmax", None, len(corpus), 0)
    dests = {}
    for scales in (True, False):
        dests[scales] = os.path.join(tmp, f"quality-{name}-{scales}")
        write_vectors(dests[scales], [str(i) for i in range(len(corpus))], corpus, ranges,
                      unit_rows=max(1, len(corpus) // 4), scales=scales)
    flat = faiss.IndexFlatIP(corpus.shape[1])
    flat.add(corpus)
    exact = flat.search(q, K)[1]
    base = scores(exact.tolist(), exact, relevant)[1]
    f32 = _batch_qps(lambda v: flat.search(v, K), q)

    def row(label, mult, search, qps=None):
        rec, ndcg = scores(_ids(search(q)), exact, relevant)
        qps = _batch_qps(search, q) if qps is None else qps
        print(f"| {label} | {mult} | {rec:.3f} | {ndcg / base:.3f} | {qps:,.0f} |")

    print(f"| method | multiplier | recall of f32 top-{K} | NDCG@{K} ÷ f32 | q/s ({len(q)} per call) |")
    print("|---|---|---|---|---|")
    print(f"| float32 exact (IndexFlatIP) | - | 1.000 | 1.000 | {f32:,.0f} |")
    if short:
        for scales, label in ((False, "bits alone"), (True, "scaled bits (default)")):
            with Searcher.open(dests[scales]) as s:
                for m in (4, 6, 8):
                    row(f"ubinary, asymmetric cand. ({label}, pool 4x) + int8 rescore", m,
                        lambda v: s.search_vectors(v, K, rescore_multiplier=m))
        return
    with Searcher.open(dests[True], index="int8") as s:
        row("int8 (SQ8 index, bucket centres)", "-", lambda v: s.search_vectors(v, K))
    with Searcher.open(dests[True]) as s:
        row("ubinary, Hamming only", "-", lambda v: s.search_vectors(v, K, rescore="none", candidates="hamming"))
        for m in (4, 6, 8):
            row("ubinary, Hamming cand. + int8 rescore", m,
                lambda v: s.search_vectors(v, K, rescore_multiplier=m, candidates="hamming"))
    # The candidate estimate: bits alone (shards written before the scales) against the scaled
    # estimate, over Hamming pools of 4 and 8 times the candidates kept.
    for pool in (4, 8):
        rescore.ASYMMETRIC_POOL = pool
        try:
            for scales, label in ((False, "bits alone (old shards)"), (True, "scaled bits (default)")):
                with Searcher.open(dests[scales]) as s:
                    for m in MULTIPLIERS:
                        row(f"ubinary, asymmetric cand. ({label}, pool {pool}x) + int8 rescore", m,
                            lambda v: s.search_vectors(v, K, rescore_multiplier=m))
        finally:
            rescore.ASYMMETRIC_POOL = 4
    if not args.skip_st:
        from sentence_transformers.util.quantization import quantize_embeddings, semantic_search_faiss

        index = None
        for m in (4, 6):
            res, _, index = semantic_search_faiss(
                q, corpus_index=index, corpus_embeddings=None if index else quantize_embeddings(corpus, "ubinary"),
                corpus_precision="ubinary", top_k=K, rescore_multiplier=m, exact=True, output_index=True)
            rec, ndcg = scores([[h["corpus_id"] for h in r] for r in res], exact, relevant)
            print(f"| sentence-transformers semantic_search_faiss (ubinary, rescore) | {m} | {rec:.3f} "
                  f"| {ndcg / base:.3f} | |")


def _ids(hits) -> list[list[int]]:
    return [[int(h.id) for h in row] for row in hits]


def _qps(fn, q: np.ndarray, single: int, repeats: int = 3) -> tuple[float, float, float, float]:
    """(queries/s one query per call over the first `single` queries, queries/s all in one call,
    p50 and p99 milliseconds of one query per call).

    Rates are the best of `repeats`: the machine is shared, and the best run is the least
    disturbed one. The latency percentiles pool every single-query call of every repeat.
    """
    fn(q[:2])  # warm: spills int8 rows, faults pages in
    one = batch = 0.0
    latencies = []
    for _ in range(repeats):
        t = time.perf_counter()
        for i in range(single):
            t1 = time.perf_counter()
            fn(q[i:i + 1])
            latencies.append(time.perf_counter() - t1)
        one = max(one, single / (time.perf_counter() - t))
        t = time.perf_counter()
        fn(q)
        batch = max(batch, len(q) / (time.perf_counter() - t))
    p50, p99 = np.percentile(latencies, [50, 99]) * 1000
    return one, batch, float(p50), float(p99)


def speed(args, tmp: str) -> None:
    from workers.search.searcher import SearchOptions

    n, dim = args.rows, 384
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    x = np.empty((n, dim), np.float32)
    for a in range(0, n, 100_000):
        x[a:a + 100_000] = rng.standard_normal((min(100_000, n - a), dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    src = rng.choice(n, args.speed_queries, replace=False)
    q = x[src] + rng.standard_normal((len(src), dim), dtype=np.float32) * np.float32(0.7 / np.sqrt(dim))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    ranges = RangeManifest(np.stack([x[:10_000].min(0), x[:10_000].max(0)]), BUNDLED,
                           model_fingerprint(resolve_model(None)), True, "minmax", None, 10_000, 0)
    dest = os.path.join(tmp, "speed")
    write_vectors(dest, [f"v{i}" for i in range(n)], x, ranges, unit_rows=-(-n // 4))
    flat = faiss.IndexFlatIP(dim)
    flat.add(x)
    del x
    print(f"\n## Speed and memory: {n:,} synthetic unit vectors ({dim}-d) in 4 shards, {len(q)} queries "
          f"(noisy copies of corpus vectors), k={K}, {len(os.sched_getaffinity(0))} CPUs, faiss "
          f"{faiss.__version__} ({time.perf_counter() - t0:.0f} s to build); query encoding not included\n")
    found: dict[str, float] = {}
    rows = []
    f32 = _qps(lambda v: flat.search(v, K), q, args.single)
    found["float32"] = float(np.mean(flat.search(q, 1)[1][:, 0] == src))
    rows.append(("float32 exact (IndexFlatIP)", f32, n * dim * 4, "-"))
    with Searcher.open(dest, index="int8") as s:
        rows.append(("int8 (SQ8 index)", _qps(lambda v: s.search_vectors(v, K), q, args.single),
                     s.resident_bytes(), "-"))
        found["int8"] = float(np.mean([h[0].id == f"v{i}" for h, i in zip(s.search_vectors(q, 1), src)]))
    default = SearchOptions().rescore_multiplier
    with Searcher.open(dest) as s:
        runs = [("ubinary (Hamming only)", {"rescore": "none", "candidates": "hamming"})]
        runs += [(f"ubinary, asymmetric cand. + int8 rescore x{m}{' [default]' if m == default else ''}",
                  {"rescore_multiplier": m}) for m in args.speed_multipliers]
        runs += [(f"ubinary, Hamming cand. + int8 rescore x{default}", {"candidates": "hamming"})]
        for name, opts in runs:
            rows.append((name, _qps(lambda v: s.search_vectors(v, K, **opts), q, args.single),
                         s.resident_bytes(), f"{n * dim / 1e6:.0f} MB mmapped" if "int8" in name else "-"))
        found["ubinary+int8"] = float(np.mean([h[0].id == f"v{i}" for h, i in zip(s.search_vectors(q, 1), src)]))
    print(f"| method | q/s, 1 query per call | q/s, {len(q)} per call | 1 query p50 / p99 ms | resident bytes "
          "| speed-up (1 / batch) | memory ÷ | int8 rows |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (one, batch, p50, p99), nbytes, extra in rows:
        print(f"| {name} | {one:,.0f} | {batch:,.0f} | {p50:.2f} / {p99:.2f} | {nbytes / 1e6:,.1f} MB "
              f"| x{one / f32[0]:.1f} / x{batch / f32[1]:.1f} | {n * dim * 4 / nbytes:.1f} | {extra} |")
    print("\nTop-1 is the query's source vector: " + ", ".join(f"{k} {v:.3f}" for k, v in found.items()))


def approximate(args, tmp: str) -> None:
    """Flat vs HNSW vs IVF shard indexes: build time, agreement with flat, speed, memory."""
    n, dim = args.approx_rows, 384
    rng = np.random.default_rng(1)
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    src = rng.choice(n, args.speed_queries, replace=False)
    q = x[src] + rng.standard_normal((len(src), dim), dtype=np.float32) * np.float32(0.7 / np.sqrt(dim))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    ranges = RangeManifest(np.stack([x.min(0), x.max(0)]), BUNDLED, model_fingerprint(resolve_model(None)),
                           True, "minmax", None, n, 0)
    print(f"\n## Shard index types: {n:,} synthetic vectors in 2 shards, {len(q)} queries (noisy copies), "
          "default search settings\n")
    print("| index | build s | top-1 is the source | top-10 overlap with flat's | q/s, 1 per call | q/s, batch "
          "| resident bytes |")
    print("|---|---|---|---|---|---|---|")
    flat = None
    for t in ("IndexBinaryFlat", "IndexBinaryHNSW", "IndexBinaryIVF"):
        dest = os.path.join(tmp, f"approx-{t}")
        t0 = time.perf_counter()
        write_vectors(dest, [str(i) for i in range(n)], x, ranges, unit_rows=-(-n // 2), index_type=t)
        build = time.perf_counter() - t0
        with Searcher.open(dest) as s:
            found = _ids(s.search_vectors(q, K))
            flat = flat or found
            top1 = np.mean([f[0] == i for f, i in zip(found, src)])
            agree = np.mean([len(set(a) & set(b)) / K for a, b in zip(found, flat)])
            one, batch, _, _ = _qps(lambda v: s.search_vectors(v, K), q, args.single)
            print(f"| {t} | {build:.1f} | {top1:.3f} | {agree:.3f} | {one:,.0f} | {batch:,.0f} "
                  f"| {s.resident_bytes() / 1e6:.1f} MB |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=2000, help="demo documents (CPU encoding ~60 docs/s)")
    p.add_argument("--queries", type=int, default=300, help="demo corpus: held-out queries")
    p.add_argument("--readme-queries", type=int, default=500, help="README corpus: queries")
    p.add_argument("--cache", default=None, help="folder to keep the quality corpora's embeddings in")
    p.add_argument("--skip-st", action="store_true", help="leave out sentence-transformers' semantic_search_faiss")
    p.add_argument("--rows", type=int, default=1_000_000, help="synthetic vectors for the speed part")
    p.add_argument("--speed-queries", type=int, default=200)
    p.add_argument("--single", type=int, default=50, help="queries timed one per call (and latency percentiles)")
    p.add_argument("--speed-multipliers", type=lambda v: [int(m) for m in v.split(",")], default=[2, 4, 6, 8, 10],
                   help="rescore multipliers timed in the speed part")
    p.add_argument("--skip-quality", action="store_true")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--approx", action="store_true", help="also compare HNSW and IVF shard indexes (slow builds)")
    p.add_argument("--approx-rows", type=int, default=200_000)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="quantlake-bench-search-") as tmp:
        if not args.skip_quality:
            quality(args, tmp)
        if not args.skip_speed:
            speed(args, tmp)
        if args.approx:
            approximate(args, tmp)


if __name__ == "__main__":
    main()
