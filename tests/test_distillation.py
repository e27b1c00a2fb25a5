"""One-step distillation (components/models/distillation.py) on a tiny real world model, and the stage's metrics."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from components.errors import PipelineError
from components.models.distillation import (
    LatentCritic,
    OneStepStudent,
    adversarial_terms,
    distillation_loss,
    load_student,
    one_step_coefficients,
    teacher_sample,
)
from components.models.sampler import sample_next_latent
from components.models.world_model import ActionConditionedUNet, make_scheduler
from components.params import WorldModelParams
from tests.fixtures.export import build_upstream, write_export_params
from tests.fixtures.processes import cli_in

K, C, SIZE, ACTIONS = 2, 4, (8, 8), 5


@pytest.fixture(scope="module")
def teacher() -> ActionConditionedUNet:
    torch.manual_seed(0)
    params = WorldModelParams(context=K, block_out_channels=[16, 32], norm_num_groups=8, cross_attention_dim=16,
                              attention_head_dim=4)
    net = ActionConditionedUNet.from_params(params, C, SIZE, ACTIONS).eval()
    return net.requires_grad_(False)


def batch(size: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn((size, K, C, *SIZE), generator=generator),
            torch.randint(0, ACTIONS, (size, K), generator=generator))


def test_one_step_coefficients_match_the_scheduler(teacher: ActionConditionedUNet) -> None:
    scheduler = make_scheduler(teacher.config, "ddim")
    scheduler.set_timesteps(1)
    t = int(scheduler.timesteps[0])
    x, v = torch.randn(2, C, *SIZE), torch.randn(2, C, *SIZE)
    coef_x, coef_v = one_step_coefficients(scheduler, t)
    expected = scheduler.step(v, t, x, eta=0.0).prev_sample
    torch.testing.assert_close(coef_x * x + coef_v * v, expected, atol=1e-5, rtol=1e-5)


def test_student_starts_as_the_teachers_one_step_sampler(teacher: ActionConditionedUNet) -> None:
    student = OneStepStudent.from_teacher(teacher, steps=4, cfg=1.0, context_noise_level=0.1, noise_seed=0)
    one_step = OneStepStudent(teacher, dataclasses.replace(student.settings, teacher_steps=1),
                              student.target_noise, student.context_eps)
    context, actions = batch()
    with torch.no_grad():
        torch.testing.assert_close(student(context, actions),
                                   teacher_sample(teacher, make_scheduler(teacher.config), one_step, context, actions))
    assert all(p.requires_grad for p in student.net.parameters())
    assert not any(p.requires_grad for p in teacher.parameters())  # the teacher is untouched


def test_teacher_target_is_the_samplers_loop(teacher: ActionConditionedUNet) -> None:
    """With clean context, the fixed-noise teacher equals sample_next_latent fed the same initial noise."""
    student = OneStepStudent.from_teacher(teacher, steps=3, cfg=1.5, context_noise_level=0.0, noise_seed=0)
    context, actions = batch(1)
    scheduler = make_scheduler(teacher.config)
    # sample_next_latent draws x_T from the generator: give it a generator that yields our frozen noise
    generator = torch.Generator().manual_seed(7)
    theirs_noise = torch.randn((1, C, *SIZE), generator=torch.Generator().manual_seed(7))
    student.target_noise.copy_(theirs_noise[0])
    ours = teacher_sample(teacher, scheduler, student, context, actions)
    theirs = sample_next_latent(teacher, scheduler, context, actions, steps=3, cfg=1.5, generator=generator)
    torch.testing.assert_close(ours, theirs)


def test_training_moves_the_student_towards_the_teacher(teacher: ActionConditionedUNet) -> None:
    torch.manual_seed(0)
    student = OneStepStudent.from_teacher(teacher, steps=4, cfg=1.5, context_noise_level=0.1, noise_seed=0)
    context, actions = batch(4)
    target = teacher_sample(teacher, make_scheduler(teacher.config), student, context, actions)
    optimizer = torch.optim.Adam(student.net.parameters(), lr=1e-3)
    losses = []
    student.train()
    for _ in range(25):
        loss = torch.mean((student(context, actions) - target) ** 2)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_moving_weight_weighs_each_rollout_step_by_its_action(teacher: ActionConditionedUNet, tmp_path: Path) -> None:
    """distilled_model.moving_weight: each window's MSE at each rollout step counts by the action taken there;
    weights that are all equal give the plain loss, weights on one action give another."""
    from components.data.trajectory_store import TrajectoryStore
    from components.data.windows import LatentWindows
    from tests.fixtures.stores import write_synthetic_latents

    store = TrajectoryStore(write_synthetic_latents(tmp_path / "latents", ACTIONS))
    windows = LatentWindows(store, K + 3, "train")
    student = OneStepStudent.from_teacher(teacher, steps=2, cfg=1.0, context_noise_level=0.1, noise_seed=0)
    scheduler = make_scheduler(teacher.config)

    def loss(weights: torch.Tensor | None) -> float:
        with torch.no_grad():
            return distillation_loss(student, teacher, scheduler, windows, 16, np.random.default_rng(0),
                                     target="data", rollout_steps=3, action_weights=weights).item()

    plain = loss(None)
    assert loss(torch.full((ACTIONS,), 5.0)) == pytest.approx(plain, rel=1e-5)
    assert loss(torch.tensor([1.0, 10.0, 1.0, 1.0, 1.0])) != pytest.approx(plain, rel=1e-3)


def test_adversarial_terms_train_each_side_against_the_other() -> None:
    """The student's term moves only the prediction (the critic's weights get no gradient from it); the critic's
    hinge loss moves only the critic (the prediction gets no gradient from it)."""
    torch.manual_seed(0)
    critic = LatentCritic(C, ACTIONS, width=8)
    last, real = torch.randn(2, C, *SIZE), torch.randn(2, C, *SIZE)
    predicted = torch.randn(2, C, *SIZE, requires_grad=True)
    action = torch.tensor([0, 3])
    student_term, critic_loss = adversarial_terms(critic, last, predicted, real, action)
    student_term.backward(retain_graph=True)
    assert predicted.grad is not None and predicted.grad.abs().sum() > 0
    assert all(p.grad is None for p in critic.parameters())
    predicted.grad = None
    critic_loss.backward()
    assert predicted.grad is None
    assert all(p.grad is not None for p in critic.parameters())


def test_critic_learns_to_tell_a_blurred_latent_from_a_real_one() -> None:
    """Trained on its hinge loss alone, the critic scores real latents above their blurred copies: the signal the
    student's term then follows towards detail."""
    torch.manual_seed(0)
    critic = LatentCritic(C, ACTIONS, width=16)
    optimizer = torch.optim.Adam(critic.parameters(), lr=1e-3)
    action = torch.zeros(8, dtype=torch.long)
    blur = torch.nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)
    for _ in range(60):
        last, real = torch.randn(8, C, *SIZE), torch.randn(8, C, *SIZE)
        _, loss = adversarial_terms(critic, last, blur(real), real, action)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    critic.eval()
    last, real = torch.randn(8, C, *SIZE), torch.randn(8, C, *SIZE)
    with torch.no_grad():
        assert critic(last, real, action).mean() > critic(last, blur(real), action).mean() + 0.5


