"""Attach MRT editors to a STOCK Hugging Face LLaVA by forward hooks (no copied model files).

Sites (METHOD.md's four groups):
- ψ_V: output of chosen vision-encoder layers, every token (CLS + patches), one editor per layer;
- ψ_c: output of the multi-modal projector, every projected image token, one editor;
- ψ_P / ψ_S: output of chosen LM decoder layers at the prefix / suffix positions, one editor per
  layer and group, shared across that group's positions.

Why hooks and not subclasses: the backbone stays the exact stock module (weights, generate(),
caches, attention kernels, device maps), editors can be detached to get the base model back bit for
bit, and the same code serves transformers versions whose layers return tensors (5.x) or tuples.

Per model forward, a forward pre-hook on the hooked top-level model computes the prefix/suffix
positions once (`positions.edit_positions`, from input_ids, attention_mask and — in training —
labels) and opens a pass: every editor's basis is orthonormalised once for the pass, in one batched
QR per editor shape (on an H200, 87 separate QRs cost ~16 ms per LLaVA-7B forward); the layer hooks then
gather the rows at those positions for the whole batch by flat index, edit them and write them
back in place (`loreft.edit_rows_`: no copy of the layer output in forward, one in backward, and no
host synchronisation anywhere in a step).
During generation only the prompt pass is edited: a forward whose KV cache already holds tokens
(or whose cache_position starts past 0, transformers < 5.2x) is a decode step and its LM layers are
left alone — the cache carries the prompt's edited keys and values. Generation must therefore use
the KV cache (the default); with `use_cache=False` every step re-reads the whole sequence.

The positions of the last forward stay available to the layer hooks after it returns, because
gradient checkpointing re-runs decoder layers (and their hooks) during backward. Calling the inner
language model directly, bypassing the hooked model, therefore reuses the last positions; a batch
of a different shape is refused.

Hooks are registered with `prepend=True` so that they run before transformers' own output-capturing
hooks: LLaVA reads the vision features through `output_hidden_states`, which are captured by forward
hooks on the encoder layers, and those must see the edited output.
"""

from __future__ import annotations

import inspect
import weakref
from collections import Counter
from typing import Any

import torch
from torch import nn

from components.config import EditorParams

from .count import count_parameters, llava_7b_config, meta_model, paper_placement_7b, parameter_report
from .loreft import LoReFT, edit_rows_, orthonormal_rows_batched
from .placement import GROUPS, ModelDims, PlacementError, resolve_layers, resolve_placement
from .positions import edit_positions, prompt_mask_from_labels

__all__ = [
    "GROUPS",
    "MRTEditors",
    "PlacementError",
    "attach",
    "count_parameters",
    "llava_7b_config",
    "meta_model",
    "paper_placement_7b",
    "parameter_report",
    "resolve_layers",
    "resolve_placement",
]

# Models that currently carry editors, so that a second attach() is refused rather than stacking.
_ATTACHED: "weakref.WeakKeyDictionary[nn.Module, MRTEditors]" = weakref.WeakKeyDictionary()


# ---------------------------------------------------------------------------------------------
# finding the stock modules
# ---------------------------------------------------------------------------------------------
def _attr_path(root: nn.Module, path: str):
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def llava_modules(model: nn.Module) -> tuple[nn.Module, nn.ModuleList, nn.Module, nn.ModuleList]:
    """(LlavaModel, vision encoder layers, projector, LM decoder layers) of a LLaVA model.

    Accepts LlavaForConditionalGeneration or LlavaModel. Vision layers live at
    `vision_tower.vision_model.encoder.layers` in older transformers and at
    `vision_tower.encoder.layers` in newer ones; both are found.
    """
    core = model.model if hasattr(getattr(model, "model", None), "multi_modal_projector") else model
    if not hasattr(core, "multi_modal_projector"):
        raise TypeError(f"{type(model).__name__} is not a LLaVA model (no multi_modal_projector)")
    vision = None
    for path in ("vision_tower.vision_model.encoder.layers", "vision_tower.encoder.layers"):
        vision = _attr_path(core, path)
        if isinstance(vision, nn.ModuleList):
            break
    lm = None
    for path in ("language_model.layers", "language_model.model.layers"):
        lm = _attr_path(core, path)
        if isinstance(lm, nn.ModuleList):
            break
    if not isinstance(vision, nn.ModuleList):
        raise TypeError(f"cannot find the vision encoder layers of {type(core.vision_tower).__name__}")
    if not isinstance(lm, nn.ModuleList):
        raise TypeError(f"cannot find the decoder layers of {type(core.language_model).__name__}")
    return core, vision, core.multi_modal_projector, lm


