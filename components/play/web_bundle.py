"""The static bundle of the in-browser player (``python -m components bundle``): the game with no Python server.

``build_bundle(export, out)`` writes one folder that any static file server can serve::

    index.html, player.js,  the page (components/play/page/web.html, web_player.js, screen.js,
    screen.js,              session_worker.js): ONNX Runtime Web runs the world model and the decoder in it, each in
    session_worker.js       a Web Worker (WASM with SIMD; with threads when the page is cross-origin isolated, else
                            one thread per worker, and the page says so)
    ort/                    ort.wasm.min.mjs and ort-wasm-simd-threaded.{mjs,wasm}, copied from
                            node_modules/onnxruntime-web/dist of this repository (``make web`` = ``npm ci``; the version
                            pinned in package.json and package-lock.json)
    world_model_decoder_    the graphs the page runs, one per worker: with precision int8 (params
      head.int8.onnx        play.web_precision, the default) int8 copies of the export's graphs
    decoder_tail.int8.onnx  (components/runtime/quantize.py), checked against the float graphs' frames; with
                            float32, or when the int8 copies fail that check (a warning, and bundle.json says why),
                            the export's float graphs. The decoder's first layers (params
                            play.web_decoder_head_share of its work) run in the world model's worker, joined to the
                            world model's graph (``split_for_workers``); with a share of 0 the graphs ship whole,
                            as world_model[.int8].onnx and decoder[.int8].onnx (the encoder is not needed: the
                            contexts ship as latents)
    contexts.bin            the export's held-out contexts, little-endian, one after the other: latents float32
                            [N, K, C, h, w], actions int32 [N, K], last real frame uint8 [N, H, W, 3]
    bundle.json             what the page reads first: sizes, actions, the keymap, the frame-rate cap, the layout
                            of contexts.bin, the graphs, their precision (with the int8 fidelity measured), the
                            decoder's split and what the graphs were made from (``graph_sources``: a rebuild with
                            the same sources reuses them), and the bytes and sha256 of every other file (the page
                            checks them)

The page plays as ``components.play.server.GameState.advance`` does (same keymap, same action matching, same
rolling context, same uint8 conversion, the next prediction beside the last decode), so from the same context and
actions it makes the same frames as ``GameState.step`` up to
ONNX Runtime Web's arithmetic as ONNX Runtime in Python does with the same graphs (tests/test_web_bundle.py
measures it).

``python -m components play --engine browser`` writes it and ``serve_bundle(folder, host, port)`` serves it with the
cross-origin isolation headers that WASM threads need
(``Cross-Origin-Opener-Policy: same-origin``, ``Cross-Origin-Embedder-Policy: require-corp``) and stops cleanly
on SIGTERM or SIGINT.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import shutil
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from components.atomic import atomic_directory, file_sha256
from components.errors import PipelineError
from components.play.server import KEY_BUTTONS, PAGE_DIR, stop_on_signals
from components.runtime import decoder_split
from components.runtime.export_contract import (
    CONTEXTS_FILE,
    DECODER_FILE,
    WORLD_MODEL_FILE,
    ExportNotFoundError,
    corrupt_files,
    load_manifest,
)
from components.runtime.quantize import INT8_FILES, QUANTIZER, QuantizationError, quantize_graphs
from components.runtime.sessions import load_session

if TYPE_CHECKING:
    from components.params import PlayParams

log = logging.getLogger(__name__)

BUNDLE_FORMAT = "gamengen-web-bundle/1"
BUNDLE_FILE = "bundle.json"
CONTEXTS_BIN = "contexts.bin"
ORT_PACKAGE = Path(__file__).resolve().parents[2] / "node_modules" / "onnxruntime-web"  # make web
ORT_FILES = ("ort.wasm.min.mjs", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")
PAGE_FILES = {"index.html": "web.html", "player.js": "web_player.js", "screen.js": "screen.js",
              "session_worker.js": "session_worker.js"}
ISOLATION_HEADERS = {
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Embedder-Policy": "require-corp",
    "Cross-Origin-Resource-Policy": "same-origin",
}


def ort_web_files(package: Path) -> tuple[str, list[Path]]:
    """(version, the files the page loads) of the installed onnxruntime-web; a clear error when it is missing."""
    manifest = package / "package.json"
    files = [package / "dist" / name for name in ORT_FILES]
    missing = [str(p) for p in [manifest, *files] if not p.is_file()]
    if missing:
        raise PipelineError(f"onnxruntime-web is not installed ({missing[0]} is missing): run `make web` "
                            "(npm ci, the version pinned in package.json) in the repository root")
    return str(json.loads(manifest.read_text())["version"]), files


def write_contexts(export: Path, path: Path) -> dict[str, Any]:
    """``contexts.npz`` as one raw little-endian file; returns its layout (offsets in bytes, shapes, dtypes)."""
    with np.load(export / CONTEXTS_FILE) as data:
        parts = {
            "latents": np.ascontiguousarray(data["context_latents"], "<f4"),
            "actions": np.ascontiguousarray(data["context_actions"], "<i4"),
            "frames": np.ascontiguousarray(data["context_frames"][:, -1], np.uint8),
        }
    layout: dict[str, Any] = {"count": int(len(parts["latents"]))}
    offset = 0
    with open(path, "wb") as handle:
        for name, array in parts.items():
            layout[name] = {"offset": offset, "shape": list(array.shape), "dtype": array.dtype.name}
            handle.write(array.tobytes())
            offset += array.nbytes
    return layout


PRECISIONS = ("int8", "float32")


def graph_sources(manifest: dict[str, Any], precision: str, min_psnr_db: float, head_share: float) -> dict[str, Any]:
    """What the bundle's graphs are made from and how: the float graphs' and the contexts' sha256, the precision
    asked for, the quantizer and its fidelity bar, and the decoder's split. Equal sources make equal graphs."""
    files = (WORLD_MODEL_FILE, DECODER_FILE, CONTEXTS_FILE)
    sources: dict[str, Any] = {name: manifest["files"][name] for name in files}
    sources.update(precision=precision, decoder_head_share=head_share)
    if precision == "int8":
        sources.update(quantizer=QUANTIZER, min_psnr_db=min_psnr_db)
    return sources


