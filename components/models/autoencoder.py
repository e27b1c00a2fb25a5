"""The frame autoencoder: game frames <-> the scaled latents the diffusion world model sees.

``FrameAutoencoder`` wraps a diffusers ``AutoencoderKL`` (Stable Diffusion's VAE, or a small one trained from a
config by the ``base_autoencoder`` stage) and hides three details every user would otherwise repeat:

* **Pixel range.** ``encode`` takes frames as float ``[B, 3, H, W]`` in ``[0, 1]``; ``decode`` returns the same.
* **Padding.** Frames are padded (edge-replicated by default, or zeros) so that the latent height and width are
  multiples of ``latent_multiple`` (the world model's UNet halves them ``log2(latent_multiple)`` times). The
  padding is split evenly between top/bottom and left/right, as the paper pads 240 rows to 256; ``decode`` crops
  it off again. Example: 80x60 frames, 4x downsampling, multiple 4 -> 60 rows padded to 64 -> latents 16x20.
* **Scaling.** Latents are the posterior *mean* (deterministic) times ``scaling_factor``, measured as
  ``1 / std`` of the unscaled latents of training frames, the way SD's 0.18215 was chosen, so the world model
  sees latents of unit variance.

A saved autoencoder is a folder::

    <folder>/vae/                 AutoencoderKL.save_pretrained (config.json + diffusion_pytorch_model.safetensors)
    <folder>/autoencoder.json     {"format_version", "frame_size", "scaling_factor", "latent_multiple",
                                   "pad_mode", "padding", "latent_shape", "downsample_factor", ...}

The module also holds frame sampling and reconstruction metrics for the two autoencoder stages; their
time-budgeted, resumable loop is ``components.training``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import kornia
import numpy as np
import safetensors.torch
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import Decoder
from diffusers.utils import SAFETENSORS_WEIGHTS_NAME

from components.atomic import atomic_directory, atomic_write_json
from components.errors import PipelineError
from components.evaluation.view_motion import view_row_count
from components.metrics import PSNR_CAP_DB, detail_loss, laplacian_energy, psnr_from_mse

if TYPE_CHECKING:
    from components.data.trajectory_store import TrajectoryStore
    from components.params import AutoencoderParams


log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CONFIG_NAME = "autoencoder.json"
VAE_SUBFOLDER = "vae"
PAD_MODES = ("replicate", "constant")


class AutoencoderError(PipelineError):
    """An autoencoder folder or pretrained VAE that cannot be loaded. The message says what was expected."""


# --------------------------------------------------------------------------- geometry


def downsample_factor(vae: AutoencoderKL) -> int:
    """Spatial downsampling of an AutoencoderKL: 2 ** (number of encoder blocks - 1)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def padding_for(frame_size: tuple[int, int], factor: int, latent_multiple: int) -> tuple[int, int, int, int]:
    """Padding (left, right, top, bottom) making both sides multiples of ``factor * latent_multiple``."""
    unit = factor * latent_multiple
    height, width = frame_size
    pad_h = -height % unit
    pad_w = -width % unit
    return (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)


# --------------------------------------------------------------------------- the autoencoder


