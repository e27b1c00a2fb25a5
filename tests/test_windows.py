"""The one window reader and the one held-out rule (components/data/windows.py), through the stores the stages read."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from components.data.trajectory_store import TrajectoryStore
from components.data.windows import HeldOutError, LatentWindows, heldout_windows
from components.models.world_model import ActionConditionedUNet
from components.models.world_model_training import heldout_metrics
from components.params import WorldModelParams, parse_params
from components.runtime.playable import sample_contexts
from tests.fixtures.params import micro_params_dict
from tests.fixtures.stores import write_synthetic_latents


def test_a_window_is_consecutive_rows_of_one_episode(tmp_path: Path) -> None:
    store = TrajectoryStore(write_synthetic_latents(tmp_path / "latents", 5, shards=1, episodes=3, length=12))
    windows = LatentWindows(store, 5, "train")
    assert len(windows) == 2 * (12 - 5 + 1)  # two training episodes of 12 rows
    latents, actions = windows.read([0, len(windows) - 1])
    assert latents.shape[:2] == (2, 5) and actions.shape == (2, 5)
    shard, start = windows.index[-1]
    expected = store.read_window(int(shard), int(start), 5, ["latents", "actions"])
    np.testing.assert_array_equal(latents[1].numpy(), expected["latents"].astype(np.float32))
    np.testing.assert_array_equal(actions[1].numpy(), expected["actions"])
    assert windows.evenly_spaced(3).tolist() == [0, 8, 15]  # the first, the middle (7.5 rounded) and the last


def test_held_out_measures_refuse_training_play_when_no_held_out_episode_is_long_enough(tmp_path: Path) -> None:
    store = TrajectoryStore(write_synthetic_latents(tmp_path / "latents", 5, shards=1, episodes=3, length=12))
    assert len(heldout_windows(store, 12, "a test")) == 1
    with pytest.raises(HeldOutError, match="a test needs held-out episodes of at least 13 rows"):
        heldout_windows(store, 13, "a test")
    with pytest.raises(HeldOutError, match="onnx_export"):  # the export's shipped contexts
        sample_contexts(store, 13, 4, decode=lambda latents: latents)
    with_no_heldout = TrajectoryStore(write_synthetic_latents(tmp_path / "train_only", 5, shards=1, heldout=0))
    teacher = ActionConditionedUNet.from_params(
        WorldModelParams(context=2, block_out_channels=[16, 32], norm_num_groups=8, cross_attention_dim=16,
                         attention_head_dim=4), 4, (8, 8), 5)
    with pytest.raises(HeldOutError, match="diffusion_checkpoint's held-out metrics"):
        heldout_metrics(teacher, with_no_heldout, parse_params(micro_params_dict()), 4)
