"""Frame metrics, written once for training logs, evaluation and the tools: MSE, PSNR, SSIM and Laplacian detail.

* PSNR is reported three ways (:func:`psnr_summary`): pooled over the mean MSE, mean per frame with identical
  frames capped (``PSNR_CAP_DB``), and the median. :func:`pooled_psnr` is the pooled view of two batches of
  frames, for the training logs.
* The Laplacian family measures fine detail: :func:`laplacian_energy` per frame (its ratio to the real frames'
  is the sharpness of ``components.evaluation.view_motion.sharpness``), and :func:`detail_loss`, a training term
  that charges a blurred prediction for the detail it lacks.

Frames are float ``[B, 3, H, W]`` in ``0..1``; the Laplacian functions also take latents ``[B, C, h, w]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import kornia
import numpy as np
import torch

PSNR_CAP_DB = 50.0  # an exact frame's PSNR, so that means stay finite (JSON has no infinity)
LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])


def mse_per_frame(prediction: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor) -> np.ndarray:
    """Mean squared error of each frame ``[B, ...]`` (values in 0..1), as float64 ``[B]``."""
    p = torch.as_tensor(prediction, dtype=torch.float64).detach().cpu()  # a measure: no gradient flows through it
    t = torch.as_tensor(target, dtype=torch.float64).detach().cpu()
    if p.shape != t.shape:
        raise ValueError(f"prediction {tuple(p.shape)} and target {tuple(t.shape)} differ in shape")
    return ((p - t) ** 2).flatten(1).mean(1).numpy()


def weighted_mse(predicted: torch.Tensor, target: torch.Tensor, actions: torch.Tensor,
                 weights: torch.Tensor | None) -> torch.Tensor:
    """A training loss: the MSE over a batch whose examples count ``weights[actions]`` (``actions`` [B] ids, e.g.
    ``evaluation.actions.action_loss_weights``); the plain mean when ``weights`` is None."""
    if weights is None:
        return torch.nn.functional.mse_loss(predicted.float(), target.float())
    per_example = (predicted.float() - target.float()).pow(2).flatten(1).mean(1)
    example_weights = weights[actions]
    return (example_weights * per_example).sum() / example_weights.sum()


def psnr_from_mse(mse: np.ndarray | float, max_value: float = 1.0) -> np.ndarray:
    """PSNR in dB of each MSE; an MSE of exactly 0 gives ``inf`` (not an error, not NaN)."""
    mse = np.asarray(mse, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(max_value**2 / mse)


def pooled_psnr(prediction: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor,
                max_value: float = 1.0, cap_db: float = PSNR_CAP_DB) -> float:
    """PSNR in dB of the mean squared error over all of ``prediction`` against ``target`` (values in
    ``0..max_value``), ``cap_db`` when they are identical."""
    mse = float(mse_per_frame(prediction, target).mean()) if len(prediction) else math.nan
    return _finite_or_cap(float(psnr_from_mse(mse, max_value)), cap_db)


def psnr_summary(mse: Sequence[float] | np.ndarray, cap_db: float = PSNR_CAP_DB) -> dict[str, float]:
    """The three PSNR views of per-frame MSEs, in dB.

    * ``pooled``: PSNR of the mean MSE over all frames (dominated by the hard frames);
    * ``mean``: mean of per-frame PSNR, each capped at ``cap_db`` so identical frames count as ``cap_db``;
    * ``median``: median per-frame PSNR (uncapped; ``inf`` only if more than half the frames are exact).
    ``count`` is the number of frames. An empty input gives NaNs and count 0.
    """
    mse = np.asarray(mse, dtype=np.float64).reshape(-1)
    if mse.size == 0:
        return {"pooled": math.nan, "mean": math.nan, "median": math.nan, "count": 0}
    per_frame = psnr_from_mse(mse)
    return {
        "pooled": _finite_or_cap(float(psnr_from_mse(mse.mean())), cap_db),
        "mean": float(np.minimum(per_frame, cap_db).mean()),
        "median": _finite_or_cap(float(np.median(per_frame)), cap_db),
        "count": int(mse.size),
    }


def _finite_or_cap(value: float, cap_db: float) -> float:
    """JSON has no infinity: an exact match is reported as the cap."""
    return cap_db if math.isinf(value) else value


def ssim(prediction: torch.Tensor, target: torch.Tensor, window_size: int = 7) -> np.ndarray:
    """SSIM of each frame ``[B, 3, H, W]`` (kornia), averaged over its pixel map: float64 ``[B]``.

    The window shrinks (odd, >= 3) for frames smaller than it, e.g. the micro profile's 32x24 frames.
    """

    p = torch.as_tensor(prediction, dtype=torch.float32)
    t = torch.as_tensor(target, dtype=torch.float32)
    size = min(window_size, min(p.shape[-2:]) // 2 * 2 - 1)
    size = max(size, 3)
    ssim_map = kornia.metrics.ssim(p.clamp(0, 1), t.clamp(0, 1), window_size=size, max_val=1.0)
    return ssim_map.flatten(1).mean(1).double().numpy()


def laplacian(images: torch.Tensor) -> torch.Tensor:
    """The 3x3 Laplacian of each channel of ``images`` [B,C,H,W] on the interior: [B,C,H-2,W-2] (differentiable)."""
    kernel = LAPLACIAN.to(images).expand(images.shape[1], 1, 3, 3)
    return torch.nn.functional.conv2d(images, kernel, groups=images.shape[1])


def laplacian_energy(frames: np.ndarray | torch.Tensor) -> np.ndarray:
    """Mean squared Laplacian of each frame [B,3,H,W] (interior pixels, channels averaged): float64 ``[B]``."""
    response = laplacian(torch.as_tensor(np.asarray(frames), dtype=torch.float32))
    return response.pow(2).flatten(1).mean(1).double().numpy()


def local_detail(images: torch.Tensor, patch: int) -> torch.Tensor:
    """RMS of the Laplacian of ``images`` [B,C,H,W] (frames or latents) over ``patch`` x ``patch`` regions: how
    much fine detail each region holds, [B,C,ceil(H/patch),ceil(W/patch)]. Blur lowers it; where in the region
    the detail sits does not matter."""
    response = laplacian(torch.nn.functional.pad(images, (1, 1, 1, 1), mode="replicate"))
    return torch.nn.functional.avg_pool2d(response.pow(2), patch, ceil_mode=True).add(1e-6).sqrt()


def detail_loss(predicted: torch.Tensor, goal: torch.Tensor, patch: int) -> torch.Tensor:
    """Mean squared difference of :func:`local_detail`: zero when every region of ``predicted`` is as detailed as
    the same region of ``goal``, large for the blurred mean that MSE alone prefers."""
    return torch.mean((local_detail(predicted, patch) - local_detail(goal, patch)) ** 2)
