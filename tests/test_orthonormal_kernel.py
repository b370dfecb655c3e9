"""The bank orthonormalisation kernels (components/editors/fast/orthonormal_kernel.py) compute what
`ops._OrthonormalRows` computes on the operator path (shifted Cholesky-QR3 and the closed-form
QR backward). Without a GPU they run in Triton's interpreter on CPU tensors; skipped where Triton
is not installed. The GPU test checks the compiled kernels at LLaVA-7B's bank shapes."""

from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")

from components.editors.fast import kernels, orthonormal_kernel  # noqa: E402
from components.editors.fast.ops import _cholesky_qr3, _OrthonormalRows, orthonormal_rows_stacked  # noqa: E402
from components.editors.loreft import orthonormal_rows  # noqa: E402

SHAPES = [(3, 1, 64), (4, 6, 200), (2, 8, 1024), (1, 6, 4096), (5, 4, 300)]
BANKS_7B = {"vision": (22, 6, 1024), "projector": (1, 6, 4096), "lm": (64, 4, 4096)}


@pytest.fixture
def interpreter(monkeypatch):
    """Kernels in Triton's interpreter on CPU tensors (conftest sets TRITON_INTERPRET=1 without a GPU)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton's interpreter is off (a GPU is present): the GPU test covers the kernels")
    orthonormal_kernel._triton.cache_clear()
    with kernels.on_cpu_in_interpreter():
        yield
    orthonormal_kernel._triton.cache_clear()


def _orth_error(q: torch.Tensor) -> float:
    """max |Q Qᵀ − I| over a stack of row blocks."""
    eye = torch.eye(q.shape[-2], dtype=q.dtype, device=q.device)
    return float((q @ q.mT - eye).abs().max())


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest per-matrix relative Frobenius distance ‖a − b‖ / ‖b‖."""
    a, b = a.double(), b.double()
    return float(((a - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1)).max())


def _qr_reference(u: torch.Tensor) -> torch.Tensor:
    """The sign-fixed QR rows of each matrix, in float64 (`loreft.orthonormal_rows`)."""
    return torch.stack([orthonormal_rows(x) for x in u.double()])


def _conditioned(r: int, d: int, cond: float, seed: int) -> torch.Tensor:
    """An fp32 r × d matrix with singular values 1 … 1/cond and mixed rows (nearly parallel rows)."""
    g = torch.Generator().manual_seed(seed)
    left = torch.linalg.qr(torch.randn(r, r, generator=g, dtype=torch.float64))[0]
    right = torch.linalg.qr(torch.randn(d, r, generator=g, dtype=torch.float64))[0]
    sv = torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), r, dtype=torch.float64)
    return ((left * sv) @ right.T).float()


def test_forward_is_the_sign_fixed_qr_factor(interpreter):
    """Registers path at every test shape, and the chunked path (BLOCK_D below the row length, not
    dividing it): orthonormal rows, equal to Cholesky-QR3 and to the sign-fixed QR."""
    torch.manual_seed(0)
    for shape in SHAPES:
        u = torch.randn(*shape)
        assert orthonormal_kernel.usable(u)
        q = orthonormal_kernel.orthonormal_rows(u)
        assert q.shape == u.shape and q.dtype == torch.float32 and q.is_contiguous()
        assert _orth_error(q) < 1e-5, shape
        assert _rel(q, _cholesky_qr3(u)) < 1e-5, shape
        assert _rel(q, _qr_reference(u)) < 1e-5, shape
        assert (q - _qr_reference(u)).abs().max() < 2e-6, shape
    u = torch.randn(3, 6, 200)
    chunked = orthonormal_kernel.orthonormal_rows(u, BLOCK_D=64)
    assert _orth_error(chunked) < 1e-5 and _rel(chunked, _qr_reference(u)) < 1e-5
    # an orthonormal U comes back as itself
    u = torch.linalg.qr(torch.randn(2, 300, 5))[0].mT.contiguous()
    torch.testing.assert_close(orthonormal_kernel.orthonormal_rows(u), u, atol=1e-6, rtol=0)


def test_badly_conditioned_u_stays_orthonormal(interpreter):
    """cond(U) = 1e4 (rows nearly parallel): Gram–Schmidt twice still gives orthonormal rows, the
    QR factor to within cond · ε (a forward error the operator path shares)."""
    u = torch.stack([_conditioned(4, 512, 1e4, seed) for seed in range(3)])
    exact = _qr_reference(u)
    for cfg in ({}, {"BLOCK_D": 128}):
        q = orthonormal_kernel.orthonormal_rows(u, **cfg)
        assert _orth_error(q) < 1e-5, cfg
        assert (q.double() - exact).abs().max() < 1e4 * 6e-8, cfg
    assert (_cholesky_qr3(u).double() - exact).abs().max() < 1e4 * 6e-8  # the same bound holds there


