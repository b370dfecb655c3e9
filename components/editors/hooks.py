"""The editors of one placement, hooked onto a STOCK Hugging Face LLaVA (the reference path).

Sites (docs/method.md's four groups), each a forward hook that calls `LoReFT.forward`:
- visual: the output of chosen vision-encoder layers, every token (CLS + patches);
- projector: the output of the multi-modal projector, every image token;
- prefix / suffix: the output of chosen LM decoder layers, at the first p / last s instruction
  tokens of each sample (positions.py), found once per forward by a pre-hook on the whole model.

Hooks instead of subclasses: the backbone stays the stock module (weights, generate(), caches), and
`detach()` gives the base model back bit for bit. During generation only the prompt pass is edited:
a forward whose KV cache already holds tokens is a decode step, and the cache carries the prompt's
edited keys and values. Hooks are registered with `prepend=True`, before transformers' own
output-capturing hooks (LLaVA reads the vision features through `output_hidden_states`).
fast/ holds the same method with banks, fused kernels and CUDA graphs (dispatch.py picks one).
"""

from __future__ import annotations

import inspect
import weakref
from collections import Counter
from typing import Any

import torch
from torch import nn

from components.core.config import EditorParams

from .loreft import LoReFT
from .placement import GROUPS, ModelDims, resolve_layers
from .positions import edit_positions, prompt_mask_from_labels

# Models that carry editors now, so that a second attach is refused rather than stacking edits.
_ATTACHED: "weakref.WeakKeyDictionary[nn.Module, Editors]" = weakref.WeakKeyDictionary()


def llava_modules(model: nn.Module) -> tuple[nn.Module, nn.ModuleList, nn.Module, nn.ModuleList]:
    """(LlavaModel, vision encoder layers, projector, LM decoder layers) of a LlavaForConditionalGeneration
    or LlavaModel, for the layouts of older and newer transformers."""
    core = model.model if hasattr(getattr(model, "model", None), "multi_modal_projector") else model
    if not hasattr(core, "multi_modal_projector"):
        raise TypeError(f"{type(model).__name__} is not a LLaVA model (no multi_modal_projector)")

    def find(paths: tuple[str, ...]) -> nn.ModuleList | None:
        for path in paths:
            obj = core
            for part in path.split("."):
                obj = getattr(obj, part, None)
            if isinstance(obj, nn.ModuleList):
                return obj
        return None

    vision = find(("vision_tower.vision_model.encoder.layers", "vision_tower.encoder.layers"))
    lm = find(("language_model.layers", "language_model.model.layers"))
    if vision is None:
        raise TypeError(f"cannot find the vision encoder layers of {type(core.vision_tower).__name__}")
    if lm is None:
        raise TypeError(f"cannot find the decoder layers of {type(core.language_model).__name__}")
    return core, vision, core.multi_modal_projector, lm


def first_output(output: Any) -> torch.Tensor:
    """The hidden states of a layer's output (a tensor, or the first item of a tuple)."""
    return output[0] if isinstance(output, tuple) else output


def replace_first_output(output: Any, hidden: torch.Tensor) -> Any:
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def forward_argument(names: list[str], name: str, args: tuple, kwargs: dict) -> Any:
    """The argument `name` of a forward call, by keyword or by its position in `names`."""
    if name in kwargs:
        return kwargs[name]
    i = names.index(name) if name in names else len(args)
    return args[i] if i < len(args) else None


def is_decode_step(cache: Any, cache_position: Any) -> bool:
    """True when the KV cache already holds tokens (generation after the prompt pass)."""
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length()) > 0
    if isinstance(cache, (tuple, list)) and cache and cache[0] is not None:  # legacy tuple cache
        return int(cache[0][0].shape[-2]) > 0
    if isinstance(cache_position, torch.Tensor) and cache_position.numel():
        return int(cache_position.reshape(-1)[0]) > 0
    return False


