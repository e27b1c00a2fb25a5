"""One Dagster asset per DVC stage, built generically from ``dvc.yaml`` (no per-stage code here).

- key = stage name; deps = the stages whose outs it depends on (from DVC's graph);
- a foreach/matrix stage is one asset with static partitions = its keys; each partition runs on its own
  (`BackfillPolicy.multi_run(1)`), and a downstream stage depends on all partitions it uses;
- materializing runs ``dvc repro --single-item <stage or stage@key>``, in the pool ``dvc`` (limit 1, see
  ``orchestration/dagster.yaml``) so two runs never fight over DVC's lock in one workspace;
- code version = cmd + params values + code deps, and the upstream code versions (``dvc_graph.code_versions``),
  data version = outs in dvc.lock (``dvc_graph.data_version``).
"""
# No `from __future__ import annotations` here: Dagster reads the resource type from the signature.

import warnings
from pathlib import Path

import dagster as dg

from orchestration.dvc_graph import DvcPipeline, StageGroup, code_versions, data_version, split_address
from orchestration.metadata import stage_metadata
from orchestration.reports import evaluate_report
from orchestration.resources import DvcResource
from orchestration.settings import load_settings

DVC_POOL = "dvc"
GROUP_NAME = "dvc_pipeline"


def partitions_def(group: StageGroup) -> dg.StaticPartitionsDefinition | None:
    return dg.StaticPartitionsDefinition(group.partition_keys) if group.partitioned else None


def _dep(pipeline: DvcPipeline, group: StageGroup, upstream_name: str) -> dg.AssetDep:
    """The dependency on one upstream stage, with the exact item-level mapping when both are partitioned."""
    upstream = pipeline.groups[upstream_name]
    if not upstream.partitioned:
        return dg.AssetDep(upstream_name)
    if not group.partitioned:
        return dg.AssetDep(upstream_name, partition_mapping=dg.AllPartitionMapping())
    mapping: dict[str, set[str]] = {key: set() for key in upstream.partition_keys}
    for key, item in group.items.items():
        for address in item.upstream:
            name, up_key = split_address(address)
            if name == upstream_name and up_key is not None:
                mapping[up_key].add(str(key))
    return dg.AssetDep(upstream_name, partition_mapping=dg.StaticPartitionMapping(mapping))


def _action(output: str) -> str:
    """What `dvc repro` did, from its output."""
    if "is cached - skipping run" in output or "Restored stage" in output or "from run-cache" in output:
        return "restored from the run-cache"
    if "didn't change, skipping" in output:
        return "unchanged (skipped)"
    return "ran"


def _with_reports(failure: dg.Failure, root: Path, reports: tuple[str, ...]) -> dg.Failure:
    """A stage that failed but wrote its validation report (e.g. a data gate): name the failed checks."""
    notes, metadata = [], dict(failure.metadata)
    for report in reports:
        if (root / report).is_file():
            result = evaluate_report(root / report)
            failed = (result.metadata or {}).get("checks failed")
            notes.append(f"{report}: failed checks {failed.value if failed is not None else '?'}")
            metadata.update({f"{report} {k}": v for k, v in (result.metadata or {}).items()})
    if not notes:
        return failure
    return dg.Failure(description=f"{failure.description}\n" + "\n".join(notes), metadata=metadata)


def build_stage_asset(pipeline: DvcPipeline, group: StageGroup, code_version: str) -> dg.AssetsDefinition:
    """The asset of one stage group; its body runs DVC for the run's partition(s)."""
    with warnings.catch_warnings():  # `backfill_policy` is marked beta; it is what runs shards independently
        warnings.simplefilter("ignore", dg.BetaWarning)
        return _build_stage_asset(pipeline, group, code_version)


def _build_stage_asset(pipeline: DvcPipeline, group: StageGroup, code_version: str) -> dg.AssetsDefinition:
    first = next(iter(group.items.values()))

    @dg.asset(
        name=group.name,
        group_name=GROUP_NAME,
        description=group.description,
        deps=[_dep(pipeline, group, up) for up in group.upstream_groups],
        partitions_def=partitions_def(group),
        backfill_policy=dg.BackfillPolicy.multi_run(1) if group.partitioned else None,
        code_version=code_version,
        pool=DVC_POOL,
        kinds={"dvc"},
        metadata={
            "dvc file": dg.MetadataValue.path(first.dvcfile),
            "cmd": dg.MetadataValue.text(first.cmd),
            "outs": dg.MetadataValue.json(sorted({o for i in group.items.values() for o in i.outs})),
        },
    )
    def _stage(context: dg.AssetExecutionContext, dvc: DvcResource) -> dg.MaterializeResult:
        settings = load_settings(dvc.root)
        keys = list(context.partition_keys) if group.partitioned else [None]
        items = [group.item(key) for key in keys]
        dvc.check_params(settings.check_command, context.log)
        pull = settings.pull_before_repro and dvc.remote_reachable()[0]
        actions = {}
        for item in items:
            try:
                result = dvc.repro(item.address, context.log, pull=pull)
            except dg.Failure as failure:
                raise _with_reports(failure, dvc.root, item.reports) from None
            actions[item.address] = _action(result.output)
        pushed = False
        if settings.push_after_repro:
            pushed = dvc.push(items, context.log, required=settings.require_remote)
        version = data_version(dvc.root, items)
        if version is None:
            raise dg.Failure(
                description=f"dvc repro of {[i.address for i in items]} succeeded but dvc.lock has no entry "
                "for it: is the stage frozen, or was dvc.lock changed meanwhile?"
            )
        metadata = stage_metadata(dvc.root, items)
        metadata["dvc"] = dg.MetadataValue.json(actions)
        metadata["pushed to remote"] = pushed
        return dg.MaterializeResult(data_version=dg.DataVersion(version), metadata=metadata)

    return _stage


def build_assets(pipeline: DvcPipeline) -> list[dg.AssetsDefinition]:
    versions = code_versions(pipeline)
    return [build_stage_asset(pipeline, group, versions[group.name]) for group in pipeline.groups.values()]
