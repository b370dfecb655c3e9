"""The fast hooks: hooks.Editors' sites and function (see there), organised for speed.

The trainable tensors are banks (bank.py): one U, W, b per editor shape and device, of which every
editor's own tensors are views. Per model forward, a forward pre-hook on the hooked top-level model
opens a pass: every whole-tensor bank is orthonormalised once (one batched, sync-free Cholesky-QR
per bank) and W − U formed once, so each site reads its (U, W − U, b) as views. The prefix/suffix
positions (`positions.edit_positions`, from input_ids, attention_mask and — in training — labels)
and the LM bank's bases are prepared by the first LM layer's hook, where the host work overlaps the
GPU's work on that layer instead of delaying the launch-bound vision tower. An LM layer's prefix and
suffix editors are stacked by rows and applied in one gather → two addmm → scatter
(`ops.edit_rows_stacked_`: in place, no copy of the layer output in forward, one in backward, no
host synchronisation anywhere in a step). Launches and per-tensor host work, not arithmetic, are what
the editors cost on a GPU (docs/performance.md). Without gradients the per-site parameters are kept
across passes until a parameter changes, and on a GPU each site is one Triton kernel and the
positions another; in training a GPU's visual/projector sites take the Triton `kernels.EditWhole`
(kernels.py).
During generation only the prompt pass is edited: a forward whose KV cache already holds tokens
(or whose cache_position starts past 0, transformers < 5.2x) is a decode step and its LM layers are
left alone — the cache carries the prompt's edited keys and values. A no-grad decode step removes
the LM layers' hooks for its duration (no Python call per layer per generated token); the next
prompt pass puts them back. Generation must therefore use the KV cache (the default); with
`use_cache=False` every step re-reads the whole sequence.

The positions of the last forward stay available to the layer hooks after it returns, because
gradient checkpointing re-runs decoder layers (and their hooks) during backward. Calling the inner
language model directly, bypassing the hooked model, therefore reuses the last positions; a batch
of a different shape is refused.

Hooks are registered with `prepend=True` so that they run before transformers' own output-capturing
hooks: LLaVA reads the vision features through `output_hidden_states`, which are captured by forward
hooks on the encoder layers, and those must see the edited output.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch import nn

from components.core.config import EditorParams

from ..hooks import Editors, forward_argument, is_decode_step, llava_modules
from ..hooks import first_output as _first
from ..hooks import replace_first_output as _replace_first
from ..placement import GROUPS
from ..positions import edit_positions, prompt_mask_from_labels
from . import kernels
from .bank import EditorBank
from .editor import BankedLoReFT
from .ops import _compute_dtype, _writable, edit_rows_per_editor_, edit_rows_stacked_, edit_whole, orthonormal_rows_stacked, slot_mask

def _device_of(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


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
        self._fused: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

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

    def fused(self, device: torch.device, groups: tuple[str, ...], ranks: tuple[int, ...], dtype: torch.dtype):
        """(flat row index [ΣS], slot×column mask [ΣS, Σr]) of `groups` edited together at one layer
        (`ops.edit_rows_stacked_`), built once per forward and device."""
        key = ("fused", device, groups, ranks, dtype)
        got = self._fused.get(key)
        if got is None:
            slots = [self.slots(device, g) for g in groups]
            idx = torch.cat([i for i, _ in slots]) if len(slots) > 1 else slots[0][0]
            got = self._fused[key] = (idx, slot_mask([v for _, v in slots], list(ranks), dtype))
        return got

    @classmethod
    def from_kernel(cls, shape, prefix_len: int, groups: tuple[str, ...], ranks: tuple[int, ...],
                    idx: torch.Tensor, valid: torch.Tensor, mask: torch.Tensor) -> "_Sites":
        """From `kernels.positions`' output, with the fused layout of `groups` (the groups every LM
        layer carries) and its padded mask in place, so that no layer builds them again."""
        n_p = shape[0] * prefix_len
        sites = cls(shape, {"prefix": (idx[:n_p], valid[:n_p]), "suffix": (idx[n_p:], valid[n_p:])})
        view = mask[:, : sum(ranks)]
        sites._fused[("fused", idx.device, groups, ranks, torch.float32)] = (idx, view)
        sites._fused[("padded", view.data_ptr(), mask.shape[1])] = mask
        return sites

    def padded_mask(self, mask: torch.Tensor, rank: int) -> torch.Tensor:
        """`mask` [S, R] as fp32 [S, rank] (kernels.pad_mask), built once per forward."""
        key = ("padded", mask.data_ptr(), rank)
        got = self._fused.get(key)
        if got is None:
            got = self._fused[key] = kernels.pad_mask(mask, rank)
        return got


class MRTEditors(Editors):
    """The editors of hooks.Editors (same ModuleDicts, state-dict keys and function) with the fast
    hooks: banks, per-pass stacks, fused kernels and CUDA graphs (module docstring)."""

    editor_class = BankedLoReFT

    def __init__(self, params: EditorParams, layers: dict[str, list[int]], dims: dict[str, int]):
        super().__init__(params, layers, dims)
        self._sites: _Sites | None = None
        self._edit_lm = False
        self._pass_open = False
        self._hooked_layers: list[nn.Module] = []
        # The LM layers' hooks, (layer, hook) — registered while armed (`_lm_handles`): a no-grad
        # decode step disarms them, since it edits nothing and its 32 hook calls per generated token
        # are pure host time in a host-bound loop; the next prompt pass re-arms them.
        self._lm_hooks: list[tuple[nn.Module, Any]] = []
        self._lm_handles: list[Any] = []
        # Per-pass (U, W − U, b) of every site, as views into one stack per editor shape: the
        # whole-tensor sites by (group, key), the LM layers by index (prefix and suffix rows stacked).
        self._site_whole: dict[tuple[str, str], tuple[torch.Tensor, ...]] = {}
        self._site_lm: dict[int, tuple[torch.Tensor, ...]] = {}
        self._stack_cache: tuple[tuple, tuple[dict, dict]] | None = None  # no-grad: kept across passes
        self._param_list: list[nn.Parameter] = []
        self._lm_pending: tuple | None = None  # (input_ids, attention_mask, labels, prepare stacks) until the LM
        # Per pass: what every LM hook of the pass would recompute alike (the groups present, whether
        # the inference or the training kernel applies), keyed by (device, dtype, groups, parameter
        # dtype); the visual/projector sites' path likewise; and whether any editor drops out. A b1
        # prompt pass, and a b8 step's vision tower, are bound by the host: every µs per hook counts.
        self._lm_plans: dict[tuple, tuple] = {}
        self._whole_plans: dict[tuple, str] = {}  # (device, dtype, param dtype, grad) → path: `_whole_path`
        self._droppers: tuple | None = None  # editors whose dropout rate is > 0 (`_begin_pass`)
        self._dropout_on = False
        self._lm_layout_cache: tuple | None = None  # _lm_groups(): fixed once the editors exist
        # The trainable tensors: every editor's U, W, b live in a bank of its shape (bank.py).
        self.banks = nn.ModuleList()
        self._whole_layout: list[tuple[EditorBank, list]] = []
        self._lm_layout: list[tuple[EditorBank, list]] = []
        self._make_banks()
        # CUDA graphs of the vision layers (`use_cuda_graphs`): the graphed layer already carries its
        # editor, so its hook lets the one output it marks (`graph_edited`) through untouched.
        self._graphs: Any = None
        self._graph_skip = 0  # id() of that layer (an attribute holding the module would register it)
        self._graph_sites: dict[int, tuple[str, str]] = {}

    def detach(self) -> None:
        """Remove every hook and the CUDA graphs, and restore the base parameters' requires_grad flags."""
        self.use_cuda_graphs(False)
        self._disarm_lm_hooks()
        self._lm_hooks = []
        super().detach()
        self._hooked_layers = []
        self._sites = None
        self._edit_lm = False
        self._pass_open = False
        self._site_whole, self._site_lm, self._stack_cache = {}, {}, None
        for editor in self.editors():
            editor.end_pass()

    # -- the pass hooks on the top-level model ------------------------------------------------
    def _arm_lm_hooks(self) -> None:
        if not self._lm_handles:
            # prepend: before transformers' own output-capturing hooks (module docstring)
            self._lm_handles = [layer.register_forward_hook(hook, prepend=True) for layer, hook in self._lm_hooks]

    def _disarm_lm_hooks(self) -> None:
        for handle in self._lm_handles:
            handle.remove()
        self._lm_handles = []

    def _argument(self, name: str, args: tuple, kwargs: dict) -> Any:
        return forward_argument(self._forward_args, name, args, kwargs)

    def _lm_order(self) -> list[tuple[int, str]]:
        """(layer, group) of every LM editor, layer-major: the row order of the LM stacks."""
        layers = sorted({*self.layers["prefix"], *self.layers["suffix"]})
        return [(i, g) for i in layers for g in ("prefix", "suffix") if str(i) in getattr(self, g)]

    # -- banks ------------------------------------------------------------------------------
    def _make_banks(self, devices: dict[int, torch.device] | None = None) -> None:
        """(Re)build the banks (bank.py): one per (d, r, device) among the whole-tensor editors
        (visual then projector) and one per (d, r, device) among the LM editors in (layer, group)
        order, so that a layer's prefix and suffix rows are adjacent. `devices` maps id(editor) to
        the device it must live on (attach: the device of the layer it edits); default: where it is."""
        for bank in self.banks:
            bank.release()
        devices = devices or {}

        def bucket(items: list[tuple[Any, BankedLoReFT]]) -> list[tuple[EditorBank, list[Any]]]:
            groups: dict[tuple, list[tuple[Any, BankedLoReFT]]] = {}
            for site, ed in items:
                dev = torch.device(devices.get(id(ed), ed.U.device))
                groups.setdefault((ed.d, ed.r, dev, ed.U.dtype), []).append((site, ed))
            return [(EditorBank([e for _, e in members], key[2]), [site for site, _ in members])
                    for key, members in groups.items()]

        whole = bucket([((g, k), ed) for g in ("visual", "projector") for k, ed in getattr(self, g).items()])
        lm = bucket([((i, g), getattr(self, g)[str(i)]) for i, g in self._lm_order()])
        self.banks = nn.ModuleList([b for b, _ in whole] + [b for b, _ in lm])
        self._whole_layout = [(bank, sites) for bank, sites in whole]
        self._lm_layout = [(bank, sites) for bank, sites in lm]
        self._param_list = list(self.parameters())
        self._stack_cache = None

    def _apply(self, fn, recurse=True):
        # Conversion (.to(), .half(), …) copies the editors' view buffers on their own: re-bind them.
        out = super()._apply(fn, recurse)
        for bank in self.banks:
            bank.rebind()
        self._stack_cache = None
        return out

    def editor_grads(self) -> dict[str, torch.Tensor | None]:
        """Each editor's gradient under its state-dict key ("visual.1.U", "prefix.0.W.weight", …):
        views of the banks' `.grad` rows (None where the bank has no gradient)."""
        out: dict[str, torch.Tensor | None] = {}
        for group in GROUPS:
            for key, ed in getattr(self, group).items():
                bank, i = ed._bank, ed._index
                for name, param in (("U", bank.U), ("W.weight", bank.W), ("W.bias", bank.b)):
                    out[f"{group}.{key}.{name}"] = None if param.grad is None else param.grad[i]
        return out

    def view_buffer_names(self) -> list[str]:
        """Names of the editors' U/W.weight/W.bias buffers (views of the banks): DDP must not
        broadcast them (`_ddp_params_and_buffers_to_ignore`), the banks are what it syncs."""
        return [n for n, _ in self.named_buffers()]

    @staticmethod
    def _bank_pass(bank: EditorBank) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(Q, W − Q, b) of a bank, [n, r, d], [n, r, d], [n, r]: one batched sync-free
        orthonormalisation and one subtraction for all its editors, no stacking."""
        q = orthonormal_rows_stacked(bank.U)
        return q, bank.W - q, bank.b

    def _build_stacks(self, whole: bool, lm: bool) -> tuple[dict, dict]:
        """Per-site (U, W − U, b) for this pass, as views of each bank's (Q, W − Q, b). LM layers: when one
        bank holds every LM editor and every layer carries the same groups, its rows are viewed as
        [layers, groups·r, d], so a layer's prefix+suffix parameters are a view; otherwise per-layer
        concatenations."""
        whole_params: dict[tuple[str, str], tuple] = {}
        lm_params: dict[int, tuple] = {}
        if whole:
            for bank, sites in self._whole_layout:
                q, w_minus_q, b = self._bank_pass(bank)
                for site, ed, qi, wqi, bi in zip(sites, bank.members, q.unbind(0), w_minus_q.unbind(0), b.unbind(0)):
                    ed.set_pass_basis(qi)
                    whole_params[site] = (qi, wqi, bi)
        if lm and self._lm_layout:
            per_layer = Counter(i for _, sites in self._lm_layout for i, _ in sites)
            if len(self._lm_layout) == 1 and len(set(per_layer.values())) == 1:
                bank, _ = self._lm_layout[0]
                q, w_minus_q, b = self._bank_pass(bank)
                for ed, qi in zip(bank.members, q.unbind(0)):
                    ed.set_pass_basis(qi)
                n_layers, k = len(per_layer), next(iter(per_layer.values()))
                r, d = bank.r, bank.d
                views = zip(q.reshape(n_layers, k * r, d).unbind(0), w_minus_q.reshape(n_layers, k * r, d).unbind(0),
                            b.reshape(n_layers, k * r).unbind(0))
                for layer, params in zip(sorted(per_layer), views):
                    lm_params[layer] = params
            else:
                flat: dict[tuple[int, str], tuple] = {}
                for bank, sites in self._lm_layout:
                    q, w_minus_q, b = self._bank_pass(bank)
                    for site, ed, qi, wqi, bi in zip(sites, bank.members, q.unbind(0), w_minus_q.unbind(0), b.unbind(0)):
                        ed.set_pass_basis(qi)
                        flat[site] = (qi, wqi, bi)
                for layer in sorted(per_layer):
                    parts = [flat[(i, g)] for i, g in self._lm_order() if i == layer]
                    lm_params[layer] = tuple(torch.cat([pt[j] for pt in parts]) for j in range(3))
        return whole_params, lm_params

    def _params_key(self) -> tuple:
        return tuple((p._version, p.data_ptr()) for p in self._param_list)

    def _prepare_stacks(self, whole: bool, lm: bool) -> None:
        """Fill this pass's per-site parameters. Without gradients they hold no graph, so they are
        kept across passes until a parameter changes (version or storage): a prompt pass during
        generation orthonormalises nothing and builds no stack."""
        if torch.is_grad_enabled():
            built_whole, built_lm = self._build_stacks(whole, lm)
            if whole:
                self._site_whole = built_whole
            if lm:
                self._site_lm = built_lm
            return
        self._site_whole, self._site_lm = self._inference_stacks()

    def _inference_stacks(self) -> tuple[dict, dict]:
        """The no-grad per-site parameters, rebuilt only when a parameter changed."""
        key = self._params_key()
        if self._stack_cache is None or self._stack_cache[0] != key:
            self._stack_cache = (key, self._build_stacks(True, True), {})
        return self._stack_cache[1]

    def _packed(self, site: tuple, params: tuple, hidden: torch.Tensor, usable: bool | None = None) -> tuple | None:
        """The fused kernel's (W − U, U, b) for `site` when the kernel can edit `hidden` (inference on a
        GPU, kernels.usable — or `usable`, when the caller already knows it for this pass), made once
        per parameter change and kept with the no-grad stacks."""
        if usable is None:
            usable = kernels.usable(hidden)
        if not usable or params[0].dtype != torch.float32 or self._stack_cache is None:
            return None
        packs = self._stack_cache[2]
        got = packs.get(site)
        if got is None or got[0] is not params[0]:
            min_rank = kernels.WHOLE_MIN_RANK if site[0] == "whole" else 2
            got = packs[site] = (params[0], kernels.pack(*params, min_rank=min_rank))
        return got[1]

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
        self._sites, self._edit_lm, self._lm_pending = None, False, None
        self._lm_plans, self._whole_plans = {}, {}
        has_pixels = self._argument("pixel_values", args, kwargs) is not None
        lm_editors = bool(len(self.prefix) or len(self.suffix))
        decode = False
        if lm_editors:
            cache = self._argument("cache", args, kwargs)  # transformers ≥ 5.2x
            if cache is None:
                cache = self._argument("past_key_values", args, kwargs)
            decode = is_decode_step(cache, kwargs.get("cache_position"))
        if decode and not torch.is_grad_enabled():
            self._disarm_lm_hooks()  # generation's decode steps: no LM hook call at all
        elif self._handles:
            self._arm_lm_hooks()
        self._pass_open = has_pixels or (lm_editors and not decode)
        if not self._pass_open:  # a decode step (or a forward no editor sees): nothing to prepare
            return
        for editor in self.editors():
            editor.begin_pass()
        if self._droppers is None:  # the editors with a dropout rate (fixed at construction)
            self._droppers = tuple(e for e in self.editors() if e.dropout.p > 0)
        self._dropout_on = any(e.training for e in self._droppers)
        batched = not self._checkpointing()
        self._site_whole, self._site_lm = {}, {}
        if not lm_editors or decode:
            if batched and has_pixels:
                self._prepare_stacks(whole=True, lm=False)
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
        if batched and has_pixels:
            self._prepare_stacks(whole=True, lm=False)
        # The positions and the LM editors' bases are prepared by the first LM layer's hook, not
        # here: by then that layer's kernels are queued and the GPU is busy with them, so this host
        # work overlaps instead of delaying the vision tower, which is launch-bound (and in backward
        # their nodes run as soon as the LM is done, not after the vision tower).
        self._lm_pending = (input_ids, attention_mask, labels, batched)
        self._edit_lm = True

    def _lm_groups(self) -> tuple[tuple[str, ...], tuple[int, ...]] | None:
        """(groups, ranks) when every LM layer carries the same groups with the same ranks (the
        paper's placement: prefix and suffix everywhere), else None. Computed once: the editors'
        layers and ranks are fixed at construction."""
        if self._lm_layout_cache is None:
            self._lm_layout_cache = (self._compute_lm_groups(),)
        return self._lm_layout_cache[0]

    def _compute_lm_groups(self) -> tuple[tuple[str, ...], tuple[int, ...]] | None:
        per_layer: dict[int, list[str]] = {}
        for layer, group in self._lm_order():
            per_layer.setdefault(layer, []).append(group)
        layouts = {tuple(g) for g in per_layer.values()}
        if len(layouts) != 1:
            return None
        groups = layouts.pop()
        ranks = {g: {getattr(self, g)[str(i)].r for i in per_layer} for g in groups}
        if any(len(r) != 1 for r in ranks.values()):
            return None
        return groups, tuple(next(iter(ranks[g])) for g in groups)

    def _kernel_sites(self, input_ids: torch.Tensor, attention_mask: Any, lengths: tuple[int, int]) -> "_Sites | None":
        """The positions in one kernel launch (kernels.positions) where the LM sites will use the
        fused kernels too: inference on a GPU, the same groups and ranks on every LM layer, fp32
        editors. None: the operator path (positions.edit_positions) serves."""
        if not kernels.usable_on(input_ids.device) or input_ids.dim() != 2:
            return None
        if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
            return None  # edit_positions raises the error that names the shapes
        layout = self._lm_groups()
        if layout is None or any(p.dtype != torch.float32 for p in self._param_list):
            return None
        groups, ranks = layout
        by_group = dict(zip(groups, ranks))
        r_p, r_s = by_group.get("prefix", 0), by_group.get("suffix", 0)
        idx, valid, mask = kernels.positions(input_ids, attention_mask, self._image_token_id, *lengths, (r_p, r_s),
                                             kernels.padded_rank(r_p + r_s))
        return _Sites.from_kernel(tuple(input_ids.shape), lengths[0], groups, ranks, idx, valid, mask)

    def _prepare_lm(self) -> None:
        """This pass's prefix/suffix positions and LM editor parameters (see `_begin_pass`)."""
        input_ids, attention_mask, labels, batched = self._lm_pending
        self._lm_pending = None
        lengths = (self.params.prefix.length if len(self.prefix) else 0,
                   self.params.suffix.length if len(self.suffix) else 0)
        if labels is None and batched:
            self._sites = self._kernel_sites(input_ids, attention_mask, lengths)
            if self._sites is not None:
                self._prepare_stacks(whole=False, lm=True)
                return
        prompt_mask = prompt_mask_from_labels(attention_mask, labels) if labels is not None else None
        positions = edit_positions(
            input_ids,
            attention_mask,
            self._image_token_id,
            *lengths,
            prompt_mask=prompt_mask,
        )
        self._sites = _Sites.from_positions(tuple(input_ids.shape), *positions)
        if batched:
            self._prepare_stacks(whole=False, lm=True)

    def _end_pass(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        self._lm_pending = None
        self._whole_plans = {}  # a vision tower run outside the next pass works its path out afresh
        if not self._pass_open:
            return
        self._pass_open = False
        self._site_whole, self._site_lm = {}, {}  # with gradients they hold this pass's graph
        for editor in self.editors():
            editor.end_pass()

    # -- the site hooks -----------------------------------------------------------------------
    def _whole_hook(self, group: str, key: str):
        editor = getattr(self, group)[key]
        site, pack_key, d = (group, key), ("whole", group, key), editor.d
        drops = editor.dropout.p > 0  # fixed at construction; whether it is active is editor.training

        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            if self._graph_skip == id(module):  # a graph replay: edited inside the graph (graphs.py)
                self._graph_skip = 0
                return None
            self.edit_counts[group] += 1
            hidden = _first(output)
            params = self._site_whole.get(site)
            if params is None and not self._pass_open and not torch.is_grad_enabled():
                # transformers ≥ 5.2x generate() runs the vision tower before the model's forward
                # (outside a pass): without gradients the kept stacks serve it all the same.
                params = self._inference_stacks()[0].get(site)
            if params is None or (drops and editor.training) or hidden.shape[-1] != d:
                return _replace_first(output, editor(hidden))  # outside a pass, dropout, or a size error
            path = self._whole_path(hidden, params[0])
            if path == "infer":  # inference on a GPU: the whole edit in one kernel (kernels.py)
                packed = self._packed(pack_key, params, hidden, True)
                if packed is not None:
                    return _replace_first(output, kernels.edit_whole(hidden, packed))
            elif path == "train":  # training on a GPU
                return _replace_first(output, kernels.edit_whole_with_grad(hidden, *params))
            return _replace_first(output, edit_whole(hidden, *params))

        return hook

    def _whole_path(self, hidden: torch.Tensor, u: torch.Tensor) -> str:
        """Which path the visual/projector sites take for hidden states like `hidden`: "infer" (the
        fused inference kernel), "train" (`EditWhole`) or "ops" (the operator path). Worked out by
        the first site of a pass for each (device, dtype, grad mode) and reused by the other 22: on
        a launch-bound vision tower every host microsecond per site shows in the step time."""
        grad = torch.is_grad_enabled()
        key = (hidden.device, hidden.dtype, u.dtype, grad)
        path = self._whole_plans.get(key)
        if path is None:
            if kernels.usable(hidden):
                path = "infer"
            elif grad and kernels.trainable(hidden, u):
                path = "train"
            else:
                path = "ops"
            self._whole_plans[key] = path
        return path

    # -- CUDA graphs of the vision layers (graphs.py) ------------------------------------------
    def use_cuda_graphs(self, enabled: bool = True, backend: Any = None, max_shapes: int = 8,
                        inference: bool = False) -> bool:
        """Replay each vision-encoder layer, editor included, as CUDA graphs in training passes
        (graphs.py says when a call runs eagerly instead: CPU tensors always do, so this may be
        called before the model moves to its GPU). Returns whether the layers are now graphed.
        `inference`: passes without gradients too (generation's prompt passes), as forward-only
        graphs with the inference kernel. `max_shapes`: input shapes (batch sizes) that get graphs.
        `backend`: `graphs.EagerGraphs` for tests. `use_cuda_graphs(False)` restores the layers
        and frees the graphs."""
        from .graphs import LayerGraphs

        if self._graphs is not None:
            self._graphs.remove()
            self._graphs = None
        self._graph_skip = 0
        model = self._model_ref() if self._model_ref is not None else None
        if not enabled or model is None:
            return False
        _, vision_layers, _, _ = llava_modules(model)
        self._graph_sites = {int(k): ("visual", k) for k in self.visual}
        self._graphs = LayerGraphs(vision_layers, binding=self, backend=backend, max_shapes=max_shapes,
                                   inference=inference).install()
        return True

    @property
    def graphs(self) -> Any:
        """The `LayerGraphs` in use (its `stats` count replays, eager calls, captures), or None."""
        return self._graphs

    def graph_params(self, index: int, hidden: torch.Tensor) -> tuple | None:
        """The inputs a graph of vision layer `index` takes this call: () for a layer without an
        editor, (U, W − U, b) for an edited one, None when the call must run eagerly — the editor
        would not take the training path (no pass open, dropout, checkpointing, a size mismatch)."""
        if self._checkpointing():
            return None
        site = self._graph_sites.get(index)
        if site is None:
            return ()
        editor = self.visual[site[1]]
        params = self._site_whole.get(site)
        if params is None and not self._pass_open and not torch.is_grad_enabled():
            params = self._inference_stacks()[0].get(site)  # as the hook: generate()'s early vision pass
        if params is None or (editor.dropout.p > 0 and editor.training) or hidden.shape[-1] != editor.d:
            return None
        path = self._whole_path(hidden, params[0])
        if path == "infer":  # the inference kernel's packed (W − U, U, b), kept until a parameter changes
            return self._packed(("whole",) + site, params, hidden, True)
        return params

    def graph_edit(self, index: int, module: nn.Module, output: Any, params: tuple) -> Any:
        """The editor of vision layer `index` applied to its output, inside the graph (`params` as
        `graph_params` gave them: packed for the inference kernel, (U, W − U, b) otherwise)."""
        if index not in self._graph_sites:
            return output
        hidden = _first(output)
        path = self._whole_path(hidden, params[0])
        if path == "infer":
            return _replace_first(output, kernels.edit_whole(hidden, params))
        if path == "train":
            return _replace_first(output, kernels.edit_whole_with_grad(hidden, *params))
        return _replace_first(output, edit_whole(hidden, *params))

    def graph_edited(self, index: int, module: nn.Module) -> None:
        if index in self._graph_sites:
            self.edit_counts["visual"] += 1
            self._graph_skip = id(module)

    def _lm_hook(self, layer: int):
        key = str(layer)
        groups = tuple(g for g in ("prefix", "suffix") if key in getattr(self, g))
        editors = tuple(getattr(self, g)[key] for g in groups)
        ranks = tuple(e.r for e in editors)
        dropping = lambda: any(e.dropout.p > 0 and e.training for e in editors)  # noqa: E731

        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            if not self._edit_lm:
                return None
            if self._lm_pending is not None:
                self._prepare_lm()
            sites = self._sites
            hidden = _first(output)
            if sites is None or tuple(hidden.shape[:2]) != sites.shape:
                raise RuntimeError(
                    f"MRT editors on LM layer {layer}: hidden states of shape {tuple(hidden.shape[:2])} do not "
                    f"match the positions computed for this forward ({sites.shape if sites else None}); "
                    "call the model the editors were attached to, not its inner language model"
                )
            device = hidden.device
            params = self._site_lm.get(layer)
            plan_key = (device, hidden.dtype, groups, None if params is None else params[0].dtype)
            plan = self._lm_plans.get(plan_key)
            if plan is None:  # the first hook of the pass with this key: the rest reuse it
                present = tuple(g for g in groups if sites.slots(device, g)[0].numel())
                train = params is not None and torch.is_grad_enabled() and kernels.trainable(hidden, params[0])
                plan = self._lm_plans[plan_key] = (present, kernels.usable(hidden), train)
            present, usable, train = plan
            if not present:
                return None
            for group in present:
                self.edit_counts[group] += 1
            if (params is None or present != groups or (self._dropout_on and dropping())
                    or hidden.shape[-1] != editors[0].d):
                edits = [(getattr(self, g)[key], *sites.slots(device, g)) for g in present]
                return _replace_first(output, edit_rows_per_editor_(hidden, edits))
            # Prefix and suffix rows in one in-place pass (one gradient copy in backward instead of
            # out-of-place index_put and full-size zero-filled gradients): see ops.edit_rows_stacked_.
            idx, mask = sites.fused(device, groups, ranks, _compute_dtype(hidden.dtype, params[0].dtype))
            packed = self._packed(("lm", layer), params, hidden, usable)
            if packed is not None:  # inference on a GPU: the whole edit in one kernel (kernels.py)
                hidden = _writable(hidden)
                kernels.edit_rows_no_grad_(hidden.view(-1, hidden.shape[-1]), idx,
                                   sites.padded_mask(mask, packed[0].shape[0]), packed)
                return _replace_first(output, hidden)
            if train:  # training on a GPU
                return _replace_first(output, kernels.edit_rows_with_grad(_writable(hidden), idx, mask, *params))
            return _replace_first(output, edit_rows_stacked_(hidden, idx, mask, *params))

        return hook

    # -- wiring -------------------------------------------------------------------------------
    def _hook(self, model: nn.Module) -> None:
        """Register the site hooks and the pass hooks; the banks go to the devices of the layers they edit."""
        _, vision_layers, projector, lm_layers = llava_modules(model)
        handles = []
        try:
            devices: dict[int, torch.device] = {}
            for key, editor in self.visual.items():
                layer = vision_layers[int(key)]
                devices[id(editor)] = _device_of(layer)
                handles.append(layer.register_forward_hook(self._whole_hook("visual", key), prepend=True))
            if "out" in self.projector:
                devices[id(self.projector["out"])] = _device_of(projector)
                handles.append(projector.register_forward_hook(self._whole_hook("projector", "out"), prepend=True))
            self._lm_hooks = []
            for layer_idx in sorted({*self.layers["prefix"], *self.layers["suffix"]}):
                layer = lm_layers[layer_idx]
                for group in ("prefix", "suffix"):
                    if str(layer_idx) in getattr(self, group):
                        devices[id(getattr(self, group)[str(layer_idx)])] = _device_of(layer)
                self._lm_hooks.append((layer, self._lm_hook(layer_idx)))
            self._arm_lm_hooks()
            handles.append(model.register_forward_pre_hook(self._begin_pass, with_kwargs=True, prepend=True))
            handles.append(model.register_forward_hook(self._end_pass, with_kwargs=True, always_call=True))
        except Exception:
            for handle in handles:
                handle.remove()
            self._disarm_lm_hooks()
            self._lm_hooks = []
            raise
        self._handles = handles
        self._make_banks(devices)  # each bank on the device of the layers it edits
        self._hooked_layers = [vision_layers[int(k)] for k in self.visual] + [
            lm_layers[i] for i in sorted({*self.layers["prefix"], *self.layers["suffix"]})
        ]
