"""Browser play speed: ms per frame and FPS of the in-browser engine (ONNX Runtime Web in headless Chromium), beside
the Python player's figure from ``benchmarks/play_speed.py`` in the same run. Prints JSON.

    make web && python benchmarks/browser_play_speed.py                  # data/onnx_export
    python benchmarks/browser_play_speed.py --export E --frames 200 --threads 1 2 --precision int8 float32
    python benchmarks/browser_play_speed.py --precision int8 --threads 1 --decoder-head-share 0 0.1

One frame = one world-model prediction then one decode at batch 1, fed back autoregressively, as the page's game
loop runs them (``window.player.benchmark``), with no frame-rate cap. The bundle is written to a temporary folder
and served by ``python -m components play --engine browser`` (cross-origin isolated, so WASM threads work), once
per ``--precision`` (the graphs the bundle ships: int8 copies or the export's float32 ones) and
``--decoder-head-share`` (``play.web_decoder_head_share``: how much of the decoder runs in the world model's
worker); each ``--threads`` value is one page load. Target (issue 16): at least 30 FPS at the default resolution on
2 cores. The machine may be shared: ``machine_busy_cores`` is how many cores the whole machine kept busy meanwhile
(the page's own threads included).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.play_speed import busy_seconds  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]


def start_player(export: Path, folder: Path, precision: str,
                 head_share: float | None) -> tuple[subprocess.Popen[str], str]:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    if head_share is not None:
        params["play"]["web_decoder_head_share"] = head_share
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    process = subprocess.Popen(
        [sys.executable, "-m", "components", "--params", str(folder / "params.yaml"), "play", "--engine", "browser",
         "--export", str(export.resolve()), "--port", "0", "--precision", precision],
        cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    for line in process.stdout:
        match = re.search(r"at (http://127\.0\.0\.1:\d+/)", line)
        if match:
            return process, match.group(1)
    raise SystemExit(f"the browser engine did not start (exit {process.wait()})")


def browser_figures(url: str, threads: list[int], frames: int) -> list[dict[str, Any]]:
    from playwright.sync_api import sync_playwright

    results = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            for count in threads:
                page = browser.new_page()
                page.goto(f"{url}?threads={count}&fps=0&hooks")
                page.wait_for_function("window.playerStats.ready || window.playerStats.error", timeout=120_000)
                stats = page.evaluate("window.playerStats")
                if stats["error"]:
                    raise SystemExit(f"the page failed: {stats['error']}")
                page.evaluate("window.player.pause()")
                busy_before, wall_before = busy_seconds(), time.perf_counter()
                figure = page.evaluate(f"window.player.benchmark({frames})")
                wall = time.perf_counter() - wall_before
                busy = busy_seconds()
                figure = {name: round(value, 2) if isinstance(value, float) else value
                          for name, value in figure.items()}
                figure["isolated"] = stats["isolated"]
                figure["onnxruntime_web"] = stats["onnxruntimeWeb"]
                if busy is not None and busy_before is not None:
                    figure["machine_busy_cores"] = round((busy - busy_before) / wall, 2)
                results.append(figure)
                page.close()
        finally:
            browser.close()
    return results


def python_figure(export: Path, frames: int) -> dict[str, Any]:
    """``benchmarks/play_speed.py --onnx-only`` on the same export: the Python player's figures."""
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "play_speed.py"), "--onnx-only", "--export",
                          str(export), "--frames", str(frames)], cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", default="data/onnx_export", type=Path)
    parser.add_argument("--frames", type=int, default=100, help="timed frames per figure")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="WASM threads, one page load each")
    parser.add_argument("--precision", nargs="+", choices=["int8", "float32"], default=["int8", "float32"],
                        help="graphs the bundle ships, one bundle each")
    parser.add_argument("--decoder-head-share", type=float, nargs="+", default=[None],
                        help="play.web_decoder_head_share of the bundle, one bundle each (default: params.yaml's)")
    parser.add_argument("--no-python", action="store_true", help="skip the Python player's figure")
    args = parser.parse_args()
    browser = []
    for precision in args.precision:
        for share in args.decoder_head_share:
            with tempfile.TemporaryDirectory(prefix="browser-bench-") as scratch:
                process, url = start_player(args.export, Path(scratch), precision, share)
                try:
                    browser += browser_figures(url, args.threads, args.frames)
                finally:
                    os.killpg(process.pid, signal.SIGTERM)
                    process.wait(timeout=10)
    result: dict[str, Any] = {"export": str(args.export), "frames": args.frames, "browser": browser,
                              "cpu_count": os.cpu_count()}
    if not args.no_python:
        result["python"] = python_figure(args.export, args.frames)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
