"""How the view moves between frames, measured in pixels: what a player sees when a key turns the view.

* ``horizontal_shift``: the horizontal displacement of one frame against another, the best alignment of the
  rows above the HUD (mean absolute difference over the overlap, refined to sub-pixel by a parabola). Positive
  means the content moved right (``turn_left`` at frame skip 4 moves the 80x60 view about +7 px).
* ``action_displacements``: the median of that displacement per action id over consecutive frames of the
  training split: what the real game does for each key.
* ``shift_view``: the controllable baseline's prediction, the frame with its view rows shifted by whole pixels
  (edges replicated, HUD rows unchanged).
* ``sharpness``: the mean squared Laplacian of frames (``components.metrics.laplacian_energy``) above the HUD,
  whose ratio to the real frames' says blur (< 1) or noise (> 1).

Frames are float ``[B, 3, H, W]`` in 0..1 throughout.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from components.errors import PipelineError
from components.metrics import laplacian_energy

if TYPE_CHECKING:
    from components.data.trajectory_store import TrajectoryStore



def view_row_count(height: int, view_rows: float) -> int:
    """Rows above the HUD: the top ``view_rows`` share of the frame (at least 4 rows)."""
    return max(4, min(height, int(round(height * view_rows))))


def _luma(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames, dtype=np.float32)
    return 0.299 * frames[:, 0] + 0.587 * frames[:, 1] + 0.114 * frames[:, 2]


def horizontal_shift(reference: np.ndarray, frames: np.ndarray, view_rows: float = 0.8,
                     max_shift: int | None = None) -> np.ndarray:
    """The horizontal displacement in pixels (float ``[B]``) of ``frames`` against ``reference`` [B,3,H,W].

    ``frames[:, :, y, x]`` best matches ``reference[:, :, y, x - shift]`` over the top ``view_rows`` of the rows.
    Shifts up to ``max_shift`` (default: half the width) are tried; at least half the width always overlaps.
    """
    ref, cur = _luma(reference), _luma(frames)
    rows = view_row_count(ref.shape[1], view_rows)
    ref, cur = ref[:, :rows], cur[:, :rows]
    width = ref.shape[-1]
    limit = min(max_shift if max_shift is not None else width // 2, width // 2)
    shifts = np.arange(-limit, limit + 1)
    errors = np.stack([_overlap_error(ref, cur, int(s)) for s in shifts], axis=1)  # [B, shifts]
    best = errors.argmin(1)
    refined = shifts[best].astype(np.float64)
    inner = (best > 0) & (best < len(shifts) - 1)
    idx = np.nonzero(inner)[0]
    left, mid, right = errors[idx, best[idx] - 1], errors[idx, best[idx]], errors[idx, best[idx] + 1]
    curvature = left - 2 * mid + right
    offset = np.where(curvature > 1e-12, 0.5 * (left - right) / np.maximum(curvature, 1e-12), 0.0)
    refined[idx] += np.clip(offset, -0.5, 0.5)
    return refined


def _overlap_error(reference: np.ndarray, frames: np.ndarray, shift: int) -> np.ndarray:
    """Mean absolute difference of ``frames[..., x]`` and ``reference[..., x - shift]`` over their overlap."""
    if shift >= 0:
        a, b = frames[..., shift:], reference[..., : reference.shape[-1] - shift]
    else:
        a, b = frames[..., :shift], reference[..., -shift:]
    return np.abs(a - b).mean(axis=(1, 2))


def shift_view(frames: np.ndarray, shifts: np.ndarray | Sequence[float], view_rows: float = 0.8) -> np.ndarray:
    """``frames`` [B,3,H,W] with the rows above the HUD moved right by ``shifts`` [B] pixels (rounded), the
    columns that come into view filled with the nearest edge column, and the HUD rows left as they are."""
    frames = np.asarray(frames, dtype=np.float32)
    out = frames.copy()
    rows = view_row_count(frames.shape[2], view_rows)
    width = frames.shape[3]
    for i, shift in enumerate(np.rint(np.asarray(shifts, dtype=np.float64)).astype(int)):
        source = np.clip(np.arange(width) - shift, 0, width - 1)
        out[i, :, :rows] = frames[i, :, :rows][:, :, source]
    return out


def action_displacements(store: TrajectoryStore, num_actions: int, view_rows: float = 0.8, pairs_per_action: int = 2000,
                         seed: int = 0, split: str = "train") -> dict[str, Any]:
    """The median horizontal displacement (pixels) of the view after each action, from consecutive frames of
    ``split`` episodes of a trajectory store (``frames`` and ``actions`` arrays).

    Returns ``{"median_px": [A floats], "pairs": [A ints], "split", "view_rows"}``; an action never taken in
    the split has median 0 and 0 pairs. At most ``pairs_per_action`` pairs per action are read (a seeded sample).
    """
    episodes = store.split(split)
    if not episodes:
        raise PipelineError(f"no {split} episodes to measure the actions' displacement on")
    starts: list[list[tuple[int, int]]] = [[] for _ in range(num_actions)]
    for episode in episodes:
        recorded = store.shards[episode.shard].array("actions")
        actions = np.asarray(recorded[episode.start : episode.start + episode.length])
        for offset, action in enumerate(actions[:-1]):
            if 0 <= int(action) < num_actions:
                starts[int(action)].append((episode.shard, episode.start + offset))
    rng = np.random.default_rng(seed)
    medians, counts = [], []
    for action in range(num_actions):
        chosen = starts[action]
        if len(chosen) > pairs_per_action:
            chosen = [chosen[i] for i in np.sort(rng.choice(len(chosen), pairs_per_action, replace=False))]
        if not chosen:
            medians.append(0.0)
            counts.append(0)
            continue
        pairs = np.stack([store.shards[s].array("frames")[r : r + 2] for s, r in chosen])  # [N, 2, H, W, 3]
        frames = np.moveaxis(pairs.astype(np.float32) / 255.0, -1, -3)
        shifts = horizontal_shift(frames[:, 0], frames[:, 1], view_rows)
        medians.append(float(np.median(shifts)))
        counts.append(len(chosen))
    return {"median_px": medians, "pairs": counts, "split": split, "view_rows": view_rows}


def sharpness(generated: np.ndarray, real: np.ndarray, view_rows: float = 1.0) -> float:
    """Mean Laplacian energy of ``generated`` over that of ``real`` (pooled over frames [B,3,H,W]), on the top
    ``view_rows`` of the rows: 1 is as sharp as the game, below 1 is blur, above 1 is noise. Measure above the
    HUD: the status bar never moves, is easy to copy and would hide a blurred view. ``nan`` when the real frames
    are flat."""
    rows = view_row_count(np.shape(real)[2], view_rows)
    real_energy = float(laplacian_energy(np.asarray(real)[:, :, :rows]).mean())
    if real_energy <= 0:
        return float("nan")
    return float(laplacian_energy(np.asarray(generated)[:, :, :rows]).mean()) / real_energy


__all__ = [
    "action_displacements",
    "horizontal_shift",
    "sharpness",
    "shift_view",
    "view_row_count",
]
