"""The headline numbers of finished pipeline runs side by side (how README's "measured and not kept" rows were read).

    python docs/experiments/compare_runs.py RUN [RUN ...]

Each RUN is a workspace with metrics/evaluation.json (the evaluation stage's headline: margins, controllability,
turn response, sharpness, rollout crossings) and the training stages' metrics (steps, seconds, held-out loss).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HEADLINE = [
    "onnx/margin_db_vs_copy_last_latent", "onnx/psnr_pooled", "onnx/controllability_turning",
    "onnx/controllability_moving", "onnx/turn_turn_left_fraction_of_real", "onnx/turn_turn_right_fraction_of_real",
    "onnx/turn_turn_left_right_sign_share", "onnx/turn_turn_right_right_sign_share", "onnx/sharpness_step16",
    "onnx/sharpness_step32", "onnx/long_play_colour_distance", "onnx/rollout16_crosses_copy_last_latent_at",
    "onnx/rollout32_crosses_copy_last_latent_at", "onnx/rollout64_crosses_copy_last_latent_at",
    "teacher/margin_db_vs_copy_last_latent", "baseline/copy_last_latent_psnr_pooled",
]
TRAINING = {
    "diffusion_checkpoint": ["steps", "train_seconds", "train_samples_per_s", "heldout_loss"],
    "distilled_model": ["train_steps", "train_seconds", "student_psnr", "teacher_psnr", "undistilled_1step_psnr"],
}


def stage_metrics(run: Path, stage: str) -> dict:
    path = run / "metrics" / f"{stage}.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def shown(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def main(runs: list[Path]) -> None:
    headlines = [stage_metrics(run, "evaluation").get("headline", {}) for run in runs]
    rows = [(key, [headline.get(key) for headline in headlines]) for key in HEADLINE]
    for stage, keys in TRAINING.items():
        metrics = [stage_metrics(run, stage) for run in runs]
        rows += [(f"{stage}.{key}", [m.get(key) for m in metrics]) for key in keys]
    print("".ljust(46), *[run.name.ljust(12) for run in runs])
    for key, values in rows:
        print(key.ljust(46), *[shown(value).ljust(12) for value in values])


if __name__ == "__main__":
    if len(sys.argv) < 2 or "-h" in sys.argv or "--help" in sys.argv:
        sys.exit(__doc__)
    main([Path(arg) for arg in sys.argv[1:]])
