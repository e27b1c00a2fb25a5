"""``python -m components bundle``: the static bundle of the in-browser player (components/play/web_bundle.py).

    make web                                                     # npm ci: onnxruntime-web, pinned
    python -m components bundle --export data/onnx_export --out dist/play
    python -m components play --engine browser                   # the same, then served on http://127.0.0.1:8765/

The page runs int8 copies of the export's world model and decoder (``play.web_precision``, ``--precision``;
components/runtime/quantize.py), refused below ``play.web_int8_min_psnr_db`` against the float graphs' frames, or
the float32 graphs themselves; the decoder's first layers run in the world model's worker
(``play.web_decoder_head_share``). Any static file server can serve the folder; WASM threads need the two cross-origin
isolation headers (README "Play in the browser"). Without them each of the page's two workers runs one thread and
the page says so.
"""

from __future__ import annotations

import argparse

from components.params import load_params
from components.play.web_bundle import bundle_for_play


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--export", default=None, help="the ONNX export to bundle (default: params play.export_dir)")
    parser.add_argument("--out", default=None, help="the bundle folder, replaced whole (default: play.bundle_dir)")
    parser.add_argument("--precision", choices=["int8", "float32"], default=None, help="graphs the page runs: "
                        "int8 copies checked against the float frames, or the export's float32 graphs as they are "
                        "(default: params play.web_precision)")
    parser.add_argument("--fps", type=float, default=None, help="frame-rate cap in the page (default: play.fps; "
                        "0 = as fast as the model runs)")


def main(args: argparse.Namespace) -> None:
    settings = load_params(args.params).play
    out = args.out or settings.bundle_dir
    bundle_for_play(args.export or settings.export_dir, out, settings, args.fps, args.precision)
    print(f"wrote {out}: serve it with any static file server (README \"Play in the browser\"), or play it with "
          "python -m components play --engine browser")