def reusable_graphs(out: Path, sources: dict[str, Any]) -> dict[str, Any] | None:
    """The bundle already in ``out`` (its ``bundle.json``) when it made its graphs from the same ``sources`` and
    they are intact; else None (make them again)."""
    try:
        bundle = json.loads((out / BUNDLE_FILE).read_text())
        if bundle["sources"] != sources:
            return None
        if any(file_sha256(out / name) != bundle["files"][name]["sha256"] for name in bundle["graphs"].values()):
            return None
        return dict(bundle)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def stage_precision(export: Path, staging: Path, manifest: dict[str, Any], precision: str,
                    min_psnr_db: float) -> tuple[dict[str, str], dict[str, Any]]:
    """Put the whole graphs of ``precision`` into ``staging``: int8 copies (``quantize_graphs``) when they pass
    the fidelity gate, else (a warning, the reason in the report) or with float32 the export's own graphs.
    Returns (graph role -> file name, the precision report)."""
    graphs = {"world_model": WORLD_MODEL_FILE, "decoder": DECODER_FILE}
    report: dict[str, Any] = {"precision": "float32"}
    if precision == "int8":
        try:
            report = quantize_graphs(export, staging, min_psnr_db)
            return {role: INT8_FILES[name] for role, name in graphs.items()}, report
        except QuantizationError as refused:
            log.warning("%s; the bundle ships the float32 graphs (play.web_precision: float32 or --precision "
                        "float32 skips the int8 attempt)", refused)
            report["int8_refused"] = str(refused)
    for name in graphs.values():
        shutil.copyfile(export / name, staging / name)
    return graphs, report


CUTS_TRIED = 3  # the cuts nearest the share asked for that are checked before the graphs ship whole


