"""Triton kernel launches without JITFunction's per-call work: `launch(kernel, grid, *args, **kwargs)`.

Why (issue 7, benchmarks/RESULTS.md): a b1 generate() with the fused editor kernels is bound by the
host, and each `kernel[grid](...)` costs ~15.8 µs of host time on the H200 host — Triton's
`JITFunction.run` binds the arguments, specialises each one in C++, builds and stringifies a cache
key, builds launch metadata for the (by default empty) launch-hook chain and calls that chain —
against ~8.6 µs for the same launch through the `CompiledKernel` it returns
(benchmarks/gpu_host_overhead.py, `launcher_costs`). A generate() launches 56 of them.

`launch` is a drop-in for `kernel[grid](*args, **kwargs)` (kwargs: the kernel's constexpr or other
parameters by name, and launch options such as num_warps / num_stages). It keeps its own cache of
the `CompiledKernel`s that `kernel[grid]` returns, under a key computed cheaply in Python from what
Triton 3.6 specialises on (`triton._C.libtriton.native_specialize_impl`):

- the current CUDA device index (Triton compiles and launches per current device);
- each tensor argument's dtype and whether `data_ptr() % 16 == 0` ("D" alignment attribute), any
  torch.Tensor subclass alike (Triton's test is `data_ptr`);
- each int argument's class: == 1 (a constexpr to Triton), otherwise i32 / i64 / u64 by range,
  and % 16 == 0 ("D"); bools ("u1"), floats ("fp32") and None ("constexpr") by type;
- the constexpr parameters' values, the launch options (the other kwargs), and the two global
  knobs `JITFunction.run` folds into the options (`knobs.runtime.debug`,
  `knobs.compilation.instrumentation_mode`).

The key is never coarser than Triton's own (it can be finer, e.g. for `do_not_specialize`
parameters: then two keys hold the same compiled kernel). A miss launches through `kernel[grid]`
and stores what it returns; a hit calls the compiled kernel's launcher directly, as
`JITFunction.run` does, with the current stream of the current device, no launch metadata and no
hooks. The plain `kernel[grid]` path serves whenever the direct one is not known to be safe:

- `MRT_DIRECT_LAUNCH=0` (or false/no/off) in the environment: every launch (to compare, or to rule
  the direct path out); 1/true/yes/on or unset: direct where possible; any other value raises
  ValueError;
- Triton's interpreter (TRITON_INTERPRET=1: the kernel is an `InterpretedFunction`, and a launch
  returns no `CompiledKernel`), or any kernel object that is not a `JITFunction` (autotuner,
  heuristics);
- a launch hook installed (`triton.knobs.runtime.launch_enter_hook` / `launch_exit_hook` set, or a
  non-empty `HookChain`, e.g. Triton's profiler): those need Triton's launch metadata;
- a `pre_run_hooks` entry on the kernel, a callable grid or one that is not 1–3 values, an argument
  type this key does not model (tuples, tensor descriptors, numpy scalars...), arguments that do
  not bind (missing, duplicated: Triton raises its own error), an unhashable constexpr;
- any exception in the direct call: that launch goes through `kernel[grid]` (a launcher error is
  raised before the kernel is queued, so nothing runs twice); if that succeeds, the key takes the
  plain path from then on; if it raises as well, the error was the call's and reaches the caller.
  CPU tensors take this way: the key does not look at a tensor's device (0.1 µs a tensor on the
  H200 host), but the launcher checks every pointer (`cuPointerGetAttribute`) before it launches
  and raises for host memory, as it does under `kernel[grid]`, whose error the caller then gets.

The hit path (µs of host time on the H200 host, where a torch attribute read costs ~0.1 µs): one
generated function per kernel binds the arguments and builds the key in one go (Python's own
argument binding, no loops: dtype and `data_ptr()` of each tensor are the bulk of it); the launch
calls the CUDA launcher's compiled `launch` function itself where `CudaLauncher.__call__` would
only add nothing-to-allocate scratch checks (no global or profile scratch: ~1 µs less), else the
launcher object as `JITFunction.run` does. Measured (benchmarks/gpu_host_overhead.py, rows kernel,
H200 host, host µs per launch, two runs): `kernel[grid]` 16.7 / 15.6, the `CompiledKernel`'s runner
8.8 / 8.5, `launch` 9.5 / 9.0 (~5 of it the launcher's own C call, ~2 binding and key for 6 tensors).

Like `JITFunction.run`, a hit checks that the globals the kernel read at compile time are
unchanged (RuntimeError otherwise). `stats()` counts the launches of each kind; `reset()` forgets
the caches (tests). Importable without Triton: Triton is imported at the first launch.
"""

