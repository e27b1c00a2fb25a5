"""Time-budgeted, resumable training: the loop the autoencoder and distillation stages share.

``Budget`` plans the learning-rate schedule (linear warm-up, cosine decay) to end exactly when the budget of
minutes or steps runs out. ``ResumableState`` keeps model, optimizer and counters under ``.cache/<stage>/<key>/``,
where ``key`` is a ``fingerprint`` of the params and the input data, so a killed run resumes and a stale state is
never picked up.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from components.atomic import atomic_path, atomic_write_json, save_safetensors
from components.errors import PipelineError

log = logging.getLogger(__name__)


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-able parts (params, input manifests): keys resumable state."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def inputs_fingerprint(store: Any) -> list[str]:
    """The sha256 of every array of every shard: changes whenever the data changes."""
    return [spec["sha256"] for shard in store.shards for spec in shard.manifest["arrays"].values()]


@dataclass
class Budget:
    """Train until ``minutes`` of training time or ``max_steps`` steps, whichever comes first."""

    minutes: float
    max_steps: int
    warmup_steps: int = 0
    min_lr_fraction: float = 0.02
    max_warmup_fraction: float = 0.05  # on a slow machine warm-up never takes more than 5% of the budget

    def progress(self, step: int, elapsed: float) -> float:
        return max(step / self.max_steps, elapsed / (60.0 * self.minutes))

    def lr_scale(self, step: int, elapsed: float) -> float:
        """Linear warm-up, then cosine decay planned to reach its floor exactly when the budget ends."""
        progress = min(1.0, self.progress(step, elapsed))
        warm = 1.0
        if self.warmup_steps:
            warm = min(1.0, max((step + 1) / self.warmup_steps, progress / self.max_warmup_fraction))
        cosine = self.min_lr_fraction + (1 - self.min_lr_fraction) * 0.5 * (1 + math.cos(math.pi * progress))
        return warm * cosine


@dataclass
class TrainResult:
    steps: int
    seconds: float
    resumed_from_step: int
    curve: list[dict[str, float]] = field(default_factory=list)
    last_loss: float = float("nan")


class ResumableState:
    """Model + optimizer + counters under ``.cache/<stage>/<key>/``; a stale key is never resumed."""

    def __init__(self, root: str | Path | None, key: str) -> None:
        self.folder = Path(root) / key if root else None

    def load(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
        if self.folder is None or not (self.folder / "counters.json").is_file():
            return None
        from safetensors.torch import load_file

        try:
            counters = json.loads((self.folder / "counters.json").read_text())
            module.load_state_dict(load_file(str(self.folder / "model.safetensors")))
            optimizer.load_state_dict(torch.load(self.folder / "optimizer.pt", weights_only=True))
        except Exception as error:  # a damaged cache is not fatal: start over
            log.warning("ignoring unreadable training state in %s (%s)", self.folder, error)
            return None
        log.info("resuming from %s at step %d (%.0f s trained)", self.folder, counters["step"], counters["elapsed"])
        return counters

    def save(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, counters: dict[str, Any]) -> None:
        if self.folder is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        save_safetensors(self.folder / "model.safetensors", module.state_dict())
        with atomic_path(self.folder / "optimizer.pt", suffix=".pt") as temporary:
            torch.save(optimizer.state_dict(), temporary)
        atomic_write_json(self.folder / "counters.json", counters)  # written last: marks a complete state


def train(
    module: torch.nn.Module,
    parameters: Sequence[torch.nn.Parameter],
    loss_fn: Callable[[int], torch.Tensor],
    budget: Budget,
    learning_rate: float,
    state: ResumableState,
    evaluate: Callable[[], dict[str, float]] | None = None,
    eval_every_s: float = 60.0,
    checkpoint_every_s: float = 60.0,
    weight_decay: float = 0.0,
) -> TrainResult:
    """AdamW on ``loss_fn(step)`` within ``budget``; evaluates every ``eval_every_s`` seconds of training time.

    ``module`` is what the resumable state saves and restores; ``parameters`` are the ones optimized.
    """
    from tqdm import tqdm

    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=weight_decay)
    counters = state.load(module, optimizer) or {"step": 0, "elapsed": 0.0, "curve": []}
    step, elapsed, curve = int(counters["step"]), float(counters["elapsed"]), list(counters["curve"])
    resumed_from = step
    next_eval = (math.floor(elapsed / eval_every_s) + 1) * eval_every_s if evaluate else math.inf
    last_save = time.monotonic()
    loss_value = float("nan")
    # The bar shows the share of the budget used, whichever of minutes and steps ends it.
    bar = tqdm(total=100, initial=int(100 * min(1.0, budget.progress(step, elapsed))), unit="%", desc="training",
               mininterval=2.0, bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}{postfix}]")
    module.train()
    while budget.progress(step, elapsed) < 1.0:
        started = time.monotonic()
        scale = budget.lr_scale(step, elapsed)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate * scale
        loss = loss_fn(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise PipelineError(f"training diverged at step {step} (loss {loss_value}); lower the learning rate")
        step += 1
        took = time.monotonic() - started
        elapsed += took
        bar.update(int(100 * min(1.0, budget.progress(step, elapsed))) - bar.n)
        bar.set_postfix(step=step, loss=f"{loss_value:.4f}", lr=f"{learning_rate * scale:.2e}", refresh=False)
        if elapsed >= next_eval:
            module.eval()
            point = {"seconds": round(elapsed, 1), "step": step, **evaluate()}  # type: ignore[misc]
            module.train()
            curve.append(point)
            log.info("step %d, %.0f s: %s", step, elapsed, {k: round(v, 4) for k, v in point.items()})
            next_eval += eval_every_s
        if time.monotonic() - last_save >= checkpoint_every_s:
            state.save(module, optimizer, {"step": step, "elapsed": elapsed, "curve": curve})
            last_save = time.monotonic()
    bar.close()
    state.save(module, optimizer, {"step": step, "elapsed": elapsed, "curve": curve})
    module.eval()
    return TrainResult(steps=step, seconds=elapsed, resumed_from_step=resumed_from, curve=curve, last_loss=loss_value)
