"""`mrt align`: the frozen base every method starts from, by `align.backbone` and `align.recipe`.

- ``llava``: a LlavaForConditionalGeneration checkpoint, loaded as is (in `align.dtype`) and saved;
- ``tiny`` + ``staged`` (the default): the shipped staged base, verified and copied, or rebuilt;
- ``tiny`` + ``joint`` and ``composed``: trained here by the joint recipe.
"""

from __future__ import annotations

import time

from components.align.joint import run_align
from components.align.staged import align_staged
from components.core.config import AlignParams
from components.core.files import write_json
from components.model.backbone import load_base, resolve_base_dir, save_base


def align(p: AlignParams) -> dict:
    """Build the frozen base into p.out_dir and write p.report. See the module docstring."""
    t0 = time.time()
    if p.backbone == "llava":
        model, processor = load_base(p.model, dtype=p.dtype)
        source_dir = str(resolve_base_dir(p.model))
        dtype = str(model.dtype).removeprefix("torch.")
        meta = {"backbone": "llava", "source": p.model, "source_dir": source_dir, "dtype": dtype}
        save_base(model, processor, p.out_dir, meta=meta)
        report = {"backbone": "llava", "source": p.model, "source_dir": source_dir, "dtype": dtype,
                  "trained": False, "wall_s": round(time.time() - t0, 2)}
        write_json(p.report, report)
        return report
    if p.backbone == "tiny" and p.recipe == "staged":
        return align_staged(p)
    return run_align(p)

