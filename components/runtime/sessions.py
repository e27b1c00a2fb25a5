"""The export run with ONNX Runtime, as the player and the evaluation run it (numpy and onnxruntime only).

* ``OnnxModels``: ``world_model.onnx`` and ``decoder.onnx`` as sessions, with a decode thread for pipelined play and
  the decoder split in two when that balances the threads (``components/runtime/decoder_split.py``);
* ``OnnxExport``: an export folder (manifest, held-out contexts, encoder, world model, decoder);
* the session options, the float -> uint8 frame conversion and a CPU timer they share.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from components.images import to_uint8
from components.runtime.export_contract import (
    CONTEXTS_FILE,
    DECODER_FILE,
    ENCODER_FILE,
    WORLD_MODEL_FILE,
    ExportNotFoundError,
    execution_providers,
    load_manifest,
)

log = logging.getLogger(__name__)


def session_options(threads: int) -> Any:
    """ONNX Runtime options of the player's sessions, with ``threads`` intra-op threads each.

    Full graph optimisation (ORT's default, stated here: on the default export it makes the decoder about 20%
    faster than basic, through NCHWc convolutions). No busy-waiting: on a CPU shared with the browser, spinning
    threads slow every frame down (measured 5x with 2 threads on a loaded 2-core machine); when idle, it costs
    little, and with one thread per session, as the pipelined player runs, there is no pool to spin.
    """

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def pipelined_threads(threads: int) -> int:
    """Intra-op threads per session when ``threads`` cores are shared by the two sessions of the pipeline."""
    return max(1, threads // 2)


def load_session(source: Path | bytes, threads: int, name: str = "") -> Any:
    """An ONNX Runtime session (CUDA when this onnxruntime has it: ``execution_providers``) for a file or a
    serialized model; ``ExportNotFoundError`` if it cannot load."""

    label = name or (str(source) if isinstance(source, Path) else "a model")
    try:
        model = str(source) if isinstance(source, Path) else source
        session = ort.InferenceSession(model, session_options(threads), providers=execution_providers())
        log.info("ONNX Runtime runs %s on %s", label,
                 session.get_providers()[0])
        return session
    except Exception as error:  # onnxruntime raises its own exception types
        raise ExportNotFoundError(f"{label}: ONNX Runtime cannot load it ({error})") from None


def cpu_ms(run: Callable[[], object], repeats: int = 7) -> float:
    """Least CPU time of ``run()`` on this thread over ``repeats`` calls, in ms, after one warm-up call. With
    one intra-op thread ONNX Runtime computes on the calling thread, so this is the work itself, and the least
    of several is the least disturbed by other processes."""
    run()
    times = []
    for _ in range(repeats):
        start = time.thread_time()
        run()
        times.append(time.thread_time() - start)
    return min(times) * 1000.0


class OnnxModels:
    """``world_model.onnx`` and ``decoder.onnx`` with ONNX Runtime, and a thread for pipelined decoding.

    ONNX Runtime releases the GIL while it runs, so a decode on ``decode_pool`` and a prediction on the
    calling thread use two cores at once (``GameState.advance``). Sessions are safe to run concurrently, so
    several players (browser tabs) share one ``OnnxModels``.

    ``balance=True`` (the pipelined player) splits the decoder into a head, run on the calling thread right
    after the world model, and a tail, run on the decode thread, so that world model + head is about the
    tail: see ``components/runtime/decoder_split.py``. ``split`` says what was done and why. Decoding is head then
    tail on every path, so sequential and pipelined play give the same frames.
    """

    def __init__(self, world_model_path: str | Path, decoder_path: str | Path, threads: int = 2,
                 balance: bool = False) -> None:
        self.threads = threads
        self.world_model = load_session(Path(world_model_path), threads)
        self.decoder = load_session(Path(decoder_path), threads)
        # the split decoder's two sessions (balance=True), else None
        self.decoder_head: ort.InferenceSession | None = None
        self.decoder_tail: ort.InferenceSession | None = None
        self._cut = ""
        self.split: dict[str, Any] = {"cut": None, "reason": "not asked (balance=False)"}
        if balance:
            self.split = self._balance(Path(decoder_path))
        self._decode_pool: ThreadPoolExecutor | None = None

    def _balance(self, decoder_path: Path) -> dict[str, Any]:
        """Split the decoder so that world model + head takes about as long as the tail; return what was done."""
        batch_of_one = [1 if not isinstance(d, int) else d for d in self.world_model.get_inputs()[0].shape]
        context = np.random.default_rng(0).standard_normal(batch_of_one).astype(np.float32)
        actions = np.zeros(batch_of_one[:2], np.int64)
        latents = self.predict(context, actions)
        world_ms = cpu_ms(lambda: self.predict(context, actions))
        decoder_ms = cpu_ms(lambda: self.decoder.run(["frames"], {"latents": latents}))
        timing = {"world_model_cpu_ms": round(world_ms, 2), "decoder_cpu_ms": round(decoder_ms, 2)}
        if decoder_ms <= world_ms:
            return {"cut": None, "reason": "the world model is the slower stage", **timing}
        return {**self.split_decoder(decoder_path, (decoder_ms - world_ms) / (2 * decoder_ms)), **timing}

    def split_decoder(self, decoder_path: str | Path, head_share: float) -> dict[str, Any]:
        """Run the decoder as head then tail from now on, the head holding about ``head_share`` of its work
        (``components/runtime/decoder_split.py``), if a cut exists and gives the whole decoder's output."""
        try:
            from components.runtime import decoder_split

            graph = decoder_split.load_graph(decoder_path)
        except ImportError:
            return {"cut": None, "reason": "the onnx package is not installed"}
        choice = decoder_split.choose_cut(graph, head_share)
        if choice is None:
            return {"cut": None, "reason": "the decoder graph has no single-tensor cut"}
        cut, share = choice
        shape = [1 if not isinstance(d, int) else d for d in self.decoder.get_inputs()[0].shape]
        latents = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        try:
            head_model, tail_model = decoder_split.split(graph, cut)
            head = load_session(head_model, self.threads, f"{decoder_path} (head)")
            tail = load_session(tail_model, self.threads, f"{decoder_path} (tail)")
            parts = tail.run(["frames"], {cut: head.run([cut], {"latents": latents})[0]})[0]
        except Exception as error:  # an optimisation only: play the whole graph rather than fail
            return {"cut": None, "reason": f"splitting at {cut} failed: {error}"}
        whole = self.decoder.run(["frames"], {"latents": latents})[0]
        difference = float(np.abs(whole - parts).max())
        if difference > decoder_split.SPLIT_TOLERANCE:  # never expected: the parts hold the same nodes
            return {"cut": None, "reason": f"head then tail differs from the decoder by {difference:g}"}
        self.decoder_head, self.decoder_tail, self._cut = head, tail, cut
        return {"cut": cut, "head_share_of_decoder_flops": round(share, 3), "max_abs_diff": difference}

    @property
    def decode_pool(self) -> ThreadPoolExecutor:
        """One thread that runs decodes in the order they were queued (so each player's frames stay in order)."""
        if self._decode_pool is None:
            self._decode_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="onnx-decode")
        return self._decode_pool

    def predict(self, context_latents: np.ndarray, context_actions: np.ndarray) -> np.ndarray:
        """world_model.onnx: [B, K, C, h, w], [B, K] -> next latent [B, C, h, w]."""
        return self.world_model.run(
            ["next_latent"],
            {
                "context_latents": np.ascontiguousarray(context_latents, np.float32),
                "context_actions": np.ascontiguousarray(context_actions, np.int64),
            },
        )[0]

    def decode_head(self, latents: np.ndarray) -> np.ndarray:
        """The first part of the split decoder (the latents themselves when it is not split)."""
        latents = np.ascontiguousarray(latents, np.float32)
        if self.decoder_head is None:
            return latents
        return self.decoder_head.run([self._cut], {"latents": latents})[0]

    def decode_tail(self, hidden: np.ndarray) -> np.ndarray:
        """The rest of the decoder (all of it when it is not split), then uint8 [B, H, W, 3]."""
        if self.decoder_tail is None:
            return to_uint8(self.decoder.run(["frames"], {"latents": hidden})[0])
        return to_uint8(self.decoder_tail.run(["frames"], {self._cut: hidden})[0])

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """decoder.onnx, then uint8: [B, C, h, w] -> [B, H, W, 3]."""
        return self.decode_tail(self.decode_head(latents))

    def close(self) -> None:
        """Stop the decode thread (sessions are freed with the object)."""
        if self._decode_pool is not None:
            self._decode_pool.shutdown(wait=True)
            self._decode_pool = None


