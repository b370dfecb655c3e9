"""components/editors/launch.py: the direct-launch cache key tracks what Triton specialises on, the
hit path passes the launcher the arguments JITFunction.run would, and every unsafe case takes the
plain `kernel[grid]` path. CPU tests use a stand-in compiled kernel (recording launcher) and, without
a GPU, Triton's interpreter; the GPU test launches a real kernel through both paths."""

from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402
from triton._C.libtriton import native_specialize_impl  # noqa: E402
from triton.backends.compiler import BaseBackend  # noqa: E402
from triton.compiler import CompiledKernel  # noqa: E402
from triton.knobs import HookChain  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from components.editors import launch as L  # noqa: E402


def _axpy(x_ptr, y_ptr, out_ptr, n, alpha, BLOCK: tl.constexpr, SHIFT: tl.constexpr = 0.0):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    x = tl.load(x_ptr + offs, mask=ok).to(tl.float32)
    y = tl.load(y_ptr + offs, mask=ok).to(tl.float32)
    tl.store(out_ptr + offs, (alpha * x + y + SHIFT).to(out_ptr.dtype.element_ty), mask=ok)


axpy = triton.jit(_axpy)  # a JITFunction with a GPU, an InterpretedFunction in the interpreter


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.delenv(L.ENV, raising=False)
    L.reset()
    yield
    L.reset()


def key(*args, device=0, **kwargs):
    return L.specialization_key(JIT_AXPY, args, kwargs, device)


JIT_AXPY = JITFunction(_axpy)  # never compiled here: only its parameters are read


def spec(value):
    return native_specialize_impl(BaseBackend, value, False, True, True)


# ---- the key ---------------------------------------------------------------------------------------

def test_key_distinguishes_what_triton_specialises_on():
    x = torch.zeros(64)
    y, out = torch.zeros(64), torch.zeros(64)
    base = key(x, y, out, 17, 2.0, BLOCK=32)
    assert base is not None
    assert key(x[1:], y, out, 17, 2.0, BLOCK=32) != base  # a view offset by one element: not 16-byte aligned
    assert key(x[4:], y, out, 17, 2.0, BLOCK=32) == base  # 16 bytes on: aligned again
    assert key(x.half(), y, out, 17, 2.0, BLOCK=32) != base  # dtype
    assert key(x, y, out, 17, 2.0, BLOCK=64) != base  # constexpr value
    assert key(x, y, out, 17, 2.0, BLOCK=32, SHIFT=1.0) != base  # defaulted constexpr given
    assert key(x, y, out, 17, 2.0, BLOCK=32, device=1) != base  # device
    assert key(x, y, out, 17, 2.0, BLOCK=32, num_warps=8) != base  # launch option
    assert key(x, y, out, 17, 2.0, BLOCK=32, num_warps=8) != key(x, y, out, 17, 2.0, BLOCK=32, num_warps=4)
    ints = {v: key(x, y, out, v, 2.0, BLOCK=32) for v in (1, 16, 17, 2**31)}
    assert len(set(ints.values())) == 4  # == 1, % 16, neither, beyond int32
    assert key(x, y, out, True, 2.0, BLOCK=32) != ints[1]  # a bool is not the int 1 to Triton
    assert key(x, y, out, 17, 2, BLOCK=32) != base  # an int alpha is not a float one


def test_equivalent_calls_have_equal_keys():
    x, y, out = torch.zeros(64), torch.zeros(64), torch.zeros(64)
    other = torch.ones(128), torch.ones(16), torch.ones(32)  # other tensors, same dtypes, aligned
    base = key(x, y, out, 17, 2.0, BLOCK=32, num_warps=4, num_stages=2)
    assert key(*other, 33, -1.5, BLOCK=32, num_warps=4, num_stages=2) == base
    assert key(x, y, out, 17, 2.0, 32, num_stages=2, num_warps=4) == base  # constexpr positional, options reordered
    assert key(x, y, out, 17, 2.0, BLOCK=32, SHIFT=0.0, num_warps=4, num_stages=2) == base  # the default, given
    assert key(x_ptr=x, y_ptr=y, out_ptr=out, n=17, alpha=2.0, BLOCK=32, num_warps=4, num_stages=2) == base
    assert key(torch.nn.Parameter(x), y, out, 17, 2.0, BLOCK=32, num_warps=4, num_stages=2) == base