def test_fresh_teacher_noise_draws_new_samples_around_the_frozen_one(teacher: ActionConditionedUNet) -> None:
    """teacher_noise: fresh gives a new, reproducible sample per window; frozen always gives the same one."""
    student = OneStepStudent.from_teacher(teacher, steps=2, cfg=1.5, context_noise_level=0.1, noise_seed=0)
    scheduler = make_scheduler(teacher.config)
    context, actions = batch(1)
    frozen = teacher_sample(teacher, scheduler, student, context, actions)
    first = teacher_sample(teacher, scheduler, student, context, actions, torch.Generator().manual_seed(1))
    again = teacher_sample(teacher, scheduler, student, context, actions, torch.Generator().manual_seed(1))
    other = teacher_sample(teacher, scheduler, student, context, actions, torch.Generator().manual_seed(2))
    torch.testing.assert_close(first, again)
    assert not torch.allclose(first, other) and not torch.allclose(first, frozen)
    torch.testing.assert_close(teacher_sample(teacher, scheduler, student, context, actions), frozen)


def test_fresh_noise_teaches_the_mean_of_the_teachers_samples(teacher: ActionConditionedUNet) -> None:
    """The MSE-optimal constant for fresh-noise targets is their mean, not the frozen-noise sample."""
    student = OneStepStudent.from_teacher(teacher, steps=2, cfg=1.0, context_noise_level=0.0, noise_seed=0)
    scheduler = make_scheduler(teacher.config)
    context, actions = batch(1)
    draws = torch.stack([teacher_sample(teacher, scheduler, student, context, actions,
                                        torch.Generator().manual_seed(seed)) for seed in range(32)])
    mean = draws.mean(0)
    frozen = teacher_sample(teacher, scheduler, student, context, actions)
    loss_of = lambda prediction: torch.mean((draws - prediction) ** 2).item()  # noqa: E731
    assert loss_of(mean) < loss_of(frozen)


