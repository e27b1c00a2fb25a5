"""Stage ``rl_agent``: placeholder until the foundation issue's implementation lands."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def main(args: argparse.Namespace) -> None:
    raise NotImplementedError("rl_agent is being implemented")
