"""Training the diffusion world model (stage ``diffusion_checkpoint``): streaming windows, v-prediction loss,
noise augmentation, context dropout, resumable safetensors checkpoints, Accelerate for multi-GPU/multi-node.

One training example is a window of K+1 consecutive rows of one TRAIN-split episode of ``validated_latents``:
rows 0..K-1 are the context latents and their actions, row K is the target latent. Windows are read from the
memory-mapped shards on demand (``TrajectoryStore.window_index`` + ``read_window``); the data set is never loaded
whole. Which windows a step uses is a pure function of ``(seed, process rank, step)`` (a seeded permutation per
epoch), and so are all its random draws (timesteps, noise, noise levels, dropout). A resumed run therefore takes
exactly the steps an uninterrupted run would have taken.

Loss, per example (paper: "Model and training")::

    level ~ U(0, max_noise_level); bucket = noise_bucket(level)
    context = context + level * eps_ctx                  # noise augmentation
    context = 0 with probability context_dropout         # for classifier-free guidance on past frames
    t ~ U{0..T-1}, or T-1 with probability terminal_share; eps ~ N(0, I); x_t = ddpm.add_noise(target, eps, t)
    loss = || world_model(x_t, t, context, actions, bucket) - ddpm.get_velocity(target, eps, t) ||^2

Training runs on the shared engine (``components/training.py``): device (``device``), mixed precision, the
minutes-or-steps plan, the atomic safetensors checkpoint every ``checkpoint_every`` steps under
``.cache/diffusion_checkpoint/<run key>/`` (params sections, action count, the input shards' checksums and the
process count), exact resume after ``kill -9``. DVC deletes the stage's outs before a rerun; the cache lives outside
them, so a killed run resumes from the last checkpoint and ends at the same step with the same final files.

Several processes: ``accelerate launch --multi_gpu --num_processes N -m components diffusion_checkpoint <its arguments
in dvc.yaml>``
(on a machine without GPUs, or with ``device: cpu``, N CPU processes with gloo).
``batch_size`` is per process (the effective batch is ``N x batch_size``); at step ``s`` process ``r`` reads the
windows at global positions ``(s * N + r) * batch_size + i`` of the epoch's permutation; gradients are averaged.
A checkpoint resumes only with the same ``N`` (it is part of the run key).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from components.data.trajectory_store import TrajectoryStore
from components.data.windows import LatentWindows, heldout_windows
from components.errors import PipelineError
from components.evaluation.actions import action_loss_weights
from components.images import frame_grid, to_uint8
from components.metrics import weighted_mse
from components.models.motion_warp import LatentGeometry, fit_action_warp
from components.models.sampler import sample_next_latent
from components.models.world_model import (
    ActionConditionedUNet,
    Scheduler,
    WorldModelConfig,
    context_noise,
    make_scheduler,
    noise_bucket,
)
from components.training import (
    CHECKPOINT_FILE,
    Budget,
    Recipe,
    Step,
    TrainResult,
    check_precision,
    run_folder,
    start_runtime,
)
from components.training import train as run_training

if TYPE_CHECKING:
    from components.models.autoencoder import FrameAutoencoder
    from components.params import DiffusionCheckpointParams, EnvironmentParams, Params


log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- data


@dataclass
class Batch:
    context_latents: torch.Tensor  # [B, K, C, h, w]
    context_actions: torch.Tensor  # [B, K]
    target: torch.Tensor  # [B, C, h, w]

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.context_latents.to(device), self.context_actions.to(device), self.target.to(device))


class WindowStream:
    """Deterministic, resumable stream of training windows from a ``TrajectoryStore`` of latents.

    The window index (shard, start row) is small; the latents stay memory-mapped on disk.
    """

    def __init__(self, store: TrajectoryStore, context: int, split: str | None, seed: int,
                 rank: int = 0, world_size: int = 1) -> None:
        self.store, self.context, self.seed = store, context, seed
        self.rank, self.world_size = rank, world_size
        self.windows = LatentWindows(store, context + 1, split)
        self._epoch, self._permutation = -1, np.zeros(0, np.int64)

    def __len__(self) -> int:
        return len(self.windows)

    def _position(self, position: int) -> int:
        epoch, offset = divmod(position, len(self.windows))
        if epoch != self._epoch:
            self._epoch = epoch
            self._permutation = np.random.default_rng([self.seed, epoch]).permutation(len(self.windows))
        return int(self._permutation[offset])

    def batch(self, step: int, batch_size: int) -> Batch:
        """The windows of ``step`` for this process: global positions ``(step * world + rank) * B + i``."""
        first = (step * self.world_size + self.rank) * batch_size
        return self.read([self._position(first + i) for i in range(batch_size)])

    def read(self, rows: list[int]) -> Batch:
        return windows_batch(self.windows, rows)


def windows_batch(windows: LatentWindows, rows: list[int]) -> Batch:
    """The windows of K + 1 rows at ``rows``, as the K context rows and the next latent."""
    latents, actions = windows.read(rows)
    return Batch(latents[:, :-1], actions[:, :-1], latents[:, -1])


def open_latents(root: str | Path, context: int, num_actions: int) -> TrajectoryStore:
    """Open ``validated_latents`` and check it can train a model with this context and action count."""
    store = TrajectoryStore(root)
    for shard in store.shards:
        for name in ("latents", "actions"):
            if name not in shard.array_names:
                raise PipelineError(f"{shard.path}: no '{name}' array; is this a validated_latents shard?")
        shape = shard.manifest["arrays"]["latents"]["shape"]
        if len(shape) != 4:
            raise PipelineError(f"{shard.path}: latents must be [N, C, h, w], got shape {shape}")
        actions = shard.array("actions")
        if len(actions) and (int(actions.min()) < 0 or int(actions.max()) >= num_actions):
            raise PipelineError(f"{shard.path}: action ids {int(actions.min())}..{int(actions.max())} do not fit the "
                                f"{num_actions} actions of params.environment.actions")
    shapes = {tuple(s.manifest["arrays"]["latents"]["shape"][1:]) for s in store.shards}
    if len(shapes) != 1:
        raise PipelineError(f"{root}: shards have different latent shapes {sorted(shapes)}")
    if len(store.window_index(context + 1, "train")) == 0:
        raise PipelineError(f"{root}: no train-split episode has the {context + 1} frames a window needs "
                            f"(world_model.context = {context}); record longer episodes or lower the context")
    return store


def latent_shape(store: TrajectoryStore) -> tuple[int, int, int]:
    return tuple(int(x) for x in store.shards[0].manifest["arrays"]["latents"]["shape"][1:])  # type: ignore[return-value]


def data_fingerprint(store: TrajectoryStore) -> str:
    """Hash of the input shards' checksums and episode lists: changes whenever the data does."""
    digest = hashlib.sha256()
    for shard in store.shards:
        digest.update(json.dumps(shard.manifest["arrays"], sort_keys=True).encode())
        digest.update(json.dumps(shard.episodes_metadata, sort_keys=True, default=str).encode())
    return digest.hexdigest()


