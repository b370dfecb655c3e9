"""Shared test setup: offline environment before anything heavy is imported, GPU marker handling."""

from __future__ import annotations

from components.core.offline import set_offline_env

set_offline_env()

import os  # noqa: E402

import pytest  # noqa: E402


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch missing is a broken install anyway
        return False


# Without a GPU, Triton (when installed) must run kernels in its interpreter; it reads this when it
# is first imported, so it is set before any test module imports it (tests/test_editor_kernels.py).
if not _has_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# README's Reliability table: `--reliability-report PATH` records every @pytest.mark.reliability case.
pytest_plugins = ["reliability_plugin"]


def pytest_collection_modifyitems(config, items):
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    """One temporary Prefect server (SQLite) and PREFECT_HOME for the session (starting a
    server costs 8-20 s, so tests that need one share it). Not autouse: only flow tests pay for it.
    Yields the temporary PREFECT_HOME (task results are persisted under it)."""
    from prefect.settings import PREFECT_HOME, PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    home = tmp_path_factory.mktemp("prefect-home")
    with temporary_settings(updates={PREFECT_HOME: str(home), PREFECT_LOCAL_STORAGE_PATH: str(home / "storage")}):
        with prefect_test_harness(server_startup_timeout=None):
            yield home
