"""A real llava-hf checkpoint as a user brings it: hub ids from the local cache, broken folders refused
before anything is built, align.dtype, max_length in text tokens, answers that end with EOS."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from llava_hf_layout import llama_style_tokenizer, llava_hf_processor, write_llava_hf_folder

CORPUS = ["What color is the image? red blue green yellow", "Describe the image. a plain picture"] * 5


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    return write_llava_hf_folder(tmp_path_factory.mktemp("llava-hf") / "llava-1.5-tiny-hf", CORPUS)


def _copy(src, dst, drop=()):
    shutil.copytree(src, dst)
    for name in drop:
        (dst / name).unlink()
    return dst


def _no_build(monkeypatch):
    """Fail the test if any weights get built (the checks must come first)."""
    from transformers import LlavaForConditionalGeneration

    def boom(*a, **k):
        raise AssertionError("a model was built before the folder was checked")

    monkeypatch.setattr(LlavaForConditionalGeneration, "from_pretrained", boom)


# --- hub ids and the local Hugging Face cache -------------------------------------------------------
def _fake_cache(cache, repo_id, folder, revision="0123456789abcdef0123456789abcdef01234567"):
    """The hub cache layout huggingface_hub writes: models--owner--name/{refs/main, snapshots/<rev>/...}."""
    entry = cache / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(folder, entry / "snapshots" / revision)
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(revision)
    return entry / "snapshots" / revision


def test_hub_id_loads_from_the_local_cache_offline(hf_folder, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from components.model.backbone import load_base, resolve_base_dir

    snap = _fake_cache(tmp_path / "hub", "llava-hf/llava-1.5-tiny-hf", hf_folder)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert resolve_base_dir("llava-hf/llava-1.5-tiny-hf") == snap
    model, processor = load_base("llava-hf/llava-1.5-tiny-hf")
    assert type(model).__name__ == "LlavaForConditionalGeneration" and processor.patch_size == 14
    assert resolve_base_dir(str(snap)) == snap  # the cache entry's folder works as a folder


def test_hub_id_missing_from_the_cache_says_how_to_download(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from components.model.backbone import resolve_base_dir

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError) as err:
        resolve_base_dir("llava-hf/llava-1.5-7b-hf")
    msg = str(err.value)
    assert "llava-hf/llava-1.5-7b-hf" in msg and "HF_HUB_OFFLINE=0" in msg and str(tmp_path / "empty-hub") in msg
    with pytest.raises(FileNotFoundError, match="base model folder not found"):
        resolve_base_dir(str(tmp_path / "no" / "such" / "folder"))


def test_offline_switch_is_the_users_to_turn_off(monkeypatch):
    from components.core.offline import set_offline_env

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    set_offline_env()
    assert os.environ["HF_HUB_OFFLINE"] == "0"
    monkeypatch.delenv("HF_HUB_OFFLINE")
    set_offline_env()
    assert os.environ["HF_HUB_OFFLINE"] == "1"


# --- broken folders are refused before anything is built ------------------------------------------
def test_plain_causal_lm_folder_is_refused_by_model_type(tmp_path, monkeypatch):
    from transformers import LlamaConfig

    from components.model.backbone import BaseModelError, load_base

    lm = tmp_path / "vicuna-7b"
    lm.mkdir()
    LlamaConfig().save_pretrained(lm)  # a 7B Llama config: building it would take ~27 GB
    (lm / "config.json").write_text(json.dumps({**json.loads((lm / "config.json").read_text()),
                                                "architectures": ["LlamaForCausalLM"]}))
    _no_build(monkeypatch)
    with pytest.raises(BaseModelError) as err:
        load_base(lm)
    msg = str(err.value)
    assert str(lm) in msg and "model_type 'llama'" in msg and "'llava'" in msg and "backbone=composed" in msg


def test_folder_without_processor_config_is_a_clear_error(hf_folder, tmp_path, monkeypatch):
    from components.model.backbone import BaseModelError, load_base

    folder = _copy(hf_folder, tmp_path / "no-proc", drop=["processor_config.json"])
    _no_build(monkeypatch)
    with pytest.raises(BaseModelError) as err:
        load_base(folder)
    msg = str(err.value)
    assert str(folder) in msg and "processor_config.json" in msg and '"patch_size": 14' in msg
    folder2 = _copy(hf_folder, tmp_path / "no-preproc", drop=["preprocessor_config.json"])
    with pytest.raises(BaseModelError, match="no preprocessor_config.json"):
        load_base(folder2)


def test_folder_without_chat_template_gets_advice_that_helps(hf_folder, tmp_path, monkeypatch):
    from components.model.backbone import BaseModelError, load_base

    folder = _copy(hf_folder, tmp_path / "no-template", drop=["chat_template.json"])
    _no_build(monkeypatch)
    with pytest.raises(BaseModelError) as err:
        load_base(folder)
    msg = str(err.value)
    assert str(folder) in msg and "chat_template.json" in msg and "mrt align" not in msg


# --- dtype ------------------------------------------------------------------------------------------
def test_align_dtype_is_validated_and_applied(hf_folder, tmp_path):
    import torch

    from components.align.run import align
    from components.model.backbone import load_base
    from components.core.config import ParamsError, load_params

    with pytest.raises(ParamsError, match="align.dtype"):
        load_params("params.yaml", ["align.dtype=float64"])
    kept = load_params("params.yaml", ["align.backbone=llava", f"align.model={hf_folder}",
                                       f"align.out_dir={tmp_path / 'auto'}", f"align.report={tmp_path / 'a.json'}"])
    assert align(kept.align)["dtype"] == "float16"  # auto: the checkpoint's own
    assert load_base(tmp_path / "auto")[0].dtype == torch.float16
    cfg = load_params("params.yaml", ["align.backbone=llava", f"align.model={hf_folder}", "align.dtype=fp32",
                                      f"align.out_dir={tmp_path / 'fp32'}", f"align.report={tmp_path / 'b.json'}"])
    assert align(cfg.align)["dtype"] == "float32"
    assert load_base(tmp_path / "fp32")[0].dtype == torch.float32
    assert load_base(hf_folder, dtype="bf16")[0].dtype == torch.bfloat16


def test_align_links_the_checkpoint_unless_asked_to_copy_it(hf_folder, tmp_path):
    from components.align.run import align
    from components.core.config import load_params
    from components.model.backbone import BaseModelError, load_base

    src = _copy(hf_folder, tmp_path / "ckpt")
    link = load_params("params.yaml", ["align.backbone=llava", f"align.model={src}", "align.dtype=fp32",
                                       f"align.out_dir={tmp_path / 'link'}", f"align.report={tmp_path / 'l.json'}"])
    report = align(link.align)
    assert report["copied"] is False
    held = sorted(f.name for f in (tmp_path / "link").iterdir())
    assert held == ["base_link.json", "base_meta.json"]  # no weights: nothing of 14 GB is copied or cached twice
    linked, _ = load_base(tmp_path / "link")
    copy = load_params("params.yaml", ["align.backbone=llava", f"align.model={src}", "align.dtype=fp32",
                                       "align.copy_base=true", f"align.out_dir={tmp_path / 'copy'}",
                                       f"align.report={tmp_path / 'c.json'}"])
    align(copy.align)
    copied, _ = load_base(tmp_path / "copy")
    assert list((tmp_path / "copy").glob("*.safetensors"))
    for (name, a), (_, b) in zip(linked.state_dict().items(), copied.state_dict().items()):
        assert a.dtype == b.dtype and bool((a == b).all()), name  # the same base either way
    shutil.rmtree(src)  # the checkpoint moves away: the link says so and what to do
    with pytest.raises(BaseModelError, match=r"base_link.json: links to .*ckpt, which no longer exists.*mrt align"):
        load_base(tmp_path / "link")


# --- max_length in text tokens, EOS-terminated answers ---------------------------------------------
@pytest.fixture(scope="module")
def processor_336():
    """llava-hf's processor at its real size: 336 px / patch 14 → 576 image tokens."""
    return llava_hf_processor(llama_style_tokenizer(CORPUS), image_size=336, patch_size=14)


