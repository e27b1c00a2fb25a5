"""Stage ``diffusion_checkpoint``: train the action-conditioned diffusion world model on ``validated_latents``.

Outputs: ``data/diffusion_checkpoint/`` (``model.safetensors``, ``config.json``, ``scheduler_config.json``; load
with ``components.models.world_model.load_world_model``), ``metrics/diffusion_checkpoint.json``,
``plots/diffusion_checkpoint/samples.png`` (held-out context | predicted | real, decoded with ``finetuned_vae``)
and the DVCLive curves in ``dvclive/diffusion_checkpoint/``.

Resumable: a killed run continues from ``.cache/diffusion_checkpoint/<key>/`` when rerun (see
components/models/world_model_training.py). Several GPUs or processes (README "GPU machines and several processes")::

    accelerate launch --multi_gpu --num_processes 8 -m components diffusion_checkpoint <its arguments in dvc.yaml>
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from components.atomic import atomic_write_json
from components.errors import PipelineError
from components.images import training_charts
from components.models.autoencoder import load_autoencoder
from components.models.world_model_training import heldout_metrics, open_latents, save_preview, train
from components.params import load_params
from components.training import resolve_device

log = logging.getLogger(__name__)

SAMPLES_FILE = "samples.png"  # in --plots: held-out context | predicted | real


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--latents", required=True, help="shards of latents to train on")
    parser.add_argument("--autoencoder", required=True, help="decodes the sample previews")
    parser.add_argument("--trajectories", required=True,
                        help="the recorded frames behind the latents (the action warp is fitted on them)")
    parser.add_argument("--out", required=True, help="folder for the trained model")
    parser.add_argument("--metrics", required=True, help="metrics JSON")
    parser.add_argument("--plots", required=True, help="folder for samples.png and the training charts")
    parser.add_argument("--live-dir", required=True, help="DVCLive folder; '' disables it")
    parser.add_argument("--cache", default=".cache/diffusion_checkpoint",
                        help="resumable checkpoints; '' disables them")
    parser.add_argument("--no-preview", action="store_true", help="skip the decoded sample PNG (debugging)")


def main(args: argparse.Namespace) -> None:
    params = load_params(args.params)
    autoencoder = None if args.no_preview else load_autoencoder(args.autoencoder)
    run = train(params, args.latents, cache_root=args.cache or None, live_dir=args.live_dir or None,
                frames_root=args.trajectories)
    result, world_model = run.result, run.world_model
    if not result.is_main_process:
        return  # under `accelerate launch` the main process writes the outputs
    if autoencoder is not None and tuple(autoencoder.latent_shape) != (
        world_model.config.latent_channels, *world_model.config.latent_size
    ):
        raise PipelineError(
            f"{args.autoencoder}: its latents are {tuple(autoencoder.latent_shape)} but {args.latents} holds "
            f"{(world_model.config.latent_channels, *world_model.config.latent_size)}; rerun validated_latents with "
            "this autoencoder"
        )
    world_model.save(args.out)
    log.info("saved the world model to %s", args.out)

    store = open_latents(args.latents, world_model.config.context, world_model.config.num_actions)
    settings = params.diffusion_checkpoint
    torch.manual_seed(settings.seed)
    evaluation = heldout_metrics(world_model, store, params, max(settings.eval_windows, settings.preview_windows),
                                 seed=settings.seed, device=resolve_device(params.device))
    if autoencoder is not None:
        samples = Path(args.plots) / SAMPLES_FILE
        save_preview(samples, autoencoder, evaluation["batch"], evaluation["sampled"], settings.preview_windows)
        log.info("sample predictions: %s", samples)
    metrics = {
        "steps": result.steps,
        "planned_steps": result.planned_steps,
        "train_minutes_budget": settings.train_minutes,
        "resumed_from_step": result.resumed_from_step,
        "final_train_loss": result.losses[-1][1] if result.losses else result.last_loss,
        "train_samples_per_s": result.samples_per_s,
        "processes": result.processes,
        "train_seconds": result.seconds,
        "parameters": world_model.num_parameters(),
        "context": world_model.config.context,
        "latent_shape": [world_model.config.latent_channels, *world_model.config.latent_size],
        "sampler": params.sampler.model_dump(),
        "action_warp": None if world_model.action_warp is None else world_model.action_warp.describe(
            [a.name for a in params.environment.actions]),
        "residual_scale": float(world_model.residual_scale) if world_model.config.predict_residual else None,
        **{k: v for k, v in evaluation.items() if k not in ("batch", "sampled")},
    }
    atomic_write_json(args.metrics, metrics)
    training_charts(args.plots, result.losses, result.learning_rates, [], "diffusion_checkpoint")
    log.info("metrics: %s", {k: metrics[k] for k in ("steps", "final_train_loss", "heldout_loss",
                                                     "sampled_latent_mse", "copy_last_latent_mse")})