from __future__ import annotations

import os

ENV = "MRT_DIRECT_LAUNCH"

_TRUE = ("", "1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_DISABLED = "disabled"  # cache entry: the direct path failed for this key (or cannot serve it)
_DEVICE_ARG, _OPTIONS_ARG = "_mrt_device_", "_mrt_options_"  # the generated binder's own names

# os.environ's own mapping (bytes on POSIX): `os.environ.get` of an unset variable costs ~0.5 µs
# (a KeyError raised and caught inside), a plain dict lookup ~0.05 µs; both see setenv/monkeypatch.
try:
    _env_data, _env_key = os.environ._data, os.environ.encodekey(ENV)  # type: ignore[attr-defined]
except AttributeError:  # pragma: no cover - not CPython's os._Environ
    _env_data, _env_key = os.environ, ENV
_env_parsed: dict = {None: True}  # raw environment value → enabled

# Launch counts by path: direct (the compiled kernel's launcher), compiled (a miss: launched through
# kernel[grid] and cached), jit (plain kernel[grid], direct path not safe or disabled), errors (a
# direct call raised; the launch then went through kernel[grid]).
_DIRECT, _COMPILED, _JIT, _ERRORS = range(4)
_counts = [0, 0, 0, 0]

_kernels: dict = {}  # id(kernel) → _Kernel
_rt = None  # resolved Triton state (`_Runtime`), None until the first launch, False without Triton


def direct_enabled() -> bool:
    """True unless `MRT_DIRECT_LAUNCH` is 0/false/no/off (then every launch is `kernel[grid]`);
    ValueError for a value that is neither on (1/true/yes/on, or unset) nor off."""
    raw = _env_data.get(_env_key)
    try:
        return _env_parsed[raw]
    except KeyError:
        pass
    value = (raw.decode(errors="replace") if isinstance(raw, bytes) else raw).strip().lower()
    if value in _TRUE:
        _env_parsed[raw] = True
    elif value in _FALSE:
        _env_parsed[raw] = False
    else:
        raise ValueError(f"{ENV}={value!r}: use 1/true/yes/on or 0/false/no/off")
    return _env_parsed[raw]


def stats() -> dict[str, int]:
    """Launch counts since the last `reset()`: direct, compiled (misses), jit (plain path), errors."""
    return {"direct": _counts[_DIRECT], "compiled": _counts[_COMPILED], "jit": _counts[_JIT],
            "errors": _counts[_ERRORS]}


def reset() -> None:
    """Forget every cached compiled kernel and per-kernel table, zero the counts."""
    _kernels.clear()
    _counts[:] = [0, 0, 0, 0]


class _Runtime:
    """What the launch path needs from Triton and torch, looked up once."""

    __slots__ = ("jit_function", "compiled_kernel", "hook_chain", "runtime_knobs", "compilation_knobs",
                 "device", "stream", "tensor", "cuda_launcher")

    def __init__(self):
        import torch
        import triton
        from triton.compiler import CompiledKernel
        from triton.knobs import HookChain
        from triton.runtime.jit import JITFunction

        self.jit_function, self.compiled_kernel, self.hook_chain = JITFunction, CompiledKernel, HookChain
        self.runtime_knobs, self.compilation_knobs = triton.knobs.runtime, triton.knobs.compilation
        self.tensor = torch.Tensor
        self.device = self.stream = self.cuda_launcher = None  # `resolve_driver`, at the first direct try

    def resolve_driver(self) -> bool:
        """Triton's own current-device and current-stream getters (`GPUDriver`: torch's raw ones);
        False (and the plain path for good) where there is no GPU driver."""
        try:
            import torch
            from triton.runtime import driver

            active = driver.active
            device = active.get_current_device
            if device is torch.cuda.current_device and hasattr(torch._C, "_cuda_getDevice"):
                device = torch._C._cuda_getDevice  # the same, without the lazy-init check
            self.stream = active.get_current_stream
            try:
                from triton.backends.nvidia.driver import CudaLauncher

                self.cuda_launcher = CudaLauncher
            except Exception:  # noqa: BLE001 - another backend: its launcher objects serve as they are
                self.cuda_launcher = None
            self.device = device
        except Exception:  # noqa: BLE001 - no GPU driver: kernel[grid] raises (or interprets) itself
            self.device = False
        return bool(self.device)


def _runtime():
    global _rt
    if _rt is None:
        try:
            _rt = _Runtime()
        except Exception:  # noqa: BLE001 - no Triton (or a broken one): plain path, which reports it
            _rt = False
    return _rt


class _Unmodelled(Exception):
    """An argument the key does not model: the plain path serves the launch."""


def _other_kind(x):
    """The key slots of an argument that is neither a torch.Tensor nor an int (see `_binder`)."""
    c = x.__class__
    if c is bool:
        return "u1", None
    if c is float:
        return "fp32", None
    if x is None:
        return None, None
    if isinstance(x, _rt.tensor):  # a subclass (nn.Parameter...)
        return x.dtype, not x.data_ptr() & 15
    raise _Unmodelled(c.__name__)


def _options_key(options: dict) -> tuple:
    return tuple(options.items()) if len(options) == 1 else tuple(sorted(options.items()))


def _binder(kernel, rt):
    """A function `bind(device, *args, **kwargs) -> (ordered arguments, key, launch options)` for
    `kernel`, generated once (as Triton does for its own binder): Python binds the arguments, and
    each non-constexpr parameter adds two key slots, unrolled:

    - torch.Tensor: dtype, data_ptr() % 16 == 0;
    - int: 1 for == 1 (Triton: constexpr 1), else 2 / 3 / 4 for i32 / i64 / u64 by range; % 16 == 0;
    - bool: "u1"; float: "fp32"; None: None (second slot None); anything else raises `_Unmodelled`;

    then the constexpr values in order, the launch options (sorted), the device and the two knobs.
    None where the signature cannot be generated (a parameter that is not positional-or-keyword)."""
    import inspect

    params = kernel.params
    names = [p.name for p in params]
    sig = kernel.signature.parameters
    if (_DEVICE_ARG in names or _OPTIONS_ARG in names or not all(n.isidentifier() for n in names)
            or any(sig[n].kind is not inspect.Parameter.POSITIONAL_OR_KEYWORD for n in names)):
        return None
    namespace = {"_T": rt.tensor, "_other": _other_kind, "_opts": _options_key, "_rk": rt.runtime_knobs,
                 "_ck": rt.compilation_knobs}
    arglist, lines, slots = [_DEVICE_ARG], [], []
    for i, (name, p) in enumerate(zip(names, params)):
        default = sig[name].default
        if default is inspect.Parameter.empty:
            arglist.append(name)
        else:
            namespace[f"_default_{i}"] = default
            arglist.append(f"{name}=_default_{i}")
        if p.is_constexpr:
            continue
        lines += [f"    c = {name}.__class__",
                  f"    if c is _T:",
                  f"        k{i} = {name}.dtype; a{i} = not {name}.data_ptr() & 15",
                  f"    elif c is int:",
                  f"        k{i} = (1 if {name} == 1 else 2 if -0x80000000 <= {name} <= 0x7FFFFFFF else"
                  f" 3 if {name} <= 0x7FFFFFFFFFFFFFFF else 4); a{i} = not {name} & 15",
                  f"    else:",
                  f"        k{i}, a{i} = _other({name})"]
        slots += [f"k{i}", f"a{i}"]
    slots += [n for n, p in zip(names, params) if p.is_constexpr]
    key = ", ".join([_DEVICE_ARG, "_rk.debug", "_ck.instrumentation_mode", *slots,
                     f"_opts({_OPTIONS_ARG}) if {_OPTIONS_ARG} else ()"])
    src = "\n".join([f"def bind({', '.join(arglist)}, **{_OPTIONS_ARG}):", *lines,
                     f"    return ({', '.join(names)},), ({key}), {_OPTIONS_ARG}", ""])
    exec(compile(src, f"<launch binder of {kernel.__name__}>", "exec"), namespace)  # noqa: S102
    return namespace["bind"]


class _Kernel:
    """Per-kernel state, made once: the generated binder and the cache of compiled kernels."""

    __slots__ = ("kernel", "bind", "cache")

    def __init__(self, kernel, rt):
        self.kernel = kernel
        self.cache: dict = {}
        self.bind = _binder(kernel, rt) if rt and isinstance(kernel, rt.jit_function) else None


def _kernel(kernel):
    meta = _kernels.get(id(kernel))
    if meta is None or meta.kernel is not kernel:
        meta = _kernels[id(kernel)] = _Kernel(kernel, _runtime())
    return meta


def specialization_key(kernel, args, kwargs=None, device: int = 0):
    """The cache key `launch` uses for `kernel` with these arguments on CUDA device `device`, or None
    where only the plain path can serve them (the interpreter's kernels, unmodelled arguments...)."""
    meta = _kernel(kernel)
    if meta.bind is None:
        return None
    try:
        key = meta.bind(device, *args, **(kwargs or {}))[1]
        hash(key)
    except Exception:  # noqa: BLE001 - what `launch` sends down the plain path
        return None
    return key


def _check_globals(used_global_vals) -> None:
    """JITFunction.run's check that the globals a kernel read when compiled still hold those values."""
    missing = object()
    for (name, _), (val, globals_dict) in used_global_vals.items():
        if (new := globals_dict.get(name, missing)) != val:
            raise RuntimeError(f"Global variable {name} has changed since we compiled this kernel, from {val} to {new}")


def launch(kernel, grid, *args, **kwargs) -> None:
    """`kernel[grid](*args, **kwargs)`, through the cached compiled kernel's launcher where safe.

    `args` follow the kernel's parameter order; `kwargs` name any parameter (constexprs included)
    and launch options (num_warps, num_stages, ...). `grid`: a tuple or list of 1–3 ints (anything
    else takes the plain path). Same effect as `kernel[grid](...)`; returns None."""
    enabled = _env_parsed.get(_env_data.get(_env_key))  # direct_enabled(), inlined
    if enabled is None:
        enabled = direct_enabled()  # a new value: parsed once; a bad one raises, whatever the kernel
    meta = _kernels.get(id(kernel))
    if meta is None or meta.kernel is not kernel:
        meta = _kernel(kernel)
    rt = _rt
    bind = meta.bind
    if not enabled or bind is None or kernel.pre_run_hooks:
        _counts[_JIT] += 1
        kernel[grid](*args, **kwargs)
        return
    hook, exit_hook = rt.runtime_knobs.launch_enter_hook, rt.runtime_knobs.launch_exit_hook
    gt = grid.__class__
    n = len(grid) if gt is tuple or gt is list else 0
    if ((hook is not None and (hook.__class__ is not rt.hook_chain or hook.calls))  # Triton 3.6: empty
            or (exit_hook is not None and (exit_hook.__class__ is not rt.hook_chain or exit_hook.calls))
            or not 1 <= n <= 3 or not (rt.device or rt.resolve_driver())):
        _counts[_JIT] += 1
        kernel[grid](*args, **kwargs)
        return
    device = rt.device()
    try:
        full, key, options = bind(device, *args, **kwargs)
        entry = meta.cache.get(key)
    except Exception:  # noqa: BLE001 - unmodelled or unbindable arguments, an unhashable constexpr
        _counts[_JIT] += 1
        kernel[grid](*args, **kwargs)
        return
    if entry is None:  # a miss: Triton compiles (or finds) it, launches it, and we keep it
        compiled = kernel[grid](*full, **options)
        _counts[_COMPILED] += 1
        meta.cache[key] = _entry(compiled, rt)
        return
    if entry is _DISABLED:
        _counts[_JIT] += 1
        kernel[grid](*full, **options)
        return
    fn, function, cooperative, pdl, packed_metadata = entry
    if kernel.used_global_vals:
        _check_globals(kernel.used_global_vals)
    try:
        fn(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, rt.stream(device), function, cooperative,
           pdl, None, None, packed_metadata, None, None, None, *full)
    except Exception:  # noqa: BLE001 - the launcher raises before it queues the kernel: nothing ran
        _counts[_ERRORS] += 1
        kernel[grid](*full, **options)  # the caller's error (e.g. a CPU tensor) raises here as well...
        meta.cache[key] = _DISABLED  # ...else the direct path is at fault: the plain path from now on
        return
    _counts[_DIRECT] += 1


def _entry(compiled, rt):
    """The cache entry of what a miss returned: (launch function, kernel handle, cooperative-grid
    flag, PDL flag, packed metadata), called as the CUDA launcher's compiled `launch` is —
    `(gx, gy, gz, stream, function, cooperative, pdl, global_scratch, profile_scratch, packed_metadata,
    launch_metadata, enter_hook, exit_hook, *args)`; `_DISABLED` when it is no `CompiledKernel` (the
    interpreter) or its launcher cannot be had."""
    if not isinstance(compiled, rt.compiled_kernel):
        return _DISABLED
    try:
        launcher = compiled.run
        if (rt.cuda_launcher is not None and launcher.__class__ is rt.cuda_launcher
                and not launcher.global_scratch_size and not launcher.profile_scratch_size):
            # CudaLauncher.__call__ only allocates the scratch buffers (none here) and calls this
            return (launcher.launch, compiled.function, launcher.launch_cooperative_grid, launcher.launch_pdl,
                    compiled.packed_metadata)

        def via_launcher(gx, gy, gz, stream, function, _cooperative, _pdl, _global_scratch, _profile_scratch,
                         *rest):
            launcher(gx, gy, gz, stream, function, *rest)  # JITFunction.run's call of the launcher

        return via_launcher, compiled.function, None, None, compiled.packed_metadata
    except Exception:  # noqa: BLE001 - e.g. out of resources when the handles load: let Triton say so
        return _DISABLED
