"""docs/experiments: the tools behind README's "measured and not kept" rows refuse bad input before copying
anything, and compare finished runs side by side."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.fixtures.processes import REPO_ROOT

TOOLS = REPO_ROOT / "docs" / "experiments"


def finished_run(folder: Path, margin: float, steps: int) -> Path:
    """The files of a finished run that the tools read: params.yaml and the metrics."""
    (folder / "metrics").mkdir(parents=True)
    (folder / "params.yaml").write_text(yaml.safe_dump({"distilled_model": {"minutes": 8.0}}))
    (folder / "metrics" / "evaluation.json").write_text(json.dumps(
        {"headline": {"onnx/margin_db_vs_copy_last_latent": margin}}))
    (folder / "metrics" / "diffusion_checkpoint.json").write_text(json.dumps({"steps": steps}))
    return folder


def rerun_from(*args: str | Path) -> subprocess.CompletedProcess:
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # the tool runs `python`
    return subprocess.run(["bash", str(TOOLS / "rerun_from.sh"), *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "PATH": path}, timeout=60)


def test_rerun_from_refuses_an_unfinished_run_and_an_unknown_param_before_copying(tmp_path: Path) -> None:
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    result = rerun_from(unfinished, tmp_path / "copy")
    assert result.returncode == 2 and "is not a finished run" in result.stderr
    source = finished_run(tmp_path / "run", 2.25, 2752)
    result = rerun_from(source, tmp_path / "copy", "distilled_model.no_such_key=11")
    assert result.returncode != 0 and "'distilled_model.no_such_key=11': give KEY=VALUE" in result.stderr
    result = rerun_from(source, tmp_path / "copy", "distilled_model.minutes")
    assert result.returncode != 0 and "give KEY=VALUE" in result.stderr
    assert not (tmp_path / "copy").exists()  # nothing copied
    result = rerun_from(source, source)
    assert result.returncode == 2 and "exists; give a new folder" in result.stderr
    assert rerun_from().returncode == 2
    result = rerun_from(tmp_path / "missing", tmp_path / "copy")
    assert result.returncode == 2 and "is not a folder" in result.stderr
    result = rerun_from(source, tmp_path / "missing" / "copy")
    assert result.returncode == 2 and "no folder" in result.stderr


def test_compare_runs_puts_the_headlines_side_by_side(tmp_path: Path) -> None:
    runs = [finished_run(tmp_path / "runK", 2.255, 2752), finished_run(tmp_path / "runW", 2.051, 1584)]
    result = subprocess.run([sys.executable, str(TOOLS / "compare_runs.py"), *map(str, runs)], capture_output=True,
                            text=True, check=True, timeout=60)
    rows = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()[1:]}
    assert rows["onnx/margin_db_vs_copy_last_latent"] == ["2.255", "2.051"]
    assert rows["diffusion_checkpoint.steps"] == ["2752", "1584"]
    assert rows["onnx/controllability_turning"] == ["None", "None"]  # missing numbers shown, not guessed


def test_a_copy_that_cannot_be_set_up_is_removed_and_shows_no_numbers(tmp_path: Path) -> None:
    """The copy starts with the source's metrics: when it cannot be set up (here the source is no DVC repository,
    so DVC has no graph to take the upstream stages from), the tool exits non-zero, prints no comparison and
    leaves no half-made copy behind."""
    source = finished_run(tmp_path / "run", 2.25, 2752)
    result = rerun_from(source, tmp_path / "copy", "distilled_model.minutes=11")
    assert result.returncode != 0 and "margin_db" not in result.stdout, result.stdout
    assert not (tmp_path / "copy").exists()
    assert (source / "metrics" / "evaluation.json").exists()  # the source is untouched


def test_the_upstream_stages_come_from_dvcs_graph(tmp_path: Path) -> None:
    """The stages taken as they are are the world model's ancestors in `dvc dag`; in a DVC repo whose outputs are
    missing, `dvc commit` then fails and the half-made copy is removed."""
    source = finished_run(tmp_path / "run", 2.25, 2752)
    shutil.copy(REPO_ROOT / "params.yaml", source / "params.yaml")  # dvc.yaml's foreach reads it
    for command in (["git", "init", "-q"], [str(Path(sys.executable).parent / "dvc"), "init", "-q"]):
        subprocess.run(command, cwd=source, check=True, capture_output=True, timeout=60)
    result = rerun_from(source, tmp_path / "copy", "--keep", "diffusion_checkpoint")
    taken = next(line for line in result.stdout.splitlines() if line.startswith("taken as they are:"))
    assert sorted(taken.split(":")[1].split()) == sorted([
        "rl_agent", "raw_trajectories", "base_autoencoder", "validated_latents", "finetuned_vae",
        "diffusion_checkpoint"])
    assert result.returncode != 0 and not (tmp_path / "copy").exists()
