"""A complete, tiny workspace for the reliability tests (bad input, faults, security, reproducibility).

One "golden" workspace is built once per test session — a generated data set (32 px), a saved tiny
base, editors trained on it for two steps, a second base of the same shape (for "editors from another
base"), and an MLflow store holding a finished run and a registered model version with the
`champion` alias — and every test works on its own copy of it, so a test may break whatever it likes.
The CLI is driven end to end (`flows.cli.app`) with a params file whose every path points
inside the copy, and `snapshot` hashes what a failing command must leave untouched: the data, the
models and the MLflow store (tracking and registry).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from components.core.hashing import dir_hash

REGISTERED_MODEL = "mrt-editors"
_GOLDEN: dict[str, Path] = {}


@dataclass
class Workspace:
    root: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def base(self) -> Path:
        return self.models / "base"

    @property
    def other_base(self) -> Path:
        return self.models / "other-base"

    @property
    def editors(self) -> Path:
        return self.models / "editors"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def mlflow_db(self) -> Path:
        return self.root / "mlflow.db"

    @property
    def params(self) -> Path:
        return self.root / "params.yaml"

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.mlflow_db}"

    def annotation(self, split: str) -> Path:
        return self.data / f"annotation_{split}.json"


def params_for(ws: Workspace) -> dict[str, Any]:
    """Every path inside the workspace; sizes small enough for a CLI call to take about a second."""
    r, d = ws.reports, str(ws.data)
    params = {
        "validate": {"data_dir": d, "report": str(r / "validation.json")},
        "train": {
            "base_dir": str(ws.base), "data_dir": d, "out_dir": str(ws.models / "editors-new"),
            "report": str(r / "train.json"), "curve": str(r / "train_curve.csv"),
            "steps": 2, "batch_size": 4, "save_every": 1, "max_length": 512, "eval_per_task": 1,
            "eval_batch_size": 8, "eval_max_new_tokens": 2,
            "editors": {"visual": {"layers": "all", "rank": 2}, "projector": {"enabled": True, "rank": 2},
                        "prefix": {"layers": "all", "rank": 2, "length": 2},
                        "suffix": {"layers": "all", "rank": 2, "length": 2}},
        },
        "predict": {"max_new_tokens": 2, "batch_size": 4},
        "benchmark": {
            "data_dir": d, "base_dir": str(ws.base), "model_dir": str(ws.editors),
            "report": str(r / "benchmark.json"), "predictions": str(r / "predictions.jsonl"),
            "mme_results_dir": str(r / "mme_results"), "batch_size": 8, "max_new_tokens": 2, "perturbations": [],
        },
        "track": {"tracking_uri": ws.tracking_uri},
    }
    for section in ("validate", "align", "train", "benchmark", "promote", "ablate", "compare"):
        # headline metric files too: a test must never write into the checkout's reports/
        params.setdefault(section, {})["metrics"] = str(r / "metrics" / f"{section}.json")
    return params


def write_params(ws: Workspace, extra: dict[str, Any] | None = None) -> Path:
    params = params_for(ws)
    for section, values in (extra or {}).items():
        params.setdefault(section, {}).update(values)
    ws.params.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    return ws.params


def _build_golden(root: Path) -> Path:
    from components.core.config import TrainParams
    from components.train.training import train
    from tiny_llava import save_tiny_base, write_tiny_data

    ws = Workspace(root)
    write_tiny_data(ws.data, train_per_task=2, heldout_per_task=2, heldin_per_task=1, align_size=4, text_per_type=1,
                    mme_images_per_subtask=1)
    for seed, out in ((0, ws.base), (1, ws.other_base)):
        # nudged off the init, so that greedy answers are not all the same token
        save_tiny_base(ws.data, out, seed=seed, nudge_seed=seed + 10)
    tp = TrainParams.model_validate({**params_for(ws)["train"], "out_dir": str(ws.editors)})
    train(tp)
    _make_mlflow_store(ws)
    shutil.rmtree(ws.reports, ignore_errors=True)
    return root


def _make_mlflow_store(ws: Workspace) -> None:
    """A finished run with a metric and the editors as an artifact, registered as version 1 (champion)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import logging

    from mlflow.tracking import MlflowClient

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    client = MlflowClient(tracking_uri=ws.tracking_uri, registry_uri=ws.tracking_uri)
    exp = client.create_experiment("mrt", artifact_location=(ws.root / "mlartifacts").as_uri())
    run = client.create_run(exp, run_name="golden")
    client.log_metric(run.info.run_id, "heldout/mean", 0.25)
    client.set_terminated(run.info.run_id)
    client.create_registered_model(REGISTERED_MODEL)
    version = client.create_model_version(REGISTERED_MODEL, f"runs:/{run.info.run_id}/editors", run.info.run_id)
    client.set_registered_model_alias(REGISTERED_MODEL, "champion", version.version)


def golden(tmp_path_factory) -> Path:
    """The golden workspace of this session (built on first use)."""
    if "root" not in _GOLDEN:
        _GOLDEN["root"] = _build_golden(tmp_path_factory.getbasetemp() / "reliability-golden")
    return _GOLDEN["root"]


def workspace(tmp_path_factory, tmp_path: Path) -> Workspace:
    """A private copy of the golden workspace with its own params.yaml."""
    ws = Workspace(tmp_path / "ws")
    shutil.copytree(golden(tmp_path_factory), ws.root, symlinks=True)
    write_params(ws)
    return ws


def snapshot(ws: Workspace) -> dict[str, str]:
    """Content hashes of what no failing command may change: data, models, MLflow store."""
    return {
        "data": dir_hash(ws.data),
        "models": dir_hash(ws.models),
        "mlflow": dir_hash(ws.mlflow_db),
    }


def run_cli(ws: Workspace, *args: str):
    """`mrt <args> -p <workspace params>` in this process; MLFLOW_TRACKING_URI points at the store."""
    from typer.testing import CliRunner

    from flows.cli import app

    env = {"MLFLOW_TRACKING_URI": ws.tracking_uri, "MRT_NUM_THREADS": "1"}
    argv = [args[0], "-p", str(ws.params), *args[1:]]
    return CliRunner().invoke(app, argv, env=env, catch_exceptions=True)
