"""Recording play into trajectory shards: from random to skilled, several games in lockstep.

Each episode plays one policy snapshot of ``rl_agent`` (drawn at random, so a shard mixes every level of
skill from the earliest snapshot to the final policy) and replaces each chosen action by a uniformly random
one with probability ``random_action_fraction``. With ``policy: random`` every action is random (the
paper's random-policy ablation). ``parallel_games`` games step in lockstep so the policy runs batched.

Everything random (episode seeds, snapshot choice, actions) comes from one generator seeded by
``(raw_trajectories.seed, shard id)``, so a shard is reproducible and shards differ. An episode is held out
for evaluation when ``heldout_score(seed) < heldout_fraction`` (a hash of its seed), so the split is
deterministic, independent of the shard layout, and written into the episode metadata as ``split``.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from components.data.trajectory_store import ShardWriter
from components.errors import PipelineError
from components.game.agent import list_checkpoints, load_policy
from components.game.environment import DoomEnv, action_names, resolve_scenario
from components.params import Params

log = logging.getLogger(__name__)

RANDOM_POLICY = "random"


def shard_seed(seed: int, shard: int) -> np.random.SeedSequence:
    """The seed sequence of one shard: distinct for every (seed, shard) pair."""
    return np.random.SeedSequence([seed, shard])


def heldout_score(episode_seed: int) -> float:
    """A number in [0, 1) fixed by the episode seed; the episode is held out if it is < heldout_fraction."""
    digest = hashlib.sha256(f"gamengen-heldout:{episode_seed}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2.0**64


def split_for(episode_seed: int, heldout_fraction: float) -> str:
    return "heldout" if heldout_score(episode_seed) < heldout_fraction else "train"


@dataclass
class _Episode:
    """One game's episode in progress."""

    seed: int
    policy: int | None  # index into the loaded snapshots, None = random play
    frames: list[np.ndarray] = field(default_factory=list)
    actions: list[int] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)


@dataclass
class ShardSummary:
    shard: int
    episodes: int
    frames: int
    heldout_episodes: int
    heldout_frames: int
    mean_reward: float
    mean_episode_return: float
    action_histogram: dict[str, int]
    policy_episodes: dict[str, int]
    seconds: float

    @property
    def frames_per_second(self) -> float:
        return self.frames / max(self.seconds, 1e-9)

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "frames_per_second": round(self.frames_per_second, 1)}


def load_snapshots(agent_dir: Path) -> list[Any]:
    """Every policy snapshot of an ``rl_agent`` output, least to most trained."""

    return [load_policy(agent_dir / entry["file"]) for entry in list_checkpoints(agent_dir)]


