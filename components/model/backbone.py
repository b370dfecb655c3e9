"""The frozen base: one entry, `load_backbone`, for every kind of LLaVA-style model, and `align`.

Three kinds (params `align.backbone`):
- ``llava``    a LlavaForConditionalGeneration checkpoint (a folder, or an HF id resolved from the local
               Hugging Face cache), checked before anything is built, used as is in `align.dtype`;
- ``composed`` a CLIP vision encoder + a causal LM (folder/id, or a GGUF file in a folder) + a fresh
               projector — LLaVA stage one; only the projector trains in `align` (LM frozen);
- ``tiny``     the embedded default, built from `align.tiny` and trained from scratch in `align` on the
               data's captions and text-only instructions, so that — like Vicuna in the paper — its LM
               already answers every question type from a textual description and MRT only has to
               connect it to images.

Every kind ends as a standard LLaVA folder (model + processor + chat template) that
`load_base(path)` reloads with `from_pretrained`; training and inference only ever see that folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

from components.core.config import AlignParams, TinyModelParams
from components.core.files import make_readable, write_text
from components.model.tokenizer import VICUNA_TEMPLATE, train_bpe_tokenizer
from components.model.compose import compose_llava, image_processor, llava_processor, set_generation_ids

# Position budget of the tiny LM beyond the image tokens and max_length (generation headroom).
_POSITION_HEADROOM = 64


# ---------------------------------------------------------------------------------------------
# processors
# ---------------------------------------------------------------------------------------------


def tiny_corpus(rows: Iterable[Any]) -> list[str]:
    """Texts the tiny tokenizer learns from: every instruction and answer plus the template's words."""
    texts = ["USER: ASSISTANT:"] * 50
    for r in rows:
        texts.append(r.instruction)
        texts.append(r.answer)
    return texts


def build_tiny_processor(corpus: Iterable[str], image_size: int, tiny: TinyModelParams):
    if image_size % tiny.patch_size:
        raise ValueError(f"align.tiny.patch_size={tiny.patch_size} must divide the data's image size {image_size}")
    tokenizer = train_bpe_tokenizer(corpus, tiny.vocab_size)
    return llava_processor(image_processor(image_size), tokenizer, tiny.patch_size, VICUNA_TEMPLATE)


