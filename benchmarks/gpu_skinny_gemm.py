"""Device time of the editors' skinny fp32 products, and of alternatives (issue 7).

Why: the profiles of a b1 generate() call showed cuBLAS running the LM editors' z = rows · Aᵀ
([S, 4096] × [4096, 8], fp32) as `gemmSN_TN_kernel` at ~41 µs a call — one thread block walking
K = 4096 — and the training step's editor GEMMs as SIMT fp32 kernels. This times, per shape the
editors use, the plain product against a split-K batched product summed afterwards and an
elementwise product reduced by `sum`, all in fp32 (the editors' compute dtype), so the faster
formulation is chosen by measurement.

Run (GPU): python benchmarks/gpu_skinny_gemm.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics


def main(argv=None) -> dict:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--reps", type=int, default=200)
    args = ap.parse_args(argv)
    dev = torch.device("cuda")

    def timed(fn) -> float:
        for _ in range(10):
            fn()
        times = []
        for _ in range(5):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(args.reps):
                fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) * 1e3 / args.reps)
        return statistics.median(times)

    def split_k(x, w, chunks):  # x [M, K] · w [N, K]ᵀ as `chunks` partial products, summed
        m, k = x.shape
        n = w.shape[0]
        xs = x.view(m, chunks, k // chunks).transpose(0, 1)  # [c, M, k/c]
        ws = w.view(n, chunks, k // chunks).permute(1, 2, 0)  # [c, k/c, N]
        return torch.bmm(xs, ws).sum(0)

    def split_rows(a, b, chunks):  # aᵀ b for a [K, M], b [K, N] (K rows split into chunks), summed
        k = a.shape[0]
        return torch.bmm(a.view(chunks, k // chunks, -1).transpose(1, 2), b.view(chunks, k // chunks, -1)).sum(0)

    results = []
    # Editor weight gradients in training: gzᵀ · h and zᵀ · g, K = rows (B × 577 image tokens).
    for name, k, m, n in [("vision dA = gzᵀ h, b8", 4616, 6, 1024), ("vision dA = gzᵀ h, b16", 9232, 6, 1024)]:
        a = torch.randn(k, m, device=dev)
        b = torch.randn(k, n, device=dev)
        ref = a.t() @ b
        row = {"shape": name, "M": m, "K": k, "N": n, "mm_us": timed(lambda: a.t() @ b)}
        for c in (8, 16, 32, 64):
            if k % c == 0:
                assert torch.allclose(split_rows(a, b, c), ref, rtol=1e-4, atol=1e-2), name
                row[f"splitk{c}_us"] = timed(lambda c=c: split_rows(a, b, c))
        results.append(row)
        print(json.dumps(row), flush=True)
    # (name, M, K, N): out[M, N] = x[M, K] · w[N, K]ᵀ — the LM editors' z = rows · Aᵀ and gz = g · Uᵀ
    shapes = [
        ("lm z, b1 prompt (S=8)", 8, 4096, 8),
        ("lm z, b8 (S=64)", 64, 4096, 8),
        ("lm z, b16 (S=128)", 128, 4096, 8),
    ]
    for name, m, k, n in shapes:
        x = torch.randn(m, k, device=dev)
        w = torch.randn(n, k, device=dev)
        ref = x @ w.t()
        wt = w.t().contiguous()  # the same product with the right factor stored K-major
        row = {"shape": name, "M": m, "K": k, "N": n, "mm_us": timed(lambda: x @ w.t()),
               "mm_contiguous_wT_us": timed(lambda: x @ wt),
               "addmm_bias_us": timed(lambda: torch.addmm(w[:, 0], x, w.t())),
               "addmm_bias_contiguous_wT_us": timed(lambda: torch.addmm(w[:, 0], x, wt))}
        row["mul_sum_us"] = timed(lambda: (x[:, None, :] * w[None, :, :]).sum(-1)) if m * n * k <= 2**26 else None
        for c in (8, 16, 32, 64):
            if k % c == 0:
                got = split_k(x, w, c)
                assert torch.allclose(got, ref, rtol=1e-4, atol=1e-3), name
                row[f"splitk{c}_us"] = timed(lambda c=c: split_k(x, w, c))
        results.append(row)
        print(json.dumps(row), flush=True)
    # The editors' second product, rows + z · U: [S, r] · [r, d] with the residual added (addmm).
    for name, m in (("lm rows + z·U, S=8", 8), ("lm rows + z·U, S=64", 64)):
        z = torch.randn(m, 8, device=dev)
        u = torch.randn(8, 4096, device=dev)
        rows = torch.randn(m, 4096, device=dev)
        row = {"shape": name, "addmm_us": timed(lambda: torch.addmm(rows, z, u)),
               "baddbmm_us": timed(lambda: torch.baddbmm(rows[None], z[None], u[None]))}
        results.append(row)
        print(json.dumps(row), flush=True)
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": results}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
    return out


if __name__ == "__main__":
    main()
