"""A small folder in exactly the layout of the published llava-hf/llava-1.5-7b-hf checkpoint.

Same classes (LlavaForConditionalGeneration: CLIP vision tower + Llama LM + 2-layer GELU projector,
vision_feature_layer -2, "default" feature strategy), the same processor files (processor_config.json
holding LlavaProcessor's settings, preprocessor_config.json holding the CLIP image processor's),
llava-hf's chat_template.json, a Llama-style (SentencePiece "▁" word marks) tokenizer with <image>
and <pad> added after the base vocabulary, fp16 weights in several safetensors shards with an
index — only the widths are tiny. CLIPImageProcessorPil stands in for CLIPImageProcessor (which
needs torchvision); the file says "CLIPImageProcessor" as the published one does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

# llava-hf/llava-1.5-7b-hf's chat_template.json (the "chat_template" value), verbatim.
LLAVA_HF_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != "
    "'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

_ALPHABET = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,:;?!'\"()[]-_/\n")


def llama_style_tokenizer(corpus: Iterable[str], vocab_size: int = 400):
    """A BPE with SentencePiece's word marks ("▁"), <unk>/<s>/</s> = 0/1/2, BOS added, then <image> and
    <pad> appended after the vocabulary (llava-hf: ids 32000 and 32001)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    bpe.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    texts = ["USER: ASSISTANT:"] * 20 + list(corpus)
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                                       initial_alphabet=_ALPHABET, show_progress=False))
    tok = LlamaTokenizer(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                         add_bos_token=True, add_eos_token=False)
    tok.add_tokens(["<image>"], special_tokens=True)
    tok.add_special_tokens({"pad_token": "<pad>"})
    tok.image_token = "<image>"  # as LlavaProcessor expects of the tokenizer
    return tok


def llava_hf_processor(tokenizer, image_size: int = 336, patch_size: int = 14):
    from transformers import LlavaProcessor

    try:
        from transformers import CLIPImageProcessorPil as ImageProcessor
    except ImportError:  # older transformers 5.x: the PIL processor is CLIPImageProcessor itself
        from transformers import CLIPImageProcessor as ImageProcessor
    image_processor = ImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=LLAVA_HF_CHAT_TEMPLATE)


def llava_hf_config(tokenizer, image_size: int = 56, patch_size: int = 14, vision_layers: int = 3,
                    lm_layers: int = 2, vision_hidden: int = 32, lm_hidden: int = 64, max_positions: int = 256):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=vision_hidden * 4,
                              num_hidden_layers=vision_layers, num_attention_heads=2, image_size=image_size,
                              patch_size=patch_size, projection_dim=vision_hidden, hidden_act="quick_gelu")
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=lm_hidden, intermediate_size=lm_hidden * 2,
                       num_hidden_layers=lm_layers, num_attention_heads=2, num_key_value_heads=2,
                       max_position_embeddings=max_positions, bos_token_id=1, eos_token_id=2,
                       pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                       image_seq_length=(image_size // patch_size) ** 2, projector_hidden_act="gelu",
                       vision_feature_select_strategy="default", vision_feature_layer=-2, pad_token_id=tokenizer.pad_token_id,
                       tie_word_embeddings=False)


def write_llava_hf_folder(out: Path, corpus: Iterable[str], image_size: int = 56, seed: int = 0,
                          shard_size: str = "100KB", **config_kw) -> Path:
    """Write the folder; returns it. Weights: random, fp16, sharded (several model-0000k-of-0000n files)."""
    import torch
    from transformers import LlavaForConditionalGeneration

    out = Path(out)
    tok = llama_style_tokenizer(corpus)
    processor = llava_hf_processor(tok, image_size=image_size, patch_size=config_kw.get("patch_size", 14))
    config = llava_hf_config(tok, image_size=image_size, **config_kw)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).to(torch.float16)
    gc = model.generation_config
    gc.bos_token_id, gc.eos_token_id, gc.pad_token_id = 1, 2, tok.pad_token_id
    model.save_pretrained(out, max_shard_size=shard_size)
    processor.save_pretrained(out)
    # The published split: LlavaProcessor's settings in processor_config.json, the image processor's in
    # preprocessor_config.json, the template in chat_template.json.
    proc = json.loads((out / "processor_config.json").read_text())
    image_proc = proc.pop("image_processor", None)
    proc.pop("chat_template", None)
    proc["processor_class"] = "LlavaProcessor"
    (out / "processor_config.json").write_text(json.dumps(proc, indent=2))
    if image_proc is not None:
        image_proc.update({"image_processor_type": "CLIPImageProcessor", "processor_class": "LlavaProcessor"})
        (out / "preprocessor_config.json").write_text(json.dumps(image_proc, indent=2))
    for f in ("chat_template.jinja",):
        (out / f).unlink(missing_ok=True)
    (out / "chat_template.json").write_text(json.dumps({"chat_template": LLAVA_HF_CHAT_TEMPLATE}, indent=2))
    return out