# --------------------------------------------------------------------------- loss


def diffusion_loss(world_model: ActionConditionedUNet, ddpm: Scheduler, batch: Batch, config: WorldModelConfig,
                   context_dropout: float, generator: torch.Generator, terminal_share: float = 0.0,
                   action_weights: torch.Tensor | None = None) -> torch.Tensor:
    """The v-prediction loss with context noise augmentation and context dropout (module docstring).

    ``terminal_share`` of the examples are trained at the last timestep, where the input is pure noise (zero
    terminal SNR) and the velocity is minus the target: the prediction the 1-step student starts from.
    ``action_weights`` (per action id, ``actions.action_loss_weights``) weigh each example by its last action."""
    device = batch.target.device
    size = batch.target.shape[0]
    levels = torch.rand(size, generator=generator) * config.max_noise_level
    buckets = noise_bucket(levels, config.max_noise_level, config.noise_buckets).to(device)
    context = context_noise(batch.context_latents, levels.to(device), generator)
    target = world_model.to_residual(batch.target, world_model.residual_base(context, batch.context_actions))
    keep = (torch.rand(size, generator=generator) >= context_dropout).to(device=device, dtype=context.dtype)
    context = context * keep.view(-1, 1, 1, 1, 1)
    timesteps = torch.randint(0, config.num_train_timesteps, (size,), generator=generator)
    if terminal_share > 0:  # no extra draw at 0, so runs without it draw what they always drew
        terminal = torch.rand(size, generator=generator) < terminal_share
        timesteps = torch.where(terminal, config.num_train_timesteps - 1, timesteps)
    timesteps = timesteps.to(device)
    noise = torch.randn(batch.target.shape, generator=generator).to(device)
    noisy = ddpm.add_noise(target, noise, timesteps)
    target_v = ddpm.get_velocity(target, noise, timesteps)
    predicted = world_model(noisy, timesteps, context, batch.context_actions, buckets)
    return weighted_mse(predicted, target_v, batch.context_actions[:, -1], action_weights)


