"""Blocking asset checks read from the validation reports that stages write (generic, no per-stage code).

Each report a stage lists in its dvc.yaml ``outs`` (``reports/<name>.json``; the format is in
``orchestration/reports.py``) becomes one ``blocking=True`` asset check on the stage's asset, named after the
report file (``reports/validated_latents.json`` -> check ``validated_latents``). The check fails (severity ERROR,
so the downstream assets of the run are skipped) when the report says so or is missing or malformed. For a
foreach stage, each partition's own report is read.
"""
# No `from __future__ import annotations` here: Dagster reads the context type from the signature.

import re
from pathlib import Path

import dagster as dg

from orchestration.assets import partitions_def
from orchestration.dvc_graph import DvcPipeline, StageGroup
from orchestration.reports import evaluate_report
from orchestration.resources import DvcResource


def check_name(report: str, key: str | None = None) -> str:
    """A valid check name from a report path; a foreach item's key is dropped so its items share one check."""
    stem = Path(report).stem
    if key is not None:
        stem = stem.replace(str(key), "")
    return re.sub(r"[^A-Za-z0-9_]+", "_", stem).strip("_") or "report"


def _merge(results: list[dg.AssetCheckResult]) -> dg.AssetCheckResult:
    if len(results) == 1:
        return results[0]
    return dg.AssetCheckResult(
        passed=all(r.passed for r in results),
        metadata={f"{i}: {k}": v for i, r in enumerate(results) for k, v in (r.metadata or {}).items()},
    )


def build_report_checks(pipeline: DvcPipeline, group: StageGroup) -> list[dg.AssetChecksDefinition]:
    """One blocking check per report name of ``group``."""
    by_name: dict[str, dict[str | None, str]] = {}
    for key, item in group.items.items():
        for report in item.reports:
            by_name.setdefault(check_name(report, key), {})[key] = report
    checks = []
    for name, reports in by_name.items():
        checks.append(_report_check(group, name, reports))
    return checks


def _report_check(group: StageGroup, name: str, reports: dict[str | None, str]) -> dg.AssetChecksDefinition:
    @dg.asset_check(
        asset=group.name,
        name=name,
        blocking=True,
        partitions_def=partitions_def(group),
        description=f"Validation report(s) {sorted(reports.values())} written by stage {group.name!r}: "
        "passes when the report's `success` and every entry of its `checks` are true.",
    )
    def _check(context: dg.AssetCheckExecutionContext, dvc: DvcResource) -> dg.AssetCheckResult:
        keys: list[str | None]
        if group.partitioned and context.op_execution_context.has_partition_key_range:
            keys = list(context.op_execution_context.partition_keys)
        else:
            keys = [None] if None in reports else list(reports)
        return _merge([evaluate_report(dvc.root / reports[key]) for key in keys if key in reports])

    return _check


def build_checks(pipeline: DvcPipeline) -> list[dg.AssetChecksDefinition]:
    return [check for group in pipeline.groups.values() for check in build_report_checks(pipeline, group)]
