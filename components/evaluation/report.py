"""The ``evaluation`` stage's work: score the ONNX export and the PyTorch teacher on held-out play
(``evaluate_heldout``; the metrics themselves are ``components.evaluation.scoring``), then write the metrics JSON,
the PSNR and sharpness charts, the turn test, the long-play pictures and the side-by-side GIF (``write_report``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from components.atomic import atomic_write_json
from components.data.trajectory_store import TrajectoryStore
from components.data.windows import common_episodes, heldout_episodes
from components.errors import PipelineError
from components.evaluation import scoring
from components.images import frame_grid, line_chart, side_by_side_gif
from components.training import resolve_device

if TYPE_CHECKING:
    from components.params import EvaluationParams, Params


log = logging.getLogger(__name__)


def evaluate_heldout(params: Params, export: Path, raw_root: Path, latents_root: Path, teacher_dir: Path,
                     autoencoder_dir: Path, teacher: bool | None = None) -> tuple[dict[str, Any], dict[str, dict]]:
    """Evaluate the export (and the teacher unless ``teacher`` is false); returns metrics and image arrays."""

    settings = params.evaluation
    raw = TrajectoryStore(raw_root)
    episodes = heldout_episodes(raw, settings.episodes)  # refuses training episodes before any model loads
    with_teacher = settings.teacher if teacher is None else teacher
    latents = TrajectoryStore(latents_root) if with_teacher else None
    episodes = common_episodes(episodes, latents)
    log.info("evaluating on %d held-out episodes (%d frames)", len(episodes), sum(e.length for e in episodes))
    actions = params.environment.actions
    metrics: dict[str, Any] = {"heldout_episodes": len(episodes), "heldout_frames": sum(e.length for e in episodes)}
    extras: dict[str, dict] = {}

    onnx, manifest = scoring.onnx_model(export, threads=settings.threads)
    check_export_matches(manifest, raw, params)
    motion = scoring.measure_view_motion(raw, params.environment, settings)
    metrics["view_motion"] = motion.describe(actions)
    log.info("the real game's view displacement per action (px, training split): %s",
             {k: round(v, 1) for k, v in metrics["view_motion"]["displacement_px"].items()})
    metrics["onnx"], extras["onnx"] = scoring.evaluate_model(onnx, int(manifest["K"]), raw, None, episodes, settings,
                                                             actions, motion, with_long_play=True)
    log_by_action(metrics["onnx"]["teacher_forced"]["by_action"])
    if with_teacher:
        model, k = scoring.teacher_model(teacher_dir, autoencoder_dir, params.sampler, resolve_device(params.device))
        metrics["teacher"], extras["teacher"] = scoring.evaluate_model(model, k, raw, latents, episodes, settings,
                                                                       actions, motion)
    else:
        metrics["teacher"] = {"skipped": "evaluation.teacher is false"}

    shortest = str(min(settings.rollout_lengths))
    models = [m for m in ("onnx", "teacher") if m in extras]
    real_clip = extras["onnx"].get(f"real_{shortest}")
    rollouts = f"rollout_{shortest}"
    metrics["fvd"] = scoring.fvd_scores(settings.fvd_weights, real_clip,
                                        {m: extras[m][rollouts] for m in models if rollouts in extras[m]})
    metrics["lpips"] = scoring.lpips_scores(settings.lpips_weights, {
        m: (extras[m][f"rollout_{shortest}"][:, 0], extras[m][f"real_{shortest}"][:, 0])
        for m in models if f"rollout_{shortest}" in extras[m]
    })
    for name in ("lpips", "fvd"):
        if "skipped" in metrics[name]:
            log.info("%s skipped: %s", name.upper(), metrics[name]["skipped"])
    # the numbers worth a glance, first in the file (sorted keys): Dagster metadata shows the first values
    metrics["headline"] = scoring.headline(metrics)
    for key, value in metrics["headline"].items():
        log.info("%s = %s", key, f"{value:.3f}" if isinstance(value, float) else value)
    return metrics, extras


def log_by_action(rows: dict[str, dict[str, Any]]) -> None:
    """A log line per action that led to a held-out frame: the shipped model's margin, its share of the error and
    which keys it obeys (``teacher_forced.by_action`` in the metrics)."""
    for name, row in rows.items():
        obeys = "none" if row["controllability"] is None else f"{100 * row['controllability']:.0f}%"
        share = 0.0 if row["error_share"] is None else 100 * row["error_share"]
        log.info("by action: %-20s %4d windows, %+.2f dB over copy-last-latent, %4.1f%% of the error, "
                 "controllability %s", name, row["windows"], row["margin_db_vs_copy_last_latent"], share, obeys)


def check_export_matches(manifest: dict[str, Any], raw: TrajectoryStore, params: Params) -> None:
    frame_shape = tuple(raw.shards[0].array("frames").shape[1:3])
    if (int(manifest["H"]), int(manifest["W"])) != frame_shape:
        raise PipelineError(
            f"the export makes {manifest['W']}x{manifest['H']} frames but the recorded frames are "
            f"{frame_shape[1]}x{frame_shape[0]}; rerun the pipeline so both come from one environment.resolution"
        )
    names = [a["name"] for a in manifest["actions"]]
    if names != [a.name for a in params.environment.actions]:
        raise PipelineError(f"the export's actions {names} differ from environment.actions; rerun onnx_export")


def write_report(metrics: dict[str, Any], extras: dict[str, dict], metrics_path: Path, plots_dir: Path,
                 settings: EvaluationParams) -> None:
    """The metrics JSON, the PSNR- and sharpness-by-step charts (PNG, and JSON for dvc plots), the turn test, the
    long-play pictures and the side-by-side GIF."""

    atomic_write_json(metrics_path, metrics)
    plots_dir.mkdir(parents=True, exist_ok=True)
    rollouts = metrics["onnx"]["rollout"]
    if not rollouts:
        log.warning("no rollout was long enough for the held-out episodes: no plot, no sample video")
        return
    longest = max(rollouts, key=int)
    curves = {"ONNX 1-step": rollouts[longest]["psnr_by_step"]["model"]["pooled"]}
    teacher = metrics.get("teacher", {}).get("rollout", {}).get(longest)
    if teacher:
        curves["teacher"] = teacher["psnr_by_step"]["model"]["pooled"]
    curves["copy-last-frame"] = rollouts[longest]["psnr_by_step"]["copy_last_frame"]["pooled"]
    curves["copy-last-latent"] = rollouts[longest]["psnr_by_step"]["copy_last_latent"]["pooled"]
    if "shift_last_frame" in rollouts[longest]["psnr_by_step"]:
        curves["shift-last-frame"] = rollouts[longest]["psnr_by_step"]["shift_last_frame"]["pooled"]
    line_chart(plots_dir / "psnr_by_step.png", curves,
               f"Pooled PSNR by rollout step ({longest} steps, held-out, recorded actions)")
    keys = {"ONNX 1-step": "onnx", "teacher": "teacher", "copy-last-frame": "copy_last_frame",
            "copy-last-latent": "copy_last_latent", "shift-last-frame": "shift_last_frame"}
    rows = [{"step": s + 1, **{keys[name]: curve[s] for name, curve in curves.items()}} for s in range(int(longest))]
    atomic_write_json(plots_dir / "psnr_by_step.json", rows)
    sharpness = {"ONNX 1-step": rollouts[longest]["sharpness_by_step"]["model"]}
    if teacher:
        sharpness["teacher"] = teacher["sharpness_by_step"]["model"]
    sharpness.update({label: rollouts[longest]["sharpness_by_step"][keys[label]]
                      for label in ("copy-last-frame", "copy-last-latent", "shift-last-frame")
                      if keys[label] in rollouts[longest]["sharpness_by_step"]})
    line_chart(plots_dir / "sharpness_by_step.png", sharpness,
               f"Sharpness by rollout step ({longest} steps): Laplacian energy / the real frames' (1 = as sharp)",
               y_label="sharpness")
    if "turn_test" in extras["onnx"]:
        write_turn_test(plots_dir / "turn_test.png", extras["onnx"]["turn_test"])
    if "long_play" in extras["onnx"]:
        write_long_play(plots_dir, metrics, extras["onnx"]["long_play"])

    n = settings.sample_windows
    columns = {"real": extras["onnx"][f"real_{longest}"][:n], "ONNX": extras["onnx"][f"rollout_{longest}"][:n]}
    if "teacher" in extras and f"rollout_{longest}" in extras["teacher"]:
        columns["teacher"] = extras["teacher"][f"rollout_{longest}"][:n]
    count = min(len(c) for c in columns.values())
    side_by_side_gif(plots_dir / "sample.gif", {k: np.asarray(v[:count]) for k, v in columns.items()},
                     fps=settings.sample_fps)


def write_turn_test(path: Path, shown: dict[str, Any]) -> None:
    """The turn test: per held-out context, the last context frame then the generated steps of each held action,
    and the recorded continuation (``components.evaluation.scoring.turn_test``)."""

    context = shown["context"]
    steps = shown["real"].shape[1]
    rows = []
    for index in range(len(context)):
        for name, frames in shown.items():
            if name != "context":
                label = f"{index + 1}: {'recorded' if name == 'real' else name}"
                rows.append((label, [context[index], *frames[index]]))
    frame_grid(path, rows, ["context", *[f"+{s + 1}" for s in range(steps)]],
               title="Turn test (ONNX, held-out contexts): each action held from the same context")


def write_long_play(plots_dir: Path, metrics: dict[str, Any], picture: Any) -> None:
    """``long_play.png`` (per held-out context: the last context frame, then the ONNX model's frames at the shown
    steps of player-like keys) and ``long_play_by_step.png`` (its sharpness, colour distance and HUD change)."""

    played = metrics["onnx"]["long_play"]
    shown = list(played["at_step"])
    frame_grid(plots_dir / "long_play.png", [(f"{i + 1}: onnx", list(row)) for i, row in enumerate(picture)],
               ["context", *[f"+{s}" for s in shown]],
               title=f"Long play (ONNX, held-out contexts): {played['steps']} steps, {played['keys']}")
    curves = {name.replace("_", " "): values for name, values in played["by_step"].items()}
    line_chart(plots_dir / "long_play_by_step.png", curves,
               "Long play (ONNX) by step: sharpness (1 = as the game), colour distance, HUD change (0 = as the game)",
               y_label="ratio / distance")
