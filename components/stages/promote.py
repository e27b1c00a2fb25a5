"""``python -m components promote``: promote the fresh export to champion if it is no worse, else reject it.

Run after ``dvc repro`` (or inside a DVC experiment's workspace). See components/evaluation/promotion.py for the rule,
the champion folder and the promotion log. Rejection is a normal outcome: the exit status is 0 either way;
``--decision-json`` writes the decision with both metric sets for a caller (e.g. Dagster) to read.
"""

from __future__ import annotations

import argparse
import os
import subprocess

from components.atomic import atomic_write_json
from components.evaluation.promotion import promote_challenger
from components.params import load_params


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--export", required=True, help="the challenger export")
    parser.add_argument("--metrics", required=True, help="the challenger's held-out metrics")
    parser.add_argument("--trajectories", required=True, help="held-out play to re-evaluate the champion on")
    parser.add_argument("--latents", required=True, help="validated latents (the episodes the evaluation used)")
    parser.add_argument("--source", default="", help="label for the log, e.g. the DVC experiment name or git rev")
    parser.add_argument("--no-reevaluate", action="store_true",
                        help="compare with the champion's stored metrics instead of scoring it again")
    parser.add_argument("--decision-json", default=None, help="also write the decision to this JSON file")
    parser.add_argument("--report", required=True,
                        help="the decision as a check report (success = promoted, one check per criterion)")


def main(args: argparse.Namespace) -> None:
    params = load_params(args.params)
    decision = promote_challenger(
        params, args.export, args.metrics, args.trajectories, args.latents, source=args.source or default_source(),
        reevaluate=False if args.no_reevaluate else None,
    )
    print(("PROMOTED: " if decision.promoted else "REJECTED: ") + decision.reason)
    for c in decision.comparisons:
        print(f"  {c.metric}: champion {c.champion} challenger {c.challenger} delta {c.delta} "
              f"(tolerance {c.tolerance}) {'ok' if c.passed else 'WORSE'}")
    if args.decision_json:
        atomic_write_json(args.decision_json, decision.to_dict())
    atomic_write_json(args.report, decision.report())


def default_source() -> str:
    """The log's label for the challenger: the DVC experiment running this stage (DVC sets ``DVC_EXP_NAME`` in
    ``dvc exp run``), else the git commit."""

    experiment = os.environ.get("DVC_EXP_NAME")
    if experiment:
        return f"DVC experiment {experiment}"
    result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return f"git {result.stdout.strip()}" if result.returncode == 0 else ""
