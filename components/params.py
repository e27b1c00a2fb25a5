"""Typed, validated access to ``params.yaml``: the one place every stage reads its settings from.

Each top-level section of ``params.yaml`` is one pipeline stage (or a shared part such as ``environment``).
Unknown keys, wrong types and out-of-range values fail on load with ``ParamsError``, whose message names
the key path and what is allowed, e.g. ``rl_agent.ppo.n_steps: must be > 0, got -5``.

Profiles (``profiles/<name>.yaml``: ``micro`` for tests, ``paper`` for paper scale) are partial overrides
merged into ``params.yaml`` by ``gamengen profile <name>``; see ``apply_profile``.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from components.atomic import atomic_write_text
from components.errors import PipelineError

DEFAULT_PARAMS_PATH = Path("params.yaml")
PROFILES_DIR = Path(__file__).resolve().parent.parent / "profiles"

# ViZDoom buttons an action may press. Names match ``vizdoom.Button`` members.
Button = Literal[
    "MOVE_FORWARD",
    "MOVE_BACKWARD",
    "TURN_LEFT",
    "TURN_RIGHT",
    "MOVE_LEFT",
    "MOVE_RIGHT",
    "ATTACK",
    "USE",
    "SPEED",
    "JUMP",
    "CROUCH",
    "SELECT_NEXT_WEAPON",
    "SELECT_PREV_WEAPON",
]


class ParamsError(PipelineError, ValueError):
    """A params file that cannot be used. The message lists every bad key path and what is allowed."""


class Section(BaseModel):
    """Base of every params section: unknown keys are errors, values are immutable after load."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------- environment and reward


class ActionSpec(Section):
    name: str = Field(min_length=1)
    buttons: list[Button] = Field(default_factory=list, description="buttons held; empty means no-op")


class EnvironmentParams(Section):
    """The ViZDoom game every stage plays or learns. See README "Environment"."""

    scenario: str = Field(
        "freedoom2",
        description="'freedoom1' / 'freedoom2' (full IWAD levels with HUD), a bundled scenario name such as "
        "'basic' or 'deathmatch', or a path to a user's .cfg file",
    )
    wad: str | None = Field(None, description="optional path to a user's .wad (overrides the scenario's wad)")
    map: str = Field("MAP01", description="map lump name, e.g. MAP01 or E1M1")
    resolution: tuple[int, int] = Field((80, 60), description="recorded frame size as (width, height)")
    frame_skip: int = Field(4, gt=0, description="game tics each action is held for (paper: 4)")
    episode_timeout: int = Field(2100, gt=0, description="episode length limit in game tics (35 tics = 1 s)")
    repeat_action_probability: float = Field(
        0.0, ge=0.0, lt=1.0, description="chance of repeating the previous action instead of the chosen one"
    )
    actions: list[ActionSpec] = Field(min_length=2)
    view_rows: float = Field(
        0.8, gt=0.0, le=1.0, description="share of the frame's rows above the status bar (HUD), where the view "
        "moves: the action warp and the evaluation measure the view's motion there"
    )

    @field_validator("resolution")
    @classmethod
    def _resolution_positive(cls, value: tuple[int, int]) -> tuple[int, int]:
        if min(value) < 16 or max(value) > 1920:
            raise ValueError(f"must be (width, height) with each side in [16, 1920], got {list(value)}")
        return value

    @field_validator("actions")
    @classmethod
    def _unique_action_names(cls, value: list[ActionSpec]) -> list[ActionSpec]:
        names = [a.name for a in value]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"action names must be unique, repeated: {duplicates}")
        return value

    @property
    def width(self) -> int:
        return self.resolution[0]

    @property
    def height(self) -> int:
        return self.resolution[1]


class RewardParams(Section):
    """Weights of the paper's reward terms (GameNGen, appendix), and the exploration grid."""

    player_hit: float = -100.0
    player_death: float = -5000.0
    enemy_hit: float = 300.0
    enemy_kill: float = 1000.0
    item_pickup: float = 100.0
    secret_found: float = 500.0
    new_area: float = 20.0
    new_area_distance_bonus: float = Field(0.5, ge=0.0, description="new area: new_area * (1 + bonus * L1 cells)")
    health_delta: float = 10.0
    armor_delta: float = 10.0
    ammo_gain: float = 10.0
    ammo_loss: float = 1.0
    grid_cell_size: float = Field(64.0, gt=0.0, description="side of a visited-area cell in map units")
    scale: float = Field(0.01, gt=0.0, description="multiplies the summed reward before PPO sees it")


# --------------------------------------------------------------------------- stage 1: rl_agent


