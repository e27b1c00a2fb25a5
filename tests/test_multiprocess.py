"""Two training processes on this CPU machine (gloo), launched as the README shows:
``accelerate launch --multi_gpu --num_processes 2 -m components <stage>`` (with no GPU the processes run on the
CPU; accelerate's ``--cpu`` flag would start one process only).

The world model: the configured step count, the loss goes down, the outputs written once by the main process, and
a real SIGKILL of the whole launch resumes to the weights of an uninterrupted two-process run. The autoencoder:
the same engine, two processes, one set of outputs."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
from safetensors.torch import load_file

from tests.fixtures.models import tiny_autoencoder
from tests.fixtures.params import micro_params_dict, write_params
from tests.fixtures.processes import pipeline_env
from tests.fixtures.stores import checkpoint_step, write_synthetic_latents

STEPS = 60


def _launch(tmp: Path, stage: list[str]) -> list[str]:
    with socket.socket() as probe:  # a free port for the process group's rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
            str(port), "-m", "components", "--params", str(tmp / "params.yaml"), *stage]


def _world_model(tmp: Path, name: str) -> list[str]:
    return _launch(tmp, [
        "diffusion_checkpoint", "--latents", str(tmp / "latents"), "--autoencoder", str(tmp / "autoencoder"),
        "--trajectories", str(tmp / "frames"), "--out", str(tmp / name / "model"),
        "--metrics", str(tmp / name / "metrics.json"), "--plots", str(tmp / name),
        "--live-dir", str(tmp / name / "dvclive"), "--cache", str(tmp / name / "cache"),
    ])


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run(command, cwd=cwd, env=pipeline_env(threads=1), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def _inputs(tmp: Path) -> dict:
    raw = micro_params_dict(device="cpu", diffusion_checkpoint={"steps": STEPS, "checkpoint_every": 15,
                                                                "log_every": 5},
                            autoencoder={"train_minutes": 10.0, "max_steps": 12, "eval_every_s": 1000.0})
    write_params(tmp / "params.yaml", raw)
    write_synthetic_latents(tmp / "latents", len(raw["environment"]["actions"]), shards=1, episodes=3,
                            frames_root=tmp / "frames")
    tiny_autoencoder(folder=tmp / "autoencoder", norm_groups=8)
    return raw


def test_two_processes_train_the_world_model_and_resume_after_sigkill(tmp_path: Path) -> None:
    _inputs(tmp_path)

    # 1. start two processes, wait for the first checkpoint, then SIGKILL the launcher and its workers (torch's
    #    launcher starts each worker in a session of its own, so they are found as its descendants)
    with open(tmp_path / "killed.log", "w") as log:
        launcher = subprocess.Popen(_world_model(tmp_path, "run"), cwd=tmp_path, env=pipeline_env(threads=1),
                                    stdout=log, stderr=log)
        deadline = time.monotonic() + 300
        while checkpoint_step(tmp_path / "run" / "cache") is None:
            assert launcher.poll() is None, (tmp_path / "killed.log").read_text()[-4000:]
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.02)
        workers = psutil.Process(launcher.pid).children(recursive=True)
        for process in [psutil.Process(launcher.pid), *workers]:
            process.send_signal(signal.SIGKILL)
        launcher.wait(timeout=60)
        psutil.wait_procs(workers, timeout=60)
    assert "saved the world model" not in (tmp_path / "killed.log").read_text()
    killed_at = checkpoint_step(tmp_path / "run" / "cache")
    assert killed_at is not None and 0 < killed_at < STEPS
    assert not (tmp_path / "run" / "metrics.json").exists()

    # 2. the same launch again: both processes resume from the checkpoint; the main process writes the outputs once
    rerun = _run(_world_model(tmp_path, "run"), tmp_path)
    assert "process 0 of 2" in rerun.stderr and "process 1 of 2" in rerun.stderr
    assert rerun.stderr.count(f"at step {killed_at} of {STEPS}") == 2, rerun.stderr[-4000:]
    assert rerun.stderr.count("saved the world model") == 1
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["steps"] == STEPS and metrics["resumed_from_step"] == killed_at and metrics["processes"] == 2
    curve = (tmp_path / "run" / "dvclive" / "plots" / "metrics" / "train" / "loss.tsv").read_text().split("\n")
    losses = [float(line.split("\t")[-1]) for line in curve[1:] if line]
    # every 5 steps and the first step of each run (resumed: one more)
    assert len(losses) == STEPS // 5 + 2 and sum(losses[-3:]) < sum(losses[:3]), losses  # it learns

    # 3. an uninterrupted two-process run ends with the same weights
    _run(_world_model(tmp_path, "fresh"), tmp_path)
    resumed = load_file(str(tmp_path / "run" / "model" / "model.safetensors"))
    uninterrupted = load_file(str(tmp_path / "fresh" / "model" / "model.safetensors"))
    assert resumed.keys() == uninterrupted.keys()
    differing = [k for k in resumed if not (resumed[k] - uninterrupted[k]).abs().max() <= 1e-5]
    assert not differing, differing[:5]


def test_two_processes_train_the_autoencoder(tmp_path: Path) -> None:
    _inputs(tmp_path)
    done = _run(_launch(tmp_path, [
        "base_autoencoder", "--trajectories", str(tmp_path / "frames"), "--out", str(tmp_path / "ae"),
        "--metrics", str(tmp_path / "metrics.json"), "--curve", str(tmp_path / "curve.json"),
        "--plots", str(tmp_path / "curves"), "--cache", str(tmp_path / "cache"),
    ]), tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["steps"] == 12 and metrics["processes"] == 2
    assert done.stderr.count("scaling factor") == 1  # only the main process measures and writes
    assert (tmp_path / "ae" / "autoencoder.json").is_file()
