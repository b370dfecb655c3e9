"""Training-step cost of MRT against its floor, LoRA r128 and full fine-tuning at LLaVA-1.5-7B scale.

Why this exists (issue 7): MRT trains ~0.03% of the parameters, but what a user pays is step time,
throughput and peak memory. Its editors sit from the second vision layer on, so an MRT step must at
least run the frozen model forward and backward through (almost) the whole network: that is the
**floor** (frozen model, no trainable weights, gradient to the pixel inputs). MRT is judged against
that floor and against peft's LoRA r128 on the LM's linear layers, the usual PEFT baseline.

What is built: `llava_7b_config()` (CLIP ViT-L/14-336 + Llama-7B) in bf16, directly on the device,
then every weight re-drawn in place (matrices ~ N(0, 0.02), norm weights 1, biases 0): the speed
does not depend on the values, but memory that was never written can hold NaNs. No fp32 copy ever
exists on the host. One model serves every arm (editors are hooks and detach; peft unloads); the
arms run in order floor, mrt, lora, lora_fp32, full per batch size, and each starts from freed memory and
reset peak statistics. No gradient checkpointing anywhere.

A step = forward with labels (answer tokens only), backward, and for the trainable arms gradient
clipping (1.0) and one fused AdamW step; the floor has no optimiser. Timing: CUDA events around
each step after warm-up steps, the median over repeated steps (min/max kept). Tokens/s counts all
B × L positions (576 image tokens + the padded text length).

Run (GPU):   python benchmarks/gpu_train_step.py --json out.json --markdown out.md [--profile DIR]
Check (CPU): python benchmarks/gpu_train_step.py --smoke
Host cost:   python benchmarks/gpu_train_step.py --host-bound --arms floor mrt … (tiny widths, 7B depth)
CUDA graphs: --arms floor floor_graphed mrt mrt_graphed — the vision layers replayed as graphs, without
             and with editors (components/editors/graphs.py, `train.cuda_graphs`)
Prints one JSON object (the summary) as its last line.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

# Run from anywhere: the repository root (parent of benchmarks/) must be importable.
_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

ARMS = ("floor", "mrt", "lora", "lora_fp32", "full")
BASELINE_ARM = "mrt_before"  # MRT with an earlier copy of components/editors (--baseline-editors)
LORA_TARGETS = r".*language_model.*\.(q|k|v|o|gate|up|down)_proj"
ANSWER_TOKENS = 32  # supervised tokens at the end of each text (LLaVA-style short answers)


# ---------------------------------------------------------------------------------------------
# model and data
# ---------------------------------------------------------------------------------------------
def tiny_config():
    """A LLaVA small enough for a CPU logic check, with the 7B config's structure."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
        image_size=56, patch_size=14, projection_dim=32, hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        hidden_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
        intermediate_size=256, vocab_size=512, max_position_embeddings=512, pad_token_id=501,
        tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision, text_config=text, projector_hidden_act="gelu", vision_feature_layer=-2,
        vision_feature_select_strategy="default", image_token_id=500, image_seq_length=16,
        tie_word_embeddings=False,
    )


def tiny_placement():
    """The paper's placement scaled to `tiny_config()` (visual layers 1..n−2, all LM layers)."""
    from components.core.config import EditorParams

    return EditorParams.model_validate(
        {
            "visual": {"layers": "1-2", "rank": 6},
            "projector": {"enabled": True, "rank": 6},
            "prefix": {"layers": "all", "rank": 4, "length": 4},
            "suffix": {"layers": "all", "rank": 4, "length": 4},
        }
    )


