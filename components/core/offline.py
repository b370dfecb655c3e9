"""Turn off everything that phones home. Called by the CLI, the flows and the tests before heavy imports.

Each variable is set only when the environment does not set it already, so any of them is the user's
to turn back on for one command: `HF_HUB_OFFLINE=0 mrt align …` lets `align.model` (a hub id) be
downloaded into the local Hugging Face cache once; later commands find it there with the hub off."""

from __future__ import annotations

import os

OFFLINE_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_EVALUATE_OFFLINE": "1",
    "GX_ANALYTICS_ENABLED": "false",
    "TOKENIZERS_PARALLELISM": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' "Loading weights" bars; ours use rich
    "DO_NOT_TRACK": "1",  # Prefect's (and other tools') do-not-track switch: no usage telemetry
}


def set_offline_env() -> None:
    """Set the offline variables unless the user already chose a value."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
