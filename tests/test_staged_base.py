"""The staged tiny base: the shipped artifact matches its manifest and params, `mrt align` uses it
(verified, copied, scored on the data's own rows), refuses a modified or mismatched one, and the
three-stage build runs end to end at toy sizes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from components.core.config import load_params
from components.core.hashing import file_hash
from components.align.staged import (
    MANIFEST,
    SHIPPED_DIR,
    spec_from_params,
    spec_mismatch,
    verify_shipped,
)

ROOT = Path(__file__).resolve().parents[1]
shipped = pytest.mark.skipif(not (SHIPPED_DIR / MANIFEST).is_file(), reason="no shipped base in this checkout")

MAX_SHIPPED_BYTES = 10 * 1024 * 1024


@shipped
def test_shipped_files_match_their_manifest_and_size_cap():
    manifest = verify_shipped(SHIPPED_DIR)
    weights = SHIPPED_DIR / "model.safetensors"
    assert manifest["files"]["model.safetensors"]["sha256"] == file_hash(weights)
    assert weights.stat().st_size <= MAX_SHIPPED_BYTES  # the package stays small
    assert manifest["command"].startswith("mrt align")


@shipped
def test_default_params_describe_the_shipped_base():
    """params.yaml's align section (with the data's 64 px images, seed 0) is the recipe in the
    manifest, so `mrt align -S align.rebuild=true` rebuilds this base."""
    params = load_params(str(ROOT / "params.yaml"))
    spec = spec_from_params(params.align, params.data.image_size, params.data.seed)
    assert spec_mismatch(verify_shipped(SHIPPED_DIR)["spec"], spec) == {}


@pytest.fixture(scope="module")
def data64(tmp_path_factory):
    from components.core.config import DataParams
    from components.data.generate import write_dataset

    out = tmp_path_factory.mktemp("data64") / "d"
    write_dataset(DataParams(out_dir=str(out), image_size=64, train_per_task=2, heldout_per_task=2, align_size=12,
                             text_per_type=1, mme_images_per_subtask=1), progress=False)
    return out


def _align(data_dir: Path, tmp: Path, *overrides: str):
    from components.align.run import align

    params = load_params(str(ROOT / "params.yaml"), [f"align.data_dir={data_dir}", f"align.out_dir={tmp / 'base'}",
                                                     f"align.report={tmp / 'align.json'}", "align.eval_size=4",
                                                     *overrides])
    return align(params.align)


@shipped
def test_align_copies_the_verified_shipped_base(data64, tmp_path):
    rep = _align(data64, tmp_path)
    assert rep["source"] == "shipped" and rep["recipe"] == "staged"
    assert file_hash(tmp_path / "base" / "model.safetensors") == file_hash(SHIPPED_DIR / "model.safetensors")
    assert (tmp_path / "base" / "model.safetensors").stat().st_mode & 0o777 == 0o644
    saved = json.loads((tmp_path / "align.json").read_text())
    assert saved["caption_eval_n"] == 4 and saved["text_exact_match"] is not None
    assert 0.0 <= saved["caption_token_accuracy"] <= 1.0
    assert saved["steps"] == saved["stages"]["stage_one"]["steps"] > 0 and saved["loss_final"] > 0
    assert set(saved["stages"]) == {"vision", "language", "stage_one"}
    from components.model.backbone import load_base

    model, _ = load_base(tmp_path / "base")
    assert sum(p.numel() for p in model.parameters()) == rep["total_params"]


@shipped
def test_a_modified_shipped_base_is_refused(data64, tmp_path):
    bad = tmp_path / "shipped"
    shutil.copytree(SHIPPED_DIR, bad)
    raw = bytearray((bad / "model.safetensors").read_bytes())
    raw[-1] ^= 0xFF
    (bad / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"model\.safetensors: sha256 .* does not match .*manifest\.json"):
        _align(data64, tmp_path, f"align.shipped={bad}")
    assert not (tmp_path / "base").exists()


@shipped
def test_other_shape_than_the_shipped_base_is_refused(data64, tmp_path):
    with pytest.raises(ValueError, match=r"lm_layers: shipped 4, here 2.*align\.rebuild=true"):
        _align(data64, tmp_path, "align.tiny.lm_layers=2")


def test_staged_build_runs_three_stages_at_toy_sizes(tmp_path):
    """`mrt align -S align.rebuild=true` at toy sizes: a CLIP, a text-only LM and a projector-only
    stage one; the tower and LM of the saved base are exactly the stage outputs (stage one froze them)."""
    import torch
    from transformers import CLIPModel, LlamaForCausalLM

    from components.model.backbone import load_base
    from components.align.staged import StagedSpec, build

    spec = StagedSpec(image_size=32, patch_size=8, vision_hidden=16, vision_layers=2, vision_heads=2, lm_hidden=32,
                      lm_layers=2, lm_heads=2, lm_intermediate=64, vocab_size=300, clip_text_hidden=16,
                      clip_text_layers=1, clip_steps=2, clip_batch=4, lm_steps=2, lm_batch=4, proj_steps=2,
                      proj_batch=4, eval_retrieval=4, eval_probe_train=12, eval_probe_test=6, eval_text_per_type=1,
                      eval_captions=2, eval_image_per_type=1, tokenizer_rows=100, workers=0, tower_steps=0)
    work = tmp_path / "work"
    rep = build(spec, tmp_path / "base", device="cpu", work_dir=work)
    assert "stage_one_tower" not in rep
    assert {"vision", "language", "stage_one"} <= set(rep)
    assert 0.0 <= rep["vision"]["retrieval_acc"] <= 1.0 and "color" in rep["vision"]["probe"]
    assert "vf_count_all" in rep["language"]["text_per_type"] and "caption_copy" in rep["language"]["text_per_type"]
    assert rep["stage_one"]["steps"] == 2
    model, processor = load_base(tmp_path / "base")
    clip = CLIPModel.from_pretrained(work / "vision")
    lm = LlamaForCausalLM.from_pretrained(work / "language")
    tower = model.model.vision_tower.state_dict()
    for k, v in clip.vision_model.state_dict().items():
        mine = tower.get(k, tower.get("vision_model." + k))
        assert torch.equal(mine, v), k
    for k, v in lm.model.state_dict().items():
        assert torch.equal(model.model.language_model.state_dict()[k], v), k
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_index


def test_stage_one_b_trains_tower_and_projector_only(tmp_path):
    """`--stages tower`: continuing from a composed base, the tower and the projector change, the LM
    does not; the report has the tower's probe and the stage-one scores."""
    import torch
    from transformers import LlavaForConditionalGeneration

    from components.align.staged import SHIPPED_DIR, StagedSpec, build
    from components.model.backbone import load_base

    spec = StagedSpec(tower_steps=2, proj_batch=4, tower_lr=1e-3, eval_probe_train=12, eval_probe_test=6,
                      eval_captions=2, eval_image_per_type=1, workers=0)
    rep = build(spec, tmp_path / "base", device="cpu", stages="tower", work_dir=tmp_path / "work", start=SHIPPED_DIR)
    r = rep["stage_one_tower"]
    assert r["steps"] == 2 and "shape" in r["probe"] and 0.0 <= r["caption_exact_match"] <= 1.0
    before = LlavaForConditionalGeneration.from_pretrained(str(SHIPPED_DIR), dtype=torch.float32).state_dict()
    after, _ = load_base(tmp_path / "base")
    after = after.state_dict()
    changed = {k.split(".")[1] for k, v in after.items() if not torch.equal(v.float(), before[k].float())}
    assert changed == {"vision_tower", "multi_modal_projector"}


def test_stage_one_b_without_a_composed_base_names_the_folder(tmp_path):
    from components.align.staged import StagedSpec, build

    with pytest.raises(FileNotFoundError, match=r"--start.*'.*nowhere'.*config\.json"):
        build(StagedSpec(), tmp_path / "base", device="cpu", stages="tower", start=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="--start"):
        build(StagedSpec(), tmp_path / "base", device="cpu", stages="tower")
