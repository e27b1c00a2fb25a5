"""GPU smoke run: the ``gpu`` profile at reduced steps through every stage, in a fresh copy of this checkout.

Prints JSON: per stage the wall time, the peak GPU memory seen by ``nvidia-smi`` while it ran, and the training
samples/s from its metrics. Meant to finish within 10 minutes on one 80 GB GPU; run it whenever a GPU machine is at
hand (README "Scale-out: GPUs and several processes"). Nothing else depends on it; on a machine without a GPU,
``--profile micro --device cpu`` runs the same harness in a few minutes (what the test suite does not need to).

    python benchmarks/gpu_smoke.py                          # gpu profile, smoke budgets, device auto
    python benchmarks/gpu_smoke.py --keep /tmp/smoke        # keep the copy to look at its outputs

Where DVC cannot be installed (a bare GPU machine with torch), ``--runner direct`` runs each stage's ``cmd`` from
``dvc.yaml`` itself with this interpreter, and ``--inputs DIR --stages ...`` starts from earlier stages' outputs
recorded elsewhere (``DIR/data/<stage>``), e.g. the trajectories, which need ViZDoom:

    python benchmarks/gpu_smoke.py --stages rl_agent,raw_trajectories --device cpu --keep smoke-inputs  # here
    python benchmarks/gpu_smoke.py --runner direct --inputs smoke-inputs \
        --stages base_autoencoder,validated_latents,finetuned_vae,diffusion_checkpoint,distilled_model  # there

The direct stages import, beyond torch, accelerate, numpy, scipy, pandas and PIL: pydantic (pydantic-core,
annotated-types, typing-inspection, typing-extensions >= 4.16), diffusers (importlib-metadata, lazy-importer),
kornia (kornia-rs) and great-expectations (altair, jsonschema, jsonschema-specifications, referencing, rpds-py,
marshmallow, mistune, ruamel.yaml, tzlocal, cryptography, cffi, pycparser); carry them as wheels where pip cannot
reach an index.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
STAGE_ORDER = ["rl_agent", "raw_trajectories", "base_autoencoder", "validated_latents", "finetuned_vae",
               "diffusion_checkpoint", "distilled_model", "onnx_export", "evaluation"]
# Smoke budgets: every stage runs its real code on the gpu profile's shapes, for seconds to a minute or two.
SMOKE = {
    "rl_agent": {"total_timesteps": 16384, "checkpoints": 2},
    "raw_trajectories": {"shards": [0, 1], "frames_per_shard": 3000},
    "autoencoder": {"train_minutes": 0.75, "eval_every_s": 30.0, "eval_frames": 256},
    "finetuned_vae": {"train_minutes": 0.5, "eval_frames": 256},
    "diffusion_checkpoint": {"train_minutes": 1.5, "checkpoint_every": 500, "eval_windows": 128},
    "distilled_model": {"minutes": 0.75, "eval_windows": 128},
    "evaluation": {"windows": 128, "rollout_windows": 8},
}


class GpuMemory(threading.Thread):
    """Peak ``memory.used`` (MiB) of GPU 0 from ``nvidia-smi``, sampled every 0.5 s; None without nvidia-smi."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak: int | None = None
        self.running = shutil.which("nvidia-smi") is not None

    def run(self) -> None:
        while self.running:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                                 capture_output=True, text=True)
            if out.returncode == 0 and out.stdout.strip():
                self.peak = max(self.peak or 0, int(out.stdout.split()[0]))
            time.sleep(0.5)

    def stop(self) -> int | None:
        self.running = False
        return self.peak


# Pipeline outputs that git does not ignore; a smoke copy starts without them.
OUTPUT_ROOTS = {"dvc.lock", "metrics", "plots", "reports"}


def checkout_files() -> list[str]:
    """The checkout's source files as git lists them (committed or not); without git (a bare machine's copy),
    all but .gitignore's top-level folders, .git and __pycache__. Pipeline outputs are left out either way."""
    try:
        names = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        ignored = {line.strip("/") for line in (REPO / ".gitignore").read_text().splitlines() if line.startswith("/")}
        ignored |= {".git", "__pycache__"}
        names = [str(path.relative_to(REPO)) for path in REPO.rglob("*")
                 if path.is_file() and not ignored & set(path.relative_to(REPO).parts)]
    return [name for name in names if Path(name).parts[0] not in OUTPUT_ROOTS]


