"""The ablation's arms as Ray tasks, through prefect-ray: one Prefect task run per arm, placed by Ray.

Why it is built this way:
- The unit of work is the same job dict the local process pool runs (`components.experiments.ablation.make_job`
  → `run_job`), so both executors train and score the same thing and must agree on the results;
  only where the job runs changes. `run_jobs_on_ray` has `run_jobs`'s contract (results in the jobs'
  order, a failing arm is a result with status "failed", never an exception) so the sweep can take
  either.
- Each arm is a Prefect task submitted to a `RayTaskRunner` under `remote_options(num_gpus=…,
  num_cpus=…)`: Ray schedules it on a node with a free GPU, Prefect records it as a task run of the
  ablation flow (state, logs, retries) like any other task.
- GPUs: `gpus_per_arm` null asks for one GPU per arm when the cluster has any and none otherwise,
  so the same params run on a laptop's local Ray and on a GPU cluster. Asking for more GPUs than the
  cluster has is refused up front: Ray would otherwise leave the arms pending forever.
- Ray is an extra (`pip install -e ".[ray]"`); nothing here imports it until it is used, so the
  default install and `import flows` stay light.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from components.core.config import ParamsError

Reporter = Callable[[int, int, dict[str, Any]], None]
RAY_NAMESPACE = "mrt"


def ray_installed() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("ray", "prefect_ray"))


def _require_ray() -> None:
    if not ray_installed():
        raise ParamsError(
            "ablate.executor: 'ray' needs Ray and prefect-ray, which are an extra: "
            "pip install -e '.[ray]' (or set ablate.executor: local)"
        )


def resolve_gpus(gpus_per_arm: float | None, cluster_gpus: float) -> float:
    """GPUs each arm asks Ray for. None: one when the cluster has GPUs, else zero (CPU arms)."""
    if gpus_per_arm is None:
        return 1.0 if cluster_gpus >= 1 else 0.0
    if gpus_per_arm < 0:
        raise ParamsError(f"ablate.gpus_per_arm: must be >= 0, got {gpus_per_arm}")
    if gpus_per_arm > cluster_gpus:
        raise ParamsError(
            f"ablate.gpus_per_arm: {gpus_per_arm:g} GPUs per arm but the Ray cluster has {cluster_gpus:g}; "
            "no arm could ever be scheduled (set it to null or at most the cluster's GPUs)"
        )
    return float(gpus_per_arm)


@task(name="mrt-ablation-arm", retries=0, cache_policy=NO_CACHE, persist_result=False)  # rows travel in memory
def arm_task(job: dict[str, Any], threads: int) -> dict[str, Any]:
    """One arm in a Ray worker: the offline env and the thread count first, then `run_job`."""
    from components.experiments.ablation import run_job
    from components.core.offline import set_offline_env

    set_offline_env()
    for var in ("MRT_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    result = run_job(job)
    result["executor"] = "ray"
    import ray

    result["ray_gpu_ids"] = [str(g) for g in ray.get_gpu_ids()]  # what Ray gave this arm (CUDA_VISIBLE_DEVICES)
    result["ray_node"] = ray.get_runtime_context().get_node_id()
    return result


def _failed(job: dict[str, Any], error: str) -> dict[str, Any]:
    return {"key": job["key"], "status": "failed", "error": error, "pid": None, "train": None,
            "benchmark": None, "wall_s": None, "job_wall_s": None, "executor": "ray"}


@flow(name="mrt-ablation-ray", persist_result=False)
def ray_arms_flow(jobs: list[dict[str, Any]], gpus: float, threads: int) -> list[dict[str, Any]]:
    """Submit every arm as a Ray task asking for `gpus` GPUs and `threads` CPUs; results in job order."""
    from prefect_ray.context import remote_options

    with remote_options(num_cpus=threads, num_gpus=gpus):
        futures = [arm_task.with_options(task_run_name=f"arm-{job['key']}").submit(job, threads) for job in jobs]
    results = []
    for job, fut in zip(jobs, futures):
        try:
            results.append(fut.result())
        except Exception as exc:  # noqa: BLE001 - a worker lost by Ray is a failed arm, not a failed sweep
            results.append(_failed(job, f"{type(exc).__name__}: {exc}"))
    return results


def run_jobs_on_ray(
    jobs: Sequence[dict[str, Any]],
    gpus_per_arm: float | None = None,
    threads: int = 1,
    address: str | None = None,
    report: Reporter | None = None,
    num_cpus: int | None = None,
) -> list[dict[str, Any]]:
    """Run every job as a Ray task (via a prefect-ray flow); results in the jobs' order.

    `address` None starts a local Ray instance (`num_cpus` CPUs, default all) and shuts it down
    afterwards; "auto" or "ray://host:10001" joins a running cluster. When Ray is already initialised
    in this process that instance is used and left running. `report(done, total, result)` is called
    per arm once all have finished (`components.experiments.ablation.print_progress` fits).
    """
    _require_ray()
    import ray
    from prefect_ray.task_runners import RayTaskRunner

    jobs = list(jobs)
    if not jobs:
        return []
    if threads < 1:
        raise ParamsError(f"ablate.threads_per_worker: must be >= 1, got {threads}")
    started_here = False
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"namespace": RAY_NAMESPACE, "include_dashboard": False, "log_to_driver": False}
        if address:
            ray.init(address, **kwargs)
        else:
            ray.init(num_cpus=num_cpus, **kwargs)
        started_here = True
    try:
        cluster = ray.cluster_resources()
        gpus = resolve_gpus(gpus_per_arm, float(cluster.get("GPU", 0)))
        if threads > cluster.get("CPU", 0):
            raise ParamsError(
                f"ablate.threads_per_worker: {threads} CPUs per arm but the Ray cluster has {cluster.get('CPU', 0):g}"
            )
        runner = RayTaskRunner(init_kwargs={"namespace": RAY_NAMESPACE})  # joins the instance started above
        results = ray_arms_flow.with_options(task_runner=runner)(jobs, gpus, threads)
    finally:
        if started_here:
            ray.shutdown()
    if report is not None:
        for i, res in enumerate(results, 1):
            report(i, len(results), res)
    return results


def jobs_runner(ablate) -> Callable[..., list[dict[str, Any]]] | None:
    """The job runner `ablate.executor` asks for: None for "local" (the sweep's own process pool), or
    for "ray" a callable `(jobs, report=None) -> results` with `components.experiments.ablation.run_jobs`' contract,
    bound to ablate's gpus_per_arm, threads_per_worker and ray_address. Fails at once, naming the
    extra, when Ray is not installed (not after the base was trained)."""
    if ablate.executor != "ray":
        return None
    _require_ray()

    def run(jobs: Sequence[dict[str, Any]], report: Reporter | None = None) -> list[dict[str, Any]]:
        return run_jobs_on_ray(jobs, ablate.gpus_per_arm, ablate.threads_per_worker, ablate.ray_address, report)

    return run