class PPOParams(Section):
    """Stable-Baselines3 PPO settings. Paper values in comments."""

    learning_rate: float = Field(3e-4, gt=0.0)  # paper: 1e-4
    n_steps: int = Field(256, gt=0)  # paper: 512 (rollout buffer)
    batch_size: int = Field(64, gt=0)  # paper: 64
    n_epochs: int = Field(4, gt=0)  # paper: 10
    gamma: float = Field(0.99, gt=0.0, le=1.0)  # paper: 0.99
    gae_lambda: float = Field(0.95, gt=0.0, le=1.0)
    ent_coef: float = Field(0.01, ge=0.0)  # paper: 0.1
    clip_range: float = Field(0.2, gt=0.0)
    n_envs: int = Field(2, gt=0)  # paper: 8 parallel games
    features_dim: int = Field(256, gt=0)  # paper: 512
    hidden_sizes: list[int] = Field([64, 64], description="actor and critic MLP widths")  # paper: 2-layer MLPs
    # paper: Mnih's (32, 64, 64)
    cnn_channels: tuple[int, int, int] = Field((16, 32, 32), description="channels of the 3 conv layers")

    @field_validator("cnn_channels", "hidden_sizes")
    @classmethod
    def _positive_widths(cls, value: Any) -> Any:
        if min(value, default=1) <= 0:
            raise ValueError(f"every width must be > 0, got {list(value)}")
        return value


class RLAgentParams(Section):
    total_timesteps: int = Field(40_000, gt=0)  # paper: 50M
    checkpoints: int = Field(4, gt=0, description="policy snapshots saved evenly over training")
    seed: int = 0
    torch_threads: int = Field(1, ge=0, description="torch CPU threads for training; 0 = torch's default")
    ppo: PPOParams = PPOParams()


# --------------------------------------------------------------------------- stage 2: raw_trajectories


class RawTrajectoriesParams(Section):
    shards: list[int] = Field(min_length=1, description="shard ids; each is an independent DVC stage")
    frames_per_shard: int = Field(8_000, gt=0)
    parallel_games: int = Field(8, gt=0, description="games stepped in lockstep so the policy runs batched")
    policy: Literal["agent", "random"] = Field("agent", description="'random' makes the random-play ablation set")
    random_action_fraction: float = Field(0.2, ge=0.0, le=1.0, description="share of actions drawn at random")
    heldout_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="share of episodes kept for evaluation")
    seed: int = 0

    @field_validator("shards")
    @classmethod
    def _unique_shards(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value) or min(value) < 0:
            raise ValueError(f"must be distinct non-negative ids, got {value}")
        return value


# --------------------------------------------------------------------------- later stages
# Each later issue fills in its own section class below; keep one class per stage.


