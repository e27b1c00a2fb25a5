"""The diffusion world model: a UNet that denoises the next frame's latent given past latents and actions.

This is GameNGen's model (see ``../shared/reference/gamengen-paper.md``, "Model and training"):

* A diffusers ``UNet2DConditionModel``. By default it is built from the small config in ``params.world_model``;
  with ``pretrained_unet`` set it is loaded from a local SD v1.4 style ``unet/`` folder and ``conv_in`` is widened
  to ``C * (K + 1)`` input channels. The pretrained weights keep acting on the noisy target (channels ``0..C-1``)
  and the new context channels start with zero weights, so training starts from the pretrained model's behaviour.
* Input: the noisy target latent concatenated on the channel axis with the K past latents, oldest first:
  ``[noisy_target, ctx_0, ..., ctx_{K-1}]``.
* Actions: one learned embedding per action id plus a learned embedding per context position (cross-attention is
  order-blind without it); the K tokens replace the text tokens in cross-attention. The token width is the UNet's
  ``cross_attention_dim`` (for SD v1.4: 768), so no projection is needed.
* Noise augmentation of the context: a noise std ``level`` in ``[0, max_level]`` is discretised into ``buckets``
  (``noise_bucket``) and the bucket's learned embedding (``class_labels`` of the UNet, ``num_class_embeds``) is
  added to the timestep embedding. The context is noised additively: ``ctx + level * eps`` (latents are scaled to
  about unit variance by the autoencoder).
* Unconditional context (for classifier-free guidance on past frames): the context latents replaced by zeros,
  with the actions kept. Training drops the context this way with probability ``context_dropout``.
* Output: v-prediction (``scheduler.get_velocity``).

The interface other stages use (keep it stable)::

    from components.models.world_model import ActionConditionedUNet, load_world_model
    world_model = load_world_model("data/diffusion_checkpoint")
    v = world_model(noisy_target,      # [B, C, h, w]
                    timesteps,         # [B] long, in [0, num_train_timesteps)
                    context_latents,   # [B, K, C, h, w], oldest first
                    context_actions,   # [B, K] long; context_actions[:, i] is the action taken on context frame
                                       #   i, so the last one is the action that leads to the target frame
                    noise_buckets)     # [B] long, in [0, buckets); see noise_bucket()
    world_model.config                 # WorldModelConfig
    world_model.save(folder)           # atomic: config.json + model.safetensors + scheduler_config.json

Windows from ``TrajectoryStore`` map directly: rows ``s..s+K-1`` give the context latents and actions, row ``s+K``
is the target.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from safetensors.torch import load_file
from torch import nn

from components.atomic import atomic_directory, atomic_write_json, save_safetensors
from components.errors import PipelineError
from components.models.motion_warp import ActionWarp, previous_actions
from components.params import ParamsError

if TYPE_CHECKING:
    from components.params import WorldModelParams


log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
SCHEDULER_FILE = "scheduler_config.json"
FORMAT = "gamengen-world-model/1"
Scheduler: TypeAlias = DDPMScheduler | DDIMScheduler  # make_scheduler's "ddpm" (training) and "ddim" (sampling)


@dataclass
class WorldModelConfig:
    """Everything needed to rebuild the network (saved as ``config.json`` beside the weights)."""

    context: int  # K
    latent_channels: int  # C
    latent_size: tuple[int, int]  # (h, w)
    num_actions: int
    noise_buckets: int = 10
    max_noise_level: float = 0.7
    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"
    zero_terminal_snr: bool = True
    action_warp: bool = False  # the last context latent, warped by its action, as C extra input channels
    warp_resampling: str = "nearest"  # nearest | linear (components/models/motion_warp.py)
    predict_residual: bool = False  # diffuse (next - base) / residual_scale, base = the (warped) last latent
    unet: dict[str, Any] = field(default_factory=dict)  # UNet2DConditionModel config (in_channels etc. included)

    @property
    def cross_attention_dim(self) -> int:
        return int(self.unet["cross_attention_dim"])

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["latent_size"] = list(self.latent_size)
        data["format"] = FORMAT
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WorldModelConfig:
        data = dict(data)
        data.pop("format", None)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise PipelineError(f"world model config has unknown keys {unknown}; was it written by a newer version?")
        data["latent_size"] = tuple(data["latent_size"])
        return cls(**data)


def noise_bucket(level: torch.Tensor | float, max_level: float, buckets: int) -> torch.Tensor:
    """Discretise a context noise std into a bucket id: ``floor(level / max_level * buckets)``, clamped.

    Level 0 is bucket 0; levels at or above ``max_level`` are the last bucket.
    """
    level = torch.as_tensor(level, dtype=torch.float32)
    if max_level <= 0:
        return torch.zeros_like(level, dtype=torch.long)
    return (level / max_level * buckets).floor().long().clamp(0, buckets - 1)


def unet_config_from_params(params: WorldModelParams, input_latents: int, latent_channels: int,
                            latent_size: tuple[int, int], noise_buckets: int) -> dict[str, Any]:
    """The ``UNet2DConditionModel`` config for a small UNet built from ``params.world_model``."""

    blocks = len(params.block_out_channels)
    if len(params.down_block_types) != blocks or len(params.up_block_types) != blocks:
        raise ParamsError(
            f"world_model.down_block_types / up_block_types: need one entry per block_out_channels entry "
            f"({blocks}), got {len(params.down_block_types)} and {len(params.up_block_types)}"
        )
    bad = [c for c in params.block_out_channels if c % params.norm_num_groups]
    if bad:
        raise ParamsError(
            f"world_model.block_out_channels: each must be divisible by norm_num_groups "
            f"({params.norm_num_groups}), got {bad}"
        )
    if not any("CrossAttn" in t for t in params.down_block_types):
        raise ParamsError("world_model.down_block_types: at least one CrossAttn block is needed for the actions")
    return {
        "sample_size": list(latent_size),
        "in_channels": latent_channels * input_latents,
        "out_channels": latent_channels,
        "block_out_channels": list(params.block_out_channels),
        "down_block_types": list(params.down_block_types),
        "up_block_types": list(params.up_block_types),
        "layers_per_block": params.layers_per_block,
        "attention_head_dim": params.attention_head_dim,
        "norm_num_groups": params.norm_num_groups,
        "cross_attention_dim": params.cross_attention_dim,
        "num_class_embeds": noise_buckets,
    }


class ActionConditionedUNet(nn.Module):
    """UNet denoiser conditioned on K past latents (channels), K actions (cross-attention) and a noise bucket."""

    residual_scale: torch.Tensor  # a buffer, registered with predict_residual

    def __init__(self, config: WorldModelConfig) -> None:
        super().__init__()

        self.config = config
        self.unet = UNet2DConditionModel(**config.unet)
        width = config.cross_attention_dim
        self.action_embedding = nn.Embedding(config.num_actions, width)
        self.position_embedding = nn.Parameter(torch.zeros(config.context, width))
        nn.init.normal_(self.action_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding, std=0.02)
        self.action_warp = (ActionWarp(config.num_actions, config.latent_size, config.warp_resampling)
                            if config.action_warp else None)
        if config.predict_residual:
            self.register_buffer("residual_scale", torch.ones(()))  # std of next - base, measured on training data

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_params(cls, world_model: WorldModelParams, latent_channels: int, latent_size: tuple[int, int],
                    num_actions: int) -> ActionConditionedUNet:
        """Build from ``params.world_model``: the small config, or a local pretrained UNet when one is set."""
        if world_model.pretrained_unet:
            return cls.from_pretrained_unet(
                world_model.pretrained_unet, world_model, latent_channels, latent_size, num_actions
            )
        unet = unet_config_from_params(world_model, _input_latents(world_model), latent_channels, latent_size,
                                       world_model.noise_buckets)
        return cls(_config(world_model, latent_channels, latent_size, num_actions, unet))

    @classmethod
    def from_pretrained_unet(cls, folder: str | Path, world_model: WorldModelParams, latent_channels: int,
                             latent_size: tuple[int, int], num_actions: int) -> ActionConditionedUNet:
        """Start from a local ``UNet2DConditionModel`` folder (e.g. SD v1.4 ``unet/``), never from a hub.

        ``conv_in`` gets ``C * (K + 1)`` input channels (``C * (K + 2)`` with the action warp): its pretrained
        weights are copied onto the noisy-target channels and the context channels get zero weights (paper). A learned
        noise-bucket embedding is added
        (zero-initialised, so the pretrained model's output is unchanged at the start). The action tokens take
        the pretrained ``cross_attention_dim``.
        """

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise PipelineError(
                f"world_model.pretrained_unet: {folder} is not a diffusers UNet folder (no config.json). Give the "
                f"path of a local SD v1.4 'unet/' folder, or set pretrained_unet: null to build the small UNet"
            )
        pretrained = UNet2DConditionModel.from_pretrained(folder)
        base = dict(pretrained.config)
        if base["in_channels"] != latent_channels:
            raise PipelineError(
                f"{folder}: the pretrained UNet takes {base['in_channels']} latent channels but the autoencoder "
                f"makes {latent_channels}; use an autoencoder with {base['in_channels']} latent channels"
            )
        unet_config = {k: v for k, v in base.items() if not k.startswith("_")}
        unet_config.update(
            in_channels=latent_channels * _input_latents(world_model),
            out_channels=latent_channels,
            sample_size=list(latent_size),
            num_class_embeds=world_model.noise_buckets,
            class_embed_type=None,
        )
        model = cls(_config(world_model, latent_channels, latent_size, num_actions, unet_config))
        state = pretrained.state_dict()
        old = state.pop("conv_in.weight")
        widened = torch.zeros_like(model.unet.conv_in.weight)
        widened[:, :latent_channels] = old
        state["conv_in.weight"] = widened
        missing, unexpected = model.unet.load_state_dict(state, strict=False)
        if unexpected:
            raise PipelineError(f"{folder}: weights that do not fit the widened UNet: {unexpected[:5]}")
        if [k for k in missing if not k.startswith("class_embedding")]:
            raise PipelineError(f"{folder}: weights missing from the pretrained UNet: {missing[:5]}")
        nn.init.zeros_(model.unet.class_embedding.weight)
        log.info("loaded pretrained UNet from %s; conv_in widened %d -> %d channels", folder, latent_channels,
                 unet_config["in_channels"])
        return model

    # ------------------------------------------------------------------ forward

    def action_tokens(self, context_actions: torch.Tensor) -> torch.Tensor:
        """[B, K] action ids -> [B, K, D] cross-attention tokens (action embedding + position embedding).

        The range check is data-dependent, so it is skipped while ``torch.export`` traces the model (ONNX export).
        """
        if not torch.compiler.is_exporting() and not self._actions_in_range(context_actions):
            raise ValueError(f"action ids must be in [0, {self.config.num_actions}), got "
                             f"{context_actions.min().item()}..{context_actions.max().item()}")
        return self.action_embedding(context_actions) + self.position_embedding

    def _actions_in_range(self, context_actions: torch.Tensor) -> bool:
        return bool(context_actions.min() >= 0 and context_actions.max() < self.config.num_actions)

    def forward(self, noisy_target: torch.Tensor, timesteps: torch.Tensor, context_latents: torch.Tensor,
                context_actions: torch.Tensor, noise_buckets: torch.Tensor) -> torch.Tensor:
        """Predict v for ``noisy_target`` [B,C,h,w]; see the module docstring for every argument."""
        batch, k = context_latents.shape[:2]
        if k != self.config.context:
            raise ValueError(f"expected {self.config.context} context latents, got {k}")
        inputs = [noisy_target, context_latents.reshape(batch, -1, *context_latents.shape[-2:])]
        if self.action_warp is not None:
            inputs.append(self.action_warp(context_latents[:, -1], previous_actions(context_actions),
                                           context_actions[:, -1]))
        x = torch.cat(inputs, dim=1)
        tokens = self.action_tokens(context_actions).to(x.dtype)
        return self.unet(x, timesteps, encoder_hidden_states=tokens, class_labels=noise_buckets).sample

    # ------------------------------------------------------------------ what is diffused

    def residual_base(self, context_latents: torch.Tensor, context_actions: torch.Tensor) -> torch.Tensor | None:
        """With ``predict_residual``, what the next latent is predicted as a difference from: the last context
        latent, moved by the action warp when the model has one. None for the paper's parametrisation."""
        if not self.config.predict_residual:
            return None
        last = context_latents[:, -1]
        if self.action_warp is None:
            return last
        return self.action_warp(last, previous_actions(context_actions), context_actions[:, -1])

    def to_residual(self, latent: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
        """The diffused quantity for ``latent``: ``(latent - base) / residual_scale``, or ``latent`` itself."""
        return latent if base is None else (latent - base) / self.residual_scale

    def from_residual(self, residual: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
        """The next latent from a sampled ``residual`` (the inverse of ``to_residual``)."""
        return residual if base is None else base + residual * self.residual_scale

    # ------------------------------------------------------------------ persistence

    def save(self, folder: str | Path) -> Path:
        """Write ``config.json``, ``model.safetensors`` and ``scheduler_config.json`` into ``folder`` atomically."""

        with atomic_directory(folder) as staging:
            save_safetensors(staging / WEIGHTS_FILE, self.state_dict(), metadata={"format": FORMAT})
            atomic_write_json(staging / CONFIG_FILE, self.config.to_dict())
            make_scheduler(self.config, "ddim").save_config(staging)
        return Path(folder)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _config(world_model: WorldModelParams, latent_channels: int, latent_size: tuple[int, int], num_actions: int,
            unet: dict[str, Any]) -> WorldModelConfig:
    return WorldModelConfig(
        context=world_model.context,
        latent_channels=latent_channels,
        latent_size=(int(latent_size[0]), int(latent_size[1])),
        num_actions=num_actions,
        noise_buckets=world_model.noise_buckets,
        max_noise_level=world_model.max_noise_level,
        num_train_timesteps=world_model.num_train_timesteps,
        beta_schedule=world_model.beta_schedule,
        zero_terminal_snr=world_model.zero_terminal_snr,
        action_warp=world_model.action_warp,
        warp_resampling=world_model.warp_resampling,
        predict_residual=world_model.predict_residual,
        unet=unet,
    )


def _input_latents(world_model: WorldModelParams) -> int:
    """Latents stacked on the UNet's input channels: the noisy target, K context latents, the warped one."""
    return world_model.context + 1 + int(world_model.action_warp)


def make_scheduler(config: WorldModelConfig, kind: str = "ddim") -> Scheduler:
    """The noise schedule the model was trained with: ``ddpm`` for training, ``ddim`` for sampling.

    v-prediction; with ``zero_terminal_snr`` the betas are rescaled so the last timestep is pure noise, and
    DDIM uses "trailing" spacing so that even 1 step starts from t = T-1.
    """

    common = dict(
        num_train_timesteps=config.num_train_timesteps,
        beta_schedule=config.beta_schedule,
        prediction_type="v_prediction",
        rescale_betas_zero_snr=config.zero_terminal_snr,
        timestep_spacing="trailing",
        clip_sample=False,
    )
    if config.beta_schedule == "scaled_linear":
        common.update(beta_start=0.00085, beta_end=0.012)  # SD v1.4
    if kind == "ddpm":
        return DDPMScheduler(**common)
    if kind == "ddim":
        return DDIMScheduler(**common, set_alpha_to_one=False)
    raise ValueError(f"scheduler kind must be 'ddpm' or 'ddim', got {kind!r}")


def load_world_model(folder: str | Path, device: str | torch.device = "cpu") -> ActionConditionedUNet:
    """Load a saved world model (``ActionConditionedUNet.save`` / stage ``diffusion_checkpoint``), in eval mode."""

    folder = Path(folder)
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not config_path.is_file() or not weights_path.is_file():
        raise PipelineError(
            f"{folder}: no world model there (expected {CONFIG_FILE} and {WEIGHTS_FILE}); run "
            f"`dvc repro diffusion_checkpoint` first"
        )
    try:
        config = WorldModelConfig.from_dict(json.loads(config_path.read_text()))
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise PipelineError(f"{config_path}: corrupt world model config ({error}); re-run the stage") from None
    model = ActionConditionedUNet(config)
    try:
        state = load_file(str(weights_path))
    except Exception as error:  # safetensors raises several types for a damaged file
        raise PipelineError(f"{weights_path}: unreadable weights ({error}); re-run the stage") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise PipelineError(f"{weights_path}: weights do not match {CONFIG_FILE} (missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]}); re-run the stage")
    return model.to(device).eval()


def context_noise(context_latents: torch.Tensor, levels: torch.Tensor,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Noise augmentation: ``ctx + level * eps`` per sample (levels [B] are noise stds)."""
    eps = torch.randn(context_latents.shape, generator=generator, dtype=context_latents.dtype,
                      device="cpu").to(context_latents.device)
    return context_latents + levels.to(context_latents).view(-1, *[1] * (context_latents.dim() - 1)) * eps


def bucket_center(bucket: int, max_level: float, buckets: int) -> float:
    """The middle noise level of a bucket (what the sampler uses when given a bucket rather than a level)."""
    return (bucket + 0.5) * max_level / buckets if max_level > 0 else 0.0


__all__ = [
    "ActionConditionedUNet",
    "WorldModelConfig",
    "bucket_center",
    "context_noise",
    "load_world_model",
    "make_scheduler",
    "noise_bucket",
    "unet_config_from_params",
]
