"""The in-browser player (components/play/web_bundle.py, components/play/page/web_player.js) on a real tiny export.

The bundle is served by ``python -m components bundle --serve`` and played by Debian's headless Chromium through
Playwright (never ``playwright install``); ONNX Runtime Web comes from node_modules (``make web``).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from components.errors import PipelineError
from components.play.server import OnnxGame, action_for_keys
from components.play.web_bundle import ORT_PACKAGE, build_bundle
from components.runtime.export_contract import ExportNotFoundError
from tests.fixtures.browser import chromium_page, needs_chromium
from tests.fixtures.processes import REPO_ROOT, pipeline_env, stop_process, wait_for_url

ORT = ORT_PACKAGE
needs_ort_web = pytest.mark.skipif(not (ORT / "package.json").is_file(),
                                   reason="onnxruntime-web is not installed: run `make web` (npm ci)")
# uint8 levels: ONNX Runtime Web (WASM) and ONNX Runtime in Python round differently in the last float bits.
PARITY_MAX_LEVELS = 2
PARITY_MEAN_LEVELS = 0.05


@pytest.fixture(scope="module")
def export(tiny_export: Path) -> Path:
    return tiny_export / "data" / "onnx_export"


def test_the_bundle_refuses_a_corrupt_export_and_a_missing_onnxruntime_web(export: Path, tmp_path: Path) -> None:
    corrupt = tmp_path / "export"
    shutil.copytree(export, corrupt)
    data = bytearray((corrupt / "decoder.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (corrupt / "decoder.onnx").write_bytes(bytes(data))
    with pytest.raises(ExportNotFoundError, match=r"\['decoder.onnx'\] differ from the sha256 in manifest.json"):
        build_bundle(corrupt, tmp_path / "bundle", fps=20)
    with pytest.raises(PipelineError, match="onnxruntime-web is not installed.*make web"):
        build_bundle(export, tmp_path / "bundle", fps=20, package=tmp_path / "no_node_modules")
    assert not (tmp_path / "bundle").exists()  # nothing half-written


@needs_ort_web
def test_the_bundle_holds_the_page_the_runtime_and_the_contexts(export: Path, tmp_path: Path) -> None:
    folder = tmp_path / "bundle"
    subprocess.run([sys.executable, "-m", "components", "bundle", "--export", str(export), "--out", str(folder),
                    "--fps", "12.5"], cwd=REPO_ROOT, env=pipeline_env(), check=True, capture_output=True)
    bundle = json.loads((folder / "bundle.json").read_text())
    assert {"index.html", "player.js", "world_model.onnx", "decoder.onnx", "contexts.bin",
            "ort/ort.wasm.min.mjs", "ort/ort-wasm-simd-threaded.wasm"} <= set(bundle["files"])
    assert (folder / "world_model.onnx").read_bytes() == (export / "world_model.onnx").read_bytes()
    assert bundle["fps"] == 12.5 and bundle["onnxruntime_web"] == json.loads((ORT / "package.json").read_text())[
        "version"]
    sizes, layout = bundle["sizes"], bundle["contexts"]
    raw = (folder / "contexts.bin").read_bytes()
    with np.load(export / "contexts.npz") as shipped:
        latents = np.frombuffer(raw, "<f4", np.prod(layout["latents"]["shape"]), layout["latents"]["offset"])
        np.testing.assert_array_equal(latents.reshape(layout["latents"]["shape"]), shipped["context_latents"])
        actions = np.frombuffer(raw, "<i4", np.prod(layout["actions"]["shape"]), layout["actions"]["offset"])
        np.testing.assert_array_equal(actions.reshape(layout["actions"]["shape"]), shipped["context_actions"])
        frames = np.frombuffer(raw, np.uint8, np.prod(layout["frames"]["shape"]), layout["frames"]["offset"])
        np.testing.assert_array_equal(frames.reshape(-1, sizes["H"], sizes["W"], 3), shipped["context_frames"][:, -1])


@contextmanager
def bundle_server(export: Path, root: Path, *extra: str) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """``python -m components play --engine browser`` in ``root`` (the bundle goes to root/dist/play) on a free
    port: its URL and process, stopped (or failed, if it does not stop) after."""
    process = subprocess.Popen(
        [sys.executable, "-m", "components", "--params", str(REPO_ROOT / "params.yaml"), "play", "--engine",
         "browser", "--export", str(export), "--port", "0", *extra],
        cwd=root, env=pipeline_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )
    url = wait_for_url(process, r"at (http://127\.0\.0\.1:\d+/)", "the bundle server")
    try:
        yield url, process
    finally:
        stop_process(process, "the bundle server")


def open_player(page: Any, url: str) -> dict[str, Any]:
    page.goto(url)
    page.wait_for_function("window.playerStats && (window.playerStats.ready || window.playerStats.error)",
                           timeout=90_000)
    return page.evaluate("window.playerStats")


@needs_ort_web
@needs_chromium
def test_the_browser_plays_the_bundle_as_python_does(export: Path, tmp_path: Path) -> None:
    """Frames arrive, a held key changes the action the page sends to the model (the same keymap and matching as
    the server's), the page runs several WASM threads when cross-origin isolated, and from a shipped context and
    a fixed action sequence its frames are ONNX Runtime's in Python within PARITY_MAX_LEVELS uint8 levels."""
    game = OnnxGame(export, threads=1)
    names = {a["name"]: a["id"] for a in game.actions}
    sequence = [names["turn_left"]] * 3 + [names["forward"]] * 3 + [names["noop"], names["turn_right"]]
    with bundle_server(export, tmp_path) as (url, _), chromium_page() as page:
        stats = open_player(page, url + "?hooks")  # window.player: the page's test hooks
        assert stats["error"] is None and stats["ready"] and stats["isolated"] and stats["threads"] >= 2, stats
        assert stats["sha256"] == "checked"
        page.wait_for_function("window.playerStats.frames >= 3", timeout=60_000)
        assert "engine: browser (ONNX Runtime Web" in page.inner_text("#engine")
        page.click("#screen")
        page.keyboard.down("ArrowLeft")
        page.wait_for_function(f"window.playerStats.action === {names['turn_left']}", timeout=30_000)
        page.keyboard.up("ArrowLeft")
        for keys in ([], ["ArrowUp"], ["ArrowUp", "ArrowLeft"], ["KeyD"], ["Space"], ["KeyQ"], ["ArrowLeft",
                                                                                                 "ArrowRight"]):
            assert page.evaluate("(keys) => window.player.actionForKeys(keys)", keys) == action_for_keys(
                keys, game.actions), keys
        page.evaluate("window.player.pause()")
        browser_frames = np.array(page.evaluate(f"window.player.rollout(1, {sequence})"), np.uint8)
        page.screenshot(path=str(tmp_path / "browser_player.png"))
    state = game.new_state(1)
    python_frames = np.stack([state.step(a).reshape(-1) for a in sequence])
    difference = np.abs(browser_frames.astype(np.int16) - python_frames.astype(np.int16))
    assert difference.max() <= PARITY_MAX_LEVELS and difference.mean() <= PARITY_MEAN_LEVELS, (
        difference.max(axis=1), difference.mean(axis=1))


@needs_ort_web
@needs_chromium
def test_the_page_names_a_corrupt_file_and_plays_on_one_thread_without_isolation(export: Path,
                                                                                 tmp_path: Path) -> None:
    folder = tmp_path / "dist" / "play"
    with bundle_server(export, tmp_path, "--no-isolation") as (url, _), chromium_page() as page:
        stats = open_player(page, url)
        assert stats["error"] is None and not stats["isolated"] and stats["threads"] == 1, stats
        assert "one thread" in page.inner_text("#engine")
        assert page.evaluate("typeof window.player") == "undefined"  # no test hooks without ?hooks
        data = bytearray((folder / "decoder.onnx").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (folder / "decoder.onnx").write_bytes(bytes(data))
        stats = open_player(page, url)
        assert stats["error"] and "decoder.onnx is corrupt" in stats["error"], stats
        assert "decoder.onnx is corrupt" in page.inner_text("#status")
        (folder / "world_model.onnx").unlink()
        stats = open_player(page, url)
        assert stats["error"] and "world_model.onnx is missing from the bundle" in stats["error"], stats


@needs_ort_web
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_the_bundle_server_stops_within_2_s_on_a_signal(export: Path, tmp_path: Path, stop: int) -> None:
    with bundle_server(export, tmp_path) as (url, process):
        import urllib.request

        with urllib.request.urlopen(url + "bundle.json", timeout=10) as response:
            assert response.headers["Cross-Origin-Embedder-Policy"] == "require-corp"
        process.send_signal(stop)
        started = time.monotonic()
        process.wait(timeout=10)
        assert time.monotonic() - started < 2.0 and process.returncode == 0