def n_image_tokens(config) -> int:
    v = config.vision_config
    return (v.image_size // v.patch_size) ** 2


def init_weights_(model, std: float = 0.02) -> None:
    """Write every parameter in place on its device: matrices N(0, std), vectors of norms 1,
    biases 0. Speed does not depend on the values; finite, moderate values keep bf16 from
    overflowing (so the loss is a real number and NaN checks mean something)."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, std)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)


def build_model(config, device, dtype):
    """LlavaForConditionalGeneration in `dtype`, allocated on `device` and initialised there."""
    import torch
    from transformers import LlavaForConditionalGeneration

    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype)
    init_weights_(model)
    model.config.use_cache = False
    return model


def make_batch(config, batch: int, text_tokens: int, device, dtype, seed: int = 0, answer_tokens: int = ANSWER_TOKENS):
    """One LLaVA-1.5-style training batch: `BOS USER: <image>×576 \\n instruction ASSISTANT: answer EOS`.

    Text lengths vary across the batch (text_tokens, −4, −8, −12, …) and are right-padded to
    `text_tokens`, so padding and per-sample positions are exercised; labels are the answer
    tokens only (prompt and padding −100).
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    n_img = n_image_tokens(config)
    image_id = config.image_token_id
    text_cfg = config.text_config
    pad = text_cfg.pad_token_id if text_cfg.pad_token_id is not None else 0
    vocab_hi = min(image_id, text_cfg.vocab_size, pad if pad > 2 else text_cfg.vocab_size)
    seq = n_img + text_tokens
    answer_tokens = min(answer_tokens, max(1, text_tokens // 4))
    ids = torch.full((batch, seq), pad, dtype=torch.long)
    mask = torch.zeros((batch, seq), dtype=torch.long)
    labels = torch.full((batch, seq), -100, dtype=torch.long)
    for i in range(batch):
        text_len = max(answer_tokens + 8, text_tokens - 4 * (i % 4))
        words = torch.randint(3, vocab_hi, (text_len - 2,), generator=g)
        # BOS + 3 "USER:" tokens before the image, the rest after it; EOS closes the answer.
        row = torch.cat([torch.tensor([1]), words[:3], torch.full((n_img,), image_id), words[3:], torch.tensor([2])])
        ids[i, : row.numel()] = row
        mask[i, : row.numel()] = 1
        labels[i, row.numel() - answer_tokens : row.numel()] = row[-answer_tokens:]
    size = config.vision_config.image_size
    pixels = torch.randn((batch, 3, size, size), generator=g)
    return {
        "input_ids": ids.to(device),
        "attention_mask": mask.to(device),
        "labels": labels.to(device),
        "pixel_values": pixels.to(device=device, dtype=dtype),
    }


# ---------------------------------------------------------------------------------------------
# the arms: each returns (step function, trainable parameter count, cleanup)
# ---------------------------------------------------------------------------------------------
def _optimizer(params, lr: float, device):
    import torch

    fused = getattr(device, "type", str(device)) == "cuda"
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=fused)


def _trainer_step(model, batch, params, opt) -> Callable[[], Any]:
    import torch

    def step():
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def setup_floor(model, batch, device, placement):
    model.requires_grad_(False)

    def step():
        inputs = dict(batch)
        inputs["pixel_values"] = batch["pixel_values"].detach().requires_grad_(True)
        loss = model(**inputs).loss
        loss.backward()
        if inputs["pixel_values"].grad is None:
            raise RuntimeError("floor arm: no gradient reached pixel_values")
        return loss.detach()

    return step, 0, lambda: None


def load_editors_package(path: Path, name: str = "_baseline_editors"):
    """Import a copy of components/editors (e.g. `git show HEAD:…` into a folder) as its own
    package, so that the old and the new editors are timed side by side in one process."""
    import importlib.util

    init = Path(path) / "__init__.py"
    if not init.is_file():
        raise SystemExit(f"--baseline-editors {path}: no __init__.py (expected a copy of components/editors)")
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(path)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


_BASELINE: dict[str, Any] = {}  # {"attach": the baseline package's attach} when --baseline-editors is given


def setup_mrt_before(model, batch, device, placement):
    if "attach" not in _BASELINE:
        raise SystemExit(f"arm {BASELINE_ARM} needs --baseline-editors")
    return setup_mrt(model, batch, device, placement, attach_fn=_BASELINE["attach"])


def setup_mrt(model, batch, device, placement, attach_fn=None):
    from components.editors import attach

    editors = (attach_fn or attach)(model, placement)
    params = [p for p in editors.parameters() if p.requires_grad]
    opt = _optimizer(params, 6e-4, device)
    n = sum(p.numel() for p in params)

    def cleanup():
        editors.detach()
        for p in params:
            p.grad = None

    return _trainer_step(model, batch, params, opt), n, cleanup


def setup_lora(model, batch, device, placement, r: int = 128, fp32_adapters: bool = False):
    """LLaVA-1.5's LoRA recipe on the LM (r 128, alpha 256, dropout 0.05). By default the
    adapters are kept in the model's bf16 — the fastest and leanest LoRA, so the strongest
    baseline for MRT. `fp32_adapters` is peft's own default (autocast_adapter_dtype=True): fp32
    adapter weights, so the LoRA branch of every linear layer runs in fp32 (the `lora_fp32` arm)."""
    from peft import LoraConfig, get_peft_model

    model.requires_grad_(False)
    config = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.05, target_modules=LORA_TARGETS, bias="none")
    peft_model = get_peft_model(model, config, autocast_adapter_dtype=fp32_adapters)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = _optimizer(params, 2e-4, device)
    n = sum(p.numel() for p in params)

    def cleanup():
        for p in params:
            p.grad = None
        peft_model.unload()  # puts the original Linear modules back into `model`
        model.requires_grad_(False)

    return _trainer_step(peft_model, batch, params, opt), n, cleanup


def setup_full(model, batch, device, placement):
    """LM (embeddings, decoder, lm_head) + projector trainable, vision tower frozen. AdamW keeps
    its state in the parameters' bf16 (the leanest full fine-tune; fp32 master weights and
    states would add 8 bytes per parameter, ~54 GB more)."""
    model.requires_grad_(False)
    core = model.model
    for module in (core.language_model, core.multi_modal_projector, model.lm_head):
        module.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = _optimizer(params, 2e-5, device)
    n = sum(p.numel() for p in params)

    def cleanup():
        for p in params:
            p.grad = None
        opt.state.clear()
        model.requires_grad_(False)

    return _trainer_step(model, batch, params, opt), n, cleanup


def setup_lora_fp32(model, batch, device, placement, r: int = 128):
    return setup_lora(model, batch, device, placement, r=r, fp32_adapters=True)


def only_groups(placement, keep: set[str]):
    """The placement with every editor group outside `keep` switched off (cost decomposition)."""
    data = placement.model_dump()
    for group in ("visual", "prefix", "suffix"):
        if group not in keep:
            data[group]["layers"] = "none"
    if "projector" not in keep:
        data["projector"]["enabled"] = False
    return type(placement).model_validate(data)


def setup_mrt_vision(model, batch, device, placement):
    """MRT with ψ_V and ψ_c only: what the vision-side editors cost."""
    return setup_mrt(model, batch, device, only_groups(placement, {"visual", "projector"}))


def setup_mrt_lm(model, batch, device, placement):
    """MRT with ψ_P and ψ_S only: what the LM-side editors cost."""
    return setup_mrt(model, batch, device, only_groups(placement, {"prefix", "suffix"}))


def setup_mrt_nolaunch(model, batch, device, placement):
    """MRT with every editor kernel launch skipped (kernels.launch and orthonormal_kernel.launch
    stubbed; the outputs are whatever the allocator hands out): the editors' host work and their
    few operator kernels without their Triton kernels' device time. Against `floor` and `mrt` it
    says whether an editor kernel's device time or its host cost is what the step pays for."""
    from components.editors import kernels, orthonormal_kernel

    modules = (kernels, orthonormal_kernel)
    saved = [m.launch for m in modules]
    for m in modules:
        m.launch = lambda *a, **k: None
    try:
        step, n, cleanup = setup_mrt(model, batch, device, placement)
    except BaseException:
        for m, fn in zip(modules, saved):
            m.launch = fn
        raise

    def restore():
        try:
            cleanup()
        finally:
            for m, fn in zip(modules, saved):
                m.launch = fn

    return step, n, restore


def setup_floor_graphed(model, batch, device, placement):
    """The floor with the vision layers replayed as CUDA graphs (components/editors/graphs.py,
    `LayerGraphs` without editors): the floor of a pipeline that graphs its vision tower, against
    which `mrt_graphed` is the editors' own cost."""
    from components.editors.graphs import LayerGraphs
    from components.editors.sites import llava_modules

    step, n, _ = setup_floor(model, batch, device, placement)
    graphs = LayerGraphs(llava_modules(model)[1]).install()
    return step, n, graphs.remove


def setup_mrt_graphed(model, batch, device, placement):
    """MRT with `train.cuda_graphs` on: each vision layer, editor included, one graph replay forward
    and one backward (`MRTEditors.use_cuda_graphs`)."""
    from components.editors import attach

    if getattr(device, "type", str(device)) != "cuda":
        raise SystemExit("arm mrt_graphed needs a CUDA device")
    editors = attach(model, placement)
    editors.use_cuda_graphs()
    params = [p for p in editors.parameters() if p.requires_grad]
    opt = _optimizer(params, 6e-4, device)

    def cleanup():
        stats = dict(editors.graphs.stats)
        editors.detach()
        for p in params:
            p.grad = None
        print(json.dumps({"mrt_graphed_stats": stats}), flush=True)

    return _trainer_step(model, batch, params, opt), sum(p.numel() for p in params), cleanup


SETUP = {"floor": setup_floor, "mrt": setup_mrt, "lora": setup_lora, "lora_fp32": setup_lora_fp32, "full": setup_full,
         BASELINE_ARM: setup_mrt_before, "mrt_vision": setup_mrt_vision, "mrt_lm": setup_mrt_lm,
         "mrt_nolaunch": setup_mrt_nolaunch, "floor_graphed": setup_floor_graphed, "mrt_graphed": setup_mrt_graphed}
EXTRA_ARMS = (BASELINE_ARM, "mrt_vision", "mrt_lm", "mrt_nolaunch", "floor_graphed", "mrt_graphed")


# ---------------------------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------------------------
def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def time_steps(step: Callable[[], Any], device, warmup: int, steps: int, gc_off: bool = False
               ) -> tuple[list[float], list[float]]:
    """(step times in ms, losses). CUDA events on GPU, perf_counter on CPU. `gc_off`: Python's cyclic
    garbage collector disabled during warm-up and timed steps (re-enabled after), to see what its
    collections cost a host-bound step."""
    import torch

    if gc_off and gc.isenabled():
        gc.disable()
        try:
            return time_steps(step, device, warmup, steps)
        finally:
            gc.enable()
    losses = []
    for _ in range(warmup):
        losses.append(step())
    _sync(device)
    times = []
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
        for start, end in events:
            start.record()
            losses.append(step())
            end.record()
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in events]
    else:
        for _ in range(steps):
            t0 = time.perf_counter()
            losses.append(step())
            times.append((time.perf_counter() - t0) * 1e3)
    return times, [float(x) for x in losses]


