"""Device time of the editors' Triton kernels under alternative launch configurations (issue 7).

Why: these kernels are small (a few rows, or a rank-6 edit of a [B·577, 1024] tensor), so their time
is latency and occupancy, not bandwidth or arithmetic, and the best block sizes are found by trying.
This times each kernel at the shapes the LLaVA-7B placement uses for a grid of block sizes / warps /
dot precision, checks each result against float64 (the tests' criterion: within one bf16 step plus
at most 64 fp32 roundings of Σ|terms|) and reports the fastest correct configuration next to the
current one (kernels.WHOLE_CONFIG, ROWS_CONFIG, BACKWARD_CONFIG, ROWS_GRAD_CONFIG):

- whole: the whole-tensor edit (vision layer / projector; inference and the training forward), b1, b8, b16;
- rows: the prefix/suffix rows of an LM layer (inference), b1 and b8;
- backward: `EditWhole`'s backward (∂L/∂h and the parameters' gradients, training), b8 and b16;
- rows_backward: `EditRows`' backward at an LM layer (training; ROWS_GRAD_CONFIG), b8 and b16;
- rows_train: `EditRows`' forward, the split kernels (training; ROWS_TRAIN_CONFIG, which the backward's
  first two launches use too), b8 and b16.

Run (GPU): python benchmarks/gpu_kernel_tuning.py [--kernels whole rows backward rows_backward rows_train] [--json out.json]
`--smoke`: tiny shapes and two configurations per kernel in Triton's interpreter on CPU (a logic
check for the tests; the times mean nothing).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE.parent))

KINDS = ("whole", "rows", "backward", "rows_backward", "rows_train")
TOLERANCE = 64  # fp32 roundings of Σ|terms| beyond one bf16 step, as in tests/test_editor_kernels.py


def device_us(fn, reps: int) -> float:
    """Median µs per call over 5 runs of `reps` calls. On a GPU the `reps` calls are captured once in
    a CUDA graph and the graph's replays are timed with CUDA events: these kernels take 3–60 µs
    while a call costs the host 15–100 µs, so a plain loop of launches times the host, not the
    kernel (the first tunings, before the seventh pass, did that). Where capture fails, the plain
    loop. Without a GPU: the wall clock."""
    import torch

    for _ in range(min(reps, 5)):
        fn()
    if torch.cuda.is_available():
        graph = _captured(fn, reps)
        run = graph.replay if graph is not None else lambda: [fn() for _ in range(reps)]
        times = []
        for _ in range(5):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) * 1e3 / reps)
        return statistics.median(times)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        times.append((time.perf_counter() - t0) * 1e6 / reps)
    return statistics.median(times)


def _captured(fn, reps: int):
    """`reps` calls of `fn` captured in a CUDA graph (warmed up on a side stream first, as capture
    requires), or None when the calls cannot be captured."""
    import torch

    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(reps):
                fn()
        graph.replay()
        torch.cuda.synchronize()
        return graph
    except Exception as exc:  # noqa: BLE001 - capture refused (a sync inside fn): time the plain loop
        print(f"gpu_kernel_tuning: CUDA graph capture failed ({str(exc).splitlines()[0][:120]}); timing launches",
              flush=True)
        torch.cuda.synchronize()
        return None


def _bf16_step(exact):
    import torch

    return torch.exp2(torch.floor(torch.log2(exact.float().abs().clamp_min(1e-30))) - 7).double()


def beyond_fp32_units(got, exact, scale, rounded: bool = True) -> float:
    """Largest distance from the exact value (beyond one bf16 step when `got` was rounded to bf16),
    in fp32 roundings of Σ|terms|."""
    err = (got.double() - exact).abs()
    if rounded:
        err = (err - _bf16_step(exact)).clamp_min(0)
    return float(err.div(scale * 2.0**-24).max())


def _configs(smoke: bool) -> dict[str, list[dict]]:
    if smoke:
        return {"whole": [{"BLOCK_N": 16, "BLOCK_D": 32, "num_warps": 4, "PRECISION": "ieee"},
                          {"BLOCK_N": 32, "BLOCK_D": 64, "num_warps": 4, "PRECISION": "tf32x3"}],
                "rows": [{"BLOCK_D": 32, "num_warps": 1}, {"BLOCK_D": 64, "num_warps": 2}],
                "backward": [{"BLOCK_N": 16, "BLOCK_D": 32, "num_warps": 4, "PRECISION": "ieee"},
                             {"BLOCK_N": 32, "BLOCK_D": 64, "num_warps": 4, "PRECISION": "tf32x3"}],
                "rows_train": [{"BLOCK_D": 32, "num_warps": 1}, {"BLOCK_D": 64, "num_warps": 2}],
                "rows_backward": [{"BLOCK_S": 16, "BLOCK_D": 32, "num_warps": 4, "PRECISION": "ieee"},
                                  {"BLOCK_S": 32, "BLOCK_D": 64, "num_warps": 4, "PRECISION": "tf32x3"}]}
    return {
        "whole": [{"BLOCK_N": bn, "BLOCK_D": bd, "num_warps": nw, "PRECISION": p}
                  for bn, bd, nw, p in itertools.product((16, 32, 64), (64, 128, 256), (2, 4, 8), ("ieee", "tf32x3"))],
        "rows": [{"BLOCK_D": bd, "num_warps": nw} for bd, nw in itertools.product((128, 256, 512, 1024, 2048), (1, 2, 4, 8))],
        "backward": [{"BLOCK_N": bn, "BLOCK_D": bd, "num_warps": nw, "PRECISION": p}
                     for bn, bd, nw, p in itertools.product((16, 32, 64, 128), (64, 128, 256), (2, 4, 8), ("ieee", "tf32x3"))],
        "rows_train": [{"BLOCK_D": bd, "num_warps": nw} for bd, nw in itertools.product((64, 128, 256, 512, 1024), (1, 2, 4))],
        "rows_backward": [{"BLOCK_S": bs, "BLOCK_D": bd, "num_warps": nw, "PRECISION": p}
                          for bs, bd, nw, p in itertools.product((16, 32, 64), (32, 64, 128), (2, 4, 8), ("ieee", "tf32x3"))],
    }


def _try(out: list, label: dict, cfg: dict, run, check, reps: int, timed=None) -> None:
    """Run one configuration: its error against float64 (`check(run())`) and the time of `timed`
    (default `run`), or the compiler's refusal."""
    try:
        err = check(run())
        t = device_us(timed or run, reps)
    except Exception as exc:  # noqa: BLE001 - a config the compiler refuses (registers, shared memory)
        out.append({**label, **cfg, "error": repr(exc)[:200]})
        print(json.dumps(out[-1]), flush=True)
        return
    out.append({**label, **cfg, "us": t, "beyond_fp32_units": err})
    print(json.dumps(out[-1]), flush=True)  # progress: a long run cut short still shows what it timed


