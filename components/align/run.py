"""`mrt align`: the frozen base every method starts from, by `align.backbone` and `align.recipe`.

- ``llava``: a LlavaForConditionalGeneration checkpoint, checked and linked (`align.copy_base: false`,
  the default: `base_link.json` names its folder) or loaded in `align.dtype` and copied;
- ``tiny`` + ``staged`` (the default): the shipped staged base, verified and copied, or rebuilt;
- ``tiny`` + ``joint`` and ``composed``: trained here by the joint recipe.
"""

from __future__ import annotations

import time

from components.align.joint import run_align
from components.align.staged import align_staged
from components.core.config import AlignParams
from components.core.files import write_json
from components.model.backbone import DTYPES, check_llava_folder, load_base, resolve_base_dir, save_base, write_base_link


def align(p: AlignParams) -> dict:
    """Build the frozen base into p.out_dir and write p.report. See the module docstring."""
    t0 = time.time()
    if p.backbone == "llava":
        source_dir = resolve_base_dir(p.model)
        if p.copy_base:
            model, processor = load_base(p.model, dtype=p.dtype)
            dtype = str(model.dtype).removeprefix("torch.")
            meta = {"backbone": "llava", "source": p.model, "source_dir": str(source_dir), "dtype": dtype}
            save_base(model, processor, p.out_dir, meta=meta)
        else:  # a link: the checkpoint is checked, not loaded or copied
            config = check_llava_folder(source_dir)
            dtype = DTYPES.get(p.dtype) or str(config.get("dtype") or config.get("torch_dtype") or "float32")
            meta = {"backbone": "llava", "source": p.model, "source_dir": str(source_dir), "dtype": dtype}
            write_base_link(p.out_dir, p.model, source_dir, dtype, meta)
        report = {"backbone": "llava", "source": p.model, "source_dir": str(source_dir), "dtype": dtype,
                  "copied": p.copy_base, "trained": False, "wall_s": round(time.time() - t0, 2)}
        write_json(p.report, report)
        return report
    if p.backbone == "tiny" and p.recipe == "staged":
        return align_staged(p)
    return run_align(p)

