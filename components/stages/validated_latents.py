"""Stage ``validated_latents``: encode every frame to scaled latents, then gate them
(components/data/latent_validation.py).

For each trajectory shard ``data/raw_trajectories/shard-N`` it writes ``data/validated_latents/shard-N``
(``ShardWriter(kind="latents")``) with arrays ``latents`` [N, C, h, w] (scaled, ``validated_latents.dtype``),
``actions`` int64 [N] and ``dones`` bool [N], and the same episodes (ids, split, metadata) in the same order.
Episodes shorter than K + 1 frames are left out when ``drop_short_episodes`` is on (counted in the report).
With ``engine: onnxruntime`` (default) the encoder is exported once, exactly as ``onnx_export`` ships it, checked
against PyTorch on the first frames, and run by ONNX Runtime (about 1.5x PyTorch's speed on 2 CPU cores).

Everything is written into a staging folder first. The Great Expectations suite then runs over the staged
latents; only if every expectation passes is the folder moved to ``data/validated_latents``. The report
``reports/validated_latents.json`` is written either way: ``{"success", "checks": [{"name", "success",
"details", ...}], ...}``. On failure the stage prints the failed expectations with counts and exits 2.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm import tqdm

from components.atomic import atomic_directory, atomic_write_json
from components.data.latent_validation import GateLimits, latent_statistics, validate_latents
from components.data.trajectory_store import ShardWriter, TrajectoryStore, shard_paths
from components.errors import PipelineError
from components.models.autoencoder import load_autoencoder
from components.params import load_params
from components.runtime.export import onnx_encoder
from components.training import resolve_device

if TYPE_CHECKING:
    from components.models.autoencoder import FrameAutoencoder
    from components.params import ValidatedLatentsParams


log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trajectories", required=True, help="trajectory shards to encode")
    parser.add_argument("--autoencoder", required=True, help="autoencoder folder")
    parser.add_argument("--out", required=True, help="the latent shards to publish once the gate passes")
    parser.add_argument("--report", required=True, help="the gate's report (JSON)")


class LatentValidationError(Exception):
    """Raised inside the stage so the staged latents are discarded; re-raised as a PipelineError."""


def to_unit_chw(frames: Any) -> Any:
    """uint8 [B, H, W, 3] -> float32 [B, 3, H, W] in [0, 1]."""

    return np.ascontiguousarray(frames.transpose(0, 3, 1, 2), np.float32) / np.float32(255.0)


def make_encoder(autoencoder: FrameAutoencoder, settings: ValidatedLatentsParams, trajectories: TrajectoryStore,
                 scratch: str, device: str = "auto") -> Callable[[Any], Any]:
    """frames float32 [B, 3, H, W] -> scaled latents, by ``settings.engine`` (ONNX Runtime checked against PyTorch
    on the first frames, or PyTorch itself on ``device``, the ``device`` setting)."""


    if settings.engine == "torch":
        torch.set_num_threads(settings.threads or torch.get_num_threads())
        autoencoder.vae.to(resolve_device(device))

        def encode(frames: Any) -> Any:
            with torch.no_grad():
                return autoencoder.encode(torch.from_numpy(frames)).cpu().numpy()

        return encode

    first = trajectories.shards[0].array("frames")[: min(8, settings.batch_size)]
    return onnx_encoder(autoencoder, scratch, settings.batch_size, settings.threads, to_unit_chw(first),
                        settings.parity_tolerance)


def main(args: argparse.Namespace) -> None:
    params = load_params(args.params)
    settings = params.validated_latents
    context = params.world_model.context
    autoencoder = load_autoencoder(args.autoencoder)
    trajectories = TrajectoryStore(args.trajectories)
    frame_size = tuple(trajectories.shards[0].array("frames").shape[1:3])
    if frame_size != autoencoder.frame_size:
        raise PipelineError(
            f"{args.trajectories}: frames are (H, W) = {frame_size} but {args.autoencoder} was trained on "
            f"{autoencoder.frame_size}; re-run base_autoencoder"
        )
    dtype = np.dtype(settings.dtype)
    total = sum(e.length for e in trajectories.episodes)
    dropped: list[str] = []
    limits = GateLimits(context, len(params.environment.actions), settings.channel_mean_limit, settings.channel_std_min,
                        settings.channel_std_max)
    log.info("encoding %d frames of %d episodes to latents %s (%s) with %s", total, len(trajectories.episodes),
             autoencoder.latent_shape, settings.dtype, settings.engine)
    try:
        with atomic_directory(args.out) as staging, tempfile.TemporaryDirectory(prefix="encoder-") as scratch:
            encode = make_encoder(autoencoder, settings, trajectories, scratch, params.device)
            with tqdm(total=total, unit="frame", desc="encoding", mininterval=2.0) as bar:
                for shard_index, path in enumerate(shard_paths(args.trajectories)):
                    attributes = {
                        **trajectories.shards[shard_index].attributes,
                        "source_shard": path.name,
                        "autoencoder": autoencoder.config(),
                    }
                    episodes = [e for e in trajectories.episodes if e.shard == shard_index]
                    if settings.drop_short_episodes:
                        short = [e for e in episodes if e.length < context + 1]
                        dropped += [e.episode_id for e in short]
                        bar.update(sum(e.length for e in short))
                        episodes = [e for e in episodes if e.length >= context + 1]
                    if not episodes:
                        log.warning("%s: no episode of at least K+1 = %d frames; shard left out", path, context + 1)
                        continue
                    with ShardWriter(staging / path.name, kind="latents", attributes=attributes) as writer:
                        for episode in episodes:
                            arrays = trajectories.episode_arrays(episode, ["frames", "actions", "dones"])
                            latents = np.empty((episode.length, *autoencoder.latent_shape), dtype)
                            for start in range(0, episode.length, settings.batch_size):
                                chunk = np.array(arrays["frames"][start : start + settings.batch_size])
                                latents[start : start + len(chunk)] = encode(to_unit_chw(chunk)).astype(dtype)
                                bar.update(len(chunk))
                            metadata = {k: v for k, v in episode.metadata.items()
                                        if k not in ("start", "length", "split")}
                            writer.add_episode(
                                {
                                    "latents": latents,
                                    "actions": np.asarray(arrays["actions"], np.int64),
                                    "dones": np.asarray(arrays["dones"], bool),
                                },
                                split=episode.split,
                                **metadata,
                            )
            if dropped:
                log.warning("left out %d episodes shorter than K+1 = %d frames", len(dropped), context + 1)
            log.info("running the latent data gate (Great Expectations)")
            report = validate_latents(latent_statistics(TrajectoryStore(staging), trajectories), limits)
            report.summary["dropped_short_episodes"] = {"count": len(dropped), "episode_ids": dropped[:20]}
            report.summary["latent_shape"] = list(autoencoder.latent_shape)
            report.summary["dtype"] = settings.dtype
            atomic_write_json(args.report, report.as_json())
            if not report.success:
                raise LatentValidationError(report.failure_text())
    except LatentValidationError as failure:
        raise PipelineError(f"{failure}\nno latents were published; see {args.report}") from None
    except Exception:
        if "report" not in locals():  # the stage broke before the gate ran: say so in the report
            atomic_write_json(args.report, {"success": False, "checks": [], "error": "stage failed before validation"})
        raise
    log.info("gate passed (%d checks); latents published to %s", len(report.checks), args.out)
