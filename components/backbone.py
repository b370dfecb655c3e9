"""The frozen base: one entry, `load_backbone`, for every kind of LLaVA-style model, and `align`.

Three kinds (params `align.backbone`):
- ``llava``    a LlavaForConditionalGeneration checkpoint (HF id or folder), used as is;
- ``composed`` a CLIP vision encoder + a causal LM (folder/id, or a GGUF file in a folder) + a fresh
               projector — LLaVA stage one; only the projector trains in `align` (LM frozen);
- ``tiny``     the embedded default, built from `align.tiny` and trained from scratch in `align` on the
               data's captions and text-only instructions, so that — like Vicuna in the paper — its LM
               already answers every question type from a textual description and MRT only has to
               connect it to images.

Every kind ends as a standard LLaVA folder (model + processor + chat template) that
`load_base(path)` reloads with `from_pretrained`; training and inference only ever see that folder.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Iterable

from components.config import AlignParams, TinyModelParams
from components.tokenizer import VICUNA_TEMPLATE, train_bpe_tokenizer

# Position budget of the tiny LM beyond the image tokens and max_length (generation headroom).
_POSITION_HEADROOM = 64


# ---------------------------------------------------------------------------------------------
# processors
# ---------------------------------------------------------------------------------------------
def _image_processor(image_size: int):
    # CLIPImageProcessorPil, not CLIPImageProcessor: the latter needs torchvision, broken beside torch 2.13.
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )


def _llava_processor(image_processor, tokenizer, patch_size: int, chat_template: str):
    from transformers import LlavaProcessor

    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped again by the "default" strategy
        chat_template=chat_template,
    )


def tiny_corpus(rows: Iterable[Any]) -> list[str]:
    """Texts the tiny tokenizer learns from: every instruction and answer plus the template's words."""
    texts = ["USER: ASSISTANT:"] * 50
    for r in rows:
        texts.append(r.instruction)
        texts.append(r.answer)
    return texts


def build_tiny_processor(corpus: Iterable[str], image_size: int, tiny: TinyModelParams):
    if image_size % tiny.patch_size:
        raise ValueError(f"align.tiny.patch_size={tiny.patch_size} must divide the data's image size {image_size}")
    tokenizer = train_bpe_tokenizer(corpus, tiny.vocab_size)
    return _llava_processor(_image_processor(image_size), tokenizer, tiny.patch_size, VICUNA_TEMPLATE)


def build_tiny_model(processor, tiny: TinyModelParams, image_size: int, max_length: int, seed: int = 0):
    """A randomly initialised tiny LLaVA (CLIP-style vision tower + Llama LM) sized by `tiny`."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    tok = processor.tokenizer
    n_image = (image_size // tiny.patch_size) ** 2
    vision = CLIPVisionConfig(
        hidden_size=tiny.vision_hidden,
        intermediate_size=tiny.vision_hidden * 4,
        num_hidden_layers=tiny.vision_layers,
        num_attention_heads=tiny.vision_heads,
        image_size=image_size,
        patch_size=tiny.patch_size,
        projection_dim=tiny.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=tiny.lm_hidden,
        intermediate_size=tiny.lm_intermediate,
        num_hidden_layers=tiny.lm_layers,
        num_attention_heads=tiny.lm_heads,
        num_key_value_heads=tiny.lm_heads,
        max_position_embeddings=n_image + max_length + _POSITION_HEADROOM,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=processor.image_token_id,
        image_seq_length=n_image,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    _set_generation_ids(model, tok)
    return model


def _set_generation_ids(model, tokenizer) -> None:
    gc = model.generation_config
    gc.bos_token_id = tokenizer.bos_token_id
    gc.eos_token_id = tokenizer.eos_token_id
    gc.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    gc.do_sample = False


# ---------------------------------------------------------------------------------------------
# composed and llava
# ---------------------------------------------------------------------------------------------
def compose(
    vision_model: str,
    language_model: str,
    gguf_file: str | None = None,
    seed: int = 0,
    cache_dir: str | None = None,
):
    """LLaVA stage one's starting point: pretrained CLIP vision + pretrained causal LM + fresh projector.
    The work is in components/compose.py (vision tower from a LLaVA folder, GGUF conversion cache)."""
    from components.compose import compose_llava

    return compose_llava(vision_model, language_model, gguf_file, cache_dir=cache_dir, seed=seed)


def load_base(path: str | os.PathLike, dtype: Any = None):
    """(model, processor) from a LLaVA folder or HF id, as `align` wrote it or as published."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path = str(path)
    if os.path.sep in path or path.startswith("."):
        if not Path(path).is_dir():
            raise FileNotFoundError(f"{path}: base model folder not found (run `mrt align` first)")
        if not (Path(path) / "config.json").is_file():
            raise FileNotFoundError(f"{path}: no config.json — not a saved model folder")
    kw = {"dtype": dtype} if dtype is not None else {}
    model = LlavaForConditionalGeneration.from_pretrained(path, **kw)
    processor = AutoProcessor.from_pretrained(path)
    tok = processor.tokenizer
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, processor


def load_backbone(p: AlignParams, rows: Iterable[Any] | None = None, image_size: int | None = None):
    """(model, processor) for `p.backbone`. The tiny kind needs the data's rows (tokenizer corpus) and
    image size; the others ignore them."""
    if p.backbone == "llava":
        return load_base(p.model)
    if p.backbone == "composed":
        return compose(p.vision_model, p.language_model, p.language_model_gguf, seed=p.seed,
                       cache_dir=p.language_model_cache)
    if rows is None or image_size is None:
        raise ValueError("the tiny backbone is built from the data: pass its rows and image size")
    processor = build_tiny_processor(tiny_corpus(rows), image_size, p.tiny)
    model = build_tiny_model(processor, p.tiny, image_size, p.max_length, seed=p.seed)
    return model, processor


def save_base(model, processor, out_dir: str | os.PathLike, meta: dict | None = None) -> Path:
    """A standard LLaVA folder (safetensors + config + processor + chat template) plus base_meta.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    if meta is not None:
        (out / "base_meta.json").write_text(json.dumps(meta, indent=2, default=str), encoding="utf-8")
    from components.report import make_readable

    return make_readable(out)


# ---------------------------------------------------------------------------------------------
# align (stage one)
# ---------------------------------------------------------------------------------------------
def align(p: AlignParams) -> dict:
    """Build the frozen base into p.out_dir and write p.report. See the module docstring."""
    from components.training import run_align

    t0 = time.time()
    if p.backbone == "llava":
        model, processor = load_base(p.model)
        save_base(model, processor, p.out_dir, meta={"backbone": "llava", "source": p.model})
        report = {"backbone": "llava", "source": p.model, "trained": False, "wall_s": round(time.time() - t0, 2)}
        _write_json(p.report, report)
        return report
    if p.backbone == "tiny" and p.recipe == "staged":
        from components.staged_base import align_staged

        return align_staged(p)
    return run_align(p)


def _write_json(path: str | os.PathLike, obj: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=str) + "\n", encoding="utf-8")
