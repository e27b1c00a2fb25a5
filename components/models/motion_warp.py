"""An action-dependent warp of the last context latent: the motion a small UNet cannot find in a few minutes.

In DOOM a turn pans the view sideways and a step forward magnifies it about the centre of the view; the status
bar at the bottom does not move. How far depends on the key and on what was held before it: a turn that starts
pans the 80x60 view about 5 px in a step of 4 tics, a turn held on (DOOM's turn acceleration) about 10 px, and
walking keeps some momentum after the key is released. A UNet that sees only the past latents has to learn such
global, action-dependent translations from data, and in a few thousand CPU steps it learns "a blurred copy of
the last frame" instead (README "World model").

``ActionWarp`` gives it that motion as an input. A table holds, for every pair (previous action, action), the
displacement of the view ``(dx, dy)`` in latent cells and its magnification ``zoom``. The last context latent is
moved accordingly and blended with the unwarped latent by a per-cell gate, so that what does not move with the
view (the HUD) keeps its place::

    warped = gate * resample(last, motion[previous action, action]) + (1 - gate) * last

The world model gets ``warped`` as ``C`` extra input channels and only has to learn the residual: what the warp
cannot express (the part of a cell a move does not fill, parallax, what comes into view, the HUD digits,
enemies). The paper's model is the plain UNet, without such a warp (``world_model.action_warp: false``).

Resampling (``world_model.warp_resampling``) takes the nearest cell by default: a latent is a code, not an
image, and a blend of two neighbouring codes decodes to a smear, so the warp moves whole cells and the UNet
supplies the sub-cell rest; ``linear`` interpolates instead. Either is two matrix products, which export to
ONNX as MatMul.

The table and the gate are *fitted* before training (``fit_action_warp``), not trained: the motion is measured
in pixels on the real frames of training windows (the best horizontal alignment of the view, then the best
magnification; a pixel measure does not prefer blur the way a latent MSE does), its median taken per action
pair, and the gate solved by least squares. They are buffers of the model, saved and exported with it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from components.evaluation.view_motion import horizontal_shift, view_row_count

log = logging.getLogger(__name__)

MIN_WINDOWS = 8  # windows an action pair needs for its own median; fewer: the action's median over all pairs
GATE_PRIOR = 1.0  # cells with little evidence move with the view
ZOOM_GRID = np.exp(np.linspace(-0.15, 0.15, 21))
MAX_SHIFT = 0.3  # of the width: a held turn pans about an eighth of the view a step


def resampling_matrix(source: torch.Tensor, size: int, mode: str = "nearest") -> torch.Tensor:
    """Weights ``[..., n_out, size]`` that read the input at ``source`` [..., n_out] cells (clamped to the input,
    so edges repeat): one-hot on the nearest cell (``nearest``), or linear interpolation between the two
    neighbours (``linear``)."""
    source = source.clamp(0.0, size - 1.0).unsqueeze(-1)
    cells = torch.arange(size, dtype=source.dtype, device=source.device)
    if mode == "nearest":
        return (cells == torch.round(source)).to(source.dtype)
    below = torch.floor(source)
    fraction = source - below
    return (cells == below).to(source.dtype) * (1.0 - fraction) + (cells == below + 1).to(source.dtype) * fraction


class ActionWarp(nn.Module):
    """Moves a latent [B, C, h, w] by the fitted motion of (previous action, action), gated per cell."""

    motion: torch.Tensor  # buffers, registered in __init__
    centre: torch.Tensor
    gate: torch.Tensor

    def __init__(self, num_actions: int, latent_size: tuple[int, int], resampling: str = "nearest") -> None:
        super().__init__()
        height, width = latent_size
        self.latent_size = (height, width)
        self.resampling = resampling
        motion = torch.zeros(num_actions, num_actions, 3)  # [previous, action] -> (dx, dy, log zoom)
        self.register_buffer("motion", motion)
        self.register_buffer("centre", torch.tensor([(width - 1) / 2.0, (height - 1) / 2.0]))  # zoom centre (x, y)
        self.register_buffer("gate", torch.ones(height, width))

    def resample(self, latent: torch.Tensor, motion: torch.Tensor) -> torch.Tensor:
        """``latent`` [B,C,h,w] moved by ``motion`` [B, 3] = (dx, dy, log zoom): the content at source cell
        ``p`` lands at ``(p - centre) * zoom + centre + (dx, dy)`` (rounded to whole cells with ``nearest``)."""
        height, width = self.latent_size
        zoom = motion[:, 2].exp()
        rows = _source_positions(height, self.centre[1], motion[:, 1], zoom)  # [B, h]
        cols = _source_positions(width, self.centre[0], motion[:, 0], zoom)  # [B, w]
        weights_y = resampling_matrix(rows, height, self.resampling).unsqueeze(1)  # [B, 1, h, h]
        weights_x = resampling_matrix(cols, width, self.resampling).unsqueeze(1)  # [B, 1, w, w]
        return weights_y @ latent @ weights_x.transpose(-1, -2)

    def forward(self, latent: torch.Tensor, previous_actions: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Warp ``latent`` [B,C,h,w] (the last context latent) by the motion of ``actions`` [B] (taken on it) after
        ``previous_actions`` [B], blended with the unwarped latent by the gate."""
        moved = self.resample(latent, self.motion[previous_actions, actions])
        gate = self.gate.to(latent.dtype)
        return gate * moved + (1.0 - gate) * latent

    def describe(self, names: Sequence[str]) -> dict[str, dict[str, float]]:
        """The motion of each action held on (previous action the same) and started after action 0 (the no-op of
        the default action set), for logs and metrics."""
        table = self.motion.detach()
        described = {}
        for index, name in enumerate(names):
            held, started = table[index, index], table[0, index]
            described[name] = {"dx_cells": round(float(held[0]), 2), "dy_cells": round(float(held[1]), 2),
                               "zoom": round(float(held[2].exp()), 3),
                               "dx_cells_from_noop": round(float(started[0]), 2),
                               "zoom_from_noop": round(float(started[2].exp()), 3)}
        return described