@pytest.mark.parametrize("values", [
    [1, 0, -1, 2, 15, 16, 17, 32, -16, 2**31 - 1, 2**31 - 16, -2**31, 2**31, 2**31 + 1, -2**31 - 1,
     -2**31 - 16, 2**63 - 1, 2**63 - 16, 2**63, 2**63 + 1],
])
def test_int_classes_are_exactly_triton_s(values):
    """Two ints share a key exactly when Triton 3.6 specialises them alike (never coarser: that would
    launch a kernel compiled for another class; not finer here either)."""
    x = torch.zeros(8)
    for a in values:
        for b in values:
            same_key = key(x, x, x, a, 1.0, BLOCK=8) == key(x, x, x, b, 1.0, BLOCK=8)
            assert same_key == (spec(a) == spec(b)), (a, b, spec(a), spec(b))


def test_tensor_classes_are_exactly_triton_s():
    base = torch.zeros(64)
    tensors = [base, base[1:], base[2:], base[4:], base.half(), base.half()[1:], base.half()[8:],
               base.bfloat16(), base.double()[1:], base.to(torch.int8)[3:], base.to(torch.int64)]
    for a in tensors:
        for b in tensors:
            same_key = key(a, base, base, 3, 1.0, BLOCK=8) == key(b, base, base, 3, 1.0, BLOCK=8)
            assert same_key == (spec(a) == spec(b)), (a.dtype, b.dtype, spec(a), spec(b))


def test_arguments_the_key_does_not_model_take_the_plain_path():
    x = torch.zeros(8)
    assert key(x, x, x, (1, 2), 1.0, BLOCK=8) is None  # a tuple argument
    assert key(x, x, x, "3", 1.0, BLOCK=8) is None
    assert key(x, x, x, 3, BLOCK=8) is None  # alpha missing: Triton's own error on the plain path
    assert key(x, x, x, 3, 1.0, BLOCK=[8]) is None  # unhashable
    if not isinstance(axpy, JITFunction):  # the interpreter's kernels never take the direct path
        assert L.specialization_key(axpy, (x, x, x, 3, 1.0), {"BLOCK": 8}) is None


# ---- the hit path, on a stand-in compiled kernel ------------------------------------------------------

@pytest.fixture
def fake(monkeypatch):
    """A JITFunction whose `kernel[grid]` records its calls and returns a stand-in CompiledKernel
    whose launcher records its arguments; current device 0, stream 123."""
    kernel = JITFunction(_axpy)
    calls = {"jit": [], "launcher": []}
    compiled = object.__new__(CompiledKernel)  # only .run / .function / .packed_metadata are read
    compiled.module = None  # what CompiledKernel.__del__ reads (nothing loaded: nothing to unload)
    compiled._run = lambda *args: calls["launcher"].append(args)
    compiled.function, compiled.packed_metadata = "function", "packed"

    def run(*args, grid, warmup, **kwargs):
        calls["jit"].append((grid, args, kwargs))
        return compiled

    monkeypatch.setattr(kernel, "run", run)
    rt = L._runtime()
    monkeypatch.setattr(rt, "device", lambda: 0)
    monkeypatch.setattr(rt, "stream", lambda device: 123)
    return kernel, calls, compiled


