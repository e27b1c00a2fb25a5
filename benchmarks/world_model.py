"""Benchmark the diffusion world model at the default profile: training throughput and ms per generated frame.

    python benchmarks/world_model.py [--params params.yaml] [--threads 2] [--device cpu|cuda] [--repeats 5]
                                     [--train-mode eager|channels_last|compile]

Builds the world model and the autoencoder from ``params.yaml`` (weights do not change the speed; a trained
``data/finetuned_vae`` is used when present), at the latent size the autoencoder makes, and prints one JSON object:

* ``train_samples_per_s`` / ``train_step_ms``: one full training step (data read excluded: batches are in memory;
  v-loss with noise augmentation and context dropout under ``diffusion_checkpoint.mixed_precision``'s autocast,
  backward, clipping, AdamW) at ``diffusion_checkpoint.batch_size``; ``steps_in_train_minutes``: the steps the
  stage's time budget would plan; ``--train-mode`` trains the UNet channels-last or under ``torch.compile``
  instead (the stage trains eagerly; README "World model" has the comparison), ``train_warmup_s`` is the first
  step (the compile, for ``compile``);
* ``ms_per_frame``: ``Sampler.step`` (DDIM with ``sampler.cfg``, two UNet calls per step when cfg != 1, plus the
  decode) for 1, 2, 4 and 8 DDIM steps, batch 1; ``ms_per_frame_cfg1`` the same without guidance;
* ``decode_ms``: the autoencoder decode alone.

Medians over ``--repeats`` after a warm-up. Timings on a shared machine are inflated by contention.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def median_ms(function, repeats: int, sync=lambda: None) -> float:
    function()  # warm-up
    sync()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        sync()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def build_autoencoder(params, finetuned: Path):
    from components.models.autoencoder import FrameAutoencoder, build_vae, load_autoencoder

    if (finetuned / "autoencoder.json").is_file():
        return load_autoencoder(finetuned), str(finetuned)
    a = params.autoencoder
    vae = build_vae(a.block_out_channels, a.latent_channels, a.layers_per_block, a.norm_num_groups,
                    a.mid_block_attention).eval()
    frame = (params.environment.height, params.environment.width)
    return FrameAutoencoder(vae, frame, 1.0, a.latent_multiple, a.pad_mode), "built from params.autoencoder"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--autoencoder", default="data/finetuned_vae")
    parser.add_argument("--train-mode", choices=["eager", "channels_last", "compile"], default="eager",
                        help="how the training step runs the UNet (the stage: eager)")
    args = parser.parse_args()

    import torch

    from components.models.sampler import Sampler
    from components.models.world_model import ActionConditionedUNet, make_scheduler
    from components.models.world_model_training import Batch, diffusion_loss, recipe
    from components.params import load_params
    from components.training import autocast, make_optimizer, make_step, start_runtime

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    params = load_params(args.params)
    autoencoder, autoencoder_source = build_autoencoder(params, Path(args.autoencoder))
    autoencoder.vae.to(device)
    channels, height, width = autoencoder.latent_shape
    k = params.world_model.context
    num_actions = len(params.environment.actions)
    torch.manual_seed(0)
    world_model = ActionConditionedUNet.from_params(params.world_model, channels, (height, width), num_actions)
    world_model = world_model.to(device)
    eager_unet = world_model.unet
    if args.train_mode == "channels_last":
        world_model = world_model.to(memory_format=torch.channels_last)
    if args.train_mode == "compile":
        world_model.unet = torch.compile(eager_unet, dynamic=False)
    settings = params.diffusion_checkpoint

    # training step
    optimizer = make_optimizer(settings.optimizer, list(world_model.parameters()), settings.learning_rate,
                               settings.weight_decay)
    plan, runtime = recipe(settings), start_runtime(args.device)
    ddpm = make_scheduler(world_model.config, "ddpm")
    b = settings.batch_size
    batch = Batch(torch.randn(b, k, channels, height, width), torch.randint(0, num_actions, (b, k)),
                  torch.randn(b, channels, height, width)).to(device)
    step = [0]

    def train_step() -> None:
        for group in optimizer.param_groups:
            group["lr"] = settings.learning_rate * plan.budget.lr_scale(step[0], settings.steps)
        with autocast(settings.mixed_precision, device):  # as the stage trains
            loss = diffusion_loss(world_model, ddpm, batch, world_model.config, settings.context_dropout,
                                  make_step(0, runtime, step[0]).generator, settings.terminal_share)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(world_model.parameters(), settings.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step[0] += 1

    world_model.train()
    started = time.perf_counter()
    train_step()  # the first step: a compile, for compile
    sync()
    train_warmup_s = time.perf_counter() - started
    train_ms = median_ms(train_step, args.repeats, sync)
    world_model.unet = eager_unet.to(memory_format=torch.contiguous_format)  # generation as the player runs it
    world_model.eval()

    # generation
    s = params.sampler
    context = torch.randn(k, channels, height, width, device=device)
    ms_per_frame, ms_per_frame_cfg1 = {}, {}
    with torch.no_grad():
        decode_ms = median_ms(lambda: autoencoder.decode(context[:1]), args.repeats, sync)
        for steps in (1, 2, 4, 8):
            for cfg, table in ((s.cfg, ms_per_frame), (1.0, ms_per_frame_cfg1)):
                sampler = Sampler(world_model, autoencoder, steps=steps, cfg=cfg,
                                  context_noise_level=s.context_noise_level, seed=0)
                sampler.reset(context, torch.zeros(k - 1, dtype=torch.long))
                table[str(steps)] = round(median_ms(lambda sampler=sampler: sampler.step(1), args.repeats, sync), 2)

    result = {
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "threads": args.threads,
        "autoencoder": autoencoder_source,
        "latent_shape": [channels, height, width],
        "context": k,
        "parameters_m": round(world_model.num_parameters() / 1e6, 3),
        "batch_size": b,
        "mixed_precision": settings.mixed_precision,
        "train_mode": args.train_mode,
        "train_warmup_s": round(train_warmup_s, 1),
        "train_step_ms": round(train_ms, 2),
        "train_samples_per_s": round(b / train_ms * 1000, 2),
        "max_steps": settings.steps,
        "train_minutes": settings.train_minutes,
        "steps_in_train_minutes": None if settings.train_minutes is None else
        min(settings.steps, int(settings.train_minutes * 60000 / train_ms)),
        "cfg": s.cfg,
        "ms_per_frame": ms_per_frame,
        "ms_per_frame_cfg1": ms_per_frame_cfg1,
        "decode_ms": round(decode_ms, 2),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
