"""What a training output folder holds, and how it is loaded back onto its base for inference.

`mrt train` writes one kind of folder per method, recognised by a marker file. Each kind here says
which file marks it, how the folder goes onto a loaded base (or replaces it), which base fingerprint
it recorded, and how many parameters its method trained. `KINDS` maps a kind's name to it; the
training methods (components/train/methods.py) name the kind they save, so a method that saves a
new kind of folder adds its class here as well.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def count_params(*modules: Any) -> int:
    """Parameters of `modules` (None skipped), each shared tensor counted once."""
    seen = {}
    for m in modules:
        if m is not None:
            for prm in m.parameters():
                seen[id(prm)] = prm
    return sum(p.numel() for p in seen.values())


def _json_field(path: Path, key: str) -> str | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get(key)
    except (OSError, ValueError, AttributeError):
        return None
    return str(value) if value else None


class OutputKind:
    """One kind of model to run: the bare base, or a training output folder on it.
    Subclasses set `name` and `marker` and override what differs."""

    name = "base"
    marker = ""  # the file whose presence marks a folder as this kind
    whole_model = False  # the folder is a whole model, loaded in the base's place
    checks_base = False  # loading needs the base's fingerprint (the folder is only valid on its own base)

    def holds(self, folder: Path) -> bool:
        return bool(self.marker) and (folder / self.marker).is_file()

    def apply(self, model: Any, folder: Path | None, fingerprint: str | None) -> tuple[Any, Any, dict]:
        """The loaded base with this output put on it: (model to run, extra module or None, info)."""
        return model, None, {}

    def trained_params(self, model: Any, extra: Any) -> int | None:
        """How many parameters the method trained, counted on the loaded model; None if unknowable."""
        return 0

    def recorded_fingerprint(self, folder: Path) -> str | None:
        """The fingerprint of the base the folder was trained on, where the folder records it."""
        return None


class EditorsOutput(OutputKind):
    """`mrt`: editors.safetensors + editor_config.json, hooked onto the base they were trained on."""

    name = "mrt"
    marker = "editor_config.json"
    checks_base = True

    def apply(self, model, folder, fingerprint):
        from components.editors import load_editors

        return model, load_editors(model, folder, fingerprint), {}

    def trained_params(self, model, extra):
        return count_params(extra) if extra is not None else None

    def recorded_fingerprint(self, folder):
        return _json_field(folder / self.marker, "base_fingerprint")


class LoraOutput(OutputKind):
    """`lora`: a peft adapter (its LoRA matrices) wrapped around the base."""

    name = "lora"
    marker = "adapter_config.json"

    def apply(self, model, folder, fingerprint):
        from peft import PeftModel

        return PeftModel.from_pretrained(model, str(folder)), None, {}

    def trained_params(self, model, extra):
        return sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)


class FullOutput(OutputKind):
    """`full`: a whole fine-tuned model folder, loaded instead of the base."""

    name = "full"
    marker = "config.json"
    whole_model = True

    @staticmethod
    def trained_modules(model: Any) -> list[Any] | None:
        """What full fine-tuning trains: the language model, the projector and lm_head (the vision
        tower stays frozen); None when `model` is not shaped like a LLaVA."""
        inner = getattr(model, "model", None)
        parts = [getattr(inner, "language_model", None), getattr(inner, "multi_modal_projector", None),
                 getattr(model, "lm_head", None)]
        return parts if all(x is not None for x in parts) else None

    def trained_params(self, model, extra):
        parts = self.trained_modules(model)
        return count_params(*parts) if parts is not None else None


class FrozenOutput(OutputKind):
    """`frozen`: a marker only (frozen.json: the base and its fingerprint); the base runs as it is."""

    name = "frozen"
    marker = "frozen.json"

    def apply(self, model, folder, fingerprint):
        return model, None, json.loads((folder / self.marker).read_text(encoding="utf-8"))

    def recorded_fingerprint(self, folder):
        return _json_field(folder / self.marker, "base_fingerprint")


BASE = OutputKind()  # no folder: the bare base
KINDS: dict[str, OutputKind] = {k.name: k for k in (EditorsOutput(), LoraOutput(), FullOutput(), FrozenOutput())}


def output_kind(folder: str | Path | None) -> OutputKind:
    """The kind of `folder` from its marker files (BASE for None). Whole-model kinds are tried last:
    their marker, config.json, is in any model folder."""
    if folder is None:
        return BASE
    d = Path(folder)
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: editors/adapter folder not found (run `mrt train` first, or pass 'none')")
    for kind in sorted(KINDS.values(), key=lambda k: k.whole_model):
        if kind.holds(d):
            return kind
    markers = [f"{k.marker} ({k.name})" for k in sorted(KINDS.values(), key=lambda k: k.whole_model)]
    raise ValueError(f"{d}: none of {', '.join(markers[:-1])} or {markers[-1]} — not a training output")


def detect_kind(folder: str | Path | None) -> str:
    """The name of `folder`'s kind: base | mrt | lora | full | frozen."""
    return output_kind(folder).name


def kind_named(name: str) -> OutputKind:
    """The kind called `name` (base included)."""
    if name == BASE.name:
        return BASE
    if name not in KINDS:
        raise ValueError(f"unknown model kind {name!r}: expected {BASE.name} or one of {', '.join(KINDS)}")
    return KINDS[name]
