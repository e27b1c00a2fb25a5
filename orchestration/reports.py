"""Read the validation report a stage writes: pass/fail and metadata, for its asset check and its failure message.

Convention: a stage that gates its downstream writes ``reports/<name>.json`` and lists it in its dvc.yaml
``outs`` (cached, so that DVC keeps the stage's run-cache entry)::

    {"success": true, "checks": [{"name": "latents_finite", "success": true, ...}, ...], "summary": "..."}

A report passes when ``success`` is true and every entry of ``checks`` succeeded; a missing or malformed report
fails.
"""

import json
from pathlib import Path
from typing import Any

import dagster as dg


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
