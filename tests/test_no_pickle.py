"""No pickle of data anywhere in the project: every source file is parsed and searched."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SKIP = {".venv", ".git", "build", "lake", "out", "__pycache__", ".pytest_cache", ".hypothesis"}
PICKLING_MODULES = {"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "joblib", "shelve", "marshal"}


def forbidden_uses(source: str) -> list[str]:
    """`line: what` for each use of a pickling module or option in `source` (code, not text)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""] + [a.name for a in node.names]
        elif isinstance(node, ast.Name):
            names = [node.id]
        elif isinstance(node, ast.Attribute):
            names = [node.attr]
        for name in names:
            if "pickle" in name.lower() or set(name.split(".")) & PICKLING_MODULES:
                found.append(f"{node.lineno}: {name}")
        if isinstance(node, ast.Call):
            for kw in node.keywords:
                if kw.arg == "allow_pickle" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                    found.append(f"{node.lineno}: allow_pickle={ast.unparse(kw.value)}")
            func = ast.unparse(node.func)
            weights_only = any(kw.arg == "weights_only" and isinstance(kw.value, ast.Constant)
                               and kw.value.value is True for kw in node.keywords)
            if func.endswith("torch.load") and not weights_only:
                found.append(f"{node.lineno}: {func} without weights_only=True")
    return sorted(found, key=lambda f: int(f.split(":")[0]))


def _sources():
    for path in sorted(ROOT.rglob("*.py")):
        if not SKIP & set(path.relative_to(ROOT).parts):
            yield path


def test_the_check_catches_each_kind_of_use():
    sample = ("import pickle\nfrom ray import cloudpickle\nimport numpy as np\n"
              "x = np.load('a.npy', allow_pickle=True)\ny = ray.cloudpickle.dumps(x)\n"
              "df.to_pickle('p')\nimport torch\nm = torch.load('m.pt')\n"
              "ok = np.load('a.npy', allow_pickle=False)\n# pickle in a comment\ns = 'pickle in a string'\n")
    assert forbidden_uses(sample) == ["1: pickle", "2: cloudpickle", "4: allow_pickle=True",
                                   "5: cloudpickle", "6: to_pickle", "8: torch.load without weights_only=True"]


@pytest.mark.parametrize("path", list(_sources()), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_pickle_in_project_sources(path):
    assert forbidden_uses(path.read_text()) == [], (
        f"{path.relative_to(ROOT)} uses pickle: data must travel as JSON, Arrow/Parquet or raw bytes")
