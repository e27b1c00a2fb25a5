"""Play speed: ms per frame and FPS of the ONNX 1-step model, the PyTorch 1-step model and the 4-step teacher.

One frame = one world-model prediction plus one decode, at batch 1, fed back autoregressively (what the
player does). Prints JSON. Targets (issue 6): ONNX 1-step >= 60 FPS at the default resolution on 2 CPU cores,
and >= 2x the PyTorch 4-step teacher.

    python benchmarks/play_speed.py                 # the pipeline's own artifacts under data/
    python benchmarks/play_speed.py --untrained     # random weights with params.yaml's architecture (same speed)
    python benchmarks/play_speed.py --export E --student S --teacher T --autoencoder A --params P

The ONNX figures run the player's own code (``components.play.server``: same session options, uint8 conversion):

* ``onnx_1step_sequential``: ``GameState.step``, world model then decoder, ``--threads`` intra-op threads each.
* ``onnx_1step_pipelined``: ``GameState.advance`` as ``make play`` runs it: the world model predicts frame t+1
  on the calling thread while frame t is decoded on another, each session with ``--threads // 2`` intra-op
  threads (at least 1), and the decoder split so that both threads have about the same work
  (``components/runtime/decoder_split.py``; ``decoder_split`` says where). Throughput is max(the two threads);
  ``latency_ms_mean`` is from reading an action to the end of the decode of the frame it leads to.
* ``onnx_1step_pipelined_whole_decoder``: the same without the split: max(world model, decoder).

Speed depends on the architecture only, so ``--untrained`` measures the default profile without running the
pipeline. The machine may be shared: every figure has its process CPU time beside the wall time, and
``other_processes_cores`` is how many cores other processes used meanwhile (from /proc/stat). For the
pipelined loop, the CPU time of each thread gives ``fps_if_idle_estimate`` = 1000 / max(thread CPU ms): the
throughput if each thread had a core of its own.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def busy_seconds() -> float | None:
    """CPU seconds all processes have used (Linux /proc/stat), or None where there is no /proc/stat."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    ticks = [int(x) for x in fields[:8]]
    busy = sum(ticks) - ticks[3] - ticks[4]  # minus idle and iowait
    return busy / os.sysconf("SC_CLK_TCK")


def timed(step: Callable[[], Any], frames: int, warmup: int) -> dict[str, Any]:
    """Wall and CPU time per call of ``step`` over ``frames`` calls, after ``warmup`` calls."""
    for _ in range(warmup):
        step()
    times = []
    busy_start, wall_start = busy_seconds(), time.perf_counter()
    cpu_start, thread_start = time.process_time(), time.thread_time()
    for _ in range(frames):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1000.0)
    thread_cpu = (time.thread_time() - thread_start) * 1000.0 / frames
    cpu = (time.process_time() - cpu_start) * 1000.0 / frames
    wall, busy_end = time.perf_counter() - wall_start, busy_seconds()
    mean = statistics.fmean(times)
    result: dict[str, Any] = {
        "ms_per_frame_mean": round(mean, 3), "ms_per_frame_median": round(statistics.median(times), 3),
        "fps": round(1000.0 / mean, 1),
        # CPU time of this process per frame: on one thread it is what the wall time would be on an idle core.
        "cpu_ms_per_frame": round(cpu, 3), "fps_from_cpu_time": round(1000.0 / cpu, 1),
        "cpu_ms_per_frame_calling_thread": round(thread_cpu, 3), "frames": frames,
    }
    if busy_start is not None and busy_end is not None:
        others = (busy_end - busy_start) - cpu * frames / 1000.0
        result["other_processes_cores"] = round(max(0.0, others) / wall, 2)
    return result


def build_untrained(params: Any, folder: Path) -> dict[str, Path]:
    """Random-weight models with the params' architecture, saved and exported like the pipeline does."""
    import torch

    from components.models.autoencoder import FrameAutoencoder, vae_from_params
    from components.models.distillation import OneStepStudent
    from components.models.world_model import ActionConditionedUNet
    from components.runtime.export import DecoderGraph, EncoderGraph, export_graph

    torch.manual_seed(0)
    a = params.autoencoder
    width, height = params.environment.resolution
    vae = vae_from_params(a)
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


