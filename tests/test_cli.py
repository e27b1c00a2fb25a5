"""The command line (components/cli.py) run by an interpreter that is not the project's environment."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.processes import REPO_ROOT


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment with the standard library only: a `python` without the project's packages."""
    folder = tmp_path_factory.mktemp("bare") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True, timeout=120)
    return folder / "bin" / "python"


@pytest.mark.parametrize("command", [["--help"], ["raw_trajectories"], ["play", "--port", "0"]])
def test_another_python_stops_with_one_line_saying_to_use_the_project_environment(
        bare_python: Path, command: list[str]) -> None:
    result = subprocess.run([str(bare_python), "-m", "components", *command], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {bare_python}") and "source .venv/bin/activate" in lines[0]
    assert "cannot import" in lines[0]


def test_a_command_imports_its_own_stage_module_and_no_other() -> None:
    """The CLI builds every command's help but imports only the chosen command's module (so each stage imports
    what it needs at its top and pays for no other stage's libraries); `--help` alone imports none."""
    probe = ("import sys; from components.cli import build_parser; build_parser({!r}); "
             "print(','.join(sorted(m for m in sys.modules if m.startswith('components.stages.'))))")
    for command, expected in (("check", "components.stages.check"), ("", "")):
        result = subprocess.run([sys.executable, "-c", probe.format(command)], cwd=REPO_ROOT, capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == expected
