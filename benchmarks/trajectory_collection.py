"""Benchmark: raw ViZDoom steps/s against recorded frames/s of trajectory collection. Prints JSON.

    python benchmarks/trajectory_collection.py [--params params.yaml] [--agent data/rl_agent] [--frames N]

1. Raw engine rate: one game, random actions, the configured scenario, resolution (render mode) and frame
   skip; each step is ``make_action`` plus reading the screen buffer. No downscale, reward or policy.
2. Recording rate: ``components.game.collection.record_shard`` with the configured parallel games, the trained
   policy snapshots (``--agent``; if that folder is missing, untrained snapshots of the same architecture,
   which cost the same), random-action mixing, the reward, downscaling and writing the shard to disk.

The target is ``ratio = recorded / raw >= 0.5``. Timings on a shared machine are inflated by contention,
so each rate is also given per CPU-second (this process plus its ViZDoom engine processes, from psutil):
``cpu_ratio`` compares the work per frame and is much less sensitive to other load than the wall-clock ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


class CpuMeter:
    """CPU seconds spent between ``start()`` and ``stop()``, counting children that exit meanwhile too."""

    def __init__(self) -> None:
        import psutil

        self._psutil = psutil
        self.seconds = 0.0

    def _total(self) -> float:
        # own time + children already reaped (os.times) + children still running (psutil)
        own = os.times()
        total = own.user + own.system + own.children_user + own.children_system
        for child in self._psutil.Process().children(recursive=True):
            try:
                total += sum(child.cpu_times()[:2])
            except self._psutil.Error:
                pass
        return total

    def start(self) -> None:
        self._before = self._total()

    def stop(self) -> float:
        self.seconds = self._total() - self._before
        return self.seconds


def raw_engine_rate(params, steps: int) -> dict:
    import numpy as np

    from components.game.environment import action_matrix, make_game

    game, render_size = make_game(params.environment)
    buttons = [list(map(int, row)) for row in action_matrix(params.environment.actions)]
    rng = np.random.default_rng(0)
    game.set_seed(0)
    game.new_episode()
    actions = rng.integers(len(buttons), size=steps)
    meter = CpuMeter()
    meter.start()
    started = time.perf_counter()
    for action in actions:
        if game.is_episode_finished():
            game.new_episode()
        game.make_action(buttons[action], params.environment.frame_skip)
        state = game.get_state()
        if state is not None:
            _ = state.screen_buffer
    seconds = time.perf_counter() - started
    cpu = meter.stop()
    game.close()
    return {"steps": steps, "seconds": round(seconds, 3), "steps_per_second": round(steps / seconds, 1),
            "cpu_seconds": round(cpu, 3), "steps_per_cpu_second": round(steps / cpu, 1),
            "render_resolution": list(render_size)}


def untrained_snapshots(params, directory: Path) -> Path:
    """A stand-in ``rl_agent`` folder: untrained policies with the configured architecture."""
    from components.atomic import atomic_write_json
    from components.game.agent import CHECKPOINT_INDEX, PolicySpec, build_policy, save_policy
    from components.game.environment import action_names

    ppo, env = params.rl_agent.ppo, params.environment
    names = action_names(env.actions)
    entries = []
    for k in range(params.rl_agent.checkpoints):
        file = "policy" if k == params.rl_agent.checkpoints - 1 else f"checkpoints/step-{k}"
        spec = PolicySpec([3, env.height, env.width], len(names), ppo.features_dim, list(ppo.hidden_sizes),
                          list(ppo.cnn_channels), names, k, "final" if file == "policy" else f"step-{k}")
        save_policy(directory / file, build_policy(spec), spec)
        entries.append({"name": spec.name, "timesteps": k, "file": file})
    atomic_write_json(directory / CHECKPOINT_INDEX, entries)
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--agent", type=Path, default=Path("data/rl_agent"))
    parser.add_argument("--frames", type=int, default=None,
                        help="frames to record (default: frames_per_shard, clipped to [1000, 4000])")
    parser.add_argument("--raw-steps", type=int, default=None, help="raw engine steps (default: same as frames)")
    args = parser.parse_args()

    from components.game.collection import record_shard
    from components.params import load_params

    params = load_params(args.params)
    frames = args.frames or min(max(params.raw_trajectories.frames_per_shard, 1000), 4000)
    params = params.model_copy(
        update={"raw_trajectories": params.raw_trajectories.model_copy(update={"frames_per_shard": frames})}
    )
    raw = raw_engine_rate(params, args.raw_steps or frames)
    with tempfile.TemporaryDirectory(prefix="bench-collection-") as temporary:
        temporary = Path(temporary)
        agent = args.agent
        policy_source = str(agent)
        if params.raw_trajectories.policy == "agent" and not (agent / "checkpoints.json").is_file():
            agent = untrained_snapshots(params, temporary / "rl_agent")
            policy_source = f"untrained stand-in ({args.agent} missing)"
        # CPU per recorded frame, without the fixed cost of starting games and loading snapshots: the
        # difference between this run and a short one (wall-clock time already excludes that setup).
        short_frames = params.raw_trajectories.parallel_games * 8
        short = params.model_copy(update={"raw_trajectories": params.raw_trajectories.model_copy(
            update={"frames_per_shard": short_frames})})
        record_shard(short, 0, temporary / "warm-up", agent, progress=False)  # first-use imports, ONNX export
        meter = CpuMeter()
        meter.start()
        record_shard(short, 0, temporary / "short", agent, progress=False)
        short_cpu = meter.stop()
        meter.start()
        summary = record_shard(params, 0, temporary / "shard-0", agent, progress=False)
        cpu = meter.stop() - short_cpu
        written = sum(f.stat().st_size for f in (temporary / "shard-0").iterdir())
    recorded = summary.frames_per_second
    print(json.dumps({
        "params": args.params,
        "profile": params.profile,
        "scenario": params.environment.scenario,
        "map": params.environment.map,
        "resolution": list(params.environment.resolution),
        "frame_skip": params.environment.frame_skip,
        "parallel_games": params.raw_trajectories.parallel_games,
        "policy": params.raw_trajectories.policy,
        "policy_source": policy_source,
        "raw_engine": raw,
        "recording": {"frames": summary.frames, "episodes": summary.episodes, "seconds": round(summary.seconds, 3),
                      "frames_per_second": round(recorded, 1), "bytes_written": written,
                      "marginal_cpu_seconds": round(cpu, 3),
                      "frames_per_cpu_second": round((summary.frames - short_frames) / cpu, 1)},
        "ratio": round(recorded / raw["steps_per_second"], 3),
        "cpu_ratio": round((summary.frames - short_frames) / cpu / raw["steps_per_cpu_second"], 3),
        "target_ratio": 0.5,
        "cpu_count": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),
    }, indent=2))


if __name__ == "__main__":
    main()
