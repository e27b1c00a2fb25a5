"""Sharded, streamable, memory-mappable storage of recorded play (frames or latents, actions, rewards).

On-disk format, version 1 (documented in README "Data formats"):

    <shard>/                 one folder per shard, written whole or not at all (atomic rename)
      manifest.json          format_version, kind, per-array {dtype, shape, bytes, sha256}, attributes
      episodes.json          one record per episode: episode_id, start, length, split, plus metadata
      <name>.bin             raw little-endian C-order array data, e.g. frames.bin uint8 [N, H, W, 3]

Arrays are concatenated over episodes along axis 0; episode ``e`` owns rows ``[start, start + length)``.
Row ``t`` holds the frame shown at step ``t`` and the action taken on it, so frames ``t-K..t-1`` with
actions ``t-K..t-1`` predict frame ``t``. ``dones[t]`` is true on an episode's last row.

Reading checks sizes always and sha256 checksums by default, so a truncated or corrupt shard raises
``ShardError`` naming the file. Readers memory-map the arrays and never load a whole shard into memory.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from components.atomic import atomic_directory, atomic_write_json, file_sha256
from components.errors import PipelineError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
EPISODES = "episodes.json"
SPLITS = ("train", "heldout")


class ShardError(PipelineError):
    """A shard that cannot be read: missing, truncated, corrupt or inconsistent. Names the file."""


@dataclass(frozen=True)
class Episode:
    """One episode of one shard."""

    shard: int  # index into TrajectoryStore.shards
    episode_id: str
    start: int
    length: int
    split: str
    metadata: dict[str, Any]


class _ArrayStream:
    """Appends rows of one array to a raw file, hashing as it goes."""

    def __init__(self, path: Path, row_shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.path, self.row_shape, self.dtype = path, row_shape, dtype
        self.rows, self.bytes = 0, 0
        self.digest = hashlib.sha256()
        self.handle = open(path, "wb")

    def append(self, rows: np.ndarray) -> None:
        if rows.shape[1:] != self.row_shape or rows.dtype != self.dtype:
            raise ValueError(
                f"{self.path.stem}: expected rows of shape {self.row_shape} and dtype {self.dtype}, "
                f"got {rows.shape[1:]} {rows.dtype}"
            )
        data = np.ascontiguousarray(rows).tobytes()
        self.handle.write(data)
        self.digest.update(data)
        self.rows += rows.shape[0]
        self.bytes += len(data)

    def close(self) -> dict[str, Any]:
        self.handle.close()
        return {
            "dtype": self.dtype.str,
            "shape": [self.rows, *self.row_shape],
            "bytes": self.bytes,
            "sha256": self.digest.hexdigest(),
        }


class ShardWriter:
    """Streams episodes into a new shard folder; the folder appears at ``path`` only on ``close()``.

    Use as a context manager: an exception discards everything written so far.
    """

    def __init__(self, path: str | Path, kind: str, attributes: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.kind = kind
        self.attributes = dict(attributes or {})
        self._atomic = atomic_directory(self.path)
        self._staging = self._atomic.__enter__()
        self._streams: dict[str, _ArrayStream] = {}
        self._episodes: list[dict[str, Any]] = []
        self._rows = 0

    def add_episode(self, arrays: dict[str, np.ndarray], split: str, **metadata: Any) -> None:
        """Append one episode: every array has the episode's length on axis 0."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        lengths = {name: len(a) for name, a in arrays.items()}
        if len(set(lengths.values())) != 1 or 0 in lengths.values():
            raise ValueError(f"episode arrays must share a non-zero length, got {lengths}")
        if self._streams and set(arrays) != set(self._streams):
            raise ValueError(f"episode arrays {sorted(arrays)} differ from the shard's {sorted(self._streams)}")
        for name, values in arrays.items():
            values = np.asarray(values)
            if name not in self._streams:
                self._streams[name] = _ArrayStream(self._staging / f"{name}.bin", values.shape[1:], values.dtype)
            self._streams[name].append(values)
        length = next(iter(lengths.values()))
        episode_id = metadata.pop("episode_id", f"{self.path.name}/{len(self._episodes):05d}")
        self._episodes.append(
            {"episode_id": episode_id, "start": self._rows, "length": length, "split": split, **metadata}
        )
        self._rows += length

    def close(self) -> Path:
        if not self._episodes:
            self.abort()
            raise ValueError(f"{self.path}: refusing to write a shard with no episodes")
        arrays = {name: stream.close() for name, stream in self._streams.items()}
        atomic_write_json(self._staging / EPISODES, self._episodes)
        manifest = {
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "rows": self._rows,
            "episodes": len(self._episodes),
            "arrays": arrays,
            "attributes": self.attributes,
        }
        atomic_write_json(self._staging / MANIFEST, manifest)
        self._atomic.__exit__(None, None, None)
        return self.path

    def abort(self) -> None:
        for stream in self._streams.values():
            stream.handle.close()
        error = RuntimeError("shard write aborted")
        try:
            self._atomic.__exit__(type(error), error, None)
        except RuntimeError:
            pass

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, traceback: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class Shard:
    """A read-only, memory-mapped shard. Construction validates it (see module docstring)."""

    def __init__(self, path: str | Path, verify_checksums: bool = True) -> None:
        self.path = Path(path)
        self.manifest = self._read_json(MANIFEST)
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise ShardError(
                f"{self.path / MANIFEST}: format_version {self.manifest.get('format_version')!r} is not "
                f"{FORMAT_VERSION}; re-create the shard with this version of the pipeline"
            )
        self.episodes_metadata: list[dict[str, Any]] = self._read_json(EPISODES)
        self._arrays: dict[str, np.memmap] = {}
        for name, spec in self.manifest["arrays"].items():
            self._check_file(name, spec, verify_checksums)
        self._check_episodes()

    def _read_json(self, name: str) -> Any:
        file = self.path / name
        if not file.is_file():
            raise ShardError(f"{file}: missing; {self.path} is not a complete shard (re-run the stage that writes it)")
        try:
            return json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ShardError(f"{file}: corrupt JSON ({error}); re-run the stage that writes it") from None

    def _check_file(self, name: str, spec: dict[str, Any], verify_checksums: bool) -> None:
        file = self.path / f"{name}.bin"
        if not file.is_file():
            raise ShardError(f"{file}: missing array file listed in {MANIFEST}")
        size = file.stat().st_size
        if size != spec["bytes"]:
            raise ShardError(f"{file}: truncated or corrupt, {size} bytes on disk but {spec['bytes']} expected")
        if verify_checksums and file_sha256(file) != spec["sha256"]:
            raise ShardError(f"{file}: corrupt, sha256 does not match {MANIFEST}")

    def _check_episodes(self) -> None:
        rows = self.manifest["rows"]
        position = 0
        for record in self.episodes_metadata:
            if record["start"] != position or record["length"] <= 0:
                raise ShardError(f"{self.path / EPISODES}: episode {record['episode_id']} is not contiguous")
            position += record["length"]
        if position != rows:
            raise ShardError(f"{self.path / EPISODES}: episodes cover {position} rows, manifest says {rows}")

    @property
    def array_names(self) -> list[str]:
        return list(self.manifest["arrays"])

    @property
    def attributes(self) -> dict[str, Any]:
        return self.manifest.get("attributes", {})

    def array(self, name: str) -> np.memmap:
        """The whole array, memory-mapped read-only."""
        if name not in self._arrays:
            if name not in self.manifest["arrays"]:
                raise KeyError(f"{self.path}: no array {name!r}; it has {self.array_names}")
            spec = self.manifest["arrays"][name]
            self._arrays[name] = np.memmap(
                self.path / f"{name}.bin", dtype=np.dtype(spec["dtype"]), mode="r", shape=tuple(spec["shape"])
            )
        return self._arrays[name]


