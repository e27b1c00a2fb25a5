"""Play speed: ms per frame and FPS of the ONNX 1-step model, the PyTorch 1-step model and the 4-step teacher.

One frame = one world-model prediction plus one decode, at batch 1, fed back autoregressively (what the
player does). Prints JSON. Targets (issue 6): ONNX 1-step >= 60 FPS at the default resolution on 2 CPU cores,
and >= 2x the PyTorch 4-step teacher.

    python benchmarks/play_speed.py                 # the pipeline's own artifacts under data/
    python benchmarks/play_speed.py --untrained     # random weights with params.yaml's architecture (same speed)

Speed depends on the architecture only, so ``--untrained`` measures the default profile without running the
pipeline. On a shared machine the figures are inflated by other processes: compare them within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def timed(step: Callable[[], None], frames: int, warmup: int) -> dict[str, float]:
    for _ in range(warmup):
        step()
    times = []
    cpu_start = time.process_time()
    for _ in range(frames):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1000.0)
    cpu = (time.process_time() - cpu_start) * 1000.0 / frames
    mean = statistics.fmean(times)
    # CPU time per frame: with --threads 1 it is what the wall time would be on an idle core, so it shows
    # how much other processes on a shared machine inflated the wall-clock figures.
    return {"ms_per_frame_mean": round(mean, 3), "ms_per_frame_median": round(statistics.median(times), 3),
            "fps": round(1000.0 / mean, 1), "cpu_ms_per_frame": round(cpu, 3),
            "fps_from_cpu_time": round(1000.0 / cpu, 1), "frames": frames}


def build_untrained(params: Any, folder: Path) -> dict[str, Path]:
    """Random-weight models with the params' architecture, saved and exported like the pipeline does."""
    import torch

    from components.autoencoder import FrameAutoencoder, build_vae
    from components.distillation import OneStepStudent
    from components.export import DecoderGraph, EncoderGraph, export_graph
    from components.world_model import ActionConditionedUNet

    torch.manual_seed(0)
    a = params.autoencoder
    width, height = params.environment.resolution
    vae = build_vae(a.block_out_channels, a.latent_channels, a.layers_per_block, a.norm_num_groups,
                    a.mid_block_attention)
    autoencoder = FrameAutoencoder(vae, (height, width), 1.0, a.latent_multiple, a.pad_mode).eval()
    C, h, w = autoencoder.latent_shape
    net = ActionConditionedUNet.from_params(params.world_model, C, (h, w), len(params.environment.actions)).eval()
    s = params.sampler
    student = OneStepStudent.from_teacher(net, s.steps, s.cfg, s.context_noise_level, 0).eval()
    paths = {"autoencoder": folder / "ae", "teacher": folder / "teacher", "student": folder / "student",
             "export": folder / "export"}
    autoencoder.save(paths["autoencoder"])
    net.save(paths["teacher"])
    student.save(paths["student"])
    K = net.config.context
    export_graph(student, (torch.randn(2, K, C, h, w), torch.zeros(2, K, dtype=torch.long)),
                 paths["export"] / "world_model.onnx", "world_model.onnx")
    export_graph(DecoderGraph(autoencoder), (torch.randn(2, C, h, w),), paths["export"] / "decoder.onnx",
                 "decoder.onnx")
    export_graph(EncoderGraph(autoencoder), (torch.rand(2, 3, height, width),), paths["export"] / "encoder.onnx",
                 "encoder.onnx")
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--export", default="data/onnx_export")
    parser.add_argument("--student", default="data/distilled_model")
    parser.add_argument("--teacher", default="data/diffusion_checkpoint")
    parser.add_argument("--autoencoder", default="data/finetuned_vae")
    parser.add_argument("--untrained", action="store_true", help="random weights with params.yaml's architecture")
    parser.add_argument("--frames", type=int, default=200, help="timed frames per model")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2, help="threads for ONNX Runtime and torch")
    parser.add_argument("--spin", action="store_true", help="let ONNX Runtime threads busy-wait (the player does not)")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()

    import numpy as np
    import onnxruntime as ort
    import torch

    from components.autoencoder import load_autoencoder
    from components.distillation import load_student
    from components.params import load_params
    from components.sampler import sample_next_latent
    from components.world_model import load_world_model, make_scheduler

    params = load_params(args.params)
    torch.set_num_threads(args.threads)
    scratch = tempfile.TemporaryDirectory()
    if args.untrained:
        paths = build_untrained(params, Path(scratch.name))
        source = "untrained, params.yaml architecture"
    else:
        paths = {"autoencoder": Path(args.autoencoder), "teacher": Path(args.teacher),
                 "student": Path(args.student), "export": Path(args.export)}
        source = "pipeline artifacts under data/"
    autoencoder = load_autoencoder(paths["autoencoder"])
    teacher = load_world_model(paths["teacher"])
    student = load_student(paths["student"])
    K, (C, h, w) = teacher.config.context, autoencoder.latent_shape

    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if args.spin else "0")  # as the player
    world = ort.InferenceSession(str(paths["export"] / "world_model.onnx"), options, providers=["CPUExecutionProvider"])
    decoder = ort.InferenceSession(str(paths["export"] / "decoder.onnx"), options, providers=["CPUExecutionProvider"])

    rng = np.random.default_rng(0)
    start_context = rng.standard_normal((1, K, C, h, w)).astype(np.float32)
    actions = np.zeros((1, K), np.int64)
    state = {"ctx": start_context.copy()}

    def onnx_step() -> None:
        nxt = world.run(["next_latent"], {"context_latents": state["ctx"], "context_actions": actions})[0]
        decoder.run(["frames"], {"latents": nxt})
        state["ctx"] = np.concatenate([state["ctx"][:, 1:], nxt[:, None]], axis=1)

    # Pipelined: the decoder turns frame t into pixels on one thread while the world model predicts frame
    # t+1 on another (it needs only latents). Throughput is max(world model, decoder) instead of their sum,
    # at the cost of one frame of latency. Each session then gets one intra-op thread.
    from concurrent.futures import ThreadPoolExecutor

    single = ort.SessionOptions()
    single.intra_op_num_threads = 1
    single.inter_op_num_threads = 1
    single.add_session_config_entry("session.intra_op.allow_spinning", "1" if args.spin else "0")
    world_1 = ort.InferenceSession(str(paths["export"] / "world_model.onnx"), single, providers=["CPUExecutionProvider"])
    decoder_1 = ort.InferenceSession(str(paths["export"] / "decoder.onnx"), single, providers=["CPUExecutionProvider"])
    pool = ThreadPoolExecutor(1)
    pending: dict[str, Any] = {"future": None}

    def onnx_pipelined_step() -> None:
        nxt = world_1.run(["next_latent"], {"context_latents": state["ctx"], "context_actions": actions})[0]
        if pending["future"] is not None:
            pending["future"].result()  # frame t is ready to show
        pending["future"] = pool.submit(decoder_1.run, ["frames"], {"latents": nxt})
        state["ctx"] = np.concatenate([state["ctx"][:, 1:], nxt[:, None]], axis=1)

    torch_state = {"ctx": torch.from_numpy(start_context.copy())}
    torch_actions = torch.from_numpy(actions)

    def torch_student_step() -> None:
        with torch.no_grad():
            nxt = student(torch_state["ctx"], torch_actions)
            autoencoder.decode(nxt)
            torch_state["ctx"] = torch.cat([torch_state["ctx"][:, 1:], nxt[:, None]], dim=1)

    scheduler = make_scheduler(teacher.config, "ddim")
    generator = torch.Generator().manual_seed(0)
    s = params.sampler

    def teacher_step() -> None:
        nxt = sample_next_latent(teacher, scheduler, torch_state["ctx"], torch_actions, steps=s.steps, cfg=s.cfg,
                                 context_noise_level=s.context_noise_level, generator=generator)
        with torch.no_grad():
            autoencoder.decode(nxt)
        torch_state["ctx"] = torch.cat([torch_state["ctx"][:, 1:], nxt[:, None]], dim=1)

    results = {"onnx_1step": timed(onnx_step, args.frames, args.warmup)}
    state["ctx"] = start_context.copy()
    if args.threads > 1:
        results["onnx_1step_pipelined"] = timed(onnx_pipelined_step, args.frames, args.warmup)
        pending["future"].result()
    pool.shutdown()
    torch_state["ctx"] = torch.from_numpy(start_context.copy())
    results["pytorch_1step"] = timed(torch_student_step, args.frames, args.warmup)
    torch_state["ctx"] = torch.from_numpy(start_context.copy())
    results["pytorch_teacher"] = timed(teacher_step, max(args.frames // 4, 10), max(args.warmup // 4, 2))
    results["pytorch_teacher"].update(steps=s.steps, cfg=s.cfg)
    speedup = results["onnx_1step"]["fps"] / results["pytorch_teacher"]["fps"]
    report = {
        "models": source,
        "frame_size_hw": list(autoencoder.frame_size),
        "latent_shape": [C, h, w],
        "context": K,
        "threads": args.threads,
        "ort_spinning": args.spin,
        "unet_parameters": sum(p.numel() for p in teacher.parameters()),
        "results": results,
        "onnx_vs_teacher_speedup": round(speedup, 2),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "cpu_count": os.cpu_count(),
        "targets": {"onnx_1step_fps_at_least_60": results["onnx_1step"]["fps"] >= 60.0,
                    "onnx_at_least_2x_teacher": speedup >= 2.0},
        "onnxruntime": ort.__version__,
        "torch": torch.__version__,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    scratch.cleanup()


if __name__ == "__main__":
    main()
