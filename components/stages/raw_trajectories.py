"""Stage ``raw_trajectories``: placeholder until the foundation issue's implementation lands."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def main(args: argparse.Namespace) -> None:
    raise NotImplementedError("raw_trajectories is being implemented")
