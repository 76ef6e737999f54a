"""The `quantlake` dispatcher: commands, help and version."""
import re
import tomllib

import pytest

from jobs.cli import COMMANDS, main as cli

from isolated import REPO


def test_version_is_the_packages(capsys):
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert cli(["--version"]) == 0
    assert capsys.readouterr().out == f"quantlake {version}\n"


@pytest.mark.parametrize("argv", [["help", "vacuum"], ["vacuum", "--help"]])
def test_help_for_a_command_prints_its_options(argv, capsys):
    with pytest.raises(SystemExit) as stop:
        cli(argv)
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: quantlake vacuum") and "--older-than" in out


@pytest.mark.parametrize("argv,status", [([], 2), (["--help"], 0), (["help"], 0)])
def test_the_command_list(argv, status, capsys):
    assert cli(argv) == status
    out = capsys.readouterr().out
    assert re.findall(r"^  (\w+) ", out, re.M) == list(COMMANDS)
    assert "quantlake help <command>" in out


def test_an_unknown_command_is_named_with_the_nearest_one(capsys):
    assert cli(["ingets", "a", "b"]) == 2
    assert capsys.readouterr().err == ("quantlake: unknown command 'ingets' (did you mean 'ingest'?); choose from "
                                       + ", ".join(COMMANDS) + "\n")
    assert cli(["--verbose"]) == 2
    assert capsys.readouterr().err.startswith("quantlake: unknown command '--verbose'; choose from ingest, ")
