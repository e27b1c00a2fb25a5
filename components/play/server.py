"""Real-time play of the learned game in a browser, from the ONNX export alone (no torch, no game engine).

``gamengen play`` (or ``make play``) serves one page on 127.0.0.1 (``components/play/page/index.html``).
The page sends the keys held down over a WebSocket; the server maps them to an action id, runs
``world_model.onnx`` and ``decoder.onnx`` with ONNX Runtime, and pushes each new frame back as a binary
message. See README "Play".

The server plays pipelined (``GameState.advance``): while frame t is decoded on one core, the world model
predicts frame t+1 on the other, from the action read when that prediction starts, and each frame is sent as
soon as it is decoded. A frame costs max(world model, decoder) instead of their sum. Its latency (action read
to frame sent) stays world model + decoder under a frame-rate cap, and is up to one frame longer when the
server runs as fast as it can (``--fps 0``). Sequential ``GameState.step`` gives the same frames.

Wire protocol (``/ws``):

* page -> server, JSON text: ``{"type": "keys", "keys": ["ArrowUp", "Space", ...]}`` (``KeyboardEvent.code``
  of every key held), ``{"type": "reset"}`` (restart from the next held-out context).
* server -> page, JSON text once on connect: ``{"type": "hello", "width", "height", "actions", "fps"}``.
* server -> page, binary per frame: a 16-byte little-endian header ``uint32 frame_index, uint16 width,
  uint16 height, float32 model_ms, uint16 action_id, uint16 context_index`` followed by ``height*width*3``
  RGB bytes. ``action_id`` is the action that led to this frame (the first frame of a context: no-op);
  ``model_ms`` the time from reading that action to the end of the frame's decode.

Only numpy, onnxruntime and websockets are imported here (and onnx, if installed, to split the decoder:
``components/runtime/decoder_split.py``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import struct
import time
from collections import deque
from collections.abc import Iterable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from websockets.asyncio.server import serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Response

from components.runtime.sessions import OnnxExport, OnnxModels

log = logging.getLogger(__name__)

PAGE_DIR = Path(__file__).resolve().parent / "page"
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


class OnnxGame(OnnxExport):
    """The learned game: an export run with ONNX Runtime (``components.runtime.sessions``), and its players.

    Stateless apart from the loaded sessions; per-player state lives in ``GameState`` so several
    browser tabs can play at once. ``threads`` is the intra-op thread count of each session.
    """

    def new_state(self, context_index: int = 0) -> GameState:
        """A player starting from held-out context ``context_index`` (modulo the number shipped)."""
        index = context_index % self.num_contexts
        return GameState(
            self,
            self.contexts["context_latents"][index],
            self.contexts["context_actions"][index],
            self.contexts["context_frames"][index][-1],
            index,
        )



class Prediction(NamedTuple):
    """A latent predicted by the world model, not decoded yet."""

    latent: np.ndarray  # [C, h, w]
    action: int  # the action it was predicted from
    started: float  # time.perf_counter() when that action was read and the prediction started


class Frame(NamedTuple):
    """A frame shown to the player, with what the wire protocol's header says about it."""

    pixels: np.ndarray  # uint8 [H, W, 3]
    number: int  # frames generated since the context (its last real frame is 0)
    action: int  # the action that led to it
    model_ms: float  # from reading that action to the end of the decode: the frame's latency
    context_index: int


def frame_message(frame: Frame) -> bytes:
    """The binary frame message of the wire protocol (module docstring)."""
    height, width = frame.pixels.shape[:2]
    header = FRAME_HEADER.pack(frame.number, width, height, frame.model_ms, frame.action, frame.context_index)
    return header + np.ascontiguousarray(frame.pixels).tobytes()


