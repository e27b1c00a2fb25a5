"""Dagster definitions built from dvc.yaml (see the orchestration issue)."""
