"""``gamengen register``: give the committed champion a GTO version and assign it the ``prod`` stage.

A GTO version is a git tag on a commit, and ``dvc artifacts get`` reads the champion from that commit's dvc.lock,
so a promotion is registered once it is committed; a rejected challenger, or a promotion not yet committed, is
never registered, so GTO only names champions that exist:

    python -m components repro champion     # promote (or reject) the fresh export: reports/champion.json
    git add dvc.lock docs/promotion-log.md docs/promotion-log.jsonl && git commit -m "promote"
    python -m components register           # doom-world-model@v0.0.N on that commit, assigned prod
    gto show doom-world-model               # versions, stages and commits
    dvc artifacts get . doom-world-model --stage prod -o champion   # what is in production

Scheduled retraining registers what its experiments' own ``champion`` stage promoted through the same function,
``components.evaluation.registry.register_champion``, on the experiment's commit (``orchestration/retraining.py``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from components.evaluation.registry import (
    PROD,
    REPORT,
    artifact_entry,
    check_committed_promotion,
    register_champion,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--report", default=REPORT, help="the promotion decision to register")
    parser.add_argument("--artifact", default=None, help="artifact name in dvc.yaml `artifacts:` (default: the one)")


def main(args: argparse.Namespace) -> None:
    root = Path(".").resolve()
    name, path = artifact_entry(root, args.artifact)
    report, champion = check_committed_promotion(root, root / args.report, path)
    version, commit = register_champion(root, "HEAD", report, name, path)
    print(f"{name}@{version} (commit {commit[:8]}, champion {champion}) is in stage {PROD}: "
          f"{report.get('summary', 'PROMOTED')} (source: {report.get('source') or 'unknown'})")