def tune_whole(out, kernels, dev, g, batch, tokens, d, configs, reps):
    import torch

    h = torch.randn(batch * tokens, d, generator=g).to(dev, torch.bfloat16)
    u, a, b = torch.randn(6, d, generator=g), 0.03 * torch.randn(6, d, generator=g), torch.randn(6, generator=g)
    packed = kernels.pack(u.to(dev), a.to(dev), b.to(dev), min_rank=kernels.WHOLE_MIN_RANK)
    h64, u64, a64, b64 = h.double(), u.double().to(dev), a.double().to(dev), b.double().to(dev)
    exact = h64 + (h64 @ a64.T + b64) @ u64
    scale = h64.abs() + (h64.abs() @ a64.abs().T + b64.abs()) @ u64.abs()
    for cfg in configs:
        _try(out, {"batch": batch}, cfg, lambda cfg=cfg: kernels.edit_whole(h, packed, **cfg),
             lambda got: beyond_fp32_units(got, exact, scale), reps)


def tune_rows(out, kernels, slot_mask, dev, g, batch, tokens, d, configs, reps):
    import torch

    hidden = torch.randn(batch * tokens, d, generator=g).to(dev, torch.bfloat16)
    starts = torch.arange(batch)[:, None] * tokens
    idx = torch.cat([(starts + torch.arange(tokens - 90, tokens - 86)).reshape(-1),
                     (starts + torch.arange(tokens - 10, tokens - 6)).reshape(-1)]).to(dev)
    valid = [torch.ones(batch * 4, dtype=torch.bool, device=dev)] * 2
    mask = kernels.pad_mask(slot_mask(valid, [4, 4], torch.float32), 8)
    uu, aa, bb = torch.randn(8, d, generator=g), 0.03 * torch.randn(8, d, generator=g), torch.randn(8, generator=g)
    lpacked = kernels.pack(uu.to(dev), aa.to(dev), bb.to(dev))
    rows64, m64 = hidden[idx].double(), mask.double()
    u64, a64, b64 = uu.double().to(dev), aa.double().to(dev), bb.double().to(dev)
    exact = rows64 + ((rows64 @ a64.T + b64) * m64) @ u64
    scale = rows64.abs() + ((rows64.abs() @ a64.abs().T + b64.abs()) * m64) @ u64.abs()
    scratch = hidden.clone()  # timed calls edit it in place again and again: the time is the same
    for cfg in configs:
        def run(cfg=cfg):
            work = hidden.clone()
            kernels.edit_rows_(work, idx, mask, lpacked, **cfg)
            return work[idx]

        _try(out, {"batch": batch}, cfg, run, lambda got: beyond_fp32_units(got, exact, scale), reps,
             timed=lambda cfg=cfg: kernels.edit_rows_(scratch, idx, mask, lpacked, **cfg))


