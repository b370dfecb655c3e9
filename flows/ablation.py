"""The placement ablation as a Prefect subflow: the dvc.yaml `ablate` stage, then its table as artifacts.

The sweep itself is `mrt ablate` (components.experiments.ablation: a local process pool, or Ray), run by DVC
like every other stage: its arms are independent training runs whose results only mean something
together (one CSV, one table, one plot), so the unit DVC tracks is the whole sweep. The subflow
publishes the arm table (key `<profile>-ablation-table`) and warns about failed arms.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows import repro
from flows.tasks import load, stage_task

ABLATION_TABLE_KEY = "ablation-table"
TABLE_COLUMNS = ("arm", "seed", "groups", "trainable_params", "heldout_mean", "heldout_chance_corrected_mean",
                 "heldin_mean", "mme_total", "collapsed_heldout", "collapsed_heldin", "status")


def arm_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ablation rows reduced to the columns a table artifact shows (no wall times)."""
    return [{c: r.get(c) for c in TABLE_COLUMNS} for r in rows]


def _run_name() -> str:
    from prefect.runtime import flow_run

    return f"{(flow_run.parameters or {}).get('profile') or 'default'}-ablation"


@flow(name="mrt-ablation", flow_run_name=_run_name, persist_result=False)
def ablation_flow(profile: str = "default", force: bool = False, parent_run_id: str | None = None) -> dict[str, Any]:
    """`dvc repro --single-item ablate`, then the arm table as artifacts; returns what DVC did."""
    from components.experiments.report import read_ablation_csv

    result = stage_task("ablate", repro.PARAMS_FILE, ".", force, parent_run_id)
    params = load(repro.PARAMS_FILE, None)
    csv = Path(params.ablate.report_csv)
    rows = read_ablation_csv(csv) if csv.is_file() else []
    create_table_artifact(arm_table(rows), key=f"{profile}-{ABLATION_TABLE_KEY}",
                          description=f"{profile}: editor placement ablation (held-out mean, MME total per arm)")
    md = Path(params.ablate.report_md)
    if md.is_file():
        create_markdown_artifact(md.read_text(encoding="utf-8"), key=f"{profile}-{ABLATION_TABLE_KEY}-md",
                                 description=f"{profile}: {params.ablate.report_md} as written by mrt ablate")
    failed = [f"{r['arm']}/seed-{r['seed']}: {r.get('error', '')}" for r in rows if r.get("status") != "ok"]
    if failed:
        get_run_logger().warning("%d ablation arm(s) failed:\n%s", len(failed), "\n".join(failed))
    return {**result, "failed_arms": failed}
