"""Host (CPU) time of the calls an edit site is made of, on the machine that runs it (issue 7).

Why: a b1 generate() of LLaVA-7B is bound by the host, not the GPU (benchmarks/RESULTS.md), so
what an editor adds to its latency is host time: Python in the hook, PyTorch's hook dispatch,
dispatcher calls, kernel launches. This measures each of those per call, with the GPU kept far
ahead (tiny tensors, no sync inside a timed loop, launch queue drained between loops), so the
figures are what one more call of each kind costs the host there:

- a plain PyTorch operator (`torch.add` on a small tensor) and `torch.empty`;
- an `nn.Module` call without hooks, with one forward hook that returns None (what an LM layer's
  hook costs in a decode step), and with a prepended pre-hook taking kwargs (the pass hook);
- an edit site on the operator path (`loreft.edit_whole`, no grad) and with the fused kernels
  (`kernels.edit_whole`, `kernels.edit_rows_`), LLaVA-7B shapes at batch 1;
- one rows-kernel launch through `kernel[grid]`, through the `CompiledKernel` it returns, through
  its launcher alone (the floor) and through `components.editors.launch.launch` (`launcher_costs`);
- a bank's orthonormalisation forward, with gradients (`loreft.orthonormal_rows_stacked`, the start
  of every training step), LLaVA-7B's three bank shapes: operator path (shifted Cholesky-QR3, ~20
  launches) and one-launch kernel (orthonormal_kernel.py).

Timing: median over `--repeats` loops of `--calls` calls, wall-clock per call, each loop queued
behind a GPU sleep so that device time never paces it (the first version of this script had no
sleep: its kernel-site figures were bounded by the kernels' device time).

Run (GPU):   python benchmarks/gpu_host_overhead.py [--json out.json]
Check (CPU): python benchmarks/gpu_host_overhead.py --cpu   (same calls on CPU tensors; the
             kernel rows need MRT_TRITON_INTERPRET=1 TRITON_INTERPRET=1 and are skipped otherwise)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE.parent))


def per_call_us(fn, calls: int, repeats: int, sync, hold=None) -> float:
    """Median host µs per call of `fn` over `repeats` loops of `calls` calls. `hold(ms)` (CUDA) queues
    a GPU sleep before each loop, longer than the loop, so that the launches only queue up behind it:
    the loop then measures host time alone, even for kernels whose device time exceeds their launch
    cost (a plain back-to-back loop converges to the device time for those)."""
    for _ in range(max(calls // 4, 2)):
        fn()
    sync()
    times = []
    hold_ms, retries = 20.0, 0
    while len(times) < repeats:
        sync()
        if hold is not None:
            hold(hold_ms)
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        loop_ms = (time.perf_counter() - t0) * 1e3
        sync()
        if hold is not None and loop_ms > 0.8 * hold_ms:
            # The GPU woke before the loop ended (or the launch queue filled and the host waited):
            # hold it longer and measure again; give up after 4 tries rather than loop forever.
            retries += 1
            if retries > 4:
                raise RuntimeError(f"host loop of {calls} calls not shorter than a {hold_ms:.0f} ms GPU hold: "
                                   "fewer calls per loop (--calls) keep the launch queue from filling")
            hold_ms = 2 * loop_ms
            continue
        times.append(loop_ms / calls * 1e3)
    return statistics.median(times)


def gpu_hold(device):
    """hold(ms): queue a GPU sleep of about `ms` (torch.cuda._sleep, calibrated once), or None on CPU."""
    import torch

    if device.type != "cuda":
        return None
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    cycles = 10_000_000
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    torch.cuda.synchronize()
    per_ms = cycles / max(start.elapsed_time(end), 1e-3)
    return lambda ms: torch.cuda._sleep(int(per_ms * ms))


def measure(device, calls: int, repeats: int) -> dict[str, float]:
    import torch
    from torch import nn

    from components.editors import kernels
    from components.editors.loreft import edit_whole

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    hold = gpu_hold(device)
    small = torch.zeros(16, device=device)
    out: dict[str, float] = {}
    with torch.no_grad():
        out["torch_add_us"] = per_call_us(lambda: torch.add(small, 1.0), calls, repeats, sync, hold)
        out["torch_empty_us"] = per_call_us(lambda: torch.empty(577, 1024, dtype=torch.bfloat16, device=device),
                                            calls, repeats, sync, hold)

        plain = nn.Identity()
        x = small
        out["module_call_us"] = per_call_us(lambda: plain(x), calls, repeats, sync, hold)
        hooked = nn.Identity()
        hooked.register_forward_hook(lambda m, a, o: None, prepend=True)
        out["module_with_forward_hook_us"] = per_call_us(lambda: hooked(x), calls, repeats, sync, hold)
        both = nn.Identity()
        both.register_forward_pre_hook(lambda m, a, k: None, with_kwargs=True, prepend=True)
        both.register_forward_hook(lambda m, a, k, o: None, with_kwargs=True, always_call=True)
        out["module_with_pass_hooks_us"] = per_call_us(lambda: both(x), calls, repeats, sync, hold)

        # An edit site at LLaVA-7B shapes, batch 1: CLIP-L layer output [1, 577, 1024] rank 6;
        # an LM layer [1, 672, 4096], prefix + suffix rank 8 each at 2 × 1 rows (b1).
        g = torch.Generator().manual_seed(0)
        h = torch.randn(1, 577, 1024, generator=g).to(device=device, dtype=torch.bfloat16)
        u = torch.randn(6, 1024, generator=g).to(device)
        a = torch.randn(6, 1024, generator=g).to(device) * 0.01
        b = torch.randn(6, generator=g).to(device) * 0.01
        # ~8 launches per call: a tenth of the calls keeps the driver's launch queue from filling
        out["site_whole_operator_path_us"] = per_call_us(lambda: edit_whole(h, u, a, b), max(calls // 10, 5), repeats,
                                                         sync, hold)
        kernels_run = kernels._triton() is not None and (device.type == "cuda" or kernels._interpreting())
        if kernels_run:
            packed = kernels.pack(u, a, b, min_rank=kernels.WHOLE_MIN_RANK)
            out["site_whole_kernel_us"] = per_call_us(lambda: kernels.edit_whole(h, packed), calls, repeats, sync, hold)
            lm = torch.randn(672, 4096, generator=g).to(device=device, dtype=torch.bfloat16)
            ul = torch.randn(16, 4096, generator=g).to(device)
            al = torch.randn(16, 4096, generator=g).to(device) * 0.001
            bl = torch.zeros(16, device=device)
            lpacked = kernels.pack(ul, al, bl)
            idx = torch.tensor([1, 2, 669, 670], device=device)
            mask = torch.zeros(4, 16, device=device)
            mask[:2, :8] = 1
            mask[2:, 8:] = 1
            out["site_rows_kernel_us"] = per_call_us(lambda: kernels.edit_rows_(lm, idx, mask, lpacked), calls,
                                                     repeats, sync, hold)
            # what Triton's launcher itself costs: the same kernel launched through JITFunction (binding,
            # specialisation, cache lookup), as the compiled kernel, and through launch.launch (our
            # cache of compiled kernels); in the interpreter (--cpu) a logic check of the same calls
            out.update(launcher_costs(kernels, lm, idx, mask, lpacked, calls, repeats, sync, hold))
    out.update(bank_orthonormalisation(device, g, calls, repeats, sync, hold))
    return out


@contextlib.contextmanager
def _env(**values):
    """Set (str) or unset (None) environment variables for the duration of the block."""
    saved = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        yield
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def bank_orthonormalisation(device, g, calls, repeats, sync, hold) -> dict[str, float]:
    """Host µs of one bank orthonormalisation forward with gradients on (`orthonormal_rows_stacked`
    of a bank's U Parameter, as at the start of a training step), LLaVA-7B's banks: the operator
    path (kernels off) and, where they run, the one-launch kernels."""
    import torch

    from components.editors import orthonormal_kernel
    from components.editors.loreft import orthonormal_rows_stacked

    out: dict[str, float] = {}
    for name, (n, r, d) in (("vision", (22, 6, 1024)), ("projector", (1, 6, 4096)), ("lm", (64, 4, 4096))):
        bank = torch.nn.Parameter(torch.linalg.qr(torch.randn(n, d, r, generator=g))[0].mT.contiguous().to(device))
        with torch.enable_grad():
            with _env(MRT_FUSED_KERNELS="0", MRT_TRITON_INTERPRET=None):  # ~20 launches a call: fewer calls
                assert not orthonormal_kernel.usable(bank)
                out[f"bank_orth_{name}_operator_path_us"] = per_call_us(
                    lambda: orthonormal_rows_stacked(bank), max(calls // 20, 5), repeats, sync, hold)
            if orthonormal_kernel.usable(bank):
                out[f"bank_orth_{name}_kernel_us"] = per_call_us(lambda: orthonormal_rows_stacked(bank), calls,
                                                                 repeats, sync, hold)
    return out


def launcher_costs(kernels, lm, idx, mask, packed, calls, repeats, sync, hold) -> dict[str, float | str]:
    """Host µs of one rows-kernel launch through `JITFunction` (`kernel[grid](...)`), through the
    `CompiledKernel` it returns (no argument binding or specialisation; Triton-internal API), and
    through `components.editors.launch.launch` (a drop-in for `kernel[grid]` that keeps the compiled
    kernels and calls their launcher directly; `launch_direct_share`: the share of its timed calls
    that took the direct path — 0 in Triton's interpreter, where it falls back to `kernel[grid]`)."""
    import torch

    from components.editors import launch as direct

    rows_kernel = kernels._triton()[1]
    cfg = {k: v for k, v in kernels.ROWS_CONFIG.items() if k != "BLOCK_D"}  # launch options (num_warps)
    grid = (idx.numel(),)
    consts = dict(d=lm.shape[-1], R=packed[0].shape[0], BLOCK_D=kernels.ROWS_CONFIG["BLOCK_D"])
    out: dict[str, float | str] = {}
    out["launch_jit_us"] = per_call_us(lambda: rows_kernel[grid](lm, idx, mask, *packed, **consts, **cfg), calls,
                                       repeats, sync, hold)
    try:
        compiled = rows_kernel[grid](lm, idx, mask, *packed, **consts, **cfg)
        if compiled is None:
            raise TypeError("no CompiledKernel (Triton's interpreter)")
        runner = compiled[(grid[0], 1, 1)]
        args = (lm, idx, mask, *packed, consts["d"], consts["R"], consts["BLOCK_D"])
        out["launch_compiled_us"] = per_call_us(lambda: runner(*args), calls, repeats, sync, hold)
        # the floor of launch.launch's direct path: the compiled kernel's launcher alone, on the
        # current stream, no launch metadata or hooks (what launch adds is the rest of its figure)
        run, function, packed_md, stream = compiled.run, compiled.function, compiled.packed_metadata, \
            torch.cuda.current_stream().cuda_stream
        out["launch_floor_us"] = per_call_us(lambda: run(grid[0], 1, 1, stream, function, packed_md, None, None, None,
                                                         *args), calls, repeats, sync, hold)
    except Exception as exc:  # noqa: BLE001 - internal API of this Triton version
        out["launch_compiled_error"] = repr(exc)[:300]
    before = direct.stats()
    out["launch_direct_us"] = per_call_us(lambda: direct.launch(rows_kernel, grid, lm, idx, mask, *packed, **consts,
                                                                **cfg), calls, repeats, sync, hold)
    after = direct.stats()
    taken = {k: after[k] - before[k] for k in after}
    out["launch_direct_share"] = taken["direct"] / max(sum(taken.values()), 1)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu", action="store_true", help="CPU tensors (a logic check; the numbers mean little)")
    ap.add_argument("--calls", type=int, default=400, help="calls per loop (an operator-path site queues ~8 launches each: keep calls × launches under the driver's queue, ~1000)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    from components.core.offline import set_offline_env

    set_offline_env()
    import torch

    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("gpu_host_overhead.py: no CUDA device; use --cpu for a logic check")
    device = torch.device("cpu" if args.cpu else "cuda")
    if device.type == "cuda":
        os.environ.setdefault("MRT_FUSED_KERNELS", "1")
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "calls": args.calls, "repeats": args.repeats,
              "per_call_us": measure(device, args.calls, args.repeats)}
    try:
        import triton

        result["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        result["triton"] = None
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
