"""Jobs: ``full_pipeline`` (every DVC-backed asset) and ``retraining_experiment`` (a DVC experiment run).

``full_pipeline`` selects all assets and their checks. In the UI, "Materialize all" starts an asset backfill
(each foreach partition its own run, then the downstream stages). From code, a single run that covers every
partition is ``full_pipeline_run_tags(defs)`` passed as run tags (see tests/test_orchestration.py).

``retraining_experiment`` reruns the pipeline with a fresh seed for one param (``orchestration.
retraining_seed_param``) as ``dvc exp run --temp -S <param>=<seed>``: DVC runs it in a temporary copy, so
the workspace stays untouched. Its champion stage (``retraining.champion_stage``: the stage that writes dvc.yaml's
artifact) decides there; ``retraining.settle`` then branches and registers a promoted experiment (GTO ``prod``)
and keeps a rejected one as a DVC experiment.
"""
# No `from __future__ import annotations` here: Dagster reads config/resource types from the signature.

import secrets
from datetime import UTC, datetime

import dagster as dg

from orchestration.assets import DVC_POOL
from orchestration.resources import DvcResource
from orchestration.retraining import champion_stage, experiment_commit, experiment_metrics, settle
from orchestration.settings import load_settings

full_pipeline = dg.define_asset_job(
    "full_pipeline",
    selection=dg.AssetSelection.all(),
    description="Every stage of dvc.yaml, in DVC's order (each asset runs `dvc repro --single-item`).",
)


def full_pipeline_run_tags(partition_keys: list[str]) -> dict[str, str]:
    """Run tags that make one run of ``full_pipeline`` cover all partitions (first..last key)."""
    if not partition_keys:
        return {}
    return {
        "dagster/asset_partition_range_start": partition_keys[0],
        "dagster/asset_partition_range_end": partition_keys[-1],
    }


class RetrainingConfig(dg.Config):
    seed: int | None = None  # None: a random seed
    experiment_name: str | None = None  # None: retrain-<UTC time>-seed<seed>


@dg.op(pool=DVC_POOL, description="`dvc exp run --temp -S <seed param>=<fresh seed>`; its champion stage decides, "
       "a promotion is branched and registered in GTO as prod")
def retraining_experiment(context: dg.OpExecutionContext, config: RetrainingConfig, dvc: DvcResource) -> bool:
    settings = load_settings(dvc.root)
    seed = config.seed if config.seed is not None else secrets.randbelow(2**31)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    name = config.experiment_name or f"retrain-{stamp}-seed{seed}"
    param = settings.retraining_seed_param
    champion = champion_stage(dvc.root)  # read before the long run: a dvc.yaml it cannot use fails first
    dvc.check_params(settings.check_command, context.log, overrides=(f"{param}={seed}",))
    if settings.pull_before_repro and dvc.remote_reachable()[0]:
        dvc.run(["pull", "--run-cache", "--allow-missing"], context.log, check=False)
    dvc.run(
        ["exp", "run", "--temp", "--name", name, "--set-param", f"{param}={seed}"],
        context.log,
        what=f"retraining experiment {name!r}",
    )
    commit = experiment_commit(dvc.root, name)
    metadata: dict = {"experiment": name, "seed": seed, "seed param": param,
                      "metrics": dg.MetadataValue.json(experiment_metrics(dvc.root, commit))}
    if champion is None:
        context.log.info(f"experiment {name!r} kept as a DVC experiment; this project has no champion stage (no "
                         f"stage writes a dvc.yaml artifact), so nothing is promoted (by hand: dvc exp apply {name})")
        context.add_output_metadata({**metadata, "promoted": False})
        return False
    outcome = settle(dvc.root, champion, name, commit, lambda experiment, branch: dvc.run(
        ["exp", "branch", experiment, branch], context.log, what=f"branch {branch!r} of experiment {experiment!r}"))
    context.log.info(f"experiment {name!r}: {outcome.summary}"
                     + (f"; {outcome.version} on branch {outcome.branch} is now prod" if outcome.promoted else ""))
    context.log_event(dg.AssetObservation(asset_key=champion.name, metadata={"experiment": name, **outcome.metadata()}))
    context.add_output_metadata({**metadata, **outcome.metadata()})
    return outcome.promoted


@dg.job(description="Re-collect with a fresh seed and rerun downstream as a DVC experiment (workspace untouched).")
def retraining_job() -> None:
    retraining_experiment()