class GameState:
    """One player's rolling context: the last K latents and the K-1 actions before the current one.

    Two ways to play, giving the same frames for the same actions:

    * ``step(action)``: sequential. Predict the next latent from ``action``, decode it, return the frame
      (uint8 [H, W, 3]). Time per frame: world model + decoder.
    * ``advance(action)``: pipelined. Predict from ``action`` on this thread while the previous call's latent
      decodes on ``models.decode_pool``; queue the new latent's decode, wait for the previous frame, and return
      the new frame's future (a ``Frame``). Time per frame: max(world model, decoder) on two cores, or
      max(world model + decoder head, decoder tail) with a split decoder (``OnnxModels``). A frame's
      latency (``Frame.model_ms``) is world model + decoder when the caller waits between calls (a frame-rate
      cap), and up to two frame times when it does not: one frame more than ``step``. ``finish()`` waits for
      the last decode.

    ``frame``, ``frame_index``, ``frame_action`` and ``model_ms`` describe the last frame decoded (``current``).
    """

    def __init__(self, models: OnnxModels, latents: np.ndarray, actions: np.ndarray, frame: np.ndarray,
                 context_index: int = 0) -> None:
        K = len(latents)
        if len(actions) != K or K < 1:
            raise ValueError(f"need K >= 1 context latents and K actions, got {len(latents)} and {len(actions)}")
        self.models = models
        self.context_index = context_index
        self.latents: deque[np.ndarray] = deque(np.asarray(latents, np.float32), maxlen=K)
        # The context's last action is the one being applied now: the player's replaces it.
        self.actions: deque[int] = deque((int(a) for a in actions[:-1]), maxlen=K - 1)
        self.frame = frame
        self.frame_action = int(actions[-2]) if K > 1 else 0  # the recorded action that led to the frame shown
        self.frame_index = 0
        self.model_ms = 0.0
        self._decoding: Future[Frame] | None = None  # the decode started by the last advance()

    @property
    def current(self) -> Frame:
        return Frame(self.frame, self.frame_index, self.frame_action, self.model_ms, self.context_index)

    def predict(self, action: int) -> Prediction:
        """Predict the latent that ``action`` leads to and push it (and the action) into the context."""
        started = time.perf_counter()
        context_latents = np.stack(self.latents)[None]
        context_actions = np.array([[*self.actions, action]], np.int64)
        latent = self.models.predict(context_latents, context_actions)[0]
        self.latents.append(latent)
        self.actions.append(int(action))
        return Prediction(latent, int(action), started)

    def show(self, prediction: Prediction, hidden: np.ndarray | None = None) -> Frame:
        """Decode ``prediction`` (from ``hidden``, the decoder head's output, if given); it becomes the
        current frame."""
        if hidden is None:
            hidden = self.models.decode_head(prediction.latent[None])
        pixels = self.models.decode_tail(hidden)[0]
        self.frame, self.frame_action = pixels, prediction.action
        self.frame_index += 1
        self.model_ms = (time.perf_counter() - prediction.started) * 1000.0
        return self.current

    def step(self, action: int) -> np.ndarray:
        """Apply ``action`` to the current frame; return the next frame, uint8 [H, W, 3]."""
        self.finish()
        return self.show(self.predict(action)).pixels

    def advance(self, action: int) -> Future[Frame]:
        """Pipelined step: predict from ``action`` (read now) while the previous frame decodes; queue this
        prediction's decode and return its future once the previous frame is done. Frames complete in call
        order (one decode thread), and a player is never more than one prediction ahead of its frames."""
        previous = self._decoding
        try:
            prediction = self.predict(action)
            hidden = self.models.decode_head(prediction.latent[None])  # this core, if the decoder is split
            # Queued behind the previous decode, so the decode thread goes on without waiting for this one.
            self._decoding = self.models.decode_pool.submit(self.show, prediction, hidden)
        finally:
            if previous is not None:
                previous.result()
        return self._decoding

    def finish(self) -> Frame | None:
        """Wait for the decode that the last ``advance`` started, if any; return its frame."""
        decoding, self._decoding = self._decoding, None
        return decoding.result() if decoding is not None else None

    def message(self) -> bytes:
        """The binary frame message of the wire protocol for the current frame."""
        return frame_message(self.current)


# --------------------------------------------------------------------------- server


def _http_response(status: int, body: bytes, content_type: str) -> Any:
    reasons = {200: "OK", 403: "Forbidden", 404: "Not Found", 503: "Service Unavailable"}
    headers = Headers(
        [("Content-Type", content_type), ("Content-Length", str(len(body))), ("Cache-Control", "no-store")]
    )
    return Response(status, reasons.get(status, "Error"), headers, body)


# Bounds on one tab's messages: a key list longer than this, or key names longer than this, are ignored.
MAX_KEYS = 32
MAX_KEY_LENGTH = 32


class MessageRate:
    """Messages of one connection over the last second: ``allow()`` is False once more than ``per_s`` arrived."""

    def __init__(self, per_s: float) -> None:
        self.per_s = per_s
        self.times: deque[float] = deque()

    def allow(self, now: float) -> bool:
        self.times.append(now)
        while self.times and self.times[0] < now - 1.0:
            self.times.popleft()
        return len(self.times) <= self.per_s


def origin_allowed(origin: str | None, host: str | None, extra: Iterable[str] = ()) -> bool:
    """A browser's WebSocket ``Origin`` must be the page's own (``http(s)://<Host header>``) or listed in
    ``extra``; a client that sends no Origin (not a browser page) is not a cross-site page and is let in."""
    if origin is None:
        return True
    own = {f"http://{host}", f"https://{host}"} if host else set()
    return origin in own or origin in set(extra)


