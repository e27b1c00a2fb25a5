"""Integration: the first two stages (rl_agent, raw_trajectories) under real `dvc repro` on the micro profile."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from components.data.trajectory_store import TrajectoryStore
from components.game.agent import list_checkpoints, load_policy
from components.game.collection import heldout_score, split_for
from components.params import load_params
from tests.fixtures.processes import REPO_ROOT, run

pytestmark = pytest.mark.slow


def ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def set_param(repo: Path, path: str, value: object) -> None:
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    *parents, leaf = path.split(".")
    node = raw
    for key in parents:
        node = node[key]
    node[leaf] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


def test_cli_help_lists_stages() -> None:
    result = run([sys.executable, "-m", "components", "--help"], REPO_ROOT)
    assert "rl_agent" in result.stdout and "raw_trajectories" in result.stdout


def test_heldout_rule_is_deterministic() -> None:
    scores = [heldout_score(seed) for seed in range(2000)]
    assert scores == [heldout_score(seed) for seed in range(2000)]
    assert 0.05 < np.mean([s < 0.1 for s in scores]) < 0.15
    assert split_for(5, 0.0) == "train"


def check_outputs(repo: Path) -> None:
    params = load_params(repo / "params.yaml")
    width, height = params.environment.resolution
    n_actions = len(params.environment.actions)

    # rl_agent: final policy, evenly spaced snapshots, metrics and DVCLive curves
    checkpoints = list_checkpoints(repo / "data/rl_agent")
    assert len(checkpoints) == params.rl_agent.checkpoints
    assert [c["timesteps"] for c in checkpoints] == sorted(c["timesteps"] for c in checkpoints)
    assert checkpoints[-1]["name"] == "final" and (repo / "data/rl_agent/policy.safetensors").is_file()
    metrics = json.loads((repo / "metrics/rl_agent.json").read_text())
    assert metrics["timesteps"] >= params.rl_agent.total_timesteps
    assert (repo / "dvclive/rl_agent/plots/metrics/episode_reward.tsv").is_file()
    policy = load_policy(repo / "data/rl_agent/policy.json")

    # raw_trajectories: one shard per id, exact frame counts, documented dtypes and shapes
    store = TrajectoryStore(repo / "data/raw_trajectories")
    assert len(store.shards) == len(params.raw_trajectories.shards)
    for shard_id, shard in zip(params.raw_trajectories.shards, store.shards, strict=True):
        rows = params.raw_trajectories.frames_per_shard
        frames, actions = shard.array("frames"), shard.array("actions")
        rewards, dones = shard.array("rewards"), shard.array("dones")
        assert frames.shape == (rows, height, width, 3) and frames.dtype == np.uint8
        assert actions.shape == (rows,) and actions.dtype == np.int64
        assert rewards.shape == (rows,) and rewards.dtype == np.float32
        assert dones.shape == (rows,) and dones.dtype == np.bool_
        assert actions.min() >= 0 and actions.max() < n_actions
        assert frames.std() > 0
        assert shard.attributes["resolution"] == [width, height]
        assert shard.attributes["action_names"] == [a.name for a in params.environment.actions]
        assert shard.attributes["frame_skip"] == params.environment.frame_skip
        for record in shard.episodes_metadata:
            assert dones[record["start"] + record["length"] - 1]
            assert dones[record["start"] : record["start"] + record["length"] - 1].sum() == 0
            assert record["split"] == split_for(record["seed"], params.raw_trajectories.heldout_fraction)
            assert {"scenario", "map", "seed", "policy", "random_action_fraction"} <= set(record)
        summary = json.loads((repo / f"metrics/raw_trajectories/shard-{shard_id}.json").read_text())
        assert summary["frames"] == rows and summary["episodes"] == len(shard.episodes_metadata)
        assert sum(summary["action_histogram"].values()) == rows
        assert (repo / f"plots/raw_trajectories/shard-{shard_id}.png").stat().st_size > 0
    seeds = [e.metadata["seed"] for e in store.episodes]
    assert len(set(seeds)) == len(seeds)  # shards have their own seeds
    frames = store.shards[0].array("frames")[:4]
    assert policy(frames).shape == (4,)
    # ONNX Runtime (used for recording) and PyTorch give the same action distribution
    torch_policy = load_policy(repo / "data/rl_agent/policy.json", backend="torch")
    np.testing.assert_allclose(policy.logits(frames), torch_policy.logits(frames), atol=1e-4)


def test_micro_repro_is_incremental(micro_repo: Path) -> None:
    first = run(["dvc", "repro", "raw_trajectories"], micro_repo, timeout=600)
    assert ran_stages(first.stdout) == {"rl_agent", "raw_trajectories@0", "raw_trajectories@1"}
    check_outputs(micro_repo)
    policies = {e.metadata["policy"] for e in TrajectoryStore(micro_repo / "data/raw_trajectories").episodes}
    assert policies <= {c["name"] for c in list_checkpoints(micro_repo / "data/rl_agent")}

    second = run(["dvc", "repro", "raw_trajectories"], micro_repo)
    assert ran_stages(second.stdout) == set()

    # a raw_trajectories-only param reruns only the shards: here the random-policy ablation switch
    set_param(micro_repo, "raw_trajectories.policy", "random")
    third = run(["dvc", "repro", "raw_trajectories"], micro_repo, timeout=600)
    assert ran_stages(third.stdout) == {"raw_trajectories@0", "raw_trajectories@1"}
    episodes = TrajectoryStore(micro_repo / "data/raw_trajectories").episodes
    assert {e.metadata["policy"] for e in episodes} == {"random"}
    assert {e.metadata["random_action_fraction"] for e in episodes} == {1.0}

    # an rl_agent param reruns the agent, and its new weights make every shard out of date
    # (`dvc status` instead of a full rerun of the shards keeps this test short)
    set_param(micro_repo, "rl_agent.ppo.learning_rate", 0.001)
    fourth = run(["dvc", "repro", "rl_agent"], micro_repo, timeout=600)
    assert ran_stages(fourth.stdout) == {"rl_agent"}
    status = json.loads(run(["dvc", "status", "--json", "raw_trajectories"], micro_repo).stdout)
    assert set(status) == {"raw_trajectories@0", "raw_trajectories@1"}
    assert all("data/rl_agent" in json.dumps(status[s]) for s in status)


def test_recording_is_reproducible_per_shard(tmp_path: Path) -> None:
    from components.game.collection import record_shard
    from components.params import parse_params, profile_params, read_yaml

    raw = profile_params("micro", read_yaml(REPO_ROOT / "params.yaml"))
    raw["raw_trajectories"].update(policy="random", frames_per_shard=120)
    raw["environment"]["repeat_action_probability"] = 0.5
    params = parse_params(raw)
    for name, shard in (("a", 0), ("b", 0), ("c", 1)):
        record_shard(params, shard, tmp_path / name, agent_dir=None, progress=False)
    a, b, c = (TrajectoryStore(tmp_path / name) for name in "abc")
    for array in ("frames", "actions", "rewards", "dones"):
        np.testing.assert_array_equal(a.shards[0].array(array), b.shards[0].array(array))
    def without_id(records: list[dict]) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "episode_id"} for r in records]

    assert without_id(a.shards[0].episodes_metadata) == without_id(b.shards[0].episodes_metadata)
    assert a.shards[0].array("frames").shape[0] == 120
    assert not np.array_equal(a.shards[0].array("actions"), c.shards[0].array("actions"))  # own seed per shard
