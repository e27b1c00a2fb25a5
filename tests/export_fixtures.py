"""A real ONNX export built fast: tiny upstream artifacts, then the real ``distilled_model`` and ``onnx_export`` stages.

The upstream artifacts are made with the project's own modules (``FrameAutoencoder``, ``ActionConditionedUNet``,
``ShardWriter``) at micro size and untrained, so the export takes about a minute instead of a whole pipeline run.
The stages themselves run through the CLI exactly as ``dvc repro`` runs them.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np

from tests.conftest import components_cli, write_micro_params

CONTEXT = 2
EPISODES = (("train", 14), ("train", 12), ("heldout", 12), ("heldout", 11))


def synthetic_frames(length: int, height: int, width: int, seed: int) -> np.ndarray:
    """Smooth moving colour gradients: uint8 [T, H, W, 3], different per episode and per step."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    phase, speed = rng.uniform(0, 6, 3), rng.uniform(0.2, 0.6, 3)
    frames = [np.stack([127 + 120 * np.sin(x / (5 + c) + y / 7 + phase[c] + t * speed[c]) for c in range(3)], -1)
              for t in range(length)]
    return np.clip(frames, 0, 255).astype(np.uint8)


def write_params(root: Path) -> Path:
    """The micro profile with this fixture's context, written to ``root/params.yaml``."""
    return write_micro_params(root, world_model={"context": CONTEXT})


def build_upstream(root: Path) -> dict[str, Path]:
    """Tiny autoencoder, teacher world model, raw trajectories and validated latents under ``root``."""
    import torch

    from components.data.trajectory_store import ShardWriter
    from components.models.autoencoder import FrameAutoencoder, build_vae
    from components.models.world_model import ActionConditionedUNet
    from components.params import load_params

    params = load_params(write_params(root))
    width, height = params.environment.resolution
    torch.manual_seed(0)
    autoencoder = FrameAutoencoder(build_vae([16, 16], 4, 1, 8, False), (height, width), 1.0, 4).eval()
    paths = {name: root / "data" / name for name in
             ("finetuned_vae", "diffusion_checkpoint", "raw_trajectories", "validated_latents")}
    autoencoder.save(paths["finetuned_vae"])
    C, h, w = autoencoder.latent_shape
    num_actions = len(params.environment.actions)
    net = ActionConditionedUNet.from_params(params.world_model, C, (h, w), num_actions)
    net.save(paths["diffusion_checkpoint"])

    rng = np.random.default_rng(0)
    raw = ShardWriter(paths["raw_trajectories"] / "shard-0", "frames")
    latent = ShardWriter(paths["validated_latents"] / "shard-0", "latents")
    for index, (split, length) in enumerate(EPISODES):
        frames = synthetic_frames(length, height, width, index)
        actions = rng.integers(0, num_actions, length).astype(np.int64)
        dones = np.zeros(length, bool)
        dones[-1] = True
        raw.add_episode({"frames": frames, "actions": actions, "rewards": np.zeros(length, np.float32),
                         "dones": dones}, split)
        with torch.no_grad():
            latents = autoencoder.encode(torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255).numpy()
        latent.add_episode({"latents": latents.astype(np.float32), "actions": actions, "dones": dones}, split)
    raw.close()
    latent.close()
    return paths


def run_stage(root: Path, *args: str) -> subprocess.CompletedProcess:
    """A stage run in ``root`` with ``root/params.yaml``; a failure raises, showing its output."""
    return components_cli(*args, cwd=root, params=root / "params.yaml", check=True)


def build_tiny_export(root: Path) -> Path:
    """Run the real ``distilled_model`` and ``onnx_export`` stages on tiny upstream artifacts; returns ``root``.

    Outputs: ``root/data/distilled_model``, ``root/data/onnx_export``, ``root/metrics/distilled_model.json``,
    ``root/reports/onnx_export.json``.
    """
    paths = build_upstream(root)
    data = root / "data"
    run_stage(root, "distilled_model", "--teacher", str(paths["diffusion_checkpoint"]),
              "--autoencoder", str(paths["finetuned_vae"]), "--latents", str(paths["validated_latents"]),
              "--trajectories", str(paths["raw_trajectories"]), "--out", str(data / "distilled_model"),
              "--metrics", str(root / "metrics/distilled_model.json"), "--plots", str(root / "plots/distilled_model"),
              "--cache", "")
    run_stage(root, "onnx_export", "--student", str(data / "distilled_model"),
              "--autoencoder", str(data / "distilled_model" / "autoencoder"),
              "--latents", str(paths["validated_latents"]),
              "--trajectories", str(paths["raw_trajectories"]), "--out", str(data / "onnx_export"),
              "--report", str(root / "reports/onnx_export.json"), "--lock", str(root / "dvc.lock"))
    return root
