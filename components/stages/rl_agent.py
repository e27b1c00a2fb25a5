"""Stage ``rl_agent``: train the PPO agent on ViZDoom with the paper's reward.

Outputs (``data/rl_agent/``, written atomically as one folder):
  policy.safetensors / policy.json          the final policy (see ``components.agent``)
  checkpoints/step-*.safetensors / .json    snapshots evenly spaced over training
  checkpoints.json                          every snapshot, least to most trained (the last is the final one)
Also ``metrics/rl_agent.json`` and DVCLive curves (episode reward and length) in ``dvclive/rl_agent/``.
An interrupted run resumes from its last snapshot (state kept in ``.cache/rl_agent/``).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from components.params import load_params

log = logging.getLogger(__name__)

OUT_DIR = Path("data/rl_agent")
CACHE_DIR = Path(".cache/rl_agent")
METRICS = Path("metrics/rl_agent.json")
DVCLIVE_DIR = "dvclive/rl_agent"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=OUT_DIR, help=f"output folder (default: {OUT_DIR})")
    parser.add_argument("--metrics", type=Path, default=METRICS, help=f"metrics JSON (default: {METRICS})")


def main(args: argparse.Namespace) -> None:
    params = load_params(args.params)
    import numpy as np
    from dvclive import Live

    from components.agent import train
    from components.atomic import atomic_directory, atomic_write_json

    config = params.rl_agent
    log.info("training PPO for %d timesteps on %s %s at %dx%d", config.total_timesteps,
             params.environment.scenario, params.environment.map, *params.environment.resolution)
    with Live(dir=DVCLIVE_DIR, dvcyaml=False, save_dvc_exp=False, report=None) as live:

        def on_episode(index: int, reward: float, length: int, timesteps: int) -> None:
            live.log_metric("episode_reward", reward)
            live.log_metric("episode_length", length)
            live.log_metric("timesteps", timesteps)
            live.next_step()

        with atomic_directory(args.out) as staging:
            result = train(params, staging, CACHE_DIR, on_episode=on_episode)

    recent = slice(-max(1, min(20, result.episodes)), None)
    metrics = {
        "timesteps": result.timesteps,
        "episodes": result.episodes,
        "episode_reward_mean": float(np.mean(result.episode_rewards)) if result.episodes else None,
        "episode_reward_last20": float(np.mean(result.episode_rewards[recent])) if result.episodes else None,
        "episode_length_mean": float(np.mean(result.episode_lengths)) if result.episodes else None,
        "episode_length_last20": float(np.mean(result.episode_lengths[recent])) if result.episodes else None,
        "train_seconds": round(result.seconds, 2),
        "steps_per_second": round((result.timesteps - result.resumed_from) / max(result.seconds, 1e-9), 1),
        "checkpoints": len(result.checkpoints),
        "resumed_from": result.resumed_from,
    }
    atomic_write_json(args.metrics, metrics)
    log.info("rl_agent done: %s", metrics)
