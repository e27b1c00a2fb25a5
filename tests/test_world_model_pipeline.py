"""Stage ``diffusion_checkpoint`` inside the real micro pipeline (real ViZDoom latents, real fine-tuned VAE)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from components.data.trajectory_store import TrajectoryStore
from components.models.autoencoder import load_autoencoder
from components.models.sampler import Sampler, rollout
from components.models.world_model import load_world_model
from components.params import load_params
from tests.fixtures.processes import run

pytestmark = pytest.mark.slow


def test_stage_outputs_and_generation(micro_pipeline: Path) -> None:
    repo = micro_pipeline
    params = load_params(repo / "params.yaml")
    metrics = json.loads((repo / "metrics" / "diffusion_checkpoint.json").read_text())
    assert metrics["steps"] == params.diffusion_checkpoint.steps
    for key in ("final_train_loss", "heldout_loss", "sampled_latent_mse", "copy_last_latent_mse"):
        assert metrics[key] == metrics[key] and metrics[key] >= 0  # finite, not NaN
    assert (repo / "plots" / "diffusion_checkpoint" / "samples.png").read_bytes()[:4] == b"\x89PNG"
    assert (repo / "dvclive" / "diffusion_checkpoint" / "plots" / "metrics" / "train" / "loss.tsv").is_file()
    assert "up to date" in run(["dvc", "status", "diffusion_checkpoint"], repo).stdout

    world_model = load_world_model(repo / "data" / "diffusion_checkpoint")
    autoencoder = load_autoencoder(repo / "data" / "finetuned_vae")
    assert world_model.config.context == params.world_model.context
    assert (world_model.config.latent_channels, *world_model.config.latent_size) == tuple(autoencoder.latent_shape)
    assert world_model.config.num_actions == len(params.environment.actions)

    store = TrajectoryStore(repo / "data" / "validated_latents")
    k = world_model.config.context
    index = store.window_index(k + 4, "heldout")
    shard, start = (index if len(index) else store.window_index(k + 4, "train"))[0]
    window = store.read_window(int(shard), int(start), k + 4, ("latents", "actions"))
    latents = torch.from_numpy(window["latents"].astype("float32"))
    actions = torch.from_numpy(window["actions"].astype("int64"))

    sampler = Sampler.from_params(world_model, autoencoder, params.sampler)
    sampler.reset(autoencoder.decode(latents[:k]), actions[: k - 1])  # real frames in
    frame = sampler.step(int(actions[k - 1]))
    height, width = params.environment.height, params.environment.width
    assert frame.shape == (3, height, width) and 0 <= frame.min() and frame.max() <= 1

    frames, generated = rollout(sampler, latents[:k], actions[: k - 1], actions[k - 1 : k + 3])
    assert frames.shape == (4, 3, height, width) and generated.shape == (4, *autoencoder.latent_shape)
