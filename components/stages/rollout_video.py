"""``gamengen rollout_video``: a GIF of an autoregressive rollout driven by recorded actions, beside the real frames.

Runs on the ONNX export alone (ONNX Runtime, no torch). The start context and the recorded actions come from
the export's ``contexts.npz`` (``--context N``), or from a held-out episode of recorded play
(``--trajectories data/raw_trajectories --episode N``; its first K frames are encoded with ``encoder.onnx``).
Each step feeds the model's own previous outputs back as context and applies the next recorded action.
Left: generated; right: what the game really showed.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from components.data.trajectory_store import TrajectoryStore
from components.errors import PipelineError
from components.images import save_gif
from components.metrics import pooled_psnr
from components.params import load_params
from components.runtime.sessions import OnnxExport

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--export", default=None, help="export folder (default: params play.export_dir)")
    parser.add_argument("--context", type=int, default=0, help="index of the shipped held-out context")
    parser.add_argument("--trajectories", default=None, help="use a recorded episode from these shards instead")
    parser.add_argument("--episode", type=int, default=0, help="held-out episode index (with --trajectories)")
    parser.add_argument("--steps", type=int, default=None, help="frames to generate (default: all recorded)")
    parser.add_argument("--scale", type=int, default=4, help="pixel scale of the GIF")
    parser.add_argument("--fps", type=float, default=10.0, help="GIF frame rate")
    parser.add_argument("--out", default="rollout.gif", help="output GIF path")


def recorded_sequence(game: Any, args: argparse.Namespace) -> tuple[Any, Any, Any, Any]:
    """(start latents [K,C,h,w], recorded actions from the first context row [K+T-1 or more], the real frames
    that followed [T,H,W,3], the real context frames [K,H,W,3]) for ``game``
    (a ``components.runtime.sessions.OnnxExport``)."""


    K = game.K
    if args.trajectories is None:
        c = game.contexts
        if not 0 <= args.context < game.num_contexts:
            raise PipelineError(f"--context: the export ships contexts 0..{game.num_contexts - 1}, got {args.context}")
        actions = np.concatenate([c["context_actions"][args.context], c["future_actions"][args.context]])
        return (c["context_latents"][args.context], actions, c["future_frames"][args.context],
                c["context_frames"][args.context])
    store = TrajectoryStore(args.trajectories, verify_checksums=False)
    episodes = store.split("heldout") or store.split("train")
    if not 0 <= args.episode < len(episodes):
        raise PipelineError(f"--episode: {args.trajectories} has episodes 0..{len(episodes) - 1}, got {args.episode}")
    arrays = store.episode_arrays(episodes[args.episode], ("frames", "actions"))
    frames, actions = np.asarray(arrays["frames"]), np.asarray(arrays["actions"]).astype(np.int64)
    if len(frames) <= K:
        raise PipelineError(f"episode {args.episode} has {len(frames)} frames; need more than K={K}")
    return game.encode(frames[:K]), actions, frames[K:], frames[:K]


def main(args: argparse.Namespace) -> None:
    settings = load_params(args.params).play
    game = OnnxExport(args.export or settings.export_dir, threads=settings.threads)
    context, actions, real, context_frames = recorded_sequence(game, args)
    steps = min(len(real), len(actions) - game.K + 1) if args.steps is None else args.steps
    if steps < 1 or steps > len(real) or steps > len(actions) - game.K + 1:
        most = min(len(real), len(actions) - game.K + 1)
        raise PipelineError(f"--steps: between 1 and {most} recorded steps, got {args.steps}")

    latents = np.array(context, np.float32)[None]
    generated = []
    for step in range(steps):
        nxt = game.predict(latents, actions[None, step : step + game.K])
        generated.append(game.decode(nxt)[0])
        latents = np.concatenate([latents[:, 1:], nxt[:, None]], axis=1)

    names = [a["name"] for a in game.actions]
    height, width = real.shape[1:3]
    pictures = []
    def panel(left: np.ndarray, right: np.ndarray, caption: str) -> Image.Image:
        row = np.concatenate([left, np.zeros((height, 2, 3), np.uint8), right], axis=1)
        image = Image.fromarray(row).resize((row.shape[1] * args.scale, height * args.scale), Image.Resampling.NEAREST)
        canvas = Image.new("RGB", (image.width, image.height + 14))
        canvas.paste(image, (0, 14))
        ImageDraw.Draw(canvas).text((2, 1), caption, fill=(255, 255, 255))
        return canvas
    for frame in context_frames:
        pictures.append(panel(frame, frame, "context (real)"))
    for step in range(steps):
        action = names[int(actions[step + game.K - 1])]
        pictures.append(panel(generated[step], real[step], f"step {step + 1}: {action}  | generated | real"))
    out = save_gif(args.out, pictures, args.fps)
    psnr = pooled_psnr(np.stack(generated), real[:steps], max_value=255.0)
    print(f"rollout_video: wrote {out} ({steps} generated frames beside the real ones; pooled PSNR {psnr:.2f} dB)")
