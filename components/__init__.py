"""GameNGen pipeline: the ML library (plain Python and torch; no Dagster import here)."""
