"""The static bundle of the in-browser player (``python -m components bundle``): the game with no Python server.

``build_bundle(export, out)`` writes one folder that any static file server can serve::

    index.html, player.js,  the page (components/play/page/web.html, web_player.js, screen.js,
    screen.js,              session_worker.js): ONNX Runtime Web runs the world model and the decoder in it, each in
    session_worker.js       a Web Worker (WASM with SIMD; with threads when the page is cross-origin isolated, else
                            one thread per worker, and the page says so)
    ort/                    ort.wasm.min.mjs and ort-wasm-simd-threaded.{mjs,wasm}, copied from
                            node_modules/onnxruntime-web/dist of this repository (``make web`` = ``npm ci``; the version
                            pinned in package.json and package-lock.json)
    world_model.int8.onnx   the graphs the page runs: with precision int8 (params play.web_precision, the
    decoder.int8.onnx       default) int8 copies of the export's graphs (components/runtime/quantize.py), checked
                            against the float graphs' frames; with float32, or when the int8 copies fail that
                            check (a warning, and bundle.json says why), world_model.onnx and decoder.onnx, byte
                            copies of the export's (the encoder is not needed: the contexts ship as latents)
    contexts.bin            the export's held-out contexts, little-endian, one after the other: latents float32
                            [N, K, C, h, w], actions int32 [N, K], last real frame uint8 [N, H, W, 3]
    bundle.json             what the page reads first: sizes, actions, the keymap, the frame-rate cap, the layout
                            of contexts.bin, the graphs and their precision (with the int8 fidelity measured), and
                            the bytes and sha256 of every other file (the page checks them)

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
from typing import Any

import numpy as np

from components.atomic import atomic_directory, file_sha256
from components.errors import PipelineError
from components.play.server import KEY_BUTTONS, PAGE_DIR, stop_on_signals
from components.runtime.export_contract import (
    CONTEXTS_FILE,
    DECODER_FILE,
    WORLD_MODEL_FILE,
    ExportNotFoundError,
    corrupt_files,
    load_manifest,
)
from components.runtime.quantize import INT8_FILES, QUANTIZER, QuantizationError, quantize_graphs

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


def reusable_int8(out: Path, sources: dict[str, str], min_psnr_db: float) -> dict[str, Any] | None:
    """The int8 report of the bundle already in ``out`` when it quantized the same ``sources`` (the float graphs'
    and the contexts' sha256, and ``QUANTIZER``) against the same fidelity bar and its int8 files are intact; else
    None (quantize again)."""
    try:
        bundle = json.loads((out / BUNDLE_FILE).read_text())
        report = bundle["precision"]
        if report.get("sources") != sources or report["fidelity"]["min_psnr_db"] != min_psnr_db:
            return None
        if any(file_sha256(out / name) != bundle["files"][name]["sha256"] for name in INT8_FILES.values()):
            return None
        return dict(report)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def stage_int8(export: Path, out: Path, staging: Path, manifest: dict[str, Any],
               min_psnr_db: float) -> dict[str, Any]:
    """Put the int8 graphs into ``staging``: reused from the bundle already in ``out`` when it made them from the
    same inputs (``reusable_int8``), else made anew (``quantize_graphs``, which may raise ``QuantizationError``).
    Returns their report."""
    sources = {name: manifest["files"][name] for name in (WORLD_MODEL_FILE, DECODER_FILE, CONTEXTS_FILE)}
    sources["quantizer"] = QUANTIZER
    report = reusable_int8(out, sources, min_psnr_db)
    if report is None:
        return {**quantize_graphs(export, staging, min_psnr_db), "sources": sources}
    log.info("%s: reusing its int8 graphs (same float graphs, contexts, quantizer and fidelity bar)", out)
    for name in INT8_FILES.values():  # about 30 s saved on the default export
        shutil.copyfile(out / name, staging / name)
    return report


def build_bundle(export: str | Path, out: str | Path, fps: float, package: str | Path = ORT_PACKAGE,
                 precision: str = "int8", min_psnr_db: float = 30.0) -> dict[str, Any]:
    """Write the bundle of ``export`` into ``out`` (replaced whole, atomically); returns its ``bundle.json``.

    ``precision`` int8 ships int8 copies of the graphs when they stay at ``min_psnr_db`` or more against the float
    graphs' frames, else (a warning, and the reason in ``bundle.json``) the float graphs; float32 ships the export's
    graphs. Refuses an export that fails the contract check (``load_manifest``) or whose files differ from the
    manifest's sha256, an unknown precision and a missing onnxruntime-web."""
    if precision not in PRECISIONS:
        raise PipelineError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    export, out = Path(export), Path(out)
    manifest = load_manifest(export)
    corrupt = corrupt_files(export, manifest)
    if corrupt:
        raise ExportNotFoundError(f"{export}: {corrupt} differ from the sha256 in manifest.json; rebuild the export "
                                  "(`dvc repro onnx_export`) or pass --export with an intact one")
    ort_version, ort_files = ort_web_files(Path(package))
    with atomic_directory(out) as staging:
        for target, source in PAGE_FILES.items():
            shutil.copyfile(PAGE_DIR / source, staging / target)
        (staging / "ort").mkdir()
        for path in ort_files:
            shutil.copyfile(path, staging / "ort" / path.name)
        graphs = {"world_model": WORLD_MODEL_FILE, "decoder": DECODER_FILE}
        verified: dict[str, str] = {}
        quantization: dict[str, Any] = {"precision": "float32"}
        if precision == "int8":
            try:
                quantization = stage_int8(export, out, staging, manifest, min_psnr_db)
                graphs = {role: INT8_FILES[name] for role, name in graphs.items()}
            except QuantizationError as refused:
                log.warning("%s; the bundle ships the float32 graphs (play.web_precision: float32 or --precision "
                            "float32 skips the int8 attempt)", refused)
                quantization["int8_refused"] = str(refused)
        if quantization["precision"] == "float32":
            verified = {name: manifest["files"][name] for name in graphs.values()}  # checked above
            for name in verified:
                shutil.copyfile(export / name, staging / name)
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
            "onnxruntime_web": ort_version,
            "export": {"params_hash": manifest["params_hash"], "sampling": manifest["sampling"],
                       "scenario": manifest["scenario"]},
            "files": {name: {"bytes": (staging / name).stat().st_size,
                             "sha256": verified.get(name) or file_sha256(staging / name)} for name in files},
        }
        (staging / BUNDLE_FILE).write_text(json.dumps(bundle, indent=1))
    log.info("wrote %s: %d files, %.1f MB, %s graphs (onnxruntime-web %s)", out, len(files) + 1,
             sum(f["bytes"] for f in bundle["files"].values()) / 1e6, precision, ort_version)
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


__all__ = ["build_bundle", "serve_bundle", "write_contexts", "ort_web_files"]
