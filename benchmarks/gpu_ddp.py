"""Two processes train the same editors as one (issue 6, item 4): DDP through `accelerate launch`.

Why: the trainer (components/train/training.py) runs on accelerate so that `accelerate launch
--multi_gpu --num_processes N -m flows.cli train` gives data-parallel training unchanged.
That claim is only worth something if N processes with the same GLOBAL batch train the same
editors as one process, and faster. This script checks both, end to end through the real CLI:

1. `mrt data` (the embedded set) and `mrt align` (a tiny base made larger — LM hidden 1024,
   8 layers — so that a step is GPU work rather than Python overhead and 2 GPUs can show a
   speed-up; few alignment steps: the base's quality does not matter here, only that it is frozen);
2. `mrt train` (MRT) twice on that base with the same params, global batch B and seed:
   `accelerate launch --num_processes 1` (B rows on one device) and
   `accelerate launch --multi_gpu --num_processes 2` (B/2 rows on each);
3. compares the per-step training losses (curve CSVs), the final loss, the held-out metrics and the
   saved editors (max |Δ| over every tensor), and the training wall time (speed-up).

Tolerance and why: both runs compute in fp32 (no mixed precision, TF32 off), so they differ only in
the order of floating-point reductions — the per-process partial sums and NCCL's all-reduce of the
gradients against one process's single sum. Those differences (~1e-7 relative per step) are
amplified by Adam's normalisation and compound over steps, so the bound is stated on what a user
sees: every step's loss within `--loss-tol` (absolute, default 1e-3), every editor weight within
`--weight-tol` (absolute, default 1e-3; lr 6e-4 moves a weight by ≤ ~6e-4 per step), and identical
held-out accuracy up to one record per task. A systematic difference — e.g. the loss averaged per
process instead of per token of the global batch — is far above these.

Run on a 2-GPU machine (each stage's log lands in --work; the summary JSON in --json):
    python -m flows.cli data -S data.out_dir=.ddp_data -S data.align_size=1500 -S data.text_per_type=40
    python benchmarks/gpu_ddp.py --data .ddp_data --work /tmp/ddp --json out/ddp.json
Check on CPU (gloo, 2 processes, tiny sizes; a logic check, not a benchmark):
    python benchmarks/gpu_ddp.py --smoke --work /tmp/ddp_smoke
Prints one JSON summary as its last line; exit status 1 when a tolerance is exceeded.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# Stage overrides (DVC -S syntax, applied on top of params.yaml). `{w}` is the work folder.
FULL = {
    "data": ["data.train_per_task=120", "data.heldout_per_task=40", "data.align_size=1500", "data.text_per_type=40"],
    "align": [
        "align.recipe=joint",  # its own shape, built here (the shipped staged base has the default shape)
        "align.tiny.patch_size=8", "align.tiny.vision_hidden=256", "align.tiny.vision_layers=4",
        "align.tiny.vision_heads=4", "align.tiny.lm_hidden=1024", "align.tiny.lm_layers=8",
        "align.tiny.lm_heads=16", "align.tiny.lm_intermediate=2752", "align.steps=150", "align.batch_size=32",
        "align.eval_size=50", "align.save_every=10000",
    ],
    "train": ["train.steps=60", "train.batch_size=128", "train.save_every=10000", "train.eval_per_task=20",
              "train.eval_batch_size=64"],
}
SMOKE = {
    "data": ["data.train_per_task=8", "data.heldout_per_task=4", "data.align_size=60", "data.text_per_type=4",
             "data.mme_images_per_subtask=1", "data.image_size=32"],
    "align": ["align.recipe=joint", "align.tiny.patch_size=8", "align.tiny.vision_hidden=32", "align.tiny.vision_layers=3",
              "align.tiny.vision_heads=2", "align.tiny.lm_hidden=64", "align.tiny.lm_layers=2", "align.tiny.lm_heads=2",
              "align.tiny.lm_intermediate=128", "align.tiny.vocab_size=400", "align.steps=4", "align.batch_size=8",
              "align.eval_size=8", "align.save_every=10000"],
    "train": ["train.steps=6", "train.batch_size=8", "train.save_every=10000", "train.eval_per_task=2",
              "train.eval_batch_size=8"],
}


def _env() -> dict[str, str]:
    from components.core.offline import set_offline_env

    set_offline_env()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    # NVLink multicast stays off on shared hosts (the device's rules); harmless elsewhere.
    env.setdefault("NCCL_NVLS_ENABLE", "0")
    env.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    env.setdefault("NVIDIA_TF32_OVERRIDE", "0")  # fp32 stays fp32 in cuBLAS: the tolerance assumes it
    return env


def run(cmd: list[str], log: Path, env: dict[str, str]) -> float:
    """Run `cmd` with its output in `log`; returns wall seconds; raises naming the log on failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    print("$", shlex.join(cmd), flush=True)
    t0 = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"gpu_ddp.py: {shlex.join(cmd)} failed (exit {proc.returncode}); log {log}:\n{tail}")
    return wall


