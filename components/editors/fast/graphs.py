"""CUDA graphs for the vision encoder's layers in training (opt-in: `train.cuda_graphs: true`, or
`MRTEditors.use_cuda_graphs()`; `LayerGraphs` on its own graphs any stack of layers).

Why (docs/performance.md): at batch 8 a LLaVA-7B step's vision tower is
bound by the host, not the GPU. A CLIP layer is ~20 kernel launches forward and ~30 backward, its
editor adds a hook, an autograd node and 1 + 2 launches, and the device's host spends ~50 µs per
launch. With graphs each layer, editor included, is one replay forward and one backward: a few
host calls in place of ~50 launches, so the editors' host time leaves the step.

How: each layer instance's `forward` is replaced (an instance attribute; `remove()` restores the
class's) by one that either runs the original eagerly or replays that layer's graphs through
`_Replay`, an autograd Function whose forward copies new inputs into the graph's static ones and
replays the forward graph, and whose backward replays the backward graph (`torch.autograd.grad`
of the captured forward, captured once with `retain_graph`, so the saved activations stay where
the forward graph writes them). The editor's parameters for the pass (U, A = W − U, b) are inputs
of the graph; the frozen weights are read where they lie. A layer's input is the previous layer's
static output (no copy) when both are graphed. All graphs share one memory pool; every tensor
that lives from one replay to another (static inputs and outputs, saved activations, gradients)
is held for the graph's life, so the pool never hands it to another capture.

Inference (`inference=True`, off by default): calls without gradients replay forward-only graphs
of their own (a prompt pass at batch 1 is bound by the host too); the editors' inference kernel.

What runs eagerly instead (always correct, only slower):
- calls without gradients unless `inference=True`, under autocast, on CPU tensors, with tensor
  arguments other than the hidden states (an attention mask), or at a site whose editor would not
  take the training kernel this pass (dropout on, checkpointing, no pass open);
- a pass that begins while the previous graphed pass still awaits its backward (two forwards, then
  one backward): the graphs hold one pass's activations;
- more than `max_shapes` input shapes (each shape, i.e. batch size, has its own graphs, captured on
  its first call after a warm-up run on a side stream).
The frozen weights must stay where they were at capture: if a layer's first parameter moves
(`.to()`, a reload) its graphs are dropped and captured again. Outputs alias the graphs' static
tensors: a hidden state kept from one pass to the next is overwritten by the next replay.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
import weakref
from collections import Counter
from typing import Any, Callable

import torch
from torch import nn


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


class CudaGraphs:
    """The real thing: CUDA graphs in one private memory pool, warm-ups on a side stream (lazy
    initialisation, Triton compilation and cuBLAS workspaces stay out of the captures)."""

    def __init__(self):
        self._pool = None

    def warmup(self, fn: Callable[[], Any]) -> None:
        torch.cuda.synchronize()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()

    def capture(self, fn: Callable[[], Any], on_replay: Callable[[Any], None] | None = None):
        """(replay, fn's result) — the result's tensors are static: each replay rewrites them.
        Captured on the current device: `LayerGraphs` makes that the layer's."""
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = fn()
        return graph.replay, out

    def reset(self) -> None:
        self._pool = None


class EagerGraphs:
    """A stand-in that runs on any device: a "replay" runs the captured function again and copies
    its results into the static tensors, as a real replay rewrites them. For tests of everything
    around the graphs (static inputs, aliasing, fallbacks, gradients) on CPU."""

    def __init__(self):
        self.captures = 0

    def warmup(self, fn: Callable[[], Any]) -> None:
        fn()

    def capture(self, fn: Callable[[], Any], on_replay: Callable[[Any], None] | None = None):
        self.captures += 1
        static = fn()

        grad = torch.is_grad_enabled()

        def replay():
            with torch.set_grad_enabled(grad):
                new = fn()
            with torch.no_grad():
                for s, n in zip(_tensors(static), _tensors(new)):
                    s.copy_(n)
            if on_replay is not None:
                on_replay(new)

        return replay, static

    def reset(self) -> None:
        pass


def _tensors(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for t in x if isinstance(t, torch.Tensor)]
    return []


class NoEdits:
    """The binding of plain layers (no editors): nothing to add to the graph."""

    def graph_params(self, index: int, hidden: torch.Tensor) -> tuple | None:
        return ()

    def graph_edit(self, index: int, module: nn.Module, output: Any, params: tuple) -> Any:
        return output

    def graph_edited(self, index: int, module: nn.Module) -> None:
        pass


class _LayerGraph:
    """One layer's forward and backward graphs for one input signature."""

    def __init__(self, backend, index: int, module: nn.Module, orig: Callable, binding, hidden: torch.Tensor,
                 rest: tuple, kwargs: dict, params: tuple, prev_out: torch.Tensor | None):
        self.index = index
        self.ctx_ref: Callable[[], Any] | None = None
        self.replay_backward = None
        self.grads: tuple = ()
        # the static inputs: the previous graph's static output when that is where `hidden` lies
        self.aliased = prev_out is not None and prev_out.data_ptr() == hidden.data_ptr()
        self.h = prev_out.detach() if self.aliased else torch.empty_like(hidden)
        self.h.requires_grad_(hidden.requires_grad)
        self.params = tuple(torch.empty_like(p).requires_grad_(p.requires_grad) for p in params)
        with torch.no_grad():
            if not self.aliased:
                self.h.copy_(hidden)
            for s, p in zip(self.params, params):
                s.copy_(p)
        inputs = (self.h, *self.params)
        self.needs = tuple(t.requires_grad for t in inputs)
        wrt = [t for t in inputs if t.requires_grad]

        grad = torch.is_grad_enabled()  # a training graph, or a forward-only one for inference

        def run():
            with torch.set_grad_enabled(grad):
                return binding.graph_edit(index, module, orig(self.h, *rest, **kwargs), self.params)

        def warm():
            out = _first(run())
            if out.requires_grad and wrt:
                torch.autograd.grad(out, wrt, torch.ones_like(out))

        backend.warmup(warm)
        self.replay_forward, out = backend.capture(run, on_replay=self._live)
        self.tuple_out = isinstance(out, tuple)
        if self.tuple_out and len(out) != 1:
            raise ValueError(f"layer {index} returned {len(out)} outputs; only the hidden states can be graphed")
        self.out = _first(out)
        self.live = self.out  # the tensor the backward differentiates (the static one, but for EagerGraphs)
        if self.out.requires_grad and wrt:
            self.gout = torch.empty_like(self.out)
            self.replay_backward, grads = backend.capture(
                lambda: torch.autograd.grad(self.live, wrt, self.gout, retain_graph=True, allow_unused=True))
            self.grads = tuple(grads)
        anchor = next(module.parameters(), None)
        self.anchor = (anchor, anchor.data_ptr()) if anchor is not None else None

    def _live(self, new: Any) -> None:
        self.live = _first(new)

    def moved(self) -> bool:
        return self.anchor is not None and self.anchor[0].data_ptr() != self.anchor[1]

    def pending(self) -> bool:
        ctx = self.ctx_ref() if self.ctx_ref is not None else None
        return ctx is not None and not ctx.done

    def output(self, hidden: torch.Tensor) -> Any:
        return (hidden,) if self.tuple_out else hidden


class _Replay(torch.autograd.Function):
    @staticmethod
    def forward(ctx, graph: _LayerGraph, hidden, *params):
        if not graph.aliased and graph.h.data_ptr() != hidden.data_ptr():
            graph.h.copy_(hidden)
        for s, p in zip(graph.params, params):
            if s.data_ptr() != p.data_ptr():
                s.copy_(p)
        graph.replay_forward()
        ctx.graph, ctx.done = graph, False
        graph.ctx_ref = weakref.ref(ctx)
        return graph.out.detach()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        graph = ctx.graph
        ctx.done = True
        if graph.replay_backward is None:  # nothing upstream needs a gradient
            return (None,) * (1 + len(graph.needs))
        if graph.gout.data_ptr() != grad.data_ptr():
            graph.gout.copy_(grad)
        graph.replay_backward()
        grads, out = iter(graph.grads), [None]
        for need in graph.needs:
            g = next(grads) if need else None
            out.append(g.detach() if g is not None else None)
        return tuple(out)


class _GraphSet:
    """The graphs of every layer for one input signature, and the state of the current pass."""

    def __init__(self):
        self.graphs: dict[int, _LayerGraph] = {}
        self.last = -1  # the last layer index called: a lower one starts a new pass
        self.eager = False  # this pass runs eagerly (the previous one still awaits its backward)
        self.broken = False

    def busy(self) -> bool:
        return any(g.pending() for g in self.graphs.values())


class LayerGraphs:
    """Graphs for `layers` (e.g. CLIP's encoder layers), with `binding` adding each layer's editor
    (`NoEdits` for plain layers; `MRTEditors` for its visual sites). `install()` patches the layers,
    `remove()` restores them. `stats` counts replays, eager calls and captures per layer call."""

    def __init__(self, layers, binding=None, backend=None, max_shapes: int = 4, inference: bool = False):
        self.layers = list(layers)
        self.inference = inference
        self.binding = binding if binding is not None else NoEdits()
        self.backend = backend if backend is not None else CudaGraphs()
        self.max_shapes = max_shapes
        self.stats: Counter[str] = Counter()
        self._sets: dict[tuple, _GraphSet] = {}
        self._shapes: set[tuple] = set()  # (shape, dtype, device, grad mode) with graphs
        self._warned: set[str] = set()

    def install(self) -> "LayerGraphs":
        for i, layer in enumerate(self.layers):
            if "forward" in vars(layer):
                self.remove()
                raise RuntimeError(f"layer {i} ({type(layer).__name__}) already has its forward replaced")
            orig = layer.forward
            layer.forward = functools.partial(self._forward, i, layer, orig)
        return self

    def remove(self) -> None:
        for layer in self.layers:
            fwd = vars(layer).get("forward")
            if isinstance(fwd, functools.partial) and fwd.func == self._forward:
                del layer.forward
        self.clear()

    def clear(self) -> None:
        """Drop every graph (and the memory they hold); the next calls capture again."""
        self._sets.clear()
        self._shapes.clear()
        self.backend.reset()

    def _warn(self, what: str, message: str) -> None:
        if what not in self._warned:
            self._warned.add(what)
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    def _signature(self, hidden: Any, rest: tuple, kwargs: dict) -> tuple | None:
        """The part of a call a graph is specialised on, or None when the call can't be graphed."""
        if not isinstance(hidden, torch.Tensor) or not hidden.is_cuda and not _any_device():
            return None
        grad = torch.is_grad_enabled()
        if not (grad or self.inference) or torch.is_autocast_enabled():
            return None
        if any(a is not None for a in rest):
            return None
        try:
            extra = tuple(sorted(kwargs.items()))
            hash(extra)
        except TypeError:
            return None
        if any(isinstance(v, torch.Tensor) for _, v in extra):
            return None
        if hidden.is_cuda and torch.cuda.is_current_stream_capturing():
            return None
        return (tuple(hidden.shape), hidden.dtype, hidden.device, grad, hidden.requires_grad, extra)

    def _forward(self, index: int, module: nn.Module, orig: Callable, *args, **kwargs):
        if args:
            hidden, rest = args[0], args[1:]
        else:
            hidden, rest = kwargs.pop("hidden_states", None), ()
            args = (hidden,)
        signature = self._signature(hidden, rest, kwargs)
        params = self.binding.graph_params(index, hidden) if signature is not None else None
        if params is None:
            self.stats["eager"] += 1
            return orig(*args, **kwargs)
        key = (*signature, tuple(p.requires_grad for p in params))
        gset = self._sets.get(key)
        if gset is None:
            # one input shape (batch size) gives a few signatures (layers with and without an editor,
            # with and without a gradient coming in): the limit is on shapes, not signatures
            shape = signature[:4]
            if shape not in self._shapes and len(self._shapes) >= self.max_shapes:
                self._warn("shapes", f"CUDA graphs: more than {self.max_shapes} input shapes; the others run eagerly")
                self.stats["eager"] += 1
                return orig(*args, **kwargs)
            self._shapes.add(shape)
            gset = self._sets[key] = _GraphSet()
        if index <= gset.last:  # a new pass
            gset.eager = gset.busy()
            if gset.eager:
                self._warn("busy", "CUDA graphs: a forward began before the previous one's backward; running it "
                                   "eagerly (the graphs hold one pass's activations)")
        gset.last = index
        graph = gset.graphs.get(index)
        if graph is not None and graph.moved():
            self.clear()  # the frozen weights moved: every capture read the old addresses
            self._warn("moved", "CUDA graphs: the layers' weights moved; capturing again")
            return self._forward(index, module, orig, *args, **kwargs)
        if gset.eager or gset.broken:
            self.stats["eager"] += 1
            return orig(*args, **kwargs)
        if graph is None:
            prev = gset.graphs.get(index - 1)
            # a model spread over GPUs (device_map): capture on the layer's own device
            on_device = torch.cuda.device(hidden.device) if hidden.is_cuda else contextlib.nullcontext()
            try:
                with on_device:
                    graph = _LayerGraph(self.backend, index, module, orig, self.binding, hidden, rest, kwargs,
                                        params, prev.out if prev is not None else None)
            except Exception as err:  # noqa: BLE001 — a layer that can't be captured runs eagerly, loudly
                gset.broken = True
                self._warn("capture", f"CUDA graphs: capturing layer {index} failed ({type(err).__name__}: {err}); "
                                      "these layers run eagerly")
                self.stats["eager"] += 1
                return orig(*args, **kwargs)
            gset.graphs[index] = graph
            self.stats["captures"] += 1
        out = _Replay.apply(graph, hidden, *params)
        self.stats["replays"] += 1
        self.binding.graph_edited(index, module)
        return graph.output(out)


_ANY_DEVICE = [False]


def _any_device() -> bool:
    """True while tests graph CPU layers with `EagerGraphs` (`allow_cpu`)."""
    return _ANY_DEVICE[0]


class allow_cpu:
    """Context manager (tests): let `LayerGraphs` take CPU tensors, for use with `EagerGraphs`."""

    def __enter__(self):
        self._before = _ANY_DEVICE[0]
        _ANY_DEVICE[0] = True
        return self

    def __exit__(self, *exc):
        _ANY_DEVICE[0] = self._before
        return False

