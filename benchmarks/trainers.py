"""Training throughput of each trainer on one process and on two (data parallel on this machine), as JSON.

Each trainer stage runs for a fixed number of steps on a finished pipeline's inputs (``data/``), with outputs in a
temporary folder and no resumable state, once as ``python -m components <stage>`` and once as
``accelerate launch --multi_gpu --num_processes 2 -m components <stage>`` (no GPU here: two CPU processes, gloo).
The figure is the stage's own ``train_samples_per_s`` (all processes together, training steps only). The
threads are split fairly: one process gets ``--threads`` torch threads, each of two gets half. On 2 cores a
second process cannot double the rate; ``two_over_one`` says what it gives.

    python benchmarks/trainers.py                       # all four trainers on data/ (default profile)
    python benchmarks/trainers.py --trainers diffusion_checkpoint --steps 80
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
# the arguments naming a stage's inputs: these come from the stage's command in dvc.yaml
INPUT_FLAGS = {"--agent", "--trajectories", "--latents", "--autoencoder", "--teacher", "--student", "--export"}
# stage -> (its params section and step key, its outputs as CLI arguments; {out} is a scratch folder)
TRAINERS: dict[str, tuple[str, str, list[str]]] = {
    "base_autoencoder": ("autoencoder", "max_steps", [
        "--out", "{out}/model", "--metrics", "{out}/metrics.json", "--curve", "{out}/curve.json",
        "--plots", "{out}/curves", "--cache", ""]),
    "finetuned_vae": ("finetuned_vae", "max_steps", [
        "--out", "{out}/model", "--metrics", "{out}/metrics.json", "--plots", "{out}/plots", "--cache", ""]),
    "diffusion_checkpoint": ("diffusion_checkpoint", "steps", [
        "--out", "{out}/model", "--metrics", "{out}/metrics.json", "--plots", "{out}/plots",
        "--live-dir", "{out}/dvclive", "--cache", "{out}/cache", "--no-preview"]),
    "distilled_model": ("distilled_model", "max_steps", [
        "--out", "{out}/model", "--metrics", "{out}/metrics.json", "--plots", "{out}/plots", "--cache", ""]),
}


def stage_inputs(stage: str) -> list[str]:
    """The input arguments of ``stage`` as its command in dvc.yaml passes them (``--latents data/...``)."""
    words = shlex.split(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]["cmd"])[4:]
    pairs = zip(words[::2], words[1::2], strict=True)  # the stage commands are --flag value pairs
    return [word for flag, value in pairs if flag in INPUT_FLAGS for word in (flag, value)]


def params_for(base: Path, section: str, step_key: str, steps: int, folder: Path) -> Path:
    """``base`` with the trainer's budget set to exactly ``steps`` steps (no time budget, no mid-run evaluation)."""
    raw = yaml.safe_load(base.read_text())
    settings = raw.setdefault(section, {})
    settings[step_key] = steps
    minutes_key = {"diffusion_checkpoint": "train_minutes", "distilled_model": "minutes"}.get(section, "train_minutes")
    settings[minutes_key] = None if section == "diffusion_checkpoint" else 1000.0
    if section in ("autoencoder", "distilled_model"):
        settings["eval_every_s"] = 1e6
    if section == "distilled_model":
        settings["decoder_minutes"] = 0.0
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def run_trainer(stage: str, processes: int, steps: int, threads: int, params: Path) -> dict[str, Any]:
    section, step_key, arguments = TRAINERS[stage]
    with tempfile.TemporaryDirectory(prefix=f"{stage}-") as scratch:
        folder = Path(scratch)
        stage_params = params_for(params, section, step_key, steps, folder)
        launch = [sys.executable, "-m", "components"]
        if processes > 1:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
            launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                      str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                      "--main_process_port", str(port), "-m", "components"]
        command = launch + ["--params", str(stage_params), stage, *stage_inputs(stage)]
        command += [a.format(out=folder) for a in arguments]
        env = dict(os.environ, OMP_NUM_THREADS=str(max(1, threads // processes)), DVC_NO_ANALYTICS="1")
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            return {"error": done.stderr[-1500:]}
        metrics = json.loads((folder / "metrics.json").read_text())
    return {"train_samples_per_s": round(float(metrics["train_samples_per_s"]), 2), "processes": metrics["processes"],
            "steps": metrics.get("steps", metrics.get("train_steps"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=str(REPO / "params.yaml"))
    parser.add_argument("--trainers", nargs="+", default=list(TRAINERS), choices=list(TRAINERS))
    parser.add_argument("--steps", type=int, default=60, help="training steps per run")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="torch threads over all processes")
    args = parser.parse_args()
    report: dict[str, Any] = {"cores": os.cpu_count(), "threads": args.threads, "steps": args.steps, "trainers": {}}
    for stage in args.trainers:
        one = run_trainer(stage, 1, args.steps, args.threads, Path(args.params))
        two = run_trainer(stage, 2, args.steps, args.threads, Path(args.params))
        entry: dict[str, Any] = {"one_process": one, "two_processes": two}
        if "error" not in one and "error" not in two:
            entry["two_over_one"] = round(two["train_samples_per_s"] / one["train_samples_per_s"], 2)
        report["trainers"][stage] = entry
        print(json.dumps({stage: entry}), file=sys.stderr, flush=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
