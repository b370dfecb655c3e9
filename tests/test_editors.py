"""MRT editors: the LoReFT formula, prefix/suffix positions, hook placement on a stock tiny LLaVA,
generation, detach, save/load and the LLaVA-7B parameter count."""

from __future__ import annotations

import copy
import json
import math
import time

import pytest
import torch

from components.core.config import EditorParams
from components.editors.count import count_parameters, llava_7b_config, paper_placement_7b, parameter_report
from components.editors.io import EditorFileError, load_editors, model_fingerprint, save_editors
from components.editors.fast.editor import BankedLoReFT
from components.editors.loreft import LoReFT, orthonormal_rows
from components.editors.placement import PlacementError, resolve_layers, resolve_placement
from components.editors.positions import edit_positions
from components.editors import attach, llava_modules

IMG = 3  # image token id of the tiny model
PAD, BOS = 0, 1
N_IMAGE_TOKENS = 16  # (32 / 8)^2 patches, strategy "default" drops CLS


# ---------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------
def tiny_llava(seed: int = 0):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64
    )
    text = LlamaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, intermediate_size=64,
        vocab_size=64, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=2,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=IMG, vision_feature_layer=-2, image_seq_length=16
    )
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_llava(0)


@pytest.fixture(autouse=True)
def _no_leftover_editors(request):
    """Every test must detach what it attached (a leak would change the shared model's outputs)."""
    yield
    if "model" in request.fixturenames:  # attach refuses a model that still carries editors
        attach(request.getfixturevalue("model"), editor_params()).detach()


def batch(texts: list[list[int]], *, image: bool = True, left_pad: bool = False, answers=None, seed: int = 0):
    """input_ids / attention_mask / pixel_values (and labels when answers are given) for prompts
    `BOS [16 image tokens] text` (+ answer), padded to one length."""
    seqs, prompt_lens = [], []
    for i, text in enumerate(texts):
        seq = [BOS] + ([IMG] * N_IMAGE_TOKENS if image else []) + list(text)
        prompt_lens.append(len(seq))
        if answers is not None:
            seq += list(answers[i])
        seqs.append(seq)
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), PAD)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), -100)
    for i, seq in enumerate(seqs):
        start = width - len(seq) if left_pad else 0
        ids[i, start : start + len(seq)] = torch.tensor(seq)
        mask[i, start : start + len(seq)] = 1
        labels[i, start + prompt_lens[i] : start + len(seq)] = ids[i, start + prompt_lens[i] : start + len(seq)]
    out = {"input_ids": ids, "attention_mask": mask}
    if image:
        g = torch.Generator().manual_seed(seed)
        out["pixel_values"] = torch.randn(len(seqs), 3, 32, 32, generator=g)
    if answers is not None:
        out["labels"] = labels
    return out


def cache_kwarg(model) -> str:
    """The KV-cache argument/output name: `cache` from transformers 5.2x, `past_key_values` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def words(n: int, start: int = 10) -> list[int]:
    return [(start + i) % 50 + 10 for i in range(n)]


def editor_params(**groups) -> EditorParams:
    """EditorParams with every group off except the ones given."""
    base = {
        "visual": {"layers": "none", "rank": 2},
        "projector": {"enabled": False, "rank": 2},
        "prefix": {"layers": "none", "rank": 2, "length": 3},
        "suffix": {"layers": "none", "rank": 2, "length": 2},
    }
    for k, v in groups.items():
        base[k] = {**base[k], **v}
    return EditorParams.model_validate(base)


ALL_GROUPS = dict(
    visual={"layers": "all"}, projector={"enabled": True}, prefix={"layers": "all"}, suffix={"layers": "all"}
)


def capture(module: torch.nn.Module, store: list):
    """Record `module`'s output (registered after the editors' hooks, so it sees the edited one)."""
    def hook(mod, args, out):
        store.append((out[0] if isinstance(out, tuple) else out).detach().clone())

    return module.register_forward_hook(hook)


def reference_psi(h, U, W, b):
    """The paper's formula written independently, in float64: h + Uᵀ(W h + b − U h)."""
    h64, U64, W64, b64 = h.double(), U.double(), W.double(), b.double()
    return h64 + ((h64 @ W64.T + b64) - h64 @ U64.T) @ U64


