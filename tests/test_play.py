"""The browser player (components/play/server.py) and the rollout video, on a real tiny export.

The browser test drives Debian's headless Chromium through Playwright (never ``playwright install``).
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components.play.server import FRAME_HEADER, OnnxGame, action_for_keys, frame_message, origin_allowed
from tests.fixtures.browser import chromium_page
from tests.fixtures.processes import REPO_ROOT, components_cli, pipeline_env, stop_process, wait_for_url

ACTIONS = [
    {"id": 0, "name": "noop", "buttons": []},
    {"id": 1, "name": "forward", "buttons": ["MOVE_FORWARD"]},
    {"id": 2, "name": "turn_left", "buttons": ["TURN_LEFT"]},
    {"id": 3, "name": "forward_turn_left", "buttons": ["MOVE_FORWARD", "TURN_LEFT"]},
    {"id": 4, "name": "attack", "buttons": ["ATTACK"]},
    {"id": 5, "name": "use", "buttons": ["USE"]},
]


@pytest.fixture(scope="module")
def export(tiny_export: Path) -> Path:
    return tiny_export / "data" / "onnx_export"


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ([], "noop"),
        (["ArrowUp"], "forward"),
        (["KeyW"], "forward"),
        (["ArrowLeft"], "turn_left"),
        (["ArrowUp", "ArrowLeft"], "forward_turn_left"),
        (["Space"], "attack"),
        (["KeyE"], "use"),
        (["KeyQ"], "noop"),  # unknown keys are ignored
        (["ArrowDown"], "noop"),  # no action presses MOVE_BACKWARD here
        (["ArrowDown", "ArrowLeft"], "turn_left"),  # the best match that presses nothing extra
    ],
)
def test_keys_map_to_actions_through_their_buttons(keys: list[str], expected: str) -> None:
    assert ACTIONS[action_for_keys(keys, ACTIONS)]["name"] == expected


def test_player_runs_without_torch(export: Path) -> None:
    """The player imports onnxruntime and numpy only, and its frames change from step to step."""
    code = (
        "import sys, numpy as np\n"
        "from components.play.server import OnnxGame\n"
        f"game = OnnxGame({str(export)!r}, threads=1, balance=True)\n"
        "state = game.new_state(0)\n"
        "frames = [state.frame] + [state.step(a) for a in (1, 1, 3, 9)]\n"
        "H, W = game.manifest['H'], game.manifest['W']\n"
        "assert all(f.shape == (H, W, 3) and f.dtype == np.uint8 for f in frames)\n"
        "assert all((a != b).any() for a, b in zip(frames, frames[1:]))\n"
        "assert len(state.latents) == game.K and state.frame_index == 4\n"
        "piped = game.new_state(0)\n"
        "last = [piped.advance(a) for a in (1, 1, 3, 9)][-1].result()\n"
        "assert (last.pixels == state.frame).all() and last.number == 4\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'vizdoom'))\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=pipeline_env(), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


ROLLOUT_ACTIONS = [1, 1, 3, 9, 0, 4, 6, 2, 10, 5]


def test_pipelined_play_gives_the_sequential_frames(export: Path) -> None:
    """advance() (decode frame t while predicting t+1, on two threads) gives exactly the frames of step()."""
    game = OnnxGame(export, threads=1)
    try:
        sequential, pipelined = game.new_state(0), game.new_state(0)
        expected = [sequential.step(a) for a in ROLLOUT_ACTIONS]
        decodings = [pipelined.advance(a) for a in ROLLOUT_ACTIONS]
        frames = [decoding.result() for decoding in decodings]
        assert pipelined.finish() is frames[-1] and pipelined.finish() is None
    finally:
        game.close()
    assert all((a != b).any() for a, b in itertools.pairwise(expected)), "frames must change, or this proves nothing"
    for index, (want, got) in enumerate(zip(expected, frames, strict=True)):
        np.testing.assert_array_equal(got.pixels, want, err_msg=f"frame {index + 1}")
        assert got.number == index + 1 and got.context_index == 0 and got.model_ms > 0
    np.testing.assert_array_equal(np.stack(pipelined.latents), np.stack(sequential.latents))
    assert list(pipelined.actions) == list(sequential.actions)
    assert pipelined.frame_index == sequential.frame_index == len(ROLLOUT_ACTIONS)
    np.testing.assert_array_equal(pipelined.frame, sequential.frame)


def test_pipelined_prediction_uses_the_action_read_when_it_starts(export: Path) -> None:
    """advance(a) predicts from a and the context before the call, before it returns; the frame it leads to
    is labelled with a, in the frame and in the wire header."""
    game = OnnxGame(export, threads=1)
    try:
        state = game.new_state(1)
        context, previous = list(state.latents), list(state.actions)
        for n, action in enumerate(ROLLOUT_ACTIONS):
            decoding = state.advance(action)
            # What the world model gives for the context before this call and the action passed to it.
            latent = game.predict(np.stack(context)[None], np.array([[*previous, action]], np.int64))[0]
            np.testing.assert_array_equal(state.latents[-1], latent)
            assert state.actions[-1] == action
            frame = decoding.result()
            np.testing.assert_array_equal(frame.pixels, game.decode(latent[None])[0])
            assert frame.action == action and frame.number == n + 1
            header = FRAME_HEADER.unpack(frame_message(frame)[: FRAME_HEADER.size])
            assert (header[0], header[4], header[5]) == (n + 1, action, 1)
            context, previous = [*context[1:], latent], [*previous, action][1:]
    finally:
        game.close()


def test_split_decoder_plays_the_same_game(export: Path) -> None:
    """A decoder split into head (on the world model's thread) and tail gives the whole decoder's frames."""
    whole, split = OnnxGame(export, threads=1), OnnxGame(export, threads=1)
    try:
        info = split.split_decoder(export / "decoder.onnx", 0.3)
        assert info["cut"] and 0 < info["head_share_of_decoder_flops"] <= 0.5, info
        assert split.decoder_head is not None and info["max_abs_diff"] <= 1e-4
        reference, sequential, pipelined = whole.new_state(0), split.new_state(0), split.new_state(0)
        expected = [reference.step(a) for a in ROLLOUT_ACTIONS]
        stepped = [sequential.step(a) for a in ROLLOUT_ACTIONS]
        advanced = [decoding.result().pixels for decoding in [pipelined.advance(a) for a in ROLLOUT_ACTIONS]]
    finally:
        whole.close()
        split.close()
    for want, got, piped in zip(expected, stepped, advanced, strict=True):
        np.testing.assert_array_equal(piped, got)  # one split decoder: the same bits either way
        assert np.abs(got.astype(np.int16) - want).max() <= 1  # float rounding may move a pixel by one level
    # The decoder never feeds back: the world model's latents are exactly those of the whole-decoder game.
    np.testing.assert_array_equal(np.stack(pipelined.latents), np.stack(reference.latents))


@pytest.mark.parametrize("kind", ["missing", "empty"])
def test_clear_error_without_an_export(tmp_path: Path, kind: str) -> None:
    folder = tmp_path / "export"
    if kind == "empty":
        folder.mkdir()
    result = components_cli("play", "--export", str(folder), "--port", "0", timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "dvc repro onnx_export" in result.stderr and str(folder) in result.stderr


def test_rollout_video(export: Path, tmp_path: Path) -> None:
    out = tmp_path / "rollout.gif"
    result = components_cli("rollout_video", "--export", str(export), "--context", "1", "--scale", "2",
                            "--out", str(out), timeout=120)
    assert result.returncode == 0, result.stderr
    assert "pooled PSNR" in result.stdout
    import json

    manifest = json.loads((export / "manifest.json").read_text())
    with Image.open(out) as gif:
        assert gif.n_frames == manifest["K"] + manifest["contexts"]["future_steps"]
        assert gif.width == 2 * (2 * manifest["W"] + 2)
        gif.seek(gif.n_frames - 1)
        last = np.array(gif.convert("RGB"))
    assert last.std() > 0
    bad = components_cli("rollout_video", "--export", str(export), "--context", "99", "--out", str(out), timeout=120)
    assert bad.returncode == 2 and "--context" in bad.stderr


# --------------------------------------------------------------------------- the browser


def start_server(export: Path, ignore_sigterm: bool = False,
                 params: Path = REPO_ROOT / "params.yaml") -> tuple[subprocess.Popen[str], str]:
    """``python -m components play`` on a free port (its own process group): the process and its URL.
    ``ignore_sigterm`` starts it with SIGTERM ignored, as a shell or a parent process can leave it."""

    def inherit_ignored_sigterm() -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

    process = subprocess.Popen(
        [sys.executable, "-m", "components", "--params", str(params), "play", "--export", str(export), "--port", "0",
         "--fps", "30"],
        cwd=REPO_ROOT, env=pipeline_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True, preexec_fn=inherit_ignored_sigterm if ignore_sigterm else None,
    )
    url = wait_for_url(process, r"serving (http://127\.0\.0\.1:\d+/)", "the player server")
    return process, url


@pytest.fixture()
def server(export: Path) -> Iterator[str]:
    process, url = start_server(export)
    try:
        yield url
    finally:
        stop_process(process, "the player server")


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_server_stops_cleanly_on_a_signal_even_if_it_inherited_sigterm_ignored(export: Path, stop: int) -> None:
    process, url = start_server(export, ignore_sigterm=True)
    try:
        with urllib.request.urlopen(url + "manifest.json", timeout=10) as response:  # it serves before the signal
            assert response.status == 200
        os.kill(process.pid, stop)
        started = time.monotonic()
        output, _ = process.communicate(timeout=10)
        stopped_after = time.monotonic() - started
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
    assert process.returncode == 0, output
    assert stopped_after < 2.0, f"stopped {stopped_after:.1f} s after the signal (issue 16: within 2 s)"
    assert f"{signal.Signals(stop).name} received" in output
    assert "Traceback" not in output


def test_the_stopping_fixture_kills_a_server_that_ignores_sigterm_and_reports_it() -> None:
    process = subprocess.Popen(
        [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
         "print('serving, deaf to SIGTERM', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    assert process.stdout.readline().startswith("serving")
    with pytest.raises(pytest.fail.Exception, match=r"(?s)a deaf server did not stop within 1 s.*killed"):
        stop_process(process, "a deaf server", timeout=1.0)
    assert process.returncode == -signal.SIGKILL


def test_origin_rule() -> None:
    assert origin_allowed("http://127.0.0.1:8765", "127.0.0.1:8765")
    assert not origin_allowed("http://evil.example", "127.0.0.1:8765")
    assert origin_allowed("https://game.example", "127.0.0.1:8765", ["https://game.example"])
    assert origin_allowed(None, "127.0.0.1:8765")  # not a browser page


def frames_after(connection, count: int, timeout: float = 30.0) -> int:
    """Receive until ``count`` binary frames came (a dead game raises); returns how many arrived."""
    received, deadline = 0, time.monotonic() + timeout
    while received < count and time.monotonic() < deadline:
        if isinstance(connection.recv(timeout=deadline - time.monotonic()), bytes):
            received += 1
    return received


def closed_with(connection, timeout: float = 30.0) -> int | None:
    """Read until the server closes ``connection``: its close code."""
    from websockets.exceptions import ConnectionClosed

    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            connection.recv(timeout=deadline - time.monotonic())
    except ConnectionClosed as closed:
        return closed.rcvd.code if closed.rcvd else None
    return None


def connect_when_a_slot_is_free(endpoint: str, origin: str, timeout: float = 60.0):
    """A WebSocket to the player, retried while the server answers 503 (all play.max_players slots busy: a tab that
    just closed frees its slot when its game loop ends, which on a loaded machine takes a moment)."""
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    deadline = time.monotonic() + timeout
    while True:
        try:
            return connect(endpoint, origin=origin, open_timeout=20)
        except InvalidStatus as refused:
            if refused.response.status_code != 503 or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_the_server_refuses_other_origins_bounds_each_tab_and_keeps_the_others_playing(export: Path) -> None:
    from websockets.exceptions import ConnectionClosed, InvalidStatus
    from websockets.sync.client import connect

    process, url = start_server(export)
    endpoint, own = url.replace("http://", "ws://") + "ws", url.rstrip("/")
    try:
        with pytest.raises(InvalidStatus) as refused:
            connect(endpoint, origin="http://evil.example", open_timeout=20)
        assert refused.value.response.status_code == 403
        with connect(endpoint, origin=own, open_timeout=20) as good:
            assert json.loads(good.recv(timeout=20))["type"] == "hello"
            assert frames_after(good, 3) == 3
            with connect(endpoint, origin=own, open_timeout=20) as big:  # a 128 KiB message: that tab is closed
                big.recv(timeout=20)
                big.send("x" * (1 << 17))
                assert closed_with(big) == 1009
            with connect(endpoint, origin=own, open_timeout=20) as flood:  # 2000 messages at once: closed too
                flood.recv(timeout=20)
                try:
                    for _ in range(2000):
                        flood.send('{"type": "keys", "keys": ["ArrowLeft"]}')
                except ConnectionClosed:
                    pass
                assert closed_with(flood) == 1008
            good.send(json.dumps({"type": "keys", "keys": ["x"] * 1000}))  # too many keys: ignored
            good.send(json.dumps({"type": "keys", "keys": ["x" * 1000] * 20}))  # long names: cut short
            # more frames than the client buffers (16): this tab played on through all of it
            assert frames_after(good, 20) == 20

            with ExitStack() as others:  # with `good`, play.max_players (4) tabs
                for _ in range(3):  # the closed tabs' slots come back once their game loops end
                    others.enter_context(connect_when_a_slot_is_free(endpoint, own))
                with pytest.raises(InvalidStatus) as full:
                    connect(endpoint, origin=own, open_timeout=20)
                assert full.value.response.status_code == 503
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=10)


def resident_kib(pid: int) -> int:
    """The resident memory of process ``pid`` in KiB (``VmRSS``)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))


