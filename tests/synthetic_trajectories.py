"""Small trajectory shards with structured frames, written with the real ShardWriter (for autoencoder tests).

Frames are not noise: a sky/floor split that shifts with a "camera" angle, a few moving boxes and a HUD bar
with blocky digits, so an autoencoder has something to learn and a decoder fine-tune has something to gain.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from components.data.trajectory_store import ShardWriter


def synthetic_frames(length: int, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """``length`` consecutive uint8 frames [length, H, W, 3] of a scene that drifts over time."""
    frames = np.zeros((length, height, width, 3), np.uint8)
    angle = rng.uniform(0, 2 * np.pi)
    boxes = rng.uniform(0, 1, size=(3, 4))
    colors = rng.integers(40, 255, size=(3, 3))
    hud = max(2, height // 6)
    ys, xs = np.mgrid[0:height, 0:width]
    for t in range(length):
        angle += rng.normal(0, 0.15)
        horizon = int(height * (0.45 + 0.1 * np.sin(angle)))
        frame = frames[t]
        frame[:horizon] = (60, 60, 90 + int(40 * np.cos(angle)))  # sky
        shade = (ys[horizon:] - horizon) * 3
        frame[horizon:] = np.stack([100 + shade, 70 + shade // 2, 50 + 0 * shade], -1).clip(0, 255)[:, :, :]
        for (bx, by, bw, bh), color in zip(boxes, colors, strict=True):
            x0 = int(((bx + 0.05 * t + angle / 6) % 1.0) * width)
            y0 = int(by * (height - hud) * 0.8)
            frame[y0 : y0 + 2 + int(bh * height / 4), x0 : x0 + 2 + int(bw * width / 4)] = color
        frame[height - hud :] = (30, 30, 30)  # HUD bar with blocky "digits"
        for d, value in enumerate((t // 10 % 10, t % 10)):
            x0 = 2 + d * (hud + 1)
            frame[height - hud + 1 : height - 1, x0 : x0 + hud - 1] = (200, 30 + 20 * value, 30)
    return frames


def write_synthetic_trajectories(
    root: str | Path,
    episodes_per_shard: list[list[tuple[int, str]]],
    size: tuple[int, int] = (24, 32),
    n_actions: int = 11,
    seed: int = 0,
) -> Path:
    """Write ``root/shard-N`` for each list of ``(length, split)`` episodes; returns ``root``."""
    rng = np.random.default_rng(seed)
    height, width = size
    for shard, episodes in enumerate(episodes_per_shard):
        attributes = {"resolution": [width, height], "actions": [f"a{i}" for i in range(n_actions)]}
        with ShardWriter(Path(root) / f"shard-{shard}", kind="trajectories", attributes=attributes) as writer:
            for length, split in episodes:
                dones = np.zeros(length, bool)
                dones[-1] = True
                writer.add_episode(
                    {
                        "frames": synthetic_frames(length, height, width, rng),
                        "actions": rng.integers(0, n_actions, length).astype(np.int64),
                        "rewards": rng.normal(size=length).astype(np.float32),
                        "dones": dones,
                    },
                    split=split,
                )
    return Path(root)
