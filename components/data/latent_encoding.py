"""Encoding trajectories to latents behind the gate (stage ``validated_latents``).

``publish_latents`` encodes every frame of every shard of a trajectory store to scaled latents in a staging folder,
one latent shard per trajectory shard with the same episodes (ids, split, metadata) in the same order, runs the
latent data gate (``components.data.latent_validation``) over the staged shards and moves them into place only if
every expectation passes. A failed gate raises ``GateFailed`` carrying its report; nothing is published.

The encoder is ``validated_latents.engine``: ONNX Runtime running the encoder graph exactly as ``onnx_export`` ships
it, checked against PyTorch on the first frames (about 1.5x PyTorch's speed on 2 CPU cores), or PyTorch itself.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm import tqdm

from components.atomic import atomic_directory
from components.data.latent_validation import GateLimits, GateReport, latent_statistics, validate_latents
from components.data.trajectory_store import ShardWriter, TrajectoryStore, shard_paths
from components.data.windows import to_chw
from components.errors import PipelineError
from components.runtime.export import onnx_encoder
from components.training import resolve_device

if TYPE_CHECKING:
    from components.models.autoencoder import FrameAutoencoder
    from components.params import Params, ValidatedLatentsParams


log = logging.getLogger(__name__)

Encoder = Callable[[np.ndarray], np.ndarray]  # frames float32 [B, 3, H, W] in [0, 1] -> scaled latents


class GateFailed(PipelineError):
    """The gate rejected the staged latents; ``report`` says which expectations failed."""

    def __init__(self, report: GateReport) -> None:
        super().__init__(report.failure_text())
        self.report = report


def unit_frames(frames: np.ndarray) -> np.ndarray:
    """uint8 [B, H, W, 3] -> contiguous float32 [B, 3, H, W] in [0, 1], the encoder's input."""
    return np.ascontiguousarray(to_chw(frames))


def make_encoder(autoencoder: FrameAutoencoder, settings: ValidatedLatentsParams, trajectories: TrajectoryStore,
                 scratch: str | Path, device: str = "auto") -> Encoder:
    """The encoder ``settings.engine`` names: ONNX Runtime (its graph exported into ``scratch`` and checked against
    PyTorch on the first frames) or PyTorch itself on ``device`` (the ``device`` setting)."""

    if settings.engine == "torch":
        torch.set_num_threads(settings.threads or torch.get_num_threads())
        autoencoder.vae.to(resolve_device(device))

        def encode(frames: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return autoencoder.encode(torch.from_numpy(frames)).cpu().numpy()

        return encode

    first = trajectories.shards[0].array("frames")[: min(8, settings.batch_size)]
    return onnx_encoder(autoencoder, scratch, settings.batch_size, settings.threads, unit_frames(first),
                        settings.parity_tolerance)


def encode_shards(autoencoder: FrameAutoencoder, trajectories: TrajectoryStore, trajectories_root: str | Path,
                  staging: Path, encode: Encoder, settings: ValidatedLatentsParams, context: int) -> list[str]:
    """Write ``staging/shard-N`` for each trajectory shard; returns the ids of the episodes left out as shorter than
    K + 1 frames (``drop_short_episodes``)."""

    dtype = np.dtype(settings.dtype)
    dropped: list[str] = []
    total = sum(e.length for e in trajectories.episodes)
    with tqdm(total=total, unit="frame", desc="encoding", mininterval=2.0) as bar:
        for shard_index, path in enumerate(shard_paths(trajectories_root)):
            attributes = {**trajectories.shards[shard_index].attributes, "source_shard": path.name,
                          "autoencoder": autoencoder.config()}
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
                        latents[start : start + len(chunk)] = encode(unit_frames(chunk)).astype(dtype)
                        bar.update(len(chunk))
                    metadata = {k: v for k, v in episode.metadata.items() if k not in ("start", "length", "split")}
                    writer.add_episode({"latents": latents, "actions": np.asarray(arrays["actions"], np.int64),
                                        "dones": np.asarray(arrays["dones"], bool)},
                                       split=episode.split, **metadata)
    if dropped:
        log.warning("left out %d episodes shorter than K+1 = %d frames", len(dropped), context + 1)
    return dropped


def publish_latents(params: Params, autoencoder: FrameAutoencoder, trajectories_root: str | Path,
                    out: str | Path) -> GateReport:
    """Encode ``trajectories_root`` with ``autoencoder``, gate the latents and publish them to ``out``; returns the
    gate's report. ``GateFailed`` (with the report) when an expectation fails: nothing is published then."""

    settings = params.validated_latents
    context = params.world_model.context
    trajectories = TrajectoryStore(trajectories_root)
    frame_size = tuple(trajectories.shards[0].array("frames").shape[1:3])
    if frame_size != autoencoder.frame_size:
        raise PipelineError(f"{trajectories_root}: frames are (H, W) = {frame_size} but the autoencoder was trained "
                            f"on {autoencoder.frame_size}; re-run base_autoencoder")
    limits = GateLimits(context, len(params.environment.actions), settings.channel_mean_limit,
                        settings.channel_std_min, settings.channel_std_max)
    log.info("encoding %d frames of %d episodes to latents %s (%s) with %s",
             sum(e.length for e in trajectories.episodes), len(trajectories.episodes), autoencoder.latent_shape,
             settings.dtype, settings.engine)
    with atomic_directory(out) as staging, tempfile.TemporaryDirectory(prefix="encoder-") as scratch:
        encode = make_encoder(autoencoder, settings, trajectories, scratch, params.device)
        dropped = encode_shards(autoencoder, trajectories, trajectories_root, staging, encode, settings, context)
        log.info("running the latent data gate (Great Expectations)")
        report = validate_latents(latent_statistics(TrajectoryStore(staging), trajectories), limits)
        report.summary["dropped_short_episodes"] = {"count": len(dropped), "episode_ids": dropped[:20]}
        report.summary["latent_shape"] = list(autoencoder.latent_shape)
        report.summary["dtype"] = settings.dtype
        if not report.success:
            raise GateFailed(report)  # leaving the block discards the staging folder
    return report


__all__ = ["GateFailed", "encode_shards", "make_encoder", "publish_latents", "unit_frames"]
