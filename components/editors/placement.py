"""Where the editors sit: layer specs resolved against a LLaVA config, without touching weights.

Kept apart from the hooks (`hooks.py`, `fast/sites.py`) because parameter counting (`mrt params --count`) and
`editor_config.json` need the resolved placement of a model that may never be instantiated.

Layer specs (EditorParams' `layers`): a list of ints, an inclusive range "a-b", or one of "all",
"odd", "even" (0-based indices), "none", "first_half" (layers [0, n//2)), "second_half"
([n//2, n)). For the visual group the words range over the vision layers whose outputs LLaVA
actually reads — 0 .. n_layers + vision_feature_layer (0..n−2 for the default −2): editing a later
layer cannot change the model's output, so naming one is an error rather than wasted parameters.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

GROUPS = ("visual", "projector", "prefix", "suffix")
_RANGE = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*$")


class PlacementError(ValueError):
    """An editor placement names a layer that does not exist or cannot matter."""


def resolve_layers(spec: Any, n_layers: int, group: str, *, model_layers: int | None = None) -> list[int]:
    """Layer indices (sorted, unique) selected by `spec` among `n_layers` editable layers.

    `model_layers` (≥ n_layers) is the module's real depth, so that an index between the two is
    reported as "past the vision feature layer" rather than "beyond the model".
    """
    model_layers = n_layers if model_layers is None else model_layers
    key = f"editors.{group}.layers"
    if isinstance(spec, bool):
        raise PlacementError(f"{key}: expected a list of ints, 'a-b' or a word, got {spec!r}")
    if isinstance(spec, int):
        spec = [spec]
    if isinstance(spec, str):
        word = spec.strip()
        words = {
            "all": range(n_layers),
            "none": range(0),
            "odd": range(1, n_layers, 2),
            "even": range(0, n_layers, 2),
            "first_half": range(n_layers // 2),
            "second_half": range(n_layers // 2, n_layers),
        }
        if word in words:
            return list(words[word])
        m = _RANGE.match(word)
        if not m:
            raise PlacementError(
                f"{key}: unknown layer spec {spec!r} (expected ints, 'a-b' or one of {', '.join(words)})"
            )
        lo, hi = int(m.group(1)), int(m.group(2))
        if lo > hi:
            raise PlacementError(f"{key}: empty range {spec!r}")
        spec = list(range(lo, hi + 1))
    if not isinstance(spec, (list, tuple)):
        raise PlacementError(f"{key}: expected a list of ints, 'a-b' or a word, got {type(spec).__name__}")
    layers = sorted(set(spec))
    for layer in layers:
        if not isinstance(layer, int) or isinstance(layer, bool) or layer < 0:
            raise PlacementError(f"{key}: layer {layer!r} is not a non-negative int")
        if layer >= model_layers:
            raise PlacementError(
                f"{key}: layer {layer} is beyond the model ({model_layers} layers, 0-{model_layers - 1})"
            )
        if layer >= n_layers:
            raise PlacementError(
                f"{key}: layer {layer} is past the vision feature layer — LLaVA never reads its output "
                f"(editable layers 0-{n_layers - 1})"
            )
    return layers


def readable_vision_layers(n_layers: int, vision_feature_layer: int | list[int]) -> int:
    """How many leading vision layers can influence LLaVA's image features.

    `hidden_states` has n_layers + 1 entries (embeddings, then each layer's output), so index k
    (negative allowed) is the output of layer k − 1; LLaVA reads index `vision_feature_layer`
    (or each of a list), so layers 0 .. max(k) − 1 matter.
    """
    ks = [vision_feature_layer] if isinstance(vision_feature_layer, int) else list(vision_feature_layer)
    if not ks:
        raise PlacementError("vision_feature_layer is an empty list")
    total = n_layers + 1
    for k in ks:
        if not -total <= k < total:
            raise PlacementError(f"vision_feature_layer {k} is out of range for {n_layers} vision layers")
    return max(k % total for k in ks)


@dataclass(frozen=True)
class ModelDims:
    """The LLaVA shapes the editors depend on, read from a LlavaConfig."""

    vision_layers: int
    vision_hidden: int
    text_layers: int
    text_hidden: int
    readable_vision_layers: int
    image_token_id: int | None

    @classmethod
    def from_config(cls, config: Any) -> "ModelDims":
        try:
            vision, text = config.vision_config, config.text_config
            n_vis = int(vision.num_hidden_layers)
            return cls(
                vision_layers=n_vis,
                vision_hidden=int(vision.hidden_size),
                text_layers=int(text.num_hidden_layers),
                text_hidden=int(text.hidden_size),
                readable_vision_layers=readable_vision_layers(n_vis, config.vision_feature_layer),
                image_token_id=getattr(config, "image_token_id", None),
            )
        except AttributeError as exc:
            raise PlacementError(f"model config is not a LLaVA config (missing {exc.name!r})") from None

    def group_dim(self, group: str) -> int:
        return self.vision_hidden if group == "visual" else self.text_hidden


def resolve_placement(config: Any, params: Any) -> dict[str, list[int]]:
    """Resolved layers per group for `params` (an EditorParams) on `config` (a LlavaConfig).

    The projector has one site; it is reported as `[0]` when enabled and `[]` otherwise.
    """
    dims = ModelDims.from_config(config)
    return {
        "visual": resolve_layers(
            params.visual.layers, dims.readable_vision_layers, "visual", model_layers=dims.vision_layers
        ),
        "projector": [0] if params.projector.enabled else [],
        "prefix": resolve_layers(params.prefix.layers, dims.text_layers, "prefix"),
        "suffix": resolve_layers(params.suffix.layers, dims.text_layers, "suffix"),
    }


def group_rank(params: Any, group: str) -> int:
    return getattr(params, group).rank


def _compact(layers: Sequence[int]) -> str:
    """[0, 1, 2, 5, 7, 8] → "0-2,5,7-8"."""
    out, run = [], []
    for x in layers:
        if run and x == run[-1] + 1:
            run.append(x)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [x]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)


def describe_placement(editors: Any, model_config: Any = None) -> dict[str, str]:
    """groups / layers / ranks / lengths of an EditorParams as short strings for tables.

    With the base's config the layer words are resolved to indices (a group whose words select no
    layer of this model counts as off); without it, or if the placement does not fit the model, the
    specs are shown as written.
    """
    resolved = None
    if model_config is not None:
        try:
            resolved = resolve_placement(model_config, editors)
        except PlacementError:
            resolved = None
    on, layers = [], []
    for g in ("visual", "projector", "prefix", "suffix"):
        if g == "projector":
            if editors.projector.enabled:
                on.append(g)
            continue
        spec = getattr(editors, g).layers
        if resolved is not None:
            if resolved[g]:
                on.append(g)
                layers.append(f"{g}={_compact(resolved[g])}")
        elif spec not in ("none", []):
            on.append(g)
            layers.append(f"{g}={spec if isinstance(spec, str) else _compact(spec)}")
    return {
        "groups": "+".join(on) or "none",
        "layers": ";".join(layers),
        "ranks": ";".join(f"{g}={getattr(editors, g).rank}" for g in on),
        "lengths": ";".join(f"{g}={getattr(editors, g).length}" for g in on if g in ("prefix", "suffix")),
    }

