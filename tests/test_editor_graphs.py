"""CUDA graphs of the vision layers (components/editors/fast/graphs.py), everything around the graphs.

CI has no GPU: these tests run the same code with `EagerGraphs`, a stand-in whose "replay" runs the
captured function again and copies the results into the static tensors. They check the static
inputs and their copies, the aliasing of one layer's output as the next one's input, the gradients
returned, the editor hooks' hand-off and when a call falls back to eager. The real captures are
checked on a GPU by tests/test_editors_gpu.py::test_cuda_graphs_train_like_eager.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from benchmarks.gpu_train_step import build_model, make_batch, tiny_config, tiny_placement
from components.editors import attach
from components.editors.fast.graphs import EagerGraphs, LayerGraphs, allow_cpu


@pytest.fixture(autouse=True)
def _cpu_graphs():
    with allow_cpu():
        yield


def _model(seed: int = 0):
    torch.manual_seed(seed)
    return build_model(tiny_config(), "cpu", torch.float32).train()


def _step(model, editors, opt, batch):
    loss = model(**batch).loss
    loss.backward()
    grads = {k: (None if g is None else g.clone()) for k, g in editors.editor_grads().items()}
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss), grads


def _train(graphed: bool, steps: int = 3, batches=None):
    model = _model()
    editors = attach(model, tiny_placement())
    torch.manual_seed(1)
    for p in editors.parameters():  # away from the identity start, so every gradient is non-zero
        p.data.add_(0.05 * torch.randn_like(p))
    backend = EagerGraphs() if graphed else None
    if graphed:
        assert editors.use_cuda_graphs(backend=backend)
    opt = torch.optim.SGD([p for p in editors.parameters() if p.requires_grad], lr=0.5)
    cfg = model.config
    batches = batches or [make_batch(cfg, 2, 24, "cpu", torch.float32, seed=s) for s in range(steps)]
    out = [_step(model, editors, opt, b) for b in batches]
    return model, editors, out, backend


def test_graphed_training_matches_eager_step_for_step():
    _, _, eager, _ = _train(graphed=False)
    _, editors, graphed, backend = _train(graphed=True)
    n_layers = len(editors.graphs.layers)
    # layer 0 takes the embeddings (no gradient) and the others the edited states: two signatures
    assert backend.captures > 0
    assert editors.graphs.stats["captures"] == n_layers
    assert editors.graphs.stats["replays"] == 3 * n_layers
    assert editors.graphs.stats["eager"] == 0
    for (loss_e, grads_e), (loss_g, grads_g) in zip(eager, graphed):
        assert loss_g == pytest.approx(loss_e, rel=1e-5)
        visual = [k for k in grads_e if k.startswith("visual")]
        assert visual, "the placement has visual editors"
        for k, g in grads_e.items():
            assert (g is None) == (grads_g[k] is None), k
            if g is not None:
                torch.testing.assert_close(grads_g[k], g, rtol=1e-4, atol=1e-6, msg=k)
        assert any(grads_g[k].abs().sum() > 0 for k in visual)


def test_edit_counts_and_hooks_see_each_graphed_layer_once():
    model, editors, _, _ = _train(graphed=True, steps=2)
    # two training passes × two visual sites, whether captured or replayed — not twice per replay
    assert editors.edit_counts["visual"] == 2 * len(editors.visual)
    assert not any(k.startswith("_graph") for k in editors.state_dict())


def test_a_second_forward_before_backward_runs_eagerly_and_stays_correct():
    batches = [make_batch(tiny_config(), 2, 24, "cpu", torch.float32, seed=s) for s in range(2)]

    def two_forwards(graphed):
        model = _model()
        editors = attach(model, tiny_placement())
        torch.manual_seed(1)
        for p in editors.parameters():
            p.data.add_(0.05 * torch.randn_like(p))
        if graphed:
            editors.use_cuda_graphs(backend=EagerGraphs())
        model(**batches[0]).loss.backward()  # captures
        for p in editors.parameters():
            p.grad = None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loss = model(**batches[0]).loss + model(**batches[1]).loss  # the second one while the first awaits
        loss.backward()
        grads = {k: g.clone() for k, g in editors.editor_grads().items() if g is not None}
        return float(loss), grads, editors, caught

    loss_e, grads_e, _, _ = two_forwards(False)
    loss_g, grads_g, editors, caught = two_forwards(True)
    assert loss_g == pytest.approx(loss_e, rel=1e-5)
    for k, g in grads_e.items():
        torch.testing.assert_close(grads_g[k], g, rtol=1e-4, atol=1e-6, msg=k)
    # layer 0 (no editor, no gradient) may replay; the layers whose graphs await a backward may not
    assert editors.graphs.stats["eager"] >= 2
    assert any("before the previous one's backward" in str(w.message) for w in caught)


def test_no_grad_and_new_batch_sizes():
    model, editors, _, _ = _train(graphed=True, steps=1)
    stats = editors.graphs.stats
    before = dict(stats)
    with torch.no_grad():
        model(**make_batch(model.config, 2, 24, "cpu", torch.float32))
    assert stats["eager"] - before.get("eager", 0) == len(editors.graphs.layers)
    assert stats["replays"] == before["replays"]
    # another batch size: its own graphs
    loss = model(**make_batch(model.config, 3, 24, "cpu", torch.float32)).loss
    loss.backward()
    assert stats["captures"] == 2 * len(editors.graphs.layers)
    # beyond max_shapes input shapes (not signatures: one shape gives several) calls run eagerly, once warned
    editors.graphs.max_shapes = 2
    eager = stats["eager"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(**make_batch(model.config, 4, 24, "cpu", torch.float32)).loss.backward()
        model(**make_batch(model.config, 2, 24, "cpu", torch.float32)).loss.backward()  # a known shape replays
    assert stats["eager"] - eager == len(editors.graphs.layers)
    assert stats["captures"] == 2 * len(editors.graphs.layers)
    assert sum("input shapes" in str(w.message) for w in caught) == 1


def test_inference_graphs_match_eager_and_are_off_by_default():
    model, editors, _, _ = _train(graphed=True, steps=1)
    model.eval()
    prompt = make_batch(model.config, 1, 24, "cpu", torch.float32, seed=5)
    prompt.pop("labels")
    with torch.no_grad():
        eager = model(**prompt).logits  # inference=False: passes without gradients run eagerly
        assert editors.graphs.stats["eager"] == len(editors.graphs.layers)
        editors.use_cuda_graphs(backend=EagerGraphs(), inference=True)
        first, second = model(**prompt).logits, model(**prompt).logits  # capture, then replay
    stats = editors.graphs.stats
    assert stats["captures"] == len(editors.graphs.layers) and stats["replays"] == 2 * stats["captures"]
    assert stats.get("eager", 0) == 0
    torch.testing.assert_close(first, eager)
    torch.testing.assert_close(second, eager)
    # after a parameter change the graphs read the new values (the editors' stacks are inputs)
    with torch.no_grad():
        editors.banks[0].W.add_(0.1)
        changed = model(**prompt).logits
    editors.use_cuda_graphs(False)
    with torch.no_grad():
        torch.testing.assert_close(changed, model(**prompt).logits)
    assert not torch.allclose(changed, eager)


def test_detach_restores_the_layers_and_cpu_models_stay_eager():
    model, editors, _, _ = _train(graphed=True, steps=1)
    layers = editors.graphs.layers
    editors.detach()
    assert all("forward" not in vars(layer) for layer in layers)
    assert editors.graphs is None


def test_real_graphs_leave_cpu_tensors_eager():
    from components.editors.fast import graphs

    graphs._ANY_DEVICE[0] = False  # outside `allow_cpu` (the fixture restores it): CPU runs eagerly
    model = _model()
    editors = attach(model, tiny_placement())
    assert editors.use_cuda_graphs()  # installed (the model may move to a GPU later)
    model(**make_batch(model.config, 2, 24, "cpu", torch.float32)).loss.backward()
    n_layers = len(editors.graphs.layers)
    assert editors.graphs.stats == {"eager": n_layers}
    assert editors.edit_counts["visual"] == len(editors.visual)  # the hooks edited, eagerly


def test_moved_weights_are_captured_again():
    model, editors, _, backend = _train(graphed=True, steps=1)
    n = editors.graphs.stats["captures"]
    with torch.no_grad():  # what .to() does to a parameter: new storage
        for layer in editors.graphs.layers:
            for p in layer.parameters():
                p.data = p.data.clone()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(**make_batch(model.config, 2, 24, "cpu", torch.float32)).loss.backward()
    assert editors.graphs.stats["captures"] == n + len(editors.graphs.layers)
    assert any("weights moved" in str(w.message) for w in caught)


class _Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(d), nn.Linear(d, d)

    def forward(self, hidden_states, attention_mask=None):
        return hidden_states + torch.tanh(self.fc(self.norm(hidden_states)))


def test_plain_layers_give_the_input_gradient_of_eager():
    torch.manual_seed(0)
    stack = nn.Sequential(*[_Block(8) for _ in range(3)]).requires_grad_(False)
    reference = copy.deepcopy(stack)
    graphs = LayerGraphs(list(stack), backend=EagerGraphs()).install()
    for seed in range(3):
        x = torch.randn(4, 5, 8, generator=torch.Generator().manual_seed(seed), requires_grad=True)
        x_ref = x.detach().clone().requires_grad_(True)
        (stack(x) ** 2).sum().backward()
        (reference(x_ref) ** 2).sum().backward()
        torch.testing.assert_close(x.grad, x_ref.grad)
    assert graphs.stats["captures"] == 3 and graphs.stats["replays"] == 9
    # a layer's static input is the previous layer's static output: no copy between graphed layers
    gset = next(iter(graphs._sets.values()))
    assert not gset.graphs[0].aliased and gset.graphs[1].aliased and gset.graphs[2].aliased
    assert gset.graphs[1].h.data_ptr() == gset.graphs[0].out.data_ptr()
    # a tensor argument (an attention mask) is not graphed
    stack[0](torch.randn(4, 5, 8), torch.ones(4, 5))
    assert graphs.stats["eager"] == 1
    graphs.remove()
    assert all("forward" not in vars(layer) for layer in stack)


def test_installing_twice_is_refused():
    stack = [_Block(4), _Block(4)]
    LayerGraphs(stack, backend=EagerGraphs()).install()
    with pytest.raises(RuntimeError, match="already has its forward replaced"):
        LayerGraphs(stack, backend=EagerGraphs()).install()