_PROFILER_MARKERS = ("Command Buffer Full", "Buffer Flush", "Activity Buffer Request")


def _device_time(evt) -> float:
    for name in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(evt, name):
            return float(getattr(evt, name))
    return 0.0


def _is_kernel(evt) -> bool:
    """Device-side activity (kernels, memcpy/memset), not the host op that launched it: summing
    both would count every kernel twice."""
    from torch.autograd import DeviceType

    return getattr(evt, "device_type", None) == DeviceType.CUDA and evt.key not in _PROFILER_MARKERS


def profile_steps(step, device, steps: int, out_dir: Path, tag: str) -> dict[str, Any]:
    """Profile `steps` steps and write two op tables (by device time, by host time). Returns per
    step: device time per kernel name, host time per op, the device busy time (kernels only) and
    the host↔device synchronisations (each one drains the launch queue and idles the GPU)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    _sync(device)
    t0 = time.perf_counter()
    shapes = tag.startswith("mrt")  # which editor op costs what: group the MRT arms' ops by input shape
    with profile(activities=activities, record_shapes=shapes) as prof:
        for _ in range(steps):
            step()
        _sync(device)
    wall_ms = (time.perf_counter() - t0) * 1e3 / steps
    averages = prof.key_averages()
    tables = []
    for sort_key in ("self_cuda_time_total", "self_cpu_time_total"):
        try:
            tables.append(f"== sorted by {sort_key}\n" + averages.table(sort_by=sort_key, row_limit=45, max_name_column_width=90))
        except Exception:  # pragma: no cover - sort keys renamed in some torch versions
            tables.append(averages.table(sort_by="self_device_time_total", row_limit=45))
    if shapes:
        try:
            by_shape = prof.key_averages(group_by_input_shape=True)
            tables.append("== by input shape, sorted by self_cuda_time_total\n" + by_shape.table(
                sort_by="self_cuda_time_total", row_limit=60, max_name_column_width=60, max_shapes_column_width=80))
        except Exception as exc:  # pragma: no cover - profiler API drift
            tables.append(f"(no shape table: {exc})")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"profile_{tag}.txt").write_text("\n\n".join(tables))
    kernels = {evt.key: _device_time(evt) / steps for evt in averages if _is_kernel(evt) and _device_time(evt) > 0}
    host_ops = {evt.key: float(evt.self_cpu_time_total) / steps for evt in averages if not _is_kernel(evt)}
    counts = {evt.key: evt.count / steps for evt in averages}
    syncs = {k: c for k, c in counts.items() if "Synchronize" in k or "Memcpy DtoH" in k or k == "aten::_local_scalar_dense"}
    kernel_ms = sum(kernels.values()) / 1e3
    return {
        "wall_ms_per_step": wall_ms,
        "device_busy_ms_per_step": kernel_ms,
        "device_busy_share": kernel_ms / wall_ms if wall_ms else None,
        "kernel_launches_per_step": sum(counts[k] for k in kernels),
        "syncs_per_step": syncs,
        "per_kernel_device_us": kernels,
        "per_op_host_us": host_ops,
    }


def cprofile_steps(step, device, steps: int, out_dir: Path, tag: str, top: int = 60) -> dict[str, Any]:
    """`steps` steps under cProfile (Python's own profiler: host time per Python function,
    backward hooks and autograd Functions included, the CUDA launches inside them too). Writes
    the table sorted by own time and by cumulative time; returns the host ms per step."""
    import cProfile
    import io
    import pstats

    _sync(device)
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    for _ in range(steps):
        step()
    _sync(device)
    prof.disable()
    wall = (time.perf_counter() - t0) * 1e3 / steps
    text = io.StringIO()
    for key in ("tottime", "cumulative"):
        text.write(f"== sorted by {key}, {steps} steps\n")
        pstats.Stats(prof, stream=text).sort_stats(key).print_stats(top)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"cprofile_{tag}.txt").write_text(text.getvalue())
    return {"wall_ms_per_step": wall}


def export_trace(step, device, path: Path) -> None:
    """One profiled step as a gzipped Chrome trace: where the GPU waits for the host is visible only
    on a timeline (kernel gaps against the host ops running meanwhile)."""
    import gzip
    import shutil as _shutil

    from torch.profiler import ProfilerActivity, profile

    _sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        _sync(device)
    raw = path.with_suffix("")
    path.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(raw))
    with open(raw, "rb") as src, gzip.open(path, "wb", compresslevel=6) as dst:
        _shutil.copyfileobj(src, dst)
    raw.unlink()


def run_arm(arm, model, batch, device, placement, warmup, steps, profile_dir=None, profile_steps_n=0, lora_r=128,
            trace=False, gc_off=False, cprofile_dir=None):
    """One arm at one batch size: setup, warm-up, timed steps, optional profile, cleanup."""
    import torch

    free_memory(device)
    static = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    result: dict[str, Any] = {"arm": arm, "batch": int(batch["input_ids"].shape[0]), "seq": int(batch["input_ids"].shape[1])}
    cleanup = lambda: None  # noqa: E731
    try:
        kwargs = {"r": lora_r} if arm.startswith("lora") else {}
        step, trainable, cleanup = SETUP[arm](model, batch, device, placement, **kwargs)
        times, losses = time_steps(step, device, warmup, steps, gc_off)
        median = statistics.median(times)
        tokens = result["batch"] * result["seq"]
        result.update(
            status="ok",
            trainable_params=trainable,
            step_ms=median,
            step_ms_min=min(times),
            step_ms_max=max(times),
            tokens_per_s=tokens / (median / 1e3),
            loss_first=losses[0],
            loss_last=losses[-1],
            finite=all(math.isfinite(x) for x in losses),
        )
        if device.type == "cuda":
            result["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            result["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
            result["static_gib"] = static / 2**30
        if cprofile_dir is not None:
            result["cprofile"] = cprofile_steps(step, device, steps, Path(cprofile_dir), f"{arm}_b{result['batch']}")
        if profile_dir is not None and profile_steps_n > 0:
            result["profile"] = profile_steps(step, device, profile_steps_n, Path(profile_dir), f"{arm}_b{result['batch']}")
            if trace:
                export_trace(step, device, Path(profile_dir) / f"trace_{arm}_b{result['batch']}.json.gz")
    except torch.OutOfMemoryError as exc:
        result.update(status="oom", error=str(exc).splitlines()[0][:300])
        if device.type == "cuda":
            result["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    finally:
        step = None  # noqa: F841 - drop closures holding optimiser state before freeing
        try:
            cleanup()
        finally:
            cleanup = None
            free_memory(device)
    return result


# ---------------------------------------------------------------------------------------------
# summary
# ---------------------------------------------------------------------------------------------
TARGETS = {
    "mrt_step_vs_floor_max": 1.03,
    "mrt_throughput_vs_lora_min": 1.45,
    "mrt_peak_vs_floor_max": 1.02,
}


def combine_cycles(results: list[dict[str, Any]]) -> dict[tuple[int, str], dict[str, Any]]:
    """(batch, arm) → its result; an arm run in several cycles gets the median of its per-cycle
    medians (and the per-cycle values in `step_ms_cycles`), the extremes over all steps, the
    highest peak."""
    groups: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for r in results:
        if r.get("status") == "ok":
            groups.setdefault((r["batch"], r["arm"]), []).append(r)
    by = {}
    for key, runs in groups.items():
        if len(runs) == 1:
            by[key] = runs[0]
            continue
        merged = dict(runs[0])
        merged["step_ms_cycles"] = [r["step_ms"] for r in runs]
        merged["step_ms"] = statistics.median(merged["step_ms_cycles"])
        merged["step_ms_min"] = min(r["step_ms_min"] for r in runs)
        merged["step_ms_max"] = max(r["step_ms_max"] for r in runs)
        merged["tokens_per_s"] = runs[0]["tokens_per_s"] * runs[0]["step_ms"] / merged["step_ms"]
        if all("peak_gib" in r for r in runs):
            merged["peak_gib"] = max(r["peak_gib"] for r in runs)
        by[key] = merged
    return by


def compare(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per batch size: MRT / floor step time, MRT / LoRA throughput, MRT / floor and MRT / LoRA
    peak memory, LoRA / floor step time, and whether each target holds."""
    by = combine_cycles(results)
    out = {}
    for b in sorted({r["batch"] for r in results}):
        floor, mrt, lora = by.get((b, "floor")), by.get((b, "mrt")), by.get((b, "lora"))
        row: dict[str, Any] = {}
        if floor and mrt:
            row["mrt_step_vs_floor"] = mrt["step_ms"] / floor["step_ms"]
            if "step_ms_cycles" in mrt and "step_ms_cycles" in floor:
                row["mrt_step_vs_floor_cycles"] = [m / f for m, f in zip(mrt["step_ms_cycles"], floor["step_ms_cycles"])]
                before = by.get((b, BASELINE_ARM))
                if before and "step_ms_cycles" in before:
                    row["mrt_before_step_vs_floor_cycles"] = [
                        m / f for m, f in zip(before["step_ms_cycles"], floor["step_ms_cycles"])]
            row["met_step"] = row["mrt_step_vs_floor"] <= TARGETS["mrt_step_vs_floor_max"]
            if "peak_gib" in mrt:
                row["mrt_peak_vs_floor"] = mrt["peak_gib"] / floor["peak_gib"]
                row["met_peak"] = row["mrt_peak_vs_floor"] <= TARGETS["mrt_peak_vs_floor_max"]
        if mrt and lora:
            row["mrt_throughput_vs_lora"] = mrt["tokens_per_s"] / lora["tokens_per_s"]
            row["met_throughput"] = row["mrt_throughput_vs_lora"] >= TARGETS["mrt_throughput_vs_lora_min"]
            if "peak_gib" in mrt:
                row["mrt_peak_vs_lora"] = mrt["peak_gib"] / lora["peak_gib"]
        if floor and lora:
            row["lora_step_vs_floor"] = lora["step_ms"] / floor["step_ms"]
        before = by.get((b, BASELINE_ARM))
        if floor and before:
            row["mrt_before_step_vs_floor"] = before["step_ms"] / floor["step_ms"]
            if "peak_gib" in before:
                row["mrt_before_peak_vs_floor"] = before["peak_gib"] / floor["peak_gib"]
        if lora and before:
            row["mrt_before_throughput_vs_lora"] = before["tokens_per_s"] / lora["tokens_per_s"]
        lora32 = by.get((b, "lora_fp32"))
        if mrt and lora32:
            row["mrt_throughput_vs_lora_fp32"] = mrt["tokens_per_s"] / lora32["tokens_per_s"]
            if "peak_gib" in mrt:
                row["mrt_peak_vs_lora_fp32"] = mrt["peak_gib"] / lora32["peak_gib"]
        if floor and lora32:
            row["lora_fp32_step_vs_floor"] = lora32["step_ms"] / floor["step_ms"]
        # CUDA graphs of the vision layers: the editors against the graphed floor (their own cost)
        # and against the stock floor (what a user of train.cuda_graphs gets)
        for arm, ref in (("mrt_graphed", "floor_graphed"), ("mrt_graphed", "floor"), ("floor_graphed", "floor")):
            a, f = by.get((b, arm)), by.get((b, ref))
            if a and f:
                row[f"{arm}_step_vs_{ref}"] = a["step_ms"] / f["step_ms"]
                if "step_ms_cycles" in a and "step_ms_cycles" in f:
                    row[f"{arm}_step_vs_{ref}_cycles"] = [x / y for x, y in zip(a["step_ms_cycles"], f["step_ms_cycles"])]
                if "peak_gib" in a and "peak_gib" in f:
                    row[f"{arm}_peak_vs_{ref}"] = a["peak_gib"] / f["peak_gib"]
        out[str(b)] = row
    return out


