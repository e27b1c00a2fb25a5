"""Stage ``base_autoencoder``: the autoencoder the latents are made with, before the decoder fine-tune.

With ``autoencoder.pretrained`` (a local SD-style VAE folder) it loads that VAE and only measures the latent
scaling factor. Otherwise (the default: no model hub here) it trains a small ``AutoencoderKL`` from config on
training-split frames, MSE + KL (bf16 autocast with ``autoencoder.mixed_precision``), for
``autoencoder.train_minutes``, measuring held-out PSNR as it goes.

Writes ``data/base_autoencoder/`` (a ``FrameAutoencoder`` folder), ``metrics/base_autoencoder.json`` and the
PSNR-against-training-time curve ``plots/base_autoencoder/psnr_curve.json``. Resumable training state lives in
``.cache/base_autoencoder/<hash of params and input data>/``. Method:
``components.models.autoencoder_training.train_base_autoencoder``.
"""

from __future__ import annotations

import argparse
import logging

from components.atomic import atomic_write_json
from components.images import training_charts
from components.models.autoencoder_training import train_base_autoencoder
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
    run = train_base_autoencoder(load_params(args.params), args.trajectories, args.cache or None)
    if run is None:
        return  # under `accelerate launch` the main process writes the outputs
    run.autoencoder.save(args.out, extra=run.saved_extra)
    atomic_write_json(args.metrics, run.metrics)
    atomic_write_json(args.curve, [{"seconds": c["seconds"], "step": c["step"], "psnr": c["psnr"], "ssim": c["ssim"]}
                                   for c in run.curve])
    if run.result is not None:  # a pretrained autoencoder has no training curves
        training_charts(args.plots, run.result.losses, run.result.learning_rates,
                        [{"seconds": c["seconds"], "step": c["step"], "psnr": c["psnr"]} for c in run.curve],
                        "base_autoencoder")