def tune_backward(out, kernels, dev, g, batch, tokens, d, configs, reps):
    """`kernels.whole_backward` on the saved state of a real `EditWhole` forward."""
    import torch

    h = torch.randn(batch * tokens, d, generator=g).to(dev, torch.bfloat16)
    gout = torch.randn(batch * tokens, d, generator=g).to(dev, torch.bfloat16)
    u = torch.linalg.qr(torch.randn(d, 6, generator=g))[0].T.contiguous().to(dev)
    a, b = (0.03 * torch.randn(6, d, generator=g)).to(dev), torch.randn(6, generator=g).to(dev)
    rp = kernels.padded_rank(6, kernels.WHOLE_MIN_RANK)
    z = (h.float() @ a.T + b).contiguous()
    z = torch.cat([z, torch.zeros(z.shape[0], rp - 6, device=dev)], 1).contiguous()  # the saved [N, R] layout
    h64, g64, u64, a64 = h.double(), gout.double(), u.double(), a.double()
    z64 = h64 @ a64.T + b.double()
    gz64 = g64 @ u64.T
    exact = {"h": g64 + gz64 @ a64, "U": z64.T @ g64, "A": gz64.T @ h64, "b": gz64.sum(0)}
    gza = g64.abs() @ u64.abs().T
    scale = {"h": g64.abs() + gza @ a64.abs(), "U": z64.abs().T @ g64.abs(), "A": gza.T @ h64.abs(), "b": gza.sum(0)}

    def check(got):
        return max(beyond_fp32_units(got[0], exact["h"], scale["h"]),
                   *(beyond_fp32_units(t, exact[k], scale[k], rounded=False) for t, k in zip(got[1:], "UAb")))

    for cfg in configs:
        _try(out, {"batch": batch}, cfg, lambda cfg=cfg: kernels.whole_backward(gout, h, z, u, a, True, **cfg),
             check, reps)


