"""Champion and challenger: a new export replaces the shipped one only when it is no worse on held-out play.

The *champion* is the export that ships, kept in a fixed folder (``evaluation.promotion.champion_dir``,
default ``artifacts/champion``)::

    artifacts/champion/
      export/          a byte-for-byte copy of the promoted data/onnx_export (encoder, world model, decoder, ...)
      metrics.json     the held-out metrics it was promoted with (metrics/evaluation.json of its run)
      champion.json    who it is: source (experiment / commit), promotion time, sha256 of every export file

A *challenger* (a fresh ``data/onnx_export`` with its ``metrics/evaluation.json``) is compared criterion by
criterion (``evaluation.promotion.criteria``: a dotted metric path, higher or lower is better, a tolerance).
It is promoted when every criterion is no worse than the champion's value within its tolerance; a challenger
exactly equal to the champion is therefore promoted. The first challenger, with no champion yet, is promoted.
A rejected challenger leaves the champion folder untouched, byte for byte; a promoted one replaces it whole
with one atomic rename. Every decision, with both metric sets, is appended to the promotion log
(``docs/promotion-log.md`` for people, ``docs/promotion-log.jsonl`` for programs).

No dagster here: the DVC stage ``champion`` runs ``python -m components promote --report``, whose
:meth:`Decision.report` is the Dagster check ``champion``; scheduled retraining reads the same report from its
experiment's commit (``orchestration/retraining.py``).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from components.atomic import atomic_directory, atomic_write_json, atomic_write_text, file_sha256
from components.data.trajectory_store import TrajectoryStore
from components.data.windows import common_episodes, heldout_episodes
from components.errors import PipelineError
from components.evaluation import scoring

if TYPE_CHECKING:
    from components.params import Params, PromotionParams


log = logging.getLogger(__name__)

EXPORT_SUBDIR = "export"
METRICS_FILE = "metrics.json"
CHAMPION_FILE = "champion.json"


class PromotionError(PipelineError):
    """The challenger or champion cannot be compared or copied (missing files, unreadable metrics)."""


@dataclass(frozen=True)
class Criterion:
    """One metric the challenger must not lose on: ``metric`` is a dotted path into metrics.json."""

    metric: str
    tolerance: float = 0.0
    higher_is_better: bool = True


@dataclass
class Comparison:
    metric: str
    champion: float | None
    challenger: float | None
    delta: float | None  # challenger - champion, signed so that positive is better
    tolerance: float
    passed: bool
    note: str = ""


@dataclass
class Decision:
    """The outcome of one champion/challenger comparison."""

    promoted: bool
    reason: str
    comparisons: list[Comparison] = field(default_factory=list)
    champion_metrics: dict[str, Any] | None = None
    challenger_metrics: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    decided_at: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def report(self) -> dict[str, Any]:
        """The decision as a check report (orchestration/checks.py): ``success`` is promoted, one check per
        criterion, and the verdict with the criterion that decided it in ``summary``."""
        verdict = "PROMOTED" if self.promoted else "REJECTED"
        return {
            "success": self.promoted,
            "summary": f"{verdict}: {self.reason}",
            "source": self.source,
            "decided_at": self.decided_at,
            "checks": [{"name": c.metric, "success": c.passed, "champion": c.champion, "challenger": c.challenger,
                        "delta": c.delta, "tolerance": c.tolerance, "note": c.note} for c in self.comparisons],
        }


def metric_value(metrics: Mapping[str, Any], path: str) -> float | None:
    """The number at dotted ``path`` (``onnx.teacher_forced.psnr.model.pooled``), or None if absent."""
    node: Any = metrics
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    if isinstance(node, bool) or not isinstance(node, (int, float)):
        return None
    return float(node)


def decide(
    challenger: Mapping[str, Any], champion: Mapping[str, Any] | None, criteria: Sequence[Criterion]
) -> Decision:
    """Compare metric sets. Promote when there is no champion, or when no criterion is worse by more than its
    tolerance. A challenger missing a criterion's metric (or with NaN) is rejected; a champion missing one (an
    older metrics layout) cannot be compared on it, and that criterion is noted and passed."""
    if not criteria:
        raise PromotionError("evaluation.promotion.criteria is empty: give at least one metric to compare")
    comparisons: list[Comparison] = []
    for criterion in criteria:
        new = metric_value(challenger, criterion.metric)
        old = metric_value(champion, criterion.metric) if champion is not None else None
        if new is None or math.isnan(new):
            comparisons.append(Comparison(criterion.metric, old, new, None, criterion.tolerance, False,
                                          "challenger has no value"))
            continue
        if old is None or math.isnan(old):
            note = "no champion yet" if champion is None else "champion has no value; not compared"
            comparisons.append(Comparison(criterion.metric, old, new, None, criterion.tolerance, True, note))
            continue
        delta = (new - old) if criterion.higher_is_better else (old - new)
        passed = delta >= -criterion.tolerance
        comparisons.append(Comparison(criterion.metric, old, new, delta, criterion.tolerance, passed))
    failed = [c for c in comparisons if not c.passed]
    if champion is None:
        promoted = not failed
        reason = "first champion" if promoted else "no champion yet, but the challenger lacks metrics"
    else:
        promoted = not failed
        reason = "no worse within tolerance on every criterion" if promoted else "worse on " + ", ".join(
            f"{c.metric} ({_fmt(c.delta)} < -{c.tolerance})" if c.delta is not None else f"{c.metric} ({c.note})"
            for c in failed
        )
    return Decision(promoted, reason, comparisons, dict(champion) if champion is not None else None,
                    dict(challenger))


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.3f}"


# --------------------------------------------------------------------------- the champion folder


def read_champion(champion_dir: str | Path) -> dict[str, Any] | None:
    """The champion's metrics, or None when there is no champion yet."""
    path = Path(champion_dir) / METRICS_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PromotionError(f"{path}: unreadable champion metrics ({error}); restore it from the promotion log "
                             "or remove the champion folder to start over") from None


