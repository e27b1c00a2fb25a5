"""The promotion hook of scheduled retraining: decide whether a finished DVC experiment replaces the workspace.

``scheduled_retraining`` runs the pipeline as a DVC experiment in a temporary copy (``dvc exp run --temp``),
so the workspace and its models stay as they are. It then calls ``promote(candidate, log)``.

The gate (components/promotion.py) promotes the experiment's ONNX export to the champion folder when its
held-out metrics are no worse within tolerance; the workspace itself is never changed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Candidate:
    """A finished retraining experiment."""

    project_dir: Path
    name: str  # DVC experiment name (`dvc exp show`, `dvc exp apply <name>`)
    seed: int
    seed_param: str
    metrics: dict[str, Any] = field(default_factory=dict)  # "<file>:<key>" -> value, from `dvc exp show`


def promote(candidate: Candidate, log: Any) -> bool:
    """Promote ``candidate``'s export to champion when it is no worse on held-out play, else reject it.

    The gate is ``components.promotion.promote_experiment`` (README "Champion and challenger"): it scores the
    champion again on the experiment's held-out episodes, compares with the experiment's
    ``metrics/evaluation.json``, installs the export in ``artifacts/champion`` or leaves the champion untouched,
    and appends both metric sets to ``docs/promotion-log.md``. The decision and both metric sets are added to
    ``candidate.metrics`` (under ``promotion:``), which the retraining op records as Dagster metadata.
    """
    import yaml

    from components.promotion import promote_experiment

    stages = (yaml.safe_load((Path(candidate.project_dir) / "dvc.yaml").read_text()) or {}).get("stages", {})
    if "evaluation" not in stages:  # a project without the evaluation stage has no gate to run
        log.info(f"experiment {candidate.name!r} kept as a DVC experiment; this project has no `evaluation` stage, "
                 f"so there is nothing to promote (by hand: dvc exp apply {candidate.name})")
        return False
    decision = promote_experiment(candidate.project_dir, candidate.name,
                                  source=f"DVC experiment {candidate.name} (seed {candidate.seed})")
    candidate.metrics.update({f"promotion:{key}": value for key, value in decision.metadata().items()})
    candidate.metrics["promotion:champion_metrics"] = decision.champion_metrics
    candidate.metrics["promotion:challenger_metrics"] = decision.challenger_metrics
    log.info(f"experiment {candidate.name!r}: {'PROMOTED' if decision.promoted else 'REJECTED'} ({decision.reason})")
    return decision.promoted