class PlayServer:
    """Serves the page over HTTP and the game over a WebSocket, on one port.

    Each tab is bounded: its Origin must be this server's (or ``allowed_origins``), at most ``max_players`` tabs
    play at once, a message is at most 64 KiB and a key list at most ``MAX_KEYS`` names, and a tab sending more
    than ``max_messages_per_s`` messages in a second is closed (1008). Whatever one tab does, the others play on.
    """

    def __init__(self, game: OnnxGame, fps: float, allowed_origins: Iterable[str] = (), max_players: int = 4,
                 max_messages_per_s: float = 200.0) -> None:
        self.game = game
        self.fps = fps
        self.page = (PAGE_DIR / "index.html").read_bytes()
        self.screen_js = (PAGE_DIR / "screen.js").read_bytes()  # the canvas and FPS counter both pages share
        self.next_context = 0
        self.allowed_origins = tuple(allowed_origins)
        self.max_players = max_players
        self.max_messages_per_s = max_messages_per_s
        self.players = 0

    def process_request(self, connection: Any, request: Any) -> Any:
        path = request.path.split("?")[0]
        if path == "/ws":
            origin = request.headers.get("Origin")
            if not origin_allowed(origin, request.headers.get("Host"), self.allowed_origins):
                log.warning("refused a WebSocket from origin %s (play.allowed_origins lets others in)", origin)
                return _http_response(403, b"origin not allowed", "text/plain")
            if self.players >= self.max_players:
                return _http_response(503, f"{self.max_players} players already (play.max_players)".encode(),
                                      "text/plain")
            return None  # continue with the WebSocket handshake
        if path in ("/", "/index.html"):
            return _http_response(200, self.page, "text/html; charset=utf-8")
        if path == "/screen.js":
            return _http_response(200, self.screen_js, "text/javascript; charset=utf-8")
        if path == "/manifest.json":
            return _http_response(200, json.dumps(self.game.manifest).encode(), "application/json")
        return _http_response(404, b"not found", "text/plain")

    async def handler(self, websocket: Any) -> None:
        self.players += 1
        try:
            await self.play(websocket)
        finally:
            self.players -= 1

    async def play(self, websocket: Any) -> None:
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
        await websocket.send(frame_message(state.current._replace(action=noop)))

        async def receive() -> None:
            try:
                await read_messages()
            except ConnectionClosed:
                pass

        async def read_messages() -> None:
            nonlocal state
            rate = MessageRate(self.max_messages_per_s)
            async for raw in websocket:
                if not rate.allow(time.monotonic()):
                    log.warning("a tab sent more than %g messages in a second; closing it", self.max_messages_per_s)
                    await websocket.close(1008, "too many messages")
                    return
                try:
                    message = json.loads(raw)
                except (json.JSONDecodeError, TypeError):
                    continue
                if not isinstance(message, dict):
                    continue
                if message.get("type") == "keys":
                    names = message.get("keys", [])
                    if not isinstance(names, list) or len(names) > MAX_KEYS:
                        continue
                    keys = {str(k)[:MAX_KEY_LENGTH] for k in names}
                    tapped.update(keys - held)
                    held.clear()
                    held.update(keys)
                elif message.get("type") == "reset":
                    state = self.game.new_state(state.context_index + 1)
                    log.info("reset to held-out context %d", state.context_index)

        receiver = asyncio.create_task(receive())
        period = 1.0 / self.fps if self.fps > 0 else 0.0
        deadline = time.perf_counter()
        sending: asyncio.Task[None] | None = None

        async def send_when_decoded(decoding: Future[Frame]) -> None:
            await websocket.send(frame_message(await asyncio.wrap_future(decoding)))

        try:
            while not receiver.done():
                # Pipelined (GameState.advance): the action read now starts the prediction of the next frame
                # while the previous frame is decoded and sent; each frame is sent as soon as it is decoded.
                action = action_for_keys(held | tapped, self.game.actions)
                tapped.clear()
                decoding = await asyncio.to_thread(state.advance, action)
                if sending is not None:
                    await sending  # frames go out in order; raises ConnectionClosed if the tab went away
                sending = asyncio.create_task(send_when_decoded(decoding))
                sending.add_done_callback(lambda task: task.cancelled() or task.exception())  # seen, not logged
                deadline = max(deadline + period, time.perf_counter() - period)
                await asyncio.sleep(max(0.0, deadline - time.perf_counter()))
        except ConnectionClosed:  # the tab went away: this player's game ends, the server goes on
            pass
        finally:
            receiver.cancel()
            if sending is not None:
                sending.cancel()

    async def serve(self, host: str, port: int, ready: asyncio.Event | None = None) -> None:
        async with serve(
            self.handler, host, port, process_request=self.process_request, compression=None, max_size=1 << 16
        ) as server:
            bound = server.sockets[0].getsockname()
            print(f"play: serving http://{bound[0]}:{bound[1]}/  (Ctrl+C to stop)", flush=True)
            stop = stop_on_signals()
            if ready is not None:
                ready.set()
            received = await stop
            print(f"play: {signal.Signals(received).name} received, closing the connections and stopping", flush=True)


def stop_on_signals(signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> asyncio.Future[int]:
    """A future of the running loop that resolves to the first of ``signals`` received. The handlers replace
    whatever the process inherited, SIG_IGN included (a server started from a shell or a test that ignores
    SIGTERM must still stop when told)."""
    loop = asyncio.get_running_loop()
    stop: asyncio.Future[int] = loop.create_future()

    def received(number: int) -> None:
        if not stop.done():
            stop.set_result(number)

    for number in signals:
        loop.add_signal_handler(number, received, number)
    return stop
