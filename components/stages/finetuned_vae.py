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
``.cache/finetuned_vae/<hash>/``. Method: ``components.models.autoencoder_training.fine_tune_on_frames``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from components.atomic import atomic_write_json
from components.images import frame_grid, training_charts
from components.models.autoencoder_training import fine_tune_on_frames
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
    run = fine_tune_on_frames(load_params(args.params), args.autoencoder, args.trajectories, args.latents,
                              args.cache or None)
    if run is None or run.result is None:
        return  # under `accelerate launch` the main process writes the outputs
    frame_grid(Path(args.plots) / "reconstructions.png", run.grid, [], scale=3)
    training_charts(args.plots, run.result.losses, run.result.learning_rates, [], "finetuned_vae")
    run.autoencoder.save(args.out, extra=run.saved_extra)
    atomic_write_json(args.metrics, run.metrics)
