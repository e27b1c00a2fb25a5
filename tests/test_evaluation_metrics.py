"""Metric correctness on synthetic frames, and the evaluation harness on a toy world with known dynamics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from components import metrics
from components.data.windows import Windows, to_chw
from components.evaluation import scoring
from components.evaluation.actions import action_kinds, counterfactual_actions

ACTIONS = [
    {"name": "noop", "buttons": []},
    {"name": "forward", "buttons": ["MOVE_FORWARD"]},
    {"name": "backward", "buttons": ["MOVE_BACKWARD"]},
    {"name": "turn_left", "buttons": ["TURN_LEFT"]},
    {"name": "turn_right", "buttons": ["TURN_RIGHT"]},
    {"name": "forward_turn_left", "buttons": ["MOVE_FORWARD", "TURN_LEFT"]},
    {"name": "forward_turn_right", "buttons": ["MOVE_FORWARD", "TURN_RIGHT"]},
    {"name": "strafe_left", "buttons": ["MOVE_LEFT"]},
    {"name": "strafe_right", "buttons": ["MOVE_RIGHT"]},
    {"name": "attack", "buttons": ["ATTACK"]},
    {"name": "use", "buttons": ["USE"]},
]


# --------------------------------------------------------------------------- PSNR / SSIM


def test_identical_frames_give_infinite_psnr_and_capped_summaries() -> None:
    frames = torch.rand(4, 3, 12, 16)
    mse = metrics.mse_per_frame(frames, frames.clone())
    assert (mse == 0).all()
    assert np.isinf(metrics.psnr_from_mse(mse)).all()
    summary = metrics.psnr_summary(mse)
    assert summary == {"pooled": 50.0, "mean": 50.0, "median": 50.0, "count": 4}
    assert all(math.isfinite(v) for v in summary.values())


def test_known_noise_level_gives_known_psnr() -> None:
    rng = np.random.default_rng(0)
    clean = np.full((8, 3, 64, 64), 0.5, np.float32)
    sigma = 0.05  # PSNR = 10 log10(1 / sigma^2) = 26.02 dB; 0.5 +- 10 sigma never clips
    noisy = clean + rng.normal(0.0, sigma, clean.shape).astype(np.float32)
    summary = metrics.psnr_summary(metrics.mse_per_frame(noisy, clean))
    expected = 10 * math.log10(1 / sigma**2)
    for view in ("pooled", "mean", "median"):
        assert summary[view] == pytest.approx(expected, abs=0.05)
    # a constant offset of 0.1 is exactly 20 dB
    assert metrics.psnr_summary(metrics.mse_per_frame(clean + 0.1, clean))["pooled"] == pytest.approx(20.0, abs=1e-4)


def test_three_psnr_views_differ_as_defined() -> None:
    mse = np.array([0.0, 1e-2, 1e-3, 1e-4])  # inf (capped 50), 20, 30, 40 dB
    summary = metrics.psnr_summary(mse)
    assert summary["pooled"] == pytest.approx(10 * math.log10(1 / mse.mean()))
    assert summary["mean"] == pytest.approx((50 + 20 + 30 + 40) / 4)
    assert summary["median"] == pytest.approx(35.0)
    assert summary["count"] == 4
    assert metrics.psnr_summary(mse, cap_db=45.0)["mean"] == pytest.approx((45 + 20 + 30 + 40) / 4)
    empty = metrics.psnr_summary([])
    assert empty["count"] == 0 and math.isnan(empty["pooled"])


def test_ssim_is_one_on_identical_frames_and_drops_with_noise() -> None:
    torch.manual_seed(0)
    frames = torch.rand(3, 3, 24, 32)  # the micro profile's frame size
    assert metrics.ssim(frames, frames) == pytest.approx(np.ones(3), abs=1e-4)
    noisy = (frames + 0.2 * torch.randn_like(frames)).clamp(0, 1)
    assert (metrics.ssim(noisy, frames) < 0.9).all()


# --------------------------------------------------------------------------- actions and comparisons


def test_counterfactuals_by_action_name() -> None:
    opposite = counterfactual_actions(ACTIONS)
    names = [a["name"] for a in ACTIONS]
    pairs = {names[a]: names[b] for a, b in opposite.items()}
    assert pairs == {
        "forward": "backward",
        "backward": "forward",
        "turn_left": "turn_right",
        "turn_right": "turn_left",
        "forward_turn_left": "forward_turn_right",
        "forward_turn_right": "forward_turn_left",
        "strafe_left": "strafe_right",
        "strafe_right": "strafe_left",
    }
    # by buttons when the names do not say it
    renamed = [{"name": "spin_a", "buttons": ["TURN_LEFT"]}, {"name": "spin_b", "buttons": ["TURN_RIGHT"]}]
    assert counterfactual_actions(renamed) == {0: 1, 1: 0}


def test_action_kinds() -> None:
    kinds = dict(zip([a["name"] for a in ACTIONS], action_kinds(ACTIONS), strict=True))
    assert kinds["turn_left"] == kinds["forward_turn_right"] == "turning"
    assert kinds["forward"] == kinds["strafe_left"] == "moving"
    assert kinds["noop"] == kinds["attack"] == kinds["use"] == "static"


def test_win_shares_and_controllability_count_ties_as_losses() -> None:
    model = np.array([0.1, 0.2, 0.0, 0.5])
    baseline = np.array([0.2, 0.1, 0.0, 0.6])
    kinds = ["turning", "turning", "static", "moving"]
    shares = scoring.win_shares(model, baseline, kinds)
    assert shares["all"] == {"share": 0.5, "count": 4}
    assert shares["turning"] == {"share": 0.5, "count": 2}
    assert shares["static"] == {"share": 0.0, "count": 1}
    assert shares["moving"] == {"share": 1.0, "count": 1}
    assert scoring.controllability(model, model, kinds)["all"]["share"] == 0.0  # ignoring the action never wins
    assert scoring.win_shares(model[:1], baseline[:1], ["turning"])["static"] == {"share": None, "count": 0}


def test_crossing_step() -> None:
    assert scoring.crossing_step([30, 25, 19, 15], [22, 21, 20, 19]) == 3
    assert scoring.crossing_step([50, 50, 50], [50, 50, 50]) is None  # a tie (both exact) is not a crossing
    assert scoring.crossing_step([30, 29], [20, 20]) is None
    assert scoring.crossing_step([10, 30], [20, 20]) == 1


def test_frechet_distance_of_identical_sets_is_zero_and_grows_with_shift() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(256, 4))
    assert scoring.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert scoring.frechet_distance(a, a + 2.0) == pytest.approx(16.0, rel=0.05)


# --------------------------------------------------------------------------- a toy world with known dynamics
# Frames are 8x12 images; turn_left rolls the view one column left, turn_right one column right, every other
# action leaves it. The "latent" of a frame is the frame itself (identity autoencoder), so the true dynamics
# are a perfect world model and copy-last is the ignore-the-keys model.

SHIFT = {3: -1, 4: 1, 5: -1, 6: 1}


def toy_windows(count: int, rows: int, seed: int = 0) -> Windows:
    rng = np.random.default_rng(seed)
    frames = np.zeros((count, rows, 8, 12, 3), np.uint8)
    actions = rng.integers(0, len(ACTIONS), size=(count, rows))
    for w in range(count):
        frame = rng.integers(0, 256, size=(8, 12, 3), dtype=np.uint8)
        for t in range(rows):
            frames[w, t] = frame
            frame = np.roll(frame, SHIFT.get(int(actions[w, t]), 0), axis=1)
    latents = to_chw(frames)
    return Windows(frames, latents, actions, [f"ep{w}" for w in range(count)])


def true_dynamics(context: np.ndarray, actions: np.ndarray) -> np.ndarray:
    last = context[:, -1]
    return np.stack([np.roll(f, SHIFT.get(int(a), 0), axis=-1) for f, a in zip(last, actions[:, -1], strict=True)])


def copy_last(context: np.ndarray, actions: np.ndarray) -> np.ndarray:
    return context[:, -1].copy()


def identity(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, np.float32)


def test_teacher_forced_perfect_model_wins_turns_and_obeys_actions() -> None:
    windows = toy_windows(40, rows=3)
    kinds, opposite = action_kinds(ACTIONS), counterfactual_actions(ACTIONS)
    perfect = scoring.ModelUnderTest("perfect", true_dynamics, identity)
    result = scoring.teacher_forced(perfect, windows, context=2, kinds_of_actions=kinds, opposite=opposite,
                                    batch_size=16)
    assert result["psnr"]["model"]["pooled"] == 50.0  # exact everywhere, capped
    assert result["psnr"]["autoencoder_ceiling"]["mean"] == 50.0
    assert result["ssim"]["model"] == pytest.approx(1.0, abs=1e-4)
    assert result["win_share"]["copy_last_latent"]["turning"]["share"] == 1.0
    assert result["win_share"]["copy_last_frame"]["static"]["share"] == 0.0  # a tie is not a win
    assert result["controllability"]["turning"]["share"] == 1.0
    assert result["margin_db"]["copy_last_latent"]["pooled"] > 0

    frozen = scoring.ModelUnderTest("frozen", copy_last, identity)
    result = scoring.teacher_forced(frozen, windows, context=2, kinds_of_actions=kinds, opposite=opposite,
                                    batch_size=16)
    assert result["margin_db"]["copy_last_frame"] == {"pooled": 0.0, "mean": 0.0, "median": 0.0}
    assert result["win_share"]["copy_last_frame"]["all"]["share"] == 0.0
    assert result["controllability"]["all"]["share"] == 0.0  # ignores its keys


def test_by_action_shows_which_keys_the_model_gets_right_and_where_its_error_is() -> None:
    """A model that knows turn_left only: that action has the margin and the controllability, the other turns
    carry all the error, and the actions that do not move the toy view show no margin and no error."""
    windows = toy_windows(120, rows=3)

    def left_only(context: np.ndarray, actions: np.ndarray) -> np.ndarray:
        last = context[:, -1]
        return np.stack([np.roll(f, -1, axis=-1) if int(a) == 3 else f for f, a in
                         zip(last, actions[:, -1], strict=True)])

    names = [a["name"] for a in ACTIONS]
    result = scoring.teacher_forced(scoring.ModelUnderTest("left", left_only, identity), windows, context=2,
                                    kinds_of_actions=action_kinds(ACTIONS), opposite=counterfactual_actions(ACTIONS),
                                    batch_size=16, action_names=names)
    by = result["by_action"]
    counts = np.bincount(windows.actions[:, 1], minlength=len(names))
    assert {name: row["windows"] for name, row in by.items()} == {
        name: int(c) for name, c in zip(names, counts, strict=True) if c}
    assert by["turn_left"]["margin_db_vs_copy_last_latent"] > 10 and by["turn_left"]["error_share"] == 0.0
    assert by["turn_left"]["controllability"] == 1.0  # exact with its key, a copy with turn_right's
    assert by["turn_right"]["margin_db_vs_copy_last_latent"] == 0.0  # it copies the last frame there
    moving_view = sum(by[n]["error_share"] for n in ("turn_right", "forward_turn_left", "forward_turn_right"))
    assert moving_view == pytest.approx(1.0)
    assert by["noop"]["controllability"] is None and by["noop"]["error_share"] == 0.0
    assert "by_action" not in scoring.teacher_forced(scoring.ModelUnderTest("left", left_only, identity), windows,
                                                     context=2, kinds_of_actions=action_kinds(ACTIONS),
                                                     opposite=counterfactual_actions(ACTIONS), batch_size=16)


def test_encoded_context_matches_stored_latents() -> None:
    windows = toy_windows(5, rows=3)
    kinds, opposite = action_kinds(ACTIONS), counterfactual_actions(ACTIONS)
    encoded = scoring.ModelUnderTest("encoded", true_dynamics, identity, encode=identity)
    result = scoring.teacher_forced(encoded, windows, context=2, kinds_of_actions=kinds, opposite=opposite,
                                    batch_size=2)
    assert result["psnr"]["model"]["pooled"] == 50.0


@pytest.mark.parametrize("steps", [16, 32, 64])
def test_rollout_lengths(steps: int) -> None:
    context = 2
    windows = toy_windows(3, rows=context + steps, seed=steps)
    perfect = scoring.ModelUnderTest("perfect", true_dynamics, identity)
    result = scoring.rollout(perfect, windows, context=context, steps=steps, batch_size=2)
    assert result["steps"] == steps
    for curve in result["psnr_by_step"].values():
        assert all(len(view) == steps for view in curve.values())
    assert result["frames"].shape == (3, steps, 8, 12, 3)
    assert result["psnr_by_step"]["model"]["pooled"] == [50.0] * steps
    assert result["crossing_step"]["copy_last_latent"] is None  # the true dynamics never fall below a frozen frame


def test_rollout_feeds_predictions_back() -> None:
    calls: list[np.ndarray] = []

    def counting(context: np.ndarray, actions: np.ndarray) -> np.ndarray:
        calls.append(actions.copy())
        return context[:, -1] + 1.0

    context = np.zeros((2, 4, 1, 2, 2), np.float32)
    actions = np.arange(2 * 19).reshape(2, 19)
    out = scoring.rollout_latents(counting, context, actions, steps=16)
    assert out.shape == (2, 16, 1, 2, 2)
    assert out[0, :, 0, 0, 0].tolist() == [float(s) for s in range(1, 17)]  # each step sees the previous output
    assert [c[0, -1] for c in calls] == list(range(3, 19))  # the recorded action for each step
    with pytest.raises(ValueError, match="needs 19 actions"):
        scoring.rollout_latents(counting, context, actions[:, :10], steps=16)