def test_hit_calls_the_launcher_with_every_argument_in_order(fake):
    kernel, calls, _ = fake
    x, y, out = (torch.zeros(64) for _ in range(3))
    L.launch(kernel, (4,), x, y, out, 17, 2.0, BLOCK=16, num_warps=2)
    assert len(calls["jit"]) == 1 and not calls["launcher"]  # the miss: through kernel[grid]
    grid, args, kwargs = calls["jit"][0]
    assert grid == (4,) and args == (x, y, out, 17, 2.0, 16, 0.0) and kwargs == {"num_warps": 2}
    L.launch(kernel, (5, 2), x, y, out, 33, -1.0, num_warps=2, BLOCK=16)
    L.launch(kernel, [6, 1, 3], y, x, out, n=49, alpha=0.5, BLOCK=16, SHIFT=0.0, num_warps=2)
    assert len(calls["jit"]) == 1
    assert calls["launcher"] == [
        (5, 2, 1, 123, "function", "packed", None, None, None, x, y, out, 33, -1.0, 16, 0.0),
        (6, 1, 3, 123, "function", "packed", None, None, None, y, x, out, 49, 0.5, 16, 0.0),
    ]
    assert L.stats() == {"direct": 2, "compiled": 1, "jit": 0, "errors": 0}


def test_a_new_specialisation_is_a_miss(fake):
    kernel, calls, _ = fake
    x = torch.zeros(64)
    L.launch(kernel, (1,), x, x, x, 17, 2.0, BLOCK=16)
    L.launch(kernel, (1,), x[1:], x, x, 17, 2.0, BLOCK=16)  # misaligned
    L.launch(kernel, (1,), x, x, x, 16, 2.0, BLOCK=16)  # divisible by 16
    L.launch(kernel, (1,), x, x, x, 1, 2.0, BLOCK=16)  # one
    L.launch(kernel, (1,), x, x, x, 17, 2.0, BLOCK=32)  # constexpr
    L.launch(kernel, (1,), x.half(), x, x, 17, 2.0, BLOCK=16)  # dtype
    assert len(calls["jit"]) == 6 and not calls["launcher"]
    L.launch(kernel, (1,), x[1:], x, x, 33, 2.0, BLOCK=16)
    L.launch(kernel, (1,), x, x, x, 1, 3.0, BLOCK=16)
    assert len(calls["jit"]) == 6 and len(calls["launcher"]) == 2


def test_plain_path_for_callable_grids_bad_grids_unmodelled_arguments_and_pre_run_hooks(fake):
    kernel, calls, _ = fake
    x = torch.zeros(64)
    for _ in range(2):
        L.launch(kernel, lambda meta: (1,), x, x, x, 17, 2.0, BLOCK=16)
        L.launch(kernel, (1, 1, 1, 1), x, x, x, 17, 2.0, BLOCK=16)
        L.launch(kernel, (1,), x, x, x, (17,), 2.0, BLOCK=16)  # a tuple argument
        L.launch(kernel, (1,), x, x, x, 17, 2.0, BLOCK=[16])  # an unhashable constexpr
    kernel.pre_run_hooks.append(lambda *a, **k: None)
    for _ in range(2):
        L.launch(kernel, (1,), x, x, x, 17, 2.0, BLOCK=16)
    assert len(calls["jit"]) == 10 and not calls["launcher"]
    assert calls["jit"][0][1] == (x, x, x, 17, 2.0) and calls["jit"][0][2] == {"BLOCK": 16}  # as given
    assert L.stats()["direct"] == 0 and L.stats()["jit"] == 10


def test_unbindable_arguments_reach_triton_s_own_error(fake):
    kernel, calls, _ = fake
    x = torch.zeros(64)
    L.launch(kernel, (1,), x, x, x, 17, BLOCK=16)  # alpha missing: kernel[grid] gets the call as given
    L.launch(kernel, (1,), x, x, x, 17, 2.0, n=3, BLOCK=16)  # n twice
    assert [c[1:] for c in calls["jit"]] == [((x, x, x, 17), {"BLOCK": 16}),
                                             ((x, x, x, 17, 2.0), {"n": 3, "BLOCK": 16})]
    assert not calls["launcher"]