def copy_checkout(destination: Path, profile: str, device: str, as_git_repo: bool = True) -> None:
    """This checkout's files (a fresh git repo unless ``as_git_repo`` is off), ``profile`` applied, then the smoke
    budgets and ``device``."""
    from components.params import deep_merge, parse_params, profile_params, read_yaml

    for name in checkout_files():
        if (REPO / name).is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, destination / name)
    raw = deep_merge(profile_params(profile, read_yaml(REPO / "params.yaml")), SMOKE)
    raw["device"] = device
    parse_params(raw, source=f"profile {profile} + smoke budgets")
    (destination / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    if not as_git_repo:
        return
    author = ["-c", "user.email=smoke@example.invalid", "-c", "user.name=smoke"]
    for command in (["git", "init", "-q"], ["git", "add", "-A"], ["git", *author, "commit", "-qm", "smoke"]):
        subprocess.run(command, cwd=destination, check=True, capture_output=True)


# Direct runs leave out what needs DVC itself: DVCLive's logger.
DIRECT_ARGS = {"diffusion_checkpoint": ["--live-dir", ""]}


def stage_command(repo: Path, stage: str, runner: str) -> list[str]:
    """``dvc repro`` of the stage, or (``direct``) its ``cmd`` from ``dvc.yaml`` with this interpreter as ``python``."""
    if runner == "dvc":
        return [str(Path(sys.executable).parent / "dvc"), "repro", "--no-run-cache", stage]
    definition = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"][stage]
    if "cmd" not in definition:
        raise SystemExit(f"--runner direct: stage {stage} is a foreach stage; give its outputs with --inputs")
    command = shlex.split(definition["cmd"])
    command = [sys.executable, *command[1:]] if command[0] == "python" else command
    return [*command, *DIRECT_ARGS.get(stage, [])]


def run_stage(repo: Path, stage: str, runner: str = "dvc") -> dict[str, Any]:
    memory = GpuMemory()
    memory.start()
    started = time.monotonic()
    done = subprocess.run(stage_command(repo, stage, runner), cwd=repo, capture_output=True, text=True)
    seconds = time.monotonic() - started
    result: dict[str, Any] = {"stage": stage, "ok": done.returncode == 0, "wall_s": round(seconds, 1),
                              "gpu_memory_peak_mib": memory.stop()}
    if done.returncode != 0:
        result["error"] = (done.stderr or done.stdout)[-2000:]
    metrics = repo / "metrics" / f"{stage}.json"
    if metrics.is_file() and "train_samples_per_s" in (values := json.loads(metrics.read_text())):
        result["train_samples_per_s"] = values["train_samples_per_s"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="gpu", help="profile to smoke-test (default gpu)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--keep", help="folder for the copy (kept); default a temporary folder, removed")
    parser.add_argument("--runner", default="dvc", choices=["dvc", "direct"],
                        help="dvc: `dvc repro` each stage; direct: run each stage's cmd from dvc.yaml (no DVC needed)")
    parser.add_argument("--stages", default=",".join(STAGE_ORDER), help="comma-separated stages, in order")
    parser.add_argument("--inputs", help="folder whose data/<stage> folders are copied in first (stages not run)")
    args = parser.parse_args()
    stages = [s for s in args.stages.split(",") if s]
    unknown = sorted(set(stages) - set(STAGE_ORDER))
    if unknown:
        parser.error(f"--stages: unknown {unknown}; choose from {STAGE_ORDER}")
    sys.path.insert(0, str(REPO))

    import torch

    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="gpu-smoke-"))
    folder.mkdir(parents=True, exist_ok=True)
    copy_checkout(folder, args.profile, args.device, as_git_repo=args.runner == "dvc")
    if args.inputs:
        for stage_data in sorted((Path(args.inputs) / "data").iterdir()):
            shutil.copytree(stage_data, folder / "data" / stage_data.name)
    report: dict[str, Any] = {
        "profile": args.profile, "device": args.device, "runner": args.runner, "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "stages": [],
    }
    started = time.monotonic()
    for stage in stages:
        report["stages"].append(run_stage(folder, stage, args.runner))
        print(json.dumps(report["stages"][-1]), file=sys.stderr, flush=True)
        if not report["stages"][-1]["ok"]:
            break
    report["total_s"] = round(time.monotonic() - started, 1)
    report["ok"] = all(s["ok"] for s in report["stages"]) and len(report["stages"]) == len(stages)
    print(json.dumps(report, indent=2))
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
