"""The LoReFT representation editor (docs/method.md, "The editor ψ"):

    ψ(h) = h + Uᵀ(W h + b − U h),   U ∈ ℝ^{r×d} with orthonormal rows, W ∈ ℝ^{r×d}, b ∈ ℝʳ.

U spans an r-dimensional subspace of the hidden space; the edit replaces the projection of h onto
it (U h) by a learned affine function of h (W h + b) and leaves the orthogonal complement alone.
That holds only while U's rows are orthonormal, so the stored parameter is re-orthonormalised by a
sign-fixed QR on every call. Init as the reference code: U orthogonal, W `nn.Linear`'s default,
b zeros (close to, not equal to, the identity). Parameters are fp32; the edit is computed in fp32
and cast back to the hidden states' dtype once. Dropout acts on the delta only.

This is the reference implementation; fast/ computes the same function with fewer launches.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def orthonormal_rows(u: torch.Tensor) -> torch.Tensor:
    """Rows of `u` (r×d, r ≤ d) made orthonormal: QR of uᵀ with R's diagonal made positive, so the
    result is unique and equals `u` when `u` already has orthonormal rows."""
    q, r = torch.linalg.qr(u.t(), mode="reduced")  # q: d×r
    signs = torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(q.dtype)
    return (q * signs).t()


def compute_dtype(hidden: torch.dtype, param: torch.dtype) -> torch.dtype:
    """fp32 at least (bf16/fp16 hidden states are edited in fp32), fp64 when anything is fp64."""
    return torch.promote_types(torch.promote_types(hidden, param), torch.float32)


class LoReFT(nn.Module):
    """One editor ψ over hidden size `d` with rank `r`: `U` (r×d), `W` (`nn.Linear(d, r)`: weight
    r×d and bias b). 2·d·r + r parameters."""

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
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """U orthogonal, W `nn.Linear`'s default (uniform ±1/√d), b zeros."""
        with torch.no_grad():
            nn.init.orthogonal_(self.U)
            nn.init.kaiming_uniform_(self.W.weight, a=math.sqrt(5))
            self.W.bias.zero_()

    def extra_repr(self) -> str:
        return f"d={self.d}, r={self.r}, dropout={self.dropout.p}"

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """ψ(h) for h of shape (..., d), any float dtype; returns h's dtype and shape."""
        if h.shape[-1] != self.d:
            raise ValueError(f"LoReFT(d={self.d}) got hidden states of size {h.shape[-1]}")
        ct = compute_dtype(h.dtype, self.U.dtype)
        u, w, b = orthonormal_rows(self.U).to(ct), self.W.weight.to(ct), self.W.bias.to(ct)
        h32 = h.to(ct)
        delta = (nn.functional.linear(h32, w, b) - h32 @ u.t()) @ u  # rows as vectors: Uᵀ(W h + b − U h)
        return (h32 + self.dropout(delta)).to(h.dtype)

    @staticmethod
    def parameter_count(d: int, r: int) -> int:
        return 2 * d * r + r
