"""Int8 copies of the export's world model and decoder, for the in-browser player (``web_bundle.py``).

ONNX Runtime Web runs float convolutions about 4x slower than native ONNX Runtime on the same core (WASM SIMD is
128 bits wide); its int8 kernels close part of that gap. ``quantize_graphs`` writes static int8 graphs (QDQ,
ONNX Runtime's own ``onnxruntime.quantization``):

* what is quantized: every ``Conv``, and every ``MatMul``/``Gemm`` whose second input is a weight. Attention's
  activation-by-activation products stay float: quantizing them puts the softmax in int8, which is slower
  (measured: the world model went from 13.3 to 15.2 ms natively) and less faithful;
* calibration: the float graphs' own rollouts from the shipped held-out contexts, driven by their recorded actions
  (``contexts.npz``: ``future_actions``), so the ranges are those of play;
* fidelity gate: from the same contexts, a different fixed action sequence (keys held 1 to 8 steps, seeded) is
  played with the float graphs and with the int8 ones; the PSNR of the int8 frames against the float frames at
  every step must reach ``min_psnr_db``, or nothing is written and the error names the setting.

The gate runs here, with this machine's int8 kernels; ONNX Runtime Web's round a few activations differently
(tests/test_web_bundle.py measures how far that goes). ``QUANTIZER`` names what makes the graphs, so that a bundle
can tell int8 graphs made another way from its own (``web_bundle.reusable_int8``).

The float graphs stay the export's contract (``export_contract.py``); these are a derived copy, like the bundle.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from onnxruntime import __version__ as ort_version

from components.errors import PipelineError
from components.runtime.export_contract import DECODER_FILE, WORLD_MODEL_FILE
from components.runtime.sessions import OnnxExport, OnnxModels

log = logging.getLogger(__name__)

INT8_FILES = {WORLD_MODEL_FILE: "world_model.int8.onnx", DECODER_FILE: "decoder.int8.onnx"}
QUANTIZED_OPS = ("Conv", "MatMul", "Gemm")
FIDELITY_SEED = 0
IDENTICAL_PSNR_DB = 100.0
QUANTIZER = (f"onnxruntime {ort_version} static QDQ, uint8 activations, int8 per-channel weights, "
             f"{'/'.join(QUANTIZED_OPS)} with weights, calibrated on the recorded actions, gate seed {FIDELITY_SEED}")


class QuantizationError(PipelineError):
    """The int8 graphs are not faithful enough to the float ones (or cannot be made)."""


def rollout(models: OnnxModels, latents: np.ndarray, actions: np.ndarray,
            future: np.ndarray) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[np.ndarray], np.ndarray]:
    """T steps from contexts ``latents`` [N, K, C, h, w] and ``actions`` [N, K]: step 0 applies the context's last
    action (the current one, as the player feeds it), step t > 0 applies ``future[:, t - 1]`` (so ``future``'s last
    column is not used). Returns the world model's inputs and outputs at every step and the frames, uint8
    [N, T, H, W, 3]."""
    inputs, predicted, frames = [], [], []
    for step in range(future.shape[1]):
        inputs.append((latents, actions))
        latent = models.predict(latents, actions)
        predicted.append(latent)
        frames.append(models.decode(latent))
        latents = np.concatenate([latents[:, 1:], latent[:, None]], axis=1)
        actions = np.concatenate([actions[:, 1:], future[:, step:step + 1]], axis=1)
    return inputs, predicted, np.stack(frames, axis=1)


def held_actions(count: int, steps: int, num_actions: int, seed: int = FIDELITY_SEED) -> np.ndarray:
    """[count, steps] action ids, each held 1 to 8 steps, as a player presses keys."""
    rng = np.random.default_rng(seed)
    sequences = np.empty((count, steps), np.int64)
    for row in sequences:
        step = 0
        while step < steps:
            hold = int(rng.integers(1, 9))
            row[step:step + hold] = rng.integers(num_actions)
            step += hold
    return sequences


def frame_psnr_db(generated: np.ndarray, reference: np.ndarray) -> float:
    """PSNR in dB of uint8 frames, pooled over everything given; identical frames count as IDENTICAL_PSNR_DB (a
    finite number, so that the report stays valid JSON for the page)."""
    error = np.mean((generated.astype(np.float64) - reference.astype(np.float64)) ** 2)
    return IDENTICAL_PSNR_DB if error == 0 else min(IDENTICAL_PSNR_DB, float(10 * np.log10(255.0 ** 2 / error)))


class Calibration:
    """``onnxruntime.quantization``'s data reader over recorded graph inputs (one sample per call, batch 1)."""

    def __init__(self, batches: list[dict[str, np.ndarray]]) -> None:
        self.samples: Iterator[dict[str, np.ndarray]] = (
            {name: array[i:i + 1] for name, array in batch.items()}
            for batch in batches for i in range(len(next(iter(batch.values()))))
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.samples, None)

    def rewind(self) -> None:  # called by some quantization paths; one pass is all static calibration needs
        pass


