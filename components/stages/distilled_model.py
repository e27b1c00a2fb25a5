"""Stage ``distilled_model``: distil the diffusion world model into a 1-step student.

Reads ``data/diffusion_checkpoint`` (the teacher), ``data/finetuned_vae`` (the autoencoder),
``data/validated_latents`` (training and held-out windows) and ``data/raw_trajectories`` (the real frames the
decoder fine-tune learns from). Writes ``data/distilled_model/``: the student, and in ``autoencoder/`` the
autoencoder that ships with it, whose decoder is fine-tuned on the student's own rollouts for
``decoder_minutes`` (``components.models.rollout_decoder``; 0 = the ``finetuned_vae`` one unchanged). Also
``metrics/distilled_model.json``: held-out next-frame PSNR of the student and the teacher against the ground
truth, the student against the teacher, the copy-last-latent baseline and the undistilled 1-step model, each
decoded by the ``finetuned_vae`` decoder, and the student's and copy-last-latent's PSNR with the shipped decoder.
Method: ``components.models.distillation`` (README "Distillation"); training:
``components.models.student_training``. Resumable training state lives in ``.cache/distilled_model/<key>/``.
"""

from __future__ import annotations

import argparse
import logging

from components.atomic import atomic_write_json
from components.images import training_charts
from components.models.student_training import distil
from components.params import load_params

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


def main(args: argparse.Namespace) -> None:
    run = distil(load_params(args.params), args.teacher, args.autoencoder, args.trajectories, args.latents,
                 args.cache or None)
    if run is None:
        return  # under `accelerate launch` the main process writes the outputs
    run.student.save(args.out, extra={"metrics": run.metrics, "curve": run.result.curve}, autoencoder=run.autoencoder)
    atomic_write_json(args.metrics, run.metrics)
    training_charts(args.plots, run.result.losses, run.result.learning_rates, run.result.curve, "distilled_model")
    log.info("wrote %s, %s and the curves in %s", args.out, args.metrics, args.plots)
