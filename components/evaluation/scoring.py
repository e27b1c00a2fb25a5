"""Held-out evaluation of a world model: metrics, baselines, controllability and rollouts.

Everything here is pure: functions take frames, latents, actions and *predictor callables* and return
numbers. The ``evaluation`` stage (components/stages/evaluation.py) wires in the shipped ONNX export and
the PyTorch teacher. Conventions:

* Frames are float tensors ``[B, 3, H, W]`` in ``0..1``; latents ``[B, C, h, w]``; actions int64 ids.
* A *window* of ``K + L`` consecutive rows of one episode: rows ``0..K-1`` are the context (latents and the
  actions taken on them); the model predicts row ``K`` from them (store convention: frames ``t-K..t-1``
  with actions ``t-K..t-1`` predict frame ``t``). A rollout keeps predicting rows ``K..K+L-1``, feeding its
  own predictions back and using the recorded actions.
* PSNR is reported three ways (``components.metrics.psnr_summary``): pooled over the mean MSE, mean per frame
  with identical frames capped (50 dB), and the median. About a quarter of random-play windows barely change,
  and copy-last is exact on them, so an uncapped mean would be infinite.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from scipy import linalg

from components.data.windows import (
    HeldOutError,
    Windows,
    load_windows,
    pick_windows,
)
from components.errors import PipelineError
from components.evaluation import long_play, view_motion
from components.evaluation.actions import (
    ACTION_KINDS,
    action_kinds,
    counterfactual_actions,
    single_button_actions,
    spec_field,
)
from components.images import to_uint8
from components.metrics import PSNR_CAP_DB, mse_per_frame, psnr_summary, ssim
from components.models.autoencoder import load_autoencoder
from components.models.sampler import sample_next_latent
from components.models.world_model import load_world_model, make_scheduler
from components.runtime.sessions import OnnxExport

if TYPE_CHECKING:
    from components.data.trajectory_store import TrajectoryStore
    from components.params import EnvironmentParams, EvaluationParams, SamplerParams



# (context_latents [B,K,C,h,w] f32, context_actions [B,K] i64) -> next latent [B,C,h,w] f32
Predictor = Callable[[np.ndarray, np.ndarray], np.ndarray]
# latents [B,C,h,w] -> frames [B,3,H,W] in 0..1 ; frames -> latents
Decoder = Callable[[np.ndarray], np.ndarray]
Encoder = Callable[[np.ndarray], np.ndarray]


# --------------------------------------------------------------------------- comparisons


def win_shares(
    model_mse: np.ndarray, baseline_mse: np.ndarray, kinds: Sequence[str]
) -> dict[str, dict[str, float | int | None]]:
    """Share of windows where the model's MSE is strictly lower than the baseline's, overall and per kind.

    A tie (e.g. both exact on a frame that did not change) is not a win. Kinds with no window report
    ``share: null`` and ``count: 0``.
    """
    return _shares(np.asarray(model_mse) < np.asarray(baseline_mse), kinds)


def _shares(wins: np.ndarray, kinds: Sequence[str]) -> dict[str, dict[str, float | int | None]]:
    kind_of = np.asarray(list(kinds))
    result: dict[str, dict[str, float | int | None]] = {}
    for kind in ("all", *ACTION_KINDS):
        mask = np.ones(len(wins), bool) if kind == "all" else kind_of == kind
        count = int(mask.sum())
        result[kind] = {"share": float(wins[mask].mean()) if count else None, "count": count}
    return result


def controllability(
    true_mse: np.ndarray, counterfactual_mse: np.ndarray, kinds: Sequence[str]
) -> dict[str, dict[str, float | int | None]]:
    """How often the prediction made with the true action is closer to the real frame than the one made
    with the counterfactual action (strictly), overall and per kind. A model that ignores its actions
    ties everywhere and scores 0."""
    return _shares(np.asarray(true_mse) < np.asarray(counterfactual_mse), kinds)


def margins_db(model: dict[str, float], baseline: dict[str, float]) -> dict[str, float]:
    """Model minus baseline, in dB, for each PSNR view (positive: the model is better)."""
    return {k: model[k] - baseline[k] for k in ("pooled", "mean", "median")}


def psnr_curve(step_mse: np.ndarray, cap_db: float = PSNR_CAP_DB) -> dict[str, list[float]]:
    """Per-step PSNR of rollouts: ``step_mse`` is ``[windows, steps]``; returns the three views per step."""
    step_mse = np.asarray(step_mse, dtype=np.float64)
    per_step = [psnr_summary(step_mse[:, s], cap_db) for s in range(step_mse.shape[1])]
    return {view: [s[view] for s in per_step] for view in ("pooled", "mean", "median")}


def crossing_step(model_curve: Sequence[float], baseline_curve: Sequence[float]) -> int | None:
    """The first rollout step (1-based) at which the model's PSNR falls below the baseline's.

    ``1`` means the model is worse from the first step; ``None`` means it never falls below (ties, e.g.
    both exact at the cap, do not count as crossing) for the whole rollout.
    """
    for step, (model, baseline) in enumerate(zip(model_curve, baseline_curve, strict=True), start=1):
        if model < baseline:
            return step
    return None


# --------------------------------------------------------------------------- windows and rollouts


def batched(function: Callable[..., np.ndarray], batch_size: int, *arrays: np.ndarray) -> np.ndarray:
    """Apply ``function`` to slices of at most ``batch_size`` rows of ``arrays`` and concatenate."""
    parts = [function(*(a[i : i + batch_size] for a in arrays)) for i in range(0, len(arrays[0]), batch_size)]
    return np.concatenate(parts) if parts else np.zeros((0,))


def rollout_latents(
    predict: Predictor, context_latents: np.ndarray, actions: np.ndarray, steps: int
) -> np.ndarray:
    """Autoregressive rollout: ``steps`` predicted latents ``[B, steps, C, h, w]``.

    ``context_latents`` is ``[B, K, C, h, w]``; ``actions`` is ``[B, K + steps - 1]`` (at least), the
    recorded actions from the first context row on. Each prediction joins the context, the oldest row
    leaves it, and the next recorded action is appended.
    """
    k = context_latents.shape[1]
    if actions.shape[1] < k + steps - 1:
        raise ValueError(f"a {steps}-step rollout with context {k} needs {k + steps - 1} actions, "
                         f"got {actions.shape[1]}")
    context = np.array(context_latents, dtype=np.float32)
    predictions = []
    for step in range(steps):
        nxt = np.asarray(predict(context, np.ascontiguousarray(actions[:, step : step + k])), dtype=np.float32)
        predictions.append(nxt)
        context = np.concatenate([context[:, 1:], nxt[:, None]], axis=1)
    return np.stack(predictions, axis=1)


# --------------------------------------------------------------------------- one model, all metrics


@dataclass
class ModelUnderTest:
    """A world model to score: its predictor and the decoder that turns its latents into frames.

    ``latents`` says where its context comes from: ``"encode"`` (encode the real frames with ``encode``,
    what the shipped export does at play time) or ``"store"`` (the validated latents).
    """

    name: str
    predict: Predictor
    decode: Decoder
    encode: Encoder | None = None


def context_latents(model: ModelUnderTest, windows: Windows, rows: slice, batch_size: int) -> np.ndarray:
    """Context latents ``[N, len(rows), C, h, w]`` for ``model``: encoded from the frames, or the stored ones."""
    if model.encode is None:
        if windows.latents is None:
            raise PipelineError(f"{model.name}: needs stored latents or an encoder")
        return np.asarray(windows.latents[:, rows], dtype=np.float32)
    frames = windows.frames_chw(rows)
    n, t = frames.shape[:2]
    flat = frames.reshape(n * t, *frames.shape[2:])
    latents = batched(model.encode, batch_size, flat)
    return latents.reshape(n, t, *latents.shape[1:]).astype(np.float32)


def measure_view_motion(raw: TrajectoryStore, environment: EnvironmentParams, settings: EvaluationParams) -> ViewMotion:
    """The real game's displacement per action on the training split of ``raw`` (``params.environment``,
    ``params.evaluation``)."""
    measured = view_motion.action_displacements(raw, len(environment.actions), environment.view_rows,
                                                settings.displacement_pairs, settings.seed)
    return ViewMotion(measured["median_px"], environment.view_rows, measured["pairs"])


@dataclass(frozen=True)
class ViewMotion:
    """What the real game does with each action: the median horizontal displacement of the view in pixels per
    action id (``components.evaluation.view_motion.action_displacements`` on the training split), and the share of rows
    above the HUD. It drives the controllable baseline, ``shift_last_frame``."""

    displacement_px: Sequence[float]
    view_rows: float = 0.8
    pairs: Sequence[int] = ()  # frame pairs each median was measured on

    def describe(self, actions: Sequence[Any]) -> dict[str, Any]:
        """For the metrics file: the displacement per action name, what it was measured on."""
        names = [spec_field(a, "name") for a in actions]
        return {"split": "train", "view_rows": self.view_rows,
                "displacement_px": {n: float(d) for n, d in zip(names, self.displacement_px, strict=True)},
                "pairs": {n: int(count) for n, count in zip(names, self.pairs, strict=True)}}

    def shift(self, frames: np.ndarray, actions: np.ndarray) -> np.ndarray:
        """The controllable baseline: ``frames`` with the view shifted by each action's displacement."""
        return view_motion.shift_view(frames, np.asarray(self.displacement_px)[np.asarray(actions)], self.view_rows)


