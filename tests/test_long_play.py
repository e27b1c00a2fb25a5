"""Long play: player-like keys, and the real-frame measures that catch a smear, colour bands and a lost HUD."""

from __future__ import annotations

import numpy as np
import pytest

from components.evaluation.long_play import RealFrames, end_of, player_keys
from tests.fixtures.frames import HEIGHT, HUD, blur, textured

VIEW_ROWS = (HEIGHT - HUD) / HEIGHT


def test_player_keys_are_seeded_in_range_and_held() -> None:
    keys = player_keys(num_actions=5, count=4, steps=400, hold=16, seed=3)
    assert keys.shape == (4, 400) and keys.dtype == np.int64
    assert np.array_equal(keys, player_keys(5, 4, 400, 16, seed=3))
    assert not np.array_equal(keys, player_keys(5, 4, 400, 16, seed=4))
    assert set(np.unique(keys)) == set(range(5))
    held_changes = (np.diff(keys, axis=1) != 0).mean()
    tapped_changes = (np.diff(player_keys(5, 4, 400, 1, seed=3), axis=1) != 0).mean()
    assert held_changes < 0.2 < 0.6 < tapped_changes  # held about 8.5 steps on average; tapped: a new draw each step


def test_real_frames_score_as_the_game_and_failures_do_not() -> None:
    frames = textured(8)
    real = RealFrames.of(frames, VIEW_ROWS)
    same = real.measures(frames, frames)
    assert same["sharpness"] == pytest.approx(1.0)
    assert same["colour_distance"] == pytest.approx(0.0) and same["hud_change"] == 0.0

    smear = np.broadcast_to(frames.mean(axis=(0, 2, 3), keepdims=True), frames.shape).copy()
    smeared = real.measures(smear, frames)
    assert smeared["sharpness"] < 0.01 and smeared["colour_distance"] > 0.5
    assert real.measures(blur(frames), frames)["sharpness"] < 0.5

    bands = frames.copy()
    bands[:, 0, : HEIGHT // 3], bands[:, :, HEIGHT // 3 : HEIGHT // 2] = 1.0, 0.0  # red and black bands
    assert real.measures(bands, frames)["colour_distance"] > 0.3

    lost_hud = frames.copy()
    lost_hud[:, :, -HUD:] = np.random.default_rng(0).random(lost_hud[:, :, -HUD:].shape)
    changed = real.measures(lost_hud, frames)
    assert changed["hud_change"] > 0.2 and changed["colour_distance"] == pytest.approx(0.0)  # the view is untouched

    curves = real.curves(np.stack([frames, smear, bands], axis=1), frames)
    assert [round(v, 6) for v in curves["sharpness"]][0] == 1.0 and len(curves["hud_change"]) == 3


def test_end_of_is_the_mean_of_the_last_eighth() -> None:
    assert end_of([0.0] * 14 + [1.0, 3.0]) == 2.0
    assert end_of([5.0, 7.0]) == 7.0
