"""The shared training engine (components/training.py): plan, exact resume, run key, device and precision checks."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from components.errors import PipelineError
from components.training import (
    CHECKPOINT_FILE,
    PLAN_AT,
    REPLAN_AT,
    Budget,
    Recipe,
    Step,
    check_precision,
    load_checkpoint,
    resolve_device,
    run_folder,
    start_runtime,
    train,
)
from tests.fixtures.params import micro_params_dict, write_params
from tests.fixtures.processes import pipeline_env
from tests.fixtures.stores import checkpoint_step, write_synthetic_latents


def _model_and_loss() -> tuple[torch.nn.Module, object]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 1))
    data = torch.randn(64, 4)
    target = data.sum(dim=1, keepdim=True)

    def loss_fn(step: Step) -> torch.Tensor:
        rows = torch.from_numpy(step.rng.integers(0, len(data), 8))  # the step's own draws: exact on resume
        noise = 0.01 * torch.randn(8, 1, generator=step.generator)
        return torch.nn.functional.mse_loss(model(data[rows]), target[rows] + noise)

    return model, loss_fn


def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(tmp_path: Path) -> None:
    recipe = Recipe(Budget(None, 12, warmup_steps=2), 0.05, seed=3, grad_clip=1.0, ema_decay=0.5)
    runtime = start_runtime("cpu")
    model, loss_fn = _model_and_loss()
    whole = train(model, list(model.parameters()), loss_fn, recipe, runtime, tmp_path / "whole")
    uninterrupted = {k: v.clone() for k, v in model.state_dict().items()}
    assert whole.steps == whole.planned_steps == 12 and whole.losses[-1][1] < whole.losses[0][1] + 1.0

    model, loss_fn = _model_and_loss()
    part = train(model, list(model.parameters()), loss_fn, recipe, runtime, tmp_path / "cut", stop_after=5)
    assert (part.steps, part.resumed_from_step) == (5, 0)
    assert load_checkpoint(tmp_path / "cut" / CHECKPOINT_FILE).counters["step"] == 5
    model, loss_fn = _model_and_loss()  # a new process starts from other weights; the checkpoint restores them
    rest = train(model, list(model.parameters()), loss_fn, recipe, runtime, tmp_path / "cut")
    assert (rest.steps, rest.resumed_from_step) == (12, 5)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, uninterrupted[name], rtol=0, atol=1e-6, msg=name)


def test_parameter_groups_learn_at_their_own_rate_and_resume_with_it(tmp_path: Path) -> None:
    """A group with ``lr_scale`` learns at that multiple of the recipe's rate (0: not at all), and a resumed run
    keeps the scale."""
    recipe = Recipe(Budget(None, 6, warmup_steps=0), 0.01, seed=3)
    runtime = start_runtime("cpu")
    model, loss_fn = _model_and_loss()
    first, second = model[0], model[2]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    groups = [{"params": list(first.parameters()), "lr_scale": 0.0},
              {"params": list(second.parameters()), "lr_scale": 3.0}]
    train(model, groups, loss_fn, recipe, runtime, tmp_path / "run", stop_after=3)
    assert torch.equal(model[0].weight, before["0.weight"]) and not torch.equal(model[2].weight, before["2.weight"])
    saved = load_checkpoint(tmp_path / "run" / CHECKPOINT_FILE).optimizer["param_groups"]
    assert [g["lr_scale"] for g in saved] == [0.0, 3.0] and saved[0]["lr"] == 0.0 and saved[1]["lr"] > 0.0
    model, loss_fn = _model_and_loss()
    groups = [{"params": list(model[0].parameters()), "lr_scale": 0.0},
              {"params": list(model[2].parameters()), "lr_scale": 3.0}]
    train(model, groups, loss_fn, recipe, runtime, tmp_path / "run")
    assert torch.equal(model[0].weight, before["0.weight"])


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_damaged_checkpoint_stops_with_one_line_saying_to_delete_it(tmp_path: Path, damage: str) -> None:
    recipe = Recipe(Budget(None, 6, warmup_steps=1), 0.05, seed=3)
    model, loss_fn = _model_and_loss()
    train(model, list(model.parameters()), loss_fn, recipe, start_runtime("cpu"), tmp_path, stop_after=3)
    checkpoint = tmp_path / CHECKPOINT_FILE
    data = checkpoint.read_bytes()
    checkpoint.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"not a checkpoint" * 64,
                            "empty": b""}[damage])
    model, loss_fn = _model_and_loss()
    with pytest.raises(PipelineError, match="unreadable checkpoint .*delete it to start over") as raised:
        train(model, list(model.parameters()), loss_fn, recipe, start_runtime("cpu"), tmp_path)
    assert str(checkpoint) in str(raised.value) and "\n" not in str(raised.value)


def test_the_run_key_covers_the_inputs_and_the_process_count(tmp_path: Path) -> None:
    runtime = start_runtime("cpu")
    first = run_folder(tmp_path, runtime, {"lr": 1e-3}, ["sha-a"])
    assert first == run_folder(tmp_path, runtime, {"lr": 1e-3}, ["sha-a"])
    assert first != run_folder(tmp_path, runtime, {"lr": 1e-3}, ["sha-b"])  # other data: another run
    two = type(runtime)(runtime.device, 0, 2)
    assert first != run_folder(tmp_path, two, {"lr": 1e-3}, ["sha-a"])  # two processes: another run
    assert run_folder("", runtime, {"lr": 1e-3}) is None  # no cache: no checkpoints


def test_a_spent_time_budget_stops_as_soon_as_it_is_timed(tmp_path: Path) -> None:
    recipe = Recipe(Budget(1e-4, 10_000), 0.01)  # a budget spent as soon as it is measured
    model, loss_fn = _model_and_loss()
    result = train(model, list(model.parameters()), loss_fn, recipe, start_runtime("cpu"), tmp_path)
    assert result.steps == result.planned_steps == PLAN_AT
    assert load_checkpoint(tmp_path / CHECKPOINT_FILE).counters["planned"] == PLAN_AT


def test_a_time_budget_is_refitted_when_the_steps_slow_down(tmp_path: Path) -> None:
    model, loss_fn = _model_and_loss()

    def slowing_loss(step: Step) -> torch.Tensor:  # 2 ms a step while the plan is first timed, then 8 ms
        time.sleep(0.002 if step.index < PLAN_AT + 15 else 0.008)
        return loss_fn(step)  # type: ignore[operator]

    budget_s = 1.2  # the first plan (at 2 ms a step) is about 500 steps: 4 s at the later speed
    recipe = Recipe(Budget(budget_s / 60, 10_000), 0.01)
    result = train(model, list(model.parameters()), slowing_loss, recipe, start_runtime("cpu"), tmp_path)
    counters = load_checkpoint(tmp_path / CHECKPOINT_FILE).counters
    # refitted at least once; how many of REPLAN_AT's points get their 20 timed steps depends on the machine's speed
    assert 1 <= counters["replans"] <= len(REPLAN_AT), counters
    assert counters["planned"] == result.planned_steps == result.steps
    assert budget_s * 0.6 < result.seconds < budget_s * 1.6, result.seconds  # fitted once: about 3.5 s
    assert result.steps < budget_s / 0.004  # far fewer steps than the first timing fitted


def test_the_learning_rate_plan() -> None:
    budget = Budget(None, 1000, warmup_steps=10)
    assert budget.lr_scale(0, 1000) == pytest.approx(0.1)  # warming up
    assert budget.lr_scale(20, 1000) > 0.99
    assert budget.lr_scale(505, 1000) == pytest.approx(0.51, abs=0.01)  # half-way down the cosine
    assert budget.lr_scale(1000, 1000) == pytest.approx(budget.min_lr_fraction)
    assert Budget(None, 1000, schedule="constant").lr_scale(900, 1000) == 1.0
    assert Budget(None, 100, warmup_steps=50).lr_scale(0, 100) == pytest.approx(1 / 5)  # warm-up <= 5% of the run
    assert Budget(2.0, 10_000).plan(25, 0.01, 60.0) == 6025  # 60 s left at 10 ms a step
    assert Budget(2.0, 500).plan(25, 0.01, 60.0) == 500  # never more than max_steps


def test_device_auto_is_the_cpu_here_and_cuda_without_a_gpu_stops() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(PipelineError, match=r"^device: cuda, but torch sees no CUDA GPU.*set device: auto or cpu"):
        resolve_device("cuda")
    with pytest.raises(PipelineError, match="diffusion_checkpoint.mixed_precision: fp16 needs a CUDA device"):
        check_precision("fp16", torch.device("cpu"), "diffusion_checkpoint.mixed_precision")
    check_precision("bf16", torch.device("cpu"), "autoencoder.mixed_precision")  # bf16 runs on the CPU


def test_a_stage_asked_for_cuda_without_a_gpu_stops_before_any_work(tmp_path: Path, capsys) -> None:
    from components.cli import main

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    params = write_params(tmp_path / "params.yaml", micro_params_dict(device="cuda"))
    code = main(["--params", str(params), "base_autoencoder", "--trajectories", str(tmp_path / "missing"),
                 "--out", str(tmp_path / "out"), "--metrics", str(tmp_path / "metrics.json"),
                 "--curve", str(tmp_path / "curve.json"), "--plots", str(tmp_path / "curves")])
    assert code == 2
    assert "error: device: cuda, but torch sees no CUDA GPU" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [params]  # nothing written, not even the missing input noticed first


def test_the_ppo_agent_resumes_from_the_shared_checkpoint_format(tmp_path: Path) -> None:
    """SB3 keeps its loop; its resume state is the engine's safetensors checkpoint under the shared run key."""
    from components.game.agent import resume_folder
    from components.game.agent import train as train_agent
    from components.params import parse_params

    params = parse_params(micro_params_dict(rl_agent={"total_timesteps": 256, "checkpoints": 2}))
    folder = resume_folder(params, tmp_path / "cache")

    class Interrupted(Exception):
        pass

    def stop_after_first_snapshot(index: int, reward: float, length: int, timesteps: int) -> None:
        if (folder / CHECKPOINT_FILE).is_file():
            raise Interrupted

    with pytest.raises(Interrupted):
        train_agent(params, tmp_path / "first", tmp_path / "cache", on_episode=stop_after_first_snapshot)
    saved = load_checkpoint(folder / CHECKPOINT_FILE)
    assert saved.counters["step"] == 128 and "action_net.weight" in saved.model
    result = train_agent(params, tmp_path / "second", tmp_path / "cache")
    assert result.resumed_from_step == 128 and result.timesteps == 256
    assert [c["timesteps"] for c in result.checkpoints] == [128, 256]
    assert (tmp_path / "second" / "checkpoints" / "step-000000128.safetensors").is_file()  # restored snapshot
    assert not folder.exists()  # finished: nothing left to resume


