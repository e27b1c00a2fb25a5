"""The ONNX export contract (README "ONNX export contract"): file names, tensor names and the manifest.

This module is the single definition of the contract that ``components.runtime.export`` writes and that
consumers (``components.play.server``, the contract tests, other programs) read. It imports neither torch
nor onnxruntime at load time, so a player can validate an export folder with numpy and the standard library
only (``execution_providers`` asks onnxruntime, when called, which execution providers it has).

Version history of ``format_version``:

* 1: ``encoder.onnx`` (frames -> latents), ``world_model.onnx`` (context_latents, context_actions ->
  next_latent; 1 step, CFG and context noise built in), ``decoder.onnx`` (latents -> frames),
  ``manifest.json``, ``contexts.npz`` (held-out starting contexts).

Any change to a name, dtype, axis meaning or manifest field that an existing reader relies on
increases ``FORMAT_VERSION``; adding a new optional manifest field does not.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import onnxruntime as ort

from components.atomic import file_sha256
from components.errors import PipelineError

FORMAT_VERSION = 1

ENCODER_FILE = "encoder.onnx"
WORLD_MODEL_FILE = "world_model.onnx"
DECODER_FILE = "decoder.onnx"
MANIFEST_FILE = "manifest.json"
CONTEXTS_FILE = "contexts.npz"
EXPORT_FILES = (ENCODER_FILE, WORLD_MODEL_FILE, DECODER_FILE, MANIFEST_FILE, CONTEXTS_FILE)

# graph -> ((input name, dtype, axes), ...), ((output name, dtype, axes), ...). "B" is the dynamic batch.
GRAPHS: dict[str, dict[str, list[tuple[str, str, tuple[str, ...]]]]] = {
    ENCODER_FILE: {
        "inputs": [("frames", "float32", ("B", "3", "H", "W"))],
        "outputs": [("latents", "float32", ("B", "C", "h", "w"))],
    },
    WORLD_MODEL_FILE: {
        "inputs": [
            ("context_latents", "float32", ("B", "K", "C", "h", "w")),
            ("context_actions", "int64", ("B", "K")),
        ],
        "outputs": [("next_latent", "float32", ("B", "C", "h", "w"))],
    },
    DECODER_FILE: {
        "inputs": [("latents", "float32", ("B", "C", "h", "w"))],
        "outputs": [("frames", "float32", ("B", "3", "H", "W"))],
    },
}

# Arrays of contexts.npz (N held-out starting points, T recorded steps after each context).
CONTEXT_ARRAYS: dict[str, tuple[str, tuple[str, ...]]] = {
    "context_latents": ("float32", ("N", "K", "C", "h", "w")),  # encoded context frames, oldest first
    "context_actions": ("int64", ("N", "K")),  # action taken on each context frame (recorded)
    "context_frames": ("uint8", ("N", "K", "H", "W", "3")),  # the real context frames, RGB
    "future_actions": ("int64", ("N", "T")),  # recorded actions after the context
    "future_frames": ("uint8", ("N", "T", "H", "W", "3")),  # the real frames those actions led to
}

# manifest.json: field -> (type, meaning). Every field is required in format_version 1.
MANIFEST_FIELDS: dict[str, tuple[type | tuple[type, ...], str]] = {
    "format_version": (int, "version of this contract"),
    "K": (int, "context length: frames (and actions) the world model sees"),
    "C": (int, "latent channels"),
    "h": (int, "latent height (may include internal padding)"),
    "w": (int, "latent width"),
    "H": (int, "frame height in pixels, as recorded"),
    "W": (int, "frame width in pixels, as recorded"),
    "actions": (list, "[{id, name, buttons}] in action-id order; buttons are ViZDoom Button names"),
    "frame_skip": (int, "game tics each action is held for"),
    "scenario": (dict, "{cfg, wad, map} the training data was recorded on"),
    "sampling": (dict, "how the 1-step model was made: {teacher_steps, cfg, context_noise_level, ...}"),
    "files": (dict, "file name -> sha256 of every file in the export"),
    "params_hash": (str, "sha256 of the params sections that made the export"),
    "inputs": (dict, "upstream DVC outs -> their md5 in dvc.lock (empty when not run under DVC)"),
    "parity": (dict, "ONNX Runtime vs PyTorch max abs diff per graph, and the tolerance"),
}


class ExportNotFoundError(PipelineError):
    """A folder that does not hold a complete, readable ONNX export."""


def _check_manifest(manifest: Any, path: Path) -> dict[str, Any]:
    if not isinstance(manifest, dict):
        raise ExportNotFoundError(f"{path}: must hold a JSON object")
    missing = [k for k in MANIFEST_FIELDS if k not in manifest]
    if missing:
        raise ExportNotFoundError(f"{path}: missing fields {missing}; re-run `dvc repro onnx_export`")
    wrong = [k for k, (kind, _) in MANIFEST_FIELDS.items() if not isinstance(manifest[k], kind)]
    if wrong:
        raise ExportNotFoundError(f"{path}: fields of the wrong type: {wrong}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise ExportNotFoundError(
            f"{path}: format_version {manifest['format_version']} but this reader understands "
            f"{FORMAT_VERSION}; re-export with this version of the pipeline"
        )
    ids = [a.get("id") for a in manifest["actions"]]
    if ids != list(range(len(ids))) or not all("name" in a and "buttons" in a for a in manifest["actions"]):
        raise ExportNotFoundError(f"{path}: actions must be [{{id, name, buttons}}] with ids 0..n-1")
    return manifest


def load_manifest(folder: str | Path) -> dict[str, Any]:
    """Read and validate ``<folder>/manifest.json``, checking that every export file is present.

    Raises ``ExportNotFoundError`` with what to do when the folder is not a complete export.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ExportNotFoundError(
            f"{folder}: no such folder. Build the export first (`dvc repro onnx_export`) or pass "
            "--export with the folder that holds encoder.onnx, world_model.onnx, decoder.onnx and manifest.json"
        )
    missing = [name for name in EXPORT_FILES if not (folder / name).is_file()]
    if missing:
        raise ExportNotFoundError(
            f"{folder}: not an ONNX export, missing {missing}. Build it with `dvc repro onnx_export` "
            "or pass --export with the right folder"
        )
    path = folder / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ExportNotFoundError(f"{path}: corrupt JSON ({error}); re-run `dvc repro onnx_export`") from None
    return _check_manifest(manifest, path)


def corrupt_files(folder: str | Path, manifest: dict[str, Any]) -> list[str]:
    """The files of ``manifest["files"]`` whose sha256 in ``folder`` differs from the manifest's (or that are gone)."""
    folder = Path(folder)
    return [name for name, digest in sorted(manifest["files"].items())
            if not (folder / name).is_file() or file_sha256(folder / name) != digest]


def axis_sizes(manifest: dict[str, Any]) -> dict[str, int]:
    """Sizes of the named axes in ``GRAPHS`` (all but the dynamic ``B``) from a manifest."""
    return {name: int(manifest[name]) for name in ("K", "C", "h", "w", "H", "W")} | {"3": 3}


def execution_providers() -> list[str]:
    """ONNX Runtime's CUDA execution provider first when this onnxruntime has it (``onnxruntime-gpu`` on a
    machine with a GPU), then the CPU one; with the plain ``onnxruntime`` wheel, the CPU only. Torch-free."""

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available] or ["CPUExecutionProvider"]
