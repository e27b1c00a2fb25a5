"""Stage ``distilled_model``: distil the diffusion world model into a 1-step student.

Reads ``data/diffusion_checkpoint`` (the teacher), ``data/finetuned_vae`` (the autoencoder),
``data/validated_latents`` (training and held-out windows) and ``data/raw_trajectories`` (the real frames the
decoder fine-tune learns from). Writes ``data/distilled_model/``: the student, and in ``autoencoder/`` the
autoencoder that ships with it, whose decoder is fine-tuned on the student's own rollouts for
``decoder_minutes`` (``components.models.rollout_decoder``; 0 = the ``finetuned_vae`` one unchanged). Also
``metrics/distilled_model.json``: held-out next-frame PSNR of the student and the teacher against the ground
truth, the student against the teacher, the copy-last-latent baseline and the undistilled 1-step model, each
decoded by the ``finetuned_vae`` decoder, and the student's and copy-last-latent's PSNR with the shipped decoder.
Method: ``components.models.distillation`` (README "Distillation"). Resumable training state lives in
``.cache/distilled_model/<key>/``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from components import training
from components.atomic import atomic_write_json, file_sha256
from components.data.trajectory_store import TrajectoryStore
from components.data.windows import LatentWindows, heldout_windows
from components.errors import PipelineError
from components.images import training_charts
from components.models.autoencoder import load_autoencoder
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
from components.params import load_params

if TYPE_CHECKING:
    from components.params import DistilledModelParams


log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teacher", required=True, help="teacher world model folder")
    parser.add_argument("--autoencoder", required=True, help="autoencoder folder (its decoder is "
                        "fine-tuned on the student's rollouts and shipped with it)")
    parser.add_argument("--trajectories", required=True, help="real frames for the decoder")
    parser.add_argument("--latents", required=True, help="validated latent shards")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--metrics", required=True, help="metrics file")
    parser.add_argument("--plots", required=True, help="folder for the training curves (PNG)")
    parser.add_argument("--cache", default=".cache/distilled_model", help="resumable training state ('' = none)")


def teacher_generator(settings: DistilledModelParams, step: int) -> Any:
    """The teacher's noise for one step (``teacher_noise: fresh``): a function of (seed, step), so a resumed run
    draws what an uninterrupted one would; None for ``frozen`` (the student's own noise)."""

    if settings.teacher_noise == "frozen":
        return None
    return torch.Generator().manual_seed(settings.seed * 1_000_003 + step + 1)


def main(args: argparse.Namespace) -> None:
    params = load_params(args.params)
    settings, sampler = params.distilled_model, params.sampler
    runtime = training.start_runtime(params.device)
    torch.manual_seed(settings.seed)

    teacher = load_world_model(args.teacher, runtime.device)
    teacher.requires_grad_(False)
    autoencoder = load_autoencoder(args.autoencoder)
    autoencoder.vae.to(runtime.device)
    store = TrajectoryStore(args.latents)
    context = teacher.config.context
    frames = None
    if settings.decoder_minutes > 0:  # the decoder fine-tune's inputs, checked now, before minutes of training
        frames = TrajectoryStore(args.trajectories)
        rollout_windows(store, context, settings.decoder_rollout_steps)
    train_windows = LatentWindows(store, context + settings.rollout_steps, "train")
    if len(train_windows) == 0:
        raise PipelineError(f"{args.latents}: no training episode has the {context + settings.rollout_steps} rows "
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

    teacher_files = [file_sha256(p) for p in sorted(Path(args.teacher).glob("*")) if p.is_file()]
    key = [settings.model_dump(exclude={"checkpoint_every_s"}), sampler.model_dump(),
           training.inputs_fingerprint(store), teacher_files]
    recipe = training.Recipe(training.Budget(settings.minutes, settings.max_steps, settings.warmup_steps),
                             settings.learning_rate, seed=settings.seed, batch_size=settings.batch_size,
                             eval_every_s=settings.eval_every_s, checkpoint_every_s=settings.checkpoint_every_s)
    critic = None
    trained: torch.nn.Module = student
    if settings.adversarial_weight > 0:
        critic = LatentCritic(teacher.config.latent_channels, teacher.config.num_actions,
                              settings.critic_width).to(runtime.device)
        trained = StudentAndCritic(student, critic)
    groups: list[training.ParamGroup] = [{"params": list(student.net.parameters())}]
    if critic is not None:
        groups.append({"params": list(critic.parameters()), "lr_scale": settings.critic_lr_scale})
    result = training.train(
        trained, groups,
        lambda step: distillation_loss(student, teacher, scheduler, train_windows, settings.batch_size, step.rng,
                                       teacher_generator(settings, step.index), settings.target,
                                       settings.rollout_steps, settings.detail_weight, settings.detail_patch,
                                       critic, settings.adversarial_weight),
        recipe, runtime, training.run_folder(args.cache, runtime, key), evaluate=evaluate, name="distilled_model")
    if not result.is_main_process:
        return  # under `accelerate launch` the main process writes the outputs
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
    shipped_decoder, shipped = autoencoder, after
    if frames is not None:  # decoder_minutes > 0
        shipped_decoder = load_autoencoder(args.autoencoder)  # a copy: the metrics above keep the finetuned_vae one
        shipped_decoder.vae.to(runtime.device)
        metrics.update(fine_tune_decoder(student, shipped_decoder, store, frames, settings, runtime,
                                         training.run_folder(args.cache, runtime, key, "decoder")))
        shipped = distillation_metrics(student, teacher, shipped_decoder, heldout, picks, with_teacher=False)
    metrics["student_psnr_shipped_decoder"] = shipped["student_psnr"]
    metrics["copy_last_psnr_shipped_decoder"] = shipped["copy_last_psnr"]
    metrics["decoder_minutes"] = settings.decoder_minutes
    log.info("with the decoder that ships: student %.2f dB, copy-last-latent %.2f dB", shipped["student_psnr"],
             shipped["copy_last_psnr"])
    student.cpu()
    shipped_decoder.vae.to("cpu")
    student.save(args.out, extra={"metrics": metrics, "curve": result.curve}, autoencoder=shipped_decoder)
    atomic_write_json(args.metrics, metrics)
    training_charts(args.plots, result.losses, result.learning_rates, result.curve, "distilled_model")
    log.info("wrote %s, %s and the curves in %s", args.out, args.metrics, args.plots)
