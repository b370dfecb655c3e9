"""The training methods — mrt | lora | full | frozen — one class each, and the `METHODS` registry.

A method holds what differs between them: how the loaded base is prepared for training (what is
frozen, what is attached or wrapped), what is saved once it has trained, and the output kind
(components/evaluation/outputs.py) that recognises the saved folder and loads it back for inference
and counts what it trained. The trainer (training.py) is the same for all of them.

Adding a method is one class here and its entry in METHODS, plus its name in
`components.core.config.MethodName` (params.yaml is validated there, below this layer; importing
this module fails while the two disagree) and, if it saves a new kind of folder, that kind in
outputs.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, get_args

from components.core.config import MethodName, TrainParams
from components.core.files import make_readable, write_json
from components.evaluation.outputs import KINDS, FullOutput, OutputKind


class Method:
    """One training method. Subclasses set the class attributes and override `prepare`/`write`."""

    name: str = ""
    output: OutputKind  # the kind of folder it saves
    trains: bool = True  # False: nothing is optimised, the output only records the base
    warm_imports: tuple[str, ...] = ()  # heavy modules a sweep worker imports before running it

    def prepare(self, model: Any, p: TrainParams) -> tuple[Any, Any]:
        """Freeze/unfreeze `model` (and attach or wrap what trains); returns (model to train,
        extra module or None)."""
        raise NotImplementedError

    def save(self, run_model: Any, extra: Any, processor: Any, p: TrainParams, base_fingerprint: str) -> Path:
        """Write the trained output into p.out_dir, world-readable; returns the folder."""
        out = Path(p.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.write(out, run_model, extra, processor, p, base_fingerprint)
        return make_readable(out)

    def write(self, out: Path, run_model: Any, extra: Any, processor: Any, p: TrainParams,
              base_fingerprint: str) -> None:
        """Write what the method saves into the existing folder `out` (its output kind's marker included)."""
        raise NotImplementedError


class MRT(Method):
    """Representation editors on the frozen base: only the editors train."""

    name, output = "mrt", KINDS["mrt"]

    def prepare(self, model, p):
        from components.editors import attach

        model.requires_grad_(False)
        model.eval()  # the backbone's dropout stays off: it is frozen, editors only
        editors = attach(model, p.editors)
        editors.train()
        return model, editors

    def write(self, out, run_model, extra, processor, p, base_fingerprint):
        from components.editors import save_editors

        save_editors(extra, out, p.base_dir, base_fingerprint)


class LoRA(Method):
    """peft LoRA matrices on the language model's projections (`train.lora`); the base stays frozen."""

    name, output = "lora", KINDS["lora"]
    warm_imports = ("peft",)

    def prepare(self, model, p):
        from peft import LoraConfig, get_peft_model

        model.requires_grad_(False)
        cfg = LoraConfig(
            r=p.lora.r, lora_alpha=p.lora.alpha, lora_dropout=p.lora.dropout, target_modules=p.lora.target_modules
        )
        peft_model = get_peft_model(model, cfg)
        peft_model.train()
        return peft_model, None

    def write(self, out, run_model, extra, processor, p, base_fingerprint):
        run_model.save_pretrained(str(out))


class Full(Method):
    """Full fine-tuning of what FullOutput.trained_modules names (language model, projector,
    lm_head); the vision tower stays frozen, in eval mode."""

    name, output = "full", KINDS["full"]

    def prepare(self, model, p):
        modules = FullOutput.trained_modules(model)
        if modules is None:
            raise ValueError("train.method full: the base has no language_model, multi_modal_projector and lm_head")
        model.requires_grad_(False)
        for module in modules:
            module.requires_grad_(True)
        model.train()
        model.model.vision_tower.eval()
        return model, None

    def write(self, out, run_model, extra, processor, p, base_fingerprint):
        run_model.save_pretrained(out)
        processor.save_pretrained(out)


class Frozen(Method):
    """The base as it is: nothing trains; the output is a marker naming the base and its fingerprint."""

    name, output = "frozen", KINDS["frozen"]
    trains = False

    def prepare(self, model, p):
        model.requires_grad_(False)
        model.eval()
        return model, None

    def write(self, out, run_model, extra, processor, p, base_fingerprint):
        marker = {"method": self.name, "base_dir": p.base_dir, "base_fingerprint": base_fingerprint}
        write_json(out / self.output.marker, marker)


METHODS: dict[str, Method] = {m.name: m for m in (MRT(), LoRA(), Full(), Frozen())}

if set(METHODS) != set(get_args(MethodName)):
    raise RuntimeError(
        f"components.train.methods: METHODS {sorted(METHODS)} and core.config.MethodName "
        f"{sorted(get_args(MethodName))} must name the same methods"
    )


def method_of(p: TrainParams) -> Method:
    """The method `p.method` names."""
    return METHODS[p.method]