def _lm_rows_case(slot_mask, dev, g, batch, tokens, d):
    """An LM layer's rows case: bf16 hidden [batch·tokens, d], 4 prefix + 4 suffix slots per
    sample (idx, all valid), ranks 4 + 4 (mask [S, 8]), u, a [8, d] and b [8] fp32."""
    import torch

    hidden = torch.randn(batch * tokens, d, generator=g).to(dev, torch.bfloat16)
    starts = torch.arange(batch)[:, None] * tokens
    idx = torch.cat([(starts + torch.arange(tokens - 90, tokens - 86)).reshape(-1),
                     (starts + torch.arange(tokens - 10, tokens - 6)).reshape(-1)]).to(dev)
    mask = slot_mask([torch.ones(batch * 4, dtype=torch.bool, device=dev)] * 2, [4, 4], torch.float32)
    u = (torch.randn(8, d, generator=g) / d**0.5).to(dev)
    a, b = (0.03 * torch.randn(8, d, generator=g)).to(dev), torch.randn(8, generator=g).to(dev)
    return hidden, idx, mask, u, a, b


def tune_rows_backward(out, kernels, slot_mask, dev, g, batch, tokens, d, configs, reps):
    """`kernels.rows_backward` (∂L/∂h's rows, and the parameters' gradients) on the saved state of a
    real `EditRows` forward at an LM layer: 4 prefix + 4 suffix slots per sample, ranks 4 + 4."""
    import torch

    hidden, idx, mask, u, a, b = _lm_rows_case(slot_mask, dev, g, batch, tokens, d)
    gout = torch.randn(batch * tokens, d, generator=g).to(dev, torch.bfloat16)
    work = hidden.clone()
    _, saved_state = _rows_forward(kernels, work, idx, mask, u, a, b)
    saved, z = saved_state
    rows64, g64, m64 = hidden[idx].double(), gout[idx].double(), mask.double()
    u64, a64, b64 = u.double(), a.double(), b.double()
    z64, gz64 = (rows64 @ a64.T + b64) * m64, (g64 @ u64.T) * m64
    exact = {"h": g64 + gz64 @ a64, "U": z64.T @ g64, "A": gz64.T @ rows64, "b": gz64.sum(0)}
    gza = (g64.abs() @ u64.abs().T) * m64
    za = (rows64.abs() @ a64.abs().T + b64.abs()) * m64
    scale = {"h": g64.abs() + gza @ a64.abs(), "U": za.T @ g64.abs(), "A": gza.T @ rows64.abs(), "b": gza.sum(0)}

    def check(got):
        return max(beyond_fp32_units(got[0][idx], exact["h"], scale["h"]),
                   *(beyond_fp32_units(t, exact[k], scale[k], rounded=False) for t, k in zip(got[1:], "UAb")))

    for cfg in configs:
        _try(out, {"batch": batch}, cfg,
             lambda cfg=cfg: kernels.rows_backward(gout, saved, z, u, a, idx, mask, True, **cfg), check, reps)


def tune_rows_train(out, kernels, slot_mask, dev, g, batch, tokens, d, configs, reps):
    """`EditRows`' forward (rows_partial_kernel + rows_apply_kernel) under each ROWS_TRAIN_CONFIG,
    set on the module for the call (the kernels read it there), checked against float64."""
    hidden, idx, mask, u, a, b = _lm_rows_case(slot_mask, dev, g, batch, tokens, d)
    rows64, m64, u64, a64, b64 = hidden[idx].double(), mask.double(), u.double(), a.double(), b.double()
    exact = rows64 + ((rows64 @ a64.T + b64) * m64) @ u64
    scale = rows64.abs() + ((rows64.abs() @ a64.abs().T + b64.abs()) * m64) @ u64.abs()
    scratch = hidden.clone()  # timed calls edit it in place again and again: the time is the same
    current = kernels.ROWS_TRAIN_CONFIG
    try:
        for cfg in configs:
            kernels.ROWS_TRAIN_CONFIG = cfg
            _try(out, {"batch": batch}, cfg, lambda: _rows_forward(kernels, hidden.clone(), idx, mask, u, a, b)[0][idx],
                 lambda got: beyond_fp32_units(got, exact, scale), reps,
                 timed=lambda: _rows_forward(kernels, scratch, idx, mask, u, a, b))
    finally:
        kernels.ROWS_TRAIN_CONFIG = current


