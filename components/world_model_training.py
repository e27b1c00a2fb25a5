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
    t ~ U{0..T-1}; eps ~ N(0, I); x_t = ddpm.add_noise(target, eps, t)
    loss = || net(x_t, t, context, actions, bucket) - ddpm.get_velocity(target, eps, t) ||^2

Checkpoints (``model``, ``optimizer``, ``ema``, ``step``, torch RNG) are one safetensors file written atomically
every ``checkpoint_every`` steps under ``.cache/diffusion_checkpoint/<key>/``, where ``key`` hashes the params
sections, the action count and the input shards' checksums, so a stale checkpoint is never resumed. DVC deletes
the stage's outs before a rerun; the cache lives outside them, so a killed run (even SIGKILL) resumes from the
last checkpoint and ends at the same step with the same final files.

Multi-GPU / multi-node: the stage uses ``accelerate.Accelerator``; run it as
``accelerate launch [--num_processes N --num_machines M ...] -m components diffusion_checkpoint``.
``batch_size`` is per process; process ``r`` reads its own windows. On CPU it is a single process.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from components.errors import PipelineError
from components.trajectory_store import TrajectoryStore
from components.motion_warp import LatentGeometry, fit_action_warp
from components.world_model import ActionConditionedUNet, context_noise, make_scheduler, noise_bucket

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.safetensors"


# --------------------------------------------------------------------------- data


@dataclass
class Batch:
    context_latents: torch.Tensor  # [B, K, C, h, w]
    context_actions: torch.Tensor  # [B, K]
    target: torch.Tensor  # [B, C, h, w]

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(self.context_latents.to(device), self.context_actions.to(device), self.target.to(device))


class WindowStream:
    """Deterministic, resumable stream of training windows from a ``TrajectoryStore`` of latents.

    The window index (shard, start row) is small; the latents stay memory-mapped on disk.
    """

    def __init__(self, store: TrajectoryStore, context: int, split: str | None, seed: int,
                 rank: int = 0, world_size: int = 1) -> None:
        self.store, self.context, self.seed = store, context, seed
        self.rank, self.world_size = rank, world_size
        self.index = store.window_index(context + 1, split)
        self._epoch, self._permutation = -1, np.zeros(0, np.int64)

    def __len__(self) -> int:
        return len(self.index)

    def _position(self, position: int) -> int:
        epoch, offset = divmod(position, len(self.index))
        if epoch != self._epoch:
            self._epoch = epoch
            self._permutation = np.random.default_rng([self.seed, epoch]).permutation(len(self.index))
        return int(self._permutation[offset])

    def batch(self, step: int, batch_size: int) -> Batch:
        """The windows of ``step`` for this process: global positions ``(step * world + rank) * B + i``."""
        first = (step * self.world_size + self.rank) * batch_size
        return self.read([self._position(first + i) for i in range(batch_size)])

    def read(self, rows: list[int]) -> Batch:
        windows = [self.store.read_window(int(self.index[r, 0]), int(self.index[r, 1]), self.context + 1,
                                          ("latents", "actions")) for r in rows]
        latents = torch.from_numpy(np.stack([w["latents"] for w in windows]).astype(np.float32))
        actions = torch.from_numpy(np.stack([w["actions"] for w in windows]).astype(np.int64))
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


def step_generator(seed: int, rank: int, step: int) -> torch.Generator:
    """The RNG of one training step: a function of (seed, rank, step) only, so resuming is exact."""
    return torch.Generator().manual_seed(int(np.random.default_rng([seed, rank, step, 7]).integers(2**62)))