class AutoencoderParams(Section):
    """The frame autoencoder and its helper stage ``base_autoencoder`` (components/models/autoencoder.py).

    With ``pretrained`` set, SD's VAE is loaded from that local folder and only the scaling factor is measured.
    Otherwise a small ``AutoencoderKL`` is built from the fields below and trained on training-split frames
    (MSE + ``kl_weight`` * KL) until ``train_minutes`` or ``max_steps``, whichever comes first.
    """

    pretrained: str | None = Field(
        None, description="local folder with an SD-style AutoencoderKL (e.g. SD v1.4's vae/); null trains one"
    )  # paper: SD v1.4 vae
    block_out_channels: list[int] = Field([32, 64, 64], min_length=1)  # SD: [128, 256, 512, 512] (8x down)
    decoder_block_out_channels: list[int] | None = Field(
        [32, 32, 64], description="the decoder's own widths, listed as block_out_channels (full resolution first); "
        "null = block_out_channels"
    )  # SD: null
    latent_channels: int = Field(4, gt=0)  # SD: 4
    layers_per_block: int = Field(1, gt=0)  # SD: 2
    norm_num_groups: int = Field(16, gt=0)  # SD: 32
    mid_block_attention: bool = False  # SD: true
    latent_multiple: int = Field(4, gt=0, description="latent h and w are padded to multiples of this")
    pad_mode: Literal["replicate", "constant"] = Field("replicate", description="edge-replicate or zero padding")
    train_minutes: float = Field(10.5, gt=0.0, description="training-time budget; the LR schedule ends with it")
    max_steps: int = Field(100_000, gt=0)
    batch_size: int = Field(8, gt=0)
    learning_rate: float = Field(2e-3, gt=0.0)
    warmup_steps: int = Field(100, ge=0)
    kl_weight: float = Field(1e-6, ge=0.0)
    mixed_precision: Literal["no", "bf16"] = Field(
        "bf16", description="bf16 autocast for the training forward pass (weights and evaluation stay float32)"
    )
    scaling_frames: int = Field(1024, gt=0, description="training frames used to measure the latent scaling factor")
    eval_frames: int = Field(256, gt=0, description="held-out frames for the PSNR curve and metrics")
    eval_every_s: float = Field(120.0, gt=0.0, description="seconds of training between PSNR-curve points")
    checkpoint_every_s: float = Field(
        60.0, gt=0.0, description="seconds of training between resumable checkpoints (.cache/); not in the run key"
    )
    seed: int = 0

    @field_validator("block_out_channels", "decoder_block_out_channels")
    @classmethod
    def _channels_positive(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (not value or min(value) <= 0):
            raise ValueError(f"must be positive channel counts, got {value}")
        return value

    @model_validator(mode="after")
    def _groups_divide_channels(self) -> AutoencoderParams:
        for name in ("block_out_channels", "decoder_block_out_channels"):
            bad = [c for c in getattr(self, name) or [] if c % self.norm_num_groups]
            if bad:
                raise ValueError(f"norm_num_groups {self.norm_num_groups} must divide every {name}, not {bad}")
        decoder = self.decoder_block_out_channels
        if decoder is not None and len(decoder) != len(self.block_out_channels):
            raise ValueError(f"decoder_block_out_channels {decoder} needs one width per block of block_out_channels "
                             f"{self.block_out_channels} (the decoder upsamples as much as the encoder downsamples)")
        return self


class ValidatedLatentsParams(Section):
    """Stage ``validated_latents``: encode every frame, then the Great Expectations gate (latent_validation.py).

    The context length K (episodes need K + 1 frames) is ``world_model.context``.
    """

    batch_size: int = Field(64, gt=0, description="frames encoded per forward pass")
    engine: Literal["onnxruntime", "torch"] = Field(
        "onnxruntime",
        description="onnxruntime: export the encoder once (the graph onnx_export ships) and encode with ONNX Runtime "
        "(about 1.5x PyTorch on 2 CPU cores), checked against PyTorch first; torch: encode with PyTorch",
    )
    parity_tolerance: float = Field(1e-3, gt=0.0, description="max abs diff allowed between ONNX Runtime and PyTorch")
    threads: int = Field(0, ge=0, description="ONNX Runtime intra-op threads; 0 = one per core")
    dtype: Literal["float16", "float32"] = Field("float16", description="stored dtype of the scaled latents")
    drop_short_episodes: bool = Field(
        True, description="leave out episodes shorter than K + 1 frames (counted in the report) instead of failing"
    )
    channel_mean_limit: float = Field(3.0, gt=0.0, description="|per-channel mean| of scaled latents must be below")
    channel_std_min: float = Field(0.05, gt=0.0, description="per-channel std below this counts as collapsed")
    channel_std_max: float = Field(10.0, gt=0.0)


class FinetunedVaeParams(Section):
    """Stage ``finetuned_vae``: encoder frozen, decoder fine-tuned with pixel MSE (the paper's decoder fine-tune)."""

    train_minutes: float = Field(2.0, gt=0.0, description="training-time budget; the LR schedule ends with it")
    max_steps: int = Field(100_000, gt=0)
    batch_size: int = Field(8, gt=0)
    learning_rate: float = Field(1e-4, gt=0.0)
    warmup_steps: int = Field(20, ge=0)
    augment: bool = Field(False, description="kornia brightness/contrast jitter on training frames (cost PSNR here)")
    ssim_weight: float = Field(0.0, ge=0.0, description="optional structural (SSIM) loss term; paper: MSE only")
    detail_weight: float = Field(
        0.3, ge=0.0, description="weight of the detail term: the local Laplacian RMS of the decoded frame against the "
        "real frame's, per detail_patch pixels (0 = MSE only, which prefers a blurred frame)"
    )
    detail_patch: int = Field(4, gt=0, description="pixels per side of the regions the detail term compares")
    eval_frames: int = Field(256, gt=0, description="held-out frames for PSNR/SSIM/sharpness before and after")
    grid_frames: int = Field(6, gt=0, description="held-out frames shown in the image grid")
    checkpoint_every_s: float = Field(
        60.0, gt=0.0, description="seconds of training between resumable checkpoints (.cache/); not in the run key"
    )
    seed: int = 0


class WorldModelParams(Section):
    """Model shape and conditioning of the diffusion world model (components/models/world_model.py).

    Read by ``diffusion_checkpoint`` and by every stage that builds windows of ``context + 1`` latents.
    """

    context: int = Field(4, gt=0, description="K: past frames (and actions) the model sees")  # paper: 64
    noise_buckets: int = Field(10, gt=0, description="context noise levels are discretised into this many")  # paper: 10
    max_noise_level: float = Field(
        0.7, ge=0.0, le=5.0, description="context noise std is drawn from U(0, max_noise_level) in training"
    )  # paper: 0.7
    pretrained_unet: str | None = Field(
        None, description="local path to an SD v1.4 style unet/ folder (save_pretrained); null builds from the "
        "config below. conv_in is widened to C*(K+1) with zero weights for the context channels"
    )  # paper: SD v1.4 unet
    block_out_channels: list[int] = Field([64, 128], min_length=1)  # paper (SD v1.4): [320, 640, 1280, 1280]
    down_block_types: list[str] = Field(["CrossAttnDownBlock2D", "DownBlock2D"], min_length=1)
    up_block_types: list[str] = Field(["UpBlock2D", "CrossAttnUpBlock2D"], min_length=1)
    layers_per_block: int = Field(1, gt=0)  # paper (SD v1.4): 2
    attention_head_dim: int = Field(2, gt=0)  # the number of heads (diffusers' name); paper (SD v1.4): 8
    norm_num_groups: int = Field(32, gt=0)
    cross_attention_dim: int = Field(64, gt=0, description="width of the action tokens")  # paper (SD v1.4): 768
    num_train_timesteps: int = Field(1000, gt=1)
    beta_schedule: Literal["scaled_linear", "linear", "squaredcos_cap_v2"] = "scaled_linear"  # SD v1.4
    zero_terminal_snr: bool = Field(True, description="rescale betas to zero terminal SNR (good with v-prediction)")
    action_warp: bool = Field(
        True, description="feed the UNet the last context latent moved by the view's motion under its action (a "
        "displacement and zoom per action pair, measured on the training windows: components/models/motion_warp.py) as "
        "extra channels; false: the paper's plain UNet"
    )
    predict_residual: bool = Field(
        True, description="diffuse the difference between the next latent and the last one (moved by the action "
        "warp), scaled to unit variance, instead of the next latent itself: an untrained model then copies the "
        "(moved) last frame, sharp, rather than a blur; false: the paper's parametrisation"
    )
    warp_resampling: Literal["nearest", "linear"] = Field(
        "linear", description="how the warp moves the latent: to the nearest whole cell (codes stay intact) or "
        "by linear interpolation (sub-cell motion, blended codes)"
    )

    @field_validator("block_out_channels")
    @classmethod
    def _channels_fit_groups(cls, value: list[int]) -> list[int]:
        if min(value) <= 0:
            raise ValueError(f"must be positive, got {value}")
        return value


class DiffusionCheckpointParams(Section):
    """Stage ``diffusion_checkpoint``: training of the world model (components/models/world_model_training.py)."""

    seed: int = 0
    steps: int = Field(20_000, gt=0, description="optimizer steps (the most, when train_minutes is set)")  # paper: 700k
    train_minutes: float | None = Field(
        9.0, gt=0.0, description="wall-clock budget: after 25 steps the speed is measured and the step count "
        "(and the LR schedule) fixed to fit, then stored in the checkpoint so a resumed run ends at the same "
        "step; null trains exactly `steps`"
    )  # paper: null (700k steps)
    batch_size: int = Field(8, gt=0, description="per process")  # paper: 128
    optimizer: Literal["adamw", "adafactor"] = "adamw"  # paper: adafactor
    learning_rate: float = Field(5e-4, gt=0.0)  # paper: 2e-5
    lr_schedule: Literal["constant", "cosine"] = "cosine"  # paper: constant
    warmup_steps: int = Field(100, ge=0)
    weight_decay: float = Field(0.0, ge=0.0)  # paper: 0
    grad_clip: float = Field(1.0, gt=0.0)  # paper: 1.0
    ema_decay: float = Field(0.0, ge=0.0, lt=1.0, description="0 turns EMA off; the final weights are the EMA")
    context_dropout: float = Field(
        0.1, ge=0.0, lt=1.0, description="share of samples whose context latents are zeroed (for CFG)"
    )  # paper: 0.1
    terminal_share: float = Field(
        0.25, ge=0.0, lt=1.0, description="share of samples trained at the last timestep (pure noise), the one the "
        "1-step student runs at; the rest draw t uniformly (0 = all uniform, as the paper; README \"World model\")"
    )
    moving_weight: float = Field(
        1.0, gt=0.0, description="loss weight of the windows whose last action moves or strafes (the evaluation's "
        "kind 'moving'), the others 1: spends the samples where moving controllability is decided"
    )
    mixed_precision: Literal["no", "fp16", "bf16"] = Field(
        "no", description="autocast of the training loss (components/training.py); fp16 needs CUDA")
    checkpoint_every: int = Field(500, gt=0, description="resumable checkpoint every N steps (.cache/)")
    log_every: int = Field(50, gt=0)
    eval_windows: int = Field(64, gt=0, description="held-out windows for the final metrics")
    preview_windows: int = Field(4, gt=0, description="rows in plots/diffusion_checkpoint/samples.png")


class SamplerParams(Section):
    """Inference-time sampling (components/models/sampler.py): DDIM with classifier-free guidance on past frames."""

    steps: int = Field(4, gt=0, description="DDIM steps per frame")  # paper: 4
    cfg: float = Field(1.0, ge=0.0, description="guidance on the past frames only (1 = off)")  # paper: 1.5
    context_noise_level: float = Field(
        0.0, ge=0.0, description="std of the noise added to the context at inference; its bucket is given to the "
        "model, telling it the context may be imperfect (0 = clean context; README \"Generating frames\")"
    )
    eta: float = Field(0.0, ge=0.0, le=1.0, description="DDIM eta (0 = deterministic)")
    seed: int = 0


class DistilledModelParams(Section):
    """Stage ``distilled_model`` (components/models/distillation.py): a 1-step student regressed onto the teacher's
    multi-step CFG sample (``params.sampler``). See README "Distillation"."""

    minutes: float = Field(8.0, gt=0.0, description="training-time budget (the run also stops at max_steps)")
    max_steps: int = Field(5000, gt=0)  # paper (DMD): 1000 steps at batch 128
    batch_size: int = Field(8, gt=0)  # paper: 128
    learning_rate: float = Field(1e-4, gt=0.0)
    warmup_steps: int = Field(20, ge=0)
    noise_seed: int = Field(0, description="seed of the frozen target and context noise built into the student")
    teacher_noise: Literal["fresh", "frozen"] = Field(
        "fresh",
        description="fresh: the teacher samples from new noise for every window, so the student learns the mean of "
        "the teacher's samples (the MSE-optimal point prediction); frozen: the teacher samples from the student's "
        "own noise, so the student copies one sample",
    )
    target: Literal["teacher", "data"] = Field(
        "data", description="what the student regresses onto: the teacher's sampler output (distillation) or "
        "the recorded next latent (data)"
    )
    rollout_steps: int = Field(
        8, gt=0, description="steps of its own rollout the student trains on: after the first, its context ends "
        "with its own predictions (training on its own predictions)"
    )
    moving_weight: float = Field(
        1.0, gt=0.0, description="loss weight of the rollout steps whose action moves or strafes, the others 1 "
        "(diffusion_checkpoint.moving_weight for the student)"
    )
    detail_weight: float = Field(
        0.0, ge=0.0, description="weight of the detail term: the local Laplacian RMS of the predicted latent against "
        "the target's, per detail_patch cells (0 = MSE only, which prefers the blurred mean)"
    )
    detail_patch: int = Field(1, gt=0, description="latent cells per side of the regions the detail term compares")
    adversarial_weight: float = Field(
        0.0, ge=0.0, description="weight of the adversarial term: a patch critic, trained beside the student, tells "
        "the recorded next latent from the student's (0 = no critic)"
    )
    critic_width: int = Field(64, gt=0, description="channels of the critic's convolutions")
    critic_lr_scale: float = Field(4.0, gt=0.0, description="the critic learns at this multiple of learning_rate")
    decoder_minutes: float = Field(
        0.0, ge=0.0, description="then fine-tune the decoder on the student's own rollouts for this long (README "
        "\"Distillation\"); 0 = ship the finetuned_vae decoder unchanged"
    )
    decoder_rollout_steps: int = Field(16, gt=0, description="rollout steps of the student's latents it learns from")
    decoder_windows: int = Field(128, gt=0, description="training contexts rolled out for those latents")
    decoder_real_share: float = Field(
        0.25, ge=0.0, le=1.0, description="share of each batch that is the encoder's latents of real frames"
    )
    decoder_learning_rate: float = Field(1e-4, gt=0.0)
    decoder_detail_weight: float = Field(
        0.5, ge=0.0, description="weight of the detail term (local Laplacian RMS against the real frame) in its loss"
    )
    decoder_detail_patch: int = Field(4, gt=0, description="pixels per side of the regions the detail term compares")
    mixed_precision: Literal["no", "fp16", "bf16"] = Field(
        "no", description="autocast of the student's loss (components/training.py); fp16 needs CUDA; measured in "
        "README \"World model\" (Training)")
    eval_windows: int = Field(64, gt=0, description="held-out windows for the PSNR metrics")
    eval_every_s: float = Field(60.0, gt=0.0, description="seconds of training between held-out checks")
    checkpoint_every_s: float = Field(
        60.0, gt=0.0, description="seconds of training between resumable checkpoints (.cache/); not in the run key"
    )
    seed: int = 0


class OnnxExportParams(Section):
    """Stage ``onnx_export`` (components/runtime/export.py): the three ONNX graphs, manifest and held-out contexts."""

    opset: int = Field(18, ge=18, description="ONNX opset of the dynamo exporter")
    max_batch: int = Field(64, gt=1, description="upper bound of the dynamic batch axis")
    parity_windows: int = Field(16, gt=0, description="real held-out windows compared between ORT and PyTorch")
    parity_tolerance: float = Field(1e-3, gt=0.0, description="max abs diff allowed between ORT and PyTorch")
    contexts: int = Field(8, gt=0, description="held-out starting contexts shipped in contexts.npz")
    future_steps: int = Field(32, gt=0, description="recorded steps after each shipped context (rollout videos)")


class PlayParams(Section):
    """The real-time browser player (components/play/server.py, ``make play``): ONNX Runtime only."""

    export_dir: str = Field("data/onnx_export", min_length=1, description="export folder to play")
    engine: Literal["server", "browser"] = Field(
        "server", description="server: ONNX Runtime in Python streams frames to the page over a WebSocket; "
        "browser: the page runs the model itself with ONNX Runtime Web (the static bundle in bundle_dir)"
    )
    bundle_dir: str = Field("dist/play", min_length=1, description="where the browser engine's bundle is written")
    web_precision: Literal["int8", "float32"] = Field(
        "int8", description="graphs the browser bundle ships: int8 (static QDQ, components/runtime/quantize.py; "
        "faster in WASM) or the export's float32 graphs as they are"
    )
    web_int8_min_psnr_db: float = Field(
        30.0, gt=0.0, description="int8 is refused when its frames are below this PSNR against the float graphs' "
        "frames at any step of a held-key rollout from the shipped contexts"
    )
    web_decoder_head_share: float = Field(
        0.1, ge=0.0, le=0.5, description="share of the decoder's multiply-adds that the browser bundle runs in the "
        "world model's Web Worker, right after the prediction, so that the two workers take about as long "
        "(components/runtime/decoder_split.py); 0 = the decoder whole in its own worker"
    )
    host: str = Field("127.0.0.1", min_length=1)
    port: int = Field(8765, ge=0, le=65535, description="0 picks a free port")
    fps: float = Field(
        20.0, ge=0.0, description="frame-rate cap (0 = as fast as the model runs); the paper plays at 20"
    )
    threads: int = Field(
        2, gt=0, description="cores for the player: the world model and the decoder sessions get threads // 2 "
        "intra-op threads each (at least 1)"
    )
    allowed_origins: list[str] = Field(
        default_factory=list, description="WebSocket Origins allowed besides the server's own (e.g. a page "
        "served elsewhere); a browser tab from any other origin is refused (403)"
    )
    max_players: int = Field(4, gt=0, description="tabs played at once; one more is refused (503)")
    max_messages_per_s: float = Field(
        200.0, gt=0.0, description="key messages a tab may send per second (over 1 s); a flood closes that tab only"
    )


class PromotionCriterionParams(Section):
    """One metric a challenger must not lose on (components/evaluation/promotion.py)."""

    metric: str = Field(min_length=1, description="dotted path into metrics/evaluation.json")
    tolerance: float = Field(0.0, ge=0.0, description="how much worse still counts as no worse (dB for PSNR)")
    higher_is_better: bool = True


class PromotionParams(Section):
    """Champion/challenger: where the champion lives, the promotion log, and what "no worse" means."""

    champion_dir: str = Field("artifacts/champion", min_length=1, description="the fixed place of the champion")
    log: str = Field("docs/promotion-log.md", min_length=1, description="promotion log (+ .jsonl beside it)")
    reevaluate_champion: bool = Field(
        True, description="score the champion again on the challenger's held-out episodes before comparing"
    )
    criteria: list[PromotionCriterionParams] = Field(
        default_factory=lambda: [
            PromotionCriterionParams(metric="onnx.teacher_forced.psnr.model.pooled", tolerance=0.1),
            PromotionCriterionParams(metric="onnx.teacher_forced.psnr.model.mean", tolerance=0.1),
            PromotionCriterionParams(metric="onnx.rollout.16.mean_psnr_over_steps.model", tolerance=0.2),
        ],
        min_length=1,
    )


SetValues = dict[str, float | int | str | bool]  # `-S` values of an experiment: dotted key -> value


class AblationsParams(Section):
    """The paper's ablations as DVC experiments (components/evaluation/ablations.py,
    `python -m components ablations`)."""

    context_key: str = "world_model.context"
    context_lengths: list[int] = Field([1, 2, 4, 8], min_length=1)  # paper: 1, 2, 4, 8, 16, 32, 64
    noise_off: SetValues = Field(
        default_factory=lambda: SetValues({"world_model.max_noise_level": 0.0, "sampler.context_noise_level": 0.0}),
        description="-S values that turn noise augmentation off (training and inference)",
    )
    data_key: str = "raw_trajectories.policy"
    data_policies: list[str] = Field(["agent", "random"], min_length=1)
    warp_off: SetValues = Field(
        default_factory=lambda: SetValues({"world_model.action_warp": False, "world_model.predict_residual": False}),
        description="-S values that turn the action warp and residual targets off (the paper's plain UNet)",
    )
    seeds: list[int] = Field([0, 1], min_length=1, description="every setting runs once per seed (the tables show the "
                             "spread)")
    seed_keys: list[str] = Field(
        default_factory=lambda: ["diffusion_checkpoint.seed", "distilled_model.seed"],
        description="params set to each seed: what varies between the runs of one setting",
    )
    overrides: list[str] = Field(
        default_factory=lambda: [  # in steps, not minutes: a busy machine changes the run time, not the result
            "autoencoder.train_minutes=1000", "autoencoder.max_steps=600", "finetuned_vae.train_minutes=1000",
            "finetuned_vae.max_steps=100", "diffusion_checkpoint.train_minutes=1000", "diffusion_checkpoint.steps=600",
            "distilled_model.minutes=1000", "distilled_model.max_steps=200", "evaluation.teacher=false",
            "evaluation.windows=128", "evaluation.rollout_windows=8",
        ],
        description="'key=value' (dvc exp run -S syntax) applied to every ablation experiment: the smaller scale. A "
        "list, so that a profile replaces it whole",
    )
    jobs: int = Field(1, gt=0, description="experiments run at once (dvc exp run --run-all -j)")

    @field_validator("overrides")
    @classmethod
    def _key_value_pairs(cls, value: list[str]) -> list[str]:
        bad = [item for item in value if "=" not in item or "." not in item.split("=", 1)[0]]
        if bad:
            raise ValueError("must be 'section.key=value' strings (as for dvc exp run -S)")
        return value

    @field_validator("context_lengths")
    @classmethod
    def _positive_lengths(cls, value: list[int]) -> list[int]:
        if min(value) <= 0:
            raise ValueError(f"must be positive context lengths, got {value}")
        return value


class EvaluationParams(Section):
    """Stage ``evaluation``: the shipped ONNX export and the PyTorch teacher on held-out play only."""

    episodes: list[str] | None = Field(
        None, description="held-out episode ids to use (null: all held-out episodes); others are refused"
    )
    windows: int = Field(256, gt=0, description="teacher-forced next-frame windows")  # paper: 2048 trajectories
    rollout_lengths: list[int] = Field([16, 32, 64], min_length=1, description="autoregressive rollout steps")
    rollout_windows: int = Field(16, gt=0, description="windows per rollout length")  # paper FVD: 512
    teacher: bool = Field(True, description="also score the PyTorch 4-step teacher (data/diffusion_checkpoint)")
    batch_size: int = Field(32, gt=0)
    psnr_cap_db: float = Field(50.0, gt=0.0, description="per-frame PSNR cap for identical frames (mean view)")
    seed: int = 0
    threads: int = Field(2, gt=0, description="ONNX Runtime intra-op threads")
    lpips_weights: str | None = Field(None, description="local TorchScript vgg16.pt (StyleGAN2-ADA); null skips")
    fvd_weights: str | None = Field(None, description="local TorchScript i3d_torchscript.pt (StyleGAN-V); null skips")
    sample_windows: int = Field(3, gt=0, description="rows of the side-by-side sample video")
    sample_fps: float = Field(8.0, gt=0.0)
    displacement_pairs: int = Field(
        2000, gt=0, description="consecutive training frames per action for its median displacement (the "
        "controllable baseline)"
    )
    turn_contexts: int = Field(32, gt=0, description="held-out contexts for the turn response")
    turn_steps: int = Field(4, gt=0, description="steps each turn is held for in the turn response")
    turn_test_steps: int = Field(8, gt=0, description="generated steps per action in plots/evaluation/turn_test.png")
    turn_test_rows: int = Field(3, gt=0, description="contexts shown in plots/evaluation/turn_test.png")
    long_play_steps: int = Field(
        256, gt=0, description="steps of player-like keys from held-out contexts, scored against the real frames' "
        "sharpness, colours and HUD (components/evaluation/long_play.py)"
    )
    long_play_contexts: int = Field(8, gt=0, description="held-out contexts long play starts from")
    long_play_hold: int = Field(16, gt=0, description="long play holds each key for 1 to this many steps")
    long_play_rows: int = Field(4, gt=0, description="contexts shown in plots/evaluation/long_play.png")
    promotion: PromotionParams = PromotionParams()
    ablations: AblationsParams = AblationsParams()

    @field_validator("rollout_lengths")
    @classmethod
    def _positive_rollouts(cls, value: list[int]) -> list[int]:
        if min(value) <= 0 or len(set(value)) != len(value):
            raise ValueError(f"must be distinct positive step counts, got {value}")
        return sorted(value)

    @field_validator("promotion")
    @classmethod
    def _criteria_use_measured_rollouts(cls, value: PromotionParams, info: ValidationInfo) -> PromotionParams:
        lengths = info.data.get("rollout_lengths", [])
        for criterion in value.criteria:
            parts = criterion.metric.split(".")
            if "rollout" in parts[:-1]:
                steps = parts[parts.index("rollout") + 1]
                if not steps.isdigit() or int(steps) not in lengths:
                    raise ValueError(
                        f"criteria metric {criterion.metric!r} needs a {steps}-step rollout, but "
                        f"evaluation.rollout_lengths is {lengths}"
                    )
        return value


class Params(Section):
    """The whole of ``params.yaml``."""

    profile: str = Field("default", description="name of the profile these params came from")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where every torch stage runs: auto = CUDA when torch sees it, else the CPU; cuda "
        "without a GPU stops before any work. Not a DVC param: it changes where, not what, a stage computes"
    )
    environment: EnvironmentParams
    reward: RewardParams = RewardParams()
    rl_agent: RLAgentParams = RLAgentParams()
    raw_trajectories: RawTrajectoriesParams
    autoencoder: AutoencoderParams = AutoencoderParams()
    validated_latents: ValidatedLatentsParams = ValidatedLatentsParams()
    finetuned_vae: FinetunedVaeParams = FinetunedVaeParams()
    world_model: WorldModelParams = WorldModelParams()
    diffusion_checkpoint: DiffusionCheckpointParams = DiffusionCheckpointParams()
    sampler: SamplerParams = SamplerParams()
    distilled_model: DistilledModelParams = DistilledModelParams()
    onnx_export: OnnxExportParams = OnnxExportParams()
    play: PlayParams = PlayParams()
    evaluation: EvaluationParams = EvaluationParams()
    orchestration: dict[str, Any] = Field(
        default_factory=dict, description="Dagster settings: validated by orchestration/settings.py, which owns them"
    )


