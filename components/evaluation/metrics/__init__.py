"""Benchmark metrics: pure functions (`text`, `mme`) and local `evaluate` modules loaded by path.

`evaluate` is imported only inside :func:`load_metric` (it takes 5–9 s to import). The modules are
folders `<name>/<name>.py` next to this file; `evaluate.load(path)` copies the script into its
dynamic-modules cache (``$HF_MODULES_CACHE/evaluate_modules/metrics/<name>/<hash>/``, by default
under ``~/.cache/huggingface/modules``) and imports it from there, which works with
``HF_EVALUATE_OFFLINE=1`` and no network. The copied script imports ``components.evaluation.metrics.*`` from
the installed package, so the rules are never duplicated into the cache.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

METRICS_DIR = Path(__file__).resolve().parent
METRIC_NAMES = ("vf_exact_match", "vf_option_letter", "mme_score")


def metric_path(name: str) -> Path:
    """The folder of a local metric module; ValueError for a name that is not one."""
    if name not in METRIC_NAMES:
        raise ValueError(f"unknown metric {name!r}; local metrics: {', '.join(METRIC_NAMES)}")
    path = METRICS_DIR / name
    if not (path / f"{name}.py").is_file():
        raise FileNotFoundError(f"metric module missing: {path / (name + '.py')}")
    return path


def load_metric(name: str, **kwargs: Any):
    """`evaluate.load` of a local metric module by path (never the hub).

    Defaults to ``keep_in_memory=True`` so computing writes no Arrow cache files; keyword arguments
    go to `evaluate.load` (e.g. ``experiment_id``, or ``keep_in_memory=False`` with ``num_process``
    for distributed evaluation).
    """
    path = metric_path(name)
    import evaluate  # lazy: 5–9 s import

    kwargs.setdefault("keep_in_memory", True)
    return evaluate.load(str(path), **kwargs)
