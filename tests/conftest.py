"""Shared test setup: offline environment before anything heavy is imported, GPU marker handling,
and the fixtures several test modules share (a Prefect server, a tiny data set + base, MLflow stores)."""

from __future__ import annotations

from components.core.offline import set_offline_env

set_offline_env()

import os  # noqa: E402
from pathlib import Path  # noqa: E402

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


@pytest.fixture(scope="session")
def tiny_setup(tmp_path_factory) -> tuple[Path, Path]:
    """(data_dir, base_dir): a small generated data set and an untrained tiny base learned from it,
    built once and only read by the sweep and stage-run tests (their machinery is under test, not the
    scores)."""
    from tiny_llava import save_tiny_base, write_tiny_data

    root = tmp_path_factory.mktemp("tiny_setup")
    data = write_tiny_data(root / "data", train_per_task=4, heldout_per_task=2, heldin_per_task=1, align_size=8,
                           text_per_type=2, mme_images_per_subtask=1)
    return data, save_tiny_base(data, root / "base", max_length=256)


@pytest.fixture(scope="session")
def migrated_db(tmp_path_factory) -> Path:
    """An empty, fully migrated MLflow SQLite database. Creating one runs every schema migration
    (~6 s on a busy 2-core machine), so tests copy this file instead."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow_template") / "mlflow.db"
    cwd = os.getcwd()
    os.chdir(path.parent)  # the Default experiment's artifact root (./mlruns) is fixed at creation
    try:
        MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    finally:
        os.chdir(cwd)
    return path


@pytest.fixture
def store(tmp_path, monkeypatch, migrated_db):
    """A SQLite MLflow store of this test's own (a copy of `migrated_db`); cwd moves to tmp_path so
    ./mlruns artifacts land there too. Returns the test's TrackParams (promotion_helpers.fast_track)."""
    import shutil

    from promotion_helpers import fast_track

    shutil.copyfile(migrated_db, tmp_path / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    return fast_track()


@pytest.fixture(scope="session")
def tiny_artifacts(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(base_dir, editors_dir, an image): a saved tiny base and random editors on it
    (promotion_helpers.build_model), shared read-only by the registry and promotion tests."""
    from promotion_helpers import build_model

    return build_model(tmp_path_factory.mktemp("tiny_model"))
