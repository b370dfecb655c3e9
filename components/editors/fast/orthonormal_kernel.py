"""One Triton launch for a bank's orthonormalisation (forward) and one for its gradient (backward).

Why: on the H200 a LLaVA-7B training step at batch 8 is bound by the host. At the start of every
step `ops._OrthonormalRows` orthonormalises each editor bank (U [n, r, d] fp32; 7B: 22×6×1024
visual, 1×6×4096 projector, 64×4×4096 LM) with shifted Cholesky-QR3: ~20 small PyTorch launches,
~1.2–1.7 ms of host time per bank (profiled) while the GPU waits; its backward (~6–8 launches)
sits in the step's tail, the GPU idle too. Here each is one launch, one program per matrix.

- `orthonormal_rows`: classical Gram–Schmidt with re-orthogonalisation ("twice is enough", CGS2) in
  fp32. Row k: v = u_k; twice v ← v − Qᵀ(Q v) against the rows already made; q_k = v / ‖v‖. The
  result is the QR factor with a positive R diagonal, i.e. what `ops._cholesky_qr3` and the
  sign-fixed `loreft.orthonormal_rows` return (equal to rounding for a well-conditioned U;
  orthonormal to fp32 working precision while cond(U)·ε ≪ 1). While pow2(r) × pow2(d) ≤
  `FWD_REG_ELEMS` (7B: all three banks) the finished rows stay in registers; larger matrices keep
  them in the output and loop over column chunks. Norm guard: the residual is first scaled by its
  largest |entry| (so its norm is ≥ 1 unless it is exactly zero, no under/overflow), then divided
  by max(norm, 1): a zero or linearly dependent row gives a finite row (zero, or a unit vector of
  rounding noise) where an unguarded division would give NaN — finite like `_cholesky_qr3`, and
  likewise not orthonormal then.
- `orthonormal_rows_backward`: `_OrthonormalRows.backward`'s closed form, R = Q Uᵀ (= lowerᵀ),
  C = G Qᵀ, C ← tril(C) + tril(C, −1)ᵀ, ∂L/∂U = R⁻¹ (G − C Q). One sweep over column chunks builds
  R and C (products reduced across the block), R⁻¹ is formed by back substitution on the r × r
  tile, a second sweep writes R⁻¹ (G − C Q). As in the operator path, a rank-deficient U (a zero
  on R's diagonal) has no finite gradient.

Ranks 1 ≤ r ≤ `MAX_RANK` (16) and r ≤ d, fp32 only (the editors' parameters); anything else (and
fp64, e.g. gradcheck) takes the operator path. Like kernels.py: on for CUDA tensors, and for
CPU tensors inside `kernels.on_cpu_in_interpreter` (tests); nothing is built or imported at import time, and without
Triton `usable` is False.
"""

from __future__ import annotations

import functools

import torch

from . import kernels

MAX_RANK = 16  # rows per matrix the kernels take (the padded rank tile stays ≤ 16 × BLOCK_D)
# Launch configurations, timed on an H200 (kernel time from the profiler, LLaVA-7B banks; the
# operator path's 42–45 kernels took 106–272 µs forward, its 12–14 backward kernels 32–78 µs):
# - forward: rows kept in registers while pow2(r) × pow2(d) ≤ FWD_REG_ELEMS (8 × 4096: every 7B
#   bank), num_warps = clamp(tile / FWD_ELEMS_PER_WARP, 4, 8) — 9.4 / 16.4 / 10.3 µs for the
#   vision / projector / LM bank (16 warps: 14.2 / 19.8 / 11.5); larger matrices loop over columns
#   (FWD_CHUNK_CONFIG; 3 × 16 × 4096: 125 µs, 155 in chunks of 1024; no 7B bank has such a shape);
# - backward: column chunks of BWD_TILE_ELEMS / pow2(r) (capped at pow2(d)), BWD_WARPS warps —
#   11.3 / 17.7 / 7.8 µs (chunks of 128 and 4 warps: 40 / 174 / 108 µs: one program walks all d
#   columns serially, so long chunks pay), 8 × 16 × 2048: 92 µs.
FWD_REG_ELEMS = 8 * 4096
FWD_ELEMS_PER_WARP = 2048
FWD_CHUNK_CONFIG = {"BLOCK_D": 2048, "num_warps": 4}
BWD_TILE_ELEMS = 32768
BWD_WARPS = 8
_TINY = 1.1754943508222875e-38  # smallest normal fp32: the floor of a residual's largest |entry|


