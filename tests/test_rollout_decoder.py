"""The decoder fine-tuned on the 1-step model's rollouts (components/models/rollout_decoder.py), on tiny real models."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from components.data.trajectory_store import TrajectoryStore
from components.errors import PipelineError
from components.models.autoencoder import decoder_loss
from components.models.distillation import OneStepStudent
from components.models.rollout_decoder import fine_tune_decoder, rollout_pairs
from components.models.world_model import ActionConditionedUNet
from components.params import DistilledModelParams, WorldModelParams
from components.training import start_runtime
from tests.fixtures.models import tiny_autoencoder
from tests.fixtures.stores import write_encoded_latents, write_synthetic_trajectories

K, ACTIONS, HEIGHT, WIDTH = 2, 5, 24, 32
EPISODES = [[(12, "train"), (10, "train"), (9, "heldout")]]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny untrained autoencoder and student, and stores of raw frames and their latents (the latent store
    lists its episodes in the other order than the raw one, as validated_latents may)."""
    root = tmp_path_factory.mktemp("rollout_decoder")
    autoencoder = tiny_autoencoder((HEIGHT, WIDTH), blocks=2, width=16, norm_groups=8)
    C, h, w = autoencoder.latent_shape
    net = ActionConditionedUNet.from_params(WorldModelParams(context=K, block_out_channels=[16, 32],
                                                             norm_num_groups=8, cross_attention_dim=16,
                                                             attention_head_dim=4), C, (h, w), ACTIONS)
    student = OneStepStudent.from_teacher(net, steps=2, cfg=1.0, context_noise_level=0.1, noise_seed=0).eval()
    student.requires_grad_(False)
    raw = write_synthetic_trajectories(root / "raw", EPISODES, (HEIGHT, WIDTH), ACTIONS)
    latents = write_encoded_latents(autoencoder, raw, root / "latents", reverse=True)
    return {"autoencoder": autoencoder, "student": student, "raw": TrajectoryStore(raw),
            "latents": TrajectoryStore(latents)}


def test_pairs_hold_the_students_rollout_and_the_real_frames(world: dict) -> None:
    steps = 4
    pairs = rollout_pairs(world["student"], world["latents"], world["raw"], 6, steps, np.random.default_rng(0))
    predicted, real = pairs.steps > 0, pairs.steps == 0
    assert int(predicted.sum()) == int(real.sum()) == 6 * steps  # both training episodes: 6 + 4 windows >= 6
    assert sorted(set(pairs.steps[predicted].tolist())) == list(range(1, steps + 1))
    assert pairs.frames.dtype == torch.uint8 and pairs.frames.shape[1:] == (3, HEIGHT, WIDTH)
    # every real latent is the encoder's latent of the frame it is paired with
    with torch.no_grad():
        encoded = world["autoencoder"].encode(pairs.frames[real].float() / 255)
    torch.testing.assert_close(pairs.latents[real], encoded, rtol=0, atol=1e-4)
    # the student's latent of step 1 is its prediction from the real context
    assert not torch.allclose(pairs.latents[predicted], pairs.latents[real])
    latents, frames = pairs.batch(8, np.random.default_rng(1), real_share=0.0)
    assert latents.shape[0] == frames.shape[0] == 8 and frames.dtype == torch.float32 and frames.max() <= 1


def test_pairs_need_episodes_long_enough(world: dict) -> None:
    with pytest.raises(PipelineError, match="decoder_rollout_steps"):
        rollout_pairs(world["student"], world["latents"], world["raw"], 4, 20, np.random.default_rng(0))


def test_fine_tune_lowers_the_decoder_loss_on_the_students_latents(world: dict, tmp_path: Path) -> None:
    autoencoder = copy.deepcopy(world["autoencoder"])
    encoder_before = {k: v.clone() for k, v in autoencoder.vae.encoder.state_dict().items()}
    pairs = rollout_pairs(world["student"], world["latents"], world["raw"], 6, 4, np.random.default_rng(2))
    predicted = pairs.steps > 0

    def loss() -> float:
        with torch.no_grad():
            return float(decoder_loss(autoencoder, pairs.latents[predicted], pairs.frames[predicted].float() / 255))

    before = loss()
    settings = DistilledModelParams(batch_size=8, warmup_steps=0, decoder_minutes=0.1, decoder_rollout_steps=4,
                                    decoder_windows=6, decoder_learning_rate=2e-3, decoder_detail_weight=0.0)
    result = fine_tune_decoder(world["student"], autoencoder, world["latents"], world["raw"], settings,
                               start_runtime("cpu"), tmp_path / "state")
    assert result["decoder_steps"] >= 5
    assert loss() < 0.7 * before
    for name, value in autoencoder.vae.encoder.state_dict().items():
        torch.testing.assert_close(value, encoder_before[name], rtol=0, atol=0, msg=name)
    assert all(p.requires_grad for p in autoencoder.vae.encoder.parameters())  # left as it was loaded
