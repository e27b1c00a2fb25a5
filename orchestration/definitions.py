"""The Dagster ``defs`` of this project, built from dvc.yaml when the code location loads.

    make ui                                                          # dagster dev, see orchestration/ui.py
    dagster asset materialize -m orchestration.definitions --select rl_agent

A stage added to dvc.yaml appears after a reload of the code location (UI: "Reload definitions").
The project directory is ``$GAMENGEN_PROJECT_DIR``, else the current directory if it has a dvc.yaml, else
this repository (``orchestration.settings.project_dir``).
"""

from orchestration.builder import build_definitions

defs = build_definitions()
