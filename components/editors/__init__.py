"""MRT representation editors: the LoReFT module (loreft.py), their placement (placement.py) and
prefix/suffix positions (positions.py) on a stock LLaVA, the hooks that apply them (hooks.py),
parameter counts (count.py) and save/load (io.py). fast/ computes the same with banks, fused
kernels and CUDA graphs; `attach` picks one by `EditorParams.impl` (dispatch.py).

The names below are imported lazily (PEP 562) so that `import components.editors` stays free of
torch/transformers imports and side effects; `from components.editors import attach` works.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "LoReFT": "loreft",
    "edit_positions": "positions",
    "Editors": "hooks",
    "attach": "dispatch",
    "llava_modules": "hooks",
    "PlacementError": "placement",
    "resolve_layers": "placement",
    "resolve_placement": "placement",
    "count_parameters": "count",
    "count_report": "count",
    "llava_7b_config": "count",
    "meta_model": "count",
    "paper_placement_7b": "count",
    "parameter_report": "count",
    "EditorFileError": "io",
    "load_editors": "io",
    "model_fingerprint": "io",
    "save_editors": "io",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