def profile_diff(results: list[dict[str, Any]], top: int = 25) -> dict[str, Any]:
    """Per batch size, floor → MRT: kernels whose device time per step grows most, host ops whose
    host time grows most, and the change in device busy time, launches and synchronisations."""
    out = {}
    by = {(r["batch"], r["arm"]): r for r in results if "profile" in r}
    for b in sorted({r["batch"] for r in results}):
        floor, mrt = by.get((b, "floor")), by.get((b, "mrt"))
        if not (floor and mrt):
            continue
        fp, mp = floor["profile"], mrt["profile"]
        before = by.get((b, BASELINE_ARM))

        def ranked(key):
            f, m = fp[key], mp[key]
            diff = {k: m.get(k, 0.0) - f.get(k, 0.0) for k in set(f) | set(m)}
            return [[k[:120], round(v, 1)] for k, v in sorted(diff.items(), key=lambda kv: -abs(kv[1]))[:top]]

        out[str(b)] = {
            "device_busy_ms": [round(fp["device_busy_ms_per_step"], 2), round(mp["device_busy_ms_per_step"], 2)],
            "kernel_launches": [fp["kernel_launches_per_step"], mp["kernel_launches_per_step"]],
            "before_device_busy_ms_and_launches": [round(before["profile"]["device_busy_ms_per_step"], 2),
                                                   before["profile"]["kernel_launches_per_step"]] if before else None,
            "syncs": [fp["syncs_per_step"], mp["syncs_per_step"]],
            "kernels_us": ranked("per_kernel_device_us"),
            "host_ops_us": ranked("per_op_host_us"),
        }
    return out