def test_max_length_counts_text_tokens_not_the_576_image_tokens(processor_336):
    from components.data.batching import ChatFormatter, image_token_count

    assert image_token_count(processor_336) == 576
    enc = ChatFormatter(processor_336, max_length=128).encode("What color is the image?", "red", True, "r1")
    n_text = len(enc.input_ids) - 576
    assert 0 < n_text <= 128 and enc.input_ids.count(processor_336.image_token_id) == 576
    with pytest.raises(ValueError, match=r"record r2: .*text tokens \(\+ 576 image tokens\).*max_length=16"):
        ChatFormatter(processor_336, max_length=16).encode("What color is the image? " * 4, "red", True, "r2")


def test_answer_targets_end_with_eos_under_llava_hf_template(processor_336):
    from components.data.batching import IGNORE_INDEX, ChatFormatter

    tok = processor_336.tokenizer
    fmt = ChatFormatter(processor_336, max_length=128)
    for answer in ("red", "a plain picture"):
        enc = fmt.encode("What color is the image?", answer, True, "r")
        target = [i for i in enc.labels if i != IGNORE_INDEX]
        assert target[-1] == tok.eos_token_id and target.count(tok.eos_token_id) == 1
        assert tok.decode(target[:-1]).strip() == answer  # no trailing "▁" before EOS
    short = ChatFormatter(processor_336, max_length=12).encode("What?", "a plain picture " * 5, True, "r")
    assert short.labels[-1] == tok.eos_token_id and len(short.input_ids) - 576 == 12  # cut, still closed


