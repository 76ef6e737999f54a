"""Demo corpus builder: docstrings of the stdlib and installed packages as Parquet files."""

import argparse
import importlib
import inspect
import json
import logging
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jobs.common import console, run_reporting
from workers.lake.redact import redact_url

log = logging.getLogger(__name__)

# Project dependencies (direct or pulled in by torch, ray[data], sentence-transformers),
# so on every machine the project runs on; the stdlib alone gives about 5k documents.
# Left out: ray (walking its submodules crashes the interpreter) and scipy (some
# docstrings embed unseeded random samples, so two runs would differ).
DEFAULT_SOURCES = ("stdlib", "numpy", "pyarrow", "pandas", "sklearn", "sympy", "networkx",
                   "torch", "transformers", "faiss", "fsspec", "huggingface_hub", "jinja2")
MIN_CHARS = 40
WALK_TIMEOUT_S = 300
SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string()),
                    ("title", pa.string()), ("source", pa.string())])
# Modules that open windows or browsers, print on import or write caches; and tests.
_SKIP = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "lib2to3",
         "test", "tests", "testing", "conftest", "__main__"}
# pybind11 signatures show default objects with their address, which changes per run.
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_CHILD = ("import sys; sys.path.insert(0, sys.argv[1]); "
          "from jobs.demo import _walk_into; _walk_into(sys.argv[2], sys.argv[3])")


@dataclass(frozen=True)
class DemoConfig:
    """What to build and where.

    Args:
        dest: fsspec URL of the output folder.
        docs: size of a seeded subset of the documents, or None for all of them.
        files: number of Parquet files to split the documents into.
        seed: seed of the subset choice.
        sources: top-level packages to read docstrings from, "stdlib" for all of it.
    """

    dest: str
    docs: int | None = None
    files: int = 8
    seed: int = 0
    sources: tuple[str, ...] = DEFAULT_SOURCES

    def __post_init__(self):
        for name in ("docs", "files"):
            if (value := getattr(self, name)) is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value} (docs=None means all)")
        if not self.sources:
            raise ValueError("sources is empty: name at least one package or 'stdlib'")


@dataclass(frozen=True)
class DemoResult:
    """Documents written and the URLs of the files holding them."""

    documents: int
    files: tuple[str, ...]


def _module_docs(module) -> dict[str, str]:
    found = {}

    def add(qualname, obj):
        doc = getattr(obj, "__doc__", None)
        if isinstance(doc, str) and len(doc := inspect.cleandoc(doc)) >= MIN_CHARS \
                and not _ADDRESS.search(doc):
            found[qualname] = doc

    add(module.__name__, module)
    for key, obj in vars(module).items():
        # Re-exports of a private implementation module belong to this public module.
        where = str(getattr(obj, "__module__", None))
        if key.startswith("_") or not (inspect.isclass(obj) or inspect.isroutine(obj)) \
                or not (where == module.__name__ or where.startswith(module.__name__ + "._")):
            continue
        add(f"{module.__name__}.{key}", obj)
        for member, value in vars(obj).items() if inspect.isclass(obj) else ():
            value = getattr(value, "__func__", value)  # staticmethod, classmethod
            if not member.startswith("_") and (inspect.isroutine(value)
                                               or isinstance(value, property)):
                add(f"{module.__name__}.{key}.{member}", value)
    return found


def _walk(name: str):
    if any(p in _SKIP or p.startswith("test") or p.endswith("_test")
           or (i > 0 and p.startswith("_")) for i, p in enumerate(name.split("."))):
        return
    try:
        module = importlib.import_module(name)
    except BaseException:  # noqa: BLE001 - optional extras, other platforms, SystemExit
        return
    yield module
    for info in pkgutil.iter_modules(getattr(module, "__path__", None) or []):
        yield from _walk(f"{name}.{info.name}")


def _walk_into(source: str, out_path: str) -> None:
    """Child process body: import every module of `source`, dump {id: docstring} as JSON."""
    tops = [source] if source != "stdlib" else \
        sorted(n for n in sys.stdlib_module_names if not n.startswith("_"))
    found = {k: v for top in tops for m in _walk(top) for k, v in _module_docs(m).items()}
    Path(out_path).write_text(json.dumps(found))


