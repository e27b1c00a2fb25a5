"""Shared pytest fixtures: real temporary copies of this repo (git + DVC) on the micro profile, and a tiny export.

The helpers behind them, and those the tests import, are in the package tests/fixtures/.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.processes import make_repo_copy, run


@pytest.fixture()
def micro_repo(tmp_path: Path) -> Path:
    """A fresh micro-profile copy of the repo, nothing run yet."""
    return make_repo_copy(tmp_path / "repo")


@pytest.fixture(scope="session")
def micro_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A micro-profile copy on which the whole `dvc repro` has run once; shared by the tests that read outputs.

    Tests must not modify it: copy it (``shutil.copytree``) first if a test needs to change something.
    """
    repo = make_repo_copy(tmp_path_factory.mktemp("pipeline") / "repo")
    run(["dvc", "repro"], repo, timeout=1500)
    yield repo


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real ONNX export from tiny untrained upstream artifacts (about a minute; see tests/fixtures/export.py).

    Holds data/distilled_model, data/onnx_export, metrics/distilled_model.json and reports/onnx_export.json.
    Tests must not modify it.
    """
    from tests.fixtures.export import build_tiny_export

    return build_tiny_export(tmp_path_factory.mktemp("tiny_export"))