class OnnxExport(OnnxModels):
    """An export folder run with ONNX Runtime: its manifest, its held-out contexts and the three graphs (the
    encoder loaded when first used). ``threads`` is the intra-op thread count of each session."""

    def __init__(self, folder: str | Path, threads: int = 2, balance: bool = False) -> None:
        self.folder = Path(folder)
        self.manifest = load_manifest(self.folder)
        super().__init__(self.folder / WORLD_MODEL_FILE, self.folder / DECODER_FILE, threads, balance)
        self._encoder: ort.InferenceSession | None = None
        with np.load(self.folder / CONTEXTS_FILE) as data:
            self.contexts = {name: data[name] for name in data.files}
        self.K = int(self.manifest["K"])
        self.actions: list[dict[str, Any]] = self.manifest["actions"]
        if len(self.contexts["context_latents"]) == 0:
            raise ExportNotFoundError(f"{self.folder / CONTEXTS_FILE}: holds no held-out contexts")

    @property
    def encoder(self) -> Any:
        if self._encoder is None:
            self._encoder = load_session(self.folder / ENCODER_FILE, self.threads)
        return self._encoder

    @property
    def num_contexts(self) -> int:
        return len(self.contexts["context_latents"])

    def encode(self, frames: np.ndarray) -> np.ndarray:
        """encoder.onnx on uint8 frames [B, H, W, 3] -> latents [B, C, h, w]."""
        pixels = np.ascontiguousarray(frames.transpose(0, 3, 1, 2), np.float32) / 255.0
        return self.encoder.run(["latents"], {"frames": pixels})[0]
