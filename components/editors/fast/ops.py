"""ψ with fewer launches and no host synchronisation: the operator path of the fast editors.

The same function as `loreft.LoReFT` (docs/method.md), organised for speed (docs/performance.md:
on a GPU the editors cost host work and small launches, not arithmetic):
- `orthonormal_rows_stacked`: a bank of same-shape U's [n, r, d] orthonormalised in one batched,
  sync-free shifted Cholesky-QR3 with a closed-form backward (one Triton launch each way on CUDA,
  orthonormal_kernel.py); the same sign-fixed QR factor as `loreft.orthonormal_rows`, to rounding;
- ψ is written h + (h (W − U)ᵀ + b) U, with W − U formed once per pass for a whole bank
  (`w_minus_u` below);
- `edit_whole` (every row: visual layers, projector) saves the hidden states in their own dtype,
  not an fp32 copy; `edit_rows_stacked_` (the prefix/suffix rows of an LM layer) edits every
  editor of the layer at once — bases stacked by rows, a slot × column mask keeping each slot to
  its own editor's columns — in place, with one full-size gradient copy in backward; rows are
  addressed by flat indices with a validity mask, so nothing needs a host synchronisation.
Arithmetic: fp32 (fp64 when anything is fp64), rounded once to the hidden states' dtype.
"""

from __future__ import annotations

import torch

from ..loreft import compute_dtype as _compute_dtype
from ..loreft import LoReFT
from . import orthonormal_kernel

def _cholesky_qr_pass(u: torch.Tensor, shift: torch.Tensor | None = None) -> torch.Tensor:
    """One Cholesky-QR pass on row blocks u [n, r, d]: rows L⁻¹ U with L Lᵀ = U Uᵀ (+ shift·I).

    Row form (the transpose of Q = V R⁻¹ for V = Uᵀ): no transposed copies, and gradients that
    flow back to U keep U's layout."""
    gram = u @ u.mT  # [n, r, r]
    if shift is not None:  # in place on the diagonal: no identity matrix to build
        gram.diagonal(dim1=-2, dim2=-1).add_(shift[:, None])
    lower, _ = torch.linalg.cholesky_ex(gram)  # no error check: checking would sync with the host
    return torch.linalg.solve_triangular(lower, u, upper=False)


def _cholesky_qr3(u: torch.Tensor) -> torch.Tensor:
    """Shifted Cholesky-QR3 of row blocks u [n, r, d] (see `orthonormal_rows_stacked`)."""
    n_rows, r = u.shape[-1], u.shape[-2]
    info = torch.finfo(u.dtype)
    unit = info.eps / 2
    norm2 = u.square().sum(dim=(-2, -1))  # ‖U‖_F² ≥ ‖U‖₂²
    shift = (11.0 * (n_rows * r + r * (r + 1)) * unit * norm2).clamp_min(info.tiny)
    q = _cholesky_qr_pass(u, shift)
    # A shift of r·u (relative, for a near-orthonormal factor: far below the result's rounding)
    # keeps a rank-deficient U finite instead of NaN; it does not move a full-rank result.
    tiny = torch.full_like(shift, r * unit)
    q = _cholesky_qr_pass(q, tiny)
    return _cholesky_qr_pass(q, tiny)