def diffusion_loss(net: Any, ddpm: Any, batch: Batch, config: Any, context_dropout: float,
                   generator: torch.Generator) -> torch.Tensor:
    """The v-prediction loss with context noise augmentation and context dropout (module docstring)."""
    device = batch.target.device
    size = batch.target.shape[0]
    cpu = dict(generator=generator)
    levels = torch.rand(size, **cpu) * config.max_noise_level
    buckets = noise_bucket(levels, config.max_noise_level, config.noise_buckets).to(device)
    context = context_noise(batch.context_latents, levels.to(device), generator)
    model = getattr(net, "module", net)  # under DistributedDataParallel
    target = model.to_residual(batch.target, model.residual_base(context, batch.context_actions))
    keep = (torch.rand(size, **cpu) >= context_dropout).to(device=device, dtype=context.dtype)
    context = context * keep.view(-1, 1, 1, 1, 1)
    timesteps = torch.randint(0, config.num_train_timesteps, (size,), **cpu).to(device)
    noise = torch.randn(batch.target.shape, **cpu).to(device)
    noisy = ddpm.add_noise(target, noise, timesteps)
    target_v = ddpm.get_velocity(target, noise, timesteps)
    predicted = net(noisy, timesteps, context, batch.context_actions, buckets)
    return torch.nn.functional.mse_loss(predicted.float(), target_v.float())


def learning_rate(step: int, params: Any, total: int | None = None) -> float:
    """Linear warm-up, then constant or cosine decay to zero at ``total`` steps (default ``params.steps``)."""
    base = params.learning_rate
    if params.warmup_steps and step < params.warmup_steps:
        return base * (step + 1) / params.warmup_steps
    if params.lr_schedule == "constant":
        return base
    total = params.steps if total is None else total
    progress = (step - params.warmup_steps) / max(1, total - params.warmup_steps)
    return base * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(net: torch.nn.Module, params: Any) -> torch.optim.Optimizer:
    if params.optimizer == "adamw":
        return torch.optim.AdamW(net.parameters(), lr=params.learning_rate, weight_decay=params.weight_decay)
    adafactor = getattr(torch.optim, "Adafactor", None)
    if adafactor is None:
        raise PipelineError(f"diffusion_checkpoint.optimizer: adafactor needs torch >= 2.5 (this is "
                            f"{torch.__version__}); use adamw")
    return adafactor(net.parameters(), lr=params.learning_rate, weight_decay=params.weight_decay)