def _source_positions(size: int, centre: torch.Tensor, displacement: torch.Tensor, zoom: torch.Tensor) -> torch.Tensor:
    cells = torch.arange(size, dtype=displacement.dtype, device=displacement.device)
    return (cells - centre - displacement.unsqueeze(-1)) / zoom.unsqueeze(-1) + centre


def previous_actions(context_actions: torch.Tensor) -> torch.Tensor:
    """The action before the last one of each context [B, K]; with K = 1, the last one itself."""
    return context_actions[:, -2] if context_actions.shape[1] > 1 else context_actions[:, -1]


# --------------------------------------------------------------------------- fitting before training


def measure_zoom(reference: np.ndarray, frames: np.ndarray, shifts: np.ndarray, view_rows: int,
                 centre: tuple[float, float]) -> np.ndarray:
    """Per frame, the magnification of ``frames`` [B,3,H,W] against ``reference`` (already moved ``shifts`` [B]
    pixels right) about ``centre`` (x, y) pixels that best matches the top ``view_rows`` rows (from ``ZOOM_GRID``)."""
    ref = torch.from_numpy(np.ascontiguousarray(reference[:, :, :view_rows], np.float32))
    cur = torch.from_numpy(np.ascontiguousarray(frames[:, :, :view_rows], np.float32))
    batch, _, height, width = ref.shape
    xs = torch.arange(width, dtype=torch.float32)
    ys = torch.arange(height, dtype=torch.float32)
    shift = torch.from_numpy(np.asarray(shifts, np.float32))
    errors = []
    for zoom in ZOOM_GRID:
        source_x = (xs[None] - centre[0] - shift[:, None]) / zoom + centre[0]  # [B, W]
        source_y = ((ys - centre[1]) / zoom + centre[1]).expand(batch, -1)  # [B, H]
        grid = torch.stack([source_x[:, None, :].expand(-1, height, -1) / (width - 1) * 2 - 1,
                            source_y[:, :, None].expand(-1, -1, width) / (height - 1) * 2 - 1], dim=-1)
        moved = torch.nn.functional.grid_sample(ref, grid, mode="bilinear", padding_mode="border", align_corners=True)
        errors.append((moved - cur).abs().mean(dim=(1, 2, 3)))
    return ZOOM_GRID[torch.stack(errors, 1).argmin(1).numpy()]


