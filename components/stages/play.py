"""``python -m components play`` (``make play``): play the learned game in a browser from the ONNX export.

Two engines (``--engine``, params ``play.engine``):

* ``server``: this process runs the model with ONNX Runtime and streams each frame to the page over a WebSocket
  (``components/play/server.py``);
* ``browser``: this process writes the static bundle (``components/play/web_bundle.py``) and only serves its files;
  the page runs the model with ONNX Runtime Web.

SIGTERM or SIGINT stops either cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from typing import TYPE_CHECKING

from components.errors import PipelineError
from components.params import load_params
from components.play.server import OnnxGame, PlayServer
from components.play.web_bundle import bundle_for_play, serve_bundle
from components.runtime.sessions import pipelined_threads

if TYPE_CHECKING:
    from components.params import PlayParams


log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--export", default=None, help="export folder (default: params play.export_dir)")
    parser.add_argument("--host", default=None, help="address to bind (default: params play.host, 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port (default: params play.port; 0 = any free)")
    parser.add_argument("--fps", type=float, default=None, help="frame rate cap (default: params play.fps)")
    parser.add_argument("--engine", choices=["server", "browser"], default=None,
                        help="server: this process runs the model and streams frames; browser: write the static "
                        "bundle (play.bundle_dir) and serve it, the page runs the model (default: params play.engine)")
    parser.add_argument("--precision", choices=["int8", "float32"], default=None, help="browser engine: int8 "
                        "or float32 graphs in the page (default: params play.web_precision)")
    parser.add_argument("--no-isolation", action="store_true", help="browser engine: serve without the "
                        "cross-origin isolation headers (the page then runs one WASM thread)")


def main(args: argparse.Namespace) -> None:
    settings = load_params(args.params).play
    export = args.export or settings.export_dir
    host = args.host or settings.host
    port = settings.port if args.port is None else args.port
    fps = settings.fps if args.fps is None else args.fps
    browser = (args.engine or settings.engine) == "browser"
    if browser:  # the browser engine: write the bundle (its own errors), then only serve its files
        bundle_for_play(export, settings.bundle_dir, settings, fps, args.precision)
    try:
        if browser:
            serve_bundle(settings.bundle_dir, host, port, isolated=not args.no_isolation)
        else:
            serve_frames(export, host, port, fps, settings)
    except OSError as error:
        raise PipelineError(f"cannot serve on {host}:{port}: {error}; try --port 0") from None


def serve_frames(export: str, host: str, port: int, fps: float, settings: PlayParams) -> None:
    """The server engine: run the model here and stream the frames until a signal."""

    # The pipelined loop runs two sessions at once: play.threads cores are split between them.
    game = OnnxGame(export, threads=pipelined_threads(settings.threads), balance=True)
    server = PlayServer(game, fps, settings.allowed_origins, settings.max_players, settings.max_messages_per_s)
    log.info("loaded %s: %d actions, K=%d, %d held-out contexts; decoder split: %s", game.folder,
             len(game.actions), game.K, game.num_contexts, game.split)
    asyncio.run(server.serve(host, port))
