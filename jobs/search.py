"""`quantlake search`: nearest documents of query texts in a committed dataset version."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass, field, fields
from typing import Any, Sequence

import fsspec

from jobs.common import (add_ray_address, add_storage_options, console, one_line, recorded_source, run_reporting,
                         storage_options)
from workers.vocab import CANDIDATE_MODES, RESCORE_MODES, SEARCH_INDEXES, SearchIndex, check
from workers.ingest.scan import scan_path
from workers.ingest.source import SourceFile, classify, iter_batches, list_source, mark_before
from workers.lake.redact import redact, redact_url
from workers.search.searcher import Hit, SearchOptions, Searcher, dumps_hits


@dataclass(frozen=True)
class SearchConfig:
    """One search job: where, what to ask (exactly one of query, queries_file, neighbours_of), how.

    Args:
        dest: dataset URL or path.
        query: one query text.
        queries_file: URL or path of a text file, one query per line (blank lines skipped), `-` for stdin.
        neighbours_of: sample this many documents and search with each one's own text.
        options: k, rescoring and candidate settings.
        version: committed version (None: the latest).
        model: query encoder (None: the model the version names, when that is the bundled model or
            a Hugging Face cache entry; a path in a manifest is never loaded).
        index: `binary` (shard indexes + int8 rescoring) or `int8` (int8 scalar-quantizer indexes).
        ray, ray_address, actors: search with Ray actors holding groups of shards.
        storage_options: fsspec options for the dataset (and the source, for --neighbours-of).
        source: the source lake's URL (--neighbours-of reads texts there, with `storage_options`);
            needed when it moved, or when the version's source is not on the dataset's own storage
            (another bucket or scheme; for a local dataset, outside the folder that holds it).
        seed: sampling seed of --neighbours-of.
        json: print one JSON object per query instead of a table.
    """

    dest: str
    query: str | None = None
    queries_file: str | None = None
    neighbours_of: int | None = None
    options: SearchOptions = field(default_factory=SearchOptions)
    version: int | None = None
    model: str | None = None
    index: SearchIndex = "binary"
    ray: bool = False
    ray_address: str | None = None
    actors: int | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)
    source: str | None = None
    seed: int = 0
    json: bool = False

    def __repr__(self) -> str:
        # A config shows up in logs and tracebacks: never with its storage secrets or URL credentials.
        shown = {f.name: getattr(self, f.name) for f in fields(self)}
        shown["storage_options"] = redact(self.storage_options)
        for name in ("dest", "queries_file", "source", "ray_address", "model"):
            if isinstance(shown[name], str):
                shown[name] = redact_url(shown[name])
        return f"SearchConfig({', '.join(f'{k}={v!r}' for k, v in shown.items())})"

    def __post_init__(self):
        asked = [x is not None for x in (self.query, self.queries_file, self.neighbours_of)]
        if sum(asked) != 1:
            raise ValueError("give exactly one of: a query text, --queries-file, --neighbours-of")
        if self.query is not None and not self.query.strip():
            raise ValueError("the query is blank: give a text to search for (a queries file skips blank lines)")
        if self.neighbours_of is not None and self.neighbours_of < 1:
            raise ValueError(f"--neighbours-of must be >= 1, got {self.neighbours_of}")
        if self.actors is not None and self.actors < 1:
            raise ValueError(f"--actors must be >= 1 (or left out for one per CPU), got {self.actors}")
        # An option of a mode not asked for was taken and ignored: refuse it, as Searcher.open does.
        if self.actors is not None and not self.ray:
            raise ValueError("--actors is the number of Ray actors: it needs --ray")
        if self.neighbours_of is None and (self.source is not None or self.seed != 0):
            raise ValueError(f"{'--source' if self.source is not None else '--seed'} is for --neighbours-of "
                             "(where it reads the sampled documents' texts, and how it samples them): it needs it")
        check(self.index, SEARCH_INDEXES, "index")


@dataclass(frozen=True)
class QueryResult:
    query: str
    hits: list[Hit]
    of: Hit | None = None  # the sampled document, for --neighbours-of


def read_queries(url: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Queries of a file, one per line, in order; blank lines are skipped."""
    if url == "-":
        lines = sys.stdin.read().splitlines()
    else:
        try:
            with fsspec.open(url, "rt", encoding="utf-8", **(storage_options or {})) as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            raise FileNotFoundError(f"queries file {url} does not exist") from None
        except UnicodeDecodeError as exc:
            raise ValueError(f"queries file {url} is not UTF-8 text (byte {exc.start}: "
                             f"{exc.object[exc.start:exc.start + 1]!r})") from None
    queries = [q.strip() for q in lines if q.strip()]
    if not queries:
        raise ValueError(f"queries file {url} holds no query (one per line)")
    return queries


