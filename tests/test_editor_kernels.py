"""The fused inference kernels (components/editors/kernels.py) compute what the operator path
computes. Without a GPU they run in Triton's interpreter (CPU tensors); skipped where Triton is not
installed. The interpreter rounds fp32 → bf16 toward zero where the GPU rounds to nearest, so bf16
results are checked against the fp32 value within one bf16 step."""

from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")

from test_editors import ALL_GROUPS, batch, tiny_llava, words  # noqa: E402

from components.config import EditorParams  # noqa: E402
from components.editors import kernels  # noqa: E402
from components.editors.loreft import edit_rows_fused_, edit_whole, slot_mask  # noqa: E402
from components.editors.sites import attach  # noqa: E402


@pytest.fixture
def interpreter(monkeypatch):
    """Kernels in Triton's interpreter on CPU tensors (conftest sets TRITON_INTERPRET=1 without a GPU)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton's interpreter is off (a GPU is present): the GPU test covers the kernels")
    monkeypatch.setenv("MRT_TRITON_INTERPRET", "1")
    kernels._triton.cache_clear()
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
        want = edit_rows_fused_(hidden.clone(), idx, mask, u, a, b)
        got = hidden.clone()
        kernels.edit_rows_(got.view(-1, 64), idx, kernels.pad_mask(mask, 8), kernels.pack(u, a, b))
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
        untouched = torch.ones(60, dtype=torch.bool)
        untouched[[1, 2, 25, 41, 42, 59]] = False
        assert torch.equal(got.view(-1, 64)[untouched], hidden.view(-1, 64)[untouched])


def test_kernels_are_opt_in_on_the_gpu(monkeypatch):
    monkeypatch.delenv("MRT_FUSED_KERNELS", raising=False)
    monkeypatch.delenv("MRT_TRITON_INTERPRET", raising=False)
    h = torch.zeros(2, 4)
    assert not kernels.enabled() and not kernels.usable(h)
    monkeypatch.setenv("MRT_FUSED_KERNELS", "1")
    assert kernels.enabled() and not kernels.usable(h)  # a CPU tensor: the operator path
    with torch.enable_grad():
        assert not kernels.usable(h)


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
    calls = {"whole": 0, "rows": 0}
    whole, rows = kernels.edit_whole, kernels.edit_rows_

    def count_whole(*a, **k):
        calls["whole"] += 1
        return whole(*a, **k)

    def count_rows(*a, **k):
        calls["rows"] += 1
        return rows(*a, **k)

    monkeypatch.setattr(kernels, "edit_whole", count_whole)
    monkeypatch.setattr(kernels, "edit_rows_", count_rows)
    b = batch([words(9), words(5)])
    try:
        editors.eval()
        with torch.no_grad():
            fused = model(**b).logits
            n_whole, n_rows = calls["whole"], calls["rows"]
            assert n_whole == len(editors.visual) + len(editors.projector)
            assert n_rows == len({*editors.layers["prefix"], *editors.layers["suffix"]})
            gen_kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=model.config.text_config.pad_token_id)
            tokens = model.generate(**b, **gen_kw)
        monkeypatch.setattr(kernels, "usable", lambda hidden: False)
        with torch.no_grad():
            plain = model(**b).logits
            plain_tokens = model.generate(**b, **gen_kw)
        torch.testing.assert_close(fused, plain, atol=1e-4, rtol=1e-4)
        assert torch.equal(tokens, plain_tokens)
        monkeypatch.undo()
        calls.update(whole=0, rows=0)
        monkeypatch.setattr(kernels, "edit_whole", count_whole)
        monkeypatch.setattr(kernels, "edit_rows_", count_rows)
        model(**b).logits.sum().backward()  # training: the operator path with its backward
        assert calls == {"whole": 0, "rows": 0}
    finally:
        editors.detach()


def _ulps_off(got: torch.Tensor, exact: torch.Tensor) -> tuple[float, float]:
    """(largest |got − exact| in bf16 steps at |exact|, share of elements off by more than one)."""
    ulps = (got.double() - exact).abs() / _bf16_step(exact.float()).double()
    return float(ulps.max()), float((ulps > 1).double().mean())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_kernels_on_the_gpu_round_like_the_operator_path():
    """Compiled for real: the kernels' bf16 results are within one bf16 step of the exact (float64)
    result everywhere, as the operator path's are (both do fp32 math and round once), and they equal
    the operator path's except where the two summation orders straddle a rounding boundary."""
    kernels._triton.cache_clear()
    torch.manual_seed(0)
    dev = torch.device("cuda")
    with torch.no_grad():
        h = torch.randn(8, 577, 1024, device=dev, dtype=torch.bfloat16)
        u, a, b = (torch.randn(6, 1024, device=dev), 0.03 * torch.randn(6, 1024, device=dev),
                   torch.randn(6, device=dev))
        got = kernels.edit_whole(h, kernels.pack(u, a, b, min_rank=kernels.WHOLE_MIN_RANK))
        want = edit_whole(h, u, a, b)
        h64 = h.double()
        exact = h64 + (h64 @ a.double().T + b.double()) @ u.double()
        report = {"whole kernel": _ulps_off(got, exact), "whole operator path": _ulps_off(want, exact),
                  "whole differ": float((got != want).float().mean())}

        hidden = torch.randn(8, 700, 4096, device=dev, dtype=torch.bfloat16)
        idx = (torch.arange(8, device=dev)[:, None] * 700 + torch.arange(600, 608, device=dev)).reshape(-1)
        valid = [torch.ones(32, dtype=torch.bool, device=dev), torch.ones(32, dtype=torch.bool, device=dev)]
        uu, aa, bb = (torch.randn(8, 4096, device=dev), 0.03 * torch.randn(8, 4096, device=dev),
                      torch.randn(8, device=dev))
        mask = slot_mask(valid, [4, 4], torch.float32)
        rows64 = hidden.view(-1, 4096)[idx].double()
        exact_rows = rows64 + ((rows64 @ aa.double().T + bb.double()) * mask.double()) @ uu.double()
        want = edit_rows_fused_(hidden.clone(), idx, mask, uu, aa, bb)
        got = hidden.clone()
        kernels.edit_rows_(got.view(-1, 4096), idx, kernels.pad_mask(mask, 8), kernels.pack(uu, aa, bb))
        untouched = torch.ones(got.shape[0] * got.shape[1], dtype=torch.bool, device=dev)
        untouched[idx] = False
        report.update({"rows kernel": _ulps_off(got.view(-1, 4096)[idx], exact_rows),
                       "rows operator path": _ulps_off(want.view(-1, 4096)[idx], exact_rows),
                       "rows differ": float((got != want).float().mean())})
        assert torch.equal(got.view(-1, 4096)[untouched], hidden.view(-1, 4096)[untouched])
    print(report)  # (max bf16 steps from exact, share > 1 step) per path; shown with -s or on failure
    for name in ("whole kernel", "rows kernel"):
        assert report[name][0] <= 1.0, report
    assert report["whole differ"] < 1e-3 and report["rows differ"] < 1e-3, report