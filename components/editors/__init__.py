"""MRT representation editors: the LoReFT module, their placement on a stock LLaVA (hooks), the
prefix/suffix positions, parameter counts, and save/load.

The names below are imported lazily (PEP 562) so that `import components.editors` stays free of
torch/transformers imports and side effects; `from components.editors import attach` works.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "LoReFT": "loreft",
    "edit_positions": "positions",
    "MRTEditors": "sites",
    "attach": "sites",
    "llava_modules": "sites",
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