BASELINES = ("copy_last_frame", "copy_last_latent", "shift_last_frame")


def _view_rows(motion: ViewMotion | None) -> float:
    """The rows sharpness is measured on: those above the HUD when the view motion is known, else all."""
    return motion.view_rows if motion is not None else 1.0


def teacher_forced(
    model: ModelUnderTest,
    windows: Windows,
    context: int,
    kinds_of_actions: Sequence[str],
    opposite: dict[int, int],
    batch_size: int,
    cap_db: float = PSNR_CAP_DB,
    motion: ViewMotion | None = None,
    action_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Next-frame metrics of ``model`` on windows of ``context + 1`` rows, with the baselines beside them.

    Returns PSNR (three views), SSIM and sharpness of the model, of copy-last-frame, of copy-last-latent
    (decode(last context latent)), of the controllable baseline shift-last-frame (the last frame with its view
    shifted by the action's median displacement; with ``motion``) and of the autoencoder ceiling (decode(latent
    of the real next frame)); the model's margins over the baselines in dB; the share of windows it wins against
    each baseline by action kind; and controllability (true action vs its counterfactual, on windows whose action
    has one) of the model and of the controllable baseline. With ``action_names`` also ``by_action``: the same
    per action that led to the frame (:func:`by_action`).
    """
    k = context
    latents = context_latents(model, windows, slice(0, k + 1), batch_size)
    ctx, next_latent = latents[:, :k], latents[:, k]
    ctx_actions = np.ascontiguousarray(windows.actions[:, :k])
    target = windows.frames_chw(k)
    last_frame = windows.frames_chw(k - 1)

    predicted = batched(model.decode, batch_size, batched(model.predict, batch_size, ctx, ctx_actions))
    copy_latent = batched(model.decode, batch_size, ctx[:, -1])
    ceiling = batched(model.decode, batch_size, next_latent)
    _check_frames(model.name, predicted, target)

    kinds = [kinds_of_actions[a] for a in windows.actions[:, k - 1]]
    frames = {"model": predicted, "copy_last_frame": last_frame, "copy_last_latent": copy_latent,
              "autoencoder_ceiling": ceiling}
    if motion is not None:
        frames["shift_last_frame"] = motion.shift(last_frame, ctx_actions[:, -1])
    mse = {name: mse_per_frame(value, target) for name, value in frames.items()}
    baselines = [b for b in BASELINES if b in frames]
    result: dict[str, Any] = {
        "windows": len(windows),
        "identical_frame_share": float((mse["copy_last_frame"] == 0).mean()),
        "action_kind_counts": {kind: kinds.count(kind) for kind in ACTION_KINDS},
        "psnr": {name: psnr_summary(values, cap_db) for name, values in mse.items()},
        "ssim": {name: float(ssim(torch.from_numpy(value), torch.from_numpy(target)).mean())
                 for name, value in frames.items()},
        "sharpness": {name: view_motion.sharpness(value, target, _view_rows(motion)) for name, value in frames.items()},
    }
    result["margin_db"] = {b: margins_db(result["psnr"]["model"], result["psnr"][b]) for b in baselines}
    result["win_share"] = {b: win_shares(mse["model"], mse[b], kinds) for b in baselines}

    def model_frames(actions: np.ndarray, rows: np.ndarray) -> np.ndarray:
        return batched(model.decode, batch_size, batched(model.predict, batch_size, ctx[rows], actions))

    has_opposite, counter_mse = _counterfactual_mse(model_frames, ctx_actions, target, opposite)
    result["controllability"] = _controllability(mse["model"], has_opposite, counter_mse, kinds)
    if motion is not None:
        shifted = _counterfactual_mse(lambda actions, rows: motion.shift(last_frame[rows], actions[:, -1]),
                                      ctx_actions, target, opposite)
        result["baseline_controllability"] = {"shift_last_frame": _controllability(mse["shift_last_frame"],
                                                                                   *shifted, kinds)}
    if action_names is not None:
        result["by_action"] = by_action(mse["model"], mse["copy_last_latent"], has_opposite, counter_mse,
                                        ctx_actions[:, -1], action_names, cap_db)
    return result


def _counterfactual_mse(
    predict_frames: Callable[[np.ndarray, np.ndarray], np.ndarray],
    ctx_actions: np.ndarray,
    target: np.ndarray,
    opposite: dict[int, int],
) -> tuple[np.ndarray, np.ndarray]:
    """``predict_frames(context actions [n, K], window mask)``: the frames predicted for the masked windows
    with their last action swapped for its counterfactual. Returns the mask of the windows whose action has one
    and, for those, the MSE of that counterfactual frame against the real one."""
    has_opposite = np.array([int(a) in opposite for a in ctx_actions[:, -1]], bool)
    if not has_opposite.any():
        return has_opposite, np.zeros(0)
    swapped = ctx_actions[has_opposite].copy()
    swapped[:, -1] = [opposite[int(a)] for a in swapped[:, -1]]
    return has_opposite, mse_per_frame(predict_frames(swapped, has_opposite), target[has_opposite])


def _controllability(true_mse: np.ndarray, has_opposite: np.ndarray, counter_mse: np.ndarray,
                     kinds: Sequence[str]) -> dict[str, Any]:
    if not has_opposite.any():
        return {"all": {"share": None, "count": 0}, "reason": "no window's action has a counterfactual"}
    selected_kinds = [k for k, keep in zip(kinds, has_opposite, strict=True) if keep]
    return controllability(true_mse[has_opposite], counter_mse, selected_kinds)


def by_action(model_mse: np.ndarray, copy_latent_mse: np.ndarray, has_opposite: np.ndarray,
              counter_mse: np.ndarray, last_actions: np.ndarray, names: Sequence[str],
              cap_db: float = PSNR_CAP_DB) -> dict[str, dict[str, float | int | None]]:
    """Per action that led to the frame (by name; actions with no window left out): ``windows``, the model's
    pooled PSNR margin over copy-last-latent in dB, its ``error_share`` (of the model's summed MSE: where the
    error is) and ``controllability`` (null for actions with no counterfactual)."""
    wins = np.zeros(len(model_mse), bool)
    wins[has_opposite] = model_mse[has_opposite] < counter_mse
    total = float(model_mse.sum())
    result: dict[str, dict[str, float | int | None]] = {}
    for action, name in enumerate(names):
        rows = last_actions == action
        if not rows.any():
            continue
        judged = rows & has_opposite
        result[name] = {
            "windows": int(rows.sum()),
            "margin_db_vs_copy_last_latent": psnr_summary(model_mse[rows], cap_db)["pooled"]
            - psnr_summary(copy_latent_mse[rows], cap_db)["pooled"],
            "error_share": float(model_mse[rows].sum()) / total if total > 0 else None,
            "controllability": float(wins[judged].mean()) if judged.any() else None,
        }
    return result


def _check_frames(name: str, predicted: np.ndarray, target: np.ndarray) -> None:
    if predicted.shape != target.shape:
        raise PipelineError(
            f"{name}: decoded frames are {predicted.shape[1:]} but the recorded frames are {target.shape[1:]}; "
            "the export and the trajectories must come from the same environment.resolution"
        )


def rollout(
    model: ModelUnderTest,
    windows: Windows,
    context: int,
    steps: int,
    batch_size: int,
    cap_db: float = PSNR_CAP_DB,
    motion: ViewMotion | None = None,
) -> dict[str, Any]:
    """A ``steps``-long autoregressive rollout on windows of ``context + steps`` rows, driven by the recorded
    actions: per-step PSNR curves (three views) and sharpness of the model and of the baselines (copy-last-frame
    and copy-last-latent, frozen; with ``motion``, shift-last-frame, the last frame shifted by the displacement
    of every action so far), the step where the model's pooled curve crosses each baseline, and ``frames``
    (the decoded predictions, uint8 ``[N, steps, H, W, 3]``, for the sample video; not JSON)."""
    k = context
    ctx = context_latents(model, windows, slice(0, k), batch_size)
    predicted = batched(lambda c, a: rollout_latents(model.predict, c, a, steps), batch_size, ctx, windows.actions)
    n = len(windows)
    flat = predicted.reshape(n * steps, *predicted.shape[2:])
    frames = batched(model.decode, batch_size, flat).reshape(n, steps, 3, *windows.frames.shape[2:4])
    target = windows.frames_chw(slice(k, k + steps))
    _check_frames(model.name, frames[:, 0], target[:, 0])
    last_frame = windows.frames_chw(k - 1)
    last_latent_frame = batched(model.decode, batch_size, ctx[:, -1])
    predictions: dict[str, Callable[[int], np.ndarray]] = {
        "model": lambda s: frames[:, s],
        "copy_last_frame": lambda s: last_frame,
        "copy_last_latent": lambda s: last_latent_frame,
    }
    if motion is not None:
        travelled = np.cumsum(np.asarray(motion.displacement_px)[windows.actions[:, k - 1 : k - 1 + steps]], axis=1)
        predictions["shift_last_frame"] = lambda s: view_motion.shift_view(last_frame, travelled[:, s],
                                                                           motion.view_rows)

    curves, sharpness = {}, {}
    for name, prediction_at in predictions.items():
        predicted_steps = [prediction_at(s) for s in range(steps)]
        curves[name] = psnr_curve(np.stack([mse_per_frame(p, target[:, s]) for s, p in enumerate(predicted_steps)],
                                           axis=1), cap_db)
        sharpness[name] = [view_motion.sharpness(p, target[:, s], _view_rows(motion))
                           for s, p in enumerate(predicted_steps)]
    return {
        "steps": steps,
        "windows": n,
        "psnr_by_step": curves,
        "sharpness_by_step": sharpness,
        "crossing_step": {
            baseline: crossing_step(curves["model"]["pooled"], curves[baseline]["pooled"])
            for baseline in BASELINES if baseline in curves
        },
        "final_step_psnr": {name: curve["pooled"][-1] for name, curve in curves.items()},
        "frames": to_uint8(frames),
    }


# --------------------------------------------------------------------------- turning the view


def play_keys(model: ModelUnderTest, windows: Windows, context: int, keys: np.ndarray,
              batch_size: int) -> np.ndarray:
    """Frames float ``[N, steps, 3, H, W]`` generated from each window's context with ``keys`` ``[N, steps]``
    (action ids pressed after the context)."""
    steps = keys.shape[1]
    ctx = context_latents(model, windows, slice(0, context), batch_size)
    pressed = np.concatenate([windows.actions[:, : context - 1], keys.astype(np.int64)], 1)
    latents = batched(lambda c, a: rollout_latents(model.predict, c, a, steps), batch_size, ctx, pressed)
    flat = latents.reshape(-1, *latents.shape[2:])
    return batched(model.decode, batch_size, flat).reshape(len(windows), steps, 3, *windows.frames.shape[2:4])


def hold_action(model: ModelUnderTest, windows: Windows, context: int, action: int, steps: int,
                batch_size: int) -> np.ndarray:
    """Frames float ``[N, steps, 3, H, W]`` generated from each window's context while ``action`` is held."""
    return play_keys(model, windows, context, np.full((len(windows), steps), action, np.int64), batch_size)


