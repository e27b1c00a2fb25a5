"""Command-line entry point: ``python -m components <stage> ...`` or ``gamengen <stage> ...``.

``dvc.yaml`` calls these commands. Each stage lives in ``components/stages/<stage>.py`` and exposes
``add_arguments(parser)`` and ``main(args)``; register new stages in ``STAGES`` below. Only the chosen command's
module is imported, so a stage imports what it needs at its top and pays for no other stage's libraries.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from components.errors import PipelineError

# stage name -> one-line help. The module is components.stages.<name>.
STAGES: dict[str, str] = {
    "rl_agent": "train the PPO agent on ViZDoom with the paper's reward; saves policy snapshots",
    "raw_trajectories": "record one shard of play (frames, actions, rewards) from random to skilled",
    "base_autoencoder": "train (or load a pretrained) frame autoencoder and measure its latent scaling factor",
    "validated_latents": "encode every frame to latents, then gate them with a Great Expectations suite",
    "finetuned_vae": "fine-tune the decoder (encoder frozen) on game frames with pixel MSE",
    "diffusion_checkpoint": "train the action-conditioned diffusion world model (resumable; data parallel)",
    "distilled_model": "distil the world model into a 1-step student (CFG and context noise built in)",
    "onnx_export": "export encoder, 1-step world model and decoder to ONNX, with manifest and parity report",
    "evaluation": "score the ONNX export and the 4-step teacher on held-out play, with baselines and rollouts",
}

# other commands: name -> (module, help)
COMMANDS: dict[str, tuple[str, str]] = {
    "check": ("components.stages.check", "validate params.yaml (a profile, -S overrides) before anything runs; exit 2 "
              "naming the bad keys"),
    "repro": ("components.stages.repro", "check params.yaml, then `dvc repro ...` with this interpreter running "
              "every stage"),
    "restore": ("components.stages.restore", "bring every output back to what dvc.lock records (after a failed or "
                "killed stage)"),
    "register": ("components.stages.register", "give the committed champion a GTO version and the prod stage"),
    "profile": ("components.stages.profile", "merge a params profile (micro, paper) into params.yaml"),
    "play": ("components.stages.play", "play the learned game in a browser from the ONNX export (ONNX Runtime only)"),
    "bundle": ("components.stages.bundle", "the static in-browser player: page, ONNX Runtime Web and the export, "
               "for any static file server"),
    "rollout_video": ("components.stages.rollout_video", "GIF of an autoregressive rollout beside the real frames"),
    "ablations": ("components.stages.ablations",
                  "run the paper's ablations as DVC experiments; tables to docs/results.md"),
    "promote": ("components.stages.promote", "promote the fresh export to champion if no worse on held-out play"),
    "plots_template": ("components.stages.plots_template",
                       "write .dvc/plots/offline.html, DVC's plots page with vega inlined (dvc plots show offline)"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Every command, with the arguments of ``command`` only (its module is imported for them); None: all."""
    parser = argparse.ArgumentParser(
        prog="gamengen",
        description="GameNGen pipeline stages. dvc.yaml runs these; run one by hand to debug it.",
        epilog="stages, in pipeline order: " + ", ".join(STAGES),
    )
    parser.add_argument("--params", default="params.yaml", help="params file to read (default: params.yaml)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", metavar="<stage>", required=True)
    for name, help_text in STAGES.items():
        _add_command(commands, name, f"components.stages.{name}", help_text, command in (None, name))
    for name, (module, help_text) in COMMANDS.items():
        _add_command(commands, name, module, help_text, command in (None, name))
    return parser


def _add_command(commands: argparse._SubParsersAction, name: str, module: str, help_text: str,
                 with_arguments: bool) -> None:
    sub = commands.add_parser(name, help=help_text, description=help_text)
    sub.set_defaults(_module=module)
    if with_arguments:
        stage = importlib.import_module(module)
        if hasattr(stage, "add_arguments"):
            stage.add_arguments(sub)


def missing_dependency(error: ModuleNotFoundError) -> str | None:
    """The one-line message for a third-party package this interpreter lacks (``None`` for the project's own
    modules): the usual cause is a ``python`` on PATH other than the project's .venv, e.g. under ``dvc repro``."""
    package = (error.name or "").split(".")[0]
    if not package or package == "components":
        return None
    return (f"{sys.executable} cannot import {package!r}, which the pipeline needs: this is not the project's "
            "environment. Activate it (source .venv/bin/activate) or use make (make run, make test); "
            "if this is the project's .venv, reinstall it with make venv")


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return run_command(argv)
    except ModuleNotFoundError as error:
        message = missing_dependency(error)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2


def check_device(params_path: str) -> None:
    """Before a stage does any work: its ``device`` must exist here (``device: cuda`` without a GPU stops)."""
    from components.params import load_params
    from components.training import resolve_device

    resolve_device(load_params(params_path).device)


# Commands whose arguments all go to another program as they are (argparse would take `--force` as its own).
PASSTHROUGH = {"repro": "dvc_args"}


def command_index(argv: Sequence[str]) -> int | None:
    """Where the command's name is in ``argv``: the first word that is neither a global option nor its value."""
    for index, token in enumerate(argv):
        if not token.startswith("-") and not (index and argv[index - 1] == "--params"):
            return index
    return None


def split_passthrough(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """``[..., "repro", "--force", "x"]`` -> ``([..., "repro"], ["--force", "x"])``; other commands unchanged.
    ``repro -h`` keeps its own help."""
    argv = list(argv)
    index = command_index(argv)
    if index is not None:
        token, rest = argv[index], argv[index + 1 :]
        if token in PASSTHROUGH and rest[:1] not in (["-h"], ["--help"]):
            return argv[: index + 1], rest
    return argv, []


def run_command(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the command (what :func:`main` does, without its check of the interpreter)."""
    importlib.import_module("components.params")  # every command reads params: this must be the project's Python
    own, passed = split_passthrough(sys.argv[1:] if argv is None else argv)
    index = command_index(own)
    args = build_parser(own[index] if index is not None else "").parse_args(own)
    if args.command in PASSTHROUGH:
        setattr(args, PASSTHROUGH[args.command], passed)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        if args._module.removeprefix("components.stages.") in STAGES:
            check_device(args.params)
        importlib.import_module(args._module).main(args)
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
