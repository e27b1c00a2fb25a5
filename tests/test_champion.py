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

from tests.fixtures.processes import run

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
    from orchestration.reports import evaluate_report

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


def test_scheduled_retraining_registers_what_its_champion_stage_promoted(micro_pipeline: Path, tmp_path: Path) -> None:
    """The retraining job's experiment runs the champion stage in its temporary copy: a promotion becomes the branch
    retrain/<experiment> and a new GTO version in prod, which `dvc artifacts get` fetches from the cache; a rejection
    moves neither GTO nor the branches. The workspace, its champion and dvc.lock stay as they were throughout."""
    import dagster as dg

    from orchestration.builder import build_definitions

    repo = tmp_path / "repo"
    shutil.copytree(micro_pipeline, repo, symlinks=True)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for criterion in params["evaluation"]["promotion"]["criteria"]:
        criterion["tolerance"] = 1000.0  # any fresh model is "no worse": this run promotes
    # A fresh seed for the student only: the experiment retrains from distilled_model on, and DVC restores the
    # recording, the autoencoder and the teacher from its cache (the default seed param re-records too, minutes
    # longer).
    params["orchestration"]["retraining_seed_param"] = "distilled_model.seed"
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["dvc", "repro", "champion"], repo)  # its promotion params changed: the champion stage runs again
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-q", "-m", "first champion"], repo)
    run([*COMPONENTS, "register"], repo)
    assert prod(repo) == f"{ARTIFACT}@v0.0.1"
    workspace = {"champion": tree(repo / "artifacts/champion"), "lock": (repo / "dvc.lock").read_text()}

    def retrain(name: str) -> tuple[bool, dict]:
        instance = dg.DagsterInstance.ephemeral()
        result = build_definitions(repo).resolve_job_def("retraining_job").execute_in_process(
            instance=instance, run_config={"ops": {"retraining_experiment": {"config": {
                "seed": 7, "experiment_name": name}}}})
        assert result.success
        output = next(e for e in result.all_events if e.event_type_value == "STEP_OUTPUT")
        observed = instance.fetch_observations(dg.AssetKey("champion"), limit=1).records
        assert observed and observed[0].asset_observation.metadata["experiment"].value == name
        return result.output_for_node("retraining_experiment"), {
            k: v.value for k, v in output.step_output_data.metadata.items()}

    promoted, metadata = retrain("retrain-a")
    assert promoted is True and metadata["decision"].startswith("PROMOTED")
    assert metadata["version"] == f"{ARTIFACT}@v0.0.2" and metadata["branch"] == "retrain/retrain-a"
    assert isinstance(metadata["metrics"][f"metrics/evaluation.json:{PSNR}"], float)  # read from the experiment
    assert prod(repo) == f"{ARTIFACT}@v0.0.2"
    branch_commit = run(["git", "rev-parse", "retrain/retrain-a"], repo).stdout.strip()
    assert metadata["experiment commit"] == branch_commit
    assert "DVC experiment retrain-a" in run(["git", "show", "retrain/retrain-a:docs/promotion-log.md"], repo).stdout
    run(["dvc", "artifacts", "get", ".", ARTIFACT, "--stage", "prod", "-o", str(tmp_path / "prod")], repo)
    run(["dvc", "get", ".", "data/onnx_export", "--rev", "retrain/retrain-a", "-o", str(tmp_path / "exp_export")],
        repo)
    assert tree(tmp_path / "prod" / "export") == tree(tmp_path / "exp_export")
    assert tree(tmp_path / "prod" / "export") != workspace["champion"]  # a new seed, a new model

    # A criterion the challenger cannot meet (a metric it does not have): the experiment's champion stage rejects.
    # Its fresh seed goes to the evaluation only, so that the experiment reruns just the last two stages.
    params["evaluation"]["promotion"]["criteria"].append({"metric": "onnx.no_such_metric", "tolerance": 0.0})
    params["orchestration"]["retraining_seed_param"] = "evaluation.seed"
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "commit", "-q", "-am", "a stricter gate"], repo)
    registered_tags = tags(repo)
    promoted, metadata = retrain("retrain-b")
    assert promoted is False and metadata["decision"].startswith("REJECTED") and "no_such_metric" in metadata[
        "decision"]
    assert "version" not in metadata and "branch" not in metadata
    assert prod(repo) == f"{ARTIFACT}@v0.0.2" and tags(repo) == registered_tags
    assert "retrain/retrain-b" not in run(["git", "branch", "--list"], repo).stdout
    assert tree(repo / "artifacts/champion") == workspace["champion"]
    assert (repo / "dvc.lock").read_text() == workspace["lock"]
