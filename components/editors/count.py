"""Parameter counts of an editor placement, and LLaVA-1.5-7B's shapes for `mrt params --count`.

Counting needs only a config: the editors' size follows from the resolved placement and the hidden
sizes, and the backbone's size comes from a model built on the meta device (no memory, no weights,
no download), so the paper's 7B numbers (2,417,034 editor parameters ≈ 0.034%) can be reproduced on
any laptop.
"""

from __future__ import annotations

from typing import Any

import torch

from components.core.config import EditorParams

from .loreft import LoReFT
from .placement import GROUPS, ModelDims, group_rank, resolve_placement


def count_parameters(model_config: Any, params: EditorParams) -> dict[str, int]:
    """Editor parameters per group (`visual`, `projector`, `prefix`, `suffix`) and `total`."""
    dims = ModelDims.from_config(model_config)
    layers = resolve_placement(model_config, params)
    counts = {
        group: len(layers[group]) * LoReFT.parameter_count(dims.group_dim(group), group_rank(params, group))
        for group in GROUPS
    }
    counts["total"] = sum(counts.values())
    return counts


def llava_7b_config():
    """LLaVA-1.5-7B's config, written out by hand (no hub access): CLIP ViT-L/14-336 + Llama-7B."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        intermediate_size=4096,
        image_size=336,
        patch_size=14,
        projection_dim=768,
        hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        intermediate_size=11008,
        vocab_size=32064,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        pad_token_id=32001,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_token_id=32000,
        image_seq_length=576,
        tie_word_embeddings=False,
    )


def paper_placement_7b() -> EditorParams:
    """The paper's placement on LLaVA-7B: visual layers 1-22 rank 6, projector rank 6,
    prefix/suffix on all 32 LM layers, rank 4, length 4."""
    return EditorParams.model_validate(
        {
            "visual": {"layers": "1-22", "rank": 6},
            "projector": {"enabled": True, "rank": 6},
            "prefix": {"layers": "all", "rank": 4, "length": 4},
            "suffix": {"layers": "all", "rank": 4, "length": 4},
            "dropout": 0.0,
        }
    )


def meta_model(config: Any):
    """A LlavaForConditionalGeneration built on the meta device: shapes only, no memory."""
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):
        return LlavaForConditionalGeneration(config)


def parameter_report(model_config: Any, params: EditorParams) -> dict[str, Any]:
    """Editor counts plus the backbone's size (from a meta-device model) and the editors' share
    of the whole (backbone + editors), in percent."""
    counts = count_parameters(model_config, params)
    model = meta_model(model_config)
    base = sum(p.numel() for p in model.parameters())
    return {
        "editors": counts,
        "base_parameters": base,
        "total_parameters": base + counts["total"],
        "editor_percent": 100.0 * counts["total"] / (base + counts["total"]),
    }


LLAVA_7B = "llava-1.5-7b"


def count_report(model: str, params: EditorParams) -> dict[str, Any]:
    """`mrt params --count`: for "llava-1.5-7b", the paper's placement on LLaVA-1.5-7B's shapes
    (meta device, `params` ignored); otherwise `model` is a base folder (its config.json is read,
    no weights) and `params` the placement to count."""
    if model == LLAVA_7B:
        config, placement, source = llava_7b_config(), paper_placement_7b(), "paper placement"
    else:
        from pathlib import Path

        from transformers import AutoConfig

        from components.model.backbone import follow_base_link

        folder = follow_base_link(Path(model)) if Path(model).is_dir() else Path(model)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder}: no config.json (expected '{LLAVA_7B}' or a base model folder)")
        config, placement, source = AutoConfig.from_pretrained(str(folder)), params, "params"
    report = parameter_report(config, placement)
    return {
        "model": model,
        "placement_source": source,
        "placement": placement.model_dump(mode="json", exclude={"impl"}),  # where, not which code
        "layers": resolve_placement(config, placement),
        **report,
    }