@functools.lru_cache(maxsize=1)
def _triton():
    imported = kernels.import_triton()
    if imported is None:
        return None
    triton, tl = imported

    @triton.jit
    def fwd_regs_kernel(u_ptr, q_ptr, r: tl.constexpr, d: tl.constexpr, RP: tl.constexpr, BLOCK_D: tl.constexpr,
                        TINY: tl.constexpr):
        # One matrix per program; Q's finished rows live in the [RP, BLOCK_D] register tile q
        # (rows ≥ k still zero, so projecting on the whole tile projects on rows < k).
        base = tl.program_id(0).to(tl.int64) * (r * d)
        rows = tl.arange(0, RP)
        cols = tl.arange(0, BLOCK_D)
        col_ok = cols < d
        q = tl.zeros((RP, BLOCK_D), dtype=tl.float32)
        for k in range(r):
            v = tl.load(u_ptr + base + k * d + cols, mask=col_ok, other=0.0)
            c = tl.sum(q * v[None, :], axis=1)
            v = v - tl.sum(c[:, None] * q, axis=0)
            c = tl.sum(q * v[None, :], axis=1)  # twice is enough
            v = v - tl.sum(c[:, None] * q, axis=0)
            scale = tl.div_rn(1.0, tl.maximum(tl.max(tl.abs(v), axis=0), TINY))
            w = v * scale
            norm = tl.sqrt_rn(tl.sum(w * w, axis=0))  # ≥ 1 unless v == 0
            v = v * tl.div_rn(scale, tl.maximum(norm, 1.0))
            q = tl.where(rows[:, None] == k, v[None, :], q)
            tl.store(q_ptr + base + k * d + cols, v, mask=col_ok)

    @triton.jit
    def fwd_chunked_kernel(u_ptr, q_ptr, r: tl.constexpr, d: tl.constexpr, RP: tl.constexpr, BLOCK_D: tl.constexpr,
                           TINY: tl.constexpr):
        # The same CGS2 with Q's rows in the output, read back chunk by chunk (barriers: a row is
        # written by some threads and read by others).
        base = tl.program_id(0).to(tl.int64) * (r * d)
        rows = tl.arange(0, RP)
        cols0 = tl.arange(0, BLOCK_D)
        for k in range(r):
            done = rows[:, None] < k
            row_k = base + k * d
            c = tl.zeros((RP,), dtype=tl.float32)
            for d0 in range(0, d, BLOCK_D):
                cols = d0 + cols0
                col_ok = cols < d
                v = tl.load(u_ptr + row_k + cols, mask=col_ok, other=0.0)
                qc = tl.load(q_ptr + base + rows[:, None] * d + cols[None, :], mask=done & col_ok[None, :], other=0.0)
                c += tl.sum(qc * v[None, :], axis=1)
            c2 = tl.zeros((RP,), dtype=tl.float32)
            for d0 in range(0, d, BLOCK_D):
                cols = d0 + cols0
                col_ok = cols < d
                v = tl.load(u_ptr + row_k + cols, mask=col_ok, other=0.0)
                qc = tl.load(q_ptr + base + rows[:, None] * d + cols[None, :], mask=done & col_ok[None, :], other=0.0)
                v = v - tl.sum(c[:, None] * qc, axis=0)
                tl.store(q_ptr + row_k + cols, v, mask=col_ok)
                c2 += tl.sum(qc * v[None, :], axis=1)
            tl.debug_barrier()
            vmax = 0.0
            for d0 in range(0, d, BLOCK_D):
                cols = d0 + cols0
                col_ok = cols < d
                v = tl.load(q_ptr + row_k + cols, mask=col_ok, other=0.0)
                qc = tl.load(q_ptr + base + rows[:, None] * d + cols[None, :], mask=done & col_ok[None, :], other=0.0)
                v = v - tl.sum(c2[:, None] * qc, axis=0)
                tl.store(q_ptr + row_k + cols, v, mask=col_ok)
                vmax = tl.maximum(vmax, tl.max(tl.abs(v), axis=0))
            tl.debug_barrier()
            scale = tl.div_rn(1.0, tl.maximum(vmax, TINY))
            ss = 0.0
            for d0 in range(0, d, BLOCK_D):
                cols = d0 + cols0
                w = tl.load(q_ptr + row_k + cols, mask=cols < d, other=0.0) * scale
                ss += tl.sum(w * w, axis=0)
            factor = tl.div_rn(scale, tl.maximum(tl.sqrt_rn(ss), 1.0))
            for d0 in range(0, d, BLOCK_D):
                cols = d0 + cols0
                col_ok = cols < d
                v = tl.load(q_ptr + row_k + cols, mask=col_ok, other=0.0)
                tl.store(q_ptr + row_k + cols, v * factor, mask=col_ok)
            tl.debug_barrier()

    @triton.jit
    def bwd_kernel(u_ptr, q_ptr, g_ptr, out_ptr, r: tl.constexpr, d: tl.constexpr, RP: tl.constexpr,
                   BLOCK_D: tl.constexpr):
        # No tl.dot: a first version with fp32 ("ieee") dots of the rank tile padded to 16 took
        # ~47 / 170 / 168 µs (vision / projector / LM bank, best chunking) against 11 / 18 / 8 µs.
        base = tl.program_id(0).to(tl.int64) * (r * d)
        rows = tl.arange(0, RP)
        row_ok = rows < r
        ii = rows[:, None]
        jj = rows[None, :]
        cols0 = tl.arange(0, BLOCK_D)
        rm = tl.zeros((RP, RP), dtype=tl.float32)  # R = Q Uᵀ (upper triangular: lowerᵀ)
        cm = tl.zeros((RP, RP), dtype=tl.float32)  # C = G Qᵀ
        for d0 in range(0, d, BLOCK_D):
            cols = d0 + cols0
            col_ok = cols < d
            offs = base + rows[:, None] * d + cols[None, :]
            ok = row_ok[:, None] & col_ok[None, :]
            u = tl.load(u_ptr + offs, mask=ok, other=0.0)
            g = tl.load(g_ptr + offs, mask=ok, other=0.0)
            for j in range(r):
                q_j = tl.load(q_ptr + base + j * d + cols, mask=col_ok, other=0.0)
                rm += tl.where(ii == j, tl.sum(u * q_j[None, :], axis=1)[None, :], 0.0)  # R[j, i] = q_j·u_i
                cm += tl.where(jj == j, tl.sum(g * q_j[None, :], axis=1)[:, None], 0.0)  # C[i, j] = g_i·q_j
        cm = tl.where(ii >= jj, cm, 0.0) + tl.trans(tl.where(ii > jj, cm, 0.0))  # tril(C) + tril(C, −1)ᵀ
        # R⁻¹ by back substitution, row r−1 first: X_i = (e_i − Σ_{j>i} R_ij X_j) / R_ii (only R's
        # upper triangle is read, like solve_triangular(upper=True); padded rows of X stay zero).
        rinv = tl.zeros((RP, RP), dtype=tl.float32)
        for t in range(r):
            i = r - 1 - t
            r_i = tl.sum(tl.where(ii == i, rm, 0.0), axis=0)  # row i of R, indexed by column j
            r_ii = tl.sum(tl.where(rows == i, r_i, 0.0), axis=0)
            s = tl.sum(tl.where(rows > i, r_i, 0.0)[:, None] * rinv, axis=0)
            x_i = tl.div_rn(tl.where(rows == i, 1.0, 0.0) - s, r_ii + tl.zeros((RP,), dtype=tl.float32))
            rinv = tl.where(ii == i, x_i[None, :], rinv)
        for d0 in range(0, d, BLOCK_D):  # ∂L/∂U = R⁻¹ Y, Y = G − C Q
            cols = d0 + cols0
            col_ok = cols < d
            offs = base + rows[:, None] * d + cols[None, :]
            ok = row_ok[:, None] & col_ok[None, :]
            y = tl.load(g_ptr + offs, mask=ok, other=0.0)
            for j in range(r):
                q_j = tl.load(q_ptr + base + j * d + cols, mask=col_ok, other=0.0)
                y -= tl.sum(tl.where(jj == j, cm, 0.0), axis=1)[:, None] * q_j[None, :]
            x = tl.zeros((RP, BLOCK_D), dtype=tl.float32)
            for j in range(r):
                y_j = tl.sum(tl.where(ii == j, y, 0.0), axis=0)
                x += tl.sum(tl.where(jj == j, rinv, 0.0), axis=1)[:, None] * y_j[None, :]
            tl.store(out_ptr + offs, x, mask=ok)

    return fwd_regs_kernel, fwd_chunked_kernel, bwd_kernel