def _collect_source(source: str) -> dict[str, str]:
    # One child process per source: imports start threads, install signal handlers and
    # change global state, none of which may leak into the caller; a crash stays there.
    env = dict(os.environ, PYTHONHASHSEED="0", PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1",
               TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false")
    root = str(Path(__file__).resolve().parents[1])
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "docs.json")
        proc = subprocess.run([sys.executable, "-c", _CHILD, root, source, out], cwd=tmp,
                              env=env, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=WALK_TIMEOUT_S)
        if proc.returncode != 0:
            raise RuntimeError(f"walking {source!r} failed (exit {proc.returncode}): leave it "
                               f"out of sources. stderr tail:\n{proc.stderr[-2000:]}")
        return json.loads(Path(out).read_text())


def collect_documents(sources: tuple[str, ...] = DEFAULT_SOURCES) -> pa.Table:
    """Every document of `sources`, sorted by id and unique by id and by text."""
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        merged: dict[str, str] = {}
        for source, part in zip(sources, pool.map(_collect_source, sources)):
            if not part:
                log.warning("%s gave no documents: is it installed?", source)
            merged.update({k: v for k, v in part.items() if k not in merged})
    first_id: dict[str, str] = {}
    for key in sorted(merged):  # a duplicated text keeps the first id in sorted order
        first_id.setdefault(merged[key], key)
    ids = sorted(first_id.values())
    return pa.table({"id": ids, "text": [merged[i] for i in ids],
                     "title": [i.rsplit(".", 1)[-1] for i in ids],
                     "source": [i.split(".", 1)[0] for i in ids]}, schema=SCHEMA)


def run(cfg: DemoConfig) -> DemoResult:
    """Collect the corpus and write it as `cfg.files` Parquet files under `cfg.dest`."""
    table = collect_documents(cfg.sources)
    if cfg.docs is not None:
        if cfg.docs > table.num_rows:
            raise ValueError(f"docs={cfg.docs} but the corpus has {table.num_rows} documents: "
                             "ask for fewer or add sources")
        picks = np.random.default_rng(cfg.seed).choice(table.num_rows, cfg.docs, replace=False)
        table = table.take(np.sort(picks))
    if cfg.files > table.num_rows:
        raise ValueError(f"files={cfg.files} exceeds the {table.num_rows} documents")
    fs, root = fsspec.core.url_to_fs(cfg.dest)
    root = root.rstrip("/")
    fs.makedirs(root, exist_ok=True)
    # Earlier parts go first, so a rerun with fewer files leaves no stale part behind.
    if stale := fs.glob(f"{root}/part-*.parquet"):
        fs.rm(stale)
    bounds = np.linspace(0, table.num_rows, cfg.files + 1).astype(int)
    written = []
    for i, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
        path = f"{root}/part-{i:05d}.parquet"
        with fs.open(path, "wb") as f:
            pq.write_table(table.slice(start, stop - start), f)
        written.append(fs.unstrip_protocol(path))
    log.info("wrote %s documents in %s files under %s", table.num_rows, len(written), cfg.dest)
    return DemoResult(documents=table.num_rows, files=tuple(written))


def parse_args(argv: list[str] | None = None) -> DemoConfig:
    p = argparse.ArgumentParser(prog="quantlake demo", description=__doc__)
    p.add_argument("dest", help="fsspec URL of the output folder")
    p.add_argument("--docs", type=int, default=None, help="seeded subset size (default all)")
    p.add_argument("--files", type=int, default=8, help="number of Parquet files")
    p.add_argument("--seed", type=int, default=0, help="seed of the subset")
    a = p.parse_args(argv)
    try:
        return DemoConfig(dest=a.dest, docs=a.docs, files=a.files, seed=a.seed)
    except ValueError as exc:
        p.error(str(exc))


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    status, result = run_reporting("demo", lambda: run(cfg), {}, [cfg.dest])
    if status == 0:
        print(f"demo corpus: {result.documents} documents, {len(result.files)} files, {redact_url(cfg.dest)}")
    return status


if __name__ == "__main__":
    sys.exit(console("demo", main))
