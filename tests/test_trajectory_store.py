"""The sharded store: round trip, windows, atomic writes, and detection of damaged shards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from components.data.trajectory_store import Shard, ShardError, ShardWriter, TrajectoryStore


def episode(length: int, offset: int, size: tuple[int, int] = (6, 8)) -> dict[str, np.ndarray]:
    frames = (np.arange(length * size[0] * size[1] * 3) % 251).astype(np.uint8).reshape(length, *size, 3)
    frames[:, 0, 0, 0] = np.arange(length) + offset  # row id, to check windows
    return {
        "frames": frames,
        "actions": np.arange(length, dtype=np.int64) % 5,
        "dones": np.eye(1, length, length - 1, dtype=bool)[0],
    }


def write_shard(path: Path, lengths: list[int], splits: list[str]) -> Path:
    with ShardWriter(path, kind="trajectories", attributes={"resolution": [8, 6]}) as writer:
        offset = 0
        for length, split in zip(lengths, splits, strict=True):
            writer.add_episode(episode(length, offset), split=split, seed=offset)
            offset += length
    return path


def test_round_trip(tmp_path: Path) -> None:
    path = write_shard(tmp_path / "shard-0", [5, 7], ["train", "heldout"])
    shard = Shard(path)
    assert shard.array("frames").shape == (12, 6, 8, 3)
    assert shard.array("frames").dtype == np.uint8
    assert shard.array("actions").tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]
    assert shard.attributes == {"resolution": [8, 6]}
    assert [e["split"] for e in shard.episodes_metadata] == ["train", "heldout"]
    assert shard.episodes_metadata[1]["start"] == 5 and shard.episodes_metadata[1]["seed"] == 5
    np.testing.assert_array_equal(shard.array("frames")[5:], episode(7, 5)["frames"])


def test_windows_stay_inside_one_episode_of_the_split(tmp_path: Path) -> None:
    write_shard(tmp_path / "shards" / "shard-0", [5, 3], ["train", "train"])
    write_shard(tmp_path / "shards" / "shard-1", [4, 6], ["heldout", "train"])
    store = TrajectoryStore(tmp_path / "shards")
    assert len(store.split("train")) == 3 and len(store.split("heldout")) == 1
    # windows of 4: episode lengths 5, 3, 6 in train -> 2 + 0 + 3
    index = store.window_index(4, "train")
    assert len(index) == 5
    windows = list(store.iter_windows(4, "train", ["frames", "actions"], shuffle=True, seed=1))
    assert len(windows) == 5
    for window in windows:
        rows = window["frames"][:, 0, 0, 0].astype(int)
        assert np.all(np.diff(rows) == 1), rows  # consecutive rows of one episode
        assert window["actions"].shape == (4,)
    assert len(store.window_index(4, "heldout")) == 1


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "shard-0"
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(target, kind="trajectories") as writer:
            writer.add_episode(episode(4, 0), split="train")
            raise RuntimeError("boom")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_rewrite_replaces_whole_shard(tmp_path: Path) -> None:
    target = write_shard(tmp_path / "shard-0", [5], ["train"])
    write_shard(target, [3, 3], ["train", "heldout"])
    assert Shard(target).manifest["rows"] == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-0"]


def test_mismatched_episode_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="share a non-zero length"):
        with ShardWriter(tmp_path / "s", kind="trajectories") as writer:
            writer.add_episode({"frames": np.zeros((3, 2, 2, 3), np.uint8), "actions": np.zeros(2)}, split="train")
    with pytest.raises(ValueError, match="split must be one of"):
        with ShardWriter(tmp_path / "s", kind="trajectories") as writer:
            writer.add_episode(episode(3, 0), split="test")


def test_truncated_shard_named(tmp_path: Path) -> None:
    path = write_shard(tmp_path / "shard-0", [5], ["train"])
    frames = path / "frames.bin"
    frames.write_bytes(frames.read_bytes()[:-10])
    with pytest.raises(ShardError, match=r"frames\.bin: truncated or corrupt"):
        Shard(path)


def test_corrupt_bytes_named(tmp_path: Path) -> None:
    path = write_shard(tmp_path / "shard-0", [5], ["train"])
    data = bytearray((path / "actions.bin").read_bytes())
    data[3] ^= 0xFF
    (path / "actions.bin").write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"actions\.bin: corrupt, sha256"):
        Shard(path)
    Shard(path, verify_checksums=False)  # size still matches: only the checksum sees it


def test_missing_or_bad_manifest_named(tmp_path: Path) -> None:
    path = write_shard(tmp_path / "shard-0", [5], ["train"])
    (path / "episodes.json").write_text("{not json")
    with pytest.raises(ShardError, match=r"episodes\.json: corrupt JSON"):
        Shard(path)
    (path / "manifest.json").unlink()
    with pytest.raises(ShardError, match=r"manifest\.json: missing"):
        Shard(path)


def test_inconsistent_episodes_named(tmp_path: Path) -> None:
    path = write_shard(tmp_path / "shard-0", [5, 4], ["train", "train"])
    records = json.loads((path / "episodes.json").read_text())
    records[1]["start"] = 6
    (path / "episodes.json").write_text(json.dumps(records))
    with pytest.raises(ShardError, match="is not contiguous"):
        Shard(path)


def test_empty_or_missing_root(tmp_path: Path) -> None:
    with pytest.raises(ShardError, match="no such folder"):
        TrajectoryStore(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardError, match="contains no shards"):
        TrajectoryStore(tmp_path / "empty")


def test_atomic_outputs_have_ordinary_permissions(tmp_path: Path) -> None:
    from components.atomic import atomic_write_text

    atomic_write_text(tmp_path / "a.txt", "x")
    path = write_shard(tmp_path / "shard-0", [3], ["train"])
    assert (tmp_path / "a.txt").stat().st_mode & 0o044 == 0o044  # group/other readable (umask 022)
    assert path.stat().st_mode & 0o055 == 0o055
