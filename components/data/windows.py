"""Windows: runs of consecutive rows inside one episode of a ``TrajectoryStore``, the unit every model trains and
is measured on, read by one class (``LatentWindows``) under one held-out rule (``heldout_windows``).

The rule: every held-out measure (the teacher's and the student's training metrics, the export's shipped
contexts and parity windows, the evaluation stage) reads held-out episodes only, and fails with
``HeldOutError`` when none is long enough, rather than quietly scoring play the models trained on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from components.errors import PipelineError


class HeldOutError(PipelineError):
    """A held-out measure found no held-out play long enough, or was given play the models may have trained on."""


class LatentWindows:
    """Every window of ``length`` rows of ``split`` (None: every split) in a store of latents and actions."""

    def __init__(self, store: Any, length: int, split: str | None) -> None:
        self.store, self.length, self.split = store, length, split
        self.index = store.window_index(length, split)  # [N, 2]: (shard, first row)

    def __len__(self) -> int:
        return len(self.index)

    def read(self, rows: Sequence[int] | np.ndarray, device: torch.device | str = "cpu"
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """The windows at ``rows`` of the index: latents float32 [B, L, C, h, w] and actions int64 [B, L]."""
        windows = [self.store.read_window(int(shard), int(start), self.length, ("latents", "actions"))
                   for shard, start in self.index[np.asarray(rows, np.int64)]]
        latents = torch.from_numpy(np.stack([w["latents"] for w in windows]).astype(np.float32))
        actions = torch.from_numpy(np.stack([w["actions"] for w in windows]).astype(np.int64))
        return latents.to(device), actions.to(device)

    def evenly_spaced(self, count: int) -> np.ndarray:
        """``count`` rows of the index spread evenly over it (all of them when there are fewer)."""
        count = min(count, len(self.index))
        return np.linspace(0, len(self.index) - 1, count).round().astype(np.int64)


def heldout_windows(store: Any, length: int, needed_for: str) -> LatentWindows:
    """The held-out windows of ``length`` rows; ``HeldOutError`` naming ``needed_for`` when there is none."""
    windows = LatentWindows(store, length, "heldout")
    if len(windows) == 0:
        raise HeldOutError(f"{needed_for} needs held-out episodes of at least {length} rows and the latents have "
                           "none; raise raw_trajectories.heldout_fraction or record longer episodes, then rerun")
    return windows