class _OrthonormalRows(torch.autograd.Function):
    """Q = sign-fixed QR rows of u [n, r, d], with the QR gradient written out.

    Autograd through three Cholesky/triangular-solve passes cost ~40 small launches per editor
    shape in every backward and returned U's gradient transposed (so every editor's U.grad was
    copied once more); the closed form needs ~6. With U = Rᵀ Q (Rᵀ = U Qᵀ lower-triangular):
    ∂L/∂U = R⁻¹ (G − copyltu(G Qᵀ) Q), copyltu(X) = tril(X) + tril(X, −1)ᵀ, G = ∂L/∂Q
    (the transpose of the standard QR backward with no gradient to R).
    On CUDA (and in the tests' interpreter) each direction is one Triton launch instead
    (orthonormal_kernel.py: Gram–Schmidt twice, and this closed form), same values to rounding."""

    @staticmethod
    def forward(ctx, u):
        ctx.fused = orthonormal_kernel.usable(u)
        if ctx.fused:
            q = orthonormal_kernel.orthonormal_rows(u)
        else:
            q = _cholesky_qr3(u).contiguous()  # the solver's result is column-major
        ctx.save_for_backward(u, q)
        return q

    @staticmethod
    def backward(ctx, grad):
        u, q = ctx.saved_tensors
        if ctx.fused and not torch.is_grad_enabled():  # (create_graph: the differentiable operators)
            return orthonormal_kernel.orthonormal_rows_backward(u, q, grad)
        lower = u @ q.mT  # Rᵀ [n, r, r]
        c = grad @ q.mT
        c = c.tril() + c.tril(-1).mT
        y = torch.baddbmm(grad, c, q, alpha=-1.0)
        # contiguous like U: AccumulateGrad then takes each editor's slice as is instead of copying it
        return torch.linalg.solve_triangular(lower.mT, y, upper=True).contiguous()


def orthonormal_rows_stacked(u: torch.Tensor) -> torch.Tensor:
    """`orthonormal_rows` of each u[i] (u: [n, r, d]) in one batched, host-sync-free computation.

    Why: `torch.linalg.qr` on CUDA loops over the batch in the solver and cost ~4.6 ms of host time
    per call on LLaVA-7B's shapes, stalling the launch queue. Shifted Cholesky-QR3 (Fukaya et al.
    2020) needs only r×r Gram matrices, a batched Cholesky and a triangular solve: the first pass,
    with a small diagonal shift, cannot fail even for a badly conditioned (or rank-deficient) U and
    leaves a well-conditioned factor; two more passes make it orthonormal to working precision. (A
    rank-deficient U has no unique basis; the result then stays finite but not orthonormal.)
    R = R₃R₂R₁ is upper triangular with a positive diagonal, so the result IS the sign-fixed QR
    factor of `orthonormal_rows` (same values up to rounding, same gradients: `_OrthonormalRows`).
    On CUDA fp32 (r ≤ 16) forward and backward are one Triton launch each (orthonormal_kernel.py).
    """
    return _OrthonormalRows.apply(u)