def test_student_is_deterministic_and_batch_independent(teacher: ActionConditionedUNet) -> None:
    student = OneStepStudent.from_teacher(teacher, steps=4, cfg=1.5, context_noise_level=0.1, noise_seed=3)
    context, actions = batch(3)
    with torch.no_grad():
        whole = student(context, actions)
        torch.testing.assert_close(student(context, actions), whole)
        for row in range(3):
            torch.testing.assert_close(student(context[row : row + 1], actions[row : row + 1])[0], whole[row],
                                       atol=1e-5, rtol=1e-5)


def test_save_and_load_round_trip(teacher: ActionConditionedUNet, tmp_path: Path) -> None:
    student = OneStepStudent.from_teacher(teacher, steps=2, cfg=1.5, context_noise_level=0.2, noise_seed=1)
    student.save(tmp_path / "student")
    loaded = load_student(tmp_path / "student")
    assert loaded.settings == student.settings
    context, actions = batch(2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(context, actions), student(context, actions))
    with pytest.raises(PipelineError, match="distilled_model"):
        load_student(tmp_path / "missing")


def test_stage_metrics(tiny_export: Path) -> None:
    metrics = json.loads((tiny_export / "metrics" / "distilled_model.json").read_text())
    for key in ("student_psnr", "teacher_psnr", "student_vs_teacher_psnr", "copy_last_psnr",
                "undistilled_1step_psnr", "undistilled_1step_vs_teacher_psnr"):
        assert math.isfinite(metrics[key]) and 0 < metrics[key] <= 100, key
    assert metrics["heldout_split"] == "heldout" and metrics["heldout_windows"] >= 1
    assert metrics["train_steps"] >= 1
    student = load_student(tiny_export / "data" / "distilled_model")
    assert student.settings.teacher_steps == metrics["teacher_steps"]
    saved = json.loads((tiny_export / "data" / "distilled_model" / "student.json").read_text())
    assert saved["metrics"] == metrics
    assert np.isfinite(saved["metrics"]["final_loss"])


def _autoencoder_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "vae" / "diffusion_pytorch_model.safetensors"))


def test_stage_without_decoder_minutes_ships_the_finetuned_vae_autoencoder(tiny_export: Path) -> None:
    """``decoder_minutes: 0`` (the default and micro profiles): ``autoencoder/`` beside the student is an exact copy
    of the input autoencoder and the shipped-decoder metrics equal the ones decoded by it."""
    metrics = json.loads((tiny_export / "metrics" / "distilled_model.json").read_text())
    assert metrics["decoder_minutes"] == 0 and "decoder_steps" not in metrics
    assert metrics["student_psnr_shipped_decoder"] == metrics["student_psnr"]
    assert metrics["copy_last_psnr_shipped_decoder"] == metrics["copy_last_psnr"]
    shipped = _autoencoder_weights(tiny_export / "data" / "distilled_model" / "autoencoder")
    original = _autoencoder_weights(tiny_export / "data" / "finetuned_vae")
    assert shipped.keys() == original.keys()
    assert all(torch.equal(shipped[name], original[name]) for name in shipped)


def test_stage_ships_a_decoder_tuned_on_the_students_rollouts(tmp_path: Path) -> None:
    """``decoder_minutes`` > 0: ``autoencoder/`` beside the student holds the input encoder unchanged and a decoder
    trained further, and the metrics record the fine-tune and both PSNRs."""
    paths = build_upstream(tmp_path)
    write_export_params(tmp_path, distilled_model={"decoder_minutes": 0.05})
    out = tmp_path / "data" / "distilled_model"
    cli_in(tmp_path, "distilled_model", "--teacher", str(paths["diffusion_checkpoint"]),
           "--autoencoder", str(paths["finetuned_vae"]), "--latents", str(paths["validated_latents"]),
           "--trajectories", str(paths["raw_trajectories"]), "--out", str(out),
           "--metrics", str(tmp_path / "metrics.json"), "--plots", str(tmp_path / "plots"), "--cache", "")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["decoder_minutes"] > 0 and metrics["decoder_steps"] >= 1 and metrics["decoder_pairs"] >= 2
    for key in ("student_psnr_shipped_decoder", "copy_last_psnr_shipped_decoder"):
        assert math.isfinite(metrics[key]) and 0 < metrics[key] <= 100, key
    shipped = _autoencoder_weights(out / "autoencoder")
    original = _autoencoder_weights(paths["finetuned_vae"])
    assert shipped.keys() == original.keys()
    for name in shipped:
        if name.startswith(("encoder.", "quant_conv.")):
            torch.testing.assert_close(shipped[name], original[name], rtol=0, atol=0, msg=name)
    changed = [n for n in shipped if n.startswith("decoder.") and not torch.equal(shipped[n], original[n])]
    assert changed, "the shipped decoder is the finetuned_vae one: the fine-tune did not run"