# --------------------------------------------------------------------------- loading

_CONSTRAINT_TEXT = {
    "greater_than": "must be > {gt}",
    "greater_than_equal": "must be >= {ge}",
    "less_than": "must be < {lt}",
    "less_than_equal": "must be <= {le}",
    "too_short": "must have at least {min_length} item(s)",
    "too_long": "must have at most {max_length} item(s)",
    "string_too_short": "must have at least {min_length} character(s)",
    "extra_forbidden": "unknown key (check the spelling; allowed keys are listed in {models_in})",
    "missing": "is required",
    "literal_error": "must be one of {expected}",
}


def _key_path(location: tuple[int | str, ...]) -> str:
    path = ""
    for part in location:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def _describe(error: Any, models_in: str) -> str:
    template = _CONSTRAINT_TEXT.get(error["type"])
    context = {"models_in": models_in, **(error.get("ctx") or {})}
    if template:
        try:
            text = template.format(**context)
        except (KeyError, IndexError):
            text = error["msg"]
    else:
        text = error["msg"].removeprefix("Value error, ")
    if error["type"] not in ("missing", "extra_forbidden") and "input" in error and ", got " not in text:
        text += f", got {error['input']!r}"  # unless the rule's own message already says what it got
    return f"{_key_path(error['loc'])}: {text}"


