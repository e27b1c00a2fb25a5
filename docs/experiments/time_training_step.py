"""Time the world model's training step as the stage runs it: eager, channels-last or under torch.compile.

    python docs/experiments/time_training_step.py {eager,channels_last,compile} [--params params.yaml] [--steps 30]

One mode per process (compiled code and thread pools do not leak between modes); prints the warm-up seconds (the
compile, for `compile`) and the median and mean ms of a step: the stage's `diffusion_loss` on a random batch of the
profile's shape, backward, gradient clipping, the optimizer step; 2 threads.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["eager", "channels_last", "compile"])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()

    import torch

    from components.models.world_model import ActionConditionedUNet, make_scheduler
    from components.models.world_model_training import Batch, diffusion_loss
    from components.params import load_params
    from components.training import make_optimizer

    torch.set_num_threads(2)
    params = load_params(args.params)
    settings, actions = params.diffusion_checkpoint, len(params.environment.actions)
    channels, shape, k = 4, (16, 20), params.world_model.context  # the default profile's latents
    torch.manual_seed(0)
    model = ActionConditionedUNet.from_params(params.world_model, channels, shape, actions)
    optimizer = make_optimizer(settings.optimizer, list(model.parameters()), settings.learning_rate,
                               settings.weight_decay)
    ddpm = make_scheduler(model.config, "ddpm")
    b = settings.batch_size
    batch = Batch(torch.randn(b, k, channels, *shape), torch.randint(0, actions, (b, k)),
                  torch.randn(b, channels, *shape))
    if args.mode == "channels_last":
        model = model.to(memory_format=torch.channels_last)
    if args.mode == "compile":
        model.unet = torch.compile(model.unet, dynamic=False)
    model.train()
    generator = torch.Generator().manual_seed(0)

    def step() -> None:
        loss = diffusion_loss(model, ddpm, batch, model.config, settings.context_dropout, generator,
                              settings.terminal_share)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    started = time.perf_counter()
    for _ in range(3):
        step()
    warm_up = time.perf_counter() - started
    times = []
    for _ in range(args.steps):
        started = time.perf_counter()
        step()
        times.append((time.perf_counter() - started) * 1000)
    print(f"{args.mode}: warm-up {warm_up:.1f} s, step median {statistics.median(times):.1f} ms, "
          f"mean {statistics.mean(times):.1f} ms")


if __name__ == "__main__":
    main()