def test_base_autoencoder_survives_sigkill_with_the_weights_of_an_uninterrupted_run(tmp_path: Path) -> None:
    """The engine's kill -9 resume through a second trainer than the world model (tests/test_world_model_resume.py):
    the stage is killed after its first checkpoint, rerun, and ends with the weights of a run never interrupted."""
    steps = 150
    raw = micro_params_dict(autoencoder={"max_steps": steps, "train_minutes": 30.0, "checkpoint_every_s": 0.3,
                                         "eval_every_s": 1000.0})
    write_params(tmp_path / "params.yaml", raw)
    write_synthetic_latents(tmp_path / "latents", len(raw["environment"]["actions"]), shards=1, episodes=3,
                            frames_root=tmp_path / "frames")

    def command(name: str) -> list[str]:
        return [sys.executable, "-m", "components", "--params", str(tmp_path / "params.yaml"), "base_autoencoder",
                "--trajectories", str(tmp_path / "frames"), "--out", str(tmp_path / name / "model"),
                "--metrics", str(tmp_path / name / "metrics.json"), "--curve", str(tmp_path / name / "curve.json"),
                "--plots", str(tmp_path / name / "curves"), "--cache", str(tmp_path / name / "cache")]

    with open(tmp_path / "killed.log", "w") as log:
        process = subprocess.Popen(command("run"), env=pipeline_env(threads=1), stdout=log, stderr=log)
        deadline = time.monotonic() + 300
        while checkpoint_step(tmp_path / "run" / "cache") is None:
            assert process.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.02)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
    killed_at = checkpoint_step(tmp_path / "run" / "cache")
    assert killed_at is not None and 0 < killed_at < steps and not (tmp_path / "run" / "metrics.json").exists()

    # the resumed run and an uninterrupted one, side by side (one thread each)
    logs = {name: open(tmp_path / f"{name}.log", "w") for name in ("run", "fresh")}
    runs = {name: subprocess.Popen(command(name), env=pipeline_env(threads=1), stdout=log, stderr=log)
            for name, log in logs.items()}
    try:
        for process in runs.values():
            process.wait(timeout=600)
    finally:  # a timeout leaves neither run behind
        for name, process in runs.items():
            if process.poll() is None:
                process.kill()
                process.wait()
            logs[name].close()
    for name, process in runs.items():
        assert process.returncode == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["steps"] == steps and metrics["resumed_from_step"] == killed_at
    resumed = load_file(str(tmp_path / "run" / "model" / "vae" / "diffusion_pytorch_model.safetensors"))
    uninterrupted = load_file(str(tmp_path / "fresh" / "model" / "vae" / "diffusion_pytorch_model.safetensors"))
    differing = [k for k in resumed if not (resumed[k] - uninterrupted[k]).abs().max() <= 1e-5]
    assert resumed.keys() == uninterrupted.keys() and not differing, differing[:5]


