"""Training the 1-step student (stage ``distilled_model``) on the shared engine, and measuring it.

``distil`` loads the teacher and the autoencoder, trains the student (``components.models.distillation``: the
model and its loss) on training windows of ``validated_latents``, optionally fine-tunes the decoder that ships with
it on the student's own rollouts (``components.models.rollout_decoder``, ``distilled_model.decoder_minutes``), and
measures both on held-out windows. The stage writes what it returns. Resumable state lives in
``<cache>/<run key>/`` (and ``<cache>/<run key>/decoder/``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from components import training
from components.atomic import file_sha256
from components.data.trajectory_store import TrajectoryStore
from components.data.windows import LatentWindows, heldout_windows
from components.errors import PipelineError
from components.evaluation.actions import action_loss_weights
from components.models.autoencoder import FrameAutoencoder, load_autoencoder
from components.models.distillation import (
    LatentCritic,
    OneStepStudent,
    StudentAndCritic,
    context_and_future,
    distillation_loss,
    distillation_metrics,
    teacher_sample,
)
from components.models.rollout_decoder import fine_tune_decoder, rollout_windows
from components.models.world_model import load_world_model, make_scheduler

if TYPE_CHECKING:
    from components.params import DistilledModelParams, Params


log = logging.getLogger(__name__)


@dataclass
class StudentRun:
    student: OneStepStudent  # on the CPU, in eval mode
    autoencoder: FrameAutoencoder  # the one that ships with the student (its decoder tuned with decoder_minutes > 0)
    metrics: dict[str, Any]
    result: training.TrainResult


def teacher_generator(settings: DistilledModelParams, step: int) -> torch.Generator | None:
    """The teacher's noise for one step (``teacher_noise: fresh``): a function of (seed, step), so a resumed run
    draws what an uninterrupted one would; None for ``frozen`` (the student's own noise)."""

    if settings.teacher_noise == "frozen":
        return None
    return torch.Generator().manual_seed(settings.seed * 1_000_003 + step + 1)


def distil(params: Params, teacher_folder: str | Path, autoencoder_folder: str | Path,
           trajectories: str | Path, latents: str | Path, cache: str | Path | None) -> StudentRun | None:
    """Train (or resume) the student of the teacher in ``teacher_folder``; None on a process other than the main
    one under ``accelerate launch`` (the main process writes the outputs)."""

    settings, sampler = params.distilled_model, params.sampler
    runtime = training.start_runtime(params.device)
    training.check_precision(settings.mixed_precision, runtime.device, "distilled_model.mixed_precision")
    torch.manual_seed(settings.seed)

    teacher = load_world_model(teacher_folder, runtime.device)
    teacher.requires_grad_(False)
    autoencoder = load_autoencoder(autoencoder_folder)
    autoencoder.vae.to(runtime.device)
    store = TrajectoryStore(latents)
    context = teacher.config.context
    frames = None
    if settings.decoder_minutes > 0:  # the decoder fine-tune's inputs, checked now, before minutes of training
        frames = TrajectoryStore(trajectories)
        rollout_windows(store, context, settings.decoder_rollout_steps)
    train_windows = LatentWindows(store, context + settings.rollout_steps, "train")
    if len(train_windows) == 0:
        raise PipelineError(f"{latents}: no training episode has the {context + settings.rollout_steps} rows "
                            f"a {settings.rollout_steps}-step rollout needs; lower distilled_model.rollout_steps "
                            "or record longer episodes")
    heldout = heldout_windows(store, context + 1, "distilled_model's held-out metrics")
    picks = heldout.evenly_spaced(settings.eval_windows)

    student = OneStepStudent.from_teacher(teacher, sampler.steps, sampler.cfg, sampler.context_noise_level,
                                          settings.noise_seed, settings.target, settings.rollout_steps
                                          ).to(runtime.device)
    log.info("teacher: %d steps, cfg %.2f, context noise %.2f (bucket %d); student runs at t=%d",
             sampler.steps, sampler.cfg, sampler.context_noise_level, student.settings.noise_bucket,
             student.settings.timestep)
    before = distillation_metrics(student, teacher, autoencoder, heldout, picks)
    log.info("before distillation: %s", {k: round(v, 3) for k, v in before.items()})

    # A fixed held-out batch with its targets (the teacher's samples, or the real next latents), for the curve.
    curve_context, curve_actions, curve_future = context_and_future(heldout, picks[:16], context, runtime.device)
    curve_next = curve_future[:, 0]
    scheduler = make_scheduler(teacher.config, "ddim")
    if settings.target == "teacher":
        curve_next = teacher_sample(teacher, scheduler, student, curve_context, curve_actions)

    def evaluate() -> dict[str, float]:
        with torch.no_grad():
            return {f"mse_vs_{settings.target}":  # held-out: charted as curve_heldout_mse_vs_<target>.png
                    torch.mean((student(curve_context, curve_actions) - curve_next) ** 2).item()}

    teacher_files = [file_sha256(p) for p in sorted(Path(teacher_folder).glob("*")) if p.is_file()]
    key = [settings.model_dump(exclude={"checkpoint_every_s"}), sampler.model_dump(),
           training.inputs_fingerprint(store), teacher_files]
    recipe = training.Recipe(training.Budget(settings.minutes, settings.max_steps, settings.warmup_steps),
                             settings.learning_rate, seed=settings.seed, batch_size=settings.batch_size,
                             mixed_precision=settings.mixed_precision, eval_every_s=settings.eval_every_s,
                             checkpoint_every_s=settings.checkpoint_every_s)
    critic = None
    trained: torch.nn.Module = student
    if settings.adversarial_weight > 0:
        critic = LatentCritic(teacher.config.latent_channels, teacher.config.num_actions,
                              settings.critic_width).to(runtime.device)
        trained = StudentAndCritic(student, critic)
    groups: list[training.ParamGroup] = [{"params": list(student.net.parameters())}]
    action_weights = action_loss_weights(params.environment.actions, settings.moving_weight, runtime.device)
    if critic is not None:
        groups.append({"params": list(critic.parameters()), "lr_scale": settings.critic_lr_scale})
    result = training.train(
        trained, groups,
        lambda step: distillation_loss(student, teacher, scheduler, train_windows, settings.batch_size, step.rng,
                                       teacher_generator(settings, step.index), settings.target,
                                       settings.rollout_steps, settings.detail_weight, settings.detail_patch,
                                       critic, settings.adversarial_weight, action_weights),
        recipe, runtime, training.run_folder(cache, runtime, key), evaluate=evaluate, name="distilled_model")
    if not result.is_main_process:
        return None
    student.eval()
    after = distillation_metrics(student, teacher, autoencoder, heldout, picks)
    log.info("after distillation (%d steps, %.0f s): %s", result.steps, result.seconds,
             {k: round(v, 3) for k, v in after.items()})

    metrics = {
        "student_psnr": after["student_psnr"],
        "teacher_psnr": after["teacher_psnr"],
        "student_vs_teacher_psnr": after["student_vs_teacher_psnr"],
        "copy_last_psnr": after["copy_last_psnr"],
        "undistilled_1step_psnr": before["student_psnr"],
        "undistilled_1step_vs_teacher_psnr": before["student_vs_teacher_psnr"],
        "heldout_windows": int(after["windows"]),
        "heldout_split": "heldout",
        "train_steps": result.steps,
        "train_seconds": round(result.seconds, 1),
        "train_samples_per_s": round(result.samples_per_s, 2),
        "processes": runtime.processes,
        "final_loss": result.last_loss,
        "mixed_precision": settings.mixed_precision,
        "teacher_steps": sampler.steps,
        "cfg": sampler.cfg,
        "context_noise_level": sampler.context_noise_level,
        "teacher_noise": settings.teacher_noise,
        "target": settings.target,
        "rollout_steps": settings.rollout_steps,
        "detail_weight": settings.detail_weight,
        "detail_patch": settings.detail_patch,
        "adversarial_weight": settings.adversarial_weight,
        "critic_lr_scale": settings.critic_lr_scale,
    }
    shipped_autoencoder, shipped = autoencoder, after
    if frames is not None:  # decoder_minutes > 0
        shipped_autoencoder = load_autoencoder(autoencoder_folder)  # a copy: the metrics above keep the input's
        shipped_autoencoder.vae.to(runtime.device)
        metrics.update(fine_tune_decoder(student, shipped_autoencoder, store, frames, settings, runtime,
                                         training.run_folder(cache, runtime, key, "decoder")))
        shipped = distillation_metrics(student, teacher, shipped_autoencoder, heldout, picks, with_teacher=False)
    metrics["student_psnr_shipped_decoder"] = shipped["student_psnr"]
    metrics["copy_last_psnr_shipped_decoder"] = shipped["copy_last_psnr"]
    metrics["decoder_minutes"] = settings.decoder_minutes
    log.info("with the decoder that ships: student %.2f dB, copy-last-latent %.2f dB", shipped["student_psnr"],
             shipped["copy_last_psnr"])
    student.cpu()
    shipped_autoencoder.vae.to("cpu")
    return StudentRun(student, shipped_autoencoder, metrics, result)


__all__ = ["StudentRun", "distil", "teacher_generator"]