def markdown(summary: dict[str, Any]) -> str:
    lines = [
        f"Device: {summary['env'].get('device')}; torch {summary['env'].get('torch')}, "
        f"transformers {summary['env'].get('transformers')}, peft {summary['env'].get('peft')}; "
        f"L = {summary['seq']} tokens ({summary['image_tokens']} image + {summary['text_tokens']} text), "
        f"median of {summary['steps']} steps after {summary['warmup']} warm-up.",
        "",
        "| batch | arm | step ms (min–max) | tokens/s | peak GiB | trainable params |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for r in summary["results"]:
        if r.get("status") != "ok":
            lines.append(f"| {r['batch']} | {r['arm']} | {r.get('status', '?').upper()} | – | "
                         f"{r.get('peak_gib', float('nan')):.1f} at failure | – |")
            continue
        peak = f"{r['peak_gib']:.2f}" if "peak_gib" in r else "–"
        arm = r["arm"] + (f" (cycle {r['cycle'] + 1})" if summary.get("cycles", 1) > 1 else "")
        lines.append(
            f"| {r['batch']} | {arm} | {r['step_ms']:.1f} ({r['step_ms_min']:.1f}–{r['step_ms_max']:.1f}) | "
            f"{r['tokens_per_s']:,.0f} | {peak} | {r['trainable_params']:,} |"
        )
    lines += ["", "| batch | MRT/floor step | MRT/LoRA throughput | MRT/floor peak | MRT/LoRA peak | LoRA/floor step "
              "| MRT/LoRA-fp32 throughput | MRT/LoRA-fp32 peak | LoRA-fp32/floor step | before: MRT/floor step |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for b, row in summary["compare"].items():
        def f(key, fmt="{:.3f}"):
            return fmt.format(row[key]) if key in row else "–"

        lines.append(f"| {b} | {f('mrt_step_vs_floor')} | {f('mrt_throughput_vs_lora')} | {f('mrt_peak_vs_floor')} | "
                     f"{f('mrt_peak_vs_lora')} | {f('lora_step_vs_floor')} | {f('mrt_throughput_vs_lora_fp32')} | "
                     f"{f('mrt_peak_vs_lora_fp32')} | {f('lora_fp32_step_vs_floor')} | {f('mrt_before_step_vs_floor')} |")
    for b, row in summary["compare"].items():
        if "mrt_step_vs_floor_cycles" in row:
            cyc = ", ".join(f"{x:.3f}" for x in row["mrt_step_vs_floor_cycles"])
            before = row.get("mrt_before_step_vs_floor_cycles")
            lines.append(f"\nbatch {b}, MRT/floor per cycle: {cyc}"
                         + (f"; before: {', '.join(f'{x:.3f}' for x in before)}" if before else ""))
    return "\n".join(lines) + "\n"


def environment(device) -> dict[str, Any]:
    import peft
    import torch
    import transformers

    env = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
        "device": "cpu",
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device=props.name, cuda=torch.version.cuda, memory_gib=props.total_memory / 2**30,
                   sms=props.multi_processor_count)
    return env


# ---------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny model on CPU (or GPU): a logic check, not a benchmark")
    ap.add_argument("--host-bound", action="store_true",
                    help="the 7B depth and placement at tiny widths (default batch 8): step time = host time")
    ap.add_argument("--arms", nargs="+", default=None, choices=(*ARMS, *EXTRA_ARMS),
                    help=f"default: all of {ARMS}, plus {BASELINE_ARM} after mrt when --baseline-editors is given")
    ap.add_argument("--baseline-editors", type=Path, default=None,
                    help=f"a copy of an earlier components/editors, timed as arm {BASELINE_ARM} in the same process")
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=None)
    ap.add_argument("--text-tokens", type=int, default=None, help="padded text length (default 128; smoke 24)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--lora-r", type=int, default=128)
    ap.add_argument("--profile", type=Path, default=None, help="folder for torch-profiler tables (floor and mrt arms)")
    ap.add_argument("--profile-steps", type=int, default=3)
    ap.add_argument("--cprofile", type=Path, default=None,
                    help="folder for cProfile tables of each arm's host time (first cycle, after the timed steps)")
    ap.add_argument("--cycles", type=int, default=1,
                    help="run the arms this many times in turn per batch size (drift-robust ratios)")
    ap.add_argument("--trace", action="store_true",
                    help="with --profile: also write a gzipped Chrome trace of one step (first batch size, floor/mrt)")
    ap.add_argument("--json", type=Path, default=None, help="write the summary here (rewritten after every arm)")
    ap.add_argument("--markdown", type=Path, default=None, help="write the results tables here")
    ap.add_argument("--gc", choices=("on", "off"), default="on",
                    help="off: Python's garbage collector disabled during each arm's warm-up and timed steps")
    ap.add_argument("--label", default="", help="free text recorded in the summary (e.g. 'before', 'after')")
    return ap.parse_args(argv)


