"""Prefect flows that orchestrate `components` (pipeline, ablation, scheduled retraining)."""
