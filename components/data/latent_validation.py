"""The latent data gate: a Great Expectations suite over statistics of encoded latents.

Bad data must never reach the world model. ``latent_statistics`` turns a latent store (and the trajectory store
it was encoded from) into three small tables, and ``validate_latents`` runs one GX suite over them:

* ``frames``   one row per latent: ``episode_id``, ``split``, ``action``, ``nonfinite_values``
* ``channels`` one row per latent channel: ``mean`` and ``std`` over the finite values of all latents
* ``episodes`` one row per latent episode: ``latents`` (count), ``frames`` (count in the trajectories, 0 if the
  episode is not there), ``heldout_in_train`` (1 when a held-out episode, by id or by content, is in train)

Each check has a stable name (used in the report and in failure messages):

=================================  ===================================================================
``latents_finite``                 every latent value is finite (no NaN/inf)
``channel_mean_in_range``          per-channel mean of the scaled latents within +-``channel_mean_limit``
``channel_std_in_range``           per-channel std in [``channel_std_min``, ``channel_std_max``] (not collapsed)
``action_ids_in_action_set``       every action id in ``[0, number of actions)``
``episode_length_at_least_k_plus_1``  every episode has at least K + 1 latents (K = ``world_model.context``)
``latent_count_equals_frame_count``   latents per episode == frames of that episode in the trajectories
``no_heldout_episode_in_train``    no held-out episode (same id, or same content) appears in the train split
=================================  ===================================================================

Importing Great Expectations takes about 2 s; nothing here touches the network.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import great_expectations as gx
import numpy as np
import pandas as pd
from great_expectations.data_context.types.base import ProgressBarsConfig

if TYPE_CHECKING:
    from components.data.trajectory_store import TrajectoryStore


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GateLimits:
    """What the gate accepts. ``context`` is the world model's K; ``n_actions`` the size of the action set."""

    context: int
    n_actions: int
    channel_mean_limit: float = 3.0
    channel_std_min: float = 0.05
    channel_std_max: float = 10.0


@dataclass
class LatentTables:
    frames: pd.DataFrame
    channels: pd.DataFrame
    episodes: pd.DataFrame


@dataclass
class GateReport:
    success: bool
    checks: list[dict[str, Any]]
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [c for c in self.checks if not c["success"]]

    def as_json(self) -> dict[str, Any]:
        return {"success": self.success, "checks": self.checks, **self.summary}

    def failure_text(self) -> str:
        """A short readable list of the failed expectations, with counts."""
        lines = [f"latent validation failed: {len(self.failed)} of {len(self.checks)} expectations"]
        for check in self.failed:
            details = check["details"]
            count = details.get("unexpected_count")
            total = details.get("element_count")
            what = f"{count} of {total} {check['table']} rows" if count is not None else "failed"
            example = details.get("partial_unexpected_list")
            lines.append(
                f"  - {check['name']}: {what} ({check['description']})"
                + (f"; e.g. {example[:3]}" if example else "")
            )
        return "\n".join(lines)


# --------------------------------------------------------------------------- statistics


def _episode_digest(rows: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(rows).tobytes()).hexdigest()