@pytest.mark.parametrize("value", ["0", "false", "No", " off "])
def test_env_off_takes_the_plain_path_every_time(fake, monkeypatch, value):
    kernel, calls, _ = fake
    monkeypatch.setenv(L.ENV, value)
    assert L.direct_enabled() is False
    x = torch.zeros(64)
    for _ in range(3):
        L.launch(kernel, (1,), x, x, x, 17, 2.0, BLOCK=16)
    assert len(calls["jit"]) == 3 and not calls["launcher"]
    assert L.stats() == {"direct": 0, "compiled": 0, "jit": 3, "errors": 0}
    monkeypatch.setenv(L.ENV, "1")  # read at every launch
    for _ in range(3):
        L.launch(kernel, (1,), x, x, x, 17, 2.0, BLOCK=16)
    assert len(calls["jit"]) == 4 and len(calls["launcher"]) == 2


@pytest.mark.parametrize("value", [None, "", "1", "true", "YES", "on"])
def test_env_on_values(monkeypatch, value):
    if value is None:
        monkeypatch.delenv(L.ENV, raising=False)
    else:
        monkeypatch.setenv(L.ENV, value)
    assert L.direct_enabled() is True


def test_env_bad_value_raises_naming_the_variable(fake, monkeypatch):
    kernel, calls, _ = fake
    monkeypatch.setenv(L.ENV, "sometimes")
    with pytest.raises(ValueError, match=L.ENV):
        L.direct_enabled()
    x = torch.zeros(64)
    with pytest.raises(ValueError, match=L.ENV):
        L.launch(kernel, (1,), x, x, x, 17, 2.0, BLOCK=16)
    assert not calls["jit"]


@pytest.mark.parametrize("where", ["launch_enter_hook", "launch_exit_hook"])
@pytest.mark.parametrize("how", ["function", "chain"])
def test_a_launch_hook_forces_the_jit_path(fake, monkeypatch, where, how):
    kernel, calls, _ = fake
    x = torch.zeros(64)
    L.launch(kernel, (1,), x, x, x, 17, 2.0, BLOCK=16)
    L.launch(kernel, (1,), x, x, x, 17, 2.0, BLOCK=16)
    assert len(calls["launcher"]) == 1  # the default (empty) hook chains allow the direct path
    if how == "function":
        monkeypatch.setattr(triton.knobs.runtime, where, lambda metadata: None)
    else:
        chain = HookChain()
        chain.add(lambda metadata: None)
        monkeypatch.setattr(triton.knobs.runtime, where, chain)
    for _ in range(3):
        L.launch(kernel, (1,), x, x, x, 17, 2.0, BLOCK=16)
    assert len(calls["jit"]) == 4 and len(calls["launcher"]) == 1
    monkeypatch.undo()


def test_a_launcher_error_falls_back_and_disables_the_key(fake):
    kernel, calls, compiled = fake
    x = torch.zeros(64)
    L.launch(kernel, (1,), x, x, x, 17, 2.0, BLOCK=16)  # miss: cached

    def broken(*args):
        calls["launcher"].append("raised")
        raise RuntimeError("launcher broke")

    compiled._run = broken
    L.reset()  # re-cache with the broken launcher
    L.launch(kernel, (1,), x, x, x, 17, 2.0, BLOCK=16)
    L.launch(kernel, (1,), x, x, x, 17, 2.0, BLOCK=16)  # tried, raised: this launch went through kernel[grid]
    L.launch(kernel, (1,), x, x, x, 17, 2.0, BLOCK=16)  # disabled: straight to kernel[grid]
    assert calls["launcher"] == ["raised"]
    assert len(calls["jit"]) == 4
    assert L.stats() == {"direct": 0, "compiled": 1, "jit": 1, "errors": 1}


