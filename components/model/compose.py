"""LLaVA stage one's starting point: a pretrained vision encoder + a pretrained causal LM + a fresh projector.

Sources (params `align.vision_model`, `align.language_model`, `align.language_model_gguf`,
`align.language_model_cache`):
- vision: a CLIPVisionModel folder/id, or a LLaVA folder whose vision tower is taken (e.g. the
  embedded tiny base in models/base: a real transformers CLIP tower already trained on these images —
  no CLIP/ViT weights install offline, so the tests build one);
- language model: a folder/id, `pkg:<module>` for a model shipped inside an installed package, and
  optionally a GGUF file in it, converted once into a standard folder (components/model/gguf_cache.py).

The LM's tokenizer gets one special `<image>` token; the embeddings grow by one row. That row's input
side never matters (LLaVA replaces image-token embeddings by projected features) and, with tied
embeddings, its output logit starts at the mean embedding so it is not preferred in generation.
ChatML LMs (SmolLM2) get the ChatML template with an image slot, others vicuna_v1.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from components.model.tokenizer import CHATML_TEMPLATE, IMAGE_TOKEN, VICUNA_TEMPLATE, ensure_image_token

# How a LLaVA checkpoint names its tower's tensors: transformers 5 saves "vision_tower.<...>",
# 4.x-era llava-hf checkpoints "vision_tower.vision_model.<...>", a loaded model "model.vision_tower.<...>".
LLAVA_VISION_PREFIXES = ("model.vision_tower.", "vision_tower.")


def image_processor(image_size: int):
    # CLIPImageProcessorPil, not CLIPImageProcessor: the latter needs torchvision, broken beside torch 2.13.
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )


def llava_processor(image_processor, tokenizer, patch_size: int, chat_template: str):
    from transformers import LlavaProcessor

    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped again by the "default" strategy
        chat_template=chat_template,
    )


def set_generation_ids(model, tokenizer) -> None:
    gc = model.generation_config
    gc.bos_token_id = tokenizer.bos_token_id
    gc.eos_token_id = tokenizer.eos_token_id
    gc.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    gc.do_sample = False



def _tower_key(key: str, wanted: set[str]) -> str | None:
    """The CLIPVisionModel state-dict name of a LLaVA checkpoint tensor, or None if it is not the tower's."""
    for prefix in LLAVA_VISION_PREFIXES:
        if key.startswith(prefix):
            rest = key[len(prefix) :]
            for name in (rest, rest.removeprefix("vision_model."), "vision_model." + rest):
                if name in wanted:
                    return name
            return None
    return None


def _read_config(folder: Path) -> dict | None:
    cfg = folder / "config.json"
    if not cfg.is_file():
        return None
    try:
        return json.loads(cfg.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ValueError(f"{cfg}: not valid JSON ({exc})") from None


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        return [folder / s for s in shards]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"{folder}: no model.safetensors (or index) to take the vision tower from")


def load_vision_encoder(ref: str):
    """A CLIPVisionModel from a CLIP vision folder/id, or the vision tower of a saved LLaVA folder.

    From a LLaVA folder only the `model.vision_tower.*` tensors are read, so a 7B checkpoint's LM is
    never loaded just to get its tower.
    """
    from safetensors import safe_open
    from transformers import CLIPVisionConfig, CLIPVisionModel

    folder = Path(ref)
    cfg = _read_config(folder) if folder.is_dir() else None
    if cfg is None or cfg.get("model_type") != "llava":
        return CLIPVisionModel.from_pretrained(ref)
    vcfg = dict(cfg.get("vision_config") or {})
    if vcfg.get("model_type") != "clip_vision_model":
        raise ValueError(
            f"{folder / 'config.json'}: field 'vision_config.model_type' is {vcfg.get('model_type')!r}; "
            "only a CLIP vision tower can be taken from a LLaVA folder"
        )
    vision = CLIPVisionModel(CLIPVisionConfig.from_dict(vcfg))
    wanted = set(vision.state_dict())
    tensors = {}
    for f in _safetensors_files(folder):
        with safe_open(str(f), framework="pt") as sf:
            for key in sf.keys():
                name = _tower_key(key, wanted)
                if name is not None:
                    tensors[name] = sf.get_tensor(key)
    missing, unexpected = vision.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(
            f"{folder}: the LLaVA folder's vision tower does not fit its vision_config "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return vision


def load_language_model(ref: str, gguf_file: str | None = None, cache_dir: str | None = None):
    """(causal LM, tokenizer with <image>, folder it was loaded from). A GGUF file is converted once into
    `cache_dir` and loaded from there (see gguf_cache); without a cache_dir it is dequantised each time."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from components.model.gguf_cache import convert_gguf, resolve_model_ref

    src = resolve_model_ref(ref)
    kw: dict[str, Any] = {}
    if gguf_file and cache_dir:
        src = str(convert_gguf(src, gguf_file, cache_dir))
    elif gguf_file:
        kw["gguf_file"] = gguf_file
    tokenizer = AutoTokenizer.from_pretrained(src, image_token=IMAGE_TOKEN, **kw)
    ensure_image_token(tokenizer)
    lm = AutoModelForCausalLM.from_pretrained(src, **kw)
    return lm, tokenizer, src


def chat_template_for(tokenizer) -> str:
    return CHATML_TEMPLATE if "<|im_start|>" in (tokenizer.chat_template or "") else VICUNA_TEMPLATE


def compose_llava(
    vision_model: str,
    language_model: str,
    gguf_file: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    seed: int = 0,
):
    """(LlavaForConditionalGeneration, LlavaProcessor): the pretrained tower and LM copied in, the
    projector freshly initialised from `seed`."""
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    vision = load_vision_encoder(vision_model)
    lm, tokenizer, _ = load_language_model(language_model, gguf_file, str(cache_dir) if cache_dir else None)
    vcfg = vision.config
    text_cfg = lm.config
    if getattr(text_cfg, "quantization_config", None) is not None:  # loaded straight from GGUF (no cache)
        text_cfg = type(text_cfg).from_dict({k: v for k, v in text_cfg.to_dict().items() if k != "quantization_config"})
    image_size, patch = vcfg.image_size, vcfg.patch_size
    config = LlavaConfig(
        vision_config=vcfg,
        text_config=text_cfg,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=(image_size // patch) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        tie_word_embeddings=bool(getattr(text_cfg, "tie_word_embeddings", False)),
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(vision.state_dict())
    model.model.language_model.load_state_dict(lm.model.state_dict())
    model.lm_head.load_state_dict(lm.lm_head.state_dict())
    if config.tie_word_embeddings:
        model.tie_weights()
    if len(tokenizer) > model.config.text_config.vocab_size:
        model.resize_token_embeddings(len(tokenizer))
    template = chat_template_for(tokenizer)
    tokenizer.chat_template = template
    processor = llava_processor(image_processor(image_size), tokenizer, patch, template)
    set_generation_ids(model, tokenizer)
    return model, processor