def format_validation_error(error: ValidationError, models_in: str = "components/params.py") -> str:
    """One line per error: key path and what is allowed; ``models_in`` is the file that lists the allowed keys."""
    return "\n".join(_describe(e, models_in) for e in error.errors())


def parse_params(raw: dict[str, Any], source: str = "params") -> Params:
    """Validate a params mapping, raising ``ParamsError`` that names every bad key."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: must be a mapping of stage sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as error:
        raise ParamsError(f"invalid {source}:\n{format_validation_error(error)}") from None


class _Yaml12BoolLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 booleans: only true/false, so ``no``/``on``/``yes`` stay strings.

    ``dvc exp run -S`` rewrites params.yaml as YAML 1.2 and drops the quotes of ``"no"`` (e.g.
    ``diffusion_checkpoint.mixed_precision``); YAML 1.1 would then read it as False.
    """


_Yaml12BoolLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12BoolLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise ParamsError(f"{path}: not found (run from the repository root, or pass --params)") from None
    try:
        data = yaml.load(text, Loader=_Yaml12BoolLoader)
    except yaml.YAMLError as error:
        raise ParamsError(f"{path}: not valid YAML: {error}") from None
    return data if data is not None else {}


def load_params(path: str | Path = DEFAULT_PARAMS_PATH) -> Params:
    """Load and validate ``params.yaml``. Every stage reads its section through this function."""
    return parse_params(read_yaml(Path(path)), source=str(path))


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Return ``base`` with ``override`` merged in; nested mappings merge, everything else replaces."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``["a.b=1", "c.d=text"]`` -> ``{"a.b": 1, "c.d": "text"}`` (values read as YAML, as ``dvc exp run -S`` does)."""
    overrides = {}
    for item in items:
        key, equals, value = item.partition("=")
        if not equals or not key.strip():
            raise ParamsError(f"override {item!r}: write it as section.key=value (as dvc exp run -S takes it)")
        overrides[key.strip()] = yaml.load(value, Loader=_Yaml12BoolLoader)
    return overrides


