"""The fused inference kernels (components/editors/fast/kernels.py) compute what the operator path
computes. Without a GPU they run in Triton's interpreter (CPU tensors); skipped where Triton is not
installed. The interpreter rounds fp32 → bf16 toward zero where the GPU rounds to nearest, so bf16
results are checked against the fp32 value within one bf16 step."""

from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")

from test_editors import ALL_GROUPS, batch, tiny_llava, words  # noqa: E402

from components.core.config import EditorParams  # noqa: E402
from components.editors.fast import kernels  # noqa: E402
from components.editors.fast.ops import _Edit, _EditRows, edit_rows_stacked_, edit_whole, slot_mask  # noqa: E402
from components.editors.positions import edit_positions  # noqa: E402
from components.editors import attach  # noqa: E402


@pytest.fixture
def interpreter(monkeypatch):
    """Kernels in Triton's interpreter on CPU tensors (conftest sets TRITON_INTERPRET=1 without a GPU)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton's interpreter is off (a GPU is present): the GPU test covers the kernels")
    kernels._triton.cache_clear()
    with kernels.on_cpu_in_interpreter():
        yield
    kernels._triton.cache_clear()


def _bf16_step(x: torch.Tensor) -> torch.Tensor:
    """One bf16 ulp at |x| (8 significant bits)."""
    exp = torch.floor(torch.log2(x.abs().clamp_min(1e-30)))
    return torch.exp2(exp - 7)


def test_whole_tensor_kernel_matches_the_operator_path(interpreter):
    torch.manual_seed(0)
    with torch.no_grad():
        h = torch.randn(2, 37, 200)
        u, a, b = torch.randn(6, 200), 0.1 * torch.randn(6, 200), torch.randn(6)
        assert kernels.usable(h)
        torch.testing.assert_close(kernels.edit_whole(h, kernels.pack(u, a, b, min_rank=kernels.WHOLE_MIN_RANK)), edit_whole(h, u, a, b),
                                   atol=2e-5, rtol=1e-5)
        hb = h.bfloat16()
        got = kernels.edit_whole(hb, kernels.pack(u, a, b, min_rank=kernels.WHOLE_MIN_RANK))
        ref32 = edit_whole(hb.float(), u, a, b)
        assert got.dtype == torch.bfloat16 and got.shape == hb.shape
        assert ((got.float() - ref32).abs() <= _bf16_step(ref32) + 1e-6).all()


def test_rows_kernel_edits_valid_slots_in_place_like_the_operator_path(interpreter):
    torch.manual_seed(1)
    with torch.no_grad():
        hidden = torch.randn(3, 20, 64)
        idx = torch.tensor([1, 2, 25, 0, 41, 42, 0, 59])
        valid = [torch.tensor([1, 1, 1, 0], dtype=torch.bool), torch.tensor([1, 1, 0, 1], dtype=torch.bool)]
        u, a, b = torch.randn(8, 64), 0.1 * torch.randn(8, 64), torch.randn(8)
        mask = slot_mask(valid, [4, 4], torch.float32)
        want = edit_rows_stacked_(hidden.clone(), idx, mask, u, a, b)
        got = hidden.clone()
        kernels.edit_rows_no_grad_(got.view(-1, 64), idx, kernels.pad_mask(mask, 8), kernels.pack(u, a, b))
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
        untouched = torch.ones(60, dtype=torch.bool)
        untouched[[1, 2, 25, 41, 42, 59]] = False
        assert torch.equal(got.view(-1, 64)[untouched], hidden.view(-1, 64)[untouched])


def _edit_grads(fn, h, u, a, b, gout):
    out = fn(h, u, a, b)
    wanted = [t for t in (h, u, a, b) if t.requires_grad]
    return out, torch.autograd.grad(out, wanted, gout)


def test_whole_tensor_training_kernel_matches_the_operator_path_and_its_gradients(interpreter):
    """`EditWhole` (Triton forward and backward) against `_Edit` (operators, hand-written backward):
    output, ∂L/∂h and the parameters' gradients, at ranks below, at and above the padded 16, fp32
    and bf16 hidden states, with and without a gradient for h."""
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for shape, r in (((2, 37, 200), 6), ((50, 64), 4), ((3, 5, 96), 16), ((1, 40, 72), 20)):
            d = shape[-1]
            h = torch.randn(*shape).to(dtype).requires_grad_()
            u = torch.linalg.qr(torch.randn(d, r))[0].T.contiguous().requires_grad_()
            a, b = (0.1 * torch.randn(r, d)).requires_grad_(), torch.randn(r).requires_grad_()
            gout = torch.randn(*shape).to(dtype)
            got, got_g = _edit_grads(kernels.EditWhole.apply, h, u, a, b, gout)
            want, want_g = _edit_grads(_Edit.apply, h, u, a, b, gout)
            assert got.shape == want.shape and got.dtype == dtype and got_g[0].dtype == dtype
            if dtype == torch.float32:
                torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
                torch.testing.assert_close(got_g[0], want_g[0], atol=2e-5, rtol=1e-5)
            else:  # bf16 results: within one bf16 step of the fp32 value (the interpreter truncates)
                ref = _Edit.apply(h.detach().float(), u.detach(), a.detach(), b.detach())
                assert ((got.float() - ref).abs() <= _bf16_step(ref) + 1e-6).all()
                ref_gh = gout.float() + (gout.float() @ u.detach().T) @ a.detach()
                assert ((got_g[0].float() - ref_gh).abs() <= _bf16_step(ref_gh) + 1e-6).all()
            for name, g_k, g_o in zip(("U", "A", "b"), got_g[1:], want_g[1:]):
                assert g_k.shape == g_o.shape, name
                torch.testing.assert_close(g_k, g_o, atol=1e-4, rtol=1e-5, msg=f"{name} {dtype} {shape} r={r}")
    # no gradient for h (the first edited layer of a frozen tower): only the parameters get one
    h = torch.randn(4, 9, 32)
    u, a, b = (torch.randn(3, 32).requires_grad_(), torch.randn(3, 32).requires_grad_(),
               torch.randn(3).requires_grad_())
    gout = torch.randn(4, 9, 32).expand(4, 9, 32)
    got = torch.autograd.grad(kernels.EditWhole.apply(h, u, a, b), (u, a, b), gout)
    want = torch.autograd.grad(_Edit.apply(h, u, a, b), (u, a, b), gout)
    for g_k, g_o in zip(got, want):
        torch.testing.assert_close(g_k, g_o, atol=1e-4, rtol=1e-5)
    # a gradient that is not contiguous (sum's backward expands a scalar)
    hh = torch.randn(3, 10, 48, requires_grad=True)
    uu, aa, bb = torch.randn(2, 48), torch.randn(2, 48), torch.randn(2)
    (g_kernel,) = torch.autograd.grad(kernels.EditWhole.apply(hh, uu, aa, bb).sum(), hh)
    (g_ops,) = torch.autograd.grad(_Edit.apply(hh, uu, aa, bb).sum(), hh)
    torch.testing.assert_close(g_kernel, g_ops, atol=2e-5, rtol=1e-5)


def _rows_grads(fn, h0, idx, mask, u, a, b, gout):
    hidden = h0 * 1  # not a leaf: the edit may happen in place, as in a layer's output
    out = fn(hidden, idx, mask, u, a, b)
    wanted = [t for t in (h0, u, a, b) if t.requires_grad]
    return out, torch.autograd.grad(out, wanted, gout)


def test_rows_training_kernel_matches_the_operator_path_and_its_gradients(interpreter):
    """`EditRows` (Triton) against `_EditRows` (operators): the edited tensor, ∂L/∂h and the
    parameters' gradients, for stacked prefix+suffix ranks below, at and above the padded 16,
    fp32 and bf16 hidden states, invalid slots repeating an unedited row, no gradient for h, and a
    gradient that is not contiguous. d = 600 splits each row over three programs (one partial)."""
    assert kernels.ROWS_TRAIN_CONFIG["BLOCK_D"] < 600
    torch.manual_seed(2)
    for dtype in (torch.float32, torch.bfloat16):
        for (batch_size, seq, d), ranks in (((3, 20, 64), (4, 4)), ((2, 33, 200), (3, 5)), ((2, 9, 48), (8, 8)),
                                            ((1, 40, 72), (12, 8)), ((2, 9, 600), (4, 4))):  # 600: 3 column chunks
            n_p, n_s = 3, 2  # slots per sample
            idx, valids = [], [[], []]
            for smp in range(batch_size):
                base = smp * seq
                for k in range(n_p):  # the last prefix slot of sample 0 is invalid: it repeats row base + 0
                    ok = not (smp == 0 and k == n_p - 1)
                    idx.append(base + 1 + k if ok else base)
                    valids[0].append(ok)
            for smp in range(batch_size):
                base = smp * seq
                for k in range(n_s):
                    idx.append(base + seq - 1 - k)
                    valids[1].append(True)
            idx = torch.tensor(idx)
            mask = slot_mask([torch.tensor(v) for v in valids], list(ranks), torch.float32)
            r = sum(ranks)
            h0 = torch.randn(batch_size, seq, d).to(dtype).requires_grad_()
            u = torch.randn(r, d).div(d ** 0.5).requires_grad_()
            a, b = (0.1 * torch.randn(r, d)).requires_grad_(), torch.randn(r).requires_grad_()
            gout = torch.randn(batch_size, seq, d).to(dtype)
            got, got_g = _rows_grads(kernels.EditRows.apply, h0, idx, mask, u, a, b, gout)
            want, want_g = _rows_grads(_EditRows.apply, h0, idx, mask, u, a, b, gout)
            assert got.dtype == dtype and got_g[0].dtype == dtype and got_g[0].shape == h0.shape
            if dtype == torch.float32:
                torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
                torch.testing.assert_close(got_g[0], want_g[0], atol=2e-5, rtol=1e-5)
            else:  # bf16: within one bf16 step of the fp32 value (the interpreter truncates)
                ref = _EditRows.apply(h0.detach().float(), idx, mask, u.detach(), a.detach(), b.detach())
                assert ((got.float() - ref).abs() <= _bf16_step(ref) + 1e-6).all()
                ref_gh = _EditRows.apply(gout.float(), idx, mask, a.detach(), u.detach(), torch.zeros(r))
                assert ((got_g[0].float() - ref_gh).abs() <= _bf16_step(ref_gh) + 1e-6).all()
            untouched = torch.ones(batch_size * seq, dtype=torch.bool)
            untouched[idx] = False
            assert torch.equal(got.detach().view(-1, d)[untouched], h0.detach().view(-1, d)[untouched])
            assert torch.equal(got_g[0].view(-1, d)[untouched], gout.view(-1, d)[untouched])
            for name, g_k, g_o in zip(("U", "A", "b"), got_g[1:], want_g[1:]):
                assert g_k.shape == g_o.shape, name
                torch.testing.assert_close(g_k, g_o, atol=1e-4, rtol=1e-5, msg=f"{name} {dtype} d={d} ranks={ranks}")
    # no gradient for h; a gradient that is not contiguous (sum's backward expands a scalar)
    h = torch.randn(2, 10, 32)
    idx, mask = torch.tensor([1, 2, 13, 14]), torch.ones(4, 3)
    u, a, b = (torch.randn(3, 32).requires_grad_(), torch.randn(3, 32).requires_grad_(), torch.randn(3).requires_grad_())
    got = torch.autograd.grad(kernels.EditRows.apply(h.clone(), idx, mask, u, a, b).sum(), (u, a, b))
    want = torch.autograd.grad(_EditRows.apply(h.clone(), idx, mask, u, a, b).sum(), (u, a, b))
    for g_k, g_o in zip(got, want):
        torch.testing.assert_close(g_k, g_o, atol=1e-4, rtol=1e-5)


def test_model_training_with_the_training_kernels_equals_the_operator_path(interpreter, monkeypatch):
    """A training forward + backward of a tiny LLaVA: every visual/projector site takes `EditWhole`
    and every LM layer `EditRows` (counted), and the loss and every bank's gradient equal the
    operator path's."""
    model = tiny_llava(2)
    editors = attach(model, EditorParams.model_validate(ALL_GROUPS))
    calls = {"train": 0, "rows": 0}
    train, rows = kernels.edit_whole_with_grad, kernels.edit_rows_with_grad

    def count_train(*a, **k):
        calls["train"] += 1
        return train(*a, **k)

    def count_rows(*a, **k):
        calls["rows"] += 1
        return rows(*a, **k)

    b = batch([words(9), words(5)], left_pad=True)
    try:
        editors.train()

        def step():
            editors.zero_grad(set_to_none=True)
            loss = model(**b).logits.float().pow(2).mean()
            loss.backward()
            return loss.detach(), {n: p.grad.clone() for n, p in editors.named_parameters() if p.grad is not None}

        monkeypatch.setattr(kernels, "edit_whole_with_grad", count_train)
        monkeypatch.setattr(kernels, "edit_rows_with_grad", count_rows)
        loss_k, grads_k = step()
        lm_layers = len(set(editors.prefix) | set(editors.suffix))
        assert calls["train"] == len(editors.visual) + len(editors.projector) > 0
        assert calls["rows"] == lm_layers > 0
        monkeypatch.setattr(kernels, "trainable", lambda hidden, u: False)
        loss_o, grads_o = step()
        assert calls == {"train": len(editors.visual) + len(editors.projector), "rows": lm_layers}  # not called again
        torch.testing.assert_close(loss_k, loss_o, atol=1e-6, rtol=1e-5)
        assert grads_k.keys() == grads_o.keys() and grads_k
        for name in grads_o:
            torch.testing.assert_close(grads_k[name], grads_o[name], atol=1e-6, rtol=1e-4, msg=name)
    finally:
        editors.detach()


