"""Held-out next-frame PSNR of the trained teacher under several sampler settings (which one scores best?).

    python benchmarks/sampler_settings.py [--windows 256] [--draws 8] [--settings 1,1.0,0.1 4,1.5,0.1 ...]

Each setting is ``steps,cfg,context_noise_level`` (DDIM, CFG on the past frames, as ``params.sampler``); a fourth
field ``mean`` averages ``--draws`` samples (the prediction that ``distilled_model.teacher_noise: fresh`` teaches).
Reads ``data/diffusion_checkpoint``, ``data/finetuned_vae``, ``data/validated_latents`` and
``data/raw_trajectories`` of a finished pipeline, scores on held-out windows only with the evaluation stage's own
code (``components.evaluation.scoring.teacher_forced``), and prints one JSON object per setting: pooled PSNR of the
model and
of copy-last-latent / copy-last-frame, the margin over copy-last-latent, the share of turning windows won against
copy-last-latent, and controllability on turning windows.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

DEFAULT_SETTINGS = ["1,1.0,0.0", "1,1.0,0.1", "1,1.5,0.1", "2,1.0,0.1", "4,1.0,0.1", "4,1.5,0.1", "4,1.5,0.1,mean"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--root", default=".", help="repository whose data/ holds the trained stages")
    parser.add_argument("--windows", type=int, default=256, help="held-out windows")
    parser.add_argument("--draws", type=int, default=8, help="samples averaged by a 'mean' setting")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS,
                        help="steps,cfg,context_noise_level[,mean] (default: %(default)s)")
    args = parser.parse_args()

    import numpy as np
    import torch

    from components.data.trajectory_store import TrajectoryStore
    from components.data.windows import common_episodes, heldout_episodes, load_windows, pick_windows
    from components.evaluation import scoring
    from components.evaluation.actions import action_kinds, counterfactual_actions
    from components.models.autoencoder import load_autoencoder
    from components.models.sampler import sample_next_latent
    from components.models.world_model import load_world_model, make_scheduler
    from components.params import load_params

    torch.set_num_threads(args.threads)
    root = Path(args.root)
    params = load_params(root / args.params)
    raw = TrajectoryStore(root / "data/raw_trajectories")
    latents = TrajectoryStore(root / "data/validated_latents")
    episodes = common_episodes(heldout_episodes(raw, None), latents)
    net = load_world_model(root / "data/diffusion_checkpoint").eval()
    autoencoder = load_autoencoder(root / "data/finetuned_vae")
    k = net.config.context
    actions = params.environment.actions
    kinds, opposite = action_kinds(actions), counterfactual_actions(actions)
    windows = load_windows(raw, latents, pick_windows(episodes, k + 1, args.windows, 0), k + 1)
    scheduler = make_scheduler(net.config, "ddim")

    @torch.no_grad()
    def decode(batch: np.ndarray) -> np.ndarray:
        return autoencoder.decode(torch.from_numpy(np.ascontiguousarray(batch, np.float32))).clamp(0, 1).numpy()

    for setting in args.settings:
        fields = setting.split(",")
        steps, cfg, noise = int(fields[0]), float(fields[1]), float(fields[2])
        draws = args.draws if fields[3:] == ["mean"] else 1
        generator = torch.Generator().manual_seed(0)

        @torch.no_grad()  # called only within this iteration, so the loop variables are this setting's
        def predict(context: np.ndarray, acts: np.ndarray) -> np.ndarray:
            samples = [sample_next_latent(net, scheduler, torch.from_numpy(context), torch.from_numpy(acts),
                                          steps=steps, cfg=cfg, context_noise_level=noise,  # noqa: B023
                                          generator=generator)  # noqa: B023
                       for _ in range(draws)]  # noqa: B023
            return torch.stack(samples).mean(0).numpy()

        started = time.perf_counter()
        result = scoring.teacher_forced(scoring.ModelUnderTest("teacher", predict, decode), windows, k, kinds,
                                        opposite, 64)
        psnr = result["psnr"]
        print(json.dumps({
            "steps": steps, "cfg": cfg, "context_noise_level": noise, "draws_averaged": draws,
            "windows": len(windows),
            "psnr_pooled": round(psnr["model"]["pooled"], 3),
            "copy_last_latent_pooled": round(psnr["copy_last_latent"]["pooled"], 3),
            "copy_last_frame_pooled": round(psnr["copy_last_frame"]["pooled"], 3),
            "margin_db_vs_copy_last_latent": round(result["margin_db"]["copy_last_latent"]["pooled"], 3),
            "turning_win_share_vs_copy_last_latent": result["win_share"]["copy_last_latent"]["turning"]["share"],
            "controllability_turning": result["controllability"]["turning"]["share"],
            "seconds": round(time.perf_counter() - started, 1),
        }), flush=True)


if __name__ == "__main__":
    main()
