"""Real-time play of the learned game in a browser, from the ONNX export alone (no torch, no game engine).

``gamengen play`` (or ``make play``) serves one page on 127.0.0.1 (``components/play_page/index.html``).
The page sends the keys held down over a WebSocket; the server maps them to an action id, runs
``world_model.onnx`` then ``decoder.onnx`` with ONNX Runtime, and pushes each new frame back as a binary
message. See README "Play".

Wire protocol (``/ws``):

* page -> server, JSON text: ``{"type": "keys", "keys": ["ArrowUp", "Space", ...]}`` (``KeyboardEvent.code``
  of every key held), ``{"type": "reset"}`` (restart from the next held-out context).
* server -> page, JSON text once on connect: ``{"type": "hello", "width", "height", "actions", "fps"}``.
* server -> page, binary per frame: a 16-byte little-endian header ``uint32 frame_index, uint16 width,
  uint16 height, float32 model_ms, uint16 action_id, uint16 context_index`` followed by ``height*width*3``
  RGB bytes.

Only numpy, onnxruntime and websockets are imported here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import struct
import time
from collections import deque
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from components.export_contract import (
    CONTEXTS_FILE,
    DECODER_FILE,
    ENCODER_FILE,
    WORLD_MODEL_FILE,
    ExportNotFoundError,
    load_manifest,
)

log = logging.getLogger(__name__)

PAGE_DIR = Path(__file__).resolve().parent / "play_page"
FRAME_HEADER = struct.Struct("<IHHfHH")

# KeyboardEvent.code -> the ViZDoom button it holds. Arrows turn, WASD moves and strafes.
KEY_BUTTONS: dict[str, str] = {
    "ArrowUp": "MOVE_FORWARD",
    "KeyW": "MOVE_FORWARD",
    "ArrowDown": "MOVE_BACKWARD",
    "KeyS": "MOVE_BACKWARD",
    "ArrowLeft": "TURN_LEFT",
    "ArrowRight": "TURN_RIGHT",
    "KeyA": "MOVE_LEFT",
    "KeyD": "MOVE_RIGHT",
    "Space": "ATTACK",
    "KeyE": "USE",
}


def action_for_buttons(held: Iterable[str], actions: list[dict[str, Any]]) -> int:
    """The action id whose buttons best match the buttons held.

    An action whose button set equals ``held`` wins; otherwise the action that presses the most held
    buttons and none that are not held; with nothing held (or nothing matching), the no-op action
    (empty buttons), else id 0.
    """
    held = set(held)
    best, best_overlap = None, 0
    for action in actions:
        buttons = set(action["buttons"])
        if buttons == held and held:
            return int(action["id"])
        if buttons and buttons <= held and len(buttons) > best_overlap:
            best, best_overlap = int(action["id"]), len(buttons)
    if best is not None:
        return best
    return next((int(a["id"]) for a in actions if not a["buttons"]), 0)


def action_for_keys(keys: Iterable[str], actions: list[dict[str, Any]]) -> int:
    """The action id for the keys held (``KeyboardEvent.code`` values); unknown keys are ignored."""
    return action_for_buttons({KEY_BUTTONS[k] for k in keys if k in KEY_BUTTONS}, actions)


def to_uint8_frames(frames: np.ndarray) -> np.ndarray:
    """Decoder output float [B, 3, H, W] in [0, 1] -> uint8 [B, H, W, 3]."""
    return (np.clip(frames, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8).transpose(0, 2, 3, 1)


class OnnxGame:
    """The learned game, run from an export folder with ONNX Runtime.

    Stateless apart from the loaded sessions; per-player state lives in ``GameState`` so several
    browser tabs can play at once.
    """

    def __init__(self, folder: str | Path, threads: int = 2) -> None:
        import onnxruntime as ort

        self.folder = Path(folder)
        self.manifest = load_manifest(self.folder)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        # No busy-waiting: on a CPU shared with the browser, spinning threads slow every frame down (measured
        # 5x with 2 threads on a loaded 2-core machine); when idle, it costs little.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")

        def session(name: str) -> Any:
            try:
                return ort.InferenceSession(str(self.folder / name), options, providers=["CPUExecutionProvider"])
            except Exception as error:  # onnxruntime raises its own exception types
                raise ExportNotFoundError(f"{self.folder / name}: ONNX Runtime cannot load it ({error})") from None

        self.world_model = session(WORLD_MODEL_FILE)
        self.decoder = session(DECODER_FILE)
        self._session = session
        self._encoder: Any = None
        with np.load(self.folder / CONTEXTS_FILE) as data:
            self.contexts = {name: data[name] for name in data.files}
        self.K = int(self.manifest["K"])
        self.actions: list[dict[str, Any]] = self.manifest["actions"]
        if len(self.contexts["context_latents"]) == 0:
            raise ExportNotFoundError(f"{self.folder / CONTEXTS_FILE}: holds no held-out contexts")

    @property
    def encoder(self) -> Any:
        if self._encoder is None:
            self._encoder = self._session(ENCODER_FILE)
        return self._encoder

    @property
    def num_contexts(self) -> int:
        return len(self.contexts["context_latents"])

    def predict(self, context_latents: np.ndarray, context_actions: np.ndarray) -> np.ndarray:
        """world_model.onnx: [B, K, C, h, w], [B, K] -> next latent [B, C, h, w]."""
        return self.world_model.run(
            ["next_latent"],
            {
                "context_latents": np.ascontiguousarray(context_latents, np.float32),
                "context_actions": np.ascontiguousarray(context_actions, np.int64),
            },
        )[0]

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """decoder.onnx, then uint8: [B, C, h, w] -> [B, H, W, 3]."""
        frames = self.decoder.run(["frames"], {"latents": np.ascontiguousarray(latents, np.float32)})[0]
        return to_uint8_frames(frames)

    def encode(self, frames: np.ndarray) -> np.ndarray:
        """encoder.onnx on uint8 frames [B, H, W, 3] -> latents [B, C, h, w]."""
        pixels = np.ascontiguousarray(frames.transpose(0, 3, 1, 2), np.float32) / 255.0
        return self.encoder.run(["latents"], {"frames": pixels})[0]

    def new_state(self, context_index: int = 0) -> "GameState":
        return GameState(self, context_index % self.num_contexts)


class GameState:
    """One player's rolling context: the last K latents and the K-1 actions before the current one."""

    def __init__(self, game: OnnxGame, context_index: int) -> None:
        self.game = game
        self.context_index = context_index
        latents = game.contexts["context_latents"][context_index]
        actions = game.contexts["context_actions"][context_index]
        self.latents: deque[np.ndarray] = deque(latents, maxlen=game.K)
        # The context's last action is the one being applied now: the player's replaces it.
        self.actions: deque[int] = deque((int(a) for a in actions[:-1]), maxlen=game.K - 1)
        self.frame = game.contexts["context_frames"][context_index][-1]
        self.frame_index = 0
        self.model_ms = 0.0

    def step(self, action: int) -> np.ndarray:
        """Apply ``action`` to the current frame; return the next frame, uint8 [H, W, 3]."""
        start = time.perf_counter()
        context_latents = np.stack(self.latents)[None]
        context_actions = np.array([[*self.actions, action]], np.int64)
        latent = self.game.predict(context_latents, context_actions)[0]
        self.frame = self.game.decode(latent[None])[0]
        self.latents.append(latent)
        self.actions.append(int(action))
        self.frame_index += 1
        self.model_ms = (time.perf_counter() - start) * 1000.0
        return self.frame

    def message(self, action: int) -> bytes:
        """The binary frame message of the wire protocol for the current frame."""
        height, width = self.frame.shape[:2]
        header = FRAME_HEADER.pack(self.frame_index, width, height, self.model_ms, action, self.context_index)
        return header + np.ascontiguousarray(self.frame).tobytes()


