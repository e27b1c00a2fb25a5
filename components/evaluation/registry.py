"""Registering the champion with GTO: a committed promotion becomes a version of the ``dvc.yaml`` artifact,
assigned the ``prod`` stage (``python -m components register``; scheduled retraining does the same on its
experiment's commit, ``orchestration/retraining.py``). A GTO version is a git tag on a commit, and
``dvc artifacts get`` reads the champion from that commit's dvc.lock, so only committed champions are registered.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import gto.api
import yaml
from gto.exceptions import ArtifactNotFound

from components.errors import PipelineError

STAGE = "champion"  # the dvc.yaml stage that writes the champion folder
REPORT = "reports/champion.json"  # its decision (an uncached out: committed to git, also in each experiment)
PROD = "prod"


def artifact_entry(root: Path, name: str | None) -> tuple[str, str]:
    """(name, path) of the dvc.yaml artifact: ``name``, or the only one declared."""
    declared: dict[str, Any] = (yaml.safe_load((root / "dvc.yaml").read_text()) or {}).get("artifacts") or {}
    if name is None and len(declared) == 1:
        name = next(iter(declared))
    if name not in declared:
        raise PipelineError(f"dvc.yaml declares artifacts {sorted(declared)}; pass --artifact with one of them")
    return name, str(declared[name]["path"])


def locked_hash(lock_text: str | None, path: str) -> str | None:
    """The md5 that a dvc.lock text records for output ``path`` of the champion stage (None if absent)."""
    stages = ((yaml.safe_load(lock_text) or {}).get("stages") or {}) if lock_text else {}
    outs = (stages.get(STAGE) or {}).get("outs") or []
    return next((out.get("md5") for out in outs if out.get("path") == path), None)


def git(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)


def champion_at(root: Path, rev: str, path: str) -> str | None:
    """The champion's md5 that commit ``rev``'s dvc.lock records (None if it records none)."""
    shown = git(root, "show", f"{rev}:dvc.lock")
    return locked_hash(shown.stdout if shown.returncode == 0 else None, path)


def committed_files(root: Path, objects: list[str]) -> dict[str, str | None]:
    """The text of each ``<rev>:<path>`` in ``objects`` (None where that commit has no such file), read with one
    ``git cat-file --batch``."""
    output = subprocess.run(["git", "cat-file", "--batch"], cwd=root, input="".join(f"{o}\n" for o in objects).encode(),
                            capture_output=True).stdout
    found: dict[str, str | None] = {}
    for name in objects:
        header, _, output = output.partition(b"\n")
        if b" blob " not in header:  # "<name> missing", or not a file
            found[name] = None
            continue
        size = int(header.rsplit(b" ", 1)[1])
        found[name] = output[:size].decode()
        output = output[size + 1:]  # the blob, then a newline
    return found


def champions_at(root: Path, revs: list[str], path: str) -> dict[str, str | None]:
    """:func:`champion_at` for many commits at once."""
    locks = committed_files(root, [f"{rev}:dvc.lock" for rev in revs])
    return {rev: locked_hash(locks[f"{rev}:dvc.lock"], path) for rev in revs}


def check_committed_promotion(root: Path, report_path: Path, path: str) -> tuple[dict[str, Any], str]:
    """The promotion report and the champion's md5, once sure it promoted and that HEAD's dvc.lock records it."""
    if not report_path.is_file():
        raise PipelineError(f"{report_path}: no promotion decision; run `python -m components repro {STAGE}` first")
    report = json.loads(report_path.read_text())
    if not report.get("success"):
        raise PipelineError(f"the last decision was {report.get('summary', 'a rejection')}; the champion did not "
                            "change, so there is nothing to register")
    workspace = locked_hash((root / "dvc.lock").read_text() if (root / "dvc.lock").is_file() else None, path)
    if workspace is None:
        raise PipelineError(f"dvc.lock records no {path} for stage {STAGE!r}; run `python -m components repro "
                            f"{STAGE}` first")
    if champion_at(root, "HEAD", path) != workspace:
        raise PipelineError("the promotion is not committed: GTO versions a commit, and that commit's dvc.lock must "
                            "record this champion. Commit it first: git add dvc.lock docs/promotion-log.md "
                            "docs/promotion-log.jsonl && git commit -m 'promote'")
    return report, workspace


def registered_versions(root: Path, name: str) -> list[dict[str, Any]]:
    """GTO's versions of ``name`` (none before the first registration)."""

    try:
        return gto.api.show(root, name)
    except ArtifactNotFound:
        return []


def register_champion(root: Path, rev: str, report: dict[str, Any], name: str, path: str) -> tuple[str, str]:
    """(version, commit): the champion that commit ``rev`` records, registered as a GTO version of ``name`` once
    (a champion registered before keeps its version) and assigned ``prod`` unless it already is."""

    champion = champion_at(root, rev, path)
    if champion is None:
        raise PipelineError(f"commit {rev} records no {path} in dvc.lock; nothing to register")
    message = f"{report.get('summary', 'PROMOTED')} (source: {report.get('source') or 'unknown'})"
    versions = registered_versions(root, name)
    recorded = champions_at(root, [v["commit_hexsha"] for v in versions], path)
    existing = next((v for v in versions if recorded[v["commit_hexsha"]] == champion), None)
    if existing is None:
        version = gto.api.register(root, name, rev, message=message).version
    else:  # this champion was registered before (a second run, or one cut short before the assignment)
        version = existing["version"]
    if existing is None or PROD not in [s.get("stage") for s in existing.get("stages") or []]:
        gto.api.assign(root, name, PROD, version=version, message=message)
    commit = existing["commit_hexsha"] if existing else git(root, "rev-parse", rev).stdout.strip()
    return version, commit