# ---------------------------------------------------------------------------------------------
# LoReFT
# ---------------------------------------------------------------------------------------------
def test_loreft_matches_formula_and_parameter_count():
    torch.manual_seed(0)
    ed = LoReFT(48, 5)
    assert sum(p.numel() for p in ed.parameters()) == 2 * 48 * 5 + 5 == LoReFT.parameter_count(48, 5)
    with torch.no_grad():
        ed.W.bias.normal_()  # b non-zero so it is exercised
    h = torch.randn(4, 7, 48)
    want = reference_psi(h, ed.U, ed.W.weight, ed.W.bias)
    torch.testing.assert_close(ed(h).double(), want, atol=1e-5, rtol=1e-5)
    # bf16 hidden states: computed in fp32, cast once to the hidden dtype
    hb = h.to(torch.bfloat16)
    out = ed(hb)
    assert out.dtype == torch.bfloat16 and out.shape == hb.shape
    assert torch.equal(out, reference_psi(hb.float(), ed.U, ed.W.weight, ed.W.bias).float().to(torch.bfloat16))
    with pytest.raises(ValueError, match="size 47"):
        ed(torch.randn(2, 47))
    with pytest.raises(ValueError, match="exceeds"):
        LoReFT(4, 5)


def test_loreft_init_is_not_identity_but_close():
    torch.manual_seed(0)
    ed = LoReFT(256, 4)
    u = orthonormal_rows(ed.U)
    torch.testing.assert_close(u @ u.T, torch.eye(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(u, ed.U, atol=1e-5, rtol=0)  # sign-fixed QR keeps an orthonormal U
    assert torch.count_nonzero(ed.W.bias) == 0
    h = torch.randn(512, 256)
    rel = ((ed(h) - h).norm(dim=-1) / h.norm(dim=-1)).mean().item()
    assert 0.5 * math.sqrt(4 * 4 / (3 * 256)) < rel < 2 * math.sqrt(4 * 4 / (3 * 256))


def test_basis_stays_orthonormal_through_training():
    torch.manual_seed(0)
    ed = BankedLoReFT(32, 4)
    opt = torch.optim.Adam(ed.parameters(), lr=0.1)
    x, y = torch.randn(64, 32), torch.randn(64, 32)
    u0 = ed.U.detach().clone()
    for _ in range(5):
        opt.zero_grad()
        ((ed(x) - y) ** 2).mean().backward()
        opt.step()
    assert not torch.allclose(ed.U, u0)
    u = ed.basis()
    torch.testing.assert_close(u @ u.T, torch.eye(4), atol=1e-5, rtol=0)
    assert not torch.allclose(ed.U @ ed.U.T, torch.eye(4), atol=1e-3)  # raw parameter drifted; basis did not


def test_basis_cached_per_pass_and_gradients_flow_through_it():
    torch.manual_seed(0)
    ed = BankedLoReFT(16, 3)
    h1, h2 = torch.randn(5, 16), torch.randn(6, 16)
    # reference gradient: two independent calls, fresh QR each
    (ed(h1).sum() + ed(h2).pow(2).sum()).backward()
    want = ed.U.grad.clone()
    ed.U.grad = None
    ed.begin_pass()
    assert ed.basis() is ed.basis()  # one QR per pass
    (ed(h1).sum() + ed(h2).pow(2).sum()).backward()
    torch.testing.assert_close(ed.U.grad, want)
    with torch.no_grad():
        ed.U.add_(0.1)  # an optimiser step bumps the version: the cache must not serve the old basis
    fresh = ed.basis()
    from components.editors.loreft import orthonormal_rows

    torch.testing.assert_close(fresh, orthonormal_rows(ed.U))
    ed.end_pass()
    assert ed.basis() is not ed.basis()  # outside a pass: always recomputed


def test_batched_orthonormalisation_matches_per_editor_values_and_gradients():
    from components.editors.loreft import orthonormal_rows
    from components.editors.fast.ops import orthonormal_rows_stacked

    torch.manual_seed(0)
    us = [torch.randn(3, 24, requires_grad=True) for _ in range(4)]
    weights = [torch.randn(3, 24) for _ in us]
    single = [orthonormal_rows(u) for u in us]
    sum((q * w).sum() for q, w in zip(single, weights)).backward()
    grads = [u.grad.clone() for u in us]
    for u in us:
        u.grad = None
    batched = orthonormal_rows_stacked(torch.stack(us)).unbind(0)
    sum((q * w).sum() for q, w in zip(batched, weights)).backward()
    for a, b, u, g in zip(single, batched, us, grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(u.grad, g, atol=1e-4, rtol=1e-4)


def test_dropout_acts_on_the_delta_only():
    torch.manual_seed(0)
    ed = LoReFT(16, 4, dropout=0.5).train()
    h = torch.randn(200, 16)
    with torch.no_grad():
        delta = ed.eval()(h) - h
        out = ed.train()(h)
    got = out - h
    dropped = got.abs() < 1e-6
    kept = torch.isclose(got, 2 * delta, atol=1e-5)
    assert bool((dropped | kept).all())
    assert 0.3 < dropped.float().mean().item() < 0.7  # h itself is never dropped


# ---------------------------------------------------------------------------------------------
# positions
# ---------------------------------------------------------------------------------------------
def naive_positions(ids, mask, prompt, image_id, p, s):
    """Per-sample loop reference for edit_positions."""
    out = []
    for i in range(ids.shape[0]):
        att = [j for j in range(ids.shape[1]) if mask[i, j]]
        imgs = [j for j in att if ids[i, j] == image_id]
        anchor = imgs[-1] if imgs else att[0]
        instr = [j for j in range(anchor + 1, ids.shape[1]) if mask[i, j] and prompt[i, j]]
        n = len(instr)
        pe, se = (min(p, n // 2), min(s, n // 2)) if n < p + s else (p, s)
        out.append((instr[:pe], instr[n - se :] if se else []))
    return out


def as_lists(idx, valid):
    return [[int(t) for t, v in zip(row, vrow) if v] for row, vrow in zip(idx, valid)]


def test_positions_right_and_left_padding_and_no_image():
    text = words(8)
    for left in (False, True):
        b = batch([text, words(3)], left_pad=left)
        pi, pv, si, sv = edit_positions(b["input_ids"], b["attention_mask"], IMG, 3, 2)
        assert pi.dtype == torch.long and pv.dtype == torch.bool and pi.shape == (2, 3) and si.shape == (2, 2)
        offsets = [int((b["attention_mask"][i] == 0).sum()) if left else 0 for i in range(2)]
        rel_p = [[t - offsets[i] for t in row] for i, row in enumerate(as_lists(pi, pv))]
        rel_s = [[t - offsets[i] for t in row] for i, row in enumerate(as_lists(si, sv))]
        first = 1 + N_IMAGE_TOKENS  # text starts after BOS + image tokens
        assert rel_p == [[first, first + 1, first + 2], [first]]  # 3 tokens < 3+2 → clamp to 1 each
        assert rel_s == [[first + 6, first + 7], [first + 2]]
    b = batch([text], image=False)
    pi, pv, si, sv = edit_positions(b["input_ids"], b["attention_mask"], IMG, 3, 2)
    assert as_lists(pi, pv) == [[1, 2, 3]] and as_lists(si, sv) == [[7, 8]]  # after BOS


def test_positions_short_text_clamps_to_half():
    for n, want in ((7, 3), (5, 2), (1, 0), (0, 0), (8, 4)):
        b = batch([words(n)])
        pi, pv, si, sv = edit_positions(b["input_ids"], b["attention_mask"], IMG, 4, 4)
        assert int(pv.sum()) == want and int(sv.sum()) == want, n
        assert not set(as_lists(pi, pv)[0]) & set(as_lists(si, sv)[0])


def test_positions_suffix_is_last_prompt_tokens_not_answer():
    b = batch([words(6), words(9)], answers=[[20, 21, 22], [23]])
    prompt = b["attention_mask"].bool() & (b["labels"] == -100)
    pi, pv, si, sv = edit_positions(b["input_ids"], b["attention_mask"], IMG, 2, 2, prompt_mask=prompt)
    first = 1 + N_IMAGE_TOKENS
    assert as_lists(si, sv) == [[first + 4, first + 5], [first + 7, first + 8]]
    assert as_lists(pi, pv) == [[first, first + 1]] * 2


def test_positions_match_naive_reference_on_random_batches():
    g = torch.Generator().manual_seed(0)
    for trial in range(30):
        B, T = 5, 24
        ids = torch.randint(4, 60, (B, T), generator=g)
        ids[torch.rand(B, T, generator=g) < 0.15] = IMG
        lengths = torch.randint(1, T + 1, (B,), generator=g)
        ar = torch.arange(T)
        mask = ar[None] < lengths[:, None] if trial % 2 else ar[None] >= (T - lengths)[:, None]
        prompt = mask & (torch.rand(B, T, generator=g) < 0.8)
        p, s = int(torch.randint(0, 5, (1,), generator=g)), int(torch.randint(0, 5, (1,), generator=g))
        pi, pv, si, sv = edit_positions(ids, mask.long(), IMG, p, s, prompt_mask=prompt)
        want = naive_positions(ids, mask, prompt, IMG, p, s)
        assert as_lists(pi, pv) == [w[0] for w in want]
        assert as_lists(si, sv) == [w[1] for w in want]
        assert bool((pi[~pv] == 0).all()) and bool((si[~sv] == 0).all())


# ---------------------------------------------------------------------------------------------
# placement
# ---------------------------------------------------------------------------------------------
def test_resolve_layers_words_ranges_and_errors():
    assert resolve_layers("all", 5, "prefix") == [0, 1, 2, 3, 4]
    assert resolve_layers("odd", 5, "prefix") == [1, 3]
    assert resolve_layers("even", 5, "prefix") == [0, 2, 4]
    assert resolve_layers("none", 5, "prefix") == []
    assert resolve_layers("first_half", 5, "prefix") == [0, 1]
    assert resolve_layers("second_half", 5, "prefix") == [2, 3, 4]
    assert resolve_layers("1-3", 5, "prefix") == [1, 2, 3]
    assert resolve_layers([4, 0, 4], 5, "prefix") == [0, 4]
    with pytest.raises(PlacementError, match=r"editors\.suffix\.layers: layer 5 is beyond the model"):
        resolve_layers("2-5", 5, "suffix")
    with pytest.raises(PlacementError, match=r"editors\.visual\.layers: layer 23 is past the vision feature layer"):
        resolve_layers([23], 23, "visual", model_layers=24)
    with pytest.raises(PlacementError, match=r"editors\.visual\.layers: layer 24 is beyond the model"):
        resolve_layers([24], 23, "visual", model_layers=24)


def test_visual_words_range_over_layers_llava_reads(model):
    layers = resolve_placement(model.config, editor_params(visual={"layers": "all"}))
    assert layers["visual"] == [0, 1]  # 3 layers, feature layer -2 → the last one is never read
    with pytest.raises(PlacementError, match="visual.*layer 2 is past the vision feature layer"):
        attach(model, editor_params(visual={"layers": [2]}))
    with pytest.raises(PlacementError, match="prefix.*layer 2 is beyond the model"):
        attach(model, editor_params(prefix={"layers": "0-2"}))


def test_count_llava_7b_paper_placement_on_meta_device():
    t0 = time.perf_counter()
    config, placement = llava_7b_config(), paper_placement_7b()
    counts = count_parameters(config, placement)
    assert counts == {
        "visual": 270_468, "projector": 49_158, "prefix": 1_048_704, "suffix": 1_048_704, "total": 2_417_034
    }
    report = parameter_report(config, placement)
    assert 7.0e9 < report["base_parameters"] < 7.1e9
    assert report["editor_percent"] == pytest.approx(0.034, abs=0.0005)
    assert time.perf_counter() - t0 < 20


# ---------------------------------------------------------------------------------------------
# hooks on the tiny LLaVA
# ---------------------------------------------------------------------------------------------
def test_only_editors_train_and_backbone_is_bit_identical(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    b = batch([words(8), words(5)], answers=[[20, 21], [22, 23, 24]])
    editors = attach(model, EditorParams.model_validate({**ALL_GROUPS, "visual": {"layers": "all", "rank": 2}}))
    try:
        snapshot = {k: v.clone() for k, v in editors.state_dict().items()}
        opt = torch.optim.Adam(editors.parameters(), lr=1e-2)
        for _ in range(3):
            opt.zero_grad()
            loss = model(**b).loss
            loss.backward()
            assert all(p.grad is not None for p in editors.parameters())
            opt.step()
        assert all(not p.requires_grad and p.grad is None for p in model.parameters())
        for k, v in model.state_dict().items():
            assert torch.equal(v, before[k]), k
        changed = {k for k, v in editors.state_dict().items() if not torch.equal(v, snapshot[k])}
        # The prefix editor of the LAST LM layer only changes prompt positions' logits, which the
        # answer-only loss ignores: it gets an exactly-zero gradient. Every other editor trains.
        assert changed == {k for k in snapshot if not k.startswith("prefix.1.")}
        for ed in editors.editors():
            u = orthonormal_rows(ed.U)
            torch.testing.assert_close(u @ u.T, torch.eye(u.shape[0]), atol=1e-5, rtol=0)
    finally:
        editors.detach()
    assert all(p.requires_grad for p in model.parameters())  # detach restores the flags


def _rows_changed(a: torch.Tensor, b: torch.Tensor) -> set[tuple[int, int]]:
    diff = (a != b).any(dim=-1)
    return {(int(i), int(j)) for i, j in diff.nonzero()}


@pytest.mark.parametrize("left_pad", [False, True])
def test_lm_hooks_edit_exactly_prefix_and_suffix_rows(model, left_pad):
    b = batch([words(9), words(6)], left_pad=left_pad)
    pi, pv, si, sv = edit_positions(b["input_ids"], b["attention_mask"], IMG, 3, 2)
    prefix_rows = {(i, int(t)) for i in range(2) for t, v in zip(pi[i], pv[i]) if v}
    suffix_rows = {(i, int(t)) for i in range(2) for t, v in zip(si[i], sv[i]) if v}
    lm = model.model.language_model.layers
    for group, rows, layer in (("prefix", prefix_rows, 0), ("suffix", suffix_rows, 1)):
        base, edited = [], []
        h = capture(lm[layer], base)
        with torch.no_grad():
            model(**b)
        h.remove()
        editors = attach(model, editor_params(**{group: {"layers": [layer]}}))
        h = capture(lm[layer], edited)
        try:
            with torch.no_grad():
                model(**b)
        finally:
            h.remove()
            editors.detach()
        assert _rows_changed(base[0], edited[0]) == rows
        ed = getattr(editors, group)[str(layer)]
        bi, ti = zip(*sorted(rows))
        with torch.no_grad():
            want = ed(base[0][list(bi), list(ti)])
        assert torch.equal(edited[0][list(bi), list(ti)], want)


def test_left_and_right_padding_edit_the_same_text_positions(model):
    lm = llava_modules(model)[3]
    edited = {}
    for left in (False, True):
        b = batch([words(9), words(4)], left_pad=left)
        base, out = [], []
        handle = capture(lm[0], base)
        with torch.no_grad():
            model(**b)
        handle.remove()
        editors = attach(model, editor_params(prefix={"layers": [0]}, suffix={"layers": [0]}))
        handle = capture(lm[0], out)
        try:
            with torch.no_grad():
                model(**b)
        finally:
            handle.remove()
            editors.detach()
        offsets = (b["attention_mask"] == 0).sum(1) if left else torch.zeros(2, dtype=torch.long)
        edited[left] = sorted((i, j - int(offsets[i])) for i, j in _rows_changed(base[0], out[0]))
    assert edited[False] == edited[True]
    assert len(edited[False]) == (3 + 2) + (2 + 2)  # prefix 3 + suffix 2; 4 tokens: clamped to 2 + 2


def test_visual_and_projector_hooks_edit_every_token(model):
    b = batch([words(5), words(5)])
    _, vis, proj, _ = llava_modules(model)
    base_v, base_p, ed_v, ed_p = [], [], [], []
    handles = [capture(vis[1], base_v), capture(proj, base_p)]
    with torch.no_grad():
        model(**b)
    for hd in handles:
        hd.remove()
    # visual on layer 1 only: layer 1's output and the projector input change; projector editor checked alone
    editors = attach(model, editor_params(visual={"layers": [1]}))
    handles = [capture(vis[1], ed_v)]
    try:
        with torch.no_grad():
            model(**b)
            want = editors.visual["1"](base_v[0])
    finally:
        for hd in handles:
            hd.remove()
        editors.detach()
    assert ed_v[0].shape[1] == N_IMAGE_TOKENS + 1  # CLS + patches
    assert bool((ed_v[0] != base_v[0]).any(-1).all())  # every token edited
    assert torch.equal(ed_v[0], want)

    editors = attach(model, editor_params(projector={"enabled": True}))
    handles = [capture(proj, ed_p)]
    try:
        with torch.no_grad():
            model(**b)
            want = editors.projector["out"](base_p[0])
    finally:
        for hd in handles:
            hd.remove()
        editors.detach()
    assert ed_p[0].shape[1] == N_IMAGE_TOKENS
    assert bool((ed_p[0] != base_p[0]).any(-1).all())
    assert torch.equal(ed_p[0], want)


def test_visual_edit_reaches_llava_features_even_after_capture_hooks_exist():
    """LLaVA reads vision features through transformers' capture hooks; a forward before attach
    installs them, and the edit of the last readable layer must still reach the LM."""
    model = tiny_llava(1)
    b = batch([words(5)])
    with torch.no_grad():
        base = model(**b).logits
    editors = attach(model, editor_params(visual={"layers": [1]}))
    try:
        with torch.no_grad():
            edited = model(**b).logits
    finally:
        editors.detach()
    assert not torch.allclose(base[:, 1:], edited[:, 1:])


def test_detach_restores_logits_exactly_and_removes_hooks(model):
    b = batch([words(7), words(3)], left_pad=True)

    def hook_counts():
        return [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]

    with torch.no_grad():
        base = model(**b).logits
    counts = hook_counts()  # after a forward: transformers adds its output-capturing hooks on the first one
    editors = attach(model, EditorParams.model_validate(ALL_GROUPS))
    with pytest.raises(RuntimeError, match="already carries MRT editors"):
        attach(model, EditorParams.model_validate(ALL_GROUPS))
    with torch.no_grad():
        edited = model(**b).logits
    editors.detach()
    with torch.no_grad():
        after = model(**b).logits
    assert not torch.allclose(base, edited)
    assert torch.equal(base, after)
    assert hook_counts() == counts


def test_generation_edits_only_the_prompt_pass(model):
    b = batch([words(7), words(4)], left_pad=True)
    editors = attach(model, EditorParams.model_validate(ALL_GROUPS))
    try:
        with torch.no_grad():
            model.generate(**b, max_new_tokens=3, do_sample=False, pad_token_id=PAD)
        n_vis, n_lm = len(editors.visual), len(model.model.language_model.layers)
        assert dict(editors.edit_counts) == {"visual": n_vis, "projector": 1, "prefix": n_lm, "suffix": n_lm}

        # one decode step on a copy of the edited cache, with and without editors: identical
        cache_kw = cache_kwarg(model)
        with torch.no_grad():
            out = model(**b, use_cache=True)
            cache = getattr(out, cache_kw)
            cache_copy = copy.deepcopy(cache)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            mask = torch.cat([b["attention_mask"], torch.ones_like(nxt)], dim=1)
            before = dict(editors.edit_counts)
            step_edited = model(input_ids=nxt, attention_mask=mask, use_cache=True, **{cache_kw: cache}).logits
            assert dict(editors.edit_counts) == before  # the decode step was not edited
    finally:
        editors.detach()
    with torch.no_grad():
        step_plain = model(input_ids=nxt, attention_mask=mask, use_cache=True, **{cache_kw: cache_copy}).logits
    assert torch.equal(step_edited, step_plain)


def test_decode_steps_call_no_lm_hook_and_the_next_prompt_is_edited_again(model):
    """Generation is host-bound: a decode step must not even enter the LM layers' hooks (they are
    removed for it), and the next prompt pass must put them back and be edited as before."""
    b = batch([words(7), words(4)], left_pad=True)
    layers = model.model.language_model.layers
    plain = [len(layer._forward_hooks) for layer in layers]
    editors = attach(model, EditorParams.model_validate(ALL_GROUPS))
    try:
        armed = [len(layer._forward_hooks) for layer in layers]
        assert all(a == p + 1 for a, p in zip(armed, plain))
        cache_kw = cache_kwarg(model)
        with torch.no_grad():
            first = model(**b, use_cache=True)
            nxt = first.logits[:, -1].argmax(-1, keepdim=True)
            mask = torch.cat([b["attention_mask"], torch.ones_like(nxt)], dim=1)
            model(input_ids=nxt, attention_mask=mask, use_cache=True, **{cache_kw: getattr(first, cache_kw)})
            assert [len(layer._forward_hooks) for layer in layers] == plain  # decode: disarmed
            counts = dict(editors.edit_counts)
            again = model(**b, use_cache=True).logits  # a new prompt: armed and edited again
        assert [len(layer._forward_hooks) for layer in layers] == armed
        n_lm = len(layers)
        assert editors.edit_counts["prefix"] == counts["prefix"] + n_lm
        assert torch.equal(again, first.logits)
        # the hooks still run first (before transformers' output-capturing hooks), as at attach
        assert all(next(iter(layer._forward_hooks.values())).__qualname__.endswith("_lm_hook.<locals>.hook")
                   for layer in layers)
    finally:
        editors.detach()
    assert [len(layer._forward_hooks) for layer in layers] == plain


def test_inputs_embeds_without_ids_is_refused(model):
    b = batch([words(5)], image=False)
    editors = attach(model, editor_params(prefix={"layers": [0]}))
    try:
        embeds = model.get_input_embeddings()(b["input_ids"])
        with pytest.raises(ValueError, match="need input_ids"), torch.no_grad():
            model(inputs_embeds=embeds, attention_mask=b["attention_mask"])
    finally:
        editors.detach()


def test_bf16_backbone_keeps_fp32_editors():
    model = tiny_llava(2).to(torch.bfloat16)
    b = batch([words(6)])
    b["pixel_values"] = b["pixel_values"].to(torch.bfloat16)
    editors = attach(model, EditorParams.model_validate(ALL_GROUPS))
    try:
        assert all(p.dtype == torch.float32 for p in editors.parameters())
        out = model(**b).logits
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    finally:
        editors.detach()


def test_gradient_checkpointing_gives_the_same_gradients():
    b = batch([words(8), words(5)], answers=[[20, 21], [22]])
    grads = []
    for checkpointing in (False, True):
        model = tiny_llava(3)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        torch.manual_seed(0)
        editors = attach(model, EditorParams.model_validate(ALL_GROUPS))
        try:
            model(**b).loss.backward()
            grads.append({k: g.clone() for k, g in editors.editor_grads().items()})
        finally:
            editors.detach()
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], msg=k)


# ---------------------------------------------------------------------------------------------
# save / load
# ---------------------------------------------------------------------------------------------
def _trained_editors(model):
    editors = attach(model, EditorParams.model_validate(ALL_GROUPS))
    with torch.no_grad():
        for p in editors.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return editors


def test_save_load_roundtrip_gives_identical_logits(model, tmp_path):
    b = batch([words(7), words(3)])
    editors = _trained_editors(model)
    fp = model_fingerprint(model)
    try:
        with torch.no_grad():
            edited = model(**b).logits
        save_editors(editors, tmp_path, "tiny-base", fp)
    finally:
        editors.detach()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["editor_config.json", "editors.safetensors"]
    cfg = json.loads((tmp_path / "editor_config.json").read_text())
    assert cfg["base_model"] == "tiny-base" and cfg["base_fingerprint"] == fp and cfg["format_version"] == 1
    assert cfg["parameter_count"] == editors.num_parameters()
    assert cfg["layers"] == {"visual": [0, 1], "projector": [0], "prefix": [0, 1], "suffix": [0, 1]}
    assert cfg["dims"] == {"visual": 32, "projector": 32, "prefix": 32, "suffix": 32}
    loaded = load_editors(model, tmp_path, fp)
    try:
        with torch.no_grad():
            assert torch.equal(model(**b).logits, edited)
    finally:
        loaded.detach()


def test_load_refuses_a_different_base(model, tmp_path):
    editors = _trained_editors(model)
    try:
        save_editors(editors, tmp_path, "tiny-base", model_fingerprint(model))
    finally:
        editors.detach()
    other = tiny_llava(seed=7)
    other_fp = model_fingerprint(other)
    refusal = r"editor_config\.json.*different base.*expected fingerprint sha256:.*found sha256:"
    with pytest.raises(EditorFileError, match=refusal):
        load_editors(other, tmp_path, other_fp)
    attach(other, editor_params()).detach()  # nothing stayed attached: a new attach is accepted


def _rewrite(path, mutate):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    mutate(tensors)
    save_file(tensors, str(path))


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda t: t.pop("prefix.1.U"), r"tensor 'prefix\.1\.U' is missing"),
        (lambda t: t.__setitem__("prefix.7.U", torch.zeros(2, 32)), r"unexpected tensor 'prefix\.7\.U'"),
        (lambda t: t.__setitem__("visual.0.W.weight", torch.zeros(3, 32)), r"tensor 'visual\.0\.W\.weight' has shape"),
        (lambda t: t["suffix.0.W.bias"].add_(1.0), r"contents do not match editor_config\.json"),
    ],
    ids=["missing", "extra", "shape", "values"],
)
def test_load_refuses_tampered_weights(model, tmp_path, mutate, message):
    b = batch([words(5)])
    with torch.no_grad():
        base = model(**b).logits
    editors = _trained_editors(model)
    fp = model_fingerprint(model)
    try:
        save_editors(editors, tmp_path, "tiny-base", fp)
    finally:
        editors.detach()
    _rewrite(tmp_path / "editors.safetensors", mutate)
    with pytest.raises(EditorFileError, match=message) as info:
        load_editors(model, tmp_path, fp)
    assert "editors.safetensors" in str(info.value)
    with torch.no_grad():
        assert torch.equal(model(**b).logits, base)  # nothing left attached


def test_fingerprint_is_stable_and_sensitive(model):
    fp = model_fingerprint(model)
    assert fp == model_fingerprint(model) and fp.startswith("sha256:")
    assert model_fingerprint(copy.deepcopy(model).to(torch.bfloat16)) == fp  # same weights, other dtype
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.model.multi_modal_projector.linear_2.weight[0, 0] += 1.0
    assert model_fingerprint(changed) != fp


def test_lm_hooks_take_the_dropout_path_exactly_while_dropout_is_active(monkeypatch):
    """The LM hooks decide once per pass whether any editor drops out: training with dropout > 0
    takes the per-editor path (`edit_rows_per_editor_`) at every LM layer, eval (dropout off) the stacked one,
    and switching between them between passes is seen by the next pass."""
    from components.editors.fast import sites as sites_mod

    model = tiny_llava(2)
    params = EditorParams.model_validate({**ALL_GROUPS, "dropout": 0.5})
    editors = attach(model, params)
    calls = {"plain": 0}
    plain = sites_mod.edit_rows_per_editor_

    def count(*a, **k):
        calls["plain"] += 1
        return plain(*a, **k)

    monkeypatch.setattr(sites_mod, "edit_rows_per_editor_", count)
    b = batch([words(9), words(5)], left_pad=True)
    lm_layers = len(set(editors.prefix) | set(editors.suffix))
    try:
        editors.train()
        model(**b).logits.sum().backward()
        assert calls["plain"] == lm_layers > 0
        editors.eval()
        with torch.no_grad():
            model(**b)
        assert calls["plain"] == lm_layers  # dropout off: the stacked path, not the per-editor one
        editors.train()
        with torch.no_grad():
            model(**b)
        assert calls["plain"] == 2 * lm_layers
    finally:
        editors.detach()
