"""By hand, as the README shows it: the params check before DVC touches anything, the project's interpreter for
every stage whatever `python` comes first on PATH, and one command that puts every output of dvc.lock back."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.fixtures.params import write_params
from tests.fixtures.processes import REPO_ROOT, pipeline_env, run

COMPONENTS = [sys.executable, "-m", "components"]


def copy_pipeline(micro_pipeline: Path, tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    shutil.copytree(micro_pipeline, repo, symlinks=True)
    return repo


def locked_outputs(repo: Path) -> list[str]:
    """Every output path dvc.lock records (cached or not)."""
    stages = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    return sorted({out["path"] for stage in stages.values() for out in stage.get("outs", [])})


def snapshot(repo: Path, paths: list[str]) -> dict[str, str]:
    """sha256 of every file under ``paths`` (files or folders); a missing path shows as missing."""
    digests = {}
    for path in paths:
        root = repo / path
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for file in files:
            name = str(file.relative_to(repo))
            digests[name] = hashlib.sha256(file.read_bytes()).hexdigest() if file.is_file() else "missing"
    return digests


def dvc_status(repo: Path) -> dict:
    return json.loads(run(["dvc", "status", "--json"], repo).stdout or "{}")


def test_a_wrong_value_stops_before_dvc_touches_anything_and_restore_undoes_a_plain_dvc_repro(
        micro_pipeline: Path, tmp_path: Path) -> None:
    repo = copy_pipeline(micro_pipeline, tmp_path)
    good = yaml.safe_load((repo / "params.yaml").read_text())
    bad = json.loads(json.dumps(good))
    bad["diffusion_checkpoint"]["batch_size"] = -1
    bad["sampler"]["cfg"] = "high"
    write_params(repo / "params.yaml", bad, validate=False)
    outputs = locked_outputs(repo)
    before = snapshot(repo, [*outputs, "dvc.lock"])
    status = dvc_status(repo)

    checked = run([*COMPONENTS, "repro", "diffusion_checkpoint"], repo, check=False)
    assert checked.returncode == 2, checked.stderr
    assert "diffusion_checkpoint.batch_size" in checked.stderr and "sampler.cfg" in checked.stderr
    assert snapshot(repo, [*outputs, "dvc.lock"]) == before
    assert dvc_status(repo) == status

    # A plain `dvc repro` finds the wrong value only inside the stage, after DVC has removed its outputs ...
    plain = run(["dvc", "repro", "diffusion_checkpoint"], repo, check=False)
    assert plain.returncode != 0 and "diffusion_checkpoint.batch_size" in plain.stdout + plain.stderr
    assert not (repo / "metrics" / "diffusion_checkpoint.json").exists()
    assert not (repo / "data" / "diffusion_checkpoint").exists()
    # ... and `restore` puts every one of them back, metrics and plots included.
    write_params(repo / "params.yaml", good, validate=False)
    run([*COMPONENTS, "restore"], repo)
    assert snapshot(repo, [*outputs, "dvc.lock"]) == before
    assert dvc_status(repo) == {}


@pytest.mark.parametrize(("stage_name", "watched"), [("finetuned_vae", "metrics/finetuned_vae.json"),
                                                     ("validated_latents", "reports/validated_latents.json")])
def test_restore_brings_back_every_output_of_dvc_lock_after_a_killed_stage(
        micro_pipeline: Path, tmp_path: Path, stage_name: str, watched: str) -> None:
    """``watched`` goes when DVC starts the stage. finetuned_vae's metrics come back from the run-cache; the latent
    gate's report, a cached out since 2026-12-08, from the DVC cache (before, it never came back)."""
    repo = copy_pipeline(micro_pipeline, tmp_path)
    outputs = locked_outputs(repo)
    before = snapshot(repo, [*outputs, "dvc.lock"])
    watched_path = repo / watched
    stage = subprocess.Popen([*COMPONENTS, "repro", "--force", "--single-item", stage_name], cwd=repo,
                             env=pipeline_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while watched_path.exists() and stage.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not watched_path.exists(), "DVC never removed the stage's outputs"
        time.sleep(1.0)  # the stage's command is starting
    finally:
        os.killpg(stage.pid, signal.SIGKILL)
        stage.wait(timeout=30)
    killed = dvc_status(repo)
    assert stage_name in killed and "deleted" in json.dumps(killed[stage_name]), killed

    restored = run([*COMPONENTS, "restore"], repo)
    assert watched in restored.stdout and f"data/{stage_name}" in restored.stdout, restored.stdout
    assert snapshot(repo, [*outputs, "dvc.lock"]) == before
    assert dvc_status(repo) == {}


def readme_by_hand_commands() -> list[str]:
    """The commands of the README's "Running one stage by hand" block, comments stripped, continued lines joined."""
    section = (REPO_ROOT / "README.md").read_text().split("### Running one stage by hand", 1)[1]
    block = section.split("```bash", 1)[1].split("```", 1)[0]
    code = "\n".join(line.split("#", 1)[0].rstrip() for line in block.splitlines()).replace("\\\n", " ")
    return [line.strip() for line in code.splitlines() if line.strip()]


@pytest.fixture()
def bare_python_first(tmp_path: Path) -> dict[str, str]:
    """Subprocess environment whose first `python` on PATH is a fresh venv without the project's packages."""
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True, timeout=120)
    env = pipeline_env()
    env["PATH"] = f"{bare / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"
    return env


def test_the_readmes_by_hand_commands_work_as_written_whatever_python_comes_first(
        micro_repo: Path, bare_python_first: dict[str, str]) -> None:
    commands = readme_by_hand_commands()
    assert any(" repro " in c for c in commands) and any(" restore" in c for c in commands), commands
    (micro_repo / ".venv").symlink_to(Path(sys.executable).parent.parent)  # the README's .venv/bin/python
    for command in commands:
        result = subprocess.run(["bash", "-c", command], cwd=micro_repo, env=bare_python_first, capture_output=True,
                                text=True, timeout=900)
        assert result.returncode == 0, f"{command}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert (micro_repo / "data" / "raw_trajectories" / "shard-0").is_dir()
    ran = set(yaml.safe_load((micro_repo / "dvc.lock").read_text())["stages"])
    assert {"rl_agent", "raw_trajectories@0"} <= ran
    assert not ran & set(dvc_status(micro_repo))  # `restore` ended on exactly what dvc.lock records


def test_check_names_every_bad_key_of_a_profile_or_an_override(tmp_path: Path) -> None:
    ok = run([*COMPONENTS, "check", "--profile", "micro", "-S", "sampler.cfg=2"], REPO_ROOT)
    assert "valid" in ok.stdout
    bad = run([*COMPONENTS, "check", "-S", "sampler.cfg=high", "-S", "world_model.contxt=3"], REPO_ROOT, check=False)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "sampler.cfg" in bad.stderr and "world_model.contxt: unknown key" in bad.stderr
    malformed = run([*COMPONENTS, "check", "-S", "sampler.cfg"], REPO_ROOT, check=False)
    assert malformed.returncode == 2 and "section.key=value" in malformed.stderr
