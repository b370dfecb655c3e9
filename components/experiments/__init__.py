"""Across runs: the method comparison, the placement ablation, headline metrics and reports."""
