"""The champion as a DVC stage (= Dagster asset with a blocking check) and a GTO-registered model, on the micro
pipeline: promoted, registered once per committed champion, and a rejection that moves neither the champion nor
GTO's `prod` stage."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import yaml

from tests.conftest import run

COMPONENTS = [sys.executable, "-m", "components"]
ARTIFACT = "doom-world-model"
PSNR = "onnx.teacher_forced.psnr.model.pooled"


def tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def tags(repo: Path) -> list[str]:
    return sorted(run(["git", "tag"], repo).stdout.split())


def prod(repo: Path) -> str:
    return run([str(Path(sys.executable).parent / "gto"), "show", f"{ARTIFACT}#prod", "--ref"], repo).stdout.strip()


def test_the_champion_stage_promotes_registers_once_and_a_rejection_moves_nothing(
        micro_pipeline: Path, tmp_path: Path) -> None:
    from orchestration.builder import build_definitions
    from orchestration.checks import evaluate_report

    repo = tmp_path / "repo"
    shutil.copytree(micro_pipeline, repo, symlinks=True)
    report = json.loads((repo / "reports/champion.json").read_text())
    assert report["success"] is True and report["summary"] == "PROMOTED: first champion"
    assert tree(repo / "artifacts/champion/export") == tree(repo / "data/onnx_export")
    defs = build_definitions(repo)
    check = next(c for c in defs.asset_checks if any(s.name == "champion" for s in c.check_specs))
    assert [s.asset_key.to_user_string() for s in check.check_specs] == ["champion"]
    assert all(s.blocking for s in check.check_specs)

    uncommitted = run([*COMPONENTS, "register"], repo, check=False)
    assert uncommitted.returncode == 2 and "not committed" in uncommitted.stderr
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-q", "-m", "promote"], repo)
    registered = run([*COMPONENTS, "register"], repo)
    assert f"{ARTIFACT}@v0.0.1" in registered.stdout and "PROMOTED: first champion" in registered.stdout
    assert prod(repo) == f"{ARTIFACT}@v0.0.1"
    run(["dvc", "artifacts", "get", ".", ARTIFACT, "--stage", "prod", "-o", str(tmp_path / "shipped")], repo)
    assert tree(tmp_path / "shipped" / "export") == tree(repo / "data/onnx_export")
    registered_tags = tags(repo)
    run([*COMPONENTS, "register"], repo)  # the same champion again: no new version
    assert tags(repo) == registered_tags

    # A champion that scored 5 dB better (its stored metrics, not re-evaluated) beats the same challenger.
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["evaluation"]["promotion"]["reevaluate_champion"] = False
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    stored = json.loads((repo / "artifacts/champion/metrics.json").read_text())
    stored["onnx"]["teacher_forced"]["psnr"]["model"]["pooled"] += 5.0
    (repo / "artifacts/champion/metrics.json").write_text(json.dumps(stored))
    champion_before = tree(repo / "artifacts/champion")
    run([*COMPONENTS, "repro", "champion"], repo)
    rejected = json.loads((repo / "reports/champion.json").read_text())
    assert rejected["success"] is False and rejected["summary"].startswith(f"REJECTED: worse on {PSNR}")
    assert [c["success"] for c in rejected["checks"] if c["name"] == PSNR] == [False]
    result = evaluate_report(repo / "reports/champion.json")
    assert not result.passed and result.description.startswith("REJECTED") and PSNR in result.description
    assert tree(repo / "artifacts/champion") == champion_before
    refused = run([*COMPONENTS, "register"], repo, check=False)
    assert refused.returncode == 2 and "nothing to register" in refused.stderr
    assert tags(repo) == registered_tags and prod(repo) == f"{ARTIFACT}@v0.0.1"
    log = (repo / "docs/promotion-log.md").read_text()
    assert log.count("PROMOTED") == 1 and log.count("REJECTED") == 1
