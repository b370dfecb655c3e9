"""How long does `mrt run` take, and how much of it is orchestration?

Question: the wall time of the whole default pipeline on CPU (target ≤ 15 minutes on 2 cores) and the
share that is not the components' own work (Prefect, MLflow, DVC bookkeeping; target ≤ 10%). Runs the
Prefect flow once and splits its time.

Arms (parts of one run):
- total_s: from before the Prefect server starts to the flow's return (what a user waits for);
- prefect_start_s: starting the temporary Prefect server (none when PREFECT_API_URL names a running one);
- stages: each stage's time as DVC ran it (the `mrt <stage>` process, its imports, DVC's hashing and
  dvc.lock), beside each stage's report `wall_s` (the components' own time) for cross-checking;
- overhead = (total_s − Σ stages) / total_s; overhead_in_flow excludes the server start.

By default it runs in a fresh workspace (a temporary git + DVC checkout of the code, dvc.yaml, params
and profiles: nothing cached, its own MLflow database and Prefect home), so the number is what a first
`mrt run` costs and this checkout is untouched; `--in-place` runs in this checkout (every stage forced).

Run:   python benchmarks/pipeline_run.py --json out.json        (default profile, ~9 min on 2 idle cores)
Check: python benchmarks/pipeline_run.py --smoke                (profiles/smoke.yaml, about a minute)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from components.core.offline import set_offline_env

REPORT_WALL = {  # stage → (params attribute path of its report, key holding its wall time)
    "align": ("align.report", "wall_s"),
    "train": ("train.report", "wall_s"),
    "benchmark": ("benchmark.report", "wall_s"),
    "compare": ("compare.report", "wall_s"),
}


def _workspace(params_file: str) -> Path:
    """A fresh checkout: the code, dvc.yaml, params and profiles, the DVC project, one git commit."""
    import subprocess

    ws = Path(tempfile.mkdtemp(prefix="mrt-pipeline-run-"))
    ignore = shutil.ignore_patterns("__pycache__", "tmp", "cache")
    for name in ("components", "flows", "profiles", ".dvc"):
        shutil.copytree(ROOT / name, ws / name, ignore=ignore)
    for name in ("dvc.yaml", "params.yaml", ".dvcignore", ".gitignore", "README.md"):
        shutil.copy2(ROOT / name, ws / name)
    if not (ws / params_file).is_file():
        (ws / params_file).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / params_file, ws / params_file)
    env = {**os.environ, "GIT_AUTHOR_NAME": "mrt", "GIT_AUTHOR_EMAIL": "mrt@localhost",
           "GIT_COMMITTER_NAME": "mrt", "GIT_COMMITTER_EMAIL": "mrt@localhost"}
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "workspace"]):
        subprocess.run(cmd, cwd=ws, check=True, env=env, capture_output=True)
    return ws


def _report_walls(params) -> dict[str, float | None]:
    out = {}
    for stage, (attr, key) in REPORT_WALL.items():
        section, field = attr.split(".")
        path = Path(getattr(getattr(params, section), field))
        try:
            out[stage] = json.loads(path.read_text(encoding="utf-8")).get(key)
        except (OSError, ValueError):
            out[stage] = None
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-p", "--params", default="params.yaml", help="params file (relative to the repo root)")
    ap.add_argument("-S", "--set", dest="overrides", action="append", default=[], help="section.key=value")
    ap.add_argument("--in-place", action="store_true", help="run in this checkout instead of a fresh workspace")
    ap.add_argument("--json", default=None, help="write the summary here")
    ap.add_argument("--smoke", action="store_true", help="the smoke profile in a fresh workspace: a logic check")
    args = ap.parse_args(argv)
    if args.smoke:
        args.params, args.in_place = "profiles/smoke.yaml", False

    set_offline_env()
    if args.json:
        args.json = str(Path(args.json).resolve())  # before a chdir into the workspace
    ws = None
    if not args.in_place:
        ws = _workspace(args.params)
        os.chdir(ws)
        os.environ["PREFECT_HOME"] = str(ws / ".prefect")
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{ws}/mlflow.db"
    t0 = time.perf_counter()
    from prefect.client.orchestration import get_client

    from components.core.config import load_params
    from flows.pipeline import mrt_pipeline

    params = load_params(args.params, args.overrides)
    t_server = time.perf_counter()
    with get_client(sync_client=True) as client:  # starts the temporary server when no API URL is set
        client.hello()
    prefect_start_s = time.perf_counter() - t_server
    result = mrt_pipeline(params_file=args.params, overrides=args.overrides, force=True)
    total_s = time.perf_counter() - t0

    stages = {k: round(v or 0.0, 2) for k, v in result["timings"].items()}
    stages_sum = sum(stages.values())
    flow_s = result["flow_s"]
    out = {
        "profile": args.params,
        "overrides": args.overrides,
        "workspace": "fresh" if ws else "in-place",
        "created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "status": result["status"],
        "total_s": round(total_s, 2),
        "prefect_start_s": round(prefect_start_s, 2),
        "flow_s": round(flow_s, 2),
        "stages": stages,
        "stages_sum_s": round(stages_sum, 2),
        "report_wall_s": _report_walls(params),
        "overhead_s": round(total_s - stages_sum, 2),
        "overhead_pct": round(100 * (total_s - stages_sum) / total_s, 1),
        "overhead_in_flow_pct": round(100 * (flow_s - stages_sum) / flow_s, 1),
        "target_overhead_pct": 10.0,
        "command": shlex.join(["python", "benchmarks/pipeline_run.py", *(sys.argv[1:] if argv is None else argv)]),
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"mrt run ({args.params}, {out['workspace']} workspace)", title_justify="left")
    table.add_column("part")
    table.add_column("seconds", justify="right")
    table.add_column("share", justify="right")
    for name, s in stages.items():
        table.add_row(name, f"{s:.1f}", f"{100 * s / total_s:.1f}%")
    table.add_row("Σ stages (components)", f"{stages_sum:.1f}", f"{100 * stages_sum / total_s:.1f}%")
    table.add_row("Prefect server start", f"{prefect_start_s:.1f}", f"{100 * prefect_start_s / total_s:.1f}%")
    table.add_row("orchestration overhead (incl. start)", f"{out['overhead_s']:.1f}", f"{out['overhead_pct']:.1f}%")
    table.add_row("overhead inside the flow", f"{flow_s - stages_sum:.1f}", f"{out['overhead_in_flow_pct']:.1f}%")
    table.add_row("total", f"{total_s:.1f}", "100%")
    Console().print(table)
    if ws:
        os.chdir(ROOT)
        shutil.rmtree(ws, ignore_errors=True)
    return out


if __name__ == "__main__":
    main()
