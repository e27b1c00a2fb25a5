"""Offline images, written once for every stage: line charts (PNG; the evaluation's PSNR by rollout step, the
training stages' curves), side-by-side rollout videos (GIF), labelled frame grids and plain sample grids.

Drawn with Pillow only (no matplotlib, no browser, no CDN), so they render anywhere, including in Dagster's
UI and in ``dvc plots show`` (image plots).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from components.atomic import atomic_path

if TYPE_CHECKING:
    import torch

CURVE_PREFIX = "curve_"  # training curves; orchestration/metadata.py previews them after a stage's other images
COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75)]


def line_chart(
    path: str | Path,
    curves: Mapping[str, Sequence[float]],
    title: str,
    y_label: str = "PSNR (dB)",
    x_label: str = "rollout step",
    size: tuple[int, int] = (720, 440),
    x: Sequence[float] | None = None,
) -> Path:
    """Draw ``curves`` (name -> values at x = 1, 2, ..., or at the shared ``x``) as lines with axes, ticks and a
    legend; write PNG."""
    width, height = size
    left, right, top, bottom = 64, 190, 36, 48
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    values = [v for c in curves.values() for v in c if v is not None and math.isfinite(v)]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    if hi - lo < 1e-6:
        lo, hi = lo - 1.0, hi + 1.0
    pad = 0.05 * (hi - lo)
    lo, hi = lo - pad, hi + pad
    steps = max((len(c) for c in curves.values()), default=1)
    xs = [float(v) for v in x] if x is not None else [float(s) for s in range(1, steps + 1)]
    x_lo, x_hi = (min(xs), max(xs)) if xs else (1.0, 1.0)
    plot_w, plot_h = width - left - right, height - top - bottom

    def xy(position: float, value: float) -> tuple[float, float]:
        return (left + (position - x_lo) / max(x_hi - x_lo, 1e-9) * plot_w,
                top + (hi - value) / (hi - lo) * plot_h)

    draw.rectangle([left, top, left + plot_w, top + plot_h], outline="black")
    for i in range(6):  # y ticks
        value = lo + (hi - lo) * i / 5
        _, y = xy(1, value)
        draw.line([left - 4, y, left, y], fill="black")
        draw.line([left, y, left + plot_w, y], fill=(230, 230, 230))
        draw.text((4, y - 6), _tick(value, hi - lo), fill="black", font=font)
    if x is None:
        x_ticks = [float(s) for s in sorted({1, steps, *range(0, steps + 1, max(steps // 8, 1))} - {0})]
    else:
        x_ticks = [x_lo + (x_hi - x_lo) * i / 5 for i in range(6)]
    for position in x_ticks:
        px, _ = xy(position, lo)
        draw.line([px, top + plot_h, px, top + plot_h + 4], fill="black")
        draw.text((px - 6, top + plot_h + 6), _tick(position, x_hi - x_lo), fill="black", font=font)
    for index, (name, curve) in enumerate(curves.items()):
        color = COLORS[index % len(COLORS)]
        points = [xy(xs[i], v) for i, v in enumerate(curve) if v is not None and math.isfinite(v)]
        if len(points) > 1:
            draw.line(points, fill=color, width=2)
        for px, py in points if len(points) <= 16 else []:
            draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=color)
        ly = top + 8 + 18 * index
        draw.line([width - right + 12, ly + 6, width - right + 36, ly + 6], fill=color, width=3)
        draw.text((width - right + 42, ly), name, fill="black", font=font)
    draw.text((left, 10), title, fill="black", font=font)
    draw.text((left + plot_w // 2 - 30, height - 18), x_label, fill="black", font=font)
    draw.text((4, 18), y_label, fill="black", font=font)
    return save_png(path, image)


def _tick(value: float, span: float) -> str:
    """A tick label: whole numbers as such (12000 as 12k), small spans with three significant digits."""
    if span >= 5 and abs(value) >= 10_000:
        return f"{value / 1000:.0f}k"
    if span >= 5:
        return f"{value:.0f}"
    if span >= 2:
        return f"{value:.1f}"
    return f"{value:.2f}" if span >= 0.2 else f"{value:.3g}"  # ticks a fifth of the span apart stay distinct


def training_charts(folder: str | Path, losses: Sequence[tuple[int, float]], learning_rates: Sequence[float],
                    curve: Sequence[Mapping[str, float]], stage: str) -> list[Path]:
    """A training stage's curves as PNG in ``folder``: ``curve_training_loss.png`` and ``curve_learning_rate.png``
    against the step, and ``curve_heldout_<metric>.png`` for each metric of the held-out ``curve`` points against
    training time. (Dagster previews a stage's other images first: the ``curve_`` prefix marks these.)"""
    folder = Path(folder)
    written = []
    if losses:
        steps = [s for s, _ in losses]
        written.append(line_chart(folder / f"{CURVE_PREFIX}training_loss.png", {"loss": [v for _, v in losses]},
                                  f"{stage}: training loss", y_label="loss", x_label="step", x=steps))
        if len(learning_rates) == len(losses):
            written.append(line_chart(folder / f"{CURVE_PREFIX}learning_rate.png",
                                      {"learning rate": list(learning_rates)}, f"{stage}: learning rate",
                                      y_label="LR", x_label="step", x=steps))
    metrics = [k for k in (curve[0] if curve else {}) if k not in ("seconds", "step")]
    for metric in metrics:
        written.append(line_chart(folder / f"{CURVE_PREFIX}heldout_{metric}.png", {metric: [p[metric] for p in curve]},
                                  f"{stage}: held-out {metric}", y_label=metric, x_label="training seconds",
                                  x=[p["seconds"] for p in curve]))
    return written


def side_by_side_gif(
    path: str | Path,
    columns: Mapping[str, np.ndarray],
    fps: float = 8.0,
    scale: int | None = None,
) -> Path:
    """A GIF whose every frame shows, left to right, one labelled column per entry of ``columns``.

    Each entry is uint8 ``[N, T, H, W, 3]`` (N samples stacked top to bottom, T time steps). Frames are
    enlarged ``scale`` times (nearest neighbour; default: to about 160 pixels wide, at most 4x).
    """
    names = list(columns)
    first = columns[names[0]]
    n, t, h, w, _ = first.shape
    scale = scale or max(1, min(4, 160 // w))
    label_h = 14
    frames = []
    font = ImageFont.load_default()
    for step in range(t):
        canvas = Image.new("RGB", (len(names) * w * scale, label_h + n * h * scale), "white")
        draw = ImageDraw.Draw(canvas)
        for col, name in enumerate(names):
            draw.text((col * w * scale + 2, 1), f"{name} t={step + 1}", fill="black", font=font)
            for row in range(n):
                tile = Image.fromarray(columns[name][row, step]).resize((w * scale, h * scale),
                                                                         Image.Resampling.NEAREST)
                canvas.paste(tile, (col * w * scale, label_h + row * h * scale))
        frames.append(canvas.convert("P", palette=Image.Palette.ADAPTIVE))
    return save_gif(path, frames, fps)


def save_gif(path: str | Path, pictures: Sequence[Image.Image], fps: float) -> Path:
    """An endlessly looping GIF of ``pictures`` at ``fps``, written atomically."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target, suffix=".gif") as temporary:
        pictures[0].save(temporary, format="GIF", save_all=True, append_images=list(pictures[1:]),
                         duration=int(1000 / fps), loop=0)
    return target


def frame_grid(
    path: str | Path,
    rows: Sequence[tuple[str, Sequence[np.ndarray]]],
    column_labels: Sequence[str],
    title: str = "",
    scale: int | None = None,
) -> Path:
    """A PNG of labelled rows of frames: each row is ``(label, T uint8 [H, W, 3] frames)``, drawn left to right under
    ``column_labels``; a row with fewer frames leaves its last cells blank. Frames are enlarged ``scale`` times
    (nearest neighbour; default: to about 160 pixels wide, at most 4x)."""
    h, w = np.asarray(rows[0][1][0]).shape[:2]
    scale = scale or max(1, min(4, 160 // w))
    label_w, head, gap = 120, 30 if title else 16, 2
    columns = max(len(column_labels), max(len(frames) for _, frames in rows))
    canvas = Image.new("RGB", (label_w + columns * (w * scale + gap), head + len(rows) * (h * scale + gap)), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    if title:
        draw.text((4, 2), title, fill="black", font=font)
    for col, text in enumerate(column_labels):
        draw.text((label_w + col * (w * scale + gap) + 2, head - 13), text, fill="black", font=font)
    for index, (label, frames) in enumerate(rows):
        y = head + index * (h * scale + gap)
        draw.text((4, y + h * scale // 2 - 6), label, fill="black", font=font)
        for col, frame in enumerate(frames):
            tile = Image.fromarray(np.asarray(frame, np.uint8)).resize((w * scale, h * scale), Image.Resampling.NEAREST)
            canvas.paste(tile, (label_w + col * (w * scale + gap), y))
    return save_png(path, canvas)


def sample_grid(frames: np.ndarray, count: int = 16, columns: int = 4, min_width: int = 160) -> np.ndarray:
    """A grid image of ``count`` uint8 frames [H, W, 3] spread evenly over ``frames``, upscaled (nearest) to
    ``min_width``, with white gaps."""
    indices = np.linspace(0, len(frames) - 1, num=min(count, len(frames))).round().astype(int)
    picked = np.stack([np.asarray(frames[i]) for i in indices])
    scale = max(1, min_width // picked.shape[2])
    picked = picked.repeat(scale, axis=1).repeat(scale, axis=2)
    rows = -(-len(picked) // columns)
    gap = 2
    h, w = picked.shape[1:3]
    grid = np.full((rows * (h + gap) - gap, columns * (w + gap) - gap, 3), 255, dtype=np.uint8)
    for k, frame in enumerate(picked):
        r, c = divmod(k, columns)
        grid[r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = frame
    return grid


def to_uint8(frames: torch.Tensor | np.ndarray) -> np.ndarray:
    """Float frames ``[..., 3, H, W]`` in 0..1 (tensor or array) as uint8 ``[..., H, W, 3]`` pictures: the one
    quantisation, which the players use too (``web_player.js`` does the same in float32). Torch-free, so the
    player can import it."""
    if hasattr(frames, "detach"):  # a torch tensor
        frames = frames.detach().float().cpu().numpy()
    return (np.clip(np.moveaxis(frames, -3, -1), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def save_png(path: str | Path, image: Image.Image | np.ndarray) -> Path:
    """``image`` (or a uint8 [H, W, 3] array) as a PNG, written atomically."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    picture = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, np.uint8))
    with atomic_path(target, suffix=".png") as temporary:
        picture.save(temporary, format="PNG")
    return target