def test_a_run_resumed_at_its_end_logs_its_history_again_into_an_emptied_dvclive_folder(tmp_path: Path) -> None:
    """DVC deletes a stage's DVCLive folder before it reruns the stage; a code change that leaves the run key alone
    resumes the run at its last step, and DVCLive's outputs must still be there afterwards, with the whole run."""
    recipe = Recipe(Budget(None, 12, warmup_steps=2), 0.05, seed=3, log_every=4)
    runtime = start_runtime("cpu")
    model, loss_fn = _model_and_loss()
    first = train(model, list(model.parameters()), loss_fn, recipe, runtime, tmp_path / "run",
                  live_dir=tmp_path / "live")
    history = (tmp_path / "live" / "plots" / "metrics" / "train" / "loss.tsv").read_text()
    shutil.rmtree(tmp_path / "live" / "plots")  # what `dvc repro` does to the output dvc.yaml tracks
    model, loss_fn = _model_and_loss()
    again = train(model, list(model.parameters()), loss_fn, recipe, runtime, tmp_path / "run",
                  live_dir=tmp_path / "live")
    assert (again.steps, again.resumed_from_step) == (12, 12)
    replayed = (tmp_path / "live" / "plots" / "metrics" / "train" / "loss.tsv").read_text()
    assert [row.split("\t")[1:] for row in replayed.splitlines()] == [
        row.split("\t")[1:] for row in history.splitlines()]  # the same steps and losses (the timestamps differ)
    assert (tmp_path / "live" / "plots" / "metrics" / "train" / "lr.tsv").is_file()
    assert again.last_loss == first.last_loss and math.isfinite(first.last_loss)


