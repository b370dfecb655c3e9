"""The editor of the fast path: a `loreft.LoReFT` whose tensors live in a bank, with caches.

`BankedLoReFT` computes what `LoReFT` does; it adds what the fast hooks (sites.py) need:
- `bind`: its U, W.weight, W.bias become views of a row of an `EditorBank` (bank.py), so a step
  has a few trainable tensors instead of three per editor; state-dict keys stay `LoReFT`'s;
- a pass-scoped basis cache (`begin_pass` … `end_pass`, keyed on U's version counter): calls in
  one forward share one orthonormalisation and its autograd graph; with gradients off the basis,
  and (U, W − U, b), are kept across passes until a parameter changes (generation re-orthonormalises
  nothing). Outside a pass (a stand-alone editor, gradient-checkpoint recomputation) every call
  computes a fresh basis, which is always correct.
"""

from __future__ import annotations

import torch
from torch import nn

from ..loreft import LoReFT, orthonormal_rows
from .ops import _Edit, _edit_no_grad, _compute_dtype


class BankedLoReFT(LoReFT):
    """`LoReFT` with bank membership and basis caches (module docstring); same parameters, keys
    and function. Inside an `MRTEditors` its U, W.weight, W.bias are views of a bank row
    (gradients then reach the bank: `trainable_tensors`)."""

    def __init__(self, d: int, r: int, dropout: float = 0.0):
        super().__init__(d, r, dropout)  # the same initialisation (and random draws) as LoReFT
        self._bank: nn.Module | None = None  # the EditorBank holding this editor's row (bank.py)
        self._index = 0
        self._in_pass = False
        self._cache: tuple[int, torch.Tensor] | None = None
        self._inference_cache: tuple[tuple, torch.Tensor] | None = None  # no-grad bases, across passes
        self._inference_params: tuple[tuple, tuple] | None = None  # no-grad (U, W − U, b)

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

    def trainable_tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(U, W, b) as tensors gradients flow to: the Parameters, or the bank's rows."""
        bank = self._bank
        if bank is None:
            return self.U, self.W.weight, self.W.bias
        i = self._index
        return bank.U[i], bank.W[i], bank.b[i]

    def reset_parameters(self) -> None:
        super().reset_parameters()
        self.__dict__["_cache"] = None

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
        """(U orthonormal, W − U, b) for no-grad use, kept while U, W and b are unchanged."""
        w, b = self.W.weight, self.W.bias
        key = (self._inference_key(), w._version, w.data_ptr(), b._version, b.data_ptr(), w.dtype)
        if self._inference_params is None or self._inference_params[0] != key:
            with torch.no_grad():
                u = self.basis()
                self._inference_params = (key, (u, (w - u).to(u.dtype), b.to(u.dtype)))
        return self._inference_params[1]

    def site_params(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(U orthonormal, W − U, b) for `ops.edit_whole` / `ops.edit_rows_stacked_`, differentiable
        (the no-grad copy, cached across passes, without gradients)."""
        if not torch.is_grad_enabled():
            return self.inference_params()
        u = self.basis()
        _, w, b = self.trainable_tensors()
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
            return orthonormal_rows(self.trainable_tensors()[0])
        version = self.U._version
        if self._cache is None or self._cache[0] != version:
            self._cache = (version, orthonormal_rows(self.trainable_tensors()[0]))
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
        _, w, b = self.trainable_tensors()
        if dropping:
            h32 = h.to(_compute_dtype(h.dtype, u.dtype))
            delta = (nn.functional.linear(h32, w, b) - h32 @ u.t()) @ u  # (..., d): Uᵀ(W h + b − U h), rows as vectors
            return (h32 + self.dropout(delta)).to(h.dtype)
        return _Edit.apply(h, u, w - u, b)
