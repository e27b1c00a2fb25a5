"""Stage ``diffusion_checkpoint`` survives a real SIGKILL: the rerun resumes from the last checkpoint, ends at the
configured step count, and writes the same weights as a run that was never interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from safetensors.torch import load_file

from components.models.world_model import load_world_model
from tests.fixtures.models import tiny_autoencoder
from tests.fixtures.params import micro_params_dict, write_params
from tests.fixtures.processes import pipeline_env
from tests.fixtures.stores import checkpoint_step, write_synthetic_latents

STEPS = 60


def _command(tmp: Path, name: str) -> list[str]:
    return [
        sys.executable, "-m", "components", "--params", str(tmp / "params.yaml"), "diffusion_checkpoint",
        "--latents", str(tmp / "latents"), "--autoencoder", str(tmp / "autoencoder"),
        "--trajectories", str(tmp / "frames"),
        "--out", str(tmp / name / "model"), "--metrics", str(tmp / name / "metrics.json"),
        "--plots", str(tmp / name), "--live-dir", str(tmp / name / "dvclive"),
        "--cache", str(tmp / name / "cache"),
    ]


def test_sigkill_then_rerun_resumes_to_the_same_result(tmp_path: Path) -> None:
    raw = micro_params_dict(diffusion_checkpoint={"steps": STEPS, "checkpoint_every": 15, "log_every": 5})
    write_params(tmp_path / "params.yaml", raw)
    write_synthetic_latents(tmp_path / "latents", len(raw["environment"]["actions"]), shards=1, episodes=3,
                            frames_root=tmp_path / "frames")
    tiny_autoencoder(folder=tmp_path / "autoencoder", norm_groups=8)

    # 1. start, wait for the first checkpoint, then SIGKILL the training process
    with open(tmp_path / "killed.log", "w") as log:
        process = subprocess.Popen(_command(tmp_path, "run"), cwd=tmp_path, env=pipeline_env(threads=1), stdout=log,
                                   stderr=log)
        deadline = time.monotonic() + 300
        while checkpoint_step(tmp_path / "run" / "cache") is None:
            assert process.poll() is None, (tmp_path / "killed.log").read_text()
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    killed_at = checkpoint_step(tmp_path / "run" / "cache")
    assert killed_at is not None and 0 < killed_at < STEPS
    assert not (tmp_path / "run" / "model").exists() and not (tmp_path / "run" / "metrics.json").exists()

    # 2. rerun: resumes from the checkpoint and finishes
    rerun = subprocess.run(_command(tmp_path, "run"), cwd=tmp_path, env=pipeline_env(threads=1), capture_output=True,
                           text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"at step {killed_at} of {STEPS}" in rerun.stderr, rerun.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["steps"] == STEPS and metrics["resumed_from_step"] == killed_at
    assert checkpoint_step(tmp_path / "run" / "cache") == STEPS
    net = load_world_model(tmp_path / "run" / "model")
    assert net.config.context == raw["world_model"]["context"]
    assert (tmp_path / "run" / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # 3. a run never interrupted ends with the same weights
    fresh = subprocess.run(_command(tmp_path, "fresh"), cwd=tmp_path, env=pipeline_env(threads=1), capture_output=True,
                           text=True, timeout=600)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    resumed = load_file(str(tmp_path / "run" / "model" / "model.safetensors"))
    uninterrupted = load_file(str(tmp_path / "fresh" / "model" / "model.safetensors"))
    assert resumed.keys() == uninterrupted.keys()
    differing = [k for k in resumed if not (resumed[k] - uninterrupted[k]).abs().max() <= 1e-5]
    assert not differing, differing[:5]
