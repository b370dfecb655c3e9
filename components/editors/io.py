"""Save and load editors: `editors.safetensors` + `editor_config.json`, never pickle.

The config travels with the weights (never weights without their config) and pins the
base model by fingerprint, because editors are meaningless on any other base: they edit hidden
states whose geometry the base defines. Loading checks, in order, and refuses with a message that
names the file and what differs: format version, base fingerprint (expected vs found), placement,
the tensors' keys, shapes, dtypes and finiteness (naming the key), and finally the weights file's
SHA-256 recorded in the config (a modified or half-replaced file).

Writes are atomic per file (temporary name in the same folder, then `os.replace`); the weights
are replaced before the config, and the SHA-256 check catches a save interrupted between the two.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn

from components.core.config import EditorParams
from components.core.hashing import file_hash

from .dispatch import attach
from .hooks import Editors

FORMAT_VERSION = 1
WEIGHTS_NAME = "editors.safetensors"
CONFIG_NAME = "editor_config.json"
FINGERPRINT_SAMPLES = 4096  # evenly spaced elements hashed per parameter tensor

# Runtime switches and bookkeeping that may differ between two loads of the same weights.
_VOLATILE_CONFIG_KEYS = {
    "transformers_version",
    "dtype",
    "torch_dtype",
    "use_cache",
    "return_dict",
    "output_hidden_states",
    "output_attentions",
    "name_or_path",
}


class EditorFileError(ValueError):
    """Saved editors cannot be loaded (missing/corrupt/tampered files, or a different base)."""


# ---------------------------------------------------------------------------------------------
# fingerprint
# ---------------------------------------------------------------------------------------------
def _stable(obj: Any) -> Any:
    if isinstance(obj, dict):
        keep = (k for k in sorted(obj) if not str(k).startswith("_") and k not in _VOLATILE_CONFIG_KEYS)
        return {k: _stable(obj[k]) for k in keep}
    if isinstance(obj, (list, tuple)):
        return [_stable(v) for v in obj]
    return obj


def _sample(param: torch.Tensor, k: int = FINGERPRINT_SAMPLES) -> torch.Tensor:
    flat = param.detach().reshape(-1)
    n = flat.numel()
    if n > k:  # integer stride: the same indices on every device
        idx = torch.arange(k, device=flat.device) * (n // k)
        flat = torch.cat([flat[idx], flat[-1:]])
    return flat.to(torch.bfloat16).view(torch.int16).cpu()


def model_fingerprint(model: nn.Module) -> str:
    """A cheap, stable identity of a base model: "sha256:<hex>".

    Covers the config (JSON, minus private keys and runtime switches: dtype, use_cache, output_*,
    return_dict, paths, transformers version), every parameter's name and shape, and 4096 evenly
    spaced elements (plus the last) of every parameter, rounded to bf16. So it tells apart any two
    differently trained bases (a retrained projector, a merged LoRA) while costing milliseconds even
    for 7B, and it is the same for fp32 and bf16 loads of the same weights (fp16 loads may differ:
    double rounding). It does not cover buffers, the tokenizer or the processor.
    """
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    cfg = config.to_dict() if hasattr(config, "to_dict") else {}
    digest.update(json.dumps(_stable(cfg), sort_keys=True, default=str).encode("utf-8"))
    for name, param in model.named_parameters():
        if param.device.type == "meta":
            raise ValueError(f"model_fingerprint: parameter {name} is on the meta device (no weights to hash)")
        digest.update(f"{name}:{tuple(param.shape)};".encode("utf-8"))
        digest.update(_sample(param).numpy().tobytes())
    return "sha256:" + digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# save
# ---------------------------------------------------------------------------------------------
def _write_synced(path: Path, data: bytes) -> None:
    """Write and fsync, so that the os.replace that follows never exposes a half-written file.
    Plain open(): the process umask applies (safetensors' own writer creates 0600 files)."""
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def save_editors(editors: Editors, out_dir: str | os.PathLike, base_id: str, base_fingerprint: str) -> Path:
    """Write `editors.safetensors` and `editor_config.json` into `out_dir`; returns the config path."""
    from safetensors.torch import save as to_bytes

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in editors.state_dict().items()}
    tag = f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp_weights, tmp_config = out / (WEIGHTS_NAME + tag), out / (CONFIG_NAME + tag)
    try:
        # One metadata key only: safetensors writes metadata from a hash map in random order, so two
        # keys made identical editors differ in bytes (and in weights_sha256) from run to run.
        # The format version lives in editor_config.json.
        blob = to_bytes(tensors, metadata={"format": "pt"})
        _write_synced(tmp_weights, blob)
        config = {
            "format_version": FORMAT_VERSION,
            "method": "mrt",
            "params": editors.params.model_dump(mode="json", exclude={"impl"}),  # files are the same whatever the impl
            "layers": editors.layers,
            "dims": editors.dims,
            "base_model": str(base_id),
            "base_fingerprint": base_fingerprint,
            "parameter_count": int(sum(t.numel() for t in tensors.values())),
            "weights_file": WEIGHTS_NAME,
            "weights_sha256": hashlib.sha256(blob).hexdigest(),
        }
        _write_synced(tmp_config, (json.dumps(config, indent=2) + "\n").encode("utf-8"))
        os.replace(tmp_weights, out / WEIGHTS_NAME)
        os.replace(tmp_config, out / CONFIG_NAME)
    finally:
        for tmp in (tmp_weights, tmp_config):
            tmp.unlink(missing_ok=True)
    return out / CONFIG_NAME