@torch.no_grad()
def test_kernels_take_cuda_tensors_and_cpu_ones_only_in_the_interpreter():
    h = torch.zeros(2, 4)
    assert not kernels.usable(h) and not kernels.usable_on(torch.device("cpu"))  # CPU: the operator path
    if os.environ.get("TRITON_INTERPRET") == "1" and kernels.import_triton() is not None:
        with kernels.on_cpu_in_interpreter():
            assert kernels.usable(h) and kernels.usable_on(torch.device("cpu"))
            with torch.enable_grad():
                assert not kernels.usable(h)  # the inference kernels: never with gradients
            with kernels.on_cpu_in_interpreter(False):
                assert not kernels.usable(h)
    assert not kernels.usable(h)


def _reference_positions(ids, att, image_id, p, s, ranks, rank_p):
    """What the sites build from positions.edit_positions without the kernel (the fused layout)."""
    pi, pv, si, sv = edit_positions(ids, att, image_id, p, s)
    rows = torch.arange(ids.shape[0])[:, None] * ids.shape[1]
    idx = torch.cat([(rows + pi).reshape(-1), (rows + si).reshape(-1)])
    valid = torch.cat([pv.reshape(-1), sv.reshape(-1)])
    groups = [(v.reshape(-1), r) for v, r, n in ((pv, ranks[0], p), (sv, ranks[1], s)) if n]
    mask = slot_mask([v for v, _ in groups], [r for _, r in groups], torch.float32)
    return idx, valid, kernels.pad_mask(mask, rank_p)