def test_rank_deficient_u_gives_finite_rows(interpreter):
    """A zero row and a duplicated row (no unique basis): finite output, the independent rows still
    orthonormal; all-zero and all-equal U, and magnitudes whose squares under/overflow fp32."""
    torch.manual_seed(1)
    u = torch.randn(2, 5, 96)
    u[0, 1] = 0.0
    u[1, 4] = u[1, 2]
    for cfg in ({}, {"BLOCK_D": 32}):
        q = orthonormal_kernel.orthonormal_rows(u, **cfg)
        assert torch.isfinite(q).all(), cfg
        assert torch.equal(q[0, 1], torch.zeros(96))  # a zero row stays zero
        keep = [0, 2, 3, 4]
        assert _orth_error(q[0:1, keep]) < 1e-5 and _orth_error(q[1:2, :4]) < 1e-5
        assert (q.norm(dim=-1) <= 1 + 1e-5).all()
    for degenerate in (torch.zeros(1, 4, 64), torch.ones(1, 4, 64), 1e-30 * torch.randn(1, 4, 64),
                       1e30 * torch.randn(1, 4, 64)):
        q = orthonormal_kernel.orthonormal_rows(degenerate)
        assert torch.isfinite(q).all()
    q = orthonormal_kernel.orthonormal_rows(1e-30 * u[1:2, :4])  # tiny but full rank: still the QR factor
    assert _orth_error(q) < 1e-5 and _rel(q, _qr_reference(u[1:2, :4])) < 1e-5


def test_backward_is_the_qr_gradient(interpreter, monkeypatch):
    """The kernel's ∂L/∂U equals `_OrthonormalRows.backward` on the operator path and autograd
    through `torch.linalg.qr` in float64, at well-conditioned shapes and at cond(U) = 1e2, in one
    column chunk (the default here) and in several."""
    torch.manual_seed(2)
    cases = [torch.randn(*s) for s in ((3, 1, 64), (4, 6, 200), (2, 8, 1024), (2, 16, 40))]
    cases.append(torch.stack([_conditioned(6, 300, 1e2, seed) for seed in range(2)]))
    for u in cases:
        g = torch.randn_like(u)
        q = orthonormal_kernel.orthonormal_rows(u)
        got = orthonormal_kernel.orthonormal_rows_backward(u, q, g)
        assert got.shape == u.shape and got.dtype == torch.float32 and got.is_contiguous()
        u64 = u.double().requires_grad_()
        exact = torch.autograd.grad(torch.stack([orthonormal_rows(x) for x in u64]), u64, g.double())[0]
        with kernels.on_cpu_in_interpreter(False):  # the operator path's backward on the same U, Q, G
            uo = u.clone().requires_grad_()
            ops = torch.autograd.grad(_OrthonormalRows.apply(uo), uo, g)[0]
        assert _rel(got, exact) < 1e-5, u.shape
        assert _rel(got, ops) < 1e-5, u.shape
        if u.shape[-1] <= 300:  # column chunks that do not divide d (the 7B shapes take one or a few)
            assert _rel(orthonormal_kernel.orthonormal_rows_backward(u, q, g, BLOCK_D=32), exact) < 1e-5, u.shape
    # a gradient that is not contiguous (an expanded one, as sum's backward gives)
    u = torch.randn(2, 4, 50)
    q = orthonormal_kernel.orthonormal_rows(u)
    g = torch.randn(1, 4, 50).expand(2, 4, 50)
    assert _rel(orthonormal_kernel.orthonormal_rows_backward(u, q, g),
                orthonormal_kernel.orthonormal_rows_backward(u, q, g.contiguous())) == 0.0


