"""What scheduled retraining does after its DVC experiment: read the experiment's own champion decision.

``retraining_job`` runs the whole pipeline as ``dvc exp run --temp``, in a temporary copy, so its last stage,
``champion``, compares the fresh export with the committed champion there and writes ``reports/champion.json``
(an uncached out, so it is part of the experiment's commit). The workspace is never touched. Then:

* **promoted**: the experiment becomes the branch ``retrain/<experiment>`` (``dvc exp branch``) and its commit a
  GTO version of the ``dvc.yaml`` artifact, assigned ``prod`` (``components.stages.register``), so
  ``gto show`` and ``dvc artifacts get . <artifact> --stage prod`` name and fetch the new champion, whose files the
  experiment already left in the DVC cache;
* **rejected**: the experiment stays a DVC experiment (``dvc exp show`` lists it); GTO and the branches do not
  move;
* a project without a ``champion`` stage keeps the experiment and promotes nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from components.errors import PipelineError
from components.stages.register import (
    PROD,
    REPORT,
    STAGE,
    artifact_entry,
    committed_files,
    git,
    register_champion,
)
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


def has_champion_stage(root: Path) -> bool:
    return STAGE in ((yaml.safe_load((root / "dvc.yaml").read_text()) or {}).get("stages") or {})


def read_decision(root: Path, commit: str) -> dict[str, Any]:
    """``reports/champion.json`` as the experiment's commit holds it."""
    shown = git(root, "show", f"{commit}:{REPORT}")
    try:
        return json.loads(shown.stdout)
    except ValueError:
        raise PipelineError(f"the experiment's commit {commit[:8]} has no readable {REPORT}; did its {STAGE!r} "
                           f"stage run? {shown.stderr.strip()}") from None


def settle(root: Path, name: str, commit: str, branch_experiment: Callable[[str, str], Any]) -> Outcome:
    """Read experiment ``name``'s champion decision from its ``commit``; when it promoted,
    ``branch_experiment(name, branch)`` makes the branch (``dvc exp branch``) and the commit is registered and
    assigned ``prod``."""
    decision = read_decision(root, commit)
    summary = str(decision.get("summary") or ("PROMOTED" if decision.get("success") else "REJECTED"))
    if not decision.get("success"):
        return Outcome(name, commit, False, summary)
    branch = BRANCH_PREFIX + name
    branch_experiment(name, branch)
    artifact, path = artifact_entry(root, None)
    version, _ = register_champion(root, commit, decision, artifact, path)
    return Outcome(name, commit, True, summary, branch, f"{artifact}@{version}")