def _device_of(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _replace_first(output: Any, hidden: torch.Tensor) -> Any:
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


class _Sites:
    """The prefix/suffix positions of one forward, cached per device (a device-mapped model spreads
    layers over devices).

    Kept as fixed-size slots — flat row indices b·T + t into the [B·T, d] layer output plus a
    validity mask — so that nothing in a step depends on how many slots are valid: compacting
    them with a boolean mask would make the host wait for the device on every forward. Invalid
    slots hold t = 0, a position no group ever edits (positions.py).
    """

    def __init__(self, shape: tuple[int, int], slots: dict[str, tuple[torch.Tensor, torch.Tensor]]):
        self.shape = shape
        self._by_device = {next(iter(slots.values()))[0].device: slots}

    @classmethod
    def from_positions(cls, shape, prefix_idx, prefix_valid, suffix_idx, suffix_valid) -> "_Sites":
        seq = shape[1]

        def flat(idx, valid):
            rows = torch.arange(idx.shape[0], device=idx.device)[:, None]
            return (rows * seq + idx).reshape(-1), valid.reshape(-1)

        return cls(shape, {"prefix": flat(prefix_idx, prefix_valid), "suffix": flat(suffix_idx, suffix_valid)})

    def slots(self, device: torch.device, group: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(flat row index [S], valid [S]) of `group` on `device`."""
        if device not in self._by_device:
            src = next(iter(self._by_device.values()))
            self._by_device[device] = {g: (i.to(device), v.to(device)) for g, (i, v) in src.items()}
        return self._by_device[device][group]

    def on(self, device: torch.device, group: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch rows, token positions) of the valid slots only — for inspection; syncs the host."""
        flat, valid = self.slots(device, group)
        flat = flat[valid]
        return flat // self.shape[1], flat % self.shape[1]


# ---------------------------------------------------------------------------------------------
# the editors
# ---------------------------------------------------------------------------------------------
class MRTEditors(nn.Module):
    """All editors of one placement (ModuleDicts `visual`, `projector`, `prefix`, `suffix` keyed by
    layer index; the projector's single editor under "out") and the hooks that apply them.

    Not a submodule of the model: the backbone's state dict and `save_pretrained` stay untouched.
    `edit_counts` counts hook applications per group (diagnostics and tests).
    """

    def __init__(self, params: EditorParams, layers: dict[str, list[int]], dims: dict[str, int]):
        super().__init__()
        self.params = params
        self.layers = {g: list(layers.get(g, [])) for g in GROUPS}
        self.dims = dict(dims)

        def group(name: str, keys: list[str]) -> nn.ModuleDict:
            rank = getattr(params, name).rank
            return nn.ModuleDict({k: LoReFT(dims[name], rank, params.dropout) for k in keys})

        self.visual = group("visual", [str(i) for i in self.layers["visual"]])
        self.projector = group("projector", ["out"] if self.layers["projector"] else [])
        self.prefix = group("prefix", [str(i) for i in self.layers["prefix"]])
        self.suffix = group("suffix", [str(i) for i in self.layers["suffix"]])
        self.edit_counts: Counter[str] = Counter()
        self._handles: list[Any] = []
        self._model_ref: Any = None
        self._frozen: dict[str, bool] = {}
        self._sites: _Sites | None = None
        self._edit_lm = False
        self._pass_open = False
        self._image_token_id: int | None = None
        self._forward_params: list[str] = []
        self._hooked_layers: list[nn.Module] = []

    # -- bookkeeping ------------------------------------------------------------------------
    def editors(self):
        """Every LoReFT, in a stable order."""
        for group in GROUPS:
            yield from getattr(self, group).values()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def attached(self) -> bool:
        return bool(self._handles)

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
        self._hooked_layers = []
        self._model_ref = None
        self._sites = None
        self._edit_lm = False
        self._pass_open = False
        for editor in self.editors():
            editor.end_pass()

    # -- the pass hooks on the top-level model ------------------------------------------------
    def _argument(self, name: str, args: tuple, kwargs: dict) -> Any:
        if name in kwargs:
            return kwargs[name]
        try:
            i = self._forward_params.index(name)
        except ValueError:
            return None
        return args[i] if i < len(args) else None

    @staticmethod
    def _is_decode_step(cache: Any, cache_position: Any) -> bool:
        if isinstance(cache_position, torch.Tensor) and cache_position.numel():
            if int(cache_position.reshape(-1)[0]) > 0:
                return True
        if cache is None:
            return False
        if hasattr(cache, "get_seq_length"):
            return int(cache.get_seq_length()) > 0
        if isinstance(cache, (tuple, list)) and cache and cache[0] is not None:  # legacy tuple cache
            return int(cache[0][0].shape[-2]) > 0
        return False

    def _prepare_bases(self, groups: list[str]) -> None:
        """Orthonormalise the bases of `groups` for this pass: one batched, sync-free Cholesky-QR
        per (shape, device, dtype) — singletons too, so no editor falls back to a per-call QR.
        Without gradients, editors whose `U` is unchanged since an earlier pass keep their basis."""
        buckets: dict[tuple, list[LoReFT]] = {}
        for group in groups:
            for editor in getattr(self, group).values():
                kept = editor.inference_basis()
                if kept is not None:
                    editor.set_pass_basis(kept)
                    continue
                buckets.setdefault((editor.d, editor.r, editor.U.device, editor.U.dtype), []).append(editor)
        for editors in buckets.values():
            for editor, basis in zip(editors, orthonormal_rows_batched([e.U for e in editors])):
                editor.set_pass_basis(basis)

    def _checkpointing(self) -> bool:
        """True when a hooked layer will be recomputed in backward (activation checkpointing).

        transformers < 5.2x checkpoints a layer's `__call__`, hooks included, so the recompute runs
        our hook again and must produce the same saved tensors as the first run: the basis must then
        be computed inside the hook (lazily, per editor), not batched ahead of the layer.
        """
        return torch.is_grad_enabled() and any(
            getattr(layer, "gradient_checkpointing", False) and layer.training for layer in self._hooked_layers
        )

    def _begin_pass(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._sites, self._edit_lm = None, False
        has_pixels = self._argument("pixel_values", args, kwargs) is not None
        lm_editors = bool(len(self.prefix) or len(self.suffix))
        decode = False
        if lm_editors:
            cache = self._argument("cache", args, kwargs)  # transformers ≥ 5.2x
            if cache is None:
                cache = self._argument("past_key_values", args, kwargs)
            decode = self._is_decode_step(cache, kwargs.get("cache_position"))
        self._pass_open = has_pixels or (lm_editors and not decode)
        if not self._pass_open:  # a decode step (or a forward no editor sees): nothing to prepare
            return
        for editor in self.editors():
            editor.begin_pass()
        batched = not self._checkpointing()
        if batched and has_pixels:
            self._prepare_bases(["visual", "projector"])
        if not lm_editors or decode:
            return
        input_ids = self._argument("input_ids", args, kwargs)
        if input_ids is None:
            raise ValueError(
                "MRT prefix/suffix editors need input_ids to find their token positions; "
                "this forward got inputs_embeds only"
            )
        attention_mask = self._argument("attention_mask", args, kwargs)
        labels = self._argument("labels", args, kwargs)
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() != 2:
            raise ValueError(
                f"MRT prefix/suffix editors need the 2-D padding mask, got an attention_mask of shape "
                f"{tuple(attention_mask.shape)} (static/compiled caches build 4-D masks: use the dynamic cache)"
            )
        prompt_mask = prompt_mask_from_labels(attention_mask, labels) if labels is not None else None
        positions = edit_positions(
            input_ids,
            attention_mask,
            self._image_token_id,
            self.params.prefix.length if len(self.prefix) else 0,
            self.params.suffix.length if len(self.suffix) else 0,
            prompt_mask=prompt_mask,
        )
        self._sites = _Sites.from_positions(tuple(input_ids.shape), *positions)
        self._edit_lm = True
        if batched:
            self._prepare_bases(["prefix", "suffix"])

    def _end_pass(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if not self._pass_open:
            return
        self._pass_open = False
        for editor in self.editors():
            editor.end_pass()

    # -- the site hooks -----------------------------------------------------------------------
    def _whole_hook(self, group: str, key: str):
        editor = getattr(self, group)[key]

        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            self.edit_counts[group] += 1
            return _replace_first(output, editor(_first(output)))

        return hook

    def _lm_hook(self, layer: int):
        key = str(layer)
        groups = [g for g in ("prefix", "suffix") if key in getattr(self, g)]

        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            if not self._edit_lm:
                return None
            sites = self._sites
            hidden = _first(output)
            if sites is None or tuple(hidden.shape[:2]) != sites.shape:
                raise RuntimeError(
                    f"MRT editors on LM layer {layer}: hidden states of shape {tuple(hidden.shape[:2])} do not "
                    f"match the positions computed for this forward ({sites.shape if sites else None}); "
                    "call the model the editors were attached to, not its inner language model"
                )
            edits = []
            for group in groups:
                flat, valid = sites.slots(hidden.device, group)
                if flat.numel() == 0:
                    continue
                edits.append((getattr(self, group)[key], flat, valid))
                self.edit_counts[group] += 1
            if not edits:
                return None
            # In place (one gradient copy in backward instead of out-of-place index_put and the
            # full-size zero-filled gradients of advanced indexing): see loreft.edit_rows_.
            return _replace_first(output, edit_rows_(hidden, edits))

        return hook

    # -- wiring -------------------------------------------------------------------------------
    def _attach(self, model: nn.Module, freeze_base: bool) -> None:
        core, vision_layers, projector, lm_layers = llava_modules(model)
        self._image_token_id = getattr(core.config, "image_token_id", None)
        self._forward_params = list(inspect.signature(model.forward).parameters)
        self._model_ref = weakref.ref(model)
        handles = []
        try:
            for key, editor in self.visual.items():
                layer = vision_layers[int(key)]
                editor.to(_device_of(layer))
                handles.append(layer.register_forward_hook(self._whole_hook("visual", key), prepend=True))
            if "out" in self.projector:
                self.projector["out"].to(_device_of(projector))
                handles.append(projector.register_forward_hook(self._whole_hook("projector", "out"), prepend=True))
            for layer_idx in sorted({*self.layers["prefix"], *self.layers["suffix"]}):
                layer = lm_layers[layer_idx]
                for group in ("prefix", "suffix"):
                    if str(layer_idx) in getattr(self, group):
                        getattr(self, group)[str(layer_idx)].to(_device_of(layer))
                handles.append(layer.register_forward_hook(self._lm_hook(layer_idx), prepend=True))
            handles.append(model.register_forward_pre_hook(self._begin_pass, with_kwargs=True, prepend=True))
            handles.append(model.register_forward_hook(self._end_pass, with_kwargs=True, always_call=True))
        except Exception:
            for handle in handles:
                handle.remove()
            raise
        self._handles = handles
        self._hooked_layers = [vision_layers[int(k)] for k in self.visual] + [
            lm_layers[i] for i in sorted({*self.layers["prefix"], *self.layers["suffix"]})
        ]
        if freeze_base:
            for name, param in model.named_parameters():
                self._frozen[name] = param.requires_grad
                param.requires_grad_(False)
        self.train(model.training)


def attach(model: nn.Module, params: EditorParams, *, freeze_base: bool = True) -> MRTEditors:
    """Build the editors of `params` for `model` (a stock LLaVA) and hook them in.

    `freeze_base` (the method's premise) sets requires_grad=False on every base parameter;
    `detach()` restores the flags. Editors are fp32 and live on the device of the module they edit,
    in the model's train/eval mode. Raises PlacementError naming the group and layer when the
    placement does not fit the model.
    """
    if model in _ATTACHED:
        raise RuntimeError("this model already carries MRT editors: call .detach() on them first")
    core, vision_layers, _, lm_layers = llava_modules(model)
    dims_cfg = ModelDims.from_config(core.config)
    layers = {
        "visual": resolve_layers(
            params.visual.layers,
            min(dims_cfg.readable_vision_layers, len(vision_layers)),
            "visual",
            model_layers=len(vision_layers),
        ),
        "projector": [0] if params.projector.enabled else [],
        "prefix": resolve_layers(params.prefix.layers, len(lm_layers), "prefix"),
        "suffix": resolve_layers(params.suffix.layers, len(lm_layers), "suffix"),
    }
    dims = {g: dims_cfg.group_dim(g) for g in GROUPS}
    editors = MRTEditors(params, layers, dims)
    editors._attach(model, freeze_base)
    _ATTACHED[model] = editors
    return editors