def split_for_workers(staging: Path, graphs: dict[str, str], float_decoder: Path, contexts: Path,
                      head_share: float) -> tuple[dict[str, str], dict[str, Any]]:
    """Move the first ``head_share`` of the decoder's work into the world model's worker: the staged decoder is cut
    where the float one's cut holds about that share (``decoder_split.ranked_cuts``; in an int8 graph after the cut
    tensor's quantization), and the world model and the head become one graph (``decoder_split.with_head``). A cut
    is kept only when it gives the whole graphs' frames on the shipped contexts (``decoder_split.SPLIT_TOLERANCE``);
    the next nearest is tried after it, up to ``CUTS_TRIED``, and then the graphs stay whole and the report says
    why. Returns (graphs, report)."""
    if head_share <= 0:
        return graphs, {"cut": None, "reason": "play.web_decoder_head_share is 0"}
    cuts = decoder_split.ranked_cuts(decoder_split.load_graph(float_decoder), head_share)[:CUTS_TRIED]
    if not cuts:
        return graphs, {"cut": None, "reason": "the decoder graph has no single-tensor cut"}
    suffix = graphs["decoder"].removeprefix("decoder")  # ".onnx" or ".int8.onnx"
    split = {"world_model": f"world_model_decoder_head{suffix}", "decoder": f"decoder_tail{suffix}"}
    world_model = decoder_split.load_graph(staging / graphs["world_model"])
    decoder = decoder_split.load_graph(staging / graphs["decoder"])
    feeds = context_feeds(contexts)
    try:
        whole = predicted_frames(staging, graphs, feeds)  # what every cut must reproduce
    except Exception as error:  # as below: ship the whole graphs rather than fail
        return graphs, {"cut": None, "reason": f"the whole graphs did not run on the shipped contexts: {error}"}
    reasons = []
    for float_cut, share in cuts:
        cut = decoder_split.quantized_tensor(decoder, float_cut)
        try:
            joined, tail = decoder_split.with_head(world_model, decoder, cut)
            (staging / split["world_model"]).write_bytes(joined.SerializeToString())
            (staging / split["decoder"]).write_bytes(tail.SerializeToString())
            difference = split_difference(whole, predicted_frames(staging, split, feeds))
        except Exception as error:  # an optimisation only: ship the whole graphs rather than fail
            reasons.append(f"splitting the decoder at {cut} failed: {error}")
            continue
        if difference <= decoder_split.SPLIT_TOLERANCE:
            for name in graphs.values():
                (staging / name).unlink()
            log.info("decoder split at %s: %.0f%% of its multiply-adds run in the world model's worker", cut,
                     100 * share)
            return split, {"cut": decoder_split.HEAD_PREFIX + cut, "head_share_of_decoder_flops": round(share, 3),
                           "max_abs_diff": difference}
        reasons.append(f"head then tail at {cut} differs from the decoder by {difference:g}")
    for name in split.values():
        (staging / name).unlink(missing_ok=True)
    return graphs, {"cut": None, "reason": "; ".join(reasons)}


def context_feeds(contexts: Path) -> dict[str, np.ndarray]:
    """The world model's inputs for one prediction from each shipped context (``contexts.npz``)."""
    with np.load(contexts) as data:
        return {"context_latents": data["context_latents"].astype(np.float32),
                "context_actions": data["context_actions"].astype(np.int64)}


def predicted_frames(folder: Path, graphs: dict[str, str], feeds: dict[str, np.ndarray]
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(next latent, frames) of the world model and decoder graphs ``graphs`` in ``folder``: whole graphs, or a
    world model with the decoder's head (its second output feeds the tail)."""
    world_model = load_session(folder / graphs["world_model"], threads=1)
    decoder = load_session(folder / graphs["decoder"], threads=1)
    outputs = world_model.run(None, feeds)
    frames = decoder.run(["frames"], {decoder.get_inputs()[0].name: outputs[-1]})[0]
    return outputs[0], frames


def split_difference(whole: tuple[np.ndarray, np.ndarray], split: tuple[np.ndarray, np.ndarray]) -> float:
    """Largest difference between the (next latent, frames) of the whole graphs and of the split ones."""
    return float(max(np.abs(whole[0] - split[0]).max(), np.abs(whole[1] - split[1]).max()))


def bundle_for_play(export: str | Path, out: str | Path, settings: PlayParams, fps: float | None = None,
                    precision: str | None = None) -> dict[str, Any]:
    """``build_bundle`` with the ``play`` section's settings; ``fps`` and ``precision`` (command-line values, None
    when not given) override ``play.fps`` and ``play.web_precision``."""
    return build_bundle(export, out, settings.fps if fps is None else fps,
                        precision=precision or settings.web_precision, min_psnr_db=settings.web_int8_min_psnr_db,
                        head_share=settings.web_decoder_head_share)


def build_bundle(export: str | Path, out: str | Path, fps: float, package: str | Path = ORT_PACKAGE,
                 precision: str = "int8", min_psnr_db: float = 30.0, head_share: float = 0.0) -> dict[str, Any]:
    """Write the bundle of ``export`` into ``out`` (replaced whole, atomically); returns its ``bundle.json``.

    ``precision`` int8 ships int8 copies of the graphs when they stay at ``min_psnr_db`` or more against the float
    graphs' frames, else (a warning, and the reason in ``bundle.json``) the float graphs; float32 ships the export's
    graphs. ``head_share`` > 0 moves about that share of the decoder into the world model's worker
    (``split_for_workers``). Graphs made from the same sources are reused from the bundle already in ``out``.
    Refuses an export that fails the contract check (``load_manifest``) or whose files differ from the manifest's
    sha256, an unknown precision and a missing onnxruntime-web."""
    if precision not in PRECISIONS:
        raise PipelineError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    export, out = Path(export), Path(out)
    manifest = load_manifest(export)
    corrupt = corrupt_files(export, manifest)
    if corrupt:
        raise ExportNotFoundError(f"{export}: {corrupt} differ from the sha256 in manifest.json; rebuild the export "
                                  "(`dvc repro onnx_export`) or pass --export with an intact one")
    ort_version, ort_files = ort_web_files(Path(package))
    sources = graph_sources(manifest, precision, min_psnr_db, head_share)
    with atomic_directory(out) as staging:
        for target, source in PAGE_FILES.items():
            shutil.copyfile(PAGE_DIR / source, staging / target)
        (staging / "ort").mkdir()
        for path in ort_files:
            shutil.copyfile(path, staging / "ort" / path.name)
        previous = reusable_graphs(out, sources)
        if previous is None:
            graphs, quantization = stage_precision(export, staging, manifest, precision, min_psnr_db)
            graphs, split = split_for_workers(staging, graphs, export / DECODER_FILE, export / CONTEXTS_FILE,
                                              head_share)
        else:  # about 30 s of quantization and checks saved on the default export
            log.info("%s: reusing its graphs (made from the same float graphs, contexts and settings)", out)
            graphs, quantization, split = previous["graphs"], previous["precision"], previous["decoder_split"]
            for name in graphs.values():
                shutil.copyfile(out / name, staging / name)
        contexts = write_contexts(export, staging / CONTEXTS_BIN)
        files = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file())
        bundle = {
            "format": BUNDLE_FORMAT,
            "sizes": {name: int(manifest[name]) for name in ("K", "C", "h", "w", "H", "W")},
            "actions": manifest["actions"],
            "keymap": KEY_BUTTONS,
            "fps": float(fps),
            "contexts": contexts,
            "graphs": graphs,
            "precision": quantization,
            "decoder_split": split,
            "sources": sources,
            "onnxruntime_web": ort_version,
            "export": {"params_hash": manifest["params_hash"], "sampling": manifest["sampling"],
                       "scenario": manifest["scenario"]},
            "files": {name: {"bytes": (staging / name).stat().st_size,
                             "sha256": file_sha256(staging / name)} for name in files},
        }
        (staging / BUNDLE_FILE).write_text(json.dumps(bundle, indent=1))
    log.info("wrote %s: %d files, %.1f MB, %s graphs, decoder split at %s (onnxruntime-web %s)", out, len(files) + 1,
             sum(f["bytes"] for f in bundle["files"].values()) / 1e6, quantization["precision"],
             split["cut"] or f"none ({split['reason']})", ort_version)
    return bundle


