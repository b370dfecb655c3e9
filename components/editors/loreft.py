"""The LoReFT representation editor ψ(h) = h + Uᵀ(W h + b − U h) (METHOD.md, "The editor ψ").

Why this shape: U spans an r-dimensional subspace of the hidden space; the edit replaces the
projection of h onto that subspace (U h) by a learned affine function of h (W h + b) and leaves the
orthogonal complement untouched. That only holds while U has orthonormal rows, so U is kept
orthonormal by re-orthogonalising the stored parameter with a sign-fixed QR before use (the
reference code's method; pyreft's `parametrizations.orthogonal` is slower and has no bf16/fp16).

Cost control: the reference re-orthogonalises on every call. Here the orthonormal basis is cached
for the duration of one *pass* (one forward of the whole model, opened and closed by the owner, see
`sites.MRTEditors`) and keyed on the parameter's `_version` counter, so repeated calls in one pass
share one QR — and its autograd graph, so gradients still flow through the QR. Outside a pass (a
stand-alone editor, gradient-checkpoint recomputation) every call computes a fresh QR, which is
always correct. With gradients on, the cache never outlives a pass: reusing a graph across passes
would break gradient accumulation ("backward through the graph a second time") and no_grad → grad
transitions. With gradients off (inference) there is no graph, so a basis is kept across passes
until `U` changes (its version or storage): generation orthonormalises nothing.

GPU speed (measured on LLaVA-7B shapes, benchmarks/RESULTS.md): the costs that mattered were not
arithmetic but host synchronisations and the number of small kernel launches. Hence:
- the owner keeps all editors of one shape in one bank (bank.py) and orthonormalises it in one
  batched, sync-free Cholesky-QR (`orthonormal_rows_stacked`; `torch.linalg.qr` on CUDA spent
  ~4.6 ms of host time per call), forming A = W − U for all of them in one subtraction, so a site
  gets its (U, A, b) as views;
- ψ over whole tensors (`_Edit`) saves the hidden states in their own dtype (bf16), not an fp32
  copy; its forward is cast, two addmm, cast;
- ψ at a few rows (`edit_rows_fused_`, the prefix/suffix sites) edits every editor of a layer in
  ONE pass: their bases are stacked by rows ([U_P; U_S]) and a slot×column mask keeps each slot to
  its own editor's columns, so one gather, two addmm and one scatter serve prefix and suffix alike;
  the layer output is edited in place and the backward copies the incoming gradient once, instead
  of out-of-place `index_put` plus the zero-filled, full-size gradients of advanced indexing; rows
  are addressed by flat indices with a validity mask, so no boolean indexing (a host sync) is
  needed anywhere in a training step.

Initialisation follows the reference code: U orthogonal (`torch.nn.init.orthogonal_`), W the
default `nn.Linear` init (uniform ±1/√d), b zeros. The editor is then NOT the identity (an identity
init, W = U and b = 0, would make every editor start as a no-op with a gradient that is the same
for all of them), but close to it: the relative change ‖ψ(h) − h‖/‖h‖ of a random h is about
√(4r / 3d) — 0.09 for the visual editors of LLaVA-7B (d=1024, r=6), 0.04 for its LM editors.

Numerics: parameters are fp32; the edit is computed in fp32 and the *result* is cast back to the
hidden dtype once (one rounding), whatever the backbone's dtype. Dropout acts on the delta only
(the reference applies it to the whole output, which would also drop the untouched residual).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import orthonormal_kernel


def orthonormal_rows(u: torch.Tensor) -> torch.Tensor:
    """Rows of `u` (r×d, r ≤ d) made orthonormal: sign-fixed QR of uᵀ, so the result is unique
    (R's diagonal made positive) and equals `u` when `u` already has orthonormal rows."""
    q, r = torch.linalg.qr(u.t(), mode="reduced")  # q: d×r
    diag = torch.diagonal(r)
    signs = torch.where(diag < 0, -torch.ones_like(diag), torch.ones_like(diag))
    return (q * signs).t()


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


def orthonormal_rows_batched(us: list[torch.Tensor]) -> list[torch.Tensor]:
    """`orthonormal_rows_stacked` of a list of same-shape matrices, returned as a list."""
    if not us:
        return []
    return list(orthonormal_rows_stacked(torch.stack(us)).unbind(0))


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


def _as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`x.to(dtype)`, without a dispatcher call when it already has that dtype: on a launch-bound
    GPU phase every call counts (~10–20 µs of host time each on the H200's host)."""
    return x if x.dtype == dtype else x.to(dtype)


_linear = torch.nn.functional.linear  # x Wᵀ + b as one call (the same addmm/mm), no separate .t()


def _compute_dtype(hidden: torch.dtype, param: torch.dtype) -> torch.dtype:
    """fp32 at least (bf16/fp16 hidden states are edited in fp32), fp64 when anything is fp64."""
    return torch.promote_types(torch.promote_types(hidden, param), torch.float32)


class _Edit(torch.autograd.Function):
    """ψ(h) = h + (h Aᵀ + b) U over every row of h [..., d], A = W − U given (hand-written backward).

    Saves h in its own dtype and z = h Aᵀ + b (r per row) instead of autograd's fp32 copy of h.
    The gradient of U returned here is the direct one (zᵀ g); A's (= W's) reaches U through the
    subtraction A = W − U that the caller built, once per pass for all editors of a shape.
    """

    @staticmethod
    def forward(ctx, h, u, a, b):
        d = h.shape[-1]
        ct = _compute_dtype(h.dtype, u.dtype)
        h32 = _as(h.reshape(-1, d), ct)
        uc, ac = _as(u, ct), _as(a, ct)
        z = _linear(h32, ac, _as(b, ct))  # [N, r]
        out = _as(torch.addmm(h32, z, uc), h.dtype).view(h.shape)
        ctx.save_for_backward(h, z, uc, ac)
        return out

    @staticmethod
    def backward(ctx, grad):
        h, z, u, a = ctx.saved_tensors
        d = h.shape[-1]
        g = _as(grad.reshape(-1, d), z.dtype)
        gz = _linear(g, u)  # ∂L/∂z = g Uᵀ [N, r]
        grad_h = _as(torch.addmm(g, gz, a), h.dtype).view(h.shape) if ctx.needs_input_grad[0] else None
        da = gz.t() @ _as(h.reshape(-1, d), z.dtype)
        return grad_h, z.t() @ g, da, gz.sum(0)


class _EditRows(torch.autograd.Function):
    """In place: rows `idx` [S] of hidden (flat [N, d]) ← row + (mask ⊙ (row Aᵀ + b)) U.

    u, a: [R, d] — the bases and A = W − U of every editor of the site stacked by rows; b [R];
    mask [S, R] (compute dtype): 1 where slot s belongs to the editor owning column j and is
    valid, else 0. A slot with an all-zero mask row is written back unchanged, so invalid slots
    may repeat a row that no valid slot edits (positions.py guarantees one).
    """

    @staticmethod
    def forward(ctx, hidden, idx, mask, u, a, b):
        d = hidden.shape[-1]
        flat = hidden.view(-1, d)
        ct = _compute_dtype(hidden.dtype, u.dtype)
        r32 = _as(flat.index_select(0, idx), ct)
        uc, ac = _as(u, ct), _as(a, ct)
        z = _linear(r32, ac, _as(b, ct)).mul_(mask)
        flat.index_copy_(0, idx, _as(torch.addmm(r32, z, uc), hidden.dtype))
        ctx.mark_dirty(hidden)
        ctx.save_for_backward(r32, z, uc, ac, idx, mask)  # r32 is S×d: a few rows, fp32 is cheap
        return hidden

    @staticmethod
    def backward(ctx, grad):
        r32, z, u, a, idx, mask = ctx.saved_tensors
        d = grad.shape[-1]
        g2 = grad.reshape(-1, d)
        g = _as(g2.index_select(0, idx), z.dtype)
        gz = _linear(g, u).mul_(mask)
        grad_hidden = None
        if ctx.needs_input_grad[0]:
            grad_hidden = g2.clone()  # the one full-size copy
            grad_hidden.index_copy_(0, idx, _as(torch.addmm(g, gz, a), grad.dtype))
            grad_hidden = grad_hidden.view_as(grad)
        return grad_hidden, None, None, z.t() @ g, gz.t() @ r32, gz.sum(0)


def edit_whole(h: torch.Tensor, u: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """ψ(h) = h + (h Aᵀ + b) U over every row of h [..., d]; u, a [r, d], b [r] (A = W − U).

    With gradients: `_Edit` (bf16 activations saved); without: the same arithmetic, no autograd."""
    if torch.is_grad_enabled():
        return _Edit.apply(h, u, a, b)
    d = h.shape[-1]
    ct = _compute_dtype(h.dtype, u.dtype)
    h32 = _as(h.reshape(-1, d), ct)
    return _as(torch.addmm(h32, _linear(h32, _as(a, ct), _as(b, ct)), _as(u, ct)), h.dtype).view(h.shape)


def _edit_no_grad(h: torch.Tensor, u: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """ψ for inference: the same arithmetic as `_Edit.forward` with A precomputed, no autograd."""
    with torch.no_grad():
        return edit_whole(h, u, a, b)


def _writable(hidden: torch.Tensor) -> torch.Tensor:
    """`hidden`, or a copy where autograd forbids an in-place edit (a view, or a leaf that
    requires grad) or the layout is not contiguous."""
    if torch.is_grad_enabled() and (hidden._is_view() or (hidden.is_leaf and hidden.requires_grad)):
        return hidden.clone()
    return hidden if hidden.is_contiguous() else hidden.contiguous()


def edit_rows_fused_(
    hidden: torch.Tensor, idx: torch.Tensor, mask: torch.Tensor, u: torch.Tensor, a: torch.Tensor, b: torch.Tensor
) -> torch.Tensor:
    """ψ of every editor of a site at its rows, in one pass, in place where autograd allows.

    hidden [..., d]; idx [S] flat row indices; mask [S, R] (1: slot s uses column j's editor and
    is valid); u, a [R, d] and b [R] the editors' bases, A = W − U and biases stacked by rows.
    Returns the edited tensor (the same object unless `_writable` had to copy)."""
    hidden = _writable(hidden)
    if torch.is_grad_enabled():
        return _EditRows.apply(hidden, idx, mask, u, a, b)
    d = hidden.shape[-1]
    flat = hidden.view(-1, d)
    ct = _compute_dtype(hidden.dtype, u.dtype)
    r32 = _as(flat.index_select(0, idx), ct)
    z = _linear(r32, _as(a, ct), _as(b, ct)).mul_(mask)
    flat.index_copy_(0, idx, _as(torch.addmm(r32, z, _as(u, ct)), hidden.dtype))
    return hidden


def slot_mask(valids: list[torch.Tensor], ranks: list[int], dtype: torch.dtype) -> torch.Tensor:
    """[ΣS, Σr] mask for `edit_rows_fused_`: block-diagonal (slots of editor k × columns of editor
    k), each slot's row zeroed where it is invalid."""
    blocks = [v.to(dtype)[:, None].expand(v.shape[0], r) for v, r in zip(valids, ranks)]
    return torch.block_diag(*blocks) if len(blocks) > 1 else blocks[0].contiguous()


def edit_rows_(hidden: torch.Tensor, edits: list[tuple["LoReFT", torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Apply several editors to chosen rows of `hidden` [B, T, d], in place where autograd allows.

    `edits`: (editor, flat row index [S] into B·T, valid [S] bool). Invalid slots are left as they
    are. Returns the edited tensor (the same object unless a copy was unavoidable: a view or a
    leaf that requires grad cannot be modified in place). The editors are stacked and applied in
    one `edit_rows_fused_` pass (the hooks do this with per-pass stacks instead, see sites.py).
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
    u, a, b = (torch.cat([p[i] for p in params]) if len(params) > 1 else params[0][i] for i in range(3))
    ct = _compute_dtype(hidden.dtype, u.dtype)
    mask = slot_mask([v for _, _, v in edits], [ed.r for ed, _, _ in edits], ct)
    idx = torch.cat([i for _, i, _ in edits]) if len(edits) > 1 else edits[0][1]
    return edit_rows_fused_(hidden, idx, mask, u, a, b)


class LoReFT(nn.Module):
    """One editor ψ over hidden size `d` with rank `r`. Parameter count 2·d·r + r.

    Parameters (all fp32): `U` (r×d, the subspace, orthonormalised before use), `W` (an
    `nn.Linear(d, r)`: weight r×d and bias b ∈ ℝʳ). Inside an `MRTEditors` they are views of the
    owner's bank row instead (`bind`; gradients then reach the bank, see `live`).
    """

    def __init__(self, d: int, r: int, dropout: float = 0.0):
        super().__init__()
        if d < 1 or r < 1:
            raise ValueError(f"LoReFT needs d ≥ 1 and r ≥ 1, got d={d}, r={r}")
        if r > d:
            raise ValueError(f"LoReFT rank r={r} exceeds the hidden size d={d}: U cannot have orthonormal rows")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoReFT dropout must be in [0, 1), got {dropout}")
        self.d, self.r = d, r
        self.U = nn.Parameter(torch.empty(r, d, dtype=torch.float32))
        self.W = nn.Linear(d, r, bias=True, dtype=torch.float32)
        self.dropout = nn.Dropout(dropout)
        self._in_pass = False
        self._cache: tuple[int, torch.Tensor] | None = None
        self._inference_cache: tuple[tuple, torch.Tensor] | None = None  # no-grad bases, across passes
        self._inference_params: tuple[tuple, tuple] | None = None  # no-grad (U, A = W − U, b)
        self._bank: nn.Module | None = None  # the EditorBank holding this editor's row (bank.py)
        self._index = 0
        self.reset_parameters()

    # -- bank membership (bank.py) --------------------------------------------------------------
    def bind(self, bank: nn.Module, index: int) -> None:
        """Make U, W.weight and W.bias views of row `index` of `bank` (persistent buffers, so the
        state-dict keys stay the same; they share the bank's version counter)."""
        views = (bank.U.detach()[index], bank.W.detach()[index], bank.b.detach()[index])
        for module, name, view in ((self, "U", views[0]), (self.W, "weight", views[1]), (self.W, "bias", views[2])):
            module._parameters.pop(name, None)
            module._buffers[name] = view
        object.__setattr__(self, "_bank", bank)  # plain attribute: not a submodule
        self._index = index
        self._cache, self._inference_cache, self._inference_params = None, None, None

    def unbind(self) -> None:
        """Own Parameters again (copies of the current values)."""
        if self._bank is None:
            return
        for module, name in ((self, "U"), (self.W, "weight"), (self.W, "bias")):
            value = module._buffers.pop(name)
            module._parameters[name] = nn.Parameter(value.detach().clone())
        object.__setattr__(self, "_bank", None)
        self._cache, self._inference_cache, self._inference_params = None, None, None

    def live(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(U, W, b) as tensors gradients flow to: the Parameters, or the bank's rows."""
        bank = self._bank
        if bank is None:
            return self.U, self.W.weight, self.W.bias
        i = self._index
        return bank.U[i], bank.W[i], bank.b[i]

    def reset_parameters(self) -> None:
        """Reference init: U orthogonal, W `nn.Linear`'s default, b zeros (see module docstring)."""
        with torch.no_grad():
            nn.init.orthogonal_(self.U)
            nn.init.kaiming_uniform_(self.W.weight, a=math.sqrt(5))  # nn.Linear's default
            self.W.bias.zero_()
        self._cache = None

    def extra_repr(self) -> str:
        return f"d={self.d}, r={self.r}, dropout={self.dropout.p}"

    # -- the pass-scoped basis cache ---------------------------------------------------------
    def begin_pass(self) -> None:
        """Open a pass: calls until `end_pass` share one orthonormalised basis per `U` version."""
        # Plain attributes written straight into __dict__: nn.Module.__setattr__'s registry checks
        # cost ~2 µs each, and a pass opens and closes every editor (87 for LLaVA-7B) per prompt.
        d = self.__dict__
        d["_in_pass"] = True
        d["_cache"] = None

    def end_pass(self) -> None:
        d = self.__dict__
        d["_in_pass"] = False
        d["_cache"] = None

    def set_pass_basis(self, basis: torch.Tensor) -> None:
        """Seed this pass's cache with a basis computed elsewhere (a batched QR over many editors)."""
        d = self.__dict__  # plain attributes, see begin_pass
        if d["_in_pass"]:
            d["_cache"] = (self.U._version, basis)
        if not torch.is_grad_enabled():
            d["_inference_cache"] = (self._inference_key(), basis)

    def _inference_key(self) -> tuple:
        return (self.U._version, self.U.data_ptr(), self.U.device, self.U.dtype)

    def inference_basis(self) -> torch.Tensor | None:
        """The basis kept from an earlier no-grad pass, if `U` has not changed since (else None)."""
        if torch.is_grad_enabled() or self._inference_cache is None:
            return None
        key, basis = self._inference_cache
        return basis if key == self._inference_key() else None

    def inference_params(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(U orthonormal, A = W − U, b) for no-grad use, kept while U, W and b are unchanged."""
        w, b = self.W.weight, self.W.bias
        key = (self._inference_key(), w._version, w.data_ptr(), b._version, b.data_ptr(), w.dtype)
        if self._inference_params is None or self._inference_params[0] != key:
            with torch.no_grad():
                u = self.basis()
                self._inference_params = (key, (u, (w - u).to(u.dtype), b.to(u.dtype)))
        return self._inference_params[1]

    def site_params(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(U orthonormal, A = W − U, b) for `edit_whole` / `edit_rows_fused_`, differentiable
        (the no-grad copy, cached across passes, without gradients)."""
        if not torch.is_grad_enabled():
            return self.inference_params()
        u = self.basis()
        _, w, b = self.live()
        return u, w - u, b

    def basis(self) -> torch.Tensor:
        """The orthonormal U (r×d, fp32) used by `forward`, differentiable w.r.t. `self.U`."""
        if not torch.is_grad_enabled():  # no graph to keep apart: reuse across passes while U is unchanged
            kept = self.inference_basis()
            if kept is None:
                kept = self._cache[1] if self._in_pass and self._cache and self._cache[0] == self.U._version else None
                kept = orthonormal_rows(self.U) if kept is None else kept
                self._inference_cache = (self._inference_key(), kept)
            return kept
        if not self._in_pass:
            return orthonormal_rows(self.live()[0])
        version = self.U._version
        if self._cache is None or self._cache[0] != version:
            self._cache = (version, orthonormal_rows(self.live()[0]))
        return self._cache[1]

    # -- the edit ----------------------------------------------------------------------------
    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """ψ(h) for h of shape (..., d), any float dtype; returns h's dtype and shape."""
        if h.shape[-1] != self.d:
            raise ValueError(f"LoReFT(d={self.d}) got hidden states of size {h.shape[-1]}")
        dropping = self.dropout.p > 0 and self.training
        if not torch.is_grad_enabled() and not dropping:
            return _edit_no_grad(h, *self.inference_params())
        u = self.basis()
        _, w, b = self.live()
        if dropping:
            h32 = h.to(_compute_dtype(h.dtype, u.dtype))
            delta = (nn.functional.linear(h32, w, b) - h32 @ u.t()) @ u  # (..., d): Uᵀ(W h + b − U h), rows as vectors
            return (h32 + self.dropout(delta)).to(h.dtype)
        return _Edit.apply(h, u, w - u, b)

    @staticmethod
    def parameter_count(d: int, r: int) -> int:
        return 2 * d * r + r
