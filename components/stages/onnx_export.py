"""Stage ``onnx_export``: the playable export (README "ONNX export contract") and its parity report.

Reads ``data/distilled_model`` (the 1-step student, and in ``autoencoder/`` the encoder and the decoder that
ship with it), ``data/validated_latents`` and ``data/raw_trajectories`` (held-out windows). Writes
``data/onnx_export/``: ``encoder.onnx``, ``world_model.onnx``, ``decoder.onnx``, ``manifest.json``,
``contexts.npz``; and ``reports/onnx_export.json`` ``{"success", "checks": [...]}``, the blocking Dagster asset
check: ONNX Runtime against PyTorch on real held-out windows (max abs diff within
``onnx_export.parity_tolerance``), and a dynamic batch of 1 and 3 on every graph. Method:
``components.runtime.playable``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from components.atomic import atomic_write_json
from components.data.trajectory_store import ShardError, TrajectoryStore
from components.models.autoencoder import load_autoencoder
from components.models.distillation import load_student
from components.params import load_params
from components.runtime.playable import dvc_lock_hashes, export_playable

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--student", required=True, help="distilled model folder")
    parser.add_argument("--autoencoder", required=True,
                        help="autoencoder folder: the one that ships with the student (its decoder tuned to it)")
    parser.add_argument("--latents", required=True, help="validated latent shards")
    parser.add_argument("--trajectories", required=True, help="raw trajectory shards (frames)")
    parser.add_argument("--out", required=True, help="export folder")
    parser.add_argument("--report", required=True, help="parity report (asset check)")
    parser.add_argument("--lock", default="dvc.lock", help="dvc.lock to read the inputs' hashes from")


def main(args: argparse.Namespace) -> None:
    params = load_params(args.params)
    try:
        raw_store: TrajectoryStore | None = TrajectoryStore(args.trajectories)
    except ShardError as error:
        log.warning("no raw trajectories (%s): shipped context frames will be decoded latents", error)
        raw_store = None
    # the dvc.lock outs it was made from (the autoencoder that ships inside the student folder is part of that out)
    inputs = [args.student, args.latents, args.trajectories]
    if not Path(args.autoencoder).resolve().is_relative_to(Path(args.student).resolve()):
        inputs.insert(1, args.autoencoder)
    report = export_playable(load_student(args.student), load_autoencoder(args.autoencoder),
                             TrajectoryStore(args.latents), raw_store, params, args.out,
                             dvc_lock_hashes(inputs, args.lock))
    atomic_write_json(args.report, report)
    worst = {c["name"]: f"{c['max_abs_diff']:.2e}" for c in report["checks"] if c["name"].startswith("parity:")}
    if report["success"]:
        log.info("exported %s; parity max abs diff %s (tolerance %g)", args.out, worst,
                 params.onnx_export.parity_tolerance)
    else:
        log.error("export %s FAILED its checks (see %s): %s", args.out, args.report,
                  [c["name"] for c in report["checks"] if not c["success"]])
