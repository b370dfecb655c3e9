"""The tiny LLaVA the tests build, and the hand-made rows and images it learns its tokenizer from.

One builder, `build_tiny_llava`: the model `align.backbone: tiny` makes (components/model/backbone.py)
at the sizes of `TINY` — far below the embedded default (2-layer towers, 16 px images → 4 image
tokens) so it builds in well under a second. `tiny_model` is the in-memory case (hand-made rows and
images), `write_tiny_data` + `save_tiny_base` the on-disk one (a generated data set and a saved base
folder); tests/conftest.py shares the common on-disk setups as session fixtures. (A folder in
the published llava-hf layout — another tokenizer, fp16 shards — comes from tests/llava_hf_layout.py.)
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from components.core.config import DataParams, TinyModelParams
from components.data.records import Row

COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}
TINY = TinyModelParams(
    patch_size=8, vision_hidden=16, vision_layers=2, vision_heads=2,
    lm_hidden=32, lm_layers=2, lm_heads=2, lm_intermediate=64, vocab_size=300,
)
IMAGE_SIZE = 16
# Image size of the generated data sets of the on-disk setups (16 image tokens at TINY's patch size).
DATA_IMAGE_SIZE = 32


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


def nudge(model, generator, scale: float = 0.05) -> None:
    """Add seeded noise to every weight: a fresh init answers every prompt alike, a nudged one
    answers according to image and prompt."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale)


def build_tiny_llava(rows, image_size: int = IMAGE_SIZE, *, max_length: int = 64, seed: int = 0,
                     nudge_seed: int | None = None, sizes: TinyModelParams = TINY):
    """(model, processor): a tiny LLaVA sized by `sizes`, its tokenizer learned from `rows`' texts,
    its weights initialised from `seed` and, with `nudge_seed`, nudged off that init (`nudge`)."""
    import torch

    from components.model.backbone import build_tiny_model, build_tiny_processor, tiny_corpus

    processor = build_tiny_processor(tiny_corpus(rows), image_size, sizes)
    model = build_tiny_model(processor, sizes, image_size, max_length=max_length, seed=seed)
    if nudge_seed is not None:
        nudge(model, torch.Generator().manual_seed(nudge_seed))
    return model, processor


def tiny_model(tmp_path: Path, seed: int = 0, nudge_seed: int | None = None):
    """(model, processor, rows, image_root): a tiny LLaVA on hand-made rows whose images are written
    under tmp_path/images."""
    root = tmp_path / "images"
    rows = make_rows(root)
    model, processor = build_tiny_llava(rows, seed=seed, nudge_seed=nudge_seed)
    return model, processor, rows, root


def write_tiny_data(out: Path, **counts) -> Path:
    """A generated data set (`mrt data`) of DATA_IMAGE_SIZE px images in `out`, `counts` setting its
    sizes (DataParams fields: train_per_task, heldout_per_task, ...); returns `out`."""
    from components.data.generate import write_dataset

    write_dataset(DataParams(out_dir=str(out), image_size=DATA_IMAGE_SIZE, **counts), progress=False)
    return out


def save_tiny_base(data_dir: Path, out: Path, *, max_length: int = 512, seed: int = 0,
                   nudge_seed: int | None = None) -> Path:
    """A saved base folder (`save_base`) holding a tiny LLaVA whose tokenizer is learned from the data
    set in `data_dir`, at that set's image size, built untrained as by `build_tiny_llava`; returns `out`."""
    from components.data.load import load_dataset_dir
    from components.model.backbone import save_base

    data = load_dataset_dir(data_dir)
    model, processor = build_tiny_llava(data.rows, data.manifest["image_size"], max_length=max_length, seed=seed,
                                        nudge_seed=nudge_seed)
    save_base(model, processor, out)
    return out


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
