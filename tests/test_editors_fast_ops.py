"""The fast editors' operations (components/editors/fast/ops.py, editor.py) compute exactly what the plain formulas compute.

The hand-written backward passes (`_Edit`, `_EditRows`), the in-place row edit, the sync-free
Cholesky-QR and the inference basis cache are checked against straightforward autograd
references in float64; the GPU test checks that the editors' operations never make the host wait
for the device (each wait drains the launch queue of a training step).
"""

from __future__ import annotations

import pytest
import torch

from components.editors.fast.editor import BankedLoReFT as LoReFT
from components.editors.fast.ops import (
    _Edit,
    _EditRows,
    edit_rows_per_editor_,
    orthonormal_rows_stacked,
    slot_mask,
)
from components.editors.loreft import orthonormal_rows


def psi(h, u, w, b):
    """ψ(h) = h + Uᵀ(W h + b − U h), rows as vectors, in u's dtype (fp32 at least)."""
    ct = torch.promote_types(torch.promote_types(h.dtype, u.dtype), torch.float32)
    h32 = h.to(ct)
    return (h32 + ((h32 @ w.t() + b) - h32 @ u.t()) @ u).to(h.dtype)


def _params(d, r, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=dtype, requires_grad=True) for shape in ((r, d), (r, d), (r,))]


def test_whole_tensor_edit_gradients_match_autograd():
    h = torch.randn(3, 5, 12, dtype=torch.float64, requires_grad=True)
    u, w, b = _params(12, 3)

    def edit(h, u, w, b):  # the caller forms A = W − U (sites.py: once per pass for a whole stack)
        return _Edit.apply(h, u, w - u, b)

    assert torch.autograd.gradcheck(edit, (h, u, w, b))
    g = torch.randn(3, 5, 12, dtype=torch.float64)
    mine = torch.autograd.grad(edit(h, u, w, b), (h, u, w, b), g)
    ref = torch.autograd.grad(psi(h, u, w, b), (h, u, w, b), g)
    for a, r in zip(mine, ref):
        torch.testing.assert_close(a, r)


