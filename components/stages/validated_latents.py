"""Stage ``validated_latents``: encode every frame to scaled latents, then gate them
(components/data/latent_validation.py).

For each trajectory shard ``data/raw_trajectories/shard-N`` it writes ``data/validated_latents/shard-N``
(``ShardWriter(kind="latents")``) with arrays ``latents`` [N, C, h, w] (scaled, ``validated_latents.dtype``),
``actions`` int64 [N] and ``dones`` bool [N], and the same episodes (ids, split, metadata) in the same order.
Episodes shorter than K + 1 frames are left out when ``drop_short_episodes`` is on (counted in the report).
With ``engine: onnxruntime`` (default) the encoder is exported once, exactly as ``onnx_export`` ships it, checked
against PyTorch on the first frames, and run by ONNX Runtime (about 1.5x PyTorch's speed on 2 CPU cores). Method:
``components.data.latent_encoding.publish_latents``.

Everything is written into a staging folder first. The Great Expectations suite then runs over the staged
latents; only if every expectation passes is the folder moved to ``data/validated_latents``. The report
``reports/validated_latents.json`` is written either way: ``{"success", "checks": [{"name", "success",
"details", ...}], ...}``. On failure the stage prints the failed expectations with counts and exits 2.
"""

from __future__ import annotations

import argparse
import logging

from components.atomic import atomic_write_json
from components.data.latent_encoding import GateFailed, publish_latents
from components.errors import PipelineError
from components.models.autoencoder import load_autoencoder
from components.params import load_params

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trajectories", required=True, help="trajectory shards to encode")
    parser.add_argument("--autoencoder", required=True, help="autoencoder folder")
    parser.add_argument("--out", required=True, help="the latent shards to publish once the gate passes")
    parser.add_argument("--report", required=True, help="the gate's report (JSON)")


def main(args: argparse.Namespace) -> None:
    params = load_params(args.params)
    autoencoder = load_autoencoder(args.autoencoder)
    try:
        report = publish_latents(params, autoencoder, args.trajectories, args.out)
    except GateFailed as failure:
        atomic_write_json(args.report, failure.report.as_json())
        raise PipelineError(f"{failure}\nno latents were published; see {args.report}") from None
    except Exception as error:  # the stage broke before the gate could pass: say so in the report
        atomic_write_json(args.report, {"success": False, "checks": [],
                                        "error": f"stage failed: {type(error).__name__}: {error}"})
        raise
    atomic_write_json(args.report, report.as_json())
    log.info("gate passed (%d checks); latents published to %s", len(report.checks), args.out)
