"""Benchmark the frame autoencoder at the default profile: encoding throughput and decoder fine-tune step time.

    python benchmarks/autoencoder.py [--params params.yaml] [--threads 2] [--repeats 5]

Builds the autoencoder from ``params.yaml`` (weights do not change the speed), pads as the pipeline does, and
prints one JSON object:

* ``encode_frames_per_s``: frames/s of ``FrameAutoencoder.encode`` (PyTorch) at ``validated_latents.batch_size``;
* ``encode_onnxruntime_frames_per_s``: the same with the exported encoder run by ONNX Runtime, what the
  ``validated_latents`` stage uses by default (``validated_latents.engine``), and the export time;
* ``decode_frames_per_s``: the same for ``decode``;
* ``finetune_step_ms``: one decoder fine-tune step (frozen encoder forward, decoder forward + backward,
  AdamW) at ``finetuned_vae.batch_size``; ``finetune_samples_per_s`` follows;
* ``base_train_step_ms``: one ``base_autoencoder`` training step (MSE + KL) at ``autoencoder.batch_size`` with
  ``autoencoder.mixed_precision``; ``base_train_step_ms_float32`` / ``_bf16`` give both settings.

Medians over ``--repeats`` runs after one warm-up. Timings on a shared machine are inflated by contention;
the ``*_per_cpu_s`` / ``*_cpu_ms`` figures use process CPU time instead, which contention inflates less (with
``--threads 1`` they approximate an idle single core).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def median_seconds(function, repeats: int) -> tuple[float, float]:
    """Median (wall seconds, process CPU seconds) of one call, after a warm-up call."""
    function()  # warm-up
    wall, cpu = [], []
    for _ in range(repeats):
        started, started_cpu = time.perf_counter(), time.process_time()
        function()
        wall.append(time.perf_counter() - started)
        cpu.append(time.process_time() - started_cpu)
    return statistics.median(wall), statistics.median(cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import torch

    from components.models.autoencoder import FrameAutoencoder, load_pretrained_vae, training_loss, vae_from_params
    from components.params import load_params

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    params = load_params(args.params)
    a = params.autoencoder
    vae = load_pretrained_vae(a.pretrained) if a.pretrained else vae_from_params(a)
    vae = vae.to(memory_format=torch.channels_last).eval()
    frame_size = (params.environment.height, params.environment.width)
    autoencoder = FrameAutoencoder(vae, frame_size, 1.0, a.latent_multiple, a.pad_mode)

    encode_batch = params.validated_latents.batch_size
    frames = torch.rand(encode_batch, 3, *frame_size)
    with torch.no_grad():
        latents = autoencoder.encode(frames)
        encode_s = median_seconds(lambda: autoencoder.encode(frames), args.repeats)
        decode_s = median_seconds(lambda: autoencoder.decode(latents), args.repeats)

    import tempfile

    import numpy as np

    from components.runtime.export import onnx_encoder

    with tempfile.TemporaryDirectory() as scratch:
        export_started = time.perf_counter()
        ort_encode = onnx_encoder(autoencoder, scratch, encode_batch, args.threads)
        export_s = time.perf_counter() - export_started
        pixels = np.ascontiguousarray(frames.numpy())
        ort_encode_s = median_seconds(lambda: ort_encode(pixels), args.repeats)

    f = params.finetuned_vae
    vae.encoder.requires_grad_(False)
    vae.quant_conv.requires_grad_(False)
    decoder_params = [t for t in vae.parameters() if t.requires_grad]
    optimizer = torch.optim.AdamW(decoder_params, lr=f.learning_rate)
    batch = torch.rand(f.batch_size, 3, *frame_size)

    def finetune_step() -> None:
        with torch.no_grad():
            z = autoencoder.encode(batch)
        output = autoencoder.crop(vae.decode(z / autoencoder.scaling_factor).sample, clamp=False)
        loss = torch.nn.functional.mse_loss(output, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    vae.train()
    finetune_s = median_seconds(finetune_step, args.repeats)

    vae.requires_grad_(True)
    base_optimizer = torch.optim.AdamW(vae.parameters(), lr=a.learning_rate)
    base_x = autoencoder.pad(torch.rand(a.batch_size, 3, *frame_size)).contiguous(memory_format=torch.channels_last)

    def base_step(mixed_precision: str) -> None:
        loss = training_loss(vae, base_x, a.kl_weight, mixed_precision)
        base_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        base_optimizer.step()

    base_s = {mode: median_seconds(lambda mode=mode: base_step(mode), args.repeats) for mode in ("no", "bf16")}
    print(json.dumps({
        "profile": params.profile,
        "frame_size_hw": list(frame_size),
        "latent_shape": list(autoencoder.latent_shape),
        "params_millions": round(sum(t.numel() for t in vae.parameters()) / 1e6, 3),
        "threads": args.threads,
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "encode_batch": encode_batch,
        "encode_frames_per_s": round(encode_batch / encode_s[0], 1),
        "encode_frames_per_cpu_s": round(encode_batch / encode_s[1], 1),
        "encode_onnxruntime_frames_per_s": round(encode_batch / ort_encode_s[0], 1),
        "encode_onnxruntime_frames_per_cpu_s": round(encode_batch / ort_encode_s[1], 1),
        "encoder_export_s": round(export_s, 1),
        "decode_frames_per_s": round(encode_batch / decode_s[0], 1),
        "finetune_batch": f.batch_size,
        "finetune_step_ms": round(1000 * finetune_s[0], 1),
        "finetune_step_cpu_ms": round(1000 * finetune_s[1], 1),
        "finetune_samples_per_s": round(f.batch_size / finetune_s[0], 1),
        "base_train_batch": a.batch_size,
        "base_train_mixed_precision": a.mixed_precision,
        "base_train_step_ms": round(1000 * base_s[a.mixed_precision][0], 1),
        "base_train_step_cpu_ms": round(1000 * base_s[a.mixed_precision][1], 1),
        "base_train_samples_per_s": round(a.batch_size / base_s[a.mixed_precision][0], 1),
        "base_train_step_ms_float32": round(1000 * base_s["no"][0], 1),
        "base_train_step_ms_bf16": round(1000 * base_s["bf16"][0], 1),
        "load_average_1min": round(os.getloadavg()[0], 2),
    }, indent=2))


if __name__ == "__main__":
    main()
