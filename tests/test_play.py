"""The browser player (components/play.py) and the rollout video, on a real tiny export.

The browser test drives Debian's headless Chromium through Playwright (never ``playwright install``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components.play import action_for_keys
from tests.conftest import REPO_ROOT, pipeline_env

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
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


def cli(*args: str, cwd: Path = REPO_ROOT, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "components", *args], cwd=cwd, env=pipeline_env(),
                          capture_output=True, text=True, timeout=timeout)


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
        "from components.play import OnnxGame\n"
        f"game = OnnxGame({str(export)!r})\n"
        "state = game.new_state(0)\n"
        "frames = [state.frame] + [state.step(a) for a in (1, 1, 3, 9)]\n"
        "H, W = game.manifest['H'], game.manifest['W']\n"
        "assert all(f.shape == (H, W, 3) and f.dtype == np.uint8 for f in frames)\n"
        "assert all((a != b).any() for a, b in zip(frames, frames[1:]))\n"
        "assert len(state.latents) == game.K and state.frame_index == 4\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'vizdoom'))\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=pipeline_env(), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


@pytest.mark.parametrize("kind", ["missing", "empty"])
def test_clear_error_without_an_export(tmp_path: Path, kind: str) -> None:
    folder = tmp_path / "export"
    if kind == "empty":
        folder.mkdir()
    result = cli("play", "--export", str(folder), "--port", "0")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "dvc repro onnx_export" in result.stderr and str(folder) in result.stderr


def test_rollout_video(export: Path, tmp_path: Path) -> None:
    out = tmp_path / "rollout.gif"
    result = cli("rollout_video", "--export", str(export), "--context", "1", "--scale", "2", "--out", str(out))
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
    bad = cli("rollout_video", "--export", str(export), "--context", "99", "--out", str(out))
    assert bad.returncode == 2 and "--context" in bad.stderr


# --------------------------------------------------------------------------- the browser


@pytest.fixture()
def server(export: Path) -> Iterator[str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "components", "play", "--export", str(export), "--port", "0", "--fps", "30"],
        cwd=REPO_ROOT, env=pipeline_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )
    url, lines = None, []
    deadline = time.monotonic() + 60
    while url is None and time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        match = re.search(r"serving (http://127\.0\.0\.1:\d+/)", line)
        url = match.group(1) if match else None
    try:
        assert url, "".join(lines)
        yield url
    finally:
        os.killpg(process.pid, 15)
        process.wait(timeout=10)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (make browser)")
def test_browser_play(server: str, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    screenshot = tmp_path / "play.png"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(server)
            page.wait_for_function("window.playerStats.frames >= 3", timeout=30_000)

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
        finally:
            browser.close()
    with Image.open(screenshot) as image:
        assert image.width >= 640 and np.array(image.convert("RGB")).std() > 0
