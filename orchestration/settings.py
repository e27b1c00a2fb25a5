"""Where the DVC project is, and the ``orchestration`` section of its params.yaml (the model lives here).

The project directory is ``$GAMENGEN_PROJECT_DIR`` when set, else the current directory when it holds a
``dvc.yaml``, else the repository this package lives in.

``components.params`` keeps the ``orchestration`` section as an untyped mapping, so the ML library knows nothing
of Dagster; :func:`load_settings` validates it (only this section, so a project whose other sections differ still
loads) and names the bad key, e.g. ``orchestration.retraining_cron: must be a 5-field cron string ...``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from components.params import ParamsError, format_validation_error, read_yaml

PROJECT_DIR_ENV = "GAMENGEN_PROJECT_DIR"
PACKAGE_REPO = Path(__file__).resolve().parent.parent
SECTION = "orchestration"  # the params.yaml section read here
PARAMS_FILE = "params.yaml"
MODEL_FILE = "orchestration/settings.py"  # named by "unknown key" errors: the allowed keys are listed here


class OrchestrationSettings(BaseModel):
    """Dagster schedules and DVC remote use (README "Dagster" and "Scale-out")."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    retraining_cron: str = Field(
        "0 3 * * 0", description="cron of the `scheduled_retraining` schedule (5 fields; default Sunday 03:00)"
    )
    retraining_timezone: str = Field("UTC", min_length=1, description="IANA time zone of retraining_cron")
    retraining_seed_param: str = Field(
        "raw_trajectories.seed",
        min_length=1,
        description="param set to a fresh seed by each scheduled retraining (`dvc exp run -S <this>=<seed>`)",
    )
    pull_before_repro: bool = Field(
        True, description="materializing runs `dvc repro --pull`: restores outs/run-cache from the remote if there"
    )
    push_after_repro: bool = Field(True, description="push outs and run-cache to the default DVC remote after a run")
    require_remote: bool = Field(
        False, description="fail the asset when the push fails (set true on distributed executors)"
    )
    check_command: str = Field(
        "python -m components check",
        description="validates params.yaml before each `dvc repro` / `dvc exp run` (gets -S KEY=VALUE too); '' = none",
    )

    @field_validator("retraining_cron")
    @classmethod
    def _five_field_cron(cls, value: str) -> str:
        fields = value.split()
        allowed = set("0123456789*/,-")
        if len(fields) != 5 or any(not set(f) <= allowed for f in fields):
            raise ValueError(f"must be a 5-field cron string such as '0 3 * * 0', got {value!r}")
        return value


def project_dir() -> Path:
    """The DVC project the Dagster definitions describe."""
    if os.environ.get(PROJECT_DIR_ENV):
        return Path(os.environ[PROJECT_DIR_ENV]).resolve()
    if (Path.cwd() / "dvc.yaml").is_file():
        return Path.cwd().resolve()
    return PACKAGE_REPO


def parse_settings(section: Any, source: str = PARAMS_FILE) -> OrchestrationSettings:
    """Validate the ``orchestration`` mapping (None = all defaults); ``ParamsError`` names every bad key."""
    try:
        return OrchestrationSettings.model_validate(section or {})
    except ValidationError as error:
        lines = format_validation_error(error, models_in=MODEL_FILE).splitlines()
        # "key: rule" -> "orchestration.key: rule"; ": rule" (the section itself) -> "orchestration: rule"
        keyed = [SECTION + (line if line.startswith(":") else f".{line}") for line in lines]
        raise ParamsError(f"invalid {source}:\n" + "\n".join(keyed)) from None


def load_settings(root: Path) -> OrchestrationSettings:
    """The validated ``orchestration`` section of ``root/params.yaml`` (defaults when the file or section is absent)."""
    path = root / PARAMS_FILE
    raw = read_yaml(path) if path.is_file() else {}
    return parse_settings(raw.get(SECTION), source=str(path))
