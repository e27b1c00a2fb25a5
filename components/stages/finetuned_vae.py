"""Stage ``finetuned_vae``: freeze the encoder, fine-tune the decoder on game frames with pixel MSE (the paper's step).

With ``detail_weight`` > 0 the loss adds the detail term (``components.evaluation.view_motion.detail_loss``): the local
Laplacian RMS of the decoded frame against the real one, which MSE alone lets blur away.

Trains on the training-split frames of the episodes that passed the latent gate (``data/validated_latents``),
with optional kornia brightness/contrast jitter; the target is the (augmented) frame itself. The encoder, its
quantisation conv and the scaling factor are unchanged, so ``data/validated_latents`` stays valid for the
fine-tuned decoder.

Writes ``data/finetuned_vae/`` (a full ``FrameAutoencoder`` folder), ``metrics/finetuned_vae.json`` (held-out
PSNR, SSIM and sharpness above the HUD of decode(encode(x)) before and after) and
``plots/finetuned_vae/reconstructions.png`` (rows: original, base decoder, fine-tuned decoder). Resumable state:
``.cache/finetuned_vae/<hash>/``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from components.params import load_params

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trajectories", required=True, help="trajectory shards (frames)")
    parser.add_argument("--latents", required=True, help="validated latents (which episodes)")
    parser.add_argument("--autoencoder", required=True, help="base autoencoder folder")
    parser.add_argument("--out", required=True, help="the fine-tuned autoencoder folder to write")
    parser.add_argument("--metrics", required=True, help="metrics JSON")
    parser.add_argument("--plots", required=True, help="folder for the charts and reconstructions (PNG)")
    parser.add_argument("--cache", default=".cache/finetuned_vae", help="resumable state; '' disables it")


def save_grid(path: Path, rows: list, scale: int = 3) -> None:
    """Save rows of frames (each float [N, 3, H, W] in [0, 1]) as one PNG, upscaled ``scale`` times."""
    import numpy as np
    from PIL import Image

    from components.atomic import atomic_path

    gap = 2
    n, _, height, width = rows[0].shape
    canvas = np.full((len(rows) * (height + gap) - gap, n * (width + gap) - gap, 3), 255, np.uint8)
    for r, frames in enumerate(rows):
        pixels = (frames.clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
        for c in range(n):
            y, x = r * (height + gap), c * (width + gap)
            canvas[y : y + height, x : x + width] = pixels[c]
    image = Image.fromarray(canvas).resize((canvas.shape[1] * scale, canvas.shape[0] * scale), Image.Resampling.NEAREST)
    with atomic_path(path, suffix=".png") as temporary:
        image.save(temporary, format="PNG")


def main(args: argparse.Namespace) -> None:
    import hashlib

    import numpy as np
    import torch

    from components import training
    from components.atomic import atomic_write_json
    from components.data.trajectory_store import TrajectoryStore
    from components.errors import PipelineError
    from components.evaluation.plots import training_charts
    from components.models import autoencoder as aem

    params = load_params(args.params)
    p = params.finetuned_vae
    runtime = training.start_runtime(params.device)
    torch.manual_seed(p.seed)
    base = aem.load_autoencoder(args.autoencoder)
    ae = aem.load_autoencoder(args.autoencoder)  # the copy whose decoder is trained
    base.vae.to(runtime.device)
    ae.vae.to(runtime.device)
    trajectories = TrajectoryStore(args.trajectories)
    validated = {e.episode_id for e in TrajectoryStore(args.latents, verify_checksums=False).episodes}
    train_frames = aem.FrameSampler(trajectories, "train", validated)
    if not train_frames.total:
        raise PipelineError(f"{args.latents}: no validated training episodes to fine-tune the decoder on")
    eval_frames, eval_split = aem.evaluation_frames(trajectories, p.eval_frames, validated)

    vae = ae.vae
    for module in (vae.encoder, vae.quant_conv):
        if module is not None:
            module.requires_grad_(False)
    trainable = [t for t in vae.parameters() if t.requires_grad]
    log.info("fine-tuning the decoder: %.2fM of %.2fM params trainable",
             sum(t.numel() for t in trainable) / 1e6, sum(t.numel() for t in vae.parameters()) / 1e6)

    import kornia

    augment = kornia.augmentation.ColorJiggle(brightness=0.15, contrast=0.15, p=0.5) if p.augment else None
    def loss_fn(step: training.Step) -> torch.Tensor:
        frames = train_frames.random_batch(p.batch_size, step.rng).to(step.device)
        if augment is not None:
            frames = augment(frames).clamp(0.0, 1.0)
        with torch.no_grad():
            latents = ae.encode(frames)
        return aem.decoder_loss(ae, latents, frames, p.detail_weight, p.detail_patch, p.ssim_weight)

    before = aem.reconstruction_metrics(base.eval(), eval_frames, view_rows=params.environment.view_rows)
    log.info("base decoder on %s frames: PSNR %.2f dB, SSIM %.4f, sharpness %.3f", eval_split, before["psnr"],
             before["ssim"], before["sharpness"])
    weights = Path(args.autoencoder) / aem.VAE_SUBFOLDER / "diffusion_pytorch_model.safetensors"
    weights_hash = hashlib.sha256(weights.read_bytes()).hexdigest() if weights.is_file() else ""
    key = [p.model_dump(exclude={"checkpoint_every_s"}), base.config(), weights_hash,
           training.inputs_fingerprint(trajectories), sorted(validated)]
    recipe = training.Recipe(training.Budget(p.train_minutes, p.max_steps, p.warmup_steps), p.learning_rate,
                             seed=p.seed, batch_size=p.batch_size, checkpoint_every_s=p.checkpoint_every_s)
    result = training.train(vae, trainable, loss_fn, recipe, runtime, training.run_folder(args.cache, runtime, key),
                            name="finetuned_vae")
    if not result.is_main_process:
        return  # under `accelerate launch` the main process writes the outputs
    vae.eval()
    vae.encoder.requires_grad_(True)  # saved weights are unaffected; keeps the loaded model ordinary
    after = aem.reconstruction_metrics(ae, eval_frames, view_rows=params.environment.view_rows)
    log.info("fine-tuned decoder on %s frames: PSNR %.2f dB (%+.2f), SSIM %.4f, sharpness %.3f", eval_split,
             after["psnr"], after["psnr"] - before["psnr"], after["ssim"], after["sharpness"])

    grid = eval_frames[np.linspace(0, len(eval_frames) - 1, min(p.grid_frames, len(eval_frames))).round().astype(int)]
    with torch.no_grad():
        save_grid(Path(args.plots) / "reconstructions.png", [grid, base.reconstruct(grid), ae.reconstruct(grid)])
    training_charts(args.plots, result.losses, result.learning_rates, [], "finetuned_vae")
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
        "detail_weight": p.detail_weight,
        "steps": result.steps,
        "train_seconds": round(result.seconds, 1),
        "step_ms": round(1000 * result.seconds / result.steps, 1) if result.steps else None,
        "train_samples_per_s": round(result.samples_per_s, 2),
        "processes": runtime.processes,
    }
    ae.vae.to("cpu")
    ae.save(args.out, extra={"source": "finetuned_decoder", "base": str(args.autoencoder), **{
        f"eval_{k}": v for k, v in metrics.items() if k.startswith(("psnr", "ssim", "sharpness"))}})
    atomic_write_json(args.metrics, metrics)
