"""Stage ``evaluation``: score what ships (the ONNX export) and the PyTorch teacher on held-out play only.

Reads ``data/onnx_export`` (run with ONNX Runtime, as the player runs it), ``data/diffusion_checkpoint`` +
``data/finetuned_vae`` (the 4-step teacher), ``data/validated_latents`` (the teacher's context) and
``data/raw_trajectories`` (the real frames and recorded actions). Any episode that is not in the held-out
split is refused before anything is loaded. Writes:

* ``metrics/evaluation.json``: teacher-forced PSNR (pooled / mean capped at 50 dB / median) and SSIM with the
  copy-last-frame, copy-last-latent and autoencoder-ceiling baselines, margins in dB, win shares by action kind,
  controllability, rollouts of each ``evaluation.rollout_lengths`` with PSNR per step and the crossing step,
  LPIPS/FVD or the reason they were skipped (see components/evaluation/scoring.py);
* ``plots/evaluation/psnr_by_step.png`` (and ``.json`` for ``dvc plots``): PSNR by rollout step;
* ``plots/evaluation/sample.gif``: real | ONNX | teacher rollouts side by side.

Method: ``components.evaluation.report`` (``evaluate_heldout``, then ``write_report``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from components.evaluation.report import evaluate_heldout, write_report
from components.params import load_params


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--export", required=True, help="the ONNX export to score (what ships)")
    parser.add_argument("--teacher", required=True, help="the PyTorch teacher (diffusion_checkpoint)")
    parser.add_argument("--autoencoder", required=True, help="the teacher's autoencoder (its decoder)")
    parser.add_argument("--latents", required=True, help="the teacher's context latents")
    parser.add_argument("--trajectories", required=True, help="real frames and recorded actions")
    parser.add_argument("--metrics", required=True, help="metrics JSON")
    parser.add_argument("--plots", required=True, help="folder for the pictures and charts")


def main(args: argparse.Namespace) -> None:
    params = load_params(args.params)
    metrics, extras = evaluate_heldout(params, Path(args.export), Path(args.trajectories), Path(args.latents),
                                       Path(args.teacher), Path(args.autoencoder))
    write_report(metrics, extras, Path(args.metrics), Path(args.plots), params.evaluation)
