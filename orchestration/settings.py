"""Where the DVC project is, and the ``orchestration`` section of its params.yaml.

The project directory is ``$GAMENGEN_PROJECT_DIR`` when set, else the current directory when it holds a
``dvc.yaml``, else the repository this package lives in. Settings are read through ``components.params``
(the ``orchestration`` section only, so a project whose other sections differ still loads).
"""

from __future__ import annotations

import os
from pathlib import Path

from components.params import OrchestrationParams, ParamsError, format_validation_error, read_yaml
from pydantic import ValidationError

PROJECT_DIR_ENV = "GAMENGEN_PROJECT_DIR"
PACKAGE_REPO = Path(__file__).resolve().parent.parent


def project_dir() -> Path:
    """The DVC project the Dagster definitions describe."""
    if os.environ.get(PROJECT_DIR_ENV):
        return Path(os.environ[PROJECT_DIR_ENV]).resolve()
    if (Path.cwd() / "dvc.yaml").is_file():
        return Path.cwd().resolve()
    return PACKAGE_REPO


def orchestration_params(root: Path) -> OrchestrationParams:
    """The validated ``orchestration`` section of ``root/params.yaml`` (defaults when absent)."""
    path = root / "params.yaml"
    raw = read_yaml(path) if path.is_file() else {}
    try:
        return OrchestrationParams.model_validate(raw.get("orchestration") or {})
    except ValidationError as error:
        message = format_validation_error(error).replace("\n", "\norchestration.")
        raise ParamsError(f"invalid {path}:\norchestration.{message}") from None