def quantize_graph(source: Path, target: Path, batches: list[dict[str, np.ndarray]]) -> int:
    """Static int8 QDQ quantization of ``source`` into ``target``, calibrated on ``batches`` (module docstring);
    returns how many nodes were quantized."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(Calibration, CalibrationDataReader):
        pass

    with tempfile.TemporaryDirectory() as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        graph = onnx.load(str(prepared)).graph
        weights = {tensor.name for tensor in graph.initializer}
        weights |= {name for node in graph.node if node.op_type == "Constant" for name in node.output}
        chosen = [node.name for node in graph.node if node.op_type == "Conv"
                  or (node.op_type in QUANTIZED_OPS and len(node.input) > 1 and node.input[1] in weights)]
        quantize_static(str(prepared), str(target), Reader(batches), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                        nodes_to_quantize=chosen, op_types_to_quantize=list(QUANTIZED_OPS),
                        extra_options={"ActivationSymmetric": False})
    return len(chosen)


def quantize_graphs(export: str | Path, out: str | Path, min_psnr_db: float) -> dict[str, Any]:
    """Write ``INT8_FILES`` of ``export`` into the folder ``out``; returns what was measured (module docstring).

    Raises ``QuantizationError`` (nothing written) when the int8 frames fall below ``min_psnr_db`` against the
    float graphs' frames at any step, or when ONNX Runtime cannot make or run them. The two files are moved into
    ``out`` one after the other: give it a staging folder (``atomic_directory``) for an all-or-nothing write."""
    export, out = Path(export), Path(out)
    game = OnnxExport(export, threads=1)
    contexts = game.contexts
    latents, actions = contexts["context_latents"], contexts["context_actions"]
    inputs, predicted, _ = rollout(game, latents, actions, contexts["future_actions"])
    world_batches = [{"context_latents": lat, "context_actions": act} for lat, act in inputs]
    decoder_batches = [{"latents": latent} for latent in predicted]
    with tempfile.TemporaryDirectory() as scratch:
        staged = {name: Path(scratch) / INT8_FILES[name] for name in INT8_FILES}
        played = held_actions(len(latents), contexts["future_actions"].shape[1], len(game.actions))
        _, _, float_frames = rollout(game, latents, actions, played)
        try:
            quantized = {name: quantize_graph(export / name, staged[name], batches) for name, batches in
                         ((WORLD_MODEL_FILE, world_batches), (DECODER_FILE, decoder_batches))}
            _, _, int8_frames = rollout(OnnxModels(staged[WORLD_MODEL_FILE], staged[DECODER_FILE], threads=1),
                                        latents, actions, played)
        except Exception as error:  # the quantizer's and the int8 sessions' errors come from deep inside onnxruntime
            raise QuantizationError(f"{export}: ONNX Runtime could not make or run int8 copies of the graphs "
                                    f"({type(error).__name__}: {error})") from error
        per_step = [frame_psnr_db(int8_frames[:, t], float_frames[:, t]) for t in range(played.shape[1])]
        report = {
            "precision": "int8",
            "quantizer": QUANTIZER,
            "quantized_nodes": quantized,
            "calibration_samples": len(world_batches) * len(latents),
            "fidelity": {"psnr_db_vs_float_min_over_steps": round(min(per_step), 2),
                         "psnr_db_vs_float_pooled": round(frame_psnr_db(int8_frames, float_frames), 2),
                         "steps": len(per_step), "contexts": len(latents), "min_psnr_db": min_psnr_db},
        }
        if min(per_step) < min_psnr_db:
            worst = int(np.argmin(per_step))
            raise QuantizationError(
                f"{export}: the int8 graphs' frames are {per_step[worst]:.1f} dB from the float graphs' at step "
                f"{worst + 1} of a held-key rollout, below play.web_int8_min_psnr_db = {min_psnr_db:g}")
        out.mkdir(parents=True, exist_ok=True)
        for name, path in staged.items():
            shutil.move(path, out / INT8_FILES[name])
    log.info("int8 graphs: %.1f dB from the float graphs' frames at worst over %d steps",
             min(per_step), len(per_step))
    return report


__all__ = ["INT8_FILES", "QUANTIZER", "QuantizationError", "frame_psnr_db", "held_actions", "quantize_graphs",
           "rollout"]
