"""What scheduled retraining does after its DVC experiment: read the experiment's own champion decision.

The *champion stage* is read from dvc.yaml, not named in code: the stage whose outs hold the path of the
``artifacts:`` entry (what GTO versions), and its decision is that stage's one report (``reports/*.json``, an
uncached out, so it is part of the experiment's commit). ``retraining_job`` runs the whole pipeline as
``dvc exp run --temp``, in a temporary copy, so the champion stage compares the fresh export with the committed
champion there. The workspace is never touched. Then:

* **promoted**: the experiment becomes the branch ``retrain/<experiment>`` (``dvc exp branch``) and its commit a
  GTO version of the ``dvc.yaml`` artifact, assigned ``prod`` (``components.evaluation.registry``), so
  ``gto show`` and ``dvc artifacts get . <artifact> --stage prod`` name and fetch the new champion, whose files the
  experiment already left in the DVC cache;
* **rejected**: the experiment stays a DVC experiment (``dvc exp show`` lists it); GTO and the branches do not
  move;
* a project without a champion stage (no artifact, or no stage writes it) keeps the experiment and promotes
  nothing.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from components.errors import PipelineError
from components.evaluation.registry import PROD, artifact_entry, committed_files, git, register_champion
from orchestration.dvc_graph import load_pipeline
from orchestration.metadata import read_metrics

BRANCH_PREFIX = "retrain/"


@dataclass(frozen=True)
class Outcome:
    """The champion decision of one retraining experiment and what it registered."""

    experiment: str
    commit: str
    promoted: bool
    summary: str
    branch: str | None = None
    version: str | None = None

    def metadata(self) -> dict[str, Any]:
        return {key: value for key, value in {
            "promoted": self.promoted, "decision": self.summary, "experiment commit": self.commit,
            "branch": self.branch, "version": self.version, "stage": PROD if self.version else None,
        }.items() if value is not None}


def experiment_commit(root: Path, name: str) -> str:
    """The commit of DVC experiment ``name`` (its ref is ``refs/exps/<baseline>/<name>``)."""
    for line in git(root, "for-each-ref", "--format=%(objectname) %(refname)", "refs/exps").stdout.splitlines():
        commit, ref = line.split(" ", 1)
        if ref.rsplit("/", 1)[-1] == name:
            return commit
    raise PipelineError(f"no DVC experiment named {name!r} (dvc exp show lists them)")


def experiment_metrics(root: Path, commit: str) -> dict[str, Any]:
    """The metrics files of every stage (dvc.yaml's ``metrics``) as the experiment's commit holds them, flattened
    to ``{"<file>:<dotted.key>": value}``."""
    files = [m for group in load_pipeline(root).groups.values() for item in group.items.values() for m in item.metrics]
    texts = committed_files(root, [f"{commit}:{relpath}" for relpath in files])
    return read_metrics(root, files, lambda relpath: texts[f"{commit}:{relpath}"])


@dataclass(frozen=True)
class ChampionStage:
    """The dvc.yaml stage that writes the registered artifact, and the decision report it writes beside it."""

    name: str  # the stage (= its asset key)
    report: str  # its decision: {"success": promoted, "summary": ...}


def champion_stage(root: Path) -> ChampionStage | None:
    """The stage whose outs hold dvc.yaml's artifact path, and its report; None when there is no artifact or no
    stage writes it (nothing to promote)."""
    declared = (yaml.safe_load((root / "dvc.yaml").read_text()) or {}).get("artifacts") or {}
    if not declared:
        return None
    _, path = artifact_entry(root, None)
    for group in load_pipeline(root).groups.values():
        for item in group.items.values():
            if path not in item.outs:
                continue
            if len(item.reports) != 1:
                raise PipelineError(f"stage {item.address!r} writes the artifact {path} but has reports "
                                    f"{list(item.reports)}: its decision must be its one reports/*.json out")
            return ChampionStage(group.name, item.reports[0])
    return None


def read_decision(root: Path, commit: str, stage: ChampionStage) -> dict[str, Any]:
    """The champion stage's report as the experiment's commit holds it."""
    shown = git(root, "show", f"{commit}:{stage.report}")
    try:
        return json.loads(shown.stdout)
    except ValueError:
        raise PipelineError(f"the experiment's commit {commit[:8]} has no readable {stage.report}; did its "
                            f"{stage.name!r} stage run? {shown.stderr.strip()}") from None


def settle(root: Path, stage: ChampionStage, name: str, commit: str,
           branch_experiment: Callable[[str, str], Any]) -> Outcome:
    """Read experiment ``name``'s champion decision (``stage``'s report) from its ``commit``; when it promoted,
    ``branch_experiment(name, branch)`` makes the branch (``dvc exp branch``) and the commit is registered and
    assigned ``prod``."""
    decision = read_decision(root, commit, stage)
    summary = str(decision.get("summary") or ("PROMOTED" if decision.get("success") else "REJECTED"))
    if not decision.get("success"):
        return Outcome(name, commit, False, summary)
    branch = BRANCH_PREFIX + name
    branch_experiment(name, branch)
    artifact, path = artifact_entry(root, None)
    version, _ = register_champion(root, commit, decision, artifact, path)
    return Outcome(name, commit, True, summary, branch, f"{artifact}@{version}")
