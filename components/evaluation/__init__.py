"""Scoring a model: generation (inference), the metrics, image perturbations and the benchmark stage."""
