"""``gamengen profile NAME``: merge ``profiles/NAME.yaml`` into params.yaml (validated before writing)."""

from __future__ import annotations

import argparse

from components.params import apply_profile, available_profiles


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help=f"profile to apply, one of {available_profiles()}")


def main(args: argparse.Namespace) -> None:
    params = apply_profile(args.name, args.params)
    print(f"{args.params}: now profile {params.profile!r} (git checkout {args.params} returns to the default)")