class FrameAutoencoder:
    """Frames in ``[0, 1]`` <-> scaled, padded latents. See the module docstring for the conventions."""

    def __init__(
        self,
        vae: AutoencoderKL,
        frame_size: tuple[int, int],
        scaling_factor: float = 1.0,
        latent_multiple: int = 4,
        pad_mode: str = "replicate",
    ) -> None:
        if pad_mode not in PAD_MODES:
            raise ValueError(f"pad_mode must be one of {PAD_MODES}, got {pad_mode!r}")
        self.vae = vae
        self.frame_size = (int(frame_size[0]), int(frame_size[1]))
        self.scaling_factor = float(scaling_factor)
        self.latent_multiple = int(latent_multiple)
        self.pad_mode = pad_mode
        self.factor = downsample_factor(vae)
        self.padding = padding_for(self.frame_size, self.factor, self.latent_multiple)

    # ----------------------------------------------------------------- shapes
    @property
    def padded_size(self) -> tuple[int, int]:
        left, right, top, bottom = self.padding
        return (self.frame_size[0] + top + bottom, self.frame_size[1] + left + right)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """``(C, h, w)`` of the latents ``encode`` returns."""
        height, width = self.padded_size
        return (int(self.vae.config.latent_channels), height // self.factor, width // self.factor)

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    # ----------------------------------------------------------------- pixels <-> model input
    def pad(self, frames: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` in ``[0, 1]`` -> padded model input in ``[-1, 1]``."""
        if tuple(frames.shape[-2:]) != self.frame_size:
            raise ValueError(f"expected frames of size (H, W) = {self.frame_size}, got {tuple(frames.shape[-2:])}")
        x = frames * 2.0 - 1.0
        if any(self.padding):
            x = F.pad(x, self.padding, mode=self.pad_mode) if self.pad_mode == "replicate" else F.pad(x, self.padding)
        return x

    def crop(self, images: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """Padded model output in ``[-1, 1]`` -> ``[B, 3, H, W]`` in ``[0, 1]`` (unclamped for training losses)."""
        left, _, top, _ = self.padding
        height, width = self.frame_size
        images = (images[..., top : top + height, left : left + width] + 1.0) / 2.0
        return images.clamp(0.0, 1.0) if clamp else images

    # ----------------------------------------------------------------- the interface
    def encode_unscaled(self, frames: torch.Tensor) -> torch.Tensor:
        """Posterior mean of the padded frames, before scaling."""
        x = self.pad(frames.to(self.device, torch.float32))
        return self.vae.encode(x.contiguous(memory_format=torch.channels_last)).latent_dist.mean

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames ``[B, 3, H, W]`` in ``[0, 1]`` -> scaled latents ``[B, C, h, w]``."""
        return self.encode_unscaled(frames) * self.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents ``[B, C, h, w]`` -> frames ``[B, 3, H, W]`` in ``[0, 1]``, cropped to the frame size."""
        z = latents.to(self.device, torch.float32) / self.scaling_factor
        return self.crop(self.vae.decode(z.contiguous(memory_format=torch.channels_last)).sample)

    def reconstruct(self, frames: torch.Tensor) -> torch.Tensor:
        """``decode(encode(frames))``."""
        return self.decode(self.encode(frames))

    def config(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "frame_size": list(self.frame_size),
            "scaling_factor": self.scaling_factor,
            "latent_multiple": self.latent_multiple,
            "pad_mode": self.pad_mode,
            "padding": dict(zip(("left", "right", "top", "bottom"), self.padding, strict=True)),
            "latent_shape": list(self.latent_shape),
            "downsample_factor": self.factor,
        }

    def save(self, folder: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Write the folder atomically: ``vae/`` (safetensors) and ``autoencoder.json`` (+ ``extra`` keys)."""
        with atomic_directory(folder) as staging:
            self.vae.save_pretrained(staging / VAE_SUBFOLDER, safe_serialization=True)
            atomic_write_json(staging / CONFIG_NAME, {**(extra or {}), **self.config()})
        return Path(folder)

    def eval(self) -> FrameAutoencoder:
        self.vae.eval()
        return self


# --------------------------------------------------------------------------- loading and building


def load_pretrained_vae(path: str | Path) -> Any:
    """Load an SD-style ``AutoencoderKL`` from a local folder (e.g. SD v1.4's ``vae/``, or the repo root above it).

    Nothing is downloaded: a missing or malformed folder raises ``AutoencoderError`` saying what was expected.
    """

    folder = Path(path)
    whole_checkout = (folder / VAE_SUBFOLDER / "config.json").is_file()
    if folder.is_dir() and not (folder / "config.json").is_file() and whole_checkout:
        folder = folder / VAE_SUBFOLDER  # a whole SD checkout: use its vae/ subfolder
    expected = (
        "a local folder holding a diffusers AutoencoderKL: config.json plus diffusion_pytorch_model.safetensors "
        "(or .bin), such as Stable Diffusion v1.4's vae/ subfolder"
    )
    if not folder.is_dir():
        raise AutoencoderError(f"autoencoder.pretrained: {path} does not exist; expected {expected}")
    if not (folder / "config.json").is_file():
        raise AutoencoderError(f"autoencoder.pretrained: {folder} has no config.json; expected {expected}")
    try:
        vae = vae_from_folder(folder)
    except Exception as error:  # diffusers raises OSError/ValueError/EnvironmentError variants
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise AutoencoderError(f"autoencoder.pretrained: cannot load {folder} ({first_line}); "
                               f"expected {expected}") from None
    return vae


def build_vae(
    block_out_channels: Sequence[int],
    latent_channels: int,
    layers_per_block: int,
    norm_num_groups: int,
    mid_block_attention: bool,
    decoder_block_out_channels: Sequence[int] | None = None,
) -> Any:
    """A fresh ``AutoencoderKL`` from a config (the stand-in for SD's VAE when no weights are available).

    ``decoder_block_out_channels`` (listed as ``block_out_channels``, from full resolution down) gives the decoder
    its own widths; it is kept in the VAE's config so that ``vae_from_folder`` rebuilds the same decoder."""

    blocks = len(block_out_channels)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        latent_channels=latent_channels,
        norm_num_groups=norm_num_groups,
        mid_block_add_attention=mid_block_attention,
    )
    if decoder_block_out_channels is not None and list(decoder_block_out_channels) != list(block_out_channels):
        if len(decoder_block_out_channels) != blocks:
            raise ValueError(f"decoder_block_out_channels {list(decoder_block_out_channels)} needs {blocks} widths, "
                             f"one per block of block_out_channels {list(block_out_channels)}")
        vae.decoder = Decoder(
            in_channels=latent_channels,
            out_channels=3,
            up_block_types=("UpDecoderBlock2D",) * blocks,
            block_out_channels=tuple(decoder_block_out_channels),
            layers_per_block=layers_per_block,
            norm_num_groups=norm_num_groups,
            mid_block_add_attention=mid_block_attention,
        )
        vae.register_to_config(decoder_block_out_channels=list(decoder_block_out_channels))
    return vae


def vae_from_params(settings: AutoencoderParams) -> Any:
    """``build_vae`` with the architecture fields of the ``autoencoder`` params section."""
    return build_vae(settings.block_out_channels, settings.latent_channels, settings.layers_per_block,
                     settings.norm_num_groups, settings.mid_block_attention, settings.decoder_block_out_channels)


def vae_from_folder(folder: Path) -> Any:
    """``AutoencoderKL.from_pretrained(folder)``, or, for a VAE saved with its own decoder widths (config key
    ``decoder_block_out_channels``, which diffusers does not know), the same VAE rebuilt by ``build_vae`` with the
    saved weights loaded strictly."""

    config = AutoencoderKL.load_config(str(folder), local_files_only=True)
    if config.get("decoder_block_out_channels") is None:
        return AutoencoderKL.from_pretrained(str(folder), local_files_only=True)
    vae = build_vae(config["block_out_channels"], config["latent_channels"], config["layers_per_block"],
                    config["norm_num_groups"], config.get("mid_block_add_attention", True),
                    config["decoder_block_out_channels"])
    vae.load_state_dict(safetensors.torch.load_file(str(folder / SAFETENSORS_WEIGHTS_NAME)), strict=True)
    return vae


def load_autoencoder(folder: str | Path) -> FrameAutoencoder:
    """Load a folder written by ``FrameAutoencoder.save`` (``data/base_autoencoder`` or ``data/finetuned_vae``)."""

    folder = Path(folder)
    config_file = folder / CONFIG_NAME
    what = f"a folder written by FrameAutoencoder.save ({CONFIG_NAME} and {VAE_SUBFOLDER}/)"
    if not folder.is_dir():
        raise AutoencoderError(f"{folder}: no such autoencoder folder; expected {what}. Run its DVC stage first.")
    if not config_file.is_file():
        raise AutoencoderError(f"{config_file}: missing; {folder} is not {what}")
    try:
        config = json.loads(config_file.read_text())
        if config.get("format_version") != FORMAT_VERSION:
            raise AutoencoderError(
                f"{config_file}: format_version {config.get('format_version')!r} is not {FORMAT_VERSION}; "
                "re-run the stage that wrote it"
            )
        frame_size = tuple(config["frame_size"])
        scaling = float(config["scaling_factor"])
        multiple = int(config["latent_multiple"])
        pad_mode = str(config["pad_mode"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise AutoencoderError(f"{config_file}: malformed ({error!r}); expected {what}") from None
    if not (folder / VAE_SUBFOLDER / "config.json").is_file():
        raise AutoencoderError(f"{folder / VAE_SUBFOLDER}: missing AutoencoderKL weights; expected {what}")
    try:
        vae = vae_from_folder(folder / VAE_SUBFOLDER)
    except Exception as error:
        raise AutoencoderError(f"{folder / VAE_SUBFOLDER}: cannot load the AutoencoderKL ({error}); "
                               f"expected {what}") from None
    vae = vae.to(memory_format=torch.channels_last).eval()
    return FrameAutoencoder(vae, frame_size, scaling, multiple, pad_mode)


# --------------------------------------------------------------------------- frames from trajectory shards


class FrameSampler:
    """Random and fixed batches of frames from a ``TrajectoryStore``'s episodes of one split."""

    def __init__(self, store: TrajectoryStore, split: str | None, episode_ids: set[str] | None = None) -> None:
        self.store = store
        self.rows: list[np.ndarray] = []  # per shard: row indices that belong to the split
        episodes = [e for e in store.split(split) if episode_ids is None or e.episode_id in episode_ids]
        for shard_index, _ in enumerate(store.shards):
            ranges = [np.arange(e.start, e.start + e.length) for e in episodes if e.shard == shard_index]
            self.rows.append(np.concatenate(ranges) if ranges else np.zeros(0, np.int64))
        self.sizes = np.array([len(r) for r in self.rows])
        self.total = int(self.sizes.sum())

    def frames(self, picks: np.ndarray) -> torch.Tensor:
        """Frames for global picks (indices into the split's rows), float ``[B, 3, H, W]`` in ``[0, 1]``."""
        offsets = np.concatenate([[0], np.cumsum(self.sizes)])
        shard_of = np.searchsorted(offsets, picks, side="right") - 1
        out = []
        for pick, shard in zip(picks, shard_of, strict=True):
            row = self.rows[shard][pick - offsets[shard]]
            out.append(self.store.shards[shard].array("frames")[row])
        array = np.stack(out)
        return torch.from_numpy(array).permute(0, 3, 1, 2).float().div_(255.0)

    def random_batch(self, batch_size: int, rng: np.random.Generator) -> torch.Tensor:
        return self.frames(np.sort(rng.integers(0, self.total, batch_size)))

    def evenly_spaced(self, count: int) -> torch.Tensor:
        """A fixed, reproducible subset (evaluation frames)."""
        count = min(count, self.total)
        return self.frames(np.linspace(0, self.total - 1, count).round().astype(np.int64)) if count else torch.zeros(0)


def evaluation_frames(store: TrajectoryStore, count: int,
                      episode_ids: set[str] | None = None) -> tuple[torch.Tensor, str]:
    """Held-out frames for metrics; falls back (with a warning) to training frames when no episode is held out."""
    heldout = FrameSampler(store, "heldout", episode_ids)
    if heldout.total:
        return heldout.evenly_spaced(count), "heldout"
    log.warning("no held-out episodes in the trajectories: evaluating on training frames instead")
    return FrameSampler(store, "train", episode_ids).evenly_spaced(count), "train"


@torch.no_grad()
def reconstruction_metrics(autoencoder: FrameAutoencoder, frames: torch.Tensor, batch_size: int = 64,
                           view_rows: float = 1.0) -> dict[str, float]:
    """PSNR (pooled over the mean squared error of all frames, in dB), mean SSIM and sharpness (Laplacian energy
    over the real frames', on the top ``view_rows`` of the rows; ``components.evaluation.view_motion.sharpness``) of
    decode(encode(x))."""


    rows = view_row_count(frames.shape[2], view_rows)
    squared, ssim, pixels, energy, real_energy = 0.0, 0.0, 0, 0.0, 0.0
    for start in range(0, len(frames), batch_size):
        batch = frames[start : start + batch_size].to(autoencoder.device)
        recon = autoencoder.reconstruct(batch)
        squared += F.mse_loss(recon, batch, reduction="sum").item()
        ssim += kornia.metrics.ssim(recon, batch, window_size=7).mean(dim=(1, 2, 3)).sum().item()
        pixels += batch.numel()
        energy += float(laplacian_energy(recon[:, :, :rows]).sum())
        real_energy += float(laplacian_energy(batch[:, :, :rows]).sum())
    mse = squared / max(pixels, 1)
    return {
        "psnr": min(float(psnr_from_mse(mse)), PSNR_CAP_DB),
        "ssim": ssim / max(len(frames), 1),
        "sharpness": energy / real_energy if real_energy > 0 else float("nan"),
        "mse": mse,
        "frames": int(len(frames)),
    }


@torch.no_grad()
def measure_scaling_factor(autoencoder: FrameAutoencoder, frames: torch.Tensor, batch_size: int = 64) -> float:
    """``1 / std`` of the unscaled latents of ``frames`` (training frames), as SD's 0.18215 was measured."""
    latents = torch.cat([autoencoder.encode_unscaled(frames[i : i + batch_size])
                         for i in range(0, len(frames), batch_size)])
    std = latents.float().std().item()
    if not math.isfinite(std) or std <= 0:
        raise PipelineError(f"cannot measure the latent scaling factor: latent std is {std}; the autoencoder is broken")
    return 1.0 / std


def training_loss(vae: AutoencoderKL, x: torch.Tensor, kl_weight: float, mixed_precision: str = "no") -> torch.Tensor:
    """``base_autoencoder``'s loss on a padded batch ``x`` in ``[-1, 1]``: MSE + ``kl_weight`` * KL.

    ``mixed_precision="bf16"`` runs the forward pass under bf16 autocast; the loss itself is float32.
    """
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=mixed_precision == "bf16"):
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
    return F.mse_loss(recon.float(), x) + kl_weight * kl_divergence(posterior)


def kl_divergence(posterior: Any) -> torch.Tensor:
    """Mean KL of a diagonal Gaussian posterior to N(0, 1), per latent element."""
    mean, var, logvar = posterior.mean.float(), posterior.var.float(), posterior.logvar.float()
    return 0.5 * (mean.pow(2) + var - 1.0 - logvar).mean()


def decoder_loss(autoencoder: FrameAutoencoder, latents: torch.Tensor, frames: torch.Tensor, detail_weight: float = 0.0,
                 detail_patch: int = 4, ssim_weight: float = 0.0) -> torch.Tensor:
    """A decoder fine-tune's loss: pixel MSE of decode(``latents``) (scaled) against ``frames`` [B,3,H,W] in
    ``[0, 1]``, plus ``detail_weight`` times the detail term (``components.metrics.detail_loss``) and
    ``ssim_weight`` times the SSIM loss."""

    z = latents.to(autoencoder.device, torch.float32) / autoencoder.scaling_factor
    z = z.contiguous(memory_format=torch.channels_last)
    output = autoencoder.crop(autoencoder.vae.decode(z).sample, clamp=False)
    loss = F.mse_loss(output, frames)
    if ssim_weight:
        loss = loss + ssim_weight * kornia.losses.ssim_loss(output.clamp(0, 1), frames, window_size=7)
    if detail_weight:
        loss = loss + detail_weight * detail_loss(output, frames, detail_patch)
    return loss