def test_an_error_of_the_call_itself_reaches_the_caller_and_keeps_the_key(fake, monkeypatch):
    """A launcher error that the plain path raises too (e.g. a CPU tensor with a cached key's dtype
    and alignment: the real launcher's "cannot be accessed from Triton") is the call's: it is
    raised, and the key keeps the direct path."""
    kernel, calls, compiled = fake
    x = torch.zeros(64)
    L.launch(kernel, (1,), x, x, x, 17, 2.0, BLOCK=16)
    good_run = kernel.run
    cache = L._kernel(kernel).cache
    (key, good_entry), = cache.items()

    def bad(*args, **kwargs):
        raise ValueError("Pointer argument (at 0) cannot be accessed from Triton (cpu tensor?)")

    monkeypatch.setattr(kernel, "run", bad)
    cache[key] = (bad, *good_entry[1:])
    with pytest.raises(ValueError, match="cpu tensor"):
        L.launch(kernel, (1,), x, x, x, 17, 2.0, BLOCK=16)
    assert cache[key][0] is bad  # not disabled
    monkeypatch.setattr(kernel, "run", good_run)
    cache[key] = good_entry
    L.launch(kernel, (1,), x, x, x, 17, 2.0, BLOCK=16)
    assert len(calls["launcher"]) == 1 and L.stats()["direct"] == 1 and L.stats()["errors"] == 1


def test_a_changed_global_raises_like_triton(fake):
    kernel, calls, _ = fake
    x = torch.zeros(64)
    L.launch(kernel, (1,), x, x, x, 17, 2.0, BLOCK=16)
    scope = {"SCALE": 2}
    kernel.used_global_vals = {("SCALE", id(scope)): (2, scope)}
    L.launch(kernel, (1,), x, x, x, 17, 2.0, BLOCK=16)
    scope["SCALE"] = 3
    with pytest.raises(RuntimeError, match="SCALE"):
        L.launch(kernel, (1,), x, x, x, 17, 2.0, BLOCK=16)
    assert len(calls["launcher"]) == 1


def test_not_a_compiled_kernel_is_never_cached(fake, monkeypatch):
    kernel, calls, _ = fake
    monkeypatch.setattr(kernel, "run", lambda *a, grid, warmup, **k: calls["jit"].append(a))  # returns None
    x = torch.zeros(64)
    for _ in range(3):
        L.launch(kernel, (1,), x, x, x, 17, 2.0, BLOCK=16)
    assert len(calls["jit"]) == 3 and not calls["launcher"]