# ---------------------------------------------------------------------------------------------
# load
# ---------------------------------------------------------------------------------------------
def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise EditorFileError(f"{path}: not found (not an MRT editors folder)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EditorFileError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise EditorFileError(f"{path}: expected a JSON object, got {type(config).__name__}")
    for field in ("format_version", "params", "layers", "base_fingerprint", "weights_sha256"):
        if field not in config:
            raise EditorFileError(f"{path}: field '{field}' is missing")
    if config["format_version"] != FORMAT_VERSION:
        raise EditorFileError(
            f"{path}: field 'format_version' is {config['format_version']!r}; this version reads {FORMAT_VERSION}"
        )
    return config


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise EditorFileError(f"{path}: not found")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise EditorFileError(f"{path}: not a readable safetensors file ({exc})") from None


def _check_tensors(path: Path, found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    if missing:
        raise EditorFileError(f"{path}: tensor '{missing[0]}' is missing ({len(missing)} missing in all)")
    if extra:
        raise EditorFileError(f"{path}: unexpected tensor '{extra[0]}' ({len(extra)} unexpected in all)")
    for key, ref in expected.items():
        tensor = found[key]
        if tuple(tensor.shape) != tuple(ref.shape):
            raise EditorFileError(
                f"{path}: tensor '{key}' has shape {tuple(tensor.shape)}, expected {tuple(ref.shape)}"
            )
        if tensor.dtype != torch.float32:
            raise EditorFileError(f"{path}: tensor '{key}' has dtype {tensor.dtype}, expected torch.float32")
        if not torch.isfinite(tensor).all():
            raise EditorFileError(f"{path}: tensor '{key}' holds NaN or infinite values")


def load_editors(model: nn.Module, path: str | os.PathLike, base_fingerprint: str, impl: str = "auto") -> Editors:
    """Attach the editors saved in `path` (their folder, or either file) to `model`, in the
    implementation `impl` (EditorParams.impl).

    `base_fingerprint` is `model_fingerprint(model)` (passed in so callers that already computed it
    don't pay twice). On any refusal nothing stays attached to the model.
    """
    path = Path(path)
    folder = path if path.is_dir() or not path.suffix else path.parent
    config_path = folder / CONFIG_NAME
    config = _read_config(config_path)
    found_fp = config["base_fingerprint"]
    if found_fp != base_fingerprint:
        raise EditorFileError(
            f"{config_path}: field 'base_fingerprint': these editors belong to a different base model (base_model "
            f"{config.get('base_model')!r}): expected fingerprint {base_fingerprint} (the model given), "
            f"found {found_fp} in the file"
        )
    try:
        raw = config["params"]
        params = EditorParams.model_validate({**raw, "impl": impl} if isinstance(raw, dict) else raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise EditorFileError(f"{config_path}: field 'params.{where}': {first['msg']}") from None
    weights_name = config.get("weights_file", WEIGHTS_NAME)
    if not isinstance(weights_name, str) or weights_name != Path(weights_name).name or weights_name in ("", ".", ".."):
        raise EditorFileError(f"{config_path}: field 'weights_file' is {weights_name!r}; it must be a file name "
                              "inside the editors folder (no folders, no absolute path); nothing was read")
    weights_path = folder / weights_name
    if os.path.realpath(weights_path) != os.path.join(os.path.realpath(folder), weights_name):
        raise EditorFileError(f"{config_path}: field 'weights_file': {weights_name!r} is a link out of the editors "
                              "folder; nothing was read")
    tensors = _read_weights(weights_path)

    editors = attach(model, params)
    try:
        for group, layers in editors.layers.items():
            recorded = config["layers"].get(group) if isinstance(config["layers"], dict) else None
            if recorded != layers:
                raise EditorFileError(
                    f"{config_path}: field 'layers.{group}' is {recorded!r} but the placement resolves to "
                    f"{layers!r} on this model"
                )
        _check_tensors(weights_path, tensors, editors.state_dict())
        actual_sha = file_hash(weights_path)
        if actual_sha != config["weights_sha256"]:
            raise EditorFileError(
                f"{weights_path}: contents do not match {CONFIG_NAME} (sha256 {actual_sha}, recorded in its "
                f"field 'weights_sha256': {config['weights_sha256']}): the file was modified or a save was interrupted"
            )
        with torch.no_grad():
            editors.load_state_dict(tensors, strict=True)
    except BaseException:
        editors.detach()
        raise
    return editors
