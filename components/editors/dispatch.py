"""`attach(model, params)`: hook the editors of `params` onto a stock LLaVA, in the implementation
`params.impl` names.

- "reference" (hooks.py): the method as written — one `LoReFT.forward` per site.
- "fast" (fast/): the same function with editor banks, fused Triton kernels on CUDA and optional
  CUDA graphs (docs/performance.md). On CPU it runs its operator path, which is what every CPU
  training so far ran: its results are those runs' results bit for bit, where the reference path
  agrees only to rounding (its QR and its autograd sum in another order).
- "auto": "fast". Saved editors (io.py) do not depend on the choice.
"""

from __future__ import annotations

from torch import nn

from components.core.config import EditorParams

from .fast.sites import MRTEditors
from .hooks import Editors


def implementation(params: EditorParams) -> type[Editors]:
    """The Editors class that `params.impl` selects."""
    return Editors if params.impl == "reference" else MRTEditors


def attach(model: nn.Module, params: EditorParams, *, freeze_base: bool = True) -> Editors:
    """Build the editors of `params` for `model` and hook them in (hooks.Editors.hook_onto says
    what `freeze_base` does and what it raises); returns them, to train, save or `detach()`."""
    return implementation(params).hook_onto(model, params, freeze_base=freeze_base)
