"""Shared fixtures: real temporary copies of this repo (git + DVC) on the micro profile."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


CHROMIUM = Path("/usr/bin/chromium")  # Debian's package (`make browser`); never `playwright install`
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
needs_chromium = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (make browser)")


@contextmanager
def chromium_page(width: int = 1280, height: int = 720) -> Iterator[Any]:
    """A page of Debian's headless Chromium, driven by Playwright; skips the test when the browser is absent."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent (Debian package `chromium`, `make browser`)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser.new_page(viewport={"width": width, "height": height})
        finally:
            browser.close()


def pipeline_env() -> dict[str, str]:
    """Environment for subprocesses: the venv first on PATH, analytics and telemetry off, 2 threads."""
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(DVC_NO_ANALYTICS="1", DAGSTER_DISABLE_TELEMETRY="1", PYTHONPATH=str(REPO_ROOT))
    env.setdefault("OMP_NUM_THREADS", "2")
    return env


def run(cmd: list[str], cwd: Path, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run a command, returning its output; on failure the assertion shows stdout and stderr."""
    result = subprocess.run(cmd, cwd=cwd, env=pipeline_env(), capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def wait_for_url(process: subprocess.Popen, pattern: str, what: str, timeout: float = 60.0) -> str:
    """The first match of ``pattern`` (one group: the URL) in ``process``'s output lines; if it exits or ``timeout``
    passes first, kill its group and fail the test with what it printed."""
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        match = re.search(pattern, line)
        if match:
            return match.group(1)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=10)
    pytest.fail(f"{what} did not start:\n" + "".join(lines))


def stop_process(process: subprocess.Popen, what: str, timeout: float = 10.0) -> None:
    """SIGTERM ``process``'s group (started with ``start_new_session``) and wait; past ``timeout``, SIGKILL it and
    fail the test with its last output, so a server that ignores SIGTERM is reported as that."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate(timeout=10)
        pytest.fail(f"{what} did not stop within {timeout:g} s of SIGTERM (killed); its last output:\n"
                    f"{(output or '')[-3000:]}")


def micro_params_dict(**overrides: Any) -> dict[str, Any]:
    """This checkout's params.yaml + the micro profile + ``overrides`` (nested sections merge)."""
    from components.params import deep_merge, profile_params, read_yaml

    return deep_merge(profile_params("micro", read_yaml(REPO_ROOT / "params.yaml")), overrides)


def write_params(path: Path, raw: dict[str, Any]) -> Path:
    """Validate ``raw`` (so a wrong override fails here, not in a subprocess) and write it to ``path``."""
    from components.params import parse_params

    parse_params(raw)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def write_micro_params(folder: Path, **overrides: Any) -> Path:
    """The micro profile of this checkout's params.yaml plus ``overrides``, written to ``folder/params.yaml``."""
    return write_params(folder / "params.yaml", micro_params_dict(**overrides))


def components_cli(*args: str, cwd: Path = REPO_ROOT, params: Path | None = None, check: bool = False,
                   timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m components [--params params] args`` in ``cwd`` with the pipeline's environment; with ``check``
    a failure raises, showing its output."""
    command = [sys.executable, "-m", "components", *(["--params", str(params)] if params else []), *args]
    result = subprocess.run(command, cwd=cwd, env=pipeline_env(), capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{args[0]} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


# Pipeline outputs that git does not ignore (a `make run` in this checkout leaves them); copies start without them.
PIPELINE_OUTPUTS = {"dvc.lock", "metrics", "plots", "reports"}


def project_files() -> list[str]:
    """Tracked and untracked-but-not-ignored files, pipeline outputs left out: what a fresh clone plus local edits
    would hold."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO_ROOT, capture_output=True, text=True, check=True,
    ).stdout.split("\n")
    return [f for f in listed if f and (REPO_ROOT / f).is_file() and Path(f).parts[0] not in PIPELINE_OUTPUTS]


def make_repo_copy(destination: Path, profile: str | None = "micro") -> Path:
    """Copy the project into ``destination`` as a fresh git + DVC repo, with ``profile`` applied."""
    for name in project_files():
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / name, target)
    run(["git", "init", "-q"], destination)
    run(["git", "config", "user.email", "ci@example.invalid"], destination)
    run(["git", "config", "user.name", "ci"], destination)
    if profile:
        run([sys.executable, "-m", "components", "profile", profile], destination)
    run(["git", "add", "-A"], destination)
    run(["git", "commit", "-q", "-m", "fixture"], destination)
    return destination


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
    """A real ONNX export from tiny untrained upstream artifacts (about a minute; see tests/export_fixtures.py).

    Holds data/distilled_model, data/onnx_export, metrics/distilled_model.json and reports/onnx_export.json.
    Tests must not modify it.
    """
    from tests.export_fixtures import build_tiny_export

    return build_tiny_export(tmp_path_factory.mktemp("tiny_export"))