def measure_long_play(model: ModelUnderTest, raw: TrajectoryStore, latents: TrajectoryStore | None,
                      episodes: Sequence[Any], context: int, settings: EvaluationParams, num_actions: int,
                      view_rows: float, real_pool: np.ndarray) -> tuple[dict[str, Any], np.ndarray]:
    """``components.evaluation.long_play`` for one model: ``settings.long_play_steps`` steps of player-like keys from
    held-out
    contexts (with their recorded continuation where the episodes are that long; the teacher-forced windows already
    needed longer episodes than a bare context). Returns the metrics and, for the picture, uint8
    ``[rows, 1 + shown steps, H, W, 3]``: the last context frame, then the shown steps."""
    steps, count, seed = settings.long_play_steps, settings.long_play_contexts, settings.seed + 2
    picks = pick_windows(episodes, context + steps, count, seed)
    length = context + steps if picks else context
    picks = picks or pick_windows(episodes, context, count, seed)
    windows = load_windows(raw, latents, picks, length)
    keys = long_play.player_keys(num_actions, len(windows), steps, settings.long_play_hold, seed)
    generated = play_keys(model, windows, context, keys, settings.batch_size)
    last = windows.frames_chw(context - 1)
    recorded = windows.frames_chw(slice(context, None)) if length > context else None
    shown = _shown_steps(steps)
    metrics = long_play.measure(generated, last, real_pool, view_rows, settings.long_play_hold, seed, shown, recorded)
    rows = slice(0, settings.long_play_rows)
    picture = np.concatenate([windows.frames[rows, context - 1 : context],
                              to_uint8(generated[rows][:, [s - 1 for s in shown]])], axis=1)
    return metrics, picture


