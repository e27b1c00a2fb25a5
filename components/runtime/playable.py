"""The playable export (stage ``onnx_export``): three ONNX graphs, ``contexts.npz`` and ``manifest.json``, checked.

``export_playable`` exports the encoder, the 1-step student and the decoder (``components.runtime.export``), checks
each against PyTorch on real held-out windows (max abs diff within ``onnx_export.parity_tolerance``) and at batch
1 and 3, ships held-out contexts with their real frames, and writes the manifest the contract defines
(``components.runtime.export_contract``, README "ONNX export contract"). It returns the parity report, the blocking
Dagster asset check.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import yaml

from components.atomic import atomic_directory, atomic_write_json, file_sha256, json_sha256
from components.data.windows import heldout_windows
from components.errors import PipelineError
from components.game.environment import resolve_scenario
from components.runtime import export_contract as contract
from components.runtime.export import DecoderGraph, EncoderGraph, export_graph, ort_session, parity

if TYPE_CHECKING:
    from components.data.trajectory_store import TrajectoryStore
    from components.models.autoencoder import FrameAutoencoder
    from components.models.distillation import OneStepStudent
    from components.params import EnvironmentParams, Params


log = logging.getLogger(__name__)


def export_playable(student: OneStepStudent, autoencoder: FrameAutoencoder, latent_store: TrajectoryStore,
                    raw_store: TrajectoryStore | None, params: Params, out: str | Path,
                    inputs: dict[str, str | None]) -> dict[str, Any]:
    """Write the export into ``out`` atomically and return its report ``{"success", "checks": [...]}``.

    ``raw_store`` holds the real frames of the held-out windows (None: decoded latents are shipped instead);
    ``inputs`` are the ``dvc.lock`` hashes of what it was made from (``dvc_lock_hashes``)."""

    settings, environment = params.onnx_export, params.environment
    check_compatible(student, autoencoder, environment)
    torch.manual_seed(0)
    K = student.config.context

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
    modules = {
        contract.ENCODER_FILE: EncoderGraph(autoencoder).eval(),
        contract.WORLD_MODEL_FILE: student.eval(),
        contract.DECODER_FILE: DecoderGraph(autoencoder).eval(),
    }
    checks: list[dict] = []
    parity_results: dict[str, dict] = {}
    with atomic_directory(Path(out)) as staging:
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
        manifest = build_manifest(student, autoencoder, params, staging, shipped, inputs)
        manifest["parity"] = parity_results
        atomic_write_json(staging / contract.MANIFEST_FILE, manifest)
        contract.load_manifest(staging)  # the contract's own reader must accept what was written
    return {"success": all(c["success"] for c in checks), "checks": checks}


def check_compatible(student: OneStepStudent, autoencoder: FrameAutoencoder, environment: EnvironmentParams) -> None:
    """The student, the autoencoder and the action set must fit; else ``PipelineError`` saying what to rerun."""
    config = student.config
    if tuple(autoencoder.latent_shape) != (config.latent_channels, *config.latent_size):
        raise PipelineError(f"the student works on latents {(config.latent_channels, *config.latent_size)} but its "
                            f"autoencoder makes {tuple(autoencoder.latent_shape)}; re-run the stages from "
                            "finetuned_vae on")
    if config.num_actions != len(environment.actions):
        raise PipelineError(f"the model knows {config.num_actions} actions but environment.actions lists "
                            f"{len(environment.actions)}; re-run the pipeline after changing the action set")


def build_manifest(student: OneStepStudent, autoencoder: FrameAutoencoder, params: Params, staging: Path,
                   shipped: dict[str, Any], inputs: dict[str, str | None]) -> dict[str, Any]:
    """``manifest.json`` for the files already in ``staging`` (the contract's fields, parity added by the caller)."""
    settings, environment = params.onnx_export, params.environment
    (C, h, w), (H, W) = autoencoder.latent_shape, autoencoder.frame_size
    scenario = resolve_scenario(environment)
    sections = {"environment": environment.model_dump(), "onnx_export": settings.model_dump()}
    return {
        "format_version": contract.FORMAT_VERSION,
        "K": student.config.context, "C": C, "h": h, "w": w, "H": H, "W": W,
        "actions": [{"id": i, "name": a.name, "buttons": list(a.buttons)} for i, a in enumerate(environment.actions)],
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
        "contexts": {"count": len(shipped["latents"]), "future_steps": settings.future_steps,
                     "split": shipped["split"], "frames_source": shipped["frames_source"]},
        "files": {p.name: file_sha256(p) for p in sorted(staging.iterdir()) if p.is_file()},
        "params_hash": json_sha256(sections),  # the params sections that made it
        "params_sections": sorted(sections),
        "inputs": inputs,
    }


def config_wad(config: str) -> str | None:
    """The wad a ViZDoom .cfg names (``doom_scenario_path``, else ``doom_game_path``), as a file name."""

    values = {}
    for line in Path(config).read_text(errors="replace").splitlines():
        key, _, value = line.partition("=")
        values[key.strip()] = value.split("#")[0].strip()
    wad = values.get("doom_scenario_path") or values.get("doom_game_path")
    return Path(wad).name if wad else None


def dvc_lock_hashes(inputs: list[str], lock_path: str | Path = "dvc.lock") -> dict[str, str | None]:
    """For each input path, the md5 that ``dvc.lock`` records for it as some stage's out (None if absent).

    Upstream stages are locked before this one runs, so their outs' hashes are final.
    """

    recorded: dict[str, str] = {}
    lock = Path(lock_path)
    if lock.is_file():
        data = yaml.safe_load(lock.read_text()) or {}
        for stage in (data.get("stages") or {}).values():
            for out in stage.get("outs", []) or []:
                if "md5" in out:
                    recorded[str(out["path"]).rstrip("/")] = out["md5"]
    result: dict[str, str | None] = {}
    for name in inputs:
        name = name.rstrip("/")
        if name in recorded:
            result[name] = recorded[name]
        else:  # a folder of foreach shards: each shard is its own out
            shards = {k: v for k, v in recorded.items() if k.startswith(name + "/")}
            result[name] = hashlib.md5(json.dumps(shards, sort_keys=True).encode()).hexdigest() if shards else None
            if shards:
                result.update(shards)
    return result


# --------------------------------------------------------------------------- held-out windows with real frames


def sample_contexts(latent_store: TrajectoryStore, length: int, count: int, raw_store: TrajectoryStore | None = None,
                    decode: Callable[[np.ndarray], np.ndarray] | None = None,
                    needed_for: str = "onnx_export") -> dict[str, Any]:
    """``count`` evenly spread held-out windows of ``length`` rows: latents, actions and the real frames.

    Real frames come from the latent shard's own ``frames`` array when it has one, else from the raw
    trajectory episode with the same ``episode_id`` (and length); failing both, from ``decode(latents)``
    (then ``frames_source`` says "decoded"). ``HeldOutError`` (naming ``needed_for``) when no held-out episode
    is long enough.
    """
    windows = heldout_windows(latent_store, length, needed_for)
    picks = windows.evenly_spaced(count)
    read_latents, read_actions = windows.read(picks)
    latents = list(read_latents.numpy())
    actions = list(read_actions.numpy())
    frames, sources = [], set()
    for (shard, start), window_latents in zip(windows.index[picks], latents, strict=True):
        source = latent_store.shards[int(shard)]
        if "frames" in source.array_names:
            frames.append(np.array(source.array("frames")[start : start + length]))
            sources.add("latent_store")
            continue
        raw = None if raw_store is None else raw_store.read_matching_window(latent_store, int(shard), int(start),
                                                                             length, ["frames"])
        if raw is not None:
            frames.append(raw["frames"])
            sources.add("raw_trajectories")
        elif decode is not None:
            frames.append(decode(window_latents))
            sources.add("decoded")
        else:
            episode = latent_store.episode_at(int(shard), int(start))
            raise PipelineError(f"episode {episode.episode_id}: no real frames found and no decoder given")
    return {
        "latents": np.stack(latents),
        "actions": np.stack(actions),
        "frames": np.stack(frames).astype(np.uint8),
        "split": "heldout",
        "frames_source": ",".join(sorted(sources)),
    }