def start_context(export: Path, K: int, C: int, h: int, w: int, H: int, W: int) -> tuple[Any, Any, Any]:
    """(latents [K,C,h,w], actions [K], last frame [H,W,3]): the export's first held-out context if it ships
    one, else random latents (speed does not depend on the values)."""
    import numpy as np

    contexts = export / "contexts.npz"
    if contexts.is_file():
        with np.load(contexts) as data:
            return data["context_latents"][0], data["context_actions"][0], data["context_frames"][0][-1]
    rng = np.random.default_rng(0)
    return (rng.standard_normal((K, C, h, w)).astype(np.float32), np.zeros(K, np.int64),
            np.zeros((H, W, 3), np.uint8))


def pipelined_result(models: Any, latents: Any, context_actions: Any, frame: Any, actions: list[int],
                     args: argparse.Namespace) -> dict[str, Any]:
    """``timed`` figures of the player's pipelined loop (``GameState.advance``) on ``models``, with the
    latency of each frame and the CPU time of each of its two threads."""
    from components.play.server import GameState

    state = GameState(models, latents, context_actions, frame)
    decodings: list[Any] = []
    counter = iter(actions * 4)
    result = timed(lambda: decodings.append(state.advance(next(counter))), args.frames, args.warmup)
    state.finish()
    models.close()
    # A frame's model_ms runs from reading its action to the end of its decode.
    latency = [decoding.result().model_ms for decoding in decodings[args.warmup:]]
    world_cpu = result["cpu_ms_per_frame_calling_thread"]  # world model (+ decoder head) on the calling thread
    decode_cpu = result["cpu_ms_per_frame"] - world_cpu  # the rest: the decode thread
    result.update(
        threads_per_session=models.threads, latency_ms_mean=round(statistics.fmean(latency), 3),
        cpu_ms_per_frame_world_model_thread=round(world_cpu, 3), cpu_ms_per_frame_decode_thread=round(decode_cpu, 3),
        decoder_split=models.split,
    )
    if models.threads == 1:  # each session runs on its own thread only, so thread CPU time is its work
        result["fps_if_idle_estimate"] = round(1000.0 / max(world_cpu, decode_cpu), 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml", help="for the teacher's sampler settings and --untrained")
    parser.add_argument("--export", default="data/onnx_export")
    parser.add_argument("--student", default="data/distilled_model")
    parser.add_argument("--teacher", default="data/diffusion_checkpoint")
    parser.add_argument("--autoencoder", default="data/distilled_model/autoencoder",
                        help="the PyTorch 1-step model's decoder (the one that ships with the student)")
    parser.add_argument("--untrained", action="store_true", help="random weights with params.yaml's architecture")
    parser.add_argument("--frames", type=int, default=200, help="timed frames per model")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2,
                        help="cores to use: intra-op threads per session (sequential) and for torch; the "
                             "pipelined loop runs two sessions at once with threads // 2 (at least 1) each")
    parser.add_argument("--onnx-only", action="store_true", help="skip the PyTorch models (quick, less CPU)")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()

    import onnxruntime as ort

    from components.params import load_params
    from components.play.server import GameState
    from components.runtime.sessions import OnnxModels, pipelined_threads

    params = load_params(args.params)
    scratch = tempfile.TemporaryDirectory()
    if args.untrained:
        paths = build_untrained(params, Path(scratch.name))
        source = "untrained, params.yaml architecture"
    else:
        paths = {"autoencoder": Path(args.autoencoder), "teacher": Path(args.teacher),
                 "student": Path(args.student), "export": Path(args.export)}
        source = f"trained: {paths['export']}"
    world_path, decoder_path = paths["export"] / "world_model.onnx", paths["export"] / "decoder.onnx"

    sequential = OnnxModels(world_path, decoder_path, threads=args.threads)
    inputs = sequential.world_model.get_inputs()[0].shape  # [B, K, C, h, w]
    K, C, h, w = (int(d) for d in inputs[1:])
    H, W = (int(d) for d in sequential.decoder.get_outputs()[0].shape[2:])
    latents, context_actions, frame = start_context(paths["export"], K, C, h, w, H, W)
    manifest = paths["export"] / "manifest.json"
    num_actions = len(json.loads(manifest.read_text())["actions"] if manifest.is_file() else params.environment.actions)
    actions = [i % num_actions for i in range(args.frames + args.warmup + 1)]

    state = GameState(sequential, latents, context_actions, frame)
    counter = iter(actions * 4)
    latency: list[float] = []
    results: dict[str, Any] = {"onnx_1step_sequential": timed(
        lambda: (state.step(next(counter)), latency.append(state.model_ms)), args.frames, args.warmup)}
    results["onnx_1step_sequential"].update(threads_per_session=args.threads,
                                            latency_ms_mean=round(statistics.fmean(latency[args.warmup:]), 3))
    sequential.close()

    per_session = pipelined_threads(args.threads)
    for name, balance in (("onnx_1step_pipelined", True), ("onnx_1step_pipelined_whole_decoder", False)):
        results[name] = pipelined_result(OnnxModels(world_path, decoder_path, per_session, balance),
                                         latents, context_actions, frame, actions, args)

    report: dict[str, Any] = {
        "models": source,
        "frame_size_hw": [H, W],
        "latent_shape": [C, h, w],
        "context": K,
        "threads": args.threads,
        "results": results,
    }
    best = max(results[name]["fps"] for name in results)
    targets = {"onnx_1step_fps_at_least_60": best >= 60.0}
    if not args.onnx_only:
        results.update(torch_results(params, paths, args, latents, context_actions))
        teacher_fps = results["pytorch_teacher"]["fps"]
        report["onnx_vs_teacher_speedup"] = {
            "sequential": round(results["onnx_1step_sequential"]["fps"] / teacher_fps, 2),
            "pipelined": round(results["onnx_1step_pipelined"]["fps"] / teacher_fps, 2),
        }
        targets["onnx_at_least_2x_teacher"] = best / teacher_fps >= 2.0
        report["unet_parameters"] = results.pop("unet_parameters")
    others = [r["other_processes_cores"] for r in results.values() if "other_processes_cores" in r]
    report.update(
        targets=targets,
        # Wall-clock figures hold for an idle machine only if other processes used (almost) no CPU meanwhile.
        machine_was_idle=bool(others) and max(others) < 0.1,
        load_average_1min=round(os.getloadavg()[0], 2),
        cpu_count=os.cpu_count(),
        onnxruntime=ort.__version__,
    )
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    scratch.cleanup()


