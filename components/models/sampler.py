"""Generating the game frame by frame: DDIM sampling with classifier-free guidance on the past frames.

As in the paper, guidance acts on the past frames only, never on the actions::

    v = v_uncond + cfg * (v_cond - v_uncond)

where ``v_cond`` sees the (noise-augmented) context latents and ``v_uncond`` sees zeros in their place (the
"dropped" context of training, ``params.diffusion_checkpoint.context_dropout``); both see the same actions and
the same noise bucket. ``cfg = 1`` turns guidance off (one UNet call per step instead of two).

Context noise at inference (``params.sampler.context_noise_level``): the context latents get Gaussian noise of this
std and the model is told its bucket, as in training. A small level tells the model that its context may be its own
imperfect output, which limits drift over long rollouts; 0 means a clean context (bucket 0).

API (evaluation, distillation and the player use it; keep it stable)::

    from components.models.sampler import Sampler, rollout, make_scheduler, sample_next_latent
    sampler = Sampler(world_model, autoencoder, steps=4, cfg=1.5, context_noise_level=0.1, seed=0)
    sampler.reset(context, context_actions)  # context: K latents [K,C,h,w] or K frames [K,3,H,W] in [0,1]
                                             # (fewer than K: the oldest is repeated); context_actions: the K-1
                                             # actions taken between them (context_actions[i] on context frame i)
    frame = sampler.step(action)             # the action taken on the newest frame -> next frame [3,H,W] in [0,1]
    frames, latents = rollout(sampler, start_context, start_actions, actions)  # autoregressive: [T,3,H,W], [T,C,h,w]

``sample_next_latent(world_model, scheduler, context_latents, context_actions, ...)`` is the batched core without the
autoencoder ([B,K,C,h,w], [B,K] actions including the one leading to the target) for teacher-forced evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from components.models.world_model import ActionConditionedUNet, Scheduler, make_scheduler, noise_bucket

if TYPE_CHECKING:
    from components.models.autoencoder import FrameAutoencoder
    from components.params import SamplerParams


__all__ = ["Sampler", "make_scheduler", "rollout", "sample_next_latent", "guided_velocity"]


def guided_velocity(world_model: ActionConditionedUNet, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                    actions: torch.Tensor, buckets: torch.Tensor, cfg: float) -> torch.Tensor:
    """v prediction with classifier-free guidance on the context (zeros = no context); actions always kept."""
    if cfg == 1.0:
        return world_model(x, t, context, actions, buckets)
    both = world_model(
        torch.cat([x, x]), torch.cat([t, t]), torch.cat([context, torch.zeros_like(context)]),
        torch.cat([actions, actions]), torch.cat([buckets, buckets]),
    )
    v_cond, v_uncond = both.chunk(2)
    return v_uncond + cfg * (v_cond - v_uncond)


@torch.no_grad()
def sample_next_latent(world_model: ActionConditionedUNet, scheduler: Scheduler, context_latents: torch.Tensor,
                       context_actions: torch.Tensor, steps: int = 4, cfg: float = 1.5,
                       context_noise_level: float = 0.0, eta: float = 0.0,
                       generator: torch.Generator | None = None, noise_bucket_override: int | None = None
                       ) -> torch.Tensor:
    """Sample the next latent [B,C,h,w] for a batch of contexts by DDIM with ``steps`` steps.

    ``context_noise_level`` is the std of the noise added to the context; its bucket goes to the model.
    ``noise_bucket_override`` feeds a given bucket without changing the noise (for probing the conditioning).
    ``generator`` (CPU) makes the draw reproducible.
    """
    config = world_model.config
    device = context_latents.device
    dtype = next(world_model.parameters()).dtype
    batch = context_latents.shape[0]
    context = context_latents.to(dtype)
    if context_noise_level > 0:
        eps = torch.randn(context.shape, generator=generator, dtype=dtype).to(device)
        context = context + context_noise_level * eps
    bucket = noise_bucket(context_noise_level, config.max_noise_level, config.noise_buckets).item()
    if noise_bucket_override is not None:
        bucket = noise_bucket_override
    buckets = torch.full((batch,), int(bucket), dtype=torch.long, device=device)
    actions = context_actions.to(device=device, dtype=torch.long)

    scheduler.set_timesteps(steps, device=device)
    shape = (batch, config.latent_channels, *config.latent_size)
    x = torch.randn(shape, generator=generator, dtype=dtype).to(device) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        timesteps = torch.full((batch,), int(t), dtype=torch.long, device=device)
        v = guided_velocity(world_model, x, timesteps, context, actions, buckets, cfg)
        x = scheduler.step(v, t, x, eta=eta, generator=generator).prev_sample
    return world_model.from_residual(x, world_model.residual_base(context, actions))


class Sampler:
    """A playable world model: keeps the last K latents and actions, and generates one frame per action.

    ``autoencoder`` is the object from ``components.models.autoencoder.load_autoencoder`` (``encode``/``decode``,
    ``frame_size``); it may be ``None`` to work in latent space only (``step_latent``).
    """

    def __init__(self, world_model: ActionConditionedUNet, autoencoder: FrameAutoencoder | None = None, steps: int = 4,
                 cfg: float = 1.5,
                 context_noise_level: float = 0.1, eta: float = 0.0, seed: int | None = 0,
                 scheduler: Scheduler | None = None) -> None:
        self.world_model = world_model.eval()
        self.autoencoder = autoencoder
        self.steps, self.cfg, self.context_noise_level, self.eta = steps, cfg, context_noise_level, eta
        self.scheduler = scheduler if scheduler is not None else make_scheduler(world_model.config, "ddim")
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self.device = next(world_model.parameters()).device
        self.latents: torch.Tensor | None = None  # [K, C, h, w]
        self.actions: torch.Tensor | None = None  # [K-1]

    @classmethod
    def from_params(cls, world_model: ActionConditionedUNet, autoencoder: FrameAutoencoder,
                    sampler: SamplerParams) -> Sampler:
        """Build with the ``params.sampler`` section's settings."""
        return cls(world_model, autoencoder, steps=sampler.steps, cfg=sampler.cfg,
                   context_noise_level=sampler.context_noise_level, eta=sampler.eta, seed=sampler.seed)

    @property
    def context(self) -> int:
        return self.world_model.config.context

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        if self.autoencoder is None:
            raise ValueError("this Sampler has no autoencoder: pass latents, not frames")
        with torch.no_grad():
            return self.autoencoder.encode(frames.float()).to(self.device)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if self.autoencoder is None:
            raise ValueError("this Sampler has no autoencoder: use step_latent")
        with torch.no_grad():
            return self.autoencoder.decode(latents).clamp(0, 1)

    def reset(self, context: torch.Tensor, context_actions: Sequence[int] | torch.Tensor) -> None:
        """Start from a context of up to K latents [n,C,h,w] or frames [n,3,H,W] in [0,1], oldest first.

        ``context_actions`` holds the n-1 actions taken on all but the newest context frame. With n < K the
        oldest frame is repeated (with action 0) to fill the context.
        """
        context = torch.as_tensor(context)
        config = self.world_model.config
        if context.dim() != 4:
            raise ValueError(f"context must be [n, C, h, w] latents or [n, 3, H, W] frames, got {tuple(context.shape)}")
        is_latent = tuple(context.shape[1:]) == (config.latent_channels, *config.latent_size)
        latents = context.to(self.device, torch.float32) if is_latent else self.encode(context)
        actions = torch.as_tensor(context_actions, dtype=torch.long).reshape(-1)
        n = latents.shape[0]
        if len(actions) != n - 1:
            raise ValueError(f"{n} context frames need {n - 1} context actions (the action on the newest frame is "
                             f"step()'s argument), got {len(actions)}")
        if n > self.context:
            latents = latents[-self.context:]
            actions = actions[-(self.context - 1):] if self.context > 1 else actions[:0]
        elif n < self.context:
            pad = self.context - n
            latents = torch.cat([latents[:1].expand(pad, -1, -1, -1), latents])
            actions = torch.cat([torch.zeros(pad, dtype=torch.long), actions])
        self.latents, self.actions = latents, actions.to(self.device)

    def step_latent(self, action: int) -> torch.Tensor:
        """Generate the next latent [C,h,w] for ``action`` (taken on the newest frame) and push it into the context."""
        if self.latents is None or self.actions is None:
            raise RuntimeError("call reset() before step()")
        action_t = torch.tensor([int(action)], dtype=torch.long, device=self.device)
        actions = torch.cat([self.actions, action_t])
        latent = sample_next_latent(
            self.world_model, self.scheduler, self.latents[None], actions[None], steps=self.steps, cfg=self.cfg,
            context_noise_level=self.context_noise_level, eta=self.eta, generator=self.generator,
        )[0]
        self.latents = torch.cat([self.latents[1:], latent[None]])
        self.actions = actions[1:]
        return latent

    def step(self, action: int) -> torch.Tensor:
        """Generate and return the next frame [3,H,W] in [0,1] for ``action``."""
        return self.decode(self.step_latent(action)[None])[0]