MAX_STEP_SHIFT = 0.3  # of the width: a held turn pans about an eighth of the view a step


def turn_response(model: ModelUnderTest, windows: Windows, context: int, actions: Sequence[Any],
                  motion: ViewMotion, steps: int, batch_size: int) -> dict[str, Any]:
    """Hold each turn (``TURN_LEFT``, ``TURN_RIGHT`` alone) for ``steps`` steps from every window's context and
    measure the horizontal shift of the last generated frame against the last real context frame.

    The shift is measured step by step (each generated frame against the one before, the first against the last
    real context frame, at most ``MAX_STEP_SHIFT`` of the width a step) and summed: four held steps pan the 80x60
    view by about 30 px, and a single alignment over so small an overlap is unreliable. Per turn: the model's
    mean and median shift in pixels, the share of contexts where it has the sign of the real game's (the action's
    median displacement on the training split), the real game's shift over the same steps, and the model's mean
    shift as a fraction of it.
    """
    turns = {b: i for b, i in single_button_actions(actions, ("TURN_LEFT", "TURN_RIGHT")).items() if b != "NOOP"}
    if not turns:
        return {"skipped": "no action presses TURN_LEFT or TURN_RIGHT alone"}
    last = windows.frames_chw(context - 1)
    result: dict[str, Any] = {"contexts": len(windows), "steps": steps}
    for action in (turns[b] for b in sorted(turns)):
        frames = np.concatenate([last[:, None], hold_action(model, windows, context, action, steps, batch_size)], 1)
        limit = int(MAX_STEP_SHIFT * last.shape[-1])
        shifts = np.sum([view_motion.horizontal_shift(frames[:, s], frames[:, s + 1], motion.view_rows,
                                                      max_shift=limit) for s in range(steps)], axis=0)
        real = steps * float(motion.displacement_px[action])
        sign = np.sign(real) if real else 1.0
        name = spec_field(actions[action], "name")
        result[name] = {
            "model_mean_px": float(shifts.mean()),
            "model_median_px": float(np.median(shifts)),
            "right_sign_share": float((np.sign(shifts) == sign).mean()),
            "real_px": real,
            "fraction_of_real": float(shifts.mean() / real) if real else None,
        }
    return result