# diffusion_checkpoint params that do not change the trained weights, so changing them keeps the checkpoint
NOT_IN_RUN_KEY = ("log_every", "checkpoint_every", "eval_windows", "preview_windows")


def run_key_parts(params: Params, num_actions: int, fingerprint: str) -> dict[str, Any]:
    """What a run's checkpoint depends on: the params that shape training, the action count and the data."""
    return {
        "world_model": params.world_model.model_dump(mode="json"),
        "diffusion_checkpoint": params.diffusion_checkpoint.model_dump(mode="json", exclude=set(NOT_IN_RUN_KEY)),
        "num_actions": num_actions,
        "data": fingerprint,
    }


def recipe(settings: DiffusionCheckpointParams) -> Recipe:
    """The engine's recipe from the ``diffusion_checkpoint`` params (LR: warm-up, then cosine to zero or constant)."""
    return Recipe(
        Budget(settings.train_minutes, settings.steps, settings.warmup_steps, settings.lr_schedule, min_lr_fraction=0.0,
               max_warmup_fraction=1.0),
        settings.learning_rate, seed=settings.seed, optimizer=settings.optimizer, weight_decay=settings.weight_decay,
        grad_clip=settings.grad_clip, ema_decay=settings.ema_decay, mixed_precision=settings.mixed_precision,
        batch_size=settings.batch_size, checkpoint_every_steps=settings.checkpoint_every, log_every=settings.log_every)


# --------------------------------------------------------------------------- training


@dataclass
class WorldModelRun:
    world_model: ActionConditionedUNet
    result: TrainResult


def train(params: Params, latents_root: str | Path, cache_root: str | Path | None = None,
          live_dir: str | Path | None = None, stop_after: int | None = None,
          frames_root: str | Path | None = None) -> WorldModelRun:
    """Train (or resume) the world model on the train split of ``latents_root`` with the shared engine
    (``components.training``); see the module docstring.

    ``frames_root`` holds the recorded trajectories the latents were encoded from; the action warp
    (``world_model.action_warp``) is fitted on their frames, so it is needed only then. ``stop_after`` ends this
    call early after that many steps (for tests); the plan is unchanged.
    """

    settings, context = params.diffusion_checkpoint, params.world_model.context
    num_actions = len(params.environment.actions)
    runtime = start_runtime(params.device)
    check_precision(settings.mixed_precision, runtime.device, "diffusion_checkpoint.mixed_precision")
    store = open_latents(latents_root, context, num_actions)
    channels, height, width = latent_shape(store)
    torch.manual_seed(settings.seed)
    world_model = ActionConditionedUNet.from_params(params.world_model, channels, (height, width), num_actions)
    folder = run_folder(cache_root, runtime, run_key_parts(params, num_actions, data_fingerprint(store)))
    if folder is None or not (folder / CHECKPOINT_FILE).is_file():
        fit_to_data(world_model, WindowStream(store, context, "train", settings.seed),
                    TrajectoryStore(frames_root) if frames_root else None, params.environment)
    log.info("world model: %.2fM parameters, latents %dx%dx%d, K=%d, %d train windows; process %d of %d on %s, "
             "batch %d per process", world_model.num_parameters() / 1e6, channels, height, width, context,
             len(store.window_index(context + 1, "train")), runtime.rank, runtime.processes,
             runtime.device, settings.batch_size)
    ddpm = make_scheduler(world_model.config, "ddpm")
    stream = WindowStream(store, context, "train", settings.seed, runtime.rank, runtime.processes)
    action_weights = action_loss_weights(params.environment.actions, settings.moving_weight, runtime.device)

    def loss_fn(step: Step) -> torch.Tensor:
        batch = stream.batch(step.index, settings.batch_size).to(step.device)
        return diffusion_loss(world_model, ddpm, batch, world_model.config, settings.context_dropout, step.generator,
                              settings.terminal_share, action_weights)

    result = run_training(world_model, list(world_model.parameters()), loss_fn, recipe(settings), runtime, folder,
                          live_dir=live_dir, name="diffusion_checkpoint", stop_after=stop_after)
    return WorldModelRun(world_model.float().cpu().eval(), result)