def latent_statistics(latents: TrajectoryStore, trajectories: TrajectoryStore) -> LatentTables:
    """Build the gate's tables from a latent ``TrajectoryStore`` and the trajectory store it came from."""

    frame_parts: list[Any] = []
    channel_sum: np.ndarray | None = None
    channel_sq: np.ndarray | None = None
    channel_n: np.ndarray | None = None
    episodes = []
    digests: dict[str, set[str]] = {"train": set(), "heldout": set()}
    ids_by_split: dict[str, set[str]] = {"train": set(), "heldout": set()}
    frames_by_id: dict[str, int] = {}
    split_by_id: dict[str, str] = {}
    for episode in trajectories.episodes:
        frames_by_id[episode.episode_id] = frames_by_id.get(episode.episode_id, 0) + episode.length
        split_by_id[episode.episode_id] = episode.split

    for episode in latents.episodes:
        arrays = latents.episode_arrays(episode, ["latents", "actions"])
        z = np.asarray(arrays["latents"], dtype=np.float32)
        finite = np.isfinite(z)
        frame_parts.append(pd.DataFrame({
            "episode_id": episode.episode_id,
            "split": episode.split,
            "action": np.asarray(arrays["actions"], dtype=np.int64),
            "nonfinite_values": (~finite).reshape(len(z), -1).sum(axis=1),
        }))
        # per-channel sums over finite values only (the NaN check reports the rest)
        clean = np.where(finite, z, 0.0).astype(np.float64)
        sums = clean.sum(axis=(0, 2, 3))
        squares = (clean**2).sum(axis=(0, 2, 3))
        counts = finite.sum(axis=(0, 2, 3))
        channel_sum = sums if channel_sum is None else channel_sum + sums
        channel_sq = squares if channel_sq is None else channel_sq + squares
        channel_n = counts if channel_n is None else channel_n + counts
        digest = _episode_digest(z)
        digests[episode.split].add(digest)
        ids_by_split[episode.split].add(episode.episode_id)
        episodes.append({
            "episode_id": episode.episode_id,
            "split": episode.split,
            "latents": episode.length,
            "frames": frames_by_id.get(episode.episode_id, 0),
            "trajectory_split": split_by_id.get(episode.episode_id, "missing"),
            "digest": digest,
        })

    for record in episodes:
        leaked = False
        if record["split"] == "train" and record["trajectory_split"] == "heldout":
            leaked = True  # a held-out episode relabelled as training data
        if record["split"] == "heldout" and (
            record["episode_id"] in ids_by_split["train"] or record["digest"] in digests["train"]
        ):
            leaked = True  # the same episode (id or content) is also in train
        record["heldout_in_train"] = int(leaked)

    n = np.maximum(channel_n, 1) if channel_n is not None else np.zeros(0)
    mean = channel_sum / n if channel_sum is not None else np.zeros(0)
    var = channel_sq / n - mean**2 if channel_sq is not None else np.zeros(0)
    std = np.sqrt(np.maximum(var, 0.0))
    if channel_n is not None:  # a channel with no finite value at all: out of every range
        mean = np.where(channel_n > 0, mean, np.inf)
        std = np.where(channel_n > 0, std, 0.0)
    return LatentTables(
        frames=pd.concat(frame_parts, ignore_index=True) if frame_parts else pd.DataFrame(
            {"episode_id": [], "split": [], "action": [], "nonfinite_values": []}),
        channels=pd.DataFrame({"channel": np.arange(len(mean)), "mean": mean, "std": std}),
        episodes=pd.DataFrame(episodes).drop(columns=["digest"]) if episodes else pd.DataFrame(
            {"episode_id": [], "split": [], "latents": [], "frames": [], "trajectory_split": [],
             "heldout_in_train": []}),
    )


# --------------------------------------------------------------------------- the suite


def _expectations(limits: GateLimits) -> list[tuple[str, str, str, Any]]:
    """(name, table, description, GX expectation) for every check."""

    e = gx.expectations
    k1 = limits.context + 1
    return [
        ("latents_finite", "frames", "every latent value is finite",
         e.ExpectColumnValuesToBeBetween(column="nonfinite_values", min_value=0, max_value=0)),
        ("channel_mean_in_range", "channels", f"|channel mean| <= {limits.channel_mean_limit}",
         e.ExpectColumnValuesToBeBetween(column="mean", min_value=-limits.channel_mean_limit,
                                         max_value=limits.channel_mean_limit)),
        ("channel_std_in_range", "channels",
         f"channel std in [{limits.channel_std_min}, {limits.channel_std_max}] (not collapsed)",
         e.ExpectColumnValuesToBeBetween(column="std", min_value=limits.channel_std_min,
                                         max_value=limits.channel_std_max)),
        ("action_ids_in_action_set", "frames", f"action id in [0, {limits.n_actions - 1}]",
         e.ExpectColumnValuesToBeBetween(column="action", min_value=0, max_value=limits.n_actions - 1)),
        ("episode_length_at_least_k_plus_1", "episodes", f"every episode has >= K+1 = {k1} latents",
         e.ExpectColumnValuesToBeBetween(column="latents", min_value=k1)),
        ("latent_count_equals_frame_count", "episodes", "latents per episode == frames in the trajectories",
         e.ExpectColumnPairValuesToBeEqual(column_A="latents", column_B="frames")),
        ("no_heldout_episode_in_train", "episodes", "no held-out episode (by id or content) in the train split",
         e.ExpectColumnValuesToBeBetween(column="heldout_in_train", min_value=0, max_value=0)),
    ]


