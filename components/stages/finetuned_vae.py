"""Stage ``finetuned_vae``: freeze the encoder, fine-tune the decoder on game frames with pixel MSE (the paper's step).

With ``detail_weight`` > 0 the loss adds the detail term (``components.metrics.detail_loss``): the local
Laplacian RMS of the decoded frame against the real one, which MSE alone lets blur away.

Trains on the training-split frames of the episodes that passed the latent gate (``data/validated_latents``),
with optional kornia brightness/contrast jitter; the target is the (augmented) frame itself. The encoder, its
quantisation conv and the scaling factor are unchanged, so ``data/validated_latents`` stays valid for the
fine-tuned decoder.

Writes ``data/finetuned_vae/`` (a full ``FrameAutoencoder`` folder), ``metrics/finetuned_vae.json`` (held-out
PSNR, SSIM and sharpness above the HUD of decode(encode(x)) before and after) and
``plots/finetuned_vae/reconstructions.png`` (rows: original, base decoder, fine-tuned decoder). Resumable state:
``.cache/finetuned_vae/<hash>/``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import kornia
import numpy as np
import torch

from components import training
from components.atomic import atomic_write_json, file_sha256
from components.data.trajectory_store import TrajectoryStore
from components.errors import PipelineError
from components.images import frame_grid, to_uint8, training_charts
from components.models.autoencoder import (
    VAE_SUBFOLDER,
    FrameSampler,
    decoder_loss,
    evaluation_frames,
    load_autoencoder,
    reconstruction_metrics,
)
from components.params import load_params

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trajectories", required=True, help="trajectory shards (frames)")
    parser.add_argument("--latents", required=True, help="validated latents (which episodes)")
    parser.add_argument("--autoencoder", required=True, help="base autoencoder folder")
    parser.add_argument("--out", required=True, help="the fine-tuned autoencoder folder to write")
    parser.add_argument("--metrics", required=True, help="metrics JSON")
    parser.add_argument("--plots", required=True, help="folder for the charts and reconstructions (PNG)")
    parser.add_argument("--cache", default=".cache/finetuned_vae", help="resumable state; '' disables it")


def main(args: argparse.Namespace) -> None:
    params = load_params(args.params)
    settings = params.finetuned_vae
    runtime = training.start_runtime(params.device)
    torch.manual_seed(settings.seed)
    base = load_autoencoder(args.autoencoder)
    autoencoder = load_autoencoder(args.autoencoder)  # the copy whose decoder is trained
    base.vae.to(runtime.device)
    autoencoder.vae.to(runtime.device)
    trajectories = TrajectoryStore(args.trajectories)
    validated = {e.episode_id for e in TrajectoryStore(args.latents, verify_checksums=False).episodes}
    train_frames = FrameSampler(trajectories, "train", validated)
    if not train_frames.total:
        raise PipelineError(f"{args.latents}: no validated training episodes to fine-tune the decoder on")
    eval_frames, eval_split = evaluation_frames(trajectories, settings.eval_frames, validated)

    vae = autoencoder.vae
    for module in (vae.encoder, vae.quant_conv):
        if module is not None:
            module.requires_grad_(False)
    trainable = [t for t in vae.parameters() if t.requires_grad]
    log.info("fine-tuning the decoder: %.2fM of %.2fM params trainable",
             sum(t.numel() for t in trainable) / 1e6, sum(t.numel() for t in vae.parameters()) / 1e6)


    augment = kornia.augmentation.ColorJiggle(brightness=0.15, contrast=0.15, p=0.5) if settings.augment else None
    def loss_fn(step: training.Step) -> torch.Tensor:
        frames = train_frames.random_batch(settings.batch_size, step.rng).to(step.device)
        if augment is not None:
            frames = augment(frames).clamp(0.0, 1.0)
        with torch.no_grad():
            latents = autoencoder.encode(frames)
        return decoder_loss(autoencoder, latents, frames, settings.detail_weight, settings.detail_patch,
                                settings.ssim_weight)

    before = reconstruction_metrics(base.eval(), eval_frames, view_rows=params.environment.view_rows)
    log.info("base decoder on %s frames: PSNR %.2f dB, SSIM %.4f, sharpness %.3f", eval_split, before["psnr"],
             before["ssim"], before["sharpness"])
    weights = Path(args.autoencoder) / VAE_SUBFOLDER / "diffusion_pytorch_model.safetensors"
    weights_hash = file_sha256(weights) if weights.is_file() else ""
    key = [settings.model_dump(exclude={"checkpoint_every_s"}), base.config(), weights_hash,
           training.inputs_fingerprint(trajectories), sorted(validated)]
    budget = training.Budget(settings.train_minutes, settings.max_steps, settings.warmup_steps)
    recipe = training.Recipe(budget, settings.learning_rate, seed=settings.seed, batch_size=settings.batch_size,
                             checkpoint_every_s=settings.checkpoint_every_s)
    result = training.train(vae, trainable, loss_fn, recipe, runtime, training.run_folder(args.cache, runtime, key),
                            name="finetuned_vae")
    if not result.is_main_process:
        return  # under `accelerate launch` the main process writes the outputs
    vae.eval()
    vae.encoder.requires_grad_(True)  # saved weights are unaffected; keeps the loaded model ordinary
    after = reconstruction_metrics(autoencoder, eval_frames, view_rows=params.environment.view_rows)
    log.info("fine-tuned decoder on %s frames: PSNR %.2f dB (%+.2f), SSIM %.4f, sharpness %.3f", eval_split,
             after["psnr"], after["psnr"] - before["psnr"], after["ssim"], after["sharpness"])

    picks = np.linspace(0, len(eval_frames) - 1, min(settings.grid_frames, len(eval_frames))).round().astype(int)
    grid = eval_frames[picks]
    with torch.no_grad():
        rows = [("original", grid), ("base decoder", base.reconstruct(grid)),
                ("fine-tuned", autoencoder.reconstruct(grid))]
        frame_grid(Path(args.plots) / "reconstructions.png", [(label, list(to_uint8(f))) for label, f in rows], [],
                   scale=3)
    training_charts(args.plots, result.losses, result.learning_rates, [], "finetuned_vae")
    metrics = {
        "eval_split": eval_split,
        "eval_frames": before["frames"],
        "psnr_before": before["psnr"],
        "psnr_after": after["psnr"],
        "psnr_gain": after["psnr"] - before["psnr"],
        "ssim_before": before["ssim"],
        "ssim_after": after["ssim"],
        "sharpness_before": before["sharpness"],
        "sharpness_after": after["sharpness"],
        "detail_weight": settings.detail_weight,
        "steps": result.steps,
        "train_seconds": round(result.seconds, 1),
        "step_ms": round(1000 * result.seconds / result.steps, 1) if result.steps else None,
        "train_samples_per_s": round(result.samples_per_s, 2),
        "processes": runtime.processes,
    }
    autoencoder.vae.to("cpu")
    autoencoder.save(args.out, extra={"source": "finetuned_decoder", "base": str(args.autoencoder), **{
        f"eval_{k}": v for k, v in metrics.items() if k.startswith(("psnr", "ssim", "sharpness"))}})
    atomic_write_json(args.metrics, metrics)
