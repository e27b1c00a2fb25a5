"""``gamengen check``: validate params.yaml as a run would see it, before anything in the workspace is touched.

Every entry point calls it first (``make run`` and ``python -m components repro``, each Dagster materialization,
``make ablations`` for each experiment's ``-S`` values); run it yourself before a plain ``dvc repro`` or
``dvc exp run -S``. Exit 0 and one line when valid; exit 2 naming every bad key otherwise.

    python -m components check                                  # params.yaml
    python -m components check --profile gpu                    # params.yaml with profiles/gpu.yaml merged
    python -m components check -S sampler.cfg=2 -S world_model.context=8   # as `dvc exp run -S` would set them
"""

from __future__ import annotations

import argparse

from components.params import available_profiles, check_params


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", help=f"check with this profile merged in, one of {available_profiles()}")
    parser.add_argument("-S", "--set-param", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a value as `dvc exp run -S` sets it (repeatable)")


def main(args: argparse.Namespace) -> None:
    params = check_params(args.params, args.profile, args.overrides)
    what = " + ".join([args.params, *([f"profile {args.profile}"] if args.profile else []),
                       *(f"-S {item}" for item in args.overrides)])
    print(f"{what}: valid (profile {params.profile!r})")
