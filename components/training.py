"""The training engine every torch trainer uses: autoencoder, decoder fine-tunes, world model and distillation.

A trainer gives a module, the parameters to optimize and ``loss_fn(step) -> loss`` (its loss on one batch); the
engine does the rest, once for all:

- **Device and processes** (``start_runtime``): ``accelerate``'s ``PartialState`` picks the device (the ``device``
  setting: ``auto`` = CUDA when torch sees it) and, under ``accelerate launch --multi_gpu --num_processes N`` or
  ``torchrun --nproc_per_node N``, joins the process group (NCCL on GPUs; gloo on the CPU, with no GPU or with
  ``device: cpu``; accelerate's ``--cpu`` flag starts a single process). Each process draws its own batch;
  gradients are averaged over processes after each backward pass, so the effective batch is ``batch_size x N``
  and every process keeps identical weights.
- **Mixed precision**: the loss runs under ``torch.autocast`` (``bf16``; ``fp16`` on CUDA with a gradient scaler).
- **Budget** (``Budget``): minutes or steps. With minutes, steps ``PLAN_FROM..PLAN_AT`` are timed and the step count
  is fixed to fit; it is timed again at ``REPLAN_AT`` (fractions of the plan) and refitted to the time left, since
  the speed moves during a run (fitted once on steps 5 to 25, the world model overshot 9 minutes by 7% to 32%). The
  learning-rate plan (warm-up, then cosine or constant) is a function of the step and the planned count only.
- **Exact resume**: each step's randomness comes from ``Step.generator`` / ``Step.rng`` (and the global torch seed,
  set per step), functions of (seed, rank, step) only; one atomic, pickle-free safetensors checkpoint holds the
  model, optimizer, EMA and counters. A run killed with ``kill -9`` resumes to the same final weights.
- **Run key** (``run_folder``): the checkpoint folder is ``<cache>/<hash of params, data and process count>``, so a
  stale state is never resumed.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from accelerate import PartialState
from accelerate.utils import broadcast_object_list
from dvclive import Live
from safetensors import safe_open
from safetensors.torch import load_file
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from tqdm import tqdm

from components.atomic import json_sha256, save_safetensors
from components.errors import PipelineError

if TYPE_CHECKING:
    from components.data.trajectory_store import TrajectoryStore


log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.safetensors"
PLAN_FROM, PLAN_AT = 5, 25  # with a time budget, steps PLAN_FROM..PLAN_AT are timed to fix the step count
REPLAN_AT = (0.1, 0.5, 0.8)  # fractions of the plan where the steps since the last plan are timed and it is refitted
DeviceSetting = Literal["auto", "cpu", "cuda"]
Precision = Literal["no", "fp16", "bf16"]


# --------------------------------------------------------------------------- run key and device


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-able parts (params, input manifests): the run key of a training state."""
    return json_sha256(parts)[:16]


def inputs_fingerprint(store: TrajectoryStore) -> list[str]:
    """The sha256 of every array of every shard: changes whenever the data changes."""
    return [spec["sha256"] for shard in store.shards for spec in shard.manifest["arrays"].values()]


def resolve_device(setting: str = "auto", key: str = "device") -> torch.device:
    """``auto`` (CUDA when torch sees it), ``cpu`` or ``cuda``; ``cuda`` without a GPU stops here, naming ``key``."""
    if setting not in ("auto", "cpu", "cuda"):
        raise PipelineError(f"{key}: must be one of 'auto', 'cpu', 'cuda', got {setting!r}")
    if setting == "cuda" and not torch.cuda.is_available():
        raise PipelineError(f"{key}: cuda, but torch sees no CUDA GPU on this machine (torch {torch.__version__}); "
                            f"set {key}: auto or cpu")
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def check_precision(mixed_precision: str, device: torch.device, key: str) -> None:
    """fp16 needs CUDA (CPU autocast has no fp16 kernels worth having): stop before any work, naming ``key``."""
    if mixed_precision == "fp16" and device.type != "cuda":
        raise PipelineError(f"{key}: fp16 needs a CUDA device, this run is on {device.type}; use bf16 or no")