def mrt(stage: str, params: Path, sets: list[str]) -> list[str]:
    return ["-m", "flows.cli", stage, "--params", str(params), *[x for s in sets for x in ("-S", s)]]


def launch(nproc: int, cpu: bool, main_port: int) -> list[str]:
    """`accelerate launch` on GPUs. On CPU, accelerate's launcher runs several processes only
    through MPI, so the smoke check starts them with torchrun, whose environment (RANK,
    WORLD_SIZE, MASTER_ADDR) accelerate's `Accelerator` reads the same way (gloo backend)."""
    if cpu:
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_port", str(main_port)]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(nproc), "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(main_port)]
    if nproc > 1:
        cmd.append("--multi_gpu")
    return cmd


def read_curve(path: Path) -> list[float]:
    with path.open(newline="") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def editors_diff(a: Path, b: Path) -> dict[str, Any]:
    """Max |Δ| over every tensor of two editors.safetensors, and the largest tensor's name."""
    from safetensors.torch import load_file

    ta, tb = load_file(str(a)), load_file(str(b))
    if set(ta) != set(tb):
        raise SystemExit(f"gpu_ddp.py: {a} and {b} hold different tensors: {sorted(set(ta) ^ set(tb))[:5]}")
    diffs = {k: float((ta[k].double() - tb[k].double()).abs().max()) for k in ta}
    worst = max(diffs, key=diffs.get)
    scale = max(float(t.double().abs().max()) for t in ta.values())
    return {"max_abs": diffs[worst], "worst_tensor": worst, "n_tensors": len(ta), "max_abs_weight": scale}