def test_whole_tensor_edit_saves_bf16_not_an_fp32_copy():
    """The point of `_Edit`: activation memory. Autograd on the plain formula keeps an fp32 copy
    of h ([N, d] × 4 bytes); `_Edit` keeps h itself (bf16) and z ([N, r] fp32)."""
    ed = LoReFT(256, 4)
    h = torch.randn(64, 256, dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ed(h).float().sum().backward()
    big = [t for t in saved if t.numel() >= 64 * 256]
    assert big and all(t.dtype == torch.bfloat16 for t in big)


def _rows_reference(hidden, groups):
    flat = hidden.reshape(-1, hidden.shape[-1])
    out = flat
    for idx, valid, u, w, b in groups:
        keep = idx[valid]
        out = out.index_put((keep,), psi(flat[keep], u, w, b))
    return out.view_as(hidden)


def _groups(batch, seq, d, dtype=torch.float64):
    # prefix rows 1..3, suffix rows 6..7; sample 1 is short (one valid slot each), sample 2 empty.
    prefix = torch.tensor([[1, 2, 3], [1, 0, 0], [0, 0, 0]])
    suffix = torch.tensor([[6, 7], [2, 0], [0, 0]])
    out = []
    for k, idx in enumerate((prefix, suffix)):
        valid = idx > 0
        flat = (torch.arange(batch)[:, None] * seq + idx).reshape(-1)
        out.append((flat, valid.reshape(-1), *_params(d, 2, dtype, seed=k + 1)))
    return out


def test_row_edit_gradients_match_index_put_reference():
    B, T, d = 3, 9, 10
    groups = _groups(B, T, d)
    x = torch.randn(B, T, d, dtype=torch.float64, requires_grad=True)
    params = [t for g in groups for t in g[2:]]

    idx = torch.cat([g[0] for g in groups])
    mask = slot_mask([g[1] for g in groups], [2, 2], torch.float64)

    def mine(x, *ps):  # both groups stacked by rows, one fused op (what an LM layer's hook does)
        u = torch.cat([ps[0], ps[3]])
        a = torch.cat([ps[1] - ps[0], ps[4] - ps[3]])
        return _EditRows.apply(x * 1.0, idx, mask, u, a, torch.cat([ps[2], ps[5]]))

    def ref(x, *ps):
        return _rows_reference(x * 1.0, [(f, v, *ps[3 * k : 3 * k + 3]) for k, (f, v, *_) in enumerate(groups)])

    assert torch.autograd.gradcheck(mine, (x, *params))
    g = torch.randn(B, T, d, dtype=torch.float64)
    out_m, out_r = mine(x, *params), ref(x, *params)
    torch.testing.assert_close(out_m, out_r)
    for a, r in zip(torch.autograd.grad(out_m, (x, *params), g), torch.autograd.grad(out_r, (x, *params), g)):
        torch.testing.assert_close(a, r)
    # invalid slots and untouched rows are left exactly as they were
    changed = (out_m != x).any(-1)
    assert changed.nonzero().tolist() == [[0, 1], [0, 2], [0, 3], [0, 6], [0, 7], [1, 1], [1, 2]]


def test_row_edit_is_in_place_and_matches_editor_modules():
    torch.manual_seed(0)
    eds = [LoReFT(16, 2), LoReFT(16, 3)]
    hidden = torch.randn(2, 8, 16, dtype=torch.bfloat16)
    before = hidden.clone()
    idx = [torch.tensor([1, 2, 9]), torch.tensor([5, 13])]
    valid = [torch.tensor([True, True, False]), torch.tensor([True, True])]
    with torch.no_grad():
        out = edit_rows_per_editor_(hidden, [(e, i, v) for e, i, v in zip(eds, idx, valid)])
        want = before.view(-1, 16).clone()
        for e, i, v in zip(eds, idx, valid):
            want[i[v]] = e(before.view(-1, 16)[i[v]])
    assert out.data_ptr() == hidden.data_ptr()  # no copy of the layer output
    assert torch.equal(out.view(-1, 16), want)


def test_slot_mask_is_block_diagonal_and_drops_invalid_slots():
    m = slot_mask([torch.tensor([True, False]), torch.tensor([True, True, False])], [2, 1], torch.float32)
    assert m.tolist() == [[1, 1, 0], [0, 0, 0], [0, 0, 1], [0, 0, 1], [0, 0, 0]]


def test_batched_cholesky_qr_equals_qr_and_survives_bad_conditioning():
    torch.manual_seed(0)
    us = [torch.randn(4, 512) for _ in range(3)]
    for a, b in zip(orthonormal_rows_stacked(torch.stack(us)).unbind(0), (orthonormal_rows(u) for u in us)):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=0)
    # condition number 1e4: still orthonormal to fp32 working precision
    q, _ = torch.linalg.qr(torch.randn(512, 4, dtype=torch.float64))
    bad = (q * torch.logspace(0, -4, 4, dtype=torch.float64)).t().float()
    (basis,) = orthonormal_rows_stacked(bad[None])
    torch.testing.assert_close(basis @ basis.t(), torch.eye(4), atol=2e-5, rtol=0)
    # rank-deficient or zero U: no unique basis, but never NaN (NaN would poison training silently)
    for degenerate in (torch.zeros(4, 64), torch.ones(4, 64)):
        assert torch.isfinite(orthonormal_rows_stacked(degenerate[None])[0]).all()


def test_inference_basis_is_kept_until_u_changes():
    ed = LoReFT(32, 4)
    with torch.no_grad():
        first = ed.basis()
        assert ed.basis() is first  # no graph: kept across calls and passes
        ed.U.add_(0.01)  # what an optimiser step or load_state_dict does
        second = ed.basis()
    assert second is not first
    torch.testing.assert_close(second, orthonormal_rows(ed.U.detach()))
    assert ed.basis().requires_grad  # with gradients on, never the no-grad copy