# --------------------------------------------------------------------------- server


def _http_response(status: int, body: bytes, content_type: str) -> Any:
    from websockets.datastructures import Headers
    from websockets.http11 import Response

    reasons = {200: "OK", 404: "Not Found"}
    headers = Headers(
        [("Content-Type", content_type), ("Content-Length", str(len(body))), ("Cache-Control", "no-store")]
    )
    return Response(status, reasons.get(status, "Error"), headers, body)


class PlayServer:
    """Serves the page over HTTP and the game over a WebSocket, on one port."""

    def __init__(self, game: OnnxGame, fps: float) -> None:
        self.game = game
        self.fps = fps
        self.page = (PAGE_DIR / "index.html").read_bytes()
        self.next_context = 0

    def process_request(self, connection: Any, request: Any) -> Any:
        path = request.path.split("?")[0]
        if path == "/ws":
            return None  # continue with the WebSocket handshake
        if path in ("/", "/index.html"):
            return _http_response(200, self.page, "text/html; charset=utf-8")
        if path == "/manifest.json":
            return _http_response(200, json.dumps(self.game.manifest).encode(), "application/json")
        return _http_response(404, b"not found", "text/plain")

    async def handler(self, websocket: Any) -> None:
        from websockets.exceptions import ConnectionClosed

        state = self.game.new_state(self.next_context)
        self.next_context += 1
        held: set[str] = set()
        tapped: set[str] = set()  # pressed since the last frame, so a quick tap still acts once
        await websocket.send(
            json.dumps(
                {
                    "type": "hello",
                    "width": int(self.game.manifest["W"]),
                    "height": int(self.game.manifest["H"]),
                    "actions": self.game.actions,
                    "fps": self.fps,
                    "contexts": self.game.num_contexts,
                }
            )
        )
        noop = action_for_buttons(set(), self.game.actions)
        await websocket.send(state.message(noop))

        async def receive() -> None:
            try:
                await read_messages()
            except ConnectionClosed:
                pass

        async def read_messages() -> None:
            nonlocal state
            async for raw in websocket:
                try:
                    message = json.loads(raw)
                except (json.JSONDecodeError, TypeError):
                    continue
                if message.get("type") == "keys":
                    keys = {str(k) for k in message.get("keys", [])}
                    tapped.update(keys - held)
                    held.clear()
                    held.update(keys)
                elif message.get("type") == "reset":
                    state = self.game.new_state(state.context_index + 1)
                    log.info("reset to held-out context %d", state.context_index)

        receiver = asyncio.create_task(receive())
        period = 1.0 / self.fps if self.fps > 0 else 0.0
        deadline = time.perf_counter()
        try:
            while not receiver.done():
                action = action_for_keys(held | tapped, self.game.actions)
                tapped.clear()
                current = state
                await asyncio.to_thread(current.step, action)
                await websocket.send(current.message(action))
                deadline = max(deadline + period, time.perf_counter() - period)
                await asyncio.sleep(max(0.0, deadline - time.perf_counter()))
        except ConnectionClosed:  # the tab went away: this player's game ends, the server goes on
            pass
        finally:
            receiver.cancel()

    async def serve(self, host: str, port: int, ready: asyncio.Event | None = None) -> None:
        from websockets.asyncio.server import serve

        async with serve(
            self.handler, host, port, process_request=self.process_request, compression=None, max_size=1 << 16
        ) as server:
            bound = server.sockets[0].getsockname()
            print(f"play: serving http://{bound[0]}:{bound[1]}/  (Ctrl+C to stop)", flush=True)
            if ready is not None:
                ready.set()
            await server.serve_forever()


# --------------------------------------------------------------------------- command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--export", default=None, help="export folder (default: params play.export_dir)")
    parser.add_argument("--host", default=None, help="address to bind (default: params play.host, 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port (default: params play.port; 0 = any free)")
    parser.add_argument("--fps", type=float, default=None, help="frame rate cap (default: params play.fps)")


def main(args: argparse.Namespace) -> None:
    from components.params import load_params

    settings = load_params(args.params).play
    game = OnnxGame(args.export or settings.export_dir, threads=settings.threads)
    server = PlayServer(game, settings.fps if args.fps is None else args.fps)
    log.info("loaded %s: %d actions, K=%d, %d held-out contexts", game.folder, len(game.actions), game.K,
             game.num_contexts)
    try:
        asyncio.run(server.serve(args.host or settings.host, settings.port if args.port is None else args.port))
    except OSError as error:
        from components.errors import PipelineError

        raise PipelineError(f"cannot serve on {args.host or settings.host}: {error}; try --port 0") from None
