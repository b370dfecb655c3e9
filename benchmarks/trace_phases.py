"""Where a training step's time goes, phase by phase, from a Chrome trace of `gpu_train_step.py --trace`.

Why: on the H200 the editors' cost is mostly GPU idle time while the host issues launches, and
where that idle time sits (before the first vision kernel, inside the vision tower, after the last
backward kernel) says which host work to move or remove. Phases are cut at the attention kernels
(cuDNN/flash "fprop"/"bprop"): front = first kernel → first attention forward; vision forward;
LM forward; LM backward (first 32 attention backwards); vision backward; tail = after the last
attention backward (editor gradient bookkeeping, clipping, optimiser). For each: span and GPU idle.

`--host-ops N`: also, per phase, the N host operations whose time differs most between the first
trace and each other one (top-level `cpu_op` events per thread, i.e. not nested in another op, placed
in the phase their start falls in): in a host-bound phase these are what the GPU waits for.

Run: python benchmarks/trace_phases.py trace_floor_b8.json.gz trace_mrt_b8.json.gz [--lm-layers 32] [--host-ops 12]
"""

from __future__ import annotations

import argparse
import gzip
import json


def _events(path: str) -> list[dict]:
    with gzip.open(path) if path.endswith(".gz") else open(path) as fh:
        return json.load(fh)["traceEvents"]


def _cuts(events: list[dict], path: str, lm_layers: int) -> tuple[list[dict], dict[str, tuple[float, float]]]:
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
    return kernels, cuts


def phases(path: str, lm_layers: int = 32) -> dict[str, tuple[float, float]]:
    kernels, cuts = _cuts(_events(path), path, lm_layers)

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


def host_ops(path: str, lm_layers: int = 32) -> dict[str, dict[str, tuple[float, int]]]:
    """{phase: {op name: (total ms, count)}} of the top-level host ops (cat `cpu_op`, not nested in
    another op of the same thread), each placed in the phase its start falls in ("step" excluded)."""
    events = _events(path)
    _, cuts = _cuts(events, path, lm_layers)
    windows = [(name, a, b) for name, (a, b) in cuts.items() if name != "step"]
    ops = sorted((e for e in events if e.get("cat") == "cpu_op" and e.get("ph") == "X" and "dur" in e),
                 key=lambda e: (e.get("pid"), e.get("tid"), e["ts"], -e["dur"]))
    out: dict[str, dict[str, tuple[float, int]]] = {name: {} for name, _, _ in windows}
    thread, open_until = None, float("-inf")
    for e in ops:
        key = (e.get("pid"), e.get("tid"))
        if key != thread:
            thread, open_until = key, float("-inf")
        if e["ts"] < open_until:
            continue  # nested in the current top-level op
        open_until = e["ts"] + e["dur"]
        for name, a, b in windows:
            if a <= e["ts"] < b:
                total, count = out[name].get(e["name"], (0.0, 0))
                out[name][e["name"]] = (total + e["dur"] / 1e3, count + 1)
                break
    return out


def host_op_diff(first: dict, other: dict, top: int) -> dict[str, list[tuple[str, float, int, int]]]:
    """Per phase, the `top` ops by |ms difference| other − first: (name, ms diff, count first, count other)."""
    diff = {}
    for phase in first:
        names = set(first[phase]) | set(other[phase])
        rows = [(n, other[phase].get(n, (0.0, 0))[0] - first[phase].get(n, (0.0, 0))[0],
                 first[phase].get(n, (0.0, 0))[1], other[phase].get(n, (0.0, 0))[1]) for n in names]
        diff[phase] = sorted(rows, key=lambda r: -abs(r[1]))[:top]
    return diff


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("traces", nargs="+")
    ap.add_argument("--lm-layers", type=int, default=32)
    ap.add_argument("--host-ops", type=int, default=0, metavar="N")
    args = ap.parse_args(argv)
    table = {p: phases(p, args.lm_layers) for p in args.traces}
    names = list(next(iter(table.values())))
    print("| phase | " + " | ".join(f"{p.rsplit('/', 1)[-1]} span ms (GPU idle)" for p in table) + " |")
    print("|---|" + "---:|" * len(table))
    for n in names:
        print(f"| {n} | " + " | ".join(f"{t[n][0]:.2f} ({t[n][1]:.2f})" for t in table.values()) + " |")
    if args.host_ops and len(args.traces) > 1:
        first = host_ops(args.traces[0], args.lm_layers)
        for path in args.traces[1:]:
            print(f"\nTop-level host ops, {path.rsplit('/', 1)[-1]} − {args.traces[0].rsplit('/', 1)[-1]}, per phase "
                  "(ms difference; calls first → other):")
            for phase, rows in host_op_diff(first, host_ops(path, args.lm_layers), args.host_ops).items():
                print(f"\n{phase}:")
                for name, ms, n0, n1 in rows:
                    print(f"  {ms:+8.2f} ms  {n0:5d} → {n1:5d}  {name[:90]}")


if __name__ == "__main__":
    main()
