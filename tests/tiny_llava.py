"""Hand-made rows, images and a very small LLaVA for the backbone/training/inference tests.

Shapes are far below the embedded default (16 px images → 4 image tokens, 2-layer towers) so every
test builds its model in well under a second.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from components.core.config import TinyModelParams
from components.data.records import Row

COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}
TINY = TinyModelParams(
    patch_size=8, vision_hidden=16, vision_layers=2, vision_heads=2,
    lm_hidden=32, lm_layers=2, lm_heads=2, lm_intermediate=64, vocab_size=300,
)
IMAGE_SIZE = 16


def write_images(root: Path, size: int = IMAGE_SIZE) -> dict[str, str]:
    root.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, rgb in COLORS.items():
        rel = f"{name}.png"
        Image.new("RGB", (size, size), rgb).save(root / rel)
        paths[name] = rel
    return paths


def make_rows(image_root: Path, n: int = 24) -> list[Row]:
    """Colour questions on images (train), captions (align) and text-only questions (text)."""
    paths = write_images(image_root)
    names = list(COLORS)
    rows = []
    for i in range(n):
        c = names[i % len(names)]
        rows.append(Row(f"t{i}", "vf_color", "train", "What color is the image?", c, paths[c], "hand", i))
        rows.append(Row(f"a{i}", "caption", "align", "Describe the image.", f"a plain {c} picture", paths[c], "hand", i))
        rows.append(
            Row(f"x{i}", "text_color", "text", f"Image description: a plain {c} picture\nWhat color is it?", c, None, "hand", i)
        )
    return rows


def tiny_model(tmp_path: Path, seed: int = 0):
    """(model, processor, rows, image_root) for a freshly initialised tiny LLaVA."""
    from components.model.backbone import build_tiny_model, build_tiny_processor, tiny_corpus

    root = tmp_path / "images"
    rows = make_rows(root)
    processor = build_tiny_processor(tiny_corpus(rows), IMAGE_SIZE, TINY)
    model = build_tiny_model(processor, TINY, IMAGE_SIZE, max_length=64, seed=seed)
    return model, processor, rows, root


def write_clip_and_llama(tmp_path: Path):
    """A tiny CLIP vision folder and a tiny Llama folder whose tokenizer lacks <image> and a pad token."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    clip_dir, lm_dir = tmp_path / "clip", tmp_path / "lm"
    CLIPVisionModel(
        CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         image_size=16, patch_size=8)
    ).save_pretrained(clip_dir)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(["hello world what color red blue"] * 10, trainers.BpeTrainer(
        vocab_size=280, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    lm_tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>")
    lm_tok.save_pretrained(lm_dir)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(lm_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512))
    lm.save_pretrained(lm_dir)
    return clip_dir, lm_dir, lm, lm_tok