def autocast(mixed_precision: str, device: torch.device) -> torch.autocast:
    """The autocast context a training step's loss runs under (disabled for ``no``)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


@dataclass
class Runtime:
    """Where this process trains: its device, its rank among ``processes`` and whether it writes the outputs."""

    device: torch.device
    rank: int = 0
    processes: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of ``value`` over processes (every process must call it at the same step)."""
        if self.processes == 1:
            return value

        value = value.detach().clone()
        dist.all_reduce(value)
        return value / self.processes

    def broadcast_int(self, value: int) -> int:
        """The main process's ``value`` on every process."""
        if self.processes == 1:
            return value

        return int(broadcast_object_list([value])[0])


def start_runtime(device: str = "auto", key: str = "device") -> Runtime:
    """This process's ``Runtime``; under ``accelerate launch`` (or torchrun) it joins the process group."""

    wanted = resolve_device(device, key)
    state = PartialState(cpu=wanted.type == "cpu")
    resolved = torch.device("cpu") if wanted.type == "cpu" else state.device
    return Runtime(resolved, state.process_index, state.num_processes)


def average_gradients(parameters: Sequence[torch.nn.Parameter], runtime: Runtime) -> None:
    """Data parallelism: every process ends the backward pass with the mean gradient of all processes."""
    if runtime.processes == 1:
        return

    for parameter in parameters:  # the same tensors on every process, so the flat buffers line up
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
    grads = [p.grad for p in parameters if p.grad is not None]  # all of them, after the loop above
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= runtime.processes
    for grad, mean in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
        grad.copy_(mean)


# --------------------------------------------------------------------------- budget and learning-rate plan


@dataclass
class Budget:
    """Train ``max_steps`` steps, or, with ``minutes``, as many as fit them (fixed after timing, refitted later)."""

    minutes: float | None
    max_steps: int
    warmup_steps: int = 0
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_fraction: float = 0.02
    max_warmup_fraction: float = 0.05  # on a slow machine warm-up never takes more than 5% of the run

    def plan(self, done: int, per_step_s: float, elapsed_s: float) -> int:
        """The run's step count: what fits the rest of ``minutes``, at most ``max_steps``."""
        if self.minutes is None:
            return self.max_steps
        remaining = self.minutes * 60.0 - elapsed_s
        return int(min(self.max_steps, max(done, done + remaining / max(per_step_s, 1e-9))))

    def lr_scale(self, step: int, planned: int) -> float:
        """Linear warm-up, then cosine decay reaching ``min_lr_fraction`` at ``planned`` steps (or constant)."""
        warmup = min(self.warmup_steps, int(self.max_warmup_fraction * planned))
        if warmup and step < warmup:
            return (step + 1) / warmup
        if self.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, planned - warmup))
        return self.min_lr_fraction + (1 - self.min_lr_fraction) * 0.5 * (1 + math.cos(math.pi * progress))


def replan_due(step: int, planned: int | None, replans: int, timed_from: tuple[int, float]) -> bool:
    """Whether a time budget's step count is (re)fitted now: first after ``PLAN_AT - PLAN_FROM`` timed steps, then
    at each ``REPLAN_AT`` fraction of the plan, each time on at least as many steps timed since the last fit."""
    enough = step - timed_from[0] >= PLAN_AT - PLAN_FROM
    if planned is None:
        return enough
    return enough and replans < len(REPLAN_AT) and step >= REPLAN_AT[replans] * planned and step < planned


# --------------------------------------------------------------------------- one step's inputs


