"""The `quantlake` console script: `quantlake <command> ...` runs that command's `jobs.<module>.main`."""
from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import sys

from jobs.common import console

# The module of a command, where it is not the command's own name (`inspect` would shadow the
# standard library's module of that name for `python jobs/inspect.py`).
MODULES = {"inspect": "inspect_dataset"}
COMMANDS = {
    "ingest": "calibrate, encode, quantize and write a source lake as a new dataset version",
    "search": "search a committed dataset version",
    "reindex": "bring a dataset up to date with its source lake: only what changed is encoded",
    "history": "list a dataset's versions: parent, what changed, rows, drift",
    "rollback": "commit a new version whose content equals an earlier one",
    "inspect": "show a dataset's versions, shards and sizes",
    "vacuum": "delete files no committed version references",
    "demo": "build the demo corpus (docstrings of installed Python modules) as Parquet",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--version"]:
        print(f"quantlake {_version()}")
        return 0
    if argv[:1] == ["help"] and len(argv) == 2:
        argv = [argv[1], "--help"]  # `quantlake help ingest`, as git and pip take it
    if not argv or argv[0] in ("-h", "--help", "help"):
        print("usage: quantlake <command> [args]\n\ncommands:")
        for name, text in COMMANDS.items():
            print(f"  {name:<8} {text}")
        print("\n`quantlake <command> --help` (or `quantlake help <command>`) lists a command's options; "
              "`quantlake --version` prints the version")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        near = difflib.get_close_matches(name, COMMANDS, 1)
        print(f"quantlake: unknown command {name!r}" + (f" (did you mean {near[0]!r}?)" if near else "")
              + f"; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(f"jobs.{MODULES.get(name, name)}")
    except ModuleNotFoundError as exc:
        print(f"quantlake: command {name!r} is not available in this build ({exc})", file=sys.stderr)
        return 2
    return console(name, module.main, rest)


def _version() -> str:
    try:
        return importlib.metadata.version("quantlake")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "(not installed)"


if __name__ == "__main__":
    sys.exit(main())
