"""The placement ablation as a Prefect subflow: `mrt ablate`'s sweep, one MLflow child run per arm.

The sweep itself is `components.ablation.run_ablation` (a local process pool of spawned workers;
DESIGN.md's Ray path for clusters is not built yet), run by one cached task: its arms are
independent training runs whose results only mean something together (one CSV, one table, one
plot), so the unit of caching is the whole sweep, keyed like DVC's `ablate` stage. The arms' child
runs are created afterwards from each arm's report files, so a cached sweep still gives this
pipeline run its complete set of children.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.tasks import ablate_task, load, log_child_task, outputs_current

ABLATION_TABLE_KEY = "ablation-table"
TABLE_COLUMNS = ("arm", "seed", "groups", "trainable_params", "heldout_mean", "heldout_chance_corrected_mean",
                 "heldin_mean", "mme_total", "collapsed_heldout", "collapsed_heldin", "wall_s", "status")


def arm_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ablation rows reduced to the columns a table artifact shows."""
    return [{c: r.get(c) for c in TABLE_COLUMNS} for r in rows]


@flow(name="mrt-ablation")
def ablation_flow(params_file: str = "params.yaml", overrides: list[str] | None = None,
                  parent_run_id: str | None = None, known_hashes: dict[str, str] | None = None,
                  refresh: bool = False) -> dict[str, Any]:
    """Run the sweep (cached), log a child run per arm (method, placement, seed), publish the table."""
    stale = refresh or not outputs_current(load(params_file, overrides), "ablate", known_hashes)
    state = ablate_task.with_options(refresh_cache=True if stale else None)(
        params_file, overrides, known_hashes, return_state=True)
    result = state.result()
    result["cached"] = state.name == "Cached"
    rows = result["rows"]
    run_ids = []
    if parent_run_id:
        for row in rows:
            folder = row.get("out_dir")
            placement = {k: row.get(k) for k in ("groups", "layers", "ranks", "lengths") if k in row}
            run_ids.append(log_child_task(
                params_file, overrides, parent_run_id, f"ablation-{row['arm']}-seed{row['seed']}",
                tags={"mrt.role": "ablation", "mrt.method": "mrt", "mrt.arm": str(row["arm"]),
                      "mrt.family": str(row.get("family")), "mrt.seed": str(row["seed"]),
                      "mrt.status": str(row.get("status"))},
                run_params={"method": "mrt", "arm": row["arm"], "seed": row["seed"], **placement},
                folder=folder,
                train_report=str(Path(folder) / "train.json") if folder else None,
                curve=str(Path(folder) / "train_curve.csv") if folder else None,
                bench_report=str(Path(folder) / "benchmark.json") if folder else None,
            ))
    create_table_artifact(arm_table(rows), key=ABLATION_TABLE_KEY,
                          description="Editor placement ablation (held-out mean, MME total per arm)")
    md = Path(result["markdown"])
    if md.is_file():
        create_markdown_artifact(md.read_text(encoding="utf-8"), key=f"{ABLATION_TABLE_KEY}-md",
                                 description="reports/ablation.md as written by mrt ablate")
    failed = [f"{r['arm']}/seed-{r['seed']}: {r.get('error', '')}" for r in rows if r.get("status") != "ok"]
    if failed:  # `mrt ablate` exits 1 on these; the pipeline goes on (the table shows them) but says so
        get_run_logger().warning("%d ablation arm(s) failed:\n%s", len(failed), "\n".join(failed))
    result["failed_arms"] = failed
    result["run_ids"] = run_ids
    return result
