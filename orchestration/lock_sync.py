"""The UI in step with DVC, whoever ran it: the sensor ``dvc_lock_sync`` records in Dagster what ``dvc.lock`` says.

After a ``dvc repro`` outside Dagster (``make run``, a run by hand) the event log knows nothing of it, so every
asset would look never materialized. Every 30 seconds this sensor reads ``dvc.lock`` and ``dvc status`` and, for
each stage (each partition of a foreach stage), in dependency order, reports a runless ``AssetMaterialization``
(``DagsterInstance.report_runless_asset_event``) whenever what Dagster last recorded differs from:

- data version = the stage's outs in ``dvc.lock`` (``dvc_graph.data_version``, the same as a Dagster run records);
- code version = the asset's current one (``dvc_graph.code_versions``) if DVC considers the stage and all its
  ancestors up to date, else a version that marks it unsynced (``lock:<data version>``): stale stays stale, for
  the stage ``dvc status`` names and everything ``dvc repro`` would rerun after it;
- input data versions and event pointers = its upstream stages' in ``dvc.lock`` and in the event log, so Dagster's
  lineage (and its staleness of what follows) is complete.

Each event carries the metadata a Dagster run would record (output sizes, metrics, PNG previews), and the stage's
validation reports are recorded as the results of its blocking asset checks. Nothing is recorded for a stage that
never ran. A missing, unreadable or foreign ``dvc.lock`` (no stage of this
pipeline in it) records nothing and the tick says why in one line.
"""

from pathlib import Path

import dagster as dg

from orchestration.checks import check_name
from orchestration.dvc_graph import DvcPipeline, code_versions, data_version, group_of, load_pipeline, read_lock
from orchestration.metadata import stage_metadata
from orchestration.reports import evaluate_report

SENSOR_NAME = "dvc_lock_sync"
SOURCE = "dvc.lock (run outside Dagster)"


def changed_items(root: Path) -> set[str]:
    """Addresses of the stages ``dvc status`` reports changed (deps, params, cmd or outs)."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return {name.rpartition(":")[2] for name in repo.status()}


def stale_items(pipeline: DvcPipeline, changed: set[str]) -> set[str]:
    """``changed`` and every item downstream of one: what ``dvc repro`` would rerun."""
    downstream: dict[str, set[str]] = {}
    for up, down in pipeline.item_edges():
        downstream.setdefault(up, set()).add(down)
    stale, frontier = set(changed), list(changed)
    while frontier:
        for down in downstream.get(frontier.pop(), set()) - stale:
            stale.add(down)
            frontier.append(down)
    return stale


def topological_items(pipeline: DvcPipeline) -> list[str]:
    """Every item address, each after the items it depends on."""
    order: list[str] = []
    upstream = {i.address: set(i.upstream) for g in pipeline.groups.values() for i in g.items.values()}

    def visit(address: str) -> None:
        if address not in order:
            for parent in sorted(upstream[address]):
                visit(parent)
            order.append(address)

    for address in upstream:
        visit(address)
    return order


def _latest(instance: dg.DagsterInstance, asset: str, partition: str | None) -> tuple[int, dict[str, str]] | None:
    """(storage id, tags) of the latest materialization of ``asset`` (one partition, or any)."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[partition] if partition else None),
        limit=1,
    ).records
    return (records[0].storage_id, dict(records[0].event_log_entry.tags or {})) if records else None


def record_from_lock(instance: dg.DagsterInstance, root: Path) -> list[str]:
    """Report, in dependency order, a runless materialization for each locked stage item whose data or code
    version differs from what Dagster last recorded for it; returns the addresses recorded."""
    pipeline = load_pipeline(root)
    versions = code_versions(pipeline)
    stale = stale_items(pipeline, changed_items(root))
    recorded = []
    for address in topological_items(pipeline):
        item = pipeline.item(address)
        version = data_version(root, [item])
        if version is None:
            continue
        code = versions[item.group] if address not in stale else f"lock:{version}"
        latest = _latest(instance, item.group, item.key)
        known = (latest[1].get("dagster/data_version"), latest[1].get("dagster/code_version")) if latest else None
        if known == (version, code):
            continue
        tags = {"dagster/data_version": version, "dagster/code_version": code,
                "dagster/data_version_is_user_provided": "true"}
        for upstream_group in sorted({group_of(u) for u in item.upstream}):
            parts = [pipeline.item(u) for u in item.upstream if group_of(u) == upstream_group]
            upstream_version = data_version(root, parts)
            pointers = [_latest(instance, upstream_group, part.key) for part in parts]
            if upstream_version is None or None in pointers:
                continue
            tags[f"dagster/input_data_version/{upstream_group}"] = upstream_version
            tags[f"dagster/input_event_pointer/{upstream_group}"] = str(max(p[0] for p in pointers if p))
        metadata = {"source": SOURCE, "dvc stage": address, "in sync with dvc status": address not in stale,
                    **stage_metadata(root, [item])}
        instance.report_runless_asset_event(dg.AssetMaterialization(
            asset_key=item.group, partition=item.key, description=f"recorded from {SOURCE}", tags=tags,
            metadata=metadata,
        ))
        for report in item.reports:  # the stage's validation reports: its blocking checks, as a run evaluates them
            result = evaluate_report(root / report)
            instance.report_runless_asset_event(dg.AssetCheckEvaluation(
                asset_key=dg.AssetKey(item.group), check_name=check_name(report, item.key), passed=result.passed,
                metadata=result.metadata, blocking=True, partition=item.key,
            ))
        recorded.append(address)
    return recorded


def sync_reason(root: Path) -> str | None:
    """Why dvc.lock cannot be mirrored (one line), or None when it can."""
    lock = root / "dvc.lock"
    if not lock.is_file():
        return "no dvc.lock yet: no stage has run"
    stages = read_lock(root, "dvc.lock")
    if not isinstance(stages, dict) or not set(stages) & {i.lock_key for g in load_pipeline(root).groups.values()
                                                           for i in g.items.values()}:
        return "dvc.lock names no stage of this pipeline (another project's?); nothing recorded"
    return None


def build_lock_sync_sensor(root: Path) -> dg.SensorDefinition:
    @dg.sensor(
        name=SENSOR_NAME,
        minimum_interval_seconds=30,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Records in Dagster the stages that `dvc repro` ran outside it (make run, by hand), with the "
        "data versions of dvc.lock; a stage `dvc status` calls changed, and what follows it, stay unsynced.",
    )
    def _dvc_lock_sync(context: dg.SensorEvaluationContext) -> dg.SkipReason:
        try:
            reason = sync_reason(root)
            recorded = [] if reason else record_from_lock(context.instance, root)
        except Exception as error:  # a broken dvc.lock must not break the UI: say it in one line
            reason = f"dvc.lock not read: {type(error).__name__}: {(str(error).splitlines() or [''])[0][:300]}"
        if reason:
            context.log.warning(reason)
            return dg.SkipReason(reason)
        if not recorded:
            return dg.SkipReason("the event log already matches dvc.lock")
        return dg.SkipReason(f"recorded from dvc.lock: {', '.join(recorded)}")

    return _dvc_lock_sync
