"""Editor banks (components/editors/fast/bank.py): the trainable tensors of an MRTEditors are one U, W,
b per editor shape, while every editor keeps its own tensors, keys and files as views."""

from __future__ import annotations

import torch
from test_editors import ALL_GROUPS, batch, tiny_llava, words

from components.core.config import EditorParams
from components.editors.io import load_editors, model_fingerprint, save_editors
from components.editors import attach
from components.train.training import _wrapper_class


def _editors(model):
    return attach(model, EditorParams.model_validate(ALL_GROUPS))


def _keys(editors) -> set[str]:
    return {f"{g}.{k}.{n}" for g in ("visual", "projector", "prefix", "suffix")
            for k in getattr(editors, g) for n in ("U", "W.weight", "W.bias")}


def test_parameters_are_one_bank_per_shape_and_keys_stay_per_editor():
    model = tiny_llava(0)
    editors = _editors(model)
    try:
        n_editors = sum(len(getattr(editors, g)) for g in ("visual", "projector", "prefix", "suffix"))
        params = list(editors.parameters())
        assert len(params) == 3 * len(editors.banks) < 3 * n_editors
        assert sum(p.numel() for p in params) == sum(
            2 * ed.d * ed.r + ed.r for g in ("visual", "projector", "prefix", "suffix") for ed in getattr(editors, g).values())
        assert set(editors.state_dict()) == _keys(editors)
        for bank in editors.banks:
            for i, ed in enumerate(bank.members):
                assert ed.U.data_ptr() == bank.U[i].data_ptr() and torch.equal(ed.U, bank.U[i])
                assert ed.W.weight.data_ptr() == bank.W[i].data_ptr() and ed.W.bias.data_ptr() == bank.b[i].data_ptr()
                assert not ed.U.requires_grad and not list(ed.parameters())
    finally:
        editors.detach()


def test_load_state_dict_writes_into_the_banks_and_changes_are_seen_by_the_editors():
    model = tiny_llava(0)
    editors = _editors(model)
    try:
        state = {k: torch.randn_like(v) for k, v in editors.state_dict().items()}
        editors.load_state_dict(state, strict=True)
        for k, v in editors.state_dict().items():
            assert torch.equal(v, state[k]), k
        bank = editors.banks[0]
        version = bank.members[0].U._version
        with torch.no_grad():
            bank.U.mul_(2.0)  # what an optimiser step does
        assert bank.members[0].U._version > version  # the editors' caches see the change
        assert torch.equal(bank.members[-1].U, 2.0 * state[_key(editors, bank.members[-1], "U")])
    finally:
        editors.detach()


def _key(editors, editor, name):
    for g in ("visual", "projector", "prefix", "suffix"):
        for k, ed in getattr(editors, g).items():
            if ed is editor:
                return f"{g}.{k}.{name}"
    raise KeyError(editor)


def test_conversion_keeps_the_editors_bound_to_their_banks():
    model = tiny_llava(0)
    editors = _editors(model)
    try:
        before = {k: v.clone() for k, v in editors.state_dict().items()}
        editors.double()
        for bank in editors.banks:
            assert bank.U.dtype == torch.float64
            for i, ed in enumerate(bank.members):
                assert ed.U.dtype == torch.float64 and ed.U.data_ptr() == bank.U[i].data_ptr()
        editors.float()
        after = editors.state_dict()
        assert all(torch.equal(after[k], before[k]) for k in before)
        with torch.no_grad():
            editors.banks[0].U.zero_()
        assert all(torch.count_nonzero(ed.U) == 0 for ed in editors.banks[0].members)
    finally:
        editors.detach()


def test_an_editor_used_on_its_own_sends_its_gradient_to_its_bank_row():
    model = tiny_llava(0)
    editors = _editors(model)
    try:
        bank = editors.banks[0]
        ed = bank.members[1]
        h = torch.randn(3, 5, ed.d)
        ed(h).square().sum().backward()
        assert bank.U.grad is not None and bank.W.grad is not None and bank.b.grad is not None
        rows = bank.U.grad.abs().sum(dim=(1, 2))
        assert rows[1] > 0 and torch.count_nonzero(rows) == 1
        assert torch.count_nonzero(editors.editor_grads()[_key(editors, ed, "W.weight")]) > 0
    finally:
        editors.detach()


def test_training_step_gives_every_editor_a_gradient_and_saved_files_round_trip(tmp_path):
    model = tiny_llava(0)
    model.train()
    editors = _editors(model)
    try:
        b = batch([words(9), words(5)], answers=[words(3, 30), words(2, 31)])
        model(**b).loss.backward()
        grads = editors.editor_grads()
        assert set(grads) == _keys(editors)
        assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
        assert any(g.abs().sum() > 0 for k, g in grads.items() if k.startswith("suffix"))
        opt = torch.optim.AdamW(editors.parameters(), lr=1e-2)
        opt.step()
        fp = model_fingerprint(model)
        out = save_editors(editors, tmp_path / "ed", "tiny", fp).parent
        saved = {k: v.clone() for k, v in editors.state_dict().items()}
    finally:
        editors.detach()
    loaded = load_editors(model, out, fp)
    try:
        got = loaded.state_dict()
        assert set(got) == set(saved) and all(torch.equal(got[k], saved[k]) for k in saved)
    finally:
        loaded.detach()


def test_ddp_is_told_to_skip_the_view_buffers():
    model = tiny_llava(0)
    editors = _editors(model)
    try:
        wrapper = _wrapper_class()(model, editors)
        ignored = set(wrapper._ddp_params_and_buffers_to_ignore)
        assert ignored == {f"extra.{k}" for k in _keys(editors)}
        assert not ignored & {n for n, _ in wrapper.named_parameters()}
    finally:
        editors.detach()
