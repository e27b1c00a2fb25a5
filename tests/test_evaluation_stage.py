"""The ``evaluation`` stage and the ``promote`` command on a real (tiny, untrained) ONNX export.

The export is the session's ``tiny_export`` (the real ``distilled_model`` and ``onnx_export`` stages on tiny
upstream artifacts, tests/fixtures/export.py), copied; the evaluation runs through the CLI as ``dvc repro`` runs it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from components.data.trajectory_store import ShardWriter, TrajectoryStore
from components.data.windows import HeldOutError, heldout_episodes, pick_windows
from components.params import EvaluationParams
from tests.fixtures.export import build_tiny_export, write_export_params
from tests.fixtures.processes import REPO_ROOT, cli_in

ROLLOUTS = [4, 8]
LONG_PLAY = 6


def set_evaluation(root: Path, **values: object) -> None:
    path = root / "params.yaml"
    raw = yaml.safe_load(path.read_text())
    raw["evaluation"] = {**raw.get("evaluation", {}), **values}
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


def tiny_store(root: Path) -> Path:
    writer = ShardWriter(root / "raw" / "shard-0", "frames")
    for index, split in enumerate(["train", "heldout", "train"]):
        writer.add_episode({"frames": np.full((6, 24, 32, 3), index, np.uint8), "actions": np.zeros(6, np.int64)},
                           split, episode_id=f"ep{index}")
    writer.close()
    return root / "raw"


# --------------------------------------------------------------------------- refusing training play


def test_heldout_selection_refuses_training_episodes(tmp_path: Path) -> None:
    store = TrajectoryStore(tiny_store(tmp_path))
    assert [e.episode_id for e in heldout_episodes(store)] == ["ep1"]
    assert [e.episode_id for e in heldout_episodes(store, ["ep1"])] == ["ep1"]
    with pytest.raises(HeldOutError, match=r"not held out: ep0 \(split 'train'\)"):
        heldout_episodes(store, ["ep1", "ep0"])
    with pytest.raises(HeldOutError, match="no such episodes"):
        heldout_episodes(store, ["nope"])
    with pytest.raises(HeldOutError, match="not held out"):
        pick_windows(store.split("train"), 3, 4, 0)


def evaluation_args(root: Path, raw: Path, export: Path) -> list[str]:
    """The evaluation stage's command line, as dvc.yaml writes it, on the folders under ``root``."""
    data = root / "data"
    return ["evaluation", "--export", str(export), "--teacher", str(data / "diffusion_checkpoint"),
            "--autoencoder", str(data / "finetuned_vae"), "--latents", str(data / "validated_latents"),
            "--trajectories", str(raw), "--metrics", str(root / "metrics/evaluation.json"),
            "--plots", str(root / "plots/evaluation")]


def set_small_evaluation(root: Path, **values: object) -> None:
    """Evaluation settings that fit the tiny export's two held-out episodes, plus ``values``."""
    set_evaluation(root, windows=8, rollout_lengths=ROLLOUTS, rollout_windows=2, batch_size=4, sample_windows=2,
                   turn_contexts=3, turn_test_rows=2, long_play_steps=LONG_PLAY, long_play_contexts=2, long_play_rows=2,
                   **values)


def test_stage_refuses_a_training_episode(tmp_path: Path) -> None:
    write_export_params(tmp_path)
    raw = tiny_store(tmp_path)
    set_evaluation(tmp_path, episodes=["ep0"])
    result = cli_in(tmp_path, *evaluation_args(tmp_path, raw, tmp_path / "missing"), check=False)
    assert result.returncode == 2
    assert "refusing to evaluate on episodes that are not held out: ep0 (split 'train')" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "metrics" / "evaluation.json").exists()


