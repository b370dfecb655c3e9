"""Where a training step's time goes, phase by phase, from a Chrome trace of `gpu_train_step.py --trace`.

Why: on the H200 the editors' cost is mostly GPU idle time while the host issues launches, and
where that idle time sits (before the first vision kernel, inside the vision tower, after the last
backward kernel) says which host work to move or remove. Phases are cut at the attention kernels
(cuDNN/flash "fprop"/"bprop"): front = first kernel → first attention forward; vision forward;
LM forward; LM backward (first 32 attention backwards); vision backward; tail = after the last
attention backward (editor gradient bookkeeping, clipping, optimiser). For each: span and GPU idle.

Run: python benchmarks/trace_phases.py trace_floor_b8.json.gz trace_mrt_b8.json.gz [--lm-layers 32]
"""

from __future__ import annotations

import argparse
import gzip
import json


def phases(path: str, lm_layers: int = 32) -> dict[str, tuple[float, float]]:
    with gzip.open(path) if path.endswith(".gz") else open(path) as fh:
        events = json.load(fh)["traceEvents"]
    kernels = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e),
                     key=lambda e: e["ts"])
    fwd = [e for e in kernels if "fprop" in e["name"]]
    bwd = [e for e in kernels if "bprop" in e["name"]]
    if len(fwd) <= lm_layers or len(bwd) <= lm_layers:
        raise SystemExit(f"{path}: expected more than {lm_layers} attention forward and backward kernels")
    start, end = kernels[0]["ts"], max(e["ts"] + e["dur"] for e in kernels)
    n_vision = len(fwd) - lm_layers
    cuts = {
        "front": (start, fwd[0]["ts"]),
        "vision forward": (fwd[0]["ts"], fwd[n_vision]["ts"]),
        "LM forward": (fwd[n_vision]["ts"], bwd[0]["ts"]),
        "LM backward": (bwd[0]["ts"], bwd[lm_layers]["ts"]),
        "vision backward": (bwd[lm_layers]["ts"], bwd[-1]["ts"] + bwd[-1]["dur"]),
        "tail": (bwd[-1]["ts"] + bwd[-1]["dur"], end),
        "step": (start, end),
    }

    def idle(a: float, b: float) -> float:
        gap, covered = 0.0, a
        for e in kernels:
            if e["ts"] + e["dur"] < a or e["ts"] > b:
                continue
            if e["ts"] > covered:
                gap += e["ts"] - covered
            covered = max(covered, e["ts"] + e["dur"])
        return gap + max(0.0, b - covered)

    return {name: ((b - a) / 1e3, idle(a, b) / 1e3) for name, (a, b) in cuts.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("traces", nargs="+")
    ap.add_argument("--lm-layers", type=int, default=32)
    args = ap.parse_args(argv)
    table = {p: phases(p, args.lm_layers) for p in args.traces}
    names = list(next(iter(table.values())))
    print("| phase | " + " | ".join(f"{p.rsplit('/', 1)[-1]} span ms (GPU idle)" for p in table) + " |")
    print("|---|" + "---:|" * len(table))
    for n in names:
        print(f"| {n} | " + " | ".join(f"{t[n][0]:.2f} ({t[n][1]:.2f})" for t in table.values()) + " |")


if __name__ == "__main__":
    main()