def with_overrides(raw: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``raw`` with each dotted key of ``overrides`` set (``{"sampler.cfg": 2}``), as ``dvc exp run -S`` sets it."""
    merged = copy.deepcopy(raw)
    for dotted, value in overrides.items():
        node = merged
        *parents, leaf = dotted.split(".")
        for part in parents:
            if not isinstance(node.setdefault(part, {}), dict):
                raise ParamsError(f"override {dotted}: {part!r} is a value, not a section")
            node = node[part]
        node[leaf] = value
    return merged


def check_params(params_path: str | Path = DEFAULT_PARAMS_PATH, profile: str | None = None,
                 overrides: Sequence[str] = ()) -> Params:
    """Validate ``params_path`` as a run would see it: with ``profile`` merged and ``-S`` ``overrides`` set.
    Reads only; raises ``ParamsError`` naming every bad key."""
    raw = read_yaml(Path(params_path))
    source = str(params_path)
    if profile:
        raw = profile_params(profile, raw)
        source += f" + profile {profile!r}"
    if overrides:
        raw = with_overrides(raw, parse_overrides(overrides))
        source += " + " + " ".join(f"-S {item}" for item in overrides)
    return parse_params(raw, source=source)


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def profile_params(profile: str, base: dict[str, Any]) -> dict[str, Any]:
    """Merge ``profiles/<profile>.yaml`` onto ``base``."""
    path = PROFILES_DIR / f"{profile}.yaml"
    if not path.is_file():
        raise ParamsError(f"unknown profile {profile!r}: choose one of {available_profiles()}")
    merged = deep_merge(base, read_yaml(path))
    merged["profile"] = profile
    return merged


def apply_profile(profile: str, params_path: str | Path = DEFAULT_PARAMS_PATH) -> Params:
    """Merge a profile's overrides into ``params_path`` in place, validating before anything is written.

    ``params.yaml`` as committed is the default profile; ``git checkout params.yaml`` returns to it.
    """

    merged = profile_params(profile, read_yaml(Path(params_path)))
    params = parse_params(merged, source=f"{params_path} + profile {profile!r}")
    atomic_write_text(Path(params_path), yaml.safe_dump(merged, sort_keys=False))
    return params
