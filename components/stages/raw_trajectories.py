"""Stage ``raw_trajectories --shard N``: record one shard of play, from random to skilled.

Writes ``data/raw_trajectories/shard-N`` (a trajectory shard, see ``components.data.trajectory_store`` and the
README "Data format: trajectories"), ``metrics/raw_trajectories/shard-N.json`` (episodes, frames, mean
reward, action histogram, held-out episodes) and ``plots/raw_trajectories/shard-N.png`` (sample frames).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from components.atomic import atomic_write_json
from components.data.trajectory_store import Shard
from components.errors import PipelineError
from components.game.collection import record_shard
from components.images import sample_grid, save_png
from components.params import load_params

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shard", type=int, required=True, help="shard id, one of raw_trajectories.shards")
    parser.add_argument("--agent", type=Path, required=True, help="the rl_agent folder (its policy snapshots)")
    parser.add_argument("--out", type=Path, required=True, help="the shard folder to write")
    parser.add_argument("--metrics", type=Path, required=True, help="the shard's metrics JSON")
    parser.add_argument("--samples", type=Path, required=True, help="PNG of sample frames from the shard")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def main(args: argparse.Namespace) -> None:
    params = load_params(args.params)

    settings = params.raw_trajectories
    if args.shard not in settings.shards:
        raise PipelineError(f"--shard {args.shard}: not in raw_trajectories.shards {settings.shards}")

    log.info("recording %s: %d frames, policy %s, %d games in lockstep", args.out, settings.frames_per_shard,
             settings.policy, settings.parallel_games)
    summary = record_shard(params, args.shard, args.out, args.agent, progress=not args.no_progress)
    atomic_write_json(args.metrics, summary.as_dict())

    save_png(args.samples, sample_grid(Shard(args.out, verify_checksums=False).array("frames")))
    log.info("%s: %d episodes (%d held out), %d frames, %.0f frames/s", args.out, summary.episodes,
             summary.heldout_episodes, summary.frames, summary.frames_per_second)
