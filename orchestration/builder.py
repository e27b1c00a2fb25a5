"""``build_definitions(root)``: the Dagster ``Definitions`` of a DVC project, read from its dvc.yaml.

``orchestration.definitions.defs`` is this for the project directory; tests call it for temporary projects.
"""

from pathlib import Path

import dagster as dg

from orchestration.assets import build_assets
from orchestration.checks import build_checks
from orchestration.dvc_graph import load_pipeline
from orchestration.jobs import full_pipeline, retraining_job
from orchestration.lock_sync import build_lock_sync_sensor
from orchestration.resources import DvcResource
from orchestration.schedules import build_retraining_schedule
from orchestration.settings import load_settings, project_dir


def build_definitions(root: str | Path | None = None) -> dg.Definitions:
    """Definitions for the DVC project at ``root`` (default: ``settings.project_dir()``)."""
    root = Path(root).resolve() if root else project_dir()
    pipeline = load_pipeline(root)
    return dg.Definitions(
        assets=build_assets(pipeline),
        asset_checks=build_checks(pipeline),
        jobs=[full_pipeline, retraining_job],
        schedules=[build_retraining_schedule(load_settings(root))],
        sensors=[build_lock_sync_sensor(root)],
        resources={"dvc": DvcResource(project_dir=str(root))},
    )