def test_autograd_function_takes_the_kernels_and_matches_the_operator_path(interpreter, monkeypatch):
    """`orthonormal_rows_stacked` (what the banks call): one kernel call forward and one backward,
    and the same loss and U gradient as with the kernels off."""
    calls = {"fwd": 0, "bwd": 0}
    fwd, bwd = orthonormal_kernel.orthonormal_rows, orthonormal_kernel.orthonormal_rows_backward

    def count(name, fn):
        def wrapped(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(orthonormal_kernel, "orthonormal_rows", count("fwd", fwd))
    monkeypatch.setattr(orthonormal_kernel, "orthonormal_rows_backward", count("bwd", bwd))
    torch.manual_seed(3)
    init = torch.randn(5, 6, 256)
    target = torch.randn(5, 6, 256)

    def step():
        u = torch.nn.Parameter(init.clone())
        q = orthonormal_rows_stacked(u)
        loss = ((q - target) ** 2).sum() + (q[:, :2] @ target[:, 2:].mT).pow(2).sum()
        loss.backward()
        return q.detach(), loss.detach(), u.grad

    q_k, loss_k, grad_k = step()
    assert calls == {"fwd": 1, "bwd": 1}
    with kernels.on_cpu_in_interpreter(False):  # the operator path
        q_o, loss_o, grad_o = step()
    assert calls == {"fwd": 1, "bwd": 1}
    assert _rel(q_k, q_o) < 1e-5
    torch.testing.assert_close(loss_k, loss_o, atol=0, rtol=1e-5)
    assert grad_k.is_contiguous() and _rel(grad_k, grad_o) < 1e-5
    # float64 (gradcheck) and ranks above MAX_RANK stay on the operator path
    for u in (torch.randn(2, 4, 20, dtype=torch.float64), torch.randn(1, orthonormal_kernel.MAX_RANK + 1, 40)):
        orthonormal_rows_stacked(u.requires_grad_()).sum().backward()
    assert calls == {"fwd": 1, "bwd": 1}


def test_usable_only_for_fp32_banks_it_supports(interpreter):
    with kernels.on_cpu_in_interpreter(False):
        assert not orthonormal_kernel.usable(torch.randn(2, 4, 64))  # CPU tensor, no interpreter
    assert orthonormal_kernel.usable(torch.randn(2, 4, 64))
    assert orthonormal_kernel.usable(torch.randn(1, 16, 16))
    for bad in (torch.randn(2, 4, 64, dtype=torch.float64), torch.randn(2, 4, 64).bfloat16(), torch.randn(4, 64),
                torch.randn(2, 17, 64), torch.randn(2, 8, 4), torch.randn(2, 0, 8)):
        assert not orthonormal_kernel.usable(bad), bad.shape


def _report(u: torch.Tensor, g: torch.Tensor) -> dict[str, float]:
    """Accuracy of the kernels against the operator path and float64 QR, one bank."""
    q = orthonormal_kernel.orthonormal_rows(u)
    q_ops = _cholesky_qr3(u)
    got = orthonormal_kernel.orthonormal_rows_backward(u, q, g)
    u64 = u.double().cpu().requires_grad_()  # references in float64 on the CPU
    exact = torch.stack([orthonormal_rows(x) for x in u64])
    exact_g = torch.autograd.grad(exact, u64, g.double().cpu())[0]
    exact, exact_g = exact.detach().to(u.device), exact_g.to(u.device)
    # the operator path's backward (the closed form of `_OrthonormalRows.backward`) on the same U, Q, G
    lower = u @ q_ops.mT
    c = g @ q_ops.mT
    c = c.tril() + c.tril(-1).mT
    ops_g = torch.linalg.solve_triangular(lower.mT, torch.baddbmm(g, c, q_ops, alpha=-1.0), upper=True)
    return {"orth_kernel": _orth_error(q), "orth_ops": _orth_error(q_ops),
            "fwd_kernel_vs_ops_max": float((q - q_ops).abs().max()), "fwd_kernel_vs_exact_rel": _rel(q, exact),
            "fwd_ops_vs_exact_rel": _rel(q_ops, exact), "bwd_kernel_vs_ops_rel": _rel(got, ops_g),
            "bwd_kernel_vs_exact_rel": _rel(got, exact_g), "bwd_ops_vs_exact_rel": _rel(ops_g, exact_g)}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_kernels_on_the_gpu_at_the_7b_bank_shapes(monkeypatch):
    """Compiled for real, LLaVA-7B's banks (trained-like U: orthonormal plus drift, and plain
    Gaussian): orthonormal like Cholesky-QR3, the same factor, the same gradient."""
    orthonormal_kernel._triton.cache_clear()
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    report = {}
    for name, (n, r, d) in BANKS_7B.items():
        base = torch.linalg.qr(torch.randn(n, d, r, generator=g))[0].mT
        for kind, u in (("drifted", base + 0.05 * torch.randn(n, r, d, generator=g)),
                        ("gaussian", torch.randn(n, r, d, generator=g))):
            u = u.contiguous().to(dev)
            grad = torch.randn(n, r, d, generator=g).to(dev)
            assert orthonormal_kernel.usable(u)
            rep = _report(u, grad)
            report[f"{name} {kind}"] = {k: f"{v:.2e}" for k, v in rep.items()}
            assert rep["orth_kernel"] < 2e-6 and rep["fwd_kernel_vs_exact_rel"] < 2e-6, (name, kind, rep)
            assert rep["fwd_kernel_vs_ops_max"] < 2e-6, (name, kind, rep)
            assert rep["bwd_kernel_vs_ops_rel"] < 1e-5 and rep["bwd_kernel_vs_exact_rel"] < 1e-5, (name, kind, rep)
    bad = torch.stack([_conditioned(6, 1024, 1e4, seed) for seed in range(4)]).to(dev)
    report["cond 1e4"] = {"orth_kernel": f"{_orth_error(orthonormal_kernel.orthonormal_rows(bad)):.2e}",
                          "orth_ops": f"{_orth_error(_cholesky_qr3(bad)):.2e}"}
    assert _orth_error(orthonormal_kernel.orthonormal_rows(bad)) < 1e-5
    # the chunked kernel (rows not kept in registers)
    u = torch.randn(3, 16, 4096, generator=g).to(dev)
    q = orthonormal_kernel.orthonormal_rows(u)
    rel = _rel(q.cpu(), _qr_reference(u.cpu()))
    report["chunked 3x16x4096"] = {"orth_kernel": f"{_orth_error(q):.2e}", "vs_exact_rel": f"{rel:.2e}"}
    assert _orth_error(q) < 2e-6 and rel < 2e-6
    print(report)  # shown with -s or on failure