def _rows_forward(kernels, hidden, idx, mask, u, a, b):
    """An `EditRows` forward outside autograd: (edited hidden, (saved rows, z))."""
    import torch

    class Ctx:
        def mark_dirty(self, *_):
            pass

        def save_for_backward(self, *tensors):
            self.saved = tensors

    ctx = Ctx()
    with torch.no_grad():
        out = kernels.EditRows.forward(ctx, hidden, idx, mask, u, a, b)
    return out, ctx.saved[:2]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--kernels", nargs="+", choices=KINDS, default=KINDS)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes in Triton's interpreter on CPU (a logic check)")
    args = ap.parse_args(argv)
    if args.smoke:  # before Triton is imported anywhere
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ["MRT_TRITON_INTERPRET"] = "1"
    import torch

    from components.editors import kernels
    from components.editors.loreft import slot_mask

    if args.smoke:
        kernels._triton.cache_clear()
        dev, reps = torch.device("cpu"), 1
        shapes = {"whole": (577 // 36, 64), "rows": (672 // 6, 128), "backward": (577 // 36, 64),
                  "rows_backward": (704 // 6, 128), "rows_train": (704 // 6, 128)}
        batches = {"whole": (1, 2), "rows": (1, 2), "backward": (2,), "rows_backward": (2,), "rows_train": (2,)}
    else:
        if not torch.cuda.is_available():
            raise SystemExit("gpu_kernel_tuning.py: needs a CUDA device (or --smoke)")
        dev, reps = torch.device("cuda"), args.reps
        shapes = {"whole": (577, 1024), "rows": (672, 4096), "backward": (577, 1024), "rows_backward": (704, 4096),
                  "rows_train": (704, 4096)}
        batches = {"whole": (1, 8, 16), "rows": (1, 8), "backward": (8, 16), "rows_backward": (8, 16), "rows_train": (8, 16)}
    configs = _configs(args.smoke)
    current = {"whole": kernels.WHOLE_CONFIG, "rows": kernels.ROWS_CONFIG, "backward": kernels.BACKWARD_CONFIG,
               "rows_backward": kernels.ROWS_GRAD_CONFIG, "rows_train": kernels.ROWS_TRAIN_CONFIG}
    g = torch.Generator(device="cpu").manual_seed(0)
    out: dict = {"smoke": args.smoke, "current": {k: current[k] for k in args.kernels}}
    with torch.no_grad():
        for kind in args.kernels:
            out[kind] = []
            tokens, d = shapes[kind]
            for batch in batches[kind]:
                if kind == "whole":
                    tune_whole(out[kind], kernels, dev, g, batch, tokens, d, configs[kind], reps)
                elif kind == "rows":
                    tune_rows(out[kind], kernels, slot_mask, dev, g, batch, tokens, d, configs[kind], reps)
                elif kind == "backward":
                    tune_backward(out[kind], kernels, dev, g, batch, tokens, d, configs[kind], reps)
                elif kind == "rows_backward":
                    tune_rows_backward(out[kind], kernels, slot_mask, dev, g, batch, tokens, d, configs[kind], reps)
                else:
                    tune_rows_train(out[kind], kernels, slot_mask, dev, g, batch, tokens, d, configs[kind], reps)
    for kind in args.kernels:
        ok = [r for r in out[kind] if "us" in r and r["beyond_fp32_units"] <= TOLERANCE]
        out[f"{kind}_best"], out[f"{kind}_current"] = {}, {}
        for batch in batches[kind]:
            out[f"{kind}_best"][batch] = sorted((r for r in ok if r["batch"] == batch), key=lambda r: r["us"])[:5]
            out[f"{kind}_current"][batch] = next(
                (r for r in ok if r["batch"] == batch and all(r.get(k) == v for k, v in current[kind].items())), None)
            print(kind, f"b{batch} current:", json.dumps(out[f"{kind}_current"][batch]))
            print(kind, f"b{batch} fastest correct:", json.dumps(out[f"{kind}_best"][batch][:3]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