def usable(u: torch.Tensor) -> bool:
    """True when a bank orthonormalisation of u [n, r, d] can take the kernels: fp32, 1 ≤ r ≤
    `MAX_RANK`, r ≤ d, on a device the kernels run on (`kernels.runs_on`),
    Triton importable."""
    if u.dtype != torch.float32 or u.dim() != 3:
        return False
    r, d = u.shape[1], u.shape[2]
    if not 1 <= r <= MAX_RANK or r > d:
        return False
    if not kernels.runs_on(u.device):
        return False
    return _triton() is not None


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


def orthonormal_rows(u: torch.Tensor, **config) -> torch.Tensor:
    """The sign-fixed QR rows of each u[i] (u [n, r, d] fp32, see `usable`): q [n, r, d],
    contiguous fp32, in one launch. `config` (tuning, tests): BLOCK_D (a power of two; below
    pow2(d) it selects the chunked kernel) and num_warps."""
    fwd_regs, fwd_chunked, _ = _triton()[:3]
    n, r, d = u.shape
    u = _contiguous(u)
    q = torch.empty((n, r, d), dtype=torch.float32, device=u.device)
    if n == 0:
        return q
    rp, dp = _pow2(r), _pow2(d)
    block_d = config.get("BLOCK_D")
    if block_d is None and rp * dp <= FWD_REG_ELEMS or block_d is not None and block_d >= dp:
        warps = config.get("num_warps", min(8, max(4, rp * dp // FWD_ELEMS_PER_WARP)))
        with kernels._on_device(u):
            fwd_regs[(n,)](u, q, r=r, d=d, RP=rp, BLOCK_D=dp, TINY=_TINY, num_warps=warps)
    else:
        cfg = {**FWD_CHUNK_CONFIG, **config}
        with kernels._on_device(u):
            fwd_chunked[(n,)](u, q, r=r, d=d, RP=rp, TINY=_TINY, **cfg)
    return q


def orthonormal_rows_backward(u: torch.Tensor, q: torch.Tensor, grad: torch.Tensor, **config) -> torch.Tensor:
    """∂L/∂U from U, Q = `orthonormal_rows(U)` and G = ∂L/∂Q (all [n, r, d] fp32), the math of
    `ops._OrthonormalRows.backward`, in one launch; contiguous fp32 like U. `config` (tuning,
    tests): BLOCK_D (a power of two) and num_warps."""
    bwd = _triton()[2]
    n, r, d = u.shape
    u, q, grad = _contiguous(u), _contiguous(q), _contiguous(grad if grad.dtype == torch.float32 else grad.float())
    out = torch.empty((n, r, d), dtype=torch.float32, device=u.device)
    if n == 0:
        return out
    rp = _pow2(r)
    cfg = {"BLOCK_D": min(_pow2(d), BWD_TILE_ELEMS // rp), "num_warps": BWD_WARPS, **config}
    with kernels._on_device(u):
        bwd[(n,)](u, q, grad, out, r=r, d=d, RP=rp, **cfg)
    return out