def torch_results(params: Any, paths: dict[str, Path], args: argparse.Namespace, latents: Any,
                  context_actions: Any) -> dict[str, Any]:
    """The PyTorch 1-step student and the 4-step teacher, each with its decode, at batch 1, autoregressive."""
    import torch

    from components.models.autoencoder import load_autoencoder
    from components.models.distillation import load_student
    from components.models.sampler import sample_next_latent
    from components.models.world_model import load_world_model, make_scheduler

    torch.set_num_threads(args.threads)
    autoencoder = load_autoencoder(paths["autoencoder"])
    teacher = load_world_model(paths["teacher"])
    student = load_student(paths["student"])
    start = torch.tensor(latents, dtype=torch.float32)[None]
    torch_actions = torch.tensor(context_actions, dtype=torch.long)[None]
    state = {"ctx": start.clone()}

    def student_step() -> None:
        with torch.no_grad():
            nxt = student(state["ctx"], torch_actions)
            autoencoder.decode(nxt)
            state["ctx"] = torch.cat([state["ctx"][:, 1:], nxt[:, None]], dim=1)

    scheduler = make_scheduler(teacher.config, "ddim")
    generator = torch.Generator().manual_seed(0)
    s = params.sampler

    def teacher_step() -> None:
        nxt = sample_next_latent(teacher, scheduler, state["ctx"], torch_actions, steps=s.steps, cfg=s.cfg,
                                 context_noise_level=s.context_noise_level, generator=generator)
        with torch.no_grad():
            autoencoder.decode(nxt)
        state["ctx"] = torch.cat([state["ctx"][:, 1:], nxt[:, None]], dim=1)

    results: dict[str, Any] = {"pytorch_1step": timed(student_step, args.frames, args.warmup)}
    state["ctx"] = start.clone()
    results["pytorch_teacher"] = timed(teacher_step, max(args.frames // 4, 10), max(args.warmup // 4, 2))
    results["pytorch_teacher"].update(steps=s.steps, cfg=s.cfg, torch=torch.__version__)
    results["unet_parameters"] = sum(p.numel() for p in teacher.parameters())
    return results


if __name__ == "__main__":
    main()