def run(cfg: SearchConfig) -> list[QueryResult]:
    """Open the version, search, and return the results in query order."""
    if cfg.ray:
        searcher = Searcher.open(cfg.dest, cfg.version, cfg.storage_options, cfg.model, index=cfg.index,
                                 backend="ray", actors=cfg.actors, ray_address=cfg.ray_address)
    else:
        searcher = Searcher.open(cfg.dest, cfg.version, cfg.storage_options, cfg.model, index=cfg.index)
    opts = {k: v for k, v in vars(cfg.options).items() if k != "k"}
    with searcher:
        if cfg.neighbours_of is not None:
            docs = searcher.sample(cfg.neighbours_of, cfg.seed)
            texts = source_texts(searcher, docs, cfg.source)
            hits = searcher.search(texts, cfg.options.k, **opts)
            return [QueryResult(t, h, d) for t, h, d in zip(texts, hits, docs)]
        queries = [cfg.query] if cfg.query is not None else read_queries(cfg.queries_file, cfg.storage_options)
        hits = searcher.search(queries, cfg.options.k, **opts)
        return [QueryResult(q, h) for q, h in zip(queries, hits)]


def source_texts(searcher: Searcher, hits: Sequence[Hit], source: str | None = None,
                 text_column: str | None = None) -> list[str]:
    """The documents' texts, read from the source lake the version was built from.

    The manifest's source URL is used only when it lies on the dataset's own storage
    (`on_dataset_storage`): these storage options (credentials) are the dataset's, and a
    manifest must not make them read another bucket or folder. Elsewhere the caller names it.

    Args:
        hits: documents to look up.
        source: the lake's URL (default: the manifest's, if on the dataset's storage), read
            with the searcher's storage options.
        text_column: default: the manifest's.
    """
    src = searcher.manifest.source
    source = source or recorded_source(searcher.url, searcher.manifest,
                                       "it has no texts to read; pass --source with a lake holding them")
    fs, root, files = list_source(source, searcher.storage_options)
    by_path = {f.relpath: f for f in files}
    shard_file = {s.id: s.source.file if s.source else "" for s in searcher.manifest.shards}
    column = text_column or src.text_column
    # The ids are read with the texts and checked against the hits': a file changed since the
    # version was built gave other documents' texts, silently (with no id column: its size).
    columns = [column] + ([src.id_column] if src.id_column not in (None, column) else [])
    kept = searcher.manifest.kept_scans()
    wanted: dict[str, dict[int, tuple[str, str] | None]] = {}
    for h in hits:
        wanted.setdefault(shard_file[h.shard], {})[h.source_row] = None
    changed = f"it changed since version {searcher.version} was built; pass --source with the lake as it was then"
    for relpath, rows in wanted.items():
        f: SourceFile | None = by_path.get(relpath)
        if f is None:
            raise FileNotFoundError(f"source file {relpath} of version {searcher.version} is gone from "
                                    f"{redact_url(source)}; pass the lake's current URL")
        recorded = src.file_identities.get(relpath, {}).get("size")
        if src.id_column is None and recorded is not None and recorded != f.size:
            raise ValueError(f"source file {relpath} is {f.size} bytes, {recorded} when read: {changed}")
        lo, hi = min(rows), max(rows) + 1
        # A large JSON Lines file is read from its kept scan's mark before `lo`, when that scan
        # is of these very bytes (its name holds the file's identity), not from its start.
        ref = kept.get(relpath)
        start = None
        if ref is not None and ref.marks and ref.path == scan_path(f, src.text_column, src.id_column):
            start = mark_before(ref.marks, lo, None if len(columns) == 2 else ("string",))
        for first, batch in iter_batches(fs, root, f, columns, lo, hi, text_column=column, start=start):
            got = classify(f, first, batch, column, src.id_column)
            for r, ident, text in zip(got.row.tolist(), got.ids, got.texts):
                if r in rows:
                    rows[r] = (ident, text)
    out = []
    for h in hits:
        relpath = shard_file[h.shard]
        found = wanted[relpath][h.source_row]
        if found is None:
            raise ValueError(f"source file {relpath} has no row {h.source_row} (document {h.id!r}): {changed}")
        if found[0] != h.id:
            raise ValueError(f"row {h.source_row} of source file {relpath} holds document {found[0]!r}, not "
                             f"{h.id!r}: {changed}")
        out.append(found[1])
    return out