def test_inference_edit_follows_every_parameter_change():
    """The no-grad path caches U and A = W − U: a change to U, W or b must show in the output."""
    torch.manual_seed(0)
    ed = LoReFT(24, 3)
    h = torch.randn(5, 24)
    for change in (lambda: ed.W.bias.add_(0.5), lambda: ed.W.weight.mul_(2.0), lambda: ed.U.add_(0.1)):
        with torch.no_grad():
            ed(h)  # fills the cache
            change()
            got = ed(h)
        want = psi(h, orthonormal_rows(ed.U.detach()), ed.W.weight.detach(), ed.W.bias.detach())
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
def test_editor_operations_never_sync_with_the_host():
    """A whole training step of the editors' own work — positions, the stacked orthonormalisation,
    whole-tensor and fused row edits, backward — under sync debug mode "error"."""
    from components.editors.fast.ops import edit_rows_stacked_, edit_whole
    from components.editors.positions import edit_positions
    from components.editors.fast.sites import _Sites

    dev = torch.device("cuda")
    torch.manual_seed(0)
    B, T, d = 4, 40, 64
    ids = torch.randint(4, 60, (B, T), device=dev)
    ids[:, 1:17] = 3
    mask = torch.ones(B, T, dtype=torch.long, device=dev)
    labels = torch.where(torch.arange(T, device=dev) >= T - 5, ids, -100)
    vis = LoReFT(d, 6).to(dev)
    pre, suf = LoReFT(d, 4).to(dev), LoReFT(d, 4).to(dev)
    hidden = torch.randn(B, T, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        q = orthonormal_rows_stacked(torch.stack([pre.U, suf.U]))
        a = torch.stack([pre.W.weight, suf.W.weight]) - q
        b = torch.stack([pre.W.bias, suf.W.bias])
        qv = orthonormal_rows_stacked(vis.U[None])[0]
        positions = edit_positions(ids, mask, 3, 4, 4, prompt_mask=(labels == -100) & mask.bool())
        sites = _Sites.from_positions((B, T), *positions)
        idx, slots = sites.fused(dev, ("prefix", "suffix"), (4, 4), torch.float32)
        h = edit_whole(hidden * 1.0, qv, vis.W.weight - qv, vis.W.bias)
        out = edit_rows_stacked_(h, idx, slots, q.reshape(8, d), a.reshape(8, d), b.reshape(8))
        out.float().square().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(p.grad is not None for ed in (vis, pre, suf) for p in ed.parameters())


def test_orthonormalisation_gradient_is_the_qr_gradient_and_keeps_u_layout():
    """`_OrthonormalRows` writes the QR backward out (no autograd through three Cholesky passes):
    float64 gradcheck, equality with autograd through `torch.linalg.qr`, and a gradient laid out
    like U, so that stacked editors' U.grad are slices of one buffer (no copy per editor)."""
    from components.editors.fast.ops import _OrthonormalRows

    torch.manual_seed(0)
    u = torch.randn(3, 4, 20, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_OrthonormalRows.apply, (u,))
    g = torch.randn(3, 4, 20, dtype=torch.float64)
    mine = torch.autograd.grad(orthonormal_rows_stacked(u), u, g)[0]
    ref = torch.autograd.grad(torch.stack([orthonormal_rows(x) for x in u]), u, g)[0]
    torch.testing.assert_close(mine, ref)
    params = [torch.nn.Parameter(torch.randn(4, 30)) for _ in range(3)]
    q = orthonormal_rows_stacked(torch.stack(params))
    (q * torch.randn_like(q)).sum().backward()
    assert len({p.grad.untyped_storage().data_ptr() for p in params}) == 1