def turn_test(model: ModelUnderTest, windows: Windows, context: int, actions: Sequence[Any], steps: int,
              batch_size: int) -> dict[str, np.ndarray]:
    """For the turn-test picture: ``steps`` frames generated while holding ``turn_left``, ``turn_right``,
    ``forward`` and the no-op (those of them the action set has alone), uint8 ``[N, steps, H, W, 3]`` each,
    beside ``real`` (the recorded continuation) and ``context`` (the last context frame, ``[N, H, W, 3]``)."""
    held = single_button_actions(actions, ("TURN_LEFT", "TURN_RIGHT", "MOVE_FORWARD"))
    shown: dict[str, np.ndarray] = {}
    for button in ("TURN_LEFT", "TURN_RIGHT", "MOVE_FORWARD", "NOOP"):
        if button in held:
            name = spec_field(actions[held[button]], "name")
            shown[name] = to_uint8(hold_action(model, windows, context, held[button], steps, batch_size))
    shown["real"] = windows.frames[:, context : context + steps]
    shown["context"] = windows.frames[:, context - 1]
    return shown


# --------------------------------------------------------------------------- FVD


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between two Gaussian fits of feature sets ``[N, D]`` (the FVD/FID formula)."""

    mu_a, mu_b = features_a.mean(0), features_b.mean(0)
    sigma_a = np.atleast_2d(np.cov(features_a, rowvar=False))
    sigma_b = np.atleast_2d(np.cov(features_b, rowvar=False))
    covmean = linalg.sqrtm(sigma_a @ sigma_b)
    covmean = np.real(covmean)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(sigma_a + sigma_b - 2.0 * covmean))


# --------------------------------------------------------------------------- a whole model


def evaluate_model(
    model: ModelUnderTest,
    context: int,
    raw: TrajectoryStore,
    latents: TrajectoryStore | None,
    episodes: Sequence[Any],
    settings: EvaluationParams,
    actions: Sequence[Any],
    motion: ViewMotion | None = None,
    with_long_play: bool = False,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Teacher-forced metrics, every rollout length, (with ``motion``) the turn response and (with ``with_long_play``,
    for the model people play) long play, for one model. ``settings`` is ``params.evaluation``.

    Returns ``(metrics, extras)``; extras holds arrays for the plots and the sample video (not JSON):
    ``rollout_<L>`` predicted frames and ``real_<L>`` the real ones, uint8 ``[N, L, H, W, 3]``, and
    ``turn_test`` (see :func:`turn_test`) and ``long_play`` (see :func:`measure_long_play`).
    """
    kinds, opposite = action_kinds(actions), counterfactual_actions(actions)
    picks = pick_windows(episodes, context + 1, settings.windows, settings.seed)
    if not picks:
        raise HeldOutError(f"no held-out episode has the {context + 1} frames a window needs; record longer episodes")
    windows = load_windows(raw, latents, picks, context + 1)
    real_pool = windows.frames_chw(context)  # held-out real frames: what long play is compared with
    metrics: dict[str, Any] = {
        "context": context,
        "teacher_forced": teacher_forced(model, windows, context, kinds, opposite, settings.batch_size,
                                         settings.psnr_cap_db, motion, [spec_field(a, "name") for a in actions]),
        "rollout": {},
    }
    extras: dict[str, Any] = {}
    skipped = {}
    for steps in settings.rollout_lengths:
        picks = pick_windows(episodes, context + steps, settings.rollout_windows, settings.seed)
        if not picks:
            skipped[str(steps)] = f"no held-out episode has {context + steps} frames"
            continue
        windows = load_windows(raw, latents, picks, context + steps)
        result = rollout(model, windows, context, steps, settings.batch_size, settings.psnr_cap_db, motion)
        extras[f"rollout_{steps}"] = result.pop("frames")
        extras[f"real_{steps}"] = windows.frames[:, context:]
        extras[f"context_{steps}"] = windows.frames[:, context - 1]
        result["psnr_at_step"] = {
            str(s): result["psnr_by_step"]["model"]["pooled"][s - 1] for s in _shown_steps(steps)
        }
        result["mean_psnr_over_steps"] = {
            name: float(np.mean(curve["pooled"])) for name, curve in result["psnr_by_step"].items()
        }
        result["sharpness_at_step"] = {
            str(s): result["sharpness_by_step"]["model"][s - 1] for s in _shown_steps(steps)
        }
        metrics["rollout"][str(steps)] = result
    if skipped:
        metrics["rollout_skipped"] = skipped
    if motion is not None:
        length = context + max(settings.turn_steps, settings.turn_test_steps)
        picks = pick_windows(episodes, length, settings.turn_contexts, settings.seed + 1)
        if picks:
            windows = load_windows(raw, latents, picks, length)
            metrics["turn_response"] = turn_response(model, windows, context, actions, motion, settings.turn_steps,
                                                     settings.batch_size)
            extras["turn_test"] = turn_test(model, windows.first(settings.turn_test_rows), context, actions,
                                            settings.turn_test_steps, settings.batch_size)
        else:
            metrics["turn_response"] = {"skipped": f"no held-out episode has {length} frames"}
    if with_long_play:
        metrics["long_play"], extras["long_play"] = measure_long_play(model, raw, latents, episodes, context, settings,
                                                                      len(actions), _view_rows(motion), real_pool)
    return metrics, extras


