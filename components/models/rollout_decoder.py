"""The decoder that ships with the 1-step model, fine-tuned on that model's own rollouts.

A 1-step model trained with MSE predicts the mean of the possible next latents, and a few steps into a rollout
its latents are no longer codes the encoder ever made. The decoder of ``finetuned_vae`` learned only the
encoder's codes and renders such latents as a brown smear (README "Distillation"). This step fine-tunes a copy
of it on pairs (the student's latent at rollout step ``s``, driven by the recorded actions from a real training
context, and the real frame at step ``s``), mixed with real latents so that true codes still decode as before,
with pixel MSE plus the detail term (``components.metrics.detail_loss``).

The decoder sits outside the rollout loop: what it draws never feeds back into the next prediction, unlike the
detail term in the student's own loss, whose added detail grew into streaks over long rollouts. The encoder is
untouched, so the latents the world model reads keep their meaning. The paper fine-tunes the decoder on real
latents only (``distilled_model.decoder_minutes: 0`` ships the ``finetuned_vae`` decoder unchanged).

Interface::

    pairs = rollout_pairs(student, latents_store, raw_store, windows=256, max_steps=16, rng=rng)
    loss = autoencoder.decoder_loss(autoencoder, pairs.latents[i], pairs.frames[i], detail_weight, detail_patch)
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from components.errors import PipelineError
from components.models.autoencoder import decoder_loss
from components.training import Budget, Recipe, Step, train

if TYPE_CHECKING:
    from components.data.trajectory_store import TrajectoryStore
    from components.models.autoencoder import FrameAutoencoder
    from components.models.distillation import OneStepStudent


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecoderPairs:
    """Latents and the real frames they should decode to: ``latents`` [N,C,h,w], ``frames`` uint8 [N,3,H,W],
    ``steps`` [N] the rollout step each latent was predicted at (0: the encoder's latent of the frame)."""

    latents: torch.Tensor
    frames: torch.Tensor
    steps: torch.Tensor

    def __len__(self) -> int:
        return len(self.steps)

    def batch(self, size: int, rng: np.random.Generator, real_share: float) -> tuple[torch.Tensor, torch.Tensor]:
        """A random batch with about ``real_share`` of real latents, the rest the student's."""
        real = np.flatnonzero(self.steps.numpy() == 0)
        predicted = np.flatnonzero(self.steps.numpy() > 0)
        n_real = int(rng.binomial(size, real_share)) if len(predicted) else size
        picks = np.concatenate([rng.choice(real, n_real), rng.choice(predicted, size - n_real)])
        return self.latents[picks], self.frames[picks].float().div_(255.0)


def rollout_windows(latents: TrajectoryStore, context: int, max_steps: int, split: str = "train") -> np.ndarray:
    """The ``(shard, start)`` of every window of ``context + max_steps`` rows in ``split``; a ``PipelineError``
    naming ``distilled_model.decoder_rollout_steps`` when no episode is that long."""
    index = latents.window_index(context + max_steps, split)
    if len(index) == 0:
        raise PipelineError(f"no {split} episode has the {context + max_steps} rows a {max_steps}-step rollout "
                            "needs; lower distilled_model.decoder_rollout_steps")
    return index


@torch.no_grad()
def rollout_pairs(student: OneStepStudent, latents: TrajectoryStore, raw: TrajectoryStore, windows: int,
                  max_steps: int, rng: np.random.Generator, split: str = "train",
                  batch_size: int = 64) -> DecoderPairs:
    """Roll ``student`` ``max_steps`` steps from the real contexts of ``windows`` random ``split`` windows of the
    latent store ``latents`` (recorded actions), and pair each predicted latent, and each real latent of the same
    steps, with the real frame of ``raw`` (the trajectory store the latents were encoded from)."""
    context = student.config.context
    length = context + max_steps
    index = rollout_windows(latents, context, max_steps, split)
    chosen = index[rng.choice(len(index), size=min(windows, len(index)), replace=False)]
    rows, frames = [], []
    for shard, start in chosen:
        matching = raw.read_matching_window(latents, int(shard), int(start), length, ["frames"])
        if matching is None:
            raise PipelineError("the raw trajectories do not hold the episodes of the validated latents; rerun "
                                "validated_latents")
        rows.append(latents.read_window(int(shard), int(start), length, ["latents", "actions"]))
        frames.append(matching["frames"][context:])
    real = torch.from_numpy(np.stack([r["latents"] for r in rows])).float()
    actions = torch.from_numpy(np.stack([r["actions"] for r in rows]).astype(np.int64))
    predicted, device = [], student.target_noise.device
    for begin in range(0, len(rows), batch_size):
        ctx = real[begin : begin + batch_size, :context].to(device)
        chunk_actions = actions[begin : begin + batch_size].to(device)
        steps = []
        for step in range(max_steps):
            nxt = student(ctx, chunk_actions[:, step : step + context])
            steps.append(nxt)
            ctx = torch.cat([ctx[:, 1:], nxt[:, None]], dim=1)
        predicted.append(torch.stack(steps, 1).cpu())
    student_latents = torch.cat(predicted)  # [N, S, C, h, w]
    target = torch.from_numpy(np.stack(frames)).permute(0, 1, 4, 2, 3).contiguous()  # uint8 [N, S, 3, H, W]
    n, s = student_latents.shape[:2]
    step_ids = torch.arange(1, s + 1).repeat(n)
    return DecoderPairs(
        latents=torch.cat([student_latents.flatten(0, 1), real[:, context:].flatten(0, 1)]),
        frames=torch.cat([target.flatten(0, 1), target.flatten(0, 1)]),
        steps=torch.cat([step_ids, torch.zeros(n * s, dtype=torch.long)]),
    )


def fine_tune_decoder(student: OneStepStudent, autoencoder: FrameAutoencoder, latents: TrajectoryStore,
                      raw: TrajectoryStore, settings: Any, runtime: Any, folder: Path | None) -> dict[str, Any]:
    """Fine-tune ``autoencoder``'s decoder in place on ``student``'s rollouts (``settings``: the
    ``distilled_model`` params ``decoder_*``, ``batch_size`` and ``seed``) with the training engine on ``runtime``;
    the encoder stays frozen. ``folder`` holds the resumable checkpoint. Returns what the metrics record."""

    started = time.monotonic()
    pairs = rollout_pairs(student, latents, raw, settings.decoder_windows, settings.decoder_rollout_steps,
                          np.random.default_rng(settings.seed + 1))
    rolled = time.monotonic() - started
    log.info("decoder fine-tune: %d latents of %d-step rollouts and as many real ones (%.0f s to roll out)",
             int((pairs.steps > 0).sum()), settings.decoder_rollout_steps, rolled)
    vae = autoencoder.vae
    frozen = [m for m in (vae.encoder, vae.quant_conv) if m is not None]
    for module in frozen:
        module.requires_grad_(False)
    trainable = [t for t in vae.parameters() if t.requires_grad]

    def loss_fn(step: Step) -> torch.Tensor:
        batch_latents, frames = pairs.batch(settings.batch_size, step.rng, settings.decoder_real_share)
        return decoder_loss(autoencoder, batch_latents, frames.to(step.device), settings.decoder_detail_weight,
                            settings.decoder_detail_patch)

    recipe = Recipe(Budget(settings.decoder_minutes, 1_000_000, settings.warmup_steps),
                    settings.decoder_learning_rate, seed=settings.seed + 1, batch_size=settings.batch_size,
                    checkpoint_every_s=settings.checkpoint_every_s)
    result = train(vae, trainable, loss_fn, recipe, runtime, folder, name="shipped decoder")
    vae.eval()
    for module in frozen:
        module.requires_grad_(True)  # saved weights are unaffected; keeps the loaded model ordinary
    return {"decoder_steps": result.steps, "decoder_train_seconds": round(result.seconds, 1),
            "decoder_rollout_seconds": round(rolled, 1), "decoder_pairs": len(pairs)}


__all__ = ["DecoderPairs", "fine_tune_decoder", "rollout_pairs", "rollout_windows"]