@dataclass
class Step:
    """What ``loss_fn`` gets: the step, this process's place and RNGs that depend on (seed, rank, step) only."""

    index: int
    rank: int
    processes: int
    device: torch.device
    generator: torch.Generator  # CPU torch RNG
    rng: np.random.Generator


def step_seed(seed: int, rank: int, step: int) -> int:
    return int(np.random.default_rng([seed, rank, step, 7]).integers(2**62))


def make_step(seed: int, runtime: Runtime, step: int) -> Step:
    value = step_seed(seed, runtime.rank, step)
    torch.manual_seed(value)  # implicit draws (dropout, augmentation) are exact on resume too
    return Step(step, runtime.rank, runtime.processes, runtime.device, torch.Generator().manual_seed(value),
                np.random.default_rng(value))


# --------------------------------------------------------------------------- checkpoint


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


@dataclass
class Checkpoint:
    """What a resumed run needs: weights, optimizer, EMA and the counters (step, planned steps, time, curves)."""

    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    ema: dict[str, torch.Tensor] | None
    counters: dict[str, Any]


def save_checkpoint(path: Path, model: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                    ema: dict[str, torch.Tensor] | None, counters: dict[str, Any]) -> None:
    """One atomic safetensors file (no pickle): the ``model`` state as ``model.*``, ``optimizer.*``, ``ema.*`` and
    JSON counters."""

    tensors = {f"model.{k}": v for k, v in model.items()}
    optim_tensors, optim_meta = _flatten_optimizer(optimizer.state_dict())
    tensors.update(optim_tensors)
    if ema is not None:
        tensors.update({f"ema.{k}": v for k, v in ema.items()})
    metadata = {"step": str(counters["step"]), "planned_steps": str(counters.get("planned") or ""),
                "optimizer": json.dumps(optim_meta), "counters": json.dumps(counters)}
    save_safetensors(path, tensors, metadata=metadata)


def load_checkpoint(path: Path) -> Checkpoint:
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata()
        tensors = load_file(str(path))
        counters = json.loads(metadata["counters"])
        optimizer = _unflatten_optimizer(tensors, json.loads(metadata["optimizer"]))
    except Exception as error:  # a damaged checkpoint is not resumable; say so instead of crashing
        raise PipelineError(f"{path}: unreadable checkpoint ({error}); delete it to start over") from None
    model = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    ema = {k[len("ema."):]: v for k, v in tensors.items() if k.startswith("ema.")} or None
    return Checkpoint(model, optimizer, ema, counters)


# --------------------------------------------------------------------------- the loop


@dataclass
class Recipe:
    """How to train, besides the model and its loss: budget, optimizer, precision and the cadences."""

    budget: Budget
    learning_rate: float
    seed: int = 0
    optimizer: Literal["adamw", "adafactor"] = "adamw"
    weight_decay: float = 0.0
    grad_clip: float | None = None
    ema_decay: float = 0.0
    mixed_precision: Precision = "no"
    batch_size: int = 1  # per process; only for the samples/s figure
    eval_every_s: float = 60.0  # of training time
    checkpoint_every_s: float = 60.0
    checkpoint_every_steps: int | None = None  # a fixed cadence instead of the time one
    log_every: int = 10  # steps between points of the loss curve (and the first step)


@dataclass
class TrainResult:
    steps: int
    planned_steps: int
    resumed_from_step: int
    seconds: float  # training time of this and earlier runs, evaluation excluded
    samples_per_s: float  # over all processes, this run's training steps (evaluation and checkpoints excluded)
    curve: list[dict[str, float]] = field(default_factory=list)  # evaluation points
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, mean loss over the last log_every)
    learning_rates: list[float] = field(default_factory=list)  # at the steps of ``losses``
    last_loss: float = float("nan")  # the last step's loss (restored when the run resumes at its end)
    is_main_process: bool = True  # under `accelerate launch` only the main process writes outputs
    processes: int = 1


