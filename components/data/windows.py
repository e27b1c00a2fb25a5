"""Windows: runs of consecutive rows inside one episode of a ``TrajectoryStore``, the unit every model trains and
is measured on. ``LatentWindows`` reads latents and actions (training, the training metrics, the export's
contexts); ``Windows`` holds the evaluation's windows with their real frames (``heldout_episodes``,
``pick_windows``, ``load_windows``), all under one held-out rule.

The rule: every held-out measure (the teacher's and the student's training metrics, the export's shipped
contexts and parity windows, the evaluation stage) reads held-out episodes only, and fails with
``HeldOutError`` when none is long enough, rather than quietly scoring play the models trained on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from components.errors import PipelineError

if TYPE_CHECKING:
    from components.data.trajectory_store import TrajectoryStore



class HeldOutError(PipelineError):
    """A held-out measure found no held-out play long enough, or was given play the models may have trained on."""


class LatentWindows:
    """Every window of ``length`` rows of ``split`` (None: every split) in a store of latents and actions."""

    def __init__(self, store: TrajectoryStore, length: int, split: str | None) -> None:
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


def heldout_windows(store: TrajectoryStore, length: int, needed_for: str) -> LatentWindows:
    """The held-out windows of ``length`` rows; ``HeldOutError`` naming ``needed_for`` when there is none."""
    windows = LatentWindows(store, length, "heldout")
    if len(windows) == 0:
        raise HeldOutError(f"{needed_for} needs held-out episodes of at least {length} rows and the latents have "
                           "none; raise raw_trajectories.heldout_fraction or record longer episodes, then rerun")
    return windows


# --------------------------------------------------------------------------- evaluation windows (frames too)


@dataclass(frozen=True)
class Windows:
    """A batch of evaluation windows: ``frames`` uint8 ``[N, T, H, W, 3]``, ``latents`` f32 ``[N, T, C, h, w]``
    (or None when only the export is evaluated), ``actions`` int64 ``[N, T]``, ``episode_ids`` ``[N]``."""

    frames: np.ndarray
    latents: np.ndarray | None
    actions: np.ndarray
    episode_ids: list[str]

    def __len__(self) -> int:
        return len(self.actions)

    def first(self, count: int) -> Windows:
        """The first ``count`` windows."""
        latents = None if self.latents is None else self.latents[:count]
        return Windows(self.frames[:count], latents, self.actions[:count], self.episode_ids[:count])

    def frames_chw(self, rows: slice | int) -> np.ndarray:
        """Frames of ``rows`` as float32 ``[N, (T,) 3, H, W]`` in 0..1."""
        return to_chw(self.frames[:, rows])


def to_chw(frames: np.ndarray) -> np.ndarray:
    """uint8 ``[..., H, W, 3]`` -> float32 ``[..., 3, H, W]`` in 0..1."""
    return np.moveaxis(np.asarray(frames, dtype=np.float32) / 255.0, -1, -3)


def sample_windows(index: np.ndarray, count: int, seed: int) -> np.ndarray:
    """A deterministic, evenly spread subset of ``count`` window starts (all of them if fewer)."""
    if len(index) <= count:
        return index
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(len(index), size=count, replace=False))
    return index[chosen]


def heldout_episodes(store: TrajectoryStore, requested: Sequence[str] | None = None) -> list[Any]:
    """The episodes to evaluate on: ``requested`` ids (each must be held out), else every held-out episode.

    Raises ``HeldOutError`` naming any requested episode that is not in the held-out split (the models may
    have trained on it) or does not exist, and when there is no held-out episode at all.
    """
    if requested:
        by_id = {e.episode_id: e for e in store.episodes}
        unknown = [i for i in requested if i not in by_id]
        if unknown:
            raise HeldOutError(f"evaluation.episodes: no such episodes {unknown} in the recorded trajectories")
        not_heldout = [f"{i} (split {by_id[i].split!r})" for i in requested if by_id[i].split != "heldout"]
        if not_heldout:
            raise HeldOutError(
                f"refusing to evaluate on episodes that are not held out: {', '.join(not_heldout)}. The models may "
                "have trained on them; list only held-out episodes in evaluation.episodes (or leave it null)"
            )
        return [by_id[i] for i in requested]
    episodes = store.split("heldout")
    if not episodes:
        raise HeldOutError(
            "the recorded trajectories have no held-out episodes; raise raw_trajectories.heldout_fraction "
            "(or record more episodes) and rerun raw_trajectories"
        )
    return episodes


def pick_windows(episodes: Sequence[Any], length: int, count: int, seed: int) -> list[tuple[Any, int]]:
    """Up to ``count`` windows of ``length`` rows inside held-out episodes: ``(episode, offset in episode)``."""
    candidates = [(e, o) for e in episodes if e.split == "heldout" for o in range(e.length - length + 1)]
    if any(e.split != "heldout" for e in episodes):  # defence in depth: never score on training play
        raise HeldOutError("an episode that is not held out reached window selection")
    chosen = sample_windows(np.arange(len(candidates)), count, seed)
    return [candidates[i] for i in chosen]


def load_windows(raw: TrajectoryStore, latents: TrajectoryStore | None, picks: Sequence[tuple[Any, int]],
                 length: int) -> Windows:
    """Read the frames (and stored latents, when ``latents`` is a store) of the picked windows."""
    latent_episodes = {e.episode_id: e for e in latents.episodes} if latents is not None else {}
    frames, stored, actions = [], [], []
    for episode, offset in picks:
        rows = raw.read_window(episode.shard, episode.start + offset, length, ["frames", "actions"])
        frames.append(rows["frames"])
        actions.append(rows["actions"].astype(np.int64))
        if latents is not None:
            twin = latent_episodes.get(episode.episode_id)
            if twin is None or twin.length != episode.length or twin.split != "heldout":
                raise PipelineError(
                    f"episode {episode.episode_id}: validated_latents does not hold the same held-out episode "
                    "as raw_trajectories; rerun validated_latents"
                )
            stored.append(latents.read_window(twin.shard, twin.start + offset, length, ["latents"])["latents"])
    return Windows(
        np.stack(frames),
        np.stack(stored).astype(np.float32) if stored else None,
        np.stack(actions),
        [e.episode_id for e, _ in picks],
    )


def common_episodes(raw_episodes: Sequence[Any], latents: TrajectoryStore | None) -> list[Any]:
    """Held-out raw episodes that the latent store also holds (validated_latents may drop short ones)."""
    if latents is None:
        return list(raw_episodes)
    ids = {e.episode_id for e in latents.split("heldout")}
    return [e for e in raw_episodes if e.episode_id in ids]