def test_ten_tabs_all_play_and_the_server_memory_stays_bounded(export: Path, tmp_path: Path) -> None:
    import yaml
    from websockets.sync.client import connect

    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["play"]["max_players"] = 10
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    process, url = start_server(export, params=tmp_path / "params.yaml")
    endpoint, own = url.replace("http://", "ws://") + "ws", url.rstrip("/")
    try:
        with ExitStack() as tabs:
            connections = [tabs.enter_context(connect(endpoint, origin=own, open_timeout=30)) for _ in range(10)]
            assert all(json.loads(c.recv(timeout=30))["type"] == "hello" for c in connections)
            for index, connection in enumerate(connections):
                connection.send(json.dumps({"type": "keys", "keys": ["ArrowLeft" if index % 2 else "ArrowUp"]}))
            assert [frames_after(c, 5, timeout=60) for c in connections] == [5] * 10  # every tab gets frames
            warm = resident_kib(process.pid)
            for _ in range(3):  # play on: what one more round of frames costs is what memory grows by
                assert [frames_after(c, 10, timeout=60) for c in connections] == [10] * 10
            grown_mib = (resident_kib(process.pid) - warm) / 1024
            assert grown_mib < 64, f"the server grew by {grown_mib:.0f} MiB over 300 more frames for 10 tabs"
        with connect_when_a_slot_is_free(endpoint, own) as after:  # every tab's slot comes back
            after.recv(timeout=30)
            assert frames_after(after, 3) == 3
    finally:
        stop_process(process, "the player server")