def make_optimizer(name: str, parameters: Sequence[torch.nn.Parameter] | Sequence[dict[str, Any]],
                   learning_rate: float, weight_decay: float, key: str = "optimizer") -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=weight_decay)
    adafactor = getattr(torch.optim, "Adafactor", None)
    if adafactor is None:
        raise PipelineError(f"{key}: adafactor needs torch >= 2.5 (this is {torch.__version__}); use adamw")
    return adafactor(parameters, lr=learning_rate, weight_decay=weight_decay)


def _update_ema(ema: dict[str, torch.Tensor], module: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for name, value in module.state_dict().items():
            if value.dtype.is_floating_point:
                ema[name].mul_(decay).add_(value.detach().float().cpu(), alpha=1 - decay)
            else:
                ema[name].copy_(value)


def live_history(live_dir: str | Path | None) -> bool:
    """Whether DVCLive's folder holds logged steps (``plots/metrics``, the output dvc.yaml tracks)."""
    return live_dir is not None and any((Path(live_dir) / "plots" / "metrics").rglob("*.tsv"))


def replay_history(live: Live, losses: list[tuple[int, float]], learning_rates: list[float]) -> None:
    """Log a resumed run's restored loss (and learning rate) history into DVCLive: DVC deletes a stage's outputs,
    DVCLive's ``plots/metrics`` among them, before it reruns the stage, and a run resumed at its last step (a code
    change that left the run's key alone) would otherwise leave none of DVCLive's plots behind."""
    for index, (step, loss) in enumerate(losses):
        live.step = step
        live.log_metric("train/loss", loss)
        if index < len(learning_rates):
            live.log_metric("train/lr", learning_rates[index])
        live.next_step()


def open_live(live_dir: str | Path | None, runtime: Runtime) -> Any:
    if live_dir is None or not runtime.is_main:
        return None

    return Live(dir=str(live_dir), dvcyaml=False, save_dvc_exp=False, resume=True)


def _restore(folder: Path | None, module: torch.nn.Module, optimizer: torch.optim.Optimizer
             ) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
    """Counters and EMA of the run saved in ``folder``, weights and optimizer loaded; fresh ones otherwise."""
    fresh: dict[str, Any] = {"step": 0, "planned": None, "replans": 0, "elapsed": 0.0, "curve": [], "losses": [],
                             "learning_rates": [], "last_loss": float("nan")}
    if folder is None:
        return fresh, None
    for leftover in folder.glob(".*.tmp"):  # a write cut short by a kill; the previous checkpoint is intact
        leftover.unlink(missing_ok=True)
    if not (folder / CHECKPOINT_FILE).is_file():
        log.info("training from scratch; checkpoints go to %s", folder)
        return fresh, None
    saved = load_checkpoint(folder / CHECKPOINT_FILE)
    try:
        module.load_state_dict(saved.model)
        optimizer.load_state_dict(saved.optimizer)
    except (RuntimeError, ValueError, KeyError) as error:
        raise PipelineError(f"{folder / CHECKPOINT_FILE}: does not fit this code's model ({str(error)[:200]}); "
                            f"delete {folder} to start over") from None
    counters = {**fresh, **saved.counters}
    if math.isnan(counters["last_loss"]) and counters["losses"]:  # older checkpoints lack it (or resaved it as NaN)
        counters["last_loss"] = counters["losses"][-1][1]  # the last logged loss (a mean over log_every steps)
    return counters, saved.ema


ParamGroup = dict[str, Any]  # {"params": [...], "lr_scale": float}: a group that learns at lr_scale x the recipe's rate


def _param_groups(parameters: Sequence[torch.nn.Parameter] | Sequence[ParamGroup]) -> list[ParamGroup]:
    """``parameters`` as groups: a plain list of tensors is one group."""
    if parameters and not isinstance(parameters[0], dict):
        return [{"params": list(parameters)}]
    return [group for group in parameters if isinstance(group, dict)]


def train(module: torch.nn.Module, parameters: Sequence[torch.nn.Parameter] | Sequence[ParamGroup],
          loss_fn: Callable[[Step], torch.Tensor],
          recipe: Recipe, runtime: Runtime, folder: str | Path | None, *,
          evaluate: Callable[[], dict[str, float]] | None = None, live_dir: str | Path | None = None,
          name: str = "training", stop_after: int | None = None) -> TrainResult:
    """Train ``module`` (moved to ``runtime.device``) on ``loss_fn`` under ``recipe``; resume from ``folder``.

    ``parameters`` are tensors, or groups ``{"params": [...], "lr_scale": x}`` whose learning rate is ``x`` times
    the recipe's (one optimizer, one checkpoint). ``folder`` (from ``run_folder``) holds the checkpoint; None
    trains without one. ``evaluate`` runs on the main process before the first step, every
    ``recipe.eval_every_s`` seconds of training time and after the last step (the points of
    ``TrainResult.curve``). ``stop_after`` ends this call early after that many steps (for tests); the plan is
    unchanged. On return ``module`` holds the final (or EMA) weights, in
    eval mode, on ``runtime.device``.
    """

    folder = Path(folder) if folder else None
    budget = recipe.budget
    groups = _param_groups(parameters)
    parameters = [p for group in groups for p in group["params"]]
    module.to(runtime.device)
    optimizer = make_optimizer(recipe.optimizer, groups, recipe.learning_rate, recipe.weight_decay)
    counters, ema = _restore(folder, module, optimizer)
    step, planned, elapsed = int(counters["step"]), counters["planned"], float(counters["elapsed"])
    replans = int(counters["replans"])
    curve, losses = list(counters["curve"]), [tuple(x) for x in counters["losses"]]
    learning_rates = list(counters["learning_rates"])
    resumed_from = step
    if step:
        log.info("resuming from %s at step %d of %d (%.0f s trained)", folder, step, planned or budget.max_steps,
                 elapsed)
    if budget.minutes is None or budget.max_steps <= step + PLAN_AT:
        planned = planned or budget.max_steps
    if recipe.ema_decay > 0 and ema is None:
        ema = {k: v.detach().clone().float().cpu() for k, v in module.state_dict().items()}
    scaler = torch.amp.GradScaler("cuda") if recipe.mixed_precision == "fp16" else None
    live = open_live(live_dir, runtime)
    if live is not None and losses and not live_history(live_dir):  # DVC removed it; this run resumes
        replay_history(live, losses, learning_rates)
    next_eval = (math.floor(elapsed / recipe.eval_every_s) + 1) * recipe.eval_every_s if evaluate else math.inf
    last_save, elapsed_before = time.monotonic(), elapsed
    timed_from: tuple[int, float] | None = None  # (step, elapsed) where the steps timed for the next plan start
    window: list[float] = []
    samples, loss_value = 0, float(counters["last_loss"])  # the last step's loss, restored on resume
    bar = tqdm(initial=step, total=planned or budget.max_steps, desc=name, disable=not runtime.is_main,
               mininterval=2.0)

    def save() -> None:
        if folder is not None and runtime.is_main:  # every process holds the same state; one writes it
            folder.mkdir(parents=True, exist_ok=True)
            save_checkpoint(folder / CHECKPOINT_FILE, module.state_dict(), optimizer, ema, {
                "step": step, "planned": planned, "replans": replans, "elapsed": elapsed, "curve": curve,
                "losses": losses, "learning_rates": learning_rates, "last_loss": loss_value})

    def evaluation_point() -> None:
        module.eval()
        point = {"seconds": round(elapsed, 1), "step": step, **evaluate()}  # type: ignore[misc]
        module.train()
        curve.append(point)
        log.info("%s: step %d, %.0f s: %s", name, step, elapsed, {k: round(v, 4) for k, v in point.items()})

    evaluating = evaluate is not None and runtime.is_main
    if evaluating and step == 0:
        evaluation_point()  # where training starts from
    module.train()
    while step < (planned or budget.max_steps) and (stop_after is None or step < resumed_from + stop_after):
        started = time.monotonic()
        if step == resumed_from + PLAN_FROM:
            timed_from = (step, elapsed)
        lr = recipe.learning_rate * budget.lr_scale(step, planned or budget.max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        with autocast(recipe.mixed_precision, runtime.device):
            loss = loss_fn(make_step(recipe.seed, runtime, step))
        optimizer.zero_grad(set_to_none=True)
        (scaler.scale(loss) if scaler else loss).backward()
        average_gradients(parameters, runtime)
        if scaler:
            scaler.unscale_(optimizer)
        if recipe.grad_clip:
            torch.nn.utils.clip_grad_norm_(parameters, recipe.grad_clip)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        if ema is not None:
            _update_ema(ema, module, recipe.ema_decay)
        loss_value = float(runtime.mean(loss.detach().float()))
        if not math.isfinite(loss_value):
            raise PipelineError(f"{name}: training diverged at step {step} (loss {loss_value}); lower the "
                                f"learning rate")
        window.append(loss_value)
        step += 1
        samples += recipe.batch_size * runtime.processes
        elapsed += time.monotonic() - started
        bar.update(1)
        if timed_from is not None and budget.minutes is not None and replan_due(step, planned, replans, timed_from):
            per_step = (elapsed - timed_from[1]) / (step - timed_from[0])
            if planned is not None:
                replans += 1
            planned = runtime.broadcast_int(budget.plan(step, per_step, elapsed))
            timed_from = (step, elapsed)
            bar.total = planned
            log.info("%s: step %d, %.3f s/step, %d steps fit %.1f minutes (the most is %d); LR plan %s to %d steps",
                     name, step, per_step, planned, budget.minutes, budget.max_steps,
                     "refitted" if replans else "fixed", planned)
        if step % recipe.log_every == 0 or step == planned or step == resumed_from + 1:
            losses.append((step, float(np.mean(window))))
            learning_rates.append(lr)
            rate = samples / max(elapsed - elapsed_before, 1e-9)
            bar.set_postfix(loss=f"{losses[-1][1]:.4f}", lr=f"{lr:.2e}", sps=f"{rate:.1f}", refresh=False)
            if live is not None:
                live.step = step
                live.log_metric("train/loss", losses[-1][1])
                live.log_metric("train/lr", lr)
                live.log_metric("train/samples_per_s", rate)
                live.next_step()
            window = []
        if evaluating and elapsed >= next_eval:
            evaluation_point()
            next_eval += recipe.eval_every_s
        due = (step % recipe.checkpoint_every_steps == 0 if recipe.checkpoint_every_steps
               else time.monotonic() - last_save >= recipe.checkpoint_every_s)
        if due:
            save()
            last_save = time.monotonic()
    bar.close()
    if evaluating and (not curve or curve[-1]["step"] != step):
        evaluation_point()  # where training ended
    save()
    if live is not None:
        live.end()
    if ema is not None:
        module.load_state_dict({k: v.to(module.state_dict()[k].dtype) for k, v in ema.items()})
    module.eval()
    return TrainResult(step, planned or budget.max_steps, resumed_from, elapsed,
                       samples / max(elapsed - elapsed_before, 1e-9) if samples else 0.0, curve, losses,
                       learning_rates, loss_value, runtime.is_main, runtime.processes)


def run_folder(cache: str | Path | None, runtime: Runtime, *key_parts: Any) -> Path | None:
    """The checkpoint folder of a run: ``<cache>/<run key>``, the key covering ``key_parts`` and the process count
    (a different count is a different run). ``cache`` None or empty: no checkpoints."""
    return Path(cache) / fingerprint(*key_parts, {"processes": runtime.processes}) if cache else None