def build_tiny_model(processor, tiny: TinyModelParams, image_size: int, max_length: int, seed: int = 0):
    """A randomly initialised tiny LLaVA (CLIP-style vision tower + Llama LM) sized by `tiny`."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    tok = processor.tokenizer
    n_image = (image_size // tiny.patch_size) ** 2
    vision = CLIPVisionConfig(
        hidden_size=tiny.vision_hidden,
        intermediate_size=tiny.vision_hidden * 4,
        num_hidden_layers=tiny.vision_layers,
        num_attention_heads=tiny.vision_heads,
        image_size=image_size,
        patch_size=tiny.patch_size,
        projection_dim=tiny.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=tiny.lm_hidden,
        intermediate_size=tiny.lm_intermediate,
        num_hidden_layers=tiny.lm_layers,
        num_attention_heads=tiny.lm_heads,
        num_key_value_heads=tiny.lm_heads,
        max_position_embeddings=n_image + max_length + _POSITION_HEADROOM,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=processor.image_token_id,
        image_seq_length=n_image,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    set_generation_ids(model, tok)
    return model


# ---------------------------------------------------------------------------------------------
# composed and llava
# ---------------------------------------------------------------------------------------------
def compose(
    vision_model: str,
    language_model: str,
    gguf_file: str | None = None,
    seed: int = 0,
    cache_dir: str | None = None,
):
    """LLaVA stage one's starting point: pretrained CLIP vision + pretrained causal LM + fresh projector.
    The work is in components/model/compose.py (vision tower from a LLaVA folder, GGUF conversion cache)."""
    return compose_llava(vision_model, language_model, gguf_file, cache_dir=cache_dir, seed=seed)


# What a LLaVA folder must hold besides its weights, and what `load_base` says when it does not.
LLAVA_MODEL_TYPE = "llava"
_CHAT_TEMPLATE_FILES = ("chat_template.json", "chat_template.jinja")
# Only the files a LlavaForConditionalGeneration checkpoint needs (a first download skips the rest).
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.jinja", "*.txt"]
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


class BaseModelError(ValueError):
    """The base model source cannot be used; the message names the folder (or id) and what to do."""


def _looks_like_hub_id(source: str) -> bool:
    """'owner/name' (one slash, no leading '.', '/' or '~'): an id the Hugging Face hub could hold."""
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not source.startswith((".", "~")) and "\\" not in source


def resolve_base_dir(source: str | os.PathLike) -> Path:
    """The local folder of a base: `source` itself when it is a folder, else a hub id ('owner/name')
    looked up in the local Hugging Face cache (HF_HOME / HF_HUB_CACHE). The CLI sets HF_HUB_OFFLINE=1
    unless the environment already sets it: run once with HF_HUB_OFFLINE=0 to download a missing id
    into the cache (only config, tokenizer, processor, template and safetensors files)."""
    text = str(source)
    path = Path(text).expanduser()
    if path.is_dir():
        return follow_base_link(path)
    if not _looks_like_hub_id(text):
        raise FileNotFoundError(f"{text}: base model folder not found (the base `mrt align` writes: run `mrt align` first)")
    from huggingface_hub import constants, snapshot_download

    offline = bool(constants.HF_HUB_OFFLINE)
    try:
        return Path(snapshot_download(text, local_files_only=offline, allow_patterns=_HUB_PATTERNS))
    except Exception as exc:  # LocalEntryNotFoundError offline; RepositoryNotFoundError/HTTP errors online
        how = (
            "the hub is off (HF_HUB_OFFLINE=1, which `mrt` sets unless the environment sets it): download it "
            f"once with `HF_HUB_OFFLINE=0 mrt align ...`, or `hf download {text}`"
            if offline
            else f"downloading it failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        )
        raise FileNotFoundError(
            f"{text}: no such folder, and no model of that id in the local Hugging Face cache "
            f"({constants.HF_HUB_CACHE}); {how} — or set the path of a folder that holds it "
            "(for the base that `mrt align` writes: run `mrt align` first)"
        ) from None


def check_llava_folder(folder: Path) -> dict:
    """Refuse a folder that is no LLaVA checkpoint before any weight is built; returns config.json.

    Checked: config.json exists and says model_type 'llava'; the image processor's settings
    (preprocessor_config.json, or processor_config.json's "image_processor"); LlavaProcessor's own
    settings (processor_config.json: patch_size, vision_feature_select_strategy); a chat template."""
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise BaseModelError(f"{folder}: no config.json — not a saved model folder")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise BaseModelError(f"{cfg_path}: not readable JSON ({exc})") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != LLAVA_MODEL_TYPE:
        hint = (
            " A causal language model is no LLaVA: build one around it with align.backbone=composed, "
            f"align.language_model={folder} and align.vision_model=<a CLIP or LLaVA folder>."
            if isinstance(config, dict) and (config.get("architectures") or [""])[0].endswith("ForCausalLM")
            else ""
        )
        raise BaseModelError(
            f"{folder}: config.json has model_type {model_type!r}, expected {LLAVA_MODEL_TYPE!r} "
            f"(a LlavaForConditionalGeneration checkpoint such as llava-hf/llava-1.5-7b-hf).{hint}"
        )
    proc_cfg: dict = {}
    proc_path = folder / "processor_config.json"
    if proc_path.is_file():
        try:
            proc_cfg = json.loads(proc_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise BaseModelError(f"{proc_path}: not readable JSON ({exc})") from None
    if not (folder / "preprocessor_config.json").is_file() and "image_processor" not in proc_cfg:
        raise BaseModelError(
            f"{folder}: no preprocessor_config.json (the CLIP image processor's size, crop and normalisation): "
            "copy it from the checkpoint this folder was made from"
        )
    if proc_cfg.get("patch_size") is None:
        vision = config.get("vision_config") or {}
        suggested = {
            "processor_class": "LlavaProcessor",
            "image_token": "<image>",
            "patch_size": vision.get("patch_size", 14),
            "vision_feature_select_strategy": config.get("vision_feature_select_strategy", "default"),
            "num_additional_image_tokens": 1,
        }
        what = "no processor_config.json" if not proc_path.is_file() else "processor_config.json has no patch_size"
        raise BaseModelError(
            f"{folder}: {what} — LlavaProcessor cannot tell how many image tokens an image expands to. "
            f"Copy the checkpoint's processor_config.json, or write this one (from config.json): "
            f"{json.dumps(suggested)}"
        )
    has_template = any((folder / f).is_file() for f in _CHAT_TEMPLATE_FILES) or "chat_template" in proc_cfg
    if not has_template:
        tok_cfg = folder / "tokenizer_config.json"
        try:
            has_template = tok_cfg.is_file() and "chat_template" in json.loads(tok_cfg.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            has_template = False
    if not has_template:
        raise BaseModelError(
            f"{folder}: no chat template (chat_template.json, chat_template.jinja, or a chat_template key in "
            "processor_config.json / tokenizer_config.json). Copy the checkpoint's chat_template.json into the "
            "folder (llava-hf/llava-1.5-7b-hf ships one): prompts must be rendered as the model was trained"
        )
    return config


BASE_LINK = "base_link.json"


def checkpoint_files(folder: Path) -> dict[str, str]:
    """What identifies a checkpoint's content without reading its weights: each file's size and, in a
    Hugging Face cache entry (files are links to content-addressed blobs), the blob's name."""
    out = {}
    for f in sorted(folder.iterdir()):
        if f.is_file():
            blob = os.path.basename(os.readlink(f)) if f.is_symlink() else ""
            out[f.name] = f"{f.stat().st_size}" + (f" {blob}" if blob else "")
    return out


def write_base_link(out_dir: str | os.PathLike, source: str, source_dir: Path, dtype: str, meta: dict) -> Path:
    """`out_dir` as a link to a checkpoint folder instead of a copy: base_link.json (the folder, the dtype
    to load it in, its files) and base_meta.json. `load_base(out_dir)` follows it. The folder is
    replaced whole (a previous copy or link goes), and only once both files are written."""
    from components.core.files import replace_folder, write_json

    out = Path(out_dir)
    link = {"source": source, "source_dir": str(Path(source_dir).resolve()), "dtype": dtype,
            "files": checkpoint_files(Path(source_dir))}
    with replace_folder(out) as stage:
        write_json(stage / BASE_LINK, link)
        write_json(stage / "base_meta.json", meta)
    return out


def read_base_link(folder: Path) -> dict | None:
    """The link `write_base_link` left in `folder`, or None when the folder holds a model itself."""
    link = folder / BASE_LINK
    if not link.is_file() or (folder / "config.json").is_file():
        return None
    try:
        data = json.loads(link.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise BaseModelError(f"{link}: not readable JSON ({exc}); run `mrt align` again") from None
    if not isinstance(data, dict) or not isinstance(data.get("source_dir"), str):
        raise BaseModelError(f"{link}: field 'source_dir' missing; run `mrt align` again")
    return data


def follow_base_link(folder: Path) -> Path:
    """`folder`, or the checkpoint folder its base_link.json names (which must still exist)."""
    data = read_base_link(folder)
    if data is None:
        return folder
    target = Path(data["source_dir"])
    if not target.is_dir():
        raise BaseModelError(
            f"{folder / BASE_LINK}: links to {target}, which no longer exists (the checkpoint moved or the "
            f"cache was cleared); run `mrt align` again, or set align.copy_base=true to keep a copy")
    return target


def torch_dtype(name: str | None):
    """align.dtype → what from_pretrained takes: None/'auto' = the checkpoint's own dtype."""
    if name in (None, "auto"):
        return "auto"
    import torch

    if name not in DTYPES:
        raise ValueError(f"dtype {name!r}: expected auto, {', '.join(DTYPES)}")
    return getattr(torch, DTYPES[name])


def load_base(path: str | os.PathLike, dtype: Any = None):
    """(model, processor) from a LLaVA folder, a hub id in the local cache, or a cache entry's folder,
    as `align` wrote it or as published. The folder is checked (`check_llava_folder`) before anything is
    built. `dtype`: None/'auto' (the checkpoint's), 'bf16', 'fp16', 'fp32' or a torch dtype."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    link = read_base_link(Path(path)) if Path(path).is_dir() else None
    if dtype is None and link is not None:
        dtype = {v: k for k, v in DTYPES.items()}.get(link.get("dtype"), "auto")  # the dtype align chose
    folder = resolve_base_dir(path)
    check_llava_folder(folder)
    kw = {"dtype": dtype if not (dtype is None or isinstance(dtype, str)) else torch_dtype(dtype)}
    model = LlavaForConditionalGeneration.from_pretrained(str(folder), **kw)
    processor = AutoProcessor.from_pretrained(str(folder))
    tok = getattr(processor, "tokenizer", None)
    if tok is None or not hasattr(processor, "image_processor"):
        raise BaseModelError(f"{folder}: the processor is {type(processor).__name__}, not a LlavaProcessor")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    gc = model.generation_config
    if gc.eos_token_id is None:
        gc.eos_token_id = tok.eos_token_id
    if gc.pad_token_id is None:
        gc.pad_token_id = tok.pad_token_id
    return model, processor


def load_backbone(p: AlignParams, rows: Iterable[Any] | None = None, image_size: int | None = None):
    """(model, processor) for `p.backbone`. The tiny kind needs the data's rows (tokenizer corpus) and
    image size; the others ignore them."""
    if p.backbone == "llava":
        return load_base(p.model, dtype=p.dtype)
    if p.backbone == "composed":
        return compose(p.vision_model, p.language_model, p.language_model_gguf, seed=p.seed,
                       cache_dir=p.language_model_cache)
    if rows is None or image_size is None:
        raise ValueError("the tiny backbone is built from the data: pass its rows and image size")
    processor = build_tiny_processor(tiny_corpus(rows), image_size, p.tiny)
    model = build_tiny_model(processor, p.tiny, image_size, p.max_length, seed=p.seed)
    return model, processor


def save_base(model, processor, out_dir: str | os.PathLike, meta: dict | None = None) -> Path:
    """A standard LLaVA folder (safetensors + config + processor + chat template) plus base_meta.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    if meta is not None:
        write_text(out / "base_meta.json", json.dumps(meta, indent=2, default=str))
    return make_readable(out)


# ---------------------------------------------------------------------------------------------
# align (stage one)
# ---------------------------------------------------------------------------------------------


