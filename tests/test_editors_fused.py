"""The fast hooks' per-pass stacks and fused prefix+suffix edits compute what the reference hooks
(one `LoReFT.forward` per site) compute: same logits, loss and editor gradients — for the uniform
placement (one stack viewed per layer) and for placements that need the fallbacks (different
prefix/suffix ranks, different layer sets) — and the no-grad stacks follow every parameter change."""

from __future__ import annotations

import pytest
import torch
from test_editors import batch, editor_params, tiny_llava, words

from components.editors import attach
from components.editors.fast import sites as fast_sites


@pytest.fixture(scope="module")
def model():
    return tiny_llava(1)


def _reference(params):
    return params.model_copy(update={"impl": "reference"})


def _run(model, params, b, *, state=None):
    """Loss, logits, editor gradients and state of one training forward+backward."""
    editors = attach(model, params)
    try:
        if state is not None:
            editors.load_state_dict(state)
        editors.train()
        out = model(**b)
        out.loss.backward()
        grads = {n: g.clone() for n, g in editors.editor_grads().items()}
        return out.loss.detach(), out.logits.detach(), grads, {k: v.clone() for k, v in editors.state_dict().items()}
    finally:
        editors.detach()


PLACEMENTS = {
    "uniform": dict(visual={"layers": "all"}, projector={"enabled": True}, prefix={"layers": "all"},
                    suffix={"layers": "all"}),
    "ranks_differ": dict(prefix={"layers": "all", "rank": 2}, suffix={"layers": "all", "rank": 3}),
    "layers_differ": dict(visual={"layers": [1]}, prefix={"layers": [0]}, suffix={"layers": "all"}),
}


@pytest.mark.parametrize("name", sorted(PLACEMENTS))
def test_stacked_fused_path_equals_per_editor_path(model, name):
    params = editor_params(**PLACEMENTS[name])
    b = batch([words(9), words(5), words(2)], answers=[words(3, 30), words(2, 31), words(4, 32)])
    loss_f, logits_f, grads_f, state = _run(model, params, b)
    loss_r, logits_r, grads_r, _ = _run(model, _reference(params), b, state=state)
    torch.testing.assert_close(loss_f, loss_r, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(logits_f, logits_r, atol=1e-5, rtol=1e-5)
    assert grads_f.keys() == grads_r.keys() and grads_f
    for k in grads_f:
        torch.testing.assert_close(grads_f[k], grads_r[k], atol=1e-5, rtol=1e-4, msg=k)
    assert any(g.abs().sum() > 0 for k, g in grads_f.items() if k.startswith("suffix"))


def _logits_of_reference(model, params, state, b):
    editors = attach(model, _reference(params))
    try:
        editors.load_state_dict(state)
        editors.eval()
        with torch.no_grad():
            return model(**b).logits
    finally:
        editors.detach()


def test_inference_stacks_are_kept_and_follow_parameter_changes(model, monkeypatch):
    """Without gradients an unchanged set of editors is orthonormalised once, not per pass; any
    parameter change gives the reference hooks' logits for the new values."""
    b = batch([words(7), words(4)])
    params = editor_params(**PLACEMENTS["uniform"])
    calls = []
    stacked = fast_sites.orthonormal_rows_stacked
    monkeypatch.setattr(fast_sites, "orthonormal_rows_stacked", lambda u: calls.append(1) or stacked(u))
    editors = attach(model, params)
    try:
        editors.eval()
        with torch.no_grad():
            first = model(**b).logits
            assert calls
            n_calls = len(calls)
            again = model(**b).logits
            assert len(calls) == n_calls  # nothing orthonormalised again for unchanged editors
            torch.testing.assert_close(first, again, atol=0, rtol=0)
            for change in (lambda: editors.suffix["1"].W.bias.add_(0.3), lambda: editors.visual["0"].U.add_(0.2),
                           lambda: editors.prefix["0"].W.weight.mul_(1.5)):
                before = model(**b).logits
                change()
                after = model(**b).logits
                assert not torch.allclose(before, after)
                state = {k: v.clone() for k, v in editors.state_dict().items()}
                editors.detach()
                torch.testing.assert_close(after, _logits_of_reference(model, params, state, b), atol=1e-5, rtol=1e-5)
                editors = attach(model, params)
                editors.load_state_dict(state)
                editors.eval()
    finally:
        editors.detach()


def test_gradients_accumulate_over_training_passes(model):
    """Two forward+backward passes give twice one pass's gradients: no pass reuses another's graph."""
    b = batch([words(6)], answers=[words(2, 30)])
    editors = attach(model, editor_params(**PLACEMENTS["uniform"]))
    try:
        editors.train()
        model(**b).loss.backward()
        once = {k: g.clone() for k, g in editors.editor_grads().items()}
        model(**b).loss.backward()
        for k, g in editors.editor_grads().items():
            torch.testing.assert_close(g, 2 * once[k], atol=1e-6, rtol=1e-5, msg=k)
    finally:
        editors.detach()


def test_vision_tower_run_outside_a_forward_uses_the_kept_stacks(model, monkeypatch):
    """transformers ≥ 5.2x generate() encodes the image before calling the model, so the vision
    hooks fire outside a pass: without gradients they must still use the kept stacks (not the
    per-editor path) and give what the reference hooks give."""
    from components.editors.fast.editor import BankedLoReFT
    from components.editors import llava_modules

    params = editor_params(**PLACEMENTS["uniform"])
    editors = attach(model, params)
    calls = []
    forward = BankedLoReFT.forward
    monkeypatch.setattr(BankedLoReFT, "forward", lambda self, h: calls.append(1) or forward(self, h))
    try:
        editors.eval()
        core = llava_modules(model)[0]
        pixels = batch([words(3)])["pixel_values"]
        with torch.no_grad():
            got = core.vision_tower(pixels).last_hidden_state
        assert not calls and editors.edit_counts["visual"] > 0
        state = editors.state_dict()
    finally:
        editors.detach()
    reference = attach(model, _reference(params))
    try:
        reference.load_state_dict(state)
        reference.eval()
        with torch.no_grad():
            want = core.vision_tower(pixels).last_hidden_state
        assert reference.edit_counts["visual"] > 0
    finally:
        reference.detach()
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
