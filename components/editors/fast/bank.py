"""Editor banks: the parameters of all same-shape editors in one tensor each.

Why: a LLaVA-7B placement has 87 editors (261 parameter tensors). On a GPU the cost of MRT is not
arithmetic but host work per tensor: stacking the 87 bases into batched tensors every pass (and
unstacking their gradients), 261 `AccumulateGrad` nodes, and clipping plus AdamW looping over 261
tensors at the end of every step, while the GPU waits (docs/performance.md). A bank
holds `U` [n, r, d], `W` [n, r, d] and `b` [n, r] for n editors of one shape and device as three
Parameters, so a step has nine trainable tensors in all and a pass orthonormalises a bank in place
of a stack.

The editors stay what users and files see: `editor.U`, `editor.W.weight`, `editor.W.bias` are
views into their bank's rows (registered as persistent buffers, so `state_dict()` keys, saved
files and `load_state_dict` are exactly those of unbanked editors; loading copies into the bank),
and an editor used on its own still gets gradients, through `BankedLoReFT.trainable_tensors()`. A bank saves and
loads nothing itself. After anything that moves or converts tensors (`.to()`, `.half()`) the owner
re-binds the views (`MRTEditors._apply`), since conversion copies buffers on their own.
"""

from __future__ import annotations

import torch
from torch import nn

from .editor import BankedLoReFT


class EditorBank(nn.Module):
    """Parameters `U`, `W` [n, r, d] and `b` [n, r] of `members` (same d, r, device and dtype), in
    member order; each member's U/W.weight/W.bias become views of its row."""

    def __init__(self, members: list[BankedLoReFT], device: torch.device | None = None):
        super().__init__()
        if not members:
            raise ValueError("an editor bank needs at least one editor")
        shapes = {(e.d, e.r) for e in members}
        if len(shapes) != 1:
            raise ValueError(f"an editor bank holds editors of one shape, got {sorted(shapes)}")
        first = members[0]
        device = torch.device(device) if device is not None else first.U.device
        with torch.no_grad():
            stack = lambda ts: torch.stack([t.detach().to(device) for t in ts])  # noqa: E731
            self.U = nn.Parameter(stack([e.U for e in members]))
            self.W = nn.Parameter(stack([e.W.weight for e in members]))
            self.b = nn.Parameter(stack([e.W.bias for e in members]))
        object.__setattr__(self, "members", list(members))  # not submodules: the owner already holds them
        self.rebind()

    @property
    def d(self) -> int:
        return self.U.shape[-1]

    @property
    def r(self) -> int:
        return self.U.shape[-2]

    def rebind(self) -> None:
        """(Re)make every member's tensors views of this bank's rows."""
        for i, editor in enumerate(self.members):
            editor.bind(self, i)

    def release(self) -> None:
        """Give every member its own Parameters again (copies of its rows) and unbind it."""
        for editor in self.members:
            editor.unbind()

    def extra_repr(self) -> str:
        return f"n={len(self.members)}, r={self.r}, d={self.d}"

    # The members' views carry the values under their own keys: a bank adds no keys and reads none.
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        return

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        return
