"""Stage ``base_autoencoder``: the autoencoder the latents are made with, before the decoder fine-tune.

With ``autoencoder.pretrained`` (a local SD-style VAE folder) it loads that VAE and only measures the latent
scaling factor. Otherwise (the default: no model hub here) it trains a small ``AutoencoderKL`` from config on
training-split frames, MSE + KL (bf16 autocast with ``autoencoder.mixed_precision``), for
``autoencoder.train_minutes``, measuring held-out PSNR as it goes.

Writes ``data/base_autoencoder/`` (a ``FrameAutoencoder`` folder), ``metrics/base_autoencoder.json`` and the
PSNR-against-training-time curve ``plots/base_autoencoder/psnr_curve.json``. Resumable training state lives in
``.cache/base_autoencoder/<hash of params and input data>/``.
"""

from __future__ import annotations

import argparse
import logging

import torch

from components import training
from components.atomic import atomic_write_json
from components.data.trajectory_store import TrajectoryStore
from components.errors import PipelineError
from components.images import training_charts
from components.models.autoencoder import (
    FrameAutoencoder,
    FrameSampler,
    build_vae,
    evaluation_frames,
    load_pretrained_vae,
    measure_scaling_factor,
    reconstruction_metrics,
    training_loss,
)
from components.params import load_params

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trajectories", required=True, help="trajectory shards to train on")
    parser.add_argument("--out", required=True, help="autoencoder folder to write")
    parser.add_argument("--metrics", required=True, help="metrics JSON")
    parser.add_argument("--curve", required=True, help="held-out PSNR against training time (JSON, a DVC plot)")
    parser.add_argument("--plots", required=True, help="folder for the training charts (PNG)")
    parser.add_argument("--cache", default=".cache/base_autoencoder", help="resumable state; '' disables it")


def main(args: argparse.Namespace) -> None:
    params = load_params(args.params)
    settings = params.autoencoder
    runtime = training.start_runtime(params.device)
    torch.manual_seed(settings.seed)
    store = TrajectoryStore(args.trajectories)
    train_frames = FrameSampler(store, "train")
    if not train_frames.total:
        raise PipelineError(f"{args.trajectories}: no training-split episodes to train the autoencoder on")
    frame_size = (params.environment.height, params.environment.width)
    view_rows = params.environment.view_rows
    stored = tuple(store.shards[0].array("frames").shape[1:3])
    if stored != frame_size:
        raise PipelineError(
            f"{args.trajectories}: frames are {stored[1]}x{stored[0]} but environment.resolution is "
            f"{params.environment.width}x{params.environment.height}; re-run raw_trajectories"
        )
    eval_frames, eval_split = evaluation_frames(store, settings.eval_frames)

    if settings.pretrained:
        vae = load_pretrained_vae(settings.pretrained)
        source = {"source": "pretrained", "pretrained": settings.pretrained}
    else:
        vae = build_vae(settings.block_out_channels, settings.latent_channels, settings.layers_per_block,
                            settings.norm_num_groups, settings.mid_block_attention)
        source = {"source": "trained"}
    vae = vae.to(memory_format=torch.channels_last)
    autoencoder = FrameAutoencoder(vae, frame_size, 1.0, settings.latent_multiple, settings.pad_mode)
    log.info(
        "autoencoder: %s, %.2fM params, frames %s padded to %s, latents %s",
        source["source"], sum(t.numel() for t in vae.parameters()) / 1e6, frame_size, autoencoder.padded_size,
        autoencoder.latent_shape,
    )

    result = None
    vae.to(runtime.device)
    if not settings.pretrained:
        def loss_fn(step: training.Step) -> torch.Tensor:
            x = autoencoder.pad(train_frames.random_batch(settings.batch_size, step.rng).to(step.device))
            return training_loss(vae, x.contiguous(memory_format=torch.channels_last), settings.kl_weight,
                                     settings.mixed_precision)

        budget = training.Budget(settings.train_minutes, settings.max_steps, settings.warmup_steps)
        recipe = training.Recipe(budget, settings.learning_rate, seed=settings.seed, batch_size=settings.batch_size,
                                 eval_every_s=settings.eval_every_s, checkpoint_every_s=settings.checkpoint_every_s)
        folder = training.run_folder(args.cache, runtime, settings.model_dump(exclude={"checkpoint_every_s"}),
                                     frame_size, training.inputs_fingerprint(store))
        result = training.train(vae, list(vae.parameters()), loss_fn, recipe, runtime, folder, name="base_autoencoder",
                                evaluate=lambda: reconstruction_metrics(autoencoder, eval_frames, view_rows=view_rows))
    if not runtime.is_main:
        return  # under `accelerate launch` the main process writes the outputs
    vae.eval()
    scaling_frames = train_frames.evenly_spaced(settings.scaling_frames)
    autoencoder.scaling_factor = measure_scaling_factor(autoencoder, scaling_frames)
    # the engine's last curve point is these weights' held-out numbers (the scaling factor does not change them)
    final = result.curve[-1] if result else reconstruction_metrics(autoencoder, eval_frames, view_rows=view_rows)
    log.info("scaling factor %.5f; %s PSNR %.2f dB, SSIM %.4f, sharpness %.3f", autoencoder.scaling_factor, eval_split,
             final["psnr"], final["ssim"], final["sharpness"])

    trained = {} if result is None else {
        "steps": result.steps, "train_seconds": round(result.seconds, 1), "resumed_from_step": result.resumed_from_step,
        "train_samples_per_s": round(result.samples_per_s, 2), "processes": runtime.processes,
    }
    curve = [] if result is None else list(result.curve)  # from the untrained start to the end of training
    vae.to("cpu")
    autoencoder.save(args.out, extra={**source, "eval_split": eval_split, "eval_psnr": final["psnr"]})
    atomic_write_json(args.metrics, {
        **source, "eval_split": eval_split, "psnr": final["psnr"], "ssim": final["ssim"],
        "sharpness": final["sharpness"], "scaling_factor": autoencoder.scaling_factor,
        "latent_shape": list(autoencoder.latent_shape),
        **trained,
    })
    atomic_write_json(args.curve, [{"seconds": c["seconds"], "step": c["step"], "psnr": c["psnr"], "ssim": c["ssim"]}
                                   for c in curve])
    if result is not None:  # a pretrained autoencoder has no training curves
        training_charts(args.plots, result.losses, result.learning_rates,
                        [{"seconds": c["seconds"], "step": c["step"], "psnr": c["psnr"]} for c in curve],
                        "base_autoencoder")
