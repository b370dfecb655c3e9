"""The hooks' per-pass stacks and fused prefix+suffix edits (issue 7) compute exactly what the
per-editor path computes: same logits, same loss, same editor gradients — for the uniform
placement (one stack viewed per layer) and for placements that need the fallbacks (different
prefix/suffix ranks, different layer sets) — and the no-grad stacks follow every parameter change."""

from __future__ import annotations

import pytest
import torch
from test_editors import batch, editor_params, tiny_llava, words

from components.editors import attach
from components.editors.fast.sites import MRTEditors


@pytest.fixture(scope="module")
def model():
    return tiny_llava(1)


def _run(model, params, b, *, per_editor: bool, state=None):
    """Loss, logits and editor gradients of one training forward+backward, with the per-pass stacks
    (per_editor=False) or with every site falling back to its own editor module."""
    editors = attach(model, params)
    try:
        if state is not None:
            editors.load_state_dict(state)
        editors.train()
        if per_editor:
            editors._build_stacks = lambda whole, lm: ({}, {})  # hooks then call the editors one by one
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
    loss_f, logits_f, grads_f, state = _run(model, params, b, per_editor=False)
    loss_r, logits_r, grads_r, _ = _run(model, params, b, per_editor=True, state=state)
    torch.testing.assert_close(loss_f, loss_r, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(logits_f, logits_r, atol=1e-5, rtol=1e-5)
    assert grads_f.keys() == grads_r.keys() and grads_f
    for k in grads_f:
        torch.testing.assert_close(grads_f[k], grads_r[k], atol=1e-5, rtol=1e-4, msg=k)
    assert any(g.abs().sum() > 0 for k, g in grads_f.items() if k.startswith("suffix"))


def test_inference_stacks_are_kept_and_follow_parameter_changes(model):
    b = batch([words(7), words(4)])
    editors = attach(model, editor_params(**PLACEMENTS["uniform"]))
    try:
        editors.eval()
        with torch.no_grad():
            first = model(**b).logits
            cached = editors._stack_cache
            again = model(**b).logits
            assert editors._stack_cache is cached  # nothing rebuilt for an unchanged set of editors
            torch.testing.assert_close(first, again, atol=0, rtol=0)
            for change in (lambda: editors.suffix["1"].W.bias.add_(0.3), lambda: editors.visual["0"].U.add_(0.2),
                           lambda: editors.prefix["0"].W.weight.mul_(1.5)):
                before = model(**b).logits
                change()
                after = model(**b).logits
                assert editors._stack_cache is not cached
                cached = editors._stack_cache
                assert not torch.allclose(before, after)
            # and the cached result equals a fresh build
            editors._stack_cache = None
            torch.testing.assert_close(model(**b).logits, after, atol=0, rtol=0)
    finally:
        editors.detach()


def test_stacks_do_not_outlive_a_training_pass(model):
    b = batch([words(6)], answers=[words(2, 30)])
    editors = attach(model, editor_params(**PLACEMENTS["uniform"]))
    try:
        editors.train()
        for _ in range(2):  # a second pass must not reuse the first pass's graph
            model(**b).loss.backward()
            assert editors._site_whole == {} and editors._site_lm == {}
    finally:
        editors.detach()
    assert isinstance(editors, MRTEditors)


def test_vision_tower_run_outside_a_forward_uses_the_kept_stacks(model, monkeypatch):
    """transformers ≥ 5.2x generate() encodes the image before calling the model, so the vision
    hooks fire outside a pass: without gradients they must still use the kept stacks (not the
    per-editor path) and give what the per-editor path gives."""
    from components.editors.fast.editor import BankedLoReFT
    from components.editors import llava_modules

    editors = attach(model, editor_params(**PLACEMENTS["uniform"]))
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
            monkeypatch.setattr(editors, "_inference_stacks", lambda: ({}, {}))
            want = core.vision_tower(pixels).last_hidden_state
        assert calls  # the reference really took the per-editor path
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    finally:
        editors.detach()