@dataclass(frozen=True)
class LatentGeometry:
    """Where latent cells lie on the frame: ``factor`` pixels per cell, and the padding added on the left and top
    before encoding (the autoencoder's ``autoencoder.json``)."""

    factor: int
    pad_left: int = 0
    pad_top: int = 0

    def to_cells(self, x_px: float, y_px: float) -> tuple[float, float]:
        """A frame pixel position in cell coordinates (cell ``i`` covers padded pixels ``i*f .. i*f + f - 1``)."""
        centre = (self.factor - 1) / 2.0
        return (x_px + self.pad_left - centre) / self.factor, (y_px + self.pad_top - centre) / self.factor


@torch.no_grad()
def fit_action_warp(warp: ActionWarp, last: torch.Tensor, context_actions: torch.Tensor, target: torch.Tensor,
                    last_frames: np.ndarray, next_frames: np.ndarray, geometry: LatentGeometry,
                    view_rows: float) -> dict[str, Any]:
    """Fit ``warp`` to training windows: ``last`` [N,C,h,w] latents, their ``context_actions`` [N,K], the
    ``target`` [N,C,h,w] latents that followed, and the real frames of both, float [N,3,H,W] in 0..1.

    Per window the view's motion is measured in pixels (``view_motion.horizontal_shift`` above the HUD, then
    ``measure_zoom``) and converted to latent cells; ``dy`` stays 0, since DOOM's view does not tilt. Each
    (previous action, action) pair gets the median of its windows, or, with fewer than ``MIN_WINDOWS``, the
    action's median over all pairs; an action never seen keeps no motion. The gate, per cell, is 1 where the
    least-squares ``g`` of ``target - last ~ g * (moved - last)``
    (shrunk towards 1 where cells barely move) is above 1/2, else 0: the cells that move with the view, and the
    HUD that does not. Returns a summary for the logs.
    """

    height, width = last_frames.shape[-2:]
    rows = view_row_count(height, view_rows)
    shifts = horizontal_shift(last_frames, next_frames, view_rows, max_shift=int(MAX_SHIFT * width))
    zooms = measure_zoom(last_frames, next_frames, shifts, rows, ((width - 1) / 2.0, (rows - 1) / 2.0))
    warp.centre.copy_(torch.tensor(geometry.to_cells((width - 1) / 2.0, (rows - 1) / 2.0)))
    measured = np.stack([shifts / geometry.factor, np.zeros_like(shifts), np.log(zooms)], 1)  # cells, cells, log
    previous, current = previous_actions(context_actions).numpy(), context_actions[:, -1].numpy()
    table = torch.zeros_like(warp.motion)
    for action in np.unique(current):
        of_action = current == action
        fallback = np.median(measured[of_action], axis=0)
        for before_action in range(table.shape[0]):
            pair = of_action & (previous == before_action)
            value = np.median(measured[pair], axis=0) if pair.sum() >= MIN_WINDOWS else fallback
            table[before_action, action] = torch.from_numpy(value.astype(np.float32))
    warp.motion.copy_(table)
    warp.gate.fill_(1.0)
    moved = warp.resample(last, table[previous_actions(context_actions), context_actions[:, -1]])
    change, wanted = moved - last, target - last
    energy = change.pow(2).sum(dim=(0, 1))
    ridge = 0.1 * float(energy.mean()) + 1e-6
    blend = ((change * wanted).sum(dim=(0, 1)) + ridge * GATE_PRIOR) / (energy + ridge)
    warp.gate.copy_((blend > 0.5).to(warp.gate.dtype))  # a blend of two codes decodes to a smear: all or nothing
    return {"windows": len(last), "median_shift_px": float(np.median(np.abs(shifts))),
            "gate_rows": [round(float(v), 2) for v in warp.gate.mean(1)]}


__all__ = ["ActionWarp", "LatentGeometry", "fit_action_warp", "measure_zoom", "resampling_matrix", "previous_actions"]