class Editors(nn.Module):
    """Every editor of one placement — ModuleDicts `visual`, `projector` (its one editor under
    "out"), `prefix`, `suffix`, keyed by layer index — and the hooks that apply them.

    Not a submodule of the model: the backbone's state dict stays untouched. `edit_counts` counts
    hook applications per group. Build with `Editors.hook_onto(model, params)`."""

    editor_class: type[LoReFT] = LoReFT

    def __init__(self, params: EditorParams, layers: dict[str, list[int]], dims: dict[str, int]):
        super().__init__()
        self.params = params
        self.layers = {g: list(layers.get(g, [])) for g in GROUPS}
        self.dims = dict(dims)

        def group(name: str, keys: list[str]) -> nn.ModuleDict:
            rank = getattr(params, name).rank
            return nn.ModuleDict({k: self.editor_class(dims[name], rank, params.dropout) for k in keys})

        self.visual = group("visual", [str(i) for i in self.layers["visual"]])
        self.projector = group("projector", ["out"] if self.layers["projector"] else [])
        self.prefix = group("prefix", [str(i) for i in self.layers["prefix"]])
        self.suffix = group("suffix", [str(i) for i in self.layers["suffix"]])
        self.edit_counts: Counter[str] = Counter()
        self._handles: list[Any] = []
        self._model_ref: Any = None
        self._frozen: dict[str, bool] = {}  # requires_grad of each base parameter before attach
        self._forward_args: list[str] = []
        self._image_token_id: int | None = None
        self._positions: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None  # group → (rows, tokens)
        self._shape: tuple[int, int] | None = None  # (batch, tokens) of the forward the positions belong to

    @classmethod
    def hook_onto(cls, model: nn.Module, params: EditorParams, *, freeze_base: bool = True) -> "Editors":
        """Build the editors of `params` for `model` (a stock LLaVA) and hook them in. `freeze_base`
        (the method's premise) sets requires_grad=False on every base parameter; `detach()` restores
        the flags. Editors are fp32, on the device of the module they edit, in the model's
        train/eval mode. Raises PlacementError naming the group and layer when the placement does
        not fit the model."""
        if model in _ATTACHED:
            raise RuntimeError("this model already carries MRT editors: call .detach() on them first")
        core, vision_layers, _, lm_layers = llava_modules(model)
        dims = ModelDims.from_config(core.config)
        layers = {
            "visual": resolve_layers(params.visual.layers, min(dims.readable_vision_layers, len(vision_layers)),
                                     "visual", model_layers=len(vision_layers)),
            "projector": [0] if params.projector.enabled else [],
            "prefix": resolve_layers(params.prefix.layers, len(lm_layers), "prefix"),
            "suffix": resolve_layers(params.suffix.layers, len(lm_layers), "suffix"),
        }
        editors = cls(params, layers, {g: dims.group_dim(g) for g in GROUPS})
        editors._model_ref = weakref.ref(model)
        editors._image_token_id = getattr(core.config, "image_token_id", None)
        editors._forward_args = list(inspect.signature(model.forward).parameters)
        try:
            editors._hook(model)
        except BaseException:
            editors.detach()
            raise
        if freeze_base:
            for name, param in model.named_parameters():
                editors._frozen[name] = param.requires_grad
                param.requires_grad_(False)
        editors.train(model.training)
        _ATTACHED[model] = editors
        return editors

    def editors(self):
        """Every editor, in a stable order (visual, projector, prefix, suffix)."""
        for group in GROUPS:
            yield from getattr(self, group).values()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def editor_grads(self) -> dict[str, torch.Tensor | None]:
        """Each editor parameter's gradient under its state-dict key ("visual.1.U", "prefix.0.W.weight", …)."""
        return {name: param.grad for name, param in self.named_parameters()}

    def detach(self) -> None:
        """Remove every hook and restore the base parameters' requires_grad flags."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        model = self._model_ref() if self._model_ref is not None else None
        if model is not None:
            for name, param in model.named_parameters():
                if name in self._frozen:
                    param.requires_grad_(self._frozen[name])
            if _ATTACHED.get(model) is self:
                del _ATTACHED[model]
        self._frozen.clear()
        self._model_ref = None
        self._positions = None

    # -- the hooks ------------------------------------------------------------------------------
    def _hook(self, model: nn.Module) -> None:
        """Register the site hooks on `model`'s layers, each moving its editors to the layer's device."""
        _, vision_layers, projector, lm_layers = llava_modules(model)

        def on_device_of(module: nn.Module, editor: LoReFT) -> None:
            param = next(module.parameters(), None)
            if param is not None:
                editor.to(param.device)

        sites = [(vision_layers[int(k)], "visual", ed) for k, ed in self.visual.items()]
        sites += [(projector, "projector", ed) for ed in self.projector.values()]
        for module, group, editor in sites:
            on_device_of(module, editor)
            self._handles.append(module.register_forward_hook(self._edit_every_token(group, editor), prepend=True))
        for layer in sorted({*self.layers["prefix"], *self.layers["suffix"]}):
            editors = {g: getattr(self, g)[str(layer)] for g in ("prefix", "suffix") if str(layer) in getattr(self, g)}
            for editor in editors.values():
                on_device_of(lm_layers[layer], editor)
            self._handles.append(lm_layers[layer].register_forward_hook(self._edit_positions(editors), prepend=True))
        if len(self.prefix) or len(self.suffix):
            self._handles.append(model.register_forward_pre_hook(self._find_positions, with_kwargs=True, prepend=True))

    def _edit_every_token(self, group: str, editor: LoReFT):
        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            self.edit_counts[group] += 1
            return replace_first_output(output, editor(first_output(output)))

        return hook

    def _find_positions(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        """Before each forward: the prefix/suffix positions, or None for a decode step. Kept after
        the forward (gradient checkpointing re-runs the layers, and their hooks, in backward)."""
        arg = lambda name: forward_argument(self._forward_args, name, args, kwargs)  # noqa: E731
        cache = arg("cache") if arg("cache") is not None else arg("past_key_values")
        if is_decode_step(cache, kwargs.get("cache_position")):
            self._positions = None
            return
        input_ids, attention_mask, labels = arg("input_ids"), arg("attention_mask"), arg("labels")
        if input_ids is None:
            raise ValueError("MRT prefix/suffix editors need input_ids to find their token positions; "
                             "this forward got inputs_embeds only")
        prompt = prompt_mask_from_labels(attention_mask, labels) if labels is not None else None
        lengths = (self.params.prefix.length if len(self.prefix) else 0,
                   self.params.suffix.length if len(self.suffix) else 0)
        p_idx, p_valid, s_idx, s_valid = edit_positions(input_ids, attention_mask, self._image_token_id, *lengths,
                                                        prompt_mask=prompt)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None]
        self._positions = {
            "prefix": (rows.expand_as(p_idx)[p_valid], p_idx[p_valid]),
            "suffix": (rows.expand_as(s_idx)[s_valid], s_idx[s_valid]),
        }
        self._shape = tuple(input_ids.shape)

    def _edit_positions(self, editors: dict[str, LoReFT]):
        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            if self._positions is None:
                return None
            hidden = first_output(output)
            if tuple(hidden.shape[:2]) != self._shape:
                raise RuntimeError(f"MRT editors: hidden states of shape {tuple(hidden.shape[:2])} do not match the "
                                   f"positions computed for this forward ({self._shape}); call the model the editors "
                                   "were attached to, not its inner language model")
            for group, editor in editors.items():
                rows, tokens = (t.to(hidden.device) for t in self._positions[group])
                if rows.numel():
                    self.edit_counts[group] += 1
                    hidden = hidden.index_put((rows, tokens), editor(hidden[rows, tokens]))
            return replace_first_output(output, hidden)

        return hook