def _shown_steps(steps: int) -> list[int]:
    shown = [s for s in (1, 2, 4, 8, 16, 32, 64, 128) if s <= steps]
    return shown if shown[-1] == steps else [*shown, steps]


def onnx_model(export_dir: str | Path, threads: int = 2) -> tuple[ModelUnderTest, dict[str, Any]]:
    """The shipped export, run by ONNX Runtime exactly as the player runs it: encode real frames, predict,
    decode. Returns the model and the export's manifest."""

    game = OnnxExport(export_dir, threads=threads)

    def decode(latents: np.ndarray) -> np.ndarray:
        return game.decoder.run(["frames"], {"latents": np.ascontiguousarray(latents, np.float32)})[0]

    def encode(frames: np.ndarray) -> np.ndarray:
        return game.encoder.run(["latents"], {"frames": np.ascontiguousarray(frames, np.float32)})[0]

    return ModelUnderTest("onnx", game.predict, decode, encode), game.manifest


def teacher_model(checkpoint_dir: str | Path, vae_dir: str | Path, sampler: SamplerParams,
                  device: torch.device | str = "cpu") -> tuple[ModelUnderTest, int]:
    """The PyTorch teacher on ``device``: DDIM with ``sampler.steps`` steps and CFG on the past frames, decoded by
    the fine-tuned VAE; its context is the validated latents. Returns the model and its context length K."""

    teacher = load_world_model(checkpoint_dir, device).eval()
    autoencoder = load_autoencoder(vae_dir)
    autoencoder.vae.to(device)
    scheduler = make_scheduler(teacher.config, "ddim")
    generator = torch.Generator().manual_seed(int(sampler.seed))

    @torch.no_grad()
    def predict(context: np.ndarray, actions: np.ndarray) -> np.ndarray:
        return sample_next_latent(
            teacher, scheduler, torch.from_numpy(np.ascontiguousarray(context, np.float32)).to(device),
            torch.from_numpy(np.ascontiguousarray(actions, np.int64)).to(device), steps=sampler.steps, cfg=sampler.cfg,
            context_noise_level=sampler.context_noise_level, eta=sampler.eta, generator=generator,
        ).cpu().numpy()

    @torch.no_grad()
    def decode(latents: np.ndarray) -> np.ndarray:
        frames = autoencoder.decode(torch.from_numpy(np.ascontiguousarray(latents, np.float32)).to(device))
        return frames.clamp(0, 1).cpu().numpy()

    return ModelUnderTest("teacher", predict, decode), int(teacher.config.context)


