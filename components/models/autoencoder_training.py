"""Training the frame autoencoder on the shared engine (``components.training``): the two autoencoder stages.

* ``train_base_autoencoder`` (stage ``base_autoencoder``): a small ``AutoencoderKL`` built from
  ``autoencoder.*`` and trained on training-split frames with MSE + KL (bf16 autocast with
  ``autoencoder.mixed_precision``), held-out PSNR measured as it goes; or, with ``autoencoder.pretrained``, a local
  SD-style VAE only measured. Either way the latent scaling factor is measured on training frames.
* ``fine_tune_on_frames`` (stage ``finetuned_vae``): the encoder frozen, the decoder trained on the frames of the
  episodes that passed the latent gate with pixel MSE (the paper's step), plus the detail and SSIM terms
  (``components.models.autoencoder.decoder_loss``) and optional brightness/contrast jitter. The encoder, its
  quantisation conv and the scaling factor are unchanged, so the latents stay valid.

Both return an ``AutoencoderRun``; the stage writes it. Resumable state: ``<cache>/<run key>/``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import kornia
import numpy as np
import torch

from components import training
from components.atomic import file_sha256
from components.data.trajectory_store import TrajectoryStore
from components.errors import PipelineError
from components.images import to_uint8
from components.models.autoencoder import (
    VAE_SUBFOLDER,
    FrameAutoencoder,
    FrameSampler,
    decoder_loss,
    evaluation_frames,
    load_autoencoder,
    load_pretrained_vae,
    measure_scaling_factor,
    reconstruction_metrics,
    training_loss,
    vae_from_params,
)

if TYPE_CHECKING:
    from components.params import Params


log = logging.getLogger(__name__)


@dataclass
class AutoencoderRun:
    autoencoder: FrameAutoencoder  # on the CPU, in eval mode
    metrics: dict[str, Any]
    saved_extra: dict[str, Any]  # what the saved folder's autoencoder.json records besides the geometry
    result: training.TrainResult | None  # None: nothing was trained (a pretrained VAE)
    curve: list[dict[str, float]] = field(default_factory=list)  # held-out metrics against training time
    grid: list[tuple[str, list[np.ndarray]]] = field(default_factory=list)  # labelled rows of uint8 frames


def train_base_autoencoder(params: Params, trajectories: str | Path, cache: str | Path | None) -> AutoencoderRun | None:
    """Build (or load) and train the base autoencoder; None on a process other than the main one."""

    settings = params.autoencoder
    runtime = training.start_runtime(params.device)
    torch.manual_seed(settings.seed)
    store = TrajectoryStore(trajectories)
    train_frames = FrameSampler(store, "train")
    if not train_frames.total:
        raise PipelineError(f"{trajectories}: no training-split episodes to train the autoencoder on")
    frame_size = (params.environment.height, params.environment.width)
    view_rows = params.environment.view_rows
    stored = tuple(store.shards[0].array("frames").shape[1:3])
    if stored != frame_size:
        raise PipelineError(
            f"{trajectories}: frames are {stored[1]}x{stored[0]} but environment.resolution is "
            f"{params.environment.width}x{params.environment.height}; re-run raw_trajectories"
        )
    eval_frames, eval_split = evaluation_frames(store, settings.eval_frames)

    if settings.pretrained:
        vae = load_pretrained_vae(settings.pretrained)
        source = {"source": "pretrained", "pretrained": settings.pretrained}
    else:
        vae = vae_from_params(settings)
        source = {"source": "trained"}
    vae = vae.to(memory_format=torch.channels_last)
    autoencoder = FrameAutoencoder(vae, frame_size, 1.0, settings.latent_multiple, settings.pad_mode)
    log.info(
        "autoencoder: %s, %.2fM params, frames %s padded to %s, latents %s",
        source["source"], sum(t.numel() for t in vae.parameters()) / 1e6, frame_size, autoencoder.padded_size,
        autoencoder.latent_shape,
    )

    result = None
    vae.to(runtime.device)
    if not settings.pretrained:
        def loss_fn(step: training.Step) -> torch.Tensor:
            x = autoencoder.pad(train_frames.random_batch(settings.batch_size, step.rng).to(step.device))
            return training_loss(vae, x.contiguous(memory_format=torch.channels_last), settings.kl_weight,
                                 settings.mixed_precision)

        budget = training.Budget(settings.train_minutes, settings.max_steps, settings.warmup_steps)
        recipe = training.Recipe(budget, settings.learning_rate, seed=settings.seed, batch_size=settings.batch_size,
                                 eval_every_s=settings.eval_every_s, checkpoint_every_s=settings.checkpoint_every_s)
        folder = training.run_folder(cache, runtime, settings.model_dump(exclude={"checkpoint_every_s"}),
                                     frame_size, training.inputs_fingerprint(store))
        result = training.train(vae, list(vae.parameters()), loss_fn, recipe, runtime, folder, name="base_autoencoder",
                                evaluate=lambda: reconstruction_metrics(autoencoder, eval_frames, view_rows=view_rows))
    if not runtime.is_main:
        return None
    vae.eval()
    scaling_frames = train_frames.evenly_spaced(settings.scaling_frames)
    autoencoder.scaling_factor = measure_scaling_factor(autoencoder, scaling_frames)
    # the engine's last curve point is these weights' held-out numbers (the scaling factor does not change them)
    final = result.curve[-1] if result else reconstruction_metrics(autoencoder, eval_frames, view_rows=view_rows)
    log.info("scaling factor %.5f; %s PSNR %.2f dB, SSIM %.4f, sharpness %.3f", autoencoder.scaling_factor, eval_split,
             final["psnr"], final["ssim"], final["sharpness"])

    trained = {} if result is None else {
        "steps": result.steps, "train_seconds": round(result.seconds, 1), "resumed_from_step": result.resumed_from_step,
        "train_samples_per_s": round(result.samples_per_s, 2), "processes": runtime.processes,
    }
    metrics = {
        **source, "eval_split": eval_split, "psnr": final["psnr"], "ssim": final["ssim"],
        "sharpness": final["sharpness"], "scaling_factor": autoencoder.scaling_factor,
        "latent_shape": list(autoencoder.latent_shape),
        **trained,
    }
    vae.to("cpu")
    curve = [] if result is None else list(result.curve)  # from the untrained start to the end of training
    return AutoencoderRun(autoencoder, metrics, {**source, "eval_split": eval_split, "eval_psnr": final["psnr"]},
                          result, curve)


def fine_tune_on_frames(params: Params, base_folder: str | Path, trajectories: str | Path, latents: str | Path,
                        cache: str | Path | None) -> AutoencoderRun | None:
    """Fine-tune the decoder of the autoencoder in ``base_folder`` on the frames of the validated episodes; None on
    a process other than the main one. ``grid``: original, base decoder and fine-tuned rows of held-out frames."""

    settings = params.finetuned_vae
    runtime = training.start_runtime(params.device)
    torch.manual_seed(settings.seed)
    base = load_autoencoder(base_folder)
    autoencoder = load_autoencoder(base_folder)  # the copy whose decoder is trained
    base.vae.to(runtime.device)
    autoencoder.vae.to(runtime.device)
    frames = TrajectoryStore(trajectories)
    validated = {e.episode_id for e in TrajectoryStore(latents, verify_checksums=False).episodes}
    train_frames = FrameSampler(frames, "train", validated)
    if not train_frames.total:
        raise PipelineError(f"{latents}: no validated training episodes to fine-tune the decoder on")
    eval_frames, eval_split = evaluation_frames(frames, settings.eval_frames, validated)

    vae = autoencoder.vae
    for module in (vae.encoder, vae.quant_conv):
        if module is not None:
            module.requires_grad_(False)
    trainable = [t for t in vae.parameters() if t.requires_grad]
    log.info("fine-tuning the decoder: %.2fM of %.2fM params trainable",
             sum(t.numel() for t in trainable) / 1e6, sum(t.numel() for t in vae.parameters()) / 1e6)

    augment = kornia.augmentation.ColorJiggle(brightness=0.15, contrast=0.15, p=0.5) if settings.augment else None

    def loss_fn(step: training.Step) -> torch.Tensor:
        batch = train_frames.random_batch(settings.batch_size, step.rng).to(step.device)
        if augment is not None:
            batch = augment(batch).clamp(0.0, 1.0)
        with torch.no_grad():
            batch_latents = autoencoder.encode(batch)
        return decoder_loss(autoencoder, batch_latents, batch, settings.detail_weight, settings.detail_patch,
                            settings.ssim_weight)

    view_rows = params.environment.view_rows
    before = reconstruction_metrics(base.eval(), eval_frames, view_rows=view_rows)
    log.info("base decoder on %s frames: PSNR %.2f dB, SSIM %.4f, sharpness %.3f", eval_split, before["psnr"],
             before["ssim"], before["sharpness"])
    weights = Path(base_folder) / VAE_SUBFOLDER / "diffusion_pytorch_model.safetensors"
    weights_hash = file_sha256(weights) if weights.is_file() else ""
    key = [settings.model_dump(exclude={"checkpoint_every_s"}), base.config(), weights_hash,
           training.inputs_fingerprint(frames), sorted(validated)]
    budget = training.Budget(settings.train_minutes, settings.max_steps, settings.warmup_steps)
    recipe = training.Recipe(budget, settings.learning_rate, seed=settings.seed, batch_size=settings.batch_size,
                             checkpoint_every_s=settings.checkpoint_every_s)
    result = training.train(vae, trainable, loss_fn, recipe, runtime, training.run_folder(cache, runtime, key),
                            name="finetuned_vae")
    if not result.is_main_process:
        return None
    vae.eval()
    vae.encoder.requires_grad_(True)  # saved weights are unaffected; keeps the loaded model ordinary
    after = reconstruction_metrics(autoencoder, eval_frames, view_rows=view_rows)
    log.info("fine-tuned decoder on %s frames: PSNR %.2f dB (%+.2f), SSIM %.4f, sharpness %.3f", eval_split,
             after["psnr"], after["psnr"] - before["psnr"], after["ssim"], after["sharpness"])

    picks = np.linspace(0, len(eval_frames) - 1, min(settings.grid_frames, len(eval_frames))).round().astype(int)
    shown = eval_frames[picks]
    with torch.no_grad():
        grid = [(label, list(to_uint8(f))) for label, f in
                [("original", shown), ("base decoder", base.reconstruct(shown)),
                 ("fine-tuned", autoencoder.reconstruct(shown))]]
    metrics = {
        "eval_split": eval_split,
        "eval_frames": before["frames"],
        "psnr_before": before["psnr"],
        "psnr_after": after["psnr"],
        "psnr_gain": after["psnr"] - before["psnr"],
        "ssim_before": before["ssim"],
        "ssim_after": after["ssim"],
        "sharpness_before": before["sharpness"],
        "sharpness_after": after["sharpness"],
        "detail_weight": settings.detail_weight,
        "steps": result.steps,
        "train_seconds": round(result.seconds, 1),
        "step_ms": round(1000 * result.seconds / result.steps, 1) if result.steps else None,
        "train_samples_per_s": round(result.samples_per_s, 2),
        "processes": runtime.processes,
    }
    autoencoder.vae.to("cpu")
    saved_extra = {"source": "finetuned_decoder", "base": str(base_folder),
                   **{f"eval_{k}": v for k, v in metrics.items() if k.startswith(("psnr", "ssim", "sharpness"))}}
    return AutoencoderRun(autoencoder, metrics, saved_extra, result, grid=grid)


__all__ = ["AutoencoderRun", "fine_tune_on_frames", "train_base_autoencoder"]