def rollout(model: Sampler | ActionConditionedUNet, start_context: torch.Tensor,
            start_actions: Sequence[int] | torch.Tensor, actions: Sequence[int] | torch.Tensor,
            autoencoder: FrameAutoencoder | None = None, decode: bool = True, **sampler_kwargs: Any
            ) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Autoregressive generation: reset on ``start_context`` / ``start_actions`` (see ``Sampler.reset``),
    then one step per entry of ``actions`` (``actions[0]`` is taken on the newest context frame).

    ``model`` is a ``Sampler`` or a bare network (then ``autoencoder`` and ``sampler_kwargs`` such as
    ``steps``, ``cfg``, ``context_noise_level``, ``seed`` build one). Returns ``(frames [T,3,H,W] or None when
    ``decode`` is false or there is no autoencoder, latents [T,C,h,w])``.
    """
    sampler = model if isinstance(model, Sampler) else Sampler(model, autoencoder, **sampler_kwargs)
    sampler.reset(start_context, start_actions)
    latents = torch.stack([sampler.step_latent(int(a)) for a in torch.as_tensor(actions).reshape(-1)])
    frames = None
    if decode and sampler.autoencoder is not None:
        frames = torch.cat([sampler.decode(chunk) for chunk in latents.split(16)])
    return frames, latents