# --------------------------------------------------------------------------- LPIPS and FVD (optional)


def lpips_scores(weights: str | None, pairs: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
    """Mean LPIPS-style perceptual distance of each ``name: (prediction, target)`` pair, uint8 [N, H, W, 3].

    ``weights`` is a local TorchScript VGG16 as used by StyleGAN2-ADA's metrics (``vgg16.pt``), called
    ``vgg16(images_0_255, resize_images=False, return_lpips=True)``. Absent: ``{"skipped": reason}``.
    """
    reason = _missing_weights(weights, "evaluation.lpips_weights")
    if reason:
        return {"skipped": reason}
    try:
        net = torch.jit.load(str(weights), map_location="cpu").eval()
        scores = {}
        with torch.no_grad():
            for name, (prediction, target) in pairs.items():
                a = torch.from_numpy(np.moveaxis(prediction, -1, 1).astype(np.float32))
                b = torch.from_numpy(np.moveaxis(target, -1, 1).astype(np.float32))
                fa = net(a, resize_images=False, return_lpips=True)
                fb = net(b, resize_images=False, return_lpips=True)
                scores[name] = float(((fa - fb) ** 2).sum(1).mean())
        return scores
    except Exception as error:  # a wrong file must not fail the stage; say why
        return {"skipped": f"{weights}: could not compute LPIPS ({type(error).__name__}: {error})"}


def fvd_scores(weights: str | None, real: np.ndarray | None, fakes: dict[str, np.ndarray]) -> dict[str, Any]:
    """FVD between real clips and each model's generated clips, uint8 ``[N, T, H, W, 3]``.

    ``weights`` is a local TorchScript I3D as used by StyleGAN-V (``i3d_torchscript.pt``), called on videos
    ``[N, 3, T, H, W]`` in -1..1 with ``rescale=False, resize=True, return_features=True``.
    """
    reason = _missing_weights(weights, "evaluation.fvd_weights")
    if reason:
        return {"skipped": reason}
    if real is None or len(real) < 2:
        return {"skipped": "fewer than 2 rollout clips: FVD needs a distribution of videos"}
    try:
        net = torch.jit.load(str(weights), map_location="cpu").eval()

        def features(videos: np.ndarray) -> np.ndarray:
            x = torch.from_numpy(np.moveaxis(videos.astype(np.float32) / 127.5 - 1.0, -1, 1))  # N,3,T,H,W
            with torch.no_grad():
                return net(x, rescale=False, resize=True, return_features=True).double().numpy()

        real_features = features(real)
        return {name: frechet_distance(real_features, features(fake)) for name, fake in fakes.items()}
    except Exception as error:
        return {"skipped": f"{weights}: could not compute FVD ({type(error).__name__}: {error})"}


def _missing_weights(weights: str | None, key: str) -> str | None:
    if not weights:
        return f"{key} is not set (no backbone weights at a local path; nothing is downloaded)"
    if not Path(weights).is_file():
        return f"{key}: {weights} does not exist"
    return None


def headline(metrics: Mapping[str, Any]) -> dict[str, float | int | str | None]:
    """The numbers worth a glance (Dagster metadata, logs): PSNR views, margins, win shares, crossings."""
    flat: dict[str, Any] = {}
    for model in ("onnx", "teacher"):
        m = metrics.get(model)
        if not isinstance(m, Mapping) or "teacher_forced" not in m:
            continue
        tf = m["teacher_forced"]
        for view in ("pooled", "mean", "median"):
            flat[f"{model}/psnr_{view}"] = tf["psnr"]["model"][view]
        flat[f"{model}/ssim"] = tf["ssim"]["model"]
        for baseline in ("copy_last_frame", "copy_last_latent"):
            flat[f"{model}/margin_db_vs_{baseline}"] = tf["margin_db"][baseline]["pooled"]
            flat[f"{model}/turning_win_share_vs_{baseline}"] = tf["win_share"][baseline]["turning"]["share"]
        for kind in ("turning", "moving"):
            flat[f"{model}/controllability_{kind}"] = tf["controllability"].get(kind, {}).get("share")
        if "shift_last_frame" in tf["margin_db"]:
            flat[f"{model}/margin_db_vs_shift_last_frame"] = tf["margin_db"]["shift_last_frame"]["pooled"]
        for steps, r in m.get("rollout", {}).items():
            flat[f"{model}/rollout{steps}_final_psnr"] = r["final_step_psnr"]["model"]
            flat[f"{model}/rollout{steps}_crosses_copy_last_latent_at"] = r["crossing_step"]["copy_last_latent"]
            for step in ("16", "32"):
                if step in r.get("sharpness_at_step", {}) and int(steps) == max(map(int, m["rollout"])):
                    flat[f"{model}/sharpness_step{step}"] = r["sharpness_at_step"][step]
        for turn, response in m.get("turn_response", {}).items():
            if isinstance(response, Mapping):
                flat[f"{model}/turn_{turn}_right_sign_share"] = response["right_sign_share"]
                flat[f"{model}/turn_{turn}_fraction_of_real"] = response["fraction_of_real"]
        for name, value in m.get("long_play", {}).get("end", {}).items():
            flat[f"{model}/long_play_{name}"] = value
    if "onnx" in metrics:
        tf = metrics["onnx"]["teacher_forced"]
        for name in ("copy_last_frame", "copy_last_latent", "shift_last_frame", "autoencoder_ceiling"):
            if name in tf["psnr"]:
                flat[f"baseline/{name}_psnr_pooled"] = tf["psnr"][name]["pooled"]
        for name, value in metrics["onnx"].get("long_play", {}).get("recorded_end", {}).items():
            flat[f"baseline/recorded_long_play_{name}"] = value
        shift = tf.get("baseline_controllability", {}).get("shift_last_frame", {})
        if "turning" in shift:
            flat["baseline/shift_last_frame_controllability_turning"] = shift["turning"]["share"]
            flat["baseline/shift_last_frame_controllability_moving"] = shift["moving"]["share"]
    return flat
