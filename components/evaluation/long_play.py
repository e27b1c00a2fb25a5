"""Long play: what a player sees after many steps of pressing keys, measured without a recorded continuation.

The rollouts of ``components.evaluation.scoring`` follow recorded play for at most the longest rollout length and score
against the real frames step by step. A player goes on for minutes and presses other keys, and a model can look
fine for 64 steps and then tear into bands or lose the status bar. Here, from held-out contexts, the model plays
``steps`` steps driven by player-like keys (each action, uniform over the action set, held for 1 to ``hold``
steps; seeded), and each generated frame is compared with the real game's frames as a distribution:

* **sharpness**: Laplacian energy of the view (the rows above the HUD) over that of the real frames; 1 is as
  sharp as the game, below 1 is blur, above 1 noise;
* **colour distance**: total variation between the colour histograms of the generated views and of the real
  ones, averaged over the three channels; 0 is the same colours, 1 disjoint. A smear narrows the histogram,
  bands of white, black or red move it;
* **HUD change**: mean absolute difference of the status bar rows from the last context frame (0..1). The real
  game changes it only when health or ammunition do.

The same numbers for the real frames of the contexts (and, where the held-out episodes are long enough, for the
recorded continuation of the same contexts) say what "as the game" looks like at this sample size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from components.evaluation.view_motion import view_row_count
from components.metrics import laplacian_energy

HISTOGRAM_BINS = 16


def player_keys(num_actions: int, count: int, steps: int, hold: int, seed: int) -> np.ndarray:
    """``[count, steps]`` action ids as a player presses them: each action, uniform over the ``num_actions``,
    held for a uniform 1 to ``hold`` steps."""
    rng = np.random.default_rng(seed)
    keys = np.empty((count, steps), np.int64)
    for row in range(count):
        filled = 0
        while filled < steps:
            length = int(rng.integers(1, hold + 1))
            keys[row, filled : filled + length] = rng.integers(num_actions)
            filled += length
    return keys


def colour_histogram(frames: np.ndarray, bins: int = HISTOGRAM_BINS) -> np.ndarray:
    """Normalised per-channel histograms of float frames ``[N, 3, H, W]`` in 0..1: ``[3, bins]``, each row sums to 1."""
    channels = np.moveaxis(np.asarray(frames), 1, 0).reshape(3, -1)
    counts = np.stack([np.histogram(c, bins=bins, range=(0.0, 1.0))[0] for c in channels]).astype(np.float64)
    return counts / np.maximum(counts.sum(1, keepdims=True), 1.0)


def hud_change(frames: np.ndarray, last_context: np.ndarray, view_rows: float) -> float:
    """Mean absolute difference of the status bar (the rows below ``view_rows``) of ``frames`` from that of
    ``last_context`` (both ``[N, 3, H, W]``), pooled; 0 when the frames have no rows below the view."""
    rows = view_row_count(np.shape(frames)[2], view_rows)
    if rows >= np.shape(frames)[2]:
        return 0.0
    return float(np.abs(np.asarray(frames)[:, :, rows:] - np.asarray(last_context)[:, :, rows:]).mean())


@dataclass(frozen=True)
class RealFrames:
    """What the game looks like: the mean Laplacian energy and the colour histogram of the views (rows above the
    HUD) of held-out real frames, computed once."""

    energy: float
    histogram: np.ndarray
    view_rows: float

    @classmethod
    def of(cls, frames: np.ndarray, view_rows: float) -> RealFrames:
        view = np.asarray(frames)[:, :, : view_row_count(np.shape(frames)[2], view_rows)]
        return cls(float(laplacian_energy(view).mean()), colour_histogram(view), view_rows)

    def measures(self, frames: np.ndarray, last_context: np.ndarray) -> dict[str, float]:
        """Sharpness, colour distance (of the views) and HUD change of ``frames`` ``[N, 3, H, W]``, the HUD against
        the contexts' last frames."""
        view = np.asarray(frames)[:, :, : view_row_count(np.shape(frames)[2], self.view_rows)]
        histogram = colour_histogram(view)
        return {
            "sharpness": float(laplacian_energy(view).mean()) / self.energy if self.energy > 0 else float("nan"),
            "colour_distance": float(0.5 * np.abs(histogram - self.histogram).sum(1).mean()),
            "hud_change": hud_change(frames, last_context, self.view_rows),
        }

    def curves(self, frames: np.ndarray, last_context: np.ndarray) -> dict[str, list[float]]:
        """:meth:`measures` at every step of ``frames`` ``[N, T, 3, H, W]``: ``{measure: [T values]}``."""
        per_step = [self.measures(frames[:, s], last_context) for s in range(frames.shape[1])]
        return {name: [m[name] for m in per_step] for name in per_step[0]}


def end_of(curve: list[float]) -> float:
    """The mean over the last eighth of the steps (at least one): the state play settles into."""
    tail = curve[-max(1, len(curve) // 8):]
    return float(np.mean(tail))


def measure(generated: np.ndarray, last_context: np.ndarray, real_pool: np.ndarray,
            view_rows: float, hold: int, seed: int, shown_steps: list[int],
            recorded: np.ndarray | None = None) -> dict[str, Any]:
    """The long-play metrics of ``generated`` float ``[N, T, 3, H, W]`` from contexts whose last real frames are
    ``last_context``, against ``real_pool`` (held-out real frames); ``recorded`` is the real continuation of the
    same contexts (``[N, T, 3, H, W]``, recorded actions) where the episodes are long enough."""
    real = RealFrames.of(real_pool, view_rows)
    by_step = real.curves(generated, last_context)
    result: dict[str, Any] = {
        "steps": int(generated.shape[1]),
        "contexts": int(generated.shape[0]),
        "keys": f"each action held 1 to {hold} steps, uniform over the action set, seed {seed}",
        "by_step": by_step,
        "at_step": {str(s): {name: curve[s - 1] for name, curve in by_step.items()} for s in shown_steps},
        "end": {name: end_of(curve) for name, curve in by_step.items()},
        "real_contexts": real.measures(last_context, last_context),
    }
    if recorded is not None:
        tail = recorded[:, -max(1, recorded.shape[1] // 8):]
        result["recorded_end"] = {name: float(np.mean(c)) for name, c in real.curves(tail, last_context).items()}
    return result