def _plain(value: Any) -> Any:
    """A JSON-safe version of a GX example value (numpy scalars, tuples, non-finite floats)."""
    value = value.item() if hasattr(value, "item") else value
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return str(value)
    return value


def _details(result: Any) -> dict[str, Any]:
    raw = dict(result.result or {})
    keep = ("element_count", "unexpected_count", "unexpected_percent", "partial_unexpected_list", "observed_value",
            "missing_count")
    details = {k: raw[k] for k in keep if k in raw}
    if "partial_unexpected_list" in details:
        details["partial_unexpected_list"] = [
            _plain(v) for v in details["partial_unexpected_list"][:10]
        ]
    exception = (result.exception_info or {}) if hasattr(result, "exception_info") else {}
    if exception.get("raised_exception"):
        details["exception"] = str(exception.get("exception_message"))
    return details


def validate_latents(tables: LatentTables, limits: GateLimits) -> GateReport:
    """Run the GX suite over ``tables``. The report lists every check by name, with counts."""
    logging.getLogger("great_expectations").setLevel(logging.WARNING)  # its import logs a lot at INFO

    logging.getLogger("great_expectations.data_context.types.base").setLevel(logging.WARNING)
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    source = context.data_sources.add_pandas("latent_stats")
    checks: list[dict[str, Any]] = []
    by_table: dict[str, list[tuple[str, str, Any]]] = {}
    for name, table, description, expectation in _expectations(limits):
        by_table.setdefault(table, []).append((name, description, expectation))
    for table, items in by_table.items():
        frame = getattr(tables, table)
        batch_definition = source.add_dataframe_asset(name=table).add_batch_definition_whole_dataframe("all")
        suite = context.suites.add(gx.ExpectationSuite(name=f"latents_{table}"))
        for name, description, expectation in items:
            expectation.meta = {"check": name, "description": description}
            suite.add_expectation(expectation)
        if len(frame) == 0:
            for name, description, _ in items:
                checks.append({"name": name, "table": table, "description": description, "success": False,
                               "expectation": "", "details": {"error": f"the {table} table is empty"}})
            continue
        result = batch_definition.get_batch(batch_parameters={"dataframe": frame}).validate(suite)
        for item in result.results:
            expectation = item.expectation_config
            assert expectation is not None  # a validation result always names its expectation
            meta = expectation.meta or {}
            checks.append({
                "name": meta.get("check", expectation.type),
                "table": table,
                "description": meta.get("description", ""),
                "success": bool(item.success),
                "expectation": expectation.type,
                "details": _details(item),
            })
    order = [name for name, *_ in _expectations(limits)]
    checks.sort(key=lambda c: order.index(c["name"]) if c["name"] in order else len(order))
    summary = {
        "context": limits.context,
        "n_actions": limits.n_actions,
        "counts": {
            "latents": int(len(tables.frames)),
            "episodes": int(len(tables.episodes)),
            "train_episodes": int((tables.episodes["split"] == "train").sum()) if len(tables.episodes) else 0,
            "heldout_episodes": int((tables.episodes["split"] == "heldout").sum()) if len(tables.episodes) else 0,
        },
        "channels": {  # non-finite statistics become null so the report stays strict JSON
            column: [float(v) if np.isfinite(v) else None for v in tables.channels[column]]
            for column in ("mean", "std")
        },
    }
    return GateReport(success=all(c["success"] for c in checks), checks=checks, summary=summary)