def file_hashes(folder: str | Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (relative path -> hex digest), sorted."""
    folder = Path(folder)
    hashes = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        hashes[str(path.relative_to(folder))] = file_sha256(path)
    return hashes


def install_champion(export_dir: Path, metrics: Mapping[str, Any], champion_dir: Path, info: dict[str, Any]) -> None:
    """Replace the champion folder whole (atomic rename) with a copy of ``export_dir`` and its metrics."""
    with atomic_directory(champion_dir) as staging:
        shutil.copytree(export_dir, staging / EXPORT_SUBDIR)
        atomic_write_json(staging / METRICS_FILE, dict(metrics))
        atomic_write_json(staging / CHAMPION_FILE, {**info, "files": file_hashes(staging / EXPORT_SUBDIR)})


def promote(
    export_dir: str | Path,
    challenger_metrics: Mapping[str, Any],
    champion_dir: str | Path,
    criteria: Sequence[Criterion],
    log_path: str | Path | None,
    source: str = "",
    champion_metrics: Mapping[str, Any] | None = None,
) -> Decision:
    """Decide, then install the challenger as champion if it wins, and log the decision either way.

    ``champion_metrics`` overrides the champion's stored metrics, e.g. with the champion re-evaluated on the
    challenger's held-out episodes so that both are measured on the same play (see the ``promote`` command).
    """
    export_dir, champion_dir = Path(export_dir), Path(champion_dir)
    if not export_dir.is_dir() or not any(export_dir.iterdir()):
        raise PromotionError(f"{export_dir}: no challenger export here; run `dvc repro onnx_export` first")
    stored = read_champion(champion_dir)
    champion = champion_metrics if champion_metrics is not None else stored
    decision = decide(challenger_metrics, champion, criteria)
    decision.source = source
    decision.decided_at = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    if decision.promoted:
        info = {"source": source, "promoted_at": decision.decided_at, "reason": decision.reason}
        install_champion(export_dir, challenger_metrics, champion_dir, info)
        log.info("promoted %s to champion (%s)", source or export_dir, decision.reason)
    else:
        log.info("rejected challenger %s: %s; champion unchanged", source or export_dir, decision.reason)
    if log_path is not None:
        append_log(Path(log_path), decision)
    return decision


# --------------------------------------------------------------------------- the promotion log

_LOG_HEADER = """# Promotion log

Every champion/challenger decision (`python -m components promote`, also run by the `scheduled_retraining`
Dagster job). Deltas are challenger minus champion, signed so that positive is better; PSNR in dB.
The full metric sets of both sides are in `promotion-log.jsonl` beside this file.
"""


def append_log(path: Path, decision: Decision) -> None:
    """Append the decision to ``path`` (markdown) and to the ``.jsonl`` beside it (full record)."""
    verdict = "PROMOTED" if decision.promoted else "REJECTED"
    lines = [f"\n## {decision.decided_at} {verdict}: {decision.source or 'challenger'}", "",
             f"{decision.reason}.", "",
             "| metric | champion | challenger | delta | tolerance | ok |", "| --- | --- | --- | --- | --- | --- |"]
    for c in decision.comparisons:
        champ = "n/a" if c.champion is None else f"{c.champion:.3f}"
        chall = "n/a" if c.challenger is None else f"{c.challenger:.3f}"
        note = f" ({c.note})" if c.note else ""
        lines.append(f"| `{c.metric}` | {champ} | {chall} | {_fmt(c.delta)} | {c.tolerance:g} | "
                     f"{'yes' if c.passed else 'no'}{note} |")
    text = path.read_text() if path.is_file() else _LOG_HEADER
    atomic_write_text(path, text + "\n".join(lines) + "\n")
    jsonl = path.with_suffix(".jsonl")
    previous = jsonl.read_text() if jsonl.is_file() else ""
    atomic_write_text(jsonl, previous + json.dumps(decision.to_dict(), sort_keys=True, default=str) + "\n")


# --------------------------------------------------------------------------- the whole step


def criteria_from_params(settings: PromotionParams) -> list[Criterion]:
    """``params.evaluation.promotion.criteria`` as ``Criterion`` objects."""
    return [Criterion(c.metric, c.tolerance, c.higher_is_better) for c in settings.criteria]


def reevaluate_champion(params: Params, champion_dir: Path, raw_root: Path,
                        latents_root: Path | None) -> dict[str, Any]:
    """Score the champion's export on the current held-out episodes, with the same windows and settings the
    challenger's evaluation used (ONNX only: the teacher is not part of what ships)."""

    settings = params.evaluation
    raw = TrajectoryStore(raw_root)
    episodes = heldout_episodes(raw, settings.episodes)
    if settings.teacher and latents_root is not None and latents_root.exists():
        episodes = common_episodes(episodes, TrajectoryStore(latents_root))
    model, manifest = scoring.onnx_model(champion_dir / EXPORT_SUBDIR, threads=settings.threads)
    motion = scoring.measure_view_motion(raw, params.environment, settings)
    metrics, _ = scoring.evaluate_model(model, int(manifest["K"]), raw, None, episodes, settings,
                                        params.environment.actions, motion)
    return {"onnx": metrics, "reevaluated_on": "challenger's held-out episodes"}


def promote_challenger(
    params: Params,
    export_dir: str | Path,
    metrics_path: str | Path,
    raw_root: str | Path,
    latents_root: str | Path | None,
    source: str = "",
    reevaluate: bool | None = None,
    root: str | Path = ".",
) -> Decision:
    """The promotion step (``python -m components promote``, the ``champion`` stage).

    Reads the challenger's ``metrics/evaluation.json``; when ``evaluation.promotion.reevaluate_champion`` (or
    ``reevaluate``) is on and a champion exists, scores the champion again on the challenger's held-out
    episodes so both are measured on the same play; then :func:`promote`. The champion folder and the log
    (``evaluation.promotion``) are relative to ``root``, the repository root; the other paths are as given.
    """
    settings = params.evaluation.promotion
    metrics_path = Path(metrics_path)
    if not metrics_path.is_file():
        raise PromotionError(f"{metrics_path}: no challenger metrics; run `dvc repro evaluation` first")
    challenger = json.loads(metrics_path.read_text())
    champion_dir = Path(root) / settings.champion_dir
    champion_metrics = None
    if (settings.reevaluate_champion if reevaluate is None else reevaluate) and read_champion(champion_dir):
        log.info("re-evaluating the champion on the challenger's held-out episodes")
        champion_metrics = reevaluate_champion(params, champion_dir, Path(raw_root),
                                               Path(latents_root) if latents_root else None)
    return promote(export_dir, challenger, champion_dir, criteria_from_params(settings), Path(root) / settings.log,
                   source=source, champion_metrics=champion_metrics)