class BundleHandler(SimpleHTTPRequestHandler):
    """Static files with the right types for ES modules and WASM, and the cross-origin isolation headers."""

    extensions_map = {**SimpleHTTPRequestHandler.extensions_map, ".mjs": "text/javascript",
                      ".js": "text/javascript", ".wasm": "application/wasm", ".onnx": "application/octet-stream"}

    def __init__(self, *args: Any, isolated: bool = True, **kwargs: Any) -> None:
        self.isolated = isolated
        super().__init__(*args, **kwargs)

    def end_headers(self) -> None:
        if self.isolated:
            for name, value in ISOLATION_HEADERS.items():
                self.send_header(name, value)
        self.send_header("Cache-Control", "no-cache")
        super().end_headers()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        log.debug("%s " + format, self.address_string(), *args)


def serve_bundle(folder: str | Path, host: str, port: int, isolated: bool = True,
                 ready: threading.Event | None = None) -> None:
    """Serve ``folder`` until SIGTERM or SIGINT (whatever the process inherited), then stop and return."""
    folder = Path(folder)
    if not (folder / BUNDLE_FILE).is_file():
        raise PipelineError(f"{folder}: no {BUNDLE_FILE}; build it with `python -m components bundle`")
    handler = functools.partial(BundleHandler, directory=str(folder), isolated=isolated)
    asyncio.run(serve_until_signal(ThreadingHTTPServer((host, port), handler), folder, isolated, ready))


async def serve_until_signal(server: ThreadingHTTPServer, folder: Path, isolated: bool,
                             ready: threading.Event | None) -> None:
    """Run ``server`` in a thread until the first SIGTERM or SIGINT (the player server's ``stop_on_signals``)."""
    with server:
        server.daemon_threads = True
        stop = stop_on_signals()
        threading.Thread(target=server.serve_forever, name="bundle-server", daemon=True).start()
        host, port = server.server_address[:2]
        print(f"playing {folder} at http://{host!s}:{port}/ "
              f"({'cross-origin isolated: WASM threads' if isolated else 'not isolated: one WASM thread'}); "
              "Ctrl-C stops", flush=True)
        if ready is not None:
            ready.set()
        await stop
        server.shutdown()


__all__ = ["build_bundle", "bundle_for_play", "serve_bundle", "write_contexts", "ort_web_files"]