def main(argv=None) -> dict[str, Any]:
    from components.core.offline import set_offline_env

    set_offline_env()
    args = parse_args(argv)
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not (args.smoke or args.host_bound):
        raise SystemExit("gpu_train_step.py: no CUDA device; use --smoke for a CPU logic check")
    if args.baseline_editors is not None:
        _BASELINE["attach"] = load_editors_package(args.baseline_editors).attach
    if args.arms is None:
        args.arms = list(ARMS)
        if args.baseline_editors is not None:
            args.arms.insert(args.arms.index("mrt") + 1, BASELINE_ARM)
    if args.host_bound:
        # The 7B model's depth (24 vision, 32 LM layers) and the paper's placement at tiny widths:
        # every kernel is short, so a step's time is the host's, and MRT − floor is what the
        # editors cost the host (launches included) on this machine.
        from components.editors import paper_placement_7b

        config, placement = tiny_config(), paper_placement_7b()
        config.vision_config.num_hidden_layers, config.text_config.num_hidden_layers = 24, 32
        batch_sizes, text_tokens = args.batch_sizes or [8], args.text_tokens or 24
        warmup, steps = args.warmup if args.warmup is not None else 3, args.steps or 10
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    elif args.smoke:
        from components.editors import count  # noqa: F401 - import check only

        config, placement = tiny_config(), tiny_placement()
        batch_sizes, text_tokens = args.batch_sizes or [2, 4], args.text_tokens or 24
        warmup, steps = args.warmup if args.warmup is not None else 1, args.steps or 2
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        from components.editors import llava_7b_config, paper_placement_7b

        config, placement = llava_7b_config(), paper_placement_7b()
        batch_sizes, text_tokens = args.batch_sizes or [8, 16], args.text_tokens or 128
        warmup, steps = args.warmup if args.warmup is not None else 3, args.steps or 10
        dtype = torch.bfloat16
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 stays fp32 (the editors compute in fp32)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = build_model(config, device, dtype)
    model.train()
    build_s = time.perf_counter() - t0
    summary: dict[str, Any] = {
        "label": args.label,
        "baseline_editors": str(args.baseline_editors) if args.baseline_editors else None,
        "env": environment(device),
        "smoke": args.smoke,
        "host_bound": args.host_bound,
        "build_s": build_s,
        "base_params": sum(p.numel() for p in model.parameters()),
        "image_tokens": n_image_tokens(config),
        "text_tokens": text_tokens,
        "seq": n_image_tokens(config) + text_tokens,
        "warmup": warmup,
        "steps": steps,
        "gradient_checkpointing": False,
        "gc": args.gc,
        "results": [],
    }
    print(f"built {summary['base_params'] / 1e9:.2f} B params in {build_s:.1f} s on {summary['env']['device']}", flush=True)
    summary["cycles"] = args.cycles
    for b in batch_sizes:
        batch = make_batch(config, b, text_tokens, device, dtype, seed=b)
        # With --cycles N the arms run N times in turn (floor, mrt, …, floor, mrt, …): drift of the
        # machine over minutes then hits every arm alike, and each cycle gives its own ratios.
        for cycle, arm in ((c, a) for c in range(args.cycles) for a in args.arms):
            prof = args.profile if arm in ("floor", "mrt", *EXTRA_ARMS) and cycle == 0 else None
            trace = bool(args.trace and prof and b == batch_sizes[0] and arm in ("floor", "mrt"))
            r = run_arm(arm, model, batch, device, placement, warmup, steps, prof, args.profile_steps, args.lora_r,
                        trace=trace, gc_off=args.gc == "off", cprofile_dir=args.cprofile if cycle == 0 else None)
            r["cycle"] = cycle
            summary["results"].append(r)
            brief = {k: v for k, v in r.items() if k != "profile"}
            if "profile" in r:
                brief.update({k: r["profile"][k] for k in ("device_busy_share", "kernel_launches_per_step", "syncs_per_step")})
            print(json.dumps(brief), flush=True)
            summary["compare"] = compare(summary["results"])
            if args.json:
                _write_json(args.json, summary)
        del batch
    summary["compare"] = compare(summary["results"])
    summary["profile_diff_us_per_step"] = profile_diff(summary["results"])
    if args.json:
        _write_json(args.json, summary)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown(summary))
    print(markdown(summary))
    short = {k: v for k, v in summary.items() if k != "results"}
    short["results"] = [{k: v for k, v in r.items() if k != "profile"} for r in summary["results"]]
    print(json.dumps(short))
    return summary


def _write_json(path: Path, summary: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(summary, indent=1, default=str))
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
