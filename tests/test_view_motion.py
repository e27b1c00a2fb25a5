"""What a player sees: sharpness, the view's horizontal shift, the controllable baseline and its measurement."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from components.data.trajectory_store import ShardWriter, TrajectoryStore
from components.data.windows import Windows
from components.evaluation import scoring
from components.evaluation.actions import action_kinds, counterfactual_actions
from components.evaluation.view_motion import (
    action_displacements,
    horizontal_shift,
    sharpness,
    shift_view,
)
from components.metrics import detail_loss, laplacian_energy
from tests.fixtures.frames import HEIGHT, HUD, WIDTH, blur, textured


def test_sharpness_is_one_for_the_real_frames_below_for_blur_above_for_noise() -> None:
    frames = textured(4)
    assert sharpness(frames, frames) == pytest.approx(1.0)
    assert sharpness(blur(frames), frames) < 0.5
    noisy = np.clip(frames + np.random.default_rng(1).normal(0, 0.1, frames.shape), 0, 1).astype(np.float32)
    assert sharpness(noisy, frames) > 1.2
    assert laplacian_energy(np.full((2, 3, 8, 8), 0.5)).tolist() == [0.0, 0.0]
    assert np.isnan(sharpness(frames[:1], np.zeros_like(frames[:1])))


@pytest.mark.parametrize("shift", [-7, -2, 0, 3, 6])
def test_horizontal_shift_finds_a_known_pan_above_the_hud(shift: int) -> None:
    frames = textured(6, seed=shift + 10)
    moved = shift_view(frames, np.full(6, shift), view_rows=(HEIGHT - HUD) / HEIGHT)
    assert np.array_equal(moved[:, :, -HUD:], frames[:, :, -HUD:])  # the HUD stays where it is
    if shift > 0:  # the columns that came into view repeat the edge
        assert np.array_equal(moved[:, :, 0, :shift], np.repeat(frames[:, :, 0, :1], shift, axis=-1))
    measured = horizontal_shift(frames, moved, view_rows=(HEIGHT - HUD) / HEIGHT)
    assert np.abs(measured - shift).max() < 0.6, measured


def test_action_displacements_are_the_median_pan_of_each_action_on_the_training_split(tmp_path: Path) -> None:
    """Action 1 pans the view +3 px, action 2 -5 px, action 0 nothing; action 3 is never taken."""
    pans = {0: 0, 1: 3, 2: -5}
    writer = ShardWriter(tmp_path / "shard-0", "frames")
    rng = np.random.default_rng(0)
    for episode, split in enumerate(["train", "train", "heldout"]):
        actions = rng.integers(0, 3, 20)
        frames = [textured(1, seed=episode)[0]]
        for action in actions[:-1]:
            frames.append(shift_view(frames[-1][None], [pans[int(action)]], 0.8)[0])
        if split == "heldout":
            frames = [f[:, :, ::-1].copy() for f in frames]  # opposite pans: must not be measured
        uint8 = (np.moveaxis(np.stack(frames), 1, -1) * 255).round().astype(np.uint8)
        writer.add_episode({"frames": uint8, "actions": actions.astype(np.int64)}, split)
    writer.close()
    measured = action_displacements(TrajectoryStore(tmp_path), 4, view_rows=0.8, pairs_per_action=50)
    assert measured["split"] == "train" and measured["pairs"][3] == 0 and measured["median_px"][3] == 0.0
    assert measured["median_px"][:3] == pytest.approx([0, 3, -5], abs=0.5)
    assert 0 < measured["pairs"][1] <= 50


def test_controllable_baseline_and_turn_response_on_a_perfect_and_a_blind_model() -> None:
    """The shift baseline wins the turning windows against its opposite; a model that pans the view scores the
    right sign for every context, one that ignores the keys scores 0 px."""
    actions = [{"name": "noop", "buttons": []}, {"name": "turn_left", "buttons": ["TURN_LEFT"]},
               {"name": "turn_right", "buttons": ["TURN_RIGHT"]}]
    motion = scoring.ViewMotion([0.0, 4.0, -4.0], view_rows=(HEIGHT - HUD) / HEIGHT, pairs=[1, 1, 1])
    k, count = 2, 6
    context = textured(count, seed=3)
    taken = np.tile([1, 2], count // 2)
    frames = np.stack([context, context, motion.shift(context, taken)], axis=1)  # [N, 3, 3, H, W]
    windows = Windows((np.moveaxis(frames, 2, -1) * 255).round().astype(np.uint8), None,
                         np.stack([np.zeros(count, np.int64), taken, np.zeros(count, np.int64)], 1).astype(np.int64),
                         [str(i) for i in range(count)])

    def pan(frames_in: np.ndarray) -> np.ndarray:  # "latents" are frames here: encode/decode are the identity
        return frames_in

    def perfect(ctx: np.ndarray, acts: np.ndarray) -> np.ndarray:
        return motion.shift(ctx[:, -1], acts[:, -1])

    def blind(ctx: np.ndarray, acts: np.ndarray) -> np.ndarray:
        return ctx[:, -1]

    kinds, opposite = action_kinds(actions), counterfactual_actions(actions)
    good = scoring.ModelUnderTest("perfect", perfect, pan, pan)
    scores = scoring.teacher_forced(good, windows, k, kinds, opposite, 4, motion=motion)
    assert scores["baseline_controllability"]["shift_last_frame"]["turning"]["share"] == 1.0
    assert scores["controllability"]["turning"]["share"] == 1.0
    assert scores["psnr"]["shift_last_frame"]["pooled"] > scores["psnr"]["copy_last_frame"]["pooled"] + 3
    assert scores["sharpness"]["copy_last_frame"] == pytest.approx(1.0, abs=0.1)  # the target repeats edges

    response = scoring.turn_response(good, windows, k, actions, motion, steps=2, batch_size=4)
    assert response["turn_left"]["right_sign_share"] == 1.0 and response["turn_right"]["right_sign_share"] == 1.0
    assert response["turn_left"]["model_mean_px"] == pytest.approx(8.0, abs=0.6)
    assert response["turn_left"]["real_px"] == 8.0
    assert response["turn_right"]["fraction_of_real"] == pytest.approx(1, abs=0.1)
    ignored = scoring.turn_response(scoring.ModelUnderTest("blind", blind, pan, pan), windows, k, actions, motion, 2, 4)
    assert ignored["turn_left"]["right_sign_share"] == 0.0 and ignored["turn_left"]["model_mean_px"] == 0.0

    shown = scoring.turn_test(good, windows, k, actions, steps=1, batch_size=4)
    assert list(shown) == ["turn_left", "turn_right", "noop", "real", "context"]
    assert shown["turn_left"].shape == (count, 1, HEIGHT, WIDTH, 3)
    assert shown["context"].shape == (count, HEIGHT, WIDTH, 3)


def test_sharpness_above_the_hud_is_not_hidden_by_a_sharp_status_bar() -> None:
    frames = textured(4)
    rng = np.random.default_rng(2)
    frames[:, :, -HUD:] = rng.random(frames[:, :, -HUD:].shape)  # a busy status bar
    flat_view = frames.copy()
    flat_view[:, :, :-HUD] = 0.4  # the view melted to one colour, the HUD intact
    view_rows = 1 - HUD / HEIGHT
    assert sharpness(flat_view, frames) > 0.3  # over the whole frame, the HUD carries the score
    assert sharpness(flat_view, frames, view_rows) < 0.05
    assert sharpness(frames, frames, view_rows) == pytest.approx(1.0)


def test_detail_loss_charges_blur_not_where_the_detail_sits() -> None:
    torch.manual_seed(0)
    goal = torch.randn(2, 3, 16, 16)
    blurred = torch.nn.functional.avg_pool2d(goal, 3, stride=1, padding=1, count_include_pad=False)
    moved = torch.roll(goal, shifts=1, dims=-1)  # the same detail one cell over: as detailed, misplaced
    assert detail_loss(goal, goal, 4).item() < 1e-6
    assert detail_loss(blurred, goal, 4).item() > 0.5
    assert detail_loss(moved, goal, 4).item() < 0.1 * detail_loss(blurred, goal, 4).item()
    assert detail_loss(torch.zeros_like(goal), goal, 4).item() > detail_loss(blurred, goal, 4).item()