def _cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`x.to(dtype)`, without a dispatcher call when it already has that dtype: on a launch-bound
    GPU phase every call counts (~10–20 µs of host time each on the H200's host)."""
    return x if x.dtype == dtype else x.to(dtype)


_linear = torch.nn.functional.linear  # x Wᵀ + b as one call (the same addmm/mm), no separate .t()


class _Edit(torch.autograd.Function):
    """ψ(h) = h + (h (W − U)ᵀ + b) U over every row of h [..., d], W − U given (hand-written backward).

    Saves h in its own dtype and z = h (W − U)ᵀ + b (r per row) instead of autograd's fp32 copy of h.
    The gradient of U returned here is the direct one (zᵀ g); W − U's reaches U through the
    subtraction W − U that the caller built, once per pass for all editors of a shape.
    """

    @staticmethod
    def forward(ctx, h, u, w_minus_u, b):
        d = h.shape[-1]
        ct = _compute_dtype(h.dtype, u.dtype)
        h32 = _cast(h.reshape(-1, d), ct)
        uc, ac = _cast(u, ct), _cast(w_minus_u, ct)
        z = _linear(h32, ac, _cast(b, ct))  # [N, r]
        out = _cast(torch.addmm(h32, z, uc), h.dtype).view(h.shape)
        ctx.save_for_backward(h, z, uc, ac)
        return out

    @staticmethod
    def backward(ctx, grad):
        h, z, u, w_minus_u = ctx.saved_tensors
        d = h.shape[-1]
        g = _cast(grad.reshape(-1, d), z.dtype)
        gz = _linear(g, u)  # ∂L/∂z = g Uᵀ [N, r]
        grad_h = _cast(torch.addmm(g, gz, w_minus_u), h.dtype).view(h.shape) if ctx.needs_input_grad[0] else None
        da = gz.t() @ _cast(h.reshape(-1, d), z.dtype)
        return grad_h, z.t() @ g, da, gz.sum(0)


class _EditRows(torch.autograd.Function):
    """In place: rows `idx` [S] of hidden (flat [N, d]) ← row + (mask ⊙ (row (W − U)ᵀ + b)) U.

    u, w_minus_u: [R, d] — the bases and W − U of every editor of the site stacked by rows; b [R];
    mask [S, R] (compute dtype): 1 where slot s belongs to the editor owning column j and is
    valid, else 0. A slot with an all-zero mask row is written back unchanged, so invalid slots
    may repeat a row that no valid slot edits (positions.py guarantees one).
    """

    @staticmethod
    def forward(ctx, hidden, idx, mask, u, w_minus_u, b):
        d = hidden.shape[-1]
        flat = hidden.view(-1, d)
        ct = _compute_dtype(hidden.dtype, u.dtype)
        r32 = _cast(flat.index_select(0, idx), ct)
        uc, ac = _cast(u, ct), _cast(w_minus_u, ct)
        z = _linear(r32, ac, _cast(b, ct)).mul_(mask)
        flat.index_copy_(0, idx, _cast(torch.addmm(r32, z, uc), hidden.dtype))
        ctx.mark_dirty(hidden)
        ctx.save_for_backward(r32, z, uc, ac, idx, mask)  # r32 is S×d: a few rows, fp32 is cheap
        return hidden

    @staticmethod
    def backward(ctx, grad):
        r32, z, u, w_minus_u, idx, mask = ctx.saved_tensors
        d = grad.shape[-1]
        g2 = grad.reshape(-1, d)
        g = _cast(g2.index_select(0, idx), z.dtype)
        gz = _linear(g, u).mul_(mask)
        grad_hidden = None
        if ctx.needs_input_grad[0]:
            grad_hidden = g2.clone()  # the one full-size copy
            grad_hidden.index_copy_(0, idx, _cast(torch.addmm(g, gz, w_minus_u), grad.dtype))
            grad_hidden = grad_hidden.view_as(grad)
        return grad_hidden, None, None, z.t() @ g, gz.t() @ r32, gz.sum(0)


def edit_whole(h: torch.Tensor, u: torch.Tensor, w_minus_u: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """ψ(h) = h + (h (W − U)ᵀ + b) U over every row of h [..., d]; u, w_minus_u [r, d], b [r].

    With gradients: `_Edit` (bf16 activations saved); without: the same arithmetic, no autograd."""
    if torch.is_grad_enabled():
        return _Edit.apply(h, u, w_minus_u, b)
    d = h.shape[-1]
    ct = _compute_dtype(h.dtype, u.dtype)
    h32 = _cast(h.reshape(-1, d), ct)
    return _cast(torch.addmm(h32, _linear(h32, _cast(w_minus_u, ct), _cast(b, ct)), _cast(u, ct)), h.dtype).view(h.shape)


def _edit_no_grad(h: torch.Tensor, u: torch.Tensor, w_minus_u: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """ψ for inference: the same arithmetic as `_Edit.forward` with W − U precomputed, no autograd."""
    with torch.no_grad():
        return edit_whole(h, u, w_minus_u, b)


def _writable(hidden: torch.Tensor) -> torch.Tensor:
    """`hidden`, or a copy where autograd forbids an in-place edit (a view, or a leaf that
    requires grad) or the layout is not contiguous."""
    if torch.is_grad_enabled() and (hidden._is_view() or (hidden.is_leaf and hidden.requires_grad)):
        return hidden.clone()
    return hidden if hidden.is_contiguous() else hidden.contiguous()


def edit_rows_stacked_(
    hidden: torch.Tensor, idx: torch.Tensor, mask: torch.Tensor, u: torch.Tensor, w_minus_u: torch.Tensor, b: torch.Tensor
) -> torch.Tensor:
    """ψ of every editor of a site at its rows, in one pass, in place where autograd allows.

    hidden [..., d]; idx [S] flat row indices; mask [S, R] (1: slot s uses column j's editor and
    is valid); u, w_minus_u [R, d] and b [R] the editors' bases, W − U and biases stacked by rows.
    Returns the edited tensor (the same object unless `_writable` had to copy)."""
    hidden = _writable(hidden)
    if torch.is_grad_enabled():
        return _EditRows.apply(hidden, idx, mask, u, w_minus_u, b)
    d = hidden.shape[-1]
    flat = hidden.view(-1, d)
    ct = _compute_dtype(hidden.dtype, u.dtype)
    r32 = _cast(flat.index_select(0, idx), ct)
    z = _linear(r32, _cast(w_minus_u, ct), _cast(b, ct)).mul_(mask)
    flat.index_copy_(0, idx, _cast(torch.addmm(r32, z, _cast(u, ct)), hidden.dtype))
    return hidden


def slot_mask(valids: list[torch.Tensor], ranks: list[int], dtype: torch.dtype) -> torch.Tensor:
    """[ΣS, Σr] mask for `edit_rows_stacked_`: block-diagonal (slots of editor k × columns of editor
    k), each slot's row zeroed where it is invalid."""
    blocks = [v.to(dtype)[:, None].expand(v.shape[0], r) for v, r in zip(valids, ranks)]
    return torch.block_diag(*blocks) if len(blocks) > 1 else blocks[0].contiguous()


def edit_rows_per_editor_(hidden: torch.Tensor, edits: list[tuple[LoReFT, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Apply several editors to chosen rows of `hidden` [B, T, d], in place where autograd allows.

    `edits`: (editor, flat row index [S] into B·T, valid [S] bool). Invalid slots are left as they
    are. Returns the edited tensor (the same object unless a copy was unavoidable: a view or a
    leaf that requires grad cannot be modified in place). The editors are stacked and applied in
    one `edit_rows_stacked_` pass (the hooks do this with per-pass stacks instead, see sites.py).
    Editors with active dropout take the plain autograd path (dropout is off in the paper's setting).
    """
    if not edits:
        return hidden
    d = hidden.shape[-1]
    for ed, _, _ in edits:
        if ed.d != d:
            raise ValueError(f"LoReFT(d={ed.d}) got hidden states of size {d}")
    if any(ed.dropout.p > 0 and ed.training for ed, _, _ in edits):
        flat = hidden.reshape(-1, d)
        out = flat.clone() if torch.is_grad_enabled() else flat
        updates = [(idx, torch.where(valid[:, None], ed(flat.index_select(0, idx)), flat.index_select(0, idx)))
                   for ed, idx, valid in edits]
        for idx, new in updates:
            out = out.index_copy(0, idx, new) if torch.is_grad_enabled() else out.index_copy_(0, idx, new)
        return out.view(hidden.shape)
    params = [ed.inference_params() if not torch.is_grad_enabled() else ed.site_params() for ed, _, _ in edits]
    u, w_minus_u, b = (torch.cat([p[i] for p in params]) if len(params) > 1 else params[0][i] for i in range(3))
    ct = _compute_dtype(hidden.dtype, u.dtype)
    mask = slot_mask([v for _, _, v in edits], [ed.r for ed, _, _ in edits], ct)
    idx = torch.cat([i for _, i, _ in edits]) if len(edits) > 1 else edits[0][1]
    return edit_rows_stacked_(hidden, idx, mask, u, w_minus_u, b)