def record_shard(
    params: Params,
    shard: int,
    out_path: Path,
    agent_dir: Path | None,
    progress: bool = True,
) -> ShardSummary:
    """Record ``raw_trajectories.frames_per_shard`` frames into a new shard at ``out_path`` (atomic)."""


    config, env_params = params.raw_trajectories, params.environment
    torch.set_num_threads(1)  # small batches: one thread is fastest and leaves the other core to the games
    rng = np.random.default_rng(shard_seed(config.seed, shard))
    names = action_names(env_params.actions)
    n_actions = len(names)
    if config.policy == RANDOM_POLICY:
        snapshots, random_fraction = [], 1.0
    else:
        if agent_dir is None:
            raise ValueError("policy 'agent' needs the rl_agent output folder")
        snapshots, random_fraction = load_snapshots(agent_dir), config.random_action_fraction
        for snapshot in snapshots:
            if tuple(snapshot.expected_shape) != (env_params.height, env_params.width, 3):
                raise PipelineError(
                    f"{snapshot.path}: policy was trained on {snapshot.expected_shape} frames but "
                    f"environment.resolution is {list(env_params.resolution)}; re-run rl_agent"
                )
    scenario = resolve_scenario(env_params)
    games = [DoomEnv(env_params, params.reward) for _ in range(min(config.parallel_games, config.frames_per_shard))]
    attributes = {
        "shard": shard,
        "resolution": list(env_params.resolution),
        "render_resolution": list(games[0].render_size),
        "frame_skip": env_params.frame_skip,
        "repeat_action_probability": env_params.repeat_action_probability,
        "action_names": names,
        "action_buttons": [list(a.buttons) for a in env_params.actions],
        "scenario": scenario.scenario,
        "map": scenario.map,
        "policy": config.policy,
        "snapshots": [s.name for s in snapshots],
        "random_action_fraction": random_fraction,
        "heldout_fraction": config.heldout_fraction,
        "seed": config.seed,
        "reward_scale": params.reward.scale,
    }
    histogram: Counter[int] = Counter()
    policy_episodes: Counter[str] = Counter()
    returns: list[float] = []
    totals = {"episodes": 0, "heldout_episodes": 0, "heldout_frames": 0, "reward": 0.0}

    def start(indices: list[int]) -> list[tuple[_Episode, np.ndarray]]:
        """New episodes for these games: seeds and snapshots drawn in order, resets run concurrently."""
        episodes = [
            _Episode(seed=int(rng.integers(2**31 - 1)),
                     policy=int(rng.integers(len(snapshots))) if snapshots else None)
            for _ in indices
        ]
        jobs = zip(indices, episodes, strict=True)
        observations = pool.map(lambda job: games[job[0]].reset(seed=job[1].seed)[0], jobs)
        return list(zip(episodes, observations, strict=True))

    def finish(writer: ShardWriter, episode: _Episode, end: str) -> None:
        split = split_for(episode.seed, config.heldout_fraction)
        length = len(episode.actions)
        dones = np.zeros(length, dtype=bool)
        dones[-1] = True
        rewards = np.asarray(episode.rewards, dtype=np.float32)
        snapshot = snapshots[episode.policy] if episode.policy is not None else None
        policy_name = snapshot.name if snapshot is not None else RANDOM_POLICY
        writer.add_episode(
            {
                "frames": np.stack(episode.frames),
                "actions": np.asarray(episode.actions, dtype=np.int64),
                "rewards": rewards,
                "dones": dones,
            },
            split=split,
            scenario=scenario.scenario,
            map=scenario.map,
            seed=episode.seed,
            policy=policy_name,
            policy_timesteps=snapshot.spec.timesteps if snapshot is not None else 0,
            random_action_fraction=random_fraction,
            end=end,
            episode_return=float(rewards.sum()),
        )
        histogram.update(episode.actions)
        policy_episodes[policy_name] += 1
        returns.append(float(rewards.sum()))
        totals["episodes"] += 1
        totals["reward"] += float(rewards.sum())
        if split == "heldout":
            totals["heldout_episodes"] += 1
            totals["heldout_frames"] += length

    started = time.monotonic()
    target = config.frames_per_shard
    recorded = 0
    # ViZDoom runs each game in its own engine process and releases the GIL while it waits for it, so
    # stepping the games from threads overlaps them (about 1.8x the rate of stepping them one by one).
    pool = ThreadPoolExecutor(max_workers=len(games), thread_name_prefix="game")
    try:
        with ShardWriter(out_path, kind="trajectories", attributes=attributes) as writer:
            current = start(list(range(len(games))))
            bar = tqdm(total=target, desc=f"shard {shard}", unit="frame", disable=not progress, dynamic_ncols=True)
            while recorded < target:
                active = min(len(games), target - recorded)  # the last step may use fewer games
                actions = rng.integers(n_actions, size=active)
                needs_policy = rng.random(active) >= random_fraction  # the rest keep their random action
                # Games whose action is known start stepping at once; each policy batch then overlaps with
                # the games already in flight (torch and the engines both release the GIL).
                steps = {int(i): pool.submit(games[i].step, int(actions[i])) for i in np.flatnonzero(~needs_policy)}
                for policy_index, members in _policy_batches(current, np.flatnonzero(needs_policy)):
                    observations = np.stack([current[i][1] for i in members])
                    chosen = snapshots[policy_index](observations, rng)
                    for i, action in zip(members, chosen, strict=True):
                        steps[int(i)] = pool.submit(games[i].step, int(action))
                results = [steps[i].result() for i in range(active)]
                ended = []
                for i, (next_observation, reward, terminated, truncated, info) in enumerate(results):
                    episode, observation = current[i]
                    episode.frames.append(observation)
                    episode.actions.append(info["action"])  # after the environment's repeat-action rule
                    episode.rewards.append(reward)
                    if terminated or truncated:
                        finish(writer, episode, "terminated" if terminated else "truncated")
                        ended.append(i)
                    else:
                        current[i] = (episode, next_observation)
                if ended:
                    for i, new in zip(ended, start(ended), strict=True):
                        current[i] = new
                recorded += active
                bar.update(active)
            for episode, _ in current:  # episodes cut short by the shard's frame budget
                if episode.actions:
                    finish(writer, episode, "cut")
            bar.close()
    finally:
        pool.shutdown()
        for game in games:
            game.close()
    seconds = time.monotonic() - started
    return ShardSummary(
        shard=shard,
        episodes=int(totals["episodes"]),
        frames=recorded,
        heldout_episodes=int(totals["heldout_episodes"]),
        heldout_frames=int(totals["heldout_frames"]),
        mean_reward=totals["reward"] / max(recorded, 1),
        mean_episode_return=float(np.mean(returns)) if returns else 0.0,
        action_histogram={names[a]: int(histogram.get(a, 0)) for a in range(n_actions)},
        policy_episodes=dict(sorted(policy_episodes.items())),
        seconds=seconds,
    )


def _policy_batches(current: list[tuple[_Episode, np.ndarray]], games: np.ndarray) -> list[tuple[int, list[int]]]:
    """Split ``games`` by the snapshot their episode plays, in a fixed order.

    A single big group is cut in two so that its second half's policy call overlaps the first half's steps.
    """
    groups: dict[int, list[int]] = {}
    for i in games:
        groups.setdefault(current[i][0].policy, []).append(int(i))
    if len(groups) == 1:
        ((policy_index, members),) = groups.items()
        if len(members) >= 4:
            half = (len(members) + 1) // 2
            return [(policy_index, members[:half]), (policy_index, members[half:])]
    return [(policy_index, groups[policy_index]) for policy_index in sorted(groups)]