def test_importable_without_triton(monkeypatch):
    """No Triton import at import time (the module's doc promises it)."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['triton'] = None; import components.editors.launch as L; "
            "assert 'triton' not in [m for m in sys.modules if sys.modules[m] is not None]; print('ok')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


# ---- real kernels -------------------------------------------------------------------------------------

def _run_both(grid, x, y, n, alpha, block, **options):
    want = torch.full_like(y, -7.0)
    got = torch.full_like(y, -7.0)
    axpy[grid](x, y, want, n, alpha, BLOCK=block, **options)
    L.launch(axpy, grid, x, y, got, n, alpha, BLOCK=block, **options)
    return got, want


def test_interpreter_falls_back_with_equal_results():
    if os.environ.get("TRITON_INTERPRET") != "1" or isinstance(axpy, JITFunction):
        pytest.skip("Triton's interpreter is off (a GPU is present): the GPU test covers real launches")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(100, generator=g), torch.randn(100, generator=g)
    for n in (1, 16, 17, 100):
        got, want = _run_both((triton.cdiv(n, 32),), x, y, n, 1.5, 32)
        assert torch.equal(got, want)
        assert (got[n:] == -7.0).all() and not (got[:n] == -7.0).any()
    assert L.stats()["direct"] == 0 and L.stats()["jit"] == 4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_direct_launches_match_kernel_grid_on_gpu():
    assert isinstance(axpy, JITFunction)
    g = torch.Generator(device="cuda").manual_seed(0)
    base_x = torch.randn(300, device="cuda", generator=g)
    base_y = torch.randn(300, device="cuda", generator=g)
    cases = []
    for dtype in (torch.float32, torch.float16):
        bx, by = base_x.to(dtype), base_y.to(dtype)
        for off in (0, 1):  # 16-byte aligned views and views one element on
            for n in (1, 16, 17, 200):
                cases.append((bx[off:], by[off:], n))
    seen, keys = 0, set()
    for rep in range(5):
        for x, y, n in cases:
            for block, options in ((32, {}), (64, {"num_warps": 2})):
                got, want = _run_both((triton.cdiv(n, block),), x, y, n, 0.5 + rep, block, **options)
                torch.cuda.synchronize()
                assert torch.equal(got, want), (x.dtype, x.data_ptr() % 16, n, block)
                assert not torch.equal(got, torch.full_like(got, -7.0))
                seen += 1
                keys.add((x.dtype, x.data_ptr() % 16 == 0, spec(n), block))
    s = L.stats()
    assert len(keys) == 24  # 2 dtypes × aligned or not × n in {1}, {16}, {17, 200} × 2 configurations
    assert s["compiled"] == len(keys)  # one miss per distinct key...
    assert s["direct"] == seen - len(keys) and s["jit"] == 0 and s["errors"] == 0  # ...then direct every time
    # a direct launch goes on the current stream: queued behind a sleep there, not done on the default one
    x, y, n = cases[-1]
    out = torch.full_like(y, -7.0)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)
        L.launch(axpy, (triton.cdiv(n, 32),), x, y, out, n, 2.0, BLOCK=32)
    assert L.stats()["direct"] == s["direct"] + 1
    assert (out.cpu() == -7.0).all()  # the default stream's view: the side stream is still asleep
    side.synchronize()
    ref = torch.full_like(y, -7.0)
    axpy[(triton.cdiv(n, 32),)](x, y, ref, n, 2.0, BLOCK=32)
    assert torch.equal(out, ref)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_real_launch_hook_sees_direct_launches_go_through_the_jit_path(monkeypatch):
    seen = []
    x = torch.randn(64, device="cuda")
    out = torch.empty_like(x)
    L.launch(axpy, (2,), x, x, out, 64, 1.0, BLOCK=32)
    L.launch(axpy, (2,), x, x, out, 64, 1.0, BLOCK=32)
    assert L.stats()["direct"] == 1
    triton.knobs.runtime.launch_enter_hook.add(seen.append)
    try:
        L.launch(axpy, (2,), x, x, out, 64, 1.0, BLOCK=32)
    finally:
        triton.knobs.runtime.launch_enter_hook.remove(seen.append)
    torch.cuda.synchronize()
    assert len(seen) == 1 and seen[0].get()["name"] == "_axpy"  # Triton's launch metadata (a LazyDict)
    assert L.stats()["direct"] == 1 and L.stats()["jit"] == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_tensors_get_kernel_grid_s_error_and_the_key_stays_direct():
    x = torch.randn(64, device="cuda")
    out = torch.empty_like(x)
    L.launch(axpy, (2,), x, x, out, 64, 1.0, BLOCK=32)
    entry = next(iter(L._kernel(axpy).cache.values()))
    assert entry[0].__self__ is not None and entry[0].__name__ == "launch"  # CudaLauncher's compiled launch
    cpu = x.cpu()  # same dtype and alignment: the cached key
    with pytest.raises(ValueError, match="cannot be accessed from Triton") as plain:
        axpy[(2,)](cpu, x, out, 64, 1.0, BLOCK=32)
    with pytest.raises(ValueError, match="cannot be accessed from Triton") as ours:
        L.launch(axpy, (2,), cpu, x, out, 64, 1.0, BLOCK=32)
    assert str(ours.value) == str(plain.value)
    L.launch(axpy, (2,), x, x, out, 64, 3.0, BLOCK=32)
    ref = torch.empty_like(x)
    axpy[(2,)](x, x, ref, 64, 3.0, BLOCK=32)
    torch.cuda.synchronize()
    assert torch.equal(out, ref) and not torch.equal(out, x)
    assert L.stats() == {"direct": 1, "compiled": 1, "jit": 0, "errors": 1}
