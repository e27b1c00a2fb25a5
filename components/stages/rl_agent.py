"""Stage ``rl_agent``: train the PPO agent on ViZDoom with the paper's reward.

Outputs (``data/rl_agent/``, written atomically as one folder):
  policy.safetensors / policy.json          the final policy (see ``components.game.agent``)
  checkpoints/step-*.safetensors / .json    snapshots evenly spaced over training
  checkpoints.json                          every snapshot, least to most trained (the last is the final one)
Also ``metrics/rl_agent.json``, DVCLive curves (episode reward and length; SB3's ``train/*`` statistics after each
update) in ``dvclive/rl_agent/`` and the same as PNG charts in ``plots/rl_agent/``.
An interrupted run resumes from its last snapshot (state kept in ``.cache/rl_agent/``).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
from dvclive import Live

from components.atomic import atomic_directory, atomic_write_json
from components.game.agent import train
from components.images import CURVE_PREFIX, line_chart
from components.params import load_params

log = logging.getLogger(__name__)

CACHE_DIR = Path(".cache/rl_agent")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="output folder (the policy and its snapshots)")
    parser.add_argument("--metrics", type=Path, required=True, help="metrics JSON")
    parser.add_argument("--plots", type=Path, required=True, help="folder for the PNG charts")
    parser.add_argument("--live-dir", type=Path, required=True, help="DVCLive folder for the training curves")


def main(args: argparse.Namespace) -> None:
    params = load_params(args.params)


    settings = params.rl_agent
    log.info("training PPO for %d timesteps on %s %s at %dx%d", settings.total_timesteps,
             params.environment.scenario, params.environment.map, *params.environment.resolution)
    with Live(dir=str(args.live_dir), dvcyaml=False, save_dvc_exp=False, report=None) as live:

        episode_steps: list[int] = []
        updates: list[tuple[int, dict[str, float]]] = []

        def on_episode(index: int, reward: float, length: int, timesteps: int) -> None:
            live.log_metric("episode_reward", reward)
            live.log_metric("episode_length", length)
            live.log_metric("timesteps", timesteps)
            live.next_step()
            episode_steps.append(timesteps)

        def on_update(timesteps: int, statistics: dict[str, float]) -> None:
            for name, value in statistics.items():
                live.log_metric(name, value)  # SB3's train/* names
            updates.append((timesteps, statistics))

        with atomic_directory(args.out) as staging:
            result = train(params, staging, CACHE_DIR, on_episode=on_episode, on_update=on_update)
    write_charts(args.plots, episode_steps, result.episode_rewards, result.episode_lengths, updates)

    recent = slice(-max(1, min(20, result.episodes)), None)
    metrics = {
        "timesteps": result.timesteps,
        "episodes": result.episodes,
        "episode_reward_mean": float(np.mean(result.episode_rewards)) if result.episodes else None,
        "episode_reward_last20": float(np.mean(result.episode_rewards[recent])) if result.episodes else None,
        "episode_length_mean": float(np.mean(result.episode_lengths)) if result.episodes else None,
        "episode_length_last20": float(np.mean(result.episode_lengths[recent])) if result.episodes else None,
        "train_seconds": round(result.seconds, 2),
        "steps_per_second": round((result.timesteps - result.resumed_from_step) / max(result.seconds, 1e-9), 1),
        "checkpoints": len(result.checkpoints),
        "resumed_from_step": result.resumed_from_step,
    }
    atomic_write_json(args.metrics, metrics)
    log.info("rl_agent done: %s", metrics)


def write_charts(folder: Path, episode_steps: list[int], rewards: list[float], lengths: list[int],
                 updates: list[tuple[int, dict[str, float]]]) -> None:
    """Episode reward and length, and each of SB3's train/* statistics, against timesteps, as PNG."""

    folder.mkdir(parents=True, exist_ok=True)  # a DVC out, even for a run too short to finish an episode
    if rewards and len(episode_steps) == len(rewards):
        line_chart(folder / f"{CURVE_PREFIX}episode_reward.png", {"reward": rewards}, "rl_agent: episode reward",
                   y_label="reward", x_label="timesteps", x=episode_steps)
        line_chart(folder / f"{CURVE_PREFIX}episode_length.png", {"length": [float(n) for n in lengths]},
                   "rl_agent: episode length", y_label="steps", x_label="timesteps", x=episode_steps)
    names = sorted({name for _, statistics in updates for name in statistics})
    for name in names:
        points = [(t, s[name]) for t, s in updates if name in s]
        line_chart(folder / f"{CURVE_PREFIX}{name.replace('/', '_')}.png", {name: [v for _, v in points]},
                   f"rl_agent: {name}", y_label=name.split("/")[-1], x_label="timesteps", x=[t for t, _ in points])