def test_default_max_length_comes_from_the_base(hf_folder):
    from components.model.backbone import load_base
    from components.train.training import text_max_length

    model, processor = load_base(hf_folder)
    assert text_max_length(model, processor, None) == 256 - 16  # positions − image tokens
    with pytest.raises(ValueError, match="exceed the base's max_position_embeddings=256"):
        text_max_length(model, processor, 250)


# --- the shipped profile ----------------------------------------------------------------------------
def test_llava_profile_loads_validates_and_resolves():
    import yaml
    from typer.testing import CliRunner

    from flows.cli import app
    from components.core.config import load_params

    cfg = load_params("profiles/llava-1.5-7b.yaml")
    assert cfg.data.source == "visionflan" and cfg.align.backbone == "llava"
    assert cfg.align.model == "llava-hf/llava-1.5-7b-hf" and cfg.align.dtype == "bf16"
    # the keys a user edits are the real sources' paths
    for key in ("visionflan_annotation", "visionflan_images", "mme_root"):
        assert getattr(cfg.data, key)
    assert cfg.data.visionflan_annotation.endswith("annotation_191-task_1k.json")
    assert cfg.data.mme_root.endswith("MME_Benchmark_release_version") and cfg.data.heldout_tasks
    assert cfg.train.max_length is None and cfg.train.batch_size * cfg.train.grad_accum == 128
    assert cfg.train.editors.visual.layers == "1-22"
    # every output of the profile stays in its own folders: nothing of the default run is overwritten
    raw = yaml.safe_load(open("profiles/llava-1.5-7b.yaml"))
    outputs = [v for sec in raw.values() if isinstance(sec, dict) for k, v in sec.items()
               if isinstance(v, str) and k in ("out_dir", "data_dir", "base_dir", "model_dir", "report", "curve",
                                               "predictions", "mme_results_dir", "report_csv", "report_md", "plot",
                                               "table", "summary", "results", "candidate_dir", "benchmark_report",
                                               "validation_report", "comparison_report")]
    assert outputs and all(v.split("/")[1] == "llava-1.5-7b" for v in outputs), outputs
    assert raw["report"]["readme"] is None  # README's results block stays the default profile's
    # resolved through the CLI, with a user's edit applied
    res = CliRunner().invoke(app, ["params", "-p", "profiles/llava-1.5-7b.yaml", "-S",
                                   "data.mme_root=/srv/mme/MME_Benchmark_release_version"])
    assert res.exit_code == 0, res.output
    resolved = yaml.safe_load(res.output)
    assert resolved["data"]["mme_root"] == "/srv/mme/MME_Benchmark_release_version"
    assert resolved["align"]["dtype"] == "bf16" and resolved["train"]["max_length"] is None
