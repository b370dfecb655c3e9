"""Scheduled retraining: the mrt-pipeline flow as a cron deployment (params section `deploy`).

Both ways need a Prefect server that outlives this process (`prefect server start --host 127.0.0.1`
and PREFECT_API_URL=http://127.0.0.1:4200/api): without PREFECT_API_URL, Prefect would start a
temporary server that dies with the process, taking the schedule and its run history with it, so
`mrt deploy` refuses (`api_url`).

Two ways to run the schedule:
- `deploy.work_pool: null` — `serve`: this process registers the deployment and runs every
  scheduled run itself. It blocks; stop it with Ctrl-C (SIGINT) or SIGTERM to its PID.
- `deploy.work_pool: <pool>` — the deployment is registered on that work pool and returns at once;
  a worker (`prefect worker start --pool <pool>`) picks the runs up. The flow is loaded from this
  repository (`from_source(<repo root>, "flows/pipeline.py:mrt_pipeline")`), and runs with the repo
  root as working directory, so relative paths in params files mean the same as for `mrt run`.

Each scheduled run calls mrt_pipeline(params_file=deploy.params_file) in the repository root;
when `dvc status` reports no change in any stage's code, data or params it ends "up to date"
within seconds, otherwise DVC reruns exactly the stale stages.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from components.core.config import DeployParams

ENTRYPOINT = "flows/pipeline.py:mrt_pipeline"


class DeployError(RuntimeError):
    """The deployment cannot be registered as asked; the message says what to do."""


def api_url() -> str:
    """The Prefect server the deployment goes to (PREFECT_API_URL). Raises DeployError when unset: a
    temporary server would vanish with this process, and the schedule with it."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise DeployError(
            "mrt deploy needs a Prefect server that outlives it, and PREFECT_API_URL is not set (Prefect would "
            "serve the schedule on a temporary server that stops with this command). Start one and point at it:\n"
            "  prefect server start --host 127.0.0.1 &\n"
            "  export PREFECT_API_URL=http://127.0.0.1:4200/api")
    return str(url)
REPO_ROOT = Path(__file__).resolve().parents[1]


def _schedule(dp: DeployParams):
    from prefect.schedules import Cron

    return Cron(dp.cron, timezone=dp.timezone)


def build_deployment(dp: DeployParams, source: str | Path | None = None):
    """The RunnerDeployment for `dp` (not yet registered).

    Without a work pool: `mrt_pipeline.to_deployment(...)` for `serve`. With one: the flow loaded
    `from_source` (default: this repository) so that a process worker finds the code by entrypoint."""
    from flows.pipeline import mrt_pipeline
    from flows.repro import profile_name

    kw: dict[str, Any] = dict(
        name=dp.name,
        schedule=_schedule(dp),
        parameters={"params_file": dp.params_file},
        description=f"Retrain, benchmark and gate the MRT editors on cron '{dp.cron}' ({dp.timezone}).",
        tags=["mrt", "retrain", f"profile:{profile_name(dp.params_file)}"],
    )
    if dp.work_pool is None:
        return mrt_pipeline.to_deployment(**kw)
    flow_from_repo = mrt_pipeline.from_source(source=str(source or REPO_ROOT), entrypoint=ENTRYPOINT)
    return flow_from_repo.to_deployment(work_pool_name=dp.work_pool, **kw)


def register(dp: DeployParams, source: str | Path | None = None) -> str:
    """Register (create or update) the deployment on the Prefect server; returns its id. With no work
    pool the runs still need a process that serves it (see `serve`)."""
    return str(build_deployment(dp, source).apply())


SHUTDOWN_GRACE_S = 30.0  # after Ctrl-C, how long Prefect may take to pause the schedule and close


def serve(dp: DeployParams, on_forced_stop: Callable[[], None] | None = None) -> None:  # pragma: no cover - blocks
    """Register the deployment and run its scheduled runs in this process until Ctrl-C / SIGTERM.

    Ctrl-C raises KeyboardInterrupt at once (Prefect then shuts its runner down), instead of asyncio's
    default of cancelling the main task, which a task that outlives its cancellation can leave hanging.
    If the shutdown takes longer than SHUTDOWN_GRACE_S, or on a second Ctrl-C, the process leaves
    anyway (after `on_forced_stop`): one Ctrl-C always stops `mrt deploy`."""
    import os
    import signal
    import sys
    import threading

    from prefect import serve as prefect_serve

    def leave() -> None:
        if on_forced_stop is not None:
            on_forced_stop()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    def on_sigint(signum, frame):
        if getattr(on_sigint, "fired", False):
            leave()
        on_sigint.fired = True
        timer = threading.Timer(SHUTDOWN_GRACE_S, leave)
        timer.daemon = True
        timer.start()
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint) if threading.current_thread() is threading.main_thread() else None
    try:
        prefect_serve(build_deployment(dp))
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def deploy(dp: DeployParams, on_forced_stop: Callable[[], None] | None = None) -> str | None:
    """`mrt deploy`: serve (work_pool null; blocks, returns None) or register on the pool (returns the id)."""
    if dp.work_pool is None:
        serve(dp, on_forced_stop)
        return None
    return register(dp)