# --------------------------------------------------------------------------- checkpoints


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for index, values in state["state"].items():
        for name, value in values.items():
            key = f"optimizer.{index}.{name}"
            if isinstance(value, torch.Tensor):
                tensors[key] = value
            else:
                scalars[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    items = [(k, v) for k, v in tensors.items() if k.startswith("optimizer.")] + list(meta["scalars"].items())
    for key, value in items:
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(path: Path, net: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int,
                    ema: dict[str, torch.Tensor] | None, planned_steps: int | None = None) -> None:
    """One atomic safetensors file: model, optimizer, EMA, step and the torch RNG state."""
    from components.atomic import save_safetensors

    tensors = {f"model.{k}": v for k, v in net.state_dict().items()}
    optim_tensors, optim_meta = _flatten_optimizer(optimizer.state_dict())
    tensors.update(optim_tensors)
    if ema is not None:
        tensors.update({f"ema.{k}": v for k, v in ema.items()})
    tensors["rng.torch"] = torch.get_rng_state()
    metadata = {"step": str(step), "planned_steps": str(planned_steps or ""), "optimizer": json.dumps(optim_meta)}
    save_safetensors(path, tensors, metadata=metadata)


def load_checkpoint(path: Path) -> tuple[int, dict[str, torch.Tensor], dict[str, Any], dict[str, torch.Tensor] | None,
                                         torch.Tensor, int | None]:
    """(step, model state, optimizer state, EMA or None, torch RNG state, planned step count or None)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata()
        tensors = load_file(str(path))
    except Exception as error:  # a damaged checkpoint is not resumable; say so instead of crashing
        raise PipelineError(f"{path}: unreadable checkpoint ({error}); delete it to start over") from None
    model = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    ema = {k[len("ema."):]: v for k, v in tensors.items() if k.startswith("ema.")} or None
    optimizer = _unflatten_optimizer(tensors, json.loads(metadata["optimizer"]))
    planned = int(metadata["planned_steps"]) if metadata.get("planned_steps") else None
    return int(metadata["step"]), model, optimizer, ema, tensors["rng.torch"], planned


# diffusion_checkpoint params that do not change the trained weights, so changing them keeps the checkpoint
NOT_IN_CACHE_KEY = ("log_every", "checkpoint_every", "eval_windows", "preview_windows")


def cache_key(params: Any, num_actions: int, fingerprint: str, processes: int = 1) -> str:
    """Key of a run's checkpoint folder: params that shape training, action count, process count and the data."""
    payload = {
        "world_model": params.world_model.model_dump(mode="json"),
        "diffusion_checkpoint": params.diffusion_checkpoint.model_dump(mode="json", exclude=set(NOT_IN_CACHE_KEY)),
        "num_actions": num_actions,
        "processes": processes,
        "data": fingerprint,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- training


@dataclass
class TrainResult:
    net: ActionConditionedUNet
    steps: int
    resumed_from: int
    final_loss: float
    losses: list[tuple[int, float]]
    samples_per_s: float
    seconds: float
    planned_steps: int
    is_main_process: bool = True  # under `accelerate launch`, only the main process writes the outputs


PLAN_FROM, PLAN_AT = 5, 25  # with a time budget, steps PLAN_FROM..PLAN_AT are timed to fix the step count


def plan_steps(params: Any, done: int, per_step_s: float, elapsed_s: float) -> int:
    """The run's step count under ``train_minutes``: what fits the rest of the budget, at most ``steps``."""
    remaining = params.train_minutes * 60.0 - elapsed_s
    return int(min(params.steps, max(done, done + remaining / max(per_step_s, 1e-9))))


def train(params: Any, latents_root: str | Path, cache_root: str | Path = ".cache/diffusion_checkpoint",
          live_dir: str | Path | None = "dvclive/diffusion_checkpoint", stop_after: int | None = None,
          frames_root: str | Path | None = None) -> TrainResult:
    """Train (or resume) the world model on the train split of ``latents_root``; see the module docstring.

    ``frames_root`` holds the recorded trajectories the latents were encoded from; the action warp
    (``world_model.action_warp``) is fitted on their frames, so it is needed only then.

    With ``diffusion_checkpoint.train_minutes`` set, the step count (and so the LR schedule) is fixed once, after
    timing the first steps, and saved in the checkpoint: a resumed run keeps it. ``stop_after`` ends this call
    early after that many steps (for tests); the checkpoint schedule is unchanged.
    """
    from accelerate import Accelerator
    from accelerate.utils import broadcast_object_list
    from tqdm import tqdm

    wm_params, tp = params.world_model, params.diffusion_checkpoint
    num_actions = len(params.environment.actions)
    store = open_latents(latents_root, wm_params.context, num_actions)
    channels, height, width = latent_shape(store)

    # cpu=True without CUDA lets `torchrun`/`accelerate launch` run several CPU processes (gloo)
    accelerator = Accelerator(mixed_precision=tp.mixed_precision, cpu=not torch.cuda.is_available())
    device = accelerator.device
    torch.manual_seed(tp.seed)
    net = ActionConditionedUNet.from_params(wm_params, channels, (height, width), num_actions)
    optimizer = make_optimizer(net, tp)
    ddpm = make_scheduler(net.config, "ddpm")

    run_dir = Path(cache_root) / cache_key(params, num_actions, data_fingerprint(store), accelerator.num_processes)
    checkpoint = run_dir / CHECKPOINT_FILE
    start, ema, planned = 0, None, None
    for leftover in run_dir.glob(".*.tmp"):  # a checkpoint write cut short by a kill; the previous one is intact
        leftover.unlink(missing_ok=True)
    if checkpoint.is_file():
        start, model_state, optim_state, ema, rng, planned = load_checkpoint(checkpoint)
        try:
            net.load_state_dict(model_state)
            optimizer.load_state_dict(optim_state)
        except (RuntimeError, ValueError, KeyError) as error:
            raise PipelineError(f"{checkpoint}: does not fit this code's model ({str(error)[:200]}); delete "
                                f"{run_dir} to start over") from None
        torch.set_rng_state(rng)
        log.info("resuming from %s at step %d of %s", checkpoint, start, planned or tp.steps)
    else:
        log.info("training from scratch; checkpoints go to %s", run_dir)
        fit_to_data(net, WindowStream(store, wm_params.context, "train", tp.seed),
                    TrajectoryStore(frames_root) if frames_root else None, params.environment)
    if tp.train_minutes is None or tp.steps <= start + PLAN_AT:
        planned = planned or tp.steps
    if tp.ema_decay > 0 and ema is None:
        ema = {k: v.detach().clone().float() for k, v in net.state_dict().items()}
    log.info("world model: %.2fM parameters, latents %dx%dx%d, K=%d, %d train windows",
             net.num_parameters() / 1e6, channels, height, width, wm_params.context,
             len(store.window_index(wm_params.context + 1, "train")))

    net, optimizer = accelerator.prepare(net, optimizer)
    log.info("process %d of %d on %s, batch %d per process", accelerator.process_index, accelerator.num_processes,
             device, tp.batch_size)
    config = accelerator.unwrap_model(net).config
    stream = WindowStream(store, wm_params.context, "train", tp.seed, accelerator.process_index,
                          accelerator.num_processes)
    live = _open_live(live_dir, accelerator.is_main_process)
    losses: list[tuple[int, float]] = []
    window: list[float] = []
    began, samples = time.perf_counter(), 0
    tick, tick_samples, plan_started = began, 0, began
    per_process = tp.batch_size * accelerator.num_processes
    net.train()
    bar = tqdm(initial=start, total=planned or tp.steps, desc="diffusion_checkpoint",
               disable=not accelerator.is_main_process, mininterval=2.0)
    step = start
    while step < (planned or tp.steps) and (stop_after is None or step < start + stop_after):
        if step == start + PLAN_FROM:
            plan_started = time.perf_counter()
        lr = learning_rate(step, tp, planned or tp.steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = stream.batch(step, tp.batch_size).to(device)
        with accelerator.autocast():
            loss = diffusion_loss(net, ddpm, batch, config, tp.context_dropout,
                                  step_generator(tp.seed, accelerator.process_index, step))
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(net.parameters(), tp.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            _update_ema(ema, accelerator.unwrap_model(net), tp.ema_decay)
        window.append(float(accelerator.reduce(loss.detach(), reduction="mean")))
        samples += per_process
        tick_samples += per_process
        step += 1
        bar.update(1)
        if planned is None and step == start + PLAN_AT:
            now = time.perf_counter()
            decided = [plan_steps(tp, step, (now - plan_started) / (PLAN_AT - PLAN_FROM), now - began)]
            planned = int(broadcast_object_list(decided)[0])
            bar.total = planned
            log.info("%.2f s/step: %d steps fit train_minutes=%.1f (the most is %d); LR schedule fixed to %d",
                     (now - plan_started) / (PLAN_AT - PLAN_FROM), planned, tp.train_minutes, tp.steps, planned)
        if step % tp.log_every == 0 or step == planned:
            now = time.perf_counter()
            mean_loss = float(np.mean(window))
            losses.append((step, mean_loss))
            rate = tick_samples / max(now - tick, 1e-9)
            bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", sps=f"{rate:.1f}")
            if live is not None:
                live.step = step
                live.log_metric("train/loss", mean_loss)
                live.log_metric("train/lr", lr)
                live.log_metric("train/samples_per_s", rate)
                live.next_step()
            window, tick, tick_samples = [], now, 0
        if step % tp.checkpoint_every == 0 or step == planned:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                save_checkpoint(checkpoint, accelerator.unwrap_model(net), optimizer, step, ema, planned)
    bar.close()
    if live is not None:
        live.end()
    seconds = time.perf_counter() - began
    model = accelerator.unwrap_model(net)
    if ema is not None:
        model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in ema.items()})
    model = model.float().cpu().eval()
    final = losses[-1][1] if losses else float("nan")
    return TrainResult(model, step, start, final, losses, samples / max(seconds, 1e-9) if samples else 0.0,
                       seconds, planned or tp.steps, accelerator.is_main_process)


FIT_WINDOWS = 2048  # training windows the action warp and the residual scale are fitted on before the first step


def fit_to_data(net: ActionConditionedUNet, stream: WindowStream, frames: TrajectoryStore | None,
                environment: Any) -> None:
    """Before the first step: fit the action warp (``world_model.action_warp``) and measure the residual scale
    (``world_model.predict_residual``: the std of ``next - base``) on a sample of training windows."""
    if net.action_warp is not None:
        fit_warp(net, stream, frames, environment)
    if net.config.predict_residual:
        rows = np.random.default_rng([stream.seed, 12]).permutation(len(stream))[:FIT_WINDOWS]
        batch = stream.read(sorted(rows.tolist()))
        with torch.no_grad():
            residual = batch.target - net.residual_base(batch.context_latents, batch.context_actions)
            net.residual_scale.fill_(float(residual.std()))
        log.info("predicting the residual to the %s last latent: std %.3f (the latents' std is %.3f)",
                 "warped" if net.action_warp is not None else "unwarped", float(net.residual_scale),
                 float(batch.target.std()))


def fit_warp(net: ActionConditionedUNet, stream: WindowStream, frames: TrajectoryStore | None,
             environment: Any) -> None:
    """Fit the network's action warp on a sample of training windows and their real ``frames`` (the recorded
    trajectories the latents were encoded from)."""
    if frames is None:
        raise PipelineError("world_model.action_warp measures the view's motion on the recorded frames: pass "
                            "--trajectories data/raw_trajectories (or set world_model.action_warp: false)")
    rows = np.random.default_rng([stream.seed, 11]).permutation(len(stream))[:FIT_WINDOWS]
    k = stream.context
    kept, pairs = [], []
    for row in sorted(rows.tolist()):
        shard, start = (int(v) for v in stream.index[row])
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
    fitted = fit_action_warp(net.action_warp, batch.context_latents[:, -1], batch.context_actions, batch.target,
                             pixels[:, 0], pixels[:, 1], geometry, environment.view_rows)
    motion = net.action_warp.describe([a.name for a in environment.actions])
    log.info("action warp fitted on %d training windows (gate by row %s): %s", fitted["windows"],
             fitted["gate_rows"], ", ".join(
                 f"{name} dx {m['dx_cells']:+.2f} ({m['dx_cells_from_noop']:+.2f} from noop) zoom {m['zoom']:.3f}"
                 for name, m in motion.items()))


def _update_ema(ema: dict[str, torch.Tensor], net: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for name, value in net.state_dict().items():
            if value.dtype.is_floating_point:
                ema[name].mul_(decay).add_(value.detach().float().cpu(), alpha=1 - decay)
            else:
                ema[name].copy_(value)


def _open_live(live_dir: str | Path | None, main: bool) -> Any:
    if live_dir is None or not main:
        return None
    from dvclive import Live

    return Live(dir=str(live_dir), dvcyaml=False, save_dvc_exp=False, resume=True)


# --------------------------------------------------------------------------- evaluation for the stage's metrics


@torch.no_grad()
def heldout_metrics(net: ActionConditionedUNet, store: TrajectoryStore, params: Any, windows: int,
                    seed: int = 0, chunk: int = 32) -> dict[str, Any]:
    """Quick held-out numbers for ``metrics/diffusion_checkpoint.json`` (full evaluation is its own stage).

    ``heldout_loss``: the training loss on held-out windows with fixed noise; ``sampled_latent_mse``: MSE of the
    sampled next latent (params.sampler) to the real one; ``copy_last_latent_mse``: the same for repeating the
    last context latent, the baseline that shows learned dynamics. Runs in chunks of ``chunk`` windows on the
    GPU when there is one; ``batch`` / ``sampled`` of the first chunk are returned for the preview.
    """
    from components.sampler import sample_next_latent

    split = "heldout"
    stream = WindowStream(store, net.config.context, split, seed)
    if len(stream) == 0:
        log.warning("no held-out windows of %d frames; metrics use train windows", net.config.context + 1)
        split = "train"
        stream = WindowStream(store, net.config.context, split, seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    net = net.to(device)
    rows = np.random.default_rng(seed).permutation(len(stream))[:windows].tolist()
    ddpm, ddim, s = make_scheduler(net.config, "ddpm"), make_scheduler(net.config, "ddim"), params.sampler
    generator = torch.Generator().manual_seed(seed)
    sums = {"heldout_loss": 0.0, "sampled_latent_mse": 0.0, "copy_last_latent_mse": 0.0}
    first: tuple[Batch, torch.Tensor] | None = None
    for begin in range(0, len(rows), chunk):
        batch = stream.read(rows[begin : begin + chunk]).to(device)
        size = batch.target.shape[0]
        loss = diffusion_loss(net, ddpm, batch, net.config, 0.0, generator)
        sampled = sample_next_latent(net, ddim, batch.context_latents, batch.context_actions, steps=s.steps,
                                     cfg=s.cfg, context_noise_level=s.context_noise_level, eta=s.eta,
                                     generator=generator)
        sums["heldout_loss"] += float(loss) * size
        sums["sampled_latent_mse"] += float((sampled - batch.target).pow(2).mean()) * size
        sums["copy_last_latent_mse"] += float((batch.context_latents[:, -1] - batch.target).pow(2).mean()) * size
        if first is None:
            first = (batch.to("cpu"), sampled.cpu())
    net.cpu()
    assert first is not None
    return {"eval_split": split, "eval_windows": len(rows), **{k: v / len(rows) for k, v in sums.items()},
            "batch": first[0], "sampled": first[1]}


def save_preview(path: str | Path, autoencoder: Any, batch: Batch, predicted: torch.Tensor, rows: int) -> None:
    """PNG grid, one row per window: the K context frames | predicted next frame | real next frame."""
    from PIL import Image, ImageDraw

    from components.atomic import atomic_path

    rows = min(rows, batch.target.shape[0])
    k = batch.context_latents.shape[1]
    with torch.no_grad():
        context = autoencoder.decode(batch.context_latents[:rows].flatten(0, 1)).clamp(0, 1)
        pred = autoencoder.decode(predicted[:rows]).clamp(0, 1)
        real = autoencoder.decode(batch.target[:rows]).clamp(0, 1)
    _, height, width = real.shape[1:]
    scale = max(1, 160 // width)
    gap, label = 4, 14
    cols = k + 2
    canvas = Image.new("RGB", (cols * (width * scale + gap), label + rows * (height * scale + gap)), "white")
    draw = ImageDraw.Draw(canvas)
    for c, text in enumerate([f"ctx {i - k}" for i in range(k)] + ["predicted", "real"]):
        draw.text((c * (width * scale + gap) + 2, 1), text, fill="black")
    for r in range(rows):
        tiles = [context[r * k + i] for i in range(k)] + [pred[r], real[r]]
        for c, tile in enumerate(tiles):
            array = (tile.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
            image = Image.fromarray(array).resize((width * scale, height * scale), Image.NEAREST)
            canvas.paste(image, (c * (width * scale + gap), label + r * (height * scale + gap)))
    with atomic_path(path, suffix=".png") as temporary:
        canvas.save(temporary, format="PNG")
