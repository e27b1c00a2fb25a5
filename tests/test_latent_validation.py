"""The Great Expectations latent gate: passes clean data, fails naming the expectation on each injected fault."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from components.data.latent_validation import GateLimits, latent_statistics, validate_latents
from components.data.trajectory_store import ShardWriter, TrajectoryStore
from components.errors import PipelineError
from tests.fixtures.models import tiny_autoencoder
from tests.fixtures.params import write_micro_params
from tests.fixtures.stores import write_synthetic_trajectories

K = 2
N_ACTIONS = 11
LIMITS = GateLimits(context=K, n_actions=N_ACTIONS)
EPISODES = [[(8, "train"), (6, "train"), (5, "heldout")], [(7, "train"), (6, "heldout")]]


@pytest.fixture(scope="module")
def trajectories(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_trajectories(tmp_path_factory.mktemp("traj") / "raw", EPISODES, n_actions=N_ACTIONS)


def write_latents(trajectories: Path, root: Path, fault: str | None = None) -> TrajectoryStore:
    """Latent shards mirroring ``trajectories`` (random unit-variance latents), with one injected fault."""
    store = TrajectoryStore(trajectories)
    rng = np.random.default_rng(1)
    for shard_index, shard in enumerate(store.shards):
        with ShardWriter(root / shard.path.name, kind="latents") as writer:
            for number, episode in enumerate(e for e in store.episodes if e.shard == shard_index):
                arrays = store.episode_arrays(episode, ["actions", "dones"])
                latents = rng.normal(size=(episode.length, 4, 3, 4)).astype(np.float16)
                actions = np.array(arrays["actions"])
                split = episode.split
                first = shard_index == 0 and number == 0
                if fault == "nan" and first:
                    latents[2, 1, 0, 0] = np.nan
                if fault == "action" and first:
                    actions[3] = N_ACTIONS
                if fault == "collapsed":
                    latents[:, 2] = 0.0
                if fault == "count" and first:
                    latents, actions = latents[:-1], actions[:-1]
                    arrays["dones"] = arrays["dones"][:-1]
                if fault == "leak_label" and split == "heldout" and shard_index == 1:
                    split = "train"  # a held-out episode relabelled as training data
                writer.add_episode(
                    {"latents": latents, "actions": actions, "dones": np.array(arrays["dones"])},
                    split=split, episode_id=episode.episode_id,
                )
    return TrajectoryStore(root)


def gate(trajectories: Path, tmp_path: Path, fault: str | None) -> dict:
    latents = write_latents(trajectories, tmp_path / "latents", fault)
    report = validate_latents(latent_statistics(latents, TrajectoryStore(trajectories)), LIMITS)
    return {"success": report.success, "failed": [c["name"] for c in report.failed], "report": report}


def test_clean_latents_pass(trajectories: Path, tmp_path: Path) -> None:
    result = gate(trajectories, tmp_path, None)
    assert result["success"], result["report"].failure_text()
    names = [c["name"] for c in result["report"].checks]
    assert names == [
        "latents_finite", "channel_mean_in_range", "channel_std_in_range", "action_ids_in_action_set",
        "episode_length_at_least_k_plus_1", "latent_count_equals_frame_count", "no_heldout_episode_in_train",
    ]
    json.dumps(result["report"].as_json())  # the report is plain JSON


@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        ("nan", "latents_finite"),
        ("action", "action_ids_in_action_set"),
        ("collapsed", "channel_std_in_range"),
        ("count", "latent_count_equals_frame_count"),
        ("leak_label", "no_heldout_episode_in_train"),
    ],
)
def test_fault_fails_naming_the_expectation(trajectories: Path, tmp_path: Path, fault: str, expected: str) -> None:
    result = gate(trajectories, tmp_path, fault)
    assert not result["success"]
    assert result["failed"] == [expected]
    text = result["report"].failure_text()
    assert expected in text and "of" in text  # readable, with counts


def test_nan_count_is_reported(trajectories: Path, tmp_path: Path) -> None:
    check = next(c for c in gate(trajectories, tmp_path, "nan")["report"].checks if c["name"] == "latents_finite")
    assert check["details"]["unexpected_count"] == 1
    assert check["details"]["element_count"] == sum(n for shard in EPISODES for n, _ in shard)


def test_heldout_copied_into_train_is_a_leak(tmp_path: Path) -> None:
    """The same held-out content under another id in train is caught by content, not only by id."""
    traj = write_synthetic_trajectories(tmp_path / "raw", [[(6, "train"), (6, "heldout")]])
    store = TrajectoryStore(traj)
    rng = np.random.default_rng(3)
    latents = {e.episode_id: rng.normal(size=(e.length, 4, 3, 4)).astype(np.float16) for e in store.episodes}
    heldout = next(e for e in store.episodes if e.split == "heldout")
    with ShardWriter(tmp_path / "latents" / "shard-0", kind="latents") as writer:
        for episode in store.episodes:
            writer.add_episode({"latents": latents[episode.episode_id], "actions": np.zeros(episode.length, np.int64),
                                "dones": np.zeros(episode.length, bool)}, split=episode.split,
                               episode_id=episode.episode_id)
        writer.add_episode({"latents": latents[heldout.episode_id], "actions": np.zeros(heldout.length, np.int64),
                            "dones": np.zeros(heldout.length, bool)}, split="train", episode_id="copy-of-heldout")
    report = validate_latents(latent_statistics(TrajectoryStore(tmp_path / "latents"), store), LIMITS)
    assert "no_heldout_episode_in_train" in [c["name"] for c in report.failed]


def test_too_short_episode_fails(tmp_path: Path) -> None:
    traj = write_synthetic_trajectories(tmp_path / "raw", [[(6, "train"), (K, "train"), (5, "heldout")]])
    latents = write_latents(traj, tmp_path / "latents")
    report = validate_latents(latent_statistics(latents, TrajectoryStore(traj)), LIMITS)
    assert [c["name"] for c in report.failed] == ["episode_length_at_least_k_plus_1"]
    check = report.failed[0]
    assert check["details"]["unexpected_count"] == 1


# --------------------------------------------------------------------------- the stage publishes nothing on failure


def _stage_args(tmp_path: Path, params: Path, trajectories: Path) -> argparse.Namespace:
    return argparse.Namespace(
        params=str(params), trajectories=str(trajectories), autoencoder=str(tmp_path / "ae"),
        out=str(tmp_path / "data" / "validated_latents"), report=str(tmp_path / "reports" / "validated_latents.json"),
    )


def test_stage_failure_publishes_no_latents(tmp_path: Path) -> None:
    from components.stages import validated_latents

    # action ids beyond the action set: the micro profile's environment has fewer actions than this data uses
    traj = write_synthetic_trajectories(tmp_path / "raw", [[(8, "train"), (6, "heldout")]], n_actions=40, seed=5)
    tiny_autoencoder((24, 32), tmp_path / "ae", blocks=2)
    args = _stage_args(tmp_path, write_micro_params(tmp_path), traj)
    with pytest.raises(PipelineError) as failure:
        validated_latents.main(args)
    message = str(failure.value)
    assert "action_ids_in_action_set" in message and "no latents were published" in message
    assert not Path(args.out).exists()
    report = json.loads(Path(args.report).read_text())
    assert report["success"] is False
    assert [c["name"] for c in report["checks"] if not c["success"]] == ["action_ids_in_action_set"]


def test_stage_broken_before_the_gate_publishes_nothing_and_its_report_names_the_error(tmp_path: Path) -> None:
    from components.stages import validated_latents

    traj = write_synthetic_trajectories(tmp_path / "raw", [[(8, "train"), (6, "heldout")]])  # 24x32 frames
    tiny_autoencoder((32, 40), tmp_path / "ae", blocks=2)  # an autoencoder for other frames
    args = _stage_args(tmp_path, write_micro_params(tmp_path), traj)
    with pytest.raises(PipelineError, match=r"frames are \(H, W\) = \(24, 32\).*re-run base_autoencoder"):
        validated_latents.main(args)
    assert not Path(args.out).exists() and not list((tmp_path / "data").glob(".*"))  # no staging folder left
    report = json.loads(Path(args.report).read_text())
    assert report["success"] is False and report["checks"] == []
    assert report["error"].startswith("stage failed: PipelineError:") and "(24, 32)" in report["error"]


def test_stage_success_mirrors_episodes(tmp_path: Path) -> None:
    from components.stages import validated_latents

    traj = write_synthetic_trajectories(tmp_path / "raw",
                                        [[(8, "train"), (2, "train"), (6, "heldout")], [(7, "train")]])
    tiny_autoencoder((24, 32), tmp_path / "ae", blocks=2)
    args = _stage_args(tmp_path, write_micro_params(tmp_path), traj)
    validated_latents.main(args)
    report = json.loads(Path(args.report).read_text())
    assert report["success"] is True
    assert report["dropped_short_episodes"]["count"] == 1  # the 2-frame episode is shorter than K+1 = 3
    latents = TrajectoryStore(args.out)
    source = TrajectoryStore(traj)
    kept = [e for e in source.episodes if e.length >= 3]
    assert [(e.episode_id, e.split, e.length) for e in latents.episodes] == [
        (e.episode_id, e.split, e.length) for e in kept
    ]
    z = latents.shards[0].array("latents")
    assert z.dtype == np.float16 and z.shape[1:] == (4, 12, 16)
    assert latents.shards[0].manifest["kind"] == "latents"
    np.testing.assert_array_equal(latents.shards[0].array("actions")[:8], source.shards[0].array("actions")[:8])


def test_both_engines_publish_the_same_latents(tmp_path: Path) -> None:
    """``validated_latents.engine``: ONNX Runtime (default) and PyTorch encode every frame alike."""
    from components.stages import validated_latents

    traj = write_synthetic_trajectories(tmp_path / "raw", [[(8, "train"), (6, "heldout")]], seed=3)
    tiny_autoencoder((24, 32), tmp_path / "ae", blocks=2)
    published = {}
    for engine in ("onnxruntime", "torch"):
        root = tmp_path / engine
        root.mkdir()
        params = write_micro_params(root, validated_latents={"engine": engine})
        args = _stage_args(root, params, traj)
        args.autoencoder = str(tmp_path / "ae")
        validated_latents.main(args)
        published[engine] = TrajectoryStore(args.out).shards[0].array("latents").astype(np.float32)
    assert published["torch"].shape == published["onnxruntime"].shape == (14, 4, 12, 16)
    assert np.abs(published["torch"]).max() > 0.01  # real latents, not zeros
    np.testing.assert_allclose(published["torch"], published["onnxruntime"], atol=2e-3, rtol=2e-3)
