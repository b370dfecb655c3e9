"""Ablation fan-out on Ray (flows/ray_runner.py): arms as Ray tasks through prefect-ray, on a local
Ray cluster on CPU. The arms must give exactly what the local executor gives, and ask Ray for one
GPU each when the cluster has GPUs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from components.core.config import ParamsError  # noqa: E402

ray = pytest.importorskip("ray", reason="the [ray] extra is not installed (pip install -e '.[ray]')")
pytest.importorskip("prefect_ray")

from flows.ray_runner import resolve_gpus, run_jobs_on_ray  # noqa: E402


def test_gpus_per_arm_defaults_to_one_when_the_cluster_has_gpus():
    assert resolve_gpus(None, 0) == 0
    assert resolve_gpus(None, 4) == 1
    assert resolve_gpus(0.5, 1) == 0.5
    assert resolve_gpus(2, 8) == 2


def test_more_gpus_per_arm_than_the_cluster_has_is_refused():
    with pytest.raises(ParamsError, match="gpus_per_arm.*cluster has 1"):
        resolve_gpus(2, 1)
    with pytest.raises(ParamsError, match="gpus_per_arm"):
        resolve_gpus(1, 0)


def test_executor_param_picks_the_runner(monkeypatch):
    from components.core.config import AblateParams
    from flows import ray_runner

    assert ray_runner.jobs_runner(AblateParams()) is None  # local: the sweep's own process pool
    assert callable(ray_runner.jobs_runner(AblateParams(executor="ray", gpus_per_arm=1)))
    monkeypatch.setattr(ray_runner, "ray_installed", lambda: False)
    with pytest.raises(ParamsError, match=r"pip install -e '\.\[ray\]'"):
        ray_runner.jobs_runner(AblateParams(executor="ray"))
    with pytest.raises(ParamsError, match="executor"):
        from components.core.config import load_params

        load_params("params.yaml", ["ablate.executor=dask"])


def test_no_jobs_needs_no_cluster():
    assert run_jobs_on_ray([]) == []
    assert not ray.is_initialized()


@pytest.fixture(scope="module")
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def two_arms(tiny_setup, tmp_path_factory):
    """Two smoke arms (different placements) on the tiny data set and base: (jobs for ray, jobs for local)."""
    from tiny_sweep import SMALL_EDITORS, bench_params, train_params

    from components.experiments.ablation import make_job

    root = tmp_path_factory.mktemp("ray_arms")
    data, base = tiny_setup
    tp, bp = train_params(root, data, base), bench_params(root, data, base)
    only_proj = SMALL_EDITORS.model_copy(update={
        "visual": SMALL_EDITORS.visual.model_copy(update={"layers": "none"}),
        "prefix": SMALL_EDITORS.prefix.model_copy(update={"layers": "none"}),
        "suffix": SMALL_EDITORS.suffix.model_copy(update={"layers": "none"})})

    def jobs(where: str):
        return [make_job(f"{name}/seed-0", tp, bp, root / where / name, per_task=2, method="mrt", editors=ed,
                         seed=0, steps=3)
                for name, ed in (("all", SMALL_EDITORS), ("only-projector", only_proj))]

    return jobs


def _summary(result):
    tr, bm = result["train"], result["benchmark"]
    return {"status": result["status"], "trainable": tr["trainable_params"], "loss": (tr["loss_first"], tr["loss_final"]),
            "heldout": bm["heldout"], "mean": bm["heldout_mean"], "mme": bm.get("mme_total")}


@pytest.mark.slow
def test_arms_on_a_local_ray_cluster_match_the_local_executor(two_arms, prefect_api):
    from components.experiments.ablation import run_jobs

    local = run_jobs(two_arms("local"), workers=1, threads=1, report=None)
    seen = []
    on_ray = run_jobs_on_ray(two_arms("ray"), gpus_per_arm=None, threads=1, num_cpus=2,
                             report=lambda d, n, r: seen.append((d, n, r["key"])))
    assert not ray.is_initialized(), "a Ray instance started for the sweep must be shut down after it"
    assert [r["key"] for r in on_ray] == ["all/seed-0", "only-projector/seed-0"]
    assert all(r["executor"] == "ray" and r["status"] == "ok" for r in on_ray), [r.get("error") for r in on_ray]
    assert all(r["ray_gpu_ids"] == [] for r in on_ray)  # no GPUs in the cluster: none asked for
    assert [_summary(r) for r in on_ray] == [_summary(r) for r in local]
    assert _summary(on_ray[0])["trainable"] != _summary(on_ray[1])["trainable"]  # two different arms really ran
    assert seen == [(1, 2, "all/seed-0"), (2, 2, "only-projector/seed-0")]
    for job in two_arms("ray"):  # each arm wrote its outputs where make_job said, not in a Ray temp dir
        assert Path(job["train"]["out_dir"], "editors.safetensors").is_file()
        assert Path(job["bench"]["report"]).is_file()


@pytest.mark.slow
def test_each_arm_asks_ray_for_one_gpu_when_the_cluster_has_gpus(two_arms, prefect_api):
    # A CPU machine can declare a GPU resource to Ray: scheduling is what is under test, not CUDA.
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    try:
        on_ray = run_jobs_on_ray(two_arms("ray-gpu"), gpus_per_arm=None, threads=1)
        assert ray.is_initialized(), "an instance the caller started is left running"
    finally:
        ray.shutdown()
    assert [r["status"] for r in on_ray] == ["ok", "ok"], [r.get("error") for r in on_ray]
    assert [r["ray_gpu_ids"] for r in on_ray] == [["0"], ["0"]]  # one GPU each; with one GPU they took turns
