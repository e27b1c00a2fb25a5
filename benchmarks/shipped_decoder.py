"""What the decoder that ships with the 1-step model does to what a player sees (which detail weight?).

    python benchmarks/shipped_decoder.py [--weights none mse 0.1 0.3 0.5 1] [--minutes 1.5] [--windows 128]

For each weight, fine-tunes a copy of the ``finetuned_vae`` decoder on the trained student's own rollouts exactly
as the ``distilled_model`` stage does (``components.models.rollout_decoder.fine_tune_decoder`` with the
``distilled_model``
params of ``--params``, ``decoder_detail_weight`` set to the weight; ``mse`` is 0, ``none`` skips the fine-tune),
then scores the PyTorch student decoded by it with the evaluation stage's own code
(``components.evaluation.scoring.evaluate_model``) on held-out play: ``--windows`` teacher-forced windows, 16 rollouts
of
16 and of 32 steps, 16 turn contexts. Reads ``data/distilled_model``, ``data/finetuned_vae``,
``data/validated_latents`` and ``data/raw_trajectories`` of a finished pipeline. Prints one JSON object per weight
(PSNR, margin over copy-last-latent, sharpness next frame and at rollout steps 16 and 32, mean rollout PSNR,
autoencoder ceiling, controllability, turn response) and, with ``--out``, writes each weight's ``turn_test.png``
there to look at.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--root", default=".", help="repository whose data/ holds the trained stages")
    parser.add_argument("--weights", nargs="+", default=["none", "mse", "0.1", "0.3", "0.5", "1"],
                        help="decoder_detail_weight values; 'mse' = 0, 'none' = no fine-tune (default: %(default)s)")
    parser.add_argument("--minutes", type=float, default=1.5, help="fine-tune budget per weight")
    parser.add_argument("--windows", type=int, default=128, help="held-out teacher-forced windows")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="folder for each weight's turn_test.png")
    args = parser.parse_args()

    import numpy as np
    import torch

    from components.data.trajectory_store import TrajectoryStore
    from components.data.windows import common_episodes, heldout_episodes
    from components.evaluation import scoring
    from components.evaluation.report import write_turn_test
    from components.models.autoencoder import FrameAutoencoder, load_autoencoder
    from components.models.distillation import load_student
    from components.models.rollout_decoder import fine_tune_decoder
    from components.params import load_params
    from components.training import start_runtime

    torch.set_num_threads(args.threads)
    root = Path(args.root)
    params = load_params(args.params)
    student = load_student(root / "data/distilled_model").requires_grad_(False)
    latents = TrajectoryStore(root / "data/validated_latents")
    raw = TrajectoryStore(root / "data/raw_trajectories")
    settings = params.evaluation.model_copy(update={"windows": args.windows, "rollout_lengths": [16, 32],
                                                    "rollout_windows": 16, "turn_contexts": 16})
    episodes = common_episodes(heldout_episodes(raw, None), latents)
    motion = scoring.measure_view_motion(raw, params.environment, settings)

    def predict(context: np.ndarray, actions: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return student(torch.from_numpy(context), torch.from_numpy(actions)).numpy()

    for weight in args.weights:
        started = time.monotonic()
        torch.manual_seed(0)
        autoencoder = load_autoencoder(root / "data/finetuned_vae")
        if weight != "none":
            decoder = params.distilled_model.model_copy(update={
                "decoder_minutes": args.minutes, "decoder_detail_weight": 0.0 if weight == "mse" else float(weight)})
            fine_tune_decoder(student, autoencoder, latents, raw, decoder, start_runtime("cpu"), None)

        def decode(batch: np.ndarray, autoencoder: FrameAutoencoder = autoencoder) -> np.ndarray:
            with torch.no_grad():
                return autoencoder.decode(torch.from_numpy(np.ascontiguousarray(batch, np.float32))).clamp(0, 1).numpy()

        metrics, extras = scoring.evaluate_model(scoring.ModelUnderTest("torch", predict, decode),
                                                 student.config.context, raw, latents, episodes, settings,
                                                 params.environment.actions, motion)
        forced, rollouts = metrics["teacher_forced"], metrics["rollout"]
        print(json.dumps({
            "decoder_detail_weight": weight,
            "psnr_pooled": round(forced["psnr"]["model"]["pooled"], 3),
            "margin_db_vs_copy_last_latent": round(forced["margin_db"]["copy_last_latent"]["pooled"], 3),
            "autoencoder_ceiling_psnr": round(forced["psnr"]["autoencoder_ceiling"]["pooled"], 3),
            "sharpness_next_frame": round(forced["sharpness"]["model"], 3),
            "sharpness_step16": round(rollouts["16"]["sharpness_by_step"]["model"][15], 3),
            "sharpness_step32": round(rollouts["32"]["sharpness_by_step"]["model"][31], 3),
            "rollout_mean_psnr": {n: round(rollouts[n]["mean_psnr_over_steps"]["model"], 3) for n in ("16", "32")},
            "controllability": {k: v.get("share") for k, v in forced["controllability"].items() if isinstance(v, dict)},
            "turn_fraction_of_real": {k: v["fraction_of_real"] for k, v in metrics["turn_response"].items()
                                      if isinstance(v, dict)},
            "seconds": round(time.monotonic() - started, 1),
        }), flush=True)
        if args.out:
            write_turn_test(Path(args.out) / f"turn_test_{weight}.png", extras["turn_test"])


if __name__ == "__main__":
    main()
