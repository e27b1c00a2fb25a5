"""ONNX graphs of the playable model: export, check, run and compare with PyTorch (``components.runtime.playable``
assembles them, with the manifest and the held-out contexts, into what stage ``onnx_export`` ships).

The contract (names, dtypes, axes, manifest fields) is defined in ``components.runtime.export_contract`` and
documented in README "ONNX export contract". This module builds it:

* ``EncoderGraph`` / ``DecoderGraph`` wrap ``FrameAutoencoder.encode`` / ``decode`` (padding, scaling and
  cropping inside the graph); ``OneStepStudent`` is exported as is (CFG and context noise are in it).
* ``export_graph`` runs ``torch.onnx.export`` (dynamo) with a dynamic batch axis, checks the model with
  ``onnx.checker`` and writes a single file atomically (external data only above the 2 GB protobuf limit).
* ``parity`` compares ONNX Runtime with PyTorch on real held-out inputs (max abs diff per graph).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from components.atomic import atomic_path, atomic_write_bytes
from components.errors import PipelineError
from components.runtime.export_contract import ENCODER_FILE, GRAPHS, execution_providers

if TYPE_CHECKING:
    from components.models.autoencoder import FrameAutoencoder


log = logging.getLogger(__name__)

PROTOBUF_LIMIT = 2**31 - 1


class ExportError(PipelineError):
    """A graph that could not be exported or failed its checks."""


class EncoderGraph(nn.Module):
    """frames [B,3,H,W] in [0,1] -> scaled latents [B,C,h,w] (posterior mean; padding inside)."""

    def __init__(self, autoencoder: FrameAutoencoder) -> None:
        super().__init__()
        self.vae = autoencoder.vae  # registered so .eval() and parameters reach it
        self._autoencoder = autoencoder

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self._autoencoder.encode(frames)


class DecoderGraph(nn.Module):
    """scaled latents [B,C,h,w] -> frames [B,3,H,W] in [0,1] at the recorded size (padding cropped)."""

    def __init__(self, autoencoder: FrameAutoencoder) -> None:
        super().__init__()
        self.vae = autoencoder.vae
        self._autoencoder = autoencoder

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self._autoencoder.decode(latents)


def export_graph(module: nn.Module, example_inputs: tuple[torch.Tensor, ...], path: str | Path, graph: str,
                 max_batch: int = 64, opset: int = 18) -> Path:
    """Export ``module`` to ``path`` with the input/output names of ``GRAPHS[graph]`` and a dynamic batch.

    Uses the dynamo exporter; ``onnx.checker`` (full check, with shape inference) must pass. The file is a
    single protobuf unless the weights pass 2 GB, when they go to ``<path>.data`` beside it.
    """

    spec = GRAPHS[graph]
    input_names = [name for name, _, _ in spec["inputs"]]
    output_names = [name for name, _, _ in spec["outputs"]]
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    dynamic_shapes = tuple({0: batch} for _ in example_inputs)
    module = module.eval()
    for noisy in ("onnx_ir", "onnxscript", "torch.onnx._internal.exporter._registration"):
        logging.getLogger(noisy).setLevel(logging.WARNING if "registration" not in noisy else logging.ERROR)
    try:
        with torch.no_grad():
            program = torch.onnx.export(
                module, example_inputs, dynamo=True, input_names=input_names, output_names=output_names,
                dynamic_shapes=dynamic_shapes, opset_version=opset, optimize=True, verbose=False,
            )
    except Exception as error:  # torch.export raises many types; the message is what matters
        raise ExportError(f"{graph}: torch.onnx.export failed: {str(error).strip().splitlines()[0]}") from error
    if program is None:
        raise ExportError(f"{graph}: torch.onnx.export returned no program")
    path = Path(path)
    proto = program.model_proto
    if proto.ByteSize() < PROTOBUF_LIMIT:
        try:
            onnx.checker.check_model(proto, full_check=True)
        except onnx.checker.ValidationError as error:
            raise ExportError(f"{graph}: onnx.checker rejected the graph: {error}") from None
        atomic_write_bytes(path, proto.SerializeToString())
    else:  # > 2 GB: the protobuf limit forces external data
        with atomic_path(path, suffix=".onnx") as temporary:
            program.save(str(temporary), external_data=True)
        onnx.checker.check_model(str(path), full_check=True)
    log.info("exported %s (%.1f MB)", path, path.stat().st_size / 1e6)
    return path


def ort_session(path: str | Path, threads: int = 2) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3

    session = ort.InferenceSession(str(path), options, providers=execution_providers())
    log.info("ONNX Runtime runs %s on %s", Path(path).name, session.get_providers()[0])
    return session


def onnx_encoder(autoencoder: FrameAutoencoder, folder: str | Path, max_batch: int, threads: int = 0,
                 check_frames: np.ndarray | None = None, tolerance: float = 1e-3) -> Any:
    """Export ``autoencoder``'s encoder (the graph ``onnx_export`` ships) into ``folder`` and return a function
    frames float32 [B,3,H,W] in [0,1] -> scaled latents [B,C,h,w] run by ONNX Runtime (``threads`` 0 = one per core).

    With ``check_frames`` the graph is first compared with PyTorch on them; a max abs difference above
    ``tolerance`` raises ``ExportError``.
    """

    frame_size = tuple(autoencoder.frame_size)
    example = torch.rand(min(2, max_batch), 3, *frame_size)
    path = export_graph(EncoderGraph(autoencoder), (example,), Path(folder) / ENCODER_FILE, ENCODER_FILE,
                        max_batch=max(max_batch, 2))
    session = ort_session(path, threads)
    if check_frames is not None:
        report = parity(EncoderGraph(autoencoder), session, {"frames": np.ascontiguousarray(check_frames, np.float32)})
        if report["max_abs_diff"] > tolerance:
            raise ExportError(f"encoder: ONNX Runtime differs from PyTorch by {report['max_abs_diff']:.2e} "
                              f"(tolerance {tolerance:g}); use validated_latents.engine: torch")
        log.info("ONNX encoder matches PyTorch: max abs diff %.2e", report["max_abs_diff"])

    def encode(frames: np.ndarray) -> np.ndarray:
        return session.run(["latents"], {"frames": np.ascontiguousarray(frames, np.float32)})[0]

    return encode


@torch.no_grad()
def parity(module: nn.Module, session: ort.InferenceSession, inputs: dict[str, np.ndarray],
           batch_size: int = 8) -> dict[str, float]:
    """Max and mean absolute difference between ONNX Runtime and PyTorch on ``inputs`` (same names as the graph)."""
    names = list(inputs)
    count = len(inputs[names[0]])
    max_diff, total, elements = 0.0, 0.0, 0
    output_scale = 0.0
    for start in range(0, count, batch_size):
        feed = {n: np.ascontiguousarray(a[start : start + batch_size]) for n, a in inputs.items()}
        expected = module(*(torch.from_numpy(v) for v in feed.values())).numpy()
        actual = session.run(None, feed)[0]
        if actual.shape != expected.shape:
            raise ExportError(f"ONNX output shape {actual.shape} differs from PyTorch's {expected.shape}")
        difference = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
        max_diff = max(max_diff, float(difference.max()))
        total += float(difference.sum())
        elements += difference.size
        output_scale = max(output_scale, float(np.abs(expected).max()))
    return {"max_abs_diff": max_diff, "mean_abs_diff": total / max(elements, 1), "max_abs_output": output_scale,
            "samples": count}
