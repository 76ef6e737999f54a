"""The dependency rule of workers/ (see workers/__init__.py), read from every module's imports."""
import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# What each part may import of the project; "shared" is workers.vocab and workers.ray_session.
ALLOWED = {
    "ranges": {"ranges"},
    "embedding": {"ranges", "embedding", "shared"},
    "lake": {"ranges", "lake", "shared"},
    "ingest": {"ranges", "embedding", "lake", "ingest", "shared"},
    "search": {"ranges", "embedding", "lake", "search", "shared"},
    "shared": {"ranges", "lake", "shared"},
}


def part(module: str) -> str | None:
    """The part a dotted module name belongs to, or None outside the project (and for jobs)."""
    names = module.split(".")
    if names[0] == "ranges":
        return "ranges"
    if names[0] != "workers":
        return None
    if len(names) == 1 or names[1] in ("vocab", "ray_session"):
        return "shared"
    return names[1]


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


MODULES = sorted(p for folder in ("workers", "ranges") for p in (REPO / folder).rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(REPO)))
def test_each_module_imports_only_what_its_part_may_use(path):
    module = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
    mine = part(module)
    assert mine in ALLOWED, f"{module} is in no part of the layout"
    bad = sorted(m for m in imports(path) if part(m) is not None and part(m) not in ALLOWED[mine])
    assert not bad, f"{module} ({mine}) imports {bad}, outside {sorted(ALLOWED[mine])}"


def test_the_three_subsystems_and_their_core_are_folders():
    folders = {p.name for p in (REPO / "workers").iterdir() if (p / "__init__.py").exists()}
    assert folders == {"embedding", "lake", "ingest", "search"}
    loose = {p.name for p in (REPO / "workers").glob("*.py")}
    assert loose == {"__init__.py", "vocab.py", "ray_session.py"}
