"""Blocking asset checks read from the validation reports that stages write (generic, no per-stage code).

Convention: a stage that gates its downstream writes ``reports/<name>.json`` and lists it in its dvc.yaml
``outs`` with ``cache: false``::

    {"success": true, "checks": [{"name": "latents_finite", "success": true, ...}, ...], "summary": "..."}

Each such report becomes one ``blocking=True`` asset check on the stage's asset, named after the report file
(``reports/validated_latents.json`` -> check ``validated_latents``). The check fails (severity ERROR, so the
downstream assets of the run are skipped) when ``success`` is false, any entry of ``checks`` failed, or the
report is missing or malformed. For a foreach stage, each partition's own report is read.
"""
# No `from __future__ import annotations` here: Dagster reads the context type from the signature.

import json
import re
from pathlib import Path
from typing import Any

import dagster as dg

from orchestration.assets import partitions_def
from orchestration.dvc_graph import DvcPipeline, StageGroup
from orchestration.resources import DvcResource


def check_name(report: str, key: str | None = None) -> str:
    """A valid check name from a report path; a foreach item's key is dropped so its items share one check."""
    stem = Path(report).stem
    if key is not None:
        stem = stem.replace(str(key), "")
    return re.sub(r"[^A-Za-z0-9_]+", "_", stem).strip("_") or "report"


def evaluate_report(path: Path) -> dg.AssetCheckResult:
    """Pass/fail and metadata from one report file."""
    if not path.is_file():
        return dg.AssetCheckResult(
            passed=False, metadata={"problem": f"{path.name} is missing: the stage did not write its report"}
        )
    try:
        report: Any = json.loads(path.read_text())
        if not isinstance(report, dict) or not isinstance(report.get("success"), bool):
            raise ValueError('top level must be an object with a boolean "success"')
        entries = report.get("checks", [])
        if not isinstance(entries, list) or not all(isinstance(e, dict) and "name" in e for e in entries):
            raise ValueError('"checks" must be a list of objects with a "name" and a boolean "success"')
    except ValueError as error:
        return dg.AssetCheckResult(passed=False, metadata={"problem": f"{path.name} is malformed: {error}"})
    failed = [str(e["name"]) for e in entries if e.get("success") is not True]
    rows = [f"| {e['name']} | {'pass' if e.get('success') is True else '**FAIL**'} |" for e in entries]
    summary = {"summary": str(report["summary"])} if "summary" in report else {}
    return dg.AssetCheckResult(
        passed=bool(report["success"]) and not failed,
        description=summary.get("summary"),
        metadata={
            **summary,
            "report": dg.MetadataValue.path(str(path)),
            "checks passed": len(entries) - len(failed),
            "checks failed": dg.MetadataValue.json(failed),
            "details": dg.MetadataValue.md("| check | result |\n| --- | --- |\n" + "\n".join(rows)),
        },
    )


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
        if group.partitioned and context.op_execution_context.has_partition_key_range:
            keys = list(context.op_execution_context.partition_keys)
        else:
            keys = [None] if None in reports else list(reports)
        return _merge([evaluate_report(dvc.root / reports[key]) for key in keys if key in reports])

    return _check


def build_checks(pipeline: DvcPipeline) -> list[dg.AssetChecksDefinition]:
    return [check for group in pipeline.groups.values() for check in build_report_checks(pipeline, group)]
