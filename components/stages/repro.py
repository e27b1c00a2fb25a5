"""``gamengen repro [DVC ARGS]``: ``python -m components check``, then ``dvc repro [DVC ARGS]``.

Two things a plain ``dvc repro`` cannot do. It validates params.yaml before DVC removes any stage's outputs (DVC
removes them before it runs the stage's command, so a wrong value found by the stage itself comes too late), and
it runs DVC with this interpreter's folder first on ``PATH``, so every stage's ``python -m components ...`` is
this environment's Python whatever was active in the shell.

    .venv/bin/python -m components repro                     # the whole pipeline (what make run does)
    .venv/bin/python -m components repro raw_trajectories    # a stage and whatever it needs
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from components.errors import PipelineError
from components.params import check_params


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dvc_args", nargs="*", metavar="DVC ARGS",
                        help="everything after `repro` goes to `dvc repro` as it is (targets, --force, --dry, ...)")


def dvc_executable() -> str:
    """The ``dvc`` of this environment, else the first on ``PATH``."""
    beside = Path(sys.executable).parent / "dvc"
    found = str(beside) if beside.is_file() else shutil.which("dvc")
    if found is None:
        raise PipelineError(f"no dvc beside {sys.executable} or on PATH; install the project (make venv)")
    return found


def main(args: argparse.Namespace) -> None:
    check_params(args.params)
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    dvc = dvc_executable()
    sys.stdout.flush()
    os.execve(dvc, [dvc, "repro", *args.dvc_args], env)