def test_positions_kernel_equals_edit_positions(interpreter):
    """Random batches: left/right padding, no attention mask, samples with and without image
    tokens, instructions shorter than p + s, one group absent, unequal ranks, several token blocks."""
    g = torch.Generator().manual_seed(0)
    cases = [(4, 4, (4, 4)), (0, 4, (0, 4)), (4, 0, (4, 0)), (3, 5, (2, 6)), (1, 1, (4, 4))]
    for trial in range(15):
        batch_size, seq = int(torch.randint(1, 5, (1,), generator=g)), int(torch.randint(3, 600, (1,), generator=g))
        ids = torch.randint(3, 50, (batch_size, seq), generator=g)
        att = torch.ones(batch_size, seq, dtype=torch.long)
        image_id = 7 if trial % 3 else None
        for row in range(batch_size):
            pad = int(torch.randint(0, seq // 2, (1,), generator=g))
            if trial % 2:
                att[row, :pad] = 0
            else:
                att[row, seq - pad:] = 0
            if image_id is not None and torch.rand(1, generator=g) < 0.7:
                at = int(torch.randint(0, seq, (1,), generator=g))
                ids[row, at:at + 5] = image_id
        if trial % 7 == 0:
            att = None
        p, s, ranks = cases[trial % len(cases)]
        rank_p = kernels.padded_rank(sum(ranks))
        got = kernels.positions(ids, att, image_id, p, s, ranks, rank_p)
        want = _reference_positions(ids, att, image_id, p, s, ranks, rank_p)
        for name, a, b in zip(("idx", "valid", "mask"), got, want):
            assert torch.equal(a, b), (trial, name, a, b)


def test_pack_pads_odd_ranks_with_zero_rows():
    u, a, b = torch.randn(3, 10), torch.randn(3, 10), torch.randn(3)
    a_p, u_p, b_p = kernels.pack(u, a, b)
    assert a_p.shape == (4, 10) and u_p.shape == (4, 10) and b_p.shape == (4,)
    assert torch.equal(a_p[:3], a) and torch.count_nonzero(a_p[3]) == 0 and b_p[3] == 0
    assert kernels.pack(u, a, b, min_rank=16)[0].shape == (16, 10)


def test_model_inference_with_kernels_equals_the_operator_path(interpreter, monkeypatch):
    """Every site of a tiny LLaVA takes the kernel under no_grad (counted), logits and generated
    tokens equal the operator path's; with gradients the kernels are never used."""
    model = tiny_llava(2)
    model.eval()
    editors = attach(model, EditorParams.model_validate(ALL_GROUPS))
    calls = {"whole": 0, "rows": 0, "positions": 0}
    whole, rows, positions = kernels.edit_whole, kernels.edit_rows_no_grad_, kernels.positions

    def count_whole(*a, **k):
        calls["whole"] += 1
        return whole(*a, **k)

    def count_rows(*a, **k):
        calls["rows"] += 1
        return rows(*a, **k)

    def count_positions(*a, **k):
        calls["positions"] += 1
        return positions(*a, **k)

    monkeypatch.setattr(kernels, "edit_whole", count_whole)
    monkeypatch.setattr(kernels, "edit_rows_no_grad_", count_rows)
    monkeypatch.setattr(kernels, "positions", count_positions)
    b = batch([words(9), words(5)], left_pad=True)
    try:
        editors.eval()
        with torch.no_grad():
            fused = model(**b).logits
            n_whole, n_rows = calls["whole"], calls["rows"]
            assert n_whole == len(editors.visual) + len(editors.projector)
            assert n_rows == len({*editors.layers["prefix"], *editors.layers["suffix"]})
            assert calls["positions"] == 1
            gen_kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=model.config.text_config.pad_token_id)
            tokens = model.generate(**b, **gen_kw)
        monkeypatch.setattr(kernels, "usable", lambda hidden: False)
        monkeypatch.setattr(kernels, "usable_on", lambda device: False)
        with torch.no_grad():
            plain = model(**b).logits
        with torch.no_grad():
            plain_tokens = model.generate(**b, **gen_kw)
        torch.testing.assert_close(fused, plain, atol=1e-4, rtol=1e-4)
        assert torch.equal(tokens, plain_tokens)
        monkeypatch.undo()
        calls.update(whole=0, rows=0, positions=0)
        monkeypatch.setattr(kernels, "edit_whole", count_whole)
        monkeypatch.setattr(kernels, "edit_rows_no_grad_", count_rows)
        monkeypatch.setattr(kernels, "positions", count_positions)
        model(**b).logits.sum().backward()  # training: the operator path with its backward
        assert calls == {"whole": 0, "rows": 0, "positions": 0}
    finally:
        editors.detach()


def _error_report(got: torch.Tensor, exact: torch.Tensor, scale: torch.Tensor) -> dict[str, float]:
    """How far bf16 results are from the exact (float64) value: the largest distance in bf16 steps
    at |exact|, and the largest distance beyond one step measured in units of fp32 rounding of the
    terms summed (`scale` = Σ|terms| per element: where the edit nearly cancels h, fp32 summation
    error alone can exceed a bf16 step of the small result, for any summation order)."""
    err = (got.double() - exact).abs()
    step = _bf16_step(exact.float()).double()
    beyond = (err - step).clamp_min(0) / (scale * 2.0**-24)
    return {"max_steps": float((err / step).max()), "beyond_one_step_in_fp32_units": float(beyond.max()),
            "share_beyond_one_step": float((err > step).double().mean())}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_kernels_on_the_gpu_round_like_the_operator_path():
    """Compiled for real: the kernels' bf16 results, like the operator path's (both do fp32 math and
    round once), are within one bf16 step of the exact (float64) result up to fp32 summation error,
    and equal the operator path's except where the two summation orders straddle a rounding
    boundary (a TF32 product — 10-bit mantissas — fails both checks)."""
    kernels._triton.cache_clear()
    torch.manual_seed(0)
    dev = torch.device("cuda")
    with torch.no_grad():
        h = torch.randn(8, 577, 1024, device=dev, dtype=torch.bfloat16)
        u, a, b = (torch.randn(6, 1024, device=dev), 0.03 * torch.randn(6, 1024, device=dev),
                   torch.randn(6, device=dev))
        got = kernels.edit_whole(h, kernels.pack(u, a, b, min_rank=kernels.WHOLE_MIN_RANK))
        want = edit_whole(h, u, a, b)
        h64, a64, u64 = h.double(), a.double(), u.double()
        z64 = h64 @ a64.T + b.double()
        exact = h64 + z64 @ u64
        scale = h64.abs() + ((h64.abs() @ a64.abs().T + b.double().abs()) @ u64.abs())
        report = {"whole kernel": _error_report(got, exact, scale),
                  "whole operator path": _error_report(want, exact, scale),
                  "whole differ": float((got != want).float().mean())}

        hidden = torch.randn(8, 700, 4096, device=dev, dtype=torch.bfloat16)
        idx = (torch.arange(8, device=dev)[:, None] * 700 + torch.arange(600, 608, device=dev)).reshape(-1)
        valid = [torch.ones(32, dtype=torch.bool, device=dev), torch.ones(32, dtype=torch.bool, device=dev)]
        uu, aa, bb = (torch.randn(8, 4096, device=dev), 0.03 * torch.randn(8, 4096, device=dev),
                      torch.randn(8, device=dev))
        mask = slot_mask(valid, [4, 4], torch.float32)
        rows64, m64 = hidden.view(-1, 4096)[idx].double(), mask.double()
        exact_rows = rows64 + ((rows64 @ aa.double().T + bb.double()) * m64) @ uu.double()
        scale_rows = rows64.abs() + ((rows64.abs() @ aa.double().abs().T + bb.double().abs()) * m64) @ uu.double().abs()
        want = edit_rows_stacked_(hidden.clone(), idx, mask, uu, aa, bb)
        got = hidden.clone()
        kernels.edit_rows_no_grad_(got.view(-1, 4096), idx, kernels.pad_mask(mask, 8), kernels.pack(uu, aa, bb))
        untouched = torch.ones(got.shape[0] * got.shape[1], dtype=torch.bool, device=dev)
        untouched[idx] = False
        report.update({"rows kernel": _error_report(got.view(-1, 4096)[idx], exact_rows, scale_rows),
                       "rows operator path": _error_report(want.view(-1, 4096)[idx], exact_rows, scale_rows),
                       "rows differ": float((got.view(-1, 4096)[idx] != want.view(-1, 4096)[idx]).float().mean())})
        assert torch.equal(got.view(-1, 4096)[untouched], hidden.view(-1, 4096)[untouched])
    print(report)  # (max bf16 steps from exact, share > 1 step) per path; shown with -s or on failure
    for path in ("kernel", "operator path"):
        for site in ("whole", "rows"):
            # within one bf16 step of exact, up to a few fp32 roundings of the summed terms
            assert report[f"{site} {path}"]["beyond_one_step_in_fp32_units"] <= 64, report
    assert report["whole differ"] < 1e-2 and report["rows differ"] < 1e-2, report

def _training_errors(path: str, got: dict, exact: dict, scale: dict) -> dict:
    """Errors of an edit with gradients against float64: the bf16 output and ∂L/∂h as
    `_error_report`s, the parameter gradients (U, A, b) in fp32 roundings of Σ|terms|."""
    report = {f"{path} {k}": _error_report(got[k], exact[k], scale[k]) for k in ("out", "h")}
    for k in "UAb":
        report[f"{path} d{k}"] = float(((got[k].double() - exact[k]).abs() / (scale[k] * 2.0**-24)).max())
    return report


def _assert_training_errors(report: dict) -> None:
    """Kernel and operator path alike: within one bf16 step of exact up to 64 fp32 roundings of the
    summed terms (outputs), within 64 fp32 roundings (gradients). Printed: shown with -s or on failure."""
    print(report)
    for path in ("kernel", "operator path"):
        for k in ("out", "h"):
            assert report[f"{path} {k}"]["beyond_one_step_in_fp32_units"] <= 64, report
        for k in "UAb":
            assert report[f"{path} d{k}"] <= 64, report


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_training_kernel_on_the_gpu_against_float64():
    """Compiled for real, at LLaVA-7B's vision shape (b8): `EditWhole`'s output and ∂L/∂h are within
    one bf16 step of exact up to fp32 summation error, like `_Edit`'s; its parameter gradients (sums
    over 4,616 rows) are within 64 fp32 roundings of Σ|terms| of the float64 value, like `_Edit`'s."""
    kernels._triton.cache_clear()
    torch.manual_seed(0)
    dev = torch.device("cuda")
    h = torch.randn(8, 577, 1024, device=dev, dtype=torch.bfloat16, requires_grad=True)
    u = torch.linalg.qr(torch.randn(1024, 6, device=dev))[0].T.contiguous().requires_grad_()
    a = (0.03 * torch.randn(6, 1024, device=dev)).requires_grad_()
    b = torch.randn(6, device=dev, requires_grad=True)
    gout = torch.randn(8, 577, 1024, device=dev, dtype=torch.bfloat16)
    h64, u64, a64, b64, g64 = (t.detach().double().reshape(-1, t.shape[-1]) if t.dim() > 1 else t.detach().double()
                               for t in (h, u, a, b, gout))
    z64 = h64 @ a64.T + b64
    gz64 = g64 @ u64.T
    exact = {"out": h64 + z64 @ u64, "h": g64 + gz64 @ a64, "U": z64.T @ g64, "A": gz64.T @ h64, "b": gz64.sum(0)}
    za, ga, ha = z64.abs(), g64.abs(), h64.abs()
    gza = ga @ u64.abs().T
    scale = {"out": ha + (ha @ a64.abs().T + b64.abs()) @ u64.abs(), "h": ga + gza @ a64.abs(), "U": za.T @ ga,
             "A": gza.T @ ha, "b": gza.sum(0)}
    report = {}
    for path, fn in (("kernel", kernels.EditWhole.apply), ("operator path", _Edit.apply)):
        out = fn(h, u, a, b)
        grads = dict(zip(("h", "U", "A", "b"), torch.autograd.grad(out, (h, u, a, b), gout)))
        got = {"out": out.reshape(-1, 1024), "h": grads["h"].reshape(-1, 1024), **{k: grads[k] for k in "UAb"}}
        report.update(_training_errors(path, got, exact, scale))
    _assert_training_errors(report)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_rows_training_kernel_on_the_gpu_against_float64():
    """Compiled for real, at an LLaVA-7B LM layer's shape (b8, 704 tokens, 4 prefix + 4 suffix slots
    per sample, ranks 4 + 4 as in params.yaml): `EditRows`' edited rows and ∂L/∂h rows are within one bf16 step of exact
    up to fp32 summation error, like `_EditRows`'; the parameter gradients within 64 fp32 roundings
    of Σ|terms|; rows outside the slots untouched in both the output and ∂L/∂h."""
    kernels._triton.cache_clear()
    torch.manual_seed(0)
    dev = torch.device("cuda")
    bsz, seq, d = 8, 704, 4096
    h0 = torch.randn(bsz, seq, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
    starts = torch.arange(bsz, device=dev)[:, None] * seq
    idx = torch.cat([(starts + torch.arange(600, 604, device=dev)).reshape(-1),
                     (starts + torch.arange(690, 694, device=dev)).reshape(-1)])
    valid = torch.ones(bsz * 4, dtype=torch.bool, device=dev)
    valid[3] = False  # sample 0's last prefix slot: invalid, pointed at row 0 (never edited)
    idx[3] = 0
    mask = slot_mask([valid, torch.ones(bsz * 4, dtype=torch.bool, device=dev)], [4, 4], torch.float32)
    u = (torch.randn(8, d, device=dev) / d**0.5).requires_grad_()
    a = (0.03 * torch.randn(8, d, device=dev)).requires_grad_()
    b = torch.randn(8, device=dev, requires_grad=True)
    gout = torch.randn(bsz, seq, d, device=dev, dtype=torch.bfloat16)
    rows64, g64 = h0.detach().view(-1, d)[idx].double(), gout.view(-1, d)[idx].double()
    u64, a64, b64, m64 = u.detach().double(), a.detach().double(), b.detach().double(), mask.double()
    z64, gz64 = (rows64 @ a64.T + b64) * m64, (g64 @ u64.T) * m64
    exact = {"out": rows64 + z64 @ u64, "h": g64 + gz64 @ a64, "U": z64.T @ g64, "A": gz64.T @ rows64,
             "b": gz64.sum(0)}
    ra, ga = rows64.abs(), g64.abs()
    za, gza = (ra @ a64.abs().T + b64.abs()) * m64, (ga @ u64.abs().T) * m64
    scale = {"out": ra + za @ u64.abs(), "h": ga + gza @ a64.abs(), "U": za.T @ ga, "A": gza.T @ ra, "b": gza.sum(0)}
    untouched = torch.ones(bsz * seq, dtype=torch.bool, device=dev)
    untouched[idx] = False
    report = {}
    for path, fn in (("kernel", kernels.EditRows.apply), ("operator path", _EditRows.apply)):
        out = fn(h0 * 1, idx, mask, u, a, b)
        grads = dict(zip(("h", "U", "A", "b"), torch.autograd.grad(out, (h0, u, a, b), gout)))
        got = {"out": out.detach().view(-1, d)[idx], "h": grads["h"].view(-1, d)[idx], **{k: grads[k] for k in "UAb"}}
        assert torch.equal(out.view(-1, d)[untouched], h0.detach().view(-1, d)[untouched]), path
        assert torch.equal(grads["h"].view(-1, d)[untouched], gout.view(-1, d)[untouched]), path
        report.update(_training_errors(path, got, exact, scale))
    _assert_training_errors(report)
