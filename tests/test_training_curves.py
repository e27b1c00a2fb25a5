"""Curves as pictures: every training stage writes PNG charts under plots/<stage>/, Dagster previews a stage's own
pictures before them, and ``dvc plots show`` renders offline with the committed template."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components.images import COLORS, line_chart
from tests.fixtures.processes import run

# stage -> charts it must write with a line (relative to plots/); the micro agent's two episodes end together,
# so its episode charts are only checked to exist
EPISODE_CHARTS = ["rl_agent/curve_episode_reward.png", "rl_agent/curve_episode_length.png"]
CHARTS = {
    "rl_agent": ["rl_agent/curve_train_value_loss.png", "rl_agent/curve_train_approx_kl.png",
                 "rl_agent/curve_train_entropy_loss.png"],
    "base_autoencoder": ["base_autoencoder/curves/curve_training_loss.png",
                         "base_autoencoder/curves/curve_learning_rate.png",
                         "base_autoencoder/curves/curve_heldout_psnr.png"],
    "finetuned_vae": ["finetuned_vae/curve_training_loss.png", "finetuned_vae/curve_learning_rate.png"],
    "diffusion_checkpoint": ["diffusion_checkpoint/curve_training_loss.png",
                             "diffusion_checkpoint/curve_learning_rate.png"],
    "distilled_model": ["distilled_model/curve_training_loss.png", "distilled_model/curve_learning_rate.png",
                        "distilled_model/curve_heldout_mse_vs_data.png"],  # micro and default: target data
}


def line_pixels(path: Path) -> int:
    """Pixels in the first series' colour: how much line a chart has drawn (its legend swatch is about 75)."""
    pixels = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3)
    return int((np.abs(pixels.astype(int) - np.array(COLORS[0])).sum(axis=1) < 30).sum())


def test_a_line_chart_places_points_at_their_x(tmp_path: Path) -> None:
    flat = line_chart(tmp_path / "flat.png", {"a": [1.0, 1.0]}, "t", x=[0, 1000])
    steep = line_chart(tmp_path / "steep.png", {"a": [0.0, 1.0, 0.5]}, "t", x=[0, 10, 5000])
    assert line_pixels(steep) > line_pixels(flat) > 200


@pytest.mark.slow
def test_every_training_stage_writes_its_curves(micro_pipeline: Path) -> None:
    plots = micro_pipeline / "plots"
    assert all((plots / chart).read_bytes()[:4] == b"\x89PNG" for chart in EPISODE_CHARTS)
    for stage, charts in CHARTS.items():
        for chart in charts:
            path = plots / chart
            assert path.is_file(), f"{stage}: {chart} missing; {sorted(p.name for p in path.parent.glob('*'))}"
            assert line_pixels(path) > 150, f"{chart}: no line drawn"
    sb3 = micro_pipeline / "dvclive" / "rl_agent" / "plots" / "metrics" / "train"
    assert {"value_loss.tsv", "approx_kl.tsv", "entropy_loss.tsv"} <= {p.name for p in sb3.glob("*.tsv")}


@pytest.mark.slow
def test_dagster_previews_a_stages_own_pictures_before_its_curves(micro_pipeline: Path) -> None:
    from orchestration.metadata import preview_images

    images = preview_images(micro_pipeline, ["plots/diffusion_checkpoint"])
    assert images[0].name == "samples.png" and {p.name for p in images[1:]} >= {"curve_training_loss.png"}


@pytest.mark.slow
def test_dvc_plots_show_renders_offline(micro_pipeline: Path, tmp_path: Path) -> None:
    run(["dvc", "plots", "show", "-o", str(tmp_path / "plots")], micro_pipeline)
    page = (tmp_path / "plots" / "index.html").read_text()
    assert not re.findall(r"<(?:script|link)[^>]*(?:src|href)=\"https?://", page), "a remote script or stylesheet"
    assert "/* vega@5.20.2 */" in page and "/* vega-embed@6.18.2 */" in page
    assert "curve_training_loss.png" in page  # the PNG charts are on the page too