def test_stage_trains_a_critic_beside_the_student_and_checkpoints_both(tmp_path: Path) -> None:
    """``adversarial_weight`` > 0: the stage trains the student with the critic's term, the resumable checkpoint
    holds the critic too (a resumed run continues the same game), and the student that ships is the student only."""
    from safetensors import safe_open

    paths = build_upstream(tmp_path)
    write_export_params(tmp_path, distilled_model={"adversarial_weight": 0.5, "critic_width": 8, "minutes": 100.0,
                                                   "max_steps": 3})
    out, cache = tmp_path / "data" / "distilled_model", tmp_path / "cache"
    cli_in(tmp_path, "distilled_model", "--teacher", str(paths["diffusion_checkpoint"]),
           "--autoencoder", str(paths["finetuned_vae"]), "--latents", str(paths["validated_latents"]),
           "--trajectories", str(paths["raw_trajectories"]), "--out", str(out),
           "--metrics", str(tmp_path / "metrics.json"), "--plots", str(tmp_path / "plots"),
           "--cache", str(cache))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["adversarial_weight"] == 0.5 and metrics["train_steps"] == 3
    checkpoint = next(cache.rglob("checkpoint.safetensors"))
    with safe_open(str(checkpoint), "pt") as handle:
        keys = list(handle.keys())
    assert any(k.startswith("model.critic.") for k in keys) and any(k.startswith("model.student.net.") for k in keys)
    student = load_student(out)
    assert not any("critic" in name for name in student.state_dict())


def test_stage_trains_the_student_under_bf16_autocast(tmp_path: Path) -> None:
    """``mixed_precision: bf16``: the same steps from the same seed give a different, finite loss than float32
    (the autocast is on), and the metrics say which precision trained."""
    paths = build_upstream(tmp_path)
    losses = {}
    for precision in ("no", "bf16"):
        write_export_params(tmp_path, distilled_model={"mixed_precision": precision, "minutes": 100.0,
                                                       "max_steps": 2})
        metrics_file = tmp_path / f"metrics_{precision}.json"
        cli_in(tmp_path, "distilled_model", "--teacher", str(paths["diffusion_checkpoint"]),
               "--autoencoder", str(paths["finetuned_vae"]), "--latents", str(paths["validated_latents"]),
               "--trajectories", str(paths["raw_trajectories"]), "--out", str(tmp_path / precision),
               "--metrics", str(metrics_file), "--plots", str(tmp_path / "plots"), "--cache", "")
        metrics = json.loads(metrics_file.read_text())
        assert metrics["mixed_precision"] == precision and metrics["train_steps"] == 2
        losses[precision] = metrics["final_loss"]
    assert all(math.isfinite(loss) for loss in losses.values())
    assert losses["bf16"] != losses["no"]
    assert losses["bf16"] == pytest.approx(losses["no"], rel=0.05)


@pytest.mark.parametrize("bad", ["trajectories", "rollout_steps", "mixed_precision"])
def test_stage_checks_its_inputs_before_training(tmp_path: Path, bad: str) -> None:
    """A missing frames folder, rollouts longer than any training episode or fp16 on a CPU stop the stage at once
    (exit 2, naming what to fix) and write nothing."""
    paths = build_upstream(tmp_path)
    steps = 50 if bad == "rollout_steps" else 4
    write_export_params(tmp_path, distilled_model={"decoder_minutes": 0.05, "decoder_rollout_steps": steps,
                                                   "minutes": 5.0, "max_steps": 5000,
                                                   "mixed_precision": "fp16" if bad == "mixed_precision" else "no"})
    trajectories = tmp_path / "missing" if bad == "trajectories" else paths["raw_trajectories"]
    out = tmp_path / "data" / "distilled_model"
    result = cli_in(tmp_path, "distilled_model", "--teacher", str(paths["diffusion_checkpoint"]),
                    "--autoencoder", str(paths["finetuned_vae"]), "--latents", str(paths["validated_latents"]),
                    "--trajectories", str(trajectories), "--out", str(out), "--metrics", str(tmp_path / "metrics.json"),
                    "--plots", str(tmp_path / "plots"), "--cache", "", check=False, timeout=120)
    assert result.returncode == 2, result.stderr
    expected = {"trajectories": "missing", "rollout_steps": "decoder_rollout_steps",
                "mixed_precision": "distilled_model.mixed_precision: fp16 needs a CUDA device"}
    assert expected[bad] in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists() and not (tmp_path / "metrics.json").exists()