def test_stage_fails_clearly_without_heldout_episodes(tmp_path: Path) -> None:
    write_export_params(tmp_path)
    writer = ShardWriter(tmp_path / "raw" / "shard-0", "frames")
    writer.add_episode({"frames": np.zeros((6, 24, 32, 3), np.uint8), "actions": np.zeros(6, np.int64)}, "train")
    writer.close()
    result = cli_in(tmp_path, *evaluation_args(tmp_path, tmp_path / "raw", tmp_path / "missing"), check=False)
    assert result.returncode == 2 and "no held-out episodes" in result.stderr


# --------------------------------------------------------------------------- the real stage on a tiny export


@pytest.fixture(scope="module")
def evaluated(tiny_export: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("evaluation") / "root"
    shutil.copytree(tiny_export, root, symlinks=True)  # the session's export: the tests here write beside it
    set_small_evaluation(root, promotion={
        "champion_dir": str(root / "champion"), "log": str(root / "docs/promotion-log.md"),
        "criteria": [{"metric": "onnx.teacher_forced.psnr.model.pooled", "tolerance": 0.1},
                     {"metric": "onnx.rollout.8.mean_psnr_over_steps.model", "tolerance": 0.2}]})
    data = root / "data"
    cli_in(root, *evaluation_args(root, data / "raw_trajectories", data / "onnx_export"))
    return root


def test_stage_writes_metrics_for_export_and_teacher(evaluated: Path) -> None:
    metrics = json.loads((evaluated / "metrics/evaluation.json").read_text())
    assert metrics["heldout_episodes"] == 2  # only the two held-out episodes of the fixture
    for model in ("onnx", "teacher"):
        tf = metrics[model]["teacher_forced"]
        assert tf["windows"] == 8
        for name in ("model", "copy_last_frame", "copy_last_latent", "autoencoder_ceiling"):
            assert set(tf["psnr"][name]) == {"pooled", "mean", "median", "count"}
            assert 0.0 < tf["psnr"][name]["pooled"] <= 50.0
            assert -1.0 <= tf["ssim"][name] <= 1.0
        assert set(tf["win_share"]["copy_last_latent"]) == {"all", "turning", "moving", "static"}
        assert tf["margin_db"]["copy_last_latent"]["pooled"] == pytest.approx(
            tf["psnr"]["model"]["pooled"] - tf["psnr"]["copy_last_latent"]["pooled"])
        assert "all" in tf["controllability"]
        assert sum(row["windows"] for row in tf["by_action"].values()) == 8  # each window under its last action
        assert sum(row["error_share"] for row in tf["by_action"].values()) == pytest.approx(1.0)
        assert sorted(metrics[model]["rollout"], key=int) == [str(n) for n in ROLLOUTS]
        for steps in ROLLOUTS:
            curve = metrics[model]["rollout"][str(steps)]["psnr_by_step"]
            assert all(len(view) == steps for c in curve.values() for view in c.values())
    # the autoencoder ceiling is the same decoder on the same latents: ONNX and PyTorch agree closely
    assert metrics["onnx"]["teacher_forced"]["psnr"]["autoencoder_ceiling"]["pooled"] == pytest.approx(
        metrics["teacher"]["teacher_forced"]["psnr"]["autoencoder_ceiling"]["pooled"], abs=0.1)
    assert "not set" in metrics["lpips"]["skipped"] and "not set" in metrics["fvd"]["skipped"]
    headline = metrics["headline"]
    assert headline["onnx/psnr_pooled"] == metrics["onnx"]["teacher_forced"]["psnr"]["model"]["pooled"]
    assert {"teacher/psnr_mean", "onnx/rollout8_crosses_copy_last_latent_at", "baseline/copy_last_latent_psnr_pooled",
            "onnx/controllability_turning"} <= set(headline)


def test_stage_draws_plot_and_sample_video(evaluated: Path) -> None:
    plots = evaluated / "plots/evaluation"
    for name in ("psnr_by_step.png", "sharpness_by_step.png"):
        with Image.open(plots / name) as png:
            assert png.format == "PNG" and png.size == (720, 440)
    with Image.open(plots / "sample.gif") as gif:
        assert gif.format == "GIF" and gif.n_frames == max(ROLLOUTS)
    rows = json.loads((plots / "psnr_by_step.json").read_text())
    assert [r["step"] for r in rows] == list(range(1, max(ROLLOUTS) + 1))
    assert {"onnx", "teacher", "copy_last_frame", "copy_last_latent", "shift_last_frame"} <= set(rows[0])


def test_stage_measures_sharpness_the_controllable_baseline_and_the_turn_response(evaluated: Path) -> None:
    metrics = json.loads((evaluated / "metrics/evaluation.json").read_text())
    assert set(metrics["view_motion"]["displacement_px"]) == {a["name"] for a in yaml.safe_load(
        (evaluated / "params.yaml").read_text())["environment"]["actions"]}
    for model in ("onnx", "teacher"):
        tf = metrics[model]["teacher_forced"]
        assert {"model", "copy_last_frame", "copy_last_latent", "shift_last_frame", "autoencoder_ceiling"} <= set(
            tf["sharpness"])
        assert tf["sharpness"]["copy_last_frame"] > 0
        assert "shift_last_frame" in tf["margin_db"] and "turning" in tf["baseline_controllability"]["shift_last_frame"]
        for steps in ROLLOUTS:
            rollout = metrics[model]["rollout"][str(steps)]
            assert len(rollout["sharpness_by_step"]["model"]) == steps
            assert set(rollout["sharpness_by_step"]) == {"model", "copy_last_frame", "copy_last_latent",
                                                        "shift_last_frame"}
            assert rollout["sharpness_at_step"]["1"] == rollout["sharpness_by_step"]["model"][0]
        response = metrics[model]["turn_response"]
        assert response["steps"] == 4 and response["contexts"] >= 1
        for turn in ("turn_left", "turn_right"):
            assert 0.0 <= response[turn]["right_sign_share"] <= 1.0
            assert np.isfinite(response[turn]["model_mean_px"])
    with Image.open(evaluated / "plots/evaluation/turn_test.png") as png:
        # 2 held-out contexts x (4 held actions + the recorded frames), context frame + 8 steps each
        assert png.format == "PNG" and png.size[0] > 9 * 32 and png.size[1] > 10 * 24
    assert {"onnx/margin_db_vs_shift_last_frame", "onnx/turn_turn_left_right_sign_share", "onnx/controllability_moving",
            "baseline/shift_last_frame_psnr_pooled"} <= set(metrics["headline"])


def test_stage_plays_the_export_long_with_player_keys(evaluated: Path) -> None:
    metrics = json.loads((evaluated / "metrics/evaluation.json").read_text())
    played = metrics["onnx"]["long_play"]
    assert played["steps"] == LONG_PLAY and played["contexts"] == 2
    assert set(played["by_step"]) == {"sharpness", "colour_distance", "hud_change"}
    assert all(len(curve) == LONG_PLAY for curve in played["by_step"].values())
    assert list(played["at_step"]) == ["1", "2", "4", "6"]
    assert 0.0 <= played["end"]["colour_distance"] <= 1.0 and played["end"]["sharpness"] > 0
    assert set(played["recorded_end"]) == set(played["end"])  # the held-out episodes are long enough here
    assert "long_play" not in metrics["teacher"]  # the teacher is not what people play
    assert metrics["headline"]["onnx/long_play_hud_change"] == played["end"]["hud_change"]
    with Image.open(evaluated / "plots/evaluation/long_play.png") as png:
        assert png.format == "PNG" and png.size[0] > 5 * 32 and png.size[1] > 2 * 24  # context + 4 shown steps
    with Image.open(evaluated / "plots/evaluation/long_play_by_step.png") as png:
        assert png.size == (720, 440)


def test_a_one_frame_context_is_distilled_exported_and_scored(tmp_path: Path) -> None:
    """K = 1 (the ablation's `context-1` experiment) through the real student, export and evaluation stages: the
    export's parity check passes with one context frame, and the evaluation scores it on held-out play."""
    root = build_tiny_export(tmp_path, context=1)
    export = root / "data" / "onnx_export"
    assert json.loads((export / "manifest.json").read_text())["K"] == 1
    with np.load(export / "contexts.npz") as contexts:
        assert contexts["context_latents"].shape[1] == 1 and contexts["context_actions"].shape[1] == 1
    set_small_evaluation(root, promotion={"criteria": [{"metric": "onnx.teacher_forced.psnr.model.pooled",
                                                          "tolerance": 0.1}]})  # the default's need 16-step rollouts
    cli_in(root, *evaluation_args(root, root / "data" / "raw_trajectories", export))
    metrics = json.loads((root / "metrics/evaluation.json").read_text())
    for model in ("onnx", "teacher"):
        tf = metrics[model]["teacher_forced"]
        assert tf["windows"] == 8 and 0.0 < tf["psnr"]["model"]["pooled"] <= 50.0
        assert tf["margin_db"]["copy_last_latent"]["pooled"] == pytest.approx(
            tf["psnr"]["model"]["pooled"] - tf["psnr"]["copy_last_latent"]["pooled"])
        assert all(len(metrics[model]["rollout"][str(n)]["psnr_by_step"]["model"]["pooled"]) == n for n in ROLLOUTS)
    assert (root / "plots/evaluation/turn_test.png").is_file()


def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_promote_command_both_ways(evaluated: Path) -> None:
    data = evaluated / "data"
    args = ["promote", "--export", str(data / "onnx_export"), "--trajectories", str(data / "raw_trajectories"),
            "--latents", str(data / "validated_latents"), "--metrics", str(evaluated / "metrics/evaluation.json"),
            "--report", str(evaluated / "reports/champion.json")]
    first = cli_in(evaluated, *args, "--source", "first")
    assert "PROMOTED: first champion" in first.stdout
    champion = evaluated / "champion"
    assert _tree(champion / "export") == _tree(data / "onnx_export")

    # the same export again, the champion re-scored on the same held-out play: exactly equal, promoted
    again = cli_in(evaluated, *args, "--source", "same", "--decision-json", str(evaluated / "decision.json"))
    assert "PROMOTED" in again.stdout
    decision = json.loads((evaluated / "decision.json").read_text())
    assert all(c["delta"] == pytest.approx(0.0, abs=1e-9) for c in decision["comparisons"])

    # a challenger whose metrics are 1 dB worse is rejected and the champion stays byte for byte
    worse = json.loads((evaluated / "metrics/evaluation.json").read_text())
    worse["onnx"]["teacher_forced"]["psnr"]["model"]["pooled"] -= 1.0
    (evaluated / "worse.json").write_text(json.dumps(worse))
    before = _tree(champion)
    rejected = cli_in(evaluated, *args, "--metrics", str(evaluated / "worse.json"), "--source", "worse")
    assert "REJECTED" in rejected.stdout and "onnx.teacher_forced.psnr.model.pooled" in rejected.stdout
    assert _tree(champion) == before
    log = (evaluated / "docs/promotion-log.md").read_text()
    assert log.count("PROMOTED") == 2 and log.count("REJECTED") == 1


# --------------------------------------------------------------------------- what reruns the stage


def test_stage_params_are_exactly_the_evaluation_fields_it_reads() -> None:
    """Every evaluation field but promotion and ablations reruns the stage; editing those two does not."""
    listed = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]["evaluation"]["params"]
    keys = {key.split(".", 1)[1] for key in listed if isinstance(key, str) and key.startswith("evaluation.")}
    assert "evaluation" not in listed, "the whole section would rerun the stage on an ablation or promotion edit"
    assert keys == set(EvaluationParams.model_fields) - {"promotion", "ablations"}
