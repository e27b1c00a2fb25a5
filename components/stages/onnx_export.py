"""Stage ``onnx_export``: the playable export (README "ONNX export contract") and its parity report.

Reads ``data/distilled_model`` (the 1-step student, and in ``autoencoder/`` the encoder and the decoder that
ship with it), ``data/validated_latents`` and ``data/raw_trajectories`` (held-out windows). Writes
``data/onnx_export/``: ``encoder.onnx``, ``world_model.onnx``, ``decoder.onnx``, ``manifest.json``,
``contexts.npz``; and ``reports/onnx_export.json`` ``{"success", "checks": [...]}``, the blocking Dagster asset
check: ONNX Runtime against PyTorch on real held-out windows (max abs diff within
``onnx_export.parity_tolerance``), and a dynamic batch of 1 and 3 on every graph.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import torch

from components.atomic import atomic_directory, atomic_write_json, file_sha256
from components.data.trajectory_store import ShardError, TrajectoryStore
from components.errors import PipelineError
from components.game.environment import resolve_scenario
from components.models.autoencoder import load_autoencoder
from components.models.distillation import load_student
from components.params import load_params
from components.runtime import export_contract as contract
from components.runtime.export import (
    DecoderGraph,
    EncoderGraph,
    dvc_lock_hashes,
    export_graph,
    ort_session,
    params_hash,
    parity,
    sample_contexts,
)

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--student", required=True, help="distilled model folder")
    parser.add_argument("--autoencoder", required=True,
                        help="autoencoder folder: the one that ships with the student (its decoder tuned to it)")
    parser.add_argument("--latents", required=True, help="validated latent shards")
    parser.add_argument("--trajectories", required=True, help="raw trajectory shards (frames)")
    parser.add_argument("--out", required=True, help="export folder")
    parser.add_argument("--report", required=True, help="parity report (asset check)")
    parser.add_argument("--lock", default="dvc.lock", help="dvc.lock to read the inputs' hashes from")


def config_wad(config: str) -> str | None:
    """The wad a ViZDoom .cfg names (``doom_scenario_path``, else ``doom_game_path``), as a file name."""

    values = {}
    for line in Path(config).read_text(errors="replace").splitlines():
        key, _, value = line.partition("=")
        values[key.strip()] = value.split("#")[0].strip()
    wad = values.get("doom_scenario_path") or values.get("doom_game_path")
    return Path(wad).name if wad else None


def main(args: argparse.Namespace) -> None:
    params = load_params(args.params)
    settings, environment = params.onnx_export, params.environment
    torch.manual_seed(0)
    student = load_student(args.student)
    autoencoder = load_autoencoder(args.autoencoder)
    config = student.config
    K, (C, h, w), (H, W) = config.context, autoencoder.latent_shape, autoencoder.frame_size
    if (C, h, w) != (config.latent_channels, *config.latent_size):
        raise PipelineError(f"{args.student} works on latents {(config.latent_channels, *config.latent_size)} but "
                            f"{args.autoencoder} makes {(C, h, w)}; re-run the stages from finetuned_vae on")
    if config.num_actions != len(environment.actions):
        raise PipelineError(f"the model knows {config.num_actions} actions but environment.actions lists "
                            f"{len(environment.actions)}; re-run the pipeline after changing the action set")

    latent_store = TrajectoryStore(args.latents)
    try:
        raw_store = TrajectoryStore(args.trajectories)
    except ShardError as error:
        log.warning("no raw trajectories (%s): shipped context frames will be decoded latents", error)
        raw_store = None

    def decode_uint8(latents: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            frames = autoencoder.decode(torch.from_numpy(latents))
        return (frames.clamp(0, 1) * 255 + 0.5).byte().permute(0, 2, 3, 1).numpy()

    shipped = sample_contexts(latent_store, K + settings.future_steps, settings.contexts, raw_store, decode_uint8,
                              "onnx_export's shipped contexts (K + onnx_export.future_steps rows)")
    checked = sample_contexts(latent_store, K + 1, settings.parity_windows, raw_store, decode_uint8,
                              "onnx_export's parity check")
    contexts = {
        "context_latents": shipped["latents"][:, :K],
        "context_actions": shipped["actions"][:, :K],
        "context_frames": shipped["frames"][:, :K],
        "future_actions": shipped["actions"][:, K:],
        "future_frames": shipped["frames"][:, K:],
    }
    # actions[:, K] is the action taken on the first future frame; the world model's last context action
    # (actions[:, K-1]) is the one that led to it.
    parity_inputs = {
        contract.ENCODER_FILE: {"frames": checked["frames"][:, 0].transpose(0, 3, 1, 2).astype(np.float32) / 255.0},
        contract.WORLD_MODEL_FILE: {"context_latents": checked["latents"][:, :K],
                                    "context_actions": checked["actions"][:, :K]},
        contract.DECODER_FILE: {"latents": checked["latents"][:, K]},
    }
    # the dvc.lock outs it was made from (the autoencoder that ships inside the student folder is part of that out)
    inputs = [args.student, args.latents, args.trajectories]
    if not Path(args.autoencoder).resolve().is_relative_to(Path(args.student).resolve()):
        inputs.insert(1, args.autoencoder)
    modules = {
        contract.ENCODER_FILE: EncoderGraph(autoencoder).eval(),
        contract.WORLD_MODEL_FILE: student.eval(),
        contract.DECODER_FILE: DecoderGraph(autoencoder).eval(),
    }
    checks: list[dict] = []
    parity_results: dict[str, dict] = {}
    out = Path(args.out)
    with atomic_directory(out) as staging:
        for name, module in modules.items():
            example = tuple(torch.from_numpy(np.ascontiguousarray(np.resize(a, (2, *a.shape[1:])).astype(a.dtype)))
                            for a in parity_inputs[name].values())  # batch 2: batch 1 would specialise
            export_graph(module, example, staging / name, name, max_batch=settings.max_batch, opset=settings.opset)
            checks.append({"name": f"onnx_checker:{name}", "success": True})
            session = ort_session(staging / name)
            result = parity(module, session, parity_inputs[name])
            ok = result["max_abs_diff"] <= settings.parity_tolerance
            parity_results[name] = {**result, "tolerance": settings.parity_tolerance, "success": ok}
            checks.append({"name": f"parity:{name}", "success": ok, **result, "tolerance": settings.parity_tolerance})
            for batch in (1, 3):
                feed = {k: np.ascontiguousarray(np.resize(v, (batch, *v.shape[1:])).astype(v.dtype))
                        for k, v in parity_inputs[name].items()}
                shape = session.run(None, feed)[0].shape
                checks.append({"name": f"dynamic_batch:{name}:{batch}", "success": shape[0] == batch,
                               "output_shape": list(shape)})
        np.savez(staging / contract.CONTEXTS_FILE, **contexts)

        scenario = resolve_scenario(environment)
        sections = {"environment": environment.model_dump(), "onnx_export": settings.model_dump()}
        manifest = {
            "format_version": contract.FORMAT_VERSION,
            "K": K, "C": C, "h": h, "w": w, "H": H, "W": W,
            "actions": [{"id": i, "name": a.name, "buttons": list(a.buttons)}
                        for i, a in enumerate(environment.actions)],
            "frame_skip": environment.frame_skip,
            "scenario": {"name": scenario.scenario, "cfg": Path(scenario.config).name,
                         "wad": Path(scenario.wad).name if scenario.wad else config_wad(scenario.config),
                         "map": scenario.map},
            "sampling": {
                "model": "one-step student (components/models/distillation.py)",
                "teacher_steps": student.settings.teacher_steps,
                "cfg": student.settings.cfg,
                "context_noise_level": student.settings.context_noise_level,
                "noise_bucket": student.settings.noise_bucket,
                "trained_on": student.settings.target,
                "rollout_steps": student.settings.rollout_steps,
                "deterministic": True,
            },
            "padding": dict(zip(("left", "right", "top", "bottom"), autoencoder.padding, strict=True)),
            "scaling_factor": autoencoder.scaling_factor,
            "contexts": {"count": len(contexts["context_latents"]), "future_steps": settings.future_steps,
                         "split": shipped["split"], "frames_source": shipped["frames_source"]},
            "files": {p.name: file_sha256(p) for p in sorted(staging.iterdir()) if p.is_file()},
            "params_hash": params_hash(sections),
            "params_sections": sorted(sections),
            "inputs": dvc_lock_hashes(inputs, args.lock),
            "parity": parity_results,
        }
        atomic_write_json(staging / contract.MANIFEST_FILE, manifest)
        contract.load_manifest(staging)  # the contract's own reader must accept what was written

    report = {"success": all(c["success"] for c in checks), "checks": checks}
    atomic_write_json(args.report, report)
    worst = {k: f"{v['max_abs_diff']:.2e}" for k, v in parity_results.items()}
    if report["success"]:
        log.info("exported %s; parity max abs diff %s (tolerance %g)", out, worst, settings.parity_tolerance)
    else:
        log.error("export %s FAILED its checks (see %s): %s", out, args.report,
                  [c["name"] for c in checks if not c["success"]])