FIT_WINDOWS = 2048  # training windows the action warp and the residual scale are fitted on before the first step


def fit_to_data(world_model: ActionConditionedUNet, stream: WindowStream, frames: TrajectoryStore | None,
                environment: EnvironmentParams) -> None:
    """Before the first step: fit the action warp (``world_model.action_warp``) and measure the residual scale
    (``world_model.predict_residual``: the std of ``next - base``) on a sample of training windows."""
    if world_model.action_warp is not None:
        fit_warp(world_model, stream, frames, environment)
    if world_model.config.predict_residual:
        rows = np.random.default_rng([stream.seed, 12]).permutation(len(stream))[:FIT_WINDOWS]
        batch = stream.read(sorted(rows.tolist()))
        with torch.no_grad():
            base = world_model.residual_base(batch.context_latents, batch.context_actions)
            assert base is not None  # predict_residual is on
            residual = batch.target - base
            world_model.residual_scale.fill_(float(residual.std()))
        log.info("predicting the residual to the %s last latent: std %.3f (the latents' std is %.3f)",
                 "warped" if world_model.action_warp is not None else "unwarped", float(world_model.residual_scale),
                 float(batch.target.std()))


def fit_warp(world_model: ActionConditionedUNet, stream: WindowStream, frames: TrajectoryStore | None,
             environment: EnvironmentParams) -> None:
    """Fit the network's action warp on a sample of training windows and their real ``frames`` (the recorded
    trajectories the latents were encoded from)."""
    if frames is None:
        raise PipelineError("world_model.action_warp measures the view's motion on the recorded frames: pass "
                            "--trajectories data/raw_trajectories (or set world_model.action_warp: false)")
    rows = np.random.default_rng([stream.seed, 11]).permutation(len(stream))[:FIT_WINDOWS]
    k = stream.context
    kept, pairs = [], []
    for row in sorted(rows.tolist()):
        shard, start = (int(v) for v in stream.windows.index[row])
        window = frames.read_matching_window(stream.store, shard, start, k + 1, ["frames"])
        if window is not None:
            kept.append(row)
            pairs.append(window["frames"][k - 1 : k + 1])
    if len(kept) < 16:
        raise PipelineError(f"only {len(kept)} training windows of the latents have their frames in the recorded "
                            "trajectories; rerun validated_latents from the same raw_trajectories")
    batch = stream.read(kept)
    pixels = np.moveaxis(np.stack(pairs).astype(np.float32) / 255.0, -1, -3)  # [N, 2, 3, H, W]
    attributes = stream.store.shards[0].attributes.get("autoencoder", {})
    padding = attributes.get("padding", {})
    geometry = LatentGeometry(int(attributes.get("downsample_factor", pixels.shape[-1] // batch.target.shape[-1])),
                              int(padding.get("left", 0)), int(padding.get("top", 0)))
    warp = world_model.action_warp
    assert warp is not None  # called only for a model with the warp
    fitted = fit_action_warp(warp, batch.context_latents[:, -1], batch.context_actions, batch.target,
                             pixels[:, 0], pixels[:, 1], geometry, environment.view_rows)
    motion = warp.describe([a.name for a in environment.actions])
    log.info("action warp fitted on %d training windows (gate by row %s): %s", fitted["windows"],
             fitted["gate_rows"], ", ".join(
                 f"{name} dx {m['dx_cells']:+.2f} ({m['dx_cells_from_noop']:+.2f} from noop) zoom {m['zoom']:.3f}"
                 for name, m in motion.items()))


# --------------------------------------------------------------------------- evaluation for the stage's metrics


@torch.no_grad()
def heldout_metrics(world_model: ActionConditionedUNet, store: TrajectoryStore, params: Params, windows: int,
                    seed: int = 0, chunk: int = 32, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Quick held-out numbers for ``metrics/diffusion_checkpoint.json`` (full evaluation is its own stage).

    ``heldout_loss``: the training loss on held-out windows with fixed noise; ``sampled_latent_mse``: MSE of the
    sampled next latent (params.sampler) to the real one; ``copy_last_latent_mse``: the same for repeating the
    last context latent, the baseline that shows learned dynamics. Runs in chunks of ``chunk`` windows on
    ``device``; ``batch`` / ``sampled`` of the first chunk are returned for the preview.
    """

    heldout = heldout_windows(store, world_model.config.context + 1, "diffusion_checkpoint's held-out metrics")
    world_model = world_model.to(device)
    rows = np.random.default_rng(seed).permutation(len(heldout))[:windows].tolist()
    ddpm, ddim = make_scheduler(world_model.config, "ddpm"), make_scheduler(world_model.config, "ddim")
    s = params.sampler
    generator = torch.Generator().manual_seed(seed)
    sums = {"heldout_loss": 0.0, "sampled_latent_mse": 0.0, "copy_last_latent_mse": 0.0}
    first: tuple[Batch, torch.Tensor] | None = None
    for begin in range(0, len(rows), chunk):
        batch = windows_batch(heldout, rows[begin : begin + chunk]).to(device)
        size = batch.target.shape[0]
        loss = diffusion_loss(world_model, ddpm, batch, world_model.config, 0.0, generator)
        sampled = sample_next_latent(world_model, ddim, batch.context_latents, batch.context_actions, steps=s.steps,
                                     cfg=s.cfg, context_noise_level=s.context_noise_level, eta=s.eta,
                                     generator=generator)
        sums["heldout_loss"] += float(loss) * size
        sums["sampled_latent_mse"] += float((sampled - batch.target).pow(2).mean()) * size
        sums["copy_last_latent_mse"] += float((batch.context_latents[:, -1] - batch.target).pow(2).mean()) * size
        if first is None:
            first = (batch.to("cpu"), sampled.cpu())
    world_model.cpu()
    assert first is not None
    return {"eval_split": "heldout", "eval_windows": len(rows), **{k: v / len(rows) for k, v in sums.items()},
            "batch": first[0], "sampled": first[1]}


def save_preview(path: str | Path, autoencoder: FrameAutoencoder, batch: Batch, predicted: torch.Tensor,
                 rows: int) -> None:
    """PNG grid, one row per window: the K context frames | predicted next frame | real next frame."""

    rows = min(rows, batch.target.shape[0])
    k = batch.context_latents.shape[1]
    with torch.no_grad():
        context = to_uint8(autoencoder.decode(batch.context_latents[:rows].flatten(0, 1)))
        pred = to_uint8(autoencoder.decode(predicted[:rows]))
        real = to_uint8(autoencoder.decode(batch.target[:rows]))
    context = context.reshape(rows, k, *real.shape[1:])
    frame_grid(path, [(f"window {r + 1}", [*context[r], pred[r], real[r]]) for r in range(rows)],
               [f"ctx {i - k}" for i in range(k)] + ["predicted", "real"])