@pytest.mark.parametrize("saved", ["absent", "nan"])
def test_a_checkpoint_without_the_last_loss_resumes_with_its_last_logged_loss(tmp_path: Path, saved: str) -> None:
    """Checkpoints written before the engine kept ``last_loss`` (and those such a run saved again, with NaN) resume
    at their end with the last logged loss (the stages write it as their final loss), not NaN."""
    recipe = Recipe(Budget(None, 12, warmup_steps=2), 0.05, seed=3, log_every=4)
    runtime = start_runtime("cpu")
    model, loss_fn = _model_and_loss()
    first = train(model, list(model.parameters()), loss_fn, recipe, runtime, tmp_path / "run")
    path = tmp_path / "run" / CHECKPOINT_FILE
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    counters = json.loads(metadata["counters"])
    if saved == "absent":
        del counters["last_loss"]
    else:
        counters["last_loss"] = float("nan")  # json writes NaN, and reads it back
    save_file(load_file(str(path)), str(path), metadata={**metadata, "counters": json.dumps(counters)})
    model, loss_fn = _model_and_loss()
    again = train(model, list(model.parameters()), loss_fn, recipe, runtime, tmp_path / "run")
    assert (again.steps, again.resumed_from_step) == (12, 12)
    assert again.last_loss == first.losses[-1][1] and math.isfinite(again.last_loss)
