"""``python -m components ablations`` (``make ablations``): the paper's ablations as DVC experiments.

Queues ``dvc exp run --queue -S ...`` experiments for the context lengths, noise augmentation on/off,
agent/random data and the action warp on/off of ``evaluation.ablations`` (each once per seed), runs them,
and writes the tables to ``docs/results.md``.
See components/evaluation/ablations.py.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import sys
from pathlib import Path

from components.evaluation import ablations
from components.params import check_params, load_params, read_yaml


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--groups", default="context,noise,data,warp",
                        help="comma-separated: context, noise, data, warp (the action warp off)")
    parser.add_argument("--context-lengths", default=None,
                        help="comma-separated K values, overriding evaluation.ablations.context_lengths")
    parser.add_argument("--report-only", action="store_true", help="only rewrite the tables from existing experiments")
    parser.add_argument("--tag", default=None, help="the experiment tag to report (default: the newest)")
    parser.add_argument("--out", default="docs/results.md", help="the results page to write (Markdown)")
    parser.add_argument("--repo", default=".", help="the DVC repository (default: here)")


def main(args: argparse.Namespace) -> None:
    log = logging.getLogger("components.evaluation.ablations")
    params = load_params(args.params)
    settings = params.evaluation.ablations
    if args.context_lengths:
        settings = settings.model_copy(update={"context_lengths": [int(k) for k in args.context_lengths.split(",")]})
    repo = Path(args.repo)
    tag = args.tag
    if not args.report_only:
        raw = read_yaml(Path(args.params))
        experiments = ablations.plan(settings, raw, [g.strip() for g in args.groups.split(",") if g.strip()])
        for experiment in experiments:  # every experiment's params valid before any is queued
            check_params(args.params, overrides=experiment.set_params())
        tag = dt.datetime.now(dt.UTC).strftime("%Y%m%d%H%M%S")
        log.info("running %d ablation experiments with tag %s: %s", len(experiments), tag,
                 ", ".join(e.label for e in experiments))
        ablations.queue_and_run(experiments, repo, tag, jobs=settings.jobs)
    results = ablations.read_experiments(ablations.dvc_exp_show(repo))
    tag = tag or ablations.latest_tag(results)
    chosen = [r for r in results if r.tag == tag]
    if tag is None or not chosen:
        raise ablations.AblationError(f"no ablation experiments with metrics in {repo} (tag {tag}); run without "
                                      "--report-only")
    command = "python -m components " + " ".join(sys.argv[1:]) if "ablations" in sys.argv else "make ablations"
    body = ablations.tables(chosen, settings)
    ablations.write_results(repo / args.out, body, command.strip(), tag, params.profile,
                            params.evaluation.ablations.overrides)
    print(body)