def shard_paths(root: str | Path) -> list[Path]:
    """Shard folders under ``root`` (a shard itself, or a folder of shards), sorted by name."""
    root = Path(root)
    if (root / MANIFEST).is_file():
        return [root]
    if not root.is_dir():
        raise ShardError(f"{root}: no such folder of shards (run the stage that writes it first)")
    paths = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not paths:
        raise ShardError(f"{root}: contains no shards")
    return paths


class TrajectoryStore:
    """All shards under one or more roots, with episode lists and windows of consecutive rows."""

    def __init__(self, roots: str | Path | Sequence[str | Path], verify_checksums: bool = True) -> None:
        roots = [roots] if isinstance(roots, (str, Path)) else list(roots)
        self.shards = [Shard(p, verify_checksums) for r in roots for p in shard_paths(r)]
        self.episodes = [
            Episode(i, rec["episode_id"], rec["start"], rec["length"], rec["split"], rec)
            for i, shard in enumerate(self.shards)
            for rec in shard.episodes_metadata
        ]

    def split(self, split: str | None) -> list[Episode]:
        if split is not None and split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
        return [e for e in self.episodes if split is None or e.split == split]

    def episode_arrays(self, episode: Episode, names: Sequence[str]) -> dict[str, np.ndarray]:
        shard = self.shards[episode.shard]
        return {n: shard.array(n)[episode.start : episode.start + episode.length] for n in names}

    def window_index(self, window: int, split: str | None) -> np.ndarray:
        """Every ``(shard, start_row)`` whose ``window`` rows lie inside one episode of ``split``."""
        starts = [
            np.stack([np.full(e.length - window + 1, e.shard), e.start + np.arange(e.length - window + 1)], 1)
            for e in self.split(split)
            if e.length >= window
        ]
        return np.concatenate(starts).astype(np.int64) if starts else np.zeros((0, 2), np.int64)

    def read_window(self, shard: int, start: int, window: int, names: Sequence[str]) -> dict[str, np.ndarray]:
        source = self.shards[shard]
        return {n: np.array(source.array(n)[start : start + window]) for n in names}

    def episode_at(self, shard: int, row: int) -> Episode:
        """The episode that holds ``row`` of ``shard``."""
        for episode in self.episodes:
            if episode.shard == shard and episode.start <= row < episode.start + episode.length:
                return episode
        raise ShardError(f"{self.shards[shard].path}: row {row} is in no episode")

    def read_matching_window(self, other: TrajectoryStore, shard: int, start: int, window: int,
                             names: Sequence[str]) -> dict[str, np.ndarray] | None:
        """The same rows of the same episode as ``other``'s window (``shard``, ``start``), read from this store,
        e.g. the frames behind a window of latents. The episode is matched by ``episode_id`` and length; None
        when this store does not hold it."""
        episode = other.episode_at(shard, start)
        twin = next((e for e in self.episodes if e.episode_id == episode.episode_id), None)
        if twin is None or twin.length != episode.length:
            return None
        return self.read_window(twin.shard, twin.start + (start - episode.start), window, names)

    def iter_windows(
        self, window: int, split: str | None, names: Sequence[str], shuffle: bool = False, seed: int = 0
    ) -> Iterator[dict[str, np.ndarray]]:
        """Stream windows of ``window`` consecutive rows; memory use does not grow with the data size."""
        index = self.window_index(window, split)
        if shuffle:
            index = index[np.random.default_rng(seed).permutation(len(index))]
        for shard, start in index:
            yield self.read_window(int(shard), int(start), window, names)

