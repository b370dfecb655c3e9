"""Backbone: tokenizer/processor build, image-token expansion, save → reload identity, composition."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from components.model.backbone import compose, load_base, save_base
from components.data.batching import IGNORE_INDEX, ChatFormatter, collate, pad_token_id
from components.model.tokenizer import IMAGE_TOKEN, VICUNA_TEMPLATE, train_bpe_tokenizer
from tiny_llava import IMAGE_SIZE, TINY, tiny_model, write_clip_and_llama


def test_tokenizer_roundtrip_and_specials(tmp_path):
    tok = train_bpe_tokenizer(["what color is it? red", "a plain blue picture"] * 20, 280)
    assert tok.image_token == IMAGE_TOKEN
    assert tok.convert_tokens_to_ids(IMAGE_TOKEN) == tok.image_token_id
    ids = tok("USER: <image>\nunseen wörds! ASSISTANT:")["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert ids.count(tok.image_token_id) == 1
    assert tok.unk_token_id not in ids  # byte-level: nothing is out of vocabulary
    assert tok.decode(ids, skip_special_tokens=True) == "USER: \nunseen wörds! ASSISTANT:"


def test_processor_expands_image_token_and_masks_prompt(tmp_path):
    model, processor, rows, root = tiny_model(tmp_path)
    fmt = ChatFormatter(processor, max_length=64)
    n_img = (IMAGE_SIZE // TINY.patch_size) ** 2
    assert fmt.n_image_tokens == n_img
    enc = fmt.encode("What color is the image?", "red", True, record="t0", image=root / "red.png")
    assert enc.input_ids.count(processor.image_token_id) == n_img
    answer = [i for i, l in zip(enc.input_ids, enc.labels) if l != IGNORE_INDEX]
    assert processor.tokenizer.decode(answer) == " red</s>"
    assert enc.labels[: len(enc.labels) - len(answer)] == [IGNORE_INDEX] * (len(enc.labels) - len(answer))
    # the prompt the model answers at inference is exactly the masked part
    assert fmt.encode_prompt("What color is the image?", True) == enc.input_ids[: len(enc.input_ids) - len(answer)]
    text_only = fmt.encode("Image description: x\nWhat?", "blue", False)
    assert processor.image_token_id not in text_only.input_ids
    rendered = processor.tokenizer.decode(enc.input_ids, skip_special_tokens=False)
    assert rendered.startswith("<s>USER: <image>") and rendered.endswith("ASSISTANT: red</s>")


def test_over_long_prompt_names_the_record(tmp_path):
    _, processor, _, _ = tiny_model(tmp_path)
    fmt = ChatFormatter(processor, max_length=16)
    with pytest.raises(ValueError, match="record r42.*instruction"):
        fmt.encode("word " * 40, "x", False, record="r42")


def test_collate_right_and_left_padding(tmp_path):
    _, processor, _, root = tiny_model(tmp_path)
    fmt = ChatFormatter(processor, max_length=64)
    a = fmt.encode("What color?", "red", True, image=root / "red.png")
    b = fmt.encode("Image description: a long text only question here\nWhat color is it?", "blue", False)
    pad = pad_token_id(processor)
    right = collate([a, b], processor, pad, "right")
    assert right["pixel_values"].shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)  # only the image row
    short = min(len(a.input_ids), len(b.input_ids))
    row = 0 if len(a.input_ids) == short else 1
    assert right["attention_mask"][row, short:].sum() == 0
    assert (right["labels"][row, short:] == IGNORE_INDEX).all()
    left = collate([a, b], processor, pad, "left")
    assert left["attention_mask"][row, : left["input_ids"].shape[1] - short].sum() == 0
    assert (left["attention_mask"][:, -1] == 1).all()


def test_tiny_save_reload_identical_logits(tmp_path):
    model, processor, _, root = tiny_model(tmp_path)
    model.eval()
    fmt = ChatFormatter(processor, max_length=64)
    batch = collate([fmt.encode("What color?", "red", True, image=root / "red.png")], processor, pad_token_id(processor))
    batch.pop("labels")
    with torch.no_grad():
        before = model(**batch).logits
    save_base(model, processor, tmp_path / "base", meta={"backbone": "tiny"})
    assert json.loads((tmp_path / "base" / "base_meta.json").read_text())["backbone"] == "tiny"
    m2, p2 = load_base(tmp_path / "base")
    m2.eval()
    assert p2.chat_template == VICUNA_TEMPLATE
    fmt2 = ChatFormatter(p2, max_length=64)
    batch2 = collate([fmt2.encode("What color?", "red", True, image=root / "red.png")], p2, pad_token_id(p2))
    batch2.pop("labels")
    assert torch.equal(batch["input_ids"], batch2["input_ids"])
    with torch.no_grad():
        after = m2(**batch2).logits
    assert torch.equal(before, after)


def test_load_base_missing_folder_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="mrt align"):
        load_base(tmp_path / "nope")


def test_composed_from_clip_and_llama(tmp_path):
    """LLaVA stage one's start: a CLIP vision folder + a Llama folder (its tokenizer lacks <image>)."""
    clip_dir, lm_dir, lm, lm_tok = write_clip_and_llama(tmp_path)
    model, processor = compose(str(clip_dir), str(lm_dir))
    assert processor.tokenizer.image_token == IMAGE_TOKEN
    assert len(processor.tokenizer) == len(lm_tok) + 1  # <image> was added ...
    assert model.get_input_embeddings().weight.shape[0] == len(lm_tok) + 1  # ... and the embeddings grew
    assert model.config.image_token_id == processor.image_token_id
    lm_sd = lm.model.state_dict()
    composed_sd = model.model.language_model.state_dict()
    assert torch.equal(lm_sd["layers.0.self_attn.q_proj.weight"], composed_sd["layers.0.self_attn.q_proj.weight"])

    model.eval()
    fmt = ChatFormatter(processor, max_length=64)
    img = Image.new("RGB", (16, 16), (200, 10, 10))
    batch = collate([fmt.encode("what color", "red", True, image=img)], processor, pad_token_id(processor))
    batch.pop("labels")
    with torch.no_grad():
        before = model(**batch).logits
    save_base(model, processor, tmp_path / "composed")
    m2, p2 = load_base(tmp_path / "composed")
    m2.eval()
    with torch.no_grad():
        after = m2(**batch).logits
    assert torch.equal(before, after)
