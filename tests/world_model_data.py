"""Synthetic latent shards for the world-model tests, until (and besides) the real micro pipeline.

The dynamic depends on the action, so a model CAN learn that actions matter: each frame is a bright vertical bar
over a per-episode background (so the context matters too); the action taken on frame t moves the bar for frame
t+1 by ``shift(a) = a % 3 - 1`` columns (left, none, right), with wrap-around, and sets channel 0's background
to ``shift(a)`` (a global effect, learned fast; the bar's move is the spatial one). Written with the project's real
``ShardWriter`` (kind "latents").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from components.data.trajectory_store import ShardWriter
from tests.conftest import micro_params_dict, write_params  # noqa: F401  (used by the world-model tests)

LATENT_SHAPE = (4, 8, 8)


def shift(action: int) -> int:
    return action % 3 - 1


def render(column: int, offsets: np.ndarray, last_action: int) -> np.ndarray:
    """A bright vertical bar at ``column``; channel 0's background is ``shift(last_action)``, the others' a
    per-episode level."""
    levels = offsets.copy()
    levels[0] = shift(last_action)
    latent = np.broadcast_to(levels[:, None, None], LATENT_SHAPE).copy()
    latent[:, :, column] += 2.0
    return latent.astype(np.float32)


def next_latent(latent: np.ndarray, action: int) -> np.ndarray:
    """The true next latent after ``action`` on ``latent`` (what a perfect model predicts)."""
    width = LATENT_SHAPE[2]
    column = int(np.argmax(latent[1].mean(axis=0)))
    levels = latent[:, 0, (column + width // 2) % width].astype(np.float32)  # a background pixel
    return render((column + shift(action)) % width, levels, action)


def synthetic_episode(rng: np.random.Generator, length: int, num_actions: int) -> dict[str, np.ndarray]:
    width = LATENT_SHAPE[2]
    offsets = rng.uniform(-0.8, 0.8, LATENT_SHAPE[0]).astype(np.float32)
    column = int(rng.integers(width))
    actions = rng.integers(0, num_actions, length).astype(np.int64)
    latents = np.empty((length, *LATENT_SHAPE), np.float16)
    previous = int(rng.integers(num_actions))
    for t in range(length):
        latents[t] = render(column, offsets, previous)
        column = (column + shift(int(actions[t]))) % width
        previous = int(actions[t])
    dones = np.zeros(length, bool)
    dones[-1] = True
    return {"latents": latents, "actions": actions, "dones": dones}


FRAME_SIZE = (24, 32)  # the frames behind the latents: 4 px per cell, 4 rows of padding above and below
GEOMETRY = {"downsample_factor": 4, "padding": {"left": 0, "right": 0, "top": 4, "bottom": 4}}


def frames_of(latents: np.ndarray) -> np.ndarray:
    """uint8 frames [T, 24, 32, 3] that show latents [T, 4, 8, 8]: channels 1..3 enlarged 4x, padding cropped."""
    rgb = np.repeat(np.repeat(latents[:, 1:4].astype(np.float32), 4, axis=2), 4, axis=3)[:, :, 4:28]
    return (np.clip((rgb + 1.0) / 4.0, 0, 1) * 255).round().astype(np.uint8).transpose(0, 2, 3, 1)


def write_synthetic_latents(root: Path, num_actions: int, shards: int = 2, episodes: int = 4, length: int = 40,
                            heldout: int = 1, seed: int = 0, frames_root: Path | None = None) -> Path:
    """``root/shard-<i>`` with ``episodes`` episodes each, the last ``heldout`` of them in the held-out split.

    With ``frames_root``, the same episodes (same ids) as frames there too: the recorded trajectories that the
    world model's action warp is fitted on."""
    rng = np.random.default_rng(seed)
    for shard in range(shards):
        frames = ShardWriter(frames_root / f"shard-{shard}", kind="trajectories") if frames_root else None
        with ShardWriter(root / f"shard-{shard}", kind="latents",
                         attributes={"synthetic": True, "autoencoder": GEOMETRY}) as writer:
            for episode in range(episodes):
                split = "heldout" if episode >= episodes - heldout else "train"
                arrays = synthetic_episode(rng, length, num_actions)
                episode_id = f"synthetic-{shard}-{episode}"
                writer.add_episode(arrays, split=split, episode_id=episode_id)
                if frames is not None:
                    frames.add_episode({"frames": frames_of(arrays["latents"]), "actions": arrays["actions"]},
                                       split=split, episode_id=episode_id)
        if frames is not None:
            frames.close()
    return root


def tiny_autoencoder(folder: Path, frame_size: tuple[int, int] = (24, 32)) -> Any:
    """An untrained 3-block AutoencoderKL (4x down) whose latents for 24x32 frames are 4x8x8 (padded to 32x32)."""
    import torch

    from components.models.autoencoder import FrameAutoencoder, build_vae

    torch.manual_seed(0)
    vae = build_vae((8, 8, 8), latent_channels=4, layers_per_block=1, norm_num_groups=8, mid_block_attention=False)
    ae = FrameAutoencoder(vae.eval(), frame_size, scaling_factor=1.0, latent_multiple=4)
    assert ae.latent_shape == LATENT_SHAPE, ae.latent_shape
    ae.save(folder)
    return ae


def one_thread_env() -> dict[str, str]:
    """The pipeline's subprocess environment with one torch thread per process (the test machine is shared)."""
    from tests.conftest import pipeline_env

    env = pipeline_env()
    env["OMP_NUM_THREADS"] = "1"
    return env


def checkpoint_step(cache: Path) -> int | None:
    """The step of the training checkpoint under ``cache/<run key>/``; None before the first one."""
    from safetensors import safe_open

    found = list(cache.glob("*/checkpoint.safetensors"))
    if not found:
        return None
    with safe_open(str(found[0]), framework="pt") as handle:
        return int(handle.metadata()["step"])