def test_browser_play(server: str, tmp_path: Path) -> None:
    screenshot = tmp_path / "play.png"
    with chromium_page() as page:
        page.goto(server)
        page.wait_for_function("window.playerStats.frames >= 3", timeout=30_000)
        assert page.inner_text("#engine").startswith("engine: server")

        def canvas_pixels() -> list[int]:
            return page.evaluate(
                "() => { const c = document.getElementById('screen');"
                " return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data"
                ".filter((_, i) => i % 97 === 0)); }"
            )

        before, stats_before = canvas_pixels(), page.evaluate("() => ({...window.playerStats})")
        page.keyboard.down("ArrowUp")
        page.wait_for_function("window.playerStats.actionsSeen.includes(1)", timeout=15_000)
        page.keyboard.up("ArrowUp")
        page.keyboard.press("Space")
        page.wait_for_function("window.playerStats.actionsSeen.includes(9)", timeout=15_000)
        page.wait_for_function(f"window.playerStats.frames > {stats_before['frames'] + 5}", timeout=15_000)
        after = canvas_pixels()
        assert before != after, "new frames must differ"
        assert page.evaluate("window.playerStats.frameIndex") > stats_before["frameIndex"]

        page.click("#reset")
        page.wait_for_function(f"window.playerStats.contextIndex !== {stats_before['contextIndex']}",
                               timeout=15_000)
        page.wait_for_function("/^[1-9]\\d* FPS$/.test(document.getElementById('fps').textContent)",
                               timeout=15_000)
        page.screenshot(path=str(screenshot))
    with Image.open(screenshot) as image:
        assert image.width >= 640 and np.array(image.convert("RGB")).std() > 0
