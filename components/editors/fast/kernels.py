"""Fused kernels for the editors (Triton): one launch per edit site, one for the positions.

Why (docs/performance.md): at generation time a LLaVA-7B prompt pass is bound by the
host, not the GPU — on the H200 host every PyTorch operator costs ~5–12 µs of CPU before its kernel
starts, and a prompt pass has 56 edit sites. With plain operators
a site is 8–12 dispatcher calls (casts, two GEMMs, mask, gather/scatter) and the positions ~45
more: +451 kernel launches per b1 generate(). With these kernels it is +56 (one per site and one
for the positions), measured by the profiler:

- `edit_whole`: ψ(h) = h + (h (W − U)ᵀ + b) U over every row (visual layers, projector), into a new tensor;
- `edit_rows_no_grad_`: the same at the prefix/suffix rows of an LM layer, in place, for all the layer's
  editors at once (rows gathered by flat index, a slot × column mask keeping each slot to its own
  editor's columns, exactly as `ops.edit_rows_stacked_`);
- `positions`: `positions.edit_positions` for inference (prompt = attended tokens), written straight
  into the layout `edit_rows_no_grad_` reads (flat row indices, validity, padded slot × column mask).

Arithmetic: fp32 like the operator path, rounded once to the hidden states' dtype. The whole-tensor
products use `tl.dot` with `input_precision="tf32x3"` (see WHOLE_CONFIG): a plain `tf32` dot — what
Triton makes of a broadcast-multiply-reduce by default — put 19% of bf16 outputs 1 step off in a
first version, and the GPU test (tests/test_editor_kernels.py) checks the configured kernels and the
operator path against float64 alike.

Training: `EditWhole` is the whole-tensor edit with gradients — the same forward kernel (also
keeping z = h Aᵀ + b) and one backward kernel (∂L/∂h, and per-block shares of the parameters'
gradients summed by one deterministic `sum`): 1 + 2 launches per visual/projector site and step
where the operator path (`ops._Edit`) makes ~12, in the host-bound vision tower of a b8 step.
`EditRows` does the same for the prefix/suffix rows of an LM layer: two launches forward (split over
d: partial z per column chunk, then the sum and the write; they also save the rows and z), and
backward one gradient copy (as the operator path) plus three launches, where `ops._EditRows`
makes ~16 small kernels per layer in the GPU-bound LM phases (five of them SIMT fp32 GEMMs of
10–30 µs each at b8). Inference keeps one launch per layer (`rows_kernel`, one program per slot
walking d): at batch 1 an extra launch costs the host more than the split saves the GPU.
The rank dimension is padded to a power of two: with zero rows (`pack`, once per parameter change,
kept by sites.py with its no-grad stacks) for inference, by masked loads for training, so a site
launches exactly one kernel. Used for CUDA tensors whenever Triton imports (it ships with
PyTorch's CUDA wheels; `train.editors.impl: reference` is the plain path to compare with); CPU
tensors take the operator path, except inside `on_cpu_in_interpreter` (tests: Triton's interpreter).
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch


# Launch configurations, chosen by timing each candidate on an H200 (fastest correct at
# both b1 and b8 of the 7B shapes; device µs per call whole 48.7/77.3 → 32.7/35.2, rows 31.5/32.2 →
# 17.3/19.4 against the first configuration). PRECISION "tf32x3": each fp32
# product as three TF32 tensor-core products (hi·hi + hi·lo + lo·hi) — error of the order of fp32
# rounding (measured ≤ 0.3 fp32 roundings of Σ|terms| beyond one bf16 step; "ieee" 0.4–1.2), where
# plain "tf32" is 2^13 times coarser. The GPU test checks the configured kernels against float64.
# BACKWARD_CONFIG (EditWhole's backward): BLOCK_D 64 fastest correct at b8 of 48 configurations (73.9 →
# 57.5 µs; at b16 85.2 against 83.0 for BLOCK_D 128). ROWS_TRAIN_CONFIG and ROWS_GRAD_CONFIG: untuned
# per call in a profiled b8 step
# rows_partial_kernel ~3.8 µs, rows_apply_kernel ~2.8, rows_param_grad_kernel ~6.0 — against ~29 µs
# for one program per slot walking d (rows_kernel's design, which inference keeps).
WHOLE_CONFIG = {"BLOCK_N": 32, "BLOCK_D": 128, "num_warps": 4, "PRECISION": "tf32x3"}
ROWS_CONFIG = {"BLOCK_D": 1024, "num_warps": 2}
BACKWARD_CONFIG = {"BLOCK_N": 32, "BLOCK_D": 64, "num_warps": 4, "PRECISION": "tf32x3"}
ROWS_TRAIN_CONFIG = {"BLOCK_D": 256, "num_warps": 2}  # EditRows' split kernels
ROWS_GRAD_CONFIG = {"BLOCK_S": 32, "BLOCK_D": 64, "num_warps": 4, "PRECISION": "tf32x3"}
_BLOCK_T = 256  # tokens per step of the positions kernel
WHOLE_MIN_RANK = 16  # tl.dot needs every dimension ≥ 16: the whole-tensor kernel's rank is padded to 16


def import_triton():
    """(triton, triton.language), or None where Triton does not import (not installed, or broken for
    this platform): the operator path serves then."""
    try:
        import triton
        import triton.language as tl
    except Exception:  # noqa: BLE001 - any import failure means "no kernels"
        return None
    return triton, tl


@functools.lru_cache(maxsize=1)
def _triton():
    imported = import_triton()
    if imported is None:
        return None
    triton, tl = imported

    @triton.jit
    def whole_kernel(h_ptr, out_ptr, z_ptr, a_ptr, u_ptr, b_ptr, n_rows, stride_h, stride_o, d: tl.constexpr,
                     R: tl.constexpr, RANK: tl.constexpr, STORE_Z: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
        # ψ(h) = h + (h Aᵀ + b) U for BLOCK_N rows. A, U: [RANK, d] rows (R = RANK padded to a power
        # of two ≥ 16 in registers: masked loads, no padded copies). STORE_Z keeps z = h Aᵀ + b
        # [n_rows, R] fp32 for the backward (training).
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < n_rows
        rr = tl.arange(0, R)
        rank_ok = rr < RANK
        acc = tl.zeros((BLOCK_N, R), dtype=tl.float32)
        for d0 in range(0, d, BLOCK_D):  # z = h Aᵀ (fp32)
            cols = d0 + tl.arange(0, BLOCK_D)
            col_ok = cols < d
            h = tl.load(h_ptr + rows[:, None] * stride_h + cols[None, :],
                        mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
            a = tl.load(a_ptr + rr[:, None] * d + cols[None, :], mask=rank_ok[:, None] & col_ok[None, :], other=0.0)
            # PRECISION "tf32x3" (WHOLE_CONFIG): fp32-grade products on tensor cores. (A broadcast-
            # multiply-reduce gets rewritten by Triton into a dot at its default TF32 precision —
            # 10-bit mantissas, visible after the bf16 rounding.)
            acc += tl.dot(h, tl.trans(a), input_precision=PRECISION)
        z = acc + tl.load(b_ptr + rr, mask=rank_ok, other=0.0)[None, :]
        if STORE_Z:
            tl.store(z_ptr + rows[:, None] * R + rr[None, :], z, mask=row_ok[:, None])
        for d0 in range(0, d, BLOCK_D):  # out = h + z U, rounded once to the output dtype
            cols = d0 + tl.arange(0, BLOCK_D)
            col_ok = cols < d
            ok = row_ok[:, None] & col_ok[None, :]
            h = tl.load(h_ptr + rows[:, None] * stride_h + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            u = tl.load(u_ptr + rr[:, None] * d + cols[None, :], mask=rank_ok[:, None] & col_ok[None, :], other=0.0)
            out = h + tl.dot(z, u, input_precision=PRECISION)
            tl.store(out_ptr + rows[:, None] * stride_o + cols[None, :],
                     out.to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=ok)

    @triton.jit
    def whole_backward_kernel(g_ptr, h_ptr, z_ptr, a_ptr, u_ptr, gh_ptr, part_ptr, n_rows, stride_g, stride_h,
                              stride_gh, d: tl.constexpr, R: tl.constexpr, RANK: tl.constexpr,
                              NEED_GH: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                              PRECISION: tl.constexpr):
        # The backward of whole_kernel for BLOCK_N rows, g = ∂L/∂out: gz = g Uᵀ; ∂L/∂h = g + gz A;
        # this block's shares of ∂L/∂U (direct) = zᵀ g, ∂L/∂A = gzᵀ h and ∂L/∂b = Σ gz, written to its
        # own row of `part` [programs, 2·RANK·d + RANK] (the real rank's rows only: the caller's sum
        # reads no padding and splits the total into the three gradients as views; deterministic,
        # no atomics).
        pid = tl.program_id(0)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < n_rows
        rr = tl.arange(0, R)
        rank_ok = rr < RANK
        gz = tl.zeros((BLOCK_N, R), dtype=tl.float32)
        for d0 in range(0, d, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            col_ok = cols < d
            g = tl.load(g_ptr + rows[:, None] * stride_g + cols[None, :],
                        mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
            u = tl.load(u_ptr + rr[:, None] * d + cols[None, :], mask=rank_ok[:, None] & col_ok[None, :], other=0.0)
            gz += tl.dot(g, tl.trans(u), input_precision=PRECISION)
        z = tl.load(z_ptr + rows[:, None] * R + rr[None, :], mask=row_ok[:, None], other=0.0)
        part = part_ptr + pid.to(tl.int64) * (2 * RANK * d + RANK)
        for d0 in range(0, d, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            col_ok = cols < d
            ok = row_ok[:, None] & col_ok[None, :]
            g = tl.load(g_ptr + rows[:, None] * stride_g + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            h = tl.load(h_ptr + rows[:, None] * stride_h + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            if NEED_GH:
                a = tl.load(a_ptr + rr[:, None] * d + cols[None, :], mask=rank_ok[:, None] & col_ok[None, :],
                            other=0.0)
                gh = g + tl.dot(gz, a, input_precision=PRECISION)
                tl.store(gh_ptr + rows[:, None] * stride_gh + cols[None, :],
                         gh.to(gh_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=ok)
            du = tl.dot(tl.trans(z), g, input_precision=PRECISION)  # [R, BLOCK_D]
            da = tl.dot(tl.trans(gz), h, input_precision=PRECISION)
            keep = rank_ok[:, None] & col_ok[None, :]
            tl.store(part + rr[:, None] * d + cols[None, :], du, mask=keep)
            tl.store(part + RANK * d + rr[:, None] * d + cols[None, :], da, mask=keep)
        tl.store(part + 2 * RANK * d + rr, tl.sum(gz, axis=0), mask=rank_ok)

    @triton.jit
    def rows_kernel(h_ptr, idx_ptr, mask_ptr, a_ptr, u_ptr, b_ptr, d: tl.constexpr, R: tl.constexpr,
                    BLOCK_D: tl.constexpr):
        # Inference, one program per slot: row ← row + (mask ⊙ (row Aᵀ + b)) U, in place; A, U, b
        # packed to rank R (zero rows), mask [S, R]. One launch per LM layer: at batch 1 the host's
        # launch costs more than this kernel's serial walk over d (training splits it over d instead).
        slot = tl.program_id(0)
        row = tl.load(idx_ptr + slot).to(tl.int64)
        rr = tl.arange(0, R)
        acc = tl.zeros((R,), dtype=tl.float32)
        for d0 in range(0, d, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            col_ok = cols < d
            h = tl.load(h_ptr + row * d + cols, mask=col_ok, other=0.0).to(tl.float32)
            a = tl.load(a_ptr + rr[:, None] * d + cols[None, :], mask=col_ok[None, :], other=0.0)
            acc += tl.sum(a * h[None, :], axis=1)
        z = (acc + tl.load(b_ptr + rr)) * tl.load(mask_ptr + slot * R + rr)
        for d0 in range(0, d, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            col_ok = cols < d
            h = tl.load(h_ptr + row * d + cols, mask=col_ok, other=0.0).to(tl.float32)
            u = tl.load(u_ptr + rr[:, None] * d + cols[None, :], mask=col_ok[None, :], other=0.0)
            out = h + tl.sum(z[:, None] * u, axis=0)
            tl.store(h_ptr + row * d + cols, out.to(h_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=col_ok)

    @triton.jit
    def rows_partial_kernel(h_ptr, idx_ptr, a_ptr, zpart_ptr, saved_ptr, d: tl.constexpr, R: tl.constexpr,
                            RANK: tl.constexpr, NC: tl.constexpr, SAVE_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
        # Training, step 1 of 2, program (slot, chunk): zpart[slot, chunk] = row[chunk] · A[:, chunk]ᵀ
        # (fp32) for BLOCK_D columns; SAVE_ROWS copies the chunk as read. Split over d so that a
        # slot's 4,096 columns are read by NC programs at once, not walked by one (rows_kernel).
        slot = tl.program_id(0)
        c = tl.program_id(1)
        row = tl.load(idx_ptr + slot).to(tl.int64)
        cols = c * BLOCK_D + tl.arange(0, BLOCK_D)
        col_ok = cols < d
        rr = tl.arange(0, R)
        rank_ok = rr < RANK
        h_raw = tl.load(h_ptr + row * d + cols, mask=col_ok, other=0.0)
        if SAVE_ROWS:
            tl.store(saved_ptr + slot.to(tl.int64) * d + cols, h_raw, mask=col_ok)
        a = tl.load(a_ptr + rr[:, None] * d + cols[None, :], mask=rank_ok[:, None] & col_ok[None, :], other=0.0)
        tl.store(zpart_ptr + (slot * NC + c) * R + rr, tl.sum(a * h_raw.to(tl.float32)[None, :], axis=1))

    @triton.jit
    def rows_apply_kernel(h_ptr, idx_ptr, mask_ptr, u_ptr, b_ptr, zpart_ptr, z_ptr, d: tl.constexpr,
                          R: tl.constexpr, RANK: tl.constexpr, NC: tl.constexpr, HAS_B: tl.constexpr,
                          WRITE: tl.constexpr, BLOCK_D: tl.constexpr):
        # Training, step 2 of 2, program (slot, chunk): z = mask ⊙ (Σ_c zpart[slot, c] + b), summed in
        # a fixed order (deterministic); chunk 0 stores z [S, R]; WRITE: row[chunk] += z U[:, chunk].
        slot = tl.program_id(0)
        c = tl.program_id(1)
        rr = tl.arange(0, R)
        rank_ok = rr < RANK
        acc = tl.zeros((R,), dtype=tl.float32)
        for i in range(NC):
            acc += tl.load(zpart_ptr + (slot * NC + i) * R + rr)
        if HAS_B:
            acc += tl.load(b_ptr + rr, mask=rank_ok, other=0.0)
        z = acc * tl.load(mask_ptr + slot * RANK + rr, mask=rank_ok, other=0.0)
        if c == 0:
            tl.store(z_ptr + slot * R + rr, z)
        if WRITE:
            row = tl.load(idx_ptr + slot).to(tl.int64)
            cols = c * BLOCK_D + tl.arange(0, BLOCK_D)
            col_ok = cols < d
            h = tl.load(h_ptr + row * d + cols, mask=col_ok, other=0.0).to(tl.float32)
            u = tl.load(u_ptr + rr[:, None] * d + cols[None, :], mask=rank_ok[:, None] & col_ok[None, :], other=0.0)
            out = h + tl.sum(z[:, None] * u, axis=0)
            tl.store(h_ptr + row * d + cols, out.to(h_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=col_ok)

    @triton.jit
    def rows_param_grad_kernel(g_ptr, saved_ptr, idx_ptr, z_ptr, gz_ptr, du_ptr, da_ptr, db_ptr, n_slots,
                               d: tl.constexpr, R: tl.constexpr, RANK: tl.constexpr, Z_STRIDE: tl.constexpr,
                               BLOCK_S: tl.constexpr, NB: tl.constexpr, BLOCK_D: tl.constexpr,
                               PRECISION: tl.constexpr):
        # The rows edit's parameter gradients for BLOCK_D columns, every slot in blocks of BLOCK_S:
        # ∂U (direct) = zᵀ g[idx], ∂A = gzᵀ rows, and (program 0) ∂b = Σ gz. Each program owns its
        # columns: no atomics, deterministic. NB = blocks of slots rounded up to a power of two (a
        # constexpr trip count, as in positions_kernel: Triton's interpreter needs one).
        pid = tl.program_id(0)
        cols = pid * BLOCK_D + tl.arange(0, BLOCK_D)
        col_ok = cols < d
        rr = tl.arange(0, R)
        rank_ok = rr < RANK
        du = tl.zeros((R, BLOCK_D), dtype=tl.float32)
        da = tl.zeros((R, BLOCK_D), dtype=tl.float32)
        db = tl.zeros((R,), dtype=tl.float32)
        for i in range(NB):
            slots = i * BLOCK_S + tl.arange(0, BLOCK_S)
            slot_ok = slots < n_slots
            rows = tl.load(idx_ptr + slots, mask=slot_ok, other=0).to(tl.int64)
            ok = slot_ok[:, None] & col_ok[None, :]
            g = tl.load(g_ptr + rows[:, None] * d + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            h = tl.load(saved_ptr + slots[:, None].to(tl.int64) * d + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            zmask = slot_ok[:, None] & rank_ok[None, :]  # z, gz [S, Z_STRIDE]: R ≥ 16 only in registers
            z = tl.load(z_ptr + slots[:, None] * Z_STRIDE + rr[None, :], mask=zmask, other=0.0)
            gz = tl.load(gz_ptr + slots[:, None] * Z_STRIDE + rr[None, :], mask=zmask, other=0.0)
            du += tl.dot(tl.trans(z), g, input_precision=PRECISION)
            da += tl.dot(tl.trans(gz), h, input_precision=PRECISION)
            db += tl.sum(gz, axis=0)
        out = rr[:, None] * d + cols[None, :]
        tl.store(du_ptr + out, du, mask=rank_ok[:, None] & col_ok[None, :])
        tl.store(da_ptr + out, da, mask=rank_ok[:, None] & col_ok[None, :])
        if pid == 0:
            tl.store(db_ptr + rr, db, mask=rank_ok)

    @triton.jit
    def positions_kernel(ids_ptr, att_ptr, idx_ptr, valid_ptr, mask_ptr, T, image_id, suffix_off,
                         HAS_ATT: tl.constexpr, HAS_IMAGE: tl.constexpr, P: tl.constexpr, S: tl.constexpr,
                         PP: tl.constexpr, SP: tl.constexpr, RP: tl.constexpr, RS: tl.constexpr,
                         R: tl.constexpr, BLOCK: tl.constexpr, NB: tl.constexpr):
        # One program per sample: positions.edit_positions with prompt = attended (inference),
        # written straight into the fused layout (prefix slots b·P + k, then suffix slots
        # suffix_off + b·S + k; flat row b·T + t; invalid slots row b·T + 0, mask row 0).
        b = tl.program_id(0)
        base = b.to(tl.int64) * T
        last_img = -1
        first_att = T
        # NB = blocks of BLOCK tokens, rounded up to a power of two: a constexpr trip count (a handful
        # of compiled variants over all prompt lengths, and Triton's interpreter needs one).
        for i in range(NB):  # the anchor: last image token, else first attended token
            t = i * BLOCK + tl.arange(0, BLOCK)
            ok = t < T
            att = ok
            if HAS_ATT:
                att = ok & (tl.load(att_ptr + base + t, mask=ok, other=0) != 0)
            if HAS_IMAGE:
                ids = tl.load(ids_ptr + base + t, mask=ok, other=0)
                last_img = tl.maximum(last_img, tl.max(tl.where(att & (ids == image_id), t, -1), axis=0))
            first_att = tl.minimum(first_att, tl.min(tl.where(att, t, T), axis=0))
        anchor = tl.where(last_img >= 0, last_img, first_att)
        n = 0
        for i in range(NB):  # instruction length: attended tokens after the anchor
            t = i * BLOCK + tl.arange(0, BLOCK)
            ok = t < T
            att = ok
            if HAS_ATT:
                att = ok & (tl.load(att_ptr + base + t, mask=ok, other=0) != 0)
            n += tl.sum((att & (t > anchor)).to(tl.int32), axis=0)
        short = n < P + S
        p_eff = tl.where(short, tl.minimum(n // 2, P), P)
        s_eff = tl.where(short, tl.minimum(n // 2, S), S)
        cols = tl.arange(0, R)
        if P > 0:  # prefix slots: validity, mask rows, row 0 for the invalid ones
            k = tl.arange(0, PP)
            in_p = k < P
            ok_k = k < p_eff
            slot = b * P + k
            tl.store(valid_ptr + slot, ok_k.to(tl.int8), mask=in_p)
            tl.store(idx_ptr + slot, base + tl.zeros((PP,), dtype=tl.int64), mask=in_p & (k >= p_eff))
            m = (ok_k[:, None] & (cols[None, :] < RP)).to(tl.float32)
            tl.store(mask_ptr + slot[:, None] * R + cols[None, :], m, mask=in_p[:, None])
        if S > 0:
            k = tl.arange(0, SP)
            in_s = k < S
            ok_k = k < s_eff
            slot = suffix_off + b * S + k
            tl.store(valid_ptr + slot, ok_k.to(tl.int8), mask=in_s)
            tl.store(idx_ptr + slot, base + tl.zeros((SP,), dtype=tl.int64), mask=in_s & (k >= s_eff))
            m = (ok_k[:, None] & (cols[None, :] >= RP) & (cols[None, :] < RP + RS)).to(tl.float32)
            tl.store(mask_ptr + slot[:, None] * R + cols[None, :], m, mask=in_s[:, None])
        carry = 0
        suffix_start = n - s_eff
        for i in range(NB):  # the valid slots: instruction tokens by rank
            t = i * BLOCK + tl.arange(0, BLOCK)
            ok = t < T
            att = ok
            if HAS_ATT:
                att = ok & (tl.load(att_ptr + base + t, mask=ok, other=0) != 0)
            inst = att & (t > anchor)
            rank = carry + tl.cumsum(inst.to(tl.int32), axis=0) - 1
            if P > 0:
                tl.store(idx_ptr + b * P + rank, base + t, mask=inst & (rank < p_eff))
            if S > 0:
                tl.store(idx_ptr + suffix_off + b * S + (rank - suffix_start), base + t,
                         mask=inst & (rank >= suffix_start))
            carry += tl.sum(inst.to(tl.int32), axis=0)

    return (whole_kernel, rows_kernel, positions_kernel, whole_backward_kernel, rows_param_grad_kernel,
            rows_partial_kernel, rows_apply_kernel)


_cpu_interpreter = False  # `on_cpu_in_interpreter`: the kernels also take CPU tensors


@contextlib.contextmanager
def on_cpu_in_interpreter(enabled: bool = True):
    """Inside: the kernels (and orthonormal_kernel's) also edit CPU tensors, in Triton's interpreter
    (TRITON_INTERPRET=1, set before Triton is first imported, as tests/conftest.py does without a
    GPU) — the tests' way to check them, and the hooks that pick them, without a GPU. `enabled=False`
    inside such a block: CPU tensors take the operator path again."""
    global _cpu_interpreter
    before, _cpu_interpreter = _cpu_interpreter, enabled
    try:
        yield
    finally:
        _cpu_interpreter = before


def runs_on(device: torch.device) -> bool:
    """True when the kernels run on `device`: CUDA, or CPU inside `on_cpu_in_interpreter`."""
    if device.type == "cuda":
        return True
    return _cpu_interpreter and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def usable(hidden: torch.Tensor) -> bool:
    """True when the fused kernels can edit `hidden`: no gradients wanted, a tensor on a device the
    kernels run on (`runs_on`), a 16/32-bit float dtype, Triton importable."""
    if torch.is_grad_enabled() or hidden.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return False
    if not runs_on(hidden.device):
        return False
    return _triton() is not None


def usable_on(device: torch.device) -> bool:
    """`usable` for work on `device` that is not an edit of hidden states (the positions kernel)."""
    if torch.is_grad_enabled() or not runs_on(device):
        return False
    return _triton() is not None


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def pack(u: torch.Tensor, w_minus_u: torch.Tensor, b: torch.Tensor, min_rank: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(W − U, U, b) in fp32, contiguous, rank padded with zero rows to a power of two ≥ `min_rank`
    (`WHOLE_MIN_RANK` for `edit_whole`, whose products are `tl.dot`s of at least 16 × 16)."""
    r, d = u.shape
    rp = max(_pow2(r), min_rank)
    a_p = torch.zeros(rp, d, dtype=torch.float32, device=u.device)
    u_p = torch.zeros(rp, d, dtype=torch.float32, device=u.device)
    b_p = torch.zeros(rp, dtype=torch.float32, device=u.device)
    a_p[:r], u_p[:r], b_p[:r] = w_minus_u, u, b
    return a_p, u_p, b_p


def pad_mask(mask: torch.Tensor, rp: int) -> torch.Tensor:
    """The slot × column mask [S, R] as fp32 [S, rp] (zero columns for the padded ranks)."""
    out = torch.zeros(mask.shape[0], rp, dtype=torch.float32, device=mask.device)
    out[:, : mask.shape[1]] = mask
    return out


def _rows_of(h: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(tensor, rows, row stride) for a kernel reading h [..., d] row by row: h itself when its rows
    are evenly strided with unit column stride (the usual case: no reshape call), else a copy."""
    d = h.shape[-1]
    if not h.is_contiguous():
        h = h.contiguous()
    return h, h.numel() // d if d else 0, d


def edit_whole(h: torch.Tensor, packed: tuple[torch.Tensor, torch.Tensor, torch.Tensor], **config) -> torch.Tensor:
    """ψ(h) over every row of h [..., d] (new tensor, h's dtype and shape), one kernel launch, no
    autograd. `config` overrides entries of WHOLE_CONFIG (tuning)."""
    whole_kernel = _triton()[0]
    a_p, u_p, b_p = packed
    if a_p.shape[0] < WHOLE_MIN_RANK:
        raise ValueError(f"edit_whole needs a pack with rank ≥ {WHOLE_MIN_RANK} (pack(..., min_rank=WHOLE_MIN_RANK))")
    h, n_rows, stride = _rows_of(h)
    out = torch.empty_like(h)
    cfg = {**WHOLE_CONFIG, **config} if config else WHOLE_CONFIG
    rank = a_p.shape[0]
    with _on_device(h):
        whole_kernel[(triton_cdiv(n_rows, cfg["BLOCK_N"]),)](h, out, out, a_p, u_p, b_p, n_rows, stride,
               stride, d=h.shape[-1], R=rank, RANK=rank, STORE_Z=False, **cfg)
    return out


def trainable(hidden: torch.Tensor, u: torch.Tensor) -> bool:
    """True when `EditWhole` can edit `hidden` with gradients: a tensor on a device the kernels run
    on (`runs_on`), a 16/32-bit float dtype, fp32 parameters, Triton importable."""
    if hidden.dtype not in (torch.bfloat16, torch.float16, torch.float32) or u.dtype != torch.float32:
        return False
    if not runs_on(hidden.device):
        return False
    return _triton() is not None


class EditWhole(torch.autograd.Function):
    """ψ(h) = h + (h (W − U)ᵀ + b) U over every row of h [..., d] with gradients, in Triton: one launch
    forward, one launch plus one sum backward (the operator path, `ops._Edit`, is ~4 and ~8
    dispatcher calls, and a b8 step of LLaVA-7B's vision tower is bound by the host).

    u, w_minus_u [r, d] fp32, b [r]: any rank (padded to R = a power of two ≥ 16 inside the
    kernels by masked loads, no copies). Saves h in its own dtype and z = h (W − U)ᵀ + b [N, R] fp32, like
    `_Edit`, whose gradient convention it keeps: U's gradient returned is the direct one (zᵀ g); (W − U)'s
    reaches U through the caller's subtraction.
    """

    @staticmethod
    def forward(ctx, h, u, w_minus_u, b):
        whole_kernel = _triton()[0]
        h, n_rows, stride = _rows_of(h)
        d, rank = h.shape[-1], u.shape[0]
        rp = padded_rank(rank, WHOLE_MIN_RANK)
        out = torch.empty_like(h)
        z = torch.empty((n_rows, rp), dtype=torch.float32, device=h.device)
        cfg = WHOLE_CONFIG
        with _on_device(h):
            whole_kernel[(triton_cdiv(n_rows, cfg["BLOCK_N"]),)](h, out, z, w_minus_u, u, b, n_rows, stride,
                   stride, d=d, R=rp, RANK=rank, STORE_Z=True, **cfg)
        ctx.save_for_backward(h, z, u, w_minus_u)
        return out

    @staticmethod
    def backward(ctx, grad):
        h, z, u, w_minus_u = ctx.saved_tensors
        return whole_backward(grad, h, z, u, w_minus_u, ctx.needs_input_grad[0])


def whole_backward(grad: torch.Tensor, h: torch.Tensor, z: torch.Tensor, u: torch.Tensor, w_minus_u: torch.Tensor,
                   need_gh: bool = True, **config) -> tuple:
    """`EditWhole`'s backward: (∂L/∂h or None, ∂L/∂U direct, ∂L/∂(W − U), ∂L/∂b) from g = `grad` [..., d],
    the saved h [..., d] (contiguous) and z [N, R] fp32, u, w_minus_u [r, d]. One kernel launch and one sum;
    `config` overrides entries of BACKWARD_CONFIG (tuning)."""
    backward_kernel = _triton()[3]
    g, n_rows, stride_g = _rows_of(grad)
    d, rank, rp = h.shape[-1], u.shape[0], z.shape[1]
    gh = torch.empty_like(h) if need_gh else g
    cfg = {**BACKWARD_CONFIG, **config} if config else BACKWARD_CONFIG
    programs = triton_cdiv(n_rows, cfg["BLOCK_N"])
    part = torch.empty((programs, 2 * rank * d + rank), dtype=torch.float32, device=h.device)
    with _on_device(h):
        backward_kernel[(programs,)](g, h, z, w_minus_u, u, gh, part, n_rows, stride_g, d, d, d=d, R=rp,
               RANK=rank, NEED_GH=need_gh, **cfg)
    # the blocks' shares summed in a fixed order (deterministic), then one split into three views
    grad_u, grad_w_minus_u, grad_b = part.sum(0).split_with_sizes((rank * d, rank * d, rank))  # (Tensor.split: +2 µs)
    return (gh if need_gh else None), grad_u.view(rank, d), grad_w_minus_u.view(rank, d), grad_b


def edit_whole_with_grad(h: torch.Tensor, u: torch.Tensor, w_minus_u: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`EditWhole` (see `trainable` for when it applies); u, w_minus_u, b must be contiguous."""
    return EditWhole.apply(h, u.contiguous(), w_minus_u.contiguous(), b.contiguous())


def edit_rows_no_grad_(flat: torch.Tensor, idx: torch.Tensor, mask_p: torch.Tensor,
               packed: tuple[torch.Tensor, torch.Tensor, torch.Tensor], **config) -> None:
    """In place on contiguous flat [N, d]: rows idx [S] ← row + (mask ⊙ (row (W − U)ᵀ + b)) U, one launch.
    `mask_p` [S, R] fp32 with R = the packed rank (see `pad_mask`)."""
    rows_kernel = _triton()[1]
    a_p, u_p, b_p = packed
    if idx.numel() == 0:
        return
    with _on_device(flat):
        rows_kernel[(idx.numel(),)](flat, idx, mask_p, a_p, u_p, b_p, d=flat.shape[-1], R=a_p.shape[0],
               **({**ROWS_CONFIG, **config} if config else ROWS_CONFIG))


class EditRows(torch.autograd.Function):
    """`ops._EditRows` in Triton: rows idx [S] of hidden (contiguous, flat [N, d]) ← row +
    (mask ⊙ (row (W − U)ᵀ + b)) U, in place, with gradients. Forward two launches split over d
    (`_rows_split`; they also save the rows as read and z); backward one copy of the gradient (as
    the operator path), the same two launches for gz and ∂L/∂h's rows, one for the parameters'
    gradients. The operator path is ~16 dispatcher calls per LM layer and step (gathers, casts, five
    small fp32 GEMMs, scatters), whose kernels sit in the GPU-bound LM phases of a training step.

    u, w_minus_u [r, d] fp32 contiguous, b [r]; mask [S, r] fp32 (1 where slot s uses column
    j's editor and is valid). Same contract as `_EditRows`: invalid slots (all-zero mask rows) may
    repeat a row that no valid slot edits; U's gradient returned is the direct one (zᵀ g).
    """

    @staticmethod
    def forward(ctx, hidden, idx, mask, u, w_minus_u, b):
        d, rank, n_slots = hidden.shape[-1], u.shape[0], idx.numel()
        # z at the rank the inference kernel pads to (the gradient kernel widens it to 16 for tl.dot
        # in registers only)
        rp = padded_rank(rank)
        saved = torch.empty((n_slots, d), dtype=hidden.dtype, device=hidden.device)
        z = torch.empty((n_slots, rp), dtype=torch.float32, device=hidden.device)
        if n_slots:
            _rows_split(hidden, idx, mask, w_minus_u, u, b, z, saved, rank, rp, write=True)
        ctx.mark_dirty(hidden)
        ctx.save_for_backward(saved, z, u, w_minus_u, idx, mask)
        return hidden

    @staticmethod
    def backward(ctx, grad):
        saved, z, u, w_minus_u, idx, mask = ctx.saved_tensors
        gh, du, dwu, db = rows_backward(grad, saved, z, u, w_minus_u, idx, mask, ctx.needs_input_grad[0])
        return gh, None, None, du, dwu, db


def _rows_split(h: torch.Tensor, idx: torch.Tensor, mask: torch.Tensor, a: torch.Tensor, u: torch.Tensor,
                b: torch.Tensor | None, z: torch.Tensor, saved: torch.Tensor | None, rank: int, rp: int,
                write: bool) -> None:
    """z = mask ⊙ (rows Aᵀ + b) into z [S, rp], and (write) rows ← rows + z U in place on h, in two
    launches split over d (rows_partial_kernel, rows_apply_kernel; ROWS_TRAIN_CONFIG). `saved`: copy
    the rows as read into it. b None: no bias (the backward's gz = mask ⊙ g Uᵀ, with U passed as `a`)."""
    partial, apply = _triton()[5], _triton()[6]
    d, n_slots = h.shape[-1], idx.numel()
    cfg = ROWS_TRAIN_CONFIG
    nc = triton_cdiv(d, cfg["BLOCK_D"])
    zpart = torch.empty((n_slots, nc, rp), dtype=torch.float32, device=h.device)
    with _on_device(h):
        partial[(n_slots, nc)](h, idx, a, zpart, h if saved is None else saved, d=d, R=rp, RANK=rank,
               NC=nc, SAVE_ROWS=saved is not None, **cfg)
        apply[(n_slots, nc)](h, idx, mask, u, a if b is None else b, zpart, z, d=d, R=rp, RANK=rank,
               NC=nc, HAS_B=b is not None, WRITE=write, **cfg)


def rows_backward(grad: torch.Tensor, saved: torch.Tensor, z: torch.Tensor, u: torch.Tensor, w_minus_u: torch.Tensor,
                  idx: torch.Tensor, mask: torch.Tensor, need_gh: bool = True, **config) -> tuple:
    """`EditRows`' backward: (∂L/∂hidden or None, ∂L/∂U direct, ∂L/∂(W − U), ∂L/∂b) from g = `grad`
    [..., d], the saved rows [S, d] and z [S, R] fp32. `config` overrides ROWS_GRAD_CONFIG (tuning)."""
    grad_kernel = _triton()[4]
    d, rank, n_slots, rp = grad.shape[-1], u.shape[0], idx.numel(), z.shape[1]
    g = grad if grad.is_contiguous() else grad.contiguous()
    gh = g.clone() if need_gh else None  # the one full-size copy: its rows are rewritten below
    gz = torch.empty_like(z)
    du = torch.empty((rank, d), dtype=torch.float32, device=g.device)
    da = torch.empty_like(du)
    db = torch.empty((rank,), dtype=torch.float32, device=g.device)
    cfg = {**ROWS_GRAD_CONFIG, **config} if config else ROWS_GRAD_CONFIG
    if n_slots:  # gz = mask ⊙ g Uᵀ, and gh's rows ← g + gz (W − U): the forward's kernels with U and W − U swapped
        _rows_split(gh if need_gh else g, idx, mask, u, w_minus_u, None, gz, None, rank, rp, write=need_gh)
    else:
        gz.zero_()
    with _on_device(g):
        grad_kernel[(triton_cdiv(d, cfg["BLOCK_D"]),)](g, saved, idx, z, gz, du, da, db, n_slots, d=d,
               R=max(rp, WHOLE_MIN_RANK), RANK=rank, Z_STRIDE=rp, NB=_pow2(triton_cdiv(n_slots, cfg["BLOCK_S"])),
               **cfg)
    return (gh.view_as(grad) if need_gh else None), du, da, db


def edit_rows_with_grad(hidden: torch.Tensor, idx: torch.Tensor, mask: torch.Tensor, u: torch.Tensor, w_minus_u: torch.Tensor,
                    b: torch.Tensor) -> torch.Tensor:
    """`EditRows` on a contiguous `hidden` that autograd lets us edit in place (see
    `ops._writable`); see `trainable` for when it applies. Returns `hidden`."""
    return EditRows.apply(hidden, idx, mask.contiguous(), u.contiguous(), w_minus_u.contiguous(), b.contiguous())


def _on_device(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it `t`'s (a device-mapped model keeps
    layers on several GPUs). A no-op context when it already is, on CPU (interpreter), or with a
    single visible GPU (nothing to compare: this is called once per launch, and on a launch-bound
    vision tower two device queries per launch show in the step time)."""
    if t.is_cuda and _gpu_count() > 1 and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return _NO_CONTEXT


_NO_CONTEXT = contextlib.nullcontext()  # reusable: nullcontext keeps no state


@functools.lru_cache(maxsize=None)
def _gpu_count() -> int:
    return torch.cuda.device_count()


def padded_rank(r: int, min_rank: int = 2) -> int:
    """The rank `pack` pads `r` to."""
    return max(_pow2(r), min_rank)


def positions(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, image_token_id: int | None,
              prefix_len: int, suffix_len: int, ranks: tuple[int, int], rank_p: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`positions.edit_positions` for inference (prompt = attended tokens), in one launch, already in
    the layout the LM sites use: (flat row index [B·P + B·S] int64, valid [B·P + B·S] bool, slot ×
    column mask [B·P + B·S, rank_p] fp32). Prefix slots b·P + k come first, then suffix slots
    B·P + b·S + k; flat rows are b·T + t; invalid slots hold row b·T + 0 and a zero mask row.
    `ranks` = (prefix rank, suffix rank) of the layer's editors (0 for an absent group): prefix rows
    use mask columns [0, r_p), suffix rows [r_p, r_p + r_s); `rank_p` ≥ r_p + r_s is the packed rank."""
    positions_kernel = _triton()[2]
    batch, seq = input_ids.shape
    r_p, r_s = ranks
    if rank_p < r_p + r_s:
        raise ValueError(f"positions: packed rank {rank_p} < {r_p} + {r_s}")
    n_slots = batch * (prefix_len + suffix_len)
    dev = input_ids.device
    idx = torch.empty(n_slots, dtype=torch.long, device=dev)
    valid = torch.empty(n_slots, dtype=torch.int8, device=dev)
    mask = torch.empty(n_slots, rank_p, dtype=torch.float32, device=dev)
    if n_slots and batch:
        ids = input_ids if input_ids.is_contiguous() else input_ids.contiguous()
        att = attention_mask
        if att is not None and not att.is_contiguous():
            att = att.contiguous()
        with _on_device(ids):
            positions_kernel[(batch,)](ids, ids if att is None else att, idx, valid, mask, seq,
                -1 if image_token_id is None else int(image_token_id), batch * prefix_len,
                HAS_ATT=att is not None, HAS_IMAGE=image_token_id is not None, P=prefix_len, S=suffix_len,
                PP=_pow2(max(prefix_len, 1)), SP=_pow2(max(suffix_len, 1)), RP=r_p, RS=r_s, R=rank_p,
                BLOCK=_BLOCK_T, NB=_pow2(triton_cdiv(seq, _BLOCK_T)))
    return idx, valid.view(torch.bool), mask


def triton_cdiv(n: int, m: int) -> int:
    return -(-n // m)