def compare(one: dict, two: dict, c1: list[float], c2: list[float], loss_tol: float, acc_slack: float) -> dict:
    steps = min(len(c1), len(c2))
    step_diff = [abs(x - y) for x, y in zip(c1, c2)]
    tasks = sorted(set(one["heldout"]) | set(two["heldout"]))
    task_diff = {t: abs(one["heldout"].get(t, float("nan")) - two["heldout"].get(t, float("nan"))) for t in tasks}
    return {
        "steps_compared": steps,
        "loss_max_abs_diff": max(step_diff) if step_diff else None,
        "loss_max_abs_diff_step": (step_diff.index(max(step_diff)) + 1) if step_diff else None,
        "loss_final": [one["loss_final"], two["loss_final"]],
        "loss_final_abs_diff": abs(one["loss_final"] - two["loss_final"]),
        "heldout_mean": [one["heldout_mean"], two["heldout_mean"]],
        "heldout_task_max_abs_diff": max(task_diff.values()) if task_diff else 0.0,
        "heldout_within_slack": all(v <= acc_slack + 1e-12 for v in task_diff.values()),
        "losses_within_tol": bool(step_diff) and max(step_diff) <= loss_tol and len(c1) == len(c2),
    }


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="folder for data, base, runs and logs (created)")
    ap.add_argument("--json", type=Path, default=None, help="write the summary here")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, CPU processes (gloo): a logic check")
    ap.add_argument("--nproc", type=int, default=2, help="processes of the data-parallel run")
    ap.add_argument("--loss-tol", type=float, default=1e-3, help="max |Δ loss| at any step")
    ap.add_argument("--weight-tol", type=float, default=1e-3, help="max |Δ| of any editor weight")
    ap.add_argument("--skip-prepare", action="store_true", help="reuse data and base already in --work")
    ap.add_argument("--data", type=Path, default=None,
                    help="use this embedded data set (written by `mrt data` elsewhere) instead of running `mrt data` "
                         "(the GPU machine lacks the packages that ship the generator's images)")
    ap.add_argument("--set", dest="extra", action="append", default=[], help="extra -S override for every stage")
    return ap.parse_args(argv)


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    sizes = SMOKE if args.smoke else FULL
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = _env()
    params = work / "params.yaml"  # one snapshot for every stage and both runs
    shutil.copyfile(ROOT / "params.yaml", params)
    data, base = (args.data.resolve() if args.data else work / "data"), work / "base"
    common = [f"data.out_dir={data}", f"align.data_dir={data}", f"align.out_dir={base}",
              f"align.report={work / 'align.json'}", f"align.metrics={work / 'align.metrics.json'}",
              f"train.data_dir={data}", f"train.base_dir={base}",
              "train.method=mrt", *args.extra]
    summary: dict[str, Any] = {"smoke": args.smoke, "nproc": args.nproc, "work": str(work), "overrides": sizes,
                               "loss_tol": args.loss_tol, "weight_tol": args.weight_tol}
    walls: dict[str, float] = {}
    if not args.skip_prepare:
        if args.data is None:
            walls["data"] = run([sys.executable, *mrt("data", params, common + sizes["data"])], work / "data.log", env)
        elif not (data / "manifest.json").is_file():
            raise SystemExit(f"gpu_ddp.py: --data {data}: no manifest.json (write it with `mrt data`)")
        walls["align"] = run([sys.executable, *mrt("align", params, common + sizes["align"])], work / "align.log", env)
    if args.smoke:
        env["MRT_NUM_THREADS"] = "1"  # two CPU processes on a small machine
        env["ACCELERATE_USE_CPU"] = "1"  # with torchrun's RANK/WORLD_SIZE: accelerate's MULTI_CPU (gloo)
    reports = {}
    for n, port in ((1, 29511), (args.nproc, 29512)):
        out = work / f"run_np{n}"
        shutil.rmtree(out, ignore_errors=True)  # a checkpoint left there would be resumed from, not retrained
        sets = common + sizes["train"] + [f"train.out_dir={out}", f"train.report={out}.json", f"train.curve={out}.csv",
                                         f"train.metrics={out}.metrics.json"]
        cmd = launch(n, args.smoke, port) + mrt("train", params, sets)
        walls[f"train_np{n}"] = run(cmd, work / f"train_np{n}.log", env)
        reports[n] = json.loads(Path(f"{out}.json").read_text())
    one, two = reports[1], reports[args.nproc]
    c1, c2 = read_curve(work / "run_np1.csv"), read_curve(work / f"run_np{args.nproc}.csv")
    cmp = compare(one, two, c1, c2, args.loss_tol, acc_slack=1.0 / max(1, int(one.get("heldout_n", 0)) or 1))
    # One record per task: heldout_n counts records of all tasks; per task the slack is 1/per_task.
    per_task = max(1, one["heldout_n"] // max(1, len(one["heldout"])))
    cmp["heldout_within_slack"] = cmp["heldout_task_max_abs_diff"] <= 1.0 / per_task + 1e-12
    ed = editors_diff(work / "run_np1" / "editors.safetensors", work / f"run_np{args.nproc}" / "editors.safetensors")
    cmp["editors"] = ed
    cmp["weights_within_tol"] = ed["max_abs"] <= args.weight_tol
    speed = {
        "train_wall_s": [one["train_wall_s"], two["train_wall_s"]],
        "ms_per_step": [1e3 * one["train_wall_s"] / one["steps"], 1e3 * two["train_wall_s"] / two["steps"]],
        "speedup": one["train_wall_s"] / two["train_wall_s"] if two["train_wall_s"] else None,
        "launch_wall_s": [walls["train_np1"], walls[f"train_np{args.nproc}"]],
    }
    summary.update(
        walls=walls, compare=cmp, speed=speed,
        runs={n: {k: r.get(k) for k in ("steps", "loss_first", "loss_final", "heldout_mean", "heldout", "heldout_n",
                                        "trainable_params", "train_wall_s", "wall_s", "cuda_graphs")}
              for n, r in reports.items()},
        curves={1: c1, args.nproc: c2},
        passed=bool(cmp["losses_within_tol"] and cmp["weights_within_tol"] and cmp["heldout_within_slack"]),
    )
    summary["env"] = _device_env()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=1, default=str))
    print(f"| processes | ms/step | final loss | held-out mean |\n|---:|---:|---:|---:|\n"
          f"| 1 | {speed['ms_per_step'][0]:.1f} | {one['loss_final']:.5f} | {one['heldout_mean']:.4f} |\n"
          f"| {args.nproc} | {speed['ms_per_step'][1]:.1f} | {two['loss_final']:.5f} | {two['heldout_mean']:.4f} |")
    print(f"speed-up {_num(speed['speedup']):.2f}x; max |Δloss| {_num(cmp['loss_max_abs_diff']):.2e} (step "
          f"{cmp['loss_max_abs_diff_step']}); max |Δw| {ed['max_abs']:.2e} ({ed['worst_tensor']}); "
          f"passed={summary['passed']}")
    print(json.dumps({k: v for k, v in summary.items() if k != "curves"}, default=str))
    return summary


def _num(x) -> float:
    return float("nan") if x is None else float(x)


def _device_env() -> dict[str, Any]:
    try:
        import torch

        env = {"torch": torch.__version__, "cuda_devices": torch.cuda.device_count()}
        if torch.cuda.is_available():
            env["device"] = torch.cuda.get_device_name(0)
        return env
    except Exception as exc:  # pragma: no cover - reporting only
        return {"error": str(exc)}


if __name__ == "__main__":
    s = main()
    sys.exit(0 if s["passed"] else 1)
