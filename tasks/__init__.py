"""Thin Prefect tasks around the stages, the stage cache, launching and MLflow tracking."""