def _short(text: str, width: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[:width - 1] + "…"


def format_results(results: list[QueryResult]) -> str:
    lines = []
    for r in results:
        head = f"neighbours of {one_line(r.of.id)}: " if r.of else "query: "
        lines.append(head + _short(r.query, 100))
        ids = [one_line(h.id) for h in r.hits]  # --json gives ids as they are
        width = max([len(i) for i in ids] + [2])
        for i, (h, shown) in enumerate(zip(r.hits, ids), 1):
            lines.append(f"  {i:>3}. {h.score:8.4f}  {shown:<{width}}  shard {h.shard[:12]} row {h.row}")
        if not r.hits:
            lines.append("  (no hits)")
        lines.append("")
    return "\n".join(lines).rstrip("\n")


def parse_args(argv: list[str] | None = None) -> SearchConfig:
    p = argparse.ArgumentParser(prog="quantlake search", description=__doc__)
    p.add_argument("dest", help="dataset URL or path")
    p.add_argument("query", nargs="?", default=None, help="query text")
    p.add_argument("--queries-file", default=None, help="one query per line (URL, path, or - for stdin)")
    p.add_argument("--neighbours-of", type=int, default=None, metavar="N",
                   help="search with the texts of N sampled documents")
    p.add_argument("-k", type=int, default=10, help="hits per query")
    p.add_argument("--rescore-multiplier", type=int, default=SearchOptions.rescore_multiplier,
                   help="binary candidates per hit to rescore (README, Benchmarks: recall and speed per value)")
    p.add_argument("--rescore", choices=RESCORE_MODES, default="int8",
                   help="int8: float query vs int8 bucket centres; int8-raw: vs raw codes; bits: vs sign "
                        "bits; none: candidate order")
    p.add_argument("--candidates", choices=CANDIDATE_MODES, default="asymmetric",
                   help="asymmetric: a 4x wider Hamming pool narrowed by float query vs sign bits (times each "
                        "vector's stored scale)")
    p.add_argument("--ef-search", type=int, default=None, help="HNSW shard indexes: search breadth")
    p.add_argument("--nprobe", type=int, default=None, help="IVF shard indexes: lists visited")
    p.add_argument("--index", choices=SEARCH_INDEXES, default="binary",
                   help="binary: shard indexes + rescoring; int8: int8 indexes (8x the memory)")
    p.add_argument("--version", type=int, default=None, help="committed version (default: latest)")
    p.add_argument("--model", default=None,
                   help="query encoder folder or cached name (default: the model the version names, if bundled "
                        "or in the Hugging Face cache)")
    p.add_argument("--ray", action="store_true", help="search with Ray actors holding groups of shards")
    add_ray_address(p)
    p.add_argument("--actors", type=int, default=None, help="with --ray: number of actors (default: CPUs)")
    add_storage_options(p)
    p.add_argument("--source", default=None,
                   help="with --neighbours-of: the source lake's URL; required when the version's source is "
                        "not on the dataset's storage (same bucket; locally, under the dataset's parent folder)")
    p.add_argument("--seed", type=int, default=0, help="with --neighbours-of: sampling seed")
    p.add_argument("--json", action="store_true", help="one JSON object per query, in input order")
    # Intermixed: the query may come after options (`search DEST -k 5 "text"`); plain parsing gives the
    # optional positional its empty match at DEST and then refuses the text as unrecognized.
    a = p.parse_intermixed_args(argv)
    options = storage_options(p, a)
    try:
        opts = SearchOptions(k=a.k, rescore_multiplier=a.rescore_multiplier, rescore=a.rescore,
                             candidates=a.candidates, ef_search=a.ef_search, nprobe=a.nprobe)
        return SearchConfig(dest=a.dest, query=a.query, queries_file=a.queries_file,
                            neighbours_of=a.neighbours_of, options=opts, version=a.version, model=a.model,
                            index=a.index, ray=a.ray or a.ray_address is not None, ray_address=a.ray_address,
                            actors=a.actors, storage_options=options, source=a.source, seed=a.seed,
                            json=a.json)
    except ValueError as exc:
        p.error(str(exc))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cfg = parse_args(argv)
    status, results = run_reporting("search", lambda: run(cfg), cfg.storage_options,
                                    [cfg.dest, cfg.source, cfg.queries_file], failures=(RuntimeError,))
    if status:
        return status
    if cfg.json:
        for r in results:
            record = json.loads(dumps_hits(r.query, r.hits))
            if r.of is not None:
                record["of"] = r.of.id
            print(json.dumps(record, ensure_ascii=False))
    else:
        print(format_results(results))
    return 0


if __name__ == "__main__":
    sys.exit(console("search", main))
